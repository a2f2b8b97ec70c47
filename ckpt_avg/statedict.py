"""Finding the state dict to average inside a checkpoint's object tree.

Libraries nest the weights differently: Lightning under `state_dict`, fairseq and timm
under `model` or `state_dict`, plain scripts under `model_state_dict`, Trainer and
safetensors files flat. EMA copies sit beside them (`state_dict_ema`,
Lightning's `current_model_state`) and are averaged too when the output keeps structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import CheckpointError, UsageError
from .lazy import is_tensor_leaf
from .torchfile import UnsupportedTensor
from .unpickle import Placeholder, shown

PRIMARY_NAMES = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "model_state",
    "net",
    "network",
    "weights",
)
SECONDARY_NAMES = (
    "state_dict_ema",
    "model_ema",
    "ema_state_dict",
    "ema",
    "ema_model",
    "model_ema_state_dict",
    "current_model_state",
    "averaged_model_state",
    "averaging_state",
    "swa_model",
    "model_avg",  # icefall's running average of the model
)
# Training state that no longer matches averaged weights: left out of a .pt output.
TRAINING_STATE_NAMES = frozenset(
    {
        "optimizer",
        "optimizer_states",
        "optimizer_state_dict",
        "optimizer_state",
        "optim",
        "last_optimizer_state",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "scheduler_state_dict",
        "callbacks",
        "scaler",
        "amp_scaler",  # timm
        "grad_scaler",
        "amp",
        "amp_scaling_state",
        "native_amp_scaling_state",
        "MixedPrecision",
        "MixedPrecisionPlugin",
        "NativeMixedPrecisionPlugin",
        "rng_state",
        "rng_states",
    }
)

Path = tuple[str, ...]


@dataclass(frozen=True)
class StateDictChoice:
    primary: Path  # () when the checkpoint is itself a flat state dict
    others: tuple[Path, ...]
    warning: str | None = None
    # Found and shown in the plan, never averaged: they sit inside training state (Lightning's
    # SWA average under `callbacks`), which an output leaves out.
    listed: tuple[Path, ...] = ()


def is_state_dict(node: Any) -> bool:
    """A mapping of names to tensors; `_extra_state` and packed-params entries may be anything."""
    if not isinstance(node, Mapping) or not node or not all(isinstance(k, str) for k in node):
        return False
    tensors = 0
    for key, value in node.items():
        if is_extra_entry(key):
            continue
        if not (is_tensor_leaf(value) or isinstance(value, UnsupportedTensor)):
            return False
        tensors += 1
    return tensors > 0


def is_extra_entry(key: str) -> bool:
    """State-dict entries that are not weights: `get_extra_state()` (TransformerEngine's FP8
    metadata) and dynamic quantization's packed parameters. Copied from the last checkpoint."""
    parts = key.split(".")
    return parts[-1] == "_extra_state" or "_packed_params" in parts


def dotted(path: Path) -> str:
    return ".".join(path) if path else "(top level)"


def get_path(tree: Any, path: Path) -> Any:
    node = tree
    for part in path:
        node = node[part]
    return node


def find_state_dicts(tree: Any, *, key: str | None, where: str) -> StateDictChoice:
    """Which state dict to average, and which others (EMA) the checkpoint also holds."""
    choice = _find_state_dicts(tree, key=key, where=where)
    listed = tuple(p for p in _callback_state_dicts(tree) if p != choice.primary)
    return replace(choice, listed=listed) if listed else choice


def _callback_state_dicts(tree: Any) -> list[Path]:
    """Lightning's StochasticWeightAveraging keeps its running average in the callback's state."""
    callbacks = tree.get("callbacks") if isinstance(tree, Mapping) else None
    if not isinstance(callbacks, Mapping):
        return []
    return [
        ("callbacks", name, "average_model_state")
        for name, state in callbacks.items()
        if isinstance(name, str)
        and name.startswith("StochasticWeightAveraging")
        and isinstance(state, Mapping)
        and is_state_dict(state.get("average_model_state"))
    ]


def _find_state_dicts(tree: Any, *, key: str | None, where: str) -> StateDictChoice:
    if key is not None:
        chosen = _chosen(tree, tuple(key.split(".")), where)
        found = _top_level_state_dicts(tree)
        return StateDictChoice(chosen.primary, tuple((n,) for n in found if (n,) != chosen.primary))
    if is_state_dict(tree):
        return StateDictChoice((), ())
    if not isinstance(tree, Mapping):
        what = tree.global_name if isinstance(tree, Placeholder) else type(tree).__name__
        raise CheckpointError(f"{where}: holds a {what}, not a dict of tensors or a model; save a state_dict() instead")
    found = _top_level_state_dicts(tree)
    if not found:
        raise CheckpointError(f"{where}: no state dict found; top-level keys: {_listing(tree)}; pick one with --key")
    preferred = [name for name in PRIMARY_NAMES if name in found]
    others = [name for name in found if name not in preferred[:1]]
    if preferred:
        primary = preferred[0]
    elif len(found) == 1:
        primary = found[0]
        others = []
    else:
        raise CheckpointError(
            f"{where}: several state dicts ({', '.join(found)}) and none is the usual one; choose with --key"
        )
    unknown = [name for name in others if name not in SECONDARY_NAMES]
    warning = None
    if unknown:
        warning = (
            f"{where}: averaging {primary!r}; the checkpoint also holds state dicts"
            f" {', '.join(map(repr, unknown))} (choose another with --key)"
        )
    if primary == "state_dict" and _mmengine_ema(tree):
        warning = (
            f"{where}: 'state_dict' holds the EMA weights of mmengine's EMAHook (it swaps them in before"
            " saving); the raw weights are in 'ema_state_dict' (average those with --key ema_state_dict"
            " --strip-prefix module.)"
        )
    if primary == "state_dict" and "current_model_state" in found:
        warning = (
            f"{where}: 'state_dict' holds the weights averaged by Lightning's WeightAveraging callback; the raw"
            " weights are in 'current_model_state' (average those with --key current_model_state)"
        )
    return StateDictChoice((primary,), tuple((name,) for name in others), warning)


def _mmengine_ema(tree: Mapping[Any, Any]) -> bool:
    """EMAHook's checkpoint: `ema_state_dict` holds `steps` and the model's keys under `module.`."""
    ema = tree.get("ema_state_dict")
    return isinstance(ema, Mapping) and "steps" in ema and any(str(k).startswith("module.") for k in ema)


def _top_level_state_dicts(tree: Any) -> list[str]:
    if not isinstance(tree, Mapping) or is_state_dict(tree):
        return []
    return [name for name, value in tree.items() if isinstance(name, str) and is_state_dict(value)]


def _chosen(tree: Any, path: Path, where: str) -> StateDictChoice:
    try:
        node = get_path(tree, path)
    except (KeyError, TypeError, IndexError):
        raise UsageError(
            f"--key {'.'.join(path)}: not found in {where}; state dicts there: {_state_dict_names(tree)}"
        ) from None
    if not is_state_dict(node):
        raise UsageError(
            f"--key {'.'.join(path)}: not a dict of tensors in {where}{_first_non_tensor(node)}; state dicts"
            f" there: {_state_dict_names(tree)}"
        )
    return StateDictChoice(path, ())


def _first_non_tensor(node: Any) -> str:
    """Which entry keeps a dict from being a state dict (only `_extra_state` entries may be other
    values): named, so the user knows what to remove; never printed itself."""
    if not isinstance(node, Mapping):
        return ""
    for key, value in node.items():
        if not isinstance(key, str):
            return " (a key is not a string)"
        if not is_extra_entry(key) and not (is_tensor_leaf(value) or isinstance(value, UnsupportedTensor)):
            return f" ({shown(key, 80)!r} is a {shown(type(value).__name__, 60)})"
    return ""


def _state_dict_names(tree: Any) -> str:
    if is_state_dict(tree):
        return "(top level)"
    if not isinstance(tree, Mapping):
        return "none"
    names = [str(k) for k, v in tree.items() if is_state_dict(v)]
    return ", ".join(names) if names else f"none (top-level keys: {_listing(tree)})"


def _listing(tree: Mapping[Any, Any]) -> str:
    names = [str(k) for k in tree]
    shown = ", ".join(names[:12])
    return shown + (f", ... ({len(names)} keys)" if len(names) > 12 else "")


def holds_lightning_swa_average(tree: Any) -> bool:
    """True for the checkpoint Lightning saves after StochasticWeightAveraging's BatchNorm epoch.

    With BatchNorm layers, Lightning trains one epoch more to refresh their statistics, and
    that epoch's checkpoint holds the SWA average: saved after the last averaging epoch.
    """
    callbacks = tree.get("callbacks") if isinstance(tree, dict) else None
    epoch = tree.get("epoch") if isinstance(tree, dict) else None
    if not isinstance(callbacks, dict) or not isinstance(epoch, int):
        return False
    for name, state in callbacks.items():
        if isinstance(name, str) and name.startswith("StochasticWeightAveraging") and isinstance(state, dict):
            latest, averaged = state.get("latest_update_epoch"), state.get("n_averaged")
            if isinstance(latest, int) and isinstance(averaged, int) and averaged > 0 and epoch > latest:
                return True
    return False
