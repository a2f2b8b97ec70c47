"""One exception hierarchy; each error knows the exit status the CLI gives it."""

from __future__ import annotations

import re

# The keyword arguments (fields of `Options` and `SelectOptions`) that a CLI flag of the same
# name sets; test_errors keeps this in step with the dataclasses.
API_NAMES = frozenset({
    "recursive", "glob", "key", "strip_prefix", "weights", "ema", "dtype", "accum_dtype", "device",
    "int_policy", "allow_nonfinite", "trust_pickle", "allow_global", "force", "max_shard_size", "format",
    "bn_model", "bn_data", "bn_batch_size", "bn_batches",
    "by", "start", "end", "last", "best", "metric", "mode",
})  # fmt: skip
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


class CkptAvgError(Exception):
    """Base of every error the tool reports to a user (exit status 1)."""

    exit_code = 1

    @property
    def cli_message(self) -> str:
        """The message as the CLI prints it: flags, never the Python API's keywords."""
        return str(self)


class UsageError(CkptAvgError):
    """A bad option value or a missing input path (exit status 2, as Click does).

    The message names CLI flags (`--start`); `str()` adds the keyword arguments they are in
    the Python API, so a caller of `average_checkpoints(..., start=5, end=3)` can map it:
    "--start 5 is after --end 3 (Python API: start=, end=)". The CLI prints `cli_message`.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._flags_only = message

    @property
    def cli_message(self) -> str:
        return self._flags_only

    def __str__(self) -> str:
        flags = dict.fromkeys(flag.replace("-", "_") for flag in _FLAG.findall(self._flags_only))
        names = [name for name in flags if name in API_NAMES]
        if not names:
            return self._flags_only
        return f"{self._flags_only} (Python API: {', '.join(name + '=' for name in names)})"


class DiscoveryError(CkptAvgError):
    """INPUT could not be turned into checkpoints, or names a layout we refuse."""


class SelectionError(CkptAvgError):
    """The options select nothing, or the index of the candidates is ambiguous."""

    def __init__(self, message: str, plan_table: str = "") -> None:
        super().__init__(message)
        self.plan_table = plan_table


class CheckpointError(CkptAvgError):
    """A checkpoint file is malformed, unsafe or not averageable."""


class UnsafePickleError(CheckpointError):
    """A pickle needs code we will not run without --trust-pickle."""


class MismatchError(CheckpointError):
    """The selected checkpoints disagree on keys, shapes or integer values."""


class NonFiniteError(CheckpointError):
    """An input tensor holds NaN or Inf and --allow-nonfinite was not given."""


class OutputError(CkptAvgError):
    """The output cannot be written where or how it was asked for."""
