"""The provenance an output carries: the run's record with the tensor digests written in."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .digest import SCHEME, ZERO_DIGEST

if TYPE_CHECKING:
    from .average import Digests


def with_digests(provenance: dict[str, Any], digests: Digests | None, names: list[str]) -> dict[str, Any]:
    """The provenance with the digests in; placeholders of the same length where `digests` is None.

    Each input records its checkpoint digest; `digest.tensors` has the output's digest per key,
    so a tensor that changed is found by name and parts of the output can be checked alone.
    """
    result: dict[str, Any] = json.loads(json.dumps(provenance))
    for position, record in enumerate(result["inputs"]):
        record["tensor_digest"] = digests.inputs[position].root() if digests else ZERO_DIGEST
    tensors = digests.output.hex_by_key() if digests else dict.fromkeys(sorted(names), ZERO_DIGEST)
    if digests is not None and sorted(tensors) != sorted(names):
        raise AssertionError("the output digests do not cover every tensor written")
    result["digest"] = {
        "scheme": SCHEME,
        "output": digests.output.root() if digests else ZERO_DIGEST,
        "tensors": tensors,
    }
    return result


def provenance_text(provenance: dict[str, Any], digests: Digests | None, names: list[str]) -> str:
    return json.dumps(with_digests(provenance, digests, names), sort_keys=True, separators=(",", ":"))
