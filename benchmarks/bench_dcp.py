#!/usr/bin/env python3
"""Benchmark `ckpt-avg` on torch.distributed.checkpoint (DCP) directories saved from several ranks.

Against what users do today: `dcp_to_torch_save` on every checkpoint (which loads each
whole, with full pickle), then the naive average of the `.pt` files (load each whole,
float32 sum, divide, save). Both run as subprocesses under `/usr/bin/time -v`, warm,
alternating; every ckpt-avg output is compared byte for byte with a float64 oracle.

    python benchmarks/bench_dcp.py                         # 5 x 1 GB fp32, saved from 4 ranks
    python benchmarks/bench_dcp.py --size 256MB --runs 1   # a quick look

Needs `/usr/bin/time`, and about 3 x count x size of free disk under --dir.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

COLS = 4096  # fp32 matrices of --tensor bytes (64 MiB by default), each split by rows over the ranks


def _save_rank(rank: int, world: int, root: str, count: int, tensors: int, rows_total: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows = rows_total // world
    for k in range(count):
        state = {}
        for t in range(tensors):
            g = torch.Generator().manual_seed(1000 * t + rank)
            base = torch.randn(rows, COLS, generator=g)
            drift = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(7 + 31 * k + 1000 * t + rank))
            local = base.add_(drift, alpha=0.01)
            state[f"layers.{t}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        dcp.save({"model": state}, checkpoint_id=f"{root}/run/step-{(k + 1) * 100}")
        del state
    dist.destroy_process_group()


def generate(root: str, count: int, size: int, ranks: int, tensor_bytes: int) -> list[str]:
    marker = os.path.join(root, "COMPLETE")
    rows = tensor_bytes // (COLS * 4) // ranks * ranks
    tensors = max(1, round(size / (rows * COLS * 4)))
    directories = [os.path.join(root, "run", f"step-{(k + 1) * 100}") for k in range(count)]
    if os.path.exists(marker):
        return directories
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    import torch.multiprocessing as mp

    mp.start_processes(_save_rank, args=(ranks, root, count, tensors, rows), nprocs=ranks, start_method="fork")
    open(marker, "w").close()
    return directories


def theirs(directories: Sequence[str], output: str, scratch: str) -> None:
    """What users do today: convert each DCP checkpoint to a .pt, then the naive average."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    total: dict[str, torch.Tensor] = {}
    for directory in directories:
        converted = os.path.join(scratch, os.path.basename(directory) + ".pt")
        dcp_to_torch_save(directory, converted)
        state = torch.load(converted, weights_only=False)["model"]
        for name, tensor in state.items():
            if name in total:
                total[name] += tensor.float()
            else:
                total[name] = tensor.float().clone()
        del state
        os.remove(converted)
    save_file({k: (v / len(directories)).contiguous() for k, v in total.items()}, output)


def timed(command: Sequence[str]) -> tuple[float, int]:
    started = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return wall, int(peak.group(1)) * 1024 if peak else 0


def check_exact(directories: Sequence[str], output: str, scratch: str) -> bool:
    """Float64 mean of the converted tensors (trusted, here only), rounded once, against ours."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    states = []
    for directory in directories:
        converted = os.path.join(scratch, "oracle-" + os.path.basename(directory) + ".pt")
        dcp_to_torch_save(directory, converted)
        states.append(torch.load(converted, weights_only=False, mmap=True)["model"])
    exact = True
    with safe_open(output, "pt") as ours:
        for name in states[-1]:
            mean = torch.zeros(states[-1][name].shape, dtype=torch.float64)
            for state in states:
                mean += state[name].double()
            exact &= torch.equal((mean / len(states)).to(states[-1][name].dtype), ours.get_tensor(name))
    for directory in directories:
        os.remove(os.path.join(scratch, "oracle-" + os.path.basename(directory) + ".pt"))
    return exact


def _bytes(text: str) -> int:
    number, unit, binary = re.fullmatch(r"([\d.]+)\s*([KMG]?)(I?)B?", text.upper()).groups()  # type: ignore[union-attr]
    return int(float(number) * (1024 if binary else 1000) ** " KMG".index(unit or " "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--size", default="1GB", help="bytes per checkpoint: 1GB, 256MB")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tensor", default="64MiB", help="bytes of each matrix: 64MiB, 512MB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/work/bench-data/dcp")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    directories = generate(args.dir, args.count, _bytes(args.size), args.ranks, _bytes(args.tensor))
    scratch = os.path.join(args.dir, "scratch")
    os.makedirs(scratch, exist_ok=True)
    ours_out, theirs_out = os.path.join(scratch, "ours.safetensors"), os.path.join(scratch, "theirs.safetensors")
    ours_cmd = [sys.executable, "-m", "ckpt_avg", os.path.join(args.dir, "run"), "-o", ours_out, "--force", "-q"]
    theirs_cmd = [sys.executable, os.path.abspath(__file__), "_theirs", theirs_out, scratch, *directories]
    for path in directories:  # warm: every input read once
        for name in os.listdir(path):
            with open(os.path.join(path, name), "rb") as f:
                while f.read(64 << 20):
                    pass
    results: dict[str, list[tuple[float, int]]] = {"ckpt-avg": [], "dcp_to_torch_save + naive": []}
    for run in range(args.runs):
        order = [("ckpt-avg", ours_cmd), ("dcp_to_torch_save + naive", theirs_cmd)]
        for label, command in order if run % 2 == 0 else order[::-1]:
            for out in (ours_out, theirs_out):
                if os.path.exists(out):
                    os.remove(out)
            results[label].append(timed(command))
            if label == "ckpt-avg" and not check_exact(directories, ours_out, scratch):
                sys.exit("ckpt-avg output is not the exact mean")
    ours = statistics.median(w for w, _ in results["ckpt-avg"])
    naive = statistics.median(w for w, _ in results["dcp_to_torch_save + naive"])
    print(f"{args.count} x {args.size} fp32 DCP checkpoints ({args.tensor} tensors) saved from {args.ranks} ranks,")
    print(f"warm, median of {args.runs} run(s); SPEC 1.6 bound: import torch + 4 x {args.tensor} + 150 MiB")
    for label, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        peak = max(p for _, p in runs)
        print(f"  {label:28s} {wall:7.1f} s   peak RSS {peak / 2**20:8.0f} MiB")
    print(f"  ours/that = {ours / naive:.2f}; every ckpt-avg output exact")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_theirs":
        theirs(sys.argv[4:], sys.argv[2], sys.argv[3])
    else:
        main()
