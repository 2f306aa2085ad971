from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from annotation_app import services
from pipeline.store import FeedbackStore

APP = str(Path(__file__).resolve().parent.parent / "annotation_app" / "app.py")


def make_run(root, n=6, bad_path=False, missing_image=False):
    """A run directory with a real manifest and real PNGs, as the explain stage writes them."""
    folder = root / "explain"
    for sub in ("originals", "counterfactuals", "differences"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for name in (f"originals/{i}.png", f"counterfactuals/{i}.png", f"differences/{i}.png"):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)
        source, target = ("0", "1") if i % 2 == 0 else ("1", "0")
        rows.append(
            {
                "id": f"cf-{i}",
                "original": f"originals/{i}.png",
                "counterfactual": f"counterfactuals/{i}.png",
                "difference": f"differences/{i}.png",
                "source_class": source,
                "target_class": target,
                "attempt": 1 + i % 2,
                "p_target_before": 0.1,
                "p_target_after": 0.95,
                "success": True,
            }
        )
    if bad_path:
        rows[0]["original"] = "../../../etc/passwd"
    if missing_image:
        (folder / rows[1]["counterfactual"]).unlink()
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return root


def app(monkeypatch, run_dir, token=None, annotator="alice"):
    monkeypatch.setenv("CFKD_RUN_DIR", str(run_dir))
    if token:
        monkeypatch.setenv("CFKD_TOKEN", token)
    else:
        monkeypatch.delenv("CFKD_TOKEN", raising=False)
    at = AppTest.from_file(APP, default_timeout=30)
    if annotator:
        at.query_params["annotator"] = annotator
    return at.run()


def labels(run_dir):
    return FeedbackStore(run_dir / "feedback.sqlite").labels().set_index("cf_id")["label"].to_dict()


def test_label_moves_on_and_undo_restores(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    at = app(monkeypatch, run)
    assert not at.exception and not at.error
    assert "cf-0" in at.markdown[0].value
    at.button(key="label-spurious").click().run()
    assert labels(run) == {"cf-0": "spurious"}
    assert "2 / 6" in at.caption[1].value or any("2 / 6" in c.value for c in at.caption)
    at.button(key="label-true").click().run()
    assert labels(run) == {"cf-0": "spurious", "cf-1": "true"}
    at.button(key="undo").click().run()
    assert labels(run) == {"cf-0": "spurious"}
    at.button(key="prev").click().run()
    assert any("cf-0" in m.value for m in at.markdown)
    events = FeedbackStore(run / "feedback.sqlite").events()
    assert len(events) == 3 and set(events["annotator"]) == {"alice"}


def test_resume_and_unlabelled_filter(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    store = FeedbackStore(run / "feedback.sqlite")
    store.add("cf-0", "alice", "true")
    store.add("cf-1", "alice", "true")
    at = app(monkeypatch, run)
    assert any("cf-2" in m.value for m in at.markdown)  # resumes at the first card alice has not labelled
    at.checkbox(key="unlabelled").check().run()
    at.button(key="label-unsure").click().run()
    at.button(key="label-unsure").click().run()
    assert labels(run)["cf-2"] == "unsure" and labels(run)["cf-3"] == "unsure"


def test_filters_pair_attempt_and_disagreement(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    store = FeedbackStore(run / "feedback.sqlite")
    store.add("cf-4", "bob", "true")
    store.add("cf-4", "carol", "spurious")
    at = app(monkeypatch, run)
    at.selectbox(key="pair").select("1 -> 0").run()
    assert any("1 → 0" in m.value or "1 &rarr; 0" in m.value for m in at.markdown)
    at.selectbox(key="pair").select("all").run()
    at.checkbox(key="disagreement").check().run()
    assert any("cf-4" in m.value for m in at.markdown) and any("1 / 1" in c.value for c in at.caption)


def test_cluster_labelling_then_individual_override(tmp_path, monkeypatch):
    run = make_run(tmp_path, n=8)
    at = app(monkeypatch, run)
    at.radio(key="view").set_value("Clusters").run()
    assert not at.exception
    at.button(key="cluster-0-spurious").click().run()
    labelled = labels(run)
    assert labelled and set(labelled.values()) == {"spurious"}
    first = sorted(labelled)[0]
    FeedbackStore(run / "feedback.sqlite").add(first, "alice", "true")  # an override later wins
    assert labels(run)[first] == "true"


def test_agreement_view(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    store = FeedbackStore(run / "feedback.sqlite")
    for i, (a, b) in enumerate(
        [("true", "true"), ("spurious", "spurious"), ("true", "spurious"), ("unsure", "unsure")]
    ):
        store.add(f"cf-{i}", "alice", a)
        store.add(f"cf-{i}", "bob", b)
    at = app(monkeypatch, run)
    at.radio(key="view").set_value("Agreement").run()
    assert not at.exception
    assert at.metric[0].label.startswith("Fleiss") and at.metric[0].value != "—"
    pairs = at.dataframe[0].value
    assert pairs.loc[0, "shared"] == 4 and 0 < pairs.loc[0, "cohen_kappa"] < 1


def test_token_gate(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    at = app(monkeypatch, run, token="s3cret")
    assert not at.button and not at.markdown  # nothing but the token field
    at.text_input(key="token").input("wrong").run()
    assert at.error and "Wrong access token" in at.error[0].value and not at.button
    at.text_input(key="token").input("s3cret").run()
    assert at.button(key="label-true")


def test_missing_files_refused_paths_and_empty_round(tmp_path, monkeypatch):
    run = make_run(tmp_path / "a", bad_path=True, missing_image=True)
    at = app(monkeypatch, run)
    assert not at.exception
    assert (
        "1 counterfactual(s) refused" in at.warning[0].value
        and "1 with missing images" in at.warning[0].value
    )
    assert all("cf-0" not in m.value and "cf-1" not in m.value for m in at.markdown)

    empty = tmp_path / "b"
    (empty / "explain").mkdir(parents=True)
    pd.DataFrame(
        columns=[
            "id",
            "original",
            "counterfactual",
            "difference",
            "source_class",
            "target_class",
            "attempt",
            "success",
        ]
    ).to_csv(empty / "explain" / "manifest.csv", index=False)
    at = app(monkeypatch, empty)
    assert not at.exception and "empty" in at.error[0].value

    corrupt = tmp_path / "c"
    (corrupt / "explain").mkdir(parents=True)
    (corrupt / "explain" / "manifest.csv").write_text("id,original\n1\n\x00\x00")
    at = app(monkeypatch, corrupt)
    assert not at.exception and "corrupt" in at.error[0].value

    at = app(monkeypatch, tmp_path / "nothing")
    assert not at.exception and "No counterfactuals" in at.error[0].value


def test_fleiss_kappa_known_value():
    # Fleiss (1971)-style check: perfect agreement -> 1, systematic disagreement -> below 0
    perfect = pd.DataFrame(
        {
            "cf_id": ["a", "a", "b", "b"],
            "annotator": ["x", "y"] * 2,
            "label": ["true", "true", "spurious", "spurious"],
        }
    )
    assert services.fleiss_kappa(perfect) == pytest.approx(1.0)
    split = pd.DataFrame(
        {
            "cf_id": ["a", "a", "b", "b"],
            "annotator": ["x", "y"] * 2,
            "label": ["true", "spurious", "spurious", "true"],
        }
    )
    assert services.fleiss_kappa(split) < 0


def test_the_round_counts_verdicts_unjudged_and_not_flipped(tmp_path, monkeypatch):
    run = make_run(tmp_path, n=4)
    table = pd.read_csv(run / "explain" / "manifest.csv")
    failed = {**table.iloc[0].to_dict(), "id": "cf-failed", "success": False}
    pd.concat([table, pd.DataFrame([failed])]).to_csv(run / "explain" / "manifest.csv", index=False)
    at = app(monkeypatch, run)
    at.button(key="label-spurious").click().run()
    text = " ".join(c.value for c in at.caption)
    assert "spurious: 1" in text and "not judged yet: 3" in text and "not flipped: 1" in text
    assert "cf-failed" not in " ".join(m.value for m in at.markdown)  # never shown
