#!/usr/bin/env python3
"""Benchmark averaging on torchrun: 1 process against P, and the balance of files over ranks.

Part 1 runs the same command as one process (`python -m ckpt_avg`) and under
`torchrun --standalone --nproc-per-node P -m ckpt_avg`, alternating, on safetensors
checkpoints into Hugging Face shards and on DCP checkpoints into a DCP checkpoint (files of
`--shard` bytes either way), and reports the median
wall time of each and of torchrun starting P processes that do nothing (its fixed cost),
after checking that every output is byte-identical to the single-process one. On a machine
with few cores the ranks share them: expect no gain there. The point of torchrun is nodes,
each with its own disk bandwidth and cores.

Part 2 needs no data: it plans a Llama-3-405B-shaped model (bfloat16, 812 GB) into shards
and reports, for 8, 16 and 64 ranks, the files and bytes each rank writes (and so reads,
times the number of checkpoints), and max/mean.

    python benchmarks/bench_torchrun.py                 # both parts, 3 x 256 MiB checkpoints
    python benchmarks/bench_torchrun.py --size 1GiB --runs 5 --nproc 2
    python benchmarks/bench_torchrun.py --inputs dcp
    python benchmarks/bench_torchrun.py --balance-only
"""

from __future__ import annotations

import argparse
import filecmp
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from ckpt_avg.distributed import assign_files
from ckpt_avg.options import parse_size
from ckpt_avg.write import plan_shards

MiB = 1 << 20


def make_checkpoints(directory: str, count: int, size: int, kind: str) -> list[str]:
    """`count` checkpoints of `size` bytes each, of 64 MiB float32 matrices: safetensors
    files, or DCP directories as `dcp.save` writes them in one process."""
    rows = 4096
    cols = 4096  # 64 MiB per matrix
    matrices = max(1, size // (rows * cols * 4))
    paths = []
    generator = torch.Generator().manual_seed(0)
    for step in range(count):
        state = {f"layers.{i}.weight": torch.randn(rows, cols, generator=generator) for i in range(matrices)}
        if kind == "dcp":
            path = os.path.join(directory, f"step-{step + 1}")
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.simplefilter("ignore")
                dcp.save({"model": state}, checkpoint_id=path, no_dist=True)
        else:
            path = os.path.join(directory, f"step={step + 1}.safetensors")
            save_file(state, path, metadata={"format": "pt"})
        paths.append(path)
    return paths


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def same_tree(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names
    )


def part_processes(size: int, count: int, runs: int, nproc: int, shard: str, kind: str) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    with tempfile.TemporaryDirectory(dir=".") as work:
        inputs = make_checkpoints(work, count, size, kind)
        single = [sys.executable, "-m", "ckpt_avg", *inputs, "--max-shard-size", shard, "-q", "--force", "-o"]
        noop = os.path.join(work, "noop.py")
        with open(noop, "w") as f:
            f.write("import torch.distributed as d; d.init_process_group('gloo'); d.barrier()\n")
        times: dict[str, list[float]] = {"1 process": [], f"torchrun {nproc}": [], f"torchrun {nproc} (no-op)": []}
        reference = os.path.join(work, "one") + "/"
        for _ in range(runs):
            times["1 process"].append(timed([*single, reference]))
            out = os.path.join(work, "many") + "/"
            times[f"torchrun {nproc}"].append(timed([*torchrun, "-m", "ckpt_avg", *single[3:], out]))
            if not same_tree(reference, out):
                raise SystemExit("torchrun output differs from the single-process output")
            times[f"torchrun {nproc} (no-op)"].append(timed([*torchrun, noop]))
        shutil.rmtree(reference)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        into = "a DCP checkpoint, files" if kind == "dcp" else "shards"
        print(f"\n{count} x {size / MiB:.0f} MiB float32 {kind} -> {into} of {shard}, {cores} cores, {runs} runs")
        print("every torchrun output byte-identical to the single-process one")
        for name, values in times.items():
            each = ", ".join(f"{v:.2f}" for v in values)
            print(f"  {name:<24} median {statistics.median(values):6.2f} s   (runs: {each})")


def llama_entries(
    layers: int, hidden: int, inter: int, kv: int, vocab: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    bf16 = torch.bfloat16
    entries = {
        "model.embed_tokens.weight": (bf16, (vocab, hidden)),
        "lm_head.weight": (bf16, (vocab, hidden)),
        "model.norm.weight": (bf16, (hidden,)),
    }
    for i in range(layers):
        shapes = {
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (hidden, hidden),
            "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden),
            "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        for name, shape in shapes.items():
            entries[f"model.layers.{i}.{name}"] = (bf16, shape)
    return entries


def part_balance() -> None:
    entries = llama_entries(126, 16384, 53248, 1024, 128256)  # Llama-3-405B
    total = sum(math.prod(shape) * 2 for _, shape in entries.values())
    print(f"\nLlama-3-405B layout, bfloat16: {len(entries)} tensors, {total / 1e9:.0f} GB per checkpoint")
    print(
        f"  {'shards':>7} {'files':>6} {'ranks':>6} {'files/rank':>11} {'GB/rank min':>12} {'max':>7} {'max/mean':>9}"
    )
    for shard in ("5GB", "2GB"):
        shards = plan_shards(entries, parse_size(shard))
        sizes = [sum(math.prod(entries[n][1]) * 2 for n in names) for names in shards]
        for world in (8, 16, 64):
            loads = [sum(sizes[i] for i in share) for share in assign_files(sizes, world)]
            counts = [len(share) for share in assign_files(sizes, world)]
            print(
                f"  {shard:>7} {len(sizes):>6} {world:>6} {min(counts):>5}-{max(counts):<5}"
                f" {min(loads) / 1e9:>12.1f} {max(loads) / 1e9:>7.1f} {max(loads) / (sum(loads) / world):>9.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="bytes per checkpoint (default 256MiB)")
    parser.add_argument("--count", type=int, default=3, help="checkpoints (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each (default 3)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--shard", default="64MiB", help="--max-shard-size (default 64MiB)")
    parser.add_argument("--inputs", default="safetensors,dcp", help="input kinds (default safetensors,dcp)")
    parser.add_argument("--balance-only", action="store_true", help="only the simulated 405B balance")
    args = parser.parse_args()
    if not args.balance_only:
        for kind in args.inputs.split(","):
            if kind not in ("safetensors", "dcp"):
                parser.error(f"--inputs: {kind!r} is neither safetensors nor dcp")
            part_processes(parse_size(args.size), args.count, args.runs, args.nproc, args.shard, kind)
    part_balance()


if __name__ == "__main__":
    main()
