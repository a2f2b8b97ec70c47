"""The `ckpt-avg` command: Click options, progress bars and error mapping, nothing else."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from . import __version__
from .api import Options, average_checkpoints, plan_checkpoints
from .cli_options import StrictCommand
from .errors import CkptAvgError, SelectionError
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


class Interrupted(BaseException):
    """SIGTERM, raised where the process is so that temp files are cleaned up."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


def _parse_weights(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


@click.command(
    cls=StrictCommand,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "-o",
    "--output",
    metavar="OUTPUT",
    help="File to write (.pt .pth .pth.tar .ckpt .bin keep structure, .safetensors flat), or DIR/ for Hugging Face"
    " shards. Example: -o avg.pt",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (every candidate, selected or why not) and write nothing."
)
@click.option(
    "--start",
    type=float,
    metavar="N",
    help="Keep index >= N; a fraction 0<N<1 keeps the last part of the run. Example: --start 20 or --start 0.75",
)
@click.option("--end", type=int, metavar="N", help="Keep index <= N. Example: --end 48")
@click.option("--last", type=int, metavar="K", help="Then keep only the K highest indices. Example: --last 5")
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
@click.option(
    "--by",
    type=click.Choice(["epoch", "step"]),
    help="Index used to order and select. Default: epoch if unique, else step. Example: --by step",
)
@click.option(
    "--glob", "name_glob", metavar="PATTERN", help="Keep only files whose name matches. Example: --glob 'epoch=*'"
)
@click.option("--recursive", is_flag=True, help="Descend into subdirectories of directory inputs.")
@click.option("--key", metavar="PATH", help="Dotted path of the state dict to average. Example: --key state_dict_ema")
@click.option(
    "--strip-prefix",
    multiple=True,
    metavar="P",
    help="Remove a key prefix (repeatable). Example: --strip-prefix module.",
)
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
    type=click.Choice(["float32", "bfloat16", "float16", "float64"]),
    help="Output dtype of floating tensors (default: each tensor's own). Example: --dtype bfloat16",
)
@click.option(
    "--accum-dtype",
    type=click.Choice(["float64", "float32"]),
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
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Fully unpickle the inputs. RUNS CODE FROM THE FILES: only for files you trust.",
)
@click.option(
    "--allow-global",
    multiple=True,
    metavar="MODULE.NAME",
    help="Load this class as itself instead of a placeholder (repeatable). Example: --allow-global my_pkg.Config",
)
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
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.version_option(__version__, "--version", prog_name="ckpt-avg")
def main(**params: Any) -> None:
    """Average the weights of saved training checkpoints (offline SWA), exactly and safely.

    INPUT is any mix of checkpoint files, directories (scanned one level deep) and quoted
    glob patterns. The float64 mean of every floating-point tensor is rounded once into its
    dtype; integer counters are copied from the last checkpoint. No code in a checkpoint
    runs unless --trust-pickle is given.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    with _errors(debug=params["debug"]):
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
        report = plan_checkpoints(params["inputs"], options)
        if environment_rank() != 0:  # under torchrun, rank 0 prints the plan for every rank
            return
        _warn(report, quiet)
        click.echo(report.to_json() if params["as_json"] else plan_table(report))
        return
    if not params["output"]:
        raise click.UsageError("missing -o OUTPUT (or use --dry-run)")
    quiet = quiet or environment_rank() != 0  # under torchrun, rank 0 speaks for every rank
    group = from_environment()
    with _progress(enabled=not quiet and sys.stderr.isatty()) as (progress, on_total):
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


@contextmanager
def _progress(enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    if not enabled:
        yield (lambda _: None), (lambda _: None)
        return
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="averaging", file=sys.stderr, leave=False)

    def set_total(total: int) -> None:
        bar.total = total
        bar.refresh()

    def advance(count: int) -> None:
        bar.update(count)

    try:
        yield advance, set_total
    finally:
        bar.close()


@contextmanager
def _errors(*, debug: bool) -> Iterator[None]:
    """The one place where library errors become a message and an exit status."""
    try:
        yield
    except CkptAvgError as error:
        if debug:
            traceback.print_exc()
        if not getattr(error, "reported_elsewhere", False):  # another torchrun rank prints it
            click.echo(f"Error: {terminal_safe(error)}", err=True)
        if hasattr(error, "settle"):
            error.settle()
        if isinstance(error, SelectionError) and error.plan_table:
            click.echo(terminal_safe(error.plan_table, newlines=True), err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("Error: interrupted; no output was written", err=True)
        sys.exit(130)
    except Interrupted:
        click.echo("Error: interrupted by SIGTERM; no output was written", err=True)
        sys.exit(143)
    except click.exceptions.ClickException:
        raise
    except OSError as error:
        if debug:
            traceback.print_exc()
        where = f"{error.filename}: " if error.filename else ""
        click.echo(f"Error: {terminal_safe(f'{where}{error.strerror or error}')}", err=True)
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 - a bug: one line, and --debug shows where
        if debug:
            traceback.print_exc()
        message = terminal_safe(f"{type(error).__name__}: {error}")
        click.echo(f"Error: internal error: {message} (run with --debug for details)", err=True)
        sys.exit(1)


def entry() -> None:
    """Console entry point: `ckpt-avg inspect ...` and `verify ...` are their own commands; anything else averages."""
    if sys.argv[1:2] == ["inspect"]:
        from .inspect_cli import inspect_command

        inspect_command(args=sys.argv[2:], prog_name="ckpt-avg inspect")
    elif sys.argv[1:2] == ["verify"]:
        from .verify_cli import verify_command

        verify_command(args=sys.argv[2:], prog_name="ckpt-avg verify")
    else:
        main()
