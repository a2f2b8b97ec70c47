"""Turning a layout into an output on disk: choose the format, stream, commit atomically."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .average import Digests
from .errors import CheckpointError, OutputError
from .guard import PROVENANCE_RECORD
from .layout import strip_prefixes
from .lazy import TensorLeaf, is_tensor_leaf, itemsize, leaf_numel, leaf_tie_key
from .statedict import TRAINING_STATE_NAMES, get_path
from .unpickle import Placeholder
from .write import (
    OutputFile,
    OutStorage,
    OutTensor,
    PtSink,
    PtWriter,
    SafetensorsSink,
    SafetensorsWriter,
    commit,
    copy_leaf,
    discard,
    finish_file,
    open_temp,
    parse_size,
    pickle_tree,
    plan_shards,
    shard_file_names,
    signals_deferred,
    temp_path_for,
)

if TYPE_CHECKING:
    from .api import Options
    from .layout import Layout

ZERO_DIGEST = "0" * 64
# Files beside the weights in a Trainer checkpoint that `from_pretrained` needs.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "feature_extractor_config.json",
)


@dataclass
class Written:
    files: list[str]
    output_digest: str
    input_digests: list[str]
    dropped: list[str] = field(default_factory=list)


# Runs the kernel into a sink: (sink, primary state dict only?) -> digests.
Runner = Callable[[Any, bool], Digests]


def write_output(output: str, layout: Layout, provenance: dict[str, Any], options: Options, run: Runner) -> Written:
    """Write OUTPUT in the format its name asks for, atomically; `run` streams the tensors in."""
    if output.endswith(("/", os.sep)) or os.path.isdir(output):
        inputs_dcp = all(o.dcp is not None for o in layout.opened)
        if options.format == "dcp" or (options.format is None and inputs_dcp):
            return _write_dcp(output, layout, provenance, options, run)
        return _write_directory(output, layout, provenance, options, run)
    if output.lower().endswith(".safetensors"):
        return _write_safetensors(output, layout, provenance, options, run)
    return _write_pt(output, layout, provenance, options, run)


def _write_dcp(output: str, layout: Layout, provenance: dict[str, Any], options: Options, run: Runner) -> Written:
    from .dcp_write import write_dcp

    files, digests, dropped = write_dcp(output, layout, lambda d: _provenance_text(provenance, d), options, run)
    return Written(files, digests.output.hexdigest(), [d.hexdigest() for d in digests.inputs], dropped)


def _with_digests(provenance: dict[str, Any], digests: Digests | None) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(json.dumps(provenance))
    for position, record in enumerate(result["inputs"]):
        record["tensor_digest"] = digests.inputs[position].hexdigest() if digests else ZERO_DIGEST
    result["output_tensor_digest"] = digests.output.hexdigest() if digests else ZERO_DIGEST
    return result


def _provenance_text(provenance: dict[str, Any], digests: Digests | None) -> str:
    return json.dumps(_with_digests(provenance, digests), sort_keys=True, separators=(",", ":"))


@contextlib.contextmanager
def _temp_file(output: str) -> Iterator[tuple[str, OutputFile]]:
    temp = temp_path_for(output)
    file: OutputFile | None = None
    try:
        with signals_deferred():  # a Ctrl-C here must not leave an untracked temp file
            file = open_temp(temp)
        yield temp, file
    except BaseException:
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()  # flushing may fail again (disk full); the temp goes regardless
        discard(temp)
        raise


def _entries(layout: Layout) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    units = layout.names[layout.choice.primary]
    if "__metadata__" in units:
        raise CheckpointError(
            f"{layout.opened[-1].ref.display}: a tensor named '__metadata__' cannot be stored in safetensors;"
            " write a .pt output instead"
        )
    return {name: (unit.out_dtype, unit.shape) for name, unit in units.items()}


def _write_safetensors(
    output: str, layout: Layout, provenance: dict[str, Any], options: Options, run: Runner
) -> Written:
    entries = _entries(layout)
    with _temp_file(output) as (temp, file):
        try:
            writer = SafetensorsWriter(file, entries, {"format": "pt", "ckpt_avg": _provenance_text(provenance, None)})
            digests = run(SafetensorsSink(dict.fromkeys(entries, writer)), True)
            final = SafetensorsWriter.header_bytes(
                entries, {"format": "pt", "ckpt_avg": _provenance_text(provenance, digests)}
            )
            if len(final) != writer.data_start:
                raise AssertionError("provenance changed the header length")
            file.pwrite(final, 0)
            finish_file(file)
            commit(temp, output, force=options.force)
        except OSError as exc:
            raise OutputError(f"{output}: write failed: {exc.strerror or exc}") from None
    return Written([output], digests.output.hexdigest(), [d.hexdigest() for d in digests.inputs])


def _write_directory(output: str, layout: Layout, provenance: dict[str, Any], options: Options, run: Runner) -> Written:
    entries = _entries(layout)
    limit = parse_size(options.max_shard_size) if options.max_shard_size else None
    shards = plan_shards(entries, limit)
    file_names = shard_file_names(len(shards))
    temp = temp_path_for(output)
    files: list[OutputFile] = []
    try:
        with signals_deferred():  # a Ctrl-C here must not leave an untracked temp directory
            os.mkdir(temp)
    except OSError as exc:
        raise OutputError(f"{output}: cannot write the output here: {exc.strerror}") from None
    except BaseException:
        discard(temp)
        raise
    try:
        digests = _fill_directory(temp, layout, entries, shards, file_names, provenance, run, files)
        commit(temp, output, force=options.force)
    except BaseException as exc:
        for file in files:
            with contextlib.suppress(OSError):
                file.close()
        discard(temp)
        if isinstance(exc, OSError):
            raise OutputError(f"{output}: write failed: {exc.strerror or exc}") from None
        raise
    written = [os.path.join(output, n) for n in file_names]
    if len(shards) > 1:
        written.append(os.path.join(output, "model.safetensors.index.json"))
    return Written(written, digests.output.hexdigest(), [d.hexdigest() for d in digests.inputs])


def _fill_directory(
    temp: str,
    layout: Layout,
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    shards: list[list[str]],
    file_names: list[str],
    provenance: dict[str, Any],
    run: Runner,
    files: list[OutputFile],
) -> Digests:
    """Write every shard (and the index) into the temp directory; `files` collects open handles."""
    writers: dict[str, SafetensorsWriter] = {}
    single = len(shards) == 1
    for names, file_name in zip(shards, file_names, strict=True):
        file = open_temp(os.path.join(temp, file_name))
        files.append(file)
        metadata = {"format": "pt"}
        if single:
            metadata["ckpt_avg"] = _provenance_text(provenance, None)
        writer = SafetensorsWriter(file, {n: entries[n] for n in names}, metadata)
        writers.update(dict.fromkeys(names, writer))
    digests = run(SafetensorsSink(writers), True)
    if single:
        only = {"format": "pt", "ckpt_avg": _provenance_text(provenance, digests)}
        files[0].pwrite(SafetensorsWriter.header_bytes(entries, only), 0)
    else:
        _write_index(temp, entries, shards, file_names, _with_digests(provenance, digests))
    for file in files:
        finish_file(file)
    _copy_side_files(layout, temp)
    return digests


def _write_index(
    directory: str,
    entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    shards: list[list[str]],
    file_names: list[str],
    provenance: dict[str, Any],
) -> None:
    total = sum(math.prod(shape) * itemsize(dtype) for dtype, shape in entries.values())
    weight_map = {name: file_name for names, file_name in zip(shards, file_names, strict=True) for name in names}
    index = {"metadata": {"total_size": total, "ckpt_avg": provenance}, "weight_map": dict(sorted(weight_map.items()))}
    path = os.path.join(directory, "model.safetensors.index.json")
    with open_temp(path) as file:
        file.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        os.fsync(file.fileno())


def _copy_side_files(layout: Layout, directory: str) -> None:
    last = layout.opened[-1].ref
    if not last.is_directory:
        return
    source = os.path.dirname(last.files[0])
    for name in sorted(os.listdir(source)):
        if name in HF_SIDE_FILES and os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))


# ---------------------------------------------------------------- .pt


def _write_pt(output: str, layout: Layout, provenance: dict[str, Any], options: Options, run: Runner) -> Written:
    storages: dict[int, OutStorage] = {}
    for visit in layout.visits:
        if visit.compute:
            unit = visit.unit
            storages[id(unit)] = OutStorage(str(len(storages)), unit.out_dtype, unit.numel)
    builder = _TreeBuilder(layout, storages)
    tree = builder.build()
    nested = layout.choice.primary != ()
    averaged = {path[0] for path in layout.names if path}
    dropped = builder.dropped + _drop_unpicklable(tree, nested, averaged, layout.opened[-1].ref.display)
    archive = os.path.splitext(os.path.basename(output))[0] or "archive"
    with _temp_file(output) as (temp, file):
        writer = PtWriter(file, archive)
        try:
            digests = run(PtSink(writer, storages), False)
            writer.end_storage()
            for storage, leaf in builder.extras:
                copy_leaf(writer, storage, leaf)
            if nested:
                tree["ckpt_avg"] = _with_digests(provenance, digests)
            writer.record("data.pkl", pickle_tree(tree))
            writer.record(PROVENANCE_RECORD, _provenance_text(provenance, digests).encode())
            writer.record(".format_version", b"1")
            writer.record(".storage_alignment", b"64")
            writer.record("byteorder", b"little")
            writer.record("version", b"3\n")
            writer.record(".data/serialization_id", _serialization_id(digests))
            writer.close()
            finish_file(file)
            commit(temp, output, force=options.force)
        except OSError as exc:
            writer.abandon()
            raise OutputError(f"{output}: write failed: {exc.strerror or exc}") from None
        except BaseException:
            writer.abandon()
            raise
    return Written([output], digests.output.hexdigest(), [d.hexdigest() for d in digests.inputs], dropped)


def _serialization_id(digests: Digests) -> bytes:
    # torch.save writes a random id; ours derives from the data so re-runs are byte-identical.
    return str(int(digests.output.hexdigest()[:32], 16)).zfill(40)[:40].encode()


class _TreeBuilder:
    """The last checkpoint's structure with averaged tensors in place and training state removed."""

    def __init__(self, layout: Layout, storages: dict[int, OutStorage]) -> None:
        self.layout = layout
        self.storages = storages
        self.extras: list[tuple[OutStorage, TensorLeaf]] = []
        self.dropped: list[str] = []
        self._tensors: dict[int, OutTensor] = {}
        self._extra_by_tie: dict[tuple[object, ...], OutStorage] = {}

    def build(self) -> Any:
        last = self.layout.opened[-1].tree
        return self._node(last, ())

    def _averaged(self, path: tuple[str, ...]) -> OrderedDict[str, OutTensor]:
        original = get_path(self.layout.opened[-1].tree, path)
        order = list(strip_prefixes(original, self.layout.strip_prefix, ""))
        units = self.layout.names[path]
        result: OrderedDict[str, OutTensor] = OrderedDict()
        for name in order:
            unit = units[name]
            if id(unit) not in self._tensors:
                self._tensors[id(unit)] = OutTensor(self.storages[id(unit)], unit.shape)
            result[name] = self._tensors[id(unit)]
        return result

    def _node(self, node: Any, path: tuple[str, ...]) -> Any:
        if path in self.layout.names:
            return self._averaged(path)
        if path in self.layout.choice.others:
            self.dropped.append(f"{_dotted(path)} (state dict not in every selected checkpoint)")
            return _DROP
        if isinstance(node, Placeholder):
            self.dropped.append(_dotted(path) + f" ({node.global_name})")
            return _DROP
        if is_tensor_leaf(node):
            return self._extra(node)
        if isinstance(node, dict):
            return self._mapping(node, path)
        if isinstance(node, list | tuple):
            items = [self._node(v, (*path, str(i))) for i, v in enumerate(node)]
            kept = [v for v in items if v is not _DROP]
            try:  # torch.Size and named tuples stay what they were
                return type(node)(*kept) if hasattr(node, "_fields") else type(node)(kept)
            except Exception:  # noqa: BLE001 - a sequence type that cannot be rebuilt so: a list
                return kept
        return node

    def _mapping(self, node: dict[Any, Any], path: tuple[str, ...]) -> Any:
        items: list[tuple[Any, Any]] = []
        for key, value in node.items():
            if path == () and key in TRAINING_STATE_NAMES:
                self.dropped.append(f"{key} (training state)")
                continue
            if path == () and key == "ckpt_avg":
                continue  # an earlier run's provenance is replaced by this one's
            try:
                child = self._node(value, (*path, str(key)))
            except RecursionError:
                self.dropped.append(f"{_dotted((*path, str(key)))} (nests too deeply to copy)")
                continue
            if child is not _DROP:
                items.append((key, child))
        try:
            # A copy keeps the subclass and what it carries (a defaultdict's factory, an
            # AttributeDict's attributes); items go in one by one, as `update` would count them
            # in a Counter.
            result = copy.copy(node)
            result.clear()
            for key, child in items:
                result[key] = child
            return result
        except Exception:  # noqa: BLE001 - an unusual dict subclass: fall back to a plain dict
            return dict(items)

    def _extra(self, leaf: TensorLeaf) -> OutTensor:
        tie = leaf_tie_key(leaf)
        storage = self._extra_by_tie.get(tie)
        if storage is None:
            storage = OutStorage(f"x{len(self._extra_by_tie)}", leaf.dtype, leaf_numel(leaf))
            self._extra_by_tie[tie] = storage
            self.extras.append((storage, leaf))
        return OutTensor(storage, tuple(leaf.shape))


class _Drop:
    pass


_DROP = _Drop()


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path) or "(top level)"


def _drop_unpicklable(tree: Any, nested: bool, averaged: set[Any], where: str) -> list[str]:
    """Top-level entries that still hold a placeholder deep inside an object are left out.

    An entry holding averaged weights is never dropped: that would be an output without them.
    """
    if not nested or not isinstance(tree, dict):
        return []
    dropped = []
    for key in list(tree):
        try:
            pickle_tree(tree[key])
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
            if key in averaged:
                raise CheckpointError(f"{where}: cannot write {key!r} into a .pt file: {exc}") from None
            dropped.append(f"{key} (holds an object that could not be loaded safely)")
            del tree[key]
    return dropped
