"""Choosing which checkpoints to average: pure logic over candidates, no I/O.

Every candidate ends up in the plan, selected or with the reason it was left out.
"""

from __future__ import annotations

import math
import shlex
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .discover import CheckpointRef
from .errors import SelectionError, UsageError

_LOWER_IS_BETTER = ("loss", "err", "ppl", "perplexity", "wer", "cer", "mse", "mae", "rmse", "nll")
_OTHER_INDEX = {"epoch": "step", "step": "epoch"}
_HIGHER_IS_BETTER = ("acc", "f1", "bleu", "auc", "precision", "recall", "score", "map", "iou", "top1", "top5")


@dataclass(frozen=True, eq=False)
class Candidate:
    ref: CheckpointRef
    epoch: int | None
    step: int | None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def is_alias(self) -> bool:
        return self.ref.name.is_alias

    @property
    def mid_epoch(self) -> bool:
        return self.ref.name.mid_epoch

    def index(self, by: str) -> int | None:
        if by == "epoch":
            return self.epoch
        if by == "step":
            return self.step
        if by == "save":
            return self.ref.name.save
        return self.ref.order


@dataclass(frozen=True)
class SelectOptions:
    by: str | None = None
    start: float | None = None
    end: int | None = None
    last: int | None = None
    best: int | None = None
    metric: str | None = None
    mode: str | None = None
    # Every input, in the order given, no selection: `verify --recompute` averages exactly the
    # recorded inputs (or the files given in their place) in the recorded order.
    as_given: bool = False


@dataclass(frozen=True)
class PlanEntry:
    candidate: Candidate
    index: int | None
    reason: str = ""  # empty when selected

    @property
    def selected(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class Plan:
    by: str  # "epoch", "step", "save" (accelerate's save count) or "order" (no index)
    entries: tuple[PlanEntry, ...]

    @property
    def selected(self) -> tuple[Candidate, ...]:
        return tuple(e.candidate for e in self.entries if e.selected)


def validate_options(options: SelectOptions) -> None:
    """Usage errors that need no candidates to detect."""
    if options.by not in (None, "epoch", "step"):
        raise UsageError(f"--by must be epoch or step, not {options.by!r}")
    if options.start is not None and not math.isfinite(options.start):
        raise UsageError(f"--start must be a whole index or a fraction between 0 and 1, not {options.start}")
    if options.start is not None and options.start < 0:
        raise UsageError(f"--start must be >= 0, not {options.start}")
    fraction = options.start is not None and 0 < options.start < 1
    if options.start is not None and not fraction and options.start != int(options.start):
        raise UsageError(f"--start must be a whole index or a fraction between 0 and 1, not {options.start}")
    if options.start is not None and not fraction and options.end is not None and options.start > options.end:
        raise UsageError(f"--start {int(options.start)} is after --end {options.end}")
    for name, value in (("--last", options.last), ("--best", options.best)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, not {value}")
    if options.best is not None and not options.metric:
        raise UsageError("--best needs --metric NAME (for example --metric val_loss)")
    if options.mode not in (None, "min", "max"):
        raise UsageError(f"--mode must be min or max, not {options.mode!r}")


def metric_mode(metric: str, mode: str | None) -> str:
    if mode:
        return mode
    lowered = metric.lower()
    if any(word in lowered for word in _LOWER_IS_BETTER):
        return "min"
    if any(word in lowered for word in _HIGHER_IS_BETTER):
        return "max"
    raise UsageError(f"--metric {metric}: cannot tell whether lower or higher is better; give --mode min or max")


def make_plan(candidates: Sequence[Candidate], options: SelectOptions) -> Plan:
    """Order the candidates by their index and apply the selection options."""
    validate_options(options)
    if options.as_given:
        return Plan("order", tuple(PlanEntry(c, None) for c in sorted(candidates, key=lambda c: c.ref.order)))
    regular = [c for c in candidates if not c.is_alias]
    aliases = [c for c in candidates if c.is_alias]
    by, skipped = _index_kind(regular or aliases, options.by)
    if by == "order":
        refuse_unindexed_order(
            Plan(by, tuple(PlanEntry(c, None) for c in candidates)),
            [name for name, value in (("--start", options.start), ("--end", options.end), ("--last", options.last))
             if value is not None],
        )  # fmt: skip
    entries: list[PlanEntry] = [PlanEntry(c, c.index(by), reason) for c, reason in skipped]
    kept = [c for c in (regular or aliases) if c not in {s for s, _ in skipped}]
    if regular:
        taken = {c.index(by) for c in kept}
        for alias in aliases:
            index = alias.index(by)
            if index is None:
                entries.append(PlanEntry(alias, None, f"alias name, and its contents carry no {by}"))
            elif index in taken:
                entries.append(PlanEntry(alias, index, f"alias of the checkpoint with {by} {index}"))
            else:
                taken.add(index)
                kept.append(alias)
    kept.sort(key=lambda c: (c.index(by) if by != "order" else c.ref.order, c.ref.order))
    entries.extend(_apply_filters(kept, by, options))
    entries.sort(key=lambda e: (e.index is None, e.index if e.index is not None else 0, e.candidate.ref.order))
    plan = Plan(by, tuple(entries))
    if not plan.selected:
        raise SelectionError(
            "nothing selected: " + _why_nothing(plan, candidates), _table(plan) if plan.entries else ""
        )
    return plan


def _index_kind(candidates: list[Candidate], by: str | None) -> tuple[str, list[tuple[Candidate, str]]]:
    """Pick epoch or step (or command-line order), and drop superseded mid-epoch files."""
    kinds = [by] if by else ["epoch", "step", "save"]
    problems: list[str] = []
    for kind in kinds:
        skipped = _superseded_mid_epoch(candidates) if kind == "epoch" else []
        rest = [c for c in candidates if c not in {s for s, _ in skipped}]
        missing = [c for c in rest if c.index(kind) is None]
        groups: dict[int, list[Candidate]] = defaultdict(list)
        for c in rest:
            if c.index(kind) is not None:
                groups[c.index(kind)].append(c)  # type: ignore[index]
        collisions = {i: cs for i, cs in groups.items() if len(cs) > 1}
        if not missing and not collisions:
            return kind, skipped
        if kind != "save" or len(missing) < len(candidates):
            problems.append(_describe(kind, missing, collisions))
    if not by and all(c.epoch is None and c.step is None and c.ref.name.save is None for c in candidates):
        if all(c.is_alias for c in candidates) and not all(c.ref.explicit for c in candidates):
            names = " ".join(shlex.quote(c.ref.display) for c in candidates)
            raise SelectionError(
                "only copies that libraries write beside a run's checkpoints were found"
                f" ({', '.join(c.ref.display for c in candidates)}), no epochs to select from;"
                f" to average these very files, name them: ckpt-avg {names} -o OUTPUT"
            )
        return "order", []
    choose = "the index with --by epoch|step" if not by else f"the other index with --by {_OTHER_INDEX[by]}"
    raise SelectionError(
        f"cannot order the checkpoints: {'; '.join(problems)}. Choose {choose}, or narrow the inputs with --glob"
    )


def unindexed_found(plan: Plan) -> list[Candidate]:
    """Candidates in command-line or natural order that were found, not named one by one."""
    if plan.by != "order":
        return []
    return [e.candidate for e in plan.entries if not e.candidate.ref.explicit]


def refuse_unindexed_order(plan: Plan, options: Sequence[str]) -> None:
    """Never a silent order: options that need an order refuse names that carry none."""
    found = unindexed_found(plan)
    if not found or not options or len(plan.entries) < 2:
        return  # one checkpoint is in order
    names = ", ".join(c.ref.display for c in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    # No suggestion of --by: an order plan means no candidate carries an epoch or step to choose.
    raise SelectionError(
        f"{' and '.join(options)} {'needs' if len(options) == 1 else 'need'} an order, but {names} carry no epoch"
        " or step in their names or contents;"
        " name the files one by one in the order you mean, or rename them with their epoch (epoch_3.pt)"
    )


def describe_order(plan: Plan) -> str:
    """How the plan orders the checkpoints, in words: which of the order rules applies."""
    if plan.by == "save":
        return "ordered by save count (accelerate's checkpoint_N)"
    if plan.by != "order":
        return f"ordered by {plan.by}"
    named = {e.candidate.ref.explicit for e in plan.entries if e.selected}
    if named == {True}:
        return "in the order given on the command line (no epoch or step)"
    if named == {False}:
        return "in natural order of their names (no epoch or step)"
    return "files named one by one in the order given, those found in a directory or glob in natural order"


def _superseded_mid_epoch(candidates: list[Candidate]) -> list[tuple[Candidate, str]]:
    ends = {c.epoch: c for c in candidates if c.epoch is not None and not c.mid_epoch}
    return [
        (c, f"mid-epoch checkpoint; {ends[c.epoch].ref.display} ends epoch {c.epoch}")
        for c in candidates
        if c.mid_epoch and c.epoch in ends
    ]


def _describe(kind: str, missing: list[Candidate], collisions: dict[int, list[Candidate]]) -> str:
    parts = []
    if missing:
        names = ", ".join(c.ref.display for c in missing[:4])
        parts.append(f"no {kind} in {names}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    for index, group in sorted(collisions.items())[:3]:
        parts.append(f"{kind} {index} is shared by " + " and ".join(c.ref.display for c in group[:3]))
    return "; ".join(parts)


def _apply_filters(kept: list[Candidate], by: str, options: SelectOptions) -> list[PlanEntry]:
    entries: list[PlanEntry] = []
    pool = list(kept)

    def drop(candidates: list[Candidate], reason: str) -> None:
        for c in candidates:
            entries.append(PlanEntry(c, c.index(by), reason))
            pool.remove(c)

    if options.start is not None:
        if 0 < options.start < 1:
            cut = math.floor(options.start * len(pool))
            drop(pool[:cut], f"before the last {1 - options.start:g} of the run (--start {options.start:g})")
        else:
            drop([c for c in pool if (c.index(by) or 0) < options.start], f"{by} < --start {int(options.start)}")
    if options.end is not None:
        drop([c for c in pool if (c.index(by) or 0) > options.end], f"{by} > --end {options.end}")
    if options.best is not None and options.metric:
        entries.extend(_best(pool, by, options.best, options.metric, options.mode))
    if options.last is not None and len(pool) > options.last:
        drop(pool[: len(pool) - options.last], f"not among the --last {options.last}")
    entries.extend(PlanEntry(c, c.index(by)) for c in pool)
    return entries


def _best(pool: list[Candidate], by: str, k: int, metric: str, mode: str | None) -> list[PlanEntry]:
    direction = metric_mode(metric, mode)
    without = [c for c in pool if metric not in c.metrics]
    if without and len(without) == len(pool):
        raise SelectionError(
            f"--metric {metric}: no checkpoint records it (names like 'epoch=3-{metric}=0.231.ckpt'"
            " or a top-level value in the checkpoint)"
        )
    # NaN is neither better nor worse than anything: ranked, it would land anywhere.
    unranked = [c for c in pool if metric in c.metrics and math.isnan(c.metrics[metric])]
    if unranked and len(without) + len(unranked) == len(pool):
        raise SelectionError(f"--metric {metric}: every checkpoint that records it has the value NaN")
    entries = [PlanEntry(c, c.index(by), f"no {metric} recorded") for c in without]
    entries += [PlanEntry(c, c.index(by), f"{metric} is NaN; never among the --best") for c in unranked]
    without += unranked
    scored = [c for c in pool if c not in without]
    ranked = sorted(scored, key=lambda c: c.metrics[metric] if direction == "min" else -c.metrics[metric])
    for c in ranked[k:]:
        entries.append(PlanEntry(c, c.index(by), f"{metric}={c.metrics[metric]:g} not among the --best {k}"))
    for c in without + ranked[k:]:
        pool.remove(c)
    return entries


def _why_nothing(plan: Plan, candidates: Sequence[Candidate]) -> str:
    if not candidates:
        return "no checkpoints found"
    return f"{len(candidates)} checkpoint(s) found, none kept by the options"


def _table(plan: Plan) -> str:
    rows = [(plan.by, "file", "why not")]
    rows += [("" if e.index is None else str(e.index), e.candidate.ref.display, e.reason) for e in plan.entries]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0].rjust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}".rstrip() for r in rows)
