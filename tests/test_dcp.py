"""torch.distributed.checkpoint directories saved by DCP itself, in one process: read, averaged, written."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import oracle_mean, run_cli
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ckpt_avg.dcp import flat_boxes
from ckpt_avg.dcp_write import archive_bytes

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
STEPS = (100, 200, 300)


def _state(i: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(i)
    return {
        "model": {
            "w": torch.randn(30, 7, generator=g),
            "t": torch.randn(5, 6, generator=g).t(),  # stored transposed
            "s": torch.randn((), generator=g, dtype=torch.float64),
            "h": torch.randn(9, generator=g).to(torch.bfloat16),
            "n": torch.tensor([3, 7]),
        },
        "optim": {"lr": 0.1, "state": {"w": {"exp_avg": torch.randn(30, 7, generator=g)}}},
        "step": 100 * (i + 1),
        "extra": {"note": f"run {i}"},
    }


def save_run(root: Path, **kwargs: Any) -> Path:
    for i, step in enumerate(STEPS):
        dcp.save(_state(i), checkpoint_id=root / f"step-{step}", no_dist=True, **kwargs)
    return root


def oracle(directories: list[Path], key: str = "model") -> dict[str, torch.Tensor]:
    """The float64 mean of what DCP's own converter reads (trusted files, full pickle: test only)."""
    loaded = []
    for directory in directories:
        target = directory.parent / f"{directory.name}.oracle.pt"
        dcp_to_torch_save(directory, target)
        state = torch.load(target, weights_only=False)
        target.unlink()
        loaded.append(state[key] if key else state)
    last = loaded[-1]
    floats = [n for n, v in last.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return {name: oracle_mean([s[name] for s in loaded]) for name in floats}


def saved_mean() -> dict[str, torch.Tensor]:
    """The float64 mean of the tensors as they were before saving."""
    states = [_state(i)["model"] for i in range(len(STEPS))]
    return {n: oracle_mean([s[n] for s in states]) for n, v in states[-1].items() if v.is_floating_point()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_run(tmp_path_factory.mktemp("dcp") / "run")


def test_dcp_run_to_safetensors_is_the_exact_mean(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    result = run_cli(run_dir, "-o", out)
    assert "step 100-300" in result.output
    got = load_file(out)
    expected = oracle([run_dir / f"step-{s}" for s in STEPS])
    assert set(expected) <= set(got)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert torch.equal(got["n"], torch.tensor([3, 7]))  # an integer tensor, equal in all


def test_dcp_output_loads_with_dcp_load(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    result = run_cli(run_dir, "-o", f"{out}/")
    assert "Note: left out of the output: optim (training state)" in result.output  # said, not silent
    assert (out / ".metadata").is_file() and (out / "ckpt_avg.json").is_file()
    expected = oracle([run_dir / f"step-{s}" for s in STEPS])
    model = {k: torch.zeros_like(v) for k, v in _state(0)["model"].items()}
    model["t"] = model["t"].contiguous()
    target = {"model": model, "step": 0, "extra": {"note": ""}}
    dcp.load(target, checkpoint_id=out, no_dist=True)
    for name, tensor in expected.items():
        assert torch.equal(model[name], tensor), name
    assert target["step"] == 300 and target["extra"] == {"note": "run 2"}  # the last checkpoint's
    metadata = pickle.loads((out / ".metadata").read_bytes())
    assert not any(k.startswith("optim") for k in metadata.state_dict_metadata)  # optimizer state dropped
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    run_cli(tmp_path / "run", "-o", f"{tmp_path / 'run' / 'avg'}/")  # the output inside the run
    result = run_cli(tmp_path / "run", "-o", f"{tmp_path / 'run' / 'avg'}/", "--force")  # run again
    assert "step 100-300" in result.output and "3 checkpoint(s)" in result.output  # not the earlier average


def test_dcp_output_items_are_torch_save_archives(tmp_path: Path) -> None:
    for zip64 in (False, True):
        tensor = torch.randn(4, 3).t()
        data = archive_bytes(tensor, start=17) if not zip64 else _forced_zip64(tensor)
        assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None  # every CRC right
        assert torch.equal(torch.load(io.BytesIO(data), weights_only=True), tensor)


def _forced_zip64(tensor: torch.Tensor) -> bytes:
    import zlib

    from ckpt_avg.dcp_write import TensorArchive

    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    archive = TensorArchive(tensor.dtype, tuple(tensor.shape), 0, force_zip64=True)
    crc = zlib.crc32(raw)
    return archive.head(crc) + raw + archive.tail(crc)


def test_flat_ranges_cover_every_element_once() -> None:
    shape = [3, 4, 5]
    for start, stop in [(0, 60), (7, 43), (19, 21), (20, 40), (0, 1), (59, 60), (13, 58)]:
        seen: list[int] = []
        for lo, hi in flat_boxes(shape, start, stop):
            grid = torch.arange(60).reshape(shape)
            seen.extend(grid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))].reshape(-1).tolist())
        assert seen == list(range(start, stop))


@pytest.mark.parametrize("variant", ["zstd", "safetensors"])
def test_dcp_variants_average_exactly(variant: str, tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    for i, step in enumerate(STEPS):
        if variant == "zstd":
            from torch.distributed.checkpoint._extension import ZStandard

            writer = FileSystemWriter(tmp_path / "run" / f"step-{step}", _extensions=[ZStandard()])
        else:
            from torch.distributed.checkpoint.filesystem import SerializationFormat

            writer = FileSystemWriter(
                tmp_path / "run" / f"step-{step}", serialization_format=SerializationFormat.SAFETENSORS
            )
        state = _state(i)
        if variant == "safetensors":  # tensors only in this serialisation
            state = {"model": {k: v.contiguous() for k, v in state["model"].items()}}
        dcp.save(state, storage_writer=writer, no_dist=True)
    out = tmp_path / "avg.safetensors"
    run_cli(tmp_path / "run", "-o", out)
    got = load_file(out)
    for name, tensor in saved_mean().items():
        assert torch.equal(got[name], tensor), name


def test_hf_distributed_shards_are_refused_by_name(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    for step in (1, 2):
        writer = HuggingFaceStorageWriter(str(tmp_path / f"step-{step}"), save_distributed=True)
        dcp.save({"w": torch.randn(4, 4)}, storage_writer=writer, no_dist=True)
    shard = next((tmp_path / "step-1").glob("*.safetensors"))
    result = run_cli(
        shard, next((tmp_path / "step-2").glob("*.safetensors")), "-o", tmp_path / "o.safetensors", expect=1
    )
    assert "Hugging Face distributed safetensors" in result.output and "DCP_SHARDING_INFO" in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_unfinished_save_is_a_clean_error(run_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "step-400"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes((run_dir / "step-300" / "__0_0.distcp").read_bytes())
    result = run_cli(broken, "-o", tmp_path / "o.safetensors", expect=1)
    assert "without .metadata" in result.output


def test_torchtitan_layout_top_level_weights(tmp_path: Path) -> None:
    """torchtitan keeps the weights at the top level beside optimizer, lr_scheduler, train_state."""
    for i, step in enumerate(STEPS):
        g = torch.Generator().manual_seed(i)
        state: dict[str, Any] = {
            "tok_embeddings.weight": torch.randn(16, 8, generator=g),
            "layers.0.attention.wq.weight": torch.randn(8, 8, generator=g),
            "optimizer": {"state": {"tok_embeddings.weight": {"exp_avg": torch.randn(16, 8, generator=g)}}},
            "lr_scheduler": {"lr_scheduler_0": {"last_epoch": step}},
            "train_state": {"step": step, "ntokens_seen": 1000 * step, "log_steps": io.BytesIO(b"log%d" % step)},
        }
        dcp.save(state, checkpoint_id=tmp_path / "checkpoint" / f"step-{step}", no_dist=True)
    out = tmp_path / "avg"
    run_cli(tmp_path / "checkpoint", "-o", f"{out}/")
    target: dict[str, Any] = {
        "tok_embeddings.weight": torch.zeros(16, 8),
        "layers.0.attention.wq.weight": torch.zeros(8, 8),
    }
    target["train_state"] = {"step": 0, "ntokens_seen": 0, "log_steps": io.BytesIO()}
    dcp.load(target, checkpoint_id=out, no_dist=True)
    expected = oracle([tmp_path / "checkpoint" / f"step-{s}" for s in STEPS], key="")
    for name in ("tok_embeddings.weight", "layers.0.attention.wq.weight"):
        assert torch.equal(target[name], expected[name])
    log = target["train_state"].pop("log_steps")
    assert target["train_state"] == {"step": 300, "ntokens_seen": 300000} and log.getvalue() == b"log300"
    metadata = pickle.loads((out / ".metadata").read_bytes())
    assert "tok_embeddings.weight" in metadata.state_dict_metadata
    assert not any(k.startswith(("optimizer", "lr_scheduler")) for k in metadata.state_dict_metadata)


def test_megatron_iter_directories(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    for step in STEPS:
        target = tmp_path / "ckpts" / f"iter_{step:07d}"
        shutil.copytree(run_dir / f"step-{step}", target)
        (target / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
        torch.save({"args": None, "iteration": step}, target / "common.pt")
        metadata = pickle.loads((target / ".metadata").read_bytes())
        metadata.mcore_data = {"model.w": {"nd_reformulated_orig_global_shape": (30, 7)}, "optim.x": {}}
        (target / ".metadata").write_bytes(pickle.dumps(metadata))
    result = run_cli(tmp_path / "ckpts", "-o", f"{tmp_path / 'avg'}/", "--last", "2")
    assert "step 200-300" in result.output
    assert (tmp_path / "avg" / "common.pt").read_bytes() == (
        tmp_path / "ckpts" / "iter_0000300" / "common.pt"
    ).read_bytes()
    assert (tmp_path / "avg" / "metadata.json").is_file()
    written = pickle.loads((tmp_path / "avg" / ".metadata").read_bytes())
    assert written.mcore_data == {"model.w": {"nd_reformulated_orig_global_shape": (30, 7)}}
    run_cli(tmp_path / "ckpts", "-o", f"{tmp_path / 'avg'}/", "--last", "3", "--force")  # its files count as ours
    provenance = json.loads((tmp_path / "avg" / "ckpt_avg.json").read_text())
    assert [r["step"] for r in provenance["inputs"]] == [100, 200, 300]
    last = tmp_path / "ckpts" / "iter_0000300"
    (tmp_path / "secret").write_text("API_KEY=hunter2")
    (last / "metadata.json").unlink()
    (last / "metadata.json").symlink_to(tmp_path / "secret")  # side files are copied only as regular files
    result = run_cli(tmp_path / "ckpts", "-o", f"{tmp_path / 'again'}/", "--json")
    assert "metadata.json: not copied into the output: it is a symbolic link" in result.output
    assert not (tmp_path / "again" / "metadata.json").exists() and (tmp_path / "again" / "common.pt").is_file()
    report = json.loads(result.stdout)
    assert any(f["path"].endswith("common.pt") and f["sha256"] for f in report["files"])  # copied and hashed


# ---------------------------------------------------------------- hostile files


def _hostile_metadata(directory: Path, payload: bytes) -> None:
    original = (directory / ".metadata").read_bytes()
    # A pickle that runs its payload first, then returns the real metadata: a loader that
    # calls what it finds would run it.
    body = original[2:] if original[:2] == b"\x80\x04" else original
    (directory / ".metadata").write_bytes(b"\x80\x04" + payload + b"0" + body)


def test_hostile_metadata_never_runs(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    marker = tmp_path / "ran"
    for name, payload in {
        "system": b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR",
        "unknown": b"cmy_project.config\nTrainConfig\n)R",
    }.items():
        directory = tmp_path / name / "step-1"
        shutil.copytree(run_dir / "step-100", directory)
        _hostile_metadata(directory, payload)
        pickletools.dis((directory / ".metadata").read_bytes(), out=io.StringIO())  # a valid pickle
        result = run_cli(directory, "-o", tmp_path / f"{name}.safetensors", expect=1)
        assert result.output.startswith("Error: ") and "refused" in result.output
        assert ("posix.system" if name == "system" else "my_project.config.TrainConfig") in result.output
        assert not marker.exists()


def test_output_inside_an_input_checkpoint_directory_is_refused(run_dir: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in (run_dir / "step-300").iterdir())
    for output in (f"{run_dir / 'step-300' / 'avg'}/", str(run_dir / "step-300" / "avg.safetensors")):
        result = run_cli(run_dir, "-o", output, expect=1)
        assert "OUTPUT is inside the input checkpoint" in result.output and "never modified" in result.output
    assert sorted(p.name for p in (run_dir / "step-300").iterdir()) == before
    run_cli(run_dir, "-o", f"{tmp_path / 'beside'}/")  # a directory of checkpoints is not one: beside them is fine


def test_one_chunk_listed_many_times_is_refused_before_any_work_per_chunk(run_dir: Path, tmp_path: Path) -> None:
    """The pickle memo repeats one chunk 300,000 times in 600 KB: refused at the count, not by
    building and comparing 300,000 chunks (a 10 MB file took 185 s and 4.1 GB that way)."""
    import shutil
    import time

    directory = tmp_path / "bomb" / "step-1"
    shutil.copytree(run_dir / "step-100", directory)
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    entry = metadata.state_dict_metadata["model.w"]
    entry.chunks = [entry.chunks[0]] * 300_000
    (directory / ".metadata").write_bytes(pickle.dumps(metadata, protocol=2))
    started = time.monotonic()
    result = run_cli(directory, "-o", tmp_path / "out.safetensors", expect=1)
    assert "'model.w': lists 300000 chunks, but 1 are stored" in result.output
    assert time.monotonic() - started < 30 and not (tmp_path / "out.safetensors").exists()


def test_hostile_object_item_is_a_placeholder(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    marker = tmp_path / "ran"
    for step in (100, 200):
        shutil.copytree(run_dir / f"step-{step}", tmp_path / "run" / f"step-{step}")
    directory = tmp_path / "run" / "step-200"
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == "extra.note")
    evil = io.BytesIO()
    payload = b"\x80\x02cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
    data = bytearray((directory / "__0_0.distcp").read_bytes())
    info.offset, info.length = len(data), len(evil.getvalue())
    data += evil.getvalue()
    (directory / "__0_0.distcp").write_bytes(bytes(data))
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    result = run_cli(tmp_path / "run", "-o", f"{tmp_path / 'avg'}/")
    assert "posix.system" in result.output
    assert not marker.exists()
    names = pickle.loads((tmp_path / "avg" / ".metadata").read_bytes()).state_dict_metadata
    assert "extra.note" not in names and "model.w" in names  # the object is left out, the weights kept


def test_truncated_distcp_is_a_clean_error(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    directory = tmp_path / "step-1"
    shutil.copytree(run_dir / "step-100", directory)
    path = directory / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:2000])
    result = run_cli(directory, "-o", tmp_path / "o.safetensors", expect=1)
    assert result.output.startswith("Error: ") and "truncated" in result.output


def test_dcp_to_hugging_face_shards_that_from_pretrained_reads(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    states = []
    for step in STEPS:
        torch.manual_seed(step)
        model = GPT2LMHeadModel(config)
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
        states.append(state)
        directory = tmp_path / "run" / f"step-{step}"
        dcp.save(state, checkpoint_id=directory, no_dist=True)
        config.save_pretrained(directory)  # beside the DCP files, as a user keeps it
    out = tmp_path / "hf"
    run_cli(tmp_path / "run", "-o", f"{out}/", "--format", "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = GPT2LMHeadModel.from_pretrained(out).state_dict()
    for name in states[-1]:
        if states[-1][name].is_floating_point():
            assert torch.equal(loaded[name], oracle_mean([s[name] for s in states])), name


def test_format_dcp_from_safetensors_inputs_and_usage_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    states = [{"w": torch.randn(4, 3), "b": torch.randn(3)} for _ in range(2)]
    for epoch, state in enumerate(states):
        save_file(state, tmp_path / f"epoch={epoch}.safetensors")
    out = tmp_path / "avg"
    run_cli(tmp_path, "-o", f"{out}/", "--format", "dcp", "--glob", "*.safetensors")
    target = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    dcp.load(target, checkpoint_id=out, no_dist=True)
    for name, tensor in target.items():
        assert torch.equal(tensor, oracle_mean([s[name] for s in states])), name
    result = run_cli(tmp_path, "-o", tmp_path / "x.safetensors", "--format", "dcp", expect=2)
    assert "--format dcp writes a directory" in result.output


# ---------------------------------------------------------------- verify, --json, --force, ranks


def _verify(*args: str, expect: int) -> Any:
    from click.testing import CliRunner

    from ckpt_avg.verify_cli import verify_command

    result = CliRunner().invoke(verify_command, list(args), catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def test_verify_a_dcp_output_and_find_a_tampered_tensor(run_dir: Path, tmp_path: Path) -> None:
    import hashlib

    out = tmp_path / "avg"
    report = json.loads(run_cli(run_dir, "-o", f"{out}/", "--json").stdout)
    files = {Path(f["path"]).name: f["sha256"] for f in report["files"]}
    assert set(files) == {"__0_0.distcp", ".metadata", "ckpt_avg.json"}
    for name, digest in files.items():  # taken while writing: the bytes on disk
        assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    provenance = json.loads((out / "ckpt_avg.json").read_text())
    assert provenance["format_version"] == 2 and provenance["digest"]["output"] == report["output_digest"]
    assert sorted(provenance["digest"]["tensors"]) == ["h", "n", "s", "t", "w"]
    result = _verify("--recompute", f"{out}/", expect=0)
    assert "avg/: tensor digest" in result.output and "step-300: tensor digest" in result.output
    assert "re-derived" in result.output

    data = bytearray((out / "__0_0.distcp").read_bytes())
    start = bytes(data).find(saved_mean()["w"].numpy().tobytes())  # w's averaged bytes in its archive
    assert start > 0
    data[start + 100] ^= 0x40  # one bit of w, its zip records untouched
    (out / "__0_0.distcp").write_bytes(bytes(data))
    result = _verify(f"{out}/", expect=1)
    assert "tensor 'w' differs from the recorded digest" in result.output
    assert "tensor 't'" not in result.output


def test_force_replaces_only_a_dcp_output_holding_nothing_else(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    run_cli(run_dir, "-o", f"{out}/", "--max-shard-size", "1KB")
    assert len(list(out.glob("__*_0.distcp"))) > 1
    run_cli(run_dir, "-o", f"{out}/", "--force")  # numbered data files, .metadata, ckpt_avg.json: ours
    (out / "notes.txt").write_text("mine")
    result = run_cli(run_dir, "-o", f"{out}/", "--force", expect=1)
    assert "holds 'notes.txt', which ckpt-avg did not write" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    plain = tmp_path / "plain"
    import shutil

    shutil.copytree(run_dir / "step-100", plain)  # a DCP directory ckpt-avg did not write
    result = run_cli(run_dir, "-o", f"{plain}/", "--force", expect=1)
    assert "ckpt-avg did not write" in result.output and (plain / ".metadata").is_file()


def _on_simulated_ranks(inputs: list[str], output: str, options: Any, world: int) -> list[str]:
    """What torchrun's ranks do, in one process and in turn: each plans on its own, writes its
    share of the files into the staging directory, then rank 0 publishes. Returns each rank's files."""
    from ckpt_avg.distributed import Ranks, prepare, publish, write_share
    from ckpt_avg.write import make_staging, staging_path_for, write_owner

    prepared = [prepare(inputs, output, options, Ranks(None, rank, world, 1)) for rank in range(world)]
    assert len({p.plan.fingerprint() for p in prepared}) == 1
    staging = staging_path_for(output, "simulated")
    make_staging(staging, output)
    write_owner(staging, "simulated", "nonce")
    shares, files = [], []
    for rank in range(world):
        before = set(os.listdir(staging))
        shares.append(write_share(prepared[rank], options, staging, rank, world))
        files.append(sorted(set(os.listdir(staging)) - before))
    publish(prepared[0], options, staging, shares)
    return files


@pytest.mark.parametrize("world", [2, 3, 5])
def test_dcp_output_written_by_several_ranks_is_byte_identical_to_one_process(
    run_dir: Path, tmp_path: Path, world: int
) -> None:
    from ckpt_avg.api import Options, average_checkpoints

    options = Options(max_shard_size="2KB", hash_files=True)
    one = average_checkpoints([str(run_dir)], f"{tmp_path / 'one'}/", options)
    data_files = sorted(n for n in os.listdir(tmp_path / "one") if n.endswith(".distcp"))
    assert len(data_files) >= 3  # the split comes from --max-shard-size, not from the ranks
    shares = _on_simulated_ranks([str(run_dir)], f"{tmp_path / 'many'}/", options, world)
    assert sorted(n for share in shares for n in share) == data_files  # each data file written once
    assert sum(1 for share in shares if share) == min(world, len(data_files))
    assert sorted(os.listdir(tmp_path / "many")) == sorted(os.listdir(tmp_path / "one"))
    for name in os.listdir(tmp_path / "one"):
        assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".ckpt-avg-tmp")]
    loaded = {"model": {n: torch.zeros_like(v) for n, v in _state(0)["model"].items()}}
    dcp.load(loaded, checkpoint_id=tmp_path / "many", no_dist=True)
    for name, expected in saved_mean().items():
        assert torch.equal(loaded["model"][name], expected.to(loaded["model"][name].dtype)), name
    assert one.output_digest == json.loads((tmp_path / "many" / "ckpt_avg.json").read_text())["digest"]["output"]


def test_dcp_output_in_one_file_under_several_ranks_asks_for_a_shard_size(run_dir: Path, tmp_path: Path) -> None:
    from ckpt_avg.api import Options
    from ckpt_avg.distributed import Ranks, prepare
    from ckpt_avg.errors import UsageError

    with pytest.raises(UsageError, match=r"the output is one file .* give --max-shard-size .*e\.g\. --max-shard-size"):
        prepare([str(run_dir)], f"{tmp_path / 'avg'}/", Options(), Ranks(None, 0, 2, 1))
    assert not (tmp_path / "avg").exists()


def test_inspect_drift_of_a_dcp_run_in_chunks_equals_the_oracle(run_dir: Path) -> None:
    from ckpt_avg.inspect import inspect_checkpoints

    states = [_state(i)["model"] for i in range(len(STEPS))]
    vectors = [
        torch.cat([s[k].to(torch.float64).reshape(-1) for k in sorted(s) if s[k].is_floating_point()]) for s in states
    ]
    rows = inspect_checkpoints([str(run_dir)], chunk_elements=7).inspected  # "t" is stored transposed: spilled
    assert [r.index for r in rows] == list(STEPS)
    for t, row in enumerate(rows):
        last = float((vectors[t] - vectors[-1]).norm() / vectors[-1].norm())
        assert row.drift_last == pytest.approx(last, rel=1e-12, abs=1e-15)
        if t:
            prev = float((vectors[t] - vectors[t - 1]).norm() / vectors[t - 1].norm())
            assert row.drift_prev == pytest.approx(prev, rel=1e-12)


def test_reading_items_leaves_no_garbage_for_the_collector(run_dir: Path) -> None:
    """The engine runs with the collector off; a reference cycle left by each DCP item read
    piled up with the number of checkpoints (8 checkpoints of 3,000 small tensors: 1 GB)."""
    import gc

    from ckpt_avg.api import Options
    from ckpt_avg.run import _Run

    run = _Run([str(run_dir)], Options())
    run.open_selected()
    tensors = [t for opened in run.selected_opened for t in opened.dcp.tensors.values()]
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for tensor in tensors:
            for chunk in tensor.chunks:
                chunk.tensor(tensor.dtype)
                chunk.forget()
        assert gc.collect() == 0, sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert len(tensors) >= 12
