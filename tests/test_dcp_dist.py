"""DCP checkpoints saved by several gloo ranks: DTensor shards, a 2-D mesh, FSDP2 with AdamW."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import oracle_mean, run_cli
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

STEPS = (10, 20, 30)
BIG_ROWS = 16 * 1024  # x 1024 fp32: a 64 MiB tensor in four 16 MiB chunks
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _full(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "a": torch.randn(7, 5, generator=g),  # 7 rows: uneven over 2 and 4 ranks
        "b": torch.randn(6, 9, generator=g, dtype=torch.float64).to(torch.bfloat16),
        "c": torch.randn(11, generator=g),
    }


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _save_worker(rank: int, world: int, root: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{root}/pg-save", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, 2))
    for i, step in enumerate(STEPS):
        full = _full(i)
        # Sharded over 2 ranks (mesh dim 1), replicated over the other: saved once.
        two = {k: distribute_tensor(v, mesh, [Replicate(), Shard(0)]) for k, v in full.items()}
        dcp.save({"model": two, "step": step}, checkpoint_id=f"{root}/two/step-{step}")
        grid = {k: distribute_tensor(v, mesh, [Shard(0), Shard(v.dim() - 1)]) for k, v in full.items()}
        dcp.save({"model": grid}, checkpoint_id=f"{root}/grid/step-{step}")
        dcp.save({"model": grid}, checkpoint_id=f"{root}/ranks/step-{step}", use_collectives=False)
    line = init_device_mesh("cpu", (world,))
    for i in range(2):  # one large tensor, each rank making only its own quarter
        local = torch.full((BIG_ROWS // world, 1024), float(rank + i), dtype=torch.float32)
        big = DTensor.from_local(local, line, [Shard(0)], run_check=False)
        dcp.save({"model": {"big": big}}, checkpoint_id=f"{root}/big/step-{i}")
    model = _model()
    fully_shard(model, mesh=line)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for step in (1, 2, 3):
        model(torch.randn(8, 5, generator=g)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        weights, optim = get_state_dict(model, optimizer)
        dcp.save({"model": weights, "optim": optim, "step": step}, checkpoint_id=f"{root}/fsdp/step-{step}")
    dist.destroy_process_group()


def _load_worker(rank: int, world: int, root: str, checkpoint: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{root}/pg-load", rank=rank, world_size=world)
    model = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    full = {k: v.full_tensor() for k, v in state["model"].items()}
    if rank == 0:
        torch.save(full, f"{root}/loaded.pt")
    dist.destroy_process_group()


def _start(worker: Any, ranks: int, *args: str) -> None:
    """Start gloo ranks from a fork server that has imported torch once.

    Forking pytest itself can deadlock (a lock held by another thread at the fork); spawning
    imports torch once per rank, seconds each on a small machine.
    """
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed.checkpoint", __name__])
    mp.start_processes(worker, args=(ranks, *args), nprocs=ranks, start_method="forkserver")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dcp_dist")
    _start(_save_worker, 4, str(root))
    return root


def _oracle(directories: list[Path]) -> dict[str, torch.Tensor]:
    """The float64 mean of what DCP's own converter reads (trusted files, full pickle: test only)."""
    loaded: list[dict[str, Any]] = []
    for directory in directories:
        target = directory.parent / f"{directory.name}.oracle.pt"
        dcp_to_torch_save(directory, target)
        loaded.append(torch.load(target, weights_only=False)["model"])
        target.unlink()
    return {name: oracle_mean([s[name] for s in loaded]) for name, v in loaded[-1].items() if v.is_floating_point()}


@pytest.mark.parametrize("layout", ["two", "grid"])
def test_sharded_dtensors_average_exactly(saved: Path, layout: str, tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    run_cli(saved / layout, "-o", out)
    got = load_file(out)
    expected = _oracle([saved / layout / f"step-{s}" for s in STEPS])
    assert set(got) == set(expected) == {"a", "b", "c"}
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    chunks = pickle.loads((saved / layout / "step-10" / ".metadata").read_bytes()).state_dict_metadata
    assert len(chunks["model.a"].chunks) == (2 if layout == "two" else 4)


def test_per_rank_metadata_without_a_global_one(saved: Path, tmp_path: Path) -> None:
    directory = saved / "ranks" / "step-10"
    assert not (directory / ".metadata").exists() and (directory / "__3.metadata").exists()
    out = tmp_path / "avg.safetensors"
    run_cli(saved / "ranks", "-o", out)
    got = load_file(out)
    for name, tensor in _oracle([saved / "grid" / f"step-{s}" for s in STEPS]).items():
        assert torch.equal(got[name], tensor), name


def test_fsdp2_with_adamw_to_dcp_loads_into_fsdp2_on_two_ranks(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    run_cli(saved / "fsdp", "-o", f"{out}/")
    names = pickle.loads((out / ".metadata").read_bytes()).state_dict_metadata
    assert not any(n.startswith("optim") for n in names) and "step" in names
    expected = _oracle([saved / "fsdp" / f"step-{s}" for s in (1, 2, 3)])
    _start(_load_worker, 2, str(tmp_path), str(out))
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def _peak_rss_mb(*command: str) -> float:
    """Peak RSS of one command, measured in a fresh process whose only child it is."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True);"
        " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def test_peak_memory_of_a_sharded_large_tensor(saved: Path, tmp_path: Path) -> None:
    """SPEC 1.6: at most the import baseline + 4 x the largest tensor + 150 MB, whatever the chunks."""
    out = tmp_path / "avg.safetensors"
    baseline = _peak_rss_mb(sys.executable, "-c", "import torch, ckpt_avg.cli")
    peak = _peak_rss_mb(sys.executable, "-m", "ckpt_avg", str(saved / "big"), "-o", str(out), "-q")
    largest = BIG_ROWS * 1024 * 4 / 2**20
    assert peak <= baseline + 4 * largest + 150, (peak, baseline)
    got = load_file(out)["big"]
    quarter = BIG_ROWS // 4
    assert torch.equal(got[::quarter, 0], torch.tensor([0.5, 1.5, 2.5, 3.5]))
