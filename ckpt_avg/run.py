"""One run of the pipeline behind the public API: discover -> select -> open -> layout ->
average -> write -> report, as `api` and `distributed` both drive it.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._version import __version__
from .average import AverageOptions, Digests, Engine, Visit, mixing_weights
from .digest import FORMAT_VERSION, SCHEME
from .discover import CheckpointRef, Discovery, Skipped, discover
from .dtypes import BY_OPTION, OUTPUT_CHOICES
from .errors import CheckpointError, CkptAvgError, UsageError
from .guard import OutputKind, directory_kind, is_ckpt_avg_output, validate_output_name
from .indices import candidate_from, mark_copies
from .layout import Layout, build_layout, has_state_dict
from .modules import pickled_modules
from .naming import PYTORCH_SUFFIXES
from .options import Options
from .report import CandidateRecord, FileRecord, Report
from .select import Candidate, SelectOptions, describe_order, make_plan, refuse_unindexed_order, validate_options
from .sources import ContentMeta, OpenedCheckpoint, cheap_to_open, content_meta, file_state, open_checkpoint
from .statedict import StateDictChoice, dotted, find_state_dicts, holds_lightning_swa_average
from .torchfile import UnsupportedTensor
from .unpickle import PicklePolicy, check_allow_global
from .userpath import importable_from_cwd
from .written import Written


def _report(run: _Run, layout: Layout, written: Written, output: str, started: float) -> Report:
    report = run.report(dry_run=False)
    report.output = output
    report.files = [FileRecord(p, written.sha256.get(p)) for p in written.files]
    report.output_digest = written.output_digest
    report.digest_scheme = SCHEME
    for record, digest in zip(report.selected, written.input_digests, strict=True):
        object.__setattr__(record, "tensor_digest", digest)
    report.parameters = parameter_count(layout)
    report.tensors = len(layout.primary_names)
    report.placeholders = sorted(run.placeholders)
    report.dropped = written.dropped + run.second_models[1:]
    report.seconds = time.monotonic() - started
    return report


def _batchnorm_refused(options: Options, where: str) -> None:
    if options.bn_model is not None:
        raise UsageError(f"--bn-model is not supported {where}: run the BatchNorm recompute in one process")


class _Discard:
    def write(self, unit: Any, start: int, data: torch.Tensor) -> None:
        pass


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


def parameter_count(layout: Layout) -> int:
    """Floating-point values averaged, without BatchNorm running statistics (buffers, not parameters)."""
    statistics = {layer + stat for layer in batchnorm_layers(layout.primary_names) for stat in _BN_STATISTICS}
    primary = layout.names[layout.choice.primary]
    return sum(
        unit.numel
        for unit in layout.primary_units
        if unit.kind == "float" and not any(n in statistics for n in unit.names if n in primary)
    )


_BN_STATISTICS = ("running_mean", "running_var")


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


def _validate(options: Options, output: str | None = None) -> OutputKind | None:
    """Usage errors, found before any file is opened; the kind of OUTPUT, where there is one."""
    validate_options(options.select)
    if options.dtype is not None and options.dtype not in BY_OPTION:
        raise UsageError(f"--dtype must be one of {', '.join(OUTPUT_CHOICES)}, not {options.dtype!r}")
    if BY_OPTION.get(options.accum_dtype) not in (torch.float64, torch.float32):
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
    if output is None:
        return None
    return validate_output_name(output, max_shard_size=options.max_shard_size, out_format=options.format)


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


class _Run:
    """One invocation's state between the stages."""

    def __init__(self, inputs: Sequence[str], options: Options) -> None:
        self.options = options
        self.policy = PicklePolicy(trust=options.trust_pickle, extra_allowed=frozenset(options.allow_global))
        self._opened: dict[str, OpenedCheckpoint] = {}
        self.discovery = _without_earlier_outputs(discover(inputs, recursive=options.recursive, name_glob=options.glob))
        self.warnings: list[str] = [f"{s.display}: skipped: {s.reason}" for s in self.discovery.skipped if s.unreadable]
        self.placeholders: set[str] = set()
        self.candidates = self._candidates()
        self.plan = make_plan(self.candidates, options.select)
        refuse_unindexed_order(
            self.plan, [name for name, value in (("--ema", options.ema), ("--weights", options.weights)) if value]
        )
        self.selected_opened: list[OpenedCheckpoint] = []
        self.choice: StateDictChoice | None = None
        self.second_models: list[str] = []

    def output_kind(self, named: OutputKind) -> OutputKind:
        """OUTPUT's kind now the selected inputs are known (`named`: from its name and --format)."""
        inputs_dcp = all(c.ref.format == "dcp" for c in self.plan.selected)
        return directory_kind(named, self.options.format, inputs_dcp)

    def _open(self, ref: CheckpointRef) -> OpenedCheckpoint:
        if ref.display not in self._opened:
            states = tuple((path, file_state(path)) for path in ref.files)
            self._opened[ref.display] = open_checkpoint(ref, self.policy)
            self._opened[ref.display].states = states
        return self._opened[ref.display]

    def _candidates(self) -> list[Candidate]:
        notes: list[str] = []
        neighbours: dict[str, list[str]] = defaultdict(list)
        for ref in self.discovery.refs:
            head, name = os.path.split(ref.display.rstrip("/"))
            neighbours[head].append(name)
        candidates = [
            candidate_from(ref, self._meta(ref), neighbours[os.path.split(ref.display.rstrip("/"))[0]], notes)
            for ref in self.discovery.refs
        ]
        self.warnings.extend(notes)
        return mark_copies(candidates, self._open, self.options.key)

    def _meta(self, ref: CheckpointRef) -> ContentMeta | None:
        """The contents' indices: needed where the name has none, read anyway where cheap."""
        info = ref.name
        metric = self.options.select.metric
        needs_contents = (
            (info.epoch is None and info.step is None and info.save is None)
            or info.is_alias
            or info.dash_file
            or (metric is not None and metric not in info.metrics)
            or (self.options.select.by == "step" and info.step is None)
            or (self.options.select.by == "epoch" and info.epoch is None)
        )
        if needs_contents:
            return content_meta(self._open(ref))
        try:  # to see whether the name and the contents agree; legacy pickles take two passes: not them
            return content_meta(self._open(ref)) if cheap_to_open(ref) else None
        except CkptAvgError:
            return None  # read again, with its error, only if selected

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
        self.second_models = second_models([c.ref for c in self.plan.selected])
        if self.second_models:
            self.warnings.append(self.second_models[0])
        if len(self.selected_opened) == 1:
            self.warnings.append("only one checkpoint is selected: the output holds its weights unchanged")
        for opened in self.selected_opened:
            if holds_lightning_swa_average(opened.tree):
                self.warnings.append(
                    f"{opened.ref.display} holds Lightning's SWA average (saved after StochasticWeightAveraging's"
                    " BatchNorm epoch), not one epoch's weights: averaging it in counts that average again"
                    f" (--end {opened.tree['epoch'] - 1} leaves it out)"
                )

    def layout(self, kind: OutputKind, output: str = "avg.pt") -> Layout:
        assert self.choice is not None
        paths = [self.choice.primary]
        if kind.keeps_structure:
            for other in self.choice.others:
                if all(has_state_dict(o.tree, other) for o in self.selected_opened):
                    paths.append(other)
                else:
                    self.warnings.append(
                        f"state dict {dotted(other)!r} is not in every selected checkpoint; left out of the output"
                    )
        if kind.keeps_structure and not self.options.trust_pickle:
            refuse_pickled_modules(self.selected_opened[-1], paths, output)
        out_dtype = BY_OPTION[self.options.dtype] if self.options.dtype else None
        layout = build_layout(
            self.selected_opened,
            self.choice,
            paths,
            strip_prefix=self.options.strip_prefix,
            out_dtype=out_dtype,
            warnings=self.warnings,
        )
        if kind.keeps_structure:
            refuse_uncopyable_extras(layout)
        extras = [f"{dotted(p)}: {k}" if p else k for p, entries in layout.extras.items() for k in entries]
        if extras:
            fate = {
                OutputKind.PYTORCH: "copied from the last checkpoint",
                OutputKind.DCP_DIRECTORY: "copied from the last checkpoint where they are plain data",
            }.get(kind, "left out of this flat output")
            self.warnings.append(
                f"{len(extras)} state-dict entr{'y is' if len(extras) == 1 else 'ies are'} not weights"
                f" (extra state, packed parameters: {', '.join(extras[:3])}{', ...' if len(extras) > 3 else ''}):"
                f" not averaged, {fate}"
            )
        return layout

    def provenance(self) -> dict[str, Any]:
        select = self.options.select
        weights = self._weights()
        return {
            "tool": "ckpt-avg",
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "by": self.plan.by,
            "state_dict": list(self.choice.primary) if self.choice else [],  # where the digested tensors are
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
                "bn_model": self.options.bn_model,
                "bn_data": self.options.bn_data,
                "bn_batch_size": self.options.bn_batch_size,
                "bn_batches": self.options.bn_batches,
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
            order=describe_order(self.plan),
            candidates=records,
            dry_run=dry_run,
            state_dict_key=dotted(self.choice.primary) if self.choice else None,
            other_state_dicts=[dotted(p) for p in (*self.choice.others, *self.choice.listed)] if self.choice else [],
            warnings=list(self.warnings),
        )


_SECOND_MODEL = re.compile(r"^(?:model|pytorch_model)_([0-9]+)\.(?:safetensors|bin)$")


def second_models(refs: Sequence[CheckpointRef]) -> list[str]:
    """A warning naming the models beside the first in accelerate's save_state() directories
    (`model_1.safetensors`: a GAN's discriminator, a student), and one entry per model left out.

    Only the first model is averaged; the warning gives the command that averages another.
    """
    directories = [r for r in refs if r.is_directory]
    if not directories:
        return []
    names = sorted(
        (n for n in _listing(directories[-1].display) if _SECOND_MODEL.match(n)),
        key=lambda n: int(_SECOND_MODEL.match(n).group(1)),  # type: ignore[union-attr]
    )
    if not names:
        return []
    files = " ".join(shlex.quote(os.path.join(r.display, names[0])) for r in refs)
    first = os.path.basename(refs[-1].files[0])
    warning = (
        f"{directories[-1].display} holds {len(names) + 1} models; only the first ({first}) is averaged,"
        f" LEFT OUT: {', '.join(names)}; average {names[0]} with: ckpt-avg {files}"
        f" -o {os.path.splitext(names[0])[0]}_avg.safetensors"
    )
    return [warning] + [f"{name} (a second model in each checkpoint directory)" for name in names]


def _listing(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def refuse_pickled_modules(last: OpenedCheckpoint, paths: Sequence[tuple[str, ...]], output: str) -> None:
    """A .pt output keeps a whole pickled model only when its class may be imported."""
    for where, module in pickled_modules(last.tree):
        path = () if where == "(top level)" else (where,)
        if path in paths:
            raise CheckpointError(
                f"{last.ref.display}: {where} is a whole pickled model ({module.class_name}); its tensors are"
                " averaged without importing that class, but a .pt output would have to rebuild the object:"
                f" write a state dict for load_state_dict with -o {_stem(output)}.safetensors, or add --trust-pickle"
                " for files you trust (it imports the class and runs their code) to keep the model in a .pt file"
            )


def refuse_uncopyable_extras(layout: Layout) -> None:
    """Packed parameters of dynamic quantization hold quantized tensors, which cannot be copied."""
    for path, entries in layout.extras.items():
        for key, value in entries.items():
            if _holds_unsupported(value, 0):
                raise CheckpointError(
                    f"{layout.opened[-1].ref.display}: state-dict entry {key!r}"
                    f"{f' in {dotted(path)}' if path else ''} holds a quantized tensor (packed parameters)"
                    " that cannot be copied into a .pt output; write .safetensors (the averaged float"
                    " tensors, without it), or save the model before quantizing it"
                )


def _holds_unsupported(value: Any, depth: int) -> bool:
    if isinstance(value, UnsupportedTensor):
        return True
    if depth < 8 and isinstance(value, list | tuple):
        return any(_holds_unsupported(v, depth + 1) for v in value)
    if depth < 8 and isinstance(value, dict):
        return any(_holds_unsupported(v, depth + 1) for v in value.values())
    return False


def _stem(output: str) -> str:
    for suffix in (*PYTORCH_SUFFIXES, ".safetensors"):
        if output.lower().endswith(suffix):
            return output[: -len(suffix)]
    return output


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
    accumulate = BY_OPTION[options.accum_dtype]
    return AverageOptions(
        weights=mixing_weights(count, options.weights, options.ema),
        accum_dtype=accumulate,
        device=options.device,
        int_policy=options.int_policy,
        allow_nonfinite=options.allow_nonfinite,
        overrides=overrides or {},
        budgets=options.budgets,
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
    for opened in layout.opened:  # before anything is published
        opened.check_unchanged()
    return digests
