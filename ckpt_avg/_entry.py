"""The console entry point, kept free of heavy imports so Ctrl-C during start-up is one line."""

from __future__ import annotations

import sys


def entry() -> None:
    try:
        from .cli import entry as run
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted; no output was written\n")
        sys.exit(130)
    run()
