"""Issue 11, item 9: the open-file limit is never why a run fails (SPEC 1.6)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import torch
from conftest import oracle_mean
from safetensors.torch import load_file, save_file


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # the macOS default


def test_300_checkpoints_under_ulimit_256(tmp_path: Path) -> None:
    inputs = []
    for k in range(300):
        sd = {"a": torch.randn(4), "b": torch.randn(3, 2)}
        inputs.append(sd)
        if k % 2:  # both readers: zip .pt and safetensors
            torch.save(sd, tmp_path / f"epoch_{k}.pt")
        else:
            save_file(sd, str(tmp_path / f"epoch_{k}.safetensors"))
    out = tmp_path / "out" / "avg.safetensors"
    out.parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "ckpt_avg", str(tmp_path), "-o", str(out)],
        capture_output=True, text=True, preexec_fn=_limit_descriptors,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    averaged = load_file(out)
    for key in ("a", "b"):
        assert torch.equal(averaged[key], oracle_mean([sd[key] for sd in inputs]))
