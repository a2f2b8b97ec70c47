"""A single-value option given twice is a usage error, not a silent last-one-wins (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    for epoch in range(3):
        torch.save({"w": torch.randn(2)}, tmp_path / f"epoch_{epoch}.pt")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["-o", "a.pt", "-o", "b.pt"], "-o given twice (-o a.pt, then -o b.pt)"),
        (["--output=a.pt", "-o", "b.pt"], "-o given twice (--output=a.pt, then -o b.pt)"),
        (["--dry-run", "--last", "2", "--last=3"], "--last given twice (--last 2, then --last=3)"),
        (["--dry-run", "--key", "a", "--key", "b"], "--key given twice"),
    ],
)
def test_repeated_single_value_option_is_a_usage_error(run_dir: Path, args: list[str], named: str) -> None:
    result = run_cli(run_dir, *args, expect=2)
    assert named in result.output
    assert not (Path("a.pt").exists() or Path("b.pt").exists())


def test_repeatable_options_and_flags_still_repeat(run_dir: Path) -> None:
    run_cli(run_dir, "--dry-run", "--dry-run", "--strip-prefix", "x.", "--strip-prefix", "y.")


def test_an_option_value_that_looks_like_an_option_is_not_counted(run_dir: Path) -> None:
    result = run_cli(run_dir, "--dry-run", "--glob", "--last", "--last", "1", expect=1)
    assert "given twice" not in result.output  # --glob's value is the word '--last'
