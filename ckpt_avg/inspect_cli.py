"""The `ckpt-avg inspect` command: Click options and output only; the work is in inspect.py."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .cli_options import (
    CONTEXT_SETTINGS,
    StrictCommand,
    allow_global_option,
    by_option,
    cli_errors,
    debug_option,
    end_option,
    glob_option,
    key_option,
    last_option,
    progress_bar,
    recursive_option,
    start_option,
    strip_prefix_option,
    trust_pickle_option,
)
from .errors import UsageError
from .inspect import DEFAULT_BAND, inspect_checkpoints, inspection_table, plot_inspection, require_matplotlib
from .options import Options
from .report import terminal_safe
from .select import SelectOptions

EPILOG = """\b
Examples:
  ckpt-avg inspect lightning_logs/version_3/checkpoints/
  ckpt-avg inspect --plot drift.png ckpts/
  ckpt-avg inspect --json --glob 'epoch=*' runs/wmt/ | jq .suggestion.start
"""


@click.command(
    cls=StrictCommand,
    context_settings=CONTEXT_SETTINGS,
    epilog=EPILOG,
)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
# Discovery and selection mean the same here as in the main command: the same options.
@recursive_option
@glob_option
@by_option
@start_option
@end_option
@last_option
@key_option
@strip_prefix_option
@trust_pickle_option
@allow_global_option
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
@debug_option
def inspect_command(**params: Any) -> None:
    """Show every checkpoint of a run, how far its weights moved, and where to start averaging.

    For each checkpoint the options keep (in index order t = 0..T, w[t] all its float
    tensors): metrics found in the name or contents, the learning rate stored with it
    (optimizer or scheduler state, a Trainer's trainer_state.json; never tensor data),
    drift/prev = ||w[t] - w[t-1]|| / ||w[t-1]|| and drift/last = ||w[t] - w[T]|| / ||w[T]||
    (L2, streamed tensor by tensor, summed in float64; nothing is written).

    \b
    Suggested --start, printed as a ready `ckpt-avg --start N INPUT... -o avg.ckpt`
    (OUTPUT like the inputs: their suffix, or avg/ for checkpoint directories):
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
    with cli_errors(debug=params["debug"]):
        _run(params)


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
    with progress_bar(enabled=not quiet and sys.stderr.isatty(), desc="reading") as (progress, on_total):
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
