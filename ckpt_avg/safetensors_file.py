"""The safetensors format: a validated header reader and the header layout for writing.

We parse the header ourselves so that a header that lies (offsets past the end,
overlapping ranges, absurd lengths, unknown dtypes) is caught before any read, and so that
tensor bytes are read with `pread` rather than through a long-lived memory map.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .dtypes import BY_SAFETENSORS, SAFETENSORS_NAME
from .errors import CheckpointError
from .lazy import FileReader, LazyTensor, StorageRef, itemsize

MAX_HEADER_BYTES = 100_000_000

DTYPE_NAMES = BY_SAFETENSORS  # the header's dtype names
NAME_OF_DTYPE = SAFETENSORS_NAME
# The order the safetensors library lays tensors out in: larger alignment first.
_DTYPE_RANK = {
    "BOOL": 0,
    "U8": 1,
    "I8": 2,
    "F8_E5M2": 3,
    "F8_E4M3": 4,
    "I16": 5,
    "U16": 6,
    "F16": 7,
    "BF16": 8,
    "I32": 9,
    "U32": 10,
    "F32": 11,
    "C64": 12,
    "F64": 13,
    "I64": 14,
    "U64": 15,
}


@dataclass(frozen=True)
class SafetensorsFile:
    path: str
    tensors: dict[str, LazyTensor]
    metadata: dict[str, str]


def read_header(path: str) -> SafetensorsFile:
    """Parse and check a safetensors header; tensors come back lazy."""
    reader, header, metadata, length = _parse(path)
    data_start = 8 + length
    data_size = reader.size - data_start
    tensors: dict[str, LazyTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        tensor = _entry_tensor(path, reader, name, entry, data_start, data_size)
        tensors[name] = tensor
        spans.append((tensor.storage.offset, tensor.storage.offset + tensor.storage.nbytes, name))
    _check_no_overlap(path, spans)
    return SafetensorsFile(path, tensors, metadata)


def read_metadata(path: str) -> dict[str, str]:
    """Only a safetensors file's `__metadata__` (its tensors' entries are not checked): enough to
    tell an earlier output of ours, without building a lazy tensor per entry of a large header."""
    reader, _, metadata, _ = _parse(path)
    reader.close()
    return metadata


def _parse(path: str) -> tuple[FileReader, dict[str, Any], dict[str, str], int]:
    """The header's JSON (tensor entries, unchecked), its checked `__metadata__`, and its length."""
    reader = FileReader(path)
    if reader.size < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {reader.size} bytes)")
    (length,) = struct.unpack("<Q", bytes(reader.read(0, 8).numpy()))
    if length > MAX_HEADER_BYTES or 8 + length > reader.size:
        raise CheckpointError(f"{path}: corrupt safetensors header (claims {length} bytes)")
    raw = bytes(reader.read(8, length).numpy())
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, a duplicate key, a huge integer
        raise CheckpointError(f"{path}: corrupt safetensors header: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map to strings")
    return reader, header, dict(metadata), length


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: safetensors refuses a tensor named twice, and so do we."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"{key!r} appears twice")
        seen.add(key)
    return dict(pairs)


def _entry_tensor(path: str, reader: FileReader, name: str, entry: Any, data_start: int, data_size: int) -> LazyTensor:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    name_of_dtype = entry.get("dtype")
    dtype = DTYPE_NAMES.get(name_of_dtype) if isinstance(name_of_dtype, str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {entry.get('dtype')!r}")
    shape: list[int] = entry.get("shape")  # type: ignore[assignment]
    offsets: list[int] = entry.get("data_offsets")  # type: ignore[assignment]
    if not _is_int_list(shape) or not _is_int_list(offsets) or len(offsets) != 2:
        raise CheckpointError(f"{where}: shape and data_offsets must be lists of non-negative integers")
    begin, end = offsets
    nbytes = math.prod(shape) * itemsize(dtype)
    if end < begin or end - begin != nbytes:
        raise CheckpointError(f"{where}: data_offsets {offsets} do not fit shape {shape} of {entry['dtype']}")
    if end > data_size:
        raise CheckpointError(f"{where}: data ends at byte {end}, past the end of the file (truncated?)")
    storage = StorageRef(reader, data_start + begin, nbytes, dtype, f"{path}\0{name}")
    strides = _contiguous_strides(shape)
    return LazyTensor(storage, dtype, tuple(shape), strides, 0)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _contiguous_strides(shape: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    strides: list[int] = []
    running = 1
    for size in reversed(shape):
        strides.append(running)
        running *= size
    return tuple(reversed(strides))


def _check_no_overlap(path: str, spans: list[tuple[int, int, str]]) -> None:
    spans.sort()
    reach, owner = 0, ""
    for begin, end, name in spans:
        if begin < reach and end > begin:
            raise CheckpointError(f"{path}: tensors {owner!r} and {name!r} overlap in the file")
        if end > reach:
            reach, owner = end, name


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def layout(
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, list[HeaderEntry]]:
    """The header bytes and tensor placement that `safetensors.torch.save_file` would use."""
    order = sorted(entries, key=lambda n: (-_DTYPE_RANK[_dtype_name(entries[n][0], n)], n))
    placed: list[HeaderEntry] = []
    offset = 0
    for name in order:
        dtype, shape = entries[name]
        nbytes = math.prod(shape) * itemsize(dtype)
        placed.append(HeaderEntry(name, dtype, tuple(shape), offset, offset + nbytes))
        offset += nbytes
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    for entry in placed:
        header[entry.name] = {
            "dtype": NAME_OF_DTYPE[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, placed


def _dtype_name(dtype: torch.dtype, name: str) -> str:
    found = NAME_OF_DTYPE.get(dtype)
    if found is None:
        raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
    return found
