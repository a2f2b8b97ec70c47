"""torch.distributed.checkpoint (DCP) directories read without running code from them.

A DCP directory holds `.metadata` (a pickle of DCP's metadata dataclasses) and `.distcp`
files; every stored item is a small `torch.save` archive at (file, offset, length). The
metadata is unpickled with inert stand-ins for exactly the globals DCP writes (never
importing `torch.distributed`); anything else is refused. A tensor is a list of chunks,
boxes in global coordinates that may lie in any file, assembled into any flat element
range on demand: only the bytes of the range are read.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar, cast

import torch

from .errors import CheckpointError, DiscoveryError, UnsafePickleError
from .lazy import FileReader, LazyTensor, StorageRef, itemsize, unnamed_file_reader
from .safetensors_file import read_header
from .torchfile import LOCAL_HEADER, StorageType, lazy_overrides, torch_dtypes
from .unpickle import Constructor, GlobalResolver, PicklePolicy, loads_checked

METADATA = ".metadata"
_RANK_METADATA = re.compile(r"^__(\d+)\.metadata$")
ZSTD = "stream.zstd/1"
# torch.save stores records uncompressed; a small record may be read whole.
_MAX_SMALL_RECORD = 64 << 20
_MAX_ITEM_OVERHEAD = 1 << 20  # a tensor item's zip records beside its data


# ---------------------------------------------------------------- discovery


def dcp_metadata_file(directory: str) -> str | None:
    """The metadata file of a DCP directory, or None if it is not one."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    if METADATA in names:
        return os.path.join(directory, METADATA)
    ranks = sorted((int(m.group(1)), n) for n in names if (m := _RANK_METADATA.match(n)))
    if ranks and any(n.endswith(".distcp") for n in names):
        return os.path.join(directory, ranks[0][1])
    return None


def dcp_files(directory: str) -> tuple[str, ...] | None:
    """The metadata file, then the data files, of a DCP directory; None if it is not one."""
    metadata = dcp_metadata_file(directory)
    if metadata is None:
        return None
    data = sorted(n for n in os.listdir(directory) if n.endswith(".distcp"))
    return (metadata, *(os.path.join(directory, n) for n in data))


def refuse_incomplete(directory: str, names: Sequence[str]) -> None:
    """`.distcp` files without metadata: DCP writes `.metadata` last, so the save never finished."""
    if any(n.endswith(".distcp") for n in names):
        raise DiscoveryError(
            f"{directory}: torch.distributed.checkpoint directory without .metadata: the save did not finish"
            " (DCP writes .metadata last); pick another checkpoint"
        )


def refuse_hf_distributed(path: str, metadata: dict[str, str]) -> None:
    """Hugging Face distributed shards hold PART of each tensor under its full name."""
    if "DCP_SHARDING_INFO" in metadata:
        directory = os.path.dirname(path) or "."
        raise CheckpointError(
            f"{path}: a Hugging Face distributed safetensors shard (DCP_SHARDING_INFO): each tensor in it is only"
            " a part of the real one; consolidate the directory first (it runs no code from the files): python -c"
            ' "from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files'
            f" as c; c('{directory}', '{directory.rstrip('/')}_full')\""
        )


# ---------------------------------------------------------------- .metadata stand-ins


class _Record:
    """An inert stand-in for one of DCP's metadata dataclasses: holds fields, runs nothing.

    Fields that DCP leaves out of the pickle when None take their defaults; fields a newer
    torch or Megatron adds are kept and ignored.
    """

    defaults: ClassVar[dict[str, Any]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> _Record:
        self = object.__new__(cls)
        self.__dict__.update(cls.defaults)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots)
        if not isinstance(state, dict) or not all(isinstance(k, str) and not k.startswith("__") for k in state):
            raise CheckpointError(f"malformed {type(self).__name__} in DCP metadata")
        self.__dict__.update(state)

    def get(self, name: str) -> Any:
        return self.__dict__.get(name)


class _Metadata(_Record):
    state_dict_metadata: Any
    planner_data: Any
    storage_data: Any
    defaults: ClassVar[dict[str, Any]] = {
        "state_dict_metadata": None,
        "planner_data": None,
        "storage_data": None,
        "storage_meta": None,
        "version": None,
    }


class _TensorStorageMetadata(_Record):
    properties: Any
    size: Any
    chunks: Any
    defaults: ClassVar[dict[str, Any]] = {"properties": None, "size": None, "chunks": None}


class _ChunkStorageMetadata(_Record):
    offsets: Any
    sizes: Any
    defaults: ClassVar[dict[str, Any]] = {"offsets": None, "sizes": None}


class _BytesStorageMetadata(_Record):
    pass


class _TensorProperties(_Record):
    defaults: ClassVar[dict[str, Any]] = {"dtype": None}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and state and not isinstance(state[-1], dict):
            self.__dict__["dtype"] = state[0]  # (dtype, layout, requires_grad, memory format, pinned)
            return
        super().__setstate__(state)


class _MetadataIndex(_Record):
    fqn: Any
    offset: Any
    defaults: ClassVar[dict[str, Any]] = {"fqn": None, "offset": None, "index": None}


class _StorageInfo(_Record):
    relative_path: Any
    offset: Any
    length: Any
    transform_descriptors: Any
    defaults: ClassVar[dict[str, Any]] = {
        "relative_path": None,
        "offset": None,
        "length": None,
        "transform_descriptors": None,
    }


class _StorageMeta(_Record):
    pass


def _inert(value: Any = None, *_: Any) -> Any:
    return value


def _metadata_globals() -> tuple[dict[str, type[_Record]], dict[str, Any]]:
    """DCP's metadata classes (built as our stand-ins) and the other names its pickle holds."""
    module = "torch.distributed.checkpoint.metadata"
    legacy = "torch.distributed._shard.sharded_tensor.metadata"
    classes: dict[str, type[_Record]] = {
        f"{module}.Metadata": _Metadata,
        f"{module}.TensorStorageMetadata": _TensorStorageMetadata,
        f"{module}.ChunkStorageMetadata": _ChunkStorageMetadata,
        f"{module}.BytesStorageMetadata": _BytesStorageMetadata,
        f"{module}.TensorProperties": _TensorProperties,
        f"{module}.MetadataIndex": _MetadataIndex,
        f"{module}.StorageMeta": _StorageMeta,
        f"{legacy}.TensorProperties": _TensorProperties,
        "torch.distributed.checkpoint.filesystem._StorageInfo": _StorageInfo,
    }
    names: dict[str, Any] = {
        f"{module}._MEM_FORMAT_ENCODING": _inert,
        f"{legacy}.MEM_FORMAT_ENCODING": _inert,
        "torch.Size": torch.Size,
        "torch.serialization._get_layout": _inert,
        "pathlib.Path": _inert,
        "pathlib.PosixPath": _inert,
        "pathlib.WindowsPath": _inert,
        "pathlib.PurePosixPath": _inert,
        "pathlib.PureWindowsPath": _inert,
    }
    names.update({str(d): d for d in torch_dtypes()})
    return classes, names


class _ClassResolver(GlobalResolver):
    """Also builds `classes` by name as allowlisted classes are built: NEWOBJ makes one with
    `__new__` (its arguments checked, its bytes charged) and BUILD applies the class's own
    `__setstate__`; our stand-ins' and `io.BytesIO`'s store plain data and run nothing else."""

    def __init__(self, policy: PicklePolicy, overrides: dict[str, Any], classes: dict[str, type]) -> None:
        super().__init__(policy, overrides)
        self._classes_by_name = classes
        self._built = {name: Constructor(cls, name, self) for name, cls in classes.items()}
        self.classes_loaded.update(classes.values())

    def dispose(self) -> None:
        super().dispose()
        self._built.clear()

    def _resolve(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._built:  # the C unpickler (--trust-pickle) calls the class itself
            return self._classes_by_name[full] if self.policy.trust else self._built[full]
        return super()._resolve(module, name)


class _StrictResolver(_ClassResolver):
    """Only the names DCP's metadata uses; any other global is refused before it is imported."""

    def _resolve(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._built:
            return self._built[full]
        if full in self.overrides:
            return self.overrides[full]
        raise UnsafePickleError(
            f"refers to {full}, which DCP metadata never holds; refused (nothing from the file was run)"
        )


def read_metadata(path: str) -> _Metadata:
    try:
        with open(path, "rb") as file:
            classes, names = _metadata_globals()
            loaded = loads_checked(file, _StrictResolver(PicklePolicy(), names, classes), path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(loaded, _Metadata) or not isinstance(loaded.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not DCP metadata (holds a {type(loaded).__name__})")
    if not isinstance(loaded.storage_data, dict):
        raise CheckpointError(f"{path}: DCP metadata without storage_data (a custom storage writer?)")
    return loaded


# ---------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One stored item: bytes (file, offset, length), maybe through a stream transform."""

    path: str
    reader: FileReader
    offset: int
    length: int
    zstd: bool = False

    def raw(self) -> bytes:
        """The item's bytes as stored (small items only)."""
        if self.length > _MAX_SMALL_RECORD:
            raise CheckpointError(f"{self.path}: item at {self.offset} is {self.length:,} bytes, too large")
        return bytes(self.reader.read(self.offset, self.length).numpy().tobytes())

    def plain_reader(self, limit: int) -> tuple[FileReader, int, int]:
        """Where the item's untransformed bytes lie: (reader, offset, length)."""
        if not self.zstd:
            return self.reader, self.offset, self.length
        return _unzstd(self, limit)


def _unzstd(item: Item, limit: int) -> tuple[FileReader, int, int]:
    """A compressed item unpacked once into an unnamed temporary file (zstd is not seekable)."""
    try:
        import zstandard
    except ImportError:
        raise CheckpointError(
            f"{item.path}: holds zstd-compressed items (DCP's ZStandard extension); reading them needs the"
            " zstandard package: pip install zstandard"
        ) from None

    def fill(out: Any) -> None:
        window = cast(IO[bytes], _Window(item.reader, item.offset, item.length))
        source = zstandard.ZstdDecompressor().stream_reader(window)
        total = 0
        while block := source.read(1 << 20):
            total += len(block)
            if total > limit:
                raise CheckpointError(f"{item.path}: zstd item at {item.offset} unpacks to more than {limit:,} bytes")
            out.write(block)

    try:
        found = unnamed_file_reader(f"{item.path} (zstd item)", fill)
    except zstandard.ZstdError as exc:
        raise CheckpointError(f"{item.path}: corrupt zstd item at {item.offset}: {exc}") from None
    return found, 0, found.size


class _Window(io.RawIOBase):
    """A read-only file object over (offset, length) of a file, for zipfile."""

    def __init__(self, reader: FileReader, offset: int, length: int) -> None:
        self.reader, self.base, self.length, self.position = reader, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.length}[whence]
        self.position = max(0, base + position)
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self.length - self.position))
        if count:
            target = torch.frombuffer(view, dtype=torch.uint8, count=count)
            self.reader.read_into(target, self.base + self.position)
            self.position += count
        return count


@dataclass
class _ItemZip:
    """A `torch.save` archive stored as one item: its pickle and where its records' data lie."""

    reader: FileReader
    base: int
    pickle: bytes
    records: dict[str, tuple[int, int]]  # record name under data/ -> (absolute offset, size)


# An item this small is read whole, in one call: zipfile's many small reads through `_Window`
# cost more than the bytes (a checkpoint of thousands of small tensors, or of many ranks' chunks).
_READ_WHOLE_ITEM = 64 << 10


def _open_item_zip(reader: FileReader, base: int, length: int, where: str) -> _ItemZip:
    window: io.RawIOBase | io.BytesIO
    if length <= _READ_WHOLE_ITEM:
        window = io.BytesIO(reader.read(base, length).numpy().tobytes())
    else:
        window = _Window(reader, base, length)
    try:
        with zipfile.ZipFile(window) as archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pickles) != 1 or len({i.filename for i in infos}) != len(infos):
                raise CheckpointError(f"{where}: not a torch.save archive (no single data.pkl)")
            prefix = pickles[0].filename[: -len("data.pkl")]
            if pickles[0].file_size > _MAX_SMALL_RECORD or pickles[0].compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{where}: data.pkl is compressed or too large")
            data = archive.read(pickles[0])
            records = {}
            for info in infos:
                if info.filename.startswith(prefix + "data/"):
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise CheckpointError(f"{where}: record {info.filename!r} is compressed")
                    start = base + _data_offset(window, info, where)
                    records[info.filename[len(prefix) + 5 :]] = (start, info.file_size)
            order = next((i for i in infos if i.filename == prefix + "byteorder"), None)
            if order is not None and archive.read(order)[:16] != b"little":
                raise CheckpointError(f"{where}: big-endian items are not supported")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{where}: corrupt item: {exc}") from None
    for offset, size in records.values():
        if offset + size > base + length:
            raise CheckpointError(f"{where}: a record ends past its item")
    return _ItemZip(reader, base, data, records)


def _data_offset(window: io.RawIOBase | io.BytesIO, info: zipfile.ZipInfo, where: str) -> int:
    window.seek(info.header_offset)
    header = window.read(LOCAL_HEADER.size)
    fields = LOCAL_HEADER.unpack(header) if len(header) == LOCAL_HEADER.size else None
    if fields is None or fields[0] != b"PK\x03\x04":
        raise CheckpointError(f"{where}: corrupt zip: bad local header for {info.filename!r}")
    return int(info.header_offset) + LOCAL_HEADER.size + int(fields[-2]) + int(fields[-1])


def load_tensor_item(item: Item, expected: int, where: str) -> LazyTensor:
    """A chunk's tensor (with its own strides) from its item, no data read."""
    reader, offset, length = item.plain_reader(expected + _MAX_ITEM_OVERHEAD)
    archive = _open_item_zip(reader, offset, length, where)
    resolver = GlobalResolver(PicklePolicy(), lazy_overrides())

    def persistent_load(pid: Any) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{where}: unknown persistent id in pickle")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, StorageType) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{where}: malformed storage reference in pickle")
        if type(key) is not str or key not in archive.records:  # never str() an object from a pickle
            raise CheckpointError(f"{where}: malformed storage reference in pickle")
        start, size = archive.records[key]
        nbytes = numel * itemsize(storage_type.dtype)
        if nbytes > size:
            raise CheckpointError(f"{where}: storage record holds {size} bytes, needs {nbytes}")
        return StorageRef(reader, start, nbytes, storage_type.dtype, f"{where}\0{key}")

    try:
        tensor = loads_checked(io.BytesIO(archive.pickle), resolver, where, persistent_load=persistent_load)
    finally:
        resolver.dispose()
    if not isinstance(tensor, LazyTensor):
        raise CheckpointError(f"{where}: a tensor item holds a {type(tensor).__name__}")
    tensor.validate(where)
    return tensor


def load_object_item(item: Item, policy: PicklePolicy, where: str) -> tuple[Any, set[str]]:
    """A non-tensor item through the restricted unpickler: an unknown class is a placeholder."""
    reader, offset, length = item.plain_reader(_MAX_SMALL_RECORD)
    if length > _MAX_SMALL_RECORD:
        raise CheckpointError(f"{where}: a non-tensor item of {length:,} bytes, too large")
    head = reader.read(offset, min(4, length)).numpy().tobytes()
    if head != b"PK\x03\x04":
        # Written raw by a planner that stores io.BytesIO values as their bytes.
        return io.BytesIO(reader.read(offset, length).numpy().tobytes()), set()
    archive = _open_item_zip(reader, offset, length, where)
    # torchtitan's train_state keeps logs in io.BytesIO values: an inert buffer of bytes.
    resolver = _ClassResolver(policy, {}, {"_io.BytesIO": io.BytesIO})

    def persistent_load(pid: Any) -> Any:
        raise CheckpointError(f"{where}: a non-tensor item refers to tensor storage")

    try:
        value = loads_checked(io.BytesIO(archive.pickle), resolver, where, persistent_load=persistent_load)
    finally:
        resolver.dispose()
    return value, set(resolver.placeholders)


# ---------------------------------------------------------------- tensors


@dataclass(eq=False)
class Chunk:
    """One stored box of a tensor: offsets and sizes in global coordinates."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: Item | None  # None: a safetensors-serialised chunk, found by name in `safetensors`
    where: str
    safetensors: LazyTensor | None = None
    _tensor: LazyTensor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def forget(self) -> None:
        with self._lock:
            self._tensor = None

    def tensor(self, dtype: torch.dtype) -> LazyTensor:
        with self._lock:
            if self._tensor is None:
                found = self.safetensors
                if found is None:
                    assert self.item is not None
                    found = load_tensor_item(self.item, self.numel * itemsize(dtype), self.where)
                if tuple(found.shape) != (self.sizes or ()) or found.dtype != dtype:
                    raise CheckpointError(
                        f"{self.where}: stored chunk is {_dtype_name(found.dtype)} {list(found.shape)},"
                        f" the metadata says {_dtype_name(dtype)} {list(self.sizes)}"
                    )
                self._tensor = found
            return self._tensor


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _grid(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if shape else (1,)


def _row_major_strides(shape: Sequence[int]) -> list[int]:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= size
    return strides[::-1]


def flat_boxes(shape: Sequence[int], start: int, stop: int) -> Iterator[tuple[list[int], list[int]]]:
    """Boxes (lo, hi) whose union is the flat range [start, stop), each contiguous, in order."""
    yield from _boxes(list(shape), 0, [], start, stop)


def _boxes(
    shape: list[int], dim: int, prefix: list[int], start: int, stop: int
) -> Iterator[tuple[list[int], list[int]]]:
    if start >= stop:
        return
    inner = math.prod(shape[dim + 1 :])
    rest = shape[dim + 1 :]
    if start % inner == 0 and stop % inner == 0:
        lo = [*prefix, start // inner] + [0] * len(rest)
        hi = [p + 1 for p in prefix] + [stop // inner, *rest]
        yield lo, hi
        return
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        yield from _boxes(shape, dim + 1, [*prefix, first], start - first * inner, stop - first * inner)
        return
    if start % inner:
        yield from _boxes(shape, dim + 1, [*prefix, first], start % inner, inner)
        first += 1
    end = stop // inner
    if end > first:
        yield from _boxes(shape, dim, prefix, first * inner, end * inner)
    if stop % inner:
        yield from _boxes(shape, dim + 1, [*prefix, end], 0, stop % inner)


class DcpTensor:
    """A DCP tensor: its chunks, assembled into any flat range on demand (a `Leaf`)."""

    def __init__(self, ident: str, dtype: torch.dtype, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
        self.ident = ident
        self.dtype = dtype
        self.shape = shape
        self.chunks = chunks
        self._grid = _grid(shape)
        self._strides = _row_major_strides(self._grid)
        self._random_access: bool | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def random_access(self) -> bool:
        # A chunk stored transposed, or compressed, is read whole: the engine spills the tensor once.
        if self._random_access is None:
            self._random_access = all(c.item is None or not c.item.zstd for c in self.chunks) and all(
                c.tensor(self.dtype).is_contiguous() for c in self.chunks
            )
        return self._random_access

    def tie_key(self) -> tuple[object, ...]:
        return ("dcp", self.ident)

    def _pieces(self, start: int, count: int) -> Iterator[tuple[Chunk, list[int], list[int], list[int], list[int]]]:
        """(chunk, box lo, box hi, intersection lo, intersection hi) for every piece of the range."""
        for lo, hi in flat_boxes(self._grid, start, start + count):
            for chunk in self.chunks:
                c_lo = chunk.offsets or (0,)
                c_hi = [o + s for o, s in zip(c_lo, chunk.sizes or (1,), strict=True)]
                i_lo = [max(a, b) for a, b in zip(lo, c_lo, strict=True)]
                i_hi = [min(a, b) for a, b in zip(hi, c_hi, strict=True)]
                if all(a < b for a, b in zip(i_lo, i_hi, strict=True)):
                    yield chunk, lo, hi, i_lo, i_hi

    def read_into(self, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        typed = out[: count * itemsize(self.dtype)].view(self.dtype)
        for chunk, lo, hi, i_lo, i_hi in self._pieces(start, count):
            box_start = sum(a * s for a, s in zip(lo, self._strides, strict=True)) - start
            box_shape = [b - a for a, b in zip(lo, hi, strict=True)]
            box = typed[box_start : box_start + math.prod(box_shape)].view(box_shape)
            target = box[tuple(slice(a - b, c - b) for a, b, c in zip(i_lo, lo, i_hi, strict=True))]
            self._read_piece(chunk, i_lo, i_hi, target)
        return typed

    def _read_piece(self, chunk: Chunk, i_lo: list[int], i_hi: list[int], target: torch.Tensor) -> None:
        stored = chunk.tensor(self.dtype)
        rel = [a - o for a, o in zip(i_lo, chunk.offsets or (0,), strict=True)]
        if not stored.is_contiguous():
            whole = stored.load().reshape(_grid(chunk.sizes))
            target.copy_(whole[tuple(slice(r, r + b - a) for r, a, b in zip(rel, i_lo, i_hi, strict=True))])
            return
        first = sum(r * s for r, s in zip(rel, _row_major_strides(_grid(chunk.sizes)), strict=True))
        count = target.numel()
        if target.is_contiguous():
            stored.read_range(first, count, target.reshape(-1).view(torch.uint8))
        else:
            target.copy_(stored.read_range(first, count).view(target.shape))

    def prefetch(self, start: int, count: int) -> None:
        for chunk, _, _, i_lo, i_hi in self._pieces(start, count):
            stored = chunk.tensor(self.dtype)
            rel = [a - o for a, o in zip(i_lo, chunk.offsets or (0,), strict=True)]
            first = sum(r * s for r, s in zip(rel, _row_major_strides(_grid(chunk.sizes)), strict=True))
            stored.prefetch(first, math.prod(b - a for a, b in zip(i_lo, i_hi, strict=True)))

    def load(self) -> torch.Tensor:
        out = torch.empty(self.numel * itemsize(self.dtype), dtype=torch.uint8)
        loaded = self.read_into(0, self.numel, out).view(self.shape)
        for chunk in self.chunks:
            if chunk.item is not None and chunk.item.zstd:
                chunk.forget()  # its unpacked copy (a temporary file) is not needed again
        return loaded


def _check_coverage(name: str, shape: tuple[int, ...], chunks: list[Chunk], where: str) -> None:
    grid = _grid(shape)
    for chunk in chunks:
        offsets, sizes = chunk.offsets or (0,), chunk.sizes or (1,)
        if len(offsets) != len(grid) or len(sizes) != len(grid):
            raise CheckpointError(f"{where}: tensor {name!r} has a chunk of another rank than the tensor")
        if any(o < 0 or s < 0 or o + s > g for o, s, g in zip(offsets, sizes, grid, strict=True)):
            raise CheckpointError(f"{where}: tensor {name!r} has a chunk outside its shape {list(shape)}")
    if sum(c.numel for c in chunks) != math.prod(shape):
        raise CheckpointError(
            f"{where}: the chunks of tensor {name!r} do not cover its shape {list(shape)} exactly"
            " (missing or overlapping chunks)"
        )
    ordered = sorted(chunks, key=lambda c: c.offsets)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b.offsets and a.offsets and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break
            if _overlap(a, b):
                raise CheckpointError(f"{where}: tensor {name!r} has overlapping chunks")


def _overlap(a: Chunk, b: Chunk) -> bool:
    return all(
        max(ao, bo) < min(ao + asz, bo + bsz)
        for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
    )


# ---------------------------------------------------------------- a checkpoint


@dataclass
class DcpCheckpoint:
    """What a DCP output needs from an input: where each name came from and how it was stored."""

    directory: str
    metadata_path: str
    paths: dict[str, tuple[Any, ...]]  # flattened name -> path in the state dict
    items: dict[str, list[tuple[Chunk | None, Item]]]  # flattened name -> its stored items
    tensors: dict[str, DcpTensor]
    objects: dict[str, Any]
    clean_objects: set[str]  # non-tensor items that loaded without placeholders
    flat_model: bool  # model weights at the top level (torchtitan): the tree nests them under "model"
    mcore_data: dict[str, Any] = field(default_factory=dict)  # Megatron's per-name shapes, kept as they are


@dataclass
class OpenedDcp:
    tree: dict[str, Any]
    placeholders: set[str]
    info: DcpCheckpoint


def open_dcp(metadata_path: str, policy: PicklePolicy) -> OpenedDcp:
    directory = os.path.dirname(metadata_path)
    metadata = _merged_metadata(metadata_path)
    storage = _storage_index(metadata, metadata_path)
    readers: dict[str, FileReader] = {}
    safetensors: dict[str, dict[str, LazyTensor]] = {}
    tensors: dict[str, DcpTensor] = {}
    objects: dict[str, Any] = {}
    clean: set[str] = set()
    items: dict[str, list[tuple[Chunk | None, Item]]] = {}
    placeholders: set[str] = set()
    paths = _planner_paths(metadata, metadata_path)
    stored_chunks = Counter(fqn for fqn, offsets in storage if offsets is not None)
    for name, entry in metadata.state_dict_metadata.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{metadata_path}: a state dict name is not a string")
        where = f"{directory}: {name!r}"
        if isinstance(entry, _TensorStorageMetadata):
            if not isinstance(entry.chunks, list | tuple):
                raise CheckpointError(f"{where}: malformed chunk metadata")
            if len(entry.chunks) > stored_chunks[name]:  # before any work per chunk: a list can
                # repeat one chunk millions of times in a few bytes of pickle
                raise CheckpointError(
                    f"{where}: lists {len(entry.chunks)} chunks, but {stored_chunks[name]} are stored"
                )
            tensor, stored = _tensor_entry(name, entry, storage, directory, readers, safetensors, where)
            tensors[name] = tensor
            items[name] = stored
        elif isinstance(entry, _BytesStorageMetadata):
            item = _item(storage, (name, None), directory, readers, where)
            items[name] = [(None, item)]
            if paths[name][0] in _DROPPED_TOP:
                continue  # optimizer state: never needed, never unpickled
            value, found = load_object_item(item, policy, where)
            objects[name] = value
            placeholders |= found
            if not found:
                clean.add(name)
        else:
            raise CheckpointError(f"{metadata_path}: {name!r} has unknown storage metadata {type(entry).__name__}")
    for reader in readers.values():
        reader.close()  # reopened when its bytes are read: thousands of rank files need no descriptors now
    tree, flat_model = _build_tree(paths, {**tensors, **objects})
    mcore = metadata.get("mcore_data")
    info = DcpCheckpoint(directory, metadata_path, paths, items, tensors, objects, clean, flat_model)
    if isinstance(mcore, dict):
        info.mcore_data = {k: v for k, v in mcore.items() if isinstance(k, str) and _plain(v)}
    return OpenedDcp(tree, placeholders, info)


def _merged_metadata(metadata_path: str) -> _Metadata:
    """The global metadata, or every rank's `__R.metadata` merged (a save without collectives)."""
    if os.path.basename(metadata_path) == METADATA:
        return read_metadata(metadata_path)
    directory = os.path.dirname(metadata_path)
    ranks = sorted((int(m.group(1)), n) for n in os.listdir(directory) if (m := _RANK_METADATA.match(n)))
    merged = read_metadata(os.path.join(directory, ranks[0][1]))
    for _, name in ranks[1:]:
        path = os.path.join(directory, name)
        other = read_metadata(path)
        for key, entry in other.state_dict_metadata.items():
            mine = merged.state_dict_metadata.setdefault(key, entry)
            if mine is entry:
                continue
            if isinstance(mine, _TensorStorageMetadata) and isinstance(entry, _TensorStorageMetadata):
                known = {_chunk_key(c) for c in mine.chunks or []}
                mine.chunks = list(mine.chunks or []) + [c for c in entry.chunks or [] if _chunk_key(c) not in known]
            elif type(mine) is not type(entry):
                raise CheckpointError(f"{path}: {key!r} is stored as a tensor by one rank and not by another")
        for index, info in other.storage_data.items():
            if not any(_same_index(index, k) for k in _index_keys(merged.storage_data, index)):
                merged.storage_data[index] = info
        if isinstance(merged.planner_data, dict) and isinstance(other.planner_data, dict):
            for key, value in other.planner_data.items():
                merged.planner_data.setdefault(key, value)
    return merged


def _chunk_key(chunk: Any) -> Any:
    return tuple(chunk.offsets) if isinstance(chunk, _ChunkStorageMetadata) else id(chunk)


def _index_keys(storage: dict[Any, Any], index: Any) -> list[Any]:
    return [k for k in storage if isinstance(k, _MetadataIndex) and k.fqn == getattr(index, "fqn", None)]


def _same_index(a: Any, b: Any) -> bool:
    return bool(
        a.fqn == b.fqn
        and (None if a.offset is None else tuple(a.offset)) == (None if b.offset is None else tuple(b.offset))
    )


# Top-level entries whose items are not unpickled (optimizer state, dropped from every output).
_DROPPED_TOP = frozenset({"optim", "optimizer", "optimizers", "optimizer_state", "optimizer_states"})
# A param group's rate: `optimizer.param_groups.0.lr`, or per parameter as get_state_dict's
# flatten_optimizer_state_dict (torchtitan) names it, `optimizer.param_groups.layers.0.weight.lr`.
_RATE_NAME = re.compile(r"(?:.+\.)?param_groups\..+\.lr")


def optimizer_rates(info: DcpCheckpoint) -> tuple[str, list[Any]]:
    """The stored `lr` of every optimizer param group, in the order saved, and its top-level key.

    Of the optimizer's items only these are read: a small non-tensor item through the strict
    unpickler (no global allowed, whatever --trust-pickle says), or a tensor rate as it is.
    """
    top, found = "", list[Any]()
    for name, path in info.paths.items():
        if path[0] not in _DROPPED_TOP or not _RATE_NAME.fullmatch(name):
            continue
        top = str(path[0])
        if name in info.tensors:
            found.append(info.tensors[name])
            continue
        stored = info.items.get(name)
        if stored:
            value, placeholders = load_object_item(stored[0][1], PicklePolicy(), f"{info.directory}: {name!r}")
            found.append(None if placeholders else value)
    return top, found


def _storage_index(metadata: _Metadata, where: str) -> dict[tuple[str, tuple[int, ...] | None], _StorageInfo]:
    found: dict[tuple[str, tuple[int, ...] | None], _StorageInfo] = {}
    for key, info in metadata.storage_data.items():
        if not isinstance(key, _MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{where}: malformed storage_data entry")
        offset = None if key.offset is None else tuple(int(x) for x in key.offset)
        found[(str(key.fqn), offset)] = info
    return found


def _planner_paths(metadata: _Metadata, where: str) -> dict[str, tuple[Any, ...]]:
    planner = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    paths: dict[str, tuple[Any, ...]] = {}
    for name in metadata.state_dict_metadata:
        path = planner.get(name)
        if not (isinstance(path, tuple) and path and all(isinstance(p, str | int) for p in path)):
            path = (name,)
        paths[name] = path
    return paths


def _item(
    storage: dict[tuple[str, tuple[int, ...] | None], _StorageInfo],
    key: tuple[str, tuple[int, ...] | None],
    directory: str,
    readers: dict[str, FileReader],
    where: str,
) -> Item:
    info = storage.get(key)
    if info is None:
        raise CheckpointError(f"{where}: no stored item for {'this chunk' if key[1] is not None else 'it'}")
    relative, offset, length = info.relative_path, info.offset, info.length
    if not isinstance(relative, str) or os.path.basename(relative) != relative or relative in ("", ".", ".."):
        raise CheckpointError(f"{where}: stored in {relative!r}, not a file of the checkpoint directory")
    if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
        raise CheckpointError(f"{where}: malformed storage offset or length")
    transforms = list(info.transform_descriptors or ())
    if any(t != ZSTD for t in transforms) or len(transforms) > 1:
        raise CheckpointError(f"{where}: stored through transforms {transforms}; only {ZSTD!r} is supported")
    path = os.path.join(directory, relative)
    reader = readers.get(path)
    if reader is None:
        try:
            reader = readers[path] = FileReader(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    if offset + length > reader.size:
        raise CheckpointError(f"{path}: truncated: {where} needs bytes up to {offset + length}")
    return Item(path, reader, offset, length, zstd=bool(transforms))


def _tensor_entry(
    name: str,
    entry: _TensorStorageMetadata,
    storage: dict[tuple[str, tuple[int, ...] | None], _StorageInfo],
    directory: str,
    readers: dict[str, FileReader],
    safetensors: dict[str, dict[str, LazyTensor]],
    where: str,
) -> tuple[DcpTensor, list[tuple[Chunk | None, Item]]]:
    properties = entry.properties
    dtype = properties.get("dtype") if isinstance(properties, _TensorProperties) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{where}: tensor metadata without a dtype")
    shape = _ints(entry.size, where)
    chunks: list[Chunk] = []
    stored: list[tuple[Chunk | None, Item]] = []
    for meta in entry.chunks or []:
        if not isinstance(meta, _ChunkStorageMetadata):
            raise CheckpointError(f"{where}: malformed chunk metadata")
        offsets, sizes = _ints(meta.offsets, where), _ints(meta.sizes, where)
        item = _item(storage, (name, offsets), directory, readers, where)
        chunk = Chunk(offsets, sizes, item, f"{item.path}: {name!r} chunk at {list(offsets)}")
        _maybe_safetensors(chunk, name, safetensors)
        chunks.append(chunk)
        stored.append((chunk, item))
    _check_coverage(name, shape, chunks, where)
    return DcpTensor(f"{directory}\0{name}", dtype, shape, chunks), stored


def _maybe_safetensors(chunk: Chunk, name: str, cache: dict[str, dict[str, LazyTensor]]) -> None:
    """DCP's safetensors serialisation: each .distcp file is a safetensors file, one chunk per name."""
    item = chunk.item
    assert item is not None
    if item.zstd:
        return
    if item.path not in cache:
        head = item.reader.read(0, min(9, item.reader.size)).numpy().tobytes()
        if len(head) < 9 or head[8:9] != b"{":  # a safetensors file starts with its header's length, then JSON
            cache[item.path] = {}
        else:
            header = read_header(item.path)
            sharding = json.loads(header.metadata.get("DCP_SHARDING_INFO", "{}"))
            cache[item.path] = {
                f"{n}\0{tuple(sharding.get(n, {}).get('saved_offsets', []))}": t for n, t in header.tensors.items()
            }
    found = cache[item.path]
    if found:
        tensor = found.get(f"{name}\0{chunk.offsets}")
        if tensor is None:
            raise CheckpointError(f"{item.path}: no chunk of {name!r} at {list(chunk.offsets)} in this file")
        chunk.safetensors = tensor


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{where}: a size or offset is not a tuple of ints")
    return tuple(int(v) for v in value)


def _build_tree(paths: dict[str, tuple[Any, ...]], values: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    tree: dict[Any, Any] = {}
    for name, path in paths.items():
        if name not in values:
            continue
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CheckpointError(f"DCP names {name!r} and another collide")
            node = child
        node[path[-1]] = values[name]
    tree = _listify(tree)
    top_tensors = [k for k, v in tree.items() if isinstance(v, DcpTensor)]
    if top_tensors and len(top_tensors) < len(tree) and "model" not in tree:
        # torchtitan keeps the model's weights at the top level beside "optimizer" and
        # "train_state": nest them, so they are found as the model's state dict.
        model = {k: tree.pop(k) for k in top_tensors}
        return {"model": model, **tree}, True
    return tree, False


def _plain(value: Any) -> bool:
    """Plain data only: what is copied into an output's metadata must not name our stand-ins."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    node = {k: _listify(v) for k, v in node.items()}
    if node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node
