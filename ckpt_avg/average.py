"""The streaming kernel: tensor by tensor, chunk by chunk, across all selected checkpoints.

For each chunk of each tensor, every input's bytes are read (ahead, on a small thread pool),
converted into a reused accumulator buffer of float64 and added; the mean is rounded
once into the output dtype and handed to the writer. Memory is a few chunks, whatever the
number of checkpoints or the size of the model.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import MismatchError, NonFiniteError, UsageError
from .lazy import TensorLeaf, itemsize, leaf_numel, read_leaf_range

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
COUNTER_SUFFIXES = ("num_batches_tracked", "n_averaged", "step", "global_step", "num_updates")
DEFAULT_CHUNK_ELEMENTS = 1 << 22
READ_AHEAD = 4


@dataclass(frozen=True)
class AverageOptions:
    weights: tuple[float, ...] | None = None  # normalised; None means the uniform mean
    accum_dtype: torch.dtype = torch.float64
    device: str = "cpu"
    int_policy: str = "error"
    allow_nonfinite: bool = False
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    # Tensors that replace the average under these names (recomputed BatchNorm statistics).
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class Unit:
    """One averaged tensor, stored under one or more names (tied weights share a unit)."""

    names: list[str]
    leaves: tuple[TensorLeaf, ...]  # one per input, in index order
    kind: str  # "float", "counter" or "int"
    out_dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return leaf_numel(self.leaves[0])

    @property
    def out_nbytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)


@dataclass(frozen=True)
class Visit:
    """One name in processing order: compute its unit, or only hash a tied second name."""

    name: str
    unit: Unit
    compute: bool
    digest: bool  # part of the digested state dict


class Sink(Protocol):
    def write(self, unit: Unit, start: int, data: torch.Tensor) -> None: ...


@dataclass
class Digests:
    """sha256 per input and of the output, over tensors in sorted key order."""

    inputs: list[hashlib._Hash]
    output: hashlib._Hash = field(default_factory=hashlib.sha256)

    @classmethod
    def for_inputs(cls, count: int) -> Digests:
        return cls([hashlib.sha256() for _ in range(count)])


def tensor_header(name: str, dtype: torch.dtype, shape: Sequence[int]) -> bytes:
    return f"{name}\0{str(dtype).removeprefix('torch.')}\0{list(shape)}\0".encode()


def classify(name: str, dtype: torch.dtype) -> str:
    if dtype in FLOAT_DTYPES:
        return "float"
    if name.rsplit(".", 1)[-1] in COUNTER_SUFFIXES or name in COUNTER_SUFFIXES:
        return "counter"
    return "int"


def mixing_weights(count: int, weights: Sequence[float] | None, ema: float | None) -> tuple[float, ...] | None:
    """Normalised weights for --weights or --ema; None for the plain uniform mean.

    >>> mixing_weights(3, None, 0.5)
    (0.25, 0.25, 0.5)
    """
    if weights is not None and ema is not None:
        raise UsageError("--weights and --ema cannot be used together")
    if ema is not None:
        if not 0 < ema < 1:
            raise UsageError(f"--ema must be between 0 and 1 (exclusive), not {ema}")
        return tuple([ema ** (count - 1)] + [(1 - ema) * ema ** (count - t) for t in range(2, count + 1)])
    if weights is None:
        return None
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values but {count} checkpoints are selected")
    if any(w < 0 for w in weights) or not all(w == w and w != float("inf") for w in weights):
        raise UsageError("--weights must be finite and non-negative")
    total = sum(weights)
    if total <= 0:
        raise UsageError("--weights must not sum to zero")
    if len(set(weights)) == 1:
        return None
    return tuple(w / total for w in weights)


def round_once(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 values to `dtype` once, to nearest even.

    torch converts float64 to bfloat16/float16 through float32, rounding twice. Rounding to
    float32 with round-to-odd first keeps the second rounding exact (float32 carries more
    than two extra bits), so the result equals a single correct rounding.
    """
    if dtype == values.dtype:
        return values.clone()
    if dtype not in (torch.bfloat16, torch.float16) or values.dtype != torch.float64:
        return values.to(dtype)
    nearest = values.to(torch.float32)
    back = nearest.to(torch.float64)
    inexact = back != values
    away_from_zero = back.abs() > values.abs()
    bits = nearest.view(torch.int32)
    bits = torch.where(inexact & away_from_zero, bits - 1, bits)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32).to(dtype)


class _Reads:
    """Reads issued ahead, in the order they will be consumed, with a bounded number in flight."""

    def __init__(self, jobs: Iterator[tuple[TensorLeaf, int, int]], pool: ThreadPoolExecutor) -> None:
        self._jobs = jobs
        self._pool = pool
        self._pending: deque[Future[torch.Tensor]] = deque()
        for _ in range(READ_AHEAD):
            self._submit()

    def _submit(self) -> None:
        job = next(self._jobs, None)
        if job is not None:
            self._pending.append(self._pool.submit(read_leaf_range, *job))

    def next(self) -> torch.Tensor:
        result = self._pending.popleft().result()
        self._submit()
        return result


class Engine:
    def __init__(
        self,
        files: Sequence[str],
        options: AverageOptions,
        sink: Sink,
        digests: Digests,
        progress: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.files = files
        self.options = options
        self.sink = sink
        self.digests = digests
        self.progress = progress
        self.device = torch.device(options.device)
        self._held: dict[int, torch.Tensor] = {}  # results of tied units with names still to hash

    def run(self, visits: Sequence[Visit]) -> None:
        pending_names = {id(v.unit): sum(1 for w in visits if w.unit is v.unit and w.digest) for v in visits}
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-avg-read") as pool:
            reads = _Reads(self._jobs(visits), pool)
            for visit in visits:
                self._visit(visit, reads, pending_names)

    def _jobs(self, visits: Sequence[Visit]) -> Iterator[tuple[TensorLeaf, int, int]]:
        for visit in visits:
            if not visit.compute and not visit.digest:
                continue
            for start, count in self._chunks(visit.unit):
                for leaf in visit.unit.leaves:
                    yield leaf, start, count

    def _chunks(self, unit: Unit) -> list[tuple[int, int]]:
        size = self.options.chunk_elements
        total = unit.numel
        if total == 0:
            return [(0, 0)]  # an empty tensor still gets its (empty) record written
        return [(start, min(size, total - start)) for start in range(0, total, size)]

    def _visit(self, visit: Visit, reads: _Reads, pending: dict[int, int]) -> None:
        unit = visit.unit
        if not visit.compute and not visit.digest:
            return
        if visit.digest:
            header = tensor_header(visit.name, unit.leaves[0].dtype, unit.shape)
            for hasher in self.digests.inputs:
                hasher.update(header)
            self.digests.output.update(tensor_header(visit.name, unit.out_dtype, unit.shape))
        keep = visit.compute and visit.digest and pending[id(unit)] > 1
        pieces: list[torch.Tensor] = []
        for start, count in self._chunks(unit):
            chunks = [reads.next() for _ in unit.leaves]
            if visit.digest:
                for hasher, chunk in zip(self.digests.inputs, chunks, strict=True):
                    hasher.update(chunk.contiguous().view(torch.uint8).numpy())
            if not visit.compute:
                continue
            override = self.options.overrides.get(unit.names[0])
            if override is not None:
                result = override.detach().to("cpu", unit.out_dtype).reshape(-1)[start : start + count].contiguous()
            else:
                result = self._combine(unit, visit.name, start, chunks)
            self.sink.write(unit, start, result)
            if visit.digest:
                self.digests.output.update(result.view(torch.uint8).numpy())
            if keep:
                pieces.append(result)
            self.progress(sum(c.numel() * c.element_size() for c in chunks))
        if not visit.compute and visit.digest:
            held = self._held[id(unit)]
            self.digests.output.update(held.view(torch.uint8).numpy())
        if keep:
            self._held[id(unit)] = torch.cat(pieces) if pieces else torch.empty(0, dtype=unit.out_dtype)
        if visit.digest:
            pending[id(unit)] -= 1
            if pending[id(unit)] == 0:
                self._held.pop(id(unit), None)

    def _combine(self, unit: Unit, name: str, start: int, chunks: list[torch.Tensor]) -> torch.Tensor:
        if unit.kind == "float":
            return self._mean(unit, name, start, chunks)
        if unit.kind == "int" and self.options.int_policy == "error":
            first = chunks[0]
            for position, chunk in enumerate(chunks[1:], start=1):
                if not torch.equal(first, chunk):
                    raise MismatchError(
                        f"integer tensor {name!r} differs between {self.files[0]} and {self.files[position]};"
                        " averaging integers is meaningless (use --int-policy last to copy the last one)"
                    )
        return chunks[-1].to(unit.out_dtype) if chunks[-1].dtype != unit.out_dtype else chunks[-1].clone()

    def _mean(self, unit: Unit, name: str, start: int, chunks: list[torch.Tensor]) -> torch.Tensor:
        count = chunks[0].numel()
        accum = self.options.accum_dtype
        total = torch.zeros(count, dtype=accum, device=self.device)
        converted = torch.empty(count, dtype=accum, device=self.device)
        weights = self.options.weights
        for position, chunk in enumerate(chunks):
            converted.copy_(chunk.to(self.device, non_blocking=True))
            if weights is not None:
                converted.mul_(weights[position])
            total.add_(converted)
        if weights is None:
            total.div_(len(chunks))
        if not self.options.allow_nonfinite and not bool(torch.isfinite(total).all()):
            self._blame_nonfinite(name, chunks)
        return round_once(total, unit.out_dtype).cpu()

    def _blame_nonfinite(self, name: str, chunks: list[torch.Tensor]) -> None:
        for position, chunk in enumerate(chunks):
            if not bool(torch.isfinite(chunk).all()):
                raise NonFiniteError(
                    f"{self.files[position]}: tensor {name!r} contains NaN or Inf"
                    " (use --allow-nonfinite to average it anyway)"
                )
        raise NonFiniteError(f"tensor {name!r}: the mean overflows {self.options.accum_dtype}")


class MemorySink:
    """Collects whole averaged tensors by name, for work that needs the model in memory."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_unit: dict[int, torch.Tensor] = {}

    def write(self, unit: Unit, start: int, data: torch.Tensor) -> None:
        flat = self._by_unit.get(id(unit))
        if flat is None:
            flat = torch.empty(unit.numel, dtype=unit.out_dtype)
            self._by_unit[id(unit)] = flat
            for name in unit.names:
                self.tensors[name] = flat.view(unit.shape)
        flat[start : start + data.numel()] = data
