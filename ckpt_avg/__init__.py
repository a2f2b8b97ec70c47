"""ckpt-avg: exact, streaming, safe averaging of saved training checkpoints (offline SWA)."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import Options, average_checkpoints, plan_checkpoints
from .errors import CkptAvgError
from .report import Report
from .select import SelectOptions

__all__ = [
    "CkptAvgError",
    "Options",
    "Report",
    "SelectOptions",
    "__version__",
    "average_checkpoints",
    "plan_checkpoints",
]
