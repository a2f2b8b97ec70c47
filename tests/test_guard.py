"""No option costs the user a checkpoint, and no option but --trust-pickle runs a payload."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import make_run, run_cli


def _run(directory: Path, count: int = 3) -> list[Path]:
    return make_run(directory, epochs=count).paths


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("output", ["s/", "s", "./", "."])
def test_force_never_replaces_a_directory_holding_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _run(tmp_path / "s")
    before = _snapshot(tmp_path)
    result = run_cli("s/", "-o", output, "--force", expect=1)
    assert (
        result.stderr.startswith("Error: ") and "holding the input" in result.stderr
    ) or "one of the inputs" in result.stderr
    assert _snapshot(tmp_path) == before


def test_force_never_replaces_a_parent_of_the_inputs(tmp_path: Path) -> None:
    _run(tmp_path / "runs" / "b")
    (tmp_path / "runs" / "a").mkdir()
    (tmp_path / "runs" / "a" / "keep.txt").write_text("keep")
    before = _snapshot(tmp_path)
    result = run_cli(tmp_path / "runs" / "b", "-o", f"{tmp_path / 'runs'}/", "--force", expect=1)
    assert "holding the input" in result.stderr
    assert _snapshot(tmp_path) == before


def test_force_replaces_only_a_directory_ckpt_avg_wrote(tmp_path: Path) -> None:
    _run(tmp_path / "s")
    other = tmp_path / "other"
    other.mkdir()
    (other / "important.txt").write_text("mine")
    result = run_cli(tmp_path / "s", "-o", f"{other}/", "--force", expect=1)
    assert "ckpt-avg did not write" in result.stderr
    assert (other / "important.txt").read_text() == "mine"
    ours = tmp_path / "avg"
    run_cli(tmp_path / "s", "-o", f"{ours}/")
    run_cli(tmp_path / "s", "-o", f"{ours}/", "--force")
    assert sorted(os.listdir(ours)) == ["model.safetensors"]


@pytest.mark.parametrize("name", ["avg.pt", "avg.safetensors", "avg.ckpt"])
def test_an_earlier_output_in_the_input_directory_is_left_out(tmp_path: Path, name: str) -> None:
    _run(tmp_path / "s")
    run_cli(tmp_path / "s", "-o", tmp_path / "s" / name)
    plan = run_cli("--dry-run", tmp_path / "s").stdout
    assert "output of an earlier ckpt-avg run" in plan
    assert "3 of 4 checkpoint(s) selected" in plan
    run_cli(tmp_path / "s", "-o", tmp_path / "s" / "second.pt")


def test_flat_pt_output_carries_provenance_outside_the_state_dict(tmp_path: Path) -> None:
    _run(tmp_path / "s")
    out = tmp_path / "avg.pt"
    run_cli(tmp_path / "s", "-o", out)
    state = torch.load(out, weights_only=True)
    assert sorted(state) == ["b", "w"]  # strict-loadable: nothing but the weights
    with zipfile.ZipFile(out) as archive:
        assert any(n.endswith("/ckpt_avg.json") for n in archive.namelist())


class _Payload:
    def __init__(self, function: object, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.function, (self.argument,))


@pytest.mark.parametrize(
    "allowed", ["posix.system", "os.system", "builtins.eval", "subprocess.Popen", "operator.attrgetter"]
)
def test_allow_global_refuses_anything_that_could_run_code(tmp_path: Path, allowed: str) -> None:
    _run(tmp_path / "s")
    canary = tmp_path / "canary"
    payload = _Payload(os.system, f"touch {canary}")
    torch.save({"w": torch.randn(4), "b": torch.randn(2), "x": payload}, tmp_path / "s" / "epoch_3.pt")
    result = run_cli(tmp_path / "s", "-o", tmp_path / "avg.pt", "--allow-global", allowed, expect=2)
    assert result.stderr.startswith(f"Error: --allow-global {allowed}: ")
    assert not canary.exists()


def test_allow_global_imports_a_class_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cfgmod_guard.py").write_text("class Cfg:\n    def __init__(self):\n        self.lr = 0.1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import cfgmod_guard  # type: ignore[import-not-found]

    ckpts = tmp_path / "s"
    ckpts.mkdir()
    for epoch in range(2):
        torch.save(
            {"epoch": epoch, "state_dict": {"w": torch.randn(3)}, "cfg": cfgmod_guard.Cfg()},
            ckpts / f"epoch_{epoch}.pt",
        )
    monkeypatch.syspath_prepend("/nonexistent")  # what matters is the cwd rule, not the test's sys.path
    result = run_cli("s", "-o", "avg.pt")
    assert "cfgmod_guard.Cfg" in result.stderr
    run_cli("s", "-o", "kept.pt", "--allow-global", "cfgmod_guard.Cfg")
    loaded = torch.load("kept.pt", weights_only=False)
    assert loaded["cfg"].lr == 0.1


def test_allow_global_of_a_name_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    _run(tmp_path / "s")
    result = run_cli(tmp_path / "s", "-o", tmp_path / "a.pt", "--allow-global", "nosuch_module.Thing", expect=2)
    assert "cannot import it" in result.stderr


def test_functions_named_by_a_checkpoint_are_reported_as_blocked(tmp_path: Path) -> None:
    _run(tmp_path / "s")
    torch.save({"w": torch.randn(4), "b": torch.randn(2)}, tmp_path / "s" / "epoch_3.pt")
    bad = {"state_dict": {"w": torch.randn(4)}, "x": _Payload(os.system, "true")}
    torch.save(bad, tmp_path / "hostile.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    result = run_cli("--dry-run", tmp_path / "hostile.pt")
    assert "blocked and never called: posix.system" in result.stderr
