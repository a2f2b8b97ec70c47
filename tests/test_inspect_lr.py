"""`ckpt-avg inspect` and the learning rate (issue 15): the lr column and the schedule's suggested start.

The runs are real: Lightning's StochasticWeightAveraging (cosine and linear annealing),
StepLR, a run saving weights only, and a Hugging Face Trainer run. The oracle for the lr
column is the optimizer itself, read by a callback when ModelCheckpoint saves.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli
from test_inspect import run_inspect

from ckpt_avg.inspect import _figure, inspect_checkpoints, straightness
from ckpt_avg.schedule import Rate, schedule_start

EPOCHS = 20
SWA_EPOCH_START = 10  # Lightning counts it from 1: SWALR starts annealing in (0-based) epoch 9
ANNEALING_EPOCHS = 3
LR, SWA_LR = 0.05, 0.01
STEP_SIZE = 7
CYCLE = 5  # CosineAnnealingWarmRestarts T_0

# Lightning 2.6 under torch 2.13 warns about torch's own pytree API inside Trainer.fit; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


@dataclass(frozen=True)
class LightningRun:
    directory: Path
    rates: dict[int, list[float]]  # epoch -> the optimizer's rates when ModelCheckpoint saved it


def lightning_run(directory: Path, schedule: str) -> LightningRun:
    """A tiny regressor trained on CPU for 20 epochs, a checkpoint every epoch (ModelCheckpoint save_top_k=-1).

    schedule: "cos" or "linear" (StochasticWeightAveraging), "step" (StepLR), "sgdr" (cosine with
    warm restarts every 5 epochs), "weights-only"
    (constant rate, ModelCheckpoint(save_weights_only=True): no optimizer state).
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging
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

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=LR)
            if schedule == "step":
                scheduler: Any = torch.optim.lr_scheduler.StepLR(optimizer, STEP_SIZE, 0.1)
            elif schedule == "sgdr":
                scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, CYCLE, eta_min=1e-3)
            else:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

    class Oracle(Callback):
        """The optimizer's rates at the moment ModelCheckpoint saves (it saves in on_validation_end)."""

        def __init__(self) -> None:
            self.rates: dict[int, list[float]] = {}

        def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.rates[trainer.current_epoch] = [g["lr"] for g in trainer.optimizers[0].param_groups]

    L.seed_everything(0, verbose=False)
    x = torch.randn(256, 8)
    data = DataLoader(TensorDataset(x, x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)), batch_size=32)
    oracle = Oracle()
    checkpoint = ModelCheckpoint(
        dirpath=directory, save_top_k=-1, monitor="val_loss", filename="{epoch}-{val_loss:.4f}",
        save_weights_only=schedule == "weights-only",
    )  # fmt: skip
    callbacks: list[Callback] = [oracle, checkpoint]
    if schedule in ("cos", "linear"):
        callbacks.append(
            StochasticWeightAveraging(
                swa_lrs=SWA_LR, swa_epoch_start=SWA_EPOCH_START, annealing_epochs=ANNEALING_EPOCHS,
                annealing_strategy=schedule,
            )
        )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Regressor(), data, data)
    return LightningRun(directory, oracle.rates)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LightningRun]:
    """The Lightning runs, trained once for the module (under a second each)."""
    root = tmp_path_factory.mktemp("lightning")
    return {name: lightning_run(root / name, name) for name in ("cos", "linear", "step", "sgdr", "weights-only")}


def first_epoch_at_final_rate(rates: dict[int, list[float]]) -> int:
    """The oracle's answer: the first epoch from which the saved rate is the last one's."""
    final = rates[max(rates)]
    epoch = max(rates)
    while epoch - 1 in rates and rates[epoch - 1] == final:
        epoch -= 1
    return epoch


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_swa_lr_column_is_the_optimizers_rate_and_the_start_is_the_swa_rate(
    runs: dict[str, LightningRun], strategy: str
) -> None:
    run = runs[strategy]
    assert sorted(run.rates) == list(range(EPOCHS))
    result = inspect_checkpoints([str(run.directory)])
    rows = result.inspected
    assert [r.index for r in rows] == list(range(EPOCHS))
    assert [r.lr_groups for r in rows] == [run.rates[e] for e in range(EPOCHS)]  # exact: the stored floats
    assert {r.lr_source for r in rows} == {"optimizer_states"}
    annealing = [r.lr for r in rows if r.lr is not None and SWA_LR < r.lr < LR]
    assert len(annealing) == ANNEALING_EPOCHS - 1  # SWALR's intermediate rates are there to see
    start = first_epoch_at_final_rate(run.rates)
    assert run.rates[start] == [SWA_LR] and run.rates[start - 1] != [SWA_LR]
    s = result.suggestion
    assert s is not None and (s.start, s.rule) == (start, "lr-settled")
    assert s.reason == f"lr reached 0.01 at epoch {start} and stayed"
    assert s.count == EPOCHS - start


def test_cosine_and_linear_annealing_differ_in_the_column(runs: dict[str, LightningRun]) -> None:
    cos = [r.lr for r in inspect_checkpoints([str(runs["cos"].directory)]).inspected]
    linear = [r.lr for r in inspect_checkpoints([str(runs["linear"].directory)]).inspected]
    differing = [e for e in range(EPOCHS) if cos[e] != linear[e]]
    assert differing and all(SWA_EPOCH_START - 2 < e < SWA_EPOCH_START + ANNEALING_EPOCHS for e in differing)


def test_swa_run_as_a_user_sees_it(runs: dict[str, LightningRun], monkeypatch: pytest.MonkeyPatch) -> None:
    run = runs["cos"]
    monkeypatch.chdir(run.directory.parent)
    out = run_inspect("cos/").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["epoch", "file", "size", "dtypes", "val_loss", "lr", "drift/prev", "drift/last"]
    start = first_epoch_at_final_rate(run.rates)
    assert lines[1 + start].startswith("*") and not lines[start].startswith("*")
    assert "  0.01  " in lines[1 + start] and "  0.05  " in lines[1]
    assert f"Suggested start: epoch {start} (*) - lr reached 0.01 at epoch {start} and stayed" in out
    assert f"\n  ckpt-avg --start {start} cos/ -o avg.ckpt\n" in out  # like the inputs: load_from_checkpoint reads it
    # The regressor descends almost deterministically: the drift sees no settled phase, and says so.
    assert "Note: the drift alone would suggest no start: the weights drift steadily to the end" in out
    command = shlex.split(f"ckpt-avg --start {start} cos/ -o avg.ckpt")
    report = json.loads(run_cli(*command[1:], "--json").stdout)
    assert [c["epoch"] for c in report["inputs"]] == list(range(start, EPOCHS))


def test_json_carries_the_rate(runs: dict[str, LightningRun]) -> None:
    data = json.loads(run_inspect("--json", runs["linear"].directory).stdout)
    rows = data["rows"]
    assert [r["lr"] for r in rows] == [runs["linear"].rates[e][0] for e in range(EPOCHS)]
    assert all(r["lr_source"] == "optimizer_states" for r in rows)
    assert data["suggestion"]["rule"] == "lr-settled"
    assert data["suggestion"]["reason"].startswith("lr reached 0.01 at epoch ")
    assert "lr" in data["definitions"]


def test_step_lr_suggests_the_last_drop(runs: dict[str, LightningRun]) -> None:
    run = runs["step"]
    result = inspect_checkpoints([str(run.directory)])
    assert [r.lr_groups for r in result.inspected] == [run.rates[e] for e in range(EPOCHS)]
    assert len({r.lr for r in result.inspected}) == 3  # two drops
    start = first_epoch_at_final_rate(run.rates)
    s = result.suggestion
    assert s is not None and s.start == start and s.rule == "lr-settled"
    assert s.reason == f"lr reached 0.0005 at epoch {start} and stayed"


def test_warm_restarts_suggest_the_last_cycle(runs: dict[str, LightningRun]) -> None:
    run = runs["sgdr"]
    result = inspect_checkpoints([str(run.directory)])
    assert [r.lr_groups for r in result.inspected] == [run.rates[e] for e in range(EPOCHS)]
    rises = [e for e in range(1, EPOCHS) if run.rates[e][0] > run.rates[e - 1][0]]
    assert len(rises) == EPOCHS // CYCLE  # Lightning saves after the epoch's step: a restart shows one epoch early
    s = result.suggestion
    assert s is not None and (s.start, s.rule) == (rises[-2], "lr-cycle")  # the last rise is the last checkpoint
    assert s.reason.startswith(f"the last cycle of the learning rate starts at epoch {rises[-2]} (lr rose from ")
    assert s.reason.endswith(f"; the rise at epoch {rises[-1]} starts a cycle too short to average")


def test_weights_only_run_has_no_lr_column_and_no_error(runs: dict[str, LightningRun]) -> None:
    result = run_inspect(runs["weights-only"].directory)
    header = result.stdout.splitlines()[0].split()
    assert "lr" not in header and header[-2:] == ["drift/prev", "drift/last"]
    assert "Learning rate" not in result.stdout and "lr = " not in result.stdout
    data = json.loads(run_inspect("--json", runs["weights-only"].directory).stdout)
    assert {r["lr"] for r in data["rows"]} == {None} and data["schedule"] == ""
    assert data["suggestion"] is None or data["suggestion"]["rule"] == "drift"


def test_plot_has_a_log_scale_lr_panel(runs: dict[str, LightningRun], tmp_path: Path) -> None:
    result = inspect_checkpoints([str(runs["cos"].directory)])
    figure = _figure(result)
    drift, metrics, rate = figure.axes
    assert rate.get_ylabel() == "learning rate" and rate.get_yscale() == "log"
    assert metrics.get_ylabel() == "metrics"
    assert all(ax.get_xlim() == drift.get_xlim() for ax in (metrics, rate))  # one index axis
    run_inspect("--plot", tmp_path / "p.png", runs["cos"].directory)
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    plain = _figure(inspect_checkpoints([str(runs["weights-only"].directory)]))
    assert [ax.get_ylabel() for ax in plain.axes] == ["relative L2 drift", "metrics"]


# -- a real Hugging Face Trainer run ----------------------------------------------------------------


def test_trainer_run_reads_trainer_state(tmp_path: Path) -> None:
    """Trainer with a constant-with-warmup schedule: the rate settles when the warm-up ends."""
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    class Logged(TrainerCallback):
        def __init__(self) -> None:
            self.rates: dict[int, float] = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if logs and "learning_rate" in logs:
                self.rates[state.global_step] = logs["learning_rate"]

    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    args = TrainingArguments(
        str(tmp_path / "out"), max_steps=10, save_steps=2, logging_steps=1, per_device_train_batch_size=4,
        learning_rate=1e-3, lr_scheduler_type="constant_with_warmup", warmup_steps=3, report_to=[],
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    logged = Logged()
    Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=Tokens(), callbacks=[logged]).train()
    result = inspect_checkpoints([str(tmp_path / "out")])
    rows = result.inspected
    assert [r.index for r in rows] == [2, 4, 6, 8, 10]
    assert [r.lr for r in rows] == [logged.rates[r.index] for r in rows if r.index is not None]
    assert {r.lr_source for r in rows} == {"trainer_state.json"}
    assert all("learning_rate" not in r.metrics for r in rows) and all("loss" in r.metrics for r in rows)
    settled = min(step for step in logged.rates if all(logged.rates[s] == 1e-3 for s in logged.rates if s >= step))
    start = min(r.index for r in rows if r.index is not None and r.index >= settled)
    s = result.suggestion
    assert s is not None and (s.start, s.rule) == (start, "lr-settled")
    assert s.command.endswith(" -o avg/")


# -- the rules, on sequences and on synthetic files ---------------------------------------------------


def rates(*values: float | tuple[float, ...] | None) -> list[Rate | None]:
    return [None if v is None else Rate(v if isinstance(v, tuple) else (v,), "optimizer") for v in values]


def labels(n: int) -> list[str]:
    return [f"epoch {e}" for e in range(n)]


def test_schedule_rules() -> None:
    swalr = rates(0.1, 0.1, 0.1, 0.08, 0.04, 0.02, 0.02, 0.02)
    assert schedule_start(swalr, labels(8)).position == 5
    # SGDR: restarts at epochs 4 and 8; the last cycle starts at 8
    sgdr = rates(0.1, 0.05, 0.02, 0.01, 0.1, 0.05, 0.02, 0.01, 0.1, 0.05, 0.02)
    cycle = schedule_start(sgdr, labels(11))
    assert (cycle.position, cycle.rule) == (8, "lr-cycle")
    assert cycle.reason == "the last cycle of the learning rate starts at epoch 8 (lr rose from 0.01 to 0.1)"
    # a warm-up then a decay to the end: neither settles nor cycles
    decay = schedule_start(rates(0.01, 0.05, 0.1, 0.08, 0.06, 0.04, 0.02), labels(7))
    assert decay.position is None
    assert decay.reason == "lr still changes at the last checkpoint (0.01 to 0.02): no constant or cyclic phase"
    assert schedule_start(rates(0.1, 0.1, 0.1, 0.1), labels(4)).reason == "lr is 0.1 throughout"
    assert schedule_start(rates(None, None, None, None), labels(4)).reason == ""
    assert schedule_start(rates(0.1, None, 0.1, 0.1), labels(4)).reason == "no learning rate in 1 of the 4 checkpoints"
    # a drop at the very last checkpoint is not a settled phase (one checkpoint to average)
    assert schedule_start(rates(0.1, 0.1, 0.1, 0.01), labels(4)).position is None
    # groups settle together: the head's rate still changes after the body's settled
    groups = rates((0.1, 1.0), (0.01, 0.5), (0.01, 0.1), (0.01, 0.1))
    assert schedule_start(groups, labels(4)).position == 2
    assert rates((0.001, 0.01))[0].text() == "0.001\u20130.01"  # type: ignore[union-attr]


def test_straightness() -> None:
    assert straightness([None, 0.1, 0.1, 0.1], [0.3, 0.2, 0.1, 0.0], 0) == 1.0
    assert straightness([None, 0.1, 0.1], [0.2, 0.1, 0.0], 0) is None  # two steps: too few to tell
    assert straightness([None, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.0], 0) == 0.25


def save_run(directory: Path, weights: list[torch.Tensor], lrs: list[Any], key: str = "optimizer") -> None:
    directory.mkdir()
    for epoch, (w, lr) in enumerate(zip(weights, lrs, strict=True)):
        checkpoint: dict[str, Any] = {"model": {"w": w}, "epoch": epoch}
        if lr is not None:
            groups = [
                {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": r}
                for r in (lr if isinstance(lr, tuple) else (lr,))
            ]
            checkpoint[key] = torch.optim.SGD(groups, momentum=0.9).state_dict()
        torch.save(checkpoint, directory / f"epoch_{epoch}.pt")


def settling_weights(n: int = 16, settle: int = 8) -> list[torch.Tensor]:
    """Big random jumps up to `settle`, small noise around one point after."""
    g = torch.Generator().manual_seed(3)
    center = torch.randn(400, generator=g)
    return [center + (1.0 if e < settle else 1e-3) * torch.randn(400, generator=g) for e in range(n)]


def test_drift_and_rate_disagree_both_are_shown(tmp_path: Path) -> None:
    save_run(tmp_path / "run", settling_weights(), [0.1] * 4 + [0.01] * 12, key="last_optimizer_state")  # fairseq
    out = run_inspect(tmp_path / "run").stdout
    assert "Suggested start: epoch 4 (*) - lr reached 0.01 at epoch 4 and stayed; 12 checkpoint(s) to average:" in out
    assert "The drift alone suggests epoch 8: from there on every drift/prev is within 1.5 x " in out
    assert f"  ckpt-avg --start 8 {tmp_path / 'run'} -o avg.pt" in out


def test_drift_and_rate_agree(tmp_path: Path) -> None:
    save_run(tmp_path / "run", settling_weights(), [0.1] * 8 + [0.01] * 8)
    out = run_inspect(tmp_path / "run").stdout
    assert "Suggested start: epoch 8 (*) - lr reached 0.01 at epoch 8 and stayed (the drift agrees);" in out
    assert "The drift alone" not in out


def test_param_groups_that_differ_show_min_max(tmp_path: Path) -> None:
    save_run(tmp_path / "run", settling_weights(6, 2), [(0.01, 0.001)] * 6)
    result = run_inspect(tmp_path / "run")
    assert "0.001\u20130.01" in result.stdout.splitlines()[1]
    assert "Learning rate: lr is 0.001\u20130.01 throughout, so the drift decides." in result.stdout
    row = json.loads(run_inspect("--json", tmp_path / "run").stdout)["rows"][0]
    assert (row["lr"], row["lr_groups"]) == (0.01, [0.01, 0.001])


def test_steadily_drifting_run_gets_no_suggestion(tmp_path: Path) -> None:
    """The weights travel a line at a constant pace: no step leaves the band, and nothing settles."""
    g = torch.Generator().manual_seed(5)
    start, direction = torch.randn(300, generator=g), torch.randn(300, generator=g)
    weights = [start + 0.02 * t * direction + 1e-4 * torch.randn(300, generator=g) for t in range(12)]
    save_run(tmp_path / "run", weights, [None] * 12)
    out = run_inspect(tmp_path / "run").stdout
    assert "No suggested start: the weights drift steadily to the end: from epoch 0 on" in out
    assert "ckpt-avg --start" not in out


def test_unrelated_checkpoints_get_no_suggestion(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    save_run(tmp_path / "run", [torch.randn(300, generator=g) for _ in range(8)], [None] * 8)
    out = run_inspect(tmp_path / "run").stdout
    assert "No suggested start: each step moves the weights by " in out
    assert "these checkpoints do not look like one run settling" in out


def test_rate_sources_without_an_optimizer(tmp_path: Path) -> None:
    """torchvision's `lr_scheduler` state, a top-level `lr`; mmengine's named optimizers."""
    from mmengine.optim import OptimWrapper, OptimWrapperDict

    def sgd(lr: float) -> torch.optim.SGD:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)

    directory = tmp_path / "mixed"
    directory.mkdir()
    w = torch.ones(3)
    optimizer = sgd(0.2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    optimizer.step()
    scheduler.step()
    torch.save({"epoch": 0, "state_dict": {"w": w}, "lr_scheduler": scheduler.state_dict()}, directory / "a_0.pt")
    torch.save({"epoch": 1, "state_dict": {"w": w}, "lr": 0.3}, directory / "a_1.pt")
    wrappers = OptimWrapperDict(gen=OptimWrapper(sgd(0.4)), disc=OptimWrapper(sgd(0.04)))
    # mmengine Runner.save_checkpoint: {'meta', 'state_dict', 'optimizer': optim_wrapper.state_dict(), ...}
    torch.save({"meta": {"epoch": 2}, "state_dict": {"w": w}, "optimizer": wrappers.state_dict()}, directory / "a_2.pt")
    rows = inspect_checkpoints([str(directory / f"a_{e}.pt") for e in range(3)]).inspected
    assert [(r.lr_groups, r.lr_source) for r in rows] == [
        ([0.1], "lr_scheduler"),
        ([0.3], "lr"),
        ([0.4, 0.04], "optimizer"),
    ]
    assert "lr" not in rows[1].metrics


def test_a_tensor_learning_rate_is_read(tmp_path: Path) -> None:
    """Optimizers may hold `lr` as a one-element tensor (fused, capturable); its value is the rate."""
    for epoch in range(4):
        parameter = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.SGD([parameter], lr=torch.tensor(0.5 / (epoch + 1), dtype=torch.float64))
        torch.save({"model": {"w": torch.full((3,), float(epoch))}, "optimizer": optimizer.state_dict()},
                   tmp_path / f"epoch_{epoch}.pt")  # fmt: skip
    rows = inspect_checkpoints([str(tmp_path)]).inspected
    assert [r.lr for r in rows] == [0.5, 0.25, 0.5 / 3, 0.125]
