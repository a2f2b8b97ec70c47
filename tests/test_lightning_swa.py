"""ckpt-avg reproduces Lightning's own StochasticWeightAveraging from the per-epoch checkpoints.

SPEC 1.3: with swa_epoch_start=S and max_epochs=M, Lightning averages the end-of-epoch
weights of epochs S-2 ... M-2, so `--start S-2 --end M-2` gives the same model. Lightning
keeps a float32 running mean, so the match is to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import lightning as L
import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from safetensors.torch import load_file

from ckpt_avg.inspect_cli import inspect_command

SWA_START, MAX_EPOCHS = 6, 10


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("swa")
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    model = Regressor()
    trainer = L.Trainer(
        max_epochs=MAX_EPOCHS,
        callbacks=[
            ModelCheckpoint(dirpath=root / "ckpts", save_top_k=-1, filename="{epoch}"),
            StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=SWA_START),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, data)
    return root / "ckpts", {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_start_s_minus_2_end_m_minus_2_reproduces_lightning_swa(
    swa_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    ckpts, lightning_average = swa_run
    out = tmp_path / "swa.safetensors"
    run_cli("--start", SWA_START - 2, "--end", MAX_EPOCHS - 2, ckpts, "-o", out)
    ours = load_file(out)
    assert set(ours) == set(lightning_average)
    for key, value in ours.items():
        torch.testing.assert_close(value, lightning_average[key], rtol=1e-6, atol=1e-6)


def test_a_neighbouring_window_does_not_match(swa_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    ckpts, lightning_average = swa_run
    out = tmp_path / "off_by_one.safetensors"
    run_cli("--start", SWA_START - 1, "--end", MAX_EPOCHS - 1, ckpts, "-o", out)
    ours = load_file(out)
    assert max((ours[k] - lightning_average[k]).abs().max().item() for k in ours) > 1e-3


class BatchNormRegressor(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
        )


def test_the_extra_batchnorm_epoch_holding_lightnings_average_is_named(
    swa_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """With BatchNorm, Lightning trains one epoch more and saves the SWA average as that epoch."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    model = BatchNormRegressor()
    trainer = L.Trainer(
        max_epochs=4,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, filename="{epoch}"),
            StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    last = torch.load(tmp_path / "ckpts" / "epoch=4.ckpt", weights_only=False)
    assert all(torch.equal(last["state_dict"][k], v) for k, v in model.state_dict().items())  # the average
    warned = run_cli("--dry-run", tmp_path / "ckpts").stderr
    assert "epoch=4.ckpt holds Lightning's SWA average" in warned and "--end 3" in warned
    assert "SWA average" not in run_cli("--dry-run", tmp_path / "ckpts", "--end", "3").stderr
    raw_run, _ = swa_run
    assert "SWA average" not in run_cli("--dry-run", raw_run).stderr  # no BatchNorm: no extra epoch


def test_inspect_leaves_lightnings_swa_average_out_of_its_analysis_and_its_suggestion(tmp_path: Path) -> None:
    # A user trial: inspect warned that epoch=6 holds the SWA average, then used it as the drift's
    # reference and its lr, and suggested a --start whose command averaged it in again.
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    trainer = L.Trainer(
        max_epochs=6,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, filename="{epoch}"),
            StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BatchNormRegressor(), data)
    result = CliRunner().invoke(inspect_command, ["--json", str(tmp_path / "ckpts")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    inspection = json.loads(result.stdout)
    rows = {Path(r["path"]).name: r for r in inspection["rows"]}
    assert not rows["epoch=6.ckpt"]["inspected"] and "SWA average" in rows["epoch=6.ckpt"]["reason"]
    assert all(rows[f"epoch={e}.ckpt"]["inspected"] for e in range(6))
    assert rows["epoch=5.ckpt"]["drift_last"] == 0  # the reference is the last epoch, not the average
    command = shlex.split(inspection["suggestion"]["command"])
    assert command[command.index("--end") + 1] == "5"
    assert any("epoch=6.ckpt holds Lightning's SWA average" in w for w in inspection["warnings"])


def test_lightnings_own_swa_average_is_listed_among_the_state_dicts_found(
    swa_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    ckpts, _ = swa_run
    found = "callbacks.StochasticWeightAveraging.average_model_state"
    plan = run_cli("--dry-run", "--last", "3", ckpts).stdout
    assert f"state dict: state_dict; also found: {found}" in plan
    out = tmp_path / "avg.ckpt"
    report = json.loads(run_cli("--json", "--last", "3", ckpts, "-o", out).stdout)
    assert report["other_state_dicts"] == [found]
    assert "callbacks" not in torch.load(out, weights_only=True)  # listed, never averaged into the output
