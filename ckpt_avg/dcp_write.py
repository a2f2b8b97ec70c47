"""Writing a torch.distributed.checkpoint (DCP) directory, streaming.

Every averaged tensor is one item: a `torch.save`-compatible uncompressed zip archive of
one whole-tensor chunk, inside a `.distcp` file, as `FileSystemWriter` writes them. The
averaged bytes go straight to their place in the file as the kernel produces them; each
archive's headers (which carry the data's CRC-32) are written once its data is complete.
`.metadata` is written last, by DCP's own dataclasses, so `dcp.load` and torchtitan read it.
The plan is known before any tensor is read, so under torchrun each rank writes its share of
the `.distcp` files and one rank writes `.metadata` and publishes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import OutputError
from .guard import DCP_SIDE_FILES as SIDE_FILES
from .guard import PROVENANCE_RECORD
from .lazy import itemsize
from .options import parse_size
from .provenance import provenance_text
from .sidefiles import copy_side_file
from .statedict import TRAINING_STATE_NAMES
from .write import (
    OutputFile,
    OutStorage,
    OutTensor,
    commit,
    finish_file,
    fsync_path,
    open_temp,
    pickle_tree,
    unmark_temp_directory,
)
from .written import ShardFile, Written

if TYPE_CHECKING:
    from .average import Digests, Unit
    from .dcp import DcpCheckpoint
    from .layout import Layout
    from .options import Options
    from .written import Runner

PROVENANCE_FILE = PROVENANCE_RECORD
_ARCHIVE = "archive"
_ALIGNMENT = 64
_ZIP64_LIMIT = 0xFFFFFFFF
_TIME, _DATE = 0, (0 << 9) | (1 << 5) | 1  # 1980-01-01 00:00


# ---------------------------------------------------------------- one torch.save archive


@dataclass
class _Record:
    name: str
    size: int
    payload: bytes | None  # None: the tensor's bytes, streamed in
    offset: int = 0  # of its local header, from the archive's start
    crc: int = 0


def _needs_zip64(record: _Record, force: bool) -> bool:
    return force or record.size >= _ZIP64_LIMIT or record.offset >= _ZIP64_LIMIT


def _local_header(record: _Record, start: int, force: bool) -> bytes:
    """The local header; `start` is the archive's offset in its file (data aligned to 64 there)."""
    name = record.name.encode()
    zip64 = force or record.size >= _ZIP64_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, record.size, record.size) if zip64 else b""
    size32 = 0xFFFFFFFF if zip64 else record.size
    fixed = 30 + len(name) + len(extra) + 4
    padding = (-(start + record.offset + fixed)) % _ALIGNMENT
    extra += b"FB" + struct.pack("<H", padding) + b"Z" * padding
    head = struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 45 if zip64 else 20, 0, 0, _TIME, _DATE, record.crc, size32, size32,
        len(name), len(extra),
    )  # fmt: skip
    return head + name + extra


def _central_entry(record: _Record, force: bool) -> bytes:
    name = record.name.encode()
    big_size = force or record.size >= _ZIP64_LIMIT
    big_offset = force or record.offset >= _ZIP64_LIMIT
    values = ([record.size, record.size] if big_size else []) + ([record.offset] if big_offset else [])
    extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
    size32 = 0xFFFFFFFF if big_size else record.size
    head = struct.pack(
        "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45 if values else 20, 0, 0, _TIME, _DATE, record.crc,
        size32, size32, len(name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF if big_offset else record.offset,
    )  # fmt: skip
    return head + name + extra


def _end_records(count: int, directory_offset: int, directory_size: int, force: bool) -> bytes:
    zip64 = force or directory_offset >= _ZIP64_LIMIT or directory_size >= _ZIP64_LIMIT
    out = b""
    if zip64:
        end64 = directory_offset + directory_size
        out += struct.pack(
            "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, directory_size, directory_offset
        )
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, end64, 1)
    offset32 = 0xFFFFFFFF if zip64 else directory_offset
    size32 = 0xFFFFFFFF if zip64 else directory_size
    return out + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, size32, offset32, 0)


class TensorArchive:
    """The byte layout of one tensor's `torch.save` archive, placed at `start` in its file.

    `head(crc)` goes before the tensor's bytes, `tail(crc)` after them; both are known in
    size before the data is, so the data can be streamed to its place first.
    """

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], start: int, *, force_zip64: bool = False) -> None:
        self.start = start
        self.nbytes = math.prod(shape) * itemsize(dtype)
        self.force = force_zip64
        storage = OutStorage("0", dtype, math.prod(shape))
        data_pkl = pickle_tree(OutTensor(storage, shape))
        self.records = [
            _Record(f"{_ARCHIVE}/data.pkl", len(data_pkl), data_pkl),
            _Record(f"{_ARCHIVE}/byteorder", 6, b"little"),
            _Record(f"{_ARCHIVE}/data/0", self.nbytes, None),
            _Record(f"{_ARCHIVE}/version", 2, b"3\n"),
        ]
        for record in self.records:
            if record.payload is not None:
                record.crc = zlib.crc32(record.payload)
        self._place()

    def _place(self) -> None:
        position = 0
        for record in self.records:
            record.offset = position
            position += len(_local_header(record, self.start, self.force)) + record.size
            if record.payload is None:
                self.data_offset = position - record.size  # from the archive's start
        self.directory_offset = position

    def head(self, crc: int) -> bytes:
        out = b""
        for record in self.records:
            if record.payload is None:
                record.crc = crc
                return out + _local_header(record, self.start, self.force)
            out += _local_header(record, self.start, self.force) + record.payload
        raise AssertionError("no tensor record")

    def tail(self, crc: int) -> bytes:
        self.records[2].crc = crc
        out = b""
        for record in self.records[3:]:
            out += _local_header(record, self.start, self.force) + record.payload  # type: ignore[operator]
        directory = b"".join(_central_entry(r, self.force) for r in self.records)
        return out + directory + _end_records(len(self.records), self.directory_offset, len(directory), self.force)

    @property
    def length(self) -> int:
        return len(self.head(0)) + self.nbytes + len(self.tail(0))


def archive_bytes(tensor: torch.Tensor, start: int = 0) -> bytes:
    """A tensor's whole archive in memory, placed at `start` (a chunk copied from the last checkpoint)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    archive = TensorArchive(tensor.dtype, tuple(tensor.shape), start)
    crc = zlib.crc32(data)
    return archive.head(crc) + data + archive.tail(crc)


# ---------------------------------------------------------------- the plan


@dataclass(eq=False)
class _Placed:
    """One averaged unit's archive in one data file."""

    file: int
    archive: TensorArchive
    crc: int = 0
    next_start: int = 0


@dataclass
class _Entry:
    """One name in the output's metadata."""

    fqn: str
    path: tuple[Any, ...]
    dtype: torch.dtype | None  # None: a non-tensor item
    shape: tuple[int, ...] = ()
    # (chunk offsets, chunk sizes, file index, offset, length, transforms)
    chunks: list[tuple[tuple[int, ...], tuple[int, ...], int, int, int, list[str]]] = field(default_factory=list)


class DcpPlan:
    """A DCP output planned from metadata alone: each averaged tensor's archive and each item
    copied from the last checkpoint at its place in its file (a `StagedPlan`).

    Files are filled in order up to `--max-shard-size`, so the split does not depend on how
    many processes write them; any process can write any file, and `.metadata`, which only
    needs the places, is written last by the one that publishes.
    """

    def __init__(self, output: str, layout: Layout, provenance: dict[str, Any], options: Options) -> None:
        self.output = output
        self.layout = layout
        self.provenance: dict[str, Any] = json.loads(json.dumps(provenance))
        self.info: DcpCheckpoint | None = layout.opened[-1].dcp
        self.sizes: list[int] = [0]
        self.limit = parse_size(options.max_shard_size) if options.max_shard_size else None
        self.placed: dict[int, _Placed] = {}
        self.items: list[_Entry] = []
        self.copies: list[tuple[int, int, Callable[[], bytes]]] = []  # (file, offset, bytes to write)
        self.dropped: list[str] = []
        self._build()
        names = file_names(len(self.sizes))
        units = layout.names[layout.choice.primary]
        held: list[list[str]] = [[] for _ in names]
        for name, unit in units.items():  # a tied name goes with the archive it shares
            held[self.placed[id(unit)].file].append(name)
        self.files = tuple(
            ShardFile(name, tuple(tensors), size) for name, tensors, size in zip(names, held, self.sizes, strict=True)
        )
        self.entries = {name: (unit.out_dtype, unit.shape) for name, unit in units.items()}

    @property
    def single(self) -> bool:
        return len(self.files) == 1

    def _file_for(self, nbytes: int) -> int:
        if self.limit is not None and self.sizes[-1] > 0 and self.sizes[-1] + nbytes > self.limit:
            self.sizes.append(0)
        return len(self.sizes) - 1

    def _build(self) -> None:
        units = self.layout.names[self.layout.choice.primary]
        averaged: set[tuple[Any, ...]] = set()
        for name, unit in units.items():
            fqn, path = self._where(name)
            averaged.add(path)
            placed = self._place_unit(unit)
            entry = _Entry(fqn, path, unit.out_dtype, unit.shape)
            archive = placed.archive
            zeros = (0,) * len(unit.shape)
            entry.chunks.append((zeros, unit.shape, placed.file, archive.start, archive.length, []))
            self.items.append(entry)
        if self.info is not None:
            self._copy_others(averaged)

    def _where(self, name: str) -> tuple[str, tuple[Any, ...]]:
        primary = tuple(self.layout.choice.primary)
        info = self.info
        if info is None:
            return name, (name,)
        path = (name,) if info.flat_model and primary == ("model",) else (*primary, name)
        for fqn, stored in info.paths.items():
            if stored == path:
                return fqn, path
        return ".".join(str(p) for p in path), path

    def _place_unit(self, unit: Unit) -> _Placed:
        found = self.placed.get(id(unit))
        if found is not None:
            return found  # tied names share one archive
        file = self._file_for(unit.out_nbytes)
        archive = TensorArchive(unit.out_dtype, unit.shape, self.sizes[file])
        self.sizes[file] += archive.length
        placed = self.placed[id(unit)] = _Placed(file, archive)
        return placed

    def _copy_others(self, averaged: set[tuple[Any, ...]]) -> None:
        from .dcp import DcpTensor

        info = self.info
        assert info is not None
        for fqn, stored in info.items.items():
            path = info.paths[fqn]
            if path in averaged:
                continue
            if str(path[0]) in TRAINING_STATE_NAMES or str(path[0]) in ("optimizers",):
                training = f"{path[0]} (training state)"
                if training not in self.dropped:  # said once per entry, as for a .pt output
                    self.dropped.append(training)
                continue
            tensor = info.tensors.get(fqn)
            if isinstance(tensor, DcpTensor):
                self._copy_tensor(fqn, path, tensor)
            elif fqn in info.clean_objects:
                item = stored[0][1]
                file = self._file_for(item.length)
                transforms = ["stream.zstd/1"] if item.zstd else []
                entry = _Entry(fqn, path, None)
                entry.chunks.append(((), (), file, self.sizes[file], item.length, transforms))
                self.copies.append((file, self.sizes[file], item.raw))
                self.sizes[file] += item.length
                self.items.append(entry)
            elif fqn in info.objects:
                self.dropped.append(f"{fqn} (holds an object that was not loaded)")

    def _copy_tensor(self, fqn: str, path: tuple[Any, ...], tensor: Any) -> None:
        entry = _Entry(fqn, path, tensor.dtype, tensor.shape)
        for chunk in tensor.chunks:  # read when written, one chunk at a time
            file = self._file_for(chunk.numel * itemsize(tensor.dtype))
            start = self.sizes[file]
            length = TensorArchive(tensor.dtype, chunk.sizes, start).length
            entry.chunks.append((chunk.offsets, chunk.sizes, file, start, length, []))
            self.copies.append((file, start, functools.partial(_chunk_archive, chunk, tensor.dtype, start)))
            self.sizes[file] += length
        self.items.append(entry)

    def _side_files(self) -> list[str]:
        if self.info is None:
            return []
        return [n for n in SIDE_FILES if os.path.lexists(os.path.join(self.info.directory, n))]

    def fingerprint(self) -> str:
        """A hash of the whole plan: ranks that disagree on it must not write one output."""
        described = {
            "output": self.output,
            "files": [[f.name, list(f.tensors), f.nbytes] for f in self.files],
            "metadata": hashlib.sha256(metadata_bytes(self)).hexdigest(),
            "provenance": self.provenance,
            "side_files": self._side_files(),
            "input_sizes": [o.ref.size for o in self.layout.opened],
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def write(
        self, staging: str, indices: Iterable[int], run: Runner, *, hashed: bool
    ) -> tuple[Digests, dict[str, str]]:
        """The data files at `indices`: copied items first, then the averaged tensors streamed to
        their places; each archive's headers are patched with its CRC-32 after its data, so a
        file's sha256 is read back once it is complete."""
        files: dict[int, OutputFile] = {}
        try:
            for index in indices:
                files[index] = open_temp(os.path.join(staging, self.files[index].name), hashed=hashed)
                files[index].truncate(self.sizes[index])
            for file_index, offset, data in self.copies:
                if file_index in files:
                    files[file_index].pwrite(data(), offset)
            sink = DcpSink(self, files)
            digests = run(sink, True, [name for index in files for name in self.files[index].tensors])
            sink.finish()
            sha256: dict[str, str] = {}
            for index, file in files.items():
                digest = finish_file(file)
                if digest is not None:
                    sha256[self.files[index].name] = digest
        except BaseException:
            for file in files.values():
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
        """The provenance, the side files and `.metadata` (last), fsync, and publish by rename."""
        sha256 = dict(sha256)
        text = provenance_text(self.provenance, digests, self.layout.primary_names)
        _write_small(os.path.join(staging, PROVENANCE_FILE), (text + "\n").encode(), sha256 if hashed else None)
        copied: dict[str, str] = {}
        for name in self._side_files():
            assert self.info is not None
            problem = copy_side_file(self.info.directory, name, staging, copied)
            if problem:
                warn(f"{os.path.join(self.info.directory, name)}: not copied into the output: {problem}")
        _write_small(os.path.join(staging, ".metadata"), metadata_bytes(self), sha256 if hashed else None)
        unmark_temp_directory(staging)
        fsync_path(staging)  # other ranks' files are named in it: their entries must be durable too
        commit(staging, self.output, force=force)
        if hashed:
            sha256.update(copied)
        names = [*(f.name for f in self.files), ".metadata", PROVENANCE_FILE, *copied]
        written = [os.path.join(self.output, n) for n in names]
        return Written(written, digests, self.dropped, {os.path.join(self.output, n): d for n, d in sha256.items()})


def _chunk_archive(chunk: Any, dtype: torch.dtype, start: int) -> bytes:
    return archive_bytes(chunk.tensor(dtype).load(), start)


def file_names(count: int) -> list[str]:
    return [f"__{rank}_0.distcp" for rank in range(count)]


# ---------------------------------------------------------------- streaming in


class DcpSink:
    """Puts each averaged chunk at its place in its archive, keeping the archive's CRC-32."""

    def __init__(self, plan: DcpPlan, files: dict[int, OutputFile]) -> None:
        self.plan = plan
        self.files = files

    def write(self, unit: Unit, start: int, data: torch.Tensor) -> None:
        placed = self.plan.placed[id(unit)]
        if start != placed.next_start:
            raise AssertionError("averaged chunks arrived out of order")
        raw = data.contiguous().view(torch.uint8).numpy().data
        archive = placed.archive
        self.files[placed.file].pwrite(raw, archive.start + archive.data_offset + start * itemsize(unit.out_dtype))
        placed.crc = zlib.crc32(raw, placed.crc)
        placed.next_start = start + data.numel()

    def finish(self) -> None:
        for placed in self.plan.placed.values():
            if placed.file not in self.files:
                continue  # another process writes that file
            archive, file = placed.archive, self.files[placed.file]
            file.pwrite(archive.head(placed.crc), archive.start)
            file.pwrite(archive.tail(placed.crc), archive.start + archive.data_offset + archive.nbytes)


# ---------------------------------------------------------------- metadata


def metadata_bytes(plan: DcpPlan) -> bytes:
    """DCP's own `Metadata`, pickled as `FileSystemWriter.finish` pickles it."""
    try:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )
    except ImportError as exc:
        raise OutputError(f"--format dcp needs torch.distributed, which this torch lacks ({exc})") from None
    state: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    planner: dict[str, tuple[Any, ...]] = {}
    names = [f.name for f in plan.files]
    for entry in plan.items:
        planner[entry.fqn] = entry.path
        if entry.dtype is None:
            _, _, file, offset, length, transforms = entry.chunks[0]
            state[entry.fqn] = BytesStorageMetadata()
            storage[MetadataIndex(entry.fqn)] = _StorageInfo(names[file], offset, length, transforms or None)
            continue
        chunks = []
        for index, (offsets, sizes, file, offset, length, transforms) in enumerate(entry.chunks):
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
            key = MetadataIndex(entry.fqn, offsets, index)
            storage[key] = _StorageInfo(names[file], offset, length, transforms or None)
        properties = TensorProperties(dtype=entry.dtype)
        state[entry.fqn] = TensorStorageMetadata(properties, torch.Size(entry.shape), chunks)
    metadata = Metadata(state, planner_data=planner, storage_data=storage, version="1.0.0")
    if plan.info is not None and plan.info.mcore_data:  # Megatron's loader looks its shapes up here
        written = {entry.fqn for entry in plan.items}
        metadata.mcore_data = {k: v for k, v in plan.info.mcore_data.items() if k in written}  # type: ignore[attr-defined]
    return pickle.dumps(metadata)


# ---------------------------------------------------------------- the output


def _write_small(path: str, data: bytes, sha256: dict[str, str] | None) -> None:
    with open_temp(path) as file:
        file.write(data)
        os.fsync(file.fileno())
    if sha256 is not None:
        sha256[os.path.basename(path)] = hashlib.sha256(data).hexdigest()
