"""The profile service's domain: ingest events, answer profiles and popularity."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from recsys_core.errors import InvalidArgument, NotFound
from services.profile.interests import interest_vector
from services.profile.popularity import Popularity
from services.profile.store import PURCHASE, RATING, REVIEW, VIEW, EventStore, StoredEvent

log = logging.getLogger(__name__)

MAX_ID_CHARS = 128
MAX_REVIEW_CHARS = 20_000
MAX_IDEMPOTENCY_KEY_CHARS = 256
DEFAULT_HISTORY = 50
MAX_HISTORY = 1000
MAX_POPULAR_K = 1000
# Clocks drift; an event "from the future" beyond this is a client bug.
MAX_FUTURE_SECONDS = 24 * 3600
EVENT_TYPES = (VIEW, PURCHASE, RATING, REVIEW)


class ItemLookup(Protocol):
    """Where the profile learns items' categories and embeddings (the embedding service)."""

    def lookup(self, item_ids: Sequence[str], timeout: float) -> dict[str, tuple[str, np.ndarray]]:
        """(category, embedding) of each known id; unknown ids are absent."""


@dataclass(frozen=True)
class IncomingEvent:
    user_id: str
    item_id: str
    type: int
    timestamp: int
    rating: float
    review_text: str
    idempotency_key: str


@dataclass
class Profile:
    user_id: str
    known: bool
    event_count: int = 0
    long_term: np.ndarray | None = None
    short_term: np.ndarray | None = None
    recent: list[StoredEvent] = field(default_factory=list)
    seen_item_ids: list[str] = field(default_factory=list)
    categories: dict[str, int] = field(default_factory=dict)


def check_user_id(user_id: str, field_name: str = "user_id") -> str:
    if not user_id or not user_id.strip():
        raise InvalidArgument(field_name, "must not be empty")
    if len(user_id) > MAX_ID_CHARS:
        raise InvalidArgument(field_name, f"is {len(user_id)} characters, the limit is {MAX_ID_CHARS}")
    return user_id


class VectorCache:
    """Item embeddings fetched from the catalogue, bounded LRU."""

    def __init__(self, capacity: int = 500_000):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, item_ids: Sequence[str]) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
        found, missing = {}, []
        with self._lock:
            for item_id in item_ids:
                entry = self._entries.get(item_id)
                if entry is None:
                    missing.append(item_id)
                else:
                    self._entries.move_to_end(item_id)
                    found[item_id] = entry
        return found, missing

    def put_many(self, entries: dict[str, tuple[str, np.ndarray]]) -> None:
        with self._lock:
            self._entries.update(entries)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


class ProfileBook:
    def __init__(
        self,
        store: EventStore,
        items: ItemLookup,
        long_term_decay: float,
        short_term_decay: float,
        interest_window: int,
        max_events_per_request: int,
        profile_cache_size: int,
    ):
        self.store = store
        self.items = items
        self.long_term_decay = long_term_decay
        self.short_term_decay = short_term_decay
        self.interest_window = interest_window
        self.max_events_per_request = max_events_per_request
        self.popularity = Popularity()
        self.popularity.add_many(store.item_counts())
        self.vectors = VectorCache()
        self._profiles: OrderedDict[str, Profile] = OrderedDict()
        self._profile_cache_size = profile_cache_size
        self._cache_lock = threading.Lock()

    # -- ingestion --------------------------------------------------------

    def validate(self, events: Sequence[IncomingEvent], now: float) -> None:
        if not events:
            raise InvalidArgument("events", "at least one event is required")
        if len(events) > self.max_events_per_request:
            raise InvalidArgument(
                "events", f"at most {self.max_events_per_request} events per request, got {len(events)}"
            )
        for i, event in enumerate(events):
            check_user_id(event.user_id, f"events[{i}].user_id")
            if not event.item_id or len(event.item_id) > MAX_ID_CHARS:
                raise InvalidArgument(f"events[{i}].item_id", f"must be 1..{MAX_ID_CHARS} characters")
            if event.type not in EVENT_TYPES:
                raise InvalidArgument(f"events[{i}].type", "must be VIEW, PURCHASE, RATING or REVIEW")
            if event.timestamp < 0 or event.timestamp > now + MAX_FUTURE_SECONDS:
                raise InvalidArgument(f"events[{i}].timestamp", f"{event.timestamp} is not a plausible unix time")
            if not np.isfinite(event.rating) or not (event.rating == 0 or 1 <= event.rating <= 5):
                raise InvalidArgument(f"events[{i}].rating", "must be 1..5, or 0 when absent")
            if event.type == RATING and event.rating == 0:
                raise InvalidArgument(f"events[{i}].rating", "a RATING event needs a rating of 1..5")
            if len(event.review_text) > MAX_REVIEW_CHARS:
                raise InvalidArgument(f"events[{i}].review_text", f"is over {MAX_REVIEW_CHARS} characters")
            if len(event.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
                raise InvalidArgument(
                    f"events[{i}].idempotency_key", f"is over {MAX_IDEMPOTENCY_KEY_CHARS} characters"
                )

    def ingest(self, events: Sequence[IncomingEvent], timeout: float) -> tuple[int, int]:
        """Validate the whole batch, then store it atomically: either every
        event is accepted or none is. Returns (accepted, duplicates)."""
        now = time.time()
        self.validate(events, now)
        known = self._item_info(list(dict.fromkeys(e.item_id for e in events)), timeout)
        for i, event in enumerate(events):
            if event.item_id not in known:
                raise NotFound(f"events[{i}].item_id: no item {event.item_id!r} in the catalogue")
        stored = self.store.append([
            StoredEvent(
                user_id=e.user_id,
                item_id=e.item_id,
                category=known[e.item_id][0],
                type=e.type,
                ts=e.timestamp or int(now),
                rating=e.rating or None,
                review=e.review_text or None,
                idempotency_key=e.idempotency_key or None,
            )
            for e in events
        ])
        for event, is_new in zip(events, stored):
            if is_new:
                self.popularity.add(event.item_id, known[event.item_id][0])
        with self._cache_lock:
            for user_id in {e.user_id for e in events}:
                self._profiles.pop(user_id, None)
        accepted = sum(stored)
        return accepted, len(stored) - accepted

    # -- reading ------------------------------------------------------------

    def _item_info(self, item_ids: Sequence[str], timeout: float) -> dict[str, tuple[str, np.ndarray]]:
        found, missing = self.vectors.get_many(item_ids)
        if missing:
            fetched = self.items.lookup(missing, timeout)
            self.vectors.put_many(fetched)
            found.update(fetched)
        return found

    def profile(self, user_id: str, timeout: float) -> Profile:
        check_user_id(user_id)
        with self._cache_lock:
            cached = self._profiles.get(user_id)
            if cached is not None:
                self._profiles.move_to_end(user_id)
                return cached
        events = self.store.user_events(user_id, limit=self.interest_window)
        if not events:
            return Profile(user_id=user_id, known=False)
        count, per_category, seen = self.store.user_summary(user_id)
        info = self._item_info(list(dict.fromkeys(e.item_id for e in events)), timeout)
        vectors = {item_id: vector for item_id, (_, vector) in info.items()}
        profile = Profile(
            user_id=user_id,
            known=True,
            event_count=count,
            long_term=interest_vector(events, vectors, self.long_term_decay),
            short_term=interest_vector(events, vectors, self.short_term_decay),
            recent=list(reversed(events)),
            seen_item_ids=seen,
            categories=per_category,
        )
        with self._cache_lock:
            self._profiles[user_id] = profile
            while len(self._profiles) > self._profile_cache_size:
                self._profiles.popitem(last=False)
        return profile

    def popular(self, k: int, categories: Sequence[str], exclude: Sequence[str]) -> list[tuple[str, str, int]]:
        if not 1 <= k <= MAX_POPULAR_K:
            raise InvalidArgument("k", f"must be between 1 and {MAX_POPULAR_K}, got {k}")
        known = self.popularity.categories()
        for name in categories:
            if name not in known:
                raise InvalidArgument("categories", f"unknown category {name!r}; known: {', '.join(sorted(known))}")
        return self.popularity.top(k, categories, exclude)

    def item_popularity(self, item_ids: Sequence[str]) -> tuple[list[int], int]:
        if len(item_ids) > MAX_POPULAR_K * 10:
            raise InvalidArgument("item_ids", f"at most {MAX_POPULAR_K * 10} ids per request")
        return self.popularity.counts(item_ids), self.popularity.max_count()
