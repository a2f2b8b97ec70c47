"""`ckpt-avg inspect` (issue 7): metrics, weight drift and a suggested --start, as a user meets them."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import run_cli

from ckpt_avg.inspect import inspect_checkpoints, suggest_start, weight_drift
from ckpt_avg.inspect_cli import inspect_command

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONVERGED = 10  # the synthetic run settles at this epoch


def run_inspect(*args: object, expect: int | None = 0) -> Result:
    """`ckpt-avg inspect ARGS` in-process, checking the exit status."""
    result = CliRunner().invoke(inspect_command, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}, output:\n{result.output}"
    return result


def synthetic_states(epochs: int = 30) -> list[dict[str, torch.Tensor]]:
    """Large random steps for epochs 0..9, then tiny noise around a fixed point from epoch 10 on."""
    generator = torch.Generator().manual_seed(7)
    fixed = {
        "layer.weight": torch.randn(48, 40, generator=generator),
        "layer.bias": torch.randn(40, generator=generator),
    }
    states = []
    for epoch in range(epochs):
        scale = 2.0 if epoch < CONVERGED else 1e-3
        state = {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in fixed.items()}
        state["head.weight"] = state["layer.weight"][:8].to(torch.bfloat16)  # a second dtype
        state["bn.num_batches_tracked"] = torch.tensor(epoch)
        states.append(state)
    return states


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic") / "ckpts"
    directory.mkdir()
    for epoch, state in enumerate(synthetic_states()):
        torch.save(
            {"state_dict": state, "epoch": epoch, "val_loss": 1.0 / (epoch + 1)}, directory / f"epoch_{epoch}.pt"
        )
    return directory


def oracle_drift(states: Sequence[dict[str, torch.Tensor]]) -> tuple[list[float | None], list[float]]:
    """The definitions computed the simple way: whole flattened float vectors in float64."""
    vectors = [
        torch.cat([s[k].to(torch.float64).reshape(-1) for k in sorted(s) if s[k].is_floating_point()]) for s in states
    ]
    prev: list[float | None] = [None] + [
        float((vectors[t] - vectors[t - 1]).norm() / vectors[t - 1].norm()) for t in range(1, len(vectors))
    ]
    last = [float((v - vectors[-1]).norm() / vectors[-1].norm()) for v in vectors]
    return prev, last


def test_suggest_start_rule() -> None:
    # tail = last quarter of 8 steps = 2 steps, median 0.011, band 1.5 -> threshold 0.0165
    assert suggest_start([None, 1.0, 0.9, 0.5, 0.02, 0.012, 0.011, 0.012, 0.010]) == (4, "")
    assert suggest_start([None, 0.01, 0.011, 0.012, 0.01]) == (0, "")  # settled from the start
    assert suggest_start([None, 0.5, 0.1], band=1.5) == (None, "too few checkpoints to suggest a start (3; at least 4)")
    assert suggest_start([None, 1.0, 0.5, 0.02, 0.03], band=2.0) == (2, "")
    assert suggest_start([None, 1.0, math.nan, 0.01, 0.01, 0.01]) == (2, "")  # non-finite counts as out of band


def test_streamed_drift_equals_the_oracle_across_chunks(synthetic_run: Path) -> None:
    states = synthetic_states()
    result = inspect_checkpoints([str(synthetic_run)], chunk_elements=7)  # many chunks per tensor
    expected_prev, expected_last = oracle_drift(states)
    rows = result.inspected
    assert [r.index for r in rows] == list(range(30))
    assert rows[0].drift_prev is None
    for row, prev, last in zip(rows, expected_prev, expected_last, strict=True):
        assert row.drift_last == pytest.approx(last, rel=1e-12, abs=1e-15)
        if prev is not None:
            assert row.drift_prev == pytest.approx(prev, rel=1e-12)
    assert result.float_tensors == 3
    assert result.parameters == 48 * 40 + 40 + 8 * 40
    assert rows[0].dtypes == {"bf16": 1, "f32": 2, "i64": 1}


def test_weight_drift_of_in_memory_tensors() -> None:
    a, b, c = torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 3.0)
    prev, last = weight_drift([(a, b, c)])
    assert prev == [None, pytest.approx(1.0), pytest.approx(0.5)]
    assert last == [pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0]


def test_synthetic_run_suggests_the_epoch_it_converged(synthetic_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(synthetic_run.parent)
    result = run_inspect("ckpts/")
    out = result.stdout
    assert "Suggested start: epoch 10 (*)" in out
    assert "\n  ckpt-avg --start 10 ckpts/ -o avg.pt\n" in out
    lines = out.splitlines()
    assert lines[0].split() == ["epoch", "file", "size", "dtypes", "val_loss", "drift/prev", "drift/last"]
    assert lines[10].startswith(" ") and "ckpts/epoch_9.pt" in lines[10]
    assert lines[11].startswith("*") and "ckpts/epoch_10.pt" in lines[11]
    assert "bf16:1 f32:2 i64:1" in lines[1] and " 0.5 " in lines[2]  # dtype mix, val_loss from the contents
    # the suggestion is ready to paste: it averages epochs 10..29
    command = shlex.split(out.splitlines()[-1])
    assert command[0] == "ckpt-avg"
    averaged = run_cli(*command[1:], "--json")
    report = json.loads(averaged.stdout)
    assert [c["epoch"] for c in report["inputs"]] == list(range(10, 30))


def test_selection_options_narrow_what_is_inspected(synthetic_run: Path) -> None:
    result = run_inspect("--start", 4, "--end", 25, "--glob", "epoch_*", synthetic_run)
    out = result.stdout
    assert f"-      3  {synthetic_run}/epoch_3.pt" in out and "epoch < --start 4" in out
    assert "epoch > --end 25" in out
    assert "22 checkpoint(s) inspected" in out
    assert f"ckpt-avg --start 10 --end 25 --glob 'epoch_*' {synthetic_run} -o avg.pt" in out


def test_json_is_one_parseable_document(synthetic_run: Path) -> None:
    result = run_inspect("--json", "--band", 2, synthetic_run)
    data = json.loads(result.stdout)
    assert data["by"] == "epoch"
    assert data["state_dict_key"] == "state_dict"
    assert data["band"] == 2.0
    assert data["suggestion"]["start"] == CONVERGED
    assert data["suggestion"]["position"] == CONVERGED
    assert data["suggestion"]["count"] == 20
    assert data["suggestion"]["command"] == f"ckpt-avg --start 10 {synthetic_run} -o avg.pt"
    assert len(data["rows"]) == 30
    first, last = data["rows"][0], data["rows"][-1]
    assert first["drift_prev"] is None and last["drift_last"] == 0.0
    assert first["metrics"] == {"val_loss": 1.0}
    assert set(data["definitions"]) == {"drift_prev", "drift_last", "suggestion", "lr", "straightness"}
    assert data["schedule"] == "" and data["alternative"] is None and data["suggestion"]["rule"] == "drift"


def test_plot_is_a_png_written_by_matplotlib(synthetic_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "drift.png"
    result = run_inspect("--plot", target, synthetic_run)
    assert f"Plot written to {target}" in result.stderr
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert b"Software\x00Matplotlib" in data  # the tEXt chunk matplotlib writes
    assert [p.name for p in tmp_path.iterdir()] == ["drift.png"]  # no temporary file left


def test_plot_without_matplotlib_is_a_one_line_error(
    synthetic_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = run_inspect("--plot", tmp_path / "drift.png", synthetic_run, expect=1)
    assert result.stdout == ""
    assert result.stderr == ("Error: --plot needs matplotlib, which is not installed: pip install 'ckpt-avg[plot]'\n")
    assert not (tmp_path / "drift.png").exists()


def test_errors_and_usage_errors(synthetic_run: Path, tmp_path: Path) -> None:
    missing = run_inspect(tmp_path / "nowhere", expect=2)
    assert "does not exist" in missing.stderr
    assert run_inspect("--band", 1, synthetic_run, expect=2).stderr.startswith("Usage:")
    assert "directory" in run_inspect("--plot", tmp_path / "no" / "x.png", synthetic_run, expect=2).stderr
    (tmp_path / "epoch_1.pt").write_bytes(b"not a checkpoint")
    broken = run_inspect(tmp_path, expect=1)
    assert broken.stderr.startswith("Error: ") and broken.stderr.count("\n") == 1


def test_too_few_checkpoints_gives_no_suggestion(synthetic_run: Path) -> None:
    out = run_inspect("--last", 3, synthetic_run).stdout
    assert "No suggested start: too few checkpoints to suggest a start (3; at least 4)" in out


def test_help_explains_the_rule() -> None:
    text = " ".join(run_inspect("--help").stdout.split())
    for words in ("median drift/prev of the tail", "last quarter", "--band", "--recursive", "--trust-pickle", "--plot"):
        assert words in text


# -- a real Lightning run -------------------------------------------------------------------------


def lightning_run(directory: Path, epochs: int) -> None:
    """Train a tiny regressor on CPU with Lightning, saving every epoch (ModelCheckpoint save_top_k=-1)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def validation_step(self, batch: list[torch.Tensor], _: int) -> None:
            self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    L.seed_everything(0, verbose=False)
    x = torch.randn(256, 8)
    data = DataLoader(TensorDataset(x, x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)), batch_size=32)
    checkpoint = ModelCheckpoint(
        dirpath=directory, save_top_k=-1, monitor="val_loss", filename="{epoch}-{val_loss:.4f}"
    )
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[checkpoint],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Regressor(), data, data)


# Lightning 2.6 under torch 2.13 warns about torch's own pytree API inside Trainer.fit; not ours to fix.
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_real_lightning_run_as_a_command(tmp_path: Path) -> None:
    lightning_run(tmp_path / "checkpoints", epochs=12)
    # This interpreter's ckpt_avg (the tree under test), never a `ckpt-avg` found on PATH.
    result = subprocess.run(
        [sys.executable, "-m", "ckpt_avg", "inspect", "checkpoints/"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["epoch", "file", "size", "dtypes", "val_loss", "lr", "drift/prev", "drift/last"]
    assert "checkpoints/epoch=0-val_loss=" in lines[1] and "f32:4" in lines[1] and "  0.05  " in lines[1]
    assert "12 checkpoint(s) inspected, ordered by epoch; state dict: state_dict, 4 float tensors" in result.stdout
    # Full-batch-like descent at a constant rate: the weights travel a straight line, nothing settles.
    assert "Learning rate: lr is 0.05 throughout, so the drift decides." in lines
    assert lines[-1].startswith("No suggested start: the weights drift steadily to the end: from epoch ")
    assert "ckpt-avg --start" not in result.stdout
    assert os.listdir(tmp_path) == ["checkpoints"]  # inspect writes nothing


def test_tied_weights_count_once(tmp_path: Path) -> None:
    for epoch in range(4):
        shared = torch.full((6,), float(epoch + 1))
        torch.save({"embed.weight": shared, "decoder.weight": shared}, tmp_path / f"epoch_{epoch}.pt")
    result = inspect_checkpoints([str(tmp_path)])
    assert (result.float_tensors, result.parameters) == (1, 6)
    assert [r.drift_prev for r in result.inspected] == [None, 1.0, 0.5, pytest.approx(1 / 3)]
    assert result.inspected[0].dtypes == {"f32": 2}  # both names are shown


def test_differing_integer_tensors_make_the_command_copy_them(tmp_path: Path) -> None:
    for epoch in range(5):
        state = {"w": torch.randn(10) * (1.0 if epoch < 2 else 1e-3) + 5, "mask": torch.tensor([epoch % 2, 1])}
        torch.save(state, tmp_path / f"epoch_{epoch}.pt")
    result = run_inspect(tmp_path)
    assert f"ckpt-avg --start 2 --int-policy last {tmp_path} -o avg.pt" in result.stdout
    assert "Warning: integer tensor(s) 'mask' differ between the checkpoints the suggestion averages" in result.stderr


def test_trainer_directories_get_a_directory_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer `checkpoint-N/` directories: the suggestion writes a directory from_pretrained loads."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    for epoch, state in enumerate(synthetic_states(16)):
        directory = run / f"checkpoint-{100 * (epoch + 1)}"
        directory.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    out = run_inspect("run/").stdout
    command = shlex.split(out.splitlines()[-1])
    assert command[0] == "ckpt-avg" and command[-2:] == ["-o", "avg/"], out
    run_cli(*command[1:])
    assert (tmp_path / "avg" / "model.safetensors").is_file()
