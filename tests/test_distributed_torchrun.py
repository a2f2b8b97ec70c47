"""Real `torchrun --standalone` runs over gloo (each launch costs ~10 s on two cores, so three).

The output of 2 and 3 processes is byte for byte that of one; a rank that raises or is killed
publishes nothing; a stale staging directory is removed by the next run; one rank asked
something else stops every rank with one clear error.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ckpt_avg import average_checkpoints
from ckpt_avg.distributed import FAULT_ENV

SHARD = "40000"  # about eight files for the model below
DCP_SHARD = "30000"  # the same as tests/torchrun_scenarios.py's: about five .distcp files
Outcomes = dict[int, dict[str, dict[str, object]]]
HERE = Path(__file__).parent


def make_checkpoints(directory: Path) -> list[str]:
    """Lightning-style .ckpt files: tied embedding and head, fp32, bf16, fp16 and a counter."""
    directory.mkdir()
    paths = []
    for step in (10, 20, 30):
        embedding = torch.randn(300, 64).to(torch.bfloat16)
        state = {"embed.weight": embedding, "lm_head.weight": embedding, "norm.weight": torch.randn(64).half()}
        for i in range(6):
            state[f"layers.{i}.w"] = torch.randn(128, 64)
            state[f"layers.{i}.b"] = torch.randn(64).to(torch.bfloat16)
        state["layers.0.num_batches_tracked"] = torch.tensor(step)
        path = directory / f"step={step}.ckpt"
        torch.save({"state_dict": state, "global_step": step}, path)
        paths.append(str(path))
    return paths


def make_dcp_run(directory: Path) -> list[str]:
    """A DCP run as `dcp.save` writes it: a model (fp32, bf16, a counter), optimizer state, a step."""
    import torch.distributed.checkpoint as dcp

    paths = []
    for step in (10, 20, 30):
        g = torch.Generator().manual_seed(step)
        model = {f"layers.{i}.w": torch.randn(96, 64, generator=g) for i in range(5)}
        model["embed.weight"] = torch.randn(200, 64, generator=g).to(torch.bfloat16)
        model["norm.num_batches_tracked"] = torch.tensor(step)
        optim = {"state": {"layers.0.w": {"exp_avg": torch.randn(96, 64, generator=g)}}, "param_groups": [{"lr": 0.1}]}
        path = directory / f"step-{step}"
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save({"model": model, "optim": optim, "step": step}, checkpoint_id=path, no_dist=True)
        paths.append(str(path))
    return paths


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, check=False
    )


def same_tree(a: Path, b: Path) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def staging_dirs(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".partial-" in n)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("torchrun")
    inputs = make_checkpoints(directory / "ckpts")
    average_checkpoints(inputs, f"{directory}/one/", max_shard_size=SHARD)  # the single-process reference
    make_dcp_run(directory / "dcp")
    average_checkpoints([str(directory / "dcp")], f"{directory}/dcp-one/", max_shard_size=DCP_SHARD)
    assert len([n for n in os.listdir(directory / "dcp-one") if n.endswith(".distcp")]) > 3
    shutil.copytree(directory / "ckpts", directory / "elsewhere" / "ckpts")  # another "node's" file system
    assert len(os.listdir(directory / "one")) > 4
    return directory


@pytest.fixture(scope="module")
def scenarios(workdir: Path) -> Outcomes:
    """One torchrun launch of 3 processes running tests/torchrun_scenarios.py."""
    done = torchrun(3, str(HERE / "torchrun_scenarios.py"), str(workdir))
    assert done.returncode != 0, "the last scenario kills rank 0"
    return {rank: json.loads((workdir / f"rank{rank}.json").read_text()) for rank in range(3)}


def test_two_ranks_write_the_same_bytes_as_one(workdir: Path, scenarios: Outcomes) -> None:
    assert scenarios[0]["two_ranks"]["ok"] and scenarios[1]["two_ranks"]["ok"]
    same_tree(workdir / "one", workdir / "two")


@pytest.mark.parametrize("world", ["two", "three"])
def test_ranks_write_the_same_dcp_checkpoint_as_one(workdir: Path, scenarios: Outcomes, world: str) -> None:
    ranks = 2 if world == "two" else 3
    assert all(scenarios[rank][f"dcp_{world}"]["ok"] for rank in range(ranks))
    same_tree(workdir / "dcp-one", workdir / f"dcp-{world}")


def test_a_rank_that_raises_fails_every_rank_and_publishes_nothing(workdir: Path, scenarios: Outcomes) -> None:
    outcomes = [scenarios[rank]["raises"] for rank in range(3)]
    assert [o["ok"] for o in outcomes] == [False, False, False]
    assert [o["exit_code"] for o in outcomes] == [1, 1, 1]
    assert [o["reported_elsewhere"] for o in outcomes] == [False, True, True]  # rank 0 prints it, once
    assert outcomes[0]["message"] == f"rank 1: injected test failure ({FAULT_ENV}=1)"
    assert not (workdir / "raises").exists()
    assert not [n for n in os.listdir(workdir) if n.startswith(".ckpt-avg-tmp-raises")]


def test_one_rank_with_other_arguments_stops_every_rank(workdir: Path, scenarios: Outcomes) -> None:
    outcomes = [scenarios[rank]["disagree"] for rank in range(3)]
    assert [o["ok"] for o in outcomes] == [False, False, False]
    assert outcomes[0]["message"].startswith("rank 2 planned a different output than rank 0")  # type: ignore[union-attr]
    assert [o["reported_elsewhere"] for o in outcomes] == [False, True, True]
    assert not (workdir / "disagree").exists()


def test_a_rank_that_does_not_share_the_file_system_stops_every_rank(workdir: Path, scenarios: Outcomes) -> None:
    outcomes = [scenarios[rank]["unshared"] for rank in range(3)]
    assert [o["ok"] for o in outcomes] == [False, False, False]
    message = str(outcomes[0]["message"])
    assert message.startswith("rank 1: ") and "does not see the staging directory rank 0 made" in message
    assert "must be on a file system every rank shares" in message
    for place in (workdir, workdir / "elsewhere"):
        assert not (place / "unshared").exists()
        assert not [n for n in os.listdir(place) if n.startswith(".ckpt-avg-tmp-unshared")]


def test_killed_rank_publishes_nothing_and_the_next_run_cleans_up(workdir: Path, scenarios: Outcomes) -> None:
    assert "killed" not in scenarios[0]  # rank 0 died before it could say anything
    assert not (workdir / "killed").exists()
    left = staging_dirs(workdir)
    assert len(left) == 1 and left[0].startswith(".ckpt-avg-tmp-killed.partial-")  # its owner is dead
    inputs = sorted(str(p) for p in (workdir / "ckpts").iterdir())
    done = torchrun(3, "-m", "ckpt_avg", *inputs, "-o", f"{workdir}/killed/", "--max-shard-size", SHARD)
    assert done.returncode == 0, done.stderr
    same_tree(workdir / "one", workdir / "killed")
    assert staging_dirs(workdir) == []
    summaries = [line for line in done.stderr.splitlines() if line.startswith("Averaged")]
    assert len(summaries) == 1, done.stderr  # rank 0 speaks for every rank


def test_cli_rank_that_raises_exits_1_everywhere_with_one_error(workdir: Path) -> None:
    output = f"{workdir}/cli-fail/"  # a DCP checkpoint, from the DCP run
    args = ("-m", "ckpt_avg", str(workdir / "dcp"), "-o", output, "--max-shard-size", DCP_SHARD)
    done = torchrun(2, *args, env={FAULT_ENV: "1"})
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: rank 1: injected test failure ({FAULT_ENV}=1)"]
    assert done.stderr.count("exitcode  : 1") == 2, done.stderr  # torchrun's summary: both ranks exit 1
    assert not os.path.exists(output) and staging_dirs(workdir) == []


def test_cli_usage_error_on_every_rank_is_said_once_in_flags(workdir: Path) -> None:
    inputs = sorted(str(p) for p in (workdir / "ckpts").iterdir())
    output = f"{workdir}/cli-usage/"
    done = torchrun(2, "-m", "ckpt_avg", *inputs, "-o", output, "--max-shard-size", SHARD, "--weights", "1,2")
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: --weights has 2 values but 3 checkpoints are selected"], done.stderr  # no API keywords
    assert done.stderr.count("exitcode  : 2") == 2, done.stderr  # both ranks exit 2, as one process would
    assert not os.path.exists(output) and staging_dirs(workdir) == []


def test_verify_and_inspect_under_torchrun_run_on_rank_0_only(workdir: Path) -> None:
    """They do not split: another rank leaves at once, so the report is printed once."""
    rank1 = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    for command in (["verify", str(workdir / "one")], ["inspect", str(workdir / "ckpts")]):
        done = subprocess.run(
            [sys.executable, "-m", "ckpt_avg", *command], capture_output=True, text=True, env=rank1, check=False
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
        alone = subprocess.run(
            [sys.executable, "-m", "ckpt_avg", *command], capture_output=True, text=True, check=False
        )
        assert alone.returncode == 0 and alone.stdout + alone.stderr  # rank 0, or no torchrun: the command
