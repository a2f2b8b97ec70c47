"""The public Python API: plan and average checkpoints; the CLI is a thin layer over it.

    >>> from ckpt_avg import average_checkpoints
    >>> report = average_checkpoints(["ckpts/"], "avg.pt", start=20)  # doctest: +SKIP
    >>> report.selected[0].path  # doctest: +SKIP
    'ckpts/epoch=20-step=2100.ckpt'

Data flows one way: discover -> select -> open -> average -> write -> report.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .average import AverageOptions, Digests, Engine, Visit, mixing_weights
from .discover import CheckpointRef, Discovery, Skipped, discover
from .errors import UsageError
from .guard import check_output, is_ckpt_avg_output, is_directory_output, validate_output_name
from .layout import Layout, build_layout, has_state_dict
from .naming import PYTORCH_SUFFIXES
from .report import CandidateRecord, FileRecord, Report
from .select import Candidate, SelectOptions, make_plan, validate_options
from .sources import OpenedCheckpoint, content_meta, open_checkpoint
from .statedict import StateDictChoice, dotted, find_state_dicts, holds_lightning_swa_average
from .unpickle import PicklePolicy, check_allow_global, importable_from_cwd
from .write import remove_stale_temps
from .writers import write_output

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


@dataclass(frozen=True)
class Options:
    """Every choice a run takes; the CLI's options map onto these one to one."""

    recursive: bool = False
    glob: str | None = None
    select: SelectOptions = field(default_factory=SelectOptions)
    key: str | None = None
    strip_prefix: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    ema: float | None = None
    dtype: str | None = None
    accum_dtype: str = "float64"
    device: str = "cpu"
    int_policy: str = "error"
    allow_nonfinite: bool = False
    trust_pickle: bool = False
    allow_global: tuple[str, ...] = ()
    force: bool = False
    max_shard_size: str | None = None
    format: str | None = None  # a directory output: "hf" or "dcp" (default: dcp for DCP inputs, else hf)
    hash_files: bool = True
    bn_model: str | None = None  # MODULE:CALLABLE returning the model
    bn_data: str | None = None  # MODULE:CALLABLE returning batches, or a .pt/.safetensors file
    bn_batch_size: int = 32
    bn_batches: int | None = None


def plan_checkpoints(inputs: Sequence[str], options: Options | None = None) -> Report:
    """What a run would average, without reading tensor data or writing anything."""
    options = options or Options()
    _validate(options)
    run = _Run(inputs, options)
    run.open_selected()
    return run.report(dry_run=True)


def average_checkpoints(
    inputs: Sequence[str],
    output: str,
    options: Options | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    **choices: Any,
) -> Report:
    """Average the selected checkpoints into OUTPUT and return the report.

    Keyword choices are a shortcut for the fields of `Options` and `SelectOptions`:
    `average_checkpoints(["ckpts/"], "avg.pt", start=20)`.
    """
    options = _merge(options or Options(), choices)
    _validate(options, output)
    started = time.monotonic()
    run = _Run(inputs, options)
    check_output(output, [(r.display, r.files) for r in run.discovery.refs], force=options.force)
    run.open_selected()
    layout = run.layout(output)
    if on_total is not None:
        on_total(layout.input_bytes)
    remove_stale_temps(output)
    overrides = _batchnorm(run, layout, options)
    advance = progress or (lambda _: None)

    def runner(sink: Any, primary_only: bool) -> Digests:
        visits = [v for v in layout.visits if v.digest] if primary_only else layout.visits
        return run_engine(layout, options, sink, advance, visits, overrides)

    written = write_output(output, layout, run.provenance(), options, runner)
    report = run.report(dry_run=False)
    report.output = output
    report.files = [FileRecord(p, _sha256(p) if options.hash_files else None) for p in written.files]
    report.output_digest = written.output_digest
    for record, digest in zip(report.selected, written.input_digests, strict=True):
        object.__setattr__(record, "tensor_digest", digest)
    report.parameters = sum(u.numel for u in layout.primary_units if u.kind == "float")
    report.tensors = len(layout.primary_names)
    report.placeholders = sorted(run.placeholders)
    report.dropped = written.dropped
    report.seconds = time.monotonic() - started
    return report


def _batchnorm(run: _Run, layout: Layout, options: Options) -> dict[str, torch.Tensor]:
    """Recomputed BatchNorm statistics to write in place of the averaged ones, if asked for."""
    layers = batchnorm_layers(layout.primary_names)
    if options.bn_model is None:
        if layers:
            run.warnings.append(
                f"{len(layers)} BatchNorm layer(s) were averaged, not recomputed;"
                " recompute their statistics with --bn-model MODULE:CALLABLE --bn-data DATA"
            )
        return {}
    from .average import MemorySink
    from .bn import recompute_batchnorm

    sink = MemorySink()
    run_engine(layout, options, sink, lambda _: None, [v for v in layout.visits if v.digest])
    hyper_parameters = _hyper_parameters(layout.opened[-1].tree)
    recomputed: dict[str, torch.Tensor] = recompute_batchnorm(
        sink.tensors,
        model_spec=options.bn_model,
        data_spec=options.bn_data,
        batch_size=options.bn_batch_size,
        max_batches=options.bn_batches,
        device=options.device,
        hyper_parameters=hyper_parameters,
        warn=run.warnings.append,
    )
    return recomputed


def batchnorm_layers(names: Sequence[str]) -> list[str]:
    """Prefixes of the layers that carry BatchNorm running statistics."""
    present = set(names)
    return sorted(
        n.removesuffix("running_mean")
        for n in names
        if n.endswith("running_mean") and n.removesuffix("running_mean") + "running_var" in present
    )


def _hyper_parameters(tree: Any) -> dict[str, Any] | None:
    if isinstance(tree, dict) and isinstance(tree.get("hyper_parameters"), dict):
        return dict(tree["hyper_parameters"])
    return None


def _merge(options: Options, choices: dict[str, Any]) -> Options:
    select_fields = set(SelectOptions.__dataclass_fields__)
    select_choices = {k: v for k, v in choices.items() if k in select_fields}
    other = {k: v for k, v in choices.items() if k not in select_fields}
    unknown = set(other) - set(Options.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    values = {name: getattr(options, name) for name in Options.__dataclass_fields__}
    values.update(other)
    if select_choices:
        current = options.select
        values["select"] = SelectOptions(**{**current.__dict__, **select_choices})
    for name in ("strip_prefix", "allow_global", "weights"):
        if isinstance(values[name], list):
            values[name] = tuple(values[name])
    return Options(**values)


def _validate(options: Options, output: str | None = None) -> None:
    """Usage errors, found before any file is opened."""
    validate_options(options.select)
    if options.dtype is not None and options.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of float32, bfloat16, float16, float64, not {options.dtype!r}")
    if options.accum_dtype not in ("float64", "float32", "fp64", "fp32", "double", "float"):
        raise UsageError(f"--accum-dtype must be float64 or float32, not {options.accum_dtype!r}")
    if options.int_policy not in ("error", "last"):
        raise UsageError(f"--int-policy must be error or last, not {options.int_policy!r}")
    if options.ema is not None and not 0 < options.ema < 1:
        raise UsageError(f"--ema must be between 0 and 1 (exclusive), not {options.ema}")
    if options.weights is not None and options.ema is not None:
        raise UsageError("--weights and --ema cannot be used together")
    if options.weights is not None and (any(w < 0 for w in options.weights) or sum(options.weights) <= 0):
        raise UsageError("--weights must be non-negative and not sum to zero")
    if any(not prefix for prefix in options.strip_prefix):
        raise UsageError("--strip-prefix must not be empty")
    check_device(options.device)
    for name in options.allow_global:
        with importable_from_cwd():
            problem = check_allow_global(name)
        if problem:
            raise UsageError(f"--allow-global {name}: {problem}")
    if (options.bn_model is None) != (options.bn_data is None):
        raise UsageError("--bn-model and --bn-data go together: give both to recompute BatchNorm statistics")
    if options.bn_model is not None and options.bn_data is not None:
        from .bn import validate_specs

        validate_specs(options.bn_model, options.bn_data)  # a typo must not wait for a long average
    if options.bn_batch_size < 1 or (options.bn_batches is not None and options.bn_batches < 1):
        raise UsageError("--bn-batch-size and --bn-batches must be at least 1")
    if options.format not in (None, "hf", "dcp"):
        raise UsageError(f"--format must be hf or dcp, not {options.format!r}")
    if output is not None:
        validate_output_name(output, max_shard_size=options.max_shard_size)
        if options.format is not None and not is_directory_output(output):
            raise UsageError(f"--format {options.format} writes a directory; end OUTPUT {output!r} with /")


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: not a device (use cpu, cuda, cuda:N or mps)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: only cpu, cuda, cuda:N and mps are supported")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


class _Run:
    """One invocation's state between the stages."""

    def __init__(self, inputs: Sequence[str], options: Options) -> None:
        self.options = options
        self.policy = PicklePolicy(trust=options.trust_pickle, extra_allowed=frozenset(options.allow_global))
        self._opened: dict[str, OpenedCheckpoint] = {}
        self.discovery = _without_earlier_outputs(discover(inputs, recursive=options.recursive, name_glob=options.glob))
        self.warnings: list[str] = []
        self.placeholders: set[str] = set()
        self.candidates = [self._candidate(ref) for ref in self.discovery.refs]
        self.plan = make_plan(self.candidates, options.select)
        self.selected_opened: list[OpenedCheckpoint] = []
        self.choice: StateDictChoice | None = None

    def _open(self, ref: CheckpointRef) -> OpenedCheckpoint:
        if ref.display not in self._opened:
            self._opened[ref.display] = open_checkpoint(ref, self.policy)
        return self._opened[ref.display]

    def _candidate(self, ref: CheckpointRef) -> Candidate:
        info = ref.name
        metric = self.options.select.metric
        needs_contents = (
            (info.epoch is None and info.step is None)
            or info.is_alias
            or (metric is not None and metric not in info.metrics)
            or (self.options.select.by == "step" and info.step is None)
            or (self.options.select.by == "epoch" and info.epoch is None)
        )
        if not needs_contents:
            return Candidate(ref, info.epoch, info.step, dict(info.metrics))
        meta = content_meta(self._open(ref))
        epoch = info.epoch if info.epoch is not None else meta.epoch
        step = info.step if info.step is not None else meta.step
        return Candidate(ref, epoch, step, {**meta.metrics, **info.metrics})

    def open_selected(self) -> None:
        self.selected_opened = [self._open(c.ref) for c in self.plan.selected]
        for opened in self.selected_opened:
            self.placeholders |= opened.placeholders
        last = self.selected_opened[-1]
        self.choice = find_state_dicts(last.tree, key=self.options.key, where=last.ref.display)
        if self.choice.warning:
            self.warnings.append(self.choice.warning)
        if self.placeholders and not self.options.trust_pickle:
            self.warnings.extend(placeholder_warnings(self.placeholders))
        if len(self.selected_opened) == 1:
            self.warnings.append("only one checkpoint is selected: the output holds its weights unchanged")
        if any(o.legacy for o in self.selected_opened):
            self.warnings.append("legacy (pre-zip) checkpoints are loaded whole, one at a time")
        for opened in self.selected_opened:
            if holds_lightning_swa_average(opened.tree):
                self.warnings.append(
                    f"{opened.ref.display} holds Lightning's SWA average (saved after StochasticWeightAveraging's"
                    " BatchNorm epoch), not one epoch's weights: averaging it in counts that average again"
                    f" (--end {opened.tree['epoch'] - 1} leaves it out)"
                )

    def layout(self, output: str) -> Layout:
        assert self.choice is not None
        keeps_structure = output.lower().endswith(PYTORCH_SUFFIXES) and not output.endswith("/")
        paths = [self.choice.primary]
        if keeps_structure:
            for other in self.choice.others:
                if all(has_state_dict(o.tree, other) for o in self.selected_opened):
                    paths.append(other)
                else:
                    self.warnings.append(
                        f"state dict {dotted(other)!r} is not in every selected checkpoint; left out of the output"
                    )
        out_dtype = DTYPES[self.options.dtype] if self.options.dtype else None
        return build_layout(
            self.selected_opened,
            self.choice,
            paths,
            strip_prefix=self.options.strip_prefix,
            out_dtype=out_dtype,
            warnings=self.warnings,
        )

    def provenance(self) -> dict[str, Any]:
        select = self.options.select
        weights = self._weights()
        return {
            "tool": "ckpt-avg",
            "version": __version__,
            "by": self.plan.by,
            "inputs": [
                {"path": c.ref.display, "epoch": c.epoch, "step": c.step, "weight": w}
                for c, w in zip(self.plan.selected, weights, strict=True)
            ],
            "options": {
                "start": select.start,
                "end": select.end,
                "last": select.last,
                "best": select.best,
                "metric": select.metric,
                "mode": select.mode,
                "by": select.by,
                "key": self.options.key,
                "strip_prefix": list(self.options.strip_prefix),
                "weights": list(self.options.weights or []) or None,
                "ema": self.options.ema,
                "dtype": self.options.dtype,
                "accum_dtype": self.options.accum_dtype,
                "int_policy": self.options.int_policy,
                "allow_nonfinite": self.options.allow_nonfinite,
            },
        }

    def _weights(self) -> list[float]:
        count = len(self.plan.selected)
        mixed = mixing_weights(count, self.options.weights, self.options.ema)
        return list(mixed) if mixed is not None else [1.0 / count] * count

    def report(self, *, dry_run: bool) -> Report:
        weights = iter(self._weights())
        records = []
        for entry in self.plan.entries:
            c = entry.candidate
            opened = self._opened.get(c.ref.display)
            records.append(
                CandidateRecord(
                    path=c.ref.display,
                    epoch=c.epoch,
                    step=c.step,
                    index=entry.index,
                    size=c.ref.size,
                    selected=entry.selected,
                    reason=entry.reason,
                    weight=next(weights) if entry.selected else None,
                    legacy=bool(opened and opened.legacy),
                )
            )
        for skipped in self.discovery.skipped:
            records.append(CandidateRecord(skipped.display, None, None, None, skipped.size, False, skipped.reason))
        return Report(
            version=__version__,
            by=self.plan.by,
            candidates=records,
            dry_run=dry_run,
            state_dict_key=dotted(self.choice.primary) if self.choice else None,
            other_state_dicts=[dotted(p) for p in self.choice.others] if self.choice else [],
            warnings=list(self.warnings),
        )


def placeholder_warnings(placeholders: set[str]) -> list[str]:
    """Name what was not loaded: classes the user may allow, and functions that would run code."""
    functions = sorted(n for n in placeholders if n.rpartition(".")[2][:1].islower())
    classes = sorted(placeholders - set(functions))
    warnings = []
    if functions:
        warnings.append(
            "the checkpoint names functions that would run code when unpickled; they were blocked and never"
            f" called: {', '.join(functions)} (only --trust-pickle runs them: do not use it on this file)"
        )
    if classes:
        warnings.append(
            "objects of classes not on the allowlist were replaced by inert placeholders and are left out of a"
            f" .pt output: {', '.join(classes)} (--allow-global MODULE.CLASS keeps a class you trust)"
        )
    return warnings


def _without_earlier_outputs(found: Discovery) -> Discovery:
    """Leave out files found in a directory that an earlier ckpt-avg run wrote.

    Rerunning `ckpt-avg ckpts/ -o ckpts/avg.pt` must not average the previous average; a
    file named explicitly on the command line is kept (and refused if it is OUTPUT).
    """
    refs, skipped = [], list(found.skipped)
    for ref in found.refs:
        if not ref.explicit and is_ckpt_avg_output(ref.display):
            skipped.append(Skipped(ref.display, "output of an earlier ckpt-avg run", ref.size))
        else:
            refs.append(ref)
    return Discovery(tuple(refs), tuple(skipped))


def engine_options(options: Options, count: int, overrides: dict[str, torch.Tensor] | None = None) -> AverageOptions:
    accumulate = torch.float32 if options.accum_dtype in ("float32", "fp32", "float") else torch.float64
    return AverageOptions(
        weights=mixing_weights(count, options.weights, options.ema),
        accum_dtype=accumulate,
        device=options.device,
        int_policy=options.int_policy,
        allow_nonfinite=options.allow_nonfinite,
        overrides=overrides or {},
    )


def run_engine(
    layout: Layout,
    options: Options,
    sink: Any,
    progress: Callable[[int], None],
    visits: list[Visit],
    overrides: dict[str, torch.Tensor] | None = None,
) -> Digests:
    digests = Digests.for_inputs(len(layout.opened))
    settings = engine_options(options, len(layout.opened), overrides)
    engine = Engine([o.ref.display for o in layout.opened], settings, sink, digests, progress)
    engine.run(visits)
    return digests
