"""Library errors name the CLI flag and, for a Python caller, the keyword argument it is."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ckpt_avg import Options, SelectOptions, average_checkpoints, plan_checkpoints
from ckpt_avg.cli import main
from ckpt_avg.errors import API_NAMES, UsageError


def test_api_names_are_the_options_a_flag_sets() -> None:
    fields = {f.name for f in dataclasses.fields(Options)} | {f.name for f in dataclasses.fields(SelectOptions)}
    assert fields - API_NAMES == {"select", "hash_files", "budgets", "as_given"}  # set by no flag of the same name
    flags = {opt for param in main.params for opt in getattr(param, "opts", ())}
    assert {f"--{name.replace('_', '-')}" for name in API_NAMES} <= flags


def test_a_python_caller_sees_the_keywords(tmp_path: Path) -> None:
    for epoch in range(3):
        torch.save({"w": torch.ones(2) * epoch}, tmp_path / f"epoch_{epoch}.pt")
    with pytest.raises(UsageError) as raised:
        plan_checkpoints([str(tmp_path)], Options(select=SelectOptions(start=5, end=3)))
    assert str(raised.value) == "--start 5 is after --end 3 (Python API: start=, end=)"
    assert raised.value.cli_message == "--start 5 is after --end 3"
    with pytest.raises(UsageError) as raised:
        average_checkpoints([str(tmp_path)], str(tmp_path / "avg.pt"), strip_prefix=("",))
    assert str(raised.value) == "--strip-prefix must not be empty (Python API: strip_prefix=)"
    assert not (tmp_path / "avg.pt").exists()


def test_messages_without_a_flag_are_unchanged() -> None:
    assert str(UsageError("INPUT 'x' does not exist")) == "INPUT 'x' does not exist"
    assert str(UsageError("--plot x: directory 'y' does not exist")) == "--plot x: directory 'y' does not exist"
