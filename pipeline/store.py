"""The feedback store: one SQLite file (WAL) per run holding every label event ever made, append-only.

The latest event per (counterfactual, annotator) by event time (ties: by event id) is that annotator's label, so
merging an older export never undoes a newer verdict; an event with label ``none`` withdraws it (undo). Consensus is a majority over annotators (ties -> unsure). Safe under several processes:
each write is one short transaction, and a busy database is waited for and retried, never reported as locked.
"""

from __future__ import annotations

import datetime
import random
import sqlite3
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import UserError

MEANINGS = {  # the verdicts an expert gives, as the app and the Label Studio config explain them
    "true": "the change is real class evidence",
    "spurious": "the model flipped for a shortcut",
    "unsure": "cannot tell",
    "unrealistic": "no real image looks like this: never trained on, counted as the experts' realism verdict",
}
LABELS = tuple(MEANINGS)
KEYS = {
    "true": "T",
    "spurious": "S",
    "unsure": "U",
    "unrealistic": "R",
}  # one key per verdict, app and Label Studio
WITHDRAWN = "none"  # an event that takes an annotator's label back
CLUSTER_COMMENT = "cluster of "  # marks the events of one verdict given to a whole cluster (one key press)
COLUMNS = ["event_id", "cf_id", "round", "annotator", "label", "comment", "created_at"]
TABLE = f"""
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    cf_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    annotator TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ({", ".join(repr(x) for x in (*LABELS, WITHDRAWN))})),
    comment TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);"""
APPEND_ONLY = "BEGIN SELECT RAISE(ABORT, 'label events are append-only'); END"
GUARDS = (
    "CREATE INDEX IF NOT EXISTS events_by_cf ON events (cf_id, annotator, seq)",
    f"CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events {APPEND_ONLY}",
    f"CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events {APPEND_ONLY}",
)
SCHEMA = TABLE + "".join(f"\n{statement};" for statement in GUARDS)


_last_time = datetime.datetime.min.replace(tzinfo=datetime.UTC)


def _now() -> str:
    """UTC now, strictly later than any time this process handed out before (an undo right after a verdict still
    sorts after it)."""
    global _last_time
    now = datetime.datetime.now(datetime.UTC)
    _last_time = max(now, _last_time + datetime.timedelta(microseconds=1))
    return _last_time.isoformat(timespec="microseconds")


def event_time(value) -> str:
    """An event time as the store keeps it (UTC, ISO 8601, microseconds: sortable as text); naive times are UTC."""
    try:
        when = value if isinstance(value, datetime.datetime) else datetime.datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"time '{value}' is not an ISO 8601 time") from None
    when = when.replace(tzinfo=datetime.UTC) if when.tzinfo is None else when.astimezone(datetime.UTC)
    return when.isoformat(timespec="microseconds")


def _event(e: dict) -> tuple:
    """One event as a row of the table, or ValueError naming what is wrong with it."""
    cf_id, annotator, label = (str(e.get(k, "") or "").strip() for k in ("cf_id", "annotator", "label"))
    if not cf_id:
        raise ValueError("empty cf_id")
    if label not in (*LABELS, WITHDRAWN):
        raise ValueError(f"label '{label}' for {cf_id}: expected one of {', '.join(LABELS)}")
    if not annotator:
        raise ValueError("an annotator name is required")
    try:
        round = int(str(e.get("round", 1)))
    except ValueError:
        raise ValueError(f"round '{e.get('round')}' is not a whole number") from None
    if round < 1:
        raise ValueError(f"round {round}: rounds count from 1")
    created = e.get("created_at")
    return (
        str(e.get("event_id") or "").strip() or uuid.uuid4().hex,
        cf_id,
        round,
        annotator,
        label,
        str(e.get("comment", "") or ""),
        event_time(created) if created else _now(),
    )


class FeedbackStore:
    def __init__(self, path: str | Path, retries: int = 50):
        self.path, self.retries = Path(path), retries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._retry(lambda db: db.executescript(SCHEMA))
        self._retry(_migrate)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "PRAGMA synchronous=NORMAL"
        )  # WAL + NORMAL: a killed process never loses a committed event
        return db

    def _retry(self, work):
        """Run ``work(connection)``; wait and retry while another process holds the write lock."""
        for attempt in range(self.retries):
            db = None
            try:
                db = self._connect()
                return work(db)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or attempt == self.retries - 1:
                    raise
                time.sleep(min(0.5, 0.01 * 2**attempt) * random.random())
            except sqlite3.DatabaseError as exc:
                raise UserError(f"{self.path} is not a cfkd feedback store ({exc})") from None
            finally:
                if db is not None:
                    db.close()

    # -- writing ---------------------------------------------------------------------------------------------
    def add(self, cf_id: str, annotator: str, label: str, round: int = 1, comment: str = "") -> str:
        event_id = uuid.uuid4().hex
        event = {"cf_id": cf_id, "annotator": annotator, "label": label, "round": round, "comment": comment}
        self.add_many([event | {"event_id": event_id}])
        return event_id

    def add_many(self, events: Iterable[dict], first_row: int = 1) -> int:
        """Append events in one transaction, all or none; each gets an event id and a time unless it has them. An
        event id already in the store is skipped when it is the same event and an error when it differs. Returns
        how many events this call added."""
        rows, problems = [], []
        for n, e in enumerate(events, start=first_row):
            try:
                rows.append(_event(e))
            except ValueError as exc:
                problems.append(f"row {n}: {exc}")
        _raise_problems(problems)
        given = list(enumerate(rows, start=first_row))

        def write(db):
            db.execute("BEGIN IMMEDIATE")
            clashes = _clashes(db, given)
            if clashes:
                db.execute("ROLLBACK")
                _raise_problems(clashes)
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO events (event_id, cf_id, round, annotator, label, comment, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            added = db.total_changes - before
            db.execute("COMMIT")
            return added

        return self._retry(write)

    def undo(self, cf_id: str, annotator: str, round: int = 1) -> str | None:
        """Restore the annotator's label before their latest event (append-only: a new event carries it)."""
        history = self.events(annotator=annotator, cf_id=cf_id)
        if history.empty:
            return None
        previous = history["label"].iloc[-2] if len(history) > 1 else WITHDRAWN
        comment = history["comment"].iloc[-2] if len(history) > 1 else ""
        self.add(cf_id, annotator, previous, round, comment)
        return previous

    # -- reading ---------------------------------------------------------------------------------------------
    def events(
        self, round: int | None = None, annotator: str | None = None, cf_id: str | None = None
    ) -> pd.DataFrame:
        where, args = [], []
        for column, value in (("round", round), ("annotator", annotator), ("cf_id", cf_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = (
            f"SELECT {', '.join(COLUMNS)} FROM events"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY created_at, event_id"
        )
        return self._retry(lambda db: pd.read_sql_query(sql, db, params=args))

    def events_since(self, seq: int, round: int | None = None) -> pd.DataFrame:
        """The events appended after the store's running number ``seq``, with theirs: a reader that keeps what it
        has read (the app, on every card) fetches only what is new, whichever process wrote it."""
        where, args = "seq > ?", [seq]
        if round is not None:
            where, args = where + " AND round = ?", [seq, round]
        sql = f"SELECT seq, {', '.join(COLUMNS)} FROM events WHERE {where} ORDER BY seq"
        return self._retry(lambda db: pd.read_sql_query(sql, db, params=args))

    def labels(self, round: int | None = None) -> pd.DataFrame:
        """Each annotator's current label per counterfactual (withdrawn labels left out)."""
        return current(self.events(round))

    def consensus(self, round: int | None = None, min_votes: int = 1) -> pd.DataFrame:
        """Majority label per counterfactual over annotators; ties and fewer than min_votes votes -> unsure."""
        return consensus_of(self.labels(round), min_votes)

    # -- exchange --------------------------------------------------------------------------------------------
    def export(self, path: str | Path) -> int:
        path, events = Path(path), self.events()
        if not path.parent.is_dir():
            raise UserError(f"cannot export to {path}: folder {path.parent} does not exist")
        events.to_parquet(path, index=False) if path.suffix == ".parquet" else events.to_csv(
            path, index=False
        )
        return len(events)

    def import_(self, path: str | Path, known: set[str] | None = None) -> int:
        """Merge an export (CSV or Parquet), all rows or none: every row is checked (counterfactual ids among
        ``known`` when given, times, rounds, labels) and every problem named by its row. Returns the events added
        (rows already present are skipped)."""
        path = Path(path)
        try:
            table = (
                pd.read_parquet(path).astype(str)
                if path.suffix == ".parquet"
                else pd.read_csv(path, dtype=str, keep_default_na=False)
            )
        except Exception as exc:  # pandas raises many types for unreadable files
            raise UserError(f"cannot read feedback export {path}: {exc}") from None
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
        first_row = 2  # a CSV's line 1 is its header
        if known is not None:
            unknown = [
                f"row {n}: unknown counterfactual '{cf}'"
                for n, cf in enumerate(table["cf_id"], start=first_row)
                if cf not in known
            ]
            _raise_problems(unknown, f"{path}: ")
        try:
            return self.add_many(table[COLUMNS].to_dict("records"), first_row)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None


def _migrate(db: sqlite3.Connection) -> None:
    """A store made before a label existed keeps every event: its table is rebuilt with today's label check (the
    copy, the swap and the new index and triggers in one transaction)."""
    sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone()[0]
    if all(repr(label) in sql for label in LABELS):
        return
    db.execute("BEGIN IMMEDIATE")
    db.execute(TABLE.replace("EXISTS events (", "EXISTS events_new ("))
    db.execute(f"INSERT INTO events_new SELECT seq, {', '.join(COLUMNS)} FROM events")
    db.execute("DROP TABLE events")  # its index and triggers go with it
    db.execute("ALTER TABLE events_new RENAME TO events")
    for statement in GUARDS:
        db.execute(statement)
    db.execute("COMMIT")


def current(events: pd.DataFrame) -> pd.DataFrame:
    """Each annotator's current label per counterfactual from events in time order (withdrawn ones left out)."""
    latest = events.groupby(["cf_id", "annotator"], sort=False).tail(1)
    return latest.loc[latest["label"] != WITHDRAWN, COLUMNS].reset_index(drop=True)


def consensus_of(labels: pd.DataFrame, min_votes: int = 1) -> pd.DataFrame:
    """``FeedbackStore.consensus`` of labels already read, in order of first verdict. Vectorised: the app asks
    for it on every card, with thousands of verdicts in the store."""
    rows, ids = pd.factorize(labels["cf_id"])
    counts = np.zeros((len(ids), len(LABELS)), int)
    np.add.at(counts, (rows, pd.Categorical(labels["label"], categories=list(LABELS)).codes), 1)
    votes = counts.sum(1)
    unique_top = (counts == counts.max(1, initial=0)[:, None]).sum(1) == 1
    majority = np.asarray(LABELS, dtype=object)[counts.argmax(1)] if len(ids) else np.array([], dtype=object)
    return pd.DataFrame(
        {
            "cf_id": np.asarray(ids, dtype=object),
            "label": np.where(unique_top & (votes >= min_votes), majority, "unsure"),
            "votes": votes,
            **{f"n_{x}": counts[:, i] for i, x in enumerate(LABELS)},
        }
    )


MAX_LISTED = 10


def _raise_problems(problems: list[str], prefix: str = "") -> None:
    if problems:
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UserError(
            f"{prefix}{len(problems)} bad event(s), nothing imported: {'; '.join(problems[:MAX_LISTED])}{more}"
        )


def _clashes(db: sqlite3.Connection, given: list[tuple[int, tuple]]) -> list[str]:
    """Rows whose event id is already taken, in the store or earlier in the batch, by a different event."""
    seen: dict[str, tuple] = {}
    ids = [row[0] for _, row in given]
    for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
        chunk = ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        query = f"SELECT {', '.join(COLUMNS)} FROM events WHERE event_id IN ({marks})"
        seen.update({r[0]: r for r in db.execute(query, chunk)})
    problems = []
    for n, row in given:
        other = seen.setdefault(row[0], row)
        if tuple(other) != row:
            problems.append(
                f"row {n}: event id {row[0]} already names another event ({other[4]} on {other[1]})"
            )
    return problems
