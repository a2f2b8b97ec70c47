"""Tensors known by their place in a file, read only when and as far as they are needed.

Reads go through `os.pread` into fresh or reused buffers instead of a memory map, so the
pages of a tensor that has been consumed never stay in this process's resident set.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeGuard

import torch

from .errors import CheckpointError


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _descriptor_limit() -> int:
    """How many input files may be open at once: a quarter of the soft limit, so that any
    number of checkpoints runs under `ulimit -n 256` (the macOS default) with room to spare."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        unlimited = soft == resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):  # no `resource` module (Windows)
        soft, unlimited = 256, False
    return 1024 if unlimited or soft <= 0 else max(8, min(1024, soft // 4))


class _OpenFiles:
    """The named input files with an open descriptor, least recently used first.

    A descriptor in use by a read is pinned; only unpinned ones are closed to make room.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Weak: a reader no longer referenced closes its own descriptor (weakref.finalize).
        self.readers: OrderedDict[int, weakref.ref[FileReader]] = OrderedDict()
        self.limit = _descriptor_limit()

    def make_room(self, keep: FileReader) -> None:
        """Close least recently used descriptors until one more fits (called under `lock`)."""
        for key in list(self.readers):
            reader = self.readers[key]()
            if reader is None or reader._fd is None:
                del self.readers[key]
        for key in list(self.readers):
            if len(self.readers) < self.limit:
                return
            reader = self.readers[key]()
            if reader is not None and reader is not keep and reader._pins == 0:
                del self.readers[key]
                reader._close_descriptor()


_OPEN_FILES = _OpenFiles()


class FileReader:
    """Positional reads from one file, safe to share between threads.

    A named file's descriptor is opened on first read and may be closed again when other
    files need the room: thousands of checkpoints never exhaust the open-file limit.
    """

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self._fd: int | None = None
        self._closer: weakref.finalize[Any, FileReader] | None = None
        self._lock = threading.Lock()
        self._pins = 0
        self._named = fd is None
        if fd is not None:  # an unnamed temporary file: it is gone once closed
            self._adopt(fd)
        self.size = os.fstat(fd).st_size if fd is not None else os.path.getsize(path)

    def _adopt(self, fd: int) -> int:
        # Closed when the last tensor read from this file is gone: a training script that
        # averages in a loop must not run out of descriptors.
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        return fd

    @contextlib.contextmanager
    def _descriptor(self) -> Iterator[int]:
        """An open descriptor, pinned for the duration of the block."""
        if not self._named:
            assert self._fd is not None
            yield self._fd
            return
        with _OPEN_FILES.lock:
            if self._fd is None:
                _OPEN_FILES.make_room(self)
                self._adopt(os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
            _OPEN_FILES.readers[id(self)] = weakref.ref(self)
            _OPEN_FILES.readers.move_to_end(id(self))
            self._pins += 1
            fd = self._fd
            assert fd is not None
        try:
            yield fd
        finally:
            with _OPEN_FILES.lock:
                self._pins -= 1

    def _close_descriptor(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None
        self._fd = None

    def read_into(self, buffer: torch.Tensor, offset: int) -> None:
        """Fill a contiguous uint8 CPU tensor with the bytes at `offset`."""
        nbytes = buffer.numel()
        if offset < 0 or offset + nbytes > self.size:
            raise CheckpointError(
                f"{self.path}: truncated or corrupt: a tensor needs bytes {offset}..{offset + nbytes}"
                f" but the file has {self.size}"
            )
        if nbytes == 0:
            return
        view = buffer.numpy().data.cast("B")
        with self._descriptor() as fd:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: file ended while reading tensor data")
                done += got

    def prefetch(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading a range we will need soon (no effect if cached)."""
        if nbytes > 0 and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError), self._descriptor() as fd:
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    def read(self, offset: int, nbytes: int) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.read_into(buffer, offset)
        return buffer

    def close(self) -> None:
        with _OPEN_FILES.lock:
            _OPEN_FILES.readers.pop(id(self), None)
            self._close_descriptor()


@dataclass(frozen=True)
class StorageRef:
    """One storage record: where its bytes lie in which file, and how many elements."""

    reader: FileReader
    offset: int
    nbytes: int
    dtype: torch.dtype
    ident: str


@dataclass(eq=False)
class LazyTensor:
    """A tensor described by its storage, view geometry and dtype; no bytes read yet."""

    storage: StorageRef
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def tie_key(self) -> tuple[object, ...]:
        """Equal for two names that share one storage and one view of it."""
        return (self.storage.ident, self.dtype, self.shape, self.stride, self.storage_offset)

    def _span_elements(self) -> int:
        if self.numel == 0:
            return 0
        return 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride, strict=True))

    def validate(self, where: str) -> None:
        size = itemsize(self.dtype)
        end = (self.storage_offset + self._span_elements()) * size
        if self.storage_offset < 0 or any(s < 0 for s in self.shape) or any(s < 0 for s in self.stride):
            raise CheckpointError(f"{where}: tensor has a negative size, stride or offset")
        if self.numel and end > self.storage.nbytes:
            raise CheckpointError(
                f"{where}: tensor needs {end} bytes but its storage record holds {self.storage.nbytes}"
            )

    def read_range(self, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, start+count) of a contiguous tensor, flat, read from disk."""
        size = itemsize(self.dtype)
        nbytes = count * size
        out = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        offset = self.storage.offset + (self.storage_offset + start) * size
        self.storage.reader.read_into(out, offset)
        return out.view(self.dtype)

    def load(self) -> torch.Tensor:
        """The whole tensor in memory, with its own shape."""
        if self.is_contiguous():
            return self.read_range(0, self.numel).view(self.shape)
        span = self._span_elements()
        flat = LazyTensor(self.storage, self.dtype, (span,), (1,), self.storage_offset).read_range(0, span)
        return flat.as_strided(self.shape, self.stride).contiguous()

    @property
    def random_access(self) -> bool:
        return self.is_contiguous()

    def read_into(self, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        if self.is_contiguous():
            return self.read_range(start, count, out)
        return _copy_flat(self.load(), start, count, out)

    def prefetch(self, start: int, count: int) -> None:
        if self.is_contiguous():
            size = itemsize(self.dtype)
            self.storage.reader.prefetch(self.storage.offset + (self.storage_offset + start) * size, count * size)


class Leaf(Protocol):
    """Anything that holds a tensor's bytes: the engine, layout and writers see only this.

    A lazy tensor at a file offset, an in-memory tensor (through `MemoryLeaf`), a DCP
    tensor assembled from chunks: a new kind implements these members and nothing else in
    the engine changes.
    """

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def numel(self) -> int: ...

    @property
    def random_access(self) -> bool:
        """False where any range costs reading the whole tensor (a strided view): spill it once."""
        ...

    def tie_key(self) -> tuple[object, ...]:
        """Equal for two names that share one storage and one view of it."""
        ...

    def read_into(self, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, start+count) in row-major order into `out` (uint8, large enough);
        returns a flat view of `out` in the leaf's dtype."""
        ...

    def prefetch(self, start: int, count: int) -> None:
        """Ask for elements [start, start+count) to be read in the background (a hint)."""
        ...

    def load(self) -> torch.Tensor:
        """The whole tensor in memory, with its own shape."""
        ...


def _copy_flat(tensor: torch.Tensor, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
    typed = out[: count * itemsize(tensor.dtype)].view(tensor.dtype)
    typed.copy_(tensor.reshape(-1)[start : start + count])
    return typed


class MemoryLeaf:
    """An in-memory tensor seen as a `Leaf` (legacy files and tests hold real tensors)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def numel(self) -> int:
        return self.tensor.numel()

    @property
    def random_access(self) -> bool:
        return self.tensor.is_contiguous()

    def tie_key(self) -> tuple[object, ...]:
        t = self.tensor
        return ("mem", t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset())

    def read_into(self, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        return _copy_flat(self.tensor, start, count, out)

    def prefetch(self, start: int, count: int) -> None:
        pass

    def load(self) -> torch.Tensor:
        return self.tensor


TensorLeaf = Leaf | torch.Tensor

_LEAF_METHODS = ("read_into", "prefetch", "tie_key", "load")
_leaf_types: dict[type, bool] = {}


def is_tensor_leaf(value: object) -> TypeGuard[TensorLeaf]:
    """A tensor or a `Leaf`. Checked on the class: an allowlisted config object answers any
    attribute on its instances (omegaconf), and must not pass for a tensor."""
    kind = type(value)
    known = _leaf_types.get(kind)
    if known is None:
        known = issubclass(kind, torch.Tensor) or all(callable(getattr(kind, m, None)) for m in _LEAF_METHODS)
        _leaf_types[kind] = known
    return known


def as_leaf(value: TensorLeaf) -> Leaf:
    return MemoryLeaf(value) if isinstance(value, torch.Tensor) else value


def leaf_shape(value: TensorLeaf) -> tuple[int, ...]:
    return tuple(value.shape)


def leaf_numel(value: TensorLeaf) -> int:
    return as_leaf(value).numel


def leaf_nbytes(value: TensorLeaf) -> int:
    return leaf_numel(value) * itemsize(value.dtype)


def leaf_tie_key(value: TensorLeaf) -> tuple[object, ...]:
    return as_leaf(value).tie_key()


def read_leaf_range(value: TensorLeaf, start: int, count: int) -> torch.Tensor:
    """Elements [start, start+count) of a tensor in row-major order, as a flat CPU tensor."""
    return as_leaf(value).read_into(start, count, torch.empty(count * itemsize(value.dtype), dtype=torch.uint8))


def prefetch_leaf_range(value: TensorLeaf, start: int, count: int) -> None:
    """Start reading elements [start, start+count) of a leaf in the background."""
    leaf = as_leaf(value)
    if leaf.random_access:
        leaf.prefetch(start, count)


class SpilledTensor:
    """A strided tensor's elements in row-major order, in an unnamed temporary file.

    A transposed or expanded view can only be read whole. Kept in memory for every input
    while its chunks are averaged, it would make memory grow with the number of checkpoints;
    spilled, it is read back by range like a contiguous tensor, and only one is ever whole
    in memory at a time, whatever the number of reader threads.
    """

    _materialising = threading.Lock()

    def __init__(self, value: TensorLeaf) -> None:
        self.dtype = value.dtype
        with self._materialising:  # the whole tensor lives only inside this statement
            self.reader = unnamed_file_reader(
                "a strided tensor's copy", functools.partial(_write_flat, load_leaf(value))
            )

    def read_into(self, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        size = itemsize(self.dtype)
        self.reader.read_into(out[: count * size], start * size)
        return out[: count * size].view(self.dtype)

    def close(self) -> None:
        self.reader.close()


def _write_flat(tensor: torch.Tensor, file: IO[bytes]) -> None:
    file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def unnamed_file_reader(name: str, fill: Callable[[IO[bytes]], object]) -> FileReader:
    """A reader of an unnamed temporary file that `fill` writes: gone however the process ends."""
    with tempfile.TemporaryFile(prefix="ckpt-avg-spill-") as file:
        fill(file)
        file.flush()
        return FileReader(name, fd=os.dup(file.fileno()))


def fill_leaf_range(
    value: TensorLeaf, start: int, count: int, buffer: torch.Tensor, spilled: dict[int, SpilledTensor] | None = None
) -> torch.Tensor:
    """Elements [start, start+count) in row-major order, read into `buffer` (uint8, large enough).

    Returns a flat view of `buffer` in the leaf's dtype. A leaf with random access reads the
    range itself (a contiguous lazy tensor: one `pread` straight into the buffer); any other
    is spilled to a temporary file once (kept in `spilled` while its chunks are taken) and
    read back from there.
    """
    out = buffer[: count * itemsize(value.dtype)]
    leaf = as_leaf(value)
    if leaf.random_access:
        return leaf.read_into(start, count, out)
    spill = spilled.get(id(value)) if spilled is not None else None
    if spill is None:
        spill = SpilledTensor(value)
        if spilled is None:
            try:
                return spill.read_into(start, count, out)
            finally:
                spill.close()
        spilled[id(value)] = spill
    return spill.read_into(start, count, out)


def close_spilled(spilled: dict[int, SpilledTensor]) -> None:
    for spill in spilled.values():
        spill.close()
    spilled.clear()


def load_leaf(value: TensorLeaf) -> torch.Tensor:
    return as_leaf(value).load()
