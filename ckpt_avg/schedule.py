"""The learning rate each checkpoint was saved with, and where the schedule settles.

The rate is read from what a checkpoint already holds beside the weights, never from tensor
data: an optimizer state dict's `param_groups[j]['lr']` (Lightning `optimizer_states`,
a plain, torchvision, timm or mmengine `optimizer`, the PyTorch tutorial's
`optimizer_state_dict`, fairseq's `last_optimizer_state`), else a scheduler's `_last_lr`
(Lightning `lr_schedulers`, torchvision `lr_scheduler`), else a top-level `lr` number; for a
Trainer directory, the last `learning_rate` in `trainer_state.json`'s `log_history`; for a
DCP directory, its optimizer's `param_groups.*.lr` items (and nothing else of the optimizer). (A
tensor-valued rate, which fused or capturable optimizers may hold, is the one element read.)

Lightning steps epoch-interval schedulers before ModelCheckpoint saves, so its checkpoints
hold the rate the NEXT epoch trains with: the rate training continues at from there.

    >>> rates = [Rate((lr,), "optimizer") for lr in (0.1, 0.1, 0.05, 0.01, 0.01, 0.01)]
    >>> schedule_start(rates, [f"epoch {e}" for e in range(6)])
    ScheduleStart(position=3, rule='lr-settled', reason='lr reached 0.01 at epoch 3 and stayed')
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .dcp import optimizer_rates
from .jsonfile import read_json
from .lazy import is_tensor_leaf, leaf_numel, read_leaf_range
from .sources import OpenedCheckpoint

REL_TOL = 1e-6  # rates closer than this are one rate (schedules recompute them in float arithmetic)
MIN_PHASE = 2  # checkpoints a constant phase or a last cycle needs to be averaged
_OPTIMIZER_KEYS = ("optimizer_states", "optimizer", "optimizer_state_dict", "last_optimizer_state")
_SCHEDULER_KEYS = ("lr_schedulers", "lr_scheduler", "scheduler")
_TOP_LEVEL_KEYS = ("lr", "learning_rate")
EN_DASH = "\u2013"
NOT_METRICS = frozenset(_TOP_LEVEL_KEYS)  # shown in the lr column, not as metrics


@dataclass(frozen=True)
class Rate:
    """The learning rate of every parameter group, in order, and where it was read."""

    groups: tuple[float, ...]
    source: str

    @property
    def first(self) -> float:
        return self.groups[0]

    def text(self) -> str:
        """The first group's rate, or `min-max` (an en dash) where the groups differ."""
        low, high = min(self.groups), max(self.groups)
        if same_rate(low, high):
            return format_rate(self.first)
        return f"{format_rate(low)}{EN_DASH}{format_rate(high)}"


@dataclass(frozen=True)
class ScheduleStart:
    """Where the schedule says to start averaging (None: it does not decide) and why."""

    position: int | None
    rule: str  # "lr-settled", "lr-cycle", or "" when the schedule does not decide
    reason: str


def format_rate(value: float) -> str:
    return f"{value:.4g}"


def same_rate(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-30)


def read_rate(opened: OpenedCheckpoint) -> Rate | None:
    """The learning rate stored with a checkpoint, or None when it holds none."""
    if opened.dcp is not None:
        key, values = optimizer_rates(opened.dcp)
        rates = [r for r in (_number(v) for v in values) if r is not None]
        return Rate(tuple(rates), key) if rates else None
    if opened.ref.is_directory:
        return trainer_state_rate(os.path.join(os.path.dirname(opened.ref.files[0]), "trainer_state.json"))
    tree = opened.tree
    if not isinstance(tree, dict) or opened.safetensors_metadata:
        return None
    for key in _OPTIMIZER_KEYS:
        groups = _optimizer_rates(tree.get(key))
        if groups:
            return Rate(tuple(groups), key)
    for key in _SCHEDULER_KEYS:
        groups = _scheduler_rates(tree.get(key))
        if groups:
            return Rate(tuple(groups), key)
    for key in _TOP_LEVEL_KEYS:
        value = _number(tree.get(key))
        if value is not None:
            return Rate((value,), key)
    return None


def trainer_state_rate(path: str) -> Rate | None:
    """The last `learning_rate` a Hugging Face Trainer logged before saving (`trainer_state.json`)."""
    try:
        state = read_json(path)
    except (OSError, ValueError):
        return None
    history = state.get("log_history") if isinstance(state, dict) else None
    logged = [_number(e.get("learning_rate")) for e in history or [] if isinstance(e, dict)]
    rates = [r for r in logged if r is not None]
    return Rate((rates[-1],), "trainer_state.json") if rates else None


def _optimizer_rates(state: Any, seen: set[int] | None = None) -> list[float]:
    """Rates of every group of one optimizer state dict, a list of them, or a dict of named ones.

    Each container is looked at once (`seen`): a graph of shared lists from a few KB of
    pickle would otherwise be walked 2**60 times.
    """
    seen = set() if seen is None else seen
    if id(state) in seen:
        return []
    seen.add(id(state))
    if isinstance(state, dict) and isinstance(state.get("param_groups"), list):
        rates = [_number(g.get("lr")) for g in state["param_groups"] if isinstance(g, dict)]
        return [r for r in rates if r is not None]
    if isinstance(state, dict):  # mmengine with several optimizers: {name: state dict}
        return [r for value in state.values() if isinstance(value, dict) for r in _optimizer_rates(value, seen)]
    if isinstance(state, list | tuple):  # Lightning: one state dict per optimizer
        return [r for value in state for r in _optimizer_rates(value, seen)]
    return []


def _scheduler_rates(state: Any, seen: set[int] | None = None) -> list[float]:
    seen = set() if seen is None else seen
    if id(state) in seen:
        return []
    seen.add(id(state))
    if isinstance(state, list | tuple):
        return [r for value in state for r in _scheduler_rates(value, seen)]
    if isinstance(state, dict) and isinstance(state.get("_last_lr"), list | tuple):
        rates = [_number(v) for v in state["_last_lr"]]
        return [r for r in rates if r is not None]
    return []


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if is_tensor_leaf(value) and leaf_numel(value) == 1 and value.dtype.is_floating_point:
        number = float(read_leaf_range(value, 0, 1).to(torch.float64)[0])  # a tensor lr (fused/capturable Adam)
        return number if math.isfinite(number) else None
    return None


# -- the schedule's suggestion -------------------------------------------------------------------


def schedule_start(rates: Sequence[Rate | None], labels: Sequence[str]) -> ScheduleStart:
    """Where the learning rate settles on its final value, or where its last cycle starts.

    `labels` name each checkpoint in the reasons (`epoch 12`). The rules, in order: the
    first checkpoint from which the rate (every group) keeps its final value, when at least
    the last two hold it and an earlier one does not; else the start of the last cycle, a
    rise of the rate after it has fallen, when that cycle holds at least two checkpoints.
    Otherwise the schedule does not decide (`position` None) and `reason` says why.
    """
    missing = sum(r is None for r in rates)
    if missing:
        reason = "" if missing == len(rates) else f"no learning rate in {missing} of the {len(rates)} checkpoints"
        return ScheduleStart(None, "", reason)
    groups = [r.groups for r in rates if r is not None]
    if len({len(g) for g in groups}) > 1:
        return ScheduleStart(None, "", "the number of parameter groups changes between checkpoints")
    first = constant_from(groups)
    text = [r.text() for r in rates if r is not None]
    if first == 0:
        return ScheduleStart(None, "", f"lr is {text[-1]} throughout")
    if first <= len(groups) - MIN_PHASE:
        return ScheduleStart(first, "lr-settled", f"lr reached {text[-1]} at {labels[first]} and stayed")
    cycle = last_cycle(groups)
    if cycle is not None:
        reason = (
            f"the last cycle of the learning rate starts at {labels[cycle]} (lr rose from {text[cycle - 1]}"
            f" to {text[cycle]})"
        )
        rises = _rises([g[0] for g in groups])
        later = [t for t in rises if t > cycle and t - 1 not in rises]
        if later:
            reason += f"; the rise at {labels[later[-1]]} starts a cycle too short to average"
        return ScheduleStart(cycle, "lr-cycle", reason)
    return ScheduleStart(
        None, "", f"lr still changes at the last checkpoint ({text[0]} to {text[-1]}): no constant or cyclic phase"
    )


def constant_from(groups: Sequence[tuple[float, ...]]) -> int:
    """The first position from which every checkpoint holds the last checkpoint's rates."""
    first = len(groups) - 1
    while first > 0 and _same(groups[first - 1], groups[-1]):
        first -= 1
    return first


def last_cycle(groups: Sequence[tuple[float, ...]]) -> int | None:
    """Start of the last cycle: the last rise of the rate that follows a fall, with two checkpoints from it on.

    A rise before the first fall is a warm-up, not a cycle; a rise over several checkpoints
    (a triangular cycle) starts where it starts.
    """
    rises = _rises([g[0] for g in groups])
    starts = [t for t in rises if t - 1 not in rises and len(groups) - t >= MIN_PHASE]
    return starts[-1] if starts else None


def _rises(rates: Sequence[float]) -> list[int]:
    """Positions where the rate is higher than at the one before, after its first fall."""
    changed = [t for t in range(1, len(rates)) if not same_rate(rates[t], rates[t - 1])]
    falls = [t for t in changed if rates[t] < rates[t - 1]]
    return [t for t in changed if falls and t > falls[0] and rates[t] > rates[t - 1]]


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(same_rate(x, y) for x, y in zip(a, b, strict=True))


__all__ = ["Rate", "ScheduleStart", "read_rate", "schedule_start", "trainer_state_rate"]
