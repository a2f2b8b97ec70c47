"""Writers: streaming safetensors (single or sharded) and structure-keeping `.pt` files.

Every output is written to a temporary name beside it, flushed, fsynced and renamed, so
OUTPUT is either absent or complete. Tensors arrive chunk by chunk from the kernel and go
straight to their place in the file; the model is never held whole in memory.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import secrets
import shutil
import signal
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch

from .average import Unit
from .discover import TEMP_PREFIX
from .errors import OutputError
from .lazy import TensorLeaf, itemsize, load_leaf
from .safetensors_file import HeaderEntry, layout

_ALIGNMENT = 64
_STORAGE_NAMES = {
    torch.float64: "DoubleStorage",
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.int16: "ShortStorage",
    torch.int8: "CharStorage",
    torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
    torch.complex64: "ComplexFloatStorage",
    torch.complex128: "ComplexDoubleStorage",
}


# ---------------------------------------------------------------- atomic files


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final_path: str) -> None:
    """Delete temp files a killed run left beside OUTPUT (their process is gone)."""
    directory = os.path.dirname(final_path.rstrip("/")) or "."
    prefix = f"{TEMP_PREFIX}{os.path.basename(final_path.rstrip('/'))}-"
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def temp_path_for(final_path: str) -> str:
    directory = os.path.dirname(final_path.rstrip("/")) or "."
    name = os.path.basename(final_path.rstrip("/"))
    return os.path.join(directory, f"{TEMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Keep SIGINT/SIGTERM from landing between the rename and its bookkeeping."""
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def commit(temp: str, final: str, *, force: bool) -> None:
    """Move a finished temp file or directory to OUTPUT."""
    final = final.rstrip("/") or final
    directory = os.path.dirname(final) or "."
    with signals_deferred():
        if os.path.isdir(temp):
            if os.path.lexists(final):
                if not force:
                    raise OutputError(f"{final}: already exists (use --force to overwrite)")
                old = temp_path_for(final) + "-old"
                os.rename(final, old)
                try:
                    os.rename(temp, final)
                except OSError:
                    os.rename(old, final)  # put the previous output back: nothing is lost
                    raise
                shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
            else:
                os.rename(temp, final)
        else:
            if not force and os.path.lexists(final):
                raise OutputError(f"{final}: already exists (use --force to overwrite)")
            os.replace(temp, final)
    _fsync_directory(directory)


def discard(temp: str) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(temp) if os.path.isdir(temp) else os.remove(temp)


def open_temp(path: str) -> IO[bytes]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise OutputError(f"{os.path.dirname(path) or '.'}: cannot write the output here: {exc.strerror}") from None
    return os.fdopen(fd, "w+b")


def finish_file(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()


# ---------------------------------------------------------------- writeback

_WRITEBACK_EVERY = 64 << 20
_sync_file_range: Any = None


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages now (Linux), without waiting.

    The final fsync then has little left to do, and the disk works while we compute.
    """
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            function = ctypes.CDLL(None, use_errno=True).sync_file_range
            function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _sync_file_range = function
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE; a failure only loses the head start


class _Writeback:
    """Starts writeback after every `_WRITEBACK_EVERY` bytes written to a file."""

    def __init__(self, file: IO[bytes]) -> None:
        try:
            self.fd: int | None = file.fileno()
        except (OSError, ValueError, AttributeError):  # an in-memory file: nothing to write back
            self.fd = None
        self.pending = 0

    def wrote(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= _WRITEBACK_EVERY and self.fd is not None:
            self.pending = 0
            _start_writeback(self.fd)


# ---------------------------------------------------------------- safetensors


class SafetensorsWriter:
    """Streams tensors into one safetensors file whose header is fixed before any averaging."""

    def __init__(
        self, file: IO[bytes], entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        self.file = file
        header, placed = layout(entries, metadata)
        self.placement: dict[str, HeaderEntry] = {e.name: e for e in placed}
        self.data_start = len(header)
        self.total = self.data_start + (placed[-1].end if placed else 0)
        file.write(header)
        file.flush()
        file.truncate(self.total)
        self._writeback = _Writeback(file)

    @staticmethod
    def header_bytes(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
        return layout(entries, metadata)[0]

    def write_at(self, name: str, start_element: int, data: torch.Tensor) -> None:
        entry = self.placement[name]
        offset = self.data_start + entry.begin + start_element * itemsize(entry.dtype)
        view = data.contiguous().view(torch.uint8).numpy().data
        written = 0
        while written < len(view):
            written += os.pwrite(self.file.fileno(), view[written:], offset + written)
        self._writeback.wrote(written)


class SafetensorsSink:
    """Routes each averaged chunk to every name (and shard) that stores it."""

    def __init__(self, writers: Mapping[str, SafetensorsWriter]) -> None:
        self.writers = writers  # name -> the writer of the file that holds it

    def write(self, unit: Unit, start: int, data: torch.Tensor) -> None:
        for name in unit.names:
            writer = self.writers.get(name)
            if writer is not None:
                writer.write_at(name, start, data)


def parse_size(text: str) -> int:
    """`5GB` = 5*10^9 bytes, `5GiB` = 5*2^30, a bare number is bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MiB or 1000000")
    return int(value * units[unit])


def plan_shards(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_bytes: int | None) -> list[list[str]]:
    """Group tensors into shards in name order, as `save_pretrained` does."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(entries):
        dtype, shape = entries[name]
        nbytes = math.prod(shape) * itemsize(dtype)
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# ---------------------------------------------------------------- .pt files


@dataclass(eq=False)
class OutStorage:
    key: str
    dtype: torch.dtype
    numel: int


class OutTensor:
    """Pickles as a tensor whose bytes the writer streams into a storage record later."""

    def __init__(self, storage: OutStorage, shape: tuple[int, ...]) -> None:
        self.storage = storage
        self.shape = shape

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        stride = []
        running = 1
        for size in reversed(self.shape):
            stride.append(running)
            running *= size
        args: tuple[Any, ...] = (self.storage, 0, torch.Size(self.shape), tuple(reversed(stride)), False, OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, OutStorage):
            storage_type = getattr(torch, _STORAGE_NAMES[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


def pickle_tree(tree: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(tree)
    return buffer.getvalue()


class PtWriter:
    """Writes a torch zip archive that `torch.load` reads, one storage record at a time."""

    def __init__(self, file: IO[bytes], archive_name: str) -> None:
        self.file = file
        self.prefix = archive_name
        self.zip = zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._open: IO[bytes] | None = None
        self._open_key: str | None = None
        self._writeback = _Writeback(file)

    def _info(self, name: str, size: int) -> tuple[zipfile.ZipInfo, bool]:
        info = zipfile.ZipInfo(f"{self.prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
        header = 30 + len(info.filename.encode()) + (20 if zip64 else 0) + 4
        start = self.file.tell()
        padding = (-(start + header)) % _ALIGNMENT
        info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
        return info, zip64

    def record(self, name: str, data: bytes) -> None:
        self.end_storage()
        info, zip64 = self._info(name, len(data))
        with self.zip.open(info, "w", force_zip64=zip64) as handle:
            handle.write(data)

    def begin_storage(self, key: str, nbytes: int) -> None:
        self.end_storage()
        info, zip64 = self._info(f"data/{key}", nbytes)
        self._open = self.zip.open(info, "w", force_zip64=zip64)
        self._open_key = key

    def write(self, key: str, data: torch.Tensor) -> None:
        if self._open_key != key or self._open is None:
            raise AssertionError(f"storage {key} written out of order")
        view = data.contiguous().view(torch.uint8).numpy().data
        self._open.write(view)
        self._writeback.wrote(len(view))

    def end_storage(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None
            self._open_key = None

    def close(self) -> None:
        self.end_storage()
        self.zip.close()

    def abandon(self) -> None:
        """Forget a half-written archive, so that closing it later writes nothing."""
        self._open = None
        self.zip.fp = None


class PtSink:
    """Streams averaged units into storage records, in the order the kernel produces them."""

    def __init__(self, writer: PtWriter, storages: Mapping[int, OutStorage]) -> None:
        self.writer = writer
        self.storages = storages  # id(unit) -> its storage
        self._current: int | None = None

    def write(self, unit: Unit, start: int, data: torch.Tensor) -> None:
        storage = self.storages[id(unit)]
        if self._current != id(unit):
            self.writer.begin_storage(storage.key, storage.numel * itemsize(storage.dtype))
            self._current = id(unit)
        self.writer.write(storage.key, data)


def copy_leaf(writer: PtWriter, storage: OutStorage, leaf: TensorLeaf) -> None:
    tensor = load_leaf(leaf).contiguous()
    writer.begin_storage(storage.key, tensor.numel() * tensor.element_size())
    writer.write(storage.key, tensor.reshape(-1))
