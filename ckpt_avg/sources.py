"""Opening a checkpoint reference: its object tree with lazy tensors, and its metadata.

One entry point, `open_checkpoint`, for every format: a zip or legacy PyTorch file, a
safetensors file, or a Hugging Face-style directory of one or more weight shards.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .dcp import refuse_hf_distributed
from .discover import CheckpointRef
from .errors import CheckpointError
from .safetensors_file import read_header
from .torchfile import is_zip, load_legacy, load_zip
from .unpickle import PicklePolicy, Placeholder


@dataclass
class OpenedCheckpoint:
    """A checkpoint's object tree; tensors in it are `LazyTensor`s unless `legacy`."""

    ref: CheckpointRef
    tree: Any
    legacy: bool = False
    placeholders: set[str] = field(default_factory=set)
    safetensors_metadata: dict[str, str] = field(default_factory=dict)
    dcp: Any = None  # a DCP directory's `dcp.DcpCheckpoint`: where each name is stored


@dataclass(frozen=True)
class ContentMeta:
    """Index and metrics stored inside a checkpoint (read without loading tensor data)."""

    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def open_checkpoint(ref: CheckpointRef, policy: PicklePolicy) -> OpenedCheckpoint:
    if ref.format == "dcp":
        from .dcp import open_dcp

        found = open_dcp(ref.files[0], policy)
        return OpenedCheckpoint(ref, found.tree, placeholders=found.placeholders, dcp=found.info)
    if ref.is_directory:
        return _open_directory(ref, policy)
    return _open_file(ref, ref.files[0], policy)


def _open_file(ref: CheckpointRef, path: str, policy: PicklePolicy) -> OpenedCheckpoint:
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    if path.endswith(".safetensors"):
        header = read_header(path)
        refuse_hf_distributed(path, header.metadata)
        return OpenedCheckpoint(ref, OrderedDict(header.tensors), safetensors_metadata=header.metadata)
    try:
        zipped = is_zip(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    if zipped:
        loaded = load_zip(path, policy)
        return OpenedCheckpoint(ref, loaded.obj, placeholders=loaded.placeholders)
    loaded = load_legacy(path, policy)
    return OpenedCheckpoint(ref, loaded.obj, legacy=True, placeholders=loaded.placeholders)


def _open_directory(ref: CheckpointRef, policy: PicklePolicy) -> OpenedCheckpoint:
    merged: OrderedDict[str, Any] = OrderedDict()
    placeholders: set[str] = set()
    legacy = False
    for shard in ref.files:
        if not os.path.isfile(shard):
            raise CheckpointError(f"{ref.display}: shard {os.path.basename(shard)} is missing")
        opened = _open_file(ref, shard, policy)
        tree = opened.tree
        if not isinstance(tree, dict):
            raise CheckpointError(f"{shard}: a weight shard must hold a flat dict of tensors")
        for key, value in tree.items():
            if key in merged:
                raise CheckpointError(f"{ref.display}: key {key!r} appears in more than one shard")
            merged[key] = value
        placeholders |= opened.placeholders
        legacy = legacy or opened.legacy
    return OpenedCheckpoint(ref, merged, legacy=legacy, placeholders=placeholders)


def content_meta(opened: OpenedCheckpoint) -> ContentMeta:
    """Epoch, step and metrics from a checkpoint's contents, the way each library stores them."""
    if opened.ref.is_directory and opened.dcp is None:
        return _trainer_state(os.path.dirname(opened.ref.files[0]))
    tree = opened.tree
    if opened.safetensors_metadata:
        tree = opened.safetensors_metadata
    if not isinstance(tree, dict):
        return ContentMeta()
    epoch = _as_int(tree.get("epoch"))
    step = _as_int(tree.get("global_step", tree.get("step")))
    extra = tree.get("extra_state")
    if isinstance(extra, dict):  # fairseq
        iterator = extra.get("train_iterator")
        if epoch is None and isinstance(iterator, dict):
            epoch = _as_int(iterator.get("epoch"))
            # fairseq (iterator state version 2) saves the epoch to resume: after finishing
            # epoch K, K + 1 with no iterations done; checkpointK.pt holds epoch K.
            finished = _as_int(iterator.get("version")) == 2 and _as_int(iterator.get("iterations_in_epoch")) == 0
            if epoch is not None and finished:
                epoch -= 1
    history = tree.get("optimizer_history")
    if step is None and isinstance(history, list) and history and isinstance(history[-1], dict):
        step = _as_int(history[-1].get("num_updates"))
    return ContentMeta(epoch, step, _metrics(tree))


# Numbers beside the weights that are counters or bookkeeping, not a model's quality.
_NOT_METRICS = frozenset({"epoch", "global_step", "step", "version", "previous_training_time", "num_updates"})


def _metrics(tree: dict[Any, Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    sources = [tree]
    if isinstance(tree.get("extra_state"), dict):
        sources.append(tree["extra_state"])
    for source in sources:
        for key, value in source.items():
            if isinstance(key, str) and key not in _NOT_METRICS:
                number = _as_float(value)
                if number is not None:
                    found.setdefault(key, number)
    return found


def _trainer_state(directory: str) -> ContentMeta:
    path = os.path.join(directory, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return ContentMeta()
    if not isinstance(state, dict):
        return ContentMeta()
    metrics: dict[str, float] = {}
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict):
            metrics.update({k: float(v) for k, v in entry.items() if _as_float(v) is not None})
    if isinstance(state.get("best_metric"), int | float):
        metrics.setdefault("best_metric", float(state["best_metric"]))
    return ContentMeta(None, _as_int(state.get("global_step")), metrics)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__.startswith("numpy"):
        result = item()
        return result if isinstance(result, int) else None
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool | Placeholder):
        return None
    if isinstance(value, int | float):
        return float(value)
    if type(value).__module__.startswith("numpy"):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None
