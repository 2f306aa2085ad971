"""Label Studio interop on a tiny run: export a round, answer it as Label Studio's JSON export does, import it back."""

import base64
import io
import json
import xml.etree.ElementTree as ET

from PIL import Image
from test_app import make_run

from pipeline import cli
from pipeline.store import LABELS, FeedbackStore


def _run(tmp_path):
    run = make_run(tmp_path / "run", n=4)
    (run / "config.yaml").write_text("name: tiny\n")
    return run


def _answer(task: dict, task_id: int, choice, user=7, annotation_id=None, updated="2026-12-01T10:00:00.000Z"):
    """A task as Label Studio exports it (JSON format) after one annotation."""
    result = (
        []
        if choice is None
        else [
            {
                "from_name": "verdict",
                "to_name": "counterfactual",
                "type": "choices",
                "value": {"choices": [choice]},
            }
        ]
    )
    return {
        "id": task_id,
        "data": task["data"],
        "annotations": [
            {
                "id": annotation_id or 100 + task_id,
                "completed_by": user,
                "result": result,
                "was_cancelled": False,
                "created_at": updated,
                "updated_at": updated,
            }
        ],
    }


def test_a_round_goes_to_label_studio_and_its_verdicts_come_back_once(tmp_path, capsys):
    run = _run(tmp_path)
    tasks_file = tmp_path / "tasks.json"
    assert (
        cli.main(["feedback", "labelstudio-export", "--run-dir", str(run), "--round", "1", str(tasks_file)])
        == 0
    )
    tasks = json.loads(tasks_file.read_text())
    assert [t["data"]["cf_id"] for t in tasks] == ["cf-0", "cf-1", "cf-2", "cf-3"]
    for key in ("original", "counterfactual", "difference", "colour_change"):  # inline, readable PNGs
        data = tasks[0]["data"][key]
        assert data.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).size == (16, 16)
    config = ET.fromstring(tasks_file.with_suffix(".xml").read_text())
    assert [c.get("value") for c in config.iter("Choice")] == list(LABELS)
    images = {i.get("name"): i.get("value") for i in config.iter("Image")}
    assert images["counterfactual"] == "$counterfactual" and len(images) == 4

    verdicts = ["spurious", "true", "unrealistic", None]  # the last one skipped in Label Studio
    exported = [_answer(t, i + 1, v) for i, (t, v) in enumerate(zip(tasks, verdicts))]
    exported[1]["annotations"][0]["completed_by"] = {"id": 8, "email": "dr.lee@example.org"}
    answers = tmp_path / "export.json"
    answers.write_text(json.dumps(exported))
    assert cli.main(["feedback", "labelstudio-import", "--run-dir", str(run), str(answers)]) == 0
    assert "imported 3 new label events" in capsys.readouterr().out
    store = FeedbackStore(run / "feedback.sqlite")
    labels = store.labels().set_index("cf_id")
    assert labels["label"].to_dict() == {"cf-0": "spurious", "cf-1": "true", "cf-2": "unrealistic"}
    assert labels.loc["cf-0", "annotator"] == "labelstudio:user-7"
    assert labels.loc["cf-1", "annotator"] == "labelstudio:dr.lee@example.org"
    assert (
        cli.main(["feedback", "labelstudio-import", "--run-dir", str(run), str(answers)]) == 0
    )  # idempotent
    assert len(store.events()) == 3
    # the expert changes their mind in Label Studio: the newer annotation wins
    exported[0] = _answer(tasks[0], 1, "true", updated="2026-12-02T09:00:00.000Z")
    answers.write_text(json.dumps(exported))
    assert cli.main(["feedback", "labelstudio-import", "--run-dir", str(run), str(answers)]) == 0
    assert store.labels().set_index("cf_id")["label"]["cf-0"] == "true" and len(store.events()) == 4


def test_a_bad_label_studio_export_is_refused_whole_and_names_every_problem(tmp_path, capsys):
    run = _run(tmp_path)
    tasks = [{"data": {"cf_id": f"cf-{i}", "round": 1}} for i in range(4)]
    exported = [
        _answer(tasks[0], 1, "spurious"),
        _answer(tasks[1], 2, "maybe"),  # not a verdict
        _answer({"data": {"cf_id": "cf-99", "round": 1}}, 3, "true"),  # not a counterfactual of this run
        _answer({"data": {"cf_id": "cf-2", "round": 2}}, 4, "true"),  # the wrong round
        _answer(tasks[3], 5, "true", updated="yesterday"),
    ]
    answers = tmp_path / "export.json"
    answers.write_text(json.dumps(exported))
    assert cli.main(["feedback", "labelstudio-import", "--run-dir", str(run), str(answers)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4 bad annotation(s), nothing imported" in err
    for part in ("task 2", "'maybe'", "unknown counterfactual 'cf-99'", "round 1, not 2", "task 5"):
        assert part in err
    assert FeedbackStore(run / "feedback.sqlite").events().empty
    answers.write_text("{not json")
    assert cli.main(["feedback", "labelstudio-import", "--run-dir", str(run), str(answers)]) == 2
    assert "cannot read Label Studio export" in capsys.readouterr().err
