"""JSON side files (trainer_state.json, shard indexes) read with one rule for hostile nesting."""

from __future__ import annotations

import json
from typing import Any

from .errors import CheckpointError


def read_json(path: str) -> Any:
    """The file's JSON; OSError and ValueError pass through for the caller to judge.

    A file nested deeper than Python's recursion limit (`[[[[...` 200,000 deep) is an error
    naming it, not an internal RecursionError.
    """
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except RecursionError:
            raise CheckpointError(f"{path}: unreadable JSON: nested too deeply") from None
