"""A Click command that refuses a single-value option given twice (`-o a -o b`).

Click keeps the last value silently; for an output path or a selection bound that hides
a typo or a pasted command line, so it is a usage error (exit 2) naming the option.
"""

from __future__ import annotations

import click


class StrictCommand(click.Command):
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
