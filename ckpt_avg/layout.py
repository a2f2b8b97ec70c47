"""The plan of the averaging: which tensors, as which units, visited in which order.

From the opened checkpoints and the chosen state dicts to `Unit`s (one per averaged tensor,
shared by tied names) and `Visit`s (the processing order, sorted by key so digests are
format-independent), with every key, shape and dtype check done before any tensor is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .average import Unit, Visit, classify
from .errors import CheckpointError, MismatchError
from .lazy import TensorLeaf, leaf_nbytes, leaf_shape, leaf_tie_key
from .sources import OpenedCheckpoint
from .statedict import StateDictChoice, dotted, get_path, is_extra_entry
from .torchfile import UnsupportedTensor

KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class Layout:
    """What will be averaged and where it goes: units in processing order, and the trees."""

    opened: list[OpenedCheckpoint]
    choice: StateDictChoice
    averaged_paths: list[tuple[str, ...]]
    names: dict[tuple[str, ...], dict[str, Unit]]  # per state-dict path: key -> unit
    visits: list[Visit]
    primary_names: list[str]
    input_bytes: int
    warnings: list[str]
    strip_prefix: tuple[str, ...] = ()
    # Per state-dict path: the last checkpoint's non-tensor entries (extra state), copied as they are.
    extras: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)

    @property
    def primary_units(self) -> list[Unit]:
        seen: dict[int, Unit] = {}
        for unit in self.names[self.choice.primary].values():
            seen.setdefault(id(unit), unit)
        return list(seen.values())


def has_state_dict(tree: Any, path: tuple[str, ...]) -> bool:
    from .statedict import is_state_dict

    try:
        return is_state_dict(get_path(tree, path))
    except (KeyError, TypeError, IndexError):
        return False


def strip_prefixes(state_dict: dict[str, TensorLeaf], prefixes: tuple[str, ...], where: str) -> dict[str, TensorLeaf]:
    """Keys with the given prefixes removed from their start, in any order and nesting."""
    if not prefixes:
        return dict(state_dict)
    stripped: dict[str, TensorLeaf] = {}
    for key, value in state_dict.items():
        new = _strip_key(key, prefixes)[0]
        if new in stripped:
            raise MismatchError(f"{where}: --strip-prefix makes two keys into {new!r}")
        stripped[new] = value
    return stripped


def _strip_key(key: str, prefixes: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The key without leading prefixes (`_orig_mod.module.x` -> `x`), and those it had."""
    found: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if prefix and key.startswith(prefix) and len(key) > len(prefix):
                key = key[len(prefix) :]
                found.append(prefix)
                changed = True
    return key, tuple(found)


def _state_dict_at(opened: OpenedCheckpoint, path: tuple[str, ...], last: str) -> dict[str, TensorLeaf]:
    """The state dict at `path`, found in the last checkpoint, in another one (a mixed run?)."""
    try:
        node = get_path(opened.tree, path)
    except (KeyError, IndexError, TypeError):
        node = None
    if not isinstance(node, dict):
        raise MismatchError(
            f"{opened.ref.display}: no state dict at {dotted(path)}, where {last} has the one averaged;"
            " are these checkpoints from one run? (--key PATH picks another)"
        )
    return node


def _prefix_hint(key_sets: list[set[str]]) -> list[str]:
    """The wrapper prefixes that are all that tells the key sets apart (empty if not so)."""
    stripped = [[_strip_key(k, KNOWN_PREFIXES) for k in keys] for keys in key_sets]
    if len({frozenset(s for s, _ in pairs) for pairs in stripped}) != 1:
        return []
    chains = {chain for pairs in stripped for _, chain in pairs}
    common = set.intersection(*(set(c) for c in chains))
    return [p for p in KNOWN_PREFIXES if any(p in c for c in chains) and p not in common]


def _check_keys(dicts: list[dict[str, TensorLeaf]], files: list[str], path: tuple[str, ...]) -> None:
    reference = set(dicts[-1])
    for sd, file in zip(dicts, files, strict=True):
        keys = set(sd)
        if keys == reference:
            continue
        prefixes = _prefix_hint([set(d) for d in dicts])
        if prefixes:
            quoted = " and ".join(repr(p) for p in prefixes)
            fix = " ".join(f"--strip-prefix {p}" for p in prefixes)
            raise MismatchError(
                f"{file}: keys differ from {files[-1]}'s only by the prefix {quoted}"
                f" (DDP/torch.compile/wrapper); add {fix}"
            )
        missing = sorted(reference - keys)
        extra = sorted(keys - reference)
        detail = f"lacks {missing[0]!r}" if missing else f"has extra key {extra[0]!r}"
        count = len(missing) + len(extra)
        raise MismatchError(
            f"{file}: state dict {dotted(path)} {detail} compared with {files[-1]}"
            + (f" ({count} keys differ)" if count > 1 else "")
        )


def build_layout(
    opened: list[OpenedCheckpoint],
    choice: StateDictChoice,
    paths: list[tuple[str, ...]],
    *,
    strip_prefix: tuple[str, ...],
    out_dtype: torch.dtype | None,
    warnings: list[str],
) -> Layout:
    """Units and visits for the state dicts at `paths` (the first is the primary one)."""
    files = [o.ref.display for o in opened]
    units_by_tie: dict[tuple[object, ...], Unit] = {}
    names: dict[tuple[str, ...], dict[str, Unit]] = {}
    visits: list[Visit] = []
    computed: set[int] = set()
    extras: dict[tuple[str, ...], dict[str, Any]] = {}
    for path in paths:
        dicts = [strip_prefixes(_state_dict_at(o, path, files[-1]), strip_prefix, o.ref.display) for o in opened]
        extras[path] = {k: v for k, v in dicts[-1].items() if is_extra_entry(k)}
        dicts = [{k: v for k, v in sd.items() if not is_extra_entry(k)} for sd in dicts]
        _check_keys(dicts, files, path)
        names[path] = {}
        for name in sorted(dicts[-1]):
            leaves = tuple(sd[name] for sd in dicts)
            unit = _unit_for(name, leaves, files, out_dtype, units_by_tie)
            names[path][name] = unit
            first = id(unit) not in computed
            computed.add(id(unit))
            where = "" if path == choice.primary else dotted(path)
            visits.append(Visit(name, unit, compute=first, digest=path == choice.primary, where=where))
    _check_zero3(names[choice.primary], files[-1])
    _warn_mixed_dtypes(names[choice.primary], files, out_dtype, warnings)
    input_bytes = sum(_input_bytes(v.unit) for v in visits if v.compute)
    return Layout(
        opened,
        choice,
        paths,
        names,
        visits,
        sorted(names[choice.primary]),
        input_bytes,
        warnings,
        strip_prefix,
        extras,
    )


def _warn_mixed_dtypes(
    units: dict[str, Unit], files: list[str], out_dtype: torch.dtype | None, warnings: list[str]
) -> None:
    mixed = [(name, unit) for name, unit in units.items() if len({leaf.dtype for leaf in unit.leaves}) > 1]
    if not mixed or out_dtype is not None:
        return
    name, unit = mixed[0]
    seen = ", ".join(
        f"{str(leaf.dtype).removeprefix('torch.')} in {f}" for leaf, f in zip(unit.leaves, files, strict=True)
    )
    warnings.append(
        f"{len(mixed)} tensor(s) change dtype across the checkpoints (e.g. {name!r}: {seen}); the output takes"
        f" the last checkpoint's dtype ({str(unit.out_dtype).removeprefix('torch.')}); choose one with --dtype"
    )


def _input_bytes(unit: Unit) -> int:
    return sum(leaf_nbytes(leaf) for leaf in unit.leaves)


def _check_zero3(units: dict[str, Unit], file: str) -> None:
    floats = [u for u in units.values() if u.kind == "float"]
    if floats and sum(1 for u in floats if u.numel == 0) * 2 > len(floats):
        raise CheckpointError(
            f"{file}: most weights are empty placeholder tensors (a DeepSpeed ZeRO-3 checkpoint);"
            " convert it first: python zero_to_fp32.py CHECKPOINT_DIR OUTPUT.pt"
        )


def _unit_for(
    name: str,
    leaves: tuple[TensorLeaf, ...],
    files: list[str],
    out_dtype: torch.dtype | None,
    units_by_tie: dict[tuple[object, ...], Unit],
) -> Unit:
    for leaf, file in zip(leaves, files, strict=True):
        if isinstance(leaf, UnsupportedTensor):
            raise CheckpointError(f"{file}: tensor {name!r} is a {leaf.kind} tensor, which cannot be averaged")
        if leaf.dtype.is_floating_point and leaf.dtype not in (
            torch.float64,
            torch.float32,
            torch.float16,
            torch.bfloat16,
        ):
            raise CheckpointError(
                f"{file}: tensor {name!r} is {str(leaf.dtype).removeprefix('torch.')}; quantized and float8"
                " weights are scaled codes that cannot be averaged directly (dequantize first)"
            )
        if leaf.dtype.is_complex:
            raise CheckpointError(f"{file}: tensor {name!r} is complex, which is not supported")
    shapes = {leaf_shape(leaf) for leaf in leaves}
    if len(shapes) > 1:
        detail = ", ".join(f"{f}: {list(leaf_shape(x))}" for f, x in zip(files, leaves, strict=True))
        raise MismatchError(f"tensor {name!r} has different shapes: {detail}")
    kinds = {classify(name, leaf.dtype) for leaf in leaves}
    if len(kinds) > 1:
        detail = ", ".join(f"{f}: {str(x.dtype).removeprefix('torch.')}" for f, x in zip(files, leaves, strict=True))
        raise MismatchError(f"tensor {name!r} mixes floating and integer dtypes: {detail}")
    tie = tuple(leaf_tie_key(leaf) for leaf in leaves)
    if tie in units_by_tie:
        unit = units_by_tie[tie]
        unit.names.append(name)
        return unit
    kind = kinds.pop()
    dtype = out_dtype if (out_dtype is not None and kind == "float") else leaves[-1].dtype
    unit = Unit([name], leaves, kind, dtype, leaf_shape(leaves[-1]))
    units_by_tie[tie] = unit
    return unit
