"""Look at a run before choosing what to average: metrics, weight drift and a suggested --start.

For the checkpoints that the discovery and selection options keep, in index order
t = 0 .. T, with θ_t the vector of every floating-point tensor of the chosen state dict:

    drift/prev(t) = ||θ_t - θ_(t-1)||_2 / ||θ_(t-1)||_2      (t >= 1)
    drift/last(t) = ||θ_t - θ_T||_2     / ||θ_T||_2

computed tensor by tensor and chunk by chunk (three chunks in memory, whatever the size of
the model or the number of checkpoints), with sums of squares accumulated in float64.

The suggested start is where the run has settled: with s_1 .. s_T the drift/prev values,
m the median of the tail (the last quarter of the s_t, at least 2 of them) and a band
factor b (default 1.5), it is the checkpoint k that ends the LAST step with s_k > b * m
(checkpoint 0 when no step exceeds it). From k on, every step stays within b * m, so the
checkpoints k .. T lie in the settled region that SWA averages over.

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

from . import __version__
from .api import Options, _Run, _validate
from .average import Unit
from .errors import CkptAvgError
from .lazy import TensorLeaf, as_leaf, is_tensor_leaf, itemsize, leaf_numel, read_leaf_range
from .report import human_size
from .sources import OpenedCheckpoint, content_meta
from .statedict import dotted

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_BAND = 1.5
TAIL_FRACTION = 0.25
MIN_CHECKPOINTS = 4  # three steps: fewer cannot separate a tail from what comes before it
CHUNK_ELEMENTS = 1 << 21
SHOWN_METRICS = 3  # metric columns in the table; --json carries them all
PLOT_HINT = "pip install 'ckpt-avg[plot]'"
_NOT_METRICS = frozenset({"epoch", "step", "global_step", "total_flos"})
_SHORT_DTYPES = {
    torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool",
}  # fmt: skip


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


@dataclass
class Inspection:
    """Everything `ckpt-avg inspect` shows; `--json` prints `to_dict()`."""

    version: str
    by: str
    rows: list[Row]
    state_dict_key: str | None
    float_tensors: int
    parameters: int
    band: float
    suggestion: Suggestion | None
    note: str = ""  # why there is no suggestion, or a caveat about it
    warnings: list[str] = field(default_factory=list)

    @property
    def inspected(self) -> list[Row]:
        return [r for r in self.rows if r.inspected]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _finite(asdict(self))
        data["definitions"] = {
            "drift_prev": "||w[t] - w[t-1]||_2 / ||w[t-1]||_2 over every float tensor of the state dict",
            "drift_last": "||w[t] - w[T]||_2 / ||w[T]||_2, T the last inspected checkpoint",
            "suggestion": (
                f"the checkpoint ending the last step whose drift_prev exceeds band x the median drift_prev"
                f" of the last {TAIL_FRACTION:.0%} of steps (at least 2); the first when none does"
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
    layout = run.layout("inspect.safetensors")  # a flat output: only the chosen state dict
    assert run.choice is not None
    units = [u for u in layout.primary_units if u.kind == "float"]
    if not units:
        raise CkptAvgError(
            f"{run.plan.selected[-1].ref.display}: state dict {dotted(run.choice.primary)} holds no float tensors"
        )
    if on_total is not None:
        on_total(sum(leaf_numel(u.leaves[0]) * itemsize(leaf.dtype) for u in units for leaf in u.leaves))
    prev, last = weight_drift([u.leaves for u in units], chunk_elements=chunk_elements, progress=progress)
    rows = _rows(run, layout.names[run.choice.primary], prev, last)
    inspected = [r for r in rows if r.inspected]
    position, note = suggest_start(prev, band=band)
    suggestion = None
    if position is not None:
        differing = differing_integers(layout.primary_units, position, chunk_elements)
        if differing:
            run.warnings.append(
                f"integer tensor(s) {', '.join(map(repr, differing))} differ between the checkpoints the suggestion"
                " averages; the suggested command copies them from the last (--int-policy last)"
            )
        suggestion = _suggestion(position, inspected, prev, band, run.plan.by, inputs, options, bool(differing))
        if not suggestion.settled:
            note = "a step in the tail itself leaves the band: the run may not have settled yet"
    return Inspection(
        version=__version__, by=run.plan.by, rows=rows, state_dict_key=dotted(run.choice.primary),
        float_tensors=len(units), parameters=sum(u.numel for u in units), band=band,
        suggestion=suggestion, note=note, warnings=list(run.warnings),
    )  # fmt: skip


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
        for start, size in _chunks(leaves, chunk_elements):
            last = _read64(leaves[-1], start, size)
            previous: torch.Tensor | None = None
            for t, leaf in enumerate(leaves):
                current = last if t == count - 1 else _read64(leaf, start, size)
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
        for start, size in _chunks(leaves, chunk_elements):
            reference = read_leaf_range(leaves[-1], start, size)
            if any(not torch.equal(read_leaf_range(leaf, start, size), reference) for leaf in leaves[:-1]):
                names.append(unit.names[0])
                break
    return names


def _chunks(leaves: Sequence[TensorLeaf], chunk_elements: int) -> list[tuple[int, int]]:
    total = leaf_numel(leaves[0])
    if any(not as_leaf(x).random_access for x in leaves):
        chunk_elements = max(total, 1)  # a strided view is read whole anyway: read it once
    return [(start, min(chunk_elements, total - start)) for start in range(0, total, chunk_elements)]


def _read64(leaf: TensorLeaf, start: int, size: int) -> torch.Tensor:
    return read_leaf_range(leaf, start, size).to(torch.float64)


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
            # Trainer checkpoint directories average into one that from_pretrained loads.
            output="avg/" if all(os.path.isdir(row.path) for row in inspected) else "avg.pt",
        ),
    )  # fmt: skip


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
    return _SHORT_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


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
    header = ["", by, "file", "size", "dtypes", *metrics, "drift/prev", "drift/last", ""]
    lines = [header]
    position = 0
    for row in inspection.rows:
        mark = "-"
        if row.inspected:
            mark = "*" if suggestion is not None and position >= suggestion.position else ""
            position += 1
        dtypes = " ".join(f"{name}:{n}" for name, n in row.dtypes.items())
        lines.append([
            mark, _text(row.index), row.path, human_size(row.size) if row.size else "", dtypes,
            *(_number(row.metrics.get(name)) for name in metrics),
            _number(row.drift_prev), _number(row.drift_last) if row.inspected else "", row.reason,
        ])  # fmt: skip
    text = _align(lines, numeric={1, 3, *range(5, 5 + len(metrics) + 2)})
    return "\n".join([text, *_footer(inspection, len(metrics))])


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
        f"{len(inspection.inspected)} checkpoint(s) inspected, ordered by {inspection.by};"
        f" state dict: {inspection.state_dict_key}, {inspection.float_tensors} float tensors,"
        f" {inspection.parameters:,} parameters"
        + (f"; {total - shown} more metric(s) in --json" if total > shown else ""),
        "drift/prev = ||w[t] - w[t-1]|| / ||w[t-1]||, drift/last = ||w[t] - w[last]|| / ||w[last]||"
        " (L2 over all float tensors)",
    ]
    s = inspection.suggestion
    if s is None:
        lines.append(f"No suggested start: {inspection.note}")
        return lines
    where = f"{inspection.by} {s.start}" if s.start is not None else f"checkpoint #{s.position}"
    lines += [
        f"Suggested start: {where} (*) - from there on every drift/prev is within {s.band:g} x {s.tail_median:.3g}"
        f", the median of the last {s.tail_steps} steps; {s.count} checkpoint(s) to average:",
        f"  {s.command}",
    ]
    if inspection.note:
        lines.append(f"Note: {inspection.note}")
    return lines


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
    figure = _figure(inspection)
    directory = os.path.dirname(path) or "."
    suffix = os.path.splitext(path)[1].lower() or ".png"
    fd, temp = tempfile.mkstemp(prefix=".ckpt-avg-tmp-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            figure.savefig(f, format=suffix.lstrip("."), dpi=120)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _figure(inspection: Inspection) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = inspection.inspected
    xs = [r.index if r.index is not None else i for i, r in enumerate(rows)]
    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.subplots()
    prev = [_positive(r.drift_prev) for r in rows]
    last = [_positive(r.drift_last) for r in rows]
    handles = ax.plot(xs, prev, "o-", color="tab:blue", ms=4, label="drift to previous")
    handles += ax.plot(xs, last, "s-", color="tab:gray", ms=3, lw=1, alpha=0.8, label="drift to last")
    if any(math.isfinite(v) for v in prev + last):
        ax.set_yscale("log")
    s = inspection.suggestion
    if s is not None:
        handles.append(ax.axhline(s.threshold, color="tab:green", ls=":", label=f"band: {s.band:g} x tail median"))
        ax.axvspan(xs[s.position], xs[-1], color="tab:green", alpha=0.08)
        handles.append(ax.axvline(xs[s.position], color="tab:green", lw=2, label=f"suggested --start {s.start}"))
    ax.set_xlabel(inspection.by if inspection.by != "order" else "checkpoint (command-line order)")
    ax.set_ylabel("relative L2 drift")
    ax.grid(True, which="major", alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles += _metric_lines(ax, xs, rows, shown_metrics(inspection))
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")
    ax.set_title(f"ckpt-avg inspect: {len(rows)} checkpoints, {inspection.parameters:,} parameters")
    return figure


def _metric_lines(ax: Any, xs: list[int], rows: list[Row], names: list[str]) -> list[Any]:
    names = [n for n in names if any(n in r.metrics for r in rows)]
    if not names:
        return []
    twin = ax.twinx()
    handles: list[Any] = []
    for name, color in zip(names, ("tab:orange", "tab:red", "tab:purple"), strict=False):
        values = [r.metrics.get(name, math.nan) for r in rows]
        handles += twin.plot(xs, values, "^--", color=color, ms=4, lw=1, label=name)
    twin.set_ylabel(", ".join(names))
    return handles


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
