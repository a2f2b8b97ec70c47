"""Splitting a run over torchrun ranks, in-process: the plan, the assignment, staging, errors.

Real multi-process runs are in test_distributed_torchrun.py; here the planner runs on
real (sparse) files of a 70B-shaped model, reading headers only, with simulated world sizes.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt_avg.api import Options
from ckpt_avg.distributed import Ranks, assign_files, prepare
from ckpt_avg.errors import UsageError
from ckpt_avg.safetensors_file import layout
from ckpt_avg.write import (
    OWNER_FILE,
    STALE_AFTER_SECONDS,
    TEMP_MARKER,
    process_namespace,
    remove_stale_staging,
    staging_path_for,
)

Entries = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def llama_entries(layers: int, hidden: int, inter: int, kv: int, vocab: int) -> Entries:
    """A Llama-shaped state dict in bfloat16 (70B: 80, 8192, 28672, 1024, 128256)."""
    bf16 = torch.bfloat16
    entries: Entries = {
        "model.embed_tokens.weight": (bf16, (vocab, hidden)),
        "lm_head.weight": (bf16, (vocab, hidden)),
        "model.norm.weight": (bf16, (hidden,)),
    }
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    for i in range(layers):
        for name, shape in per_layer.items():
            entries[f"model.layers.{i}.{name}"] = (bf16, shape)
    return entries


def sparse_safetensors(path: Path, entries: Entries) -> None:
    """A valid safetensors file of the full size whose data is a hole: metadata costs nothing."""
    header, placed = layout(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + (placed[-1].end if placed else 0))


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    directory = tmp_path_factory.mktemp("llama70b")
    entries = llama_entries(80, 8192, 28672, 1024, 128256)
    paths = []
    for step in (100, 200):
        path = directory / f"step={step}.safetensors"
        sparse_safetensors(path, entries)
        paths.append(str(path))
    return paths


def _ranks(world: int) -> Ranks:
    return Ranks(None, 0, world, 1)


@pytest.mark.parametrize("out_format", ["hf", "dcp"])
def test_every_file_written_once_and_balanced_for_1_to_64_ranks(
    llama70b: list[str], tmp_path: Path, out_format: str
) -> None:
    """Balance needs files enough per rank: 500 MB shards give 322 files (1 GB ones reach
    1.25 at 54 ranks, where the 2.1 GB embedding and 1 GB shards cannot be evened out)."""
    options = Options(max_shard_size="500MB", format=out_format)
    plan = prepare(llama70b, str(tmp_path / "avg") + "/", options, _ranks(64)).plan
    sizes = [f.nbytes for f in plan.files]
    assert sum(sizes) > 141e9  # the whole model, headers included
    assert len(sizes) == 322 if out_format == "hf" else len(sizes) > 300  # DCP fills files in order
    written = sorted(name for f in plan.files for name in f.tensors)
    assert written == sorted(plan.entries) and len(written) == 80 * 9 + 3  # every tensor in exactly one file
    for world in range(1, 65):
        shares = assign_files(sizes, world)
        assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
        loads = [sum(sizes[i] for i in share) for share in shares]
        assert max(loads) / (sum(loads) / world) <= 1.15, world


def test_assignment_is_largest_first_ties_by_index() -> None:
    assert assign_files([5, 1, 4, 4], 2) == [[0, 1], [2, 3]]
    assert assign_files([3, 3, 3], 2) == [[0, 2], [1]]
    assert assign_files([7], 3) == [[0], [], []]


def test_plan_is_a_pure_function_of_inputs_and_options(llama70b: list[str], tmp_path: Path) -> None:
    """Another process computes the same fingerprint; another option, another fingerprint."""
    output = str(tmp_path / "avg") + "/"
    here = prepare(llama70b, output, Options(max_shard_size="5GB"), _ranks(2)).plan.fingerprint()
    script = (
        "import sys; from ckpt_avg.api import Options; from ckpt_avg.distributed import Ranks, prepare;"
        "print(prepare(sys.argv[1:3], sys.argv[3], Options(max_shard_size='5GB'), Ranks(None, 0, 2, 1))"
        ".plan.fingerprint())"
    )
    there = subprocess.run(
        [sys.executable, "-c", script, *llama70b, output], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert there == here
    other = prepare(llama70b, output, Options(max_shard_size="4GB"), _ranks(2)).plan.fingerprint()
    weighted = prepare(llama70b, output, Options(max_shard_size="5GB", weights=(1, 2)), _ranks(2))
    assert len({here, other, weighted.plan.fingerprint()}) == 3


def test_single_file_output_under_several_ranks_is_a_usage_error(llama70b: list[str], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"single file.*-o DIR/ --max-shard-size"):
        prepare(llama70b, str(tmp_path / "avg.safetensors"), Options(), _ranks(2))
    with pytest.raises(UsageError, match=r"one file .* give --max-shard-size"):
        prepare(llama70b, str(tmp_path / "avg") + "/", Options(), _ranks(2))


@pytest.mark.parametrize("world", [2, 3, 8])
def test_one_file_under_several_ranks_suggests_a_size_that_gives_each_rank_a_file(tmp_path: Path, world: int) -> None:
    # A user trial: a 125 KB model with --max-shard-size 1MB was told to try 5GB.
    entries: Entries = {f"layer.{i}.weight": (torch.float32, (64, 64)) for i in range(8)}  # 8 x 16 KB
    inputs = []
    for k in range(2):
        sparse_safetensors(tmp_path / f"step_{k}.safetensors", entries)
        inputs.append(str(tmp_path / f"step_{k}.safetensors"))
    output = str(tmp_path / "avg") + "/"
    with pytest.raises(UsageError) as refused:
        prepare(inputs, output, Options(max_shard_size="1MB"), _ranks(world))
    size = re.findall(r"e\.g\. --max-shard-size (\w+)\)", str(refused.value))[0]
    assert size == {2: "65KB", 3: "43KB", 8: "16KB"}[world]
    assert len(prepare(inputs, output, Options(max_shard_size=size), _ranks(world)).plan.files) >= world


def test_bn_recompute_under_several_ranks_is_a_usage_error(llama70b: list[str], tmp_path: Path) -> None:
    options = Options(max_shard_size="5GB", bn_model="m:f", bn_data="d.pt")
    with pytest.raises(UsageError, match="--bn-model is not supported under torchrun"):
        prepare(llama70b, str(tmp_path / "avg") + "/", options, _ranks(2))


def _staging(
    tmp_path: Path, run_id: str, owner: dict[str, object] | None, age: float = 0.0, marker: object = "owner"
) -> Path:
    """A staging directory as rank 0 leaves it: the marker (naming its creator, here `owner`),
    a partial shard, and the owner file unless `owner` is None (before it is written, or once
    rank 0 removed it to publish)."""
    path = Path(staging_path_for(str(tmp_path / "avg") + "/", run_id))
    path.mkdir()
    if marker is not None:
        record = (owner or {}) if marker == "owner" else marker
        (path / TEMP_MARKER).write_text(json.dumps(record))
    (path / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    if owner is not None:
        (path / OWNER_FILE).write_text(json.dumps(owner))
    if age:
        old = time.time() - age
        os.utime(path / OWNER_FILE if owner is not None else path, (old, old))
    return path


def test_stale_staging_is_removed_only_when_no_live_run_owns_it(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here, space = socket.gethostname(), process_namespace()
    dead_pid = int(dead.stdout)
    dead_here = _staging(tmp_path, "a1", {"host": here, "pid": dead_pid, "namespace": space})
    alive_here = _staging(tmp_path, "b2", {"host": here, "pid": os.getpid(), "namespace": space})
    # the same host name and pid, in another container's PID namespace: maybe alive there
    other_container = _staging(tmp_path, "b3", {"host": here, "pid": dead_pid, "namespace": "another-container"})
    elsewhere_fresh = _staging(tmp_path, "c3", {"host": "node-that-is-not-this-one", "pid": 1, "namespace": "x"})
    silent = {"host": "another-node", "pid": 1, "namespace": "y"}
    elsewhere_silent = _staging(tmp_path, "d4", silent, age=STALE_AFTER_SECONDS + 60)
    live_creator = {"host": here, "pid": os.getpid(), "namespace": space}
    being_created = _staging(tmp_path, "e5", None, marker=live_creator)  # before its owner file
    dead_creator = {"host": here, "pid": dead_pid, "namespace": space}
    killed_while_publishing = _staging(tmp_path, "e6", None, marker=dead_creator)  # owner file already removed
    abandoned = _staging(tmp_path, "f6", None, age=STALE_AFTER_SECONDS + 60, marker={"what": "an older marker"})
    unmarked = _staging(tmp_path, "f7", {"host": here, "pid": dead_pid, "namespace": space}, marker=None)
    nested = _staging(tmp_path, "f8", {"host": here, "pid": dead_pid, "namespace": space})
    (nested / "sub").mkdir()
    (nested / "sub" / "user_data.txt").write_text("not ours")
    other_output = Path(staging_path_for(str(tmp_path / "other") + "/", "a1"))
    other_output.mkdir()
    removed = remove_stale_staging(str(tmp_path / "avg") + "/")
    assert sorted(removed) == sorted(str(p) for p in (dead_here, elsewhere_silent, killed_while_publishing, abandoned))
    for kept in (alive_here, other_container, elsewhere_fresh, being_created, unmarked, other_output):
        assert kept.is_dir()
    assert (nested / "sub" / "user_data.txt").read_text() == "not ours"  # never removed recursively
    assert (nested / OWNER_FILE).is_file() and (nested / TEMP_MARKER).is_file()  # nor in part


def test_staging_is_hidden_beside_the_output(tmp_path: Path) -> None:
    path = staging_path_for(str(tmp_path / "avg") + "/", "0123abcd")
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path) == ".ckpt-avg-tmp-avg.partial-0123abcd"
    assert math.isfinite(STALE_AFTER_SECONDS)
