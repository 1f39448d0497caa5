"""The profile service's domain: ingest events, answer profiles and popularity."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from recsys_core.signals.copurchase import CoPurchases
from recsys_core.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable, check_id_characters
from recsys_core.signals.reviews import Preferences, ReviewOpinions, opinions_of_reviews, preferences
from recsys_core.signals.interests import NO_DRIFT, ClusterSettings, Drift, DriftSettings
from services.profile.interests import Interest, interest_vector, read_interests
from services.profile.user_tower import ShopperVectors, shopper_interest
from recsys_core.signals.value import ValueForecast, ValueModel
from services.profile.popularity import Popularity
from recsys_core.store.events import PURCHASE, RATING, REVIEW, VIEW, EventStore, StoredEvent

log = logging.getLogger(__name__)

MAX_ID_CHARS = 128
MAX_REVIEW_CHARS = 20_000
MAX_IDEMPOTENCY_KEY_CHARS = 256
DEFAULT_HISTORY = 50
MAX_HISTORY = 1000
MAX_POPULAR_K = 1000
# A shopper's most recent distinct items that co-purchases are read from.
CO_PURCHASE_HISTORY = 100
# Items one request may leave out (a shopper's seen items plus context).
MAX_EXCLUDED = 100_000
MAX_CATEGORIES = 100
# The latest reviews that shape a profile's preferences.
MAX_REVIEWS_READ = 50
MAX_OPINIONS_CACHED = 100_000
# Larger than any real order line; beyond it the number is a unit mix-up.
MAX_AMOUNT = 1e9
# Clocks drift; an event "from the future" beyond this is a client bug.
MAX_FUTURE_SECONDS = 24 * 3600
# A cached profile's value forecast is remade once its forecast time is this
# far behind: churn over 90 days does not move in less.
VALUE_REFRESH_SECONDS = 600
EVENT_TYPES = (VIEW, PURCHASE, RATING, REVIEW)


@dataclass(frozen=True)
class ItemInfo:
    category: str
    vector: np.ndarray
    title: str = ""
    category_path: str = ""
    # The encoder version that made `vector` (GetItemsResponse.model_version;
    # "" without a model registry): vectors of two versions are never mixed.
    model_version: str = ""


# Locks that keep ingestion and forgetting of one shopper apart, by a hash of
# the id: a few, so that unrelated shoppers' batches rarely wait on each other.
SHOPPER_LOCKS = 64


@dataclass(frozen=True)
class Forgotten:
    """What forgetting a shopper removed."""

    user_id: str
    events: int
    items: int


@dataclass(frozen=True)
class ShopperSignals:
    profile: "Profile"
    co_purchased: list[tuple[str, str, int]]  # (item_id, category, shoppers)
    popular: list[tuple[str, str, int]]  # (item_id, category, events)
    popular_titles: list[str]  # parallel to popular


class ItemLookup(Protocol):
    """Where the profile learns about items (the embedding service)."""

    def lookup(self, item_ids: Sequence[str], timeout: float) -> dict[str, ItemInfo]:
        """What the catalogue knows of each id; unknown ids are absent."""


@dataclass(frozen=True)
class IncomingEvent:
    user_id: str
    item_id: str
    type: int
    timestamp: int
    rating: float
    review_text: str
    idempotency_key: str
    amount: float = 0.0
    order_id: str = ""


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
    drift: Drift = NO_DRIFT
    interests: list[Interest] = field(default_factory=list)
    interest_categories: dict[str, float] = field(default_factory=dict)
    # The trained user tower's shopper vector, when a model is served.
    model_interest: np.ndarray | None = None
    value: ValueForecast | None = None
    # The value model `value` was made with (its version; None: none was
    # served): a cached profile made with another is forecast again.
    valued_by: str | None = None
    preferences: Preferences | None = None
    # The store's user_version() when the profile was read: a cached profile
    # whose shopper changed through another replica is read again.
    version: int | None = None
    # The encoder version whose item vectors made the interests (ItemInfo.model_version;
    # "" also when the read saw two), so retrieval searches that version's index.
    vectors_model_version: str = ""


def check_user_id(user_id: str, field_name: str = "user_id") -> str:
    if not user_id or not user_id.strip():
        raise InvalidArgument(field_name, "must not be empty")
    if len(user_id) > MAX_ID_CHARS:
        raise InvalidArgument(field_name, f"is {len(user_id)} characters, the limit is {MAX_ID_CHARS}")
    return check_id_characters(user_id, field_name)


class ItemCache:
    """Items fetched from the catalogue, bounded LRU."""

    def __init__(self, capacity: int = 500_000):
        self.capacity = capacity
        self._entries: OrderedDict[str, ItemInfo] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, item_ids: Sequence[str]) -> tuple[dict[str, ItemInfo], list[str]]:
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

    def put_many(self, entries: dict[str, ItemInfo]) -> None:
        with self._lock:
            self._entries.update(entries)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def newest_id(self) -> str | None:
        with self._lock:
            return next(reversed(self._entries), None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# How often a profile read asks the catalogue which encoder version it serves
# (one GetItems of one item): a promotion swaps the embedding service's
# vectors (docs/operations.md, "Hot swap"), and the cached items and
# profiles made of the old ones must go within this long.
CATALOGUE_VERSION_CHECK_SECONDS = 5.0


class ProfileBook:
    def __init__(
        self,
        store: EventStore,
        items: ItemLookup,
        interest_window: int,
        max_events_per_request: int,
        profile_cache_size: int,
        *,
        drift_settings: DriftSettings = DriftSettings(),
        cluster_settings: ClusterSettings = ClusterSettings(),
        user_tower: ShopperVectors | None = None,
        value_model: ValueModel | None = None,
        review_classifier: Callable[..., np.ndarray] | None = None,
        value_clock: str = "data",
        category_clocks: dict[str, int] | None = None,
    ):
        self.store = store
        self.items = items
        self.interest_window = interest_window
        self.max_events_per_request = max_events_per_request
        self.drift_settings = drift_settings
        self.cluster_settings = cluster_settings
        self.user_tower = user_tower
        self.value_model = value_model
        self.value_model_swaps = 0
        # P(positive) of review texts (the Triton-served review_sentiment
        # model); None: reviews are stored but not read.
        self.review_classifier = review_classifier
        self._opinions: OrderedDict[str, ReviewOpinions] = OrderedDict()
        self.value_clock = value_clock
        # Latest event time per category: the "now" of a historical data set.
        self._clocks = dict(category_clocks or {})
        shared = store.shared_signals()
        # With a shared store (Redis) the counts live in it, kept by append()
        # and read by every replica alike; otherwise (SQLite, one process)
        # they are counted here, in memory, from the store at start.
        self._count_locally = shared is None
        if shared is None:
            self.popularity = Popularity()
            self.popularity.add_many(store.item_counts())
            self.co_purchases = CoPurchases()
            self.co_purchases.add_many(store.user_items())
        else:
            self.popularity, self.co_purchases = shared
        self.item_cache = ItemCache()
        # The encoder version of the cached items' vectors, and when the
        # catalogue was last asked for its own.
        self._items_version = ""
        self._version_checked_at = time.monotonic()
        self._profiles: OrderedDict[str, Profile] = OrderedDict()
        self._profile_cache_size = profile_cache_size
        self._cache_lock = threading.Lock()
        # Bumped by every forget: a profile read from the store while a
        # shopper was being forgotten is not cached (it may be theirs).
        self._forgets = 0
        self._shopper_locks = [threading.Lock() for _ in range(SHOPPER_LOCKS)]

    def _locks_of(self, user_ids) -> list[threading.Lock]:
        # In one order, so two batches never wait on each other's locks.
        return [self._shopper_locks[n] for n in sorted({hash(u) % SHOPPER_LOCKS for u in user_ids})]

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
            check_id_characters(event.item_id, f"events[{i}].item_id")
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
            if not np.isfinite(event.amount) or abs(event.amount) > MAX_AMOUNT:
                raise InvalidArgument(f"events[{i}].amount", f"must be a finite amount under {MAX_AMOUNT:g}")
            if len(event.order_id) > MAX_ID_CHARS:
                raise InvalidArgument(f"events[{i}].order_id", f"is over {MAX_ID_CHARS} characters")
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
        rows = [
            StoredEvent(
                user_id=e.user_id,
                item_id=e.item_id,
                category=known[e.item_id].category,
                type=e.type,
                ts=e.timestamp or int(now),
                rating=e.rating or None,
                review=e.review_text or None,
                idempotency_key=e.idempotency_key or None,
                amount=e.amount or None,
                order_id=e.order_id or None,
            )
            for e in events
        ]
        locks = self._locks_of(e.user_id for e in events)
        for lock in locks:
            lock.acquire()
        try:
            # The store and the counts in memory change together for a shopper
            # being forgotten meanwhile (forget holds their lock).
            stored = self.store.append(rows)
            new_rows = [row for row, is_new in zip(rows, stored) if is_new]
            if self._count_locally:
                for row in new_rows:
                    self.popularity.add(row.item_id, row.category)
                    self.co_purchases.add(row.user_id, row.item_id, row.category)
        finally:
            for lock in reversed(locks):
                lock.release()
        with self._cache_lock:
            for row in new_rows:
                self._clocks[row.category] = max(self._clocks.get(row.category, row.ts), row.ts)
        with self._cache_lock:
            for user_id in {e.user_id for e in events}:
                self._profiles.pop(user_id, None)
        accepted = sum(stored)
        return accepted, len(stored) - accepted

    # -- forgetting ---------------------------------------------------------

    def forget(self, user_id: str) -> Forgotten:
        """Removes the shopper's events from the store (with a tombstone, so
        no bulk load brings them back) and everything in memory made of them:
        their share of item popularity and co-purchase counts, their cached
        profile and the cached readings of their reviews. Idempotent: a
        shopper with no events left gives Forgotten(events=0)."""
        check_user_id(user_id)
        [lock] = self._locks_of([user_id])
        with lock:
            events = self.store.user_events(user_id)
            reviews = self.store.user_reviews(user_id, len(events)) if events else []
            with self._cache_lock:
                self._forgets += 1
            removed = self.store.forget_user(user_id)
            per_item: dict[str, int] = {}
            for event in events:
                per_item[event.item_id] = per_item.get(event.item_id, 0) + 1
            # A shared store (Redis) takes the shopper's share off its own
            # counts within forget_user; only counts kept here are ours to fix.
            if self._count_locally:
                for item_id, count in per_item.items():
                    self.popularity.remove(item_id, count)
                self.co_purchases.remove_user(user_id)
            with self._cache_lock:
                self._forgets += 1
                self._profiles.pop(user_id, None)
                for review in reviews:
                    self._opinions.pop(review.review, None)
        if removed != len(events):
            # Under the shopper's lock nothing else writes their events, so
            # only another process on the same store (a second replica) can
            # make these differ; the counts in memory followed what was read.
            log.warning("forgetting a shopper: read %d events, the store removed %d", len(events), removed)
        return Forgotten(user_id=user_id, events=removed, items=len(per_item))

    # -- reading ------------------------------------------------------------

    def _item_info(self, item_ids: Sequence[str], timeout: float) -> dict[str, ItemInfo]:
        found, missing = self.item_cache.get_many(item_ids)
        if missing:
            fetched = self.items.lookup(missing, timeout)
            if self._follow_version(fetched):
                # The cached half was the old encoder's: all of them again.
                found, fetched = {}, self.items.lookup(list(item_ids), timeout)
                self._follow_version(fetched)
            self.item_cache.put_many(fetched)
            found.update(fetched)
        return found

    def _follow_version(self, fetched: dict[str, ItemInfo]) -> bool:
        """Whether `fetched` came from another encoder version than the
        cached items; if so the cached items and profiles (whose interests
        are mixes of item vectors) are dropped, and profiles being made
        meanwhile are not cached."""
        versions = {info.model_version for info in fetched.values()}
        if not versions or versions == {self._items_version}:
            return False
        with self._cache_lock:
            self.item_cache.clear()
            self._profiles.clear()
            self._forgets += 1
            # Two versions in one answer (a swap during it): the next fetch settles it.
            self._items_version = versions.pop() if len(versions) == 1 else None
        log.info("the catalogue's vectors are now %s's: cached items and profiles dropped",
                 self._items_version or "another version")
        return True

    def _check_catalogue_version(self, timeout: float) -> None:
        """At most every CATALOGUE_VERSION_CHECK_SECONDS: fetch the newest
        cached item again to see whether its vector changed version (cached
        profiles would otherwise never ask). A catalogue that does not answer
        costs nothing here: the reads that need it say so."""
        now = time.monotonic()
        if now - self._version_checked_at < CATALOGUE_VERSION_CHECK_SECONDS:
            return
        self._version_checked_at = now
        probe = self.item_cache.newest_id()
        if probe is None:
            return
        try:
            self._follow_version(self.items.lookup([probe], timeout))
        except Exception as error:  # noqa: BLE001 - the next check tries again
            log.debug("catalogue version check failed: %s", error)

    def forecast_time(self, categories) -> int:
        """When a shopper's value is forecast: the wall clock, or where the
        data of their categories ends (value_clock "data")."""
        if self.value_clock == "now":
            return int(time.time())
        with self._cache_lock:
            ends = [self._clocks[c] for c in categories if c in self._clocks]
        return max(ends) if ends else int(time.time())

    def use_value_model(self, model: ValueModel | None) -> None:
        """Serve `model` from the next read on (a promoted version swapped in,
        services/profile/server.py): one attribute replaced, so a read uses
        the old model or the new; cached profiles are forecast again when read."""
        self.value_model = model
        self.value_model_swaps += 1

    def _value(self, user_id: str, window: list[StoredEvent], count: int, categories,
               model: ValueModel | None) -> ValueForecast | None:
        if model is None:
            return None
        # Lifetime value reads the whole history, not only the interest window.
        events = window if count <= len(window) else self.store.user_events(user_id)
        return model.forecast(events, self.forecast_time(categories))

    def _with_current_value(self, cached: Profile) -> Profile:
        """The cached profile, its value forecast remade once the forecast
        time has moved on (other shoppers' events move a category's clock,
        and the wall clock moves by itself, without touching this profile)
        or another value model serves."""
        model = self.value_model
        version = None if model is None else model.version
        if cached.valued_by == version and (
                cached.value is None
                or self.forecast_time(cached.categories) - cached.value.as_of < VALUE_REFRESH_SECONDS):
            return cached
        # The cached window is the store's: any ingest of this shopper drops the profile.
        window = list(reversed(cached.recent))
        fresh = replace(cached, value=self._value(cached.user_id, window, cached.event_count, cached.categories, model),
                        valued_by=version)
        with self._cache_lock:
            # Unless an ingest dropped it meanwhile: then the next read remakes it all.
            if self._profiles.get(cached.user_id) is cached:
                self._profiles[cached.user_id] = fresh
        return fresh

    def _read_reviews(self, user_id: str, timeout: float) -> tuple[Preferences | None, dict]:
        """What the shopper's latest reviews say, and P(positive) of each by
        (item_id, ts) for the evidence weights. A review is classified once;
        when the classifier is down the profile answers without preferences."""
        reviews = self.store.user_reviews(user_id, MAX_REVIEWS_READ)
        if not reviews or self.review_classifier is None:
            return None, {}
        with self._cache_lock:
            known = {e.review: self._opinions[e.review] for e in reviews if e.review in self._opinions}
        missing = list(dict.fromkeys(e.review for e in reviews if e.review not in known))
        if missing:
            try:
                read = opinions_of_reviews(missing, lambda texts: self.review_classifier(texts, timeout))
            except (Unavailable, DeadlineExceeded) as error:
                log.warning("reviews of %s not read: %s", user_id, error)
                return None, {}
            known.update(zip(missing, read))
            with self._cache_lock:
                self._opinions.update(zip(missing, read))
                while len(self._opinions) > MAX_OPINIONS_CACHED:
                    self._opinions.popitem(last=False)
        reviewed = [(e.item_id, known[e.review]) for e in reviews]
        sentiment = {(e.item_id, e.ts): known[e.review].positive_probability for e in reviews}
        return preferences(reviewed), sentiment

    def profile(self, user_id: str, timeout: float) -> Profile:
        check_user_id(user_id)
        self._check_catalogue_version(timeout)
        with self._cache_lock:
            cached = self._profiles.get(user_id)
            if cached is not None:
                self._profiles.move_to_end(user_id)
            forgets = self._forgets
        # Read before the events: a write in between makes the next read fresh.
        version = self.store.user_version(user_id)
        if cached is not None and cached.version == version:
            return self._with_current_value(cached)
        events = self.store.user_events(user_id, limit=self.interest_window)
        if not events:
            return Profile(user_id=user_id, known=False)
        value_model = self.value_model  # once: a swap meanwhile is seen by the next read
        count, per_category, seen = self.store.user_summary(user_id)
        info = self._item_info(list(dict.fromkeys(e.item_id for e in events)), timeout)
        vectors = {item_id: item.vector for item_id, item in info.items()}
        made_by = {item.model_version for item in info.values()}
        review_preferences, sentiment = self._read_reviews(user_id, timeout)
        reading = read_interests(events, info, sentiment, self.drift_settings, self.cluster_settings)
        profile = Profile(
            user_id=user_id,
            known=True,
            event_count=count,
            long_term=interest_vector(events, vectors, self.drift_settings.long_decay, sentiment),
            short_term=interest_vector(events, vectors, self.drift_settings.short_decay, sentiment),
            recent=list(reversed(events)),
            seen_item_ids=seen,
            categories=per_category,
            drift=reading.drift,
            interests=reading.interests,
            interest_categories=reading.categories,
            model_interest=shopper_interest([e.item_id for e in events], vectors, self.user_tower, timeout),
            value=self._value(user_id, events, count, per_category, value_model),
            valued_by=None if value_model is None else value_model.version,
            preferences=review_preferences,
            version=version,
            vectors_model_version=made_by.pop() if len(made_by) == 1 else "",
        )
        with self._cache_lock:
            if self._forgets != forgets:
                return profile  # read while someone was being forgotten: not kept
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

    def co_purchased(self, user_id: str, k: int, categories: Sequence[str], exclude: Sequence[str],
                     anchors: Sequence[str] = (), include_seen: bool = False) -> list[tuple[str, str, int]]:
        """(item_id, category, shoppers), most shared first: what other
        shoppers bought beside this shopper's items (or `anchors`)."""
        check_user_id(user_id)
        if not 1 <= k <= MAX_POPULAR_K:
            raise InvalidArgument("k", f"must be between 1 and {MAX_POPULAR_K}, got {k}")
        if len(anchors) > CO_PURCHASE_HISTORY:
            raise InvalidArgument("anchor_item_ids", f"at most {CO_PURCHASE_HISTORY} items, got {len(anchors)}")
        # Categories are not checked against those with events: a catalogue
        # category nobody has bought in yet simply has no co-purchases.
        _, _, seen = self.store.user_summary(user_id)
        excluded = set(exclude) | (set() if include_seen else set(seen))
        # Ties break by item id so every replica answers alike.
        top = self.co_purchases.most_shared(list(anchors) or seen[:CO_PURCHASE_HISTORY], k, categories,
                                            exclude=excluded, leave_out_user=user_id)
        category_of = self.co_purchases.categories_of([item_id for item_id, _ in top])
        return [(item_id, category_of.get(item_id, ""), shoppers) for item_id, shoppers in top]

    def shopper_signals(self, user_id: str, timeout: Callable[[], float], co_purchase_k: int, categories: Sequence[str],
                        exclude: Sequence[str], anchors: Sequence[str], include_seen: bool,
                        popular_k: int) -> ShopperSignals:
        """What Recommend needs about a shopper in one read: the profile, the
        co-purchases (co_purchase_k 0: none) and, when the profile has no
        vector to retrieve with, the popular items with titles (popular_k 0:
        none). `timeout` gives the time left, read where a lookup is made."""
        for name, value in (("co_purchase_k", co_purchase_k), ("popular_k", popular_k)):
            if not 0 <= value <= MAX_POPULAR_K:
                raise InvalidArgument(name, f"must be between 0 and {MAX_POPULAR_K}, got {value}")
        if len(exclude) > MAX_EXCLUDED:
            raise InvalidArgument("exclude_item_ids", f"at most {MAX_EXCLUDED} items, got {len(exclude)}")
        if len(categories) > MAX_CATEGORIES:
            raise InvalidArgument("categories", f"at most {MAX_CATEGORIES} categories, got {len(categories)}")
        profile = self.profile(user_id, timeout())
        co_purchased = (self.co_purchased(user_id, co_purchase_k, categories, exclude, anchors, include_seen)
                        if co_purchase_k else [])
        popular, titles = [], []
        if popular_k and profile.long_term is None and profile.short_term is None and profile.model_interest is None:
            popular = self.popular(popular_k, categories, exclude)
            try:
                info = self._item_info([item_id for item_id, _, _ in popular], timeout())
            except (Unavailable, DeadlineExceeded) as error:
                # Popular items without titles still beat no answer.
                log.warning("titles of popular items not read: %s", error)
                info = {}
            titles = [info[item_id].title if item_id in info else "" for item_id, _, _ in popular]
        return ShopperSignals(profile, co_purchased, popular, titles)

    def item_popularity(self, item_ids: Sequence[str]) -> tuple[list[int], int]:
        if len(item_ids) > MAX_POPULAR_K * 10:
            raise InvalidArgument("item_ids", f"at most {MAX_POPULAR_K * 10} ids per request")
        return self.popularity.counts_and_max(item_ids)
