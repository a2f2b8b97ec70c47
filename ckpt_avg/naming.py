"""What a checkpoint's file name says: its epoch, step, metrics, and whether it is an alias.

Pure functions over strings, no I/O, so every naming convention is tested without files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Longest first, so `x.pth.tar` is not mistaken for a `.tar` file.
CHECKPOINT_SUFFIXES = (".pth.tar", ".safetensors", ".ckpt", ".pth", ".pt", ".bin")
PYTORCH_SUFFIXES = (".pth.tar", ".ckpt", ".pth", ".pt", ".bin")

# ASCII digits only: `\d` also matches other scripts' digits, which int() reads, so
# `epoch=١٢` would count as epoch 12 and sort among the real ones.
_INT = r"0*([0-9]+)"
_EPOCH = re.compile(r"(?:^|[^a-z])epoch[=_-]?" + _INT + r"(?![0-9.])", re.IGNORECASE)
_STEP = re.compile(r"(?:^|[^a-z])(?:global_)?step[=_-]?" + _INT + r"(?![0-9.])", re.IGNORECASE)
_FAIRSEQ_EPOCH = re.compile(r"^checkpoint" + _INT + r"$")
_FAIRSEQ_UPDATE = re.compile(r"^checkpoint_" + _INT + "_" + _INT + r"$")
_DASH_NUMBER = re.compile(r"^checkpoint-" + _INT + r"$")
_MEGATRON = re.compile(r"^iter_" + _INT + r"$")
_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_METRIC = re.compile(r"(?:^|[-_ ])([A-Za-z][\w/.]*?)=(" + _NUMBER + r")(?=$|[-_ ])")
_ALIAS = re.compile(
    r"^(?:last(?:-v[0-9]+)?|checkpoint_last|checkpoint_best|checkpoint\.best_.*|best(?:-v[0-9]+)?"
    r"|model_best|recovery-.*|tmp|checkpoint_latest|latest)$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class NameInfo:
    """Indices and metrics read from one name; None where the name carries none."""

    epoch: int | None = None
    step: int | None = None
    is_alias: bool = False
    # fairseq writes checkpointK.pt at the end of epoch K and checkpoint_K_U.pt mid-epoch.
    mid_epoch: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def checkpoint_suffix(name: str) -> str | None:
    """The recognised checkpoint suffix of a file name, or None."""
    lower = name.lower()
    for suffix in CHECKPOINT_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def stem(name: str) -> str:
    """The name without its checkpoint suffix."""
    suffix = checkpoint_suffix(name)
    return name[: -len(suffix)] if suffix else name


def parse_name(name: str, *, is_directory: bool = False) -> NameInfo:
    """Read epoch, step, metrics and alias-ness from a file or directory name.

    >>> parse_name("epoch=12-step=3000.ckpt")
    NameInfo(epoch=12, step=3000, is_alias=False, mid_epoch=False, metrics={})
    >>> parse_name("checkpoint-500", is_directory=True).step
    500
    """
    base = name if is_directory else stem(name)
    metrics = _metrics(base)
    if _ALIAS.match(base):
        return NameInfo(is_alias=True, metrics=metrics)
    if m := _FAIRSEQ_EPOCH.match(base):
        return NameInfo(epoch=int(m.group(1)), metrics=metrics)
    if m := _FAIRSEQ_UPDATE.match(base):
        return NameInfo(epoch=int(m.group(1)), step=int(m.group(2)), mid_epoch=True)
    if m := _DASH_NUMBER.match(base):
        # Trainer's checkpoint-N/ directory counts steps; timm's checkpoint-N.pth.tar epochs.
        number = int(m.group(1))
        return NameInfo(step=number) if is_directory else NameInfo(epoch=number)
    if m := _MEGATRON.match(base):
        return NameInfo(step=int(m.group(1)))
    epoch = _EPOCH.search(base)
    step = _STEP.search(base)
    return NameInfo(
        epoch=int(epoch.group(1)) if epoch else None,
        step=int(step.group(1)) if step else None,
        metrics=metrics,
    )


def _metrics(base: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for m in _METRIC.finditer(base):
        key = m.group(1)
        if key.lower() in ("epoch", "step", "global_step"):
            continue
        found[key] = float(m.group(2))
    return found
