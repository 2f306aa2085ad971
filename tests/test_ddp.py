"""Scale-out without a GPU: the explain stage (Trainer.predict) and distil (Trainer.fit) under Lightning DDP with
two CPU processes (gloo) give what one device gives: every counterfactual written once, none missing; distillation
that learns the verdicts; model selection that still sees every validation, the one before training included."""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest
import torch
from test_distil import _swap_background

from pipeline import config, distil, explain, manifest, models
from pipeline.config import DistilConfig
from pipeline.evaluate import evaluate

KEY = ["sample", "source_class", "target_class", "attempt"]


@pytest.fixture(autouse=True)
def plain_main(monkeypatch):
    """Spawned workers run the parent's __main__ again; in pytest, after an AppTest, that is the Streamlit app.
    (Under the cfkd command it is the console script, which does nothing on import.)"""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))


def test_explain_on_two_processes_writes_every_counterfactual_once(tiny_biased, tiny_codec, tmp_path):
    checkpoint, data = tiny_biased
    conf = config.from_dict(
        {
            "explain": {"per_pair": 3, "batch_size": 2, "accelerator": "cpu", "search": {"steps": 15}},
            "generator": {"source": str(tiny_codec)},
        }
    )
    one = explain.run(checkpoint, data, conf.explain, conf.generator, tmp_path / "one")
    two = explain.run(checkpoint, data, replace(conf.explain, devices=2), conf.generator, tmp_path / "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    a, b = (manifest.read(tmp_path / n / manifest.NAME) for n in ("one", "two"))
    # pairs x images x attempts, the cast the last
    assert len(b) == 2 * 3 * conf.explain.search.cast_attempt and not b.duplicated(KEY).any()
    assert a[KEY].equals(b[KEY])  # the same requests, in the same order
    assert not b["id"].duplicated().any()
    for row in b.itertuples():
        for rel in (row.original, row.counterfactual, row.difference):
            assert (tmp_path / "two" / rel).is_file()
    for rel in set(a["original"]):  # the explained images themselves are identical
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()
    assert not (tmp_path / "two" / ".parts").exists()


@pytest.mark.parametrize("keep", ["last", "best"])
def test_distil_on_two_processes_learns_the_verdicts(tiny_biased, tmp_path, keep):
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 40, tmp_path / "explain")
    fit, held = distil.split_holdout(cfs, 0.2, seed=0)
    conf = DistilConfig(epochs=12, passes=0, batch_size=16, lr=1e-3, accelerator="cpu", devices=2, keep=keep)
    result = distil.run(ckpt, data, fit, held, tmp_path / "explain", conf, tmp_path / "out")
    before, _ = evaluate(*models.load(ckpt), data)
    after, _ = evaluate(*models.load(tmp_path / "out"), data)
    assert after["worst_group_accuracy"] >= before["worst_group_accuracy"] + 0.3
    assert result.train_cfs == len(fit) and result.card.metrics["kept"] == keep
    if keep == "best":
        assert result.card.metrics["best_epoch"] >= -1 and "selection_score" in result.card.metrics
        assert not (tmp_path / "out" / ".best.safetensors").exists()


def test_keep_best_under_ddp_still_weighs_the_starting_weights(tiny_biased, tmp_path):
    """validate() before fit() runs in other worker processes: the kept file is the record the epochs must beat."""
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 20, tmp_path / "explain")
    conf = DistilConfig(
        epochs=2,
        passes=0,
        batch_size=32,
        lr=500.0,
        layers="head",
        keep="best",
        accelerator="cpu",
        devices=2,
        erase=0,
    )  # erase would refit the kept head
    card = distil.run(ckpt, data, cfs, cfs.iloc[:0], tmp_path / "explain", conf, tmp_path / "out").card
    start, kept = models.load(ckpt)[0].state_dict(), models.load(tmp_path / "out")[0].state_dict()
    assert card.metrics["best_epoch"] == -1 and all(torch.equal(p, start[n]) for n, p in kept.items())
