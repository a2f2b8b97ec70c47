"""The run behind the README's `ckpt-avg inspect` example: Lightning SWA on scikit-learn's digits.

A one-hidden-layer MLP (64-64-10), SGD with momentum 0.9 at learning rate 0.1, batch 32,
20 epochs on CPU, StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=10,
annealing_epochs=3, annealing_strategy="cos"), and a checkpoint after every epoch
(ModelCheckpoint(save_top_k=-1)). Then, as a user would:

    python docs/inspect_example.py /tmp/swa-run
    cd /tmp/swa-run && ckpt-avg inspect checkpoints/ --plot inspect-example.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: list[torch.Tensor], _: int) -> None:
        logits = self.net(batch[0])
        self.log("val_loss", nn.functional.cross_entropy(logits, batch[1]))
        self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main(out: Path) -> None:
    L.seed_everything(0, verbose=False)
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y), test_size=0.3, random_state=0
    )
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=512)
    callbacks = [
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            save_top_k=-1,
            monitor="val_loss",
            filename="{epoch}-{val_loss:.3f}-{val_acc:.3f}",
        ),
        StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=10, annealing_epochs=3, annealing_strategy="cos"),
    ]
    trainer = L.Trainer(
        max_epochs=20, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Net(), train, val)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "swa-run"))
