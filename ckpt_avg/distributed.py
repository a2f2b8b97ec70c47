"""Averaging on torchrun: every rank plans, each writes its share of the files, rank 0 publishes.

`torchrun --nproc-per-node P -m ckpt_avg INPUT... -o DIR/ --max-shard-size 5GB` runs P
copies of the command; DIR gets Hugging Face shards or, from DCP inputs, a DCP checkpoint.
Each computes the same plan from the inputs' metadata alone and the ranks confirm that it
agrees (a hash of it, all-gathered). The output's files go to the ranks by size, largest
first, each written by exactly one rank into a shared staging directory
(`.ckpt-avg-tmp-OUT.partial-<run id>`) and fsynced. After a vote in which every rank reports
success and its per-tensor digests, rank 0 writes what carries the provenance (the index, or
DCP's `.metadata` and `ckpt_avg.json`: the same bytes as a single process writes, no world
size, host or time in them), fsyncs and renames. Any failure publishes nothing.

The collectives carry only metadata (plans, votes, digests), so they run over gloo on TCP,
whatever `--device` the arithmetic uses.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from .average import Digests
from .digest import Record
from .errors import CkptAvgError, OutputError, UsageError
from .guard import OutputKind, check_output
from .layout import Layout
from .lazy import itemsize, leaf_numel
from .options import Options, parse_size
from .report import Report
from .run import _batchnorm_refused, _report, _Run, _validate, run_engine
from .write import (
    HEARTBEAT_SECONDS,
    OWNER_FILE,
    discard,
    heartbeat,
    make_staging,
    plan_shards,
    read_owner,
    remove_stale_staging,
    staging_path_for,
    write_owner,
)
from .writers import ordered_visits, plan_staged
from .written import Runner, StagedPlan, Written

# TEST ONLY: "R" or "R:raise" makes rank R raise after writing its files, "R:exit" makes it
# die there with os._exit (as a killed process would). Never set it outside the test suite.
FAULT_ENV = "CKPT_AVG_TEST_FAIL_RANK"
# Seconds a rank waits in a collective (gloo's default of 30 minutes is shorter than one rank's
# share of a large model can take while the others wait at the vote).
TIMEOUT_ENV = "CKPT_AVG_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Ranks:
    """The process group a run is split over, and this process's place in it."""

    group: Any  # a torch.distributed ProcessGroup
    rank: int
    world: int
    local_world: int


class RankError(CkptAvgError):
    """A failure on one or more ranks; only rank 0 prints it, so it is reported once."""

    def __init__(self, message: str, exit_code: int, ranks: Ranks, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.reported_elsewhere = ranks.rank != 0
        self._ranks = ranks
        self._cli_message = message if cli_message is None else cli_message

    @property
    def cli_message(self) -> str:
        return self._cli_message

    def settle(self) -> None:
        """Wait until every rank has reported (rank 0 prints first): torchrun stops the other
        ranks as soon as one exits, which could cut rank 0 off before it says why."""
        with contextlib.suppress(Exception):
            _gather(self._ranks, None, "end")


class LostContact(CkptAvgError):
    """A collective failed: another rank died, was killed or timed out."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def environment_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched so)."""
    return _env_int("RANK", 0)


def from_environment() -> Any:
    """The default process group, initialised over gloo from torchrun's environment.

    None when not launched by torchrun, or launched with a single process.
    """
    if not launched_by_torchrun() or _env_int("WORLD_SIZE", 1) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run ckpt-avg without torchrun")
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", timeout=timedelta(seconds=collective_timeout()))
        except (RuntimeError, ValueError) as exc:
            raise CkptAvgError(f"rank {environment_rank()}: cannot join the other ranks: {exc}") from None
        # Left to interpreter shutdown, gloo's threads abort the process ("terminate called").
        atexit.register(_destroy)
    return dist.group.WORLD


def _destroy() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def ranks_of(process_group: Any) -> Ranks:
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    local = _env_int("LOCAL_WORLD_SIZE", world) if process_group in (None, dist.group.WORLD) else world
    return Ranks(process_group, dist.get_rank(process_group), world, max(1, min(local, world)))


def collective_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_ENV}={value!r}: give a number of seconds greater than 0")
    return seconds


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not an integer (is this torchrun's environment?)") from None


# ---------------------------------------------------------------- the plan's share per rank


def assign_files(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Which files each rank writes: largest first (ties by index) to the least loaded rank.

    Every file goes to exactly one rank; each rank's list is in index order.

    >>> assign_files([5, 1, 4, 4], 2)
    [[0, 1], [2, 3]]
    """
    loads = [0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += sizes[index]
        shares[rank].append(index)
    return [sorted(share) for share in shares]


# ---------------------------------------------------------------- collectives


# How one rank's failure travels to the others: the message for the Python API, the one the
# CLI prints (flags, not keywords), and the exit status.
Status = tuple[str, str, int]


def _describe(error: BaseException) -> Status:
    """The error as the API and the CLI would report it, and its exit status."""
    if isinstance(error, CkptAvgError):
        return str(error), error.cli_message, error.exit_code
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        text = f"{where}{error.strerror or error}"
        return text, text, 1
    text = f"internal error: {type(error).__name__}: {error}"
    return text, text, 1


def _gather(ranks: Ranks, value: Any, step: str) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * ranks.world
    try:
        if step == "vote":  # the long wait: on a timeout, rank 0 learns which ranks never came
            timeout = timedelta(seconds=collective_timeout())
            dist.monitored_barrier(group=ranks.group, timeout=timeout, wait_all_ranks=True)
        dist.all_gather_object(gathered, value, group=ranks.group)
    except (RuntimeError, ValueError) as exc:
        raise LostContact(
            f"rank {ranks.rank}: lost contact with the other ranks at the {step} (a rank failed, was killed"
            f" or timed out); nothing was published: {_short(exc)}"
        ) from None
    return gathered


def _short(error: BaseException) -> str:
    """gloo's message without its source location and boilerplate."""
    text = (str(error).splitlines() or [type(error).__name__])[0]
    if text.startswith("[/") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(" This is typically", 1)[0]


def _agree(ranks: Ranks, failure: BaseException | None, payload: Any, step: str) -> list[Any]:
    """Every rank says how its part of `step` went; if any failed, every rank raises."""
    status = None if failure is None else _describe(failure)
    gathered = _gather(ranks, (status, payload), step)
    failed = [(rank, status) for rank, (status, _) in enumerate(gathered) if status is not None]
    if failed:
        raise _rank_error(ranks, failed)
    return [payload for _, payload in gathered]


def _rank_error(ranks: Ranks, failed: list[tuple[int, Status]]) -> RankError:
    first_rank, (message, cli_message, code) = failed[0]
    if len(failed) == ranks.world and len({status[0] for _, status in failed}) == 1:
        return RankError(message, code, ranks, cli_message)  # every rank hit the same problem: as one process
    others = [str(rank) for rank, _ in failed[1:]]
    also = f" (rank {', '.join(others)} failed too)" if others else ""
    return RankError(f"rank {first_rank}: {message}{also}", code, ranks, f"rank {first_rank}: {cli_message}{also}")


def _fault(rank: int) -> None:
    """The test suite's fault injection (FAULT_ENV); a no-op in any real run."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, mode = spec.partition(":")
    if target.strip() != str(rank):
        return
    if mode == "exit":
        os._exit(9)
    raise CkptAvgError(f"injected test failure ({FAULT_ENV}={spec})")


# ---------------------------------------------------------------- the run


# What a rank sends to the vote: its digest records, and the sha256 of its files by name.
Share = tuple[tuple[list[dict[str, Record]], dict[str, Record]], dict[str, str]]


@dataclass
class Prepared:
    run: _Run
    layout: Layout
    plan: StagedPlan


def prepare(inputs: Sequence[str], output: str, options: Options, ranks: Ranks) -> Prepared:
    """Validate, select, open and plan from metadata: the same on every rank."""
    _batchnorm_refused(options, "under torchrun")
    named = _validate(options, output)
    if named not in (OutputKind.HF_DIRECTORY, OutputKind.DCP_DIRECTORY):
        raise UsageError(
            f"OUTPUT {output!r} is a single file, which one process writes; under {ranks.world} ranks write a"
            f" directory of shards: -o DIR/ --max-shard-size SIZE, SIZE at most the model's size / {ranks.world}"
        )
    run = _Run(inputs, options)
    kind = run.output_kind(named)
    check_output(output, [(r.display, r.files) for r in run.discovery.refs], force=options.force)
    run.open_selected()
    layout = run.layout(kind)
    plan = plan_staged(output, kind, layout, run.provenance(), options)
    if plan.single:
        raise UsageError(
            f"{output}: the output is one file ({plan.files[0].nbytes} bytes), which one process writes; under"
            f" {ranks.world} ranks give --max-shard-size so there are files to share"
            f" (e.g. --max-shard-size {shard_size_for(plan.entries, ranks.world)})"
        )
    if len(plan.files) < ranks.world:
        run.warnings.append(
            f"{ranks.world} ranks share {len(plan.files)} output files: {ranks.world - len(plan.files)} rank(s) have"
            " nothing to write (a smaller --max-shard-size makes more files)"
        )
    return Prepared(run, layout, plan)


def shard_size_for(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], world: int) -> str:
    """A readable --max-shard-size that gives at least `world` files where the tensors allow:
    about the data's size / world, rounded down, and halved while one tensor's size spoils it."""
    total = sum(math.prod(shape) * itemsize(dtype) for dtype, shape in entries.values())
    size = readable_floor(max(1, total // world))
    while len(plan_shards(entries, parse_size(size))) < world and parse_size(size) > 1:
        size = readable_floor(max(1, parse_size(size) // 2))
    return size


def readable_floor(size: int) -> str:
    """`size` bytes rounded down to whole units: 62_500 -> '62KB'."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor:
            return f"{size // factor}{unit}"
    return f"{size}B"


@contextlib.contextmanager
def _heartbeat(staging: str) -> Iterator[None]:
    """Rank 0 keeps the staging directory's owner file fresh while the run lives."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            heartbeat(staging)

    thread = threading.Thread(target=beat, name="ckpt-avg-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def average_on_ranks(
    inputs: Sequence[str],
    output: str,
    options: Options,
    process_group: Any,
    *,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Report:
    """`average_checkpoints` split over the ranks of `process_group`; every rank must call it."""
    # Reader and arithmetic threads come from the cores this rank may use (average.Budgets
    # divides the node's by torchrun's LOCAL_WORLD_SIZE).
    return _average_on_ranks(inputs, output, options, ranks_of(process_group), progress, on_total)


def _average_on_ranks(
    inputs: Sequence[str],
    output: str,
    options: Options,
    ranks: Ranks,
    progress: Callable[[int], None] | None,
    on_total: Callable[[int], None] | None,
) -> Report:
    started = time.monotonic()
    if options.device == "cuda" and torch.cuda.is_available():  # each rank on a device of its node
        options = replace(options, device=f"cuda:{_env_int('LOCAL_RANK', 0) % torch.cuda.device_count()}")
    prepared: Prepared | None = None
    failure: BaseException | None = None
    try:
        prepared = prepare(inputs, output, options, ranks)
    except Exception as exc:  # noqa: BLE001 - reported through the vote, raised on every rank
        failure = exc
    proposal = (prepared.plan.fingerprint() if prepared else None, secrets.token_hex(8), secrets.token_hex(16))
    proposals = _agree(ranks, failure, proposal, "planning")
    assert prepared is not None
    _check_same_plan(ranks, [p[0] for p in proposals])
    run_id, nonce = proposals[0][1], proposals[0][2]
    staging = staging_path_for(output, run_id)
    published = False
    try:
        with _heartbeat(staging) if ranks.rank == 0 else contextlib.nullcontext():
            written = _stage_and_publish(ranks, prepared, options, staging, run_id, nonce, progress, on_total)
        published = True
    except LostContact as lost:
        if ranks.rank == 0 or not os.path.isdir(staging):
            raise
        raise LostContact(  # rank 0 may be the one that died: say where its files stay, and until when
            f"{lost}; if rank 0 was stopped, its staging directory {staging} stays until the next run to"
            f" {output} removes it"
        ) from None
    finally:
        if ranks.rank == 0 and not published:
            discard(staging)
    return _report(prepared.run, prepared.layout, written, output, started)


def _check_same_plan(ranks: Ranks, fingerprints: list[str]) -> None:
    differ = [rank for rank, f in enumerate(fingerprints) if f != fingerprints[0]]
    if differ:
        raise RankError(
            f"rank {differ[0]} planned a different output than rank 0 (another command, ckpt-avg version, input"
            " file or path); every rank must run the same command on the same files",
            1,
            ranks,
        )


def _stage_and_publish(
    ranks: Ranks,
    prepared: Prepared,
    options: Options,
    staging: str,
    run_id: str,
    nonce: str,
    progress: Callable[[int], None] | None,
    on_total: Callable[[int], None] | None,
) -> Written:
    failure: BaseException | None = None
    if ranks.rank == 0:
        try:
            remove_stale_staging(prepared.plan.output)
            make_staging(staging, prepared.plan.output)
            write_owner(staging, run_id, nonce)
        except Exception as exc:  # noqa: BLE001 - reported through the vote
            failure = exc
    _agree(ranks, failure, None, "creation of the staging directory")
    _agree(ranks, _sees_staging(ranks, staging, nonce), None, "check of the shared file system")
    parts: Share | None = None
    failure = None
    try:
        parts = write_share(prepared, options, staging, ranks.rank, ranks.world, progress, on_total)
        _fault(ranks.rank)
    except Exception as exc:  # noqa: BLE001 - reported through the vote
        failure = exc
    voted = _agree(ranks, failure, parts, "vote")
    written: Written | None = None
    failure = None
    if ranks.rank == 0:
        try:
            written = publish(prepared, options, staging, voted)
        except Exception as exc:  # noqa: BLE001 - reported through the vote
            failure = exc
    result: Written = _agree(ranks, failure, written, "publication")[0]
    return result


def write_share(
    prepared: Prepared,
    options: Options,
    staging: str,
    rank: int,
    world: int,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Share:
    """Rank `rank` of `world`: stream its files of the plan into `staging`."""
    mine = assign_files([f.nbytes for f in prepared.plan.files], world)[rank]
    names = {n for i in mine for n in prepared.plan.files[i].tensors}
    runner = _runner(prepared.layout, options, progress, on_total, names)
    try:
        digests, sha256 = prepared.plan.write(staging, mine, runner, hashed=options.hash_files)
    except OSError as exc:  # a full disk names no file: say which output, as one process does
        raise OutputError(f"{prepared.plan.output}: write failed: {exc.strerror or exc}") from None
    return digest_parts(digests), sha256


def publish(prepared: Prepared, options: Options, staging: str, voted: Sequence[Share]) -> Written:
    """Rank 0, once every rank has voted yes: what carries the provenance, from everyone's
    digests, then the rename."""
    digests = merge_digest_parts([part for part, _ in voted], len(prepared.layout.opened))
    sha256 = {name: digest for _, each in voted for name, digest in each.items()}
    os.remove(os.path.join(staging, OWNER_FILE))  # not part of the output
    hashed = options.hash_files
    warn = prepared.layout.warnings.append
    try:
        return prepared.plan.finalize(staging, digests, sha256, force=options.force, hashed=hashed, warn=warn)
    except OSError as exc:
        raise OutputError(f"{prepared.plan.output}: write failed: {exc.strerror or exc}") from None


def _sees_staging(ranks: Ranks, staging: str, nonce: str) -> BaseException | None:
    record = read_owner(staging)
    if record is not None and record.get("nonce") == nonce:
        return None
    return OutputError(
        f"{staging}: rank {ranks.rank} on {socket.gethostname()} does not see the staging directory rank 0 made;"
        " the output (and the inputs) must be on a file system every rank shares"
    )


def _runner(
    layout: Layout,
    options: Options,
    progress: Callable[[int], None] | None,
    on_total: Callable[[int], None] | None,
    names: Collection[str],
) -> Runner:
    if on_total is not None:  # this rank's share of the reading
        visits = ordered_visits(layout.visits, sorted(names))
        on_total(sum(leaf_numel(x) * itemsize(x.dtype) for v in visits if v.compute for x in v.unit.leaves))
    advance = progress or (lambda _: None)

    def run(sink: Any, primary_only: bool, order: Sequence[str] | None = None) -> Digests:
        return run_engine(layout, options, sink, advance, ordered_visits(layout.visits, order or sorted(names)))

    return run


# ---------------------------------------------------------------- digests from parts


def digest_parts(digests: Digests) -> tuple[list[dict[str, Record]], dict[str, Record]]:
    """What a rank contributes to the provenance: the digest records of its tensors."""
    return [dict(d.records) for d in digests.inputs], dict(digests.output.records)


def merge_digest_parts(parts: Sequence[tuple[list[dict[str, Record]], dict[str, Record]]], inputs: int) -> Digests:
    """Every rank's records in one set: the tree digests then equal a single process's."""
    merged = Digests.for_inputs(inputs)
    for input_records, output_records in parts:
        for position, records in enumerate(input_records):
            merged.inputs[position].records.update(records)
        merged.output.records.update(output_records)
    return merged
