"""Hugging Face Trainer checkpoint directories in, `from_pretrained`-loadable directories out."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from conftest import oracle_mean, run_cli
from safetensors.torch import load_file

STEPS = (900, 1000, 1100)


def _tiny_config() -> object:
    return transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict a Trainer checkpoint directory holds, whatever its weight format."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    return torch.load(directory / "pytorch_model.bin", weights_only=True)


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three Trainer-style checkpoints: sharded safetensors, single safetensors, pytorch_model.bin."""
    run = tmp_path_factory.mktemp("hf") / "output"
    formats = ({"max_shard_size": "20KB"}, {}, {"safe_serialization": False})
    for seed, (step, save_kwargs) in enumerate(zip(STEPS, formats, strict=True)):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(_tiny_config())
        directory = run / f"checkpoint-{step}"
        model.save_pretrained(directory, **save_kwargs)
        torch.save({"state": {}, "param_groups": []}, directory / "optimizer.pt")
        torch.save({"last_epoch": step}, directory / "scheduler.pt")
        torch.save({"python": 1}, directory / "rng_state.pth")
        torch.save({"lr": 1e-3}, directory / "training_args.bin")
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 333}))
        (directory / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    return run


def test_trainer_directories_average_to_a_loadable_model(trainer_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    result = run_cli(trainer_run, "-o", f"{out}/")
    assert "3 checkpoint(s) (step 900-1100)" in result.stderr
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "vocab.json"]
    inputs = [_weights(trainer_run / f"checkpoint-{step}") for step in STEPS]
    averaged = load_file(out / "model.safetensors")
    assert set(averaged) == set(inputs[-1])  # the tied lm_head stays out, as in the inputs
    for key, value in averaged.items():
        assert torch.equal(value, oracle_mean([sd[key] for sd in inputs])), key
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, averaged["transformer.wte.weight"])
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, averaged["transformer.h.1.mlp.c_fc.weight"])


@pytest.mark.parametrize("shard", [[], ["--max-shard-size", "30KB"]])
def test_json_files_list_every_file_written_with_its_sha256(
    trainer_run: Path, tmp_path: Path, shard: list[str]
) -> None:
    # SPEC 1.9: the sha256 of each file written, the copied config files among them.
    out = tmp_path / "avg"
    report = json.loads(run_cli(trainer_run, "-o", f"{out}/", "--json", *shard).stdout)
    listed = {os.path.basename(f["path"]): f["sha256"] for f in report["files"]}
    assert sorted(listed) == sorted(os.listdir(out))
    assert {"config.json", "generation_config.json", "vocab.json"} <= set(listed)
    for name, digest in listed.items():
        assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest(), name


def test_sharded_output_writes_an_index_that_from_pretrained_reads(trainer_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    run_cli(trainer_run, "-o", f"{out}/", "--max-shard-size", "30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = sum(t.numel() * t.element_size() for s in shards for t in load_file(out / s).values())
    assert index["metadata"]["total_size"] == total
    for shard in shards:
        assert (out / shard).stat().st_size <= 30_000 + 4096 or len(load_file(out / shard)) == 1
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    expected = oracle_mean([_weights(trainer_run / f"checkpoint-{s}")["transformer.wpe.weight"] for s in STEPS])
    assert torch.equal(model.transformer.wpe.weight, expected)


def test_trainer_side_files_never_copied(trainer_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    run_cli(trainer_run, "-o", f"{out}/")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        assert not (out / name).exists(), name


def test_trainer_directories_are_ordered_by_step_numerically(trainer_run: Path) -> None:
    result = run_cli("--dry-run", "--last", "2", trainer_run)
    lines = result.stdout.splitlines()
    order = [line for line in lines if "checkpoint-" in line]
    assert order[0].lstrip().startswith("-") and "checkpoint-900" in order[0]
    assert "checkpoint-1000" in order[1] and "checkpoint-1100" in order[2]
    assert "ordered by step" in result.stdout


def test_single_trainer_directory_given_directly_is_one_checkpoint(trainer_run: Path) -> None:
    result = run_cli("--dry-run", trainer_run / "checkpoint-1000", "--json")
    plan = json.loads(result.stdout)
    assert [c["path"] for c in plan["inputs"]] == [str(trainer_run / "checkpoint-1000")]
    assert plan["inputs"][0]["step"] == 1000


def test_max_shard_size_needs_a_directory_output(trainer_run: Path, tmp_path: Path) -> None:
    result = run_cli(trainer_run, "-o", tmp_path / "x.safetensors", "--max-shard-size", "5GB", expect=2)
    assert "--max-shard-size needs a directory OUTPUT" in result.output
