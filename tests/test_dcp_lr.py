"""`ckpt-avg inspect` on DCP directories shows the learning rate (issue 15).

The runs are real single-process `dcp.save`s of a tiny model trained with SGD and StepLR;
the oracle for the lr column is the optimizer's own param groups at each save.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_inspect import run_inspect
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from ckpt_avg.inspect import inspect_checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 5
STEP_SIZE = 3  # StepLR: 0.1 for steps 1-2, then 0.01 from step 3 on


def dcp_run(root: Path, layout: str = "plain", group_rates: tuple[float, ...] = (0.1,)) -> list[list[float]]:
    """`step-N/` DCP directories (torchtitan-style), one per step; the optimizer's rates at each save.

    layout: "plain" saves `optimizer.state_dict()` under "optimizer"; "flat" saves
    get_state_dict's flattened optimizer (torchtitan's names) under "optim"; "tensor"
    keeps a one-element tensor rate (what capturable optimizers hold).
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    params = list(model.parameters())
    groups = [{"params": params[i :: len(group_rates)], "lr": lr} for i, lr in enumerate(group_rates)]
    if layout == "tensor":
        for group in groups:
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float64)
    optimizer = torch.optim.SGD(groups, lr=group_rates[0], momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=STEP_SIZE, gamma=0.1)
    data = torch.randn(16, 4)
    rates = []
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
        scheduler.step()
        if layout == "flat":
            weights, optim = get_state_dict(
                model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
            )
            state = {"model": weights, "optim": optim}
        else:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        dcp.save(state, checkpoint_id=str(root / f"step-{step}"), no_dist=True)
        rates.append([float(g["lr"]) for g in optimizer.param_groups])
    return rates


def test_lr_column_is_the_optimizers_rate_and_step_lr_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rates = dcp_run(tmp_path / "run")
    result = inspect_checkpoints([str(tmp_path / "run")])
    assert [r.lr_groups for r in result.inspected] == rates  # exact: the stored floats
    assert {r.lr_source for r in result.inspected} == {"optimizer"}
    s = result.suggestion
    assert s is not None and (s.start, s.rule) == (STEP_SIZE, "lr-settled")
    assert s.reason == f"lr reached 0.01 at step {STEP_SIZE} and stayed"
    monkeypatch.chdir(tmp_path)
    out = run_inspect("run/").stdout
    lines = out.splitlines()
    assert "lr" in lines[0].split()
    assert "  0.1  " in lines[1] and lines[STEP_SIZE].startswith("*") and "  0.01  " in lines[STEP_SIZE]
    assert f"Suggested start: step {STEP_SIZE} (*) - lr reached 0.01 at step {STEP_SIZE} and stayed" in out
    data = json.loads(run_inspect("--json", "run/").stdout)
    assert [r["lr"] for r in data["rows"]] == [g[0] for g in rates]


@pytest.mark.parametrize("layout", ["flat", "tensor"])
def test_groups_that_differ_show_min_max(tmp_path: Path, layout: str) -> None:
    rates = dcp_run(tmp_path / "run", layout, group_rates=(0.1, 0.5))
    rows = inspect_checkpoints([str(tmp_path / "run")]).inspected
    assert [min(r.lr_groups) for r in rows] == [min(g) for g in rates]
    assert [max(r.lr_groups) for r in rows] == [max(g) for g in rates]
    assert rows[0].lr == pytest.approx(0.1) and rows[-1].lr == pytest.approx(0.01)
    out = run_inspect(tmp_path / "run").stdout
    assert "0.1\u20130.5" in out and "0.01\u20130.05" in out


def test_a_hostile_lr_item_is_never_run_and_shows_no_rate(tmp_path: Path) -> None:
    """Only the optimizer's lr items are unpickled, strictly: a global in one is refused, not imported."""
    rates = dcp_run(tmp_path / "run")
    step = tmp_path / "run" / "step-1"
    marker = tmp_path / "pwned"
    hostile = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # os.system, by hand
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", hostile)
        archive.writestr("archive/byteorder", "little")
    metadata = pickle.loads((step / ".metadata").read_bytes())  # the test trusts its own save
    key = next(k for k in metadata.storage_data if k.fqn == "optimizer.param_groups.0.lr")
    info = metadata.storage_data[key]
    distcp = step / info.relative_path
    offset = distcp.stat().st_size
    with distcp.open("ab") as file:
        file.write(buffer.getvalue())
    metadata.storage_data[key] = dataclasses.replace(info, offset=offset, length=len(buffer.getvalue()))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    result = inspect_checkpoints([str(tmp_path / "run")])
    assert not marker.exists()
    assert [r.lr_groups for r in result.inspected] == [[], *rates[1:]]
    assert result.suggestion is None or result.suggestion.rule != "lr-settled"
