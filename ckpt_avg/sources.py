"""Opening a checkpoint reference: its object tree with lazy tensors, and its metadata.

One entry point, `open_checkpoint`, for every format: a zip or legacy PyTorch file, a
safetensors file, or a Hugging Face-style directory of one or more weight shards.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .dcp import refuse_hf_distributed
from .discover import CheckpointRef
from .errors import CheckpointError
from .jsonfile import read_json
from .modules import module_classes, replace_modules
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
    # Each file's identity, size and modification time before it was opened: an input rewritten
    # during the run would make an output of mixed tensors, so the run checks them at the end.
    states: tuple[tuple[str, tuple[int, int, int, int]], ...] = ()

    def check_unchanged(self) -> None:
        """Raise if a file of this checkpoint changed since it was opened."""
        for path, before in self.states:
            if file_state(path) != before:
                raise CheckpointError(
                    f"{path}: changed while it was being read (rewritten, truncated or replaced); nothing was"
                    " written: run again once the input is complete"
                )


def file_state(path: str) -> tuple[int, int, int, int]:
    try:
        found = os.stat(path)
    except OSError:
        return (0, 0, -1, 0)
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)


@dataclass(frozen=True)
class ContentMeta:
    """Index and metrics stored inside a checkpoint (read without loading tensor data)."""

    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # Stored as such (not derived): where a name disagrees with these, they win.
    stored_epoch: int | None = None
    stored_step: int | None = None
    batch_counter: bool = False  # icefall's batch_idx_train: its checkpoint-N.pt counts batches


def open_checkpoint(ref: CheckpointRef, policy: PicklePolicy) -> OpenedCheckpoint:
    if ref.format == "dcp":
        from .dcp import open_dcp

        found = open_dcp(ref.files[0], policy)
        return OpenedCheckpoint(ref, found.tree, placeholders=found.placeholders, dcp=found.info)
    if ref.is_directory:
        return _open_directory(ref, policy)
    return _open_file(ref, ref.files[0], policy)


def cheap_to_open(ref: CheckpointRef) -> bool:
    """Whether opening is quick: not a legacy file, whose whole pickle is read twice (in pure Python)."""
    if ref.is_directory or ref.files[0].endswith(".safetensors"):
        return True
    try:
        return is_zip(ref.files[0])
    except OSError:
        return False


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
    loaded = load_zip(path, policy) if zipped else load_legacy(path, policy)
    tree = replace_modules(loaded.obj)
    # A pickled model's classes were read as data (its tensors are averaged): not a loss to report.
    placeholders = loaded.placeholders - module_classes(tree)
    return OpenedCheckpoint(ref, tree, legacy=not zipped, placeholders=placeholders)


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
    stored_epoch, stored_step = _stored_indices(tree)
    epoch, step = stored_epoch, stored_step
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
    return ContentMeta(epoch, step, _metrics(tree), stored_epoch, stored_step, "batch_idx_train" in tree)


def _stored_indices(tree: dict[Any, Any]) -> tuple[int | None, int | None]:
    """Epoch and step where libraries store them: top level (Lightning, timm, torchvision,
    YOLO), mmengine's `meta`, icefall's `cur_epoch` and `batch_idx_train`."""
    epoch = _as_int(tree.get("epoch"))
    if epoch is not None and epoch < 0:
        epoch = None  # YOLO's finished last.pt/best.pt say epoch -1: a copy, not an epoch
    step = _as_int(tree.get("global_step", tree.get("step")))
    meta = tree.get("meta")
    if isinstance(meta, dict):
        epoch = epoch if epoch is not None else _as_int(meta.get("epoch"))
        step = step if step is not None else _as_int(meta.get("iter"))
    epoch = epoch if epoch is not None else _as_int(tree.get("cur_epoch"))
    step = step if step is not None else _as_int(tree.get("batch_idx_train"))
    return epoch, step


# Numbers beside the weights that are counters or bookkeeping, not a model's quality.
_NOT_METRICS = frozenset(
    {
        "epoch",
        "global_step",
        "step",
        "version",
        "previous_training_time",
        "num_updates",
        "cur_epoch",
        "batch_idx_train",
        "updates",
    }
)


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
        state = read_json(path)
    except (OSError, ValueError):
        return ContentMeta()
    if not isinstance(state, dict):
        return ContentMeta()
    metrics: dict[str, float] = {}
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict):
            metrics.update({k: number for k, v in entry.items() if (number := _as_float(v)) is not None})
    best = _as_float(state.get("best_metric"))
    if best is not None:
        metrics.setdefault("best_metric", best)
    return ContentMeta(None, _as_int(state.get("global_step")), metrics)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -_INDEX_LIMIT <= value < _INDEX_LIMIT else None
    if isinstance(value, str) and value.isascii() and value.isdigit():  # not other scripts' digits
        return _as_int(int(value)) if len(value) < 30 else None
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__.startswith("numpy"):
        result = item()
        return result if isinstance(result, int) else None
    return None


# No run reaches an epoch or step beyond int64; a larger number (10**5000 from a crafted
# file) is not an index, and would not even print (Python's int-to-str digit limit).
_INDEX_LIMIT = 2**63


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool | Placeholder):
        return None
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        return _int_as_float(value)
    if type(value).__module__.startswith("numpy"):
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            return None
    return None


def _int_as_float(value: int) -> float:
    """An int too large for a float is, as a metric, infinitely large."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf
