"""Faults while writing: OUTPUT is absent or complete, no temp file stays, inputs never change (SPEC 1.7).

Faults injected: an output directory that refuses new files (even to root), the file-size
limit hit mid-write (RLIMIT_FSIZE with SIGXFSZ ignored), SIGINT and SIGTERM while the
output is being written, SIGKILL at many points, and stale temp files from killed runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import leftovers, oracle_mean, run_cli
from safetensors.torch import load_file

from ckpt_avg.discover import TEMP_PREFIX
from ckpt_avg.write import TEMP_MARKER

INJECTED: list[str] = []


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Inputs:
    directory: Path
    paths: list[Path]
    hashes: dict[Path, str]
    expected: dict[str, torch.Tensor]

    def assert_unchanged(self) -> None:
        assert {p: sha256(p) for p in self.paths} == self.hashes, "an input file was modified"

    def assert_output(self, output: Path) -> None:
        """A complete output: the oracle's tensors, bit for bit."""
        if output.suffix == ".safetensors":
            averaged = load_file(output)
        elif output.is_dir():
            averaged = {}
            for shard in sorted(output.glob("*.safetensors")):
                averaged.update(load_file(shard))
        else:
            averaged = dict(torch.load(output, weights_only=True)["state_dict"])
        assert sorted(averaged) == sorted(self.expected)
        for name, tensor in self.expected.items():
            assert torch.equal(averaged[name], tensor), name


def make_inputs(directory: Path, rows: int, tensors: int = 4, count: int = 3) -> Inputs:
    directory.mkdir(parents=True, exist_ok=True)
    paths, dicts = [], []
    for epoch in range(count):
        generator = torch.Generator().manual_seed(epoch)
        sd = {f"layer{k}.weight": torch.randn(rows, 1024, generator=generator) for k in range(tensors)}
        path = directory / f"epoch={epoch}.pt"
        torch.save({"state_dict": sd, "epoch": epoch, "optimizer_states": [{"lr": 0.1}]}, path)
        paths.append(path)
        dicts.append(sd)
    expected = {name: oracle_mean([sd[name] for sd in dicts]) for name in dicts[0]}
    return Inputs(directory, paths, {p: sha256(p) for p in paths}, expected)


@pytest.fixture
def small(tmp_path: Path) -> Inputs:
    """About 1 MB per checkpoint."""
    return make_inputs(tmp_path / "in", rows=64)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """About 32 MB per checkpoint: long enough that a signal lands while the output is written."""
    return make_inputs(tmp_path_factory.mktemp("large"), rows=2048)


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "ckpt_avg", *(str(a) for a in args)]


# ---------------------------------------------------------------- unwritable output


@contextlib.contextmanager
def unwritable_directory(base: Path) -> Iterator[Path]:
    """A directory in which no new file can be made, even by root (whom chmod does not stop)."""
    locked = base / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
        try:
            yield locked
        finally:
            locked.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(locked)], capture_output=True).returncode == 0:
        try:
            yield locked  # immutable: not even root may add an entry
        finally:
            subprocess.run([chattr, "-i", str(locked)], check=True)
        return
    yield Path("/sys")  # sysfs refuses new files, to root too


@pytest.mark.parametrize("name", ["avg.safetensors", "avg.pt", "avg/"])
def test_output_directory_not_writable(small: Inputs, tmp_path: Path, name: str) -> None:
    with unwritable_directory(tmp_path) as locked:
        output = f"{locked}/{name}"
        result = run_cli(small.directory, "-o", output, expect=1)
        INJECTED.append(f"unwritable {name}")
        first = result.stderr.splitlines()[0]
        assert first.startswith("Error: ") and str(locked) in first, result.stderr
        assert "cannot write" in first
        assert "Traceback" not in result.output
        assert os.listdir(locked) == [] or locked == Path("/sys")
    small.assert_unchanged()


def test_output_under_a_regular_file(small: Inputs, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = run_cli(small.directory, "-o", blocker / "avg.pt", expect=2)
    assert result.stderr.splitlines()[-1].startswith("Error: ")
    assert str(blocker) in result.stderr and "is a file, not a directory" in result.stderr
    assert blocker.read_text() == "x"
    small.assert_unchanged()


# ---------------------------------------------------------------- the file-size limit, mid-write


LIMIT = 256 * 1024


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG


@pytest.mark.parametrize(
    "output", ["avg.pt", "avg.safetensors", "shards/", "existing.pt"], ids=["pt", "safetensors", "shards", "force"]
)
def test_file_size_limit_mid_write(small: Inputs, tmp_path: Path, output: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / output
    args = [small.directory, "-o", f"{out_dir}/{output}"]
    if output == "shards/":
        args += ["--max-shard-size", "400KB"]
    if output == "existing.pt":
        target.write_bytes(b"the previous output")
        args.append("--force")
    done = subprocess.run(cli(*args), capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120)
    INJECTED.append(f"RLIMIT_FSIZE {output}")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("Error: ") and "Traceback" not in done.stderr
    assert leftovers(out_dir) == [], "the failed write left its temp file"
    if output == "existing.pt":
        assert target.read_bytes() == b"the previous output"  # --force replaces only on success
    else:
        assert not os.path.lexists(str(target).rstrip("/"))
    small.assert_unchanged()
    first = done.stderr.splitlines()[0]
    assert "File too large" in first and str(out_dir) in first, f"the error does not say what failed: {first}"


# ---------------------------------------------------------------- signals


def start(inputs: Inputs, output: Path | str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli(*inputs.paths, "-o", output, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_temp(process: subprocess.Popen[str], directory: Path, timeout: float = 60) -> bool:
    """Poll until the run has created its temp file: it is now writing the output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if leftovers(directory):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    return False


SIGNAL_CASES = [
    # (signal, OUTPUT, seconds after the temp file appears): at once hits the moment it is created
    (signal.SIGINT, "avg.safetensors", 0.0),
    (signal.SIGINT, "avg.pt", 0.03),
    (signal.SIGTERM, "avg.safetensors", 0.03),
    (signal.SIGTERM, "avg.pt", 0.0),
    (signal.SIGTERM, "shards/", 0.01),
]


@pytest.mark.parametrize(
    ("sig", "output", "delay"), SIGNAL_CASES, ids=[f"{s.name}-{o.strip('/')}-{d}s" for s, o, d in SIGNAL_CASES]
)
def test_signal_mid_write_leaves_nothing(
    large: Inputs, tmp_path: Path, sig: signal.Signals, output: str, delay: float
) -> None:
    target = Path(f"{tmp_path}/{output}")
    process = start(large, f"{tmp_path}/{output}")
    assert wait_for_temp(process, tmp_path), "the run never started writing"
    time.sleep(delay)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    INJECTED.append(f"{sig.name} {output}")
    assert "Traceback" not in stderr
    assert leftovers(tmp_path) == [], "an interrupted run left its temp file"
    if target.exists():  # a delayed signal may come after the rename: then OUTPUT is complete
        assert delay > 0, "a signal sent as the temp file appeared cannot come after the output was complete"
        assert "no output was written" not in stderr
        large.assert_output(target)
    else:
        assert process.returncode in (130, 128 + sig), stderr
        assert stderr.splitlines()[-1].startswith("Error: interrupted"), stderr
    large.assert_unchanged()


def test_sigint_keeps_the_previous_output_with_force(large: Inputs, tmp_path: Path) -> None:
    target = tmp_path / "avg.pt"
    target.write_bytes(b"previous")
    process = start(large, target, "--force")
    assert wait_for_temp(process, tmp_path)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    INJECTED.append("SIGINT --force")
    assert process.returncode == 130
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_sigkill_at_many_points(large: Inputs, tmp_path: Path) -> None:
    """kill -9 may leave a temp file; OUTPUT is still absent or complete, and the next run cleans up."""
    outcomes = []
    for point in range(10):
        output = tmp_path / ("avg.safetensors" if point % 2 == 0 else "avg.pt")
        process = start(large, output)
        if point == 0:
            time.sleep(0.3)  # still importing
        else:
            assert wait_for_temp(process, tmp_path)
            time.sleep(0.12 * (point - 1))  # from the first byte written to after the rename
        process.kill()
        process.communicate(timeout=60)
        INJECTED.append(f"SIGKILL point {point}")
        if output.exists():
            large.assert_output(output)  # complete, never partial
            outcomes.append("complete")
            output.unlink()
        else:
            outcomes.append("absent" + (" + temp" if leftovers(tmp_path) else ""))
    assert any("temp" in o for o in outcomes), f"no kill landed mid-write: {outcomes}"
    for name in ("avg.safetensors", "avg.pt"):  # the next run to each OUTPUT removes its stale temps
        run_cli(*large.paths, "-o", tmp_path / name)
        large.assert_output(tmp_path / name)
    assert leftovers(tmp_path) == [], "the next run left a killed run's temp file behind"
    large.assert_unchanged()


# ---------------------------------------------------------------- failures injected at each system call


@dataclass
class Injection:
    """Make the k-th call of a function fail (k = 0: only count the calls)."""

    owner: object
    name: str
    k: int
    error: Callable[..., BaseException]  # called with the call's arguments, as the OS would name them
    after: bool = False  # fail after the real call returned (a signal landing as it returns)
    calls: int = 0
    fired: bool = False

    def install(self, monkeypatch: pytest.MonkeyPatch, only: Callable[..., bool] = lambda *a: True) -> None:
        real = getattr(self.owner, self.name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not only(*args):
                return real(*args, **kwargs)
            self.calls += 1
            if self.calls == self.k and not self.after:
                self.fired = True
                raise self.error(*args)
            result = real(*args, **kwargs)
            if self.calls == self.k:
                self.fired = True
                raise self.error(*args)
            return result

        monkeypatch.setattr(self.owner, self.name, wrapper)


def _temp_path(path: Any, *_: Any) -> bool:
    return isinstance(path, str | os.PathLike) and os.path.basename(os.fspath(path)).startswith(TEMP_PREFIX)


def _interrupt(*_: Any) -> BaseException:
    return KeyboardInterrupt()


def _no_space(*_: Any) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # pwrite and write name no file


def _io_error(*_: Any) -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def _rename_error(source: Any, target: Any, *_: Any) -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(source), None, os.fspath(target))


def _calls(monkeypatch: pytest.MonkeyPatch, small: Inputs, args: list[object], owner: object, name: str) -> int:
    """How often a clean run with these arguments calls the function."""
    with monkeypatch.context() as patch:
        probe = Injection(owner, name, 0, _io_error)
        probe.install(patch)
        run_cli(*args)
    return probe.calls


OUTPUTS = ["avg.safetensors", "avg.pt", "shards/"]


def _outcome(small: Inputs, out_dir: Path, output: str, previous: bytes | None) -> None:
    target = Path(f"{out_dir}/{output}")
    assert leftovers(out_dir) == [], "a failed run left its temp file"
    if previous is not None and target.is_file() and target.read_bytes() == previous:
        return  # the old OUTPUT, untouched
    if target.exists():
        small.assert_output(target)  # never partial


@pytest.mark.parametrize("output", OUTPUTS)
def test_interrupt_as_the_temp_file_is_created(
    small: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    """Ctrl-C delivered the moment the temp file (or directory) exists, before its handle is kept.

    This is where a real SIGINT lands when it arrives during the `open`/`mkdir` system call.
    """
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    name = "mkdir" if output.endswith("/") else "open"
    injection = Injection(os, name, 1, _interrupt, after=True)
    injection.install(monkeypatch, only=_temp_path)
    result = run_cli(small.directory, "-o", f"{out_dir}/{output}", expect=None)
    monkeypatch.undo()
    INJECTED.append(f"KeyboardInterrupt after {name} {output}")
    assert injection.fired
    assert result.exit_code == 130 and "Error: interrupted" in result.stderr
    assert not os.path.lexists(f"{out_dir}/{output}".rstrip("/"))
    assert leftovers(out_dir) == [], "the temp made just before Ctrl-C was left behind"
    small.assert_unchanged()


def _write_calls() -> list[tuple[str, object, str, Callable[..., BaseException]]]:
    from ckpt_avg import write

    return [
        ("pwrite", os, "pwrite", _no_space),
        ("PtWriter.write", write.PtWriter, "write", _no_space),
        ("fsync", os, "fsync", _io_error),
        ("replace", os, "replace", _rename_error),
        ("rename", os, "rename", _rename_error),
    ]


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_write_failures_at_many_points(
    small: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str, force: bool
) -> None:
    """Disk full or an I/O error at the first, a middle and the last call of each write step."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = f"{out_dir}/{output}"
    args: list[object] = [small.directory, "-o", target, *(["--force"] if force else [])]

    def prepare() -> bytes | None:
        """No OUTPUT, or (with --force) an earlier one to replace."""
        shutil.rmtree(target, ignore_errors=True) if output.endswith("/") else Path(target).unlink(missing_ok=True)
        if force and not output.endswith("/"):
            Path(target).write_bytes(b"the previous output")
            return b"the previous output"
        if force:
            run_cli(small.directory, "-o", target)
        return None

    tried = 0
    unnamed = []
    for label, owner, name, error in _write_calls():
        prepare()
        count = _calls(monkeypatch, small, args, owner, name)
        for k in sorted({1, (count + 1) // 2, count}) if count else []:  # not every format makes every call
            previous = prepare()
            injection = Injection(owner, name, k, error)
            with monkeypatch.context() as patch:
                injection.install(patch)
                result = run_cli(*args, expect=None)
            assert injection.fired
            tried += 1
            INJECTED.append(f"{label} #{k}/{count} {output}")
            assert "Traceback" not in result.output
            _outcome(small, out_dir, output, previous)
            if result.exit_code == 0:  # a call whose failure does not matter (the fsync of the directory)
                small.assert_output(Path(target))
                continue
            assert result.exit_code == 1, result.output
            first = result.stderr.splitlines()[0]
            reason = os.strerror(errno.ENOSPC if error is _no_space else errno.EIO)
            assert first.startswith("Error: ") and reason in first, f"{label} #{k}: {first}"
            if str(out_dir) not in first:
                unnamed.append(f"{label} #{k}: {first}")
    assert tried >= 3
    small.assert_unchanged()
    assert not unnamed, "errors that do not say which OUTPUT failed:\n" + "\n".join(unnamed)


# ---------------------------------------------------------------- stale temp files


def test_stale_temp_file_from_a_dead_run_is_removed(small: Inputs, tmp_path: Path) -> None:
    stale = tmp_path / ".ckpt-avg-tmp-avg.safetensors-99999999-deadbeef"  # no such pid, ever
    stale.write_bytes(b"half a file")
    run_cli(small.directory, "-o", tmp_path / "avg.safetensors")
    assert leftovers(tmp_path) == []
    small.assert_output(tmp_path / "avg.safetensors")
    small.assert_unchanged()


def test_stale_temp_directory_from_a_dead_run_is_removed(small: Inputs, tmp_path: Path) -> None:
    """A killed sharded write can leave a directory as large as the model; the next run removes it,
    as it does for a single file (`remove_stale_temps`)."""
    stale = tmp_path / ".ckpt-avg-tmp-shards-99999999-cafebabe"
    stale.mkdir()
    (stale / TEMP_MARKER).write_text("written first by the killed run")
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    run_cli(small.directory, "-o", f"{tmp_path}/shards/")
    small.assert_output(tmp_path / "shards")
    assert leftovers(tmp_path) == [], "a dead run's temp directory was left beside OUTPUT/"
    small.assert_unchanged()


def test_a_dead_pid_decides_only_in_the_same_pid_namespace(small: Inputs, tmp_path: Path) -> None:
    """Containers sharing a host name and a volume each number their processes from 1: a temp
    named by a pid of another namespace may belong to a live run there."""
    from ckpt_avg.write import process_namespace

    ours = tmp_path / f".ckpt-avg-tmp-avg.pt-99999999-{process_namespace()[:8]}0123abcd"
    theirs = tmp_path / ".ckpt-avg-tmp-avg.pt-99999999-ffffffff0123abcd"  # another namespace's tag
    marked_theirs = tmp_path / ".ckpt-avg-tmp-avg.pt-99999998-deadbeef"
    marked_theirs.mkdir()
    (marked_theirs / TEMP_MARKER).write_text('{"host": "h", "pid": 99999998, "namespace": "another-container"}')
    for path in (ours, theirs):
        path.write_bytes(b"half")
    run_cli(small.directory, "-o", tmp_path / "avg.pt")
    assert not ours.exists()
    assert theirs.read_bytes() == b"half" and (marked_theirs / TEMP_MARKER).is_file()
    small.assert_output(tmp_path / "avg.pt")


def test_temp_of_a_live_run_is_left_alone(small: Inputs, tmp_path: Path) -> None:
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            other = tmp_path / f".ckpt-avg-tmp-avg.pt-{sleeper.pid}-0123abcd"
            other.write_bytes(b"another run is writing this")
            run_cli(small.directory, "-o", tmp_path / "avg.pt")
            assert other.read_bytes() == b"another run is writing this"
            assert leftovers(tmp_path) == [other.name]
            small.assert_output(tmp_path / "avg.pt")
        finally:
            sleeper.kill()
    small.assert_unchanged()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nfault injections: {len(INJECTED)}")


def test_an_interrupt_says_truthfully_whether_the_output_was_published(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C can land after the rename (while the summary prints, or while torchrun's ranks say
    goodbye): then the output is complete, and the message must not say otherwise."""
    from ckpt_avg import cli_options, write

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(write, "PUBLISHED", [])
    assert cli_options._interrupted("interrupted") == "interrupted; no output was written"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_options._interrupted("interrupted") == (
        "rank 1: interrupted; rank 0 publishes the output, and says whether it did"
    )
    monkeypatch.setenv("RANK", "0")
    assert cli_options._interrupted("interrupted") == "rank 0: interrupted; no output was written"
    monkeypatch.setattr(write, "PUBLISHED", ["out"])
    assert cli_options._interrupted("interrupted") == "rank 0: interrupted after out was published (it is complete)"


@pytest.mark.parametrize("change", ["rewrite", "truncate-and-restore"])
def test_an_input_rewritten_during_the_run_publishes_nothing(tmp_path: Path, change: str) -> None:
    """A checkpoint saved again while it is read would give an output mixing old and new tensors."""
    from safetensors.torch import save_file

    from ckpt_avg import average_checkpoints
    from ckpt_avg.errors import CheckpointError

    paths = []
    for epoch in range(3):
        path = tmp_path / f"epoch_{epoch}.safetensors"
        save_file({f"layer{i}.w": torch.full((64, 64), float(epoch + i)) for i in range(8)}, path)
        paths.append(str(path))
    victim = Path(paths[1])
    original = victim.read_bytes()
    calls = []

    def rewrite_once(_: int) -> None:
        if not calls:
            if change == "rewrite":
                save_file({f"layer{i}.w": torch.full((64, 64), -1.0) for i in range(8)}, victim)
            else:  # the same bytes back, but written again: its time says so
                victim.write_bytes(b"")
                victim.write_bytes(original)
        calls.append(1)

    with pytest.raises(CheckpointError, match=r"epoch_1\.safetensors: changed while it was being read"):
        average_checkpoints(paths, str(tmp_path / "avg.safetensors"), progress=rewrite_once)
    assert not (tmp_path / "avg.safetensors").exists() and leftovers(tmp_path) == []
