"""Issue 3 layouts: tied weights, prefixes, EMA state dicts, best-K, mixed naming, refused layouts."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from conftest import leftovers, oracle_mean, run_cli
from safetensors.torch import load_file, save_file


def _state_dict(seed: int, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (prefix + name, torch.randn(shape, generator=generator))
        for name, shape in (("encoder.weight", (6, 4)), ("encoder.bias", (6,)), ("head.weight", (3, 6)))
    )


def _tied(seed: int) -> OrderedDict[str, torch.Tensor]:
    sd = _state_dict(seed)
    embedding = torch.randn(10, 4, generator=torch.Generator().manual_seed(100 + seed))
    sd["encoder.embed.weight"] = embedding
    sd["decoder.embed.weight"] = embedding  # one storage under two names
    return sd


def test_tied_weights_are_averaged_once_and_stay_tied_in_pt(tmp_path: Path) -> None:
    inputs = [_tied(seed) for seed in range(3)]
    for epoch, sd in enumerate(inputs):
        torch.save(sd, tmp_path / f"epoch_{epoch}.pt")
    out = tmp_path / "avg.pt"
    run_cli(tmp_path, "-o", out)
    averaged = torch.load(out, weights_only=True)
    expected = oracle_mean([sd["encoder.embed.weight"] for sd in inputs])
    assert torch.equal(averaged["encoder.embed.weight"], expected)
    assert averaged["encoder.embed.weight"].data_ptr() == averaged["decoder.embed.weight"].data_ptr()
    model_keys = list(inputs[-1])
    assert list(averaged) == model_keys  # the original key order is kept


def test_tied_weights_become_copies_in_flat_safetensors(tmp_path: Path) -> None:
    inputs = [_tied(seed) for seed in range(3)]
    for epoch, sd in enumerate(inputs):
        torch.save(sd, tmp_path / f"epoch_{epoch}.pt")
    out = tmp_path / "avg.safetensors"
    run_cli(tmp_path, "-o", out)
    averaged = load_file(out)
    expected = oracle_mean([sd["decoder.embed.weight"] for sd in inputs])
    assert torch.equal(averaged["encoder.embed.weight"], expected)
    assert torch.equal(averaged["decoder.embed.weight"], expected)
    # A strict load of the flat file into the tied model works: both names are present, and
    # loading either copy into the one shared parameter gives it the average.
    model = _tied_model()
    assert model.encoder.embed.weight is model.decoder.embed.weight
    model.load_state_dict(averaged, strict=True)
    assert model.encoder.embed.weight is model.decoder.embed.weight
    assert torch.equal(model.decoder.embed.weight.data, expected)
    assert torch.equal(model.head.weight.data, oracle_mean([sd["head.weight"] for sd in inputs]))


def _tied_model() -> torch.nn.Module:
    """The model `_tied` is the state dict of: one embedding shared by encoder and decoder."""
    model = torch.nn.Module()
    model.encoder = torch.nn.Linear(4, 6)
    model.encoder.embed = torch.nn.Embedding(10, 4)
    model.decoder = torch.nn.Module()
    model.decoder.embed = model.encoder.embed
    model.head = torch.nn.Linear(6, 3, bias=False)
    return model


def test_ddp_prefix_is_an_error_that_suggests_strip_prefix(tmp_path: Path) -> None:
    torch.save(_state_dict(0, "module."), tmp_path / "epoch_0.pt")
    torch.save(_state_dict(1), tmp_path / "epoch_1.pt")
    out = tmp_path / "avg.pt"
    result = run_cli(tmp_path, "-o", out, expect=1)
    assert "prefix 'module.'" in result.stderr
    assert "--strip-prefix module." in result.stderr
    assert not out.exists() and not leftovers(tmp_path)


def test_strip_prefix_fixes_it(tmp_path: Path) -> None:
    inputs = [_state_dict(0, "module."), _state_dict(1, "_orig_mod.")]
    for epoch, sd in enumerate(inputs):
        torch.save(sd, tmp_path / f"epoch_{epoch}.pt")
    out = tmp_path / "avg.safetensors"
    run_cli(tmp_path, "-o", out, "--strip-prefix", "module.", "--strip-prefix", "_orig_mod.")
    averaged = load_file(out)
    assert sorted(averaged) == sorted(_state_dict(0))
    assert torch.equal(
        averaged["head.weight"],
        oracle_mean([inputs[0]["module.head.weight"], inputs[1]["_orig_mod.head.weight"]]),
    )


def _timm_checkpoint(epoch: int, with_ema: bool = True) -> dict[str, object]:
    checkpoint: dict[str, object] = {
        "epoch": epoch,
        "arch": "tiny",
        "state_dict": _state_dict(epoch),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "metric": 50.0 + epoch * (-1) ** epoch,
    }
    if with_ema:
        checkpoint["state_dict_ema"] = _state_dict(1000 + epoch)
    return checkpoint


def test_ema_weights_are_averaged_beside_the_weights(tmp_path: Path) -> None:
    checkpoints = [_timm_checkpoint(epoch) for epoch in range(4)]
    for epoch, checkpoint in enumerate(checkpoints):
        torch.save(checkpoint, tmp_path / f"checkpoint-{epoch}.pth.tar")
    plan = run_cli("--dry-run", tmp_path).stdout
    assert "state dict: state_dict; also found: state_dict_ema" in plan
    out = tmp_path / "avg.pth.tar"
    run_cli(tmp_path, "-o", out)
    averaged = torch.load(out, weights_only=True)
    assert "optimizer" not in averaged
    for key in ("state_dict", "state_dict_ema"):
        expected = oracle_mean([c[key]["encoder.weight"] for c in checkpoints])  # type: ignore[index]
        assert torch.equal(averaged[key]["encoder.weight"], expected), key


def test_key_picks_the_ema_state_dict(tmp_path: Path) -> None:
    checkpoints = [_timm_checkpoint(epoch) for epoch in range(3)]
    for epoch, checkpoint in enumerate(checkpoints):
        torch.save(checkpoint, tmp_path / f"checkpoint-{epoch}.pth.tar")
    out = tmp_path / "ema.safetensors"
    run_cli(tmp_path, "-o", out, "--key", "state_dict_ema")
    expected = oracle_mean([c["state_dict_ema"]["head.weight"] for c in checkpoints])  # type: ignore[index]
    assert torch.equal(load_file(out)["head.weight"], expected)


def test_ema_missing_from_one_checkpoint_is_left_out_not_stale(tmp_path: Path) -> None:
    checkpoints = [_timm_checkpoint(0, with_ema=False), _timm_checkpoint(1), _timm_checkpoint(2)]
    for epoch, checkpoint in enumerate(checkpoints):
        torch.save(checkpoint, tmp_path / f"checkpoint-{epoch}.pth.tar")
    out = tmp_path / "avg.pth.tar"
    result = run_cli(tmp_path, "-o", out)
    assert "'state_dict_ema' is not in every selected checkpoint" in result.stderr
    assert "state_dict_ema" not in torch.load(out, weights_only=True)


def test_an_unknown_second_state_dict_is_warned_about(tmp_path: Path) -> None:
    for epoch in range(2):
        torch.save({"model": _state_dict(epoch), "teacher": _state_dict(50 + epoch)}, tmp_path / f"epoch_{epoch}.pt")
    result = run_cli("--dry-run", tmp_path)
    assert "averaging 'model'" in result.stderr and "'teacher'" in result.stderr


def _lightning_style(tmp_path: Path, losses: list[float], metric: str) -> list[OrderedDict[str, torch.Tensor]]:
    states = []
    for epoch, loss in enumerate(losses):
        sd = _state_dict(epoch)
        states.append(sd)
        torch.save({"epoch": epoch, "state_dict": sd}, tmp_path / f"epoch={epoch}-{metric}={loss:.3f}.ckpt")
    return states


def test_best_k_by_loss_picks_the_lowest(tmp_path: Path) -> None:
    losses = [0.9, 0.31, 0.5, 0.29, 0.4, 0.35]
    states = _lightning_style(tmp_path, losses, "val_loss")
    out = tmp_path / "best.safetensors"
    report = json.loads(run_cli(tmp_path, "-o", out, "--best", "3", "--metric", "val_loss", "--json").stdout)
    assert [c["epoch"] for c in report["inputs"]] == [1, 3, 5]
    expected = oracle_mean([states[i]["head.weight"] for i in (1, 3, 5)])
    assert torch.equal(load_file(out)["head.weight"], expected)


def test_best_k_by_accuracy_picks_the_highest(tmp_path: Path) -> None:
    _lightning_style(tmp_path, [0.5, 0.9, 0.7, 0.95, 0.1], "val_acc")
    plan = json.loads(run_cli("--dry-run", "--json", tmp_path, "--best", "2", "--metric", "val_acc").stdout)
    assert [c["epoch"] for c in plan["inputs"]] == [1, 3]
    args = ("--dry-run", "--json", tmp_path, "--best", "2", "--metric", "val_acc", "--mode", "min")
    plan = json.loads(run_cli(*args).stdout)
    assert [c["epoch"] for c in plan["inputs"]] == [0, 4]


def test_best_k_reads_the_metric_from_contents(tmp_path: Path) -> None:
    checkpoints = [_timm_checkpoint(epoch) for epoch in range(5)]  # metric: 50, 49, 52, 47, 54
    for epoch, checkpoint in enumerate(checkpoints):
        torch.save(checkpoint, tmp_path / f"checkpoint-{epoch}.pth.tar")
    plan = json.loads(
        run_cli("--dry-run", "--json", tmp_path, "--best", "2", "--metric", "metric", "--mode", "max").stdout
    )
    assert [c["epoch"] for c in plan["inputs"]] == [2, 4]


def test_fairseq_mid_epoch_files_beside_end_of_epoch_ones(tmp_path: Path) -> None:
    names = ["checkpoint1.pt", "checkpoint2.pt", "checkpoint_2_150.pt", "checkpoint3.pt", "checkpoint_4_330.pt"]
    for number, name in enumerate(names):
        torch.save({"model": _state_dict(number)}, tmp_path / name)
    plan = json.loads(run_cli("--dry-run", "--json", tmp_path).stdout)
    assert [os.path.basename(c["path"]) for c in plan["inputs"]] == [
        "checkpoint1.pt", "checkpoint2.pt", "checkpoint3.pt", "checkpoint_4_330.pt",
    ]  # fmt: skip
    skipped = {os.path.basename(s["path"]): s["reason"] for s in plan["skipped"]}
    assert "mid-epoch checkpoint" in skipped["checkpoint_2_150.pt"]


def test_lightning_step_interval_checkpoints_order_by_step(tmp_path: Path) -> None:
    for number, (epoch, step) in enumerate([(0, 100), (0, 200), (1, 300), (1, 400)]):
        torch.save({"state_dict": _state_dict(number)}, tmp_path / f"epoch={epoch}-step={step}.ckpt")
    plan = json.loads(run_cli("--dry-run", "--json", tmp_path, "--start", "200").stdout)
    assert plan["by"] == "step"
    assert [c["step"] for c in plan["inputs"]] == [200, 300, 400]


def test_zero_padded_names_of_different_widths_sort_numerically(tmp_path: Path) -> None:
    for number, name in enumerate(["epoch_9.pt", "epoch_010.pt", "epoch_0011.pt", "epoch_08.pt"]):
        torch.save(_state_dict(number), tmp_path / name)
    plan = json.loads(run_cli("--dry-run", "--json", tmp_path).stdout)
    assert [c["epoch"] for c in plan["inputs"]] == [8, 9, 10, 11]


def test_megatron_iteration_names_carry_steps(tmp_path: Path) -> None:
    for number, step in enumerate([3000, 1000, 2000]):
        save_file(_state_dict(number), tmp_path / f"iter_{step:07d}.safetensors")
    plan = json.loads(run_cli("--dry-run", "--json", tmp_path).stdout)
    assert [c["step"] for c in plan["inputs"]] == [1000, 2000, 3000]


def test_megatron_model_parallel_directories_are_refused(tmp_path: Path) -> None:
    for rank in ("mp_rank_00", "mp_rank_01"):
        (tmp_path / "iter_0001000" / rank).mkdir(parents=True)
        torch.save({"model": _state_dict(0)}, tmp_path / "iter_0001000" / rank / "model_optim_rng.pt")
    result = run_cli(tmp_path, "-o", tmp_path / "avg.pt", expect=1)
    assert "Megatron" in result.stderr and "tools/checkpoint/convert.py" in result.stderr


def test_deepspeed_zero_shards_are_refused_with_the_conversion_command(tmp_path: Path) -> None:
    step = tmp_path / "global_step100"
    step.mkdir()
    torch.save({"module": _state_dict(0)}, step / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    result = run_cli(step, "-o", tmp_path / "avg.pt", expect=1)
    assert result.stderr.startswith("Error: ")
    assert "zero_to_fp32.py" in result.stderr


def test_lightning_deepspeed_checkpoint_directory_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "epoch=0-step=10.ckpt" / "checkpoint"
    ckpt.mkdir(parents=True)
    torch.save({"optimizer_state_dict": {}}, ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    result = run_cli(tmp_path, "-o", tmp_path / "avg.pt", expect=1)
    assert "DeepSpeed ZeRO" in result.stderr and "zero_to_fp32.py" in result.stderr


def test_corrupt_distributed_checkpoint_metadata_is_a_clean_error(tmp_path: Path) -> None:
    dcp = tmp_path / "step_100"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"x")
    (dcp / "__0_0.distcp").write_bytes(b"x")
    result = run_cli(dcp, "-o", tmp_path / "avg.pt", expect=1)
    assert result.stderr.startswith("Error: ") and ".metadata" in result.stderr  # read natively, and it is corrupt


def test_zero3_placeholder_tensors_are_refused(tmp_path: Path) -> None:
    for epoch in range(2):
        torch.save({"module": {k: torch.empty(0) for k in _state_dict(0)}}, tmp_path / f"epoch_{epoch}.pt")
    result = run_cli(tmp_path, "-o", tmp_path / "avg.pt", expect=1)
    assert "ZeRO-3" in result.stderr and "zero_to_fp32.py" in result.stderr


def test_key_with_pt_output_leaves_no_stale_copy_of_the_other_weights(tmp_path: Path) -> None:
    checkpoints = [_timm_checkpoint(epoch) for epoch in range(3)]
    for epoch, checkpoint in enumerate(checkpoints):
        torch.save(checkpoint, tmp_path / f"checkpoint-{epoch}.pth.tar")
    out = tmp_path / "avg.pth.tar"
    run_cli(tmp_path, "-o", out, "--key", "state_dict_ema")
    averaged = torch.load(out, weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        expected = oracle_mean([c[key]["encoder.bias"] for c in checkpoints])  # type: ignore[index]
        assert torch.equal(averaged[key]["encoder.bias"], expected), key


def test_mixed_wrapper_prefixes_are_named_and_fixed(tmp_path: Path) -> None:
    inputs = [_state_dict(0, "module."), _state_dict(1, "_orig_mod.module."), _state_dict(2)]
    for epoch, sd in enumerate(inputs):
        torch.save(sd, tmp_path / f"epoch_{epoch}.pt")
    result = run_cli(tmp_path, "-o", tmp_path / "avg.pt", expect=1)
    assert "add --strip-prefix module. --strip-prefix _orig_mod." in result.stderr
    out = tmp_path / "avg.safetensors"
    run_cli(tmp_path, "-o", out, "--strip-prefix", "module.", "--strip-prefix", "_orig_mod.")
    expected = oracle_mean(
        [inputs[0]["module.head.weight"], inputs[1]["_orig_mod.module.head.weight"], inputs[2]["head.weight"]]
    )
    assert torch.equal(load_file(out)["head.weight"], expected)


def test_a_dtype_change_across_checkpoints_is_warned_about(tmp_path: Path) -> None:
    first = _state_dict(0)
    second = OrderedDict((k, v.half()) for k, v in _state_dict(1).items())
    torch.save(first, tmp_path / "epoch_0.pt")
    torch.save(second, tmp_path / "epoch_1.pt")
    out = tmp_path / "avg.safetensors"
    result = run_cli(tmp_path, "-o", out)
    assert "change dtype across the checkpoints" in result.stderr and "--dtype" in result.stderr
    assert torch.equal(load_file(out)["head.weight"], oracle_mean([first["head.weight"], second["head.weight"]]))
