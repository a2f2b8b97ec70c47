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
_STEP = re.compile(r"(?:^|[^a-z])(?:global_)?(?:step|iter)[=_-]?" + _INT + r"(?![0-9.])", re.IGNORECASE)
_FAIRSEQ_EPOCH = re.compile(r"^checkpoint" + _INT + r"$")
_FAIRSEQ_UPDATE = re.compile(r"^checkpoint_" + _INT + "_" + _INT + r"$")
_DASH_NUMBER = re.compile(r"^checkpoint-" + _INT + r"$")
_MEGATRON = re.compile(r"^iter_" + _INT + r"$")
# accelerate's save_state(): checkpoints/checkpoint_N/ counts saves, neither epochs nor steps.
_SAVE_COUNT = re.compile(r"^checkpoint_" + _INT + r"$")
_ESPNET_EPOCH = re.compile(r"^" + _INT + r"epoch$")
_TORCHVISION_EPOCH = re.compile(r"^model_" + _INT + r"$")
# NeMo's and Lightning's `...-epoch=3-last`, mmengine's `best_acc_epoch_3`: copies that still
# name their index.
_LAST_COPY = re.compile(r"-last(?:-v[0-9]+)?$|^best_.+_(?:epoch|iter)_[0-9]+$", re.IGNORECASE)
_NATURAL = re.compile(r"([0-9]+)")
_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_METRIC = re.compile(r"(?:^|[-_ ])([A-Za-z][\w/.]*?)=(" + _NUMBER + r")(?=$|[-_ ])")
_ALIAS = re.compile(
    r"^(?:last(?:-v[0-9]+)?|checkpoint_last|checkpoint_best|checkpoint\.best_.*|best(?:-v[0-9]+)?"
    r"|model_best|recovery-.*|tmp|checkpoint_latest|latest"
    # torchvision's and ESPnet's resume copy; icefall's `best-valid-loss`;
    # ESPnet's `valid.acc.best` links and `valid.acc.ave_10best` averages.
    r"|checkpoint|best-.*|.*\.best|.*\.ave(?:_[0-9]+best)?)$",
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
    save: int | None = None  # accelerate's save count: orders, but is neither epoch nor step
    # A FILE `checkpoint-N.pt`: timm's epoch N or icefall's batch N; the contents decide.
    dash_file: bool = False
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
        if is_directory:
            return NameInfo(step=number)
        return NameInfo(epoch=number, dash_file=not name.lower().endswith(".pth.tar"))
    if m := _MEGATRON.match(base):
        return NameInfo(step=int(m.group(1)))
    if m := _SAVE_COUNT.match(base):
        return NameInfo(save=int(m.group(1)))
    if m := _ESPNET_EPOCH.match(base):
        return NameInfo(epoch=int(m.group(1)))
    if (m := _TORCHVISION_EPOCH.match(base)) and name.lower().endswith(".pth"):
        # accelerate's second model is model_1.safetensors: only torchvision's .pth is an epoch.
        return NameInfo(epoch=int(m.group(1)))
    epoch = _EPOCH.search(base)
    step = _STEP.search(base)
    return NameInfo(
        epoch=int(epoch.group(1)) if epoch else None,
        step=int(step.group(1)) if step else None,
        is_alias=bool(_LAST_COPY.search(base)),
        metrics=metrics,
    )


def _metrics(base: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for m in _METRIC.finditer(base):
        key = m.group(1)
        if key.lower() in ("epoch", "step", "global_step", "iter"):
            continue
        found[key] = float(m.group(2))
    return found


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts `ckpt_2` before `ckpt_10`.

    >>> sorted(["ckpt_10", "ckpt_2"], key=natural_key)
    ['ckpt_2', 'ckpt_10']
    """
    return tuple((0, int(part)) if part.isascii() and part.isdigit() else (1, part) for part in _NATURAL.split(text))
