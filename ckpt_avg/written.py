"""What a writer returns, and the kernel run it is given: shared by every output format."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
