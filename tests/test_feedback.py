import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline import manifest
from pipeline.errors import UserError
from pipeline.store import FeedbackStore

WRITER = """
import sys
from pipeline.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.add(f"cf-{i}", sys.argv[2], "true" if i % 2 else "spurious")
    print(i, flush=True)
"""


def _writer(path, name, n):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), name, str(n)], stdout=subprocess.PIPE, text=True
    )


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "feedback.sqlite"
    FeedbackStore(path)
    writers = [_writer(path, name, 500) for name in ("alice", "bob")]
    for w in writers:
        w.communicate(timeout=120)
        assert w.returncode == 0
    events = FeedbackStore(path).events()
    assert len(events) == 1000 and events["event_id"].is_unique
    assert (events.groupby("annotator").size() == 500).all()


def test_a_killed_writer_loses_nothing_it_committed(tmp_path):
    path = tmp_path / "feedback.sqlite"
    writer = _writer(path, "carol", 100000)
    committed = -1
    deadline = time.time() + 60
    while committed < 200 and time.time() < deadline:
        committed = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    events = FeedbackStore(path).events()
    assert len(events) >= committed + 1  # every event it reported as written is there
    assert set(events["cf_id"]) >= {f"cf-{i}" for i in range(committed + 1)}


def test_latest_event_wins_undo_and_append_only(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    store.add("cf-1", "alice", "true")
    store.add("cf-1", "alice", "spurious", comment="background only")
    assert store.labels().set_index("cf_id").loc["cf-1", "label"] == "spurious"
    assert store.undo("cf-1", "alice") == "true"
    assert store.labels()["label"].tolist() == ["true"]
    assert store.undo("cf-1", "alice") == "spurious"  # undo is itself an event: history is never rewritten
    assert len(store.events()) == 4
    store2 = FeedbackStore(tmp_path / "g.sqlite")
    store2.add("cf-2", "bob", "unsure")
    store2.undo("cf-2", "bob")
    assert store2.labels().empty  # the only label was withdrawn
    db = sqlite3.connect(tmp_path / "f.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE events SET label = 'true'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM events")
    with pytest.raises(UserError, match="label 'maybe'"):
        store.add("cf-1", "alice", "maybe")


def test_consensus_majority_ties_and_min_votes(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    for annotator, label in [("a", "true"), ("b", "true"), ("c", "spurious")]:
        store.add("cf-1", annotator, label)
    store.add("cf-2", "a", "true")
    store.add("cf-2", "b", "spurious")
    store.add("cf-3", "a", "spurious")
    consensus = store.consensus().set_index("cf_id")
    assert consensus.loc["cf-1", "label"] == "true" and consensus.loc["cf-1", "n_spurious"] == 1
    assert consensus.loc["cf-2", "label"] == "unsure"  # tie
    assert consensus.loc["cf-3", "label"] == "spurious"
    assert store.consensus(min_votes=2).set_index("cf_id").loc["cf-3", "label"] == "unsure"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_import_round_trip_without_duplicates(tmp_path, suffix):
    source = FeedbackStore(tmp_path / "a.sqlite")
    source.add_many(
        [{"cf_id": f"cf-{i}", "annotator": "alice", "label": "true", "round": 2} for i in range(5)]
    )
    assert source.export(tmp_path / f"export{suffix}") == 5
    target = FeedbackStore(tmp_path / "b.sqlite")
    target.add("cf-9", "bob", "spurious")
    assert target.import_(tmp_path / f"export{suffix}") == 5
    assert target.import_(tmp_path / f"export{suffix}") == 0  # merging twice adds nothing
    merged = target.events()
    assert len(merged) == 6 and set(merged["round"]) == {1, 2}
    pd.testing.assert_frame_equal(
        merged[merged["annotator"] == "alice"].reset_index(drop=True), source.events()
    )


def test_bad_files_are_user_errors(tmp_path):
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="not a cfkd feedback store"):
        FeedbackStore(tmp_path / "junk.sqlite")
    (tmp_path / "bad.csv").write_text("cf_id,label\nx,true\n")
    with pytest.raises(UserError, match="missing column"):
        FeedbackStore(tmp_path / "ok.sqlite").import_(tmp_path / "bad.csv")


def test_the_latest_verdict_by_time_wins_over_an_older_import(tmp_path):
    """Merging an older export never makes an annotator's older verdict current again."""
    laptop = FeedbackStore(tmp_path / "laptop.sqlite")
    laptop.add_many(
        [{"cf_id": "cf-1", "annotator": "alice", "label": "true", "created_at": "2026-11-01T09:00:00Z"}]
    )
    laptop.export(tmp_path / "old.csv")
    store = FeedbackStore(tmp_path / "run.sqlite")
    store.add("cf-1", "alice", "spurious")  # now: later than the laptop's verdict
    assert store.import_(tmp_path / "old.csv") == 1
    assert store.labels().set_index("cf_id")["label"].to_dict() == {"cf-1": "spurious"}
    # times in another zone are compared as the instants they are
    store.add_many(
        [{"cf_id": "cf-2", "annotator": "bob", "label": "true", "created_at": "2026-11-01T12:00:00+02:00"}]
    )
    store.add_many(
        [{"cf_id": "cf-2", "annotator": "bob", "label": "unsure", "created_at": "2026-11-01T11:00:00Z"}]
    )
    assert store.labels().set_index("cf_id").loc["cf-2", "label"] == "unsure"


def test_import_counts_only_its_own_rows_and_skips_identical_events(tmp_path):
    source = FeedbackStore(tmp_path / "a.sqlite")
    source.add_many([{"cf_id": f"cf-{i}", "annotator": "alice", "label": "true"} for i in range(3)])
    source.export(tmp_path / "e.csv")
    target = FeedbackStore(tmp_path / "b.sqlite")
    assert target.import_(tmp_path / "e.csv") == 3
    target.add("cf-9", "bob", "spurious")  # another writer between two imports
    assert target.import_(tmp_path / "e.csv") == 0
    assert target.import_(tmp_path / "e.csv", known={"cf-0", "cf-1", "cf-2"}) == 0


def test_stale_verdicts_are_counted_and_never_used(tmp_path):
    """Explain ran again and made other images: verdicts on the old ones are reported, not attached to the new."""
    from pipeline import feedback

    round_dir = tmp_path / "explain"
    round_dir.mkdir()
    row = {c: "" for c in manifest.COLUMNS} | {"sample": "train-0", "attempt": 1, "success": True}
    manifest.write([row | {"id": "train-0-t1-a1-new"}], round_dir / manifest.NAME)
    store = feedback.open_store(tmp_path)
    store.add("train-0-t1-a1-old", "alice", "spurious")
    store.add("train-0-t1-a1-new", "alice", "true")
    table = manifest.read_round(tmp_path, 1)
    given = feedback.verdicts(store, table, 1)
    assert given["cf_id"].tolist() == ["train-0-t1-a1-new"]
    assert feedback.summary(given, table, feedback.stale(store, table, 1))["stale"] == 1


def test_a_store_made_before_the_unrealistic_verdict_keeps_its_events_and_takes_it(tmp_path):
    from pipeline import store as store_module

    path = tmp_path / "feedback.sqlite"
    old = sqlite3.connect(path)
    old.executescript(store_module.SCHEMA.replace(", 'unrealistic'", ""))  # yesterday's label check
    old.execute(
        "INSERT INTO events (event_id, cf_id, round, annotator, label, comment, created_at) VALUES "
        "('e1', 'cf-1', 1, 'ann', 'spurious', '', '2026-01-01T00:00:00.000000+00:00')"
    )
    old.commit()
    old.close()
    store = FeedbackStore(path)
    store.add("cf-2", "ann", "unrealistic")
    assert store.labels().set_index("cf_id")["label"].to_dict() == {"cf-1": "spurious", "cf-2": "unrealistic"}
    with pytest.raises(sqlite3.IntegrityError):  # still append-only, still checked
        db = sqlite3.connect(path)
        db.execute("DELETE FROM events")
    with pytest.raises(UserError, match="label 'odd'"):
        store.add("cf-3", "ann", "odd")


def test_unrealistic_verdicts_are_counted_and_never_trained_on(tmp_path):
    from pipeline import distil, feedback

    table = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "sample": ["s1", "s2", "s3", "s4"],
            "counterfactual": [f"counterfactuals/{i}.png" for i in "abcd"],
            "original": [f"originals/{i}.png" for i in "abcd"],
            "source_class": "0",
            "target_class": "1",
            "success": True,
        }
    )
    consensus = pd.DataFrame(
        {"cf_id": list("abcd"), "label": ["spurious", "unrealistic", "true", "unrealistic"]}
    )
    training = distil.training_set(table, consensus, use_true=True)
    assert training["id"].tolist() == ["a", "c"]  # the rejected images never reach the classifier
    info = feedback.summary(consensus, table)
    assert info["labels"]["unrealistic"] == 2 and info["unrealistic_share"] == 0.5
    assert info["feedback_accuracy"] == 0.5  # true / (true + spurious): a rejection is not a judgement


def test_expert_actions_count_key_presses_not_events(tmp_path):
    from annotation_app import services
    from pipeline import feedback, report

    store = FeedbackStore(tmp_path / "feedback.sqlite")
    store.add("a", "alice", "spurious")
    groups = pd.DataFrame({"cluster": [0, 0, 0, 1]}, index=["a", "b", "c", "d"])
    assert services.apply_to_cluster(store, groups, "a", "alice", "spurious", 1) == 2  # one press, two events
    store.add("d", "teacher:mask", "true")  # a simulated teacher spends no expert time
    store.add("d", "bob", "true")
    store.undo("d", "bob")  # nor does an undo
    assert feedback.expert_actions(store.events()) == 3
    metrics = {
        "classifier": {"worst_group_accuracy": 0.05},
        "reference": {"worst_group_accuracy": 0.95},
        "rounds": [
            {"worst_group_accuracy": 0.8, "expert_actions": 3},
            {"worst_group_accuracy": 0.9, "expert_actions": 2},
        ],
    }
    assert "<img" in report._actions_plot(metrics)
    assert report._actions_plot({"classifier": {}, "rounds": [{"worst_group_accuracy": 0.8}]}) == ""
