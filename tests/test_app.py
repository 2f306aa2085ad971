from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from annotation_app import services
from pipeline.config import FeedbackConfig
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


def app(monkeypatch, run_dir, token=None, annotator="alice", order="manifest"):
    """The app on run_dir as annotator; order "manifest" (the default here) keeps the cards in manifest order, so a
    test knows which card comes next; None leaves the app's own cluster-first order."""
    monkeypatch.setenv("CFKD_RUN_DIR", str(run_dir))
    if token:
        monkeypatch.setenv("CFKD_TOKEN", token)
    else:
        monkeypatch.delenv("CFKD_TOKEN", raising=False)
    at = AppTest.from_file(APP, default_timeout=30)
    if annotator:
        at.query_params["annotator"] = annotator
    at.run()
    if order and any(r.key == "order" for r in at.radio):
        at.radio(key="order").set_value(order).run()
    return at


def labels(run_dir):
    return FeedbackStore(run_dir / "feedback.sqlite").labels().set_index("cf_id")["label"].to_dict()


def test_label_moves_on_and_undo_restores(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    at = app(monkeypatch, run)
    assert not at.exception and not at.error
    assert "cf-0" in at.markdown[0].value
    at.button(key="label-spurious").click().run()
    assert labels(run) == {"cf-0": "spurious"}
    assert any("card 2 / 6" in c.value for c in at.caption)
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


def test_near_flips_are_shown_when_the_run_judges_them(tmp_path, monkeypatch):
    run = make_run(tmp_path, n=2)
    table = pd.read_csv(run / "explain" / "manifest.csv").assign(progress=1.0)
    near = {**table.iloc[0].to_dict(), "id": "cf-near", "success": False, "progress": 0.7}
    far = {**table.iloc[0].to_dict(), "id": "cf-far", "success": False, "progress": 0.3}
    pd.concat([table, pd.DataFrame([near, far])]).to_csv(run / "explain" / "manifest.csv", index=False)
    (run / "config.yaml").write_text("feedback:\n  partial: 0.5\n")
    shown = services.load_round(run, 1)
    assert set(shown.manifest["id"]) == {"cf-0", "cf-1", "cf-near"} and shown.not_flipped == 1
    (run / "config.yaml").write_text("feedback:\n  partial: 1.0\n")
    assert set(services.load_round(run, 1).manifest["id"]) == {"cf-0", "cf-1"}
    # a run without a readable config: the app shows what the pipeline's default judges
    (run / "config.yaml").unlink()
    assert services.PARTIAL == FeedbackConfig().partial
    assert set(services.load_round(run, 1).manifest["id"]) == {"cf-0", "cf-1", "cf-near"}


def make_clustered_run(root, per_kind=4):
    """A round whose changes come in three kinds (a hue shift in one corner, a brighter image, a darker other
    corner), per_kind cards each, interleaved in the manifest."""
    run = make_run(root, n=3 * per_kind)
    folder = run / "explain"
    table = pd.read_csv(folder / "manifest.csv")
    rng = np.random.default_rng(1)
    for i, row in table.iterrows():
        original = np.clip(rng.normal(120, 10, (16, 16, 3)), 0, 255)
        changed = original.copy()
        if i % 3 == 0:
            changed[:6, :6] += [70, -70, 0]  # hue only: the brightness map cannot show it
        elif i % 3 == 1:
            changed += 50
        else:
            changed[10:, 10:] -= 80
        for name, image in ((row.original, original), (row.counterfactual, changed)):
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / name)
    return run


def test_change_clusters_choose_their_number_and_a_representative(tmp_path):
    run = make_clustered_run(tmp_path)
    rnd = services.load_round(run, 1)
    groups = services.change_clusters(rnd.manifest)
    assert groups["cluster"].nunique() == 3 and groups["representative"].sum() == 3
    kinds = {i: int(i.split("-")[1]) % 3 for i in groups.index}
    for _, members in groups.groupby("cluster"):
        assert len({kinds[i] for i in members.index}) == 1  # one kind of change per cluster
    # the queue: the three representatives first; a cluster judged both ways comes before one judged alike
    labels = pd.DataFrame(columns=["cf_id", "annotator", "label", "comment"])
    order = services.review_order(rnd.manifest, groups, labels, "alice")
    assert set(order[:3]) == set(groups.index[groups["representative"]]) and len(order) == 12
    by_kind = {k: [i for i in groups.index if kinds[i] == k] for k in range(3)}
    labels = pd.DataFrame(
        {
            "cf_id": [*by_kind[0][:2], *by_kind[1][:2]],
            "annotator": "bob",
            "label": ["true", "spurious", "spurious", "spurious"],
            "comment": "",
        }
    )
    uncertainty = services.verdict_uncertainty(groups, labels)
    mixed, alike = (groups.at[by_kind[k][0], "cluster"] for k in (0, 1))
    assert uncertainty[mixed] == pytest.approx(1.0) and uncertainty[alike] < 0.9
    rest = services.review_order(rnd.manifest, groups, labels, "alice")[3:]
    assert kinds[rest[0]] == 0  # the mixed cluster's members come first


def test_unrealistic_key_and_the_round_header(tmp_path, monkeypatch):
    run = make_run(tmp_path, n=4)
    (run / "config.yaml").write_text("feedback:\n  min_labels: 3\n")
    at = app(monkeypatch, run)
    header = {m.label: m.value for m in at.metric}
    assert header["Cards left for you"] == "4" and header["cfkd run"] == "3 to go"
    assert header["Feedback accuracy"] == "—"
    at.button(key="label-unrealistic").click().run()
    assert labels(run) == {"cf-0": "unrealistic"}
    at.button(key="label-true").click().run()
    at.button(key="label-spurious").click().run()
    header = {m.label: m.value for m in at.metric}
    assert header["Cards left for you"] == "1" and header["cfkd run"] == "ready"
    assert header["Verdicts this round"] == "T1 S1 U0 R1" and header["Feedback accuracy"] == "0.50"
    assert any("p(0)" in m.value and "p(1)" in m.value for m in at.markdown)  # both classes, before -> after
    captions = " ".join(c.value for c in at.caption)
    assert "colour change" in captions and "brightness change" in captions


def test_the_cluster_first_queue_and_one_key_for_the_whole_cluster(tmp_path, monkeypatch):
    run = make_clustered_run(tmp_path)
    groups = services.change_clusters(services.load_round(run, 1).manifest)
    representatives = set(groups.index[groups["representative"]])
    at = app(monkeypatch, run, order=None)  # the app's own order
    first = next(m.value for m in at.markdown if "`cf-" in m.value).split("`")[1]
    assert first in representatives
    assert at.button(key="cluster-apply").disabled  # nothing to apply before a verdict
    at.button(key="label-spurious").click().run()  # the next card is the next cluster's representative
    second = next(m.value for m in at.markdown if "`cf-" in m.value).split("`")[1]
    assert second in representatives - {first}
    at.button(key="prev").click().run()
    members = groups.index[(groups["cluster"] == groups.at[first, "cluster"]) & (groups.index != first)]
    store = FeedbackStore(run / "feedback.sqlite")
    store.add(members[0], "alice", "true")  # judged one by one: it keeps its own verdict
    at.button(key="cluster-apply").click().run()
    now = labels(run)
    assert now[first] == "spurious" and now[members[0]] == "true"
    assert all(now[m] == "spurious" for m in members[1:])
    assert len(store.events()) == 2 + len(members) - 1  # one key press, one event per member


def test_the_apps_incremental_read_of_labels_matches_the_store(tmp_path):
    store, memo = FeedbackStore(tmp_path / "feedback.sqlite"), {}
    assert services.current_labels(store, 1, memo).empty
    store.add("a", "alice", "true")
    store.add("b", "alice", "spurious")
    pd.testing.assert_frame_equal(services.current_labels(store, 1, memo), store.labels(1))
    other = FeedbackStore(tmp_path / "feedback.sqlite")  # another expert's app process
    other.add("a", "bob", "spurious")
    other.add_many(
        [{"cf_id": "c", "annotator": "carol", "label": "true", "created_at": "2020-01-01T00:00:00"}]
    )
    store.undo("b", "alice")
    store.add("d", "alice", "true", round=2)  # another round: not this one's
    pd.testing.assert_frame_equal(services.current_labels(store, 1, memo), store.labels(1))
    assert set(services.current_labels(store, 1, memo)["cf_id"]) == {"a", "c"}
