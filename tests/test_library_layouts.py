"""Issue 11: each library's checkpoint directory, exactly as the library leaves it.

`ckpt-avg --last 3 DIR -o OUT` must average the right three (checked against the float64
oracle, and loaded back the way the library loads weights) or refuse with one line that
names a command that works. Libraries that cannot be installed here (they pull a CUDA
torch) are rebuilt from their own save code; the source is named above each helper.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner
from conftest import oracle_mean, run_cli
from safetensors.torch import load_file, save_file

from ckpt_avg.inspect_cli import inspect_command


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def assert_average_of(averaged: dict[str, torch.Tensor], inputs: list[dict[str, torch.Tensor]]) -> None:
    """Float tensors equal the float64 oracle; counters come from the last input."""
    assert set(averaged) == set(inputs[-1])
    for key, value in averaged.items():
        if value.dtype.is_floating_point:
            assert torch.equal(value, oracle_mean([sd[key] for sd in inputs])), key
        else:
            assert torch.equal(value, inputs[-1][key]), key


def loads_strictly(state_dict: dict[str, torch.Tensor]) -> None:
    tiny_model(0).load_state_dict(state_dict, strict=True)


# --- Never a silent order ------------------------------------------------------------------


def test_twelve_unindexed_names_from_a_glob_refuse_last_3(tmp_path: Path) -> None:
    # Issue 11, item 1: string order put weights_7, 8, 9 last; --last 3 averaged them silently.
    for k in range(1, 13):
        save_file({"w": torch.full((2,), float(k))}, str(tmp_path / f"weights{chr(96 + k)}_{k}.safetensors"))
    out = tmp_path / "avg.safetensors"
    result = run_cli("--last", "3", str(tmp_path / "*.safetensors"), "-o", out, expect=1)
    assert result.stderr.startswith("Error: --last needs an order, but ")
    assert "name the files one by one" in result.stderr and "rename them with their epoch" in result.stderr
    assert "--by" not in result.stderr  # no candidate carries an epoch or step: --by cannot help
    assert not out.exists()
    for option in (["--ema", "0.9"], ["--weights", ",".join(["1"] * 12)], ["--start", "3"], ["--end", "4"]):
        run_cli(*option, tmp_path, "-o", out, expect=1)
    assert not out.exists()
    footer = "12 of 12 checkpoint(s) selected, in natural order of their names (no epoch or step)"
    assert footer in run_cli("--dry-run", tmp_path).stdout
    inspected = CliRunner().invoke(inspect_command, [str(tmp_path)], catch_exceptions=False).stdout
    assert "12 checkpoint(s) inspected, in natural order of their names (no epoch or step)" in inspected
    assert "ordered by order" not in inspected and "--by" not in inspected


def test_unindexed_names_without_an_order_option_average_all_in_natural_order(tmp_path: Path) -> None:
    inputs = [{"w": torch.randn(3)} for _ in range(11)]
    for k, sd in enumerate(inputs):
        save_file(sd, str(tmp_path / f"ckpt_{k}.safetensors"))
    result = run_cli(tmp_path, "--dry-run")
    listed = [line.split()[-3] for line in result.stdout.splitlines() if line.startswith("*")]
    assert [os.path.basename(p) for p in listed] == [f"ckpt_{k}.safetensors" for k in range(11)]
    out = tmp_path / "out" / "avg.safetensors"
    out.parent.mkdir()
    run_cli(tmp_path, "-o", out)
    assert torch.equal(load_file(out)["w"], oracle_mean([sd["w"] for sd in inputs]))


def test_inspect_suggests_no_start_for_unindexed_names(tmp_path: Path) -> None:
    for k in range(8):
        save_file({"w": torch.full((4,), 1.0 / (k + 1))}, str(tmp_path / f"ckpt_{k}.safetensors"))
    result = CliRunner().invoke(inspect_command, [str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "No suggested start" in result.output and "carry no epoch or step" in result.output
    assert "ckpt-avg --" not in result.output


def test_name_and_contents_disagree_contents_win_and_the_plan_says_so(tmp_path: Path) -> None:
    for k in range(3):
        torch.save({"state_dict": {"w": torch.randn(2)}, "epoch": k + 10}, tmp_path / f"epoch_{k}.pt")
    result = run_cli(tmp_path, "--dry-run", "--json")
    assert "its name says epoch 0, its contents epoch 10; using the contents" in result.stdout


# --- torchvision references/classification/train.py ----------------------------------------


def torchvision_run(directory: Path, epochs: int = 5) -> list[dict[str, torch.Tensor]]:
    """As torchvision's references/classification/train.py saves (model_{epoch}.pth, then the
    same dict again as checkpoint.pth), epochs counted from 0, `args` an argparse.Namespace."""
    directory.mkdir()
    inputs = []
    args = argparse.Namespace(model="tiny", lr=0.1, output_dir=str(directory), start_epoch=0)
    for epoch in range(epochs):
        model = tiny_model(epoch)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "args": args,
        }
        torch.save(checkpoint, directory / f"model_{epoch}.pth")
        torch.save(checkpoint, directory / "checkpoint.pth")
        inputs.append({k: v.clone() for k, v in model.state_dict().items()})
    return inputs


def test_torchvision(tmp_path: Path) -> None:
    inputs = torchvision_run(tmp_path / "run")
    out = tmp_path / "avg.pth"
    result = run_cli("--last", "3", tmp_path / "run", "-o", out, "--json")
    assert "alias of the checkpoint with epoch 4" in result.stdout  # checkpoint.pth
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(out, map_location="cpu", weights_only=True)  # as train.py --resume does
    assert_average_of(checkpoint["model"], inputs[2:])
    loads_strictly(checkpoint["model"])
    assert checkpoint["epoch"] == 4 and "optimizer" not in checkpoint


# --- ESPnet (espnet2/train/trainer.py, espnet2/main_funcs/average_nbest_models.py) ---------


def espnet_run(directory: Path, epochs: int = 6, keep: int = 4) -> list[dict[str, torch.Tensor]]:
    """As ESPnet2's trainer: `{epoch}epoch.pth` holds model.state_dict() (epochs from 1),
    `checkpoint.pth` the resume state, `latest.pth` and `valid.acc.best.pth` are symbolic links,
    older epochs are removed beyond keep_nbest_models, and average_nbest_models writes
    `valid.acc.ave_Nbest.pth` with a `valid.acc.ave.pth` link."""
    directory.mkdir()
    weights = {}
    for epoch in range(1, epochs + 1):
        model = tiny_model(epoch)
        weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        resume = {"model": model.state_dict(), "reporter": {"epoch": epoch, "stats": {}}, "optimizers": []}
        torch.save(resume, directory / "checkpoint.pth")
        torch.save(model.state_dict(), directory / f"{epoch}epoch.pth")
        for link, target in (("latest.pth", epoch), ("valid.acc.best.pth", min(epoch, 3))):
            if (directory / link).is_symlink():
                (directory / link).unlink()
            (directory / link).symlink_to(f"{target}epoch.pth")
        if epoch > keep and epoch - keep != 3:
            (directory / f"{epoch - keep}epoch.pth").unlink()
    kept = sorted(int(p.name.removesuffix("epoch.pth")) for p in directory.glob("*epoch.pth"))
    average = {k: sum(weights[e][k].double() for e in kept).to(v.dtype) for k, v in weights[kept[-1]].items()}
    torch.save(average, directory / "valid.acc.ave_4best.pth")
    (directory / "valid.acc.ave.pth").symlink_to("valid.acc.ave_4best.pth")
    return [weights[e] for e in kept]


def test_espnet(tmp_path: Path) -> None:
    inputs = espnet_run(tmp_path / "exp")
    out = tmp_path / "avg.pth"
    result = run_cli("--last", "3", tmp_path / "exp", "-o", out, "--json")
    assert '"path": "' + str(tmp_path / "exp" / "4epoch.pth") in result.stdout
    averaged = torch.load(out, weights_only=True)  # ESPnet loads a bare state dict
    assert_average_of(averaged, inputs[-3:])
    loads_strictly(averaged)


# --- icefall (icefall/checkpoint.py: save_checkpoint, save_checkpoint_with_global_batch_idx) ---


def icefall_run(directory: Path, epochs: int = 4, batches_per_epoch: int = 5000) -> list[dict[str, torch.Tensor]]:
    """As icefall's recipes: `epoch-{N}.pt` at the end of each epoch (from 1),
    `checkpoint-{batch_idx_train}.pt` every 2000 batches, the params (cur_epoch,
    batch_idx_train, ...) at the top level, and best-*-loss.pt as copies of an epoch file."""
    directory.mkdir()
    ends = []
    batch = 0
    for epoch in range(1, epochs + 1):
        for _ in range(batches_per_epoch):
            batch += 1
            if batch % 2000 == 0:
                _icefall_save(directory / f"checkpoint-{batch}.pt", tiny_model(batch), epoch, batch)
        model = tiny_model(epoch)
        _icefall_save(directory / f"epoch-{epoch}.pt", model, epoch, batch)
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
        if epoch in (1, 3):
            shutil.copyfile(directory / f"epoch-{epoch}.pt", directory / "best-valid-loss.pt")
        shutil.copyfile(directory / f"epoch-{epoch}.pt", directory / "best-train-loss.pt")
    return ends


def _icefall_save(path: Path, model: torch.nn.Module, epoch: int, batch: int) -> None:
    params = {
        "best_train_loss": 0.5, "best_valid_loss": 0.6, "best_train_epoch": epoch, "best_valid_epoch": 1,
        "batch_idx_train": batch, "log_interval": 50, "valid_interval": 3000, "cur_epoch": epoch,
        "exp_dir": Path("exp"),
    }  # fmt: skip
    checkpoint: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": None,
        "scheduler": None,
        "grad_scaler": None,
        "sampler": {"epoch": epoch},
    }
    checkpoint.update(params)
    torch.save(checkpoint, path)


def test_icefall_epochs_not_batch_checkpoints(tmp_path: Path) -> None:
    inputs = icefall_run(tmp_path / "exp")
    out = tmp_path / "avg.pt"
    result = run_cli("--last", "3", tmp_path / "exp", "-o", out, "--json")
    assert "mid-epoch checkpoint" in result.stdout
    averaged = torch.load(out, map_location="cpu", weights_only=False)  # as icefall's load_checkpoint
    assert_average_of(averaged["model"], inputs[-3:])
    loads_strictly(averaged["model"])


def test_icefall_batch_checkpoints_by_glob(tmp_path: Path) -> None:
    icefall_run(tmp_path / "exp")
    result = run_cli("--last", "2", str(tmp_path / "exp" / "checkpoint-*.pt"), "--dry-run")
    chosen = [line.split()[-3] for line in result.stdout.splitlines() if line.startswith("*")]
    assert [os.path.basename(p) for p in chosen] == ["checkpoint-18000.pt", "checkpoint-20000.pt"]
    assert "ordered by step" in result.stdout


def icefall_run_saving_the_last_batch(directory: Path) -> list[dict[str, torch.Tensor]]:
    """As icefall's recipes with save_every_n=5 and 6 batches an epoch: batch 30 is the last
    of epoch 5, so `checkpoint-30.pt` holds the very weights that `epoch-5.pt` then saves."""
    directory.mkdir()
    ends = []
    for epoch in range(1, 6):
        for batch in range(6 * epoch - 5, 6 * epoch + 1):
            if batch % 5 == 0:  # the model after `batch` batches is tiny_model(batch)
                _icefall_save(directory / f"checkpoint-{batch}.pt", tiny_model(batch), epoch, batch)
        model = tiny_model(6 * epoch)
        _icefall_save(directory / f"epoch-{epoch}.pt", model, epoch, 6 * epoch)
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
    return ends


def test_icefall_batch_checkpoint_on_an_epochs_last_batch_is_the_copy(tmp_path: Path) -> None:
    # A user trial: equal data made epoch-5.pt the copy of checkpoint-30.pt, the end-of-epoch
    # rule lost its file, and --last 3 silently averaged epoch-4, checkpoint-25, checkpoint-30.
    inputs = icefall_run_saving_the_last_batch(tmp_path / "exp")
    out = tmp_path / "avg.pt"
    run_cli("--last", "3", tmp_path / "exp", "-o", out)
    assert_average_of(torch.load(out, weights_only=False)["model"], inputs[-3:])
    for by in ([], ["--by", "epoch"]):
        plan = run_cli(*by, "--last", "3", tmp_path / "exp", "--dry-run").stdout
        chosen = [os.path.basename(line.split()[-3]) for line in plan.splitlines() if line.startswith("*")]
        assert chosen == ["epoch-3.pt", "epoch-4.pt", "epoch-5.pt"]
        assert "ordered by epoch" in plan
        copy = next(line for line in plan.splitlines() if "checkpoint-30.pt" in line)
        assert "alias of the checkpoint with epoch 5" in copy


def test_by_epoch_collision_names_the_files_and_suggests_by_step_or_glob(tmp_path: Path) -> None:
    # Two of icefall's batch checkpoints in epoch 2 and no epoch-2.pt (training stopped mid-epoch).
    (tmp_path / "exp").mkdir()
    _icefall_save(tmp_path / "exp" / "epoch-1.pt", tiny_model(1), 1, 6)
    _icefall_save(tmp_path / "exp" / "checkpoint-8.pt", tiny_model(8), 2, 8)
    _icefall_save(tmp_path / "exp" / "checkpoint-10.pt", tiny_model(10), 2, 10)
    result = run_cli("--by", "epoch", "--last", "2", tmp_path / "exp", "-o", tmp_path / "avg.pt", expect=1)
    assert "epoch 2 is shared by" in result.stderr
    assert "checkpoint-8.pt" in result.stderr and "checkpoint-10.pt" in result.stderr
    assert "--by step" in result.stderr and "--glob" in result.stderr
    assert not (tmp_path / "avg.pt").exists()


# --- NeMo (nemo/utils/exp_manager.py: NeMoModelCheckpoint over Lightning's ModelCheckpoint) ----


def nemo_run(directory: Path) -> list[dict[str, torch.Tensor]]:
    """As NeMo's exp_manager: `NAME--val_loss=X-epoch=N.ckpt` for the top 3, a
    `...-last.ckpt` copy of the newest, and the final `NAME.nemo` tar archive."""
    directory.mkdir()
    losses = {0: 0.9, 1: 0.5, 2: 0.7, 3: 0.4, 4: 0.45, 5: 0.6}
    best = sorted(losses, key=losses.__getitem__)[:3]
    weights = {}
    for epoch, loss in losses.items():
        model = tiny_model(epoch)
        weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        checkpoint = {"epoch": epoch, "global_step": 10 * (epoch + 1), "state_dict": model.state_dict()}
        name = f"Tiny--val_loss={loss:.4f}-epoch={epoch}"
        for old in directory.glob("*-last.ckpt"):
            old.unlink()
        torch.save(checkpoint, directory / f"{name}-last.ckpt")
        if epoch in best:
            torch.save(checkpoint, directory / f"{name}.ckpt")
    (directory / "Tiny.nemo").write_bytes(b"tar archive")
    return [weights[e] for e in sorted(best)[-2:]] + [weights[5]]


def test_nemo(tmp_path: Path) -> None:
    inputs = nemo_run(tmp_path / "checkpoints")
    out = tmp_path / "avg.ckpt"
    result = run_cli("--last", "3", tmp_path / "checkpoints", "-o", out, "--json")
    assert "model_weights.ckpt" in result.stdout  # the .nemo archive: how to extract its weights
    averaged = torch.load(out, weights_only=True)
    assert_average_of(averaged["state_dict"], inputs)


def test_a_nemo_archive_named_explicitly_says_how_to_extract_it(tmp_path: Path) -> None:
    archive = tmp_path / "Tiny.nemo"
    archive.write_bytes(b"tar archive")
    result = run_cli(archive, "-o", tmp_path / "avg.pt", expect=1)
    assert "tar -xf" in result.stderr and "model_weights.ckpt" in result.stderr


# --- equal data where two candidates share an index ----------------------------------------


def test_a_copy_with_an_unknown_name_is_found_by_its_data(tmp_path: Path) -> None:
    inputs = []
    for epoch in range(4):
        sd = OrderedDict((k, v.clone()) for k, v in tiny_model(epoch).state_dict().items())
        inputs.append(sd)
        torch.save({"model": sd, "epoch": epoch}, tmp_path / f"model_{epoch}.pth")
    torch.save({"model": inputs[-1], "epoch": 3}, tmp_path / "final_weights.pth")
    out = tmp_path / "avg.pth"
    result = run_cli("--last", "3", tmp_path, "-o", out, "--json")
    assert "alias of the checkpoint with epoch 3" in result.stdout
    assert_average_of(torch.load(out, weights_only=True)["model"], inputs[1:])


# --- timm (timm/utils/checkpoint_saver.py: CheckpointSaver) ----------------------------------


def timm_run(directory: Path, epochs: int = 6, max_history: int = 4) -> dict[int, dict[str, torch.Tensor]]:
    """As timm's CheckpointSaver: each epoch is saved to `last.pth.tar`, then duplicated (a hard
    link) as `checkpoint-{epoch}.pth.tar`; only the `max_history` best by metric are kept;
    `model_best.pth.tar` duplicates the best; `recovery-{epoch}-{batch}.pth.tar` is mid-epoch."""
    directory.mkdir()
    args = argparse.Namespace(model="tiny", epochs=epochs)
    metrics = {0: 50.0, 1: 60.0, 2: 58.0, 3: 70.0, 4: 65.0, 5: 69.0}
    weights, kept = {}, []
    for epoch in range(epochs):
        model = tiny_model(epoch)
        weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        state = {"epoch": epoch, "arch": "tiny", "state_dict": model.state_dict(), "optimizer": {}, "version": 2,
                 "args": args, "metric": metrics[epoch]}  # fmt: skip
        torch.save(state, directory / "recovery-tmp.pth.tar")
        os.replace(directory / "recovery-tmp.pth.tar", directory / f"recovery-{epoch}-100.pth.tar")
        torch.save(state, directory / "tmp.pth.tar")
        os.replace(directory / "tmp.pth.tar", directory / "last.pth.tar")
        kept.append(epoch)
        os.link(directory / "last.pth.tar", directory / f"checkpoint-{epoch}.pth.tar")
        kept.sort(key=metrics.__getitem__, reverse=True)
        for dropped in kept[max_history:]:
            (directory / f"checkpoint-{dropped}.pth.tar").unlink()
        kept = kept[:max_history]
        if metrics[epoch] == max(metrics[e] for e in range(epoch + 1)):
            (directory / "model_best.pth.tar").unlink(missing_ok=True)
            os.link(directory / "last.pth.tar", directory / "model_best.pth.tar")
        for old in directory.glob("recovery-*.pth.tar"):
            if old.name != f"recovery-{epoch}-100.pth.tar":
                old.unlink()
    return {e: weights[e] for e in kept}


def test_timm(tmp_path: Path) -> None:
    kept = timm_run(tmp_path / "output")  # epochs 3, 5, 4, 1 by metric
    out = tmp_path / "avg.pth.tar"
    result = run_cli("--last", "3", tmp_path / "output", "-o", out, "--json")
    assert "same file as" in result.stdout  # last.pth.tar and model_best.pth.tar are hard links
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert_average_of(checkpoint["state_dict"], [kept[e] for e in (3, 4, 5)])
    loads_strictly(checkpoint["state_dict"])


def test_checkpoint_dash_n_decided_by_neighbours_or_contents() -> None:
    from ckpt_avg.discover import CheckpointRef
    from ckpt_avg.indices import candidate_from
    from ckpt_avg.naming import parse_name
    from ckpt_avg.sources import ContentMeta

    def ref(name: str) -> CheckpointRef:
        return CheckpointRef(f"exp/{name}", (f"exp/{name}",), False, False, 0, 1, parse_name(name))

    notes: list[str] = []
    icefall = candidate_from(ref("checkpoint-20000.pt"), None, ["epoch-1.pt", "checkpoint-20000.pt"], notes)
    assert (icefall.epoch, icefall.step, icefall.mid_epoch) == (None, 20000, True)
    timm_like = candidate_from(ref("checkpoint-7.pt"), ContentMeta(epoch=7, stored_epoch=7), [], notes)
    assert (timm_like.epoch, timm_like.step) == (7, None) and not notes
    undecided = candidate_from(ref("checkpoint-9.pt"), None, ["checkpoint-9.pt"], notes)
    assert undecided.epoch == 9 and "read as epoch 9 (timm's naming" in notes[0]
