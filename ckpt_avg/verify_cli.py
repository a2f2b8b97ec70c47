"""The `ckpt-avg verify` command: Click options and output only; the work is in verify.py."""

from __future__ import annotations

from typing import Any

import click

from .cli_options import CONTEXT_SETTINGS, allow_global_option, cli_errors, debug_option, trust_pickle_option

EPILOG = """\b
Examples:
  ckpt-avg verify avg.safetensors
  ckpt-avg verify --recompute avg.pt ckpts/epoch=18.ckpt ckpts/epoch=19.ckpt ckpts/epoch=20.ckpt
  ckpt-avg verify --json averaged/ | jq .mismatches
"""


@click.command(
    context_settings=CONTEXT_SETTINGS,
    epilog=EPILOG,
)
@click.argument("output", metavar="OUTPUT")
@click.argument("inputs", nargs=-1, metavar="[INPUT...]")
@click.option(
    "--recompute",
    is_flag=True,
    help="Also re-derive the average from the recorded inputs, weights and options and compare it, tensor by"
    " tensor (reads every input).",
)
@trust_pickle_option
@allow_global_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the mismatches.")
@debug_option
def verify_command(**params: Any) -> None:
    """Check OUTPUT, written by ckpt-avg, against the provenance it carries.

    Recomputes the BLAKE3 digest of OUTPUT's tensors and compares it with the recorded one
    (naming every tensor that differs); checks the digest of each INPUT given, or of each
    recorded input whose path exists; with --recompute, re-derives the whole average.
    A given INPUT stands for the recorded input with the same path, or, when all are given,
    for the one in the same position; a directory stands for the recorded inputs in it.
    Exit status 0 when everything holds, 1 with one line per mismatch (FILE: what differs)
    otherwise.
    """
    with cli_errors(debug=params["debug"]):
        _run(params)


def _run(params: dict[str, Any]) -> None:
    from .verify import verify_output

    result = verify_output(
        params["output"],
        params["inputs"],
        recompute=params["recompute"],
        trust_pickle=params["trust_pickle"],
        allow_global=params["allow_global"],
    )
    if params["as_json"]:
        click.echo(result.to_json())
    else:
        for mismatch in result.mismatches:
            click.echo(mismatch.line())
        if not params["quiet"]:
            for line in result.unchecked:
                click.echo(f"Note: not checked: {line}", err=True)
            if result.ok:
                click.echo(f"OK: {'; '.join(result.checked)}", err=True)
    if not result.ok:
        raise SystemExit(1)
