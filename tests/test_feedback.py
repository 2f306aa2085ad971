import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest

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
