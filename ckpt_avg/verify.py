"""`ckpt-avg verify`: check an output against its provenance (SPEC §1.7).

Three checks, each naming the file and what differs: the output's tensors against the
recorded per-tensor and checkpoint digests; each input (given, or recorded where its path
exists) against its recorded digest; and with `recompute`, the average re-derived from the
inputs, weights and options the provenance records, tensor by tensor.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .dcp import dcp_metadata_file
from .digest import FORMAT_VERSION, SCHEME, TensorDigests, digest_leaves
from .discover import discover, hf_weight_files
from .errors import CheckpointError, CkptAvgError, UsageError
from .guard import PROVENANCE_RECORD, OutputKind, output_kind
from .jsonfile import read_json
from .layout import strip_prefixes
from .safetensors_file import read_header
from .sources import open_checkpoint
from .statedict import get_path, is_state_dict
from .torchfile import UnsupportedTensor
from .unpickle import PicklePolicy

MAX_TENSOR_LINES = 10  # per check; the rest are counted


@dataclass(frozen=True)
class Mismatch:
    file: str
    what: str

    def line(self) -> str:
        return f"{self.file}: {self.what}"


@dataclass
class Verification:
    """What `verify` checked, what held, and every mismatch (empty when all holds)."""

    output: str
    scheme: str | None = None
    checked: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def verify_output(
    output: str,
    inputs: Sequence[str] = (),
    *,
    recompute: bool = False,
    trust_pickle: bool = False,
    allow_global: Sequence[str] = (),
) -> Verification:
    """Check OUTPUT against its provenance; inputs default to the recorded paths that exist."""
    if not os.path.exists(output):
        raise UsageError(f"OUTPUT {output!r} does not exist")
    for path in inputs:
        if not os.path.exists(path):
            raise UsageError(f"INPUT {path!r} does not exist")
    result = Verification(output)
    provenance = read_provenance(output)
    if not _usable(provenance, result):
        return result
    assert provenance is not None
    result.scheme = SCHEME
    policy = PicklePolicy(trust=trust_pickle, extra_allowed=frozenset(allow_global))
    _check_output(output, provenance, policy, result)
    paths = _input_paths(inputs, provenance, result)
    _check_inputs(paths, provenance, policy, result)
    if recompute:
        _recompute(paths, provenance, trust_pickle, tuple(allow_global), result)
    return result


def _existing_kind(output: str) -> OutputKind:
    """The kind of an existing OUTPUT: a directory holding DCP metadata is a DCP checkpoint."""
    if os.path.isdir(output) and dcp_metadata_file(output) is not None:
        return OutputKind.DCP_DIRECTORY
    return output_kind(output)


def read_provenance(output: str) -> dict[str, Any] | None:
    """The provenance ckpt-avg recorded in OUTPUT, or None where it has none."""
    kind = _existing_kind(output)
    try:
        if kind is OutputKind.DCP_DIRECTORY:  # beside the DCP files
            record = os.path.join(output, PROVENANCE_RECORD)
            if not os.path.isfile(record):
                return None
            with open(record, encoding="utf-8") as f:
                return _as_dict(json.load(f))
        if kind is OutputKind.HF_DIRECTORY:
            index = os.path.join(output, "model.safetensors.index.json")
            if os.path.isfile(index):
                metadata = read_json(index).get("metadata")
                found = metadata.get("ckpt_avg") if isinstance(metadata, dict) else None
                return found if isinstance(found, dict) else None
            output = os.path.join(output, "model.safetensors")
            if not os.path.isfile(output):
                return None
        if kind is not OutputKind.PYTORCH:
            text = read_header(output).metadata.get("ckpt_avg")
            return _as_dict(json.loads(text)) if text is not None else None
        with zipfile.ZipFile(output) as archive:
            names = [n for n in archive.namelist() if n.endswith("/" + PROVENANCE_RECORD)]
            return _as_dict(json.loads(archive.read(names[0]))) if names else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{output}: cannot read its provenance: {exc}") from None


def _as_dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _usable(provenance: dict[str, Any] | None, result: Verification) -> bool:
    if provenance is None:
        result.mismatches.append(Mismatch(result.output, "carries no ckpt-avg provenance: nothing to verify against"))
        return False
    version = provenance.get("format_version", 1)
    scheme = (provenance.get("digest") or {}).get("scheme") if isinstance(provenance.get("digest"), dict) else None
    if version != FORMAT_VERSION or scheme != SCHEME:
        result.mismatches.append(
            Mismatch(
                result.output,
                f"provenance format {version} (digest scheme {scheme or 'sha256, running'}) cannot be verified;"
                f" this version verifies format {FORMAT_VERSION} ({SCHEME}): average again to get one",
            )
        )
        return False
    return True


# ---------------------------------------------------------------- output


def _output_digests(output: str, provenance: dict[str, Any], policy: PicklePolicy) -> TensorDigests:
    ref = discover([output]).refs[0]
    tree = open_checkpoint(ref, policy).tree
    kind = _existing_kind(output)
    structured = kind.keeps_structure or kind is OutputKind.DCP_DIRECTORY
    path = tuple(provenance.get("state_dict") or ()) if structured else ()
    if kind is OutputKind.DCP_DIRECTORY and not _has_state_dict(tree, path):
        path = ()  # weights alone (from inputs that were not DCP): stored at the top level
    return digest_leaves(_state_dict(tree, path, output))


def _has_state_dict(tree: Any, path: tuple[str, ...]) -> bool:
    try:
        return is_state_dict(get_path(tree, path))
    except (KeyError, IndexError, TypeError):
        return False


def _state_dict(tree: Any, path: tuple[str, ...], where: str) -> dict[str, Any]:
    try:
        node = get_path(tree, path)
    except (KeyError, IndexError, TypeError):
        node = None
    if not is_state_dict(node):
        raise CheckpointError(f"{where}: no state dict at {'.'.join(path) or '(top level)'}, where the provenance says")
    for key, leaf in node.items():
        if isinstance(leaf, UnsupportedTensor):
            raise CheckpointError(f"{where}: tensor {key!r} is a {leaf.kind} tensor, which has no digest")
    return dict(node)


def _check_output(output: str, provenance: dict[str, Any], policy: PicklePolicy, result: Verification) -> None:
    digest = provenance["digest"]
    actual = _output_digests(output, provenance, policy)
    if actual.root() == digest.get("output"):
        result.checked.append(f"{output}: tensor digest")
        return
    problems = _tensor_differences(actual.hex_by_key(), digest.get("tensors") or {}, "recorded")
    if not problems:
        problems = ["tensor dtypes or shapes differ from the recorded digest (tensor bytes match)"]
    result.mismatches.extend(Mismatch(output, p) for p in problems)


def _tensor_differences(actual: dict[str, str], expected: dict[str, str], against: str) -> list[str]:
    """One line per tensor that differs (capped), naming it."""
    lines = [f"tensor {k!r} is missing (in the {against} digests)" for k in sorted(set(expected) - set(actual))]
    lines += [f"tensor {k!r} is not in the {against} digests" for k in sorted(set(actual) - set(expected))]
    changed = [k for k in sorted(actual) if k in expected and actual[k] != expected[k]]
    lines += [f"tensor {k!r} differs from the {against} digest" for k in changed]
    if len(lines) > MAX_TENSOR_LINES:
        lines = [*lines[:MAX_TENSOR_LINES], f"and {len(lines) - MAX_TENSOR_LINES} more tensor(s) differ"]
    return lines


# ---------------------------------------------------------------- inputs


def _input_paths(given: Sequence[str], provenance: dict[str, Any], result: Verification) -> list[str | None]:
    """A path for each recorded input (None where it is neither given nor found).

    A given INPUT stands for the recorded input with the same path; otherwise, where as many
    are given as were recorded, for the one in the same position (another checkout). A
    directory of checkpoints stands for those in it with a recorded path or, failing that,
    the only recorded name (the others in it are not inputs of this output).
    """
    recorded = [str(r.get("path")) for r in provenance.get("inputs", [])]
    paths: list[str | None] = [p if os.path.exists(p) else None for p in recorded]
    given, in_directories = _split_directories(given)
    for path in in_directories:
        same = [k for k, r in enumerate(recorded) if _same_path(path, r)]
        named = [k for k, r in enumerate(recorded) if os.path.basename(r.rstrip("/")) == os.path.basename(path)]
        if same or len(named) == 1:
            paths[(same or named)[0]] = path
    unmatched = []
    for path in given:
        same = [k for k, r in enumerate(recorded) if _same_path(path, r)]
        if same:
            paths[same[0]] = path
        else:
            unmatched.append(path)
    if unmatched and len(given) == len(recorded):
        paths = list(given)
    elif unmatched:
        listing = ", ".join(recorded)
        raise UsageError(
            f"INPUT {unmatched[0]!r} is none of the recorded inputs ({listing}); give them all, in the recorded order"
        )
    for position, found in enumerate(paths):
        if found is None:
            result.unchecked.append(f"{recorded[position]}: recorded input not found (give its path as INPUT)")
    return paths


def _split_directories(given: Sequence[str]) -> tuple[list[str], list[str]]:
    """Given INPUTs named one by one, and the checkpoints found in given directories."""
    named: list[str] = []
    found: list[str] = []
    for path in given:
        if os.path.isdir(path) and hf_weight_files(path) is None:
            found.extend(ref.display for ref in discover([path]).refs)
        else:
            named.append(path)
    return named, found


def _same_path(a: str, b: str) -> bool:
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _input_digest(path: str, provenance: dict[str, Any], policy: PicklePolicy) -> str:
    refs = discover([path]).refs
    if len(refs) != 1:
        raise CheckpointError(f"{path}: not one checkpoint (found {len(refs)})")
    tree = open_checkpoint(refs[0], policy).tree
    state = _state_dict(tree, tuple(provenance.get("state_dict") or ()), path)
    prefixes = tuple((provenance.get("options") or {}).get("strip_prefix") or ())
    return digest_leaves(strip_prefixes(state, prefixes, path)).root()


def _check_inputs(
    paths: list[str | None], provenance: dict[str, Any], policy: PicklePolicy, result: Verification
) -> None:
    recorded = provenance.get("inputs", [])
    expected = [str(r.get("tensor_digest")) for r in recorded]
    for position, path in enumerate(paths):
        if path is None:
            continue
        try:
            actual = _input_digest(path, provenance, policy)
        except CkptAvgError as exc:
            result.mismatches.append(Mismatch(path, f"cannot be read as the recorded input: {exc}"))
            continue
        if actual == expected[position]:
            result.checked.append(f"{path}: tensor digest")
            continue
        others = [k for k, digest in enumerate(expected) if digest == actual]
        detail = (
            f"; it is recorded input #{others[0] + 1} ({recorded[others[0]].get('path')}): swapped?" if others else ""
        )
        result.mismatches.append(
            Mismatch(path, f"tensor digest differs from the one recorded for input #{position + 1}{detail}")
        )


# ---------------------------------------------------------------- recompute


def _batchnorm_buffers(layers: list[str], names: set[str]) -> list[str]:
    suffixes = ("running_mean", "running_var", "num_batches_tracked")
    return [layer + suffix for layer in layers for suffix in suffixes if layer + suffix in names]


def recorded_options(provenance: dict[str, Any], *, trust_pickle: bool, allow_global: tuple[str, ...]) -> Any:
    """The averaging options the provenance records, as `Options`.

    No selection: the inputs are averaged as given, in the recorded order, so files given in
    place of the recorded ones need no index in their names. Never the BatchNorm recompute:
    `--bn-model`/`--bn-data` name code to import and call, and a provenance is only as
    trustworthy as the file that carries it.
    """
    from .options import Options
    from .select import SelectOptions

    options = provenance.get("options") or {}
    weights = options.get("weights")
    return Options(
        select=SelectOptions(as_given=True),
        key=".".join(provenance.get("state_dict") or ()) or None,
        strip_prefix=tuple(options.get("strip_prefix") or ()),
        weights=tuple(float(w) for w in weights) if weights else None,
        ema=options.get("ema"),
        dtype=options.get("dtype"),
        accum_dtype=options.get("accum_dtype") or "float64",
        int_policy=options.get("int_policy") or "error",
        allow_nonfinite=bool(options.get("allow_nonfinite")),
        trust_pickle=trust_pickle,
        allow_global=allow_global,
    )


def _recompute(
    paths: list[str | None],
    provenance: dict[str, Any],
    trust_pickle: bool,
    allow_global: tuple[str, ...],
    result: Verification,
) -> None:
    from .api import average_digests

    recorded = provenance.get("inputs", [])
    missing = [str(recorded[k].get("path")) for k, p in enumerate(paths) if p is None]
    if missing:
        for path in missing:
            result.mismatches.append(Mismatch(path, "recorded input not found: --recompute needs every input"))
        return
    options = recorded_options(provenance, trust_pickle=trust_pickle, allow_global=allow_global)
    try:
        report, digests = average_digests([p for p in paths if p is not None], options)
    except CkptAvgError as exc:
        result.mismatches.append(Mismatch(result.output, f"the recorded average cannot be re-derived: {exc}"))
        return
    chosen = [c.path for c in report.selected]
    if len(chosen) != len(paths):
        result.mismatches.append(
            Mismatch(result.output, f"re-deriving selected {len(chosen)} of the {len(paths)} recorded inputs")
        )
        return
    recorded_weights = [r.get("weight") for r in recorded]
    if [c.weight for c in report.selected] != recorded_weights:
        result.mismatches.append(Mismatch(result.output, "the recorded options give other weights than recorded"))
    expected = dict(provenance["digest"].get("tensors") or {})
    actual = digests.output.hex_by_key()
    bn_model = (provenance.get("options") or {}).get("bn_model")
    if bn_model:
        from .run import batchnorm_layers

        statistics = _batchnorm_buffers(batchnorm_layers(sorted(actual)), set(actual))
        for name in statistics:
            expected.pop(name, None)
            actual.pop(name, None)
        result.unchecked.append(
            f"{result.output}: {len(statistics)} BatchNorm statistics recomputed with --bn-model {bn_model}"
            " (verify does not run code named in a file; rerun that command to check them)"
        )
    lines = _tensor_differences(actual, expected, "recorded")
    if not lines and not bn_model and digests.output.root() != provenance["digest"].get("output"):
        lines = ["dtypes or shapes of the re-derived average differ from the recorded digest"]
    if lines:
        result.mismatches.extend(Mismatch(result.output, f"re-derived average: {line}") for line in lines)
    else:
        result.checked.append(f"{result.output}: average re-derived from the recorded inputs and options")
