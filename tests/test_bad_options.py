"""Bad options: the exit status SPEC 1.9 gives and a message that says what to change.

Usage errors (bad option values, a missing input) exit 2; an existing OUTPUT without
--force and an OUTPUT that is one of the inputs exit 1. Nothing is written either way and
the inputs are untouched.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from conftest import leftovers, run_cli


@pytest.fixture
def ckpts(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpts"
    directory.mkdir()
    for epoch in range(3):
        sd = {"w": torch.randn(4, 4), "b": torch.randn(4)}
        torch.save({"state_dict": sd, "ema": {k: v + 1 for k, v in sd.items()}, "epoch": epoch},
                   directory / f"epoch={epoch}.pt")  # fmt: skip
    return directory


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, output
    return lines[0]


def assert_refused(ckpts: Path, *args: object, code: int, says: tuple[str, ...]) -> str:
    before = snapshot(ckpts)
    result = run_cli(*args, expect=code)
    assert "Traceback" not in result.output
    line = error_line(result.stderr)
    for fragment in says:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert snapshot(ckpts) == before, "an input was modified"
    assert leftovers(ckpts) == [] and leftovers(ckpts.parent) == []
    return line


def opt(*args: str) -> tuple[str, ...]:
    """The arguments of a run on the checkpoints, with `args` added."""
    return ("DIR", "-o", "OUT", *args)


# The one table of usage errors (exit 2): arguments (DIR: the checkpoints, OUT: a .pt beside
# them) and the exact error line, or fragments of it where the line depends on the machine.
USAGE: list[tuple[tuple[str, ...], str | tuple[str, ...]]] = [
    (opt("--weights", "1,2"), "--weights has 2 values but 3 checkpoints are selected"),
    (opt("--weights", "1,2,3,4"), "--weights has 4 values but 3 checkpoints are selected"),
    (opt("--weights", "1,-1,1"), "--weights must be non-negative and not sum to zero"),
    (opt("--weights", "0,0,0"), "--weights must be non-negative and not sum to zero"),
    (opt("--weights", "1,nan,1"), "--weights must be finite and non-negative"),
    (opt("--weights", "1,inf,1"), "--weights must be finite and non-negative"),
    (opt("--weights", "one,two"), "Invalid value for '--weights': 'one,two' is not a comma-separated list of numbers"),
    (opt("--ema", "0"), "--ema must be between 0 and 1 (exclusive), not 0.0"),
    (opt("--ema", "1"), "--ema must be between 0 and 1 (exclusive), not 1.0"),
    (opt("--ema", "1.5"), "--ema must be between 0 and 1 (exclusive), not 1.5"),
    (opt("--ema", "-0.5"), "--ema must be between 0 and 1 (exclusive), not -0.5"),
    (opt("--ema", "nan"), "--ema must be between 0 and 1 (exclusive), not nan"),
    (opt("--ema", "0.9", "--weights", "1,2,3"), "--weights and --ema cannot be used together"),
    (opt("--start", "5", "--end", "3"), "--start 5 is after --end 3"),
    (opt("--start", "-1"), "--start must be >= 0, not -1.0"),
    (opt("--start", "1.5"), "--start must be a whole index or a fraction between 0 and 1, not 1.5"),
    (opt("--last", "0"), "--last must be at least 1, not 0"),
    (opt("--last", "-2"), "--last must be at least 1, not -2"),
    (opt("--best", "2"), "--best needs --metric NAME (for example --metric val_loss)"),
    (opt("--device", "tpu"), "--device 'tpu': not a device (use cpu, cuda, cuda:N or mps)"),
    (opt("--device", "cuda:99"), ("--device cuda:99: ",)),  # no CUDA, or too few devices
    (opt("--device", "meta"), "--device meta: only cpu, cuda, cuda:N and mps are supported"),
    (
        opt("--dtype", "int8"),
        "Invalid value for '--dtype': 'int8' is not one of 'float32', 'bfloat16', 'float16', 'float64'.",
    ),
    (
        opt("--accum-dtype", "float16"),
        "Invalid value for '--accum-dtype': 'float16' is not one of 'float64', 'float32'.",
    ),
    (opt("--int-policy", "average"), "Invalid value for '--int-policy': 'average' is not one of 'error', 'last'."),
    (
        opt("--bn-model", "train:model"),
        "--bn-model and --bn-data go together: give both to recompute BatchNorm statistics",
    ),
    (
        opt("--bn-model", "a:b", "--bn-data", "c:d", "--bn-batch-size", "0"),
        "--bn-batch-size and --bn-batches must be at least 1",
    ),
    (opt("--strip-prefix", ""), "--strip-prefix must not be empty"),  # once looped for ever
    (opt("--max-shard-size", "5GB"), "--max-shard-size needs a directory OUTPUT (end it with /)"),
    (("nope/", "-o", "OUT"), "INPUT 'nope/' does not exist"),
    (("DIR",), "missing -o OUTPUT (or use --dry-run)"),
    (
        ("DIR", "-o", "avg.txt"),
        "OUTPUT 'avg.txt': unknown format; end it with .safetensors, .pt, .pth, .pth.tar, .ckpt, .bin"
        " or / for a directory",
    ),
]


@pytest.mark.parametrize(("args", "says"), USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors(
    ckpts: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], says: str | tuple[str, ...]
) -> None:
    monkeypatch.chdir(ckpts.parent)
    args = tuple({"DIR": ckpts.name, "OUT": "avg.pt"}.get(a, a) for a in args)
    before = snapshot(ckpts)
    result = run_cli(*args, expect=2)
    assert result.stdout == "" and "Traceback" not in result.output
    line = error_line(result.stderr)
    if isinstance(says, str):
        assert line == f"Error: {says}"
    else:
        assert all(fragment in line for fragment in says), line
    assert snapshot(ckpts) == before, "an input was modified"
    assert sorted(os.listdir(ckpts.parent)) == ["ckpts"]  # no output, no temp file


def test_key_that_does_not_exist_lists_the_keys_that_do(ckpts: Path) -> None:
    out = ckpts.parent / "avg.pt"
    line = assert_refused(ckpts, ckpts, "-o", out, "--key", "state_dict_ema", code=2, says=("--key state_dict_ema",))
    assert "not found" in line and "state_dict" in line and "ema" in line
    line = assert_refused(ckpts, ckpts, "-o", out, "--key", "epoch", code=2, says=("--key epoch",))
    assert "not a dict of tensors" in line and "state_dict" in line
    run_cli(ckpts, "-o", out, "--key", "ema")  # the key that is there works


@pytest.mark.parametrize("size", ["lots", "-5GB", "0", "5XB", "GB", "nan", "1e400"])
def test_max_shard_size_garbage(ckpts: Path, size: str) -> None:
    assert_refused(ckpts, ckpts, "-o", f"{ckpts.parent}/avg/", "--max-shard-size", size, code=2,
                   says=("--max-shard-size", "is not a size"))  # fmt: skip
    assert not (ckpts.parent / "avg").exists()


def test_max_shard_size_needs_a_directory_output(ckpts: Path) -> None:
    assert_refused(ckpts, ckpts, "-o", ckpts.parent / "avg.safetensors", "--max-shard-size", "5GB", code=2,
                   says=("--max-shard-size needs a directory OUTPUT",))  # fmt: skip


@pytest.mark.parametrize("name", ["avg.txt", "avg", "avg.npz", "avg.safetensor", "avg.pt.bak"])
def test_unknown_output_suffix(ckpts: Path, name: str) -> None:
    line = assert_refused(ckpts, ckpts, "-o", ckpts.parent / name, code=2, says=("unknown format", ".safetensors"))
    assert name in line
    assert not (ckpts.parent / name).exists()


def test_missing_inputs_and_output(ckpts: Path) -> None:
    assert_refused(ckpts, ckpts / "nope.pt", "-o", ckpts.parent / "avg.pt", code=2, says=("does not exist",))
    assert_refused(ckpts, f"{ckpts}/*.ckpt", "-o", ckpts.parent / "avg.pt", code=2, says=("matches nothing",))
    assert_refused(ckpts, ckpts, code=2, says=("-o OUTPUT",))


# ---------------------------------------------------------------- OUTPUT collisions: exit 1


def test_existing_output_needs_force(ckpts: Path) -> None:
    out = ckpts.parent / "avg.pt"
    out.write_bytes(b"keep")
    assert_refused(ckpts, ckpts, "-o", out, code=1, says=("already exists", "--force"))
    assert out.read_bytes() == b"keep"
    run_cli(ckpts, "-o", out, "--force")
    assert out.read_bytes() != b"keep"


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_output_that_is_an_input(ckpts: Path, force: bool) -> None:
    flags = ("--force",) if force else ()
    says = ("OUTPUT is one of the inputs",)
    target = ckpts / "epoch=2.pt"
    assert_refused(ckpts, ckpts, "-o", target, *flags, code=1, says=says)
    assert_refused(ckpts, *sorted(ckpts.iterdir()), "-o", target, *flags, code=1, says=says)
    assert_refused(ckpts, ckpts, "-o", f"{ckpts}/./epoch=1.pt", *flags, code=1, says=says)
    assert_refused(ckpts, ckpts, "-o", f"{ckpts}/../{ckpts.name}/epoch=0.pt", *flags, code=1, says=says)


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_output_that_is_an_input_through_a_link(ckpts: Path, force: bool) -> None:
    flags = ("--force",) if force else ()
    says = ("OUTPUT is one of the inputs",)
    other = ckpts.parent / "elsewhere"
    other.mkdir()
    (other / "link.pt").symlink_to(ckpts / "epoch=2.pt")
    os.link(ckpts / "epoch=1.pt", other / "hard.pt")
    (other / "dirlink").symlink_to(ckpts)
    assert_refused(ckpts, ckpts, "-o", other / "link.pt", *flags, code=1, says=says)
    assert_refused(ckpts, ckpts, "-o", other / "hard.pt", *flags, code=1, says=says)
    assert_refused(ckpts, ckpts, "-o", other / "dirlink" / "epoch=0.pt", *flags, code=1, says=says)
    assert_refused(ckpts, other / "link.pt", ckpts / "epoch=0.pt", "-o", ckpts / "epoch=2.pt", *flags,
                   code=1, says=says)  # fmt: skip


def test_output_that_is_a_left_out_candidate_is_still_an_input(ckpts: Path) -> None:
    """`--last 1 ckpts/ -o ckpts/epoch=0.pt --force` must not overwrite a checkpoint it found.

    Every file discovered from INPUT is an input (SPEC 1.7: inputs are never modified), whether
    or not the selection kept it.
    """
    assert_refused(ckpts, ckpts, "--last", "1", "-o", ckpts / "epoch=0.pt", "--force", code=1,
                   says=("OUTPUT is one of the inputs",))  # fmt: skip


def test_huge_weights_are_normalised_not_zeroed(ckpts: Path, tmp_path: Path) -> None:
    """1e308 and 1.5e308 sum to inf: the weights are still 0.4 and 0.6 of the mean, not 0."""
    huge, small = tmp_path / "huge.pt", tmp_path / "small.pt"
    run_cli(ckpts, "--last", "2", "--weights", "1e308,1.5e308", "-o", huge)
    run_cli(ckpts, "--last", "2", "--weights", "2,3", "-o", small)
    for key in ("w", "b"):
        a = torch.load(huge, weights_only=True)["state_dict"][key]
        b = torch.load(small, weights_only=True)["state_dict"][key]
        assert torch.allclose(a, b, rtol=1e-6, atol=0) and b.abs().sum() > 0


def test_key_on_a_dict_with_a_non_tensor_entry_names_that_entry(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for epoch in range(2):
        torch.save({"state_dict": {"w": torch.randn(2), "meta": "notes"}, "epoch": epoch}, ckpts / f"epoch_{epoch}.pt")
    line = assert_refused(ckpts, ckpts, "-o", tmp_path / "avg.pt", "--key", "state_dict", code=2, says=("--key",))
    assert "not a dict of tensors" in line and "('meta' is a str)" in line, line
