"""What a writer returns, and the kernel run it is given: shared by every output format."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .average import Digests


@dataclass
class Written:
    files: list[str]
    digests: Digests
    dropped: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)  # per file written, where asked for

    @property
    def output_digest(self) -> str:
        return self.digests.output.root()

    @property
    def input_digests(self) -> list[str]:
        return [d.root() for d in self.digests.inputs]


class Runner(Protocol):
    """Runs the kernel into a sink and returns the digests.

    `primary_only`: only the primary state dict; `order`: its names in the order to compute
    them (the order of the file, so that a file's sha256 is taken as its bytes are written).
    """

    def __call__(self, sink: Any, primary_only: bool, order: Sequence[str] | None = None) -> Digests: ...


@dataclass(frozen=True)
class ShardFile:
    """One file of a directory output: its name, the tensors it holds and its size in bytes."""

    name: str
    tensors: tuple[str, ...]
    nbytes: int


class StagedPlan(Protocol):
    """A directory output planned from metadata alone, so that any process can write any of its
    files into a staging directory and one process then publishes it (Hugging Face shards, DCP).

    A pure function of the inputs' metadata and the options: every rank of a distributed run
    computes the same plan, and `fingerprint` lets them check that they did.
    """

    @property
    def output(self) -> str: ...

    @property
    def files(self) -> tuple[ShardFile, ...]: ...

    @property
    def entries(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]: ...

    @property
    def single(self) -> bool:
        """One file, whose header carries the provenance: one process writes it whole."""
        ...

    def fingerprint(self) -> str: ...

    def write(
        self, staging: str, indices: Iterable[int], run: Runner, *, hashed: bool
    ) -> tuple[Digests, dict[str, str]]:
        """The files at `indices`, streamed into `staging`, fsynced and closed; the digests, and
        where `hashed` the sha256 of each file by name."""
        ...

    def finalize(
        self,
        staging: str,
        digests: Digests,
        sha256: dict[str, str],
        *,
        force: bool,
        hashed: bool,
        warn: Callable[[str], None],
    ) -> Written:
        """Once every file is in `staging`: the files that carry the provenance, the side files,
        fsync, and publish by rename."""
        ...
