"""Quickstart: save a checkpoint every epoch, then average the late ones with `ckpt-avg`.

This trains a small MLP on a synthetic regression task for a few epochs on the CPU, at a
constant learning rate as SWA does (Izmailov et al., 2018, arXiv 1803.05407), saving
`epoch_K.pt` after every epoch. Then it runs the command a user would type:

    ckpt-avg --dry-run --start 6 CHECKPOINTS/                 # the plan: what will be averaged
    ckpt-avg --start 6 CHECKPOINTS/ -o CHECKPOINTS/avg.pt    # the average of epochs 6..11

and loads the averaged weights into the same model to compare them with the last epoch's.

    python examples/quickstart.py                     # writes examples/out/quickstart/
    python examples/quickstart.py --workdir /tmp/qs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

EPOCHS = 12
START = 6  # average epochs START..EPOCHS-1: the second half of the run
HERE = Path(__file__).resolve().parent


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))


def make_data(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A noisy nonlinear target; 512 training and 512 validation samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * (x**2).sum(dim=1, keepdim=True) + 0.3 * torch.randn(1024, 1, generator=g)
    return (x[:512], y[:512]), (x[512:], y[512:])


def loss_of(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return nn.functional.mse_loss(model(data[0]), data[1]).item()


def train(checkpoints: Path) -> None:
    """Train at a constant learning rate and save the state dict after every epoch."""
    torch.manual_seed(0)
    model = make_model()
    (x, y), _ = make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x[batch]), y[batch]).backward()
            optimizer.step()
        torch.save(model.state_dict(), checkpoints / f"epoch_{epoch}.pt")


def ckpt_avg(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the `ckpt-avg` command as a user would (or `python -m ckpt_avg` if it is not on PATH)."""
    command = [shutil.which("ckpt-avg") or sys.executable]
    if command[0] == sys.executable:
        command += ["-m", "ckpt_avg"]
    print("$ ckpt-avg " + " ".join(args))
    done = subprocess.run([*command, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"ckpt-avg failed ({done.returncode}):\n{done.stderr}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE / "out" / "quickstart", help="where checkpoints go")
    workdir: Path = parser.parse_args().workdir
    checkpoints = workdir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for old in [*checkpoints.glob("epoch_*.pt"), checkpoints / "avg.pt"]:
        old.unlink(missing_ok=True)  # only this script's own files, so a rerun starts clean

    train(checkpoints)
    print(f"trained {EPOCHS} epochs, one checkpoint each, in {checkpoints}\n")

    directory = os.path.relpath(checkpoints)  # paths are recorded as given: keep them short
    plan = ckpt_avg("--dry-run", "--start", str(START), directory)
    print(plan.stdout)
    output = checkpoints / "avg.pt"
    done = ckpt_avg("--start", str(START), directory, "-o", os.path.join(directory, "avg.pt"))
    print(done.stderr)

    last = torch.load(checkpoints / f"epoch_{EPOCHS - 1}.pt", weights_only=True)
    averaged = torch.load(output, weights_only=True)  # a flat state dict, as the inputs were
    print("max |avg - last| per tensor:")
    for name, tensor in averaged.items():
        print(f"  {name:<12} {(tensor - last[name]).abs().max().item():.4g}")

    train_data, val_data = make_data()
    print(f"\n{'':<18} {'train loss':>10} {'val loss':>10}")
    for label, state in ((f"last (epoch {EPOCHS - 1})", last), (f"average ({START}-{EPOCHS - 1})", averaged)):
        model = make_model()
        model.load_state_dict(state, strict=True)
        print(f"{label:<18} {loss_of(model, train_data):>10.4f} {loss_of(model, val_data):>10.4f}")


if __name__ == "__main__":
    main()
