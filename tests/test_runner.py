import json

import pytest
from conftest import tiny_config

from pipeline import runner
from pipeline.errors import UserError


def _run(root, config=None, **kwargs):
    lines = []
    runner.run(config or tiny_config(), root, log=lines.append, **kwargs)
    return lines


def test_run_writes_the_contract_and_skips_what_is_finished(tmp_path):
    root = tmp_path / "run"
    first = _run(root)
    for name in (
        "config.yaml",
        "metrics.json",
        "report.html",
        "data/metadata.csv",
        "data_reference/metadata.csv",
    ):
        assert (root / name).exists(), name
    for stage in ("classifier", "reference"):
        assert (root / stage / "model.safetensors").exists() and (root / stage / "card.json").exists()
    metrics = json.loads((root / "metrics.json").read_text())
    assert set(metrics) == {"classifier", "reference", "dfr", "status"}
    assert metrics["status"] == "complete"
    assert (
        metrics["dfr"]["fit"]["source"] == "val split of the reference (unbiased) data"
    )  # val is confounded
    assert {"accuracy", "worst_group_accuracy", "per_group", "confusion_matrix", "training"} <= set(
        metrics["classifier"]
    )
    html = (root / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and 'src="http' not in html
    assert "[classifier] running" in first

    second = _run(root)
    assert all(
        f"[{s}] up to date, skipped" in second for s in ("data", "classifier", "reference", "evaluate")
    )

    third = _run(root, tiny_config(**{"classifier.epochs": 2}))  # config change: classifier onwards only
    assert "[data] up to date, skipped" in third
    assert "[classifier] running" in third and "[evaluate] running" in third

    fourth = _run(root, tiny_config(**{"classifier.epochs": 2}), start="evaluate")
    assert "[classifier] up to date, skipped" in fourth and "[evaluate] running" in fourth


def test_interrupted_stage_leaves_nothing_a_rerun_trusts(tmp_path, monkeypatch):
    root = tmp_path / "run"

    def crash(*args, **kwargs):
        args[3].joinpath("model.safetensors").write_bytes(b"half")  # run(data, config, size, out, verbose)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.train, "run", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(root)
    assert not (root / "classifier").exists()
    assert not list(root.glob(".classifier.tmp-*"))
    (root / ".classifier.tmp-99999").mkdir()  # what a SIGKILL would leave behind
    monkeypatch.undo()
    lines = _run(root)
    assert "[data] up to date, skipped" in lines and "[classifier] running" in lines
    assert not list(root.glob(".classifier.tmp-*"))
    assert json.loads((root / "classifier" / "stage.json").read_text())["stage"] == "classifier"


def test_user_dataset_and_imported_weights(tmp_path, square_dir):
    _run(tmp_path / "a")  # train once to get weights to import
    config = tiny_config(
        **{
            "data.root": str(square_dir),
            "classifier.weights": str(tmp_path / "a" / "classifier" / "model.safetensors"),
            "classifier.preset": "half",
            "reference.enabled": False,
        }
    )
    lines = _run(tmp_path / "b", config)
    assert "[classifier] running" in lines and not (tmp_path / "b" / "reference").exists()
    card = json.loads((tmp_path / "b" / "classifier" / "card.json").read_text())
    assert card["source"] == "imported:model.safetensors"
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["classifier"]["n"] == 20

    with pytest.raises(UserError, match="reference.root or reference.weights"):
        _run(tmp_path / "c", tiny_config(**{"data.root": str(square_dir)}))
    with pytest.raises(UserError, match="unknown stage"):
        _run(tmp_path / "c", start="explain-everything")


def test_explain_stage_joins_the_run_and_the_report(tmp_path, tiny_codec):
    config = tiny_config(
        **{
            "data.square.n": 160,
            "classifier.epochs": 2,
            "reference.enabled": False,
            "explain.enabled": True,
            "explain.per_pair": 2,
            "explain.surrogate": False,
            "explain.search.steps": 10,
            "generator.source": str(tiny_codec),
            "distil.enabled": False,
        }
    )
    lines = _run(tmp_path / "run", config)
    assert "[explain] running" in lines
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["explain"]["counterfactuals"] == 2 * 2 * 3  # pairs x images x (2 attempts + the cast)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Counterfactuals (SCE-LITE-HQ)" in html and "network evaluations per counterfactual" in html
    assert "0 &rarr; 1" in html and "&amp;rarr;" not in html  # class-pair headings render as arrows
    assert "[explain] up to date, skipped" in _run(tmp_path / "run", config)
