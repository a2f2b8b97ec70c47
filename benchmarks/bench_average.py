#!/usr/bin/env python3
"""Benchmark `ckpt-avg` against the naive load-everything average and against the disk.

For each set of synthetic transformer-shaped checkpoints (safetensors, zip `.pt` or
Lightning `.ckpt` with Adam state; float32 or bfloat16) this script runs `ckpt-avg` and a
naive baseline (load each checkpoint whole, accumulate a float32 sum, divide, save: the
classic fairseq/timm algorithm) as subprocesses under `/usr/bin/time -v`, alternating,
warm and cold, and reports median wall time and peak RSS beside the physical limits
measured in the same run: reading every input once, writing the output once with fsync,
and `import torch`. Every ckpt-avg output is checked against a float64 oracle computed
here, tensor by tensor; the table says how many elements of the naive output match it.

    python benchmarks/bench_average.py --quick
    python benchmarks/bench_average.py --sizes 1GiB --count 8 --formats safetensors --runs 5

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

MiB = 1 << 20
SUFFIX = {"safetensors": ".safetensors", "pt": ".pt", "ckpt": ".ckpt"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
LARGEST_TENSOR = 64 * MiB  # bytes of the largest matrix, whatever the model size


# ---------------------------------------------------------------- sizes and shapes


def parse_size(text: str) -> int:
    """`1GB` = 10^9 bytes, `1GiB` = 2^30, `64MiB`, or a bare number of bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1GiB or 500MB")
    number, prefix, binary = match.groups()
    power = " KMGT".index(prefix.upper() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f}{unit}" if unit in ("B", "KiB") else f"{nbytes:.1f}{unit}"
        nbytes /= 1024
    raise AssertionError


def model_shapes(model_bytes: int, itemsize: int) -> dict[str, tuple[int, ...]]:
    """A decoder-only transformer of about `model_bytes`: the largest matrix is about 64 MiB
    (smaller for small models), so larger models have more layers, not larger tensors."""
    largest = min(LARGEST_TENSOR, max(model_bytes // 8, 4 * 64 * 64 * itemsize))
    d = max(64, int(math.sqrt(largest / (4 * itemsize))) // 64 * 64)
    vocab, ffn = 4 * d, 4 * d
    per_layer = (4 * d * d + 2 * d * ffn) * itemsize
    layers = max(1, round((model_bytes - vocab * d * itemsize) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        p = f"layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}attn.{proj}_proj.weight"] = (d, d)
            shapes[f"{p}attn.{proj}_proj.bias"] = (d,)
        shapes[f"{p}mlp.up.weight"] = (ffn, d)
        shapes[f"{p}mlp.up.bias"] = (ffn,)
        shapes[f"{p}mlp.down.weight"] = (d, ffn)
        shapes[f"{p}mlp.down.bias"] = (d,)
        for norm in ("norm1", "norm2"):
            shapes[f"{p}{norm}.weight"] = (d,)
            shapes[f"{p}{norm}.bias"] = (d,)
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    return shapes


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, index: int, seed: int) -> torch.Tensor:
    """Checkpoint `index`'s value of one tensor: a shared base plus per-checkpoint drift."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib_crc(name))
    numel = math.prod(shape)
    base = torch.randn(numel, generator=generator)
    noise = torch.randn(numel, generator=generator)
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
        base = base.mul_(0.05).add_(1.0)
    else:
        base = base.mul_(1.0 / math.sqrt(shape[-1]))
    drift = torch.roll(noise, shifts=(index * 7919) % max(numel, 1)).mul_(0.02 / math.sqrt(shape[-1]))
    return base.add_(drift).to(dtype).reshape(shape)


def zlib_crc(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


# ---------------------------------------------------------------- generating sets


@dataclass
class CheckpointSet:
    kind: str  # safetensors, pt or ckpt
    dtype_name: str
    size: int  # target bytes of each file
    count: int
    directory: str
    files: list[str] = field(default_factory=list)
    model_bytes: int = 0
    largest_tensor: int = 0
    tensors: int = 0

    @property
    def label(self) -> str:
        return f"{self.kind} {self.dtype_name} {self.count}x{human(self.size)}"

    @property
    def file_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)


def prepare_set(kind: str, dtype_name: str, size: int, count: int, root: str) -> CheckpointSet:
    dtype = DTYPES[dtype_name]
    directory = os.path.join(root, f"{kind}-{dtype_name}-{size}-x{count}")
    # A Lightning checkpoint holds the weights and Adam's two moments: the weights are a third.
    model_bytes = size // 3 if kind == "ckpt" else size
    shapes = model_shapes(model_bytes, dtype.itemsize)
    names = [f"epoch={i}-step={(i + 1) * 100}{SUFFIX[kind]}" for i in range(count)]
    files = [os.path.join(directory, n) for n in names]
    done = os.path.join(directory, "COMPLETE")
    if not os.path.exists(done):
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        started = time.monotonic()
        if kind == "safetensors":
            write_safetensors_set(files, shapes, dtype)
        else:
            for index, path in enumerate(files):
                write_torch_checkpoint(path, kind, shapes, dtype, index)
        with open(done, "w") as f:
            f.write("ok\n")
        print(
            f"  generated {kind} {dtype_name} {count} x {human(size)} in {time.monotonic() - started:.0f}s",
            file=sys.stderr,
        )
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    return CheckpointSet(
        kind, dtype_name, size, count, directory, files,
        model_bytes=sum(numels.values()) * dtype.itemsize,
        largest_tensor=max(numels.values()) * dtype.itemsize,
        tensors=len(shapes),
    )  # fmt: skip


def write_safetensors_set(files: list[str], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
    """All files at once, tensor by tensor, so memory stays at one tensor."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * dtype.itemsize
        header[name] = {
            "dtype": ST_NAMES[dtype],
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(path, "wb")) for path in files]
        for handle in handles:
            handle.write(len(raw).to_bytes(8, "little") + raw)
        for name in sorted(shapes):
            for index, handle in enumerate(handles):
                tensor = make_tensor(name, shapes[name], dtype, index, seed=1)
                handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def write_torch_checkpoint(
    path: str, kind: str, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, index: int
) -> None:
    """One `torch.save` file, held whole in memory while it is written (as training does)."""
    state = {name: make_tensor(name, shape, dtype, index, seed=1) for name, shape in shapes.items()}
    if kind == "pt":
        torch.save(state, path)
        return
    names = list(state)
    adam = {
        i: {
            "step": torch.tensor(float((index + 1) * 100)),
            "exp_avg": torch.randn(state[n].shape).mul_(1e-3).to(dtype),
            "exp_avg_sq": torch.rand(state[n].shape).mul_(1e-6).to(dtype),
        }
        for i, n in enumerate(names)
    }
    checkpoint = {
        "epoch": index,
        "global_step": (index + 1) * 100,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{n}": t for n, t in state.items()},
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": index}}}},
        "callbacks": {},
        "optimizer_states": [
            {
                "state": adam,
                "param_groups": [
                    {
                        "lr": 3e-4,
                        "betas": (0.9, 0.999),
                        "eps": 1e-8,
                        "weight_decay": 0.0,
                        "amsgrad": False,
                        "maximize": False,
                        "foreach": None,
                        "capturable": False,
                        "differentiable": False,
                        "fused": None,
                        "params": list(range(len(names))),
                    }
                ],
            }
        ],
        "lr_schedulers": [],
        "hyper_parameters": {"d_model": shapes["embed_tokens.weight"][1], "layers": len(names) // 16},
    }
    torch.save(checkpoint, path)


# ---------------------------------------------------------------- reading tensors back


def open_state(path: str) -> tuple[dict[str, torch.Tensor] | None, Any]:
    """(a lazily mapped state dict, the handle that keeps it open) of any of our files."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        handle = safe_open(path, framework="pt")
        return None, handle
    loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    return loaded, None


def state_tensors(path: str) -> tuple[list[str], Any]:
    state, handle = open_state(path)
    if handle is not None:
        return sorted(handle.keys()), lambda name: handle.get_tensor(name)
    assert state is not None
    return sorted(state), lambda name: state[name]


def round_once(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 to `dtype`, one round-to-nearest-even (not torch's double rounding via float32).

    Clear the dropped low bits of the float64 pattern with round-half-to-even; the result
    is then exact in the target dtype (valid in the normal range, where these values lie).
    """
    if dtype == torch.float32:
        return values.to(torch.float32)
    drop = 52 - {torch.bfloat16: 7, torch.float16: 10}[dtype]
    bits = values.view(torch.int64)
    lsb = (bits >> drop) & 1
    rounded = (bits + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)
    return rounded.view(torch.float64).to(dtype)


def tree_record(name: str, tensor: torch.Tensor, digest: bytes) -> bytes:
    """One record of SPEC §1.7's BLAKE3 tree, as ckpt_avg/digest.py documents the encoding."""
    key = name.encode()
    dtype = str(tensor.dtype).removeprefix("torch.").encode()
    dims = struct.pack(f"<{1 + tensor.dim()}Q", tensor.dim(), *tensor.shape)
    return struct.pack("<Q", len(key)) + key + struct.pack("<Q", len(dtype)) + dtype + dims + digest


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


@dataclass
class Oracle:
    """Per-tensor sha256 of the exact float64 mean rounded once, and the SPEC's tensor digest (BLAKE3 tree)."""

    tensor_sha: dict[str, str]
    digest: str
    elements: int


def compute_oracle(inputs: Sequence[str], naive_output: str | None) -> tuple[Oracle, tuple[int, int] | None]:
    """Stream the oracle tensor by tensor; count elements of the naive output that equal it."""
    opened = [state_tensors(p) for p in inputs]
    names = opened[-1][0]
    naive = state_tensors(naive_output) if naive_output else None
    from blake3 import blake3

    shas: dict[str, str] = {}
    digest = blake3(struct.pack("<Q", len(names)))
    equal = total = 0
    for name in names:
        tensors = [get(name) for _, get in opened]
        accumulator = torch.zeros(tensors[0].shape, dtype=torch.float64)
        for tensor in tensors:
            accumulator += tensor.to(torch.float64)
        accumulator /= len(tensors)
        exact = round_once(accumulator, tensors[-1].dtype)
        shas[name] = hashlib.sha256(raw_bytes(exact)).hexdigest()
        digest.update(tree_record(name, exact, blake3(raw_bytes(exact)).digest()))
        total += exact.numel()
        if naive is not None:
            other = naive[1](name)
            same_bits = other.contiguous().view(torch.int16 if exact.element_size() == 2 else torch.int32)
            equal += int((same_bits == exact.view(same_bits.dtype)).sum())
    return Oracle(shas, digest.hexdigest(), total), ((equal, total) if naive else None)


def check_output(path: str, oracle: Oracle) -> bool:
    names, get = state_tensors(path)
    if names != sorted(oracle.tensor_sha):
        return False
    return all(hashlib.sha256(raw_bytes(get(n))).hexdigest() == oracle.tensor_sha[n] for n in names)


# ---------------------------------------------------------------- the naive baseline


def naive_average(inputs: Sequence[str], output: str) -> None:
    """Load each checkpoint whole, accumulate a float32 sum, divide, save (fairseq/timm)."""
    from safetensors.torch import load_file, save_file

    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    last: dict[str, Any] = {}
    for path in inputs:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            last = torch.load(path, map_location="cpu", weights_only=True)
            state = last.get("state_dict", last)
        for name, tensor in state.items():
            if name not in total:
                total[name] = tensor.to(torch.float32, copy=True)
                dtypes[name] = tensor.dtype
            else:
                total[name] += tensor
        del state
    averaged = {name: (t / len(inputs)).to(dtypes[name]) for name, t in total.items()}
    if output.endswith(".safetensors"):
        save_file(averaged, output, metadata={"format": "pt"})
    elif "state_dict" in last:
        last.pop("optimizer_states", None)
        last["state_dict"] = averaged
        torch.save(last, output)
    else:
        torch.save(averaged, output)


# ---------------------------------------------------------------- measuring


@dataclass
class Measured:
    wall: float
    rss: int  # bytes


def timed(command: Sequence[str]) -> Measured:
    """Run under /usr/bin/time -v: wall time (our clock) and maximum resident set size."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if not match:
        raise RuntimeError(f"no RSS in /usr/bin/time output:\n{result.stderr[-2000:]}")
    return Measured(wall, int(match.group(1)) * 1024)


class Cache:
    """Warming and evicting the page cache, by the best means this machine permits."""

    def __init__(self) -> None:
        self.method = "drop_caches"
        try:
            self._drop()
        except OSError:
            self.method = "posix_fadvise(DONTNEED)"

    @staticmethod
    def _drop() -> None:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")

    def evict(self, files: Sequence[str]) -> None:
        if self.method == "drop_caches":
            self._drop()
            return
        os.sync()
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    @staticmethod
    def read_all(files: Sequence[str]) -> float:
        started = time.perf_counter()
        with open(os.devnull, "wb") as null:
            subprocess.run(["cat", *files], stdout=null, check=True)
        return time.perf_counter() - started


def write_once(path: str, nbytes: int) -> float:
    """Write `nbytes` and fsync: the floor for writing the output."""
    block = os.urandom(16 * MiB)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    os.remove(path)
    return elapsed


def fsync_time(path: str) -> float:
    """Seconds to make a finished file durable: what a run that fsyncs its output also pays."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def ckpt_avg_command(inputs: Sequence[str], output: str, args: argparse.Namespace) -> list[str]:
    # The same interpreter as the naive baseline and the import-torch limit (no launcher shims).
    base = args.ckpt_avg.split() if args.ckpt_avg else [sys.executable, "-m", "ckpt_avg"]
    return [*base, *inputs, "-o", output, "--force", "--quiet", *args.extra]


def naive_command(inputs: Sequence[str], output: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "_naive", output, *inputs]


@dataclass
class CaseResult:
    label: str
    output_kind: str
    files: int
    input_bytes: int
    model_bytes: int
    largest_tensor: int
    runs: dict[str, list[float]] = field(default_factory=dict)  # "ckpt-avg warm" -> walls
    rss: dict[str, list[int]] = field(default_factory=dict)
    limits: dict[str, list[float]] = field(default_factory=dict)
    import_rss: list[int] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    digest_ok: list[bool] = field(default_factory=list)
    naive_match: tuple[int, int] | None = None  # (elements equal to the oracle, elements)

    def add(self, key: str, measured: Measured) -> None:
        self.runs.setdefault(key, []).append(measured.wall)
        self.rss.setdefault(key, []).append(measured.rss)

    def median(self, key: str) -> float:
        return statistics.median(self.runs[key]) if key in self.runs else math.nan

    def peak(self, key: str) -> int:
        return max(self.rss[key]) if key in self.rss else 0

    def limit(self, key: str) -> float:
        return statistics.median(self.limits[key]) if key in self.limits else math.nan


def run_case(cset: CheckpointSet, output_kind: str, args: argparse.Namespace, cache: Cache, workdir: str) -> CaseResult:
    suffix = SUFFIX[output_kind]
    ours, theirs = os.path.join(workdir, "ours" + suffix), os.path.join(workdir, "naive" + suffix)
    result = CaseResult(cset.label, output_kind, cset.count, cset.file_bytes, cset.model_bytes, cset.largest_tensor)
    oracle: Oracle | None = None
    modes = ["warm"] + ([] if args.no_cold else ["cold"])
    tools = ["ckpt-avg"] + ([] if args.no_naive else ["naive"])
    for run in range(args.runs):
        # Alternate who goes first; the naive output of the first run feeds the oracle's comparison.
        order = tools[::-1] if run % 2 == 0 else tools
        for mode in modes:
            for tool in order:
                out = ours if tool == "ckpt-avg" else theirs
                command = (
                    ckpt_avg_command(cset.files, out, args) if tool == "ckpt-avg" else naive_command(cset.files, out)
                )
                if os.path.exists(out):
                    os.remove(out)  # freeing the last run's blocks is not this run's work
                if mode == "warm":
                    cache.read_all(cset.files)
                else:
                    cache.evict(cset.files)
                measured = timed(command)
                result.add(f"{tool} {mode}", measured)
                if tool == "naive":  # the classic script leaves its output in the page cache; ckpt-avg fsyncs
                    result.runs.setdefault(f"naive+fsync {mode}", []).append(measured.wall + fsync_time(out))
                if tool == "ckpt-avg":
                    if oracle is None:
                        oracle = oracle_for(
                            cset, theirs if "naive" in tools else None, ours, tools, cache, args, result
                        )
                    result.exact.append(check_output(ours, oracle))
                    result.digest_ok.append(reported_digest(cset, ours, args) in (None, oracle.digest))
        measure_limits(cset, result, cache, workdir)
    for path in (ours, theirs):
        if os.path.exists(path):
            os.remove(path)
    return result


def oracle_for(
    cset: CheckpointSet, naive_out: str | None, ours: str, tools: list[str], cache: Cache, args: argparse.Namespace,
    result: CaseResult,
) -> Oracle:  # fmt: skip
    """The oracle (computed once per case) and the naive output's agreement with it."""
    if naive_out is not None and not os.path.exists(naive_out):
        subprocess.run(naive_command(cset.files, naive_out), check=True)
    started = time.monotonic()
    oracle, match = compute_oracle(cset.files, naive_out)
    result.naive_match = match
    print(f"  oracle for {cset.label}: {time.monotonic() - started:.0f}s", file=sys.stderr)
    return oracle


def reported_digest(cset: CheckpointSet, output: str, args: argparse.Namespace) -> str | None:
    """The output tensor digest ckpt-avg records in a safetensors output's provenance."""
    if not output.endswith(".safetensors"):
        return None
    with open(output, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    provenance = header.get("__metadata__", {}).get("ckpt_avg")
    if not provenance:
        return None
    recorded: str | None = json.loads(provenance).get("digest", {}).get("output")
    return recorded


def measure_limits(cset: CheckpointSet, result: CaseResult, cache: Cache, workdir: str) -> None:
    cache.read_all(cset.files)
    result.limits.setdefault("read warm", []).append(cache.read_all(cset.files))
    cache.evict(cset.files)
    result.limits.setdefault("read cold", []).append(cache.read_all(cset.files))
    result.limits.setdefault("write+fsync", []).append(
        write_once(os.path.join(workdir, "write-once.tmp"), cset.model_bytes)
    )
    imported = timed([sys.executable, "-c", "import torch"])
    result.limits.setdefault("import torch", []).append(imported.wall)
    result.import_rss.append(imported.rss)


# ---------------------------------------------------------------- the table


def report(results: list[CaseResult], cache: Cache, args: argparse.Namespace) -> str:
    lines = [
        f"runs per cell: {args.runs} (median wall seconds, max RSS over runs); cache eviction: {cache.method};"
        f" {os.cpu_count()} CPUs; torch {torch.__version__}",
        "",
        "| case | out | tool | warm s | cold s | peak RSS | RSS bound | exact |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        bound = statistics.median(r.import_rss) + 4 * r.largest_tensor + 150 * MiB
        for tool in ("ckpt-avg", "naive"):
            if f"{tool} warm" not in r.runs:
                continue
            rss = max(r.peak(f"{tool} warm"), r.peak(f"{tool} cold"))
            if tool == "ckpt-avg":
                exact = f"{sum(r.exact)}/{len(r.exact)} runs" + ("" if all(r.digest_ok) else " (digest MISMATCH)")
            else:
                exact = "n/a" if r.naive_match is None else _match(*r.naive_match)
            warm, cold = r.median(f"{tool} warm"), r.median(f"{tool} cold")
            shown_bound = human(bound) if tool == "ckpt-avg" else ""
            lines.append(
                f"| {r.label} | {r.output_kind} | {tool} | {warm:.2f} | {cold:.2f}"
                f" | {human(rss)} | {shown_bound} | {exact} |"
            )
    lines += [
        "",
        "| case | out | read warm | read cold | write+fsync | import torch (RSS) | warm: ours/limit | cold: ours/limit"
        " | ours/naive warm | ours/naive cold | ours/(naive+fsync) warm | ours/(naive+fsync) cold |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        base = r.limit("write+fsync") + r.limit("import torch")
        warm_limit, cold_limit = r.limit("read warm") + base, r.limit("read cold") + base
        lines.append(
            f"| {r.label} | {r.output_kind} | {r.limit('read warm'):.2f} | {r.limit('read cold'):.2f}"
            f" | {r.limit('write+fsync'):.2f}"
            f" | {r.limit('import torch'):.2f} ({human(statistics.median(r.import_rss))})"
            f" | {r.median('ckpt-avg warm') / warm_limit:.2f} | {r.median('ckpt-avg cold') / cold_limit:.2f}"
            f" | {r.median('ckpt-avg warm') / r.median('naive warm'):.2f}"
            f" | {r.median('ckpt-avg cold') / r.median('naive cold'):.2f}"
            f" | {r.median('ckpt-avg warm') / r.median('naive+fsync warm'):.2f}"
            f" | {r.median('ckpt-avg cold') / r.median('naive+fsync cold'):.2f} |"
        )
    lines.append("")
    lines.append(
        "limit = read every input once + write the output once with fsync + import torch (targets: <= 1.5);"
        " RSS bound = import-torch RSS + 4 x largest tensor + 150 MiB; naive+fsync = the naive run plus"
        " fsync of its output afterwards (ckpt-avg's output is durable when it exits; the naive one's may not be)."
    )
    return "\n".join(lines)


def _match(equal: int, total: int) -> str:
    return f"{100 * equal / total:.3f}% of elements ({total - equal:,} differ)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1GiB", help="comma-separated size of each checkpoint file (default 1GiB)")
    parser.add_argument("--count", type=int, default=8, help="checkpoints per set (default 8)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per measurement (default 3)")
    parser.add_argument("--dir", default="/work/bench-data", help="where generated sets and outputs go")
    parser.add_argument("--formats", default="safetensors,pt,ckpt", help="input formats (safetensors, pt, ckpt)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="dtypes of the weights (fp32, bf16, fp16)")
    parser.add_argument("--outputs", default="same", help="output formats per set: same, safetensors, pt, ckpt")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument("--no-cold", action="store_true", help="skip cold-cache runs")
    parser.add_argument("--keep", action="store_true", help="keep generated sets (default: delete them at the end)")
    parser.add_argument("--results", metavar="JSON", help="also write the raw measurements here")
    parser.add_argument("--extra", default="", help="extra ckpt-avg options, e.g. '--device cuda'")
    parser.add_argument(
        "--ckpt-avg", default="", metavar="CMD", help="command to run (default: this python -m ckpt_avg)"
    )
    parser.add_argument("--quick", action="store_true", help="small sets, one run: a smoke test (< 1 minute)")
    args = parser.parse_args(argv)
    args.extra = args.extra.split()
    if args.quick:
        args.sizes, args.count, args.runs = "16MiB", 3, 1
        cases = [("safetensors", "fp32", "same"), ("ckpt", "bf16", "same")]
    else:
        cases = [
            (kind, dtype_name, out)
            for kind in args.formats.split(",")
            for dtype_name in args.dtypes.split(",")
            for out in args.outputs.split(",")
        ]
    if not os.path.exists("/usr/bin/time"):
        parser.error("/usr/bin/time is missing: apt-get install time")
    os.makedirs(args.dir, exist_ok=True)
    cache = Cache()
    results: list[CaseResult] = []
    made: set[str] = set()
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        for kind, dtype_name, out in cases:
            cset = prepare_set(kind, dtype_name, size, args.count, args.dir)
            made.add(cset.directory)
            output_kind = kind if out == "same" else out
            print(f"case {cset.label} -> {output_kind}", file=sys.stderr)
            results.append(run_case(cset, output_kind, args, cache, args.dir))
    print(report(results, cache, args))
    if args.results:
        with open(args.results, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    if not args.keep:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)
    return 0 if all(all(r.exact) and all(r.digest_ok) for r in results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_naive":
        naive_average(sys.argv[3:], sys.argv[2])
        sys.exit(0)
    sys.exit(main())
