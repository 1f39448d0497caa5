"""Durable event storage in SQLite: the EventStore interface over one file in WAL mode.

An append is acknowledged only after its transaction is committed with
synchronous=FULL, so an acknowledged event survives a crash of the process or
the machine. docs/profiles.md ("Storage") has the details.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from recsys_core.store.events import EventStore, StoredEvent, StoredExposure, superseded, tombstone_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    category TEXT NOT NULL,
    type INTEGER NOT NULL,
    ts INTEGER,
    rating REAL,
    review TEXT,
    idempotency_key TEXT UNIQUE,
    amount REAL,
    order_id TEXT
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS forgotten (user_hash TEXT PRIMARY KEY, forgotten_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS exposures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    exposure_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    experiment TEXT NOT NULL,
    arm TEXT NOT NULL,
    model_version TEXT NOT NULL,
    ts INTEGER NOT NULL,
    item_ids TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS exposures_by_user ON exposures (user_id, id);
CREATE INDEX IF NOT EXISTS exposures_by_time ON exposures (ts);
"""


INSERT_EVENT = (
    "INSERT OR IGNORE INTO events"
    " (user_id, item_id, category, type, ts, rating, review, idempotency_key, amount, order_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# What user_events returns: everything but review texts and idempotency keys.
EVENT_COLUMNS = "user_id, item_id, category, type, ts, rating, amount, order_id"


def _row(event: StoredEvent) -> tuple:
    return (event.user_id, event.item_id, event.category, event.type, event.ts, event.rating,
            event.review, event.idempotency_key, event.amount, event.order_id)


def _from_row(row: tuple) -> StoredEvent:
    user_id, item_id, category, type_, ts, rating, amount, order_id = row
    return StoredEvent(user_id, item_id, category, type_, ts, rating, amount=amount, order_id=order_id)


class SQLiteEventStore(EventStore):
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._writer = self._connect()
        # A forgotten shopper's rows are overwritten with zeros as they are
        # deleted, not left readable in free pages of the file.
        self._writer.execute("PRAGMA secure_delete=ON").fetchall()
        self._writer.executescript(SCHEMA)
        self._migrate()

    def __repr__(self) -> str:
        return f"SQLiteEventStore({str(self.path)!r})"

    def _migrate(self) -> None:
        # Stores written before events carried money keep working: the new
        # columns are added empty.
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(events)")}
        for name, kind in (("amount", "REAL"), ("order_id", "TEXT")):
            if name not in columns:
                self._writer.execute(f"ALTER TABLE events ADD COLUMN {name} {kind}")

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    def _reader(self) -> sqlite3.Connection:
        # One connection per thread: WAL lets readers run beside the writer.
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
        return connection

    def append(self, events: Sequence[StoredEvent]) -> list[bool]:
        """Store events in one transaction. Returns, per event, whether it was
        new (False: its idempotency key was stored before)."""
        return self._insert_unless_forgotten(events, INSERT_EVENT, _row)

    def _insert_unless_forgotten(self, records, statement: str, row) -> list[bool]:
        """Insert each record (`row(record)` the statement's parameters) in one
        transaction, except a forgotten shopper's from before the forgetting.
        Returns, per record, whether it was stored (False: forgotten, or
        ignored by the statement as stored before)."""
        stored = []
        with self._write_lock:
            cursor = self._writer.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                # Read inside the transaction: a forget_user cannot slip in
                # between the check and the insert.
                tombstones = self._tombstones(cursor, {record.user_id for record in records})
                for record in records:
                    if tombstones and superseded(record.ts, tombstones.get(record.user_id)):
                        stored.append(False)
                        continue
                    cursor.execute(statement, row(record))
                    stored.append(cursor.rowcount == 1)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        return stored

    def bulk_load(self, events: Iterable[StoredEvent], total: int, marker: str, show_progress: bool = True) -> bool:
        """Load a data set once: does nothing when `marker` was loaded before."""
        if self.meta(f"loaded:{marker}") is not None:
            return False
        with self._write_lock:
            cursor = self._writer.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                forgotten = dict(cursor.execute("SELECT user_hash, forgotten_at FROM forgotten").fetchall())
                shown = tqdm(events, total=total, desc="loading events", unit="event", disable=not show_progress)
                if forgotten:
                    shown = (e for e in shown if not superseded(e.ts, forgotten.get(tombstone_of(e.user_id))))
                cursor.executemany(INSERT_EVENT, map(_row, shown))
                cursor.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"loaded:{marker}", str(total)))
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        return True

    @staticmethod
    def _tombstones(cursor: sqlite3.Cursor, user_ids) -> dict[str, int]:
        """user_id -> forgotten_at, for those of `user_ids` who were forgotten."""
        if cursor.execute("SELECT 1 FROM forgotten LIMIT 1").fetchone() is None:
            return {}
        found = {}
        for user_id in user_ids:
            row = cursor.execute("SELECT forgotten_at FROM forgotten WHERE user_hash = ?",
                                 (tombstone_of(user_id),)).fetchone()
            if row is not None:
                found[user_id] = row[0]
        return found

    def forget_user(self, user_id: str, now: int | None = None) -> int:
        """One transaction: the events go (item counts and co-purchases are
        read from them, so nothing else holds the shopper) and the tombstone
        is written. Then a checkpoint, best effort, so the deleted rows'
        pages leave the WAL file too."""
        now = int(time.time()) if now is None else int(now)
        with self._write_lock:
            cursor = self._writer.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                removed = cursor.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
                cursor.execute("DELETE FROM exposures WHERE user_id = ?", (user_id,))
                cursor.execute(
                    "INSERT INTO forgotten (user_hash, forgotten_at) VALUES (?, ?) ON CONFLICT (user_hash)"
                    " DO UPDATE SET forgotten_at = MAX(forgotten_at, excluded.forgotten_at)",
                    (tombstone_of(user_id), now),
                )
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            # Readers may hold old pages: then the WAL is overwritten later, as usual.
            # Read to the end: a PRAGMA's statement left stepped once counts as a
            # write in progress, and the next COMMIT on this connection fails.
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            cursor.close()
        return removed

    def record_exposures(self, exposures) -> list[bool]:
        return self._insert_unless_forgotten(
            exposures,
            "INSERT OR IGNORE INTO exposures (exposure_id, user_id, experiment, arm, model_version, ts, item_ids)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            lambda e: (e.exposure_id, e.user_id, e.experiment, e.arm, e.model_version, e.ts,
                       json.dumps(list(e.item_ids))))

    def exposures(self, since: int | None = None) -> Iterator[StoredExposure]:
        connection = self._connect()
        try:
            rows = connection.execute(
                "SELECT exposure_id, user_id, experiment, arm, model_version, ts, item_ids FROM exposures"
                " WHERE ts >= ? ORDER BY id", (since if since is not None else -2**62,))
            for exposure_id, user_id, experiment, arm, model_version, ts, item_ids in rows:
                yield StoredExposure(exposure_id, user_id, experiment, arm, model_version, ts,
                                     tuple(json.loads(item_ids)))
        finally:
            connection.close()

    def forgotten_at(self, user_id: str) -> int | None:
        row = self._reader().execute("SELECT forgotten_at FROM forgotten WHERE user_hash = ?",
                                     (tombstone_of(user_id),)).fetchone()
        return None if row is None else row[0]

    def meta(self, key: str) -> str | None:
        row = self._reader().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def user_events(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        query = f"SELECT {EVENT_COLUMNS} FROM events WHERE user_id = ? ORDER BY id DESC"
        params: tuple = (user_id,)
        if limit is not None:
            query += " LIMIT ?"
            params = (user_id, limit)
        rows = self._reader().execute(query, params).fetchall()
        return [_from_row(row) for row in reversed(rows)]

    def user_reviews(self, user_id: str, limit: int) -> list[StoredEvent]:
        rows = self._reader().execute(
            f"SELECT {EVENT_COLUMNS}, review FROM events WHERE user_id = ? AND review IS NOT NULL"
            " ORDER BY id DESC LIMIT ?",
            (user_id, limit),
        ).fetchall()
        return [replace(_from_row(row[:-1]), review=row[-1]) for row in reversed(rows)]

    def user_summary(self, user_id: str) -> tuple[int, dict[str, int], list[str]]:
        connection = self._reader()
        per_category = dict(
            connection.execute(
                "SELECT category, COUNT(*) FROM events WHERE user_id = ? GROUP BY category", (user_id,)
            ).fetchall()
        )
        seen = [row[0] for row in connection.execute(
            "SELECT item_id FROM events WHERE user_id = ? GROUP BY item_id ORDER BY MAX(id) DESC", (user_id,)
        )]
        return sum(per_category.values()), per_category, seen

    def item_counts(self) -> list[tuple[str, str, int]]:
        return self._reader().execute(
            "SELECT item_id, category, COUNT(*) FROM events GROUP BY item_id, category"
        ).fetchall()

    def user_items(self) -> Iterator[tuple[str, str, str]]:
        # A connection of its own: the rows stream while the caller works.
        connection = self._connect()
        try:
            yield from connection.execute("SELECT DISTINCT user_id, item_id, category FROM events")
        finally:
            connection.close()

    def count(self) -> int:
        return self._reader().execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def user_version(self, user_id: str) -> None:
        return None  # one process writes: its ingest drops its cached profiles

    def shared_signals(self) -> None:
        return None  # counted in the one process's memory

    def close(self) -> None:
        self._writer.close()
