"""Unpickling that never runs code from a checkpoint unless the user trusts it.

A pickle can only act through the globals it names and the opcodes that apply them. Ours
runs on the pure-Python unpickler so every such opcode is ours to judge: `find_class`
returns a real object only for an allowlist of inert containers and value types, each
wrapped in a `Constructor` that checks its arguments and charges the bytes it will build
to one budget per file; any other name becomes an inert `Placeholder` class. BUILD,
SETITEM(S), APPEND(S) and ADDITEMS on a class or a function are refused at the opcode,
so no class attribute is ever set. Classes the user allows with `--allow-global` are
built with `object.__new__` and a plain `__dict__`: none of their methods run.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import importlib
import math
import pickle
import struct
import sys
import types
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


# numpy's scalar types, kept as values in configs (dtype=np.float32); called, they may only
# convert one scalar (on a sequence they would build an array).
_NUMPY_SCALAR_TYPES = tuple(
    f"numpy.{name}"
    for name in (
        "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "longdouble", "complex64", "complex128", "str_", "bytes_",
    )
)  # fmt: skip
_ALLOWED = (*_ALLOWED, *_NUMPY_SCALAR_TYPES)


def shown(text: str, limit: int = 120) -> str:
    """A name from a file, safe to put in a message: escaped and cut short."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


class _Refused(Exception):
    """An allowlisted constructor was given arguments it may not build from."""


# One budget per file, shared by every constructor a pickle calls: a few KB of pickle can
# otherwise ask for gigabytes (bytes(4 GiB), 21 nested hex encodings, a V2000000000 array).
# Real metadata (hyper-parameters, configs, numpy scalars) builds a few MB at most.
MAX_BUILT_BYTES = 1 << 30
_ITEM = 64  # charged per element a container builds: a pointer and, often, a fresh object
_OBJECT = 64  # charged for a fixed-size object


class GlobalResolver:
    """Decides what each global named by a pickle becomes, and counts what it builds."""

    def __init__(self, policy: PicklePolicy, overrides: dict[str, Any], *, placeholders_only: bool = False) -> None:
        self.policy = policy
        self.overrides = overrides
        # Untrusted getattr is answered without a lookup (see _inert_getattr), called like an override.
        self._getattr = self._inert_getattr
        self.placeholders_only = placeholders_only  # a first pass that must import and build nothing
        self.placeholders: set[str] = set()
        self._classes: dict[str, type[Placeholder]] = {}
        self._constructors: dict[str, Constructor] = {}
        self.bytes_left = MAX_BUILT_BYTES
        self.classes_loaded: set[type] = set()  # real classes whose objects may hold a Constructor
        self.vouched: set[type] = set()  # --allow-global classes: built inert, never called
        self._override_ids = {id(value) for value in (*overrides.values(), self._getattr)}
        self._snapshots: dict[int, tuple[Any, _State]] = {}
        # numpy dtypes this pickle made with copy=True and has not used yet: the only ones
        # BUILD may set. A dtype already under an array, or numpy's shared float64, changed
        # afterwards would make that array read past its memory.
        self.fresh_dtypes: dict[int, Any] = {}

    def seal_dtypes(self, values: Any) -> None:
        for value in values:
            self.fresh_dtypes.pop(id(value), None)

    def spend(self, nbytes: int, what: str) -> None:
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            raise UnsafePickleError(f"pickle builds more than {MAX_BUILT_BYTES:,} bytes with {what} (a memory bomb?)")

    def is_override(self, value: Any) -> bool:
        return id(value) in self._override_ids

    def resolve(self, module: str, name: str) -> Any:
        found = self._resolve(module, name)
        real = found.real if isinstance(found, Constructor) else found
        if not self.policy.trust and not self.is_override(real) and id(real) not in self._snapshots:
            self._snapshots[id(real)] = (real, _mutable_state(real))
        return found

    def dispose(self) -> None:
        """Break the resolver's own reference cycles (its constructors and its getattr point
        back at it) once its pickle is loaded: the engine reads DCP items with the collector
        off, and a resolver per item would otherwise stay in memory until the run ends. The
        resolver resolves nothing afterwards; what it counted (placeholders) stays readable."""
        self._constructors.clear()
        self.__dict__.pop("_getattr", None)

    def check_unchanged(self) -> None:
        """A second line of defence: undo, and refuse, any change to a class or function we gave out.

        The opcodes that set attributes refuse a class or function as their target, so this
        should never find anything. Values are compared by identity: an `==` that an object
        from the pickle defines (an ndarray's) must not decide whether the restore happens.
        """
        changed = []
        for found, before in self._snapshots.values():
            if not _same_state(_mutable_state(found), before):
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
        if self.placeholders_only:
            return self._placeholder(full)
        if full == "builtins.getattr":
            return self._getattr
        if full in self.policy.extra_allowed and full not in _ALLOWED:
            return self._vouched(full)
        if full in _ALLOWED or _is_numpy_dtype_class(module, name):
            if full not in self._constructors:
                try:
                    real = _import_global(module, name)
                except (ImportError, AttributeError):
                    return self._placeholder(full)  # not installed here: the tensors stay loadable
                if isinstance(real, type):
                    self.classes_loaded.add(real)
                self._constructors[full] = Constructor(real, full, self)
            return self._constructors[full]
        return self._placeholder(full)

    def _vouched(self, full: str) -> type:
        with importable_from_cwd():
            problem = check_allow_global(full)
            cls = None if problem else _import_global(*full.rsplit(".", 1))
        if not isinstance(cls, type):
            raise UnsafePickleError(f"--allow-global {full}: {problem}")
        self.vouched.add(cls)
        self.classes_loaded.add(cls)
        return cls

    def _placeholder(self, full: str) -> type[Placeholder]:
        if full not in self._classes:
            self._classes[full] = placeholder_class(full)
            if not self.placeholders_only:
                self.placeholders.add(full)
        return self._classes[full]

    def _inert_getattr(self, target: Any, name: Any, *default: Any) -> Any:
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


def _same_state(now: _State, before: _State) -> bool:
    if now[1] is not before[1] or now[2] is not before[2]:
        return False
    if now[0] is None or before[0] is None:
        return now[0] is before[0]
    return now[0].keys() == before[0].keys() and all(now[0][k] is v for k, v in before[0].items())


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


# ---------------------------------------------------------------- what each allowed global may build


_Rule = Callable[[tuple[Any, ...], dict[str, Any]], int]
_SCALARS = (int, float, complex, str, bytes, bool, type(None))


_PLAIN_ITERABLES = (
    list, tuple, set, frozenset, dict, str, bytes, bytearray, range,
    collections.deque, collections.OrderedDict, collections.Counter, collections.defaultdict,
)  # fmt: skip


def _plain_length(value: Any) -> int:
    """How many items iterating `value` gives, for plain data only (no code runs to find out)."""
    if type(value) not in _PLAIN_ITERABLES and not _is_torch_size(value):
        raise _Refused(f"it is given a {type(value).__name__}, not plain data")
    try:
        return len(value)
    except OverflowError:  # range(10**30)
        raise _Refused("it is given a range too long to build") from None


def _is_torch_size(value: Any) -> bool:
    return isinstance(value, tuple) and type(value).__module__ == "torch" and type(value).__name__ == "Size"


def _container(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if len(args) > 2:
        raise _Refused("too many arguments")
    items = _plain_length(args[0]) if args else 0
    if len(args) > 1 and not isinstance(args[1], int | type(None)):  # deque's maxlen
        raise _Refused("its second argument is not a length")
    return _OBJECT + (items + len(kwargs)) * 2 * _ITEM


def _defaultdict(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    factory = args[0] if args else None
    if not (factory is None or (isinstance(factory, Constructor) and isinstance(factory.real, type))):
        raise _Refused("its default factory is not an allowed class")
    return _container(args[1:], kwargs)


def _bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if kwargs or len(args) > 3 or not all(isinstance(a, str) for a in args[1:]):
        raise _Refused("it is given arguments other than data and an encoding")
    if not args:
        return _OBJECT
    source = args[0]
    if type(source) is int:  # bytes(N): N zero bytes
        return _OBJECT + max(source, 0)
    if type(source) is str:
        return _OBJECT + 4 * len(source)
    return _OBJECT + _plain_length(source)


def _text(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """str(): of text, bytes and numbers only. str() of a pickled object would run its
    __repr__: ten references to one list, eight deep, print as 10**8 items."""
    if kwargs or len(args) > 3 or not all(isinstance(a, str) for a in args[1:]):
        raise _Refused("it is given arguments other than data and an encoding")
    if not args:
        return _OBJECT
    if len(args) > 1 and type(args[0]) not in (bytes, bytearray):
        raise _Refused("it decodes something that is not bytes")
    if type(args[0]) not in (*_SCALARS, bytearray):
        raise _Refused(f"it would print a {type(args[0]).__name__} (objects from a file are never printed)")
    return _OBJECT + 4 * _scalar_size(args[0])


def _scalar_size(value: Any) -> int:
    if isinstance(value, str | bytes | bytearray):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 1  # as decimal digits
    return 32


def _number(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """int(), float(), complex(), bool(): of text and numbers only.

    int() of a Decimal('1e1000000000') would compute a billion digits; int() of a long
    string is bounded by Python's own digit limit and by what the budget let be built.
    """
    if kwargs or len(args) > 2 or not all(type(a) in _SCALARS for a in args):
        raise _Refused("it converts something that is not text or a number")
    return _OBJECT + sum(_scalar_size(a) for a in args)


def _no_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if args or kwargs:
        raise _Refused("a pickle of it passes no arguments (its state comes after)")
    return _OBJECT


def _keywords_only(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if args:
        raise _Refused("it takes keyword arguments only")
    return _OBJECT + len(kwargs) * 2 * _ITEM


def _values(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """A value type built from a few scalars (dates, paths, devices, slices, ranges)."""
    for value in (*args, *kwargs.values()):
        if type(value) not in _SCALARS and not _is_value_object(value):
            raise _Refused(f"it is given a {type(value).__name__}")
    return _OBJECT + sum(_scalar_size(v) for v in (*args, *kwargs.values()) if type(v) in _SCALARS)


def _is_value_object(value: Any) -> bool:
    import datetime
    import pathlib

    return isinstance(value, datetime.tzinfo | datetime.timedelta | pathlib.PurePath)


def _encode(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """_codecs.encode: how protocol 2 spells bytes (`encode(text, 'latin1')`), nothing else.

    Other codecs expand ('hex' doubles: nested 21 times, a few bytes become gigabytes).
    """
    if kwargs or not 2 <= len(args) <= 3 or type(args[0]) is not str:
        raise _Refused("it is not given text and an encoding")
    if not all(isinstance(a, str) for a in args[1:]) or args[1].lower().replace("_", "-") not in _TEXT_CODECS:
        raise _Refused("only the latin-1, utf-8 and ascii codecs are allowed")
    return _OBJECT + 4 * len(args[0])


_TEXT_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"})


def _fraction(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Fraction: of integers, floats and plain 'n/d' text (Fraction('1e1000000000') computes 10**10**9)."""
    if kwargs or not 1 <= len(args) <= 2:
        raise _Refused("it is not given a numerator and a denominator")
    for value in args:
        if type(value) is str:
            body = value.strip().lstrip("+-")
            if len(body) > 4300 or not body.replace("/", "", 1).isdigit() or not body.isascii():
                raise _Refused("its text is not a plain n/d")
        elif type(value) is int:
            if value.bit_length() > 1 << 16:
                raise _Refused("its integers are too long")
        elif type(value) is not float:
            raise _Refused(f"it is given a {type(value).__name__}")
    return _OBJECT + sum(_scalar_size(a) for a in args)


_MAX_DECIMAL_EXPONENT = 100_000


def _decimal(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if kwargs or len(args) > 2 or (args and type(args[0]) not in (str, int, float, tuple)):
        raise _Refused("it is not given text or a number")
    return _OBJECT + (_scalar_size(args[0]) if args and type(args[0]) is not tuple else 256)


def _checked_decimal(value: Any) -> Any:
    """A Decimal whose exponent is huge turns into a billion-digit integer at the first int()."""
    if value.is_finite() and abs(value.adjusted()) > _MAX_DECIMAL_EXPONENT:
        raise _Refused(f"its exponent is beyond +-{_MAX_DECIMAL_EXPONENT:,}")
    return value


def _numpy_scalar_type(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if kwargs or len(args) > 1 or (args and type(args[0]) not in _SCALARS):
        raise _Refused("it is given something other than one scalar")
    return _OBJECT + (_scalar_size(args[0]) if args else 0)


def _numpy_text_type(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """numpy.bytes_ and numpy.str_: of text only (numpy.bytes_(3_000_000_000) is 3 GB of zeros)."""
    if kwargs or len(args) > 1 or (args and type(args[0]) not in (str, bytes)):
        raise _Refused("it is given something other than text")
    return _OBJECT + 4 * (len(args[0]) if args else 0)


def _numpy_dtype(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if kwargs or len(args) > 3:
        raise _Refused("too many arguments")
    spec: Any = args[0] if args else None
    size = len(spec) if type(spec) in (str, bytes, list, tuple, dict) else 0
    return _OBJECT + size * _ITEM


def _refuse_uninitialised(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    raise _Refused("it builds an array of uninitialised memory")


def _numpy_scalar(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    import numpy

    if kwargs or not 1 <= len(args) <= 2 or not isinstance(args[0], numpy.dtype):
        raise _Refused("it is not given a dtype and its bytes")
    return _OBJECT + int(args[0].itemsize)


def _numpy_reconstruct(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    import numpy

    if kwargs or len(args) != 3 or _real(args[0]) is not numpy.ndarray:
        raise _Refused("it is not given numpy.ndarray, a shape and a dtype")
    return _OBJECT + _array_bytes(args[1], _as_dtype(args[2]))


def _as_dtype(spec: Any) -> Any:
    import numpy

    if isinstance(spec, numpy.dtype):
        return spec
    if type(spec) not in (str, bytes) or len(spec) > 16:
        raise _Refused("its dtype is not a short type code")
    try:
        return numpy.dtype(spec.decode("ascii") if isinstance(spec, bytes) else spec)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise _Refused("its dtype is not a type code") from None


def _array_bytes(shape: Any, dtype: Any) -> int:
    dims = shape if type(shape) in (tuple, list) else (shape,)
    if not all(type(d) is int and d >= 0 for d in dims):
        raise _Refused("its shape is not whole numbers")
    return int(math.prod(dims)) * int(dtype.itemsize)


def _zeroed_array(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's _reconstruct, but zeroed: an array that no BUILD fills must not hold heap bytes."""
    import numpy

    return numpy.zeros(shape, _as_dtype(dtype))


def _reconstructor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if kwargs or len(args) != 3:
        raise _Refused("it is not given a class, a base and a state")
    base, state = _real(args[1]), args[2]
    if base is object:
        if state is not None:
            raise _Refused("its state for object is not None")
        return _OBJECT
    if base not in (dict, list) or type(state) is not base:
        raise _Refused("it builds on a base other than object, dict or list")
    return _OBJECT + len(state) * 2 * _ITEM


def _reconstruct_object(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor, for the bases protocols 0 and 1 use for plain classes."""
    cls, base = _real(cls), _real(base)
    if not isinstance(cls, type):
        raise _Refused("it is not given a class")
    if issubclass(cls, Placeholder):
        return cls()
    native = [b for b in cls.__mro__ if not b.__flags__ & _HEAPTYPE and b is not object]
    if not issubclass(cls, base) or native not in ([], [base]):
        raise _Refused("its class is not a plain subclass of its base")  # dict.__new__(OrderedDict) is half-made
    made = base.__new__(cls)
    if base is not object:
        base.__init__(made, state)
    return made


def _real(value: Any) -> Any:
    return value.real if isinstance(value, Constructor) else value


_CONTAINERS = (
    "builtins.list", "builtins.tuple", "builtins.set", "builtins.frozenset", "builtins.dict",
    "collections.OrderedDict", "collections.Counter", "collections.deque", "torch.Size",
    "lightning.fabric.utilities.data.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict", "lightning.pytorch.utilities.parsing.AttributeDict",
)  # fmt: skip
_RULES: dict[str, _Rule] = {
    **dict.fromkeys(_CONTAINERS, _container),
    **dict.fromkeys(_NUMPY_SCALAR_TYPES, _numpy_scalar_type),
    **dict.fromkeys(("numpy.bytes_", "numpy.str_"), _numpy_text_type),
    **dict.fromkeys(("builtins.int", "builtins.float", "builtins.complex", "builtins.bool"), _number),
    **dict.fromkeys((n for n in _ALLOWED if n.startswith("omegaconf.")), _no_arguments),
    "builtins.object": _no_arguments,
    "builtins.str": _text,
    "builtins.bytes": _bytes,
    "builtins.bytearray": _bytes,
    "_codecs.encode": _encode,
    "copyreg._reconstructor": _reconstructor,
    "collections.defaultdict": _defaultdict,
    "argparse.Namespace": _keywords_only,
    "decimal.Decimal": _decimal,
    "fractions.Fraction": _fraction,
    "numpy.dtype": _numpy_dtype,
    "numpy.ndarray": _refuse_uninitialised,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
}
# Where the real callable is replaced, or its result checked.
_IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    "copyreg._reconstructor": _reconstruct_object,
    "numpy.core.multiarray._reconstruct": _zeroed_array,
    "numpy._core.multiarray._reconstruct": _zeroed_array,
}
_RESULT_CHECKS: dict[str, Callable[[Any], Any]] = {"decimal.Decimal": _checked_decimal}


class Constructor:
    """An allowlisted class or function as a pickle calls it.

    Before it runs, its arguments are checked (plain data only: no object from the pickle
    is printed, iterated through its own code or used as a size unchecked) and the bytes it
    will build are charged to the file's budget. Where the pickle keeps the class itself as
    a value (a type in hyper-parameters), the loaded tree holds the real one.
    """

    def __init__(self, real: Any, name: str, resolver: GlobalResolver) -> None:
        self.real = real
        self.name = name
        self.resolver = resolver
        self.rule = _RULES.get(name, _values)

    def build(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, new: bool) -> Any:
        """`real(*args, **kwargs)` (REDUCE), or `real.__new__(real, *args, **kwargs)` (NEWOBJ)."""
        try:
            self.resolver.spend(self.rule(args, kwargs), self.name)
            # A class handed to a class (defaultdict(dict), _reconstructor(cls, dict, state)) is the real one.
            args = tuple(_real(a) for a in args)
            if self.name in _IMPLEMENTATIONS:
                if new:
                    raise _Refused("it is not a class")
                made = _IMPLEMENTATIONS[self.name](*args)
            elif new:
                if not isinstance(self.real, type):
                    raise _Refused("it is not a class")
                made = self.real.__new__(self.real, *args, **kwargs)
            else:
                made = self.real(*args, **kwargs)
            self.resolver.seal_dtypes(args)
            if self.name == "numpy.dtype" and len(args) == 3 and args[2] is True:
                self.resolver.fresh_dtypes[id(made)] = made
            check = _RESULT_CHECKS.get(self.name)
            return check(made) if check is not None else made
        except _Refused as refused:
            raise UnsafePickleError(f"pickle calls {self.name} and {refused}") from None


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


# ---------------------------------------------------------------- the unpickler


def _acts(value: Any) -> bool:
    """A class, function, method, module or builtin: setting its attributes changes code."""
    if isinstance(value, Placeholder):
        return False  # our inert stand-in: its attributes are only what the pickle said
    return isinstance(value, type | types.ModuleType | Constructor) or callable(value)


def describe_object(value: Any) -> str:
    """What a message calls an object from a pickle: never its repr, which its class decides."""
    value = _real(value)
    if isinstance(value, type) and issubclass(value, Placeholder):
        return shown(value.global_name)
    if isinstance(value, type | types.FunctionType | types.BuiltinFunctionType):
        name = getattr(value, "__qualname__", None)
        if isinstance(name, str):
            return shown(name)
    return f"a {type(value).__name__}"


class RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with every opcode that calls or changes an object judged by us.

    The C unpickler cannot be stopped between reading BUILD and applying it; this one
    refuses a class or function as the target before anything is set.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)
    # What the base class sets up in load(), named here for the type checker.
    stack: list[Any]
    append: Callable[[Any], None]
    read: Callable[[int], bytes]
    readinto: Callable[[bytearray], int]
    pop_mark: Callable[[], list[Any]]

    def __init__(
        self, file: IO[bytes], resolver: GlobalResolver, persistent_load: Callable[[Any], Any] | None = None
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self.resolver = resolver
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        return self.resolver.resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafePickleError("pickle refers to an object outside itself (a persistent id)")
        return self._persistent(pid)

    def load(self) -> Any:
        try:
            loaded = super().load()
        finally:
            self.resolver.check_unchanged()
        return _unwrap_constructors(loaded, self.resolver.classes_loaded, {})

    # -- calls

    def call(self, func: Any, args: Any, kwargs: Any, *, new: bool) -> Any:
        if type(args) is not tuple or type(kwargs) is not dict:
            raise UnsafePickleError("pickle calls something with malformed arguments")
        if isinstance(func, Constructor):
            return func.build(args, kwargs, new=new)
        if (isinstance(func, type) and issubclass(func, Placeholder)) or isinstance(func, Placeholder):
            return func(*args, **kwargs)
        if func in self.resolver.vouched:
            return _inert_instance(func, args, kwargs)
        if self.resolver.is_override(func) and not new:
            return func(*args, **kwargs)
        raise UnsafePickleError(f"pickle calls {describe_object(func)}, which cannot be called")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args, {}, new=False)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.call(cls, args, {}, new=True))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.call(cls, args, kwargs, new=True))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:  # INST and OBJ
        self.append(self.call(klass, tuple(args), {}, new=False))

    # -- changes to an object already built

    def _target(self, opcode: str) -> Any:
        target = self.stack[-1]
        if _acts(target):
            what = describe_object(target)
            raise UnsafePickleError(
                f"pickle changes the attributes of {what} ({opcode} on a class or function is refused)"
            )
        return target

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self._target("BUILD")
        if isinstance(inst, Placeholder):
            inst.__setstate__(state)
        elif type(inst) in self.resolver.vouched:
            _set_attributes(inst, state)
        elif _buildable(inst, state, self.resolver):
            _apply_state(inst, state)
        else:
            raise UnsafePickleError(f"pickle sets the state of {describe_object(inst)}, which it may not")

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        _store(self._target("SETITEM"), [key, value], self.resolver)

    def load_setitems(self) -> None:
        items = self.pop_mark()
        _store(self._target("SETITEMS"), items, self.resolver)

    def load_append(self) -> None:
        value = self.stack.pop()
        _extend(self._target("APPEND"), [value], self.resolver)

    def load_appends(self) -> None:
        items = self.pop_mark()
        _extend(self._target("APPENDS"), items, self.resolver)

    def load_dict(self) -> None:
        items = self.pop_mark()
        made: dict[Any, Any] = {}
        _store(made, items, self.resolver)
        self.append(made)

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target("ADDITEMS")
        if type(target) in self.resolver.vouched:
            raise UnsafePickleError(f"pickle adds items to {describe_object(target)}, which it may not")
        if isinstance(target, set):
            target.update(items)
        else:
            for item in items:
                target.add(item)

    def load_bytearray8(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        if length > MAX_BUILT_BYTES:  # allocated before it is read: never trust the length
            raise UnsafePickleError(f"pickle holds a bytearray of {length:,} bytes")
        data = bytearray(length)
        if self.readinto(data) != length:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(data)

    for _opcode, _method in (
        (pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj), (pickle.NEWOBJ_EX, load_newobj_ex),
        (pickle.BUILD, load_build), (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
        (pickle.APPEND, load_append), (pickle.APPENDS, load_appends), (pickle.ADDITEMS, load_additems),
        (pickle.BYTEARRAY8, load_bytearray8), (pickle.DICT, load_dict),
    ):  # fmt: skip
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def _buildable(inst: Any, state: Any, resolver: GlobalResolver) -> bool:
    """An object of an allowlisted class, whose own __setstate__ (numpy's, omegaconf's) is trusted."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and type(inst) is numpy.ndarray:
        resolver.spend(_ndarray_state_bytes(state), "numpy.ndarray")
        resolver.seal_dtypes(state if type(state) is tuple else ())
        return True
    if numpy is not None and isinstance(inst, numpy.dtype):
        return resolver.fresh_dtypes.pop(id(inst), None) is inst
    return type(inst) in resolver.classes_loaded


def _ndarray_state_bytes(state: Any) -> int:
    """The bytes an ndarray's state asks for: (version, shape, dtype, fortran, data)."""
    import numpy

    if type(state) is tuple and len(state) == 5:
        state = state[1:]
    if not (type(state) is tuple and len(state) == 4 and isinstance(state[1], numpy.dtype)):
        raise UnsafePickleError("pickle gives numpy.ndarray a malformed state")
    try:
        return _array_bytes(state[0], state[1])
    except _Refused as refused:
        raise UnsafePickleError(f"pickle gives numpy.ndarray a state where {refused}") from None


def _apply_state(inst: Any, state: Any) -> None:
    """BUILD on an allowlisted object: its class's own __setstate__ (numpy's, omegaconf's), or its attributes.

    `__setstate__` is looked up on the class, never the object: a first BUILD could have
    put one in the object's __dict__ for the second to call.
    """
    setstate = getattr(type(inst), "__setstate__", None)
    if setstate is not None:
        setstate(inst, state)
        return
    slots = None
    if type(state) is tuple and len(state) == 2:
        state, slots = state
    if state:
        _set_attributes(inst, state)
    if slots:
        _attributes(inst, slots)  # names checked: no __class__ or __dict__ swap
        for key, value in slots.items():
            setattr(inst, key, value)


def _set_attributes(inst: Any, state: Any) -> None:
    """BUILD on an allowed class's object: a plain update of its __dict__, no method runs."""
    object.__getattribute__(inst, "__dict__").update(_attributes(inst, state))


def _attributes(inst: Any, state: Any) -> dict[str, Any]:
    """A pickle's attributes for an object: a dict of names, none that pickling looks up on
    the object itself (`__reduce_ex__` there would be called when the output is written)."""
    if not (type(state) is dict and all(type(k) is str and k not in _PROTOCOL_NAMES for k in state)):
        what = describe_object(type(inst))
        raise UnsafePickleError(f"pickle gives {what} a state that is not a dict of plain attribute names")
    return state


_PROTOCOL_NAMES = frozenset(
    {"__reduce_ex__", "__reduce__", "__getstate__", "__getnewargs__", "__getnewargs_ex__", "__class__", "__dict__"}
)


def _store(target: Any, items: list[Any], resolver: GlobalResolver) -> None:
    if type(target) in resolver.vouched:
        if not isinstance(target, dict):
            raise UnsafePickleError(f"pickle sets items of {describe_object(type(target))}, which it may not")
        for i in range(0, len(items) - 1, 2):
            dict.__setitem__(target, items[i], items[i + 1])
        return
    for i in range(0, len(items) - 1, 2):
        _check_key(items[i])
        target[items[i]] = items[i + 1]


# A dict key is printed in messages and plans: a tuple of ten references to one tuple,
# eight deep, is a few hundred bytes of pickle and prints as 10**8 items.
_MAX_KEY_ITEMS = 10_000


def _check_key(key: Any) -> None:
    if type(key) in (tuple, frozenset) and _printed_items(key, {}) > _MAX_KEY_ITEMS:
        raise UnsafePickleError(f"pickle uses a dict key that would print as more than {_MAX_KEY_ITEMS:,} items")
    if type(key) is int and key.bit_length() > _MAX_KEY_BITS:  # str() of it raises past 4300 digits
        raise UnsafePickleError("pickle uses a dict key that is an integer too long to print")


_MAX_KEY_BITS = 14_000


def _printed_items(node: Any, sizes: dict[int, int]) -> int:
    """How many items printing `node` writes, counting a shared part each time it appears."""
    if type(node) not in (tuple, frozenset):
        return 1
    if id(node) not in sizes:
        total = 1
        for child in node:
            total += _printed_items(child, sizes)
            if total > _MAX_KEY_ITEMS:
                break
        sizes[id(node)] = total
    return sizes[id(node)]


def _extend(target: Any, items: list[Any], resolver: GlobalResolver) -> None:
    if type(target) in resolver.vouched:
        if not isinstance(target, list):
            raise UnsafePickleError(f"pickle appends to {describe_object(type(target))}, which it may not")
        list.extend(target, items)
        return
    extend = getattr(target, "extend", None)
    if extend is not None:
        extend(items)
        return
    for item in items:
        target.append(item)


def _inert_instance(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An --allow-global class's object, made without calling anything the class defines."""
    if args or kwargs:
        raise UnsafePickleError(
            f"pickle calls {describe_object(cls)} with arguments; an allowed class is only rebuilt from its"
            " attributes (--trust-pickle is for files you trust)"
        )
    base = next(b for b in cls.__mro__ if b in (dict, list, object))
    return base.__new__(cls)


# Libraries whose classes are loaded by the built-in allowlist or not at all: their objects
# act (tensors, arrays, our own lazy readers). Standard-library modules are refused too,
# except the inert classes already on the allowlist.
_NEVER_ALLOWED_ROOTS = frozenset({"torch", "numpy", "ckpt_avg", "__builtin__", "__main__"})
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined by a class statement, not by C code


def check_allow_global(name: str) -> str:
    """The reason `--allow-global NAME` is refused, or "" when it names an inert data class.

    An allowed class is never called: its objects are made with `object.__new__` (or
    `dict`/`list`'s) and given a plain `__dict__` from the pickle, so only classes built
    that way are accepted: a class statement of the user's own code, deriving from object,
    dict or list, with no `__del__` (which would run on whatever attributes the pickle set).
    """
    module, _, attribute = name.rpartition(".")
    if not module or not all(part.isidentifier() for part in name.split(".")):
        return "give MODULE.CLASS, for example my_project.config.TrainConfig"
    if "{}.{}".format(*_current_name(module, attribute)) in _ALLOWED:
        return ""  # already loaded as itself
    root = module.split(".")[0]
    if root in sys.stdlib_module_names or root in _NEVER_ALLOWED_ROOTS:
        where = "the standard library" if root in sys.stdlib_module_names else root
        return (
            f"classes from {where} may act on files, processes, networks or imports and are never loaded"
            " from a checkpoint; only inert data classes of your own code can be allowed"
            " (--trust-pickle is for files you trust)"
        )
    try:
        value = _import_global(module, attribute)
    except Exception as exc:  # noqa: BLE001 - any failure to import means the name cannot be used
        return f"cannot import it ({type(exc).__name__}: {shown(str(exc))})"
    return _inert_class_problem(value)


def _inert_class_problem(value: Any) -> str:
    if not isinstance(value, type):
        kind = type(value).__name__
        return f"it is a {kind}, not a class; only classes can be allowed (calling a function runs code)"
    if issubclass(value, type | BaseException) or not value.__flags__ & _HEAPTYPE:
        return "only plain data classes can be allowed, not metaclasses, exceptions or classes written in C"
    native = [b for b in value.__mro__ if not b.__flags__ & _HEAPTYPE and b not in (object, dict, list)]
    if native:
        return (
            f"it derives from {native[0].__qualname__}; only classes deriving from object, dict or list can be allowed"
        )
    if any("__del__" in vars(b) for b in value.__mro__):
        return "it defines __del__, which would run on the attributes a pickle gives it"
    return ""


def _is_numpy_dtype_class(module: str, name: str) -> bool:
    return module == _ALLOWED_DTYPE_MODULE and name.isidentifier() and name.endswith("DType")


def make_unpickler(
    file: IO[bytes],
    resolver: GlobalResolver,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Our restricted unpickler; under --trust-pickle, the C one, importing what the pickle names."""
    if not resolver.policy.trust:
        return RestrictedUnpickler(file, resolver, persistent_load)

    class TrustingUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return resolver.resolve(module, name)

    unpickler = TrustingUnpickler(file, encoding="utf-8")
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
    except CheckpointError as exc:  # from a persistent id or a tensor rebuild: named once
        raise type(exc)(str(exc) if str(exc).startswith(f"{where}: ") else f"{where}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: pickle nests too deeply to read") from None
    except MemoryError:
        raise CheckpointError(f"{where}: pickle asks for more memory than it can hold") from None
    except Exception as exc:  # noqa: BLE001 - any failure inside a hostile pickle is a bad file
        raise CheckpointError(f"{where}: cannot unpickle: {describe_error(exc)}") from None


def describe_error(exc: BaseException) -> str:
    """An exception's type and message, never formatting an object it carries.

    `str(KeyError(key))` is `repr(key)`: for a key from a pickle, that can run for hours.
    """
    first = exc.args[0] if len(exc.args) == 1 else None
    if isinstance(first, str) and not isinstance(exc, KeyError):
        return f"{type(exc).__name__}: {shown(first, 200)}"
    return type(exc).__name__
