"""Writers: streaming safetensors (single or sharded) and structure-keeping `.pt` files.

Every output is written to a temporary name beside it, flushed, fsynced and renamed, so
OUTPUT is either absent or complete. Tensors arrive chunk by chunk from the kernel and go
straight to their place in the file; the model is never held whole in memory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import math
import mmap
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch

from .average import Unit
from .discover import TEMP_PREFIX
from .errors import OutputError
from .guard import replace_refusal
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


@functools.cache
def process_namespace() -> str:
    """Where a process id means this process: the host, its PID namespace and its boot.

    Containers that share a host name and a volume each number their processes from 1: a pid
    that is dead here may be a live run in the next container, so a pid decides only within
    the same namespace."""
    parts = [socket.gethostname()]
    for path, read in (("/proc/self/ns/pid", os.readlink), ("/proc/sys/kernel/random/boot_id", _read_text)):
        try:
            parts.append(read(path).strip())
        except OSError:
            parts.append("")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _owner_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "namespace": process_namespace()}


def _owner_is_dead(record: dict[str, Any] | None) -> bool:
    """True only when the record's process is provably gone: same namespace, no such pid."""
    if record is None or record.get("namespace") != process_namespace():
        return False
    pid = record.get("pid")
    return isinstance(pid, int) and not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The first thing ckpt-avg writes into a temp directory, removed just before the directory
# becomes OUTPUT: the proof that a directory with a temp-like name is ours to delete.
TEMP_MARKER = ".ckpt-avg-temp"
# NAME-PID-TAGRANDOM: TAG is the first 8 hex digits of `process_namespace()` (an older
# version wrote RANDOM alone, 8 digits: there the pid decides by itself).
_STALE_NAME = re.compile(r"([0-9]+)-([0-9a-f]{8})?[0-9a-f]{8}(-old)?", re.ASCII)


def mark_temp_directory(temp: str) -> None:
    """The proof, which also names its owner: a later run can tell a dead owner's directory
    from a live one's even before (or after) a distributed run's owner file exists."""
    with open(os.path.join(temp, TEMP_MARKER), "x", encoding="utf-8") as f:
        f.write(json.dumps({"what": "a ckpt-avg temp directory: removed when its run ends", **_owner_record()}))


def _is_marker(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_record(path: str) -> dict[str, Any] | None:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        with open(path, encoding="utf-8") as f:
            record = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def unmark_temp_directory(temp: str) -> None:
    """Remove the proof just before the rename: OUTPUT holds only what ckpt-avg writes there."""
    os.remove(os.path.join(temp, TEMP_MARKER))


def remove_stale_temps(final_path: str) -> None:
    """Delete what a killed run left beside OUTPUT (its process is gone), only where it is provably ours.

    A regular file with a temp name goes; a link named `...-old` goes as a link (never what
    it points to); a directory goes only when it carries TEMP_MARKER, or is a replaced
    earlier output (`...-old`) whose every entry ckpt-avg writes, and only when all it holds
    is regular files: nothing is ever removed recursively. Anything else is left alone.
    """
    remove_stale_staging(final_path)  # a distributed run's staging: judged by its owner file
    directory = os.path.dirname(final_path.rstrip("/")) or "."
    prefix = f"{TEMP_PREFIX}{os.path.basename(final_path.rstrip('/'))}-"
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _STALE_NAME.fullmatch(name[len(prefix) :]) if name.startswith(prefix) else None
        if match is None or match.group(2) not in (None, process_namespace()[:8]):
            continue  # not ours, or a pid of another PID namespace (a container on the same volume)
        if not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                _remove_stale(os.path.join(directory, name), old=match.group(3) is not None)


def _remove_stale(path: str, *, old: bool) -> None:
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        if old:  # OUTPUT was a link, renamed aside by `commit`
            os.remove(path)
    elif stat.S_ISREG(mode):
        if not old:
            os.remove(path)
    elif stat.S_ISDIR(mode):
        if old:
            ours = replace_refusal(path) == ""
        else:  # its pid in the name may be another namespace's: the marker says whose it is
            marker = os.path.join(path, TEMP_MARKER)
            record = _read_record(marker)  # None from an older version's marker: the name's pid decides
            ours = _is_marker(marker) and (record is None or _owner_is_dead(record))
        if ours:
            _remove_flat_directory(path)


def _remove_flat_directory(path: str) -> None:
    """Remove a directory of regular files; one holding anything else is left as it is."""
    entries = [os.path.join(path, n) for n in os.listdir(path)]
    if all(stat.S_ISREG(os.lstat(e).st_mode) for e in entries):
        for entry in sorted(entries, key=lambda e: os.path.basename(e) == TEMP_MARKER):  # the proof goes last
            os.remove(entry)
        os.rmdir(path)


# ---------------------------------------------------------------- shared staging

STAGING_INFIX = ".partial-"
OWNER_FILE = ".ckpt-avg-run.json"
HEARTBEAT_SECONDS = 30.0
# A staging directory whose owner has not beaten for this long belongs to no live run. Its
# host may be another machine, so a local process id alone never decides.
STALE_AFTER_SECONDS = 600.0


def staging_path_for(final_path: str, run_id: str) -> str:
    """`OUT.partial-<run id>`, hidden beside OUT so that discovery and other runs pass it by."""
    directory = os.path.dirname(final_path.rstrip("/")) or "."
    name = os.path.basename(final_path.rstrip("/"))
    return os.path.join(directory, f"{TEMP_PREFIX}{name}{STAGING_INFIX}{run_id}")


def write_owner(staging: str, run_id: str, nonce: str) -> None:
    """Claim a staging directory: who owns it, and a nonce every rank must read back."""
    record = {"run_id": run_id, "nonce": nonce, **_owner_record()}
    path = os.path.join(staging, OWNER_FILE)
    with open_temp(path) as file:
        file.write(json.dumps(record, sort_keys=True).encode())
        os.fsync(file.fileno())
    _fsync_directory(staging)


def read_owner(staging: str) -> dict[str, Any] | None:
    return _read_record(os.path.join(staging, OWNER_FILE))


def heartbeat(staging: str) -> None:
    """Tell later runs that the owner is alive (the owner file's modification time)."""
    with contextlib.suppress(OSError):
        os.utime(os.path.join(staging, OWNER_FILE))


def staging_is_stale(staging: str, now: float | None = None) -> bool:
    """True when no live run owns `staging`: its owner died in this host's PID namespace, or
    stopped beating. Before its owner file is written (and after rank 0 removes it to
    publish), the marker names the owner."""
    now = time.time() if now is None else now
    record = read_owner(staging)
    try:
        beaten = os.stat(os.path.join(staging, OWNER_FILE) if record else staging).st_mtime
    except OSError:
        return False  # gone already, or unreadable: leave it
    if _owner_is_dead(record if record is not None else _read_record(os.path.join(staging, TEMP_MARKER))):
        return True
    return now - beaten > STALE_AFTER_SECONDS


def remove_stale_staging(final_path: str) -> list[str]:
    """Remove the staging directories of OUT that no live run owns; returns what was removed."""
    directory = os.path.dirname(final_path.rstrip("/")) or "."
    prefix = f"{TEMP_PREFIX}{os.path.basename(final_path.rstrip('/'))}{STAGING_INFIX}"
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            if not name.startswith(prefix) or not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except OSError:  # gone since the listing: another run removed it
            continue
        if _is_marker(os.path.join(path, TEMP_MARKER)) and staging_is_stale(path):  # provably ours, and dead
            with contextlib.suppress(OSError):
                _remove_flat_directory(path)  # never recursively: a subdirectory or a link keeps it all
            if not os.path.lexists(path):
                removed.append(path)
    return removed


def temp_path_for(final_path: str) -> str:
    directory = os.path.dirname(final_path.rstrip("/")) or "."
    name = os.path.basename(final_path.rstrip("/"))
    tag = process_namespace()[:8]
    return os.path.join(directory, f"{TEMP_PREFIX}{name}-{os.getpid()}-{tag}{secrets.token_hex(4)}")


def fsync_path(path: str) -> None:
    """fsync a file or directory by name (a directory's entries, a copied file's data)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# The outputs this process has published: an interrupt that lands after the rename must not
# say that nothing was written.
PUBLISHED: list[str] = []


def commit(temp: str, final: str, *, force: bool) -> None:
    """Move a finished temp file or directory to OUTPUT."""
    final = final.rstrip("/") or final
    directory = os.path.dirname(final) or "."
    with signals_deferred():
        _rename_into_place(temp, final, force=force)
        PUBLISHED.append(final)
    _fsync_directory(directory)


def _rename_into_place(temp: str, final: str, *, force: bool) -> None:
    if not os.path.isdir(temp):
        if not force and os.path.lexists(final):
            raise OutputError(f"{final}: already exists (use --force to overwrite)")
        os.replace(temp, final)
        return
    if not os.path.lexists(final):
        os.rename(temp, final)
        return
    if not force:
        raise OutputError(f"{final}: already exists (use --force to overwrite)")
    refusal = replace_refusal(final)  # again: the user may have added a file since the start
    if refusal:
        raise OutputError(f"{final}: {refusal}")
    old = temp_path_for(final) + "-old"
    os.rename(final, old)
    try:
        os.rename(temp, final)
    except OSError:
        os.rename(old, final)  # put the previous output back: nothing is lost
        raise
    _remove_replaced(old)


def _remove_replaced(old: str) -> None:
    """Delete what OUTPUT was before: a link as a link (never what it points to), a directory whole."""
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)  # a partial removal still leaves the new OUTPUT whole
    else:
        os.remove(old)


def discard(temp: str) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(temp) if os.path.isdir(temp) else os.remove(temp)


def open_temp(path: str, *, hashed: bool = False) -> OutputFile:
    """A new file at `path`; with `hashed`, its sha256 is taken as it is written (`finish_file` returns it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        directory = os.path.dirname(path) or "."
        raise OutputError(f"{_output_named(path)}: cannot write the output in {directory}: {exc.strerror}") from None
    return OutputFile(path, fd, FileDigest() if hashed else None)


def _output_named(temp: str) -> str:
    """The OUTPUT a temp file stands for (`.ckpt-avg-tmp-NAME-PID-RANDOM` beside it), for messages."""
    directory, name = os.path.split(temp)
    if not name.startswith(TEMP_PREFIX):
        return temp
    return os.path.join(directory, name[len(TEMP_PREFIX) :].rsplit("-", 2)[0])


def finish_file(file: OutputFile) -> str | None:
    """Fsync and close; the file's sha256 where it was opened `hashed`."""
    os.fsync(file.fileno())
    digest = file.digest.finish(file.fileno()) if file.digest is not None else None
    file.close()
    return digest


class FileDigest:
    """The sha256 of a file taken from the bytes as they are written, for `--json`.

    Bytes written where the hashed part ends are hashed at once. Bytes written further on
    (a tied tensor's second copy, tensors placed before their turn) are read back from the
    file when the hashed part reaches them. A rewrite of bytes already hashed (a header
    that carries the output's digest, a zip record header patched with its CRC) makes the
    whole file be read back at the end: sha256 cannot be resumed from the middle.
    """

    _READ_BYTES = 16 << 20

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.done = 0
        self.ahead: dict[int, int] = {}  # offset -> length of bytes written beyond `done`
        self.rewritten = False
        self.read_back = 0  # bytes hashed from the file rather than as written

    def wrote(self, fd: int, view: memoryview, offset: int) -> None:
        if self.rewritten or not len(view):
            return
        if offset < self.done:
            self.rewritten = True
        elif offset > self.done:
            self.ahead[offset] = max(len(view), self.ahead.get(offset, 0))
        else:
            self.hasher.update(view)
            self.done += len(view)
            self._catch_up(fd, None)

    def _catch_up(self, fd: int, end: int | None) -> None:
        """Read back and hash what lies after `done`: the extents written ahead, or up to `end`."""
        while True:
            length = self.ahead.pop(self.done, None)
            if length is None:
                if end is None or self.done >= end:
                    return
                length = end - self.done
            stop = self.done + length
            while self.done < stop:
                block = os.pread(fd, min(self._READ_BYTES, stop - self.done), self.done)
                if not block:
                    raise OSError(errno.EIO, "the output file ended while hashing it")
                self.hasher.update(block)
                self.done += len(block)
                self.read_back += len(block)

    def finish(self, fd: int) -> str:
        if self.rewritten:
            self.hasher, self.done, self.ahead = hashlib.sha256(), 0, {}
        self._catch_up(fd, os.fstat(fd).st_size)
        return self.hasher.hexdigest()


# ---------------------------------------------------------------- output files

_DIRECT_ALIGNMENT = 4096  # offsets, lengths and addresses of O_DIRECT writes (any sector size up to 4 KiB)
_DIRECT_MIN_BYTES = 1 << 20  # smaller writes are not worth a bounce copy and a synchronous disk write
_BOUNCE_BYTES = 8 << 20
_WRITEBACK_EVERY = 64 << 20
_sync_file_range: Any = None


class OutputFile:
    """A new output file, written at explicit offsets (and sequentially, for `zipfile`).

    Large writes go to the disk directly (O_DIRECT), through an aligned bounce buffer: on a
    small machine, copying a gigabyte into the page cache costs as much CPU as averaging
    it, and the data must reach the disk before the rename anyway. Small writes, the
    unaligned edges of large ones, and file systems without O_DIRECT use the page cache,
    with writeback started as they go so the final fsync has little left to do.
    """

    def __init__(self, path: str, fd: int, digest: FileDigest | None = None) -> None:
        self.path = path
        self.fd = fd
        self.digest = digest
        self.position = 0
        self._direct_fd = _open_direct(path, fd)
        self._bounce: mmap.mmap | None = None
        self._dirty = 0
        self.direct_bytes = 0  # how much bypassed the page cache

    def fileno(self) -> int:
        return self.fd

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        self._write(view, offset)
        if self.digest is not None:
            self.digest.wrote(self.fd, view, offset)

    def _write(self, view: memoryview, offset: int) -> None:
        if self._direct_fd is None or len(view) < _DIRECT_MIN_BYTES:
            self._buffered(view, offset)
            return
        head = -offset % _DIRECT_ALIGNMENT
        body = (len(view) - head) // _DIRECT_ALIGNMENT * _DIRECT_ALIGNMENT
        self._buffered(view[:head], offset)
        done = self._direct(view[head : head + body], offset + head)
        self._buffered(view[head + done :], offset + head + done)

    # The file-object methods `zipfile` uses.
    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        self.pwrite(view, self.position)
        self.position += len(view)
        return len(view)

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise OSError(f"{self.path}: only absolute seeks")
        self.position = position
        return position

    def flush(self) -> None:
        pass  # nothing is buffered here; `finish_file` fsyncs

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
        for fd in (self._direct_fd, self.fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._direct_fd = None
        self.fd = -1

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _buffered(self, view: memoryview, offset: int) -> None:
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], offset + written)
        self._dirty += written
        if self._dirty >= _WRITEBACK_EVERY:
            self._dirty = 0
            _start_writeback(self.fd)

    def _direct(self, view: memoryview, offset: int) -> int:
        """Write whole aligned blocks directly; returns how many bytes went (the rest is the caller's)."""
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, _BOUNCE_BYTES)  # page-aligned, reused
        done = 0
        while done < len(view) and self._direct_fd is not None:
            count = min(_BOUNCE_BYTES, len(view) - done)
            self._bounce[:count] = view[done : done + count]
            try:
                with memoryview(self._bounce) as bounce:
                    written = os.pwrite(self._direct_fd, bounce[:count], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                written = 0  # this file system refuses direct writes after all: use the page cache
            if written % _DIRECT_ALIGNMENT or written == 0:
                os.close(self._direct_fd)
                self._direct_fd = None
            done += written
        self.direct_bytes += done
        return done


def _open_direct(path: str, fd: int) -> int | None:
    """A second descriptor of the same new file for O_DIRECT writes, where the system has them."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        direct_fd = os.open(path, os.O_WRONLY | direct | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # tmpfs and some others refuse O_DIRECT
    if os.path.samestat(os.fstat(direct_fd), os.fstat(fd)):
        return direct_fd
    os.close(direct_fd)
    return None


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


# ---------------------------------------------------------------- safetensors


class SafetensorsWriter:
    """Streams tensors into one safetensors file whose header is fixed before any averaging."""

    def __init__(
        self, file: OutputFile, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        self.file = file
        header, placed = layout(entries, metadata)
        self.placement: dict[str, HeaderEntry] = {e.name: e for e in placed}
        self.data_start = len(header)
        self.total = self.data_start + (placed[-1].end if placed else 0)
        file.pwrite(header, 0)
        file.truncate(self.total)

    @staticmethod
    def header_bytes(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
        return layout(entries, metadata)[0]

    def write_at(self, name: str, start_element: int, data: torch.Tensor) -> None:
        entry = self.placement[name]
        offset = self.data_start + entry.begin + start_element * itemsize(entry.dtype)
        self.file.pwrite(data.contiguous().view(torch.uint8).numpy().data, offset)


class SafetensorsSink:
    """Routes each averaged chunk to every name (and shard) that stores it."""

    def __init__(self, writers: Mapping[str, SafetensorsWriter]) -> None:
        self.writers = writers  # name -> the writer of the file that holds it

    def write(self, unit: Unit, start: int, data: torch.Tensor) -> None:
        for name in unit.names:
            writer = self.writers.get(name)
            if writer is not None:
                writer.write_at(name, start, data)


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


class _Pickler(pickle._Pickler):
    """torch.save's pickle, with sets in a fixed order so that re-runs are byte-identical.

    The pure-Python pickler: the C one writes an exact set in hash order and offers no hook
    for it (PYTHONHASHSEED changes the order of strings between runs).
    """

    def __init__(self, file: IO[bytes], protocol: int) -> None:
        super().__init__(file, protocol=protocol)
        self._keys: dict[int, bytes] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, OutStorage):
            storage_type = getattr(torch, _STORAGE_NAMES[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, set | frozenset):
            return NotImplemented
        # What the C pickler writes for a set at protocol 2, with the items sorted.
        items = sorted(obj, key=self._order_key)
        return (type(obj), (items,), getattr(obj, "__dict__", None) or None)

    def _order_key(self, item: Any) -> bytes:
        """A digest of the item's value: total, fixed, and never its repr or str, which an
        object from a pickle decides. Memoised by id, so a graph of shared tuples costs
        once per distinct tuple."""
        known = self._keys.get(id(item))
        if known is not None:
            return known
        digest = hashlib.blake2b(_value_bytes(item, self._order_key), digest_size=16).digest()
        self._keys[id(item)] = digest
        return digest


def _value_bytes(item: Any, key: Callable[[Any], bytes]) -> bytes:
    if item is None or type(item) is bool:
        return f"{type(item).__name__}:{item is True}".encode()
    if type(item) is int:
        return b"int:" + item.to_bytes((item.bit_length() + 8) // 8, "little", signed=True)
    if type(item) is float:
        return b"float:" + item.hex().encode()
    if type(item) is complex:
        return b"complex:" + item.real.hex().encode() + b"," + item.imag.hex().encode()
    if type(item) is str:
        return b"str:" + item.encode("utf-8", "surrogatepass")
    if type(item) is bytes:
        return b"bytes:" + item
    if type(item) is tuple:
        return b"tuple:" + b"".join(key(v) for v in item)
    if type(item) is frozenset:
        return b"frozenset:" + b"".join(sorted(key(v) for v in item))
    raise pickle.PicklingError(f"a set holding a {type(item).__name__} cannot be written in a fixed order")


def pickle_tree(tree: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(tree)
    return buffer.getvalue()


class PtWriter:
    """Writes a torch zip archive that `torch.load` reads, one storage record at a time."""

    def __init__(self, file: OutputFile, archive_name: str) -> None:
        self.file = file
        self.prefix = archive_name
        self.zip = zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._open: IO[bytes] | None = None
        self._open_key: str | None = None

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
        self._open.write(data.contiguous().view(torch.uint8).numpy().data)

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


def make_staging(path: str, output: str) -> None:
    """Create the directory the files are written into before they are published, marked as ours."""
    try:
        with signals_deferred():  # a Ctrl-C here must not leave an untracked temp directory
            os.mkdir(path)
    except OSError as exc:
        raise OutputError(f"{output}: cannot write the output here: {exc.strerror}") from None
    except BaseException:
        discard(path)
        raise
    try:
        mark_temp_directory(path)
    except BaseException:
        discard(path)
        raise
