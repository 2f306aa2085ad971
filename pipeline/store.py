"""The feedback store: one SQLite file (WAL) per run holding every label event ever made, append-only.

The latest event per (counterfactual, annotator) is that annotator's label; an event with label ``none``
withdraws it (undo). Consensus is a majority over annotators (ties -> unsure). Safe under several processes:
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

import pandas as pd

from pipeline.errors import UserError

LABELS = ("true", "spurious", "unsure")
WITHDRAWN = "none"  # an event that takes an annotator's label back
COLUMNS = ["event_id", "cf_id", "round", "annotator", "label", "comment", "created_at"]
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    cf_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    annotator TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ({", ".join(repr(x) for x in (*LABELS, WITHDRAWN))})),
    comment TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_cf ON events (cf_id, annotator, seq);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'label events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'label events are append-only'); END;
"""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


class FeedbackStore:
    def __init__(self, path: str | Path, retries: int = 50):
        self.path, self.retries = Path(path), retries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._retry(lambda db: db.executescript(SCHEMA))

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
        return self.add_many(
            [{"cf_id": cf_id, "annotator": annotator, "label": label, "round": round, "comment": comment}]
        )[0]

    def add_many(self, events: Iterable[dict]) -> list[str]:
        """Append events in one transaction; each gets an event_id and a timestamp unless it has them."""
        rows = []
        for e in events:
            label, annotator = str(e["label"]), str(e.get("annotator", "")).strip()
            if label not in (*LABELS, WITHDRAWN):
                raise UserError(f"label '{label}' for {e['cf_id']}: expected one of {', '.join(LABELS)}")
            if not annotator:
                raise UserError("an annotator name is required")
            rows.append(
                (
                    e.get("event_id") or uuid.uuid4().hex,
                    str(e["cf_id"]),
                    int(e.get("round", 1)),
                    annotator,
                    label,
                    str(e.get("comment", "") or ""),
                    e.get("created_at") or _now(),
                )
            )

        def write(db):
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR IGNORE INTO events (event_id, cf_id, round, annotator, label, comment, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute("COMMIT")

        self._retry(write)
        return [r[0] for r in rows]

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
            + " ORDER BY seq"
        )
        return self._retry(lambda db: pd.read_sql_query(sql, db, params=args))

    def labels(self, round: int | None = None) -> pd.DataFrame:
        """Each annotator's current label per counterfactual (withdrawn labels left out)."""
        events = self.events(round)
        latest = events.groupby(["cf_id", "annotator"], sort=False).tail(1)
        return latest[latest["label"] != WITHDRAWN].reset_index(drop=True)

    def consensus(self, round: int | None = None, min_votes: int = 1) -> pd.DataFrame:
        """Majority label per counterfactual over annotators; ties and fewer than min_votes votes -> unsure."""
        labels = self.labels(round)
        rows = []
        for cf_id, group in labels.groupby("cf_id", sort=False):
            counts = group["label"].value_counts()
            top = counts[counts == counts.max()]
            label = top.index[0] if len(top) == 1 and len(group) >= min_votes else "unsure"
            rows.append(
                {
                    "cf_id": cf_id,
                    "label": label,
                    "votes": len(group),
                    **{f"n_{x}": int(counts.get(x, 0)) for x in LABELS},
                }
            )
        return pd.DataFrame(rows, columns=["cf_id", "label", "votes", *(f"n_{x}" for x in LABELS)])

    # -- exchange --------------------------------------------------------------------------------------------
    def export(self, path: str | Path) -> int:
        path, events = Path(path), self.events()
        events.to_parquet(path, index=False) if path.suffix == ".parquet" else events.to_csv(
            path, index=False
        )
        return len(events)

    def import_(self, path: str | Path) -> int:
        """Merge an export (CSV or Parquet); events already present (same event_id) are skipped."""
        path = Path(path)
        try:
            table = (
                pd.read_parquet(path)
                if path.suffix == ".parquet"
                else pd.read_csv(path, dtype=str, keep_default_na=False)
            )
        except Exception as exc:  # pandas raises many types for unreadable files
            raise UserError(f"cannot read feedback export {path}: {exc}") from None
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
        before = len(self.events())
        self.add_many(table[COLUMNS].to_dict("records"))
        return len(self.events()) - before
