"""ckpt-avg: exact, streaming, safe averaging of saved training checkpoints (offline SWA)."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import Options, average_checkpoints, plan_checkpoints  # noqa: E402
from .errors import CkptAvgError  # noqa: E402
from .report import Report  # noqa: E402
from .select import SelectOptions  # noqa: E402

__all__ = [
    "CkptAvgError",
    "Options",
    "Report",
    "SelectOptions",
    "__version__",
    "average_checkpoints",
    "plan_checkpoints",
]
