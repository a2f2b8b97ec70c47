"""The streaming kernel with tiny buffer budgets: many chunks, many blocks, same exact answer.

Test models are small, so by default every tensor fits one chunk; shrinking the budgets
drives the chunked, blocked and device (whole-chunk) paths a large model takes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import oracle_mean
from safetensors.torch import load_file, save_file

from ckpt_avg import average, average_checkpoints, reduce
from ckpt_avg.digest import digest_state_dict


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


TINY = average.Budgets(read_bytes=64 << 10, max_read_bytes=8 << 10, write_bytes=24 << 10, block_elements=1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocked", [True, False], ids=["cpu-blocks", "device-path"])
def test_many_chunks_and_blocks_stay_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, blocked: bool
) -> None:
    states = _inputs(tmp_path / "ckpts", dtype)
    if not blocked:  # the device reducer (whole chunks, copied over), run on the CPU

        def on_device(device: str, files: Sequence[str], **kwargs: Any) -> reduce.DeviceReducer:
            kwargs.pop("block_elements")
            return reduce.DeviceReducer(files, device=torch.device(device), **kwargs)

        monkeypatch.setattr(average, "reducer_for", on_device)
    out = tmp_path / "avg.safetensors"
    report = average_checkpoints([str(tmp_path / "ckpts")], str(out), weights=(1.0, 2.0, 3.0, 4.0), budgets=TINY)
    result = load_file(out)
    for key in ("big", "odd", "tiny"):
        expected = oracle_mean([s[key] for s in states], weights=[1.0, 2.0, 3.0, 4.0])
        assert torch.equal(result[key], expected), key
    assert torch.equal(result["step"], states[-1]["step"])
    assert report.output_digest == digest_state_dict(result).root()  # hashed chunk by chunk, as a whole here
    assert [c.tensor_digest for c in report.selected] == [digest_state_dict(s).root() for s in states]


def test_budgets_do_not_change_the_bytes_or_digests(tmp_path: Path) -> None:
    _inputs(tmp_path / "ckpts", torch.float32)
    first = average_checkpoints([str(tmp_path / "ckpts")], str(tmp_path / "a.safetensors"))
    small = average.Budgets(read_bytes=64 << 10, max_read_bytes=8 << 10, block_elements=1000, read_threads=3)
    second = average_checkpoints([str(tmp_path / "ckpts")], str(tmp_path / "a2.safetensors"), budgets=small)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "a2.safetensors").read_bytes()
    assert first.output_digest == second.output_digest
    assert [c.tensor_digest for c in first.selected] == [c.tensor_digest for c in second.selected]


def _strided_inputs(directory: Path, count: int) -> list[dict[str, torch.Tensor]]:
    directory.mkdir()
    generator = torch.Generator().manual_seed(3)
    states = []
    for epoch in range(count):
        state = {
            "transposed": torch.randn(37, 1001, generator=generator).t(),  # saved as a strided view
            "expanded": torch.randn(5, 1, generator=generator).expand(5, 999),  # stride 0
            "plain": torch.randn(777, generator=generator),
        }
        torch.save(state, directory / f"epoch_{epoch}.pt")
        states.append(state)
    return states


def test_strided_views_stay_exact_and_digest_like_contiguous_ones(tmp_path: Path) -> None:
    states = _strided_inputs(tmp_path / "views", 5)
    (tmp_path / "dense").mkdir()
    for epoch, state in enumerate(states):
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "dense" / f"epoch_{epoch}.safetensors")
    views = average_checkpoints([str(tmp_path / "views")], str(tmp_path / "a.safetensors"), budgets=TINY)
    dense = average_checkpoints([str(tmp_path / "dense")], str(tmp_path / "b.safetensors"), budgets=TINY)
    result = load_file(tmp_path / "a.safetensors")
    for key in states[0]:
        assert torch.equal(result[key], oracle_mean([s[key] for s in states])), key
    assert [c.tensor_digest for c in views.selected] == [c.tensor_digest for c in dense.selected]
    assert views.output_digest == dense.output_digest


def _peak_rss_mib(*args: str) -> float:
    code = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['ckpt-avg', *{list(args)!r}]\n"
        "try:\n    runpy.run_module('ckpt_avg', run_name='__main__')\n"
        "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def test_memory_for_strided_views_does_not_grow_with_the_number_of_checkpoints(tmp_path: Path) -> None:
    """A transposed 32 MiB tensor in each input: 12 inputs need no more than 4 did."""
    directory = tmp_path / "ckpts"
    directory.mkdir()
    for epoch in range(12):
        torch.save({"w": torch.full((1024, 8192), float(epoch)).t()}, directory / f"epoch_{epoch}.pt")
    few = _peak_rss_mib("--last", "4", str(directory), "-o", str(tmp_path / "few.safetensors"))
    many = _peak_rss_mib(str(directory), "-o", str(tmp_path / "many.safetensors"))
    assert many - few < 64, f"peak RSS {few:.0f} MiB with 4 inputs, {many:.0f} MiB with 12"
    assert torch.equal(load_file(tmp_path / "many.safetensors")["w"], torch.full((8192, 1024), 5.5))


def test_averaging_in_a_loop_does_not_leak_file_descriptors(tmp_path: Path) -> None:
    """The Python API from a training script: every input file is closed once the run is over."""
    import gc

    states = _inputs(tmp_path / "st", torch.float32)
    (tmp_path / "pt").mkdir()
    for epoch, state in enumerate(states):
        torch.save(state, tmp_path / "pt" / f"epoch_{epoch}.pt", _use_new_zipfile_serialization=epoch % 2 == 0)

    def open_descriptors() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    average_checkpoints([str(tmp_path / "st")], str(tmp_path / "warm.safetensors"))
    before = open_descriptors()
    for run in range(10):
        for kind in ("st", "pt"):
            average_checkpoints([str(tmp_path / kind)], str(tmp_path / f"{kind}{run}.pt"))
    assert open_descriptors() - before < 4, "input files stay open after the run"


def _cores_in_child(env: dict[str, str], affinity: set[int] | None) -> int:
    code = (
        "import os\n"
        + (f"os.sched_setaffinity(0, {affinity!r})\n" if affinity is not None else "")
        + "from ckpt_avg.average import usable_cores\nprint(usable_cores())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(done.stdout)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_threads_follow_the_cores_this_process_may_use() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"}
    allowed = len(os.sched_getaffinity(0))
    assert _cores_in_child(env, None) == allowed
    assert _cores_in_child(env, {min(os.sched_getaffinity(0))}) == 1  # taskset -c 0
    assert _cores_in_child({**env, "LOCAL_WORLD_SIZE": str(allowed)}, None) == 1  # torchrun, a rank per core
    assert _cores_in_child({**env, "LOCAL_WORLD_SIZE": "many"}, None) == allowed
    assert average.Budgets(read_threads=3, arith_threads=2).threads() == (3, 2)


def _many_small(directory: Path) -> list[dict[str, torch.Tensor]]:
    """Hundreds of small tensors of every kind, between larger ones: they travel in batches."""
    directory.mkdir()
    generator = torch.Generator().manual_seed(11)
    states = []
    for epoch in range(3):
        state: dict[str, torch.Tensor] = {"big": torch.randn(40_000, generator=generator)}
        for i in range(300):
            dtype = (torch.float32, torch.bfloat16, torch.float16, torch.float64)[i % 4]
            state[f"layer{i}.w"] = torch.randn(i % 7 + 1, 3, generator=generator).to(dtype)
            state[f"layer{i}.num_batches_tracked"] = torch.tensor(epoch * 10 + i)
        state["empty"] = torch.zeros(0, 4)
        state["transposed"] = torch.randn(5, 9, generator=generator).t()  # strided: spilled, then read back
        torch.save(state, directory / f"epoch_{epoch}.pt")
        states.append(state)
    return states


@pytest.mark.parametrize("blocked", [True, False], ids=["cpu-blocks", "device-path"])
def test_small_tensors_in_batches_are_exact_and_the_same_as_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocked: bool
) -> None:
    states = _many_small(tmp_path / "ckpts")
    if not blocked:

        def on_device(device: str, files: Sequence[str], **kwargs: Any) -> reduce.DeviceReducer:
            kwargs.pop("block_elements")
            return reduce.DeviceReducer(files, device=torch.device(device), **kwargs)

        monkeypatch.setattr(average, "reducer_for", on_device)
    batched = average_checkpoints([str(tmp_path / "ckpts")], str(tmp_path / "batched.safetensors"))
    monkeypatch.setattr(average, "BATCH_STEPS", 1)  # one hand-off per tensor, as before batches
    single = average_checkpoints([str(tmp_path / "ckpts")], str(tmp_path / "single.safetensors"))
    assert (tmp_path / "batched.safetensors").read_bytes() == (tmp_path / "single.safetensors").read_bytes()
    assert batched.output_digest == single.output_digest
    assert [c.tensor_digest for c in batched.selected] == [digest_state_dict(s).root() for s in states]
    result = load_file(tmp_path / "batched.safetensors")
    for key, value in states[-1].items():
        if value.is_floating_point():
            assert torch.equal(result[key], oracle_mean([s[key] for s in states])), key
        else:
            assert torch.equal(result[key], value), key  # counters: the last checkpoint's


def test_batches_keep_every_step_once_in_order_within_their_limits() -> None:
    leaves = (torch.zeros(1, dtype=torch.float32), torch.zeros(1, dtype=torch.bfloat16))
    sizes = [3, 1000, 1, 50_000, 7, 7, 7, 0, 20_000]
    steps = []
    for i, count in enumerate(sizes):
        unit = average.Unit([f"t{i}"], leaves, "float", torch.float16, (count,))
        steps.append(average._Step(average.Visit(f"t{i}", unit, True, True), 0, count, True, True, (f"t{i}",)))
    limits, out_limit = [64 << 10, 32 << 10], 16 << 10
    batches = average.batch_steps(steps, limits, out_limit)
    assert [s for b in batches for s in b.steps] == steps
    for batch in batches:
        if len(batch.steps) > 1:  # a step too large for the limits travels alone
            for i, limit in enumerate(limits):
                assert batch.read_at[-1][i] + batch.steps[-1].read_bytes(i) <= limit
            assert batch.out_at[-1] + batch.steps[-1].out_bytes <= out_limit
        for j in range(1, len(batch.steps)):  # each step's bytes after the previous one's, aligned
            assert all(at % 64 == 0 for at in batch.read_at[j]) and batch.out_at[j] % 64 == 0
            assert batch.out_at[j] >= batch.out_at[j - 1] + batch.steps[j - 1].out_bytes
    assert len(batches) < len(steps)
