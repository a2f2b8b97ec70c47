"""Run under `torchrun --nproc-per-node 3` by test_distributed_torchrun.py: several runs of the
Python API over one launch (each launch costs seconds), each rank recording what it saw.

    python -m torch.distributed.run --standalone --nproc-per-node 3 tests/torchrun_scenarios.py WORKDIR

Scenarios, in order (the last one kills rank 0, ending the launch):
  two_ranks   ranks 0 and 1 average into WORKDIR/two/ over a subgroup; rank 2 waits
  dcp_two     ranks 0 and 1 average the DCP run WORKDIR/dcp/ into a DCP checkpoint WORKDIR/dcp-two/
  dcp_three   all three ranks do the same into WORKDIR/dcp-three/
  raises      rank 1 raises after writing its files (the test-only fault variable)
  disagree    rank 2 asks for other weights than ranks 0 and 1
  unshared    rank 1 runs in WORKDIR/elsewhere (a copy of the inputs at the same relative
              paths), as a node whose file system is not the others' would
  killed      rank 0 dies with os._exit after writing its files
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ckpt_avg import average_checkpoints
from ckpt_avg.distributed import FAULT_ENV
from ckpt_avg.errors import CkptAvgError

SHARD = "40000"
DCP_SHARD = "30000"


def _attempt(name: str, workdir: str, call: Any) -> None:
    try:
        report = call()
        outcome: dict[str, Any] = {"ok": True, "files": [f.path for f in report.files]}
    except CkptAvgError as error:
        outcome = {
            "ok": False,
            "message": str(error),
            "exit_code": error.exit_code,
            "reported_elsewhere": bool(getattr(error, "reported_elsewhere", False)),
        }
    path = os.path.join(workdir, f"rank{dist.get_rank()}.json")
    record = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    record[name] = outcome
    with open(path, "w") as f:
        json.dump(record, f)


def main(workdir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs = sorted(glob.glob(os.path.join(workdir, "ckpts", "*.ckpt")))
    pair = dist.new_group([0, 1])
    if rank in (0, 1):
        _attempt(
            "two_ranks",
            workdir,
            lambda: average_checkpoints(inputs, f"{workdir}/two/", max_shard_size=SHARD, process_group=pair),
        )
    dcp_inputs = [os.path.join(workdir, "dcp")]
    if rank in (0, 1):
        _attempt(
            "dcp_two",
            workdir,
            lambda: average_checkpoints(
                dcp_inputs, f"{workdir}/dcp-two/", max_shard_size=DCP_SHARD, process_group=pair
            ),
        )
    _attempt(
        "dcp_three",
        workdir,
        lambda: average_checkpoints(
            dcp_inputs, f"{workdir}/dcp-three/", max_shard_size=DCP_SHARD, process_group=dist.group.WORLD
        ),
    )
    os.environ[FAULT_ENV] = "1"
    _attempt(
        "raises",
        workdir,
        lambda: average_checkpoints(inputs, f"{workdir}/raises/", max_shard_size=SHARD, process_group=dist.group.WORLD),
    )
    del os.environ[FAULT_ENV]
    weights = (1.0, 2.0, 3.0) if rank == 2 else None
    _attempt(
        "disagree",
        workdir,
        lambda: average_checkpoints(
            inputs, f"{workdir}/disagree/", max_shard_size=SHARD, weights=weights, process_group=dist.group.WORLD
        ),
    )
    os.chdir(os.path.join(workdir, "elsewhere") if rank == 1 else workdir)
    relative = [os.path.join("ckpts", os.path.basename(path)) for path in inputs]
    _attempt(
        "unshared",
        workdir,
        lambda: average_checkpoints(relative, "unshared/", max_shard_size=SHARD, process_group=dist.group.WORLD),
    )
    os.chdir(workdir)
    os.environ[FAULT_ENV] = "0:exit"
    _attempt(
        "killed",
        workdir,
        lambda: average_checkpoints(inputs, f"{workdir}/killed/", max_shard_size=SHARD, process_group=dist.group.WORLD),
    )
    dist.destroy_process_group()  # not reached when the kill works


if __name__ == "__main__":
    main(sys.argv[1])
