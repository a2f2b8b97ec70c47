"""Turning a layout into an output on disk: choose the format, stream, commit atomically."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .average import Digests, Visit
from .errors import CheckpointError, OutputError
from .guard import HF_SIDE_FILES, PROVENANCE_RECORD, OutputKind
from .layout import strip_prefixes
from .lazy import TensorLeaf, is_tensor_leaf, itemsize, leaf_numel, leaf_tie_key
from .modules import PickledModule, rebuild_module
from .options import parse_size
from .provenance import provenance_text, with_digests
from .sidefiles import copy_side_file
from .statedict import TRAINING_STATE_NAMES, get_path
from .torchfile import UnsupportedTensor
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
    fsync_path,
    make_staging,
    open_temp,
    pickle_tree,
    plan_shards,
    shard_file_names,
    signals_deferred,
    temp_path_for,
    unmark_temp_directory,
)
from .written import Runner, ShardFile, StagedPlan, Written

if TYPE_CHECKING:
    from .layout import Layout
    from .options import Options

# Files beside the weights in a Trainer checkpoint that `from_pretrained` needs.


def ordered_visits(visits: Iterable[Visit], order: Sequence[str]) -> list[Visit]:
    """The primary state dict's visits of the names in `order`, in that order; each unit is
    computed at its first name here (a rank may hold only a tied tensor's second name)."""
    by_name = {visit.name: visit for visit in visits if visit.digest}
    chosen: list[Visit] = []
    computed: set[int] = set()
    for name in order:
        unit = by_name[name].unit
        chosen.append(Visit(name, unit, compute=id(unit) not in computed, digest=True))
        computed.add(id(unit))
    return chosen


def write_output(
    output: str, kind: OutputKind, layout: Layout, provenance: dict[str, Any], options: Options, run: Runner
) -> Written:
    """Write OUTPUT as `kind` (decided in validation), atomically; `run` streams the tensors in."""
    if kind in (OutputKind.DCP_DIRECTORY, OutputKind.HF_DIRECTORY):
        plan = plan_staged(output, kind, layout, provenance, options)
        return _write_staged(plan, options, run, layout.warnings.append)
    if kind is OutputKind.SAFETENSORS:
        return _write_safetensors(output, layout, provenance, options, run)
    return _write_pt(output, layout, provenance, options, run)


def plan_staged(
    output: str, kind: OutputKind, layout: Layout, provenance: dict[str, Any], options: Options
) -> StagedPlan:
    """The plan of a directory output (Hugging Face shards or DCP), from metadata alone."""
    if kind is OutputKind.DCP_DIRECTORY:
        from .dcp_write import DcpPlan

        return DcpPlan(output, layout, provenance, options)
    if kind is OutputKind.HF_DIRECTORY:
        return plan_directory(output, layout, provenance, options)
    raise AssertionError(f"{kind} is not a directory output")


@contextlib.contextmanager
def _temp_file(output: str, hashed: bool) -> Iterator[tuple[str, OutputFile]]:
    temp = temp_path_for(output)
    file: OutputFile | None = None
    try:
        with signals_deferred():  # a Ctrl-C here must not leave an untracked temp file
            file = open_temp(temp, hashed=hashed)
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
    with _temp_file(output, options.hash_files) as (temp, file):
        try:
            names = layout.primary_names
            placeholder = provenance_text(provenance, None, names)
            writer = SafetensorsWriter(file, entries, {"format": "pt", "ckpt_avg": placeholder})
            digests = run(SafetensorsSink(dict.fromkeys(entries, writer)), True, list(writer.placement))
            final = SafetensorsWriter.header_bytes(
                entries, {"format": "pt", "ckpt_avg": provenance_text(provenance, digests, names)}
            )
            if len(final) != writer.data_start:
                raise AssertionError("provenance changed the header length")
            file.pwrite(final, 0)
            sha256 = finish_file(file)
            commit(temp, output, force=options.force)
        except OSError as exc:
            raise OutputError(f"{output}: write failed: {exc.strerror or exc}") from None
    return Written([output], digests, sha256={output: sha256} if sha256 else {})


def _write_staged(plan: StagedPlan, options: Options, run: Runner, warn: Callable[[str], None]) -> Written:
    """One process: every file of the plan into a temp directory, then finalize."""
    temp = temp_path_for(plan.output)
    make_staging(temp, plan.output)
    try:
        digests, sha256 = plan.write(temp, range(len(plan.files)), run, hashed=options.hash_files)
        return plan.finalize(temp, digests, sha256, force=options.force, hashed=options.hash_files, warn=warn)
    except BaseException as exc:
        discard(temp)
        if isinstance(exc, OSError):
            raise OutputError(f"{plan.output}: write failed: {exc.strerror or exc}") from None
        raise


@dataclass(frozen=True)
class DirectoryPlan:
    """Everything about a directory output that is known before any tensor is read.

    A pure function of the inputs' metadata and the options, so every rank of a distributed
    run computes the same plan and any of them can write any file of it.
    """

    output: str
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    files: tuple[ShardFile, ...]
    provenance: dict[str, Any]  # without digests
    side_files: tuple[str, ...]  # paths of files copied beside the shards
    input_sizes: tuple[int, ...]

    @property
    def single(self) -> bool:
        return len(self.files) == 1

    def metadata(self, digests: Digests | None) -> dict[str, str]:
        """A shard's safetensors metadata; a lone shard carries the provenance."""
        if not self.single:
            return {"format": "pt"}
        return {"format": "pt", "ckpt_avg": provenance_text(self.provenance, digests, sorted(self.entries))}

    def header(self, index: int, digests: Digests | None = None) -> bytes:
        return SafetensorsWriter.header_bytes(self._entries_of(index), self.metadata(digests))

    def _entries_of(self, index: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {n: self.entries[n] for n in self.files[index].tensors}

    def fingerprint(self) -> str:
        """A hash of the whole plan: ranks that disagree on it must not write one output."""
        described = {
            "output": self.output,
            "files": [[f.name, list(f.tensors), f.nbytes] for f in self.files],
            "entries": {n: [str(d), list(s)] for n, (d, s) in sorted(self.entries.items())},
            "headers": [hashlib.sha256(self.header(i)).hexdigest() for i in range(len(self.files))],
            "provenance": self.provenance,
            "side_files": list(self.side_files),
            "input_sizes": list(self.input_sizes),
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def write(
        self, staging: str, indices: Iterable[int], run: Runner, *, hashed: bool
    ) -> tuple[Digests, dict[str, str]]:
        """Stream the tensors of the files at `indices` into `staging`, each file fsynced and closed.

        Returns the digests, and where `hashed` the sha256 of each file by name (a lone shard's
        is taken by `finalize`, which rewrites its header with the digests).
        """
        indices = list(indices)
        files: list[OutputFile] = []
        writers: dict[str, SafetensorsWriter] = {}
        sha256: dict[str, str] = {}
        try:
            for index in indices:
                shard = self.files[index]
                file = open_temp(os.path.join(staging, shard.name), hashed=hashed and not self.single)
                files.append(file)
                writer = SafetensorsWriter(file, self._entries_of(index), self.metadata(None))
                writers.update(dict.fromkeys(shard.tensors, writer))
            in_file_order = [name for writer in dict.fromkeys(writers.values()) for name in writer.placement]
            digests = run(SafetensorsSink(writers), True, in_file_order)
            for file in files:
                name = os.path.basename(file.path)
                digest = finish_file(file)
                if digest is not None:
                    sha256[name] = digest
        except BaseException:
            for file in files:
                with contextlib.suppress(OSError):
                    file.close()
            raise
        return digests, sha256

    def finalize(
        self,
        staging: str,
        digests: Digests,
        sha256: dict[str, str],
        *,
        force: bool,
        hashed: bool,
        warn: Callable[[str], None],
    ) -> Written:
        """Index or header with the provenance, side files, fsync, and publish by rename.

        `sha256` has the shards' sha256 by name where `hashed` (from whichever rank wrote them).
        """
        sha256 = dict(sha256)
        if self.single:
            path = os.path.join(staging, self.files[0].name)
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.pwrite(fd, self.header(0, digests), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            if hashed:  # its leading bytes changed after the data: sha256 cannot resume, read it once
                sha256[self.files[0].name] = _sha256_of(path)
        else:
            shards = [list(f.tensors) for f in self.files]
            names = [f.name for f in self.files]
            provenance = with_digests(self.provenance, digests, sorted(self.entries))
            index_sha256 = _write_index(staging, self.entries, shards, names, provenance, hashed)
            if index_sha256 is not None:
                sha256["model.safetensors.index.json"] = index_sha256
        copied: dict[str, str] = {}  # name -> sha256 of the bytes as copied
        for source in self.side_files:
            problem = copy_side_file(os.path.dirname(source), os.path.basename(source), staging, copied)
            if problem:
                warn(f"{source}: not copied into the output: {problem}")
        unmark_temp_directory(staging)
        fsync_path(staging)  # other ranks' files are named in it: their entries must be durable too
        commit(staging, self.output, force=force)
        written = [os.path.join(self.output, f.name) for f in self.files]
        if not self.single:
            written.append(os.path.join(self.output, "model.safetensors.index.json"))
        written += [os.path.join(self.output, name) for name in copied]
        if hashed:
            sha256.update(copied)
        return Written(written, digests, sha256={os.path.join(self.output, n): d for n, d in sha256.items()})


def plan_directory(output: str, layout: Layout, provenance: dict[str, Any], options: Options) -> DirectoryPlan:
    """File names, the tensors of each shard and its size, from metadata alone."""
    entries = _entries(layout)
    limit = parse_size(options.max_shard_size) if options.max_shard_size else None
    shards = plan_shards(entries, limit)
    names = shard_file_names(len(shards))
    plan = DirectoryPlan(
        output,
        entries,
        tuple(ShardFile(name, tuple(tensors), 0) for name, tensors in zip(names, shards, strict=True)),
        json.loads(json.dumps(provenance)),
        _side_files(layout),
        tuple(o.ref.size for o in layout.opened),
    )
    sized = tuple(
        ShardFile(f.name, f.tensors, len(plan.header(i)) + _data_bytes(entries, f.tensors))
        for i, f in enumerate(plan.files)
    )
    return DirectoryPlan(output, entries, sized, plan.provenance, plan.side_files, plan.input_sizes)


def _data_bytes(entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], names: Iterable[str]) -> int:
    return sum(math.prod(entries[n][1]) * itemsize(entries[n][0]) for n in names)


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _write_index(
    directory: str,
    entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    shards: list[list[str]],
    file_names: list[str],
    provenance: dict[str, Any],
    hashed: bool,
) -> str | None:
    total = sum(math.prod(shape) * itemsize(dtype) for dtype, shape in entries.values())
    weight_map = {name: file_name for names, file_name in zip(shards, file_names, strict=True) for name in names}
    index = {"metadata": {"total_size": total, "ckpt_avg": provenance}, "weight_map": dict(sorted(weight_map.items()))}
    path = os.path.join(directory, "model.safetensors.index.json")
    file = open_temp(path, hashed=hashed)
    try:
        file.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        return finish_file(file)
    finally:
        file.close()


def _side_files(layout: Layout) -> tuple[str, ...]:
    """The Trainer directory's files that `from_pretrained` needs, from the last checkpoint."""
    last = layout.opened[-1].ref
    if not last.is_directory:
        return ()
    source = os.path.dirname(last.files[0])
    return tuple(os.path.join(source, name) for name in sorted(os.listdir(source)) if name in HF_SIDE_FILES)


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
    with _temp_file(output, options.hash_files) as (temp, file):
        writer = PtWriter(file, archive)
        try:
            digests = run(PtSink(writer, storages), False)
            writer.end_storage()
            for storage, leaf in builder.extras:
                copy_leaf(writer, storage, leaf)
            names = layout.primary_names
            if nested:
                tree["ckpt_avg"] = with_digests(provenance, digests, names)
            writer.record("data.pkl", pickle_tree(tree))
            writer.record(PROVENANCE_RECORD, provenance_text(provenance, digests, names).encode())
            writer.record(".format_version", b"1")
            writer.record(".storage_alignment", b"64")
            writer.record("byteorder", b"little")
            writer.record("version", b"3\n")
            writer.record(".data/serialization_id", _serialization_id(digests))
            writer.close()
            sha256 = finish_file(file)
            commit(temp, output, force=options.force)
        except OSError as exc:
            writer.abandon()
            raise OutputError(f"{output}: write failed: {exc.strerror or exc}") from None
        except BaseException:
            writer.abandon()
            raise
    return Written([output], digests, dropped, {output: sha256} if sha256 else {})


def _serialization_id(digests: Digests) -> bytes:
    # torch.save writes a random id; ours derives from the data so re-runs are byte-identical.
    return str(int(digests.output.root()[:32], 16)).zfill(40)[:40].encode()


class _TreeBuilder:
    """The last checkpoint's structure with averaged tensors in place and training state removed."""

    def __init__(self, layout: Layout, storages: dict[int, OutStorage]) -> None:
        self.layout = layout
        self.storages = storages
        self.extras: list[tuple[OutStorage, TensorLeaf]] = []
        self.dropped: list[str] = []
        self._tensors: dict[int, OutTensor] = {}
        self._extra_by_tie: dict[tuple[object, ...], OutStorage] = {}
        self._copies: dict[int, Any] = {}  # id of a node of the input tree -> its copy

    def build(self) -> Any:
        last = self.layout.opened[-1].tree
        return self._node(last, ())

    def _averaged(self, path: tuple[str, ...]) -> OrderedDict[str, Any]:
        original = get_path(self.layout.opened[-1].tree, path)
        order = list(strip_prefixes(original, self.layout.strip_prefix, ""))
        units = self.layout.names[path]
        extras = self.layout.extras.get(path, {})
        result: OrderedDict[str, Any] = OrderedDict()
        for name in order:
            if name in extras:  # extra state: the last checkpoint's, as it is
                copied = self._node(extras[name], (*path, name))
                if copied is not _DROP:
                    result[name] = copied
                continue
            unit = units[name]
            if id(unit) not in self._tensors:
                self._tensors[id(unit)] = OutTensor(self.storages[id(unit)], unit.shape)
            result[name] = self._tensors[id(unit)]
        return result

    def _node(self, node: Any, path: tuple[str, ...]) -> Any:
        if path in self.layout.names:
            averaged = self._averaged(path)
            if isinstance(node, PickledModule) and not isinstance(node.module, Placeholder):
                return rebuild_module(node.module, averaged, self._node_of_leaf)  # --trust-pickle keeps the module
            return averaged
        if path in self.layout.choice.others:
            self.dropped.append(f"{_dotted(path)} (state dict not in every selected checkpoint)")
            return _DROP
        if isinstance(node, Placeholder):
            self.dropped.append(_dotted(path) + f" ({node.global_name})")
            return _DROP
        if isinstance(node, UnsupportedTensor):  # never write our stand-in into a checkpoint
            self.dropped.append(_dotted(path) + f" ({node.kind} tensor, cannot be copied)")
            return _DROP
        if is_tensor_leaf(node):
            return self._extra(node)
        if id(node) in self._copies:
            # A shared object stays shared: walking it once per path is exponential in a
            # graph of lists that each hold the previous one twice (a 2 KB file).
            return self._copies[id(node)]
        if isinstance(node, dict):
            return self._mapping(node, path)
        if isinstance(node, list):
            result: list[Any] = []
            self._copies[id(node)] = result  # before the items: a list may hold itself
            result.extend(v for v in self._items(node, path) if v is not _DROP)
            return result
        if isinstance(node, tuple):
            return self._sequence(node, path)
        return node

    def _items(self, node: list[Any] | tuple[Any, ...], path: tuple[str, ...]) -> list[Any]:
        return [self._node(v, (*path, str(i))) for i, v in enumerate(node)]

    def _sequence(self, node: Any, path: tuple[str, ...]) -> Any:
        items = self._items(node, path)
        if id(node) in self._copies:  # reached again through a list inside it
            return self._copies[id(node)]
        kept = [v for v in items if v is not _DROP]
        try:  # torch.Size and named tuples stay what they were
            result = type(node)(*kept) if hasattr(node, "_fields") else type(node)(kept)
        except Exception:  # noqa: BLE001 - a sequence type that cannot be rebuilt so: a list
            result = kept
        self._copies[id(node)] = result
        return result

    def _mapping(self, node: dict[Any, Any], path: tuple[str, ...]) -> Any:
        result = _empty_like(node)
        self._copies[id(node)] = result  # before the items: a dict may hold itself
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
                result[key] = child  # one by one, as `update` would count them in a Counter
        return result

    def _node_of_leaf(self, leaf: Any) -> Any:
        copied = self._node(leaf, ("(module buffer)",))
        return None if copied is _DROP else copied

    def _extra(self, leaf: TensorLeaf) -> OutTensor:
        tie = leaf_tie_key(leaf)
        storage = self._extra_by_tie.get(tie)
        if storage is None:
            storage = OutStorage(f"x{len(self._extra_by_tie)}", leaf.dtype, leaf_numel(leaf))
            self._extra_by_tie[tie] = storage
            self.extras.append((storage, leaf))
        return OutTensor(storage, tuple(leaf.shape))


def _empty_like(node: dict[Any, Any]) -> dict[Any, Any]:
    """An empty copy that keeps the subclass and what it carries (a defaultdict's factory,
    an AttributeDict's attributes)."""
    try:
        result = copy.copy(node)
        result.clear()
        return result
    except Exception:  # noqa: BLE001 - an unusual dict subclass: fall back to a plain dict
        return {}


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
    try:
        pickle_tree(tree)
        return []  # the usual case, in one pass: an entry at a time re-walks what entries share
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError):
        pass
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
