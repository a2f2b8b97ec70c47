"""Epoch, step, metrics and alias-ness read from checkpoint names (SPEC 1.1, 1.2): pure, no files."""

from __future__ import annotations

import pytest

from ckpt_avg.naming import checkpoint_suffix, natural_key, parse_name, stem


@pytest.mark.parametrize(
    ("name", "epoch", "step"),
    [
        # Lightning
        ("epoch=12-step=3000.ckpt", 12, 3000),
        ("epoch=0-step=10.ckpt", 0, 10),  # numbers are taken as written: epoch 0 is the first
        ("epoch=12-step=3000-v1.ckpt", 12, 3000),
        ("epoch=9.ckpt", 9, None),
        ("step=3000.ckpt", None, 3000),
        ("model-step=3000.ckpt", None, 3000),
        # plain scripts
        ("epoch_12.pt", 12, None),
        ("epoch-12.pt", 12, None),
        ("epoch12.pt", 12, None),
        ("epoch_007.pt", 7, None),
        ("EPOCH_3.pth", 3, None),
        ("model_epoch_3.pt", 3, None),
        ("epoch_5.safetensors", 5, None),
        ("step_3000.pt", None, 3000),
        ("model.step_100.bin", None, 100),
        ("global_step3000.pt", None, 3000),
        # fairseq: checkpointK.pt ends epoch K; checkpoint_K_U.pt is update U inside epoch K
        ("checkpoint12.pt", 12, None),
        ("checkpoint1.pt", 1, None),
        ("checkpoint_12_3000.pt", 12, 3000),
        # timm: a FILE checkpoint-N.pth.tar carries an epoch
        ("checkpoint-7.pth.tar", 7, None),
        ("checkpoint-0.pth.tar", 0, None),
        ("checkpoint-3000.pt", 3000, None),
        # no index at all
        ("model.safetensors", None, None),
        ("pytorch_model.bin", None, None),
        ("weights.pt", None, None),
        ("timestep_5.pt", None, None),  # 'step' inside another word is not a step
    ],
)
def test_indices_from_file_names(name: str, epoch: int | None, step: int | None) -> None:
    info = parse_name(name)
    assert (info.epoch, info.step) == (epoch, step)
    assert not info.is_alias


@pytest.mark.parametrize("name", ["model_step_3000.pt", "ckpt_step_3000.pt"])
def test_step_after_an_underscore_word(name: str) -> None:
    # `model_epoch_3.pt` carries epoch 3, so `model_step_3000.pt` must carry step 3000 the same way.
    info = parse_name(name)
    assert (info.epoch, info.step) == (None, 3000)


def test_trainer_directory_carries_a_step_but_a_timm_file_an_epoch() -> None:
    directory = parse_name("checkpoint-3000", is_directory=True)
    assert (directory.epoch, directory.step) == (None, 3000)
    timm_file = parse_name("checkpoint-3000.pth.tar")
    assert (timm_file.epoch, timm_file.step) == (3000, None)


def test_megatron_iteration_is_a_step() -> None:
    for is_directory in (True, False):
        info = parse_name("iter_0003000", is_directory=is_directory)
        assert (info.epoch, info.step) == (None, 3000)


def test_fairseq_mid_epoch_flag() -> None:
    assert parse_name("checkpoint_6_182000.pt").mid_epoch
    assert not parse_name("checkpoint6.pt").mid_epoch
    assert not parse_name("epoch=6-step=182000.ckpt").mid_epoch


@pytest.mark.parametrize(
    "name",
    [
        "last.ckpt",
        "last-v1.ckpt",
        "last-v12.ckpt",
        "checkpoint_last.pt",
        "checkpoint_best.pt",
        "checkpoint.best_bleu_28.5.pt",
        "checkpoint.best_loss_3.41.pt",
        "model_best.pth.tar",
        "last.pth.tar",
        "recovery-3-100.pth.tar",
        "tmp.pth.tar",
    ],
)
def test_aliases(name: str) -> None:
    info = parse_name(name)
    assert info.is_alias
    assert (info.epoch, info.step) == (None, None)


@pytest.mark.parametrize(
    "name", ["lastname.ckpt", "checkpoint3.pt", "model.pt", "best_model_weights_v2.pt", "checkpoint_3.pt"]
)
def test_not_aliases(name: str) -> None:
    assert not parse_name(name).is_alias


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint.pth",  # torchvision references: a copy of the newest model_K.pth; ESPnet's resume file
        "best-valid-loss.pt",  # icefall: copies of an epoch-N.pt
        "best-train-loss.pt",
        "valid.acc.best.pth",  # ESPnet: links to an Nepoch.pth
        "valid.loss.best.pth",
        "latest.pth",
        "valid.acc.ave_10best.pth",  # ESPnet's own average of the best epochs
        "valid.acc.ave.pth",
        "last.pt",  # YOLO
        "best.pt",
    ],
)
def test_library_copies_are_aliases(name: str) -> None:
    assert parse_name(name).is_alias


def test_a_last_copy_keeps_the_epoch_it_names() -> None:
    # NeMo writes `NAME--val_loss=0.5000-epoch=3-last.ckpt` beside `NAME--val_loss=0.5000-epoch=3.ckpt`.
    info = parse_name("megatron_gpt--val_loss=0.5000-epoch=3-last.ckpt")
    assert (info.is_alias, info.epoch) == (True, 3)
    assert parse_name("epoch=3-last.ckpt").is_alias
    # mmengine's CheckpointHook(save_best=...) saves the best epoch again under this name.
    info = parse_name("best_accuracy_top1_epoch_12.pth")
    assert (info.is_alias, info.epoch) == (True, 12)
    assert parse_name("best_coco_bbox_mAP_iter_4000.pth").step == 4000


@pytest.mark.parametrize(
    ("name", "is_directory", "epoch", "step", "save"),
    [
        ("7epoch.pth", False, 7, None, None),  # ESPnet
        ("epoch-7.pt", False, 7, None, None),  # icefall
        ("model_7.pth", False, 7, None, None),  # torchvision references
        ("model_1.safetensors", False, None, None, None),  # accelerate's second model, not an epoch
        ("checkpoint_3", True, None, None, 3),  # accelerate's save count
        ("step-3000", True, None, 3000, None),  # torchtitan
        ("iter_4000.pth", False, None, 4000, None),  # mmengine by iteration
        ("epoch_12.pth", False, 12, None, None),  # mmengine by epoch
    ],
)
def test_library_names(name: str, is_directory: bool, epoch: int | None, step: int | None, save: int | None) -> None:
    info = parse_name(name, is_directory=is_directory)
    assert (info.epoch, info.step, info.save) == (epoch, step, save)


def test_checkpoint_dash_n_file_is_timm_for_pth_tar_and_undecided_otherwise() -> None:
    # icefall's checkpoint-20000.pt counts batches; timm's checkpoint-7.pth.tar epochs.
    assert not parse_name("checkpoint-7.pth.tar").dash_file
    assert parse_name("checkpoint-20000.pt").dash_file


def test_natural_order() -> None:
    names = ["checkpoint_10", "checkpoint_9", "checkpoint_1", "checkpoint_11"]
    assert sorted(names, key=natural_key) == ["checkpoint_1", "checkpoint_9", "checkpoint_10", "checkpoint_11"]


@pytest.mark.parametrize(
    ("name", "epoch", "metrics"),
    [
        ("epoch=3-val_loss=0.231.ckpt", 3, {"val_loss": 0.231}),
        ("epoch=3-val_loss=0.231-v1.ckpt", 3, {"val_loss": 0.231}),
        ("epoch=02-val_loss=1.5e-3.ckpt", 2, {"val_loss": 0.0015}),
        ("epoch=1-step=10-train_loss=-0.5.ckpt", 1, {"train_loss": -0.5}),
        ("epoch=3-step=40-val_acc=0.9.ckpt", 3, {"val_acc": 0.9}),
        ("epoch=7-val_loss=2.0-val_acc=0.75.ckpt", 7, {"val_loss": 2.0, "val_acc": 0.75}),
        ("epoch=4.ckpt", 4, {}),
    ],
)
def test_metrics_from_names(name: str, epoch: int, metrics: dict[str, float]) -> None:
    info = parse_name(name)
    assert info.epoch == epoch
    assert info.metrics == metrics
    # A metric's value is never mistaken for the step or epoch.
    assert "epoch" not in info.metrics and "step" not in info.metrics


@pytest.mark.parametrize(
    ("name", "suffix", "base"),
    [
        ("checkpoint-7.pth.tar", ".pth.tar", "checkpoint-7"),
        ("a.safetensors", ".safetensors", "a"),
        ("epoch=3.ckpt", ".ckpt", "epoch=3"),
        ("x.pth", ".pth", "x"),
        ("x.pt", ".pt", "x"),
        ("pytorch_model.bin", ".bin", "pytorch_model"),
        ("notes.txt", None, "notes.txt"),
        ("archive.tar", None, "archive.tar"),
        (".pt", None, ".pt"),
    ],
)
def test_suffixes(name: str, suffix: str | None, base: str) -> None:
    assert checkpoint_suffix(name) == suffix
    assert stem(name) == base
