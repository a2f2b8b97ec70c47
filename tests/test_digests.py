"""Tensor digests (SPEC §1.7): the documented BLAKE3 tree, the same for every format and chunking."""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from blake3 import blake3
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckpt_avg import average_checkpoints
from ckpt_avg.guard import PROVENANCE_RECORD
from ckpt_avg.write import finish_file, open_temp


def documented_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The checkpoint digest written out from the encoding in ckpt_avg/digest.py's docstring."""
    out = blake3(struct.pack("<Q", len(tensors)))
    for key in sorted(tensors, key=str.encode):
        tensor = tensors[key].contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        dtype = str(tensor.dtype).removeprefix("torch.").encode()
        out.update(struct.pack("<Q", len(key.encode())) + key.encode())
        out.update(struct.pack("<Q", len(dtype)) + dtype)
        out.update(struct.pack("<Q", tensor.dim()) + b"".join(struct.pack("<Q", d) for d in tensor.shape))
        out.update(blake3(data).digest())
    return out.hexdigest()


def _states() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    return [
        {
            "layer.weight": torch.randn(40, 30, generator=generator),
            "layer.bias": torch.randn(30, generator=generator).to(torch.bfloat16),
            "émbed": torch.randn(7, 3, generator=generator).to(torch.float16),  # non-ASCII key
            "empty": torch.zeros(0, 4),
            "bn.num_batches_tracked": torch.tensor(epoch),
        }
        for epoch in range(3)
    ]


def _provenance(path: Path) -> dict[str, Any]:
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            result: dict[str, Any] = json.loads(index.read_text())["metadata"]["ckpt_avg"]
            return result
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        result = json.loads(metadata["ckpt_avg"])
        return result
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/" + PROVENANCE_RECORD))
        result = json.loads(archive.read(name))
        return result


@pytest.mark.parametrize("output", ["avg.safetensors", "avg.pt", "avg_dir/", "sharded/"])
def test_digests_follow_the_documented_encoding_for_every_output_kind(tmp_path: Path, output: str) -> None:
    states = _states()
    (tmp_path / "ckpts").mkdir()
    for epoch, state in enumerate(states):
        torch.save({"state_dict": state, "epoch": epoch}, tmp_path / "ckpts" / f"epoch={epoch}.ckpt")
    shard = {"max_shard_size": "2000"} if output == "sharded/" else {}
    report = average_checkpoints([str(tmp_path / "ckpts")], f"{tmp_path}/{output}", **shard)
    target = tmp_path / output
    if target.is_dir():
        averaged: dict[str, torch.Tensor] = {}
        for file in sorted(target.glob("*.safetensors")):
            averaged.update(load_file(file))
        assert len(list(target.glob("*.safetensors"))) == (1 if output == "avg_dir/" else 3)
    elif output.endswith(".pt"):
        averaged = torch.load(target, weights_only=True)["state_dict"]
    else:
        averaged = load_file(target)
    provenance = _provenance(target)
    assert provenance["format_version"] == 2
    assert provenance["digest"]["scheme"] == "blake3-tree-v1" == report.digest_scheme
    assert report.output_digest == provenance["digest"]["output"] == documented_digest(averaged)
    assert provenance["digest"]["tensors"] == {k: blake3(_bytes(v)).hexdigest() for k, v in averaged.items()}
    expected_inputs = [documented_digest(s) for s in states]
    assert [c.tensor_digest for c in report.selected] == expected_inputs
    assert [i["tensor_digest"] for i in provenance["inputs"]] == expected_inputs


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def test_digest_does_not_depend_on_the_input_format(tmp_path: Path) -> None:
    states = _states()
    for kind in ("pt", "safetensors"):
        (tmp_path / kind).mkdir()
    for epoch, state in enumerate(states):
        torch.save(state, tmp_path / "pt" / f"epoch_{epoch}.pt")
        save_file(state, tmp_path / "safetensors" / f"epoch_{epoch}.safetensors")
    from_pt = average_checkpoints([str(tmp_path / "pt")], str(tmp_path / "a.safetensors"))
    from_st = average_checkpoints([str(tmp_path / "safetensors")], str(tmp_path / "b.pt"))
    assert [c.tensor_digest for c in from_pt.selected] == [c.tensor_digest for c in from_st.selected]
    assert from_pt.output_digest == from_st.output_digest


def test_tied_names_are_separate_records_and_stay_tied_in_a_pt_output(tmp_path: Path) -> None:
    (tmp_path / "ckpts").mkdir()
    generator = torch.Generator().manual_seed(5)
    states = []
    for epoch in range(3):
        shared = torch.randn(50, 8, generator=generator)
        state = {"encoder.embed": shared, "decoder.embed": shared, "head": torch.randn(8, generator=generator)}
        torch.save({"model": state, "epoch": epoch}, tmp_path / "ckpts" / f"checkpoint{epoch + 1}.pt")
        states.append(state)
    report = average_checkpoints([str(tmp_path / "ckpts")], str(tmp_path / "avg.pt"))
    averaged = torch.load(tmp_path / "avg.pt", weights_only=True)["model"]
    assert averaged["encoder.embed"].data_ptr() == averaged["decoder.embed"].data_ptr()
    assert report.output_digest == documented_digest(averaged)
    assert [c.tensor_digest for c in report.selected] == [documented_digest(s) for s in states]
    tensors = _provenance(tmp_path / "avg.pt")["digest"]["tensors"]
    assert tensors["encoder.embed"] == tensors["decoder.embed"] != tensors["head"]


@pytest.mark.parametrize("output", ["avg.safetensors", "avg.pt", "avg_dir/", "sharded/"])
def test_json_sha256_of_each_file_is_that_of_its_bytes(tmp_path: Path, output: str) -> None:
    (tmp_path / "ckpts").mkdir()
    for epoch, state in enumerate(_states()):
        state["tied"] = state["layer.weight"]  # a second copy in a safetensors output
        torch.save({"state_dict": state, "epoch": epoch}, tmp_path / "ckpts" / f"epoch={epoch}.ckpt")
    shard = {"max_shard_size": "3000"} if output == "sharded/" else {}
    report = average_checkpoints([str(tmp_path / "ckpts")], f"{tmp_path}/{output}", **shard)
    assert len(report.files) == (5 if output == "sharded/" else 1)
    for record in report.files:
        assert record.sha256 == hashlib.sha256(Path(record.path).read_bytes()).hexdigest(), record.path
    quiet = average_checkpoints([str(tmp_path / "ckpts")], f"{tmp_path}/{output}", force=True, hash_files=False)
    assert [f.sha256 for f in quiet.files] == [None] * len(quiet.files)


def test_file_digest_hashes_in_order_writes_without_reading_back(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    cases = {
        "in order": [(0, 0, len(payload))],
        "ahead, then the gap": [(len(payload) // 2, len(payload) // 2, len(payload)), (0, 0, len(payload) // 2)],
        "a header patched": [(0, 0, len(payload)), (0, 0, 64)],
    }
    for name, writes in cases.items():
        path = tmp_path / name.replace(" ", "_")
        file = open_temp(str(path), hashed=True)
        digest = file.digest
        assert digest is not None
        for offset, begin, end in writes:
            file.pwrite(payload[begin:end], offset)
        assert finish_file(file) == hashlib.sha256(payload).hexdigest(), name
        assert digest.read_back == {"in order": 0, "ahead, then the gap": len(payload) // 2}.get(name, len(payload))
