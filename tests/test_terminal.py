"""Progress bars appear on a terminal and nowhere else (SPEC 1.9)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from conftest import make_run


def _checkpoints(directory: Path) -> None:
    make_run(directory, shapes={"w": (256, 256)})


def _terminal() -> tuple[int, int]:
    """A pseudo-terminal 100 columns wide (a new pty has no size, and tqdm fits the bar to it)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    return leader, follower


def _run_with_stderr_on(stderr: int, directory: Path, out: Path, *extra: str) -> int:
    command = [sys.executable, "-m", "ckpt_avg", str(directory), "-o", str(out), *extra]
    return subprocess.run(command, stderr=stderr, stdout=subprocess.DEVNULL, timeout=120, check=False).returncode


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_not_in_a_pipe(tmp_path: Path) -> None:
    _checkpoints(tmp_path / "ckpts")
    leader, follower = _terminal()
    try:
        assert _run_with_stderr_on(follower, tmp_path / "ckpts", tmp_path / "a.pt") == 0
        os.close(follower)
        shown = _read_all(leader)
    finally:
        os.close(leader)
    assert "averaging" in shown and "Averaged 3 checkpoint(s)" in shown
    piped = subprocess.run(
        [sys.executable, "-m", "ckpt_avg", str(tmp_path / "ckpts"), "-o", str(tmp_path / "b.pt")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert piped.returncode == 0
    assert "averaging" not in piped.stderr and piped.stderr.startswith("Averaged 3 checkpoint(s)")


def test_quiet_silences_the_bar_on_a_terminal(tmp_path: Path) -> None:
    _checkpoints(tmp_path / "ckpts")
    leader, follower = _terminal()
    try:
        assert _run_with_stderr_on(follower, tmp_path / "ckpts", tmp_path / "a.pt", "--quiet") == 0
        os.close(follower)
        shown = _read_all(leader)
    finally:
        os.close(leader)
    assert shown == ""
