"""Issue 11: real training runs of mmengine (with and without EMAHook), accelerate
(`save_state()` with one and two models) and transformers' Trainer, averaged with the
default command and loaded back with each library's own loader.

Each run costs seconds, so each is made once per module and shared.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import oracle_mean, run_cli
from safetensors.torch import load_file


def _assert_mean(averaged: dict[str, torch.Tensor], inputs: list[dict[str, torch.Tensor]]) -> None:
    assert set(averaged) == set(inputs[-1])
    for key, value in averaged.items():
        expected = oracle_mean([sd[key] for sd in inputs]) if value.dtype.is_floating_point else inputs[-1][key]
        assert torch.equal(value, expected), key


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


# --- mmengine -----------------------------------------------------------------------------


def _mmengine_run(work_dir: Path, ema: bool) -> Path:
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from torch.utils.data import TensorDataset

    class Tiny(BaseModel):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None, mode: str = "tensor") -> Any:
            out = self.net(inputs)
            if mode == "loss":
                return {"loss": torch.nn.functional.cross_entropy(out, labels)}
            return out

    def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"inputs": torch.stack([b[0] for b in batch]), "labels": torch.stack([b[1] for b in batch])}

    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    runner = Runner(
        model=Tiny(),
        work_dir=str(work_dir),
        train_dataloader={"dataset": dataset, "batch_size": 8, "sampler": {"type": "DefaultSampler"},
                          "collate_fn": collate},
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
        train_cfg={"by_epoch": True, "max_epochs": 5},
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 1},
                       "logger": {"type": "LoggerHook", "interval": 100}},
        custom_hooks=[{"type": "EMAHook"}] if ema else [],
        log_level="ERROR",
        # mmengine names its global scope after the start time to the second: two runners in
        # one second (or one left by another test) would clash, and warn, without a name of their own.
        experiment_name=f"ckpt_avg_{work_dir.name}_{uuid.uuid4().hex}",
    )  # fmt: skip
    runner.train()
    logging.getLogger("mmengine").handlers.clear()
    return work_dir


@pytest.fixture(scope="module")
def mmengine_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mmengine")
    return {"plain": _mmengine_run(root / "plain", False), "ema": _mmengine_run(root / "ema", True)}


def _mmengine_inputs(work_dir: Path, epochs: range, key: str = "state_dict") -> list[dict[str, torch.Tensor]]:
    return [torch.load(work_dir / f"epoch_{e}.pth", weights_only=False)[key] for e in epochs]


@pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
@pytest.mark.parametrize("kind", ["plain", "ema"])
def test_mmengine(mmengine_runs: dict[str, Path], tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmengine.runner import load_checkpoint

    work_dir = mmengine_runs[kind]
    out = tmp_path / "avg.pth"
    result = run_cli("--last", "3", work_dir, "-o", out)
    assert "getattr" not in result.stderr  # HistoryBuffer's getattr(cls, 'min') is not code to warn about
    assert "3 checkpoint(s) (epoch 3-5)" in result.stderr
    if kind == "ema":
        assert "'state_dict' holds the EMA weights of mmengine's EMAHook" in result.stderr
    model = _net()
    wrapper = torch.nn.Module()
    wrapper.net = model
    # mmengine 0.10 loads its own checkpoints (numpy seeds, HistoryBuffer) only with full unpickling
    # under torch >= 2.6: users set this variable, and so does the test.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    load_checkpoint(wrapper, str(out), map_location="cpu", strict=True)  # mmengine's own loader
    written = torch.load(out, weights_only=False)
    _assert_mean(written["state_dict"], _mmengine_inputs(work_dir, range(3, 6)))
    if kind == "ema":  # the raw weights and EMAHook's `steps` counter, averaged beside them
        raw = _mmengine_inputs(work_dir, range(3, 6), "ema_state_dict")
        _assert_mean(written["ema_state_dict"], raw)


def test_mmengine_ema_raw_weights_by_key(mmengine_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "raw.safetensors"
    run_cli("--last", "3", mmengine_runs["ema"], "--key", "ema_state_dict", "--strip-prefix", "module.", "-o", out)
    raw = _mmengine_inputs(mmengine_runs["ema"], range(3, 6), "ema_state_dict")
    stripped = [{k.removeprefix("module."): v for k, v in sd.items()} for sd in raw]
    _assert_mean(load_file(out), stripped)


def test_a_differing_integer_in_a_second_state_dict_names_that_dict(tmp_path: Path) -> None:
    for epoch in range(3):
        sd = {"w": torch.randn(2)}
        ema = {"w": torch.randn(2), "codes": torch.tensor([epoch])}
        torch.save({"state_dict": sd, "ema_state_dict": ema}, tmp_path / f"epoch_{epoch}.pth")
    result = run_cli(tmp_path, "-o", tmp_path / "avg.pth", expect=1)
    assert "integer tensor 'ema_state_dict.codes' differs" in result.stderr


# --- accelerate ------------------------------------------------------------------------------


def _accelerate_run(project: Path, two_models: bool) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    torch.manual_seed(0)
    config = ProjectConfiguration(project_dir=str(project), automatic_checkpoint_naming=True)
    accelerator = Accelerator(project_config=config, cpu=True)
    models = [_net()] + ([torch.nn.Linear(3, 3)] if two_models else [])
    optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.1)
    *models, optimizer = accelerator.prepare(*models, optimizer)
    for _ in range(12):
        loss = models[0](torch.randn(8, 4)).sum() + sum(m(torch.randn(2, 3)).sum() for m in models[1:])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.save_state()
    return project / "checkpoints"


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("accelerate")
    return {"one": _accelerate_run(root / "one", False), "two": _accelerate_run(root / "two", True)}


def test_accelerate_orders_by_save_count_not_by_string(accelerate_runs: dict[str, Path], tmp_path: Path) -> None:
    from accelerate.utils import load_checkpoint_in_model

    checkpoints = accelerate_runs["one"]
    assert sorted(os.listdir(checkpoints))[:4] == ["checkpoint_0", "checkpoint_1", "checkpoint_10", "checkpoint_11"]
    out = tmp_path / "avg"
    result = run_cli("--last", "3", checkpoints, "-o", f"{out}/")
    assert "3 checkpoint(s) (save 9-11)" in result.stderr
    inputs = [load_file(checkpoints / f"checkpoint_{k}" / "model.safetensors") for k in (9, 10, 11)]
    _assert_mean(load_file(out / "model.safetensors"), inputs)
    model = _net()
    load_checkpoint_in_model(model, str(out / "model.safetensors"), strict=True)
    # A quoted glob orders the same way.
    result = run_cli("--last", "3", str(checkpoints / "checkpoint_*"), "--dry-run")
    assert "checkpoint_11" in result.stdout.splitlines()[-3] or "save count" in result.stdout


def test_accelerate_second_model_is_named_as_left_out(accelerate_runs: dict[str, Path], tmp_path: Path) -> None:
    import json
    import shlex

    checkpoints = accelerate_runs["two"]
    out = tmp_path / "avg.safetensors"
    result = run_cli("--last", "3", checkpoints, "-o", out, "--json")
    report = json.loads(result.stdout)
    assert report["dropped"] == ["model_1.safetensors (a second model in each checkpoint directory)"]
    warning = next(w for w in report["warnings"] if "LEFT OUT: model_1.safetensors" in w)
    command = shlex.split(warning.split("with: ", 1)[1])
    assert command[0] == "ckpt-avg"
    second = tmp_path / "model_1_avg.safetensors"
    run_cli(*command[1:-1], str(second))
    inputs = [load_file(checkpoints / f"checkpoint_{k}" / "model_1.safetensors") for k in (9, 10, 11)]
    _assert_mean(load_file(second), inputs)


# --- transformers Trainer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    output = tmp_path_factory.mktemp("trainer") / "out"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (16, 8))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(output), max_steps=5, save_steps=1, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=dataset).train()
    return output


def test_transformers_trainer(trainer_run: Path, tmp_path: Path) -> None:
    import transformers

    out = tmp_path / "avg"
    result = run_cli("--last", "3", trainer_run, "-o", f"{out}/")
    assert "3 checkpoint(s) (step 3-5)" in result.stderr
    inputs = [load_file(trainer_run / f"checkpoint-{k}" / "model.safetensors") for k in (3, 4, 5)]
    _assert_mean(load_file(out / "model.safetensors"), inputs)
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert torch.equal(model.transformer.wte.weight, load_file(out / "model.safetensors")["transformer.wte.weight"])
