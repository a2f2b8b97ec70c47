"""What reduces one chunk: every input's bytes for the same range of elements -> the output's.

The engine (average.py) schedules reads, buffers and writes and hands each chunk to a
`Reducer`; the reducer owns the arithmetic and where it runs. `CpuReducer` goes block by
cache-sized block on the calling thread; `DeviceReducer` copies the chunks to a device and
reduces them there. A reducer that works asynchronously (CUDA streams and events) returns a
`Pending` from `reduce`: the engine recycles the read buffers once `inputs_free()` returns,
and the writer thread hashes and writes `out` once `output_ready()` returns. The two here
finish before returning, so their `Pending` is `DONE`.

Arithmetic, for every reducer: sum in index order in the accumulator dtype (float64 unless
--accum-dtype float32), each weighted term multiplied and then added (never fused), divide,
and round once into the output dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch

from .dtypes import full_name
from .errors import MismatchError, NonFiniteError


class Pending(Protocol):
    """Work a reducer may still be doing on one chunk after `reduce` returned."""

    def inputs_free(self) -> None:
        """Return once the reducer no longer reads the input chunks."""

    def output_ready(self) -> None:
        """Return once `out` holds the result (raising any error the reduction found)."""


class _Done:
    def inputs_free(self) -> None:
        return None

    def output_ready(self) -> None:
        return None


DONE: Pending = _Done()


class Reducer(Protocol):
    """Reduces one chunk of one tensor; the engine's scheduling does not depend on which."""

    @property
    def pin_memory(self) -> bool:
        """Whether the engine's read and write buffers should be pinned (the reducer copies them to a device)."""

    def running(self, arith_threads: int) -> AbstractContextManager[None]:
        """Held around a whole run: take the arithmetic threads (and give them back)."""

    def reduce(self, kind: str, label: str, chunks: list[torch.Tensor], out: torch.Tensor) -> Pending:
        """Reduce `chunks` (one per input, in index order) of the tensor `label` into `out`.

        `kind` is "float" (the weighted mean), "int" (equal in every input, or the last one
        under --int-policy last) or "counter" (the last one).
        """


def reducer_for(
    device: str,
    files: Sequence[str],
    *,
    weights: tuple[float, ...] | None,
    accum_dtype: torch.dtype,
    allow_nonfinite: bool,
    int_policy: str,
    block_elements: int,
) -> CpuReducer | DeviceReducer:
    """The reducer for --device: blocks on the CPU, whole chunks on a device."""
    where = torch.device(device)
    if where.type == "mps" and accum_dtype == torch.float64:
        where = torch.device("cpu")  # MPS has no float64, and the mean must be exact
    if where.type == "cpu":
        return CpuReducer(files, weights, accum_dtype, allow_nonfinite, int_policy, block_elements)
    return DeviceReducer(files, weights, accum_dtype, allow_nonfinite, int_policy, where)


class _Arithmetic:
    """What every reducer shares: integers, the mean of one block, scratch, the finite checks."""

    device: torch.device

    def __init__(
        self,
        files: Sequence[str],
        weights: tuple[float, ...] | None,
        accum_dtype: torch.dtype,
        allow_nonfinite: bool,
        int_policy: str,
    ) -> None:
        self.files = files
        self.weights = weights
        self.accum_dtype = accum_dtype
        self.allow_nonfinite = allow_nonfinite
        self.int_policy = int_policy
        self._scratch: dict[str, torch.Tensor] = {}

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def reduce(self, kind: str, label: str, chunks: list[torch.Tensor], out: torch.Tensor) -> Pending:
        if kind == "float":
            self._mean(label, chunks, out)
            return DONE
        if kind == "int" and self.int_policy == "error":
            first = chunks[0]
            for position, chunk in enumerate(chunks[1:], start=1):
                if not torch.equal(first, chunk):
                    raise MismatchError(
                        f"integer tensor {label!r} differs between {self.files[0]} and {self.files[position]};"
                        " averaging integers is meaningless (use --int-policy last to copy the last one)"
                    )
        out.copy_(chunks[-1])
        return DONE

    def _mean(self, label: str, chunks: list[torch.Tensor], out: torch.Tensor) -> None:
        raise NotImplementedError

    def _finish_mean(self, label: str, chunks: list[torch.Tensor], out: torch.Tensor, sums: torch.Tensor) -> None:
        """The checks after a mean: a non-finite input or mean, or a mean the output dtype cannot hold."""
        if not self.allow_nonfinite and not math.isfinite(float(sums.sum())):
            self._check_finite(label, chunks)  # a finite sum proves every mean finite; else look closer
        _synchronize(self.device)  # the read buffers and `out` are reused next

    def _mean_block(self, xs: list[torch.Tensor], out: torch.Tensor, total: torch.Tensor) -> None:
        """Sum in index order in the accumulator dtype, divide, round once; `total` gets the sum."""
        accum = self.accum_dtype
        acc = self._buffer("acc", out.numel(), accum)
        weights = self.weights
        if weights is None:
            torch.add(xs[0], 0.0, out=acc)  # 0 + x0, as a sum that starts from zero (-0.0 becomes +0.0)
            converted = self._buffer("conv", out.numel(), accum)
            for x in xs[1:]:
                acc.add_(x if x.dtype == accum else converted.copy_(x))
            acc.div_(len(xs))
        else:
            acc.zero_()
            converted = self._buffer("conv", out.numel(), accum)
            for x, weight in zip(xs, weights, strict=True):
                acc.add_(converted.copy_(x).mul_(weight))
        if not self.allow_nonfinite and out.numel():
            torch.sum(acc, 0, dtype=torch.float64, out=total)
        else:
            total.zero_()
        round_once_into(acc, out, self._buffer)

    def _scratch_size(self, count: int) -> int:
        return count

    def _buffer(self, name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        """Reusable scratch on the arithmetic's device, grown when a larger one is needed."""
        key = f"{name}:{dtype}"
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < count:
            buffer = torch.empty(self._scratch_size(count), dtype=dtype, device=self.device)
            self._scratch[key] = buffer
        return buffer[:count]

    def _check_finite(self, label: str, chunks: list[torch.Tensor]) -> None:
        """The slow exact check, for the rare chunk whose sum is not finite."""
        self._blame_nonfinite(label, chunks)
        accum = self.accum_dtype
        total = torch.zeros(chunks[0].numel(), dtype=accum)
        for position, chunk in enumerate(chunks):
            converted = chunk.to(accum)
            if self.weights is not None:
                converted.mul_(self.weights[position])
            total.add_(converted)
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteError(f"tensor {label!r}: the mean overflows {accum}")

    def _blame_nonfinite(self, label: str, chunks: list[torch.Tensor]) -> None:
        for position, chunk in enumerate(chunks):
            if not bool(torch.isfinite(chunk).all()):
                raise NonFiniteError(
                    f"{self.files[position]}: tensor {label!r} contains NaN or Inf"
                    " (use --allow-nonfinite to average it anyway)"
                )


class CpuReducer(_Arithmetic):
    """The mean block by cache-sized block, so that the float64 scratch stays in cache."""

    def __init__(
        self,
        files: Sequence[str],
        weights: tuple[float, ...] | None,
        accum_dtype: torch.dtype,
        allow_nonfinite: bool,
        int_policy: str,
        block_elements: int,
    ) -> None:
        super().__init__(files, weights, accum_dtype, allow_nonfinite, int_policy)
        self.device = torch.device("cpu")
        self.block = block_elements

    @contextmanager
    def running(self, arith_threads: int) -> Iterator[None]:
        threads = torch.get_num_threads()
        if threads > arith_threads:
            torch.set_num_threads(arith_threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def _scratch_size(self, count: int) -> int:
        return max(count, self.block)

    def _mean(self, label: str, chunks: list[torch.Tensor], out: torch.Tensor) -> None:
        narrowing = not self.allow_nonfinite and _narrower(chunks, out.dtype)
        overflowed = False
        block = self.block
        sums = self._buffer("sums", -(-out.numel() // block), torch.float64)
        for j, start in enumerate(range(0, out.numel(), block)):
            end = min(out.numel(), start + block)
            self._mean_block([c[start:end] for c in chunks], out[start:end], sums[j])
            overflowed = overflowed or (narrowing and _overflows(out[start:end]))  # while it is in cache
        self._finish_mean(label, chunks, out, sums)
        if overflowed:
            _refuse_overflow(label, out.dtype)


class DeviceReducer(_Arithmetic):
    """The mean of a whole chunk on a device, copied there from the (pinned) read buffers."""

    def __init__(
        self,
        files: Sequence[str],
        weights: tuple[float, ...] | None,
        accum_dtype: torch.dtype,
        allow_nonfinite: bool,
        int_policy: str,
        device: torch.device,
    ) -> None:
        super().__init__(files, weights, accum_dtype, allow_nonfinite, int_policy)
        self.device = device

    @contextmanager
    def running(self, arith_threads: int) -> Iterator[None]:
        yield  # the device's own threads do the work

    def _mean(self, label: str, chunks: list[torch.Tensor], out: torch.Tensor) -> None:
        narrowing = not self.allow_nonfinite and _narrower(chunks, out.dtype)
        sums = self._buffer("sums", 1, torch.float64)
        result = self._buffer("result", out.numel(), out.dtype)
        self._mean_block([c.to(self.device, non_blocking=True) for c in chunks], result, sums[0])
        overflowed = narrowing and out.numel() > 0 and _overflows(result)
        out.copy_(result, non_blocking=True)
        self._finish_mean(label, chunks, out, sums)
        if overflowed:
            _refuse_overflow(label, out.dtype)


def _refuse_overflow(label: str, dtype: torch.dtype) -> None:
    """Finite means (checked before) that the output dtype cannot hold."""
    raise NonFiniteError(
        f"tensor {label!r}: its mean is beyond the range of {full_name(dtype)}"
        f" (largest {torch.finfo(dtype).max:g}) and would be written as Inf; choose a wider --dtype,"
        " or --allow-nonfinite to write it anyway"
    )


def round_once_into(
    values: torch.Tensor, out: torch.Tensor, scratch: Callable[[str, int, torch.dtype], torch.Tensor]
) -> None:
    """`out.copy_(round_once(values, out.dtype))`, without allocating: `scratch` lends buffers."""
    if out.dtype not in (torch.bfloat16, torch.float16) or values.dtype != torch.float64:
        out.copy_(values)  # one IEEE rounding (or an exact copy)
        return
    count = values.numel()
    nearest = scratch("f32", count, torch.float32)
    nearest.copy_(values)
    back = scratch("f64", count, torch.float64)
    back.copy_(nearest)
    inexact = scratch("inexact", count, torch.int32)  # int32 masks: same-dtype integer ops are fast
    torch.ne(back, values, out=inexact)
    # (nearest - value) * value > 0 where float32 rounded away from zero: step back toward
    # zero, then set the last bit: round-to-odd, which the second rounding keeps exact.
    back.sub_(values).mul_(values)
    away = scratch("away", count, torch.int32)
    torch.gt(back, 0, out=away)
    bits = nearest.view(torch.int32)
    bits.sub_(away)
    bits.bitwise_or_(inexact)
    out.copy_(nearest)


def _overflows(values: torch.Tensor) -> bool:
    low, high = torch.aminmax(values)
    return not (math.isfinite(float(low)) and math.isfinite(float(high)))


def _narrower(chunks: list[torch.Tensor], out_dtype: torch.dtype) -> bool:
    """Whether a finite mean of the inputs can still round to Inf in the output dtype (`--dtype float16`)."""
    largest = torch.finfo(out_dtype).max
    return any(torch.finfo(c.dtype).max > largest for c in chunks if c.dtype.is_floating_point)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
