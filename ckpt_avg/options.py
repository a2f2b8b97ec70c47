"""`Options`: every choice a run takes, in a module of its own so that each stage can take it
(the writers, the engine, inspect) without importing the API that drives them."""

from __future__ import annotations

from dataclasses import dataclass, field

from .average import Budgets
from .select import SelectOptions


@dataclass(frozen=True)
class Options:
    """Every choice a run takes; the CLI's options map onto these one to one."""

    recursive: bool = False
    glob: str | None = None
    select: SelectOptions = field(default_factory=SelectOptions)
    key: str | None = None
    strip_prefix: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    ema: float | None = None
    dtype: str | None = None
    accum_dtype: str = "float64"
    device: str = "cpu"
    int_policy: str = "error"
    allow_nonfinite: bool = False
    trust_pickle: bool = False
    allow_global: tuple[str, ...] = ()
    force: bool = False
    max_shard_size: str | None = None
    hash_files: bool = True  # the report's sha256 of each file written (taken as the bytes are written)
    bn_model: str | None = None  # MODULE:CALLABLE returning the model
    bn_data: str | None = None  # MODULE:CALLABLE returning batches, or a .pt/.safetensors file
    bn_batch_size: int = 32
    bn_batches: int | None = None
    budgets: Budgets = field(default_factory=Budgets)  # buffer memory and threads of the kernel
