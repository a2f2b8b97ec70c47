"""Reading PyTorch checkpoint files (`torch.save` output) without running their code.

Zip files (torch >= 1.6): `data.pkl` is unpickled with tensors replaced by `LazyTensor`s
that point at their storage records; no tensor byte is read until it is averaged.
Legacy files (the pre-zip format) are read the same way by our own reader: torch's
legacy loader is never called (it writes a `.patch` file when a pickle asks it to), and
each storage becomes a `StorageRef` at its bytes' offset in the file.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import struct
import tarfile
import zipfile
from typing import IO, Any

import torch

from .dtypes import BY_STORAGE
from .errors import CheckpointError, UnsafePickleError
from .lazy import FileReader, LazyTensor, StorageRef, itemsize
from .unpickle import (
    GlobalResolver,
    PicklePolicy,
    Placeholder,
    RestrictedUnpickler,
    Unpickled,
    describe_error,
    loads_checked,
    shown,
)
from .unpickle import (
    describe_object as _describe,
)

LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_STORAGE_DTYPES = BY_STORAGE


class UnsupportedTensor:
    """A tensor kind we cannot average (quantized, sparse, nested, meta, subclass)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<unsupported {self.kind} tensor>"


class StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _rebuild_tensor_v2(
    storage: StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_: Any,
) -> LazyTensor:
    if not isinstance(storage, StorageRef):
        raise CheckpointError("tensor without a storage record")
    if not (_is_int(storage_offset) and _are_ints(size) and _are_ints(stride) and len(size) == len(stride)):
        raise CheckpointError("a tensor with a malformed size, stride or offset")
    _refuse_expansion(storage, storage.dtype, size)
    return LazyTensor(storage, storage.dtype, tuple(size), tuple(stride), storage_offset)


# A view may repeat its storage (stride 0, from `expand`), and an average writes every
# element it shows: a 4-byte storage seen as 2**40 elements would be a 4 TB output.
MAX_EXPANSION_BYTES = 1 << 30


def _refuse_expansion(storage: StorageRef, dtype: torch.dtype, size: Any) -> None:
    elements = math.prod(size) if all(d >= 0 for d in size) else 0
    if elements * itemsize(dtype) - storage.nbytes > MAX_EXPANSION_BYTES:
        raise CheckpointError(
            f"a tensor views its storage of {storage.nbytes:,} bytes as {elements:,} elements,"
            f" more than {MAX_EXPANSION_BYTES:,} bytes beyond what the file holds"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _are_ints(values: Any) -> bool:
    return isinstance(values, tuple | list) and all(_is_int(v) for v in values)


def _rebuild_tensor_v3(
    storage: StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    dtype: torch.dtype,
    *_: Any,
) -> LazyTensor:
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"a tensor whose dtype is a {type(dtype).__name__}")
    tensor = _rebuild_tensor_v2(storage, storage_offset, size, stride)
    _refuse_expansion(storage, dtype, size)
    tensor.dtype = dtype
    return tensor


def _rebuild_tensor(
    storage: StorageRef, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> LazyTensor:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple[Any, ...], state: Any) -> Any:
    # Subclass and attribute state are dropped: we average the data, not the Python type.
    return func(*args)


class TypeOnly:
    """A tensor class a pickle may name (as a tensor's Python type) but never call.

    `torch.Tensor(4096)` would build a tensor of uninitialised memory: averaged, it puts this
    process's heap bytes into the output, different on every run.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *_: Any, **__: Any) -> Any:
        raise UnsafePickleError(f"pickle calls {self.name}(...), which builds a tensor of uninitialised memory")


def _unsupported(kind: str) -> Any:
    def rebuild(*_: Any, **__: Any) -> UnsupportedTensor:
        return UnsupportedTensor(kind)

    return rebuild


def _storage_type(name: str) -> StorageType:
    return StorageType(_STORAGE_DTYPES[name])


def lazy_overrides() -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch._utils._rebuild_qtensor": _unsupported("quantized"),
        "torch._utils._rebuild_sparse_tensor": _unsupported("sparse"),
        "torch._utils._rebuild_nested_tensor": _unsupported("nested"),
        "torch._utils._rebuild_wrapper_subclass": _unsupported("subclass"),
        "torch._utils._rebuild_meta_tensor_no_storage": _unsupported("meta"),
        "torch._utils._rebuild_device_tensor_from_numpy": _unsupported("numpy-backed"),
        "torch._utils._rebuild_device_tensor_from_cpu_tensor": _unsupported("device"),
        "torch.Tensor": TypeOnly("torch.Tensor"),
        "torch.nn.parameter.Parameter": TypeOnly("torch.nn.Parameter"),
    }
    for name in _STORAGE_DTYPES:
        overrides[f"torch.{name}"] = _storage_type(name)
        overrides[f"torch.cuda.{name}"] = _storage_type(name)
    overrides["torch.storage.UntypedStorage"] = StorageType(torch.uint8)
    overrides["torch.storage.TypedStorage"] = StorageType(torch.uint8)
    for dtype in torch_dtypes():
        overrides[str(dtype)] = dtype
    return overrides


@functools.cache
def torch_dtypes() -> tuple[torch.dtype, ...]:
    """Every dtype torch names (a walk of its namespace: once, not for every pickle read)."""
    return tuple(v for v in vars(torch).values() if isinstance(v, torch.dtype))


# torch.save stores records uncompressed; a compressed one may expand this much, at most.
_MAX_EXPANDED_BYTES = 64 << 20


def _read_bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    """A small record's bytes: a compressed one must not unpack to gigabytes (a zip bomb)."""
    limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else _MAX_EXPANDED_BYTES
    with archive.open(info) as record:
        data = record.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(
            f"{path}: record '{shown(info.filename)}' unpacks to more than {limit:,} bytes from {info.compress_size:,}"
        )
    return data


class TorchZip:
    """The records of a torch zip checkpoint and where each one's bytes lie."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader = FileReader(path)
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                self._infos = {info.filename: info for info in infos}
                if len(self._infos) != len(infos):  # which of two torch.load reads is not defined
                    counts = collections.Counter(info.filename for info in infos)
                    twice = min(name for name, count in counts.items() if count > 1)
                    raise CheckpointError(f"{path}: corrupt zip checkpoint: record '{shown(twice)}' appears twice")
                pickles = [n for n in self._infos if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pickles) != 1:
                    raise CheckpointError(f"{path}: not a torch.save archive (no single data.pkl)")
                self.prefix = pickles[0][: -len("data.pkl")]
                self.pickle = _read_bounded(archive, self._infos[pickles[0]], path)
                byteorder = self._infos.get(self.prefix + "byteorder")
                self.byteorder = _read_bounded(archive, byteorder, path).decode() if byteorder else "little"
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"{path}: corrupt zip checkpoint: {exc}") from None
        if self.byteorder != "little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> StorageRef:
        name = f"{self.prefix}data/{key}"
        info = self._infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: storage record '{shown(name)}' is missing")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{self.path}: storage record '{shown(name)}' is compressed")
        nbytes = numel * itemsize(dtype)
        if nbytes > info.file_size:
            raise CheckpointError(
                f"{self.path}: storage record '{shown(name)}' holds {info.file_size} bytes, needs {nbytes}"
            )
        offset = self._data_offset(info)
        if offset + info.file_size > self.reader.size:
            raise CheckpointError(f"{self.path}: truncated: record '{shown(name)}' ends past the end of file")
        return StorageRef(self.reader, offset, nbytes, dtype, f"{self.path}\0{key}")

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        header = bytearray(LOCAL_HEADER.size)
        view = torch.frombuffer(header, dtype=torch.uint8)
        self.reader.read_into(view, info.header_offset)
        fields = LOCAL_HEADER.unpack(bytes(header))
        if fields[0] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt zip: bad local header for '{shown(info.filename)}'")
        name_length, extra_length = int(fields[-2]), int(fields[-1])
        return int(info.header_offset) + LOCAL_HEADER.size + name_length + extra_length


def load_zip(path: str, policy: PicklePolicy) -> Unpickled:
    """Unpickle a zip checkpoint's object tree with `LazyTensor` leaves."""
    archive = TorchZip(path)
    resolver = GlobalResolver(policy, lazy_overrides())
    storages: dict[str, StorageRef] = {}

    def persistent_load(pid: Any) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{path}: unknown persistent id in pickle")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(storage_type, StorageType) or not _is_int(numel) or numel < 0:
            raise CheckpointError(f"{path}: malformed storage reference in pickle")
        if type(key) is not str:  # never str() an object from a pickle: it may print for hours
            raise CheckpointError(f"{path}: a storage key in the pickle is a {type(key).__name__}, not a string")
        if key not in storages:
            storages[key] = archive.storage(key, storage_type.dtype, numel)
        return storages[key]

    tree = loads_checked(io.BytesIO(archive.pickle), resolver, path, persistent_load=persistent_load)
    _validate_tensors(tree, path)
    return Unpickled(tree, resolver.placeholders)


def _validate_tensors(tree: Any, path: str) -> None:
    stack = [tree]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, LazyTensor):
            node.validate(path)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


# torch's legacy format: five pickles (a magic number, a protocol version, system facts, the
# object tree, the list of storage keys) then, for each key in that list, its element count
# as 8 little-endian bytes and its raw bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _Window:
    """Sequential reads of an open file that never ask for more bytes than the file holds.

    A length in a pickle is the file's word: read as asked, BINBYTES8 of 2**62 would make
    Python allocate the buffer before reading it.
    """

    def __init__(self, file: IO[bytes], size: int) -> None:
        self.file = file
        self.size = size
        self.position = 0

    def seek(self, position: int) -> None:
        self.file.seek(position)
        self.position = position

    def read(self, count: int = -1) -> bytes:
        left = self.size - self.position
        data = self.file.read(left if count is None or count < 0 else min(count, left))
        self.position += len(data)
        return data

    def readline(self) -> bytes:
        line = self.file.readline(max(self.size - self.position, 0))
        self.position += len(line)
        return line


def load_legacy(path: str, policy: PicklePolicy) -> Unpickled:
    """Read a pre-zip checkpoint lazily: its tensors point at their bytes in the file."""
    _refuse_non_pickle(path)
    reader = FileReader(path)
    with open(path, "rb") as raw:
        file = _Window(raw, reader.size)
        _check_legacy_header(file, path)
        tree_start = file.position
        named = _storages_named(file, path)
        keys = _small_pickle(file, path, "the list of storage keys")
        if type(keys) is not list or not all(type(k) is str for k in keys):
            raise CheckpointError(
                f"{path}: corrupt legacy checkpoint: the list of storage keys is not a list of strings"
            )
        offsets = _storage_offsets(raw, file.position, keys, named, reader.size, path)
        file.seek(tree_start)
        resolver = GlobalResolver(policy, lazy_overrides())
        refs = _LegacyStorages(reader, offsets, path, policy)
        tree = loads_checked(file, resolver, path, persistent_load=refs.load)  # type: ignore[arg-type]
    _validate_tensors(tree, path)
    return Unpickled(tree, resolver.placeholders)


def _small_pickle(file: _Window, path: str, what: str) -> Any:
    """One of the legacy format's plain pickles: no global is imported for it."""
    resolver = GlobalResolver(PicklePolicy(), {}, placeholders_only=True)
    try:
        return RestrictedUnpickler(file, resolver).load()  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise CheckpointError(f"{path}: corrupt legacy checkpoint: cannot read {what}: {describe_error(exc)}") from None


def _check_legacy_header(file: _Window, path: str) -> None:
    if _small_pickle(file, path, "its magic number") != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (a pickle without torch's magic number)")
    if _small_pickle(file, path, "its format version") != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: legacy checkpoint of an unknown format version")
    facts = _small_pickle(file, path, "its system information")
    if type(facts) is not dict or facts.get("little_endian") is not True:
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")


def _storages_named(file: _Window, path: str) -> dict[str, tuple[torch.dtype, int]]:
    """A first pass over the object tree, building nothing: each storage key's dtype and size.

    The bytes of the storages follow the tree in the file, each sized by its element type,
    so their offsets are known only once every storage the tree names is known.
    """
    named: dict[str, tuple[torch.dtype, int]] = {}

    def note(pid: Any) -> Any:
        parsed = _parse_legacy_id(pid, path)
        if parsed is None:
            return pid[1]  # a module's class, here a placeholder: the tree goes on building with it
        key, dtype, numel, _view = parsed
        if named.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise CheckpointError(f"{path}: storage '{shown(key)}' is named with two types or sizes")

    overrides = {name: value for name, value in lazy_overrides().items() if isinstance(value, StorageType)}
    resolver = GlobalResolver(PicklePolicy(), overrides, placeholders_only=True)
    try:
        RestrictedUnpickler(file, resolver, note).load()  # type: ignore[arg-type]
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: pickle nests too deeply to read") from None
    except Exception as exc:  # noqa: BLE001 - any failure inside a hostile pickle is a bad file
        raise CheckpointError(f"{path}: cannot unpickle: {describe_error(exc)}") from None
    return named


_View = tuple[str, int, int]


def _parse_legacy_id(pid: Any, path: str) -> tuple[str, torch.dtype, int, _View | None] | None:
    """A legacy persistent id: a storage (key, dtype, element count, view), or None for a module class."""
    if type(pid) is tuple and len(pid) == 4 and pid[0] == "module":
        return None  # the class an nn.Module was saved with, and its source: never compared or written
    if not (type(pid) is tuple and len(pid) == 6 and pid[0] == "storage"):
        raise CheckpointError(f"{path}: unknown persistent id in pickle")
    storage_type, key, _location, numel, view = pid[1:]
    if not isinstance(storage_type, StorageType) or not _is_int(numel) or numel < 0:
        raise CheckpointError(f"{path}: malformed storage reference in pickle")
    if type(key) is not str:  # never str() an object from a pickle: it may print for hours
        raise CheckpointError(f"{path}: a storage key in the pickle is a {type(key).__name__}, not a string")
    if view is not None:
        if not (type(view) is tuple and len(view) == 3 and type(view[0]) is str and _are_ints(view[1:])):
            raise CheckpointError(f"{path}: malformed storage view in pickle")
        if view[1] < 0 or view[2] < 0 or view[1] + view[2] > numel:
            raise CheckpointError(f"{path}: storage view '{shown(view[0])}' lies outside its storage")
    return key, storage_type.dtype, numel, view


def _storage_offsets(
    raw: IO[bytes], start: int, keys: list[str], named: dict[str, tuple[torch.dtype, int]], size: int, path: str
) -> dict[str, int]:
    """Where each storage's bytes begin: every storage the tree names must be in the file."""
    offsets: dict[str, int] = {}
    position = start
    for key in keys:
        if key in offsets or key not in named:
            raise CheckpointError(f"{path}: corrupt legacy checkpoint: storage '{shown(key)}' is listed wrongly")
        dtype, numel = named[key]
        raw.seek(position)
        header = raw.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{path}: truncated: storage '{shown(key)}' ends past the end of file")
        count = int.from_bytes(header, "little", signed=True)
        if count != numel:
            raise CheckpointError(f"{path}: storage '{shown(key)}' holds {count} elements, its tensors say {numel}")
        offsets[key] = position + 8
        position += 8 + count * itemsize(dtype)
        if position > size:
            raise CheckpointError(f"{path}: truncated: storage '{shown(key)}' ends past the end of file")
    missing = sorted(set(named) - set(offsets))
    if missing:  # torch.load would leave its memory uninitialised: heap bytes in the output
        raise CheckpointError(f"{path}: corrupt legacy checkpoint: storage '{shown(missing[0])}' is not in the file")
    return offsets


class _LegacyStorages:
    """The persistent ids of a legacy tree: storages at their offsets, module classes as they are."""

    def __init__(self, reader: FileReader, offsets: dict[str, int], path: str, policy: PicklePolicy) -> None:
        self.reader = reader
        self.offsets = offsets
        self.path = path
        self.trust = policy.trust
        self.refs: dict[tuple[str, str | None], StorageRef] = {}

    def load(self, pid: Any) -> Any:
        parsed = _parse_legacy_id(pid, self.path)
        if parsed is None:
            return self._module_class(pid[1])
        key, dtype, numel, view = parsed
        name = view[0] if view else None
        if (key, name) not in self.refs:
            size = itemsize(dtype)
            start, count = (view[1], view[2]) if view else (0, numel)
            ident = f"{self.path}\0{key}" + (f"\0{name}" if name is not None else "")
            offset = self.offsets[key] + start * size
            self.refs[key, name] = StorageRef(self.reader, offset, count * size, dtype, ident)
        return self.refs[key, name]

    def _module_class(self, cls: Any) -> Any:
        # torch would compare the class's saved source with the installed one, and write a
        # .patch file when asked to; we only hand back the class, inert unless trusted.
        if self.trust or (isinstance(cls, type) and issubclass(cls, Placeholder)):
            return cls
        raise CheckpointError(
            f"{self.path}: a 'module' persistent id in the pickle names {_describe(cls)},"
            " not the class of a saved nn.Module"
        )


def _refuse_non_pickle(path: str) -> None:
    """A legacy file opens with a protocol-2 pickle; the oldest format, a tar, is refused.

    The tar is opened as torch opens it, without decompression: a few KB of bz2 claiming a
    64 GiB member must not be unpacked to find out what it is.
    """
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"\x80":
        return
    try:
        with tarfile.open(path, "r:"):
            is_tar = True
    except (tarfile.TarError, OSError, EOFError, ValueError):
        is_tar = False
    if is_tar:
        raise CheckpointError(
            f"{path}: a tar checkpoint, PyTorch's oldest format, is not supported;"
            " load it with torch.load and save it again, where you trust the file"
        )
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle)")
