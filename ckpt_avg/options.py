"""`Options`: every choice a run takes, in a module of its own so that each stage can take it
(the writers, the engine, inspect) without importing the API that drives them."""

from __future__ import annotations

import math
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
    format: str | None = None  # a directory output: "hf" or "dcp" (default: dcp for DCP inputs, else hf)
    hash_files: bool = True  # the report's sha256 of each file written (taken as the bytes are written)
    bn_model: str | None = None  # MODULE:CALLABLE returning the model
    bn_data: str | None = None  # MODULE:CALLABLE returning batches, or a .pt/.safetensors file
    bn_batch_size: int = 32
    bn_batches: int | None = None
    budgets: Budgets = field(default_factory=Budgets)  # buffer memory and threads of the kernel


def parse_size(text: str) -> int:
    """`5GB` = 5*10^9 bytes, `5GiB` = 5*2^30, a bare number is bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MiB or 1000000")
    return int(value * units[unit])
