"""The one rule for importing the user's own modules: the current directory first, as `python -m` has it.

--allow-global, --trust-pickle and --bn-model/--bn-data all name the user's code; each finds
it the same way, so a class that one option can import the others can too.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def importable_from_cwd() -> Iterator[None]:
    """The current directory at the front of sys.path for the duration (unless already there)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since the last import must be found
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
