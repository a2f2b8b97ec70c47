"""Hostile pickles, second pass (issue 16): each file is built the way the red team built it.

The promises checked, each as a user meets them (the CLI in a subprocess): no file is
created outside the output (torch's `.patch` marker never appears, in an average, a
dry run or `inspect`); a class's attributes never change; `--allow-global` admits inert
data classes only; a file of a few KB never takes more than 1.5 GB or 30 s; a refused file
is one `Error:` line naming it, exit 1; an accepted one gives the same bytes on two runs.
"""

from __future__ import annotations

import argparse
import bz2
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import leftovers, oracle_mean, run_cli
from safetensors.torch import load_file

from ckpt_avg.inspect_cli import inspect_command

MARKER = "@@HOSTILE-2@@"
_MARKER_BYTES = b"X" + struct.pack("<I", len(MARKER)) + MARKER.encode()
MAX_SECONDS = 30
MAX_RSS = 1_500_000_000


# ---------------------------------------------------------------- pickle opcodes, by hand


def G(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def integer(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def call(function: bytes, *args: bytes) -> bytes:
    return function + b"(" + b"".join(args) + b"tR"  # MARK args TUPLE REDUCE


def put(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)  # LONG_BINPUT, far above torch.save's memo indices


def get(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)


def self_similar(kind: bytes, depth: int = 8, width: int = 10, base: int = 1_000_000) -> bytes:
    """Ten references to one container, eight deep: 10**8 items once printed."""
    empty, close = (b"]", b"l") if kind == b"list" else (b")", b"t")
    ops = empty + put(base) + b"0"
    for level in range(1, depth + 1):
        ops += b"(" + get(base + level - 1) * width + close + put(base + level) + b"0"
    return ops + get(base + depth)


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(4, generator=generator)}


def saved(legacy: bool, seed: int = 1, hyper: object = MARKER) -> bytes:
    buffer = io.BytesIO()
    tree = {"state_dict": state_dict(seed), "epoch": seed, "hyper_parameters": hyper}
    torch.save(tree, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def legacy_with(body: bytes) -> bytes:
    data = saved(legacy=True)
    assert data.count(_MARKER_BYTES) == 1
    return data.replace(_MARKER_BYTES, body)


def zip_with(body: bytes = b"", *, replace: bytes = _MARKER_BYTES) -> bytes:
    """A torch.save zip whose data.pkl has `replace` swapped for the given opcodes."""
    source = saved(legacy=False)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(source)) as old, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(replace) == 1
                data = data.replace(replace, body)
            new.writestr(info.filename, data)
    return out.getvalue()


# ---------------------------------------------------------------- running it as a user would


def refused_in_average(tmp_path: Path, data: bytes, says: str, name: str = "epoch=1.pt") -> str:
    """Average a good checkpoint with the hostile one: one `Error:` line naming it, quickly, nothing written."""
    good = tmp_path / "epoch=0.pt"
    if not good.exists():
        good.write_bytes(saved(legacy=False, seed=0, hyper={"lr": 0.1}))
    bad = tmp_path / name
    bad.write_bytes(data)
    out = tmp_path / "avg.pt"
    start = time.monotonic()
    result = run_cli(good, bad, "-o", out, expect=1)
    assert time.monotonic() - start < MAX_SECONDS
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: "), result.stderr
    assert says in lines[0], lines[0]
    assert not out.exists() and leftovers(tmp_path) == []
    assert bad.read_bytes() == data
    return lines[0]


_MEASURE = """
import resource, sys, time
from click.testing import CliRunner
from ckpt_avg.cli import main

for good, bad in zip(sys.argv[1::2], sys.argv[2::2]):
    start = time.monotonic()
    result = CliRunner().invoke(main, [good, bad, "-o", bad + ".out.pt"], catch_exceptions=False)
    line = result.stderr.splitlines()[0] if result.stderr else ""
    print(result.exit_code, round(time.monotonic() - start, 1), line.startswith("Error: " + bad), flush=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss_of_averages(pairs: list[tuple[Path, Path]]) -> tuple[list[str], int]:
    """Run `ckpt-avg GOOD BAD -o OUT` for each pair in one fresh process: its exits and its peak RSS."""
    args = [str(p) for pair in pairs for p in pair]
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, timeout=len(pairs) * MAX_SECONDS
    )
    assert done.returncode == 0, done.stderr
    *lines, rss = done.stdout.splitlines()
    return lines, int(rss)


# ---------------------------------------------------------------- 1. torch's legacy loader is never called


def patch_payload(target: Path, build: bool = True) -> bytes:
    """The red team's file: BUILD makes Namespace dump patches to `target`.patch, then a
    'module' persistent id makes torch's legacy loader compare (and write) the source."""
    body = b""
    if build:
        slots = b"}(" + text("dump_patches") + b"\x88" + text("__name__") + text(str(target)) + b"u"
        body = G("argparse", "Namespace") + b"N" + slots + b"\x86b0"  # BUILD (None, slots), POP
    pid = b"(" + text("module") + G("argparse", "Namespace") + text("evil.py") + text("class Namespace: pass\n")
    return body + pid + b"tQ"  # TUPLE BINPERSID


@pytest.mark.parametrize("build", [True, False], ids=["build-then-module-id", "module-id"])
def test_a_legacy_file_never_writes_a_patch_file(tmp_path: Path, build: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # torch would write `<__name__>.patch`: relative names land here
    target = tmp_path / "evil"
    data = legacy_with(patch_payload(target, build))
    says = "Namespace (BUILD on a class" if build else "not the class of a saved nn.Module"
    refused_in_average(tmp_path, data, says)
    bad = tmp_path / "epoch=1.pt"
    for args in (("--dry-run", tmp_path), (bad, "-o", tmp_path / "b.safetensors")):
        result = run_cli(*args, expect=1)
        assert f"Error: {bad}: " in result.stderr, result.stderr
    inspected = CliRunner().invoke(inspect_command, [str(tmp_path)], catch_exceptions=False)
    assert inspected.exit_code == 1 and f"Error: {bad}: " in inspected.stderr, inspected.output
    assert not list(tmp_path.rglob("*.patch")), "a checkpoint wrote a file"
    assert not hasattr(argparse.Namespace, "dump_patches") and argparse.Namespace.__name__ == "Namespace"


def test_a_module_id_naming_an_unknown_class_is_inert(tmp_path: Path) -> None:
    """What torch.save(model) writes in a legacy file: the class is a placeholder, its source never compared."""
    pid = b"(" + text("module") + G("my_models", "Net") + text("net.py") + text("class Net: ...\n") + b"tQ"
    (tmp_path / "epoch=0.pt").write_bytes(saved(legacy=True, seed=0, hyper={"lr": 0.1}))
    (tmp_path / "epoch=1.pt").write_bytes(legacy_with(pid))
    run_cli(tmp_path, "-o", tmp_path / "avg.pt")
    assert not list(tmp_path.rglob("*.patch"))


def test_legacy_files_are_read_lazily_and_give_the_same_bytes(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for epoch in range(3):
        (ckpts / f"epoch={epoch}.pt").write_bytes(saved(legacy=True, seed=epoch, hyper={"lr": 0.1}))
    outputs: list[Any] = []
    for name in ("a.safetensors", "b.safetensors"):
        run_cli(ckpts, "-o", tmp_path / name)
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    for name in ("a.pt", "b.pt"):
        run_cli(ckpts, "-o", tmp_path / name)
        outputs.append(torch.load(tmp_path / name, weights_only=True))
    for key in ("w", "b"):
        expected = oracle_mean([state_dict(e)[key] for e in range(3)])
        assert all(torch.equal(o["state_dict"][key], expected) for o in outputs[2:])


def _legacy_parts(data: bytes) -> tuple[int, int]:
    """Offsets of the storage-key pickle in a legacy file: after four pickles."""
    stream = io.BytesIO(data)
    for _ in range(4):
        for _op in pickletools.genops(stream):
            pass
    start = stream.tell()
    pickle.load(stream)
    return start, stream.tell()


def hollow_legacy() -> bytes:
    """A legacy file whose list of storage keys is empty."""
    data = saved(legacy=True)
    start, end = _legacy_parts(data)
    return data[:start] + pickle.dumps([], protocol=2) + data[end:]


def test_a_legacy_storage_missing_from_the_file_is_refused(tmp_path: Path) -> None:
    """An empty list of storage keys: torch.load gives tensors of uninitialised heap bytes."""
    refused_in_average(tmp_path, hollow_legacy(), "is not in the file")


def _storage_view_file(path: Path) -> None:
    """A legacy file written by hand with a storage view, as PyTorch before 1.0 wrote them:
    tensor `v` lies on elements 2..3 of a four-element storage, through view 'v1'."""

    class Storage:
        pass

    root = Storage()

    class Tensor:
        def __reduce__(self) -> tuple[object, ...]:
            return (torch._utils._rebuild_tensor_v2, (root, 0, (2,), (1,), False, {}))

    class Saver(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if obj is root:
                return ("storage", torch.FloatStorage, "k0", "cpu", 4, ("v1", 2, 2))
            return None

    body = io.BytesIO()
    Saver(body, protocol=2).dump({"state_dict": {"v": Tensor()}, "epoch": 1})
    with path.open("wb") as out:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, out, protocol=2)
        out.write(body.getvalue())
        pickle.dump(["k0"], out, protocol=2)
        out.write(struct.pack("<q", 4) + struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))


def test_a_legacy_storage_view_reads_its_own_bytes(tmp_path: Path) -> None:
    _storage_view_file(tmp_path / "epoch=1.pt")
    expected = torch.tensor([3.0, 4.0])
    assert torch.equal(torch.load(tmp_path / "epoch=1.pt", weights_only=False)["state_dict"]["v"], expected)
    run_cli(tmp_path / "epoch=1.pt", "-o", tmp_path / "avg.pt")
    assert torch.equal(torch.load(tmp_path / "avg.pt", weights_only=True)["state_dict"]["v"], expected)


def tar_claiming_64_gib() -> bytes:
    header = tarfile.TarInfo("storages")
    header.size = 64 << 30
    return header.tobuf(format=tarfile.PAX_FORMAT) + bytes(8 << 20)


def test_a_compressed_tar_claiming_64_gib_is_not_unpacked(tmp_path: Path) -> None:
    stream = tar_claiming_64_gib()
    refused_in_average(tmp_path, bz2.compress(stream), "not a PyTorch checkpoint")
    refused_in_average(tmp_path, stream[:4096], "tar checkpoint")


# ---------------------------------------------------------------- 2. BUILD and friends on a class or function


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (G("argparse", "Namespace") + b"}(" + text("fp16") + b"\x88ub", "changes the attributes of Namespace (BUILD"),
        (G("_codecs", "encode") + b"}(" + text("__doc__") + text("x") + b"ub", "changes the attributes of encode"),
        (G("my_models", "Net") + b"N}(" + text("x") + b"K\x01u\x86b", "changes the attributes of my_models.Net"),
        (G("argparse", "Namespace") + b"(" + text("x") + b"K\x01u", "(SETITEMS on a class"),
        (G("collections", "OrderedDict") + b"K\x01a", "(APPEND on a class"),
    ],
    ids=["build-class", "build-function", "build-unknown-class", "setitems-class", "append-class"],
)
def test_an_opcode_that_changes_a_class_is_refused_before_it_acts(tmp_path: Path, body: bytes, says: str) -> None:
    import _codecs
    import collections

    before = dict(vars(argparse.Namespace)), _codecs.encode.__doc__, dict(vars(collections.OrderedDict))
    (tmp_path / "epoch=0.pt").write_bytes(saved(legacy=False, seed=0, hyper={}))
    (tmp_path / "epoch=1.pt").write_bytes(zip_with(body))
    result = run_cli(tmp_path / "epoch=0.pt", tmp_path / "epoch=1.pt", "-o", tmp_path / "avg.pt", expect=1)
    assert says in result.stderr, result.stderr
    after = dict(vars(argparse.Namespace)), _codecs.encode.__doc__, dict(vars(collections.OrderedDict))
    assert after == before


def test_the_undo_compares_by_identity() -> None:
    """Second line of defence: an attribute replaced by an equal-looking ndarray is still restored."""
    from ckpt_avg.errors import UnsafePickleError
    from ckpt_avg.unpickle import GlobalResolver, PicklePolicy

    original = np.zeros(3)
    argparse.Namespace.cache = original  # type: ignore[attr-defined]
    try:
        resolver = GlobalResolver(PicklePolicy(), {})
        resolver.resolve("argparse", "Namespace")
        argparse.Namespace.cache = np.zeros(3)  # type: ignore[attr-defined]
        with pytest.raises(UnsafePickleError, match="changes the attributes of Namespace"):
            resolver.check_unchanged()
        assert argparse.Namespace.cache is original  # type: ignore[attr-defined]
    finally:
        del argparse.Namespace.cache  # type: ignore[attr-defined]


# ---------------------------------------------------------------- 3. --allow-global admits inert data only


@pytest.mark.parametrize(
    "name",
    ["_operator.methodcaller", "operator.attrgetter", "logging.FileHandler", "functools.partial", "os.system",
     "subprocess.Popen", "builtins.eval", "shutil.rmtree", "tempfile.NamedTemporaryFile", "socket.socket",
     "pickle.loads", "importlib.import_module", "zipfile.ZipFile", "torch.Tensor", "numpy.memmap",
     "user_classes.Deleting", "user_classes.make", "user_classes.Slotted", "user_classes.Meta"],
)  # fmt: skip
def test_allow_global_refuses_what_acts(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_classes(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "epoch=0.pt").write_bytes(saved(legacy=False, seed=0, hyper={}))
    result = run_cli(tmp_path / "epoch=0.pt", "-o", tmp_path / "avg.pt", "--allow-global", name, expect=2)
    assert result.stderr.startswith(f"Error: --allow-global {name}: "), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "avg.pt").exists()
    sys.modules.pop("user_classes", None)


def _user_classes(directory: Path) -> None:
    canary = directory / "canary"
    (directory / "user_classes.py").write_text(
        "import os\n"
        f"CANARY = {str(canary)!r}\n"
        "def touch():\n    open(CANARY, 'w').close()\n"
        "class Config:\n"
        "    def __init__(self, depth=3, name='x'):\n        self.depth, self.name = depth, name\n"
        "    def __setstate__(self, state):\n        touch()\n        self.__dict__.update(state)\n"
        "    def __eq__(self, other):\n        return vars(self) == vars(other)\n"
        "class Deleting:\n    def __del__(self):\n        os.remove(self.path)\n"
        "def make():\n    touch()\n"
        "class Slotted(bytearray):\n    pass\n"
        "class Meta(type):\n    pass\n"
    )


def test_an_allowed_class_is_rebuilt_without_running_its_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_classes(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_classes  # type: ignore[import-not-found]

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for epoch in range(2):
        config = user_classes.Config(depth=epoch + 3)
        torch.save({"state_dict": state_dict(epoch), "epoch": epoch, "cfg": config}, ckpts / f"epoch={epoch}.pt")
    outputs = []
    for name in ("a.pt", "b.pt"):
        run_cli(ckpts, "-o", tmp_path / name, "--allow-global", "user_classes.Config")
        assert not (tmp_path / "canary").exists(), "__setstate__ of an allowed class ran"
        outputs.append((tmp_path / name).read_bytes())
    loaded = torch.load(tmp_path / "a.pt", weights_only=False)  # our own output: its __setstate__ runs now
    assert type(loaded["cfg"]) is user_classes.Config and vars(loaded["cfg"]) == {"depth": 4, "name": "x"}
    (tmp_path / "canary").unlink()
    # A pickle that calls the allowed class with arguments is refused, not obeyed.
    (ckpts / "epoch=1.pt").write_bytes(zip_with(call(G("user_classes", "Config"), text("/etc"), text("x"))))
    result = run_cli(ckpts, "-o", tmp_path / "c.pt", "--allow-global", "user_classes.Config", expect=1)
    assert "only rebuilt from its attributes" in result.stderr, result.stderr
    assert not (tmp_path / "canary").exists()
    sys.modules.pop("user_classes", None)


# ---------------------------------------------------------------- 4. bombs: bytes are budgeted, not items


def _hex_tower(levels: int = 21) -> bytes:
    ops = text("ab")
    for _ in range(levels):
        ops = call(G("_codecs", "encode"), ops, text("hex"))
    return ops


def _huge_void_array() -> bytes:
    """What pickle writes for an ndarray of dtype V2000000000, with no data after it."""
    dtype = call(G("numpy", "dtype"), text("V2000000000"), b"\x89\x88")  # NEWFALSE NEWTRUE
    array = call(G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"), b"K\x00\x85", b"C\x01b")
    state = b"(K\x01K\x01\x85" + dtype + b"\x89C\x00t"  # (1, (1,), dtype, False, b"")
    return array + state + b"b"


BOMBS = {
    "reconstructor-bytearray-4GiB": (
        call(G("copyreg", "_reconstructor"), G("builtins", "bytearray"), G("builtins", "bytearray"), integer(4 << 30)),
        "base other than object",
    ),
    "21-nested-hex-encodings": (_hex_tower(), "only the latin-1"),
    "numpy-bytes-3e9": (call(G("numpy", "bytes_"), integer(3_000_000_000)), "other than text"),
    "numpy-void-2e9-array": (_huge_void_array(), "builds more than"),
    "numpy-void-2e9-scalar": (
        call(G("numpy.core.multiarray", "scalar"), call(G("numpy", "dtype"), text("V2000000000")), b"C\x00"),
        "builds more than",
    ),
    "numpy-ndarray-of-a-shape": (call(G("numpy", "ndarray"), b"K\x10\x85", text("f8")), "uninitialised memory"),
    "self-similar-dict-key": (b"}" + self_similar(b"tuple") + b"K\x01s", "would print as more than"),
    "self-similar-str": (call(G("builtins", "str"), self_similar(b"list")), "objects from a file are never printed"),
    "fraction-1e1000000000": (call(G("fractions", "Fraction"), text("1e1000000000")), "not a plain n/d"),
    "decimal-1e1000000000": (call(G("decimal", "Decimal"), text("1e1000000000")), "exponent is beyond"),
    "int-of-a-long-string": (call(G("builtins", "int"), text("9" * 50_000)), "Error"),
    "list-of-a-huge-range": (call(G("builtins", "list"), call(G("builtins", "range"), integer(10**9))), "builds more"),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_a_small_bomb_is_refused_quickly(tmp_path: Path, case: str) -> None:
    body, says = BOMBS[case]
    data = zip_with(body)
    assert len(data) < 100_000
    refused_in_average(tmp_path, data, says)


def test_every_bomb_stays_under_1_5_gb(tmp_path: Path) -> None:
    """All the bombs of this file, averaged one after another in one fresh process."""
    good = tmp_path / "epoch=0.pt"
    good.write_bytes(saved(legacy=False, seed=0, hyper={"lr": 0.1}))
    files = {**{case: zip_with(body) for case, (body, _) in BOMBS.items()}, **OTHER_BOMBS()}
    pairs = []
    for case, data in files.items():
        (tmp_path / case).mkdir()
        bad = tmp_path / case / "epoch=1.pt"
        bad.write_bytes(data)
        pairs.append((good, bad))
    lines, peak = peak_rss_of_averages(pairs)
    for case, line in zip(files, lines, strict=True):
        code, seconds, names_file = line.split()
        assert code == "1" and names_file == "True" and float(seconds) < MAX_SECONDS, (case, line)
    assert peak < MAX_RSS, f"peak RSS {peak / 1e9:.2f} GB"
    print(f"\n{len(files)} hostile files averaged in one process: peak RSS {peak / 1e9:.2f} GB")


def storage_key_bomb() -> bytes:
    key = b"X\x01\x00\x00\x000"  # BINUNICODE '0', torch.save's first storage key
    return zip_with(self_similar(b"list"), replace=key)


def test_a_storage_key_that_prints_forever_is_refused(tmp_path: Path) -> None:
    refused_in_average(tmp_path, storage_key_bomb(), "not a string")


def test_a_zero_filled_array_from_hyper_parameters_is_the_same_on_every_run(tmp_path: Path) -> None:
    """numpy's _reconstruct with no BUILD after it: numpy would hand back uninitialised memory."""
    body = call(G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"), b"M\x00\x04\x85", b"C\x01d")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "epoch=0.pt").write_bytes(saved(legacy=False, seed=0, hyper={}))
    (ckpts / "epoch=1.pt").write_bytes(zip_with(body))
    arrays = []
    for name in ("a.pt", "b.pt"):
        run_cli(ckpts, "-o", tmp_path / name)
        arrays.append(torch.load(tmp_path / name, weights_only=False)["hyper_parameters"])
    assert arrays[0].shape == (1024,) and not arrays[0].any() and arrays[0].tobytes() == arrays[1].tobytes()


def zip_of_40000_records() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved(legacy=False))) as old, zipfile.ZipFile(out, "w") as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
        prefix = old.namelist()[0].split("/")[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(40_000):
                new.writestr(f"{prefix}/extra/{i}", b"")
            new.writestr(f"{prefix}/extra/7", b"")
    return out.getvalue()


def test_a_zip_of_40000_records_with_one_name_twice_is_refused_quickly(tmp_path: Path) -> None:
    refused_in_average(tmp_path, zip_of_40000_records(), "appears twice")


def OTHER_BOMBS() -> dict[str, bytes]:
    return {
        "storage-key-that-prints-forever": storage_key_bomb(),
        "bz2-tar-claiming-64GiB": bz2.compress(tar_claiming_64_gib()),
        "tar-claiming-64GiB": tar_claiming_64_gib()[:4096],
        "zip-40000-records-one-twice": zip_of_40000_records(),
        "legacy-without-storage-keys": hollow_legacy(),
        "legacy-patch-file": legacy_with(patch_payload(Path("evil"))),
    }


def test_python_unpickling_stays_fast(tmp_path: Path) -> None:
    """The pure-Python unpickler reads a Lightning-sized checkpoint's pickle in seconds."""
    hyper = {"vocab": {f"token{i}": i for i in range(100_000)}, "lr": 0.1, "layers": list(range(50_000))}
    big = {f"layer{i}.weight": torch.zeros(1) for i in range(5_000)}
    for epoch in range(2):
        torch.save({"state_dict": big, "epoch": epoch, "hyper_parameters": hyper}, tmp_path / f"epoch={epoch}.ckpt")
    assert os.path.getsize(tmp_path / "epoch=0.ckpt") > 1_000_000
    start = time.monotonic()
    run_cli("--dry-run", tmp_path)
    assert time.monotonic() - start < MAX_SECONDS


def _dtype_changed_after_use(copy: bool) -> bytes:
    """A V8 dtype, memoized, put under an array, then given a 1 MiB item size by BUILD."""
    flag = b"\x88" if copy else b"\x89"
    dtype = call(G("numpy", "dtype"), text("V8"), b"\x89", flag) + put(1_000_000)
    array = call(G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"), b"K\x00\x85", b"C\x01b")
    state = b"(K\x01K\x02\x85" + dtype + b"\x89C\x10" + bytes(16) + b"t"
    grow = get(1_000_000) + b"(K\x03X\x01\x00\x00\x00|NNN" + integer(1 << 20) + b"K\x01K\x00tb0"
    return b"(" + array + state + b"b" + grow + b"l"


@pytest.mark.parametrize("copy", [True, False], ids=["used-by-an-array", "numpy's-shared-dtype"])
def test_a_dtype_is_set_only_before_it_is_used(tmp_path: Path, copy: bool) -> None:
    refused_in_average(tmp_path, zip_with(_dtype_changed_after_use(copy)), "sets the state of")
    assert np.dtype("V8").itemsize == 8 and np.zeros(2).dtype.itemsize == 8


def test_numpy_values_in_hyper_parameters_come_back_as_they_were(tmp_path: Path) -> None:
    hyper = {
        "mean": np.arange(6.0).reshape(2, 3),
        "names": np.array(["a", "bc"]),
        "records": np.zeros(2, dtype=[("x", "<i4"), ("y", "<f8", (2,))]),
        "scalar": np.float64(1.5),
        "count": np.int64(7),
        "mixed": np.array([1, "a", None], dtype=object),
        "dtype": np.dtype(">u2"),
    }
    for epoch in range(2):
        tree = {"state_dict": state_dict(epoch), "epoch": epoch, "hyper_parameters": hyper}
        torch.save(tree, tmp_path / f"e{epoch}.ckpt")
    run_cli(tmp_path / "e0.ckpt", tmp_path / "e1.ckpt", "-o", tmp_path / "avg.ckpt")
    out = torch.load(tmp_path / "avg.ckpt", weights_only=False)["hyper_parameters"]
    assert out["dtype"] == hyper["dtype"] and out["scalar"] == 1.5 and out["count"] == 7
    for key, value in hyper.items():
        assert type(out[key]) is type(value), key
        if isinstance(value, np.ndarray):
            assert out[key].dtype == value.dtype and out[key].shape == value.shape
            if value.dtype.hasobject:
                assert out[key].tolist() == value.tolist()
            else:
                assert out[key].tobytes() == value.tobytes()


def test_a_legacy_whole_model_reads_as_its_zip_twin(tmp_path: Path) -> None:
    """torch.save(model) in the legacy format names each module class in a 'module' id:
    read inertly, the file behaves exactly as the same model saved as a zip."""
    results = []
    for legacy in (True, False):
        directory = tmp_path / ("legacy" if legacy else "zip")
        directory.mkdir()
        torch.manual_seed(0)
        for epoch in range(2):
            model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
            tree = {"model": model, "state_dict": model.state_dict(), "epoch": epoch}
            torch.save(tree, directory / f"epoch={epoch}.pt", _use_new_zipfile_serialization=not legacy)
        run_cli(directory, "-o", directory / "avg.safetensors")
        results.append(load_file(directory / "avg.safetensors"))
    assert results[0].keys() == results[1].keys() and results[0]
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert not list(tmp_path.rglob("*.patch"))


def test_a_legacy_run_averages_to_the_bytes_of_its_zip_twin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Strided, tied, half-precision and integer tensors beside a Namespace: our legacy reader
    gives the output a zip reader gives, byte for byte, in both output formats."""
    outputs = {}
    for legacy in (True, False):
        run = tmp_path / ("legacy" if legacy else "zip")
        (run / "in").mkdir(parents=True)
        for epoch in range(3):
            generator = torch.Generator().manual_seed(epoch)
            weights = {"w": torch.randn(5, 4, generator=generator), "b": torch.randn(5, generator=generator).half()}
            weights |= {"t": torch.randn(4, 5, generator=generator).t(), "n": torch.arange(3)}
            weights["tied"] = weights["w"]
            tree = {"state_dict": weights, "epoch": epoch, "args": argparse.Namespace(lr=0.1)}
            torch.save(tree, run / "in" / f"epoch={epoch}.pt", _use_new_zipfile_serialization=not legacy)
        monkeypatch.chdir(run)
        for name in ("avg.pt", "avg.safetensors"):
            run_cli("in", "-o", name, "--int-policy", "last")
            outputs[legacy, name] = (run / name).read_bytes()
    assert outputs[True, "avg.pt"] == outputs[False, "avg.pt"]
    assert outputs[True, "avg.safetensors"] == outputs[False, "avg.safetensors"]


def test_protocol_1_objects_are_rebuilt_by_copyreg_rules(tmp_path: Path) -> None:
    """Protocols 0 and 1 build objects through copyreg._reconstructor: a Namespace and a dict
    subclass come back; a half-made C class (dict.__new__(OrderedDict)) never does."""
    from lightning.fabric.utilities.data import AttributeDict

    meta = {"args": argparse.Namespace(lr=0.1, depth=3), "hparams": AttributeDict(lr=0.1, name="x")}
    for epoch in range(2):
        tree = {"state_dict": state_dict(epoch), "epoch": epoch, **meta}
        torch.save(tree, tmp_path / f"epoch={epoch}.pt", pickle_protocol=1)
    assert b"_reconstructor" in zipfile.ZipFile(tmp_path / "epoch=0.pt").read("epoch=0/data.pkl")
    (tmp_path / "out").mkdir()
    run_cli(tmp_path, "-o", tmp_path / "out" / "avg.pt")
    out = torch.load(tmp_path / "out" / "avg.pt", weights_only=False)
    assert out["args"] == meta["args"] and out["hparams"] == meta["hparams"]
    assert type(out["hparams"]) is AttributeDict
    half_made = call(G("copyreg", "_reconstructor"), G("collections", "OrderedDict"), G("builtins", "dict"), b"}")
    (tmp_path / "bad").mkdir()
    refused_in_average(tmp_path / "bad", zip_with(half_made), "not a plain subclass of its base")


def test_a_pickle_cannot_plant_a_reduce_method_in_an_object(tmp_path: Path) -> None:
    """`__reduce_ex__` in a Namespace's __dict__ would be called when the output is written."""
    planted = G("argparse", "Namespace") + b")\x81}(" + text("__reduce_ex__") + G("builtins", "list") + b"ub"
    refused_in_average(tmp_path, zip_with(planted), "not a dict of plain attribute names")


def test_a_view_that_expands_a_tiny_storage_to_terabytes_is_refused(tmp_path: Path) -> None:
    """One float expanded to 2**40 elements: averaged, the output would be 4 TB."""
    data = saved(legacy=False, hyper=torch.zeros(1).expand(2, 3))
    small = b"K\x02K\x03\x86"  # the (2, 3) size: BININT1 BININT1 TUPLE2
    assert data.count(small) == 1
    huge = integer(1 << 20) + integer(1 << 20) + b"\x86"
    bad = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as old, zipfile.ZipFile(bad, "w") as new:
        for info in old.infolist():
            record = old.read(info)
            new.writestr(info.filename, record.replace(small, huge) if info.filename.endswith("data.pkl") else record)
    refused_in_average(tmp_path, bad.getvalue(), "more than 1,073,741,824 bytes beyond what the file holds")
    (tmp_path / "ok").mkdir()
    for epoch in range(2):  # a small expansion averages as before
        (tmp_path / "ok" / f"e{epoch}.pt").write_bytes(saved(False, epoch, torch.zeros(1).expand(2, 3)))
    run_cli(tmp_path / "ok", "-o", tmp_path / "ok.pt")
    assert torch.equal(torch.load(tmp_path / "ok.pt", weights_only=True)["hyper_parameters"], torch.zeros(2, 3))
