"""The command as a user meets it (SPEC 1.7, 1.9): exit codes, exact messages, stdout/stderr, --help."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from conftest import leftovers, make_run, oracle_mean, run_cli

import ckpt_avg
from ckpt_avg.cli import main

SUMMARY = re.compile(
    r"^Averaged (\d+) checkpoint\(s\) \((.+?)\) into (.+): ([\d,]+) parameters in (\d+) tensors, \d+\.\ds$"
)


def lightning_like(directory: Path, epochs: int = 5, *, batchnorm: bool = True) -> list[dict[str, torch.Tensor]]:
    """`epoch=K-step=N.ckpt` files shaped as Lightning writes them; returns the state dicts."""
    directory.mkdir(parents=True, exist_ok=True)
    states = []
    for k in range(epochs):
        g = torch.Generator().manual_seed(k)
        sd = {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g)}
        if batchnorm:
            sd |= {
                "bn.running_mean": torch.randn(4, generator=g),
                "bn.running_var": torch.rand(4, generator=g) + 0.5,
                "bn.num_batches_tracked": torch.tensor(10 * (k + 1)),
            }
        checkpoint = {
            "epoch": k,
            "global_step": 10 * (k + 1),
            "pytorch-lightning_version": "2.6.0",
            "state_dict": sd,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
            "lr_schedulers": [],
            "callbacks": {"ModelCheckpoint{}": {"best_model_score": None}},
            "hyper_parameters": {"hidden": 4},
        }
        torch.save(checkpoint, directory / f"epoch={k}-step={10 * (k + 1)}.ckpt")
        states.append(sd)
    return states


def flat(directory: Path, epochs: int = 4) -> list[dict[str, torch.Tensor]]:
    """`epoch_K.pt` flat state dicts without BatchNorm: a run that triggers no warning."""
    return make_run(directory, epochs=epochs, first_epoch=1, shapes={"w": (5, 5), "b": (5,)}).states


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- success output


def test_one_line_summary_on_stderr(tmp_path: Path) -> None:
    states = flat(tmp_path / "ckpts")
    out = tmp_path / "avg.pt"
    result = run_cli("--start", "2", tmp_path / "ckpts", "-o", out)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    match = SUMMARY.match(lines[0])
    assert match, lines[0]
    assert match.groups()[:5] == ("3", "epoch 2-4", str(out), "30", "2")
    averaged = torch.load(out, weights_only=True)
    assert torch.equal(averaged["w"], oracle_mean([s["w"] for s in states[1:]]))
    assert leftovers(tmp_path) == []


def test_warnings_go_to_stderr_before_the_summary(tmp_path: Path) -> None:
    lightning_like(tmp_path / "ckpts")
    result = run_cli(tmp_path / "ckpts", "-o", tmp_path / "avg.ckpt")
    assert result.stdout == ""
    *notes, summary = result.stderr.splitlines()
    assert SUMMARY.match(summary)
    assert any(n.startswith("Warning: 1 BatchNorm layer(s) were averaged, not recomputed") for n in notes)


def test_quiet_prints_nothing_on_success(tmp_path: Path) -> None:
    lightning_like(tmp_path / "ckpts")  # would warn about BatchNorm and note the dropped optimizer
    out = tmp_path / "avg.ckpt"
    result = run_cli("--quiet", tmp_path / "ckpts", "-o", out)
    assert (result.stdout, result.stderr) == ("", "")
    assert out.is_file()
    result = run_cli("-q", "--dry-run", tmp_path / "ckpts")
    assert result.stderr == ""


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    lightning_like(ckpts)
    (ckpts / "last.ckpt").write_bytes((ckpts / "epoch=4-step=50.ckpt").read_bytes())
    before = listing(ckpts)
    out = tmp_path / "avg.ckpt"
    result = run_cli("--dry-run", "--start", "3", ckpts, "-o", out)
    assert not out.exists() and listing(ckpts) == before and leftovers(tmp_path) == leftovers(ckpts) == []
    assert "Averaged" not in result.stderr
    lines = result.stdout.splitlines()
    for k in range(5):
        row = next(line for line in lines if f"epoch={k}-step=" in line)
        assert row.startswith("*" if k >= 3 else "-"), row
        if k < 3:
            assert "--start 3" in row
    last = next(line for line in lines if "last.ckpt" in line)
    assert last.startswith("-") and "alias" in last
    assert "2 of 6 checkpoint(s) selected, ordered by epoch" in lines
    assert "state dict: state_dict" in lines


def test_json_report(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    lightning_like(ckpts)
    (ckpts / "last.ckpt").write_bytes((ckpts / "epoch=4-step=50.ckpt").read_bytes())
    out = tmp_path / "avg.ckpt"
    result = run_cli("--json", "--start", "2", ckpts, "-o", out)
    report = json.loads(result.stdout)
    assert [i["path"] for i in report["inputs"]] == [
        str(ckpts / f"epoch={k}-step={10 * (k + 1)}.ckpt") for k in (2, 3, 4)
    ]
    assert [i["index"] for i in report["inputs"]] == [2, 3, 4]
    assert [i["weight"] for i in report["inputs"]] == pytest.approx([1 / 3] * 3)
    skipped = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "last.ckpt"}
    assert all(skipped.values())
    assert report["state_dict_key"] == "state_dict"
    assert [f["path"] for f in report["files"]] == [str(out)]
    assert report["files"][0]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert any("BatchNorm" in w for w in report["warnings"])
    assert report["dry_run"] is False
    # Everything else goes to stderr, so stdout is exactly one JSON document.
    assert SUMMARY.match(result.stderr.splitlines()[-1])


def test_json_quiet_keeps_warnings_in_the_report(tmp_path: Path) -> None:
    lightning_like(tmp_path / "ckpts")
    result = run_cli("--json", "--quiet", tmp_path / "ckpts", "-o", tmp_path / "avg.ckpt")
    assert result.stderr == ""
    assert any("BatchNorm" in w for w in json.loads(result.stdout)["warnings"])


def test_json_dry_run_is_the_plan(tmp_path: Path) -> None:
    lightning_like(tmp_path / "ckpts")
    result = run_cli("--json", "--dry-run", "--last", "2", tmp_path / "ckpts")
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True
    assert [i["epoch"] for i in plan["inputs"]] == [3, 4]
    assert len(plan["skipped"]) == 3
    assert all("--last 2" in s["reason"] for s in plan["skipped"])
    assert plan["files"] == []


# ---------------------------------------------------------------- errors


def test_existing_output_is_refused_and_untouched(tmp_path: Path) -> None:
    flat(tmp_path / "ckpts")
    out = tmp_path / "avg.pt"
    out.write_bytes(b"precious")
    result = run_cli(tmp_path / "ckpts", "-o", out, expect=1)
    assert result.stderr == f"Error: {out}: already exists (use --force to overwrite)\n"
    assert result.stdout == ""
    assert out.read_bytes() == b"precious"
    assert leftovers(tmp_path) == []
    run_cli(tmp_path / "ckpts", "-o", out, "--force")
    assert out.read_bytes() != b"precious"
    assert leftovers(tmp_path) == []


def test_output_that_is_an_input_is_refused_even_with_force(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    flat(ckpts)
    before = listing(ckpts)
    target = ckpts / "epoch_4.pt"
    result = run_cli(ckpts, "-o", target, "--force", expect=1)
    assert result.stderr == f"Error: {target}: OUTPUT is one of the inputs ({target}); choose another name\n"
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    result = run_cli(*(ckpts / f"epoch_{k}.pt" for k in range(1, 5)), "-o", link, "--force", expect=1)
    assert result.stderr.startswith(f"Error: {link}: OUTPUT is one of the inputs (")
    assert listing(ckpts) == before
    assert leftovers(ckpts) == leftovers(tmp_path) == []


def test_rerun_into_the_checkpoint_directory(tmp_path: Path) -> None:
    # The README's `ckpt-avg --start N DIR -o DIR/avg.pt`, run a second time: the first run's
    # output is this run's OUTPUT, not a checkpoint to order and average.
    ckpts = tmp_path / "ckpts"
    lightning_like(ckpts)
    out = ckpts / "avg.ckpt"
    run_cli("--start", "2", ckpts, "-o", out)
    first = out.read_bytes()
    result = run_cli("--start", "2", ckpts, "-o", out, "--force", expect=None)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == first


# Usage errors (exit 2) and their exact messages: the one table in test_bad_options.py.


def test_content_errors_exit_1_with_one_line(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    flat(ckpts)
    (ckpts / "epoch_5.pt").write_bytes(b"PK\x03\x04 this is not really a zip file")
    out = tmp_path / "avg.pt"
    result = run_cli(ckpts, "-o", out, expect=1)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(ckpts / "epoch_5.pt") in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() and leftovers(tmp_path) == []

    debug = run_cli("--debug", ckpts, "-o", out, expect=1)
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1] == lines[0]


def test_mismatched_checkpoints_exit_1(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    flat(ckpts)
    torch.save({"w": torch.zeros(4, 4), "b": torch.zeros(5)}, ckpts / "epoch_5.pt")
    result = run_cli(ckpts, "-o", tmp_path / "avg.pt", expect=1)
    assert result.stderr.startswith("Error: tensor 'w' has different shapes: ")
    assert "[5, 5]" in result.stderr and "[4, 4]" in result.stderr and "epoch_5.pt" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_nothing_selected_prints_the_plan_after_the_error(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    flat(ckpts)
    result = run_cli("--start", "9", ckpts, "-o", tmp_path / "avg.pt", expect=1)
    first, *table = result.stderr.splitlines()
    assert first == "Error: nothing selected: 4 checkpoint(s) found, none kept by the options"
    for k in range(1, 5):
        row = next(line for line in table if f"epoch_{k}.pt" in line)
        assert "epoch < --start 9" in row
    assert result.stdout == ""


def test_error_from_a_real_process_is_one_line(tmp_path: Path) -> None:
    """At interpreter exit nothing may add to the one-line error (no 'Exception ignored in ...')."""
    ckpts = tmp_path / "ckpts"
    flat(ckpts)
    torch.save({"w": torch.zeros(5, 5), "b": torch.zeros(5), "ids": torch.tensor([1])}, ckpts / "epoch_5.pt")
    for k in range(1, 5):
        sd = torch.load(ckpts / f"epoch_{k}.pt", weights_only=True)
        torch.save({**sd, "ids": torch.tensor([k])}, ckpts / f"epoch_{k}.pt")
    done = subprocess.run(
        [sys.executable, "-m", "ckpt_avg", "ckpts", "-o", "avg.pt"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "Error: integer tensor 'ids' differs between ckpts/epoch_1.pt and ckpts/epoch_2.pt;"
        " averaging integers is meaningless (use --int-policy last to copy the last one)"
    ], done.stderr
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- --help and --version


def _options() -> list[click.Option]:
    return [p for p in main.params if isinstance(p, click.Option)]


def test_help_lists_every_option() -> None:
    text = run_cli("--help").stdout
    for option in _options():
        for name in (*option.opts, *option.secondary_opts):
            assert re.search(rf"(^|[\s,]){re.escape(name)}\b", text), name
        assert option.help, f"{option.opts[0]} has no help"
    assert "Examples:" in text
    assert "ckpt-avg --start 20 ckpts/ -o avg.pt" in text
    assert run_cli("-h").stdout == text


def test_every_option_that_takes_a_value_has_an_example() -> None:
    # SPEC 1.9: --help explains every option with an example; flags speak for themselves.
    lacking = [o.opts[-1] for o in _options() if not o.is_flag and "Example" not in (o.help or "")]
    assert lacking == []


def test_version() -> None:
    assert run_cli("--version").stdout == f"ckpt-avg, version {ckpt_avg.__version__}\n"


def test_python_m_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ckpt_avg", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ckpt-avg, version {ckpt_avg.__version__}\n"
