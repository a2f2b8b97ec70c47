"""The streaming kernel: tensor by tensor, chunk by chunk, across all selected checkpoints.

For each chunk of each tensor, every input's bytes are read ahead into reusable buffers
(and hashed, BLAKE3 per tensor) on reader threads; the main thread hands them to a reducer
(reduce.py: the float64 mean in index order, rounded once, on the CPU block by cache-sized
block or on a device); a writer thread hashes the result and hands it to the sink. Memory is
a fixed budget of buffers split among the inputs, whatever the number of checkpoints or the
size of the model. This module schedules; reduce.py computes.
"""

from __future__ import annotations

import gc
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .digest import TensorDigests, tensor_hasher
from .errors import UsageError
from .lazy import SpilledTensor, TensorLeaf, close_spilled, fill_leaf_range, itemsize, leaf_numel, prefetch_leaf_range
from .reduce import DONE, Pending, Reducer, reducer_for

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
COUNTER_SUFFIXES = ("num_batches_tracked", "n_averaged", "step", "steps", "global_step", "num_updates")
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # at most; the buffer budgets usually make chunks smaller
READ_SLOTS = 3  # batches in flight: one being averaged, two being read
WRITE_SLOTS = 3  # averaged batches waiting to be hashed and written
# Small tensors travel between the threads in batches: a hand-off per tensor (semaphores and
# the GIL passed back and forth) cost more than the work on a tensor of a few KB.
BATCH_STEPS = 256
_ALIGN = 64  # each step's bytes within a batch's buffer start on a boundary any dtype can view
# With the collector off in the loop, the reference cycles that parsing a DCP item leaves (a few
# KB each) would pile up with the number of checkpoints; a young collection every few batches
# frees them without walking the old objects (torch's).
_COLLECT_EVERY = 1


def usable_cores() -> int:
    """The cores this process may run on, shared by the ranks torchrun starts on this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, cores // ranks)


@dataclass(frozen=True)
class Budgets:
    """Memory and threads the kernel uses, whatever the number of checkpoints or model size.

    The defaults suit any machine; tests shrink them to drive the many-chunk paths a large
    model takes. Thread counts left as None come from `usable_cores()` when a run starts.
    """

    read_bytes: int = 96 << 20  # all read buffers together, however many inputs
    max_read_bytes: int = 16 << 20  # one read; larger ones are no faster
    write_bytes: int = 48 << 20  # all output buffers together
    block_elements: int = 1 << 17  # CPU arithmetic block: its float64 scratch stays in cache
    # Reads and BLAKE3 (about 6 GB/s per core) run on reader threads, beside the arithmetic.
    read_threads: int | None = None
    # The arithmetic runs on the calling thread; intra-op threads only where cores are left
    # over (on a small machine they would contend with the readers and spin).
    arith_threads: int | None = None

    def threads(self) -> tuple[int, int]:
        """(reader threads, arithmetic threads) for this run."""
        cores = usable_cores()
        read = self.read_threads or max(2, min(4, cores // 2))
        arith = self.arith_threads or (1 if cores <= 4 else max(1, min(4, cores - read - 2)))
        return read, arith


@dataclass(frozen=True)
class AverageOptions:
    weights: tuple[float, ...] | None = None  # normalised; None means the uniform mean
    accum_dtype: torch.dtype = torch.float64
    device: str = "cpu"
    int_policy: str = "error"
    allow_nonfinite: bool = False
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    budgets: Budgets = field(default_factory=Budgets)
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
    """One name in processing order: compute its unit, or (a tied second name) only name it."""

    name: str
    unit: Unit
    compute: bool
    digest: bool  # part of the digested state dict
    where: str = ""  # the state dict's path where it is not the primary one, for messages

    @property
    def label(self) -> str:
        return f"{self.where}.{self.name}" if self.where else self.name


class Sink(Protocol):
    """Takes averaged chunks in order; `data` is a reused buffer, valid only during the call."""

    def write(self, unit: Unit, start: int, data: torch.Tensor) -> None: ...


@dataclass
class Digests:
    """Per-tensor digest records of each input and of the output (the digested names only)."""

    inputs: list[TensorDigests]
    output: TensorDigests = field(default_factory=TensorDigests)

    @classmethod
    def for_inputs(cls, count: int) -> Digests:
        return cls([TensorDigests() for _ in range(count)])


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
    if max(weights) <= 0:
        raise UsageError("--weights must not sum to zero")
    if len(set(weights)) == 1:
        return None
    total = sum(weights)
    if total == float("inf"):  # 1e308,1e308: scale down first, or every weight would be 0
        weights = [w / max(weights) for w in weights]
        total = sum(weights)
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


@dataclass(frozen=True)
class _Step:
    """One chunk of one visit: what every input reads, and the main thread averages, next."""

    visit: Visit
    start: int
    count: int
    first: bool
    last: bool
    names: tuple[str, ...]  # the unit's digested names: its bytes are hashed, in and out, for these

    def read_bytes(self, i: int) -> int:
        return self.count * itemsize(self.visit.unit.leaves[i].dtype)

    @property
    def out_bytes(self) -> int:
        return self.count * itemsize(self.visit.unit.out_dtype)


@dataclass(frozen=True)
class _Batch:
    """Consecutive steps handed between the threads at once: whole small tensors, or one chunk.

    Step j's bytes of input i start at `read_at[j][i]` in that input's buffer, its result at
    `out_at[j]` in the output buffer.
    """

    steps: tuple[_Step, ...]
    read_at: tuple[tuple[int, ...], ...]
    out_at: tuple[int, ...]


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def batch_steps(steps: Sequence[_Step], read_limits: Sequence[int], out_limit: int) -> list[_Batch]:
    """Steps grouped in order while every input's bytes stay within `read_limits` and the
    results within `out_limit`; a step that alone exceeds them is a batch of its own."""
    batches: list[_Batch] = []
    inputs = len(read_limits)
    current: list[_Step] = []
    read_at: list[tuple[int, ...]] = []
    out_at: list[int] = []
    used = [0] * inputs
    out_used = 0

    def close() -> None:
        if current:
            batches.append(_Batch(tuple(current), tuple(read_at), tuple(out_at)))
            current.clear()
            read_at.clear()
            out_at.clear()

    for step in steps:
        sizes = [_aligned(step.read_bytes(i)) for i in range(inputs)]
        out = _aligned(step.out_bytes)
        fits = all(used[i] + sizes[i] <= read_limits[i] for i in range(inputs)) and out_used + out <= out_limit
        if not fits or len(current) == BATCH_STEPS:
            close()
            used, out_used = [0] * inputs, 0
        current.append(step)
        read_at.append(tuple(used))
        out_at.append(out_used)
        used = [u + size for u, size in zip(used, sizes, strict=True)]
        out_used += out
    close()
    return batches


class _Readers:
    """Threads that fill reusable read buffers ahead of the arithmetic.

    Each input is always read by the same thread, which also feeds that input's tensor
    digest right after the read (BLAKE3 releases the GIL), so every digest sees its bytes
    in order and hashing runs in parallel with the arithmetic. Batch k uses slot k % slots;
    a slot is refilled only after the main thread has given it back.
    """

    def __init__(
        self, batches: Sequence[_Batch], buffers: list[list[torch.Tensor]], digests: Digests, threads: int
    ) -> None:
        self.batches = batches
        self.buffers = buffers
        self.digests = digests
        inputs = len(buffers[0])
        self.slots = len(buffers)
        self.groups = [list(range(t, inputs, threads)) for t in range(min(threads, inputs))]
        longest = max(len(batch.steps) for batch in batches)
        # views[slot][j][i]: step j's chunk of input i, in the slot's buffers
        self.views: list[list[list[torch.Tensor]]] = [
            [list(buffers[s]) for _ in range(longest)] for s in range(self.slots)
        ]
        self.errors: list[BaseException | None] = [None] * self.slots
        self.free = [[threading.Semaphore(1) for _ in range(self.slots)] for _ in self.groups]
        self.filled = [[threading.Semaphore(0) for _ in range(self.slots)] for _ in self.groups]
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(t,), name=f"ckpt-avg-read-{t}", daemon=True)
            for t in range(len(self.groups))
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, group: int) -> None:
        spilled: dict[int, SpilledTensor] = {}  # strided leaves of the current unit, copied out once
        hashers: dict[int, Any] = {}  # input -> the digest of its current tensor
        try:
            for k, batch in enumerate(self.batches):
                slot = k % self.slots
                self.free[group][slot].acquire()
                if self.stop.is_set():
                    return
                failed = False
                try:
                    ahead = self.batches[k + self.slots] if k + self.slots < len(self.batches) else None
                    for j, step in enumerate(batch.steps):
                        if step.first:
                            close_spilled(spilled)
                        last = ahead if j == len(batch.steps) - 1 else None
                        self._read(step, batch.read_at[j], self.views[slot][j], last, slot, group, spilled, hashers)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                    self.errors[slot] = exc
                    failed = True
                self.filled[group][slot].release()
                if failed:
                    return
        finally:
            close_spilled(spilled)

    def _read(
        self,
        step: _Step,
        read_at: tuple[int, ...],
        views: list[torch.Tensor],
        ahead: _Batch | None,
        slot: int,
        group: int,
        spilled: dict[int, SpilledTensor],
        hashers: dict[int, Any],
    ) -> None:
        """Read (and hash) this thread's inputs for `step`; ask the kernel for `ahead`'s bytes."""
        unit = step.visit.unit
        for i in self.groups[group]:
            leaf = unit.leaves[i]
            view = fill_leaf_range(leaf, step.start, step.count, self.buffers[slot][i][read_at[i] :], spilled)
            views[i] = view
            if ahead is not None:  # the kernel reads them while we hash and average
                for next_step in ahead.steps:
                    prefetch_leaf_range(next_step.visit.unit.leaves[i], next_step.start, next_step.count)
            if step.names:
                if step.first:
                    hashers[i] = tensor_hasher()
                if step.count:
                    hashers[i].update(view.view(torch.uint8).numpy().data)
                if step.last:
                    digest = hashers.pop(i).hexdigest()
                    for name in step.names:
                        self.digests.inputs[i].add(name, leaf.dtype, unit.shape, digest)

    def take(self, k: int) -> list[list[torch.Tensor]]:
        """Every input's chunk of each step of batch k, by step (valid until `give_back(k)`)."""
        slot = k % self.slots
        for filled in self.filled:
            filled[slot].acquire()
        error = self.errors[slot]
        if error is not None:
            raise error
        return self.views[slot]

    def give_back(self, k: int) -> None:
        slot = k % self.slots
        for free in self.free:
            free[slot].release()

    def close(self) -> None:
        self.stop.set()
        for free in self.free:
            for semaphore in free:
                semaphore.release()
        for thread in self.threads:
            thread.join()


# What the main thread hands the writer for one step: the step, its result, and the reducer's
# work still pending on it.
_Result = tuple[_Step, torch.Tensor, Pending]


class _Writer:
    """A thread that hashes the averaged chunks (per tensor) and hands them to the sink, in order.

    Results are computed into a few reusable output buffers, one per batch; a buffer is
    reused only once the sink has taken its bytes (every sink copies them before `write` returns).
    """

    def __init__(self, sink: Sink, digests: TensorDigests, capacity: int, slots: int, pin: bool) -> None:
        self.sink = sink
        self.digests = digests
        self.hasher: Any = None
        self.buffers = [torch.empty(capacity, dtype=torch.uint8, pin_memory=pin) for _ in range(slots)]
        self.free = threading.Semaphore(slots)
        self.issued = 0
        self.error: BaseException | None = None
        self.cancelled = False
        self.queue: queue.SimpleQueue[list[_Result] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="ckpt-avg-write", daemon=True)
        self.thread.start()

    def buffer(self) -> torch.Tensor:
        """The next free output buffer (bytes)."""
        self.check()
        self.free.acquire()
        buffer = self.buffers[self.issued % len(self.buffers)]
        self.issued += 1
        return buffer

    def write(self, results: list[_Result]) -> None:
        """Queue a batch's results, in the buffer taken from `buffer()`: hashed once ready, then written."""
        self.queue.put(results)

    def _run(self) -> None:
        while (results := self.queue.get()) is not None:
            try:
                for step, data, pending in results:
                    if self.error is None and not self.cancelled:
                        pending.output_ready()
                        self._hash(step, data)
                        self.sink.write(step.visit.unit, step.start, data)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self.error = exc
            finally:
                self.free.release()

    def _hash(self, step: _Step, data: torch.Tensor) -> None:
        if not step.names:
            return
        if step.first:
            self.hasher = tensor_hasher()
        if step.count:
            self.hasher.update(_raw(data))
        if step.last:
            unit = step.visit.unit
            digest = self.hasher.hexdigest()
            for name in step.names:
                self.digests.add(name, unit.out_dtype, unit.shape, digest)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.check()

    def close(self) -> None:
        if self.thread.is_alive():
            self.cancelled = True
            self.queue.put(None)
            self.thread.join()


def _raw(tensor: torch.Tensor) -> memoryview:
    return tensor.contiguous().view(torch.uint8).numpy().data


class Engine:
    """Averages visits chunk by chunk: reading and hashing the inputs on reader threads, the
    arithmetic by `self.reducer` on the calling thread (or `options.device`), hashing and
    writing the result on a writer thread. The engine only schedules: any `Reducer` fits.

    Memory is a fixed budget of reusable buffers split among the inputs, whatever the
    number of checkpoints or the size of the model: about 96 MiB of read buffers, 48 MiB of
    output buffers and a few MiB of float64 scratch. A unit is computed and hashed once,
    however many names it has: its tensor digest serves each of them.
    """

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
        self.budgets = options.budgets
        self.sink = sink
        self.digests = digests
        self.progress = progress
        self.reducer: Reducer = reducer_for(
            options.device,
            files,
            weights=options.weights,
            accum_dtype=options.accum_dtype,
            allow_nonfinite=options.allow_nonfinite,
            int_policy=options.int_policy,
            block_elements=self.budgets.block_elements,
        )

    def run(self, visits: Sequence[Visit]) -> None:
        steps = self._steps(visits)
        if not steps:
            return
        pin = self.reducer.pin_memory
        inputs = len(steps[0].visit.unit.leaves)
        budgets = self.budgets
        per_read = min(budgets.max_read_bytes, max(4096, budgets.read_bytes // (READ_SLOTS * inputs)))
        read_limits = [max(per_read, max(_aligned(s.read_bytes(i)) for s in steps)) for i in range(inputs)]
        out_limit = max(budgets.write_bytes // WRITE_SLOTS, max(_aligned(s.out_bytes) for s in steps))
        batches = batch_steps(steps, read_limits, out_limit)
        read_sizes = [max(b.read_at[-1][i] + b.steps[-1].read_bytes(i) for b in batches) for i in range(inputs)]
        buffers = [
            [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for size in read_sizes] for _ in range(READ_SLOTS)
        ]
        capacity = max(b.out_at[-1] + b.steps[-1].out_bytes for b in batches)
        read_threads, arith_threads = self.budgets.threads()
        with self.reducer.running(arith_threads):
            self._loop(batches, buffers, capacity, read_threads, pin)

    def _loop(
        self, batches: list[_Batch], buffers: list[list[torch.Tensor]], capacity: int, read_threads: int, pin: bool
    ) -> None:
        readers: _Readers | None = None
        writer: _Writer | None = None
        collecting = gc.isenabled()
        gc.disable()  # the loop makes many short-lived views, and each collection walks all of torch
        try:  # an interrupt between starting the threads and the loop must still stop them
            readers = _Readers(batches, buffers, self.digests, read_threads)
            writer = _Writer(self.sink, self.digests.output, capacity, WRITE_SLOTS, pin)
            for k, batch in enumerate(batches):
                if collecting and k % _COLLECT_EVERY == _COLLECT_EVERY - 1:
                    gc.collect(1)  # the young generations only: cycles made reading items (DCP's zips)
                chunks = readers.take(k)
                out = writer.buffer()
                results = [
                    self._step(step, chunks[j], out[batch.out_at[j] : batch.out_at[j] + step.out_bytes])
                    for j, step in enumerate(batch.steps)
                ]
                writer.write(results)
                for _, _, pending in results:
                    pending.inputs_free()
                readers.give_back(k)
            writer.finish()
        finally:
            if readers is not None:
                readers.close()
            if writer is not None:
                writer.close()
            if collecting:
                gc.enable()

    def _steps(self, visits: Sequence[Visit]) -> list[_Step]:
        """Chunks of each unit's first visit; the unit's digested names go with them."""
        names: dict[int, list[str]] = {}
        first: list[Visit] = []
        for visit in visits:
            if id(visit.unit) not in names:
                names[id(visit.unit)] = []
                first.append(visit)
            if visit.digest:
                names[id(visit.unit)].append(visit.name)
        steps: list[_Step] = []
        for visit in first:
            chunks = self._chunks(visit.unit)
            digested = tuple(names[id(visit.unit)])
            for j, (start, count) in enumerate(chunks):
                steps.append(_Step(visit, start, count, j == 0, j == len(chunks) - 1, digested))
        return steps

    def _chunk_elements(self, unit: Unit) -> int:
        """Elements per chunk: the buffer budgets split among inputs and slots, in whole blocks."""
        budgets = self.budgets
        per_read = min(budgets.max_read_bytes, max(4096, budgets.read_bytes // (READ_SLOTS * len(unit.leaves))))
        widest = max(itemsize(leaf.dtype) for leaf in unit.leaves)
        per_write = budgets.write_bytes // (WRITE_SLOTS * itemsize(unit.out_dtype))
        size = max(1, min(self.options.chunk_elements, per_read // widest, per_write))
        block = budgets.block_elements
        return size - size % block if size > block else size

    def _chunks(self, unit: Unit) -> list[tuple[int, int]]:
        size = self._chunk_elements(unit)
        total = unit.numel
        if total == 0:
            return [(0, 0)]  # an empty tensor still gets its (empty) record written
        return [(start, min(size, total - start)) for start in range(0, total, size)]

    def _step(self, step: _Step, chunks: list[torch.Tensor], out_bytes: torch.Tensor) -> _Result:
        unit = step.visit.unit
        out = out_bytes.view(unit.out_dtype)
        override = self.options.overrides.get(unit.names[0])
        pending = DONE
        if override is not None:
            out.copy_(override.detach().to("cpu", unit.out_dtype).reshape(-1)[step.start : step.start + step.count])
        else:
            pending = self.reducer.reduce(unit.kind, step.visit.label, chunks, out)
        self.progress(sum(c.numel() * c.element_size() for c in chunks))
        return step, out, pending


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
