"""A real Lightning run on CPU, averaged as a user would (SPEC 1.1, 1.5, 1.7, 1.9).

One Trainer run (five tiny epochs) is shared by every test in this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import leftovers, oracle_mean, run_cli
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS = 5

# Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) still uses the
# LeafSpec check that torch 2.13 deprecates; nothing in this test can avoid it.
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")


class TinyRegressor(L.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)}


@dataclass(frozen=True)
class LightningRun:
    copies: Path  # ModelCheckpoint(save_last=True): last.ckpt is a copy
    links: Path  # ModelCheckpoint(save_last="link"): last.ckpt is a symbolic link
    root: Path

    def epoch_file(self, directory: Path, epoch: int) -> Path:
        (match,) = directory.glob(f"epoch={epoch}-step=*.ckpt")
        return match

    def inputs(self, epochs: range, directory: Path | None = None) -> list[dict[str, Any]]:
        directory = directory or self.copies
        return [torch.load(self.epoch_file(directory, k), map_location="cpu", weights_only=False) for k in epochs]


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LightningRun]:
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(64, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    copies = ModelCheckpoint(dirpath=root / "copies", save_top_k=-1, save_last=True)
    # A second ModelCheckpoint needs its own state key: every 4 steps is every epoch here (64/16 batches).
    links = ModelCheckpoint(dirpath=root / "links", save_top_k=-1, save_last="link", every_n_train_steps=4)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[copies, links],
        default_root_dir=root,
    )
    trainer.fit(TinyRegressor(hidden=8, lr=0.05), loader)
    yield LightningRun(root / "copies", root / "links", root)


def test_the_run_wrote_what_lightning_writes(lightning_run: LightningRun) -> None:
    names = sorted(os.listdir(lightning_run.copies))
    assert len(names) == EPOCHS + 1 and "last.ckpt" in names
    assert not os.path.islink(lightning_run.copies / "last.ckpt")
    assert os.path.islink(lightning_run.links / "last.ckpt")
    first = lightning_run.inputs(range(1))[0]
    assert {"state_dict", "optimizer_states", "lr_schedulers", "callbacks", "hyper_parameters"} <= set(first)


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def test_average_from_epoch_2(lightning_run: LightningRun, tmp_path: Path) -> None:
    out = tmp_path / "swa.ckpt"
    result = run_cli("--start", "2", lightning_run.copies, "-o", out)
    assert result.stdout == ""
    *warnings, summary = result.stderr.splitlines()
    assert summary.startswith(f"Averaged 3 checkpoint(s) (epoch 2-4) into {out}: ")
    # SPEC 1.8: without a recompute, the BatchNorm statistics are averaged, and the user is told.
    assert warnings[0] == (
        "Warning: 1 BatchNorm layer(s) were averaged, not recomputed; recompute their statistics"
        " with --bn-model MODULE:CALLABLE --bn-data DATA"
    )
    assert all(line.startswith(("Warning: ", "Note: ")) for line in warnings)
    assert leftovers(tmp_path) == []

    inputs = lightning_run.inputs(range(2, EPOCHS))
    states = [ckpt["state_dict"] for ckpt in inputs]
    last = inputs[-1]
    averaged = torch.load(out, map_location="cpu", weights_only=True)

    assert set(averaged["state_dict"]) == set(last["state_dict"])
    for name, tensor in last["state_dict"].items():
        got = averaged["state_dict"][name]
        if tensor.is_floating_point():
            assert torch.equal(got, oracle_mean([s[name] for s in states])), name
        else:
            assert name.endswith("num_batches_tracked")
            assert torch.equal(got, tensor), name  # copied from the last
    # The average really differs from the last epoch (the test would be vacuous otherwise).
    assert not torch.equal(averaged["state_dict"]["net.0.weight"], last["state_dict"]["net.0.weight"])

    for training_state in ("optimizer_states", "lr_schedulers", "callbacks"):
        assert training_state not in averaged
    assert averaged["epoch"] == last["epoch"] == EPOCHS - 1
    assert averaged["global_step"] == last["global_step"]
    assert dict(averaged["hyper_parameters"]) == dict(last["hyper_parameters"]) == {"hidden": 8, "lr": 0.05}
    provenance = averaged["ckpt_avg"]
    assert _plain(provenance)
    assert [os.path.basename(i["path"]) for i in provenance["inputs"]] == [
        lightning_run.epoch_file(lightning_run.copies, k).name for k in range(2, EPOCHS)
    ]
    assert [i["epoch"] for i in provenance["inputs"]] == [2, 3, 4]

    model = TinyRegressor.load_from_checkpoint(out, map_location="cpu")
    assert model.hparams.hidden == 8
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, averaged["state_dict"][name]), name


@pytest.mark.parametrize("kind", ["copies", "links"])
def test_last_ckpt_is_skipped_in_the_plan(lightning_run: LightningRun, kind: str) -> None:
    directory = getattr(lightning_run, kind)
    table = run_cli("--dry-run", "--start", "2", directory).stdout
    rows = [line for line in table.splitlines() if "last.ckpt" in line]
    assert len(rows) == 1
    assert rows[0].startswith("-")
    assert "alias" in rows[0] or "same file" in rows[0]
    plan = json.loads(run_cli("--dry-run", "--json", "--start", "2", directory).stdout)
    assert [os.path.basename(i["path"]) for i in plan["inputs"]] == [
        lightning_run.epoch_file(directory, k).name for k in range(2, EPOCHS)
    ]
    skipped = {os.path.basename(s["path"]): s["reason"] for s in plan["skipped"]}
    assert set(skipped) == {"last.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"}
    assert "--start 2" in skipped["epoch=0-step=4.ckpt"]
    assert os.listdir(directory) == os.listdir(lightning_run.copies)  # the dry run wrote nothing


def test_last_ckpt_used_when_it_is_the_only_copy(lightning_run: LightningRun, tmp_path: Path) -> None:
    # save_top_k=2 style: the final epoch survives only as last.ckpt.
    directory = tmp_path / "partial"
    directory.mkdir()
    for k in (2, 3):
        source = lightning_run.epoch_file(lightning_run.copies, k)
        (directory / source.name).write_bytes(source.read_bytes())
    (directory / "last.ckpt").write_bytes((lightning_run.copies / "last.ckpt").read_bytes())
    out = tmp_path / "avg.ckpt"
    run_cli(directory, "-o", out)
    states = [c["state_dict"] for c in lightning_run.inputs(range(2, EPOCHS))]
    averaged = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(averaged["net.3.weight"], oracle_mean([s["net.3.weight"] for s in states]))


def test_safetensors_output(lightning_run: LightningRun, tmp_path: Path) -> None:
    out = tmp_path / "swa.safetensors"
    run_cli("--start", "2", lightning_run.links, "-o", out)
    states = [c["state_dict"] for c in lightning_run.inputs(range(2, EPOCHS), lightning_run.links)]
    tensors = load_file(str(out))
    assert set(tensors) == set(states[-1])
    for name, tensor in states[-1].items():
        expected = oracle_mean([s[name] for s in states]) if tensor.is_floating_point() else tensor
        assert torch.equal(tensors[name], expected), name
