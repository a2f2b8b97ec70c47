"""What the commands (`ckpt-avg`, `inspect`, `verify`) share: the options that mean the same in
each, as decorators; the one place where errors become a message and an exit status; the
progress bar; and a Click command that refuses a single-value option given twice.

The commands import this module and never each other, so the CLI's imports stay a tree.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

import click

from .errors import CkptAvgError, SelectionError
from .report import terminal_safe

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class StrictCommand(click.Command):
    """Click keeps the last value of an option given twice, silently; for an output path or a
    selection bound that hides a typo or a pasted command line, so it is a usage error (exit 2)
    naming the option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _refuse_repeats(self.params, args)
        return super().parse_args(ctx, args)


def _refuse_repeats(params: list[click.Parameter], args: list[str]) -> None:
    options: dict[str, click.Option] = {}
    for param in params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                options[name] = param
    seen: dict[str, str] = {}
    position = 0
    while position < len(args):
        token = args[position]
        position += 1
        if token == "--":
            return
        name = token.split("=", 1)[0] if token.startswith("--") else token[:2] if token.startswith("-") else ""
        option = options.get(name)
        if option is None:
            continue
        shown = token
        inline = "=" in token if token.startswith("--") else len(token) > 2
        if not option.is_flag and not option.count and not inline and position < len(args):
            shown = f"{token} {args[position]}"
            position += 1  # the next token is this option's value, whatever it looks like
        if option.multiple or option.count or option.is_flag or option.name is None:
            continue
        if option.name in seen:
            raise click.UsageError(f"{name} given twice ({seen[option.name]}, then {shown}): give it once")
        seen[option.name] = shown


# ---------------------------------------------------------------- options shared by the commands
# Each is a decorator that adds one option, so every command keeps its own order in --help.

start_option = click.option(
    "--start",
    type=float,
    metavar="N",
    help="Keep index >= N; a fraction 0<N<1 keeps the last part of the run. Example: --start 20 or --start 0.75",
)
end_option = click.option("--end", type=int, metavar="N", help="Keep index <= N. Example: --end 48")
last_option = click.option(
    "--last", type=int, metavar="K", help="Then keep only the K highest indices. Example: --last 5"
)
by_option = click.option(
    "--by",
    type=click.Choice(["epoch", "step"]),
    help="Index used to order and select. Default: epoch if unique, else step. Example: --by step",
)
glob_option = click.option(
    "--glob", "name_glob", metavar="PATTERN", help="Keep only files whose name matches. Example: --glob 'epoch=*'"
)
recursive_option = click.option("--recursive", is_flag=True, help="Descend into subdirectories of directory inputs.")
key_option = click.option(
    "--key", metavar="PATH", help="Dotted path of the state dict to average. Example: --key state_dict_ema"
)
strip_prefix_option = click.option(
    "--strip-prefix",
    multiple=True,
    metavar="P",
    help="Remove a key prefix (repeatable). Example: --strip-prefix module.",
)
trust_pickle_option = click.option(
    "--trust-pickle",
    is_flag=True,
    help="Fully unpickle the inputs. RUNS CODE FROM THE FILES: only for files you trust.",
)
allow_global_option = click.option(
    "--allow-global",
    multiple=True,
    metavar="MODULE.NAME",
    help="Load this class as itself instead of a placeholder (repeatable). Example: --allow-global my_pkg.Config",
)
debug_option = click.option("--debug", is_flag=True, help="Show the traceback of an error.")


# ---------------------------------------------------------------- errors and progress


class Interrupted(BaseException):
    """SIGTERM, raised where the process is so that temp files are cleaned up."""


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


def _rank_prefix() -> str:
    """Under torchrun every rank is interrupted and says so: each names itself."""
    try:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        several = False
    return f"rank {terminal_safe(os.environ['RANK'])}: " if several and "RANK" in os.environ else ""


def _interrupted(what: str) -> str:
    """What an interrupt did to the output, truthfully: it may land after the output was published."""
    from .write import PUBLISHED

    prefix = _rank_prefix()
    if PUBLISHED:
        return f"{prefix}{what} after {terminal_safe(PUBLISHED[-1])} was published (it is complete)"
    if prefix and prefix != "rank 0: ":
        return f"{prefix}{what}; rank 0 publishes the output, and says whether it did"
    return f"{prefix}{what}; no output was written"


@contextmanager
def cli_errors(*, debug: bool) -> Iterator[None]:
    """The one place where library errors become a message and an exit status."""
    try:
        yield
    except CkptAvgError as error:
        if debug:
            traceback.print_exc()
        message = error.cli_message  # flags, not keywords
        if not getattr(error, "reported_elsewhere", False):  # another torchrun rank prints it
            click.echo(f"Error: {terminal_safe(message)}", err=True)
        if hasattr(error, "settle"):
            error.settle()
        if isinstance(error, SelectionError) and error.plan_table:
            click.echo(terminal_safe(error.plan_table, newlines=True), err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo(f"Error: {_interrupted('interrupted')}", err=True)
        sys.exit(130)
    except Interrupted:
        because = " (torchrun stops every rank when one fails or is stopped: see its report)" if _rank_prefix() else ""
        click.echo(f"Error: {_interrupted(f'interrupted by SIGTERM{because}')}", err=True)
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


@contextmanager
def progress_bar(*, enabled: bool, desc: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(advance by n bytes, set the total): a tqdm bar on stderr, or two no-ops."""
    if not enabled:
        yield (lambda _: None), (lambda _: None)
        return
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr, leave=False)

    def set_total(total: int) -> None:
        bar.total = total
        bar.refresh()

    def advance(count: int) -> None:
        bar.update(count)

    try:
        yield advance, set_total
    finally:
        bar.close()
