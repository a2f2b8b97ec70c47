"""INPUT arguments (files, directories, glob patterns) to checkpoint references.

Nothing here opens a checkpoint: names and directory listings only.
"""

from __future__ import annotations

import fnmatch
import glob as globbing
import os
import stat as stat_module
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .errors import DiscoveryError, UsageError
from .jsonfile import read_json
from .naming import NameInfo, checkpoint_suffix, natural_key, parse_name

HF_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
TEMP_PREFIX = ".ckpt-avg-tmp-"
_GLOB_CHARS = set("*?[")
# SPEC 1.1: a converter that unpickles the files is never recommended without saying so.
UNPICKLES = (
    "the converter loads the files with full pickle, which runs any code in them: run it only on files you trust"
)
# --recursive searches this many directory levels below an INPUT; deeper ones get a note.
MAX_DEPTH = 100


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint: a file, or a Hugging Face-style directory of weight files."""

    display: str  # as the user gave it, joined with the found name: recorded in provenance
    files: tuple[str, ...]  # the weight files to read (shards in order for a directory)
    is_directory: bool
    explicit: bool  # named one by one on the command line, not found in a directory or by a glob
    order: int  # position among what was found (natural order within a directory or glob)
    size: int
    name: NameInfo = field(default_factory=NameInfo)

    @property
    def format(self) -> str:
        if self.files[0].endswith(".metadata"):
            return "dcp"
        return "safetensors" if self.files[0].endswith(".safetensors") else "pytorch"


@dataclass(frozen=True)
class Skipped:
    display: str
    reason: str
    size: int = 0
    # A checkpoint's name on something that cannot be read (a broken link, a FIFO): said in
    # every run, not only in the plan, since the user may have meant it to be averaged.
    unreadable: bool = False


@dataclass(frozen=True)
class Discovery:
    refs: tuple[CheckpointRef, ...]
    skipped: tuple[Skipped, ...]


def hf_weight_files(directory: str) -> tuple[str, ...] | None:
    """The weight files of a Hugging Face-style checkpoint directory, or None if it is not one."""
    for name in HF_WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return (path,)
        return tuple(os.path.join(directory, shard) for shard in _index_shards(path))
    return None


def _index_shards(index_path: str) -> list[str]:
    try:
        weight_map = read_json(index_path)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DiscoveryError(f"{index_path}: unreadable shard index: {exc}") from None
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise DiscoveryError(f"{index_path}: shard name {shard!r} is not a file in the directory")
    return shards


def refuse_conversion_layouts(directory: str) -> None:
    """Layouts that must be converted to a plain state dict before averaging."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    if any(n.startswith("zero_pp_rank_") or n.startswith("bf16_zero_pp_rank_") for n in names) or (
        "checkpoint" in names and _has_zero_files(os.path.join(directory, "checkpoint"))
    ):
        raise DiscoveryError(
            f"{directory}: DeepSpeed ZeRO checkpoint (zero_pp_rank_* shards); convert it first: "
            f"python zero_to_fp32.py {directory} {directory.rstrip('/')}_fp32.pt ({UNPICKLES})"
        )
    from .dcp import refuse_incomplete

    refuse_incomplete(directory, names)
    ranks = [n for n in names if n.startswith("mp_rank_")]
    if len(ranks) > 1 or any(os.path.isdir(os.path.join(directory, n)) for n in ranks):
        raise DiscoveryError(
            f"{directory}: Megatron model-parallel checkpoint ({', '.join(sorted(ranks)[:3])}); merge the"
            " ranks first with Megatron-LM's tools/checkpoint/convert.py (--target-tensor-parallel-size 1"
            f" --target-pipeline-parallel-size 1; {UNPICKLES})"
        )


def _has_zero_files(directory: str) -> bool:
    try:
        return any("zero_pp_rank_" in n for n in os.listdir(directory))
    except OSError:
        return False


def discover(inputs: Sequence[str], *, recursive: bool = False, name_glob: str | None = None) -> Discovery:
    """Every checkpoint INPUT names, each file once, in the order found.

    >>> discover(["ckpts/"]).refs  # doctest: +SKIP
    """
    found = _Found(name_glob)
    for argument in inputs:
        for path, explicit in _expand(argument):
            if os.path.isdir(path):
                found.add_directory(path, explicit=explicit, recursive=recursive, top=True)
            else:
                found.add_file(path, explicit=explicit)
    return Discovery(tuple(found.refs), tuple(found.skipped))


def _expand(argument: str) -> list[tuple[str, bool]]:
    if os.path.lexists(argument):
        return [(argument, True)]
    if _GLOB_CHARS & set(argument):
        matches = sorted(globbing.glob(argument, recursive=True), key=natural_key)
        if not matches:
            raise UsageError(f"INPUT pattern {argument!r} matches nothing")
        # A glob's matches were not named one by one: their order is not the user's choice.
        return [(m, False) for m in matches]
    raise UsageError(f"INPUT {argument!r} does not exist")


class _Found:
    def __init__(self, name_glob: str | None) -> None:
        self.name_glob = name_glob
        self.refs: list[CheckpointRef] = []
        self.skipped: list[Skipped] = []
        self._by_identity: dict[tuple[int, int], int] = {}

    def add_directory(self, directory: str, *, explicit: bool, recursive: bool, top: bool) -> None:
        """Depth first in name order, with a stack of listings: a tree thousands of levels
        deep neither overflows Python's stack nor is searched past MAX_DEPTH levels."""
        first = self._listing(directory, explicit=explicit, recursive=recursive, top=top)
        stack = [first] if first is not None else []
        while stack:
            path = next(stack[-1], None)
            if path is None:
                stack.pop()
                continue
            entry = os.path.basename(path)
            if os.path.isdir(path):
                if os.path.islink(path) and recursive:
                    continue  # A linked directory could loop back on itself.
                if len(stack) > MAX_DEPTH:
                    self.skipped.append(Skipped(path, f"more than {MAX_DEPTH} directory levels deep; not searched"))
                    continue
                listing = self._listing(path, explicit=False, recursive=recursive, top=False)
                if listing is not None:
                    stack.append(listing)
            elif checkpoint_suffix(entry) or os.path.islink(path):
                self.add_file(path, explicit=False)
            elif entry.lower().endswith(".nemo"):
                self.skipped.append(Skipped(path, nemo_hint(path), _size(path)))

    def _listing(self, directory: str, *, explicit: bool, recursive: bool, top: bool) -> Iterator[str] | None:
        """The paths to look at in a directory, or None where it is one checkpoint or not searched."""
        from .dcp import dcp_files

        dcp = dcp_files(directory)
        if dcp is not None:  # torch.distributed.checkpoint: one checkpoint
            self._add(directory, dcp, is_directory=True, explicit=explicit)
            return None
        refuse_conversion_layouts(directory)
        files = hf_weight_files(directory)
        if files is not None:
            self._add(directory, files, is_directory=True, explicit=explicit)
            return None
        if not top and not recursive:
            return None
        try:
            entries = sorted(os.listdir(directory), key=natural_key)
        except OSError as exc:
            raise DiscoveryError(f"{directory}: cannot list directory: {exc.strerror}") from None
        return iter([os.path.join(directory, e) for e in entries if not e.startswith(".")])

    def add_file(self, path: str, *, explicit: bool) -> None:
        name = os.path.basename(path)
        if not os.path.exists(path):
            self.skipped.append(Skipped(path, "broken or looping symbolic link", unreadable=True))
            return
        if checkpoint_suffix(name) is None:
            if name.lower().endswith(".nemo"):
                if explicit:
                    raise DiscoveryError(f"{path}: {nemo_hint(path)}")
                self.skipped.append(Skipped(path, nemo_hint(path), _size(path)))
                return
            if explicit:
                raise DiscoveryError(
                    f"{path}: not a checkpoint file name (expected .pt .pth .ckpt .bin .pth.tar .safetensors)"
                )
            return
        if name.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")):
            refuse_conversion_layouts(os.path.dirname(path) or ".")
        self._add(path, (path,), is_directory=False, explicit=explicit)

    def _add(self, display: str, files: tuple[str, ...], *, is_directory: bool, explicit: bool) -> None:
        name = os.path.basename(display.rstrip("/")) or display
        if self.name_glob and not fnmatch.fnmatch(name, self.name_glob):
            self.skipped.append(Skipped(display, f"name does not match --glob {self.name_glob}"))
            return
        irregular = [f for f in files if _exists_but_irregular(f)]
        if irregular:  # reading a FIFO blocks for ever, a device never ends
            what = (
                "not a regular file"
                if irregular[0] == display
                else f"its {os.path.basename(irregular[0])} is not a regular file"
            )
            reason = f"{what} (a FIFO, device or socket)"
            if explicit:
                raise DiscoveryError(f"{display}: cannot be a checkpoint: {reason}")
            self.skipped.append(Skipped(display, reason, unreadable=True))
            return
        info = parse_name(name, is_directory=is_directory)
        stat = os.stat(display)
        identity = (stat.st_dev, stat.st_ino)
        ref = CheckpointRef(
            display=display,
            files=files,
            is_directory=is_directory,
            explicit=explicit,
            order=len(self.refs),
            size=sum(_size(f) for f in files),
            name=info,
        )
        if identity in self._by_identity:
            self._keep_one_of(self._by_identity[identity], ref)
            return
        self._by_identity[identity] = len(self.refs)
        self.refs.append(ref)

    def _keep_one_of(self, position: int, new: CheckpointRef) -> None:
        old = self.refs[position]
        if old.name.is_alias and not new.name.is_alias:
            # Keep the name that carries an index: last.ckpt -> epoch=9.ckpt keeps epoch=9.
            self.refs[position] = CheckpointRef(
                new.display,
                new.files,
                new.is_directory,
                new.explicit or old.explicit,
                old.order,
                new.size,
                new.name,
            )
            self.skipped.append(Skipped(old.display, f"same file as {new.display}", old.size))
        else:
            self.skipped.append(Skipped(new.display, f"same file as {old.display}", new.size))


def nemo_hint(path: str) -> str:
    """What to do with a NeMo archive: its weights are one member of the tar file."""
    target = os.path.splitext(path)[0] + "_weights"
    return (
        "a NeMo .nemo archive (a tar file); extract its weights first: mkdir "
        f"{target} && tar -xf {path} -C {target} ./model_weights.ckpt, then average the model_weights.ckpt files"
    )


def _exists_but_irregular(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # a missing shard is an error only if that checkpoint is read
    return not stat_module.S_ISREG(mode)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
