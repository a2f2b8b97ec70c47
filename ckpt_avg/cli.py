"""The `ckpt-avg` command: Click options, progress bars and error mapping, nothing else."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from ._version import __version__
from .api import average_checkpoints, plan_checkpoints
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
    on_sigterm,
    progress_bar,
    recursive_option,
    start_option,
    strip_prefix_option,
    trust_pickle_option,
)
from .dtypes import ACCUMULATOR_CHOICES, OUTPUT_CHOICES
from .options import Options
from .report import Report, plan_table, summary_line, terminal_safe
from .select import SelectOptions

EPILOG = """\b
Examples:
  ckpt-avg --start 20 ckpts/ -o avg.pt
  ckpt-avg --last 5 runs/wmt/ -o avg.safetensors
  ckpt-avg --dry-run --start 0.75 lightning_logs/version_3/checkpoints/
  ckpt-avg --best 3 --metric val_loss ckpts/ -o best3.ckpt
  ckpt-avg --ema 0.9 'ckpts/epoch_*.pt' -o ema.pt
  ckpt-avg output/checkpoint-*/ -o averaged/ --max-shard-size 5GB

  ckpt-avg inspect ckpts/ shows the run (weight drift, metrics) and suggests --start;
  see ckpt-avg inspect --help.
  ckpt-avg verify avg.pt checks an output against its provenance; see ckpt-avg verify --help.
"""


def _parse_weights(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


@click.command(
    cls=StrictCommand,
    context_settings=CONTEXT_SETTINGS,
    epilog=EPILOG,
)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "-o",
    "--output",
    metavar="OUTPUT",
    help="File to write (.pt .pth .pth.tar .ckpt .bin keep structure, .safetensors flat), or DIR/ for Hugging Face"
    " shards (a DCP checkpoint when the inputs are DCP; see --format). Example: -o avg.pt",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (every candidate, selected or why not) and write nothing."
)
@start_option
@end_option
@last_option
@click.option("--best", type=int, metavar="K", help="Keep the K best by --metric. Example: --best 3 --metric val_loss")
@click.option(
    "--metric",
    metavar="NAME",
    help="Metric for --best, read from the name (val_loss=0.23) or contents. Example: --metric val_loss",
)
@click.option(
    "--mode",
    type=click.Choice(["min", "max"]),
    help="Whether lower (min) or higher (max) --metric is better; guessed for loss/acc names. Example: --mode max",
)
@by_option
@glob_option
@recursive_option
@key_option
@strip_prefix_option
@click.option(
    "--weights",
    callback=_parse_weights,
    metavar="W1,W2,...",
    help="Weighted mean, one weight per selected checkpoint in index order. Example: --weights 1,2,3",
)
@click.option(
    "--ema", type=float, metavar="DECAY", help="Exponential moving average in index order. Example: --ema 0.9"
)
@click.option(
    "--dtype",
    type=click.Choice(OUTPUT_CHOICES),
    help="Output dtype of floating tensors (default: each tensor's own). Example: --dtype bfloat16",
)
@click.option(
    "--accum-dtype",
    type=click.Choice(ACCUMULATOR_CHOICES),
    default="float64",
    show_default=True,
    help="Accumulator dtype (float32 is faster, not exact). Example: --accum-dtype float32",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the arithmetic runs: cpu, cuda, cuda:N or mps. Example: --device cuda",
)
@click.option(
    "--int-policy",
    type=click.Choice(["error", "last"]),
    default="error",
    show_default=True,
    help="Non-counter integer tensors that differ: error, or copy from the last checkpoint. Example: --int-policy last",
)
@click.option("--allow-nonfinite", is_flag=True, help="Average tensors holding NaN or Inf instead of stopping.")
@trust_pickle_option
@allow_global_option
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="Shard a directory output. 5GB = 5*10^9 bytes, 5GiB = 5*2^30. Example: -o avg/ --max-shard-size 5GB",
)
@click.option(
    "--bn-model",
    metavar="MODULE:CALLABLE",
    help="Recompute BatchNorm statistics: a function returning the model. Example: --bn-model train:make_model",
)
@click.option(
    "--bn-data",
    metavar="DATA",
    help="Batches for --bn-model: MODULE:CALLABLE returning an iterable, or a .pt/.safetensors file of"
    " inputs. Example: --bn-data train:loader",
)
@click.option(
    "--bn-batch-size",
    type=int,
    default=32,
    show_default=True,
    help="Batch size when --bn-data is a file of inputs. Example: --bn-batch-size 64",
)
@click.option(
    "--bn-batches", type=int, metavar="N", help="Use at most N batches for the recompute. Example: --bn-batches 100"
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["hf", "dcp"]),
    help="A directory OUTPUT's format: Hugging Face safetensors shards, or torch.distributed.checkpoint"
    " (default: dcp when the inputs are DCP checkpoints, else hf). Example: -o avg/ --format hf",
)
@click.option("--force", is_flag=True, help="Overwrite an existing OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (or the plan, with --dry-run) on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (warnings stay in the --json report).")
@debug_option
@click.version_option(__version__, "--version", prog_name="ckpt-avg")
def main(**params: Any) -> None:
    """Average the weights of saved training checkpoints (offline SWA), exactly and safely.

    INPUT is any mix of checkpoint files, directories (scanned one level deep) and quoted
    glob patterns. The float64 mean of every floating-point tensor is rounded once into its
    dtype; integer counters are copied from the last checkpoint. No code in a checkpoint
    runs unless --trust-pickle is given.
    """
    signal.signal(signal.SIGTERM, on_sigterm)
    with cli_errors(debug=params["debug"]):
        _run(params)


def _options(params: dict[str, Any]) -> Options:
    select = SelectOptions(
        by=params["by"],
        start=params["start"],
        end=params["end"],
        last=params["last"],
        best=params["best"],
        metric=params["metric"],
        mode=params["mode"],
    )
    return Options(
        recursive=params["recursive"],
        glob=params["name_glob"],
        select=select,
        key=params["key"],
        strip_prefix=tuple(params["strip_prefix"]),
        weights=params["weights"],
        ema=params["ema"],
        dtype=params["dtype"],
        accum_dtype=params["accum_dtype"],
        device=params["device"],
        int_policy=params["int_policy"],
        allow_nonfinite=params["allow_nonfinite"],
        trust_pickle=params["trust_pickle"],
        allow_global=tuple(params["allow_global"]),
        force=params["force"],
        max_shard_size=params["max_shard_size"],
        format=params["out_format"],
        hash_files=params["as_json"],
        bn_model=params["bn_model"],
        bn_data=params["bn_data"],
        bn_batch_size=params["bn_batch_size"],
        bn_batches=params["bn_batches"],
    )


def _run(params: dict[str, Any]) -> None:
    options = _options(params)
    quiet = params["quiet"]
    if params["trust_pickle"] and not quiet:
        click.echo("Warning: --trust-pickle runs any code the checkpoints contain", err=True)
    from .distributed import environment_rank, from_environment

    if params["dry_run"]:
        if environment_rank() != 0:  # under torchrun, rank 0 plans and prints for every rank
            return
        report = plan_checkpoints(params["inputs"], options)
        _warn(report, quiet)
        click.echo(report.to_json() if params["as_json"] else plan_table(report))
        return
    if not params["output"]:
        raise click.UsageError("missing -o OUTPUT (or use --dry-run)")
    quiet = quiet or environment_rank() != 0  # under torchrun, rank 0 speaks for every rank
    group = from_environment()
    with progress_bar(enabled=not quiet and sys.stderr.isatty(), desc="averaging") as (progress, on_total):
        report = average_checkpoints(
            params["inputs"], params["output"], options, progress=progress, on_total=on_total, process_group=group
        )
    _warn(report, quiet)
    if params["as_json"] and environment_rank() == 0:
        click.echo(report.to_json())
    if not quiet:
        click.echo(summary_line(report), err=True)


def _warn(report: Report, quiet: bool) -> None:
    if quiet:
        return
    for warning in report.warnings:
        click.echo(f"Warning: {terminal_safe(warning)}", err=True)
    if report.dropped:
        click.echo(f"Note: left out of the output: {terminal_safe(', '.join(report.dropped))}", err=True)


def entry() -> None:
    """Console entry point: `ckpt-avg inspect ...` and `verify ...` are their own commands; anything else averages."""
    if sys.argv[1:2] in (["inspect"], ["verify"]):
        from .distributed import environment_rank

        if environment_rank() != 0:
            sys.exit(0)  # under torchrun these do not split: rank 0 does the work and reports, once
    if sys.argv[1:2] == ["inspect"]:
        from .inspect_cli import inspect_command

        inspect_command(args=sys.argv[2:], prog_name="ckpt-avg inspect")
    elif sys.argv[1:2] == ["verify"]:
        from .verify_cli import verify_command

        verify_command(args=sys.argv[2:], prog_name="ckpt-avg verify")
    else:
        main()
