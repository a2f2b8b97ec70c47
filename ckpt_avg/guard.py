"""What OUTPUT may be, so that no option ever costs the user a checkpoint.

OUTPUT is never one of the checkpoints found (selected or not), never a directory that
holds them, and `--force` replaces an existing directory only when ckpt-avg wrote it.
Outputs carry a provenance marker, so an earlier result found among the inputs is
recognised and left out instead of being averaged again.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable

from .errors import CheckpointError, OutputError, UsageError
from .naming import PYTORCH_SUFFIXES
from .safetensors_file import read_header

PROVENANCE_RECORD = "ckpt_avg.json"  # a record in every .pt output archive
OUTPUT_SUFFIXES = (*PYTORCH_SUFFIXES, ".safetensors")


def is_directory_output(output: str) -> bool:
    return output.endswith(("/", os.sep)) or os.path.isdir(output)


def validate_output_name(output: str, *, max_shard_size: str | None) -> None:
    """Usage errors in OUTPUT and --max-shard-size, before anything is read."""
    from .write import parse_size

    directory = is_directory_output(output)
    if max_shard_size is not None:
        try:
            parse_size(max_shard_size)
        except ValueError as exc:
            raise UsageError(f"--max-shard-size: {exc}") from None
        if not directory:
            raise UsageError("--max-shard-size needs a directory OUTPUT (end it with /)")
    if not directory and not output.lower().endswith(OUTPUT_SUFFIXES):
        raise UsageError(
            f"OUTPUT {output!r}: unknown format; end it with .safetensors, .pt, .pth, .pth.tar, .ckpt, .bin"
            " or / for a directory"
        )
    parent = os.path.dirname(output.rstrip("/")) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"OUTPUT {output!r}: directory {parent!r} does not exist")


def check_output(output: str, inputs: Iterable[tuple[str, tuple[str, ...]]], *, force: bool) -> None:
    """Refuse an OUTPUT that is, or contains, a found checkpoint, or that --force may not replace.

    `inputs` gives each found checkpoint's path and the files it is read from.
    """
    target = os.path.realpath(output.rstrip("/") or output)
    for display, files in inputs:
        for path in (display, *files):
            real = os.path.realpath(path)
            if real == target or _same_file(target, path):
                raise OutputError(f"{output}: OUTPUT is one of the inputs ({display}); choose another name")
            if real.startswith(target.rstrip(os.sep) + os.sep):
                raise OutputError(f"{output}: OUTPUT is a directory holding the input {display}; choose another name")
    if not os.path.lexists(target):
        return
    if not force:
        raise OutputError(f"{output}: already exists (use --force to overwrite)")
    if os.path.isdir(target) and not is_ckpt_avg_output(target):
        raise OutputError(
            f"{output}: is a directory ckpt-avg did not write; --force replaces only earlier ckpt-avg output"
            " directories (remove it yourself or choose another name)"
        )


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def is_ckpt_avg_output(path: str) -> bool:
    """True for a file or directory that an earlier ckpt-avg run wrote (it carries our provenance)."""
    try:
        if os.path.isdir(path):
            return _is_our_directory(path)
        if path.lower().endswith(".safetensors"):
            return "ckpt_avg" in read_header(path).metadata
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/" + PROVENANCE_RECORD) for name in archive.namelist())
    except (OSError, CheckpointError, zipfile.BadZipFile, ValueError):
        return False
    return False


def _is_our_directory(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "ckpt_avg.json")) and os.path.isfile(os.path.join(path, ".metadata")):
        return True  # a DCP output: its provenance lies beside the DCP files
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            metadata = json.load(f).get("metadata")
        return isinstance(metadata, dict) and "ckpt_avg" in metadata
    single = os.path.join(path, "model.safetensors")
    return os.path.isfile(single) and "ckpt_avg" in read_header(single).metadata
