"""What OUTPUT may be, so that no option ever costs the user a checkpoint.

OUTPUT is never one of the checkpoints found (selected or not), never a directory that
holds them, and `--force` replaces an existing directory only when ckpt-avg wrote it and
nothing else is in it. Outputs carry a provenance marker, so an earlier result found
among the inputs is recognised and left out instead of being averaged again.
"""

from __future__ import annotations

import enum
import os
import re
import stat
import zipfile
from collections.abc import Iterable

from .errors import CheckpointError, OutputError, UsageError
from .jsonfile import read_json
from .naming import PYTORCH_SUFFIXES
from .safetensors_file import read_metadata

# Megatron's torch_dist files beside a DCP checkpoint: copied into a DCP output.
DCP_SIDE_FILES = ("common.pt", "metadata.json")

# Files a Trainer directory holds beside its weights that from_pretrained needs; copied into a directory output.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "feature_extractor_config.json",
)

PROVENANCE_RECORD = "ckpt_avg.json"  # a record in every .pt output archive, a file in a DCP output
OUTPUT_SUFFIXES = (*PYTORCH_SUFFIXES, ".safetensors")


def is_directory_output(output: str) -> bool:
    return output.endswith(("/", os.sep)) or os.path.isdir(output)


class OutputKind(enum.Enum):
    """What OUTPUT is, decided once (in validation) and handed to the stages that need it."""

    PYTORCH = "pt"  # .pt .pth .pth.tar .ckpt .bin: the last checkpoint's structure, averaged in place
    SAFETENSORS = "safetensors"  # one flat file
    HF_DIRECTORY = "hf"  # DIR/: model.safetensors, or shards and their index
    DCP_DIRECTORY = "dcp"  # DIR/: torch.distributed.checkpoint (.metadata, __R_0.distcp, ckpt_avg.json)

    @property
    def keeps_structure(self) -> bool:
        return self is OutputKind.PYTORCH


def output_kind(output: str, out_format: str | None = None) -> OutputKind:
    """The kind of OUTPUT, from its name (or an existing directory) and --format; a usage error if none.

    A directory without --format is HF_DIRECTORY until the inputs are known (`directory_kind`).
    """
    if is_directory_output(output):
        return OutputKind.DCP_DIRECTORY if out_format == "dcp" else OutputKind.HF_DIRECTORY
    if out_format is not None:
        raise UsageError(f"--format {out_format} writes a directory; end OUTPUT {output!r} with /")
    if output.lower().endswith(".safetensors"):
        return OutputKind.SAFETENSORS
    if output.lower().endswith(PYTORCH_SUFFIXES):
        return OutputKind.PYTORCH
    raise UsageError(
        f"OUTPUT {output!r}: unknown format; end it with .safetensors, .pt, .pth, .pth.tar, .ckpt, .bin"
        " or / for a directory"
    )


def directory_kind(kind: OutputKind, out_format: str | None, inputs_dcp: bool) -> OutputKind:
    """The kind once the selected inputs are known: a directory OUTPUT without --format is a DCP
    checkpoint when every input is one (what their users load), else Hugging Face shards."""
    if kind is OutputKind.HF_DIRECTORY and out_format is None and inputs_dcp:
        return OutputKind.DCP_DIRECTORY
    return kind


def validate_output_name(output: str, *, max_shard_size: str | None, out_format: str | None = None) -> OutputKind:
    """Usage errors in OUTPUT, --max-shard-size and --format, before anything is read; the output's kind."""
    from .options import parse_size

    directory = is_directory_output(output)
    if max_shard_size is not None:
        try:
            parse_size(max_shard_size)
        except ValueError as exc:
            raise UsageError(f"--max-shard-size: {exc}") from None
        if not directory:
            raise UsageError("--max-shard-size needs a directory OUTPUT (end it with /)")
    kind = output_kind(output, out_format)
    parent = os.path.dirname(output.rstrip("/")) or "."
    if not os.path.isdir(parent):
        blocking = _first_non_directory(parent)
        if blocking is not None:
            raise UsageError(f"OUTPUT {output!r}: {blocking!r} is a file, not a directory")
        raise UsageError(f"OUTPUT {output!r}: directory {parent!r} does not exist")
    return kind


def _first_non_directory(path: str) -> str | None:
    """The nearest existing ancestor of `path` (itself included) when it is not a directory."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path if path and not os.path.isdir(path) else None


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
        checkpoint = os.path.realpath(display)
        if os.path.isdir(checkpoint) and target.startswith(checkpoint.rstrip(os.sep) + os.sep):
            raise OutputError(
                f"{output}: OUTPUT is inside the input checkpoint {display}, and inputs are never modified;"
                " choose a place outside it"
            )
    name = output.rstrip("/") or output
    if not os.path.lexists(name):
        return
    if not force:
        raise OutputError(f"{output}: already exists (use --force to overwrite)")
    refusal = replace_refusal(name)
    if refusal:
        raise OutputError(f"{output}: {refusal}")


def replace_refusal(path: str) -> str:
    """Why `--force` may not replace the existing `path`, or "" when it may.

    A file is replaced. A symbolic link is replaced as a link: what it points to is never
    touched. A directory is replaced only when ckpt-avg wrote it and every entry in it is a
    regular file that ckpt-avg writes there, so nothing the user added is ever deleted.
    """
    if os.path.islink(path) or not os.path.isdir(path):
        return ""
    if not is_ckpt_avg_output(path):
        return (
            "is a directory ckpt-avg did not write; --force replaces only earlier ckpt-avg output"
            " directories (remove it yourself or choose another name)"
        )
    try:
        foreign = _foreign_entry(path)
    except OSError as exc:
        return f"cannot list what is in it ({exc.strerror}); --force replaces only a directory it can check"
    if foreign is not None:
        return (
            f"holds {foreign!r}, which ckpt-avg did not write; --force replaces a directory only when every entry"
            " in it is from an earlier ckpt-avg output (move it out, or choose another name)"
        )
    return ""


_SHARD = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors", re.ASCII)
_DISTCP = re.compile(r"__[0-9]+_[0-9]+\.distcp", re.ASCII)


def written_names(kind: OutputKind = OutputKind.HF_DIRECTORY) -> frozenset[str]:
    """The fixed names ckpt-avg writes into a directory OUTPUT of `kind` (data files have numbered names)."""
    if kind is OutputKind.DCP_DIRECTORY:
        return frozenset({".metadata", PROVENANCE_RECORD, *DCP_SIDE_FILES})
    return frozenset({"model.safetensors", "model.safetensors.index.json", *HF_SIDE_FILES})


def _foreign_entry(path: str) -> str | None:
    """The first entry of directory `path` that is not a regular file ckpt-avg writes, or None."""
    kind = OutputKind.DCP_DIRECTORY if is_dcp_output(path) else OutputKind.HF_DIRECTORY
    names = written_names(kind)
    numbered = _DISTCP if kind is OutputKind.DCP_DIRECTORY else _SHARD
    for name in sorted(os.listdir(path)):
        if name not in names and not numbered.fullmatch(name):
            return name
        if not stat.S_ISREG(os.lstat(os.path.join(path, name)).st_mode):
            return name
    return None


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
            return "ckpt_avg" in read_metadata(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/" + PROVENANCE_RECORD) for name in archive.namelist())
    except (OSError, CheckpointError, zipfile.BadZipFile, ValueError):
        return False
    return False


def is_dcp_output(path: str) -> bool:
    """A DCP directory ckpt-avg wrote: its provenance (ckpt_avg.json) lies beside `.metadata`."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        return False
    try:
        record = read_json(os.path.join(path, PROVENANCE_RECORD))
    except (OSError, ValueError, CheckpointError):
        return False
    return isinstance(record, dict) and record.get("tool") == "ckpt-avg"


def _is_our_directory(path: str) -> bool:
    if is_dcp_output(path):
        return True
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        metadata = read_json(index).get("metadata")
        return isinstance(metadata, dict) and "ckpt_avg" in metadata
    single = os.path.join(path, "model.safetensors")
    return os.path.isfile(single) and "ckpt_avg" in read_metadata(single)
