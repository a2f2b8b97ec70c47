"""The streaming kernel with tiny buffer budgets: many chunks, many blocks, same exact answer.

Test models are small, so by default every tensor fits one chunk; shrinking the budgets
drives the chunked, blocked and device (whole-chunk) paths a large model takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import oracle_mean
from safetensors.torch import load_file, save_file

from ckpt_avg import average, average_checkpoints


def _inputs(directory: Path, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    directory.mkdir()
    generator = torch.Generator().manual_seed(7)
    states = []
    for epoch in range(4):
        state = {
            "big": torch.randn(301, 173, generator=generator).to(dtype),
            "odd": torch.randn(9_999, generator=generator).to(dtype),
            "tiny": torch.randn(3, generator=generator).to(dtype),
            "step": torch.tensor(epoch),
        }
        save_file(state, directory / f"epoch_{epoch}.safetensors")
        states.append(state)
    return states


@pytest.fixture
def tiny_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(average, "READ_BUDGET_BYTES", 64 << 10)
    monkeypatch.setattr(average, "MAX_READ_BYTES", 8 << 10)
    monkeypatch.setattr(average, "WRITE_BUDGET_BYTES", 24 << 10)
    monkeypatch.setattr(average, "BLOCK_ELEMENTS", 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocked", [True, False], ids=["cpu-blocks", "device-path"])
def test_many_chunks_and_blocks_stay_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_budgets: None, dtype: torch.dtype, blocked: bool
) -> None:
    states = _inputs(tmp_path / "ckpts", dtype)
    if not blocked:
        original = average.Engine.__init__

        def whole_chunks(self: average.Engine, *args: object, **kwargs: object) -> None:
            original(self, *args, **kwargs)  # type: ignore[arg-type]
            self._blocked = False

        monkeypatch.setattr(average.Engine, "__init__", whole_chunks)
    out = tmp_path / "avg.safetensors"
    report = average_checkpoints([str(tmp_path / "ckpts")], str(out), weights=(1.0, 2.0, 3.0, 4.0))
    result = load_file(out)
    for key in ("big", "odd", "tiny"):
        expected = oracle_mean([s[key] for s in states], weights=[1.0, 2.0, 3.0, 4.0])
        assert torch.equal(result[key], expected), key
    assert torch.equal(result["step"], states[-1]["step"])
    assert report.output_digest is not None


def test_budgets_do_not_change_the_bytes_or_digests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _inputs(tmp_path / "ckpts", torch.float32)
    first = average_checkpoints([str(tmp_path / "ckpts")], str(tmp_path / "a.safetensors"))
    monkeypatch.setattr(average, "READ_BUDGET_BYTES", 64 << 10)
    monkeypatch.setattr(average, "MAX_READ_BYTES", 8 << 10)
    monkeypatch.setattr(average, "BLOCK_ELEMENTS", 1000)
    second = average_checkpoints([str(tmp_path / "ckpts")], str(tmp_path / "a2.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "a2.safetensors").read_bytes()
    assert first.output_digest == second.output_digest
    assert [c.tensor_digest for c in first.selected] == [c.tensor_digest for c in second.selected]
