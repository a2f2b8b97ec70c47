"""Unpickling that never runs code from a checkpoint unless the user trusts it.

A pickle can only run code through the globals it names: every callable it invokes is
first looked up by `find_class`. Ours returns a real object only for an allowlist of inert
containers and value types; any other name becomes an inert `Placeholder` class, so a
checkpoint holding `argparse.Namespace`, Lightning's `AttributeDict` or a custom config
object still yields its tensors, and a payload such as `os.system` is never imported.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import importlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar

from .errors import UnsafePickleError
from .userpath import importable_from_cwd

# Inert classes and functions loaded as themselves: constructing them runs no user code.
_ALLOWED: tuple[str, ...] = (
    "builtins.set",
    "builtins.frozenset",
    "builtins.bytearray",
    "builtins.bytes",
    "builtins.complex",
    "builtins.slice",
    "builtins.range",
    "builtins.dict",
    "builtins.list",
    "builtins.tuple",
    "builtins.int",
    "builtins.float",
    "builtins.str",
    "builtins.bool",
    "builtins.object",
    "_codecs.encode",
    "copyreg._reconstructor",
    "collections.OrderedDict",
    "collections.Counter",
    "collections.defaultdict",
    "collections.deque",
    "argparse.Namespace",
    "datetime.datetime",
    "datetime.date",
    "datetime.time",
    "datetime.timedelta",
    "datetime.timezone",
    "decimal.Decimal",
    "fractions.Fraction",
    "pathlib.Path",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "typing.Any",
    "torch.Size",
    "torch.device",
    "torch.serialization._get_layout",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    # Lightning's hyper-parameter container is a plain dict subclass.
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    # omegaconf containers rebuild themselves from plain data in __setstate__.
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
)
# numpy pickles dtypes by their class in numpy.dtypes (Float64DType, ...): only those
# plain class names, never an attribute path (numpy.dtypes.__loader__.set_data writes files).
_ALLOWED_DTYPE_MODULE = "numpy.dtypes"
# Names a pickle may give for a module that moved: pathlib's in Python 3.13; and Python 2's
# names, which protocol 2 pickles (all of torch.save's) still use for int, str and range.
_MODULE_ALIASES = {**_compat_pickle.IMPORT_MAPPING, "pathlib._local": "pathlib"}


def _current_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 module and name for a global as the pickle spells it (`__builtin__.long` is int)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _MODULE_ALIASES.get(module, module), name


class Placeholder:
    """Stands in for an object whose class we did not import.

    It records what the pickle said about it (arguments, state, items) so the report can
    name it, and it does nothing else: no method of the original class ever runs.
    """

    global_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        self = object.__new__(cls)
        self.__dict__["_args"] = args
        self.__dict__["_items"] = {}
        self.__dict__["_list"] = []
        self.__dict__["_state"] = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["_items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["_list"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["_list"].extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return type(self)(*args)

    def __repr__(self) -> str:
        return f"<placeholder for {self.global_name}>"

    def __reduce__(self) -> tuple[Any, ...]:
        raise pickle.PicklingError(f"placeholder for {self.global_name} cannot be saved")


def placeholder_class(global_name: str) -> type[Placeholder]:
    return type("Placeholder", (Placeholder,), {"global_name": global_name})


@dataclass(frozen=True)
class PicklePolicy:
    """How far to trust a pickle: the user's extra allowed globals, or full trust."""

    trust: bool = False
    extra_allowed: frozenset[str] = frozenset()


@dataclass
class Unpickled:
    """The result of one unpickling, with the globals we replaced by placeholders."""

    obj: Any
    placeholders: set[str] = field(default_factory=set)


def _import_global(module: str, name: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class GlobalResolver:
    """Decides what each global named by a pickle becomes."""

    def __init__(self, policy: PicklePolicy, overrides: dict[str, Any]) -> None:
        self.policy = policy
        self.overrides = overrides
        self.placeholders: set[str] = set()
        self._classes: dict[str, type[Placeholder]] = {}
        self.items_left = _MAX_CONSTRUCTED_ITEMS
        self.classes_loaded: set[type] = set()  # allowlisted classes whose objects may hold a Constructor
        self._snapshots: dict[int, tuple[Any, _State]] = {}
        self._vouched: set[int] = set()  # --allow-global classes

    def spend(self, items: int, what: str) -> None:
        self.items_left -= items
        if self.items_left < 0:
            raise UnsafePickleError(
                f"pickle builds more than {_MAX_CONSTRUCTED_ITEMS:,} items with {what} (a memory bomb?)"
            )

    def resolve(self, module: str, name: str) -> Any:
        found = self._resolve(module, name)
        if not self.policy.trust and id(found) not in self._snapshots and id(found) not in self._vouched:
            self._snapshots[id(found)] = (found, _mutable_state(found))
        return found

    def check_unchanged(self) -> None:
        """Undo, and refuse, a pickle's changes to the classes and functions it was given.

        BUILD on a class object sets attributes on the class itself: without this, a
        checkpoint could change `argparse.Namespace` for the rest of a training script.
        """
        changed = []
        for found, before in self._snapshots.values():
            if _mutable_state(found) != before:
                changed.append(getattr(found, "__qualname__", type(found).__name__))
                _restore(found, before)
        if changed:
            raise UnsafePickleError(f"pickle changes the attributes of {', '.join(sorted(changed))}")

    def _resolve(self, module: str, name: str) -> Any:
        module, name = _current_name(module, name)
        full = f"{module}.{name}"
        if full in self.overrides:
            return self.overrides[full]
        if self.policy.trust:
            with importable_from_cwd():  # as --allow-global and --bn-model find the user's classes
                return _import_global(module, name)
        if full in self.policy.extra_allowed:
            with importable_from_cwd():
                vouched = _import_global(module, name)
            self._vouched.add(id(vouched))  # the user's own class: it may keep caches of its own
            if isinstance(vouched, type):
                self.classes_loaded.add(vouched)
            return vouched
        if full == "builtins.getattr":
            return self._getattr
        if full in _ALLOWED or _is_numpy_dtype_class(module, name):
            try:
                real = _import_global(module, name)
            except (ImportError, AttributeError):
                pass  # Not installed here: an inert placeholder keeps the tensors loadable.
            else:
                if full in _BUILDS:
                    return Constructor(real, _BUILDS[full], self)
                if isinstance(real, type):
                    self.classes_loaded.add(real)
                return real
        if full not in self._classes:
            self._classes[full] = placeholder_class(full)
            self.placeholders.add(full)
        return self._classes[full]

    def _getattr(self, target: Any, name: Any, *default: Any) -> Any:
        """`getattr` that looks nothing up: an attribute of a class we did not import is inert too.

        mmengine's HistoryBuffer pickles `getattr(HistoryBuffer, 'min')`; that names no code
        beyond the class already reported, so it needs no warning of its own.
        """
        if isinstance(target, type) and issubclass(target, Placeholder) and isinstance(name, str):
            return placeholder_class(f"{target.global_name}.{name}")
        self.placeholders.add("builtins.getattr")
        return placeholder_class("builtins.getattr")(target, name, *default)


_State = tuple[dict[str, Any] | None, Any, Any]


def _mutable_state(found: Any) -> _State:
    attributes = getattr(found, "__dict__", None)
    return (
        dict(attributes) if attributes is not None else None,
        getattr(found, "__defaults__", None),
        getattr(found, "__kwdefaults__", None),
    )


def _restore(found: Any, state: _State) -> None:
    attributes, defaults, kwdefaults = state
    with contextlib.suppress(AttributeError, TypeError):
        if attributes is not None:
            for key in set(vars(found)) - set(attributes):
                delattr(found, key)
            for key, value in attributes.items():
                if vars(found).get(key, _MISSING) is not value:
                    setattr(found, key, value)
        if hasattr(found, "__defaults__"):
            found.__defaults__ = defaults
        if hasattr(found, "__kwdefaults__"):
            found.__kwdefaults__ = kwdefaults


_MISSING = object()


def unpickler_class(resolver: GlobalResolver) -> type[pickle.Unpickler]:
    """A `pickle.Unpickler` whose every global goes through `resolver`."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return resolver.resolve(module, name)

        def load(self) -> Any:
            try:
                loaded = super().load()
            finally:
                resolver.check_unchanged()
            return _unwrap_constructors(loaded, resolver.classes_loaded, {})

    return RestrictedUnpickler


# Items (elements, bytes) that the allowlisted constructors of one pickle may build.
_MAX_CONSTRUCTED_ITEMS = 1 << 26


def _length(value: Any) -> int:
    try:
        return len(value)
    except OverflowError:  # range(10**30)
        return _MAX_CONSTRUCTED_ITEMS + 1
    except TypeError:
        return 0


def _first_length(args: tuple[Any, ...]) -> int:
    return _length(args[0]) if args else 0


def _byte_count(args: tuple[Any, ...]) -> int:
    if args and isinstance(args[0], int):  # bytes(N) allocates N zero bytes
        return args[0] if args[0] >= 0 else _MAX_CONSTRUCTED_ITEMS + 1
    return _first_length(args)


def _shape_items(shape: Any) -> int:
    dims = shape if isinstance(shape, tuple | list) else (shape,)
    total = 1
    for dim in dims:
        if not isinstance(dim, int) or dim < 0:
            return 0  # numpy refuses it itself
        total *= dim
        if total > _MAX_CONSTRUCTED_ITEMS:
            break
    return total


# numpy's scalar types, kept as values in configs (dtype=np.float32); called on a sequence
# they build an array, so they count what they build like the containers.
_NUMPY_SCALAR_TYPES = tuple(
    f"numpy.{name}"
    for name in (
        "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "longdouble", "complex64", "complex128", "str_", "bytes_",
    )
)  # fmt: skip
_ALLOWED = (*_ALLOWED, *_NUMPY_SCALAR_TYPES)

# How many items each copying constructor builds from its arguments.
_BUILDS: dict[str, Callable[[tuple[Any, ...]], int]] = {
    **dict.fromkeys(_NUMPY_SCALAR_TYPES, _first_length),
    **dict.fromkeys(
        ("builtins.list", "builtins.tuple", "builtins.set", "builtins.frozenset", "builtins.dict",
         "collections.OrderedDict", "collections.Counter", "collections.deque", "torch.Size"),
        _first_length,
    ),
    "builtins.bytes": _byte_count,
    "builtins.bytearray": _byte_count,
    "collections.defaultdict": lambda args: _length(args[1]) if len(args) > 1 else 0,
    "copyreg._reconstructor": lambda args: _length(args[2]) if len(args) > 2 else 0,
    "numpy.ndarray": lambda args: _shape_items(args[0]) if args else 0,
    "numpy.core.multiarray._reconstruct": lambda args: _shape_items(args[1]) if len(args) > 1 else 0,
    "numpy._core.multiarray._reconstruct": lambda args: _shape_items(args[1]) if len(args) > 1 else 0,
}  # fmt: skip


class Constructor:
    """An allowlisted class or function as a pickle calls it, counting what it builds.

    A few hundred bytes of pickle can otherwise build gigabytes: `list(range(10**9))`,
    `bytes(10**12)`, or `list(L)` repeated on one memoized list. Where the pickle keeps the
    class itself as a value (a type in hyper-parameters), the loaded tree holds the real one.
    """

    def __init__(self, real: Any, builds: Callable[[tuple[Any, ...]], int], resolver: GlobalResolver) -> None:
        self.real = real
        self.builds = builds
        self.resolver = resolver

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.resolver.spend(self.builds(args) + len(kwargs), getattr(self.real, "__name__", "a constructor"))
        # A class handed to a class (defaultdict(dict), _reconstructor(cls, dict, state)) is the real one.
        args = tuple(a.real if isinstance(a, Constructor) else a for a in args)
        return self.real(*args, **kwargs)


def _unwrap_constructors(node: Any, classes: set[type], done: dict[int, Any]) -> Any:
    """The loaded tree with every `Constructor` left in it as a value replaced by its class.

    Objects are walked through their `__dict__` too (omegaconf keeps `dict` as a type in
    its metadata), each once: their parent links make cycles. `done` maps each container
    seen to what replaces it (a rebuilt tuple), so a shared one stays shared.
    """
    if isinstance(node, Constructor):
        return node.real
    if isinstance(node, str | bytes | int | float | Placeholder) or node is None:
        return node
    if id(node) in done:
        return done[id(node)]
    done[id(node)] = node
    if isinstance(node, dict):
        for key, value in node.items():
            node[key] = _unwrap_constructors(value, classes, done)
        for key in [k for k in node if isinstance(k, Constructor)]:  # a type as a key: {int: ...}
            node[key.real] = node.pop(key)
        if isinstance(node, collections.defaultdict) and isinstance(node.default_factory, Constructor):
            node.default_factory = node.default_factory.real  # defaultdict(dict): omegaconf's caches
    elif isinstance(node, list):
        node[:] = [_unwrap_constructors(v, classes, done) for v in node]
    elif isinstance(node, collections.deque):
        items = [_unwrap_constructors(v, classes, done) for v in node]
        node.clear()
        node.extend(items)
    elif type(node) in (tuple, set, frozenset):
        rebuilt = type(node)(_unwrap_constructors(v, classes, done) for v in node)
        done[id(node)] = rebuilt
        return rebuilt
    elif type(node) in classes and isinstance(getattr(node, "__dict__", None), dict):
        attributes = vars(node)
        for key, value in attributes.items():
            attributes[key] = _unwrap_constructors(value, classes, done)
    return node


# Modules whose classes act on the system: never allowlisted, even when asked for.
_NEVER_ALLOWED_MODULES = frozenset(
    {
        "os", "posix", "nt", "subprocess", "sys", "shutil", "builtins", "importlib", "runpy", "code",
        "codeop", "pickle", "_pickle", "marshal", "ctypes", "multiprocessing", "socket", "pty", "signal",
        "threading", "_thread", "io", "_io", "codecs", "tempfile", "functools", "operator", "types",
        "webbrowser", "urllib", "http", "asyncio", "concurrent", "sqlite3", "zipfile", "tarfile", "gc",
        "inspect", "torch", "numpy", "pathlib",
    }
)  # fmt: skip


def check_allow_global(name: str) -> str:
    """The reason `--allow-global NAME` is refused, or "" when it names an inert class.

    Only classes can be allowed, never functions (a pickle calls what it names), and never a
    class from a module that acts on the system: no option but --trust-pickle runs a payload.
    """
    module, _, attribute = name.rpartition(".")
    if not module or not attribute.isidentifier():
        return "give MODULE.CLASS, for example my_project.config.TrainConfig"
    root = module.split(".")[0]
    if root in _NEVER_ALLOWED_MODULES:
        return f"classes from {root} are never loaded from a checkpoint (--trust-pickle is for files you trust)"
    try:
        value = _import_global(module, attribute)
    except Exception as exc:  # noqa: BLE001 - any failure to import means the name cannot be used
        return f"cannot import it ({type(exc).__name__}: {exc})"
    if not isinstance(value, type):
        kind = type(value).__name__
        return f"it is a {kind}, not a class; only classes can be allowed (calling a function runs code)"
    return ""


def _is_numpy_dtype_class(module: str, name: str) -> bool:
    return module == _ALLOWED_DTYPE_MODULE and name.isidentifier() and name.endswith("DType")


def make_unpickler(
    file: IO[bytes],
    resolver: GlobalResolver,
    persistent_load: Callable[[Any], Any] | None = None,
) -> pickle.Unpickler:
    unpickler = unpickler_class(resolver)(file, encoding="utf-8")
    if persistent_load is not None:
        unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler


def loads_checked(file: IO[bytes], resolver: GlobalResolver, where: str, **kwargs: Any) -> Any:
    """Unpickle one object, turning every low-level failure into one clear error."""
    from .errors import CheckpointError

    try:
        return make_unpickler(file, resolver, **kwargs).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{where}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: pickle nests too deeply to read") from None
    except MemoryError:
        raise CheckpointError(f"{where}: pickle asks for more memory than it can hold") from None
    except Exception as exc:  # noqa: BLE001 - any failure inside a hostile pickle is a bad file
        raise CheckpointError(f"{where}: cannot unpickle: {type(exc).__name__}: {exc}") from None
