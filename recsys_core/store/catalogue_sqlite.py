"""The shared catalogue in one SQLite file (WAL): the embedded default.

Several processes on one machine may open the same file (`recsys serve
--replicas N`): SQLite's file locks serialise their writes, BEGIN IMMEDIATE
takes the write lock before anything is read, so two writers never both
compute the same next sequence number, and a writer that finds the lock taken
waits for it (busy timeout) instead of failing. Readers see whole
transactions only (WAL snapshots), so a replica never applies half an upsert.

synchronous=FULL: the WAL is fsynced at every commit, so an acknowledged
upsert survives a crash of the machine, not only of the process (NORMAL
would lose the last commits on power loss). Upserts are rare and each
already pays an encoder call; one fsync is small beside it.

Not for a network file system: SQLite's locks and WAL's shared memory need
one host. Replicas on several machines use the Redis backend.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from recsys_core.errors import Unavailable
from recsys_core.store.catalogue_store import (
    CatalogueEntry, CatalogueStore, PutResult, latest, vector_bytes, vector_from,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS catalogue_items (
    item_id TEXT PRIMARY KEY,
    category TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    category_path TEXT NOT NULL,
    encoder TEXT NOT NULL,
    vector BLOB NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS catalogue_items_by_seq ON catalogue_items (seq);
CREATE TABLE IF NOT EXISTS catalogue_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
COLUMNS = "item_id, category, title, text, category_path, encoder, vector"
# Waiting writers queue on SQLite's lock this long before the upsert is refused (UNAVAILABLE).
BUSY_SECONDS = 30.0


class SQLiteCatalogueStore(CatalogueStore):
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)

    def __repr__(self) -> str:
        return f"SQLiteCatalogueStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=BUSY_SECONDS, check_same_thread=False,
                                     isolation_level=None)
        # Replicas starting together open a new file at once: switching it to
        # WAL needs the file to itself, and SQLite answers "database is
        # locked" at once instead of waiting on the busy timeout, so wait here.
        deadline = time.monotonic() + BUSY_SECONDS
        pause = 0.01
        while True:
            try:
                connection.execute("PRAGMA journal_mode=WAL").fetchall()
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    def _reader(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
            with self._write_lock:
                self._readers.append(connection)
        return connection

    def put(self, entries: Sequence[CatalogueEntry], only_new: bool = False) -> PutResult:
        entries = latest(entries)
        inserted = updated = 0
        try:
            with self._write_lock:
                cursor = self._writer.cursor()
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    seq = cursor.execute("SELECT COALESCE(MAX(seq), 0) FROM catalogue_items").fetchone()[0] + 1
                    for entry in entries:
                        exists = cursor.execute(
                            "SELECT 1 FROM catalogue_items WHERE item_id = ?", (entry.item_id,)
                        ).fetchone() is not None
                        if exists and only_new:
                            continue
                        cursor.execute(
                            f"INSERT OR REPLACE INTO catalogue_items ({COLUMNS}, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (entry.item_id, entry.category, entry.title, entry.text, entry.category_path,
                             entry.encoder, vector_bytes(entry.vector), seq),
                        )
                        updated += exists
                        inserted += not exists
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as exc:
            # "database is locked" after BUSY_SECONDS, a full disk: nothing was stored.
            raise Unavailable(f"catalogue store {self.path} refused the write, nothing stored: {exc}") from exc
        return PutResult(inserted, updated, seq if inserted or updated else self.version())

    def version(self) -> int:
        return self._reader().execute("SELECT COALESCE(MAX(seq), 0) FROM catalogue_items").fetchone()[0]

    def changes(self, after: int) -> tuple[list[CatalogueEntry], int]:
        connection = self._reader()
        # One read transaction: the rows and the version come from the same snapshot.
        connection.execute("BEGIN")
        try:
            rows = connection.execute(
                f"SELECT {COLUMNS}, seq FROM catalogue_items WHERE seq > ? ORDER BY seq", (after,)
            ).fetchall()
        finally:
            connection.execute("COMMIT")
        entries = [CatalogueEntry(*row[:6], vector=vector_from(row[6])) for row in rows]
        return entries, max((row[7] for row in rows), default=after)

    def meta(self, key: str) -> str | None:
        row = self._reader().execute("SELECT value FROM catalogue_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        try:
            with self._write_lock:
                self._writer.execute("INSERT OR REPLACE INTO catalogue_meta (key, value) VALUES (?, ?)", (key, value))
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"catalogue store {self.path} refused the write: {exc}") from exc

    def close(self) -> None:
        with self._write_lock:
            for connection in [self._writer, *self._readers]:
                connection.close()
