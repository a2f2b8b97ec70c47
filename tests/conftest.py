"""Shared helpers: a run of checkpoints, the float64 oracle computed the simple way, and the CLI
as a user runs it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from ckpt_avg.cli import main


@dataclass(frozen=True)
class Run:
    paths: list[Path]  # in epoch order
    states: list[dict[str, torch.Tensor]]  # the state dict each file holds


FLAT_SHAPES: Mapping[str, tuple[int, ...]] = {"w": (4, 4), "b": (4,)}


def make_run(
    directory: Path,
    *,
    kind: str = "flat",
    epochs: int = 3,
    dtype: torch.dtype = torch.float32,
    first_epoch: int = 0,
    shapes: Mapping[str, tuple[int, ...]] = FLAT_SHAPES,
) -> Run:
    """A run of checkpoints in `directory` (made if missing), one per epoch, random and reproducible.

    kind: "flat" (`epoch_K.pt` holding the state dict), "lightning" (`epoch=K-step=N.ckpt`
    with the state dict under "state_dict", an epoch, a global step and optimizer states) or
    "safetensors" (`epoch_K.safetensors`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    run = Run([], [])
    for epoch in range(first_epoch, first_epoch + epochs):
        generator = torch.Generator().manual_seed(100 + epoch)
        state = {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}
        if kind == "flat":
            path = directory / f"epoch_{epoch}.pt"
            torch.save(state, path)
        elif kind == "lightning":
            path = directory / f"epoch={epoch}-step={10 * (epoch + 1)}.ckpt"
            checkpoint = {"state_dict": state, "epoch": epoch, "global_step": 10 * (epoch + 1)}
            torch.save({**checkpoint, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]}, path)
        else:
            assert kind == "safetensors", kind
            path = directory / f"epoch_{epoch}.safetensors"
            save_file(state, path)
        run.paths.append(path)
        run.states.append(state)
    return run


def round_reference(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 to `dtype` once, nearest-even, independently of ckpt_avg's own code.

    bfloat16 keeps 8 significant bits, float16 11: clear the low bits of the float64
    pattern with round-half-to-even, then the value is exact in the target dtype
    (valid in the normal range, which is where the tests' values lie).
    """
    shape = values.shape
    values = values.to(torch.float64).reshape(-1)
    return _round_flat(values, dtype).reshape(shape)


def _round_flat(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.float64,):
        return values.clone()
    if dtype == torch.float32:
        return values.to(torch.float32)  # a single IEEE rounding
    if dtype == torch.float16:
        return torch.from_numpy(values.numpy().astype(np.float16))
    assert dtype == torch.bfloat16
    drop = 52 - 7
    bits = values.numpy().view(np.int64)
    lsb = (bits >> drop) & 1
    rounded = (bits + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)
    exact = torch.from_numpy(rounded.view(np.float64).copy())
    result = exact.to(torch.bfloat16)
    assert torch.equal(result.to(torch.float64), exact), "reference rounding left the normal range"
    return result


def oracle_mean(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The float64 mean (or normalised weighted mean) rounded once, accumulating in order."""
    dtype = dtype or tensors[-1].dtype
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    if weights is None:
        for t in tensors:
            total += t.to(torch.float64)
        total /= len(tensors)
    else:
        norm = [w / sum(weights) for w in weights]
        for w, t in zip(norm, tensors, strict=True):
            total += t.to(torch.float64) * w
    return round_reference(total, dtype)


def run_cli(*args: str, expect: int | None = 0) -> Result:
    """Run `ckpt-avg ARGS` in-process as a user would, checking the exit status."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}, output:\n{result.output}"
    return result


def leftovers(directory: str | os.PathLike[str]) -> list[str]:
    """Temp files a run may have left behind in a directory."""
    return [n for n in os.listdir(directory) if n.startswith(".ckpt-avg-tmp-")]


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
