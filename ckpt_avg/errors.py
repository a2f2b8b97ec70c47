"""One exception hierarchy; each error knows the exit status the CLI gives it."""

from __future__ import annotations


class CkptAvgError(Exception):
    """Base of every error the tool reports to a user (exit status 1)."""

    exit_code = 1


class UsageError(CkptAvgError):
    """A bad option value or a missing input path (exit status 2, as Click does)."""

    exit_code = 2


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
