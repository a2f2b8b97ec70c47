"""The one dtype table agrees with what the libraries write: safetensors' header names and
torch.save's storage classes, for every dtype the table gives them."""

from __future__ import annotations

import json
import pickletools
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt_avg.dtypes import BY_OPTION, OUTPUT_CHOICES, TABLE, Dtype, short_name

SAFETENSORS_ROWS = [row for row in TABLE if row.safetensors]
STORAGE_ROWS = [row for row in TABLE if row.storages and row.dtype not in (torch.qint8, torch.quint8, torch.qint32)]


@pytest.mark.parametrize("row", SAFETENSORS_ROWS, ids=lambda r: r.safetensors)
def test_safetensors_names_are_the_librarys(tmp_path: Path, row: Dtype) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.zeros(2, dtype=row.dtype)}, str(path))
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    assert json.loads(data[8 : 8 + size])["t"]["dtype"] == row.safetensors


@pytest.mark.parametrize("row", STORAGE_ROWS, ids=lambda r: r.storages[0])
def test_storage_names_are_torch_saves(tmp_path: Path, row: Dtype) -> None:
    path = tmp_path / "t.pt"
    torch.save({"t": torch.zeros(2, dtype=row.dtype)}, path)
    with zipfile.ZipFile(path) as archive:
        pickle = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    globals_ = [arg for op, arg, _ in pickletools.genops(pickle) if op.name == "GLOBAL"]
    assert f"torch {row.storages[0]}" in globals_


def test_option_names() -> None:
    assert [BY_OPTION[name] for name in OUTPUT_CHOICES] == [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    assert {BY_OPTION[n] for n in ("fp32", "float", "fp64", "double", "bf16", "fp16", "half")} == {
        torch.float32, torch.float64, torch.bfloat16, torch.float16,
    }  # fmt: skip
    assert (short_name(torch.bfloat16), short_name(torch.uint16)) == ("bf16", "uint16")
