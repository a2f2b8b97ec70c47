"""`ckpt-avg verify` (SPEC §1.7): an output checked against its provenance, as a release pipeline runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckpt_avg import average_checkpoints, verify_output
from ckpt_avg.verify_cli import verify_command


def run_verify(*args: object, expect: int) -> Result:
    result = CliRunner().invoke(verify_command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, f"exit {result.exit_code}, output:\n{result.output}"
    return result


def mismatch_lines(result: Result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line]


@pytest.fixture
def run(tmp_path: Path) -> list[Path]:
    """Three Lightning-style checkpoints of one run."""
    directory = tmp_path / "ckpts"
    directory.mkdir()
    generator = torch.Generator().manual_seed(1)
    paths = []
    for epoch in range(3):
        state = {
            "encoder.weight": torch.randn(64, 32, generator=generator),
            "encoder.bias": torch.randn(32, generator=generator).to(torch.bfloat16),
            "bn.num_batches_tracked": torch.tensor(10 * epoch),
        }
        path = directory / f"epoch={epoch}.ckpt"
        torch.save({"state_dict": state, "epoch": epoch, "optimizer_states": []}, path)
        paths.append(path)
    return paths


OUTPUTS = ["avg.ckpt", "avg.safetensors", "avg_dir/", "sharded/"]


@pytest.mark.parametrize("output", OUTPUTS)
def test_an_untouched_output_verifies_with_its_inputs_and_recomputed(
    tmp_path: Path, run: list[Path], output: str
) -> None:
    target = f"{tmp_path}/{output}"
    shard = {"max_shard_size": "4000"} if output == "sharded/" else {}
    average_checkpoints([str(p) for p in run], target, **shard)
    result = run_verify("--recompute", target, expect=0)
    assert mismatch_lines(result) == []
    assert "average re-derived" in result.stderr
    verification = verify_output(target)
    assert verification.ok
    assert verification.checked == [f"{target}: tensor digest"] + [f"{p}: tensor digest" for p in run]


@pytest.mark.parametrize("output", ["avg.ckpt", "avg.safetensors", "sharded/"])
def test_a_tampered_tensor_byte_is_named(tmp_path: Path, run: list[Path], output: str) -> None:
    target = Path(f"{tmp_path}/{output}")
    average_checkpoints(
        [str(p) for p in run], f"{tmp_path}/{output}", **({"max_shard_size": "4000"} if output == "sharded/" else {})
    )
    files = sorted(target.glob("*.safetensors")) if target.is_dir() else [target]
    bias = None
    for file in files:
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            bias = tensors.get("encoder.bias")
        else:
            bias = torch.load(file, weights_only=True)["state_dict"]["encoder.bias"]
        if bias is not None:
            break
    assert bias is not None
    raw = bytearray(file.read_bytes())
    at = raw.find(bias.view(torch.uint8).numpy().tobytes())
    assert at > 0 and raw.count(bias.view(torch.uint8).numpy().tobytes()) == 1
    raw[at + 3] ^= 0x01
    file.write_bytes(bytes(raw))
    result = run_verify(f"{tmp_path}/{output}", expect=1)
    assert mismatch_lines(result) == [f"{tmp_path}/{output}: tensor 'encoder.bias' differs from the recorded digest"]


def test_a_swapped_input_is_found_and_named(tmp_path: Path, run: list[Path]) -> None:
    average_checkpoints([str(p) for p in run], str(tmp_path / "avg.safetensors"))
    shutil.copyfile(run[2], run[1])  # epoch=1.ckpt now holds epoch 2's weights
    result = run_verify(tmp_path / "avg.safetensors", expect=1)
    assert mismatch_lines(result) == [
        f"{run[1]}: tensor digest differs from the one recorded for input #2;"
        f" it is recorded input #3 ({run[2]}): swapped?"
    ]


def test_inputs_given_from_another_checkout_match_by_position(tmp_path: Path, run: list[Path]) -> None:
    average_checkpoints([str(p) for p in run], str(tmp_path / "avg.pt"))
    moved = tmp_path / "elsewhere"
    shutil.copytree(run[0].parent, moved)
    copies = [moved / p.name for p in run]
    run_verify("--recompute", tmp_path / "avg.pt", *copies, expect=0)
    torch.save({"state_dict": {"other": torch.ones(2)}}, moved / "epoch=9.ckpt")  # not an input of avg.pt
    result = run_verify("--recompute", tmp_path / "avg.pt", moved, expect=0)  # a directory of them
    assert all(f"{moved / p.name}: tensor digest" in result.stderr for p in run)
    result = run_verify(tmp_path / "avg.pt", copies[1], copies[0], copies[2], expect=1)
    assert [line.split(":")[0] for line in mismatch_lines(result)] == [str(copies[1]), str(copies[0])]


def test_recompute_averages_the_inputs_given_by_position_without_selecting(tmp_path: Path) -> None:
    # A user trial: safetensors copies named a/b/c were re-selected (--last 3) and "cannot order"
    # failed. EMA weights make the order matter: the recorded order and weights must be used.
    (tmp_path / "run").mkdir()
    recorded = [tmp_path / "run" / f"epoch_{k}.safetensors" for k in range(3)]
    for k, path in enumerate(recorded):
        save_file({"w": torch.randn(8, 4, generator=torch.Generator().manual_seed(k))}, path)
    output = tmp_path / "avg.safetensors"
    average_checkpoints([str(tmp_path / "run")], str(output), last=3, ema=0.5)
    unindexed = [tmp_path / f"{name}.safetensors" for name in "abc"]
    misleading = [tmp_path / f"epoch_{9 - k}.safetensors" for k in range(3)]  # names that order the other way
    for copies in (unindexed, misleading):
        for source, copy in zip(recorded, copies, strict=True):
            shutil.copyfile(source, copy)
        result = run_verify("--recompute", output, *copies, expect=0)
        assert "average re-derived from the recorded inputs and options" in result.stderr
    # EMA 0.5 weighs the first two alike and the last twice as much: swap the last two.
    result = run_verify("--recompute", output, unindexed[0], unindexed[2], unindexed[1], expect=1)
    assert mismatch_lines(result) == [
        f"{unindexed[2]}: tensor digest differs from the one recorded for input #2;"
        f" it is recorded input #3 ({recorded[2]}): swapped?",
        f"{unindexed[1]}: tensor digest differs from the one recorded for input #3;"
        f" it is recorded input #2 ({recorded[1]}): swapped?",
        f"{output}: re-derived average: tensor 'w' differs from the recorded digest",
    ]


def _rewrite_provenance(path: Path, change: dict[str, object]) -> None:
    """A safetensors output with the same tensors and an edited provenance."""
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    provenance = json.loads(metadata["ckpt_avg"])
    for key, value in change.items():
        where = provenance
        *parents, last = key.split(".")
        for part in parents:
            where = where[part]
        if value is None:
            where.pop(last, None)
        else:
            where[last] = value
    metadata["ckpt_avg"] = json.dumps(provenance)
    save_file(load_file(path), path, metadata=metadata)


def test_a_changed_option_is_caught_by_recompute(tmp_path: Path, run: list[Path]) -> None:
    output = tmp_path / "avg.safetensors"
    average_checkpoints([str(p) for p in run], str(output), ema=0.5)
    _rewrite_provenance(output, {"options.ema": None})  # the record now claims the uniform mean
    run_verify(output, expect=0)  # the output and inputs are what was recorded...
    result = run_verify("--recompute", output, expect=1)  # ...but do not follow from the recorded options
    assert mismatch_lines(result) == [
        f"{output}: the recorded options give other weights than recorded",
        f"{output}: re-derived average: tensor 'encoder.bias' differs from the recorded digest",
        f"{output}: re-derived average: tensor 'encoder.weight' differs from the recorded digest",
    ]


def test_a_missing_input_is_noted_and_fails_recompute(tmp_path: Path, run: list[Path]) -> None:
    output = tmp_path / "avg.ckpt"
    average_checkpoints([str(p) for p in run], str(output))
    run[0].unlink()
    result = run_verify(output, expect=0)
    assert f"Note: not checked: {run[0]}: recorded input not found" in result.stderr
    result = run_verify("--recompute", output, expect=1)
    assert mismatch_lines(result) == [f"{run[0]}: recorded input not found: --recompute needs every input"]


def test_an_output_without_provenance_fails(tmp_path: Path, run: list[Path]) -> None:
    save_file({"w": torch.ones(3)}, tmp_path / "plain.safetensors")
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pt")
    for name in ("plain.safetensors", "plain.pt"):
        result = run_verify(tmp_path / name, expect=1)
        assert mismatch_lines(result) == [
            f"{tmp_path / name}: carries no ckpt-avg provenance: nothing to verify against"
        ]


def test_an_older_provenance_format_is_refused_by_name(tmp_path: Path, run: list[Path]) -> None:
    output = tmp_path / "avg.safetensors"
    average_checkpoints([str(p) for p in run], str(output))
    _rewrite_provenance(output, {"format_version": None, "digest": None})
    result = run_verify(output, expect=1)
    assert "provenance format 1" in result.stdout and "cannot be verified" in result.stdout


def test_json_report_for_ci(tmp_path: Path, run: list[Path]) -> None:
    output = tmp_path / "avg.safetensors"
    average_checkpoints([str(p) for p in run], str(output))
    shutil.copyfile(run[0], run[2])
    report = json.loads(run_verify("--json", output, expect=1).stdout)
    assert report["ok"] is False
    assert report["scheme"] == "blake3-tree-v1"
    assert [m["file"] for m in report["mismatches"]] == [str(run[2])]
    assert report["checked"] == [f"{output}: tensor digest", f"{run[0]}: tensor digest", f"{run[1]}: tensor digest"]


def test_usage_errors(tmp_path: Path, run: list[Path]) -> None:
    output = tmp_path / "avg.safetensors"
    average_checkpoints([str(p) for p in run], str(output))
    result = run_verify(tmp_path / "absent.safetensors", expect=2)
    assert "Error: OUTPUT" in result.stderr and "does not exist" in result.stderr
    other = tmp_path / "other.ckpt"
    shutil.copyfile(run[0], other)
    result = run_verify(output, other, expect=2)
    assert f"Error: INPUT {str(other)!r} is none of the recorded inputs" in result.stderr


def test_the_console_command_dispatches_verify(tmp_path: Path, run: list[Path]) -> None:
    output = tmp_path / "avg.pt"
    average_checkpoints([str(p) for p in run], str(output))
    done = subprocess.run([sys.executable, "-m", "ckpt_avg", "verify", str(output)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"OK: {output}: tensor digest")
    run[1].write_bytes(b"not a checkpoint")
    done = subprocess.run([sys.executable, "-m", "ckpt_avg", "verify", str(output)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stdout.startswith(f"{run[1]}: cannot be read as the recorded input")


def test_recompute_never_runs_code_a_provenance_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provenance claiming --bn-model: verify skips those statistics, imports nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text("open('ran', 'w').close()\ndef make():\n    open('ran', 'w').close()\n")
    paths = []
    for epoch in range(2):
        state = {
            "conv.weight": torch.randn(4, 3),
            "bn.running_mean": torch.randn(4),
            "bn.running_var": torch.rand(4),
            "bn.num_batches_tracked": torch.tensor(epoch),
        }
        paths.append(tmp_path / f"epoch_{epoch}.safetensors")
        save_file(state, paths[-1])
    output = tmp_path / "avg.safetensors"
    average_checkpoints([str(p) for p in paths], str(output))
    _rewrite_provenance(output, {"options.bn_model": "evil:make", "options.bn_data": "evil:make"})
    result = run_verify("--recompute", output, expect=0)
    assert not (tmp_path / "ran").exists()
    assert "3 BatchNorm statistics recomputed with --bn-model evil:make" in result.stderr
    assert "average re-derived" in result.stderr
