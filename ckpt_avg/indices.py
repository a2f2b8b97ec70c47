"""Each candidate's epoch and step from its name and its contents, and copies found by their data.

The name is read first (no I/O); the contents (read without tensor data) fill what the
name lacks and win where the two disagree, which the plan notes. Where two candidates
share an index, their tensor data decides whether one is a copy of the other (SPEC 1.1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .discover import CheckpointRef
from .errors import CkptAvgError
from .lazy import is_tensor_leaf, leaf_numel, read_leaf_range
from .naming import NameInfo, parse_name
from .select import Candidate
from .sources import ContentMeta, OpenedCheckpoint
from .statedict import find_state_dicts, get_path

_CHUNK = 1 << 22  # elements compared at a time: memory stays bounded for any tensor
_SAMPLE = 16  # elements of each tensor in a fingerprint


def candidate_from(
    ref: CheckpointRef, meta: ContentMeta | None, neighbours: Sequence[str], notes: list[str]
) -> Candidate:
    """The candidate with its indices; `meta` is None where the contents were not read."""
    info = ref.name
    meta = meta or ContentMeta()
    if info.dash_file:
        info = _dash_file(ref.display, info, meta, neighbours, notes)
    epoch = _reconcile(ref.display, "epoch", info.epoch, meta.stored_epoch, meta.epoch, notes)
    step = _reconcile(ref.display, "step", info.step, meta.stored_step, meta.step, notes)
    if info is not ref.name:
        ref = dataclasses.replace(ref, name=info)
    return Candidate(ref, epoch, step, {**meta.metrics, **info.metrics})


def _reconcile(
    where: str, kind: str, named: int | None, stored: int | None, derived: int | None, notes: list[str]
) -> int | None:
    if named is None:
        return derived
    if stored is not None and stored != named:
        notes.append(f"{where}: its name says {kind} {named}, its contents {kind} {stored}; using the contents")
        return stored
    return named


def _dash_file(where: str, info: NameInfo, meta: ContentMeta, neighbours: Sequence[str], notes: list[str]) -> NameInfo:
    """`checkpoint-N.pt`: timm's epoch N, or icefall's batch N (a step inside an epoch)."""
    number = info.epoch
    icefall = meta.batch_counter or any(parse_name(n).epoch is not None and n.startswith("epoch-") for n in neighbours)
    if meta.stored_epoch == number and not meta.batch_counter:
        return dataclasses.replace(info, dash_file=False)
    if icefall:
        # icefall saves checkpoint-<batch>.pt mid-epoch beside epoch-N.pt; its epoch is the one in progress.
        return dataclasses.replace(info, epoch=meta.epoch, step=number, mid_epoch=True, dash_file=False)
    notes.append(
        f"{where}: checkpoint-{number} read as epoch {number} (timm's naming; its contents store no epoch"
        " or batch counter to tell)"
    )
    return dataclasses.replace(info, dash_file=False)


def same_data(a: OpenedCheckpoint, b: OpenedCheckpoint, key: str | None) -> bool:
    """Whether two checkpoints' state dicts hold the same names, dtypes, shapes and bytes.

    Compared chunk by chunk, stopping at the first difference: two different checkpoints
    (the usual case) cost one chunk each.
    """
    first, second = _state_dict(a, key), _state_dict(b, key)
    if set(first) != set(second):
        return False
    for name in sorted(first):
        x, y = first[name], second[name]
        if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
            return False
    for name in sorted(first):
        x, y = first[name], second[name]
        total = leaf_numel(x)
        for start in range(0, total, _CHUNK):
            count = min(_CHUNK, total - start)
            if not torch.equal(_bytes(read_leaf_range(x, start, count)), _bytes(read_leaf_range(y, start, count))):
                return False
    return True


def _state_dict(opened: OpenedCheckpoint, key: str | None) -> dict[str, Any]:
    choice = find_state_dicts(opened.tree, key=key, where=opened.ref.display)
    node = get_path(opened.tree, choice.primary)
    return {k: v for k, v in node.items() if is_tensor_leaf(v)}


def _fingerprint(opened: OpenedCheckpoint, key: str | None) -> bytes:
    """Names, dtypes, shapes and the first few elements of every tensor: cheap, and it tells
    apart any two checkpoints whose trained weights differ."""
    digest = hashlib.sha256()
    state_dict = _state_dict(opened, key)
    for name in sorted(state_dict):
        leaf = state_dict[name]
        digest.update(f"{name}\0{leaf.dtype}\0{tuple(leaf.shape)}\0".encode())
        sample = read_leaf_range(leaf, 0, min(_SAMPLE, leaf_numel(leaf)))
        digest.update(_bytes(sample).numpy().tobytes())
    return digest.digest()


def _bytes(chunk: torch.Tensor) -> torch.Tensor:
    # Bytes, not values: NaN must equal NaN, and -0.0 differs from 0.0 in a copy check.
    return chunk.contiguous().view(-1).view(torch.uint8)


def mark_copies(
    candidates: list[Candidate], opened: Callable[[CheckpointRef], OpenedCheckpoint], key: str | None
) -> list[Candidate]:
    """Candidates that share an index with another and hold the same tensor data become aliases.

    Only the colliding candidates are read. Of a set of copies, the end-of-epoch one stays
    (icefall's `checkpoint-N.pt` saved on an epoch's last batch equals `epoch-E.pt`), then the
    one whose name carries the most indices; the rest are aliases, so selection skips them
    with a reason.
    """
    result = list(candidates)
    for kind in ("epoch", "step"):
        groups: dict[int, list[int]] = defaultdict(list)
        for position, c in enumerate(result):
            if not c.is_alias and c.index(kind) is not None:
                groups[c.index(kind)].append(position)  # type: ignore[index]
        for positions in groups.values():
            if len(positions) > 1:
                _alias_equal(result, positions, opened, key)
    return result


def _alias_equal(
    result: list[Candidate],
    positions: list[int],
    opened: Callable[[CheckpointRef], OpenedCheckpoint],
    key: str | None,
) -> None:
    sets: list[list[int]] = []
    try:  # a few elements of every tensor first: many mid-epoch saves must not mean many full reads
        prints = {p: _fingerprint(opened(result[p].ref), key) for p in positions}
    except (CkptAvgError, KeyError, TypeError, OSError):
        return  # unreadable: the collision is reported as it is
    for position in positions:
        try:
            this = opened(result[position].ref)
            match = next(
                (
                    s
                    for s in sets
                    if prints[s[0]] == prints[position] and same_data(opened(result[s[0]].ref), this, key)
                ),
                None,
            )
        except (CkptAvgError, KeyError, TypeError, OSError):
            return
        if match is None:
            sets.append([position])
        else:
            match.append(position)
    for same in sets:
        if len(same) < 2:
            continue
        same.sort(key=lambda p: _primary_rank(result[p]), reverse=True)
        for position in same[1:]:
            c = result[position]
            ref = dataclasses.replace(c.ref, name=dataclasses.replace(c.ref.name, is_alias=True))
            result[position] = Candidate(ref, c.epoch, c.step, c.metrics)


def _primary_rank(c: Candidate) -> tuple[bool, int, int]:
    return not c.mid_epoch, _name_index_count(c.ref), -c.ref.order


def _name_index_count(ref: CheckpointRef) -> int:
    name = parse_name(os.path.basename(ref.display.rstrip("/")), is_directory=ref.is_directory)
    return sum(x is not None for x in (name.epoch, name.step, name.save))
