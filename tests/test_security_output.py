"""What reaches the disk and the terminal from files someone else made (issue 16, output side).

`--force` never deletes a user's file; side files are copied only when they are regular
files in the input directory; `--best` never picks a NaN; names from files never reach the
terminal raw; odd numbers and names give a clean error or none; `inspect` reads expanded
views chunk by chunk.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import leftovers, make_run, run_cli
from safetensors.torch import load_file, save_file

from ckpt_avg.errors import OutputError
from ckpt_avg.inspect import inspect_checkpoints
from ckpt_avg.inspect_cli import inspect_command
from ckpt_avg.naming import parse_name
from ckpt_avg.report import terminal_safe
from ckpt_avg.write import commit

# ---------------------------------------------------------------- --force


def _run(directory: Path, count: int = 3) -> None:
    make_run(directory, epochs=count)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_force_keeps_a_directory_where_the_user_added_files(tmp_path: Path) -> None:
    _run(tmp_path / "ckpts")
    out = tmp_path / "avg"
    run_cli(tmp_path / "ckpts", "-o", f"{out}/")
    (out / "notes.txt").write_text("my notes")
    (out / "src").mkdir()
    (out / "src" / "train.py").write_text("print('hi')")
    before = _tree(out)
    result = run_cli(tmp_path / "ckpts", "-o", f"{out}/", "--force", expect=1)
    assert result.stderr.startswith(f"Error: {out}/: holds 'notes.txt', which ckpt-avg did not write")
    assert _tree(out) == before
    assert leftovers(tmp_path) == []
    (out / "notes.txt").unlink()
    result = run_cli(tmp_path / "ckpts", "-o", f"{out}/", "--force", expect=1)
    assert "holds 'src'" in result.stderr
    assert _tree(out) == {k: v for k, v in before.items() if k != "notes.txt"}


def test_force_replaces_a_directory_holding_only_what_ckpt_avg_wrote(tmp_path: Path) -> None:
    steps = []
    for step in (10, 20):
        directory = tmp_path / "run" / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        save_file({"w": torch.full((3,), float(step))}, directory / "model.safetensors")
        (directory / "config.json").write_text('{"model_type": "bert"}')
        steps.append(f"{directory}/")
    out = tmp_path / "avg"
    run_cli(*steps, "-o", f"{out}/", "--max-shard-size", "1")
    assert sorted(os.listdir(out)) == [
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
    ] or sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # fmt: skip
    run_cli(*steps, "-o", f"{out}/", "--force")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert load_file(out / "model.safetensors")["w"].tolist() == [15.0] * 3


def test_commit_checks_again_what_the_user_added_during_the_run(tmp_path: Path) -> None:
    _run(tmp_path / "ckpts")
    out = tmp_path / "avg"
    run_cli(tmp_path / "ckpts", "-o", f"{out}/")
    temp = tmp_path / ".ckpt-avg-tmp-avg-1-x"
    temp.mkdir()
    (temp / "model.safetensors").write_bytes(b"new")
    (out / "results.csv").write_text("added while the average ran")
    with pytest.raises(OutputError, match=r"holds 'results\.csv'"):
        commit(str(temp), str(out), force=True)
    assert (out / "results.csv").read_text() == "added while the average ran"
    assert (out / "model.safetensors").read_bytes() != b"new"


def test_force_on_a_link_to_an_earlier_output_replaces_the_link_only(tmp_path: Path) -> None:
    _run(tmp_path / "ckpts")
    earlier = tmp_path / "runs" / "avg-v1"
    earlier.parent.mkdir()
    run_cli(tmp_path / "ckpts", "-o", f"{earlier}/")
    kept = _tree(earlier)
    link = tmp_path / "latest"
    link.symlink_to(earlier)
    run_cli(tmp_path / "ckpts", "--last", "2", "-o", f"{link}/", "--force")
    assert link.is_dir() and not link.is_symlink()
    assert sorted(os.listdir(link)) == ["model.safetensors"]
    assert _tree(earlier) == kept  # what the link pointed to is never touched
    assert leftovers(tmp_path) == []


def test_a_stale_old_link_of_a_killed_run_is_removed_and_its_target_kept(tmp_path: Path) -> None:
    _run(tmp_path / "ckpts")
    earlier = tmp_path / "avg-v1"
    run_cli(tmp_path / "ckpts", "-o", f"{earlier}/")
    kept = _tree(earlier)
    stale = tmp_path / ".ckpt-avg-tmp-avg-99999999-deadbeef-old"  # killed between the renames
    stale.symlink_to(earlier)
    run_cli(tmp_path / "ckpts", "-o", f"{tmp_path / 'avg'}/")
    assert not stale.is_symlink() and _tree(earlier) == kept


# ---------------------------------------------------------------- side files


def _trainer_run(root: Path, secret: Path) -> list[str]:
    """Trainer checkpoint directories whose side files are links to secrets, a FIFO and a private file."""
    dirs = []
    for step in (10, 20, 30):
        directory = root / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        save_file({"w": torch.full((4,), float(step))}, directory / "model.safetensors")
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (directory / "config.json").symlink_to("/proc/self/environ")
        (directory / "tokenizer.json").symlink_to(secret)
        os.mkfifo(directory / "merges.txt")
        (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n")
        (directory / "vocab.txt").chmod(0o600)
        (directory / "special_tokens_map.json").write_text("{}")
        dirs.append(f"{directory}/")
    return dirs


def test_side_files_are_copied_only_when_regular_files(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "shadow"
    secret.parent.mkdir()
    secret.write_text("root:$6$SECRET-HASH:19000::::::\n")
    dirs = _trainer_run(tmp_path / "run", secret)
    out = tmp_path / "avg"
    os.environ["CKPT_AVG_TEST_MARKER"] = "ENVIRON-SECRET-VALUE"
    try:
        result = run_cli(*dirs, "-o", f"{out}/")
    finally:
        del os.environ["CKPT_AVG_TEST_MARKER"]
    assert sorted(os.listdir(out)) == ["model.safetensors", "special_tokens_map.json", "vocab.txt"]
    for path in out.iterdir():
        data = path.read_bytes()
        assert b"SECRET-HASH" not in data and b"ENVIRON-SECRET-VALUE" not in data and b"PATH=" not in data
    assert stat.S_IMODE((out / "vocab.txt").stat().st_mode) == 0o600  # no wider than the source
    assert stat.S_IMODE((out / "special_tokens_map.json").stat().st_mode) & 0o022 == 0
    last = tmp_path / "run" / "checkpoint-30"
    assert f"Warning: {last / 'config.json'}: not copied into the output: it is a symbolic link" in result.stderr
    assert f"Warning: {last / 'tokenizer.json'}: not copied into the output: it is a symbolic link" in result.stderr
    assert f"Warning: {last / 'merges.txt'}: not copied into the output: it is not a regular file" in result.stderr
    report = json.loads(run_cli(*dirs, "-o", f"{out}/", "--force", "--json", "-q").stdout)
    assert sum("not copied into the output" in w for w in report["warnings"]) == 3


# ---------------------------------------------------------------- --best and NaN


def _scored(directory: Path, losses: list[float]) -> None:
    directory.mkdir()
    for epoch, loss in enumerate(losses):
        torch.save({"epoch": epoch, "val_loss": loss, "state_dict": {"w": torch.full((2,), float(epoch))}},
                   directory / f"ckpt_{epoch}.pt")  # fmt: skip


def test_best_never_selects_a_nan_metric(tmp_path: Path) -> None:
    _scored(tmp_path / "s", [math.nan, 0.3, math.nan, 0.1, 0.2])
    report = json.loads(run_cli("--dry-run", "--json", "--best", "2", "--metric", "val_loss", tmp_path / "s").stdout)
    assert [c["epoch"] for c in report["inputs"]] == [3, 4]
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert skipped["ckpt_0.pt"] == skipped["ckpt_2.pt"] == "val_loss is NaN; never among the --best"
    table = run_cli("--dry-run", "--best", "4", "--metric", "val_loss", tmp_path / "s").stdout
    assert "ckpt_0.pt  val_loss is NaN" in table and "3 of 5 checkpoint(s) selected" in table


def test_best_when_every_metric_is_nan_is_an_error(tmp_path: Path) -> None:
    _scored(tmp_path / "s", [math.nan, math.nan])
    result = run_cli("--dry-run", "--best", "1", "--metric", "val_loss", tmp_path / "s", expect=1)
    assert result.stderr.startswith("Error: --metric val_loss: every checkpoint that records it has the value NaN")


# ---------------------------------------------------------------- the terminal

HOSTILE = "\x1b[2K\x1b[1A\x1b]0;pwned\x07\r\u202e\u200b"
RAW = ("\x1b", "\x07", "\r", "\u202e", "\u200b")


def _assert_escaped(text: str) -> None:
    for char in RAW:
        assert char not in text, repr(text)


def test_terminal_safe_escapes_what_a_terminal_acts_on() -> None:
    assert terminal_safe("epoch=1" + HOSTILE + ".pt") == "epoch=1\\x1b[2K\\x1b[1A\\x1b]0;pwned\\x07\\r\\u202e\\u200b.pt"
    assert terminal_safe("a\nb") == "a\\nb" and terminal_safe("a\nb", newlines=True) == "a\nb"
    assert terminal_safe("caf\xe9 \u65e5\u672c.pt") == "caf\xe9 \u65e5\u672c.pt"  # printable text stays
    assert terminal_safe(os.fsdecode(b"bad\xff.pt")) == "bad\\xff.pt"  # an undecodable byte of a name


def _hostile_global(path: Path) -> None:
    """A checkpoint whose pickle names a function `evil<ESC>...` in a module with control characters."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.randn(3)}, "x": _Reduce()}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"posix\nsystem\n" in data
                data = data.replace(b"posix\nsystem\n", f"os{HOSTILE}\nsystem{HOSTILE}\n".encode())
            target.writestr(info, data)


class _Reduce:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_names_from_files_reach_the_terminal_escaped(tmp_path: Path) -> None:
    ckpts = tmp_path / ("run" + HOSTILE)
    ckpts.mkdir()
    for epoch in range(4):
        torch.save({"state_dict": {"w": torch.randn(3)}, "epoch": epoch, "va\x1b[2Kl": 0.5},
                   ckpts / f"epoch={epoch}-{HOSTILE}.pt")  # fmt: skip
    _hostile_global(ckpts / "epoch=4-x.pt")
    plan = run_cli("--dry-run", ckpts)
    _assert_escaped(plan.output)
    assert "epoch=0-\\x1b[2K\\x1b[1A\\x1b]0;pwned\\x07\\r\\u202e\\u200b.pt" in plan.stdout
    assert "blocked and never called: os\\x1b[2K" in plan.stderr
    done = run_cli(ckpts, "-o", tmp_path / "avg.pt")
    _assert_escaped(done.output)
    assert "into " + str(tmp_path / "avg.pt") in done.stderr
    as_json = json.loads(run_cli("--dry-run", "--json", ckpts).stdout)  # JSON stays JSON, exact
    assert any(c["path"].endswith(f"{HOSTILE}.pt") for c in as_json["candidates"])
    shown = CliRunner().invoke(inspect_command, [str(ckpts)], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    _assert_escaped(shown.output)
    assert "va\\x1b[2Kl" in shown.stdout and "run\\x1b[2K" in shown.stdout


def test_an_error_naming_a_hostile_file_is_escaped(tmp_path: Path) -> None:
    bad = tmp_path / f"epoch=1{HOSTILE}.pt"
    bad.write_bytes(b"not a checkpoint at all")
    result = run_cli(bad, "-o", tmp_path / "avg.pt", expect=1)
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    _assert_escaped(result.output)
    nothing = run_cli("--dry-run", "--start", "9", tmp_path, expect=1)
    _assert_escaped(nothing.output)


# ---------------------------------------------------------------- odd numbers and names


def test_only_ascii_digits_are_an_index() -> None:
    assert parse_name("epoch=\u0661\u0662.pt").epoch is None  # Arabic-Indic twelve
    assert parse_name("step\uff15.ckpt").step is None  # a fullwidth 5
    assert parse_name("epoch=12-val_loss=1e999.ckpt").metrics == {"val_loss": math.inf}


def test_a_non_ascii_epoch_is_not_an_epoch(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(2)}, tmp_path / "epoch=3.pt")
    torch.save({"w": torch.randn(2)}, tmp_path / "epoch=\u0661\u0662.pt")
    save_file({"w": torch.randn(2)}, tmp_path / "x.safetensors", metadata={"epoch": "\u0661\u0662"})
    result = run_cli("--dry-run", "--last", "1", tmp_path, expect=1)
    assert result.stderr.startswith("Error: cannot order the checkpoints: no epoch in ")
    assert "12" not in result.stderr.splitlines()[0].replace(str(tmp_path), "")


def test_overflowing_metrics_are_handled(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    for epoch, loss in enumerate(["1e999", "0.5", "0.25"]):
        torch.save({"state_dict": {"w": torch.randn(2)}}, a / f"epoch={epoch}-val_loss={loss}.ckpt")
    report = json.loads(run_cli("--dry-run", "--json", "--best", "2", "--metric", "val_loss", a).stdout)
    assert [c["epoch"] for c in report["inputs"]] == [1, 2]
    _scored(tmp_path / "b", [10**400, 0.5, 0.25, -(10**400)])
    report = json.loads(run_cli("--dry-run", "--json", "--best", "1", "--metric", "val_loss", tmp_path / "b").stdout)
    assert [c["epoch"] for c in report["inputs"]] == [3]
    inspected = inspect_checkpoints([str(tmp_path / "b")])
    assert [r.metrics["val_loss"] for r in inspected.rows] == [math.inf, 0.5, 0.25, -math.inf]


def test_an_epoch_beyond_any_run_is_not_an_index(tmp_path: Path) -> None:
    for name, epoch in (("a.pt", 10**5000), ("b.pt", 2**70)):  # 10**5000 would not even print
        torch.save({"epoch": epoch, "state_dict": {"w": torch.randn(2)}}, tmp_path / name)
    result = run_cli("--dry-run", "--last", "1", tmp_path, expect=1)
    assert result.stderr.startswith("Error: --last needs an order, but ")
    assert "carry no epoch or step" in result.stderr
    run_cli("--dry-run", tmp_path / "b.pt", tmp_path / "a.pt")  # named one by one: in the order given


def test_a_dollar_in_a_metric_name_is_drawn_as_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    ckpts = tmp_path / "s"
    ckpts.mkdir()
    for epoch in range(4):
        metrics = {"loss$": 1.0 / (epoch + 1), "a$\\frac$b": float(epoch), "x$" + "{" * 400 + "$": 1.0}
        torch.save({"epoch": epoch, "state_dict": {"w": torch.randn(8) * (epoch + 1)}, **metrics},
                   ckpts / f"e{epoch}.pt")  # fmt: skip
    plot = tmp_path / "drift.png"
    result = CliRunner().invoke(inspect_command, [str(ckpts), "--plot", str(plot)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(b"\x89PNG")
    bad = CliRunner().invoke(inspect_command, [str(ckpts), "--plot", str(tmp_path / "d.nope")])
    assert bad.exit_code == 1 and bad.stderr.startswith(f"Error: --plot {tmp_path / 'd.nope'}: cannot draw the plot")
    assert leftovers(tmp_path) == []


def test_float16_overflow_is_an_error_naming_the_key(tmp_path: Path) -> None:
    ckpts = tmp_path / "s"
    ckpts.mkdir()
    for epoch in range(2):
        torch.save({"big": torch.full((3,), 70000.0 + epoch), "ok": torch.ones(2)}, ckpts / f"epoch_{epoch}.pt")
    result = run_cli(ckpts, "--dtype", "float16", "-o", tmp_path / "a.pt", expect=1)
    assert result.stderr.startswith("Error: tensor 'big': its mean is beyond the range of float16 (largest 65504)")
    assert not (tmp_path / "a.pt").exists() and leftovers(tmp_path) == []
    run_cli(ckpts, "--dtype", "float16", "-o", tmp_path / "b.pt", "--allow-nonfinite")
    assert torch.load(tmp_path / "b.pt")["big"].isinf().all()
    run_cli(ckpts, "--dtype", "bfloat16", "-o", tmp_path / "c.pt")  # in range: no error
    torch.save({"big": torch.tensor([1.0, math.inf, 2.0]), "ok": torch.ones(2)}, ckpts / "epoch_2.pt")
    blamed = run_cli(ckpts, "--dtype", "float16", "-o", tmp_path / "d.pt", expect=1)
    assert blamed.stderr.startswith(f"Error: {ckpts / 'epoch_2.pt'}: tensor 'big' contains NaN or Inf")


# ---------------------------------------------------------------- OUTPUT messages (issue 11 item 11)


def test_output_under_a_file_says_it_is_not_a_directory(tmp_path: Path) -> None:
    _run(tmp_path / "ckpts")
    (tmp_path / "not_a_dir").write_text("x")
    for output in ("not_a_dir/avg.pt", "not_a_dir/deeper/avg.pt"):
        result = run_cli(tmp_path / "ckpts", "-o", tmp_path / output, expect=2)
        blocking = tmp_path / "not_a_dir"
        assert result.stderr == f"Error: OUTPUT '{tmp_path / output}': '{blocking}' is a file, not a directory\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_output_where_nothing_can_be_written_names_the_output(tmp_path: Path) -> None:
    _run(tmp_path / "ckpts")
    result = run_cli(tmp_path / "ckpts", "-o", "/proc/x.pt", expect=1)
    assert result.stderr.startswith("Error: /proc/x.pt: cannot write the output in /proc: ")


# ---------------------------------------------------------------- inspect on strided views


def _views() -> list[dict[str, torch.Tensor]]:
    out = []
    for t in range(4):
        g = torch.Generator().manual_seed(t)
        base = torch.randn(6, 5, generator=g)
        out.append({
            "transposed": base.t(),
            "expanded": torch.randn(1, 5, generator=g).expand(7, 5),
            "outer": torch.randn(3, generator=g)[:, None].expand(3, 4),
            "offset": torch.randn(40, generator=g)[3:33:3],
            "permuted": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
            "big_t": torch.randn(1100, 1000, generator=g).t(),  # chunks touch most of it: spilled
        })  # fmt: skip
    return out


def test_inspect_drift_on_strided_views_equals_the_simple_computation(tmp_path: Path) -> None:
    views = _views()
    for t, tensors in enumerate(views):
        torch.save({"epoch": t, "state_dict": tensors}, tmp_path / f"epoch_{t}.pt")
    result = inspect_checkpoints([str(tmp_path)], chunk_elements=7)
    flat = [torch.cat([v.reshape(-1).double() for _, v in sorted(d.items())]) for d in views]
    expected_last = [float((x - flat[-1]).norm() / flat[-1].norm()) for x in flat]
    expected_prev = [float((flat[t] - flat[t - 1]).norm() / flat[t - 1].norm()) for t in range(1, 4)]
    assert [r.drift_last for r in result.rows] == pytest.approx(expected_last, rel=1e-12)
    assert [r.drift_prev for r in result.rows][1:] == pytest.approx(expected_prev, rel=1e-12)


RSS_PROBE = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "ckpt_avg", "inspect", "--json", sys.argv[1]], check=True,
               stdout=open(sys.argv[2], "w"))
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024))
"""


def test_inspect_reads_an_expanded_view_chunk_by_chunk(tmp_path: Path) -> None:
    # A 1-element storage expanded to 2^27 float32 elements: a file of 2 KB, 512 MiB as a
    # whole tensor and 1 GiB in float64; read whole, inspect took 3.4 GB.
    for epoch, value in enumerate((1.0, 2.0)):
        torch.save({"epoch": epoch, "state_dict": {"w": torch.full((1,), value).expand(2**27)}},
                   tmp_path / f"epoch_{epoch}.pt")  # fmt: skip
    assert all(p.stat().st_size < 4096 for p in tmp_path.glob("*.pt"))
    report = tmp_path / "report.json"
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path), str(report)],
                           capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    peak = int(probe.stdout.strip())
    assert peak < 1.5e9, f"peak RSS {peak / 1e9:.2f} GB"
    rows = json.loads(report.read_text())["rows"]
    assert [r["drift_last"] for r in rows] == [0.5, 0.0]
    assert rows[1]["drift_prev"] == 1.0
