"""Offline SWA with `ckpt-avg` on scikit-learn's digits, with and without fresh BatchNorm statistics.

For each seed this trains a small BatchNorm MLP on the bundled 8x8 digits (no download),
saving a checkpoint after every epoch. The first half of the epochs bring the learning
rate down; the second half hold it constant, as the SWA recipe does (Izmailov et al.,
2018, arXiv 1803.05407). Then, as a user would, it runs the `ckpt-avg` command on the
constant-LR checkpoints twice: once plain (BatchNorm running statistics averaged like any
tensor) and once with `--bn-model swa_digits:make_model --bn-data out/seedN/bn_inputs.pt`,
which recomputes them on the training inputs. For reference it also trains the same
network with the learning rate annealed to zero over the same epochs (the conventional
schedule, no averaging). Every seed's result is reported; none is dropped.

    python examples/swa_digits.py                 # 5 seeds, 25-40 s on 2 CPU cores
    python examples/swa_digits.py --seeds 2 --out /tmp/swa --swa-lr 0.1

It prints test accuracy and loss (mean ± std over seeds) and saves a plot of per-epoch test
accuracy in OUT/swa_digits.png (needs matplotlib: pip install 'ckpt-avg[plot]').
This module is also what --bn-model imports, so it builds the model without side effects.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
HIDDEN = 128
EPOCHS = 40
SWA_START = 20  # epochs SWA_START..EPOCHS-1 run at the constant SWA learning rate and are averaged
LR, SWA_LR = 0.1, 0.05  # constant at half the initial LR, as in the SWA authors' CIFAR ResNet runs
BATCH = 32


def make_model(hidden: int = HIDDEN) -> nn.Module:
    """The network; `ckpt-avg --bn-model swa_digits:make_model` calls this with the saved hyper-parameters."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )  # fmt: skip


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data() -> Data:
    """The 1,797 bundled digits, pixels scaled to [0, 1]; a fixed stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.3, stratify=y, random_state=0)
    f32, i64 = torch.float32, torch.int64
    return Data(
        torch.tensor(x_train, dtype=f32), torch.tensor(y_train, dtype=i64),
        torch.tensor(x_test, dtype=f32), torch.tensor(y_test, dtype=i64),
    )  # fmt: skip


def swa_schedule(epoch: int, swa_lr: float) -> float:
    """SWA schedule: LR for the first quarter, a linear ramp to swa_lr by SWA_START, then constant."""
    ramp_start = SWA_START // 2
    if epoch < ramp_start:
        return LR
    if epoch < SWA_START:
        return LR + (swa_lr - LR) * (epoch - ramp_start + 1) / (SWA_START - ramp_start)
    return swa_lr


def annealed_lr(epoch: int) -> float:
    """The conventional schedule over the same epochs: cosine from LR to zero."""
    return LR * 0.5 * (1 + math.cos(math.pi * (epoch + 1) / EPOCHS))


def train(data: Data, seed: int, lr_at: Callable[[int], float], ckpt_dir: Path | None) -> nn.Module:
    """SGD with momentum, one checkpoint per epoch (a nested dict, as many training loops save)."""
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(EPOCHS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch)
        model.train()
        for batch in torch.randperm(len(data.y_train), generator=order).split(BATCH):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
        if ckpt_dir is not None:
            state = {"epoch": epoch, "state_dict": model.state_dict(), "hyper_parameters": {"hidden": HIDDEN}}
            torch.save(state, ckpt_dir / f"epoch_{epoch}.pt")
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: Data) -> tuple[float, float]:
    """Test accuracy (%) and mean cross-entropy, in eval mode (running BatchNorm statistics)."""
    model.eval()
    logits = model(data.x_test)
    accuracy = (logits.argmax(dim=1) == data.y_test).double().mean().item() * 100
    return accuracy, nn.functional.cross_entropy(logits, data.y_test).item()


def load(path: Path) -> nn.Module:
    model = make_model()
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return model


def ckpt_avg(*arguments: str | Path, show: bool) -> None:
    """Run the `ckpt-avg` command as a user would, from this directory so that --bn-model can import us."""
    exe = shutil.which("ckpt-avg")
    command = [exe] if exe else [sys.executable, "-m", "ckpt_avg"]
    args = [os.path.relpath(a, HERE) if isinstance(a, Path) and a.is_relative_to(HERE) else str(a) for a in arguments]
    if show:  # the first seed's commands, with ckpt-avg's own summary and warnings
        print(f"$ cd {os.path.relpath(HERE)} && ckpt-avg {' '.join(args)}", flush=True)
    subprocess.run([*command, *args, "--force", *([] if show else ["--quiet"])], check=True, cwd=HERE)


@dataclass
class SeedResult:
    """(test accuracy %, test loss) of each model, and the per-epoch test accuracy of the SWA run."""

    scores: dict[str, tuple[float, float]]
    curve: list[float]


def run_seed(data: Data, seed: int, out: Path, swa_lr: float) -> SeedResult:
    folder = out / f"seed{seed}"
    ckpts = folder / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    model = train(data, seed, lambda epoch: swa_schedule(epoch, swa_lr), ckpts)
    curve = [evaluate(load(ckpts / f"epoch_{e}.pt"), data)[0] for e in range(EPOCHS)]
    torch.save(data.x_train, folder / "bn_inputs.pt")  # the inputs --bn-data recomputes the statistics on
    ckpt_avg(ckpts, "--start", str(SWA_START), "-o", folder / "swa.pt", show=seed == 0)
    ckpt_avg(
        ckpts, "--start", str(SWA_START), "-o", folder / "swa_bn.pt",
        "--bn-model", "swa_digits:make_model", "--bn-data", folder / "bn_inputs.pt", show=seed == 0,
    )  # fmt: skip
    scores = {
        "last": evaluate(model, data),
        "swa": evaluate(load(folder / "swa.pt"), data),
        "swa_bn": evaluate(load(folder / "swa_bn.pt"), data),
        "annealed": evaluate(train(data, seed, annealed_lr, None), data),
    }
    return SeedResult(scores, curve)


ROWS = {
    "last": f"last checkpoint (epoch {EPOCHS - 1}, constant LR)",
    "swa": f"ckpt-avg epochs {SWA_START}-{EPOCHS - 1}, BN averaged",
    "swa_bn": f"ckpt-avg epochs {SWA_START}-{EPOCHS - 1}, BN recomputed",
    "annealed": "reference: LR annealed to 0 instead",
}


def table(results: list[SeedResult]) -> str:
    """Mean ± sample standard deviation over the seeds."""
    lines = [f"{'model':<42} {'test accuracy %':>15}  {'test loss':>17}  {'loss < last':>11}"]
    for key, label in ROWS.items():
        scores = torch.tensor([r.scores[key] for r in results], dtype=torch.float64)
        mean = scores.mean(dim=0)
        std = scores.std(dim=0) if len(results) > 1 else torch.zeros(2, dtype=torch.float64)
        wins = "" if key == "last" else f"{sum(r.scores[key][1] < r.scores['last'][1] for r in results)}/{len(results)}"
        lines.append(
            f"{label:<42} {mean[0]:>7.2f} ± {std[0]:<5.2f}  {mean[1]:>7.4f} ± {std[1]:.4f}  {wins:>11}".rstrip()
        )
    lines.append("(loss < last: the seeds in which that model's test loss is below the last checkpoint's)")
    return "\n".join(lines)


def plot(results: list[SeedResult], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot was drawn (pip install 'ckpt-avg[plot]' to get one)")
        return
    curves = torch.tensor([r.curve for r in results], dtype=torch.float64)
    epochs = list(range(EPOCHS))
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in curves:
        ax.plot(epochs, row.tolist(), color="0.8", linewidth=0.8)
    ax.plot(epochs, curves.mean(dim=0).tolist(), color="black", label="checkpoint of each epoch (mean over seeds)")
    for key, color in (("swa", "tab:orange"), ("swa_bn", "tab:blue"), ("annealed", "tab:green")):
        accuracy = sum(r.scores[key][0] for r in results) / len(results)
        ax.axhline(accuracy, color=color, linestyle="--", label=f"{ROWS[key]}: {accuracy:.2f}%")
    ax.axvspan(SWA_START - 0.5, EPOCHS - 0.5, color="tab:blue", alpha=0.06, label="averaged epochs")
    low = float(curves[:, SWA_START // 2 :].min()) - 1
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(max(low, 80.0), 100.0))
    ax.set_title(f"Offline SWA on digits ({len(results)} seeds; grey: each seed)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {os.path.relpath(path) if path.is_relative_to(Path.cwd()) else path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default: examples/out)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default: 5)")
    parser.add_argument("--swa-lr", type=float, default=SWA_LR, help=f"constant LR of the averaged epochs ({SWA_LR})")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and leaves the other cores alone
    started = time.monotonic()
    data = load_data()
    results = [run_seed(data, seed, args.out, args.swa_lr) for seed in range(args.seeds)]
    print(
        f"digits: {len(data.y_train)} train / {len(data.y_test)} test images, {EPOCHS} epochs,"
        f" constant LR {args.swa_lr} from epoch {SWA_START}; {args.seeds} seeds, mean ± std"
    )
    print(table(results))
    plot(results, args.out / "swa_digits.png")
    print(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the ckpt-avg subprocesses
    main()
