"""Configs saved beside the weights come through an average as they were (SPEC 1.4, 1.7).

`torch.save` pickles with protocol 2, which spells int, str and range by their Python 2
names (`__builtin__.long`, ...); omegaconf's ListConfig names `int` that way in every
fairseq `cfg` and Hydra config. Those must load as themselves, not as blocked code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import oracle_mean, run_cli
from omegaconf import DictConfig, ListConfig, OmegaConf


def _weights(epoch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(epoch)
    return {"layer.weight": torch.randn(4, 3, generator=generator), "layer.bias": torch.randn(4, generator=generator)}


def _json_report(*args: object) -> dict[str, object]:
    return json.loads(run_cli(*args, "--json").stdout)  # type: ignore[no-any-return]


def test_python2_builtin_names_load_as_themselves(tmp_path: Path) -> None:
    hyper = {"dtype_of_ids": int, "name_type": str, "windows": range(3), "lr": 0.1, "tags": ("a", "b")}
    for epoch in range(3):
        torch.save(
            {"epoch": epoch, "state_dict": _weights(epoch), "hyper_parameters": hyper}, tmp_path / f"epoch={epoch}.ckpt"
        )
    assert b"__builtin__" in (tmp_path / "epoch=0.ckpt").read_bytes()  # what torch.save really writes
    out = tmp_path / "avg.ckpt"
    report = _json_report(tmp_path, "-o", out)
    assert report["placeholders"] == [] and report["dropped"] == []
    averaged = torch.load(out, weights_only=False)
    assert averaged["hyper_parameters"] == hyper


def test_fairseq_cfg_and_lightning_omegaconf_hyperparameters_are_kept(tmp_path: Path) -> None:
    cfg = OmegaConf.create(
        {
            "model": {"_name": "transformer", "encoder_layers": 6, "dropout": 0.1},
            "optimization": {"lr": [0.0005], "update_freq": [1, 2]},
        }
    )
    fairseq, lightning = tmp_path / "fairseq", tmp_path / "lightning"
    fairseq.mkdir()
    lightning.mkdir()
    states = [_weights(epoch) for epoch in range(1, 4)]
    for epoch, weights in enumerate(states, start=1):
        torch.save(
            {"args": None, "cfg": cfg, "model": weights, "optimizer_history": [{"num_updates": 100 * epoch}],
             "extra_state": {"train_iterator": {"version": 2, "epoch": epoch + 1, "iterations_in_epoch": 0}},
             "last_optimizer_state": {"state": {}}},
            fairseq / f"checkpoint{epoch}.pt",
        )  # fmt: skip
        torch.save(
            {"epoch": epoch, "state_dict": weights, "hyper_parameters": OmegaConf.create({"cfg": cfg, "lr": 0.1})},
            lightning / f"epoch={epoch}.ckpt",
        )
    for directory, out in ((fairseq, tmp_path / "avg.pt"), (lightning, tmp_path / "avg.ckpt")):
        report = _json_report(directory, "-o", out)
        assert report["placeholders"] == [], directory
        assert [d for d in report["dropped"] if "(training state)" not in d] == [], directory
    averaged = torch.load(tmp_path / "avg.pt", weights_only=False)
    assert isinstance(averaged["cfg"], DictConfig) and averaged["cfg"] == cfg
    assert isinstance(averaged["cfg"].optimization.update_freq, ListConfig)
    assert "last_optimizer_state" not in averaged
    for name in states[0]:
        assert torch.equal(averaged["model"][name], oracle_mean([s[name] for s in states]))
    hyper = torch.load(tmp_path / "avg.ckpt", weights_only=False)["hyper_parameters"]
    assert hyper == OmegaConf.create({"cfg": cfg, "lr": 0.1})


def test_a_namespace_of_python2_names_needs_no_trust(tmp_path: Path) -> None:
    args = argparse.Namespace(max_tokens=4096, arch="transformer", seed=int, langs=range(2))
    for epoch in range(1, 3):
        torch.save({"args": args, "model": _weights(epoch)}, tmp_path / f"checkpoint{epoch}.pt")
    report = _json_report(tmp_path, "-o", tmp_path / "avg.pt")
    assert report["placeholders"] == []
    assert torch.load(tmp_path / "avg.pt", weights_only=False)["args"] == args


def test_metadata_comes_back_as_it_was(tmp_path: Path) -> None:
    """Containers whose type carries meaning: a Counter's counts, a defaultdict's factory,
    torch.Size, numpy scalar types kept as values, deques, sets, shared tuples."""
    import collections

    import numpy as np

    shared = (1, (2, 3))
    meta = {
        "counter": collections.Counter("hello"),
        "by_name": collections.defaultdict(list, {"a": [1]}),
        "size": torch.Size([3, 4]),
        "deque": collections.deque([1, 2, 3], maxlen=5),
        "types": {"dtype": np.float32, "containers": [dict, list], int: "key is a type"},
        "sets": ({1, 2}, frozenset({"a"})),
        "nested": (shared, shared),
        "args": argparse.Namespace(dtype=np.float16, kind=tuple, lr=0.1),
    }
    for epoch in range(3):
        torch.save({"epoch": epoch, "state_dict": _weights(epoch), **meta}, tmp_path / f"epoch={epoch}.ckpt")
    report = _json_report(tmp_path, "-o", tmp_path / "avg.ckpt")
    assert report["placeholders"] == [] and [d for d in report["dropped"] if "training" not in d] == []
    averaged = torch.load(tmp_path / "avg.ckpt", weights_only=False)
    for key, value in meta.items():
        assert averaged[key] == value and type(averaged[key]) is type(value), key
    assert averaged["by_name"].default_factory is list and averaged["deque"].maxlen == 5


def test_a_vouched_class_keeps_types_and_may_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--allow-global: the user's class may hold a type as a value and fill a class cache."""
    (tmp_path / "vouched_cfg.py").write_text(
        "class Cfg:\n"
        "    def __init__(self):\n        self.container = tuple\n        self.extra = {'k': (1, 2)}\n"
        "    def __setstate__(self, state):\n        type(self)._seen = True\n        self.__dict__.update(state)\n"
        "    def __eq__(self, other):\n        return vars(self) == vars(other)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import vouched_cfg  # type: ignore[import-not-found]

    (tmp_path / "ckpts").mkdir()
    for epoch in range(2):
        torch.save(
            {"epoch": epoch, "state_dict": _weights(epoch), "cfg": vouched_cfg.Cfg()}, f"ckpts/epoch={epoch}.ckpt"
        )
    report = _json_report("ckpts", "-o", "avg.ckpt", "--allow-global", "vouched_cfg.Cfg")
    assert [d for d in report["dropped"] if "training" not in d] == []
    assert torch.load("avg.ckpt", weights_only=False)["cfg"] == vouched_cfg.Cfg()
