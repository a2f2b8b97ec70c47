"""Writing a torch.distributed.checkpoint (DCP) directory, streaming.

Every averaged tensor is one item: a `torch.save`-compatible uncompressed zip archive of
one whole-tensor chunk, inside a `.distcp` file, as `FileSystemWriter` writes them. The
averaged bytes go straight to their place in the file as the kernel produces them; each
archive's headers (which carry the data's CRC-32) are written once its data is complete.
`.metadata` is written last, by DCP's own dataclasses, so `dcp.load` and torchtitan read it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import pickle
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import OutputError
from .guard import DCP_SIDE_FILES as SIDE_FILES
from .guard import PROVENANCE_RECORD
from .lazy import itemsize
from .options import parse_size
from .statedict import TRAINING_STATE_NAMES
from .write import (
    OutputFile,
    OutStorage,
    OutTensor,
    commit,
    discard,
    finish_file,
    make_staging,
    open_temp,
    pickle_tree,
    temp_path_for,
    unmark_temp_directory,
)

if TYPE_CHECKING:
    from .average import Digests, Unit
    from .dcp import DcpCheckpoint
    from .layout import Layout
    from .options import Options
    from .written import Runner, Written

PROVENANCE_FILE = PROVENANCE_RECORD
# Files beside the DCP data that Megatron's loader needs (plain copies from the last checkpoint).
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


class _Plan:
    def __init__(self, layout: Layout, max_bytes: int | None) -> None:
        self.layout = layout
        self.info: DcpCheckpoint | None = layout.opened[-1].dcp
        self.sizes: list[int] = [0]
        self.limit = max_bytes
        self.placed: dict[int, _Placed] = {}
        self.entries: list[_Entry] = []
        self.copies: list[tuple[int, int, Callable[[], bytes]]] = []  # (file, offset, bytes to write)
        self.dropped: list[str] = []

    def _file_for(self, nbytes: int) -> int:
        if self.limit is not None and self.sizes[-1] > 0 and self.sizes[-1] + nbytes > self.limit:
            self.sizes.append(0)
        return len(self.sizes) - 1

    def build(self) -> None:
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
            self.entries.append(entry)
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
                self.entries.append(entry)
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
        self.entries.append(entry)


def _chunk_archive(chunk: Any, dtype: torch.dtype, start: int) -> bytes:
    return archive_bytes(chunk.tensor(dtype).load(), start)


def file_names(count: int) -> list[str]:
    return [f"__{rank}_0.distcp" for rank in range(count)]


# ---------------------------------------------------------------- streaming in


class DcpSink:
    """Puts each averaged chunk at its place in its archive, keeping the archive's CRC-32."""

    def __init__(self, plan: _Plan, files: list[OutputFile]) -> None:
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
            archive, file = placed.archive, self.files[placed.file]
            file.pwrite(archive.head(placed.crc), archive.start)
            file.pwrite(archive.tail(placed.crc), archive.start + archive.data_offset + archive.nbytes)


# ---------------------------------------------------------------- metadata


def metadata_bytes(plan: _Plan, names: list[str]) -> bytes:
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
    for entry in plan.entries:
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
        written = {entry.fqn for entry in plan.entries}
        metadata.mcore_data = {k: v for k, v in plan.info.mcore_data.items() if k in written}  # type: ignore[attr-defined]
    return pickle.dumps(metadata)


# ---------------------------------------------------------------- the output


def write_dcp(
    output: str, layout: Layout, provenance_text: Callable[[Digests | None], str], options: Options, run: Runner
) -> Written:
    """Write OUTPUT as a DCP directory, atomically; with `options.hash_files`, each file's sha256."""
    from .written import Written

    plan = _Plan(layout, parse_size(options.max_shard_size) if options.max_shard_size else None)
    plan.build()
    names = file_names(len(plan.sizes))
    temp = temp_path_for(output)
    files: list[OutputFile] = []
    make_staging(temp, output)
    try:
        digests, sha256 = _fill(temp, plan, names, files, provenance_text, run, options.hash_files)
        unmark_temp_directory(temp)
        commit(temp, output, force=options.force)
    except BaseException as exc:
        for file in files:
            with contextlib.suppress(OSError):
                file.close()
        discard(temp)
        if isinstance(exc, OSError):
            raise OutputError(f"{output}: write failed: {exc.strerror or exc}") from None
        raise
    written = [os.path.join(output, n) for n in [*names, ".metadata", PROVENANCE_FILE]]
    return Written(written, digests, plan.dropped, {os.path.join(output, n): d for n, d in sha256.items()})


def _fill(
    temp: str,
    plan: _Plan,
    names: list[str],
    files: list[OutputFile],
    provenance_text: Callable[[Digests | None], str],
    run: Runner,
    hashed: bool,
) -> tuple[Digests, dict[str, str]]:
    """The data files, the provenance, side files and `.metadata` (last) in `temp`; each file's
    sha256 by name where `hashed` (a data file's archive headers are patched with their CRC-32
    after the data, so its sha256 is read back once it is complete)."""
    for name, size in zip(names, plan.sizes, strict=True):
        file = open_temp(os.path.join(temp, name), hashed=hashed)
        files.append(file)
        file.truncate(size)
    for file_index, offset, data in plan.copies:
        files[file_index].pwrite(data(), offset)
    sink = DcpSink(plan, files)
    digests = run(sink, True)
    sink.finish()
    sha256: dict[str, str] = {}
    for name, file in zip(names, files, strict=True):
        digest = finish_file(file)
        if digest is not None:
            sha256[name] = digest
    provenance = (provenance_text(digests) + "\n").encode()
    _write_small(os.path.join(temp, PROVENANCE_FILE), provenance, sha256 if hashed else None)
    _copy_side_files(plan, temp)
    _write_small(os.path.join(temp, ".metadata"), metadata_bytes(plan, names), sha256 if hashed else None)
    return digests, sha256


def _write_small(path: str, data: bytes, sha256: dict[str, str] | None) -> None:
    with open_temp(path) as file:
        file.write(data)
        os.fsync(file.fileno())
    if sha256 is not None:
        sha256[os.path.basename(path)] = hashlib.sha256(data).hexdigest()


def _copy_side_files(plan: _Plan, temp: str) -> None:
    if plan.info is None:
        return
    for name in SIDE_FILES:
        source = os.path.join(plan.info.directory, name)
        if os.path.isfile(source) and not os.path.islink(source):
            shutil.copyfile(source, os.path.join(temp, name))
