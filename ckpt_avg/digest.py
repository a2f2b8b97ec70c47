"""Tensor digests (SPEC §1.7): BLAKE3 of each tensor's bytes, then BLAKE3 over the records.

Scheme `blake3-tree-v1`. A tensor's digest is BLAKE3 (32 bytes) of its raw little-endian
bytes in C order. A checkpoint's digest is BLAKE3 of this encoding of its records, one per
key, sorted by the key's UTF-8 bytes (integers are unsigned 64-bit little-endian):

    count of records
    for each record: len(key)  key (UTF-8)
                     len(dtype)  dtype name (ASCII: float32, bfloat16, int64, bool, ...)
                     ndim  each dim
                     the tensor digest (32 bytes)

Tied names are separate records with the same tensor digest. Nothing depends on the file
format or on the order tensors are read in, so readers, ranks or machines can each digest
their tensors and any one of them can combine the records.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from blake3 import blake3

from .dtypes import full_name
from .lazy import (
    SpilledTensor,
    TensorLeaf,
    close_spilled,
    fill_leaf_range,
    itemsize,
    leaf_numel,
    leaf_shape,
    leaf_tie_key,
)

SCHEME = "blake3-tree-v1"
FORMAT_VERSION = 2  # of the provenance record; 1 (no field) used one running sha256 per checkpoint
ZERO_DIGEST = "0" * 64  # a placeholder of the final length, while the data is still being written
# One thread per update: each input is hashed on its own reader thread already; BLAKE3's own
# threads pay only on large buffers where cores are idle (measured in benchmarks/README.md).
HASH_THREADS = 1


dtype_name = full_name


def tensor_hasher() -> blake3:
    return blake3(max_threads=HASH_THREADS)


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in C order, as the digest reads them."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def tensor_digest(tensor: torch.Tensor) -> str:
    hasher = tensor_hasher()
    hasher.update(raw_bytes(tensor))
    return hasher.hexdigest()


@dataclass(frozen=True)
class Record:
    """One key's entry in a checkpoint digest."""

    dtype: str
    shape: tuple[int, ...]
    digest: str  # hex

    def to_json(self) -> list[Any]:
        return [self.dtype, list(self.shape), self.digest]

    @classmethod
    def from_json(cls, value: Any) -> Record:
        dtype, shape, digest = value
        return cls(str(dtype), tuple(int(d) for d in shape), str(digest))


@dataclass
class TensorDigests:
    """The records of one checkpoint (key -> dtype, shape, tensor digest) and their root."""

    records: dict[str, Record] = field(default_factory=dict)

    def add(self, key: str, dtype: torch.dtype, shape: Iterable[int], digest: str) -> None:
        self.records[key] = Record(dtype_name(dtype), tuple(shape), digest)

    def root(self) -> str:
        return tree_digest(self.records)

    def hex_by_key(self) -> dict[str, str]:
        return {key: self.records[key].digest for key in sorted(self.records)}


def tree_digest(records: Mapping[str, Record]) -> str:
    """The checkpoint digest of `records`, in the encoding the module docstring documents."""
    hasher = blake3()
    hasher.update(struct.pack("<Q", len(records)))
    for key in sorted(records, key=lambda k: k.encode()):
        record = records[key]
        name = key.encode()
        dtype = record.dtype.encode("ascii")
        parts = [struct.pack("<Q", len(name)), name, struct.pack("<Q", len(dtype)), dtype]
        parts.append(struct.pack(f"<{1 + len(record.shape)}Q", len(record.shape), *record.shape))
        parts.append(bytes.fromhex(record.digest))
        hasher.update(b"".join(parts))
    return hasher.hexdigest()


def digest_state_dict(tensors: Mapping[str, torch.Tensor]) -> TensorDigests:
    """Records of in-memory tensors (tests, and callers holding a state dict)."""
    result = TensorDigests()
    for key, tensor in tensors.items():
        result.add(key, tensor.dtype, tensor.shape, tensor_digest(tensor))
    return result


def digest_leaves(leaves: Mapping[str, TensorLeaf], chunk_bytes: int = 16 << 20) -> TensorDigests:
    """Records of a state dict read from a file, streamed through one buffer; tied names read once."""
    result = TensorDigests()
    by_tie: dict[tuple[object, ...], str] = {}
    buffer = torch.empty(chunk_bytes, dtype=torch.uint8)
    for key in sorted(leaves):
        leaf = leaves[key]
        tie = leaf_tie_key(leaf)
        if tie not in by_tie:
            by_tie[tie] = _leaf_digest(leaf, buffer)
        result.add(key, leaf.dtype, leaf_shape(leaf), by_tie[tie])
    return result


def _leaf_digest(leaf: TensorLeaf, buffer: torch.Tensor) -> str:
    hasher = tensor_hasher()
    per_chunk = max(1, buffer.numel() // itemsize(leaf.dtype))
    total = leaf_numel(leaf)
    spilled: dict[int, SpilledTensor] = {}
    try:
        for start in range(0, total, per_chunk):
            view = fill_leaf_range(leaf, start, min(per_chunk, total - start), buffer, spilled)
            hasher.update(view.view(torch.uint8).numpy().data)
    finally:
        close_spilled(spilled)
    return hasher.hexdigest()
