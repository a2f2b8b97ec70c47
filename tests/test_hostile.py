"""Hostile checkpoints: pickles that would run code must never run it (SPEC 1.4).

Every file here is made at test time. Each payload, if it ran, would create a canary file
or delete a victim file; a run must exit 0 (the object became an inert placeholder, left
out of a `.pt` output and listed in the report) or 1 (one `Error:` line naming the file),
and the canary must never appear. Only `--trust-pickle` runs the payload.

The corpus is a grid: payloads (os.system, subprocess, eval/exec, __import__, open for
writing, ...) x pickle encodings (GLOBAL+REDUCE, STACK_GLOBAL, INST, OBJ, a BUILD/
__setstate__ gadget) x containers (zip `.pt` from `torch.save`, zip with a hand-spliced
data.pkl, legacy `.pt`, a bare pickle named `.pt`, a zip whose data.pkl is only the payload,
a legacy tar archive).
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import io
import json
import os
import pickle
import struct
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import leftovers, oracle_mean, run_cli

MARKER = "@@CKPT-AVG-HOSTILE@@"
_MARKER_BYTES = b"X" + struct.pack("<I", len(MARKER)) + MARKER.encode()


# ---------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Payload:
    """A call `module.name(*args)` that would leave a trace on disk if it ever ran."""

    key: str
    module: str
    name: str
    args: tuple[Any, ...]
    python: Callable[..., Any] | None = None  # the real callable, for pickles made by torch.save
    chain: bool = False  # getattr(__import__('os'), 'system')(cmd): a nested call, REDUCE only

    @property
    def one_arg(self) -> bool:
        return len(self.args) == 1 and not self.chain


PAYLOAD_KEYS = (
    "os.system",
    "posix.system",
    "os.popen",
    "subprocess.Popen",
    "subprocess.check_output",
    "subprocess.run",
    "subprocess.call",
    "builtins.eval",
    "builtins.exec",
    "__builtin__.eval",
    "builtins.open",
    "io.open",
    "codecs.open",
    "os.remove",
    "pickle.loads",
    "__import__ chain",
    "numpy.dtypes.__loader__.set_data",
)
PYTHON_PAYLOAD_KEYS = tuple(
    k for k in PAYLOAD_KEYS if k not in ("__import__ chain", "numpy.dtypes.__loader__.set_data")
)
SETSTATE_PAYLOAD_KEYS = (
    "os.system",
    "subprocess.Popen",
    "subprocess.check_output",
    "builtins.eval",
    "builtins.exec",
    "os.remove",
    "pickle.loads",
)


def make_payloads(canary: Path, victim: Path) -> dict[str, Payload]:
    touch = f"touch {canary}"
    inner = b"cos\nsystem\n(V" + touch.encode() + b"\ntR."
    payloads = [
        Payload("os.system", "os", "system", (touch,), os.system),
        Payload("posix.system", "posix", "system", (touch,), os.system),
        Payload("os.popen", "os", "popen", (touch,), os.popen),
        Payload("subprocess.Popen", "subprocess", "Popen", (["touch", str(canary)],), subprocess.Popen),
        Payload(
            "subprocess.check_output", "subprocess", "check_output", (["touch", str(canary)],), subprocess.check_output
        ),
        Payload("subprocess.run", "subprocess", "run", (["touch", str(canary)],), subprocess.run),
        Payload("subprocess.call", "subprocess", "call", (["touch", str(canary)],), subprocess.call),
        Payload("builtins.eval", "builtins", "eval", (f"open({str(canary)!r}, 'w').close()",), builtins.eval),
        Payload("builtins.exec", "builtins", "exec", (f"import os; os.system({touch!r})",), builtins.exec),
        Payload("__builtin__.eval", "__builtin__", "eval", (f"open({str(canary)!r}, 'w').close()",), builtins.eval),
        Payload("builtins.open", "builtins", "open", (str(canary), "w"), builtins.open),
        Payload("io.open", "io", "open", (str(canary), "w"), io.open),
        Payload("codecs.open", "codecs", "open", (str(canary), "w"), codecs.open),
        Payload("os.remove", "os", "remove", (str(victim),), os.remove),
        Payload("pickle.loads", "pickle", "loads", (inner,), pickle.loads),
        Payload("__import__ chain", "builtins", "__import__", (touch,), chain=True),
        # An allowlisted module reached through a dotted name: its loader writes files.
        Payload("numpy.dtypes.__loader__.set_data", "numpy.dtypes", "__loader__.set_data", (str(canary), b"pwned")),
    ]
    assert [p.key for p in payloads] == list(PAYLOAD_KEYS)
    return {p.key: p for p in payloads}


# ---------------------------------------------------------------- pickle opcodes, by hand


def _arg(value: Any) -> bytes:
    if isinstance(value, str):
        assert "\n" not in value
        return b"V" + value.encode("raw-unicode-escape") + b"\n"  # UNICODE (protocol 0)
    if isinstance(value, bytes):
        return b"B" + struct.pack("<I", len(value)) + value  # BINBYTES
    if isinstance(value, list):
        return b"(" + b"".join(_arg(v) for v in value) + b"l"  # MARK ... LIST
    raise TypeError(value)


def _args(values: tuple[Any, ...]) -> bytes:
    return b"".join(_arg(v) for v in values)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def fragment(payload: Payload, encoding: str) -> bytes:
    """Opcodes that push one object whose construction calls the payload (memo untouched)."""
    if payload.chain:
        assert encoding == "reduce"
        module = _global("builtins", "__import__") + b"(" + _arg("os") + b"tR"
        system = _global("builtins", "getattr") + b"(" + module + _arg("system") + b"tR"
        return system + b"(" + _args(payload.args) + b"tR"
    if encoding == "reduce":  # GLOBAL, MARK args TUPLE, REDUCE
        return _global(payload.module, payload.name) + b"(" + _args(payload.args) + b"tR"
    if encoding == "stack_global":  # protocol 4's STACK_GLOBAL
        head = _arg(payload.module) + _arg(payload.name) + b"\x93"
        return head + b"(" + _args(payload.args) + b"tR"
    if encoding == "inst":  # MARK args INST module name (protocol 0)
        return b"(" + _args(payload.args) + b"i" + payload.module.encode() + b"\n" + payload.name.encode() + b"\n"
    if encoding == "obj":  # MARK class args OBJ (protocol 1)
        return b"(" + _global(payload.module, payload.name) + _args(payload.args) + b"o"
    if encoding == "setstate":
        # An allowlisted instance gets `__setstate__` in its __dict__ from one BUILD; the next
        # BUILD then calls it with the argument: the classic BUILD gadget.
        assert payload.one_arg
        instance = _global("argparse", "Namespace") + b")\x81"  # EMPTY_TUPLE NEWOBJ
        state = b"}" + _arg("__setstate__") + _global(payload.module, payload.name) + b"s"  # EMPTY_DICT SETITEM
        return instance + state + b"b" + _args(payload.args) + b"b"  # BUILD, BUILD
    raise ValueError(encoding)


def whole_pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


class _Reducer:
    """Pickles as `func(*args)`: what a hostile `__reduce__` looks like to torch.save."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


# ---------------------------------------------------------------- containers


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(6, 5, generator=generator),
        "layer.bias": torch.randn(6, generator=generator),
        "norm.weight": torch.randn(6, generator=generator).to(torch.bfloat16),
    }


def _splice(data: bytes, body: bytes) -> bytes:
    assert data.count(_MARKER_BYTES) == 1, "marker must appear exactly once"
    return data.replace(_MARKER_BYTES, body)


def _rewrite_zip(source: bytes, replace: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(source)) as old, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            for suffix, value in replace.items():
                if info.filename.endswith(suffix):
                    data = value
            new.writestr(info.filename, data)
    return out.getvalue()


def _saved(tree: Any, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(tree, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _with_marker(nested: bool) -> dict[str, Any]:
    hyper: Any = {"lr": 0.1, "optim": {"betas": [0.9, MARKER]}} if nested else MARKER
    return {"state_dict": state_dict(1), "epoch": 1, "hyper_parameters": hyper}


def zip_spliced(body: bytes, nested: bool = False) -> bytes:
    """A real torch.save zip whose data.pkl has the payload spliced into hyper_parameters."""
    source = _saved(_with_marker(nested))
    with zipfile.ZipFile(io.BytesIO(source)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        data = archive.read(name)
    return _rewrite_zip(source, {"/data.pkl": _splice(data, body)})


def legacy_spliced(body: bytes) -> bytes:
    return _splice(_saved(_with_marker(nested=False), legacy=True), body)


def zip_bare(body: bytes) -> bytes:
    """A zip laid out like torch.save's whose data.pkl is nothing but the payload."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", whole_pickle(body))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return out.getvalue()


def legacy_tar(body: bytes) -> bytes:
    """The pre-1.0 tar format: its `storages` member is unpickled first."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("storages", whole_pickle(body)), ("tensors", b"\x80\x02K\x00."), ("pickle", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def torch_saved(payload: Payload, placement: str, legacy: bool) -> bytes:
    assert payload.python is not None
    evil = _Reducer(payload.python, payload.args)
    tree: dict[str, Any] = {"state_dict": state_dict(1), "epoch": 1}
    if placement == "top":
        tree["hyper_parameters"] = evil
    elif placement == "nested":
        tree["hyper_parameters"] = {"model": {"layers": [1, 2, {"init": evil}]}, "lr": 0.1}
    elif placement == "namespace":
        tree["args"] = argparse.Namespace(lr=0.1, hook=evil, sched=[evil])
    elif placement == "dict_key":
        tree["hyper_parameters"] = {evil: "value"}
    else:
        raise ValueError(placement)
    return _saved(tree, legacy=legacy)


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Case:
    id: str
    payload: str
    build: Callable[[Payload], bytes]
    must_average: bool  # the state dict is intact: placeholders must let the average through


def _cases() -> list[Case]:
    cases: list[Case] = []
    for key in PAYLOAD_KEYS:
        chain = key == "__import__ chain"
        encodings = ("reduce",) if chain else ("reduce", "stack_global", "inst", "obj")
        for enc in encodings:
            cases.append(Case(f"zip-spliced-{enc}-{key}", key, lambda p, e=enc: zip_spliced(fragment(p, e)), True))
        cases.append(Case(f"legacy-spliced-{key}", key, lambda p: legacy_spliced(fragment(p, "reduce")), True))
        cases.append(Case(f"raw-pickle-{key}", key, lambda p: whole_pickle(fragment(p, "reduce")), False))
        if not chain:
            cases.append(
                Case(f"zip-nested-obj-{key}", key, lambda p: zip_spliced(fragment(p, "obj"), nested=True), True)
            )
            cases.append(Case(f"zip-bare-inst-{key}", key, lambda p: zip_bare(fragment(p, "inst")), False))
    for key in SETSTATE_PAYLOAD_KEYS:
        # __setstate__ is looked up on the class, never the object: the second BUILD gives a
        # Namespace a string for its attributes, and the file is refused.
        cases.append(Case(f"zip-setstate-{key}", key, lambda p: zip_spliced(fragment(p, "setstate")), False))
        cases.append(Case(f"legacy-setstate-{key}", key, lambda p: legacy_spliced(fragment(p, "setstate")), False))
    for key in PYTHON_PAYLOAD_KEYS:
        for placement in ("top", "nested", "namespace"):
            cases.append(
                Case(f"torch.save-{placement}-{key}", key, lambda p, pl=placement: torch_saved(p, pl, False), True)
            )
        cases.append(Case(f"torch.save-legacy-{key}", key, lambda p: torch_saved(p, "top", True), True))
    for key in ("os.system", "builtins.eval", "subprocess.check_output"):
        cases.append(Case(f"torch.save-dict_key-{key}", key, lambda p: torch_saved(p, "dict_key", False), True))
        cases.append(Case(f"legacy-tar-{key}", key, lambda p: legacy_tar(fragment(p, "reduce")), False))
    return cases


CASES = _cases()
RESULTS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _count_corpus() -> Iterator[None]:
    yield
    if RESULTS:
        print(
            f"\nhostile corpus: {len(RESULTS)} files, {sum(1 for v in RESULTS.values() if v == 0)} averaged with "
            f"placeholders, {sum(1 for v in RESULTS.values() if v == 1)} refused with one error line"
        )


def test_corpus_is_large() -> None:
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture
def arena(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run directory, a canary that must never appear and a victim that must survive."""
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    return run, tmp_path / "canary", victim


def assert_untouched(canary: Path, victim: Path, *, settle: float = 0.0) -> None:
    if settle:
        time.sleep(settle)  # a Popen'd `touch` would need a moment
    assert not canary.exists(), "a payload ran: the canary file appeared"
    assert victim.exists(), "a payload ran: the victim file was deleted"


def check_hostile_run(run_dir: Path, hostile: Path, good: Path, must_average: bool) -> int:
    out = run_dir / "avg.pt"
    result = run_cli(good, hostile, "-o", out, "--json", expect=None)
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output
    assert leftovers(run_dir) == []
    if result.exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(hostile) in lines[0], result.stderr
        assert not out.exists()
        assert not must_average, f"the tensors should have been averaged with placeholders: {lines[0]}"
        return 1
    report = json.loads(result.stdout)
    assert report["placeholders"], "a hostile global was not reported as a placeholder"
    assert report["dropped"], "the placeholder was not reported as left out of the .pt output"
    with torch.serialization.safe_globals([argparse.Namespace]):
        averaged = torch.load(out, weights_only=True)  # nothing but plain data and tensors left
    expected = state_dict(0), state_dict(1)
    for name in expected[0]:
        assert torch.equal(averaged["state_dict"][name], oracle_mean([expected[0][name], expected[1][name]]))
    return 0


@pytest.fixture
def good_checkpoint(arena: tuple[Path, Path, Path]) -> Path:
    path = arena[0] / "epoch=0.pt"
    torch.save({"state_dict": state_dict(0), "epoch": 0, "hyper_parameters": {"lr": 0.1}}, path)
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_checkpoint_never_runs_code(case: Case, arena: tuple[Path, Path, Path], good_checkpoint: Path) -> None:
    run_dir, canary, victim = arena
    payload = make_payloads(canary, victim)[case.payload]
    hostile = run_dir / "epoch=1.pt"
    hostile.write_bytes(case.build(payload))
    status = check_hostile_run(run_dir, hostile, good_checkpoint, case.must_average)
    RESULTS[case.id] = status
    assert_untouched(canary, victim, settle=0.05 if "Popen" in case.payload or "popen" in case.payload else 0.0)


@pytest.mark.parametrize("encoding", ["reduce", "inst", "setstate"])
def test_dry_run_and_safetensors_output_never_run_code(
    encoding: str, arena: tuple[Path, Path, Path], good_checkpoint: Path
) -> None:
    run_dir, canary, victim = arena
    hostile = run_dir / "epoch=1.ckpt"
    hostile.write_bytes(zip_spliced(fragment(make_payloads(canary, victim)["os.system"], encoding)))
    refused = encoding == "setstate"  # the BUILD gadget is refused at its second BUILD
    plan = run_cli("--dry-run", "--json", good_checkpoint, hostile, expect=1 if refused else 0)
    if not refused:
        assert [c["selected"] for c in json.loads(plan.stdout)["candidates"]] == [True, True]
    run_cli(good_checkpoint, hostile, "-o", run_dir / "avg.safetensors", expect=1 if refused else 0)
    assert_untouched(canary, victim)


def test_trust_pickle_runs_the_payload(arena: tuple[Path, Path, Path], good_checkpoint: Path) -> None:
    """This is what --trust-pickle means, and why its help says so: the file's code runs."""
    run_dir, canary, victim = arena
    hostile = run_dir / "epoch=1.pt"
    hostile.write_bytes(torch_saved(make_payloads(canary, victim)["os.system"], "top", legacy=False))
    run_cli(good_checkpoint, hostile, "-o", run_dir / "safe.pt")
    assert not canary.exists()
    result = run_cli(good_checkpoint, hostile, "-o", run_dir / "trusted.pt", "--trust-pickle")
    assert "--trust-pickle runs any code" in result.stderr
    assert canary.exists(), "--trust-pickle fully unpickles: the payload ran"


# ---------------------------------------------------------------- harmless objects real checkpoints carry


class CustomConfig:
    """A user's own config class: unknown to the allowlist."""

    def __init__(self, depth: int, name: str) -> None:
        self.depth = depth
        self.name = name


CUSTOM = f"{CustomConfig.__module__}.{CustomConfig.__qualname__}"


def _two_checkpoints(run_dir: Path, extra: Callable[[int], dict[str, Any]]) -> list[Path]:
    paths = []
    for epoch in range(2):
        path = run_dir / f"epoch={epoch}.ckpt"
        torch.save({"state_dict": state_dict(epoch), "epoch": epoch, **extra(epoch)}, path)
        paths.append(path)
    return paths


def _assert_average(averaged: dict[str, torch.Tensor]) -> None:
    for name, tensor in averaged.items():
        assert torch.equal(tensor, oracle_mean([state_dict(0)[name], state_dict(1)[name]]))


def test_timm_namespace_averages_without_trust(arena: tuple[Path, Path, Path]) -> None:
    run_dir = arena[0]
    args = argparse.Namespace(model="resnet50", lr=0.1, epochs=300, aa="rand-m9", mean=(0.485, 0.456, 0.406))
    inputs = _two_checkpoints(run_dir, lambda e: {"args": args, "arch": "resnet50"})
    report = json.loads(run_cli(*inputs, "-o", run_dir / "avg.pt", "--json").stdout)
    assert report["placeholders"] == [] and report["dropped"] == []
    with torch.serialization.safe_globals([argparse.Namespace]):
        out = torch.load(run_dir / "avg.pt", weights_only=True)
    assert out["args"] == args and out["arch"] == "resnet50"
    _assert_average(out["state_dict"])


def test_lightning_attribute_dict_averages_without_trust(arena: tuple[Path, Path, Path]) -> None:
    from lightning.fabric.utilities.data import AttributeDict

    run_dir = arena[0]
    hparams = AttributeDict(lr=0.01, layers=[64, 64], name="net")
    inputs = _two_checkpoints(run_dir, lambda e: {"hyper_parameters": hparams, "global_step": 10 * e})
    report = json.loads(run_cli(*inputs, "-o", run_dir / "avg.ckpt", "--json").stdout)
    assert report["placeholders"] == [] and report["dropped"] == []
    # torch's weights-only loader refuses SETITEMS on dict subclasses, so load it fully: the file is ours.
    out = torch.load(run_dir / "avg.ckpt", weights_only=False)
    assert type(out["hyper_parameters"]) is AttributeDict and out["hyper_parameters"] == hparams
    _assert_average(out["state_dict"])


def test_unknown_class_becomes_a_placeholder_and_is_dropped(arena: tuple[Path, Path, Path]) -> None:
    run_dir = arena[0]
    inputs = _two_checkpoints(run_dir, lambda e: {"hyper_parameters": {"cfg": CustomConfig(3, "x"), "lr": 0.1}})
    result = run_cli(*inputs, "-o", run_dir / "avg.pt", "--json")
    report = json.loads(result.stdout)
    assert report["placeholders"] == [CUSTOM]
    assert len(report["dropped"]) == 1 and "hyper_parameters.cfg" in report["dropped"][0]
    assert CUSTOM in report["dropped"][0]
    assert any(CUSTOM in w and "--allow-global" in w for w in report["warnings"])
    out = torch.load(run_dir / "avg.pt", weights_only=True)  # the placeholder is not in the file
    assert out["hyper_parameters"] == {"lr": 0.1}
    _assert_average(out["state_dict"])
    flat = run_cli(*inputs, "-o", run_dir / "avg.safetensors", "--json")
    assert json.loads(flat.stdout)["placeholders"] == [CUSTOM]


def test_allow_global_keeps_the_class(arena: tuple[Path, Path, Path]) -> None:
    run_dir, canary, victim = arena
    inputs = _two_checkpoints(run_dir, lambda e: {"hyper_parameters": {"cfg": CustomConfig(3, "x"), "lr": 0.1}})
    result = run_cli(*inputs, "-o", run_dir / "avg.pt", "--json", "--allow-global", CUSTOM,
                     "--allow-global", "argparse.Namespace")  # fmt: skip
    report = json.loads(result.stdout)
    assert report["placeholders"] == [] and report["dropped"] == []
    out = torch.load(run_dir / "avg.pt", weights_only=False)  # our class, importable here
    cfg = out["hyper_parameters"]["cfg"]
    assert type(cfg) is CustomConfig and (cfg.depth, cfg.name) == (3, "x")
    _assert_average(out["state_dict"])
    # Allowing one class opens nothing else: a payload beside it stays inert.
    hostile = run_dir / "epoch=2.ckpt"
    evil = _Reducer(os.system, (f"touch {canary}",))
    torch.save({"state_dict": state_dict(1), "epoch": 2, "hyper_parameters": {"cfg": CustomConfig(1, "y"),
                                                                             "evil": evil}}, hostile)  # fmt: skip
    report = json.loads(run_cli(inputs[0], hostile, "-o", run_dir / "b.pt", "--json",
                                "--allow-global", CUSTOM).stdout)  # fmt: skip
    assert report["placeholders"] == ["posix.system"]
    assert_untouched(canary, victim)
