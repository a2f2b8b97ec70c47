"""The public Python API: plan and average checkpoints; the CLI is a thin layer over it.

    >>> from ckpt_avg import average_checkpoints
    >>> report = average_checkpoints(["ckpts/"], "avg.pt", start=20)  # doctest: +SKIP
    >>> report.selected[0].path  # doctest: +SKIP
    'ckpts/epoch=20-step=2100.ckpt'

Data flows one way: discover -> select -> open -> average -> write -> report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .average import Digests
from .dtypes import BY_OPTION
from .guard import OutputKind, check_output
from .options import Options as Options  # re-exported: `from ckpt_avg.api import Options` keeps working
from .report import Report
from .run import (
    _batchnorm,
    _Discard,
    _merge,
    _report,
    _Run,
    _validate,
    run_engine,
)
from .write import remove_stale_temps
from .writers import ordered_visits, write_output

DTYPES = BY_OPTION  # --dtype's spellings


def plan_checkpoints(inputs: Sequence[str], options: Options | None = None) -> Report:
    """What a run would average, without reading tensor data or writing anything."""
    options = options or Options()
    _validate(options)
    run = _Run(inputs, options)
    run.open_selected()
    return run.report(dry_run=True)


def average_checkpoints(
    inputs: Sequence[str],
    output: str,
    options: Options | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    process_group: Any = None,
    **choices: Any,
) -> Report:
    """Average the selected checkpoints into OUTPUT and return the report.

    Keyword choices are a shortcut for the fields of `Options` and `SelectOptions`:
    `average_checkpoints(["ckpts/"], "avg.pt", start=20)`.

    `process_group` (a `torch.distributed` group of several ranks, each calling this with the
    same arguments) splits the writing of a directory OUTPUT over its ranks; the output is
    the same bytes a single process writes.
    """
    options = _merge(options or Options(), choices)
    if process_group is not None:
        from .distributed import average_on_ranks, ranks_of

        if ranks_of(process_group).world > 1:
            return average_on_ranks(inputs, output, options, process_group, progress=progress, on_total=on_total)
    named = _validate(options, output)
    assert named is not None
    started = time.monotonic()
    run = _Run(inputs, options)
    kind = run.output_kind(named)
    check_output(output, [(r.display, r.files) for r in run.discovery.refs], force=options.force)
    run.open_selected()
    layout = run.layout(kind, output)
    if on_total is not None:
        on_total(layout.input_bytes)
    remove_stale_temps(output)
    overrides = _batchnorm(run, layout, options)
    advance = progress or (lambda _: None)

    def runner(sink: Any, primary_only: bool, order: Sequence[str] | None = None) -> Digests:
        if order is not None:  # the tensors in the order of the file (a unit is computed at its first name)
            visits = ordered_visits(layout.visits, order)
        else:
            visits = [v for v in layout.visits if v.digest] if primary_only else layout.visits
        return run_engine(layout, options, sink, advance, visits, overrides)

    written = write_output(output, kind, layout, run.provenance(), options, runner)
    return _report(run, layout, written, output, started)


def average_digests(inputs: Sequence[str], options: Options) -> tuple[Report, Digests]:
    """The tensor digests an average of `inputs` would have, computed without writing anything.

    `verify --recompute` compares them with an output's provenance; only the digested
    (primary) state dict is averaged.
    """
    _validate(options)
    run = _Run(inputs, options)
    run.open_selected()
    layout = run.layout(OutputKind.SAFETENSORS)
    overrides = _batchnorm(run, layout, options)
    digests = run_engine(layout, options, _Discard(), lambda _: None, [v for v in layout.visits if v.digest], overrides)
    return run.report(dry_run=False), digests
