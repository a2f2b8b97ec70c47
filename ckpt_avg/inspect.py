"""Look at a run before choosing what to average: metrics, weight drift and a suggested --start.

For the checkpoints that the discovery and selection options keep, in index order
t = 0 .. T, with θ_t the vector of every floating-point tensor of the chosen state dict:

    drift/prev(t) = ||θ_t - θ_(t-1)||_2 / ||θ_(t-1)||_2      (t >= 1)
    drift/last(t) = ||θ_t - θ_T||_2     / ||θ_T||_2

computed tensor by tensor and chunk by chunk (three chunks in memory, whatever the size of
the model or the number of checkpoints), with sums of squares accumulated in float64.

The suggested start is where the run has settled. Where the learning rate stored with the
checkpoints has a schedule, the schedule decides (schedule.py: where the rate keeps its
final value, or its last cycle starts). Otherwise the drift does: with s_1 .. s_T the
drift/prev values, m the median of the tail (the last quarter of the s_t, at least 2 of
them) and a band factor b (default 1.5), it is the checkpoint k that ends the LAST step with
s_k > b * m (checkpoint 0 when no step exceeds it). From k on, every step stays within
b * m, so the checkpoints k .. T lie in the settled region that SWA averages over, unless
they lie on a nearly straight line (`straightness`): then the run is still drifting and
nothing is suggested. Where the two rules disagree, both are reported.

    >>> from ckpt_avg.inspect import inspect_checkpoints
    >>> result = inspect_checkpoints(["ckpts/"])  # doctest: +SKIP
    >>> result.suggestion.command  # doctest: +SKIP
    'ckpt-avg --start 10 ckpts/ -o avg.pt'
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from ._version import __version__
from .average import Unit
from .dtypes import short_name
from .errors import CkptAvgError
from .guard import OUTPUT_SUFFIXES, OutputKind
from .lazy import (
    LazyTensor,
    SpilledTensor,
    TensorLeaf,
    as_leaf,
    close_spilled,
    is_tensor_leaf,
    itemsize,
    leaf_numel,
    read_leaf_range,
)
from .options import Options
from .report import human_size, terminal_safe
from .run import _Run, _validate, parameter_count
from .schedule import NOT_METRICS as _RATE_KEYS
from .schedule import Rate, ScheduleStart, read_rate, schedule_start
from .select import describe_order, unindexed_found
from .sources import OpenedCheckpoint, content_meta
from .statedict import dotted, holds_lightning_swa_average

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_BAND = 1.5
TAIL_FRACTION = 0.25
MIN_CHECKPOINTS = 4  # three steps: fewer cannot separate a tail from what comes before it
CHUNK_ELEMENTS = 1 << 21
SHOWN_METRICS = 3  # metric columns in the table; --json carries them all
PLOT_HINT = "pip install 'ckpt-avg[plot]'"
_NOT_METRICS = frozenset({"epoch", "step", "global_step", "total_flos"})


@dataclass(frozen=True)
class Row:
    """One candidate: inspected (in the drift), or left out by the options with the reason."""

    path: str
    index: int | None
    epoch: int | None
    step: int | None
    size: int
    inspected: bool
    reason: str = ""
    dtypes: dict[str, int] = field(default_factory=dict)  # short dtype name -> number of tensors
    metrics: dict[str, float] = field(default_factory=dict)
    drift_prev: float | None = None
    drift_last: float | None = None
    lr: float | None = None  # the first parameter group's learning rate
    lr_groups: list[float] = field(default_factory=list)  # every group's, in order
    lr_source: str = ""  # where it was read: optimizer_states, optimizer, trainer_state.json, ...


@dataclass(frozen=True)
class Suggestion:
    """Where to start averaging, and the numbers behind it."""

    position: int  # among the inspected checkpoints, 0-based
    start: int | None  # the index value to pass to --start (None when ordered by command line)
    count: int  # checkpoints the suggested command averages
    band: float
    tail_median: float
    tail_steps: int
    threshold: float
    settled: bool  # False when a step in the tail itself leaves the band
    command: str
    rule: str = "drift"  # what decided: "drift", "lr-settled" or "lr-cycle"
    reason: str = ""  # why, in words
    straightness: float | None = None  # net displacement / path length from the start on (>= 0.9: drifting)


@dataclass
class Inspection:
    """Everything `ckpt-avg inspect` shows; `--json` prints `to_dict()`."""

    version: str
    by: str
    rows: list[Row]
    order: str  # how the rows are ordered, in words (select.describe_order)
    state_dict_key: str | None
    float_tensors: int
    parameters: int
    band: float
    suggestion: Suggestion | None
    note: str = ""  # why there is no suggestion, or a caveat about it
    warnings: list[str] = field(default_factory=list)
    schedule: str = ""  # what the learning rate says: where it settled, or why it does not decide
    alternative: Suggestion | None = None  # the drift's own suggestion, where it differs from the schedule's

    @property
    def inspected(self) -> list[Row]:
        return [r for r in self.rows if r.inspected]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _finite(asdict(self))
        data["definitions"] = {
            "drift_prev": "||w[t] - w[t-1]||_2 / ||w[t-1]||_2 over every float tensor of the state dict",
            "drift_last": "||w[t] - w[T]||_2 / ||w[T]||_2, T the last inspected checkpoint",
            "suggestion": (
                "where the learning rate keeps its final value from (rule lr-settled) or its last cycle starts"
                " (lr-cycle); else (rule drift) the checkpoint ending the last step whose drift_prev exceeds"
                f" band x the median drift_prev of the last {TAIL_FRACTION:.0%} of steps (at least 2), the first"
                " when none does"
            ),
            "lr": "the learning rate stored with the checkpoint (first parameter group; lr_groups has them all)",
            "straightness": (
                "drift_last(start) / the sum of drift_prev after it: the share of the path from the start to the"
                f" last checkpoint that is a straight line; >= {STRAIGHT} with {MIN_STEADY_STEPS} steps or more"
                " means the weights still drift steadily"
            ),
        }
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)


def inspect_checkpoints(
    inputs: Sequence[str],
    options: Options | None = None,
    *,
    band: float = DEFAULT_BAND,
    chunk_elements: int = CHUNK_ELEMENTS,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Inspection:
    """Metrics, weight drift and a suggested --start for the checkpoints the options keep.

    Discovery and selection are those of `average_checkpoints`; the tensors are read once
    per checkpoint, streaming, and nothing is written.
    """
    options = options or Options()
    _validate(options)
    if not band > 1:
        raise CkptAvgError(f"band must be greater than 1, not {band}")
    run = _Run(inputs, options)
    run.open_selected()
    run, options, swa_rows = _without_lightning_swa_average(run, inputs, options)
    layout = run.layout(OutputKind.SAFETENSORS)  # a flat output: only the chosen state dict
    assert run.choice is not None
    units = [u for u in layout.primary_units if u.kind == "float"]
    if not units:
        raise CkptAvgError(
            f"{run.plan.selected[-1].ref.display}: state dict {dotted(run.choice.primary)} holds no float tensors"
        )
    if on_total is not None:
        on_total(sum(leaf_numel(u.leaves[0]) * itemsize(leaf.dtype) for u in units for leaf in u.leaves))
    prev, last = weight_drift([u.leaves for u in units], chunk_elements=chunk_elements, progress=progress)
    rates = [read_rate(opened) for opened in run.selected_opened]
    rows = with_rates(_rows(run, layout.names[run.choice.primary], prev, last), rates)
    rows = [replace(r, reason=swa_rows.get(r.path, r.reason)) for r in rows]
    inspected = [r for r in rows if r.inspected]
    labels = [_label(run.plan.by, row, t) for t, row in enumerate(inspected)]
    schedule = schedule_start(rates, labels)
    drift_position, note = drift_start(prev, last, labels, band=band)
    if unindexed_found(run.plan):
        # Never a silent order: drift and rates between names in natural order say nothing about the run.
        schedule = ScheduleStart(None, "", "")
        drift_position, note = None, (
            "the checkpoints carry no epoch or step in their names or contents, so they have no order"
            " to suggest a start in (name the files one by one in the order you mean, or rename them with"
            " their epoch)"
        )  # fmt: skip

    def suggest(position: int, rule: str, reason: str) -> Suggestion:
        differing = differing_integers(layout.primary_units, position, chunk_elements)
        if differing and not any(w.startswith("integer tensor(s)") for w in run.warnings):
            run.warnings.append(
                f"integer tensor(s) {', '.join(map(repr, differing))} differ between the checkpoints the suggestion"
                " averages; the suggested command copies them from the last (--int-policy last)"
            )
        made = _suggestion(position, inspected, prev, band, run.plan.by, inputs, options, bool(differing))
        reason = reason or _drift_reason(made)
        return replace(made, rule=rule, reason=reason, straightness=straightness(prev, last, position))

    suggestion, alternative, note = _choose(schedule, drift_position, note, suggest)
    return Inspection(
        version=__version__, by=run.plan.by, order=describe_order(run.plan), rows=rows,
        state_dict_key=dotted(run.choice.primary), float_tensors=len(units), parameters=parameter_count(layout),
        band=band, suggestion=suggestion, note=note, warnings=list(run.warnings), schedule=schedule.reason,
        alternative=alternative,
    )  # fmt: skip


def _without_lightning_swa_average(
    run: _Run, inputs: Sequence[str], options: Options
) -> tuple[_Run, Options, dict[str, str]]:
    """The run again with `--end E-1` where the last epoch E holds Lightning's SWA average.

    That checkpoint is no epoch of the run: as the drift's reference, and with its lr, it would
    skew the analysis, and the suggested command must leave it out. Returns the reason shown
    in its row, by path.
    """
    last = run.selected_opened[-1]
    if run.plan.by != "epoch" or options.select.end is not None or not holds_lightning_swa_average(last.tree):
        return run, options, {}
    end = int(last.tree["epoch"]) - 1
    narrowed = replace(options, select=replace(options.select, end=end))
    try:
        again = _Run(inputs, narrowed)
        again.open_selected()
    except CkptAvgError:
        return run, options, {}  # nothing else to inspect: keep it, with the warning
    again.warnings.append(
        f"{last.ref.display} holds Lightning's SWA average, not one epoch's weights: left out of the"
        f" analysis, and the suggested command leaves it out with --end {end}"
    )
    return again, narrowed, {last.ref.display: f"Lightning's SWA average, not an epoch (--end {end})"}


def _choose(
    schedule: ScheduleStart, drift_position: int | None, drift_note: str, suggest: Callable[[int, str, str], Suggestion]
) -> tuple[Suggestion | None, Suggestion | None, str]:
    """The schedule decides where it can; the drift otherwise. Returns the suggestion, the drift's own
    where the two differ, and the note."""
    if schedule.position is None:
        if drift_position is None:
            return None, None, drift_note
        chosen = suggest(drift_position, "drift", "")
        if not drift_note and not chosen.settled:
            drift_note = "a step in the tail itself leaves the band: the run may not have settled yet"
        return chosen, None, drift_note
    chosen = suggest(schedule.position, schedule.rule, schedule.reason)
    alternative = None
    if drift_position is not None and drift_position != schedule.position:
        alternative = suggest(drift_position, "drift", "")
    note = f"the drift alone would suggest no start: {drift_note}" if drift_position is None and drift_note else ""
    return chosen, alternative, note


STRAIGHT = 0.9
MIN_STEADY_STEPS = 3
FAR_APART = 1.0  # a median step as long as the weights themselves: not one run settling


def drift_start(
    drift_prev: Sequence[float | None],
    drift_last: Sequence[float],
    labels: Sequence[str],
    *,
    band: float = DEFAULT_BAND,
) -> tuple[int | None, str]:
    """`suggest_start`, or None and why when the checkpoints from there on have not settled.

    Settled means the weights move about one place: a path that is nearly a straight line
    (`straightness` >= STRAIGHT) is a run still drifting, and checkpoints whose every step is as
    long as the weights (median drift/prev >= 1) are not one run.
    """
    position, note = suggest_start(drift_prev, band=band)
    if position is None:
        return None, note
    steps = [d for d in drift_prev[1:] if d is not None]
    median = statistics.median(steps[-tail_length(len(steps)) :])
    if median >= FAR_APART:
        return None, (
            f"each step moves the weights by {median:.3g} of their norm (median drift/prev of the tail):"
            " these checkpoints do not look like one run settling"
        )
    share = straightness(drift_prev, drift_last, position)
    if share is not None and share >= STRAIGHT:
        return None, (
            f"the weights drift steadily to the end: from {labels[position]} on they move along a nearly straight"
            f" line (straightness {share:.2f}: drift/last there over the sum of the drift/prev after it)"
        )
    return position, ""


def straightness(drift_prev: Sequence[float | None], drift_last: Sequence[float], position: int) -> float | None:
    """drift/last(position) over the sum of drift/prev after it: 1 for a straight path, ~1/n for noise.

    None with fewer than MIN_STEADY_STEPS steps (too few to tell) or non-finite drift.

    >>> straightness([None, 0.1, 0.1, 0.1], [0.3, 0.2, 0.1, 0.0], 0)
    1.0
    """
    steps = drift_prev[position + 1 :]
    if len(steps) < MIN_STEADY_STEPS or not all(s is not None and math.isfinite(s) for s in steps):
        return None
    path = math.fsum(s for s in steps if s is not None)
    if path == 0 or not math.isfinite(drift_last[position]):
        return 0.0 if path == 0 else None
    return round(drift_last[position] / path, 12)


def with_rates(rows: list[Row], rates: Sequence[Rate | None]) -> list[Row]:
    """The inspected rows with their learning rate; `lr` and `learning_rate` leave the metrics for its column."""
    out: list[Row] = []
    inspected = iter(rates)
    for row in rows:
        rate = next(inspected) if row.inspected else None
        if rate is not None:
            metrics = {k: v for k, v in row.metrics.items() if k not in _RATE_KEYS}
            row = replace(row, lr=rate.first, lr_groups=list(rate.groups), lr_source=rate.source, metrics=metrics)
        out.append(row)
    return out


def _label(by: str, row: Row, position: int) -> str:
    return f"checkpoint #{position}" if by == "order" or row.index is None else f"{by} {row.index}"


def _drift_reason(s: Suggestion) -> str:
    return (
        f"from there on every drift/prev is within {s.band:g} x {s.tail_median:.3g}, the median of the last"
        f" {s.tail_steps} steps"
    )


def weight_drift(
    tensors: Sequence[Sequence[TensorLeaf]],
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float | None], list[float]]:
    """drift/prev and drift/last of each checkpoint; `tensors` holds one leaf per checkpoint each.

    Reads chunk by chunk: the last checkpoint's chunk, then each checkpoint's in order,
    keeping the previous one; squares are summed in float64.

    >>> a, b = torch.ones(4), torch.full((4,), 2.0)
    >>> weight_drift([(a, b)])
    ([None, 1.0], [0.5, 0.0])
    """
    count = len(tensors[0]) if tensors else 0
    norm2 = [0.0] * count
    prev2 = [0.0] * count
    last2 = [0.0] * count
    for leaves in tensors:
        with _ChunkReader() as reader:
            for start, size in _chunks(leaves, chunk_elements):
                last = reader.read(leaves[-1], start, size).to(torch.float64)
                previous: torch.Tensor | None = None
                for t, leaf in enumerate(leaves):
                    current = last if t == count - 1 else reader.read(leaf, start, size).to(torch.float64)
                    norm2[t] += _square_sum(current)
                    last2[t] += _square_sum(current - last) if t != count - 1 else 0.0
                    if previous is not None:
                        prev2[t] += _square_sum(current - previous)
                    previous = current
                    if progress is not None:
                        progress(size * itemsize(leaf.dtype))
    drift_prev: list[float | None] = [None] + [_ratio(prev2[t], norm2[t - 1]) for t in range(1, count)]
    drift_last = [_ratio(last2[t], norm2[-1]) for t in range(count)]
    return drift_prev, drift_last


def differing_integers(units: Sequence[Unit], first: int, chunk_elements: int = CHUNK_ELEMENTS) -> list[str]:
    """Integer tensors (not counters) that differ among checkpoints `first` .. T: the main command refuses them."""
    names: list[str] = []
    for unit in units:
        leaves = unit.leaves[first:]
        if unit.kind != "int" or len(leaves) < 2:
            continue
        with _ChunkReader() as reader:
            for start, size in _chunks(leaves, chunk_elements):
                reference = reader.read(leaves[-1], start, size)
                if any(not torch.equal(reader.read(leaf, start, size), reference) for leaf in leaves[:-1]):
                    names.append(unit.names[0])
                    break
    return names


def _chunks(leaves: Sequence[TensorLeaf], chunk_elements: int) -> list[tuple[int, int]]:
    total = leaf_numel(leaves[0])
    return [(start, min(chunk_elements, total - start)) for start in range(0, total, chunk_elements)]


class _ChunkReader:
    """Elements [start, start+count) of a tensor in row-major order, whatever its strides.

    A transposed or expanded view is never made whole in memory here: a 1-element
    storage expanded to 2^27 elements, from a file of a few KB, would take gigabytes. Its
    chunk is gathered from the part of the storage the chunk touches (never more than
    the storage itself, which is real bytes of the file); a view whose chunks each touch
    most of a large storage (a transposed matrix) is copied out once to an unnamed
    temporary file and read back by range, as the averaging does.
    """

    def __init__(self) -> None:
        self._spilled: dict[int, SpilledTensor] = {}

    def __enter__(self) -> _ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        close_spilled(self._spilled)

    def read(self, leaf: TensorLeaf, start: int, count: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=leaf.dtype)
        if isinstance(leaf, torch.Tensor):
            if leaf.is_contiguous():
                return read_leaf_range(leaf, start, count)
            base = leaf.detach().as_strided((_span(leaf.shape, leaf.stride()),), (1,), leaf.storage_offset())
            index = _storage_indices(leaf.shape, leaf.stride(), start, count)
            return base[:1].expand(count) if index is None else base[index]
        if not isinstance(leaf, LazyTensor):  # another Leaf (a DCP tensor assembled from its chunks)
            if as_leaf(leaf).random_access:
                return read_leaf_range(leaf, start, count)
            return self._spill(leaf).read_into(start, count, _bytes_for(leaf, count))
        if leaf.is_contiguous():
            return leaf.read_range(start, count)
        spill = self._spilled.get(id(leaf))
        if spill is not None:
            return spill.read_into(start, count, _bytes_for(leaf, count))
        index = _storage_indices(leaf.shape, leaf.stride, start, count)
        if index is None:  # every element is the view's first: one element, broadcast
            return leaf.read_range(0, 1).expand(count)
        low, high = int(index.min()), int(index.max())
        window = high - low + 1
        overlapping = leaf.numel > _span(leaf.shape, leaf.stride)
        if overlapping or window <= max(4 * count, 1 << 20):
            part = LazyTensor(leaf.storage, leaf.dtype, (window,), (1,), leaf.storage_offset + low)
            return part.read_range(0, window)[index.sub_(low)]
        self._spill(leaf)  # as large as the storage: real bytes of the file
        return self.read(leaf, start, count)

    def _spill(self, leaf: TensorLeaf) -> SpilledTensor:
        spill = self._spilled.get(id(leaf))
        if spill is None:
            spill = self._spilled[id(leaf)] = SpilledTensor(leaf)
        return spill


def _bytes_for(leaf: TensorLeaf, count: int) -> torch.Tensor:
    return torch.empty(count * itemsize(leaf.dtype), dtype=torch.uint8)


def _span(shape: Sequence[int], stride: Sequence[int]) -> int:
    """Elements of storage a view reaches, from its first to its last."""
    if math.prod(shape) == 0:
        return 0
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))


def _storage_indices(shape: Sequence[int], stride: Sequence[int], start: int, count: int) -> torch.Tensor | None:
    """Storage positions (from the view's offset) of row-major elements [start, start+count).

    None when every element is at the view's offset (a single value broadcast).
    """
    dims = [(size, step) for size, step in zip(shape, stride, strict=True) if size != 1]
    while dims and dims[0][1] == 0:
        dims.pop(0)  # outer broadcast dimensions move nothing
    if not dims or count == 0 or all(step == 0 for _, step in dims):
        return None
    flat = torch.arange(start, start + count, dtype=torch.int64)
    index = torch.zeros(count, dtype=torch.int64)
    for position, (size, step) in enumerate(reversed(dims)):
        if step:
            index.add_(torch.remainder(flat, size).mul_(step))
        if position < len(dims) - 1:
            flat.floor_divide_(size)
    return index


def _square_sum(values: torch.Tensor) -> float:
    return float(torch.dot(values, values))


def _ratio(num2: float, den2: float) -> float:
    if den2 == 0:
        return 0.0 if num2 == 0 else math.inf
    return math.sqrt(num2) / math.sqrt(den2)


def suggest_start(drift_prev: Sequence[float | None], *, band: float = DEFAULT_BAND) -> tuple[int | None, str]:
    """Position of the suggested first checkpoint, or None and the reason there is none.

    The tail is the last quarter of the steps (at least 2); the threshold is `band` times
    their median; the suggestion is the checkpoint that ends the last step above it.

    >>> suggest_start([None, 1.0, 0.5, 0.01, 0.012, 0.011, 0.01])  # checkpoint 2 ends the last big step
    (2, '')
    """
    steps = [math.nan if d is None else d for d in drift_prev[1:]]
    if len(steps) + 1 < MIN_CHECKPOINTS:
        return None, f"too few checkpoints to suggest a start ({len(steps) + 1}; at least {MIN_CHECKPOINTS})"
    tail = steps[-tail_length(len(steps)) :]
    if not all(math.isfinite(s) for s in tail):
        return None, "the drift in the tail is not finite (NaN or Inf weights?)"
    threshold = band * statistics.median(tail)
    above = [t for t, s in enumerate(steps, start=1) if not s <= threshold]
    return (above[-1] if above else 0), ""


def tail_length(steps: int) -> int:
    """How many of the last steps form the tail: a quarter, at least 2."""
    return min(steps, max(2, math.ceil(steps * TAIL_FRACTION)))


def _suggestion(
    position: int,
    inspected: list[Row],
    drift_prev: Sequence[float | None],
    band: float,
    by: str,
    inputs: Sequence[str],
    options: Options,
    int_policy_last: bool,
) -> Suggestion:
    steps = [d if d is not None else math.nan for d in drift_prev[1:]]
    tail = steps[-tail_length(len(steps)) :]
    median = statistics.median(tail)
    count = len(inspected) - position
    start = inspected[position].index if by != "order" else None
    return Suggestion(
        position=position, start=start, count=count, band=band, tail_median=median, tail_steps=len(tail),
        threshold=band * median, settled=position < len(steps) + 1 - len(tail),
        command=suggested_command(
            inputs,
            options,
            start=start,
            last=count if start is None else None,
            int_policy_last=int_policy_last,
            output=_suggested_output([row.path for row in inspected]),
        ),
    )  # fmt: skip


def _suggested_output(paths: Sequence[str]) -> str:
    """An OUTPUT like the inputs: a directory for directories (Trainer, DCP), else their suffix
    (a Lightning run's `.ckpt` stays loadable with `load_from_checkpoint`)."""
    if all(os.path.isdir(path) for path in paths):
        return "avg/"
    suffixes = {".pth.tar" if p.endswith(".pth.tar") else os.path.splitext(p)[1] for p in paths}
    return f"avg{suffixes.pop()}" if len(suffixes) == 1 and suffixes <= set(OUTPUT_SUFFIXES) else "avg.pt"


def suggested_command(
    inputs: Sequence[str],
    options: Options,
    *,
    start: int | None,
    last: int | None,
    int_policy_last: bool = False,
    output: str = "avg.pt",
) -> str:
    """The `ckpt-avg` command line that averages from the suggested start, ready to paste."""
    words = ["ckpt-avg"]
    words += ["--start", str(start)] if start is not None else ["--last", str(last)]
    select = options.select
    if select.end is not None:
        words += ["--end", str(select.end)]
    if select.by is not None:
        words += ["--by", select.by]
    if options.recursive:
        words.append("--recursive")
    if options.glob is not None:
        words += ["--glob", options.glob]
    if options.key is not None:
        words += ["--key", options.key]
    for prefix in options.strip_prefix:
        words += ["--strip-prefix", prefix]
    if int_policy_last:
        words += ["--int-policy", "last"]
    if options.trust_pickle:
        words.append("--trust-pickle")
    for name in options.allow_global:
        words += ["--allow-global", name]
    return shlex.join([*words, *inputs, "-o", output])


def _rows(run: _Run, names: dict[str, Unit], prev: list[float | None], last: list[float]) -> list[Row]:
    rows: list[Row] = []
    position = 0
    for entry in run.plan.entries:
        c = entry.candidate
        row = Row(c.ref.display, entry.index, c.epoch, c.step, c.ref.size, inspected=False, reason=entry.reason)
        if not entry.selected:
            rows.append(replace(row, metrics=_metrics(c.metrics)))
            continue
        opened = run.selected_opened[position]
        dtypes = Counter(_short(unit.leaves[position].dtype) for unit in names.values())
        metrics = _metrics({**content_meta(opened).metrics, **_lightning_score(opened), **c.metrics})
        rows.append(
            replace(row, inspected=True, dtypes=dict(sorted(dtypes.items())), metrics=metrics,
                    drift_prev=prev[position], drift_last=last[position])
        )  # fmt: skip
        position += 1
    for skipped in run.discovery.skipped:
        rows.append(Row(skipped.display, None, None, None, 0, inspected=False, reason=skipped.reason))
    return rows


def _metrics(found: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in sorted(found.items()) if k not in _NOT_METRICS}


def _lightning_score(opened: OpenedCheckpoint) -> dict[str, float]:
    """The monitored value a Lightning ModelCheckpoint stored (`current_score`), by its name."""
    callbacks = opened.tree.get("callbacks") if isinstance(opened.tree, dict) else None
    if not isinstance(callbacks, dict):
        return {}
    scores: dict[str, float] = {}
    for name, state in callbacks.items():
        if not (isinstance(name, str) and name.startswith("ModelCheckpoint") and isinstance(state, dict)):
            continue
        monitor, score = state.get("monitor"), state.get("current_score")
        if isinstance(monitor, str) and is_tensor_leaf(score) and leaf_numel(score) == 1:
            value = float(read_leaf_range(score, 0, 1).to(torch.float64)[0])
            scores.setdefault(monitor, value)
    return scores


def _short(dtype: torch.dtype) -> str:
    return short_name(dtype)


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# -- the table ---------------------------------------------------------------------------------


def shown_metrics(inspection: Inspection) -> list[str]:
    """The metric columns of the table: those most candidates carry, then by name."""
    counts = Counter(name for row in inspection.rows for name in row.metrics)
    return sorted(counts, key=lambda name: (-counts[name], name))[:SHOWN_METRICS]


def inspection_table(inspection: Inspection) -> str:
    """The table of every candidate, the definitions, and the suggested command."""
    metrics = shown_metrics(inspection)
    suggestion = inspection.suggestion
    by = inspection.by if inspection.by != "order" else "#"
    rates = any(row.lr is not None for row in inspection.rows)
    header = [
        "", by, "file", "size", "dtypes", *map(terminal_safe, metrics), *(["lr"] if rates else []),
        "drift/prev", "drift/last", "",
    ]  # fmt: skip
    lines = [header]
    position = 0
    for row in inspection.rows:
        mark = "-"
        if row.inspected:
            mark = "*" if suggestion is not None and position >= suggestion.position else ""
            position += 1
        dtypes = " ".join(f"{name}:{n}" for name, n in row.dtypes.items())
        lines.append([
            mark, _text(row.index), terminal_safe(row.path), human_size(row.size) if row.size else "", dtypes,
            *(_number(row.metrics.get(name)) for name in metrics), *([_rate(row)] if rates else []),
            _number(row.drift_prev), _number(row.drift_last) if row.inspected else "", terminal_safe(row.reason),
        ])  # fmt: skip
    text = _align(lines, numeric={1, 3, *range(5, 5 + len(metrics) + rates + 2)})
    # The footer names the state dict and repeats the inputs in the suggested command.
    return "\n".join([text, *(terminal_safe(line) for line in _footer(inspection, len(metrics)))])


def _align(rows: list[list[str]], numeric: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))]
        out.append(("  ".join(cells) + "  " + r[-1]).rstrip())
    return "\n".join(out)


def _footer(inspection: Inspection, shown: int) -> list[str]:
    total = len({name for row in inspection.rows for name in row.metrics})
    lines = [
        f"{len(inspection.inspected)} checkpoint(s) inspected, {inspection.order};"
        f" state dict: {inspection.state_dict_key}, {inspection.float_tensors} float tensors,"
        f" {inspection.parameters:,} parameters"
        + (f"; {total - shown} more metric(s) in --json" if total > shown else ""),
        "drift/prev = ||w[t] - w[t-1]|| / ||w[t-1]||, drift/last = ||w[t] - w[last]|| / ||w[last]||"
        " (L2 over all float tensors)",
    ]
    if any(row.lr is not None for row in inspection.rows):
        lines.append("lr = the learning rate stored with the checkpoint: the rate training resumes at from there")
    return lines + suggestion_lines(inspection)


def suggestion_lines(inspection: Inspection) -> list[str]:
    """What the schedule says, the suggested command and which rule decided, and the drift's own where it differs."""
    s = inspection.suggestion
    lines = []
    if inspection.schedule and (s is None or s.rule == "drift"):
        lines.append(f"Learning rate: {inspection.schedule}, so the drift decides.")
    if s is None:
        return [*lines, f"No suggested start: {inspection.note}"]
    agrees = (
        " (the drift agrees)" if s.rule != "drift" and inspection.alternative is None and not inspection.note else ""
    )
    lines += [
        f"Suggested start: {_where(inspection, s)} (*) - {s.reason}{agrees}; {s.count} checkpoint(s) to average:",
        f"  {s.command}",
    ]
    a = inspection.alternative
    if a is not None:
        lines += [f"The drift alone suggests {_where(inspection, a)}: {a.reason}:", f"  {a.command}"]
    if inspection.note:
        lines.append(f"Note: {inspection.note}")
    return lines


def _where(inspection: Inspection, s: Suggestion) -> str:
    return f"{inspection.by} {s.start}" if s.start is not None else f"checkpoint #{s.position}"


def _rate(row: Row) -> str:
    return Rate(tuple(row.lr_groups), row.lr_source).text() if row.lr_groups else ""


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0:
        return "0"
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


# -- the plot ----------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Fail early, before any reading, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CkptAvgError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}") from None


def plot_inspection(inspection: Inspection, path: str) -> None:
    """Drift (log scale) and metrics (second axis) against the index, the suggested start marked.

    The image is written to a temporary file beside `path` and renamed into place.
    """
    require_matplotlib()
    directory = os.path.dirname(path) or "."
    suffix = os.path.splitext(path)[1].lower() or ".png"
    fd, temp = tempfile.mkstemp(prefix=".ckpt-avg-tmp-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _figure(inspection).savefig(f, format=suffix.lstrip("."), dpi=120)
        os.replace(temp, path)
    except (ValueError, OverflowError, RecursionError, RuntimeError) as exc:
        os.unlink(temp)  # matplotlib's own errors: an unknown format, text it cannot lay out
        raise CkptAvgError(f"--plot {path}: cannot draw the plot: {type(exc).__name__}: {exc}") from None
    except BaseException:
        os.unlink(temp)
        raise


def _figure(inspection: Inspection) -> Figure:
    """Stacked panels on one index axis: drift; the metrics; the learning rate (each where there is one)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = inspection.inspected
    xs = [r.index if r.index is not None else i for i, r in enumerate(rows)]
    metrics = [n for n in shown_metrics(inspection) if any(n in r.metrics for r in rows)]
    rates = any(r.lr is not None for r in rows)
    ratios = [2] + [1] * (bool(metrics) + rates)
    figure = Figure(figsize=(8, 3 + 1.6 * len(ratios)), layout="constrained")
    axes = list(figure.subplots(len(ratios), 1, sharex=True, squeeze=False, height_ratios=ratios)[:, 0])
    _drift_panel(axes[0], xs, inspection)
    if metrics:
        _metrics_panel(axes[1], xs, rows, metrics)
    if rates:
        _rate_panel(axes[-1], xs, rows)
    for n, ax in enumerate(axes):
        _mark_start(ax, xs, inspection, labelled=n == 0)  # one legend entry for the marks, in the top panel
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize="small", framealpha=0.9)
    axes[-1].set_xlabel(inspection.by if inspection.by != "order" else "checkpoint (command-line order)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"ckpt-avg inspect: {len(rows)} checkpoints, {inspection.parameters:,} parameters")
    return figure


def _drift_panel(ax: Any, xs: list[int], inspection: Inspection) -> None:
    rows = inspection.inspected
    prev = [_positive(r.drift_prev) for r in rows]
    last = [_positive(r.drift_last) for r in rows]
    ax.plot(xs, prev, "o-", color="tab:blue", ms=4, label="drift to previous")
    ax.plot(xs, last, "s-", color="tab:gray", ms=3, lw=1, alpha=0.8, label="drift to last")
    if any(math.isfinite(v) for v in prev + last):
        ax.set_yscale("log")
    s = inspection.alternative or inspection.suggestion
    if s is not None:
        ax.axhline(s.threshold, color="tab:green", ls=":", label=f"band: {s.band:g} x tail median")
    ax.set_ylabel("relative L2 drift")


def _metrics_panel(ax: Any, xs: list[int], rows: list[Row], names: list[str]) -> None:
    for name, color in zip(names, ("tab:orange", "tab:red", "tab:purple"), strict=False):
        values = [r.metrics.get(name, math.nan) for r in rows]
        ax.plot(xs, values, "^--", color=color, ms=4, lw=1, label=_literal(name))
    ax.set_ylabel("metrics")


def _rate_panel(ax: Any, xs: list[int], rows: list[Row]) -> None:
    first = [r.lr if r.lr is not None else math.nan for r in rows]
    ax.plot(xs, first, "o-", color="tab:brown", ms=4, label="learning rate" if _one_group(rows) else "lr, group 0")
    if not _one_group(rows):
        low = [min(r.lr_groups) if r.lr_groups else math.nan for r in rows]
        high = [max(r.lr_groups) if r.lr_groups else math.nan for r in rows]
        ax.fill_between(xs, low, high, color="tab:brown", alpha=0.15, label="lr, all groups")
    if all(v > 0 for r in rows for v in r.lr_groups):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # labels within a decade too
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("learning rate")


def _one_group(rows: list[Row]) -> bool:
    return all(len(set(r.lr_groups)) <= 1 for r in rows)


def _mark_start(ax: Any, xs: list[int], inspection: Inspection, *, labelled: bool) -> None:
    s, a = inspection.suggestion, inspection.alternative
    if s is not None:
        ax.axvspan(xs[s.position], xs[-1], color="tab:green", alpha=0.08)
        where = f"--start {s.start}" if s.start is not None else f"--last {s.count}"
        label = f"suggested {where} ({s.rule})" if labelled else None
        ax.axvline(xs[s.position], color="tab:green", lw=2, label=label)
    if a is not None:
        label = f"the drift alone: --start {a.start}" if labelled else None
        ax.axvline(xs[a.position], color="tab:green", lw=1, ls="--", label=label)


def _literal(text: str, limit: int = 60) -> str:
    """Text that matplotlib draws as written: a `$` in a metric name would start mathtext."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("$", r"\$")


def _positive(value: float | None) -> float:
    return value if value is not None and value > 0 and math.isfinite(value) else math.nan


__all__ = [
    "Inspection",
    "Row",
    "Suggestion",
    "differing_integers",
    "inspect_checkpoints",
    "inspection_table",
    "plot_inspection",
    "suggest_start",
    "weight_drift",
]
