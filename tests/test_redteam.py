"""Red-team findings, third pass (issue 16's classes): each input is built as the red team built it.

The promises checked, as a user meets them (the CLI in a fresh process where time, memory or
the hash seed matter): a file of a few KB takes under 30 s and 1.5 GB; shared objects stay
shared in a .pt output; outputs are byte-identical run to run; a refused input is one
`Error:` line naming it, exit 1; nothing of the user's is deleted or copied that should not be.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from conftest import run_cli
from safetensors.torch import save_file
from test_hostile_pickle2 import get, put, saved, zip_with

from ckpt_avg.write import TEMP_MARKER

MAX_SECONDS = 30
MAX_RSS = 1_500_000_000

_MEASURE = """
import resource, sys, time
from click.testing import CliRunner
from ckpt_avg.cli import main
from ckpt_avg.inspect_cli import inspect_command

args = sys.argv[1:]
command = inspect_command if args[:1] == ["inspect"] else main
start = time.monotonic()
result = CliRunner().invoke(command, args[1:] if command is inspect_command else args, catch_exceptions=False)
sys.stderr.write(result.stderr)
sys.stdout.write(result.stdout)
print()
print(result.exit_code, time.monotonic() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


class Measured:
    def __init__(self, done: subprocess.CompletedProcess[str]) -> None:
        *lines, summary = done.stdout.splitlines()
        code, seconds, rss = summary.split()
        self.stdout = "\n".join(lines)
        self.exit_code, self.seconds, self.rss = int(code), float(seconds), int(rss)
        self.stderr = done.stderr


def measured(*args: Any, cwd: Path | None = None, seed: str = "0") -> Measured:
    """`ckpt-avg ARGS` in a fresh process: its exit, its time and its peak RSS."""
    env = dict(os.environ, PYTHONHASHSEED=seed)
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *[str(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=3 * MAX_SECONDS,
        cwd=cwd,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = Measured(done)
    assert result.seconds < MAX_SECONDS and result.rss < MAX_RSS, (result.seconds, result.rss)
    return result


def one_error_line(result: Measured, names: str) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert names in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1. a graph of shared lists


def shared_list_graph(levels: int = 60, base: int = 1_000_000) -> bytes:
    """Each list holds the previous one twice: 1 KB of opcodes, 2**60 items walked as a tree."""
    ops = b"]" + b"K\x01a" + put(base) + b"0"  # [1]
    for level in range(1, levels):
        ops += b"](" + get(base + level - 1) * 2 + b"e" + put(base + level) + b"0"
    return ops + get(base + levels - 1)


def test_a_graph_of_shared_lists_stays_shared_in_a_pt_output(tmp_path: Path) -> None:
    (tmp_path / "epoch=0.pt").write_bytes(saved(legacy=False, seed=0, hyper={"lr": 0.1}))
    (tmp_path / "epoch=1.pt").write_bytes(zip_with(shared_list_graph()))
    outputs = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        out = tmp_path / run / "avg.pt"
        result = measured(tmp_path / "epoch=0.pt", tmp_path / "epoch=1.pt", "-o", out, "-q")
        assert result.exit_code == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] and len(outputs[0]) < 100_000
    node = torch.load(out, weights_only=True)["hyper_parameters"]
    for _ in range(59):
        assert isinstance(node, list) and len(node) == 2 and node[0] is node[1]
        node = node[0]
    assert node == [1]


# ---------------------------------------------------------------- 2. sets in hash order


def test_sets_are_written_in_a_fixed_order_whatever_the_hash_seed(tmp_path: Path) -> None:
    hyper = {
        "tags": {f"tag{k}" for k in range(20)},
        "mixed": frozenset({1, "x", (2, "y", frozenset({"p", "q"})), b"z", None, 2.5, -(10**40), False}),
    }
    (tmp_path / "epoch=0.pt").write_bytes(saved(legacy=False, seed=0, hyper={"lr": 0.1}))
    (tmp_path / "epoch=1.pt").write_bytes(saved(legacy=False, seed=1, hyper=hyper))
    outputs = set()
    for seed in ("1", "2", "3"):
        (tmp_path / seed).mkdir()
        out = tmp_path / seed / "avg.pt"
        assert measured(tmp_path / "epoch=0.pt", tmp_path / "epoch=1.pt", "-o", out, "-q", seed=seed).exit_code == 0
        outputs.add(out.read_bytes())
    assert len(outputs) == 1, "the output differs with PYTHONHASHSEED"
    with torch.serialization.safe_globals([frozenset]):  # what torch.save writes for one, too
        assert torch.load(out, weights_only=True)["hyper_parameters"] == hyper


# ---------------------------------------------------------------- 3. --bn-data views


_BN_MODEL = (
    "import torch\ndef make_model():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))\n"
)


def bn_project(tmp_path: Path) -> Path:
    (tmp_path / "bnm.py").write_text(_BN_MODEL)
    (tmp_path / "ck").mkdir()
    for epoch in range(2):
        torch.manual_seed(epoch)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        torch.save({"epoch": epoch, "state_dict": model.state_dict()}, tmp_path / "ck" / f"epoch={epoch}.ckpt")
    for power in (27, 40):
        torch.save(torch.randn(1, 4).expand(2**power, 4), tmp_path / f"data{power}.pt")
    return tmp_path


def test_bn_data_is_read_only_for_the_batches_used(tmp_path: Path) -> None:
    project = bn_project(tmp_path)
    bn = ("--bn-model", "bnm:make_model", "--bn-data")
    for data in ("data27.pt", "data40.pt"):
        result = measured("ck", "-o", "ex.pt", "--force", *bn, data, "--bn-batches", "3", cwd=project)
        assert result.exit_code == 0, result.stderr
    for data in ("data27.pt", "data40.pt"):  # every batch: 2 GB and more made from 16 bytes
        result = measured("ck", "-o", f"{data}.out.pt", *bn, data, cwd=project)
        one_error_line(result, f"--bn-data {data}: the input tensor is a view of 16 stored bytes")
        assert not (project / f"{data}.out.pt").exists()


# ---------------------------------------------------------------- 4. deep JSON, deep directories


def trainer_dir(directory: Path, seed: int, state: str) -> None:
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    save_file({"a.weight": torch.randn(4, 4, generator=generator)}, directory / "model.safetensors")
    (directory / "config.json").write_text('{"model_type": "x"}')
    (directory / "trainer_state.json").write_text(state)


def test_a_trainer_state_nested_200000_deep_is_an_error_naming_it(tmp_path: Path) -> None:
    deep = '{"global_step": 5, "log_history": ' + "[" * 200_000 + "]" * 200_000 + "}"
    for step in (100, 200):
        trainer_dir(tmp_path / f"checkpoint-{step}", step, deep if step == 200 else '{"global_step": 100}')
    bad = tmp_path / "checkpoint-200" / "trainer_state.json"
    one_error_line(measured("inspect", tmp_path), f"Error: {bad}: unreadable JSON: nested too deeply")


def test_recursive_search_stops_at_a_depth_with_a_note(tmp_path: Path) -> None:
    for epoch in range(2):
        torch.save({"epoch": epoch, "state_dict": {"w": torch.full((2,), float(epoch))}}, tmp_path / f"e{epoch}.pt")
    levels = [tmp_path / "deep"]
    for _ in range(1200):  # deeper than Python's recursion limit
        levels.append(levels[-1] / "d")
    for level in levels:
        level.mkdir()
    try:
        result = measured("--recursive", "--dry-run", tmp_path)
        assert result.exit_code == 0, result.stderr
        assert "more than 100 directory levels deep; not searched" in result.stdout
    finally:
        for level in reversed(levels):
            level.rmdir()


# ---------------------------------------------------------------- 5. stale temp names


def test_only_provably_stale_temps_are_removed(tmp_path: Path) -> None:
    """Names like a dead run's temps, planted beside OUTPUT: links to a victim, a user's directory."""
    victim = tmp_path / "victimdir"
    victim.mkdir()
    (victim / "precious.txt").write_text("precious")
    (tmp_path / "victimfile.txt").write_text("precious")
    for step in (100, 200):
        trainer_dir(tmp_path / "in" / f"checkpoint-{step}", step, f'{{"global_step": {step}}}')
    parent = tmp_path / "outparent"
    parent.mkdir()
    (parent / ".ckpt-avg-tmp-out-4000001-deadbeef").symlink_to(victim)
    (parent / ".ckpt-avg-tmp-out-4000002-deadbeef").symlink_to(tmp_path / "victimfile.txt")
    users = parent / ".ckpt-avg-tmp-out-4000003-deadbeef"
    users.mkdir()
    (users / "data.txt").write_text("mine")
    (parent / ".ckpt-avg-tmp-avg.pt-4000004-deadbeef").symlink_to(victim)
    ours = parent / ".ckpt-avg-tmp-out-4000005-cafebabe"  # what a killed run leaves: the marker first
    ours.mkdir()
    (ours / TEMP_MARKER).write_text("x")
    (ours / "model.safetensors").write_bytes(b"half")
    nested = parent / ".ckpt-avg-tmp-out-4000006-cafebabe"  # marked, but holds a directory: never recursed
    (nested / "sub").mkdir(parents=True)
    (nested / TEMP_MARKER).write_text("x")
    (nested / "sub" / "data.txt").write_text("mine")
    stale_file = parent / ".ckpt-avg-tmp-avg.pt-4000007-0123abcd"
    stale_file.write_bytes(b"half a file")
    for output in (f"{parent / 'out'}/", parent / "avg.pt", parent / "avg.safetensors"):
        run_cli(tmp_path / "in", "-o", output, "-q")
    assert (victim / "precious.txt").read_text() == "precious"
    assert (tmp_path / "victimfile.txt").read_text() == "precious"
    assert (users / "data.txt").read_text() == "mine" and (nested / "sub" / "data.txt").read_text() == "mine"
    assert not ours.exists() and not stale_file.exists()
    assert sorted(os.listdir(parent / "out")) == ["config.json", "model.safetensors"]  # no marker in OUTPUT
