"""Whole pickled `nn.Module`s (`torch.save(model)`, YOLO's `model`/`ema`) seen as state dicts.

A pickled module is its class plus its `__dict__`: `_parameters`, `_buffers` and child
`_modules`. Those dicts are plain data, so the tensors can be averaged without importing
the class: the restricted unpickler leaves an inert placeholder whose recorded state holds
them. Under --trust-pickle the module is real and is read the same way.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .lazy import is_tensor_leaf
from .unpickle import Placeholder

_MAX_DEPTH = 64  # a module tree deeper than this is not a model


class PickledModule(OrderedDict[str, Any]):
    """The state dict of a pickled module: its parameters and persistent buffers by dotted name."""

    def __init__(self, class_name: str, module: Any, entries: OrderedDict[str, Any], classes: set[str]) -> None:
        super().__init__(entries)
        self.class_name = class_name
        self.module = module  # the placeholder, or the real module under --trust-pickle
        self.classes = classes  # of the module and its submodules: read as data, not left out


def module_state(node: Any) -> dict[str, Any] | None:
    """The `__dict__` a pickled module was rebuilt from, or None if `node` is not a module."""
    if isinstance(node, Placeholder):
        state = node.__dict__.get("_state")
    elif _is_real_module(node):
        state = node.__dict__
    else:
        return None
    if isinstance(state, dict) and isinstance(state.get("_parameters"), dict) and "_modules" in state:
        return state
    return None


def class_name(node: Any) -> str:
    if isinstance(node, Placeholder):
        return node.global_name
    return f"{type(node).__module__}.{type(node).__qualname__}"


def _is_real_module(node: Any) -> bool:
    try:
        import torch

        return isinstance(node, torch.nn.Module)
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def as_state_dict(node: Any) -> PickledModule | None:
    """A pickled module's tensors under the names `module.state_dict()` would give them."""
    state = module_state(node)
    if state is None:
        return None
    entries: OrderedDict[str, Any] = OrderedDict()
    classes = {class_name(node)}
    _collect(state, "", entries, 0, classes)
    return PickledModule(class_name(node), node, entries, classes)


def _collect(state: dict[str, Any], prefix: str, entries: OrderedDict[str, Any], depth: int, classes: set[str]) -> None:
    if depth > _MAX_DEPTH:
        return
    transient = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_parameters") or {}).items():
        if is_tensor_leaf(value):
            entries[prefix + str(name)] = value
    for name, value in (state.get("_buffers") or {}).items():
        if is_tensor_leaf(value) and name not in transient:
            entries[prefix + str(name)] = value
    children = state.get("_modules") or {}
    if isinstance(children, dict):
        for name, child in children.items():
            child_state = module_state(child)
            if child_state is not None:
                classes.add(class_name(child))
                _collect(child_state, f"{prefix}{name}.", entries, depth + 1, classes)


def replace_modules(tree: Any) -> Any:
    """The tree with every pickled module (at the top or one dict level down) as a PickledModule."""
    whole = as_state_dict(tree)
    if whole is not None:
        return whole
    if isinstance(tree, dict):
        for key, value in list(tree.items()):
            found = as_state_dict(value)
            if found is not None:
                tree[key] = found
    return tree


def module_classes(tree: Any) -> set[str]:
    """The classes of the pickled modules in a tree: their tensors are used, nothing is left out."""
    return {name for _, module in pickled_modules(tree) for name in module.classes}


def pickled_modules(tree: Any) -> list[tuple[str, PickledModule]]:
    """(dotted path, module) for the pickled modules in a tree as `replace_modules` left it."""
    if isinstance(tree, PickledModule):
        return [("(top level)", tree)]
    if isinstance(tree, dict):
        return [(str(k), v) for k, v in tree.items() if isinstance(v, PickledModule)]
    return []


class OutParameter:
    """Pickles as an `nn.Parameter` around an averaged tensor (whatever pickles as a tensor)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        import torch

        return (torch._utils._rebuild_parameter, (self.data, True, OrderedDict()))


def rebuild_module(module: Any, tensors: dict[str, Any], extra: Callable[[Any], Any], prefix: str = "") -> Any:
    """A shallow copy of a real (trusted) module tree holding the averaged tensors.

    Parameters and persistent buffers come from `tensors` by their dotted names; a
    non-persistent buffer is the last checkpoint's (through `extra`, which streams it).
    """
    clone = copy.copy(module)
    state = clone.__dict__
    state["_parameters"] = OrderedDict(
        (name, OutParameter(tensors[prefix + name]) if prefix + name in tensors else value)
        for name, value in module.__dict__["_parameters"].items()
    )
    state["_buffers"] = OrderedDict(
        (name, tensors[prefix + name] if prefix + name in tensors else (extra(value) if value is not None else None))
        for name, value in module.__dict__["_buffers"].items()
    )
    state["_modules"] = OrderedDict(
        (name, rebuild_module(child, tensors, extra, f"{prefix}{name}.") if module_state(child) else child)
        for name, child in module.__dict__["_modules"].items()
    )
    return clone
