"""Fresh BatchNorm statistics for averaged weights, imported only when --bn-model is given.

Averaged weights need their own BatchNorm running statistics: the mean of each epoch's
running statistics is not the statistics of the mean model (Izmailov et al., 2018,
arXiv 1803.05407, section 3.2). This module builds the user's model, loads the averaged
weights strictly, and runs one pass over the user's batches exactly as
`torch.optim.swa_utils.update_bn` does: statistics reset, momentum None (a cumulative
average over the batches), the model left in the mode it was in.

    >>> from ckpt_avg.bn import recompute_batchnorm
    >>> stats = recompute_batchnorm(  # doctest: +SKIP
    ...     averaged, model_spec="train:make_model", data_spec="bn_inputs.pt", batch_size=32,
    ...     max_batches=None, device="cpu", hyper_parameters=None)
    >>> sorted(stats)[:3]  # doctest: +SKIP
    ['bn1.num_batches_tracked', 'bn1.running_mean', 'bn1.running_var']
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .errors import CheckpointError, CkptAvgError, UsageError
from .userpath import importable_from_cwd

__all__ = ["BatchNormError", "recompute_batchnorm", "update_batchnorm", "validate_specs"]

DATA_FILE_SUFFIXES = (".pt", ".pth", ".safetensors")
EXAMPLES = {"--bn-model": "train:make_model", "--bn-data": "train:bn_batches or inputs.pt"}
_SHOWN_KEYS = 5  # how many mismatched keys an error names before "and N more"


class BatchNormError(CkptAvgError):
    """The model or the data named for the BatchNorm recompute failed (exit status 1).

    Raised where the user's own code raises or returns the wrong thing; an option value
    that names nothing (no such module, attribute or file) is a `UsageError` instead.
    """


def recompute_batchnorm(
    state_dict: dict[str, torch.Tensor],
    *,
    model_spec: str,
    data_spec: str | None,
    batch_size: int,
    max_batches: int | None,
    device: str,
    hyper_parameters: dict[str, Any] | None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Recompute the BatchNorm statistics of averaged weights; return them by state-dict key.

    `model_spec` is MODULE:CALLABLE returning the model (an `nn.Module` or LightningModule;
    it gets those `hyper_parameters` its signature names, or all of them if it takes
    **kwargs, as Lightning's `load_from_checkpoint` does). `data_spec` is MODULE:CALLABLE
    returning an iterable of batches, or a .pt/.safetensors file of one input tensor cut
    into batches of `batch_size` in file order. MODULE is imported with the current
    directory on the import path, as `python -m` does.

    The result holds `running_mean`, `running_var` and `num_batches_tracked` of every
    BatchNorm layer that tracks them, on the CPU; it equals `update_bn` run on the model
    holding `state_dict` over the same batches. A model with no BatchNorm layer gives {}
    and a warning, passed to `warn` (default: `warnings.warn`).

        >>> stats = recompute_batchnorm(avg, model_spec="train:make_model",  # doctest: +SKIP
        ...     data_spec="train:bn_loader", batch_size=32, max_batches=100, device="cuda",
        ...     hyper_parameters={"hidden": 256})
    """
    warn = warn or _warn
    data_spec = validate_specs(model_spec, data_spec)
    model_factory = _parse_callable_spec(model_spec, "--bn-model")
    data_factory = None if _is_data_file(data_spec) else _parse_callable_spec(data_spec, "--bn-data")
    with importable_from_cwd():
        model = _build_model(model_factory, model_spec, hyper_parameters)
        _load_averaged(model, state_dict, model_spec)
        if not _batchnorm_modules(model):
            warn(
                f"--bn-model {model_spec}: the model has no BatchNorm layer;"
                " nothing was recomputed and the averaged tensors were written as they are"
            )
            return {}
        model.to(torch.device(device))
        batches = (
            _file_batches(data_spec, batch_size, max_batches)
            if data_factory is None
            else _call_data(data_factory, data_spec)
        )
        update_batchnorm(model, batches, device=device, max_batches=max_batches)
    for name in _unfed_layers(model):
        warn(f"BatchNorm layer {name!r} received no batch during the recompute; its statistics are the reset ones")
    return _statistics(model)


def validate_specs(model_spec: str, data_spec: str | None) -> str:
    """Usage errors in --bn-model/--bn-data found without importing anything; returns the data spec.

    Cheap enough to run before the averaging, so a typo does not wait for a large model.
    """
    if data_spec is None:
        raise UsageError("--bn-model needs --bn-data: the batches to recompute the BatchNorm statistics on")
    _split_spec(model_spec, "--bn-model")
    if not _is_data_file(data_spec):
        _split_spec(data_spec, "--bn-data")
    elif not Path(data_spec).is_file():
        raise UsageError(f"--bn-data {data_spec}: no such file")
    return data_spec


@torch.no_grad()
def update_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> int:
    """`torch.optim.swa_utils.update_bn`, plus dict batches, a batch cap and every mode kept.

    Each batch is a tensor, a list/tuple whose first element is the input, or a dict
    passed as keyword arguments. Returns the number of batches used; none at all is an
    error. Every submodule's train/eval mode and every BatchNorm momentum is restored,
    where `update_bn` sets the whole model to the top-level mode.

        >>> update_batchnorm(model, loader, max_batches=50)  # doctest: +SKIP
        50
    """
    layers = _batchnorm_modules(model)
    if not layers:
        return 0
    for layer in layers:
        layer.reset_running_stats()
    modes = {module: module.training for module in model.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    target = None if device is None else torch.device(device)
    used = 0
    try:
        model.train()
        for layer in layers:
            layer.momentum = None  # a cumulative average over the batches, as update_bn does
        for used, batch in enumerate(_limited(batches, max_batches), start=1):
            _forward(model, batch, target, used)
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, training in modes.items():
            module.training = training
    if used == 0:
        raise BatchNormError("--bn-data yielded no batch: the BatchNorm statistics need at least one")
    return used


def _batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    """The layers `update_bn` resets and updates (BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def _limited(batches: Iterable[Any], max_batches: int | None) -> Iterator[Any]:
    """The batches, at most `max_batches` of them; the user's iterator's errors say which batch."""
    iterator = iter(batches)
    for position in itertools.count(1) if max_batches is None else range(1, max_batches + 1):
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as error:  # the user's data code can raise anything
            raise BatchNormError(f"--bn-data failed producing batch {position}: {_describe(error)}") from error
        yield batch


def _forward(model: nn.Module, batch: Any, device: torch.device | None, position: int) -> None:
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise BatchNormError(
                f"--bn-data batch {position} is an empty {type(batch).__name__}; expected the input first"
            )
        batch = batch[0]
    try:
        if isinstance(batch, Mapping):
            model(**{str(key): _to(value, device) for key, value in batch.items()})
        else:
            model(_to(batch, device))
    except Exception as error:  # the user's forward can raise anything
        raise BatchNormError(
            f"the model's forward pass failed on --bn-data batch {position}: {_describe(error)}"
        ) from error


def _to(value: Any, device: torch.device | None) -> Any:
    return value.to(device) if device is not None and isinstance(value, torch.Tensor) else value


def _unfed_layers(model: nn.Module) -> list[str]:
    return [
        name for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0
    ]  # fmt: skip


def _statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm buffers under their state-dict keys, found by identity (so aliases and hooks agree)."""
    wanted = {
        id(buffer)
        for layer in _batchnorm_modules(model)
        for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked)
        if buffer is not None
    }
    return {
        key: value.detach().to("cpu", copy=True)
        for key, value in model.state_dict(keep_vars=True).items()
        if id(value) in wanted
    }


# --- the model ---------------------------------------------------------------------------


def _build_model(factory: Callable[..., Any], spec: str, hyper_parameters: dict[str, Any] | None) -> nn.Module:
    kwargs = _accepted_kwargs(factory, hyper_parameters or {})
    try:
        model = factory(**kwargs)
    except Exception as error:  # the user's factory can raise anything
        raise BatchNormError(f"--bn-model {spec} raised {_describe(error)}") from error
    if not isinstance(model, nn.Module):
        raise BatchNormError(
            f"--bn-model {spec} returned {type(model).__name__}, not a torch.nn.Module;"
            " it must return the model (an nn.Module or LightningModule)"
        )
    return model


def _accepted_kwargs(factory: Callable[..., Any], hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyper-parameters the factory's signature takes, as `load_from_checkpoint` picks them."""
    named = {k: v for k, v in hyper_parameters.items() if isinstance(k, str)}
    if not named:
        return {}
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: call it bare
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return named
    keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in named.items() if k in keywords}


def _load_averaged(model: nn.Module, state_dict: dict[str, torch.Tensor], spec: str) -> None:
    """A strict load, with an error that names the first keys that differ and the fix."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing from the checkpoints: {_some(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_some(unexpected)}")
    for key, value in expected.items():
        if key in state_dict and not is_lazy(value) and value.shape != state_dict[key].shape:
            problems.append(
                f"shape of {key!r} is {list(state_dict[key].shape)} in the checkpoints,"
                f" {list(value.shape)} in the model"
            )
            break
    if problems:
        raise CheckpointError(
            f"the averaged weights do not fit the model from --bn-model {spec}: {'; '.join(problems)}"
            " (check the model's arguments, or --key/--strip-prefix)"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except Exception as error:  # a custom load hook can raise anything
        raise CheckpointError(
            f"the averaged weights do not load into the model from --bn-model {spec}: {_describe(error)}"
        ) from error


def _some(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOWN_KEYS])
    return shown if len(keys) <= _SHOWN_KEYS else f"{shown} and {len(keys) - _SHOWN_KEYS} more"


# --- the data ----------------------------------------------------------------------------


def _is_data_file(spec: str) -> bool:
    return spec.lower().endswith(DATA_FILE_SUFFIXES)


def _call_data(source: Any, spec: str) -> Iterable[Any]:
    """A callable is called with no arguments; a module-level iterable (a DataLoader) is used as it is."""
    if callable(source):
        try:
            source = source()
        except Exception as error:  # the user's data code can raise anything
            raise BatchNormError(f"--bn-data {spec} raised {_describe(error)}") from error
    if not isinstance(source, Iterable) or isinstance(source, (torch.Tensor, str, bytes, Mapping)):
        raise BatchNormError(
            f"--bn-data {spec} gave {type(source).__name__}, not an iterable of batches"
            " (a list or DataLoader of tensors, (input, target) pairs or dicts)"
        )
    return source


# A file of a few KB can hold a view (`expand`, stride 0) of 2^40 rows; what its batches
# would make in memory beyond the bytes the file stores is bounded by this.
MAX_VIEW_BYTES = 1 << 30


def _file_batches(path: str, batch_size: int, max_batches: int | None) -> Iterator[torch.Tensor]:
    """The batches of the file's tensor, each read (or cut as a view) only when it is used."""
    if path.lower().endswith(".safetensors"):
        return _safetensors_batches(path, batch_size)
    inputs = _load_inputs(path)
    rows = _rows(inputs, path)
    used = rows if max_batches is None else min(rows, max_batches * batch_size)
    _check_view(inputs, used, path)
    return (inputs.narrow(0, start, min(batch_size, rows - start)) for start in range(0, rows, batch_size))


def _rows(inputs: torch.Tensor, path: str) -> int:
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise BatchNormError(f"--bn-data {path}: the input tensor has no rows (shape {list(inputs.shape)})")
    return int(inputs.shape[0])


def _check_view(inputs: torch.Tensor, rows: int, path: str) -> None:
    """Refuse a view whose used rows would make far more in memory than the file holds."""
    made = rows * (inputs[0].numel() if rows else 0) * inputs.element_size()
    stored = inputs.untyped_storage().nbytes()
    if made > stored and made > MAX_VIEW_BYTES:
        raise BatchNormError(
            f"--bn-data {path}: the input tensor is a view of {stored} stored bytes that its batches"
            f" would expand to {made} bytes (shape {list(inputs.shape)}, strides {list(inputs.stride())});"
            " save the data itself (tensor.contiguous()) or lower --bn-batches"
        )


def _safetensors_batches(path: str, batch_size: int) -> Iterator[torch.Tensor]:
    from safetensors import safe_open

    try:
        handle: Any = safe_open(path, framework="pt", device="cpu")  # untyped
        names = list(handle.keys())
        if len(names) != 1:
            raise BatchNormError(_not_one_tensor(path, f"keys {_some(names)}"))
        rows_of = handle.get_slice(names[0])
        shape = rows_of.get_shape()
    except BatchNormError:
        raise
    except Exception as error:  # safetensors raises many types for a bad file
        raise BatchNormError(f"--bn-data {path}: cannot be read as tensors: {_describe(error)}") from error
    if not shape or shape[0] == 0:
        raise BatchNormError(f"--bn-data {path}: the input tensor has no rows (shape {list(shape)})")
    return (rows_of[start : start + batch_size] for start in range(0, shape[0], batch_size))


def _load_inputs(path: str) -> torch.Tensor:
    """One tensor from a .pt file: the file is a tensor, or holds exactly one named tensor.

    Mapped, not read: only the rows of the batches used are paged in.
    """
    try:
        try:
            content: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            content = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (pre-zip) file
    except Exception as error:  # torch.load raises many types for a bad file
        raise BatchNormError(f"--bn-data {path}: cannot be read as tensors: {_describe(error)}") from error
    if isinstance(content, torch.Tensor):
        return content
    if isinstance(content, Mapping) and len(content) == 1:
        (value,) = content.values()
        if isinstance(value, torch.Tensor):
            return value
    what = f"keys {_some([str(k) for k in content])}" if isinstance(content, Mapping) else type(content).__name__
    raise BatchNormError(_not_one_tensor(path, what))


def _not_one_tensor(path: str, what: str) -> str:
    return (
        f"--bn-data {path}: expected one input tensor (or a file holding one named tensor), found {what};"
        " for inputs with targets or several tensors use --bn-data MODULE:CALLABLE"
    )


# --- importing the user's code -----------------------------------------------------------


def _split_spec(spec: str, option: str) -> tuple[str, str]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        wanted = "MODULE:CALLABLE or a .pt/.safetensors file" if option == "--bn-data" else "MODULE:CALLABLE"
        raise UsageError(f"{option} must be {wanted} (e.g. {EXAMPLES[option]}), not {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        raise UsageError(
            f"{option} {spec}: name a module, not a file (run from its directory: {Path(module_name).stem}:{attribute})"
        )
    return module_name, attribute


def _parse_callable_spec(spec: str, option: str) -> Any:
    """Import MODULE and return its attribute CALLABLE (dotted names allowed on both sides)."""
    module_name, attribute = _split_spec(spec, option)
    with importable_from_cwd():
        module = _import(module_name, spec, option)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{option} {spec}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if option == "--bn-model" and isinstance(target, nn.Module):
        raise UsageError(
            f"{option} {spec} is a model instance; name a function or class that returns a new model"
            " (its weights are replaced)"
        )
    if option == "--bn-model" and not callable(target):
        raise UsageError(f"{option} {spec} is a {type(target).__name__}, not a callable returning the model")
    return target


def _import(module_name: str, spec: str, option: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise UsageError(
                f"{option} {spec}: no module named {module_name!r} in the current directory or on the import path"
            ) from error
        raise BatchNormError(f"{option} {spec}: importing {module_name!r} failed: {_describe(error)}") from error
    except SystemExit as error:
        raise BatchNormError(
            f"{option} {spec}: importing {module_name!r} exited (SystemExit {error.code});"
            " guard the script's training code with `if __name__ == '__main__':`"
        ) from error
    except Exception as error:  # importing the user's module can raise anything
        raise BatchNormError(f"{option} {spec}: importing {module_name!r} failed: {_describe(error)}") from error


def _describe(error: BaseException) -> str:
    """`Type: first line of the message`, so the CLI's error stays one line (--debug shows the rest)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
