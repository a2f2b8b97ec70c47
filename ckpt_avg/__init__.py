"""ckpt-avg: exact, streaming, safe averaging of saved training checkpoints (offline SWA)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .api import average_checkpoints, plan_checkpoints
    from .errors import CkptAvgError
    from .options import Options
    from .report import Report
    from .select import SelectOptions
    from .verify import Verification, verify_output

_EXPORTS = {
    "Options": "options",
    "average_checkpoints": "api",
    "plan_checkpoints": "api",
    "CkptAvgError": "errors",
    "Report": "report",
    "SelectOptions": "select",
    "Verification": "verify",
    "verify_output": "verify",
}


def __getattr__(name: str) -> Any:
    # Imported on first use, so `ckpt-avg` can answer Ctrl-C while torch is still loading.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ckpt_avg' has no attribute {name!r}")


__all__ = [
    "CkptAvgError",
    "Options",
    "Report",
    "SelectOptions",
    "Verification",
    "__version__",
    "average_checkpoints",
    "plan_checkpoints",
    "verify_output",
]
