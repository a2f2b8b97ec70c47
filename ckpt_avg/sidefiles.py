"""Copying the files that sit beside the weights (a Trainer's config and tokenizer, Megatron's
`common.pt`) into an output, without following a link or copying what is not the input's own."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from typing import IO


def copy_side_file(source: str, name: str, directory: str, copied: dict[str, str] | None = None) -> str:
    """Copy `source/name` into `directory` if it is a regular file in `source`; else say why not.

    `copied[name]` gets the sha256 of the bytes as they were copied (the source may change after).

    A symbolic link is never followed (it could point at /proc/self/environ or a key file,
    whose contents would then sit in an output that is shared), nor is anything that is
    not a regular file on the input directory's own file system (a device, a FIFO, a file
    mounted over the name), nor a file with more than one hard link: its other name may be
    a secret anywhere on the file system, and nothing tells which name is the original.
    The copy is no more readable than the source.
    """
    path = os.path.join(source, name)
    try:
        before = os.lstat(path)
        if stat.S_ISLNK(before.st_mode):
            return "it is a symbolic link (side files are copied only when they are regular files)"
        if not stat.S_ISREG(before.st_mode) or before.st_dev != os.stat(source).st_dev:
            return "it is not a regular file in the input directory"
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        return f"cannot open it ({exc.strerror})"
    with os.fdopen(fd, "rb") as file:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            return "it changed while it was being opened"
        if opened.st_nlink > 1:
            return (
                f"it has {opened.st_nlink} hard links (another name for it may be a file outside the input"
                " directory; copy it yourself if it is meant)"
            )
        mode = stat.S_IMODE(opened.st_mode) & 0o644
        digest = hashlib.sha256()
        with _new_file(os.path.join(directory, name), mode) as out:
            while block := file.read(1 << 20):
                digest.update(block)
                out.write(block)
    if copied is not None:
        copied[name] = digest.hexdigest()
    return ""


@contextlib.contextmanager
def _new_file(path: str, mode: int) -> Iterator[IO[bytes]]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as out:
        yield out
        out.flush()
        os.fsync(out.fileno())
