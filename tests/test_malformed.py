"""Malformed inputs: every problem with a file's contents is one clear error (SPEC 1.9).

Each broken file must give exit status 1, a first stderr line `Error: ...` naming the file,
no traceback, no output and no temporary file: empty files, files cut at many offsets
(zip `.pt`, legacy `.pt`, safetensors), text named `.pt`, safetensors headers that lie,
zip archives whose record sizes lie, and random byte mutations of valid files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import leftovers, oracle_mean, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

TRIED: dict[str, int] = {}


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(8, 4, generator=generator),
        "enc.bias": torch.randn(8, generator=generator).to(torch.float16),
        "head.weight": torch.randn(3, 8, generator=generator).to(torch.bfloat16),
        "head.bias": torch.randn(3, generator=generator).to(torch.float64),
    }


def zip_pt(seed: int = 1) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict(seed), "epoch": seed, "hyper_parameters": {"lr": 0.1}}, buffer)
    return buffer.getvalue()


def legacy_pt(seed: int = 1) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict(seed), "epoch": seed}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def safetensors_bytes(seed: int = 1) -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "x.safetensors")
        save_file(state_dict(seed), path, metadata={"epoch": str(seed)})
        return Path(path).read_bytes()


VALID: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "zip": (".pt", zip_pt),
    "legacy": (".pt", legacy_pt),
    "safetensors": (".safetensors", safetensors_bytes),
}


def assert_clean_error(result: Any, bad: Path, out: Path, directory: Path) -> str:
    """Exit 1, one `Error:` line naming the file first, no traceback, nothing written."""
    assert result.exit_code == 1, f"exit {result.exit_code}:\n{result.output}"
    assert "Traceback" not in result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith("Error: "), result.stderr
    assert str(bad) in first, f"the error does not name {bad}: {first}"
    assert "internal error" not in first, first
    assert not out.exists()
    assert leftovers(directory) == []
    assert leftovers(out.parent) == []
    return first


def run_broken(directory: Path, name: str, data: bytes, *, suffix_out: str = ".safetensors") -> str:
    """Average a good checkpoint with a broken one; the broken one must be blamed."""
    good_suffix = ".safetensors" if name.endswith(".safetensors") else ".pt"
    good = directory / f"epoch=0{good_suffix}"
    if not good.exists():
        if good_suffix == ".pt":
            good.write_bytes(zip_pt(0))
        else:
            good.write_bytes(safetensors_bytes(0))
    bad = directory / name
    bad.write_bytes(data)
    out = directory / f"avg{suffix_out}"
    result = run_cli(good, bad, "-o", out, expect=None)
    TRIED[name] = TRIED.get(name, 0) + 1
    message = assert_clean_error(result, bad, out, directory)
    assert bad.read_bytes() == data, "an input was modified"
    return message


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    print(f"\nmalformed inputs tried: {sum(TRIED.values())}")


# ---------------------------------------------------------------- empty, text, truncated


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin", ".pth.tar", ".safetensors"])
def test_zero_bytes(tmp_path: Path, suffix: str) -> None:
    message = run_broken(tmp_path, f"epoch=1{suffix}", b"")
    assert "empty" in message


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("epoch=1.pt", b"this is not a checkpoint\n"),
        ("epoch=1.ckpt", b"#!/bin/sh\ntouch /tmp/x\n"),
        ("epoch=1.pt", b"PK\x03\x04 not really a zip"),
        ("epoch=1.pt", b"\x80\x02}q\x00."),  # a pickled empty dict: no tensors at all
        ("epoch=1.pt", b"\x80\x02]q\x00(K\x01K\x02e."),  # a pickled list
        ("epoch=1.safetensors", b"just text, in a safetensors file\n"),
        ("epoch=1.safetensors", json.dumps({"a": 1}).encode()),
    ],
    ids=["text", "script", "fake-zip-magic", "empty-dict", "list", "text-safetensors", "json-safetensors"],
)
def test_not_a_checkpoint(tmp_path: Path, name: str, data: bytes) -> None:
    run_broken(tmp_path, name, data)


def _offsets(size: int, count: int = 24) -> list[int]:
    picks = {1, 2, 4, 7, 8, 9, 15, 16, 31, 64, 100, size // 2, size - 8, size - 2, size - 1}
    picks |= {size * k // count for k in range(1, count)}
    return sorted(p for p in picks if 0 < p < size)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_truncated_at_many_offsets(tmp_path: Path, kind: str) -> None:
    suffix, make = VALID[kind]
    data = make(1)
    offsets = _offsets(len(data))
    assert len(offsets) >= 25
    for offset in offsets:
        run_broken(tmp_path, f"epoch=1{suffix}", data[:offset])


# ---------------------------------------------------------------- safetensors headers that lie


def st_file(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
LYING_HEADERS: dict[str, bytes] = {
    "offsets-past-end": st_file({"w": {"dtype": "F32", "shape": [250000], "data_offsets": [0, 1000000]}}, b"\0" * 64),
    "end-past-data": st_file({"w": F32_4}, b"\0" * 12),
    "overlap": st_file({"a": F32_4, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
    "same-range": st_file({"a": F32_4, "b": F32_4}, b"\0" * 16),
    "huge-header-length": st_file({"w": F32_4}, b"\0" * 16, length=2**63),
    "header-longer-than-file": st_file({"w": F32_4}, b"\0" * 16, length=10_000),
    "header-over-limit": st_file({"w": F32_4}, b"\0" * 16, length=100_000_001),
    "bad-json": st_file(b'{"w": {"dtype": "F32", "shape": [4], ', b"\0" * 16),
    "not-utf8": st_file(b'{"\xff\xfe": 1}', b""),
    "json-array": st_file([1, 2, 3], b""),
    "json-null": st_file(None, b""),
    "entry-not-object": st_file({"w": [1, 2]}, b""),
    "unknown-dtype": st_file({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "missing-dtype": st_file({"w": {"shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "shape-offset-mismatch": st_file({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16),
    "begin-after-end": st_file({"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, b"\0" * 16),
    "negative-shape": st_file({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "float-shape": st_file({"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, b"\0" * 16),
    "string-offsets": st_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": "0,16"}}, b"\0" * 16),
    "three-offsets": st_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}}, b"\0" * 16),
    "negative-offset": st_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, b"\0" * 16),
    "huge-shape": st_file({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, b"\0" * 16),
    "metadata-not-strings": st_file({"__metadata__": {"epoch": 1}, "w": F32_4}, b"\0" * 16),
    "metadata-not-object": st_file({"__metadata__": ["x"], "w": F32_4}, b"\0" * 16),
    "length-too-short": st_file({"w": F32_4}, b"\0" * 16, length=5),
    "length-zero": st_file({"w": F32_4}, b"\0" * 16, length=0),
    "seven-bytes": b"\x10\0\0\0\0\0\0",
    # safetensors.load_file refuses a name given twice; a reader that took the last one would
    # average other bytes than the library does
    "duplicate-key": st_file(
        b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"w":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}',
        b"\0" * 32,
    ),
    "dtype-not-a-string": st_file({"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "header-nested-deep": st_file(b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
    "shape-of-5000-digits": st_file(b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,16]}}', b""),
}


@pytest.mark.parametrize("case", sorted(LYING_HEADERS))
def test_safetensors_header_that_lies(tmp_path: Path, case: str) -> None:
    run_broken(tmp_path, "epoch=1.safetensors", LYING_HEADERS[case])


def test_safetensors_lies_do_not_allocate(tmp_path: Path) -> None:
    """A header claiming 2^62 x 2^62 elements or 2^63 header bytes is refused before any read."""
    message = run_broken(tmp_path, "epoch=1.safetensors", LYING_HEADERS["huge-header-length"])
    assert "header" in message
    message = run_broken(tmp_path, "epoch=1.safetensors", LYING_HEADERS["offsets-past-end"])
    assert "past the end" in message


# ---------------------------------------------------------------- zip archives that lie


def _eocd(data: bytes) -> int:
    position = data.rfind(b"PK\x05\x06")
    assert position >= 0
    return position


def central_entries(data: bytes) -> dict[str, tuple[int, int]]:
    """File name -> (offset of its central directory entry, offset of its local header)."""
    eocd = _eocd(data)
    count, _size, start = struct.unpack_from("<HII", data, eocd + 10)
    entries: dict[str, tuple[int, int]] = {}
    position = start
    for _ in range(count):
        assert data[position : position + 4] == b"PK\x01\x02"
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, position + 28)
        local = struct.unpack_from("<I", data, position + 42)[0]
        name = data[position + 46 : position + 46 + name_length].decode()
        entries[name] = (position, local)
        position += 46 + name_length + extra_length + comment_length
    return entries


def _entry(entries: dict[str, tuple[int, int]], suffix: str) -> tuple[int, int]:
    return next(v for k, v in entries.items() if k.endswith(suffix))


def patch_sizes(data: bytes, suffix: str, size: int, *, local: bool = True) -> bytes:
    """Make a record claim `size` bytes, in the central directory (and its local header)."""
    out = bytearray(data)
    central, header = _entry(central_entries(data), suffix)
    struct.pack_into("<II", out, central + 20, size, size)
    if local:
        struct.pack_into("<II", out, header + 18, size, size)
    return bytes(out)


def patch_header_offset(data: bytes, suffix: str, offset: int) -> bytes:
    out = bytearray(data)
    central, _ = _entry(central_entries(data), suffix)
    struct.pack_into("<I", out, central + 42, offset)
    return bytes(out)


def rebuild_zip(data: bytes, change: Callable[[str, bytes], bytes | None], compress: str = "") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as old, zipfile.ZipFile(out, "w") as new:
        for info in old.infolist():
            content = change(info.filename, old.read(info))
            if content is None:
                continue
            method = zipfile.ZIP_DEFLATED if compress and info.filename.endswith(compress) else zipfile.ZIP_STORED
            new.writestr(info.filename, content, compress_type=method)
    return out.getvalue()


def _replace(suffix: str, value: bytes | None) -> Callable[[str, bytes], bytes | None]:
    return lambda name, content: value if name.endswith(suffix) else content


def _duplicate_pickle(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as old, zipfile.ZipFile(out, "w") as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
        new.writestr("other/data.pkl", b"\x80\x02}q\x00.")
    return out.getvalue()


def _lying_zips() -> dict[str, bytes]:
    data = zip_pt(1)
    entries = central_entries(data)
    storage_size = 8 * 4 * 4  # enc.weight: 8 x 4 float32, storage "0"
    first_storage = min((k for k in entries if "/data/" in k), key=lambda k: entries[k][1])
    return {
        "record-smaller-than-tensor": patch_sizes(data, first_storage, storage_size // 2),
        "record-smaller-central-only": patch_sizes(data, first_storage, 4, local=False),
        "record-past-end-of-file": patch_sizes(data, first_storage, 10**9),
        "pickle-size-lies": patch_sizes(data, "/data.pkl", 10**6),
        "pickle-size-too-small": patch_sizes(data, "/data.pkl", 10),
        "header-offset-lies": patch_header_offset(data, first_storage, 7),
        "header-offset-past-end": patch_header_offset(data, first_storage, len(data) + 100),
        "pickle-header-offset-lies": patch_header_offset(data, "/data.pkl", 3),
        "storage-compressed": rebuild_zip(data, lambda n, c: c, compress=first_storage),
        "storage-missing": rebuild_zip(data, _replace(first_storage, None)),
        "storage-empty": rebuild_zip(data, _replace(first_storage, b"")),
        "pickle-missing": rebuild_zip(data, _replace("/data.pkl", None)),
        "pickle-garbage": rebuild_zip(data, _replace("/data.pkl", b"\x80\x02garbage")),
        "pickle-empty": rebuild_zip(data, _replace("/data.pkl", b"")),
        "two-pickles": _duplicate_pickle(data),
        "big-endian": rebuild_zip(data, _replace("/byteorder", b"big")),
        "bad-crc": _flip_pickle_byte(data),
    }


def _flip_pickle_byte(data: bytes) -> bytes:
    """A data.pkl byte changed without its CRC: the archive says its content is corrupt."""
    _, header = _entry(central_entries(data), "/data.pkl")
    name_length, extra_length = struct.unpack_from("<HH", data, header + 26)
    start = header + 30 + name_length + extra_length
    out = bytearray(data)
    position = start + bytes(out[start:]).index(b"epoch")
    out[position] = ord("E")
    return bytes(out)


LYING_ZIPS = _lying_zips()


@pytest.mark.parametrize("case", sorted(LYING_ZIPS))
def test_zip_whose_records_lie(tmp_path: Path, case: str) -> None:
    run_broken(tmp_path, "epoch=1.pt", LYING_ZIPS[case])


def _tolerable_zips() -> dict[str, bytes]:
    """End-of-archive fields that zip readers recompute from the central directory itself."""
    data = zip_pt(1)
    eocd = _eocd(data)
    bad_count = bytearray(data)
    struct.pack_into("<HH", bad_count, eocd + 8, 200, 200)
    bad_offset = bytearray(data)
    struct.pack_into("<I", bad_offset, eocd + 16, len(data) * 2)
    return {"entry-count-lies": bytes(bad_count), "central-directory-offset-lies": bytes(bad_offset)}


@pytest.mark.parametrize("case", ["entry-count-lies", "central-directory-offset-lies"])
def test_zip_lies_a_reader_may_tolerate(tmp_path: Path, case: str) -> None:
    """Either refused cleanly, or read correctly: never a wrong average."""
    good, bad, out = tmp_path / "epoch=0.pt", tmp_path / "epoch=1.pt", tmp_path / "avg.safetensors"
    good.write_bytes(zip_pt(0))
    bad.write_bytes(_tolerable_zips()[case])
    result = run_cli(good, bad, "-o", out, expect=None)
    TRIED[case] = 1
    if result.exit_code == 1:
        assert_clean_error(result, bad, out, tmp_path)
        return
    assert result.exit_code == 0, result.output
    averaged = load_file(out)
    for name, tensor in state_dict(0).items():
        assert torch.equal(averaged[name], oracle_mean([tensor, state_dict(1)[name]]))


def _pickle_lies() -> dict[str, bytes]:
    """Tensor metadata in data.pkl that does not fit its storage record."""

    def edit(old: bytes, new: bytes) -> bytes:
        data = zip_pt(1)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            pickled = archive.read(name)
        assert pickled.count(old) == 1, old
        return rebuild_zip(data, _replace("/data.pkl", pickled.replace(old, new)))

    # torch.save writes enc.weight's view as (..., K\x00 (offset), K\x08K\x04\x86 (size), K\x04K\x01\x86 (stride)
    return {
        "view-past-storage": edit(b"K\x08K\x04\x86q", b"K\x09K\x04\x86q"),
        "offset-past-storage": edit(b"K\x00K\x08K\x04\x86q", b"K\x05K\x08K\x04\x86q"),
        "numel-lies": edit(b"K tq", b"M\x00\x10tq"),
        # torch.load refuses a size of floats; it must never reach the writers (it once
        # made the .pt writer drop the whole averaged state dict and exit 0)
        "float-size": edit(b"K\x08K\x04\x86q", b"G" + struct.pack(">d", 8.0) + b"K\x04\x86q"),
        "size-and-stride-lengths-differ": edit(b"K\x08K\x04\x86q", b"K\x08K\x04K\x01\x87q"),
        "size-of-strings": edit(b"K\x08K\x04\x86q", b"X\x01\x00\x00\x00aX\x01\x00\x00\x00b\x86q"),
    }


PICKLE_LIES = _pickle_lies()


@pytest.mark.parametrize("suffix_out", [".safetensors", ".pt"])
@pytest.mark.parametrize("case", sorted(PICKLE_LIES))
def test_tensor_metadata_that_lies(tmp_path: Path, case: str, suffix_out: str) -> None:
    run_broken(tmp_path, "epoch=1.pt", PICKLE_LIES[case], suffix_out=suffix_out)


def _runs_within(seconds: float, *args: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "ckpt_avg", *map(str, args)], capture_output=True, text=True, timeout=seconds
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"ckpt-avg {' '.join(map(str, args))} hung")


def test_fifos_and_devices_among_checkpoints_are_skipped_not_read(tmp_path: Path) -> None:
    """A FIFO blocks whoever opens it; a device never ends. Neither is read, in any command."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for epoch in range(2):
        (ckpts / f"epoch={epoch}.pt").write_bytes(zip_pt(epoch))
    os.mkfifo(ckpts / "epoch=2.pt")
    (ckpts / "checkpoint-300").mkdir()
    os.symlink("/dev/zero", ckpts / "checkpoint-300" / "model.safetensors")
    out = tmp_path / "avg.safetensors"
    plan = _runs_within(20, "--dry-run", ckpts)
    assert plan.returncode == 0, plan.stderr
    skipped = [line for line in plan.stdout.splitlines() if "not a regular file" in line]
    assert len(skipped) == 1 and "epoch=2.pt" in skipped[0], plan.stdout
    assert "checkpoint-300" not in plan.stdout  # its weights are no file: not a checkpoint directory
    averaged = _runs_within(20, ckpts, "-o", out)
    assert averaged.returncode == 0  # said in the run too, not only in the plan: it may have been meant
    assert "Warning: " in averaged.stderr and "epoch=2.pt: skipped: not a regular file" in averaged.stderr
    assert _runs_within(20, "inspect", ckpts).returncode == 0
    named = _runs_within(20, ckpts / "epoch=2.pt", ckpts / "epoch=0.pt", "-o", tmp_path / "b.safetensors")
    assert named.returncode == 1 and named.stderr.startswith("Error: ") and "epoch=2.pt" in named.stderr
    assert "not a regular file" in named.stderr and len(named.stderr.splitlines()) == 1
    assert leftovers(tmp_path) == []


def test_legacy_tar_member_that_is_a_fifo_does_not_hang(tmp_path: Path) -> None:
    """A pre-1.0 tar checkpoint whose `storages` member is a FIFO: reading it must not block."""
    bad = tmp_path / "epoch=1.pt"
    with tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("storages")
        info.type = tarfile.FIFOTYPE
        tar.addfile(info)
    out = tmp_path / "avg.safetensors"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ckpt_avg", str(bad), "-o", str(out)],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("ckpt-avg hung reading a tar checkpoint whose member is a FIFO")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("Error: ") and str(bad) in done.stderr.splitlines()[0]
    assert not out.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- valid pickles that are hard to handle


def zip_with_hyper_parameters(body: bytes) -> bytes:
    """A torch.save zip whose `hyper_parameters` value is the given pickle opcodes."""
    marker = "@@HYPER@@"
    data = io.BytesIO()
    torch.save({"state_dict": state_dict(1), "epoch": 1, "hyper_parameters": marker}, data)
    encoded = b"X" + struct.pack("<I", len(marker)) + marker.encode()

    def change(name: str, content: bytes) -> bytes:
        if not name.endswith("/data.pkl"):
            return content
        assert content.count(encoded) == 1
        return content.replace(encoded, body)

    return rebuild_zip(data.getvalue(), change)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(function: bytes, *args: bytes) -> bytes:
    return function + b"(" + b"".join(args) + b"tR"


def _int(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


_MEMO = struct.pack("<I", 1_000_000)  # far above the indices torch.save uses
BOMBS = {
    # a few hundred bytes that would build gigabytes out of allowlisted constructors
    "list-of-a-range": _call(_global("__builtin__", "list"), _call(_global("__builtin__", "xrange"), _int(10**9))),
    "set-of-a-range": _call(_global("builtins", "set"), _call(_global("builtins", "range"), _int(10**9))),
    "bytes-of-a-size": _call(_global("__builtin__", "bytes"), _int(10**12)),
    "numpy-array-of-a-shape": _call(_global("numpy", "ndarray"), b"(" + _int(10**5) + _int(10**5) + b"t"),
    # one list of 200,000 items, memoized, copied 400 times: quadratic in the file's size
    "copies-of-a-memoized-list": b"]("
    + b"K\x01" * 200_000
    + b"er"
    + _MEMO
    + b"0("
    + _call(_global("builtins", "list"), b"j" + _MEMO) * 400
    + b"l",
}


def test_a_compressed_pickle_that_unpacks_to_gigabytes_is_refused(tmp_path: Path) -> None:
    """A zip bomb: data.pkl deflated, 200 MB of padding inside a file of 200 KB."""
    pickled = io.BytesIO()
    torch.save(state_dict(1), pickled)
    with zipfile.ZipFile(pickled) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        body = archive.read(name)
    padding = 200_000_000
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w") as out, zipfile.ZipFile(pickled) as archive:
        for info in archive.infolist():
            if info.filename != name:
                out.writestr(info, archive.read(info))
                continue
            packed = zipfile.ZipInfo(name)
            packed.compress_type = zipfile.ZIP_DEFLATED
            with out.open(packed, "w", force_zip64=True) as record:
                record.write(b"\x80\x04\x8e" + padding.to_bytes(8, "little"))  # BINBYTES8, then POP
                zeros = bytes(1 << 24)
                for _ in range(padding // len(zeros)):
                    record.write(zeros)
                record.write(bytes(padding % len(zeros)) + b"0" + body[2:])
    assert len(bomb.getvalue()) < 1 << 20
    with memory_guard(1 << 30):
        message = run_broken(tmp_path, "epoch=1.pt", bomb.getvalue())
    assert "unpacks to more than" in message


def test_a_checkpoint_without_the_state_dict_the_last_one_has(tmp_path: Path) -> None:
    """A plain state dict among Lightning checkpoints (or a key a mutation renamed)."""
    message = run_broken(tmp_path, "epoch=1.pt", legacy_pt(1).replace(b"state_dict", b"\x00tate_dict", 1))
    assert "no state dict at" in message and "are these checkpoints from one run?" in message


def test_a_record_name_given_twice_is_refused(tmp_path: Path) -> None:
    """Which of two `data/0` records torch.load reads depends on its zip index: refuse, never guess."""
    good = io.BytesIO()
    torch.save(state_dict(1), good)
    twice = io.BytesIO()
    with zipfile.ZipFile(good) as archive, zipfile.ZipFile(twice, "w") as out:
        for name in archive.namelist():
            data = archive.read(name)
            out.writestr(name, data)
            if name.endswith("/data/0"):
                with pytest.warns(UserWarning, match="Duplicate name"):
                    out.writestr(name, bytes(len(data)))
    message = run_broken(tmp_path, "epoch=1.pt", twice.getvalue())
    assert "appears twice" in message


def test_a_pickle_that_changes_an_allowed_class_is_refused_and_undone(tmp_path: Path) -> None:
    """BUILD on the class object itself: every later Namespace would have fp16=True."""
    import argparse

    body = _global("argparse", "Namespace") + b"N}(X\x04\x00\x00\x00fp16\x88u\x86b"  # BUILD (None, {fp16: True})
    message = run_broken(tmp_path, "epoch=1.pt", zip_with_hyper_parameters(body))
    assert "changes the attributes of Namespace" in message
    assert not hasattr(argparse.Namespace, "fp16") and not hasattr(argparse.Namespace(), "fp16")


@pytest.mark.parametrize("name", ["Tensor", "nn.parameter.Parameter"])
def test_a_pickle_that_calls_a_tensor_class_is_refused(tmp_path: Path, name: str) -> None:
    """torch.Tensor(4096) is uninitialised memory: averaged, the output would differ every run."""
    body = _call(_global("torch" if name == "Tensor" else "torch.nn.parameter", name.rsplit(".", 1)[-1]), _int(4096))
    message = run_broken(tmp_path, "epoch=1.pt", zip_with_hyper_parameters(body))
    assert "uninitialised memory" in message


def test_parameters_and_tensor_subclasses_in_zip_and_legacy_files_average(tmp_path: Path) -> None:
    states = []
    for epoch, legacy in enumerate([False, True, False]):
        generator = torch.Generator().manual_seed(epoch)
        state = {
            "w": torch.nn.Parameter(torch.randn(3, 4, generator=generator)),
            "b": torch.randn(4, generator=generator),
        }
        torch.save(state, tmp_path / f"epoch={epoch}.pt", _use_new_zipfile_serialization=not legacy)
        states.append(state)
    out = tmp_path / "avg.pt"
    run_cli(tmp_path, "-o", out)
    averaged = torch.load(out, weights_only=True)
    for key in ("w", "b"):
        expected = oracle_mean([s[key].detach() for s in states])
        assert torch.equal(averaged[key], expected), key


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_pickles_that_build_huge_objects_are_refused_early(tmp_path: Path, case: str) -> None:
    with memory_guard(2 << 30):
        message = run_broken(tmp_path, "epoch=1.pt", zip_with_hyper_parameters(BOMBS[case]), suffix_out=".pt")
    # numpy.ndarray(shape) is refused before its size counts: it never builds uninitialised memory
    assert "builds more than" in message or "uninitialised memory" in message, message
    assert (tmp_path / "epoch=1.pt").stat().st_size < 1 << 20


@pytest.mark.parametrize("output", ["avg.pt", "avg.safetensors"])
def test_deeply_nested_metadata(tmp_path: Path, output: str) -> None:
    """hyper_parameters nested 100,000 lists deep: averaged, or one clean error naming the file."""
    depth = 100_000
    good, bad, out = tmp_path / "epoch=0.pt", tmp_path / "epoch=1.pt", tmp_path / output
    good.write_bytes(zip_pt(0))
    bad.write_bytes(zip_with_hyper_parameters(b"(" * depth + b"l" * depth))  # MARK ... LIST, nested
    result = run_cli(good, bad, "-o", out, expect=None)
    TRIED[f"deep {output}"] = 1
    if result.exit_code != 0:
        assert_clean_error(result, bad, out, tmp_path)
    else:
        assert out.exists() and leftovers(tmp_path) == []


def test_state_dict_key_that_safetensors_cannot_hold(tmp_path: Path) -> None:
    """A tensor named `__metadata__` collides with the safetensors header's metadata entry:
    refused, for a file and for a directory output, with an error naming it and the fix, never
    written as a corrupt file; a .pt output holds it."""
    for epoch in range(2):
        sd = {"w": torch.full((2,), float(epoch)), "__metadata__": torch.ones(2)}
        torch.save({"state_dict": sd, "epoch": epoch}, tmp_path / f"epoch={epoch}.pt")
    inputs = (tmp_path / "epoch=0.pt", tmp_path / "epoch=1.pt")
    TRIED["__metadata__ key"] = 1
    for out in (tmp_path / "avg.safetensors", tmp_path / "avg"):
        result = run_cli(*inputs, "-o", f"{out}/" if out.suffix == "" else out, expect=1)
        assert result.stderr == (
            f"Error: {inputs[1]}: a tensor named '__metadata__' cannot be stored in safetensors;"
            " write a .pt output instead\n"
        )
        assert not out.exists() and leftovers(tmp_path) == []
    run_cli(*inputs, "-o", tmp_path / "avg.pt")
    averaged = torch.load(tmp_path / "avg.pt", weights_only=True)["state_dict"]
    assert torch.equal(averaged["__metadata__"], torch.ones(2)) and torch.equal(averaged["w"], torch.full((2,), 0.5))


# ---------------------------------------------------------------- random mutations


@contextlib.contextmanager
def memory_guard(extra_bytes: int = 3 << 30) -> Iterator[None]:
    """Cap this process's address space while mutated files are read.

    A mutated pickle can ask for a huge memo or storage; on a shared machine that must fail
    as MemoryError (which ckpt-avg reports as a bad file), not take the machine's memory.
    """
    with open("/proc/self/status") as f:
        size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size_kb * 1024 + extra_bytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


BASES = {kind: (suffix, make(1)) for kind, (suffix, make) in VALID.items()}


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(BASES)))
    suffix, data = BASES[kind]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(out) - 1))
        out[position] = draw(st.integers(0, 255))
    if draw(st.booleans()) and draw(st.booleans()):
        out = out[: draw(st.integers(1, len(out)))]
    return suffix, bytes(out)


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutated_files_exit_0_or_1_cleanly(mutation: tuple[str, bytes]) -> None:
    suffix, data = mutation
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        good = directory / f"epoch=0{suffix}"
        good.write_bytes(BASES["safetensors"][1] if suffix == ".safetensors" else BASES["zip"][1])
        bad = directory / f"epoch=1{suffix}"
        bad.write_bytes(data)
        out = directory / "avg.safetensors"
        with memory_guard():
            result = run_cli(good, bad, "-o", out, expect=None)
        TRIED["mutation"] = TRIED.get("mutation", 0) + 1
        assert result.exit_code in (0, 1), result.output
        assert "Traceback" not in result.output
        assert bad.read_bytes() == data
        if result.exit_code == 0:
            assert out.exists() and leftovers(directory) == []
        else:
            assert_clean_error(result, bad, out, directory)


def test_a_trainer_directory_missing_a_shard_matters_only_if_selected(tmp_path: Path) -> None:
    """A partly copied checkpoint-N/ beside good ones: averaging the good ones still works."""
    run = tmp_path / "run"
    for step in (100, 200, 300):
        directory = run / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        shards = {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b"}
        index = {"metadata": {}, "weight_map": {name: file for file, name in shards.items()}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        for file, name in shards.items():
            if step == 300 and file.startswith("model-00002"):
                continue  # still being copied
            save_file({name: torch.full((2,), float(step))}, directory / file)
    run_cli(run, "--end", "200", "-o", tmp_path / "avg.safetensors")
    assert torch.equal(load_file(tmp_path / "avg.safetensors")["a"], torch.full((2,), 150.0))
    result = run_cli(run, "-o", tmp_path / "all.safetensors", expect=1)
    assert "checkpoint-300" in result.stderr and "model-00002-of-00002.safetensors" in result.stderr


def test_legacy_files_leave_no_temporary_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Legacy storages are spilled to unnamed files: nothing is left, whatever the way out."""
    import tempfile

    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    for epoch in range(3):
        (tmp_path / f"epoch={epoch}.pt").write_bytes(legacy_pt(epoch))
    run_cli(tmp_path, "-o", tmp_path / "avg.pt")
    assert list(spill.iterdir()) == []
