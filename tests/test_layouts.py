"""The checkpoint layouts of fairseq, timm and plain scripts, averaged exactly (SPEC 1.1, 1.4, 1.5, 1.7).

Every checkpoint is built at test time with torch.save / safetensors in the structure the
library writes, and every output is compared element for element with the float64 oracle.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import leftovers, oracle_mean, run_cli
from safetensors.torch import load_file, save_file

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPOCHS = 5

# Five values per dtype whose float64 mean lies just above a halfway point of the dtype,
# close enough that rounding through float32 first lands on the halfway point and then
# rounds to even (down): a double rounding gives the wrong answer, a single one rounds up.
_DOUBLE_ROUNDING = {
    torch.bfloat16: [2 + 2**-6, 2.0, 1.0, 2**-8, 2**-25],  # mean = 1 + 2^-8 + 2^-25/5
    torch.float16: [2 + 2**-9, 2.0, 1.0, 2**-11, 2**-24],  # mean = 1 + 2^-11 + 2^-24/5
    torch.float32: [0.125, 0.25, 0.375, 0.5, 0.875],
}


def model_state(k: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state dict of a small model after epoch k: floats, BatchNorm buffers, an int buffer."""
    g = torch.Generator().manual_seed(1000 + k)
    tricky = torch.tensor([_DOUBLE_ROUNDING[dtype][k % EPOCHS], 0.5], dtype=torch.float64).to(dtype)
    assert tricky.to(torch.float64).tolist() == [_DOUBLE_ROUNDING[dtype][k % EPOCHS], 0.5]
    return {
        "embed.weight": torch.randn(11, 4, generator=g).to(dtype),
        "encoder.weight": torch.randn(8, 4, generator=g).to(dtype),
        "encoder.bias": torch.randn(8, generator=g).to(dtype),
        "bn.weight": (1 + 0.1 * torch.randn(8, generator=g)).to(dtype),
        "bn.bias": (0.1 * torch.randn(8, generator=g)).to(dtype),
        "bn.running_mean": torch.randn(8, generator=g).to(dtype),
        "bn.running_var": (0.5 + torch.rand(8, generator=g)).to(dtype),
        "bn.num_batches_tracked": torch.tensor(100 * (k + 1)),
        "head.weight": torch.randn(3, 8, generator=g).to(dtype),
        "tricky": tricky,
        "position_ids": torch.arange(6).unsqueeze(0),
    }


def optimizer_state(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    floats = [v for v in sd.values() if v.is_floating_point()]
    return {
        "state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.ones_like(v)}
                  for i, v in enumerate(floats)},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(len(floats)))}],
    }  # fmt: skip


@dataclass
class Run:
    directory: Path
    trees: list[Any]  # the selected checkpoints' contents, in index order
    names: list[str]  # their file names
    skipped: dict[str, str]  # file name -> a word its reason must contain
    key: str | None  # where the weights sit in a .pt checkpoint; None when flat

    def states(self, key: str | None = None) -> list[dict[str, torch.Tensor]]:
        key = key or self.key
        return [t[key] if key else t for t in self.trees]


def fairseq_run(root: Path, dtype: torch.dtype) -> Run:
    directory = root / "fairseq"
    directory.mkdir()
    trees = []
    for k in range(1, EPOCHS + 1):
        sd = model_state(k - 1, dtype)
        tree = {
            "args": argparse.Namespace(arch="transformer_iwslt_de_en", lr=[5e-4], max_epoch=EPOCHS, fp16=False),
            "model": sd,
            "optimizer_history": [
                {"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                 "lr_scheduler_state": {"best": 3.9 - 0.1 * k}, "num_updates": 300 * k},
            ],
            "extra_state": {
                "metrics": {},
                "previous_training_time": 12.5 * k,
                # As fairseq saves it at the end of epoch k: the epoch to resume, none of it done.
                "train_iterator": {"version": 2, "epoch": k + 1, "iterations_in_epoch": 0, "shuffle": True},
                "val_loss": 4.0 - 0.1 * k,
            },
            "last_optimizer_state": optimizer_state(sd),
        }  # fmt: skip
        torch.save(tree, directory / f"checkpoint{k}.pt")
        trees.append(tree)
    shutil.copyfile(directory / "checkpoint3.pt", directory / "checkpoint_best.pt")
    shutil.copyfile(directory / f"checkpoint{EPOCHS}.pt", directory / "checkpoint_last.pt")
    names = [f"checkpoint{k}.pt" for k in range(1, EPOCHS + 1)]
    return Run(directory, trees, names, {"checkpoint_best.pt": "alias", "checkpoint_last.pt": "alias"}, "model")


def timm_run(root: Path, dtype: torch.dtype) -> Run:
    directory = root / "timm"
    directory.mkdir()
    trees = []
    for k in range(EPOCHS):
        sd = model_state(k, dtype)
        ema = {name: (v * 0.5 if v.is_floating_point() else v.clone()) for name, v in model_state(k + 7, dtype).items()}
        tree = {
            "epoch": k,
            "arch": "resnet18",
            "state_dict": sd,
            "optimizer": optimizer_state(sd),
            "version": 2,
            "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=EPOCHS, amp=dtype != torch.float32),
            "metric": 50.0 + k,
            "state_dict_ema": ema,
            "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": k},  # timm's --amp
        }
        torch.save(tree, directory / f"checkpoint-{k}.pth.tar")
        trees.append(tree)
    shutil.copyfile(directory / "checkpoint-2.pth.tar", directory / "model_best.pth.tar")
    os.link(directory / f"checkpoint-{EPOCHS - 1}.pth.tar", directory / "last.pth.tar")
    names = [f"checkpoint-{k}.pth.tar" for k in range(EPOCHS)]
    return Run(directory, trees, names, {"model_best.pth.tar": "alias", "last.pth.tar": "same file"}, "state_dict")


def plain_run(root: Path, dtype: torch.dtype) -> Run:
    directory = root / "plain"
    directory.mkdir()
    trees = [model_state(k, dtype) for k in range(1, EPOCHS + 1)]
    for k, sd in enumerate(trees, start=1):
        torch.save(sd, directory / f"epoch_{k}.pt")
    return Run(directory, trees, [f"epoch_{k}.pt" for k in range(1, EPOCHS + 1)], {}, None)


def safetensors_run(root: Path, dtype: torch.dtype) -> Run:
    directory = root / "st"
    directory.mkdir()
    trees = [model_state(k, dtype) for k in range(EPOCHS)]
    for k, sd in enumerate(trees):
        save_file(sd, str(directory / f"epoch_{k}.safetensors"))
    return Run(directory, trees, [f"epoch_{k}.safetensors" for k in range(EPOCHS)], {}, None)


LAYOUTS: dict[str, Callable[[Path, torch.dtype], Run]] = {
    "fairseq": fairseq_run,
    "timm": timm_run,
    "plain": plain_run,
    "safetensors": safetensors_run,
}


def load(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_averaged(
    out: dict[str, torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    *,
    weights: list[float] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Floats equal the oracle element for element; integer tensors are the last checkpoint's."""
    assert set(out) == set(states[-1])
    for name, last in states[-1].items():
        got = out[name]
        if last.is_floating_point():
            expected = oracle_mean([s[name] for s in states], weights, dtype)
            assert got.dtype == expected.dtype, name
            assert torch.equal(got, expected), f"{name}: max diff {(got.double() - expected.double()).abs().max()}"
        else:
            assert got.dtype == last.dtype, name
            assert torch.equal(got, last), name


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_averages_exactly(tmp_path: Path, layout: str, dtype: torch.dtype) -> None:
    run = LAYOUTS[layout](tmp_path, dtype)
    suffix = ".safetensors" if layout == "safetensors" else ".pt"
    out = tmp_path / f"avg{suffix}"

    plan = json.loads(run_cli("--dry-run", "--json", run.directory).stdout)
    assert [os.path.basename(c["path"]) for c in plan["inputs"]] == run.names
    skipped = {os.path.basename(s["path"]): s["reason"] for s in plan["skipped"]}
    assert set(skipped) == set(run.skipped)
    for name, word in run.skipped.items():
        assert word in skipped[name], (name, skipped[name])
    assert not out.exists()

    run_cli(run.directory, "-o", out)
    result = load(out)
    assert_averaged(result[run.key] if run.key else result, run.states())
    assert leftovers(tmp_path) == []

    if layout == "safetensors":
        return
    last = run.trees[-1]
    if run.key is None:
        assert "ckpt_avg" not in result  # a flat state dict stays loadable with strict=True
        return
    for dropped in ("optimizer", "last_optimizer_state", "amp_scaler"):
        assert dropped not in result
    assert isinstance(result["args"], argparse.Namespace)
    assert result["args"] == last["args"]
    assert isinstance(result["ckpt_avg"], dict)
    assert [os.path.basename(i["path"]) for i in result["ckpt_avg"]["inputs"]] == run.names
    if layout == "fairseq":
        assert result["extra_state"] == last["extra_state"]
        assert result["optimizer_history"][-1]["num_updates"] == last["optimizer_history"][-1]["num_updates"]
    if layout == "timm":
        assert (result["epoch"], result["arch"], result["version"], result["metric"]) == (4, "resnet18", 2, 54.0)
        # The EMA weights are averaged too, in place.
        assert_averaged(result["state_dict_ema"], run.states("state_dict_ema"))


def test_double_rounding_tensor_is_really_tricky() -> None:
    """The `tricky` values do break a float32 round trip: the layouts test above would catch it."""
    for dtype in (torch.bfloat16, torch.float16):
        values = torch.tensor(_DOUBLE_ROUNDING[dtype], dtype=torch.float64)
        mean = values.sum() / len(values)
        assert mean.to(torch.float32).to(dtype) != oracle_mean([v.to(dtype).reshape(1) for v in values])[0]


@pytest.mark.parametrize("layout", ["fairseq", "timm", "plain"])
def test_safetensors_output_from_pt_inputs(tmp_path: Path, layout: str) -> None:
    run = LAYOUTS[layout](tmp_path, torch.bfloat16)
    out = tmp_path / "avg.safetensors"
    run_cli(run.directory, "-o", out)
    assert_averaged(load_file(str(out)), run.states())


def test_selection_options_on_a_fairseq_run(tmp_path: Path) -> None:
    run = fairseq_run(tmp_path, torch.float32)
    out = tmp_path / "avg.pt"
    run_cli("--start", "3", "--end", "4", run.directory, "-o", out)
    assert_averaged(load(out)["model"], run.states()[2:4])
    run_cli("--last", "2", run.directory, "-o", out, "--force")
    assert_averaged(load(out)["model"], run.states()[3:])


def test_fairseq_mid_epoch_checkpoints_are_skipped(tmp_path: Path) -> None:
    run = fairseq_run(tmp_path, torch.float32)
    mid = dict(run.trees[2], model=model_state(42))
    torch.save(mid, run.directory / "checkpoint_3_850.pt")
    out = tmp_path / "avg.pt"
    report = json.loads(run_cli("--json", run.directory, "-o", out).stdout)
    skipped = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
    assert "mid-epoch" in skipped["checkpoint_3_850.pt"]
    assert_averaged(load(out)["model"], run.states())


def test_weights(tmp_path: Path) -> None:
    run = plain_run(tmp_path, torch.float32)
    out = tmp_path / "avg.pt"
    run_cli("--start", "3", "--weights", "1,2,5", run.directory, "-o", out)
    assert_averaged(load(out), run.states()[2:], weights=[1, 2, 5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema(tmp_path: Path, dtype: torch.dtype) -> None:
    """avg = d*avg + (1-d)*theta_t from the first: weights d^(T-1), then (1-d)*d^(T-t)."""
    run = timm_run(tmp_path, dtype)
    out = tmp_path / "ema.pt"
    decay, count = 0.75, EPOCHS
    weights = [decay ** (count - 1)] + [(1 - decay) * decay ** (count - t) for t in range(2, count + 1)]
    assert sum(weights) == 1.0  # exact in binary, so the oracle's normalisation changes nothing
    run_cli("--ema", str(decay), run.directory, "-o", out)
    assert_averaged(load(out)["state_dict"], run.states(), weights=weights)
    # The same thing as the running recursion, to float tolerance.
    states = run.states()
    running = states[0]["encoder.weight"].double()
    for sd in states[1:]:
        running = decay * running + (1 - decay) * sd["encoder.weight"].double()
    torch.testing.assert_close(load(out)["state_dict"]["encoder.weight"].double(), running, atol=1e-2, rtol=1e-2)


def test_weights_count_must_match_the_selection(tmp_path: Path) -> None:
    run = plain_run(tmp_path, torch.float32)
    result = run_cli("--weights", "1,2", run.directory, "-o", tmp_path / "avg.pt", expect=2)
    assert "--weights has 2 values but 5 checkpoints are selected" in result.stderr
    assert not (tmp_path / "avg.pt").exists()


def test_dtype_bfloat16_output(tmp_path: Path) -> None:
    run = fairseq_run(tmp_path, torch.float32)
    out = tmp_path / "avg.pt"
    run_cli("--dtype", "bfloat16", run.directory, "-o", out)
    assert_averaged(load(out)["model"], run.states(), dtype=torch.bfloat16)
    st = tmp_path / "avg.safetensors"
    run_cli("--dtype", "bfloat16", run.directory, "-o", st)
    assert_averaged(load_file(str(st)), run.states(), dtype=torch.bfloat16)


def test_counters_are_copied_from_the_last(tmp_path: Path) -> None:
    run = plain_run(tmp_path, torch.float32)
    out = tmp_path / "avg.pt"
    run_cli("--end", "3", run.directory, "-o", out)
    result = load(out)
    assert torch.equal(result["bn.num_batches_tracked"], run.trees[2]["bn.num_batches_tracked"])
    assert result["bn.num_batches_tracked"].item() == 400
    assert result["bn.num_batches_tracked"].dtype == torch.int64


def _with_differing_int(tmp_path: Path) -> Run:
    run = plain_run(tmp_path, torch.float32)
    for k, sd in enumerate(run.trees, start=1):
        sd["vocab_map"] = torch.tensor([1, 2, 3 + (k == 4)])
        torch.save(sd, run.directory / f"epoch_{k}.pt")
    return run


def test_differing_integer_tensor_is_an_error(tmp_path: Path) -> None:
    run = _with_differing_int(tmp_path)
    out = tmp_path / "avg.pt"
    unraisable: list[Any] = []
    previous, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        result = run_cli(run.directory, "-o", out, expect=1)
        first_line = result.stderr.splitlines()[0]
        assert first_line.startswith("Error: ")
        assert "'vocab_map'" in first_line and "epoch_4.pt" in first_line and "--int-policy last" in first_line
        assert "Traceback" not in result.output
        assert not out.exists()
        assert leftovers(tmp_path) == []
        del result
        gc.collect()
    finally:
        sys.unraisablehook = previous
    # The half-written output archive must be closed on the error path, not left for the garbage
    # collector, whose ZipFile.__del__ then prints "Exception ignored in ..." and a traceback.
    assert [f"{u.object}: {u.exc_value!r}" for u in unraisable] == []


def test_int_policy_last(tmp_path: Path) -> None:
    run = _with_differing_int(tmp_path)
    out = tmp_path / "avg.pt"
    run_cli("--int-policy", "last", run.directory, "-o", out)
    assert_averaged(load(out), run.states())
    assert load(out)["vocab_map"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("layout", ["timm", "safetensors"])
def test_rerun_is_byte_identical(tmp_path: Path, layout: str) -> None:
    run = LAYOUTS[layout](tmp_path, torch.bfloat16)
    for suffix in (".pt", ".safetensors"):
        out = tmp_path / f"avg{suffix}"
        run_cli(run.directory, "-o", out)
        first = out.read_bytes()
        run_cli(run.directory, "-o", out, "--force")
        assert out.read_bytes() == first, suffix


def test_argument_order_does_not_change_the_output(tmp_path: Path) -> None:
    run = fairseq_run(tmp_path, torch.float32)
    files = [os.path.join(run.directory, n) for n in run.names]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_cli(*files, "-o", tmp_path / "a" / "avg.pt")
    run_cli(*reversed(files), "-o", tmp_path / "b" / "avg.pt")
    assert (tmp_path / "a" / "avg.pt").read_bytes() == (tmp_path / "b" / "avg.pt").read_bytes()
    assert_averaged(load(tmp_path / "a" / "avg.pt")["model"], run.states())


def test_legacy_inputs(tmp_path: Path) -> None:
    directory = tmp_path / "legacy"
    directory.mkdir()
    states = [model_state(k, torch.float16) for k in range(EPOCHS)]
    for k, sd in enumerate(states):
        torch.save(
            {"epoch": k, "model_state_dict": sd}, directory / f"epoch_{k}.pt", _use_new_zipfile_serialization=False
        )
    plan = run_cli("--dry-run", directory).stdout
    assert plan.count("legacy") >= EPOCHS
    out = tmp_path / "avg.pt"
    run_cli(directory, "-o", out)
    result = load(out)
    assert_averaged(result["model_state_dict"], states)
    assert result["epoch"] == EPOCHS - 1


@pytest.mark.parametrize(("layout", "metrics"), [("fairseq", {"val_loss"}), ("timm", {"metric"})])
def test_inspect_shows_the_runs_metrics_not_its_bookkeeping(tmp_path: Path, layout: str, metrics: set[str]) -> None:
    from click.testing import CliRunner

    from ckpt_avg.inspect_cli import inspect_command

    run = LAYOUTS[layout](tmp_path, torch.float32)
    result = CliRunner().invoke(inspect_command, ["--json", str(run.directory)], catch_exceptions=False)
    rows = json.loads(result.stdout)["rows"]
    assert {name for row in rows for name in row["metrics"]} == metrics  # not version, previous_training_time
