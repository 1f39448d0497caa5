"""Shoppers' events as every store keeps them, and the EventStore interface.

Two backends implement EventStore, chosen by PROFILE_STORE
(recsys_core.store.backends.open_store): SQLite in WAL mode
(recsys_core/store/sqlite_store.py) and Redis (recsys_core/store/redis_store.py).
Either way an IngestEvents call is acknowledged only after its whole batch is
on disk, so an acknowledged event survives a crash of the process or the
machine. docs/profiles.md ("Storage") has the details. Training reads stored
events through this module too, so it never imports a service.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

# Event types, numbered as recsys.common.v1.EventType (this module stays gRPC-free).
VIEW, PURCHASE, RATING, REVIEW = 1, 2, 3, 4


@dataclass(frozen=True)
class StoredEvent:
    user_id: str
    item_id: str
    category: str
    type: int
    ts: int | None
    rating: float | None = None
    review: str | None = None
    idempotency_key: str | None = None
    # Money spent (quantity x unit price; negative for a cancellation or
    # return) and the order it belongs to: what lifetime value is made of.
    amount: float | None = None
    order_id: str | None = None


@dataclass(frozen=True)
class StoredExposure:
    """One Recommend reply as a shopper saw it in an A/B arm
    (docs/operations.md, "A/B arms"): what later events are attributed by."""

    exposure_id: str
    user_id: str
    experiment: str
    arm: str
    model_version: str
    ts: int
    # In the order shown: position 1 first.
    item_ids: tuple[str, ...]


def benchmark_stored_events(events) -> Iterator[StoredEvent]:
    """Rows of the benchmark's interactions (recsys_core.data.shopping) as the store
    keeps them. They are reviews of bought items: purchases, or ratings where
    the set carries a star rating (Office)."""
    for row in events.itertuples(index=False):
        yield StoredEvent(
            user_id=row.user_id,
            item_id=row.item_id,
            category=row.category,
            type=RATING if row.rating == row.rating else PURCHASE,
            ts=None if row.timestamp != row.timestamp else int(row.timestamp),
            rating=None if row.rating != row.rating else float(row.rating),
        )


def tombstone_of(user_id: str) -> str:
    """How a forgotten shopper is remembered: the SHA-256 of their id, so the
    tombstone does not list who was forgotten in the clear (a short id can be
    guessed back from its hash, so this is not anonymisation; it keeps a dump
    of the store from being a list of names)."""
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


def superseded(event_ts: int | None, forgotten_at: int | None) -> bool:
    """Whether a forgotten shopper's event is from before they were forgotten
    (or undated): such an event is never stored again. Events after it are a
    returning shopper's, who starts over as a new one."""
    return forgotten_at is not None and (event_ts is None or event_ts < forgotten_at)


class EventStore(Protocol):
    """What the profile book needs from a store of shoppers' events.

    Every implementation keeps these promises, and tests/test_profile_domain.py
    checks them against each one:
    - append() is all-or-nothing and durable once it returns (on a Redis
      Cluster all-or-nothing per shopper: no transaction spans slots);
    - an idempotency key is stored at most once, even by concurrent appends;
    - a shopper's events come back in the order they were appended;
    - forget_user() removes a shopper's events and every count made of them in
      one atomic step, and leaves a tombstone (tombstone_of, with the time):
      bulk_load() never stores a forgotten shopper's events, and append()
      drops those dated before the forgetting (`superseded`). The store's
      counts are those of item_counts() and user_items(); a store with
      shared_signals() (Redis) also takes the shopper's share off those, as
      one more idempotent count update in the same step, applied before
      forget_user() returns, so its caller must not subtract it again.
    """

    def append(self, events: Sequence[StoredEvent]) -> list[bool]:
        """Store the batch atomically. Returns, per event, whether it was new
        (False: its idempotency key was stored before, or earlier in the batch,
        or it is a forgotten shopper's from before the forgetting)."""
        ...

    def bulk_load(self, events: Iterable[StoredEvent], total: int, marker: str, show_progress: bool = True) -> bool:
        """Load a data set once: does nothing (False) when `marker` was loaded
        before. Forgotten shoppers' events are skipped."""
        ...

    def forget_user(self, user_id: str, now: int | None = None) -> int:
        """Remove the shopper's events (reviews, category and item counts with
        them) atomically, and record the tombstone with `now` (default the
        wall clock). Returns how many events were removed: 0 when there were
        none, so calling it again is harmless."""
        ...

    def forgotten_at(self, user_id: str) -> int | None:
        """When the shopper was last forgotten (unix seconds), or None."""
        ...

    def meta(self, key: str) -> str | None:
        ...

    def user_events(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        """The shopper's events, oldest first; with `limit`, only the most recent ones.
        Review texts and idempotency keys are not returned."""
        ...

    def user_reviews(self, user_id: str, limit: int) -> list[StoredEvent]:
        """The shopper's most recent `limit` events that carry a review text,
        oldest first, with the text."""
        ...

    def user_summary(self, user_id: str) -> tuple[int, dict[str, int], list[str]]:
        """(event count, events per category, every item seen, most recent first)."""
        ...

    def item_counts(self) -> list[tuple[str, str, int]]:
        """(item_id, category, events) for every item with events."""
        ...

    def user_items(self) -> Iterator[tuple[str, str, str]]:
        """(user_id, item_id, category) once per shopper and item they have
        events on: the baskets co-purchases are counted from."""
        ...

    def count(self) -> int:
        ...

    def user_version(self, user_id: str) -> int | None:
        """A number that moves whenever the shopper's events change, through
        any process; None where only this process writes (SQLite), whose
        cache is dropped by its own ingest."""
        ...

    def shared_signals(self):
        """(popularity, co-purchases) kept by the store as events are
        appended and read from it, the same for every process sharing it
        (Redis); None where the caller counts them in memory (SQLite)."""
        ...

    def record_exposures(self, exposures: Sequence[StoredExposure]) -> list[bool]:
        """Store A/B exposures, durable once it returns. Per exposure, whether
        it was new (False: its exposure_id was stored before, or it is a
        forgotten shopper's from before the forgetting). forget_user()
        removes a shopper's exposures with their events."""
        ...

    def exposures(self, since: int | None = None) -> Iterator[StoredExposure]:
        """Every stored exposure (shown at or after `since`), in no promised order."""
        ...

    def close(self) -> None:
        ...
