"""Reading PyTorch checkpoint files (`torch.save` output) without running their code.

Zip files (torch >= 1.6): `data.pkl` is unpickled with tensors replaced by `LazyTensor`s
that point at their storage records; no tensor byte is read until it is averaged.
Legacy files (the pre-zip format): loaded whole by torch through our restricted
unpickler, so they are read one at a time.
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import IO, Any

import torch

from .errors import CheckpointError, UnsafePickleError
from .lazy import FileReader, LazyTensor, StorageRef, itemsize, unnamed_file_reader
from .unpickle import GlobalResolver, PicklePolicy, Unpickled, loads_checked

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
    "QInt8Storage": torch.qint8,
    "QUInt8Storage": torch.quint8,
    "QInt32Storage": torch.qint32,
}


class UnsupportedTensor:
    """A tensor kind we cannot average (quantized, sparse, nested, meta, subclass)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<unsupported {self.kind} tensor>"


class _StorageType:
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
        raise CheckpointError(
            f"a tensor with a malformed size {size!r}, stride {stride!r} or offset {storage_offset!r}"
        )
    return LazyTensor(storage, storage.dtype, tuple(size), tuple(stride), storage_offset)


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
        raise CheckpointError(f"a tensor whose dtype is {dtype!r}")
    tensor = _rebuild_tensor_v2(storage, storage_offset, size, stride)
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


def _storage_type(name: str) -> _StorageType:
    return _StorageType(_STORAGE_DTYPES[name])


def _lazy_overrides() -> dict[str, Any]:
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
    overrides["torch.storage.UntypedStorage"] = _StorageType(torch.uint8)
    overrides["torch.storage.TypedStorage"] = _StorageType(torch.uint8)
    for dtype in _dtypes():
        overrides[str(dtype)] = dtype
    return overrides


def _dtypes() -> list[torch.dtype]:
    return [v for v in vars(torch).values() if isinstance(v, torch.dtype)]


# torch.save stores records uncompressed; a compressed one may expand this much, at most.
_MAX_EXPANDED_BYTES = 64 << 20


def _read_bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    """A small record's bytes: a compressed one must not unpack to gigabytes (a zip bomb)."""
    limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else _MAX_EXPANDED_BYTES
    with archive.open(info) as record:
        data = record.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(
            f"{path}: record {info.filename!r} unpacks to more than {limit:,} bytes from {info.compress_size:,}"
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
                    twice = sorted({i.filename for i in infos if sum(j.filename == i.filename for j in infos) > 1})
                    raise CheckpointError(f"{path}: corrupt zip checkpoint: record {twice[0]!r} appears twice")
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
            raise CheckpointError(f"{self.path}: storage record {name!r} is missing")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{self.path}: storage record {name!r} is compressed")
        nbytes = numel * itemsize(dtype)
        if nbytes > info.file_size:
            raise CheckpointError(f"{self.path}: storage record {name!r} holds {info.file_size} bytes, needs {nbytes}")
        offset = self._data_offset(info)
        if offset + info.file_size > self.reader.size:
            raise CheckpointError(f"{self.path}: truncated: record {name!r} ends past the end of file")
        return StorageRef(self.reader, offset, nbytes, dtype, f"{self.path}\0{key}")

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        header = bytearray(_LOCAL_HEADER.size)
        view = torch.frombuffer(header, dtype=torch.uint8)
        self.reader.read_into(view, info.header_offset)
        fields = _LOCAL_HEADER.unpack(bytes(header))
        if fields[0] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt zip: bad local header for {info.filename!r}")
        name_length, extra_length = int(fields[-2]), int(fields[-1])
        return int(info.header_offset) + _LOCAL_HEADER.size + name_length + extra_length


def load_zip(path: str, policy: PicklePolicy) -> Unpickled:
    """Unpickle a zip checkpoint's object tree with `LazyTensor` leaves."""
    archive = TorchZip(path)
    resolver = GlobalResolver(policy, _lazy_overrides())
    storages: dict[str, StorageRef] = {}

    def persistent_load(pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{path}: unknown persistent id in pickle")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise CheckpointError(f"{path}: malformed storage reference in pickle")
        key = str(key)
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


def load_legacy(path: str, policy: PicklePolicy) -> Unpickled:
    """Load a pre-zip checkpoint whole, through torch, with our restricted unpickler."""
    import types

    _refuse_odd_tar(path)
    _refuse_non_pickle(path)

    from .unpickle import unpickler_class

    real_rebuilds = {
        name: _import_torch(name)
        for name in (
            "torch._utils._rebuild_tensor_v2",
            "torch._utils._rebuild_tensor",
            "torch._utils._rebuild_parameter",
            "torch._utils._rebuild_parameter_with_state",
        )
    }
    overrides = {**{str(d): d for d in _dtypes()}, **real_rebuilds, "torch.Size": torch.Size}
    overrides["torch._tensor._rebuild_from_type_v2"] = _rebuild_from_type_v2  # needs no real class
    overrides["torch.nn.parameter.Parameter"] = TypeOnly("torch.nn.Parameter")
    overrides["torch.Tensor"] = TypeOnly("torch.Tensor")
    resolver = GlobalResolver(policy, overrides)

    restricted = unpickler_class(resolver)
    module = types.ModuleType("ckpt_avg_restricted_pickle")
    module.Unpickler = restricted  # type: ignore[attr-defined]
    module.load = lambda file, **kw: restricted(file, **kw).load()  # type: ignore[attr-defined]
    try:
        tree = torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: pickle nests too deeply to read") from None
    except Exception as exc:  # noqa: BLE001 - any failure inside a hostile file is a bad file
        raise CheckpointError(f"{path}: cannot read legacy checkpoint: {type(exc).__name__}: {exc}") from None
    return Unpickled(_spill(tree, path), resolver.placeholders)


def _refuse_odd_tar(path: str) -> None:
    """The oldest torch format is a tar; a member that is not a regular file could block a read."""
    import tarfile

    try:
        if not tarfile.is_tarfile(path):
            return
        with tarfile.open(path) as archive:
            odd = [m.name for m in archive.getmembers() if not m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: corrupt legacy tar checkpoint: {exc}") from None
    if odd:
        raise CheckpointError(f"{path}: legacy tar checkpoint has members that are not regular files: {odd[0]!r}")


def _refuse_non_pickle(path: str) -> None:
    import tarfile

    with open(path, "rb") as f:
        head = f.read(2)
    # torch's legacy format opens with a protocol-2 pickle of its magic number.
    if head[:1] != b"\x80" and not tarfile.is_tarfile(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle)")


def _spill(tree: Any, path: str) -> Any:
    """Move a legacy file's tensors to a private temp file and leave lazy tensors in their place.

    A legacy file can only be loaded whole; spilling its storages lets the streaming kernel
    treat it like a zip checkpoint, so only one legacy file is in memory at a time.
    """
    tensors: list[torch.Tensor] = []

    def collect(tensor: torch.Tensor) -> torch.Tensor:
        tensors.append(tensor)
        return tensor

    _map_tensors(tree, collect)
    placed: dict[int, tuple[int, int]] = {}  # storage pointer -> (offset, bytes) in the temp file

    def write_storages(file: IO[bytes]) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in placed:
                placed[storage.data_ptr()] = (file.tell(), storage.nbytes())
                file.write(torch.empty(0, dtype=torch.uint8).set_(storage).numpy().data)

    reader = unnamed_file_reader(f"{path} (spilled)", write_storages)

    def lazy(tensor: torch.Tensor) -> LazyTensor:
        key = tensor.untyped_storage().data_ptr()
        offset, nbytes = placed[key]
        ref = StorageRef(reader, offset, nbytes, tensor.dtype, f"{path}\0{key}")
        return LazyTensor(ref, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), int(tensor.storage_offset()))

    return _map_tensors(tree, lazy)


def _map_tensors(node: Any, function: Any) -> Any:
    """The tree with every tensor replaced by function(tensor); dicts are updated in place."""
    if isinstance(node, torch.Tensor):
        return function(node)
    if isinstance(node, dict):
        for key, value in list(node.items()):
            node[key] = _map_tensors(value, function)
        return node
    if isinstance(node, list):
        return [_map_tensors(v, function) for v in node]
    if isinstance(node, tuple):
        return tuple(_map_tensors(v, function) for v in node)
    return node


def _import_torch(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    import importlib

    return getattr(importlib.import_module(module), name)
