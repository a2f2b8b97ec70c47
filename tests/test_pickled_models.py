"""Issue 11, items 6-8: non-tensor state-dict entries, whole pickled models (YOLO, torch.save(model))
and --trust-pickle importing the user's classes the way --allow-global and --bn-model do."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import oracle_mean, run_cli
from safetensors.torch import load_file

# A model class the averaging never imports: written into each test's directory, so only a
# process started there (and only under --trust-pickle) can import it.
MODEL_SOURCE = textwrap.dedent(
    """
    import torch

    class TinyDetect(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
            self.head = torch.nn.Linear(4, 2)
            self.register_buffer("anchors", torch.ones(2))
            self.register_buffer("scratch", torch.zeros(1), persistent=False)
    """
)


def _cli(cwd: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """ckpt-avg as an installed console script runs it: the current directory NOT on sys.path (-P)."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "ckpt_avg", *map(str, args)], cwd=cwd, capture_output=True, text=True
    )


@contextlib.contextmanager
def model_class(directory: Path) -> Iterator[type[torch.nn.Module]]:
    """The test's model class, importable (to build, save and load it) only inside the block."""
    sys.path.insert(0, str(directory))
    try:
        yield __import__("tinyyolo").TinyDetect  # type: ignore[no-any-return]
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("tinyyolo", None)


def _tiny_detect(cls: type[torch.nn.Module], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls()


def yolo_run(run: Path, epochs: int = 5) -> list[dict[str, torch.Tensor]]:
    """As ultralytics' BaseTrainer.save_model with save_period=1: the same bytes go to
    weights/last.pt, weights/best.pt (when best) and weights/epoch{N}.pt (epochs from 0); the
    checkpoint holds `model: None` and `ema`: a whole half-precision module. At the end,
    strip_optimizer rewrites last.pt and best.pt with epoch -1 and the EMA as `model`."""
    (run / "tinyyolo.py").write_text(MODEL_SOURCE)
    weights = run / "weights"
    weights.mkdir()
    states = []
    with model_class(run) as cls:
        for epoch in range(epochs):
            ema = _tiny_detect(cls, epoch).half()
            states.append({k: v.clone() for k, v in ema.state_dict().items()})
            checkpoint = {"epoch": epoch, "best_fitness": 0.5, "model": None, "ema": ema, "updates": 10 * epoch,
                          "optimizer": None, "train_args": {"epochs": epochs}, "version": "8.3"}  # fmt: skip
            for name in ("last.pt", *(["best.pt"] if epoch in (1, 3) else []), f"epoch{epoch}.pt"):
                torch.save(checkpoint, weights / name)
        for name in ("last.pt", "best.pt"):  # strip_optimizer
            stripped = torch.load(weights / name, weights_only=False)
            stripped.update(model=stripped["ema"], ema=None, optimizer=None, updates=None, epoch=-1)
            torch.save(stripped, weights / name)
    return states


@pytest.fixture
def yolo(tmp_path: Path) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    run = tmp_path / "runs" / "detect" / "train"
    run.mkdir(parents=True)
    return run, yolo_run(run)


def test_yolo_pt_output_without_trust_names_the_command_that_works(
    yolo: tuple[Path, list[dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    run, states = yolo
    result = run_cli("--last", "3", run / "weights", "-o", tmp_path / "avg.pt", expect=1)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "ema is a whole pickled model (tinyyolo.TinyDetect)" in error
    assert "Placeholder" not in result.stderr and f"-o {tmp_path / 'avg'}.safetensors" in error
    assert not (tmp_path / "avg.pt").exists()
    # The command it names works, without importing the class.
    result = run_cli("--last", "3", run / "weights", "-o", tmp_path / "avg.safetensors", "--json")
    assert "placeholders" not in result.stderr  # the model's classes were read as data, nothing is lost
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in json.loads(result.stdout)["skipped"]}
    assert skipped["last.pt"].startswith("alias") and skipped["best.pt"].startswith("alias")
    averaged = load_file(tmp_path / "avg.safetensors")
    for key, value in averaged.items():
        expected = oracle_mean([s[key] for s in states[2:]]) if value.is_floating_point() else states[-1][key]
        assert torch.equal(value, expected), key
    with model_class(run) as cls:
        cls().half().load_state_dict(averaged, strict=True)
    assert "scratch" not in averaged  # a non-persistent buffer is not part of the state dict


def test_yolo_with_trust_pickle_keeps_the_module_importing_it_from_the_current_directory(
    yolo: tuple[Path, list[dict[str, torch.Tensor]]],
) -> None:
    run, states = yolo
    result = _cli(run, "--last", "3", "weights", "-o", "avg.pt", "--trust-pickle")
    assert result.returncode == 0, result.stderr
    with model_class(run):
        loaded = torch.load(run / "avg.pt", weights_only=False)
    module = loaded["ema"]
    assert type(module).__name__ == "TinyDetect" and isinstance(module.head.weight, torch.nn.Parameter)
    assert torch.equal(module.head.weight.data, oracle_mean([s["head.weight"] for s in states[2:]]))
    assert loaded["epoch"] == 4


def test_only_library_copies_refuse_with_a_command(tmp_path: Path) -> None:
    run = tmp_path / "train"
    run.mkdir()
    yolo_run(run, epochs=3)
    for path in (run / "weights").glob("epoch*.pt"):
        path.unlink()  # YOLO's default (save_period=-1) keeps only last.pt and best.pt
    result = run_cli("--last", "3", run / "weights", "-o", tmp_path / "avg.safetensors", expect=1)
    error = result.stderr.strip()
    assert error.count("\n") == 0 and "only copies" in error
    command = error.split("name them: ", 1)[1].replace("OUTPUT", str(tmp_path / "avg.safetensors"))
    run_cli(*command.split()[1:])


def test_torch_save_of_a_whole_model(tmp_path: Path) -> None:
    (tmp_path / "tinyyolo.py").write_text(MODEL_SOURCE)
    states = []
    with model_class(tmp_path) as cls:
        for epoch in range(3):
            model = _tiny_detect(cls, epoch)
            states.append(model.state_dict())
            torch.save(model, tmp_path / f"epoch_{epoch}.pt")
    out = tmp_path / "out" / "avg.safetensors"
    out.parent.mkdir()
    result = run_cli(tmp_path, "-o", out)
    assert "Placeholder" not in result.stderr
    assert torch.equal(load_file(out)["head.weight"], oracle_mean([s["head.weight"] for s in states]))


class WithExtraState(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.fp8_meta = {"scale": scale, "history": [scale, 2 * scale]}

    def get_extra_state(self) -> dict[str, object]:
        return self.fp8_meta

    def set_extra_state(self, state: dict[str, object]) -> None:
        self.fp8_meta = state


def test_extra_state_is_copied_from_the_last_and_counted(tmp_path: Path) -> None:
    states = []
    for epoch in range(3):
        torch.manual_seed(epoch)
        model = WithExtraState(float(epoch))
        states.append(model.state_dict())
        torch.save({"state_dict": model.state_dict(), "epoch": epoch}, tmp_path / f"epoch_{epoch}.pt")
    out = tmp_path / "avg.pt"
    result = run_cli(tmp_path, "-o", out)
    assert "1 state-dict entry is not weights" in result.stderr and "_extra_state" in result.stderr
    averaged = torch.load(out, weights_only=True)["state_dict"]
    assert averaged["_extra_state"] == {"scale": 2.0, "history": [2.0, 4.0]}
    assert torch.equal(averaged["linear.weight"], oracle_mean([s["linear.weight"] for s in states]))
    restored = WithExtraState(0.0)
    restored.load_state_dict(averaged, strict=True)
    assert restored.fp8_meta["scale"] == 2.0
    flat = tmp_path / "avg.safetensors"
    result = run_cli(tmp_path, "-o", flat)
    assert "left out of this flat output" in result.stderr


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:torch.quantize_per_tensor:UserWarning")
def test_dynamic_quantization_packed_params(tmp_path: Path) -> None:
    # quantize_dynamic's state dict holds `_packed_params` entries (a dtype; a tuple holding a
    # quantized tensor) beside float tensors: found as a state dict, never averaged.
    states = []
    for epoch in range(3):
        torch.manual_seed(epoch)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        states.append(quantized.state_dict())
        torch.save({"model": quantized.state_dict(), "epoch": epoch}, tmp_path / f"epoch_{epoch}.pt")
    out = tmp_path / "out" / "avg.safetensors"
    out.parent.mkdir()
    result = run_cli(tmp_path, "-o", out)
    assert "4 state-dict entries are not weights" in result.stderr and "left out of this flat output" in result.stderr
    assert torch.equal(load_file(out)["1.weight"], oracle_mean([s["1.weight"] for s in states]))
    result = run_cli(tmp_path, "-o", tmp_path / "avg.pt", expect=1)
    assert "'0._packed_params._packed_params' in model holds a quantized tensor" in result.stderr
    assert not (tmp_path / "avg.pt").exists()
