"""The `ckpt-avg inspect` command: Click options and output only; the work is in inspect.py."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from .api import Options
from .cli import _errors
from .cli import main as _average_command
from .cli_options import StrictCommand
from .errors import UsageError
from .inspect import DEFAULT_BAND, inspect_checkpoints, inspection_table, plot_inspection, require_matplotlib
from .report import terminal_safe
from .select import SelectOptions

EPILOG = """\b
Examples:
  ckpt-avg inspect lightning_logs/version_3/checkpoints/
  ckpt-avg inspect --plot drift.png ckpts/
  ckpt-avg inspect --json --glob 'epoch=*' runs/wmt/ | jq .suggestion.start
"""

# Discovery and selection mean the same here as in the main command: share its definitions.
SHARED_OPTIONS = (
    "recursive", "name_glob", "by", "start", "end", "last", "key", "strip_prefix",
    "trust_pickle", "allow_global",
)  # fmt: skip


@click.command(
    cls=StrictCommand,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "--band",
    type=click.FloatRange(min=1, min_open=True),
    default=DEFAULT_BAND,
    show_default=True,
    metavar="FACTOR",
    help="Width of the settled band, as a multiple of the tail's median drift/prev. Example: --band 2",
)
@click.option(
    "--plot",
    metavar="FILE.png",
    help="Also draw drift, metrics and learning rate against the index. Example: --plot drift.png",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of the table.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on stderr but errors.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def inspect_command(**params: Any) -> None:
    """Show every checkpoint of a run, how far its weights moved, and where to start averaging.

    For each checkpoint the options keep (in index order t = 0..T, w[t] all its float
    tensors): metrics found in the name or contents, the learning rate stored with it
    (optimizer or scheduler state, a Trainer's trainer_state.json; never tensor data),
    drift/prev = ||w[t] - w[t-1]|| / ||w[t-1]|| and drift/last = ||w[t] - w[T]|| / ||w[T]||
    (L2, streamed tensor by tensor, summed in float64; nothing is written).

    \b
    Suggested --start, printed as a ready `ckpt-avg --start N INPUT... -o avg.pt`:
    - by the learning rate where it has a schedule: the first checkpoint from which
      it keeps its final value (the end of SWALR's annealing, a step schedule's last
      drop), else the start of its last cycle;
    - else by the drift: let m be the median drift/prev of the tail (the last quarter
      of the steps, at least 2); the checkpoint ending the LAST step whose drift/prev
      exceeds FACTOR * m (--band, default 1.5), or the first if none does. None when
      the weights still drift along a straight line (straightness >= 0.9) or each
      step is as long as the weights. 4 checkpoints at least.
    Where the two rules disagree, both are shown.
    """
    with _errors(debug=params["debug"]):
        _run(params)


inspect_command.params[1:1] = [
    copy.copy(next(p for p in _average_command.params if p.name == name)) for name in SHARED_OPTIONS
]


def _options(params: dict[str, Any]) -> Options:
    select = SelectOptions(by=params["by"], start=params["start"], end=params["end"], last=params["last"])
    return Options(
        recursive=params["recursive"], glob=params["name_glob"], select=select, key=params["key"],
        strip_prefix=tuple(params["strip_prefix"]), trust_pickle=params["trust_pickle"],
        allow_global=tuple(params["allow_global"]),
    )  # fmt: skip


def _run(params: dict[str, Any]) -> None:
    plot, quiet = params["plot"], params["quiet"]
    if plot is not None:
        require_matplotlib()  # before reading anything
        parent = os.path.dirname(plot) or "."
        if not os.path.isdir(parent):
            raise UsageError(f"--plot {plot!r}: directory {parent!r} does not exist")
    if params["trust_pickle"] and not quiet:
        click.echo("Warning: --trust-pickle runs any code the checkpoints contain", err=True)
    with _progress(enabled=not quiet and sys.stderr.isatty()) as (progress, on_total):
        result = inspect_checkpoints(
            params["inputs"], _options(params), band=params["band"], progress=progress, on_total=on_total
        )
    if not quiet:
        for warning in result.warnings:
            click.echo(f"Warning: {terminal_safe(warning)}", err=True)
    click.echo(result.to_json() if params["as_json"] else inspection_table(result))
    if plot is not None:
        plot_inspection(result, plot)
        if not quiet:
            click.echo(f"Plot written to {terminal_safe(plot)}", err=True)


@contextmanager
def _progress(enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    if not enabled:
        yield (lambda _: None), (lambda _: None)
        return
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="reading", file=sys.stderr, leave=False)

    def advance(nbytes: int) -> None:
        bar.update(nbytes)

    def set_total(total: int) -> None:
        bar.total = total
        bar.refresh()

    try:
        yield advance, set_total
    finally:
        bar.close()
