import json

import pandas as pd
import pytest

from pipeline import evaluate, models
from pipeline.data import load_folder


def test_metrics_on_a_hand_built_case():
    table = pd.DataFrame(
        {
            "label": ["0", "0", "0", "1", "1", "1"],
            "group": ["dark", "dark", "bright", "bright", "bright", "dark"],
            "pred": [0, 0, 1, 1, 1, 0],
        }
    )
    m = evaluate.metrics_from_predictions(table, ["0", "1"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"] == {"0": pytest.approx(2 / 3), "1": pytest.approx(2 / 3)}
    assert m["per_group"]["label=0|group=dark"] == {"n": 2, "accuracy": 1.0}
    assert m["per_group"]["label=0|group=bright"] == {"n": 1, "accuracy": 0.0}
    assert m["per_group"]["label=1|group=dark"]["accuracy"] == 0.0
    assert m["worst_group_accuracy"] == 0.0
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]


def test_groups_fall_back_to_labels():
    table = pd.DataFrame({"label": ["a", "b", "b"], "group": ["", "", ""], "pred": [0, 1, 0]})
    m = evaluate.metrics_from_predictions(table, ["a", "b"])
    assert set(m["per_group"]) == {"label=a", "label=b"}
    assert m["worst_group"] == "label=b" and m["worst_group_accuracy"] == 0.5


def test_evaluate_writes_metrics_predictions_and_plot(square_dir, tmp_path):
    model = models.build("small_cnn", 2, 32)
    models.save(model.eval(), models.ModelCard("small_cnn", ["0", "1"], 32), tmp_path / "ckpt")
    metrics = evaluate.run(tmp_path / "ckpt", load_folder(square_dir), tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert len(predictions) == metrics["n"] == 20
    assert predictions[["p_0", "p_1"]].sum(axis=1).round(4).eq(1).all()
    assert (tmp_path / "eval" / "evaluation.png").stat().st_size > 1000
