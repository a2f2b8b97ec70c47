"""BatchNorm recompute (SPEC §1.8): the written statistics equal `update_bn` on the oracle average.

Each test writes a small user module (model factories, batch sources) into tmp_path, trains
a few epochs saving checkpoints, and drives `ckpt-avg --bn-model ... --bn-data ...` as a
user would. The oracle averages the checkpoints the simple way, loads them into a fresh
model and runs `torch.optim.swa_utils.update_bn` over the same batches in the same order.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import leftovers, oracle_mean, run_cli
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import update_bn

from ckpt_avg.bn import BatchNormError, recompute_batchnorm, update_batchnorm
from ckpt_avg.errors import CheckpointError, UsageError

USER_MODULE = textwrap.dedent(
    '''
    """A user's training code, as --bn-model and --bn-data name it."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    BATCH = 16


    class Net(nn.Module):
        def __init__(self, hidden: int = 16) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden, momentum=0.3), nn.ReLU(),
            )
            self.head = nn.Linear(hidden, 3)

        def forward(self, x):
            return self.head(self.body(x))


    class Renamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = Net().body
            self.classifier = nn.Linear(16, 3)

        def forward(self, x):
            return self.classifier(self.features(x))


    def make(hidden: int = 16):
        return Net(hidden)


    def inputs():
        g = torch.Generator().manual_seed(7)
        return torch.randn(100, 6, generator=g) * 3.0 + 1.5


    def labels():
        return (inputs().sum(dim=1) > 9).long() + (inputs()[:, 0] > 1.5).long()


    def tensor_batches():
        return list(inputs().split(BATCH))


    def tuple_batches():
        return DataLoader(TensorDataset(inputs(), labels()), batch_size=BATCH, shuffle=False)


    def dict_batches():
        return [{"x": x} for x in inputs().split(BATCH)]


    LOADER = DataLoader(inputs(), batch_size=BATCH, shuffle=False)


    def no_batches():
        return iter(())


    def wrong_width_batches():
        return [torch.zeros(4, 5)]


    def not_a_module():
        return 42


    def narrower():
        return Net(hidden=8)


    def renamed():
        return Renamed()


    def no_batchnorm():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


    class WithSpareNorm(Net):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.BatchNorm1d(3)  # defined, never called in forward


    def with_spare_norm():
        return WithSpareNorm()
    '''
)

LIGHTNING_MODULE = textwrap.dedent(
    """
    import lightning as L
    import torch
    from torch.nn import functional as F


    class LitNet(L.LightningModule):
        def __init__(self, hidden: int = 16, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = Net(hidden)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


    def make_lit(hidden: int = 16):
        return LitNet(hidden=hidden)
    """
)

_NAMES = itertools.count()
BN_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Project:
    """The user's directory: their module, its name for --bn-model, and a checkpoint run."""

    root: Path
    name: str
    module: ModuleType
    ckpts: Path

    def spec(self, attribute: str) -> str:
        return f"{self.name}:{attribute}"

    def checkpoint_files(self) -> list[Path]:
        return sorted(self.ckpts.iterdir(), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def _write_module(root: Path, source: str, *, lightning: bool = False) -> str:
    name = f"user_train_{next(_NAMES)}"
    (root / f"{name}.py").write_text(source + (LIGHTNING_MODULE if lightning else ""))
    return name


def _train_plain(module: ModuleType, ckpts: Path, factory: str = "make", epochs: int = 4) -> None:
    """SGD for a few epochs, `torch.save(model.state_dict())` after each, as a plain loop does."""
    torch.manual_seed(1)
    model = getattr(module, factory)()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpts.mkdir()
    for epoch in range(epochs):
        for x, y in zip(module.inputs().split(20), module.labels().split(20), strict=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        torch.save(model.state_dict(), ckpts / f"epoch_{epoch}.pt")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    name = _write_module(tmp_path, USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    _train_plain(module, tmp_path / "ckpts")
    yield Project(tmp_path, name, module, tmp_path / "ckpts")
    sys.modules.pop(name, None)


def _oracle_average(paths: Sequence[Path], key: str | None = None) -> dict[str, torch.Tensor]:
    """Float tensors: the float64 mean rounded once; integer counters: the last checkpoint's."""
    states = [torch.load(p, weights_only=True) for p in paths]
    if key is not None:
        states = [s[key] for s in states]
    return {
        k: oracle_mean([s[k] for s in states]) if v.is_floating_point() else v.clone() for k, v in states[-1].items()
    }


def _oracle_statistics(model: nn.Module, average: dict[str, torch.Tensor], batches: Any) -> dict[str, torch.Tensor]:
    model.load_state_dict(average, strict=True)
    update_bn(batches, model)
    return {k: v for k, v in model.state_dict().items() if k.endswith(BN_SUFFIXES)}


def _assert_written(
    output: dict[str, torch.Tensor], average: dict[str, torch.Tensor], stats: dict[str, Any], prefix: str = ""
) -> None:
    """BN buffers are the recomputed ones; every other tensor is the plain average, bit for bit."""
    assert set(output) == set(average)
    assert len(stats) == 6  # two layers x (running_mean, running_var, num_batches_tracked)
    for key, value in output.items():
        expected = stats.get(key, average[key])
        assert value.dtype == expected.dtype and torch.equal(value, expected), key
    # the recompute did change something: the averaged running statistics are not kept
    key = f"{prefix}body.1.running_mean"
    assert not torch.equal(output[key], average[key])


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


@pytest.mark.parametrize("source", ["tensor_batches", "tuple_batches", "dict_batches", "LOADER"])
def test_recomputed_statistics_equal_update_bn(project: Project, source: str) -> None:
    out = project.root / "avg.pt"
    run_cli(project.ckpts, "-o", out, "--bn-model", project.spec("make"), "--bn-data", project.spec(source))
    average = _oracle_average(project.checkpoint_files())
    stats = _oracle_statistics(project.module.make(), average, project.module.tensor_batches())
    _assert_written(torch.load(out, weights_only=True), average, stats)
    assert int(stats["body.4.num_batches_tracked"]) == 7  # 100 rows in batches of 16


@pytest.mark.parametrize(
    ("filename", "content"),
    [("bn.pt", "tensor"), ("named.pt", "named"), ("bn.safetensors", "named")],
)
def test_data_file_is_batched_in_file_order(project: Project, filename: str, content: str) -> None:
    inputs = project.module.inputs()
    data = project.root / filename
    if filename.endswith(".safetensors"):
        save_file({"inputs": inputs}, data)
    else:
        torch.save(inputs if content == "tensor" else {"inputs": inputs}, data)
    out = project.root / "avg.safetensors"
    run_cli(project.ckpts, "-o", out, "--bn-model", project.spec("make"), "--bn-data", filename, "--bn-batch-size", 24)
    average = _oracle_average(project.checkpoint_files())
    stats = _oracle_statistics(project.module.make(), average, list(inputs.split(24)))
    _assert_written(load_file(out), average, stats)
    assert int(stats["body.1.num_batches_tracked"]) == 5  # 24, 24, 24, 24, 4


def test_bn_batches_caps_the_batches(project: Project) -> None:
    out = project.root / "avg.pt"
    model_spec, data_spec = project.spec("make"), project.spec("tuple_batches")
    run_cli(project.ckpts, "-o", out, "--bn-model", model_spec, "--bn-data", data_spec, "--bn-batches", 3)
    average = _oracle_average(project.checkpoint_files())
    stats = _oracle_statistics(project.module.make(), average, project.module.tensor_batches()[:3])
    _assert_written(torch.load(out, weights_only=True), average, stats)
    assert int(torch.load(out, weights_only=True)["body.1.num_batches_tracked"]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recompute_runs_on_the_device(project: Project) -> None:
    """--device cuda: the forward passes run there; the result equals update_bn run there too."""
    out = project.root / "avg.pt"
    model_spec, data_spec = project.spec("make"), project.spec("tuple_batches")
    run_cli(project.ckpts, "-o", out, "--device", "cuda", "--bn-model", model_spec, "--bn-data", data_spec)
    average = _oracle_average(project.checkpoint_files())
    model = project.module.make()
    model.load_state_dict(average)
    model.cuda()
    update_bn(project.module.tuple_batches(), model, device=torch.device("cuda"))
    written = torch.load(out, weights_only=True)
    for key, value in model.state_dict().items():
        expected = value.cpu() if key.endswith(BN_SUFFIXES) else average[key]
        assert torch.equal(written[key], expected), key


def test_module_is_found_in_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As `python -m` would: a module in the working directory imports without any sys.path setup."""
    name = _write_module(tmp_path, USER_MODULE)
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        _train_plain(importlib.import_module(name), tmp_path / "ckpts")
    sys.modules.pop(name, None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        run_cli("ckpts", "-o", "avg.pt", "--bn-model", f"{name}:make", "--bn-data", f"{name}:tensor_batches")
    finally:
        sys.modules.pop(name, None)
    assert str(tmp_path) not in sys.path  # the import path is left as it was
    assert int(torch.load(tmp_path / "avg.pt", weights_only=True)["body.1.num_batches_tracked"]) == 7


# Lightning 2.6 under torch 2.13 warns about torch's own pytree API inside Trainer.fit; not ours to fix.
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize("factory", ["make_lit", "LitNet"])
def test_lightning_checkpoints_with_hyper_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    """A LightningModule run (hidden=12, not the default): the factory gets the saved hyper-parameters."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    name = _write_module(tmp_path, USER_MODULE, lightning=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    torch.manual_seed(3)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, filename="{epoch}")],
    )
    loader = DataLoader(TensorDataset(module.inputs(), module.labels()), batch_size=20)
    trainer.fit(module.LitNet(hidden=12), loader)
    try:
        run_cli("ckpts", "-o", "avg.ckpt", "--bn-model", f"{name}:{factory}", "--bn-data", f"{name}:tuple_batches")
        paths = [tmp_path / "ckpts" / f"epoch={e}.ckpt" for e in range(3)]
        average = _oracle_average(paths, key="state_dict")
        stats = _oracle_statistics(module.LitNet(hidden=12), average, module.tensor_batches())
        written = torch.load(tmp_path / "avg.ckpt", weights_only=True)
        assert written["hyper_parameters"]["hidden"] == 12
        _assert_written(written["state_dict"], average, stats, prefix="net.")
    finally:
        sys.modules.pop(name, None)


def test_without_bn_model_the_warning_is_printed(project: Project) -> None:
    result = run_cli(project.ckpts, "-o", project.root / "avg.pt")
    assert (
        "Warning: 2 BatchNorm layer(s) were averaged, not recomputed;"
        " recompute their statistics with --bn-model MODULE:CALLABLE --bn-data DATA"
    ) in result.stderr


@pytest.mark.parametrize(
    ("model", "data", "status", "message"),
    [
        ("nosuchmodule:make", "{m}:tensor_batches", 2, "--bn-model nosuchmodule:make: no module named 'nosuchmodule'"),
        ("{m}:nosuch", "{m}:tensor_batches", 2, "--bn-model {m}:nosuch: module '{m}' has no attribute 'nosuch'"),
        ("{m}", "{m}:tensor_batches", 2, "--bn-model must be MODULE:CALLABLE (e.g. train:make_model), not '{m}'"),
        ("{m}.py:make", "{m}:tensor_batches", 2, "--bn-model {m}.py:make: name a module, not a file"),
        ("broken:make", "{m}:tensor_batches", 1, "broken:make: importing 'broken' failed: RuntimeError: boom"),
        ("{m}:not_a_module", "{m}:tensor_batches", 1, "{m}:not_a_module returned int, not a torch.nn.Module"),
        ("{m}:make", "{m}:no_batches", 1, "--bn-data yielded no batch"),
        ("{m}:make", "missing.pt", 2, "--bn-data missing.pt: no such file"),
        ("{m}:make", "inputs.npy", 2, "--bn-data must be MODULE:CALLABLE or a .pt/.safetensors file"),
        ("{m}:make", "two.pt", 1, "--bn-data two.pt: expected one input tensor (or a file holding one named tensor)"),
        ("{m}:make", "{m}:not_a_module", 1, "--bn-data {m}:not_a_module gave int, not an iterable of batches"),
        (
            "{m}:make",
            "{m}:wrong_width_batches",
            1,
            "the model's forward pass failed on --bn-data batch 1: RuntimeError: mat1 and mat2 shapes cannot be",
        ),
    ],
)
def test_errors_are_one_line_and_write_nothing(
    project: Project, model: str, data: str, status: int, message: str
) -> None:
    (project.root / "broken.py").write_text("raise RuntimeError('boom')\n")
    torch.save({"x": torch.zeros(4, 6), "y": torch.zeros(4)}, project.root / "two.pt")
    out = project.root / "avg.pt"
    try:
        result = run_cli(
            project.ckpts, "-o", out, "--bn-model", model.format(m=project.name),
            "--bn-data", data.format(m=project.name), expect=status,
        )  # fmt: skip
    finally:
        sys.modules.pop("broken", None)
    assert message.format(m=project.name) in _one_error_line(result.stderr)
    assert not out.exists() and not leftovers(project.root)


def test_strict_load_names_the_shape_that_differs(project: Project) -> None:
    result = run_cli(
        project.ckpts, "-o", project.root / "avg.pt", "--bn-model", project.spec("narrower"),
        "--bn-data", project.spec("tensor_batches"), expect=1,
    )  # fmt: skip
    assert _one_error_line(result.stderr) == (
        f"Error: the averaged weights do not fit the model from --bn-model {project.spec('narrower')}:"
        " shape of 'body.0.weight' is [16, 6] in the checkpoints, [8, 6] in the model"
        " (check the model's arguments, or --key/--strip-prefix)"
    )


def test_strict_load_names_the_keys_that_differ(project: Project) -> None:
    result = run_cli(
        project.ckpts, "-o", project.root / "avg.pt", "--bn-model", project.spec("renamed"),
        "--bn-data", project.spec("tensor_batches"), expect=1,
    )  # fmt: skip
    line = _one_error_line(result.stderr)
    assert (
        "missing from the checkpoints: 'classifier.bias', 'classifier.weight', 'features.0.bias',"
        " 'features.0.weight', 'features.1.bias' and 11 more;"
        " not in the model: 'body.0.bias', 'body.0.weight', 'body.1.bias', 'body.1.num_batches_tracked',"
        " 'body.1.running_mean' and 11 more"
    ) in line


def test_model_without_batchnorm_warns_and_recomputes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _write_module(tmp_path, USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    _train_plain(module, tmp_path / "ckpts", factory="no_batchnorm")
    average = _oracle_average(sorted((tmp_path / "ckpts").iterdir()))
    warnings: list[str] = []
    stats = recompute_batchnorm(
        average, model_spec=f"{name}:no_batchnorm", data_spec=f"{name}:tensor_batches", batch_size=32,
        max_batches=None, device="cpu", hyper_parameters=None, warn=warnings.append,
    )  # fmt: skip
    assert stats == {}
    assert warnings == [
        f"--bn-model {name}:no_batchnorm: the model has no BatchNorm layer;"
        " nothing was recomputed and the averaged tensors were written as they are"
    ]
    result = run_cli("ckpts", "-o", "avg.pt", "--bn-model", f"{name}:no_batchnorm", "--bn-data", f"{name}:LOADER")
    sys.modules.pop(name, None)
    assert f"Warning: --bn-model {name}:no_batchnorm: the model has no BatchNorm layer;" in result.stderr
    written = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert all(torch.equal(written[k], v) for k, v in average.items())


def test_a_layer_no_batch_reaches_is_named(project: Project) -> None:
    """As with update_bn, its statistics stay reset (mean 0, variance 1, count 0); a warning says so."""
    weights = project.module.with_spare_norm().state_dict()
    warnings: list[str] = []
    stats = recompute_batchnorm(
        weights, model_spec=project.spec("with_spare_norm"), data_spec=project.spec("tensor_batches"),
        batch_size=32, max_batches=None, device="cpu", hyper_parameters=None, warn=warnings.append,
    )  # fmt: skip
    assert warnings == [
        "BatchNorm layer 'spare' received no batch during the recompute; its statistics are the reset ones"
    ]
    assert torch.equal(stats["spare.running_var"], torch.ones(3)) and int(stats["spare.num_batches_tracked"]) == 0
    assert int(stats["body.1.num_batches_tracked"]) == 7


def test_hyper_parameters_reach_a_factory_taking_kwargs(project: Project) -> None:
    """Names the signature lacks are dropped; **kwargs takes them all, as load_from_checkpoint does."""
    seen: list[dict[str, Any]] = []

    def by_kwargs(**hparams: Any) -> nn.Module:
        seen.append(hparams)
        return project.module.Net(hparams["hidden"])

    def by_name(hidden: int) -> nn.Module:
        seen.append({"hidden": hidden})
        return project.module.Net(hidden)

    project.module.by_kwargs = by_kwargs
    project.module.by_name = by_name
    average = _oracle_average(project.checkpoint_files())
    for factory in ("by_kwargs", "by_name"):
        recompute_batchnorm(
            average, model_spec=project.spec(factory), data_spec=project.spec("tensor_batches"), batch_size=32,
            max_batches=None, device="cpu", hyper_parameters={"hidden": 16, "lr": 0.1},
        )  # fmt: skip
    assert seen == [{"hidden": 16, "lr": 0.1}, {"hidden": 16}]


def test_library_errors_have_their_classes(project: Project) -> None:
    average = _oracle_average(project.checkpoint_files())
    common: dict[str, Any] = {"batch_size": 32, "max_batches": None, "device": "cpu", "hyper_parameters": None}
    data = project.spec("tensor_batches")
    with pytest.raises(UsageError):
        recompute_batchnorm(average, model_spec="nosuchmodule:make", data_spec=data, **common)
    with pytest.raises(BatchNormError):
        recompute_batchnorm(average, model_spec=project.spec("not_a_module"), data_spec=data, **common)
    with pytest.raises(CheckpointError):
        recompute_batchnorm(average, model_spec=project.spec("narrower"), data_spec=data, **common)
    with pytest.raises(UsageError, match="--bn-model needs --bn-data"):
        recompute_batchnorm(average, model_spec=project.spec("make"), data_spec=None, **common)


def test_update_batchnorm_leaves_modes_and_momenta_as_they_were() -> None:
    """update_bn restores only the top-level mode; here every submodule keeps its own."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=0.2), nn.Dropout(0.5), nn.BatchNorm1d(8))
    model.eval()
    model[2].train()  # e.g. MC dropout left on by the user
    model[3].momentum = None
    before = {name: m.training for name, m in model.named_modules()}
    batches = list(torch.randn(50, 4).split(10))
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    update_bn(batches, reference)
    torch.manual_seed(5)  # the same dropout masks
    assert update_batchnorm(model, batches) == 5
    assert {name: m.training for name, m in model.named_modules()} == before
    assert (model[1].momentum, model[3].momentum) == (0.2, None)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_update_batchnorm_is_a_no_op_without_batchnorm() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    assert update_batchnorm(model, []) == 0
