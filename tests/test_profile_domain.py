import threading

import numpy as np
import pytest

from recsys_core.errors import InvalidArgument, NotFound
from recsys_core.signals.interests import DriftSettings
from services.profile.interests import event_weight, interest_vector
from services.profile.popularity import Popularity
from services.profile.profiles import IncomingEvent, ItemInfo, ProfileBook
from recsys_core.store.events import PURCHASE, RATING, REVIEW, VIEW, StoredEvent


def event(item, type_=PURCHASE, rating=None, user="u"):
    return StoredEvent(user_id=user, item_id=item, category="c", type=type_, ts=None, rating=rating)


BASIS = {name: vector for name, vector in zip("abcd", np.eye(4, dtype=np.float32))}


def test_recent_events_weigh_more_in_the_short_term_vector():
    events = [event("a"), event("a"), event("b")]  # b is the most recent
    long_term = interest_vector(events, BASIS, decay=0.0)
    short_term = interest_vector(events, BASIS, decay=2.0)
    assert long_term[0] > long_term[1]
    assert short_term[1] > short_term[0]
    assert np.linalg.norm(short_term) == pytest.approx(1.0)


def test_a_bad_rating_pushes_away_and_views_count_less():
    assert event_weight(event("a", RATING, rating=1)) < 0
    assert 0 < event_weight(event("a", VIEW)) < event_weight(event("a", PURCHASE))
    vector = interest_vector([event("a"), event("b", RATING, rating=1)], BASIS, decay=0.0)
    assert vector[0] > 0 > vector[1]


def test_no_usable_evidence_gives_no_vector():
    assert interest_vector([event("zzz")], BASIS, decay=0.1) is None
    assert interest_vector([event("a", RATING, rating=1)], BASIS, decay=0.1) is None


def test_popularity_ranks_interleaves_categories_and_excludes():
    popularity = Popularity()
    popularity.add_many([("x1", "X", 5), ("x2", "X", 3), ("y1", "Y", 4), ("y2", "Y", 1)])
    assert [i for i, _, _ in popularity.top(3)] == ["x1", "y1", "x2"]
    assert [i for i, _, _ in popularity.top(2, ["Y"])] == ["y1", "y2"]
    assert [i for i, _, _ in popularity.top(3, ["X", "Y"], exclude=["x1"])] == ["y1", "x2", "y2"]
    popularity.add("y2", "Y", 10)
    assert popularity.top(1)[0] == ("y2", "Y", 11)
    assert popularity.counts(["x1", "nope"]) == [5, 0] and popularity.max_count() == 11


@pytest.mark.parametrize("seed", range(4))
def test_popularity_kept_ranked_as_events_arrive_answers_as_a_fresh_sort(seed):
    """Items move within the cached rankings on each event (new items, new
    categories, an item changing category, ties by id); a Popularity built
    from the same counts in one go sorts from scratch."""
    import random

    rng = random.Random(seed)
    items = [f"i{n}" for n in range(25)]
    categories = ["A", "B", "C", "D"]
    history = [(item_id, rng.choice(categories[:2]), rng.randint(1, 4)) for item_id in items[:10]]
    kept = Popularity()
    kept.add_many(history)
    kept.max_count()  # ranked from here on
    for _ in range(150):
        row = (rng.choice(items), rng.choice(categories), rng.randint(1, 3))
        kept.add(*row)
        history.append(row)
        fresh = Popularity()
        fresh.add_many(history)
        asked = rng.sample(categories + ["Z"], rng.randint(0, 2))
        exclude = rng.sample(items, 3)
        assert kept.top(5, asked, exclude) == fresh.top(5, asked, exclude)
        assert kept.top(30) == fresh.top(30)
        assert kept.max_count() == fresh.max_count() and kept.categories() == fresh.categories()


# -- the event stores: every test runs once on SQLite, once on Redis -------------


def test_store_keeps_order_idempotency_and_survives_reopening(open_event_store):
    store = open_event_store()
    keyed = StoredEvent("u", "b", "c", PURCHASE, 10, idempotency_key="k")
    assert store.append([event("a"), keyed]) == [True, True]
    assert store.append([keyed]) == [False]
    store.close()
    reopened = open_event_store()
    assert [e.item_id for e in reopened.user_events("u")] == ["a", "b"]
    assert [e.item_id for e in reopened.user_events("u", limit=1)] == ["b"]
    assert reopened.user_summary("u") == (2, {"c": 2}, ["b", "a"])


def test_store_reads_back_what_was_appended(event_store):
    events = [
        StoredEvent("u1", "a", "Beauty", RATING, 100, rating=4.5, review="nice", idempotency_key="k1"),
        StoredEvent("u2", "a", "Beauty", VIEW, 101),
        StoredEvent("u1", "b", "Toys", PURCHASE, None),
        StoredEvent("u1", "a", "Beauty", VIEW, 103),
        StoredEvent("u1", "b", "Toys", PURCHASE, 104, idempotency_key="k1"),  # repeats k1 within the batch
    ]
    assert event_store.append(events) == [True, True, True, True, False]
    assert event_store.append([StoredEvent("u2", "ü-ñ", "Toys", VIEW, 105)]) == [True]
    # What is read back carries neither review nor idempotency key, as from every store.
    assert event_store.user_events("u1") == [
        StoredEvent("u1", "a", "Beauty", RATING, 100, 4.5),
        StoredEvent("u1", "b", "Toys", PURCHASE, None, None),
        StoredEvent("u1", "a", "Beauty", VIEW, 103, None),
    ]
    assert [e.item_id for e in event_store.user_events("u1", limit=2)] == ["b", "a"]
    assert event_store.user_events("u1", limit=0) == [] and event_store.user_events("nobody") == []
    # Seen items, most recently seen first.
    assert event_store.user_summary("u1") == (3, {"Beauty": 2, "Toys": 1}, ["a", "b"])
    assert event_store.user_summary("u2") == (2, {"Beauty": 1, "Toys": 1}, ["ü-ñ", "a"])
    assert event_store.user_summary("nobody") == (0, {}, [])
    assert sorted(event_store.item_counts()) == [("a", "Beauty", 3), ("b", "Toys", 1), ("ü-ñ", "Toys", 1)]
    assert event_store.count() == 5 and event_store.append([]) == []


def test_store_keeps_money_order_and_review_texts(event_store):
    events = [
        StoredEvent("u", "a", "Retail", PURCHASE, 100, amount=12.5, order_id="536365"),
        StoredEvent("u", "b", "Retail", PURCHASE, 100, amount=-3.0, order_id="C536379"),
        StoredEvent("u", "c", "Beauty", REVIEW, 101, rating=1.0, review="smells awful"),
        StoredEvent("u", "d", "Beauty", REVIEW, 102, rating=5.0, review="lovely scent"),
        StoredEvent("v", "d", "Beauty", REVIEW, 103, rating=4.0, review="someone else's"),
    ]
    assert event_store.append(events) == [True] * 5
    read = event_store.user_events("u")
    assert [(e.amount, e.order_id) for e in read] == [(12.5, "536365"), (-3.0, "C536379"), (None, None), (None, None)]
    assert [(e.item_id, e.review) for e in event_store.user_reviews("u", limit=10)] == [
        ("c", "smells awful"), ("d", "lovely scent")
    ]
    assert [e.item_id for e in event_store.user_reviews("u", limit=1)] == ["d"]
    assert event_store.user_reviews("nobody", limit=5) == []


def test_bulk_load_happens_once_per_marker(event_store):
    assert event_store.bulk_load([event("a"), event("b")], total=2, marker="m", show_progress=False)
    assert not event_store.bulk_load([event("a")], total=1, marker="m", show_progress=False)
    assert event_store.count() == 2 and event_store.meta("loaded:m") == "2"
    assert event_store.bulk_load([], total=0, marker="empty", show_progress=False)
    assert event_store.meta("loaded:empty") == "0" and event_store.meta("nothing") is None


def test_an_interrupted_bulk_load_loads_each_event_once_when_run_again(open_event_store, monkeypatch):
    """SQLite rolls the load back; Redis keeps whole chunks and resumes after them."""
    import recsys_core.store.redis_store as redis_store

    monkeypatch.setattr(redis_store, "BULK_CHUNK", 3)
    events = [event(f"i{n}", user=f"u{n % 3}") for n in range(10)]

    def failing_after(n):
        for e in events[:n]:
            yield e
        raise OSError("the data file went away")

    store = open_event_store()
    with pytest.raises(OSError):
        store.bulk_load(failing_after(7), total=10, marker="m", show_progress=False)
    assert store.meta("loaded:m") is None
    assert store.count() in (0, 6), "nothing, or whole chunks"
    assert open_event_store().bulk_load(iter(events), total=10, marker="m", show_progress=False)
    assert store.count() == 10 and store.meta("loaded:m") == "10"
    assert sorted(i for i, _, _ in store.item_counts()) == sorted(e.item_id for e in events)
    assert [e.item_id for e in store.user_events("u1")] == ["i1", "i4", "i7"]


def test_concurrent_appends_of_one_key_store_it_once(open_event_store):
    """Several writers, each on its own store handle, send the same keyed
    events at the same moment: each key is stored exactly once."""
    writers, rounds = 4, 15
    stores = [open_event_store() for _ in range(writers)]
    barrier = threading.Barrier(writers)
    results = [[] for _ in range(writers)]

    def write(w):
        for r in range(rounds):
            batch = [StoredEvent("same", f"item{r}", "c", VIEW, r, idempotency_key=f"key-{r}"),
                     StoredEvent(f"writer{w}", f"item{r}", "c", VIEW, r, idempotency_key=f"key-{w}-{r}")]
            barrier.wait(10)
            results[w].append(stores[w].append(batch))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for r in range(rounds):
        shared = [results[w][r][0] for w in range(writers)]
        assert shared.count(True) == 1, f"round {r}: key-{r} stored {shared.count(True)} times"
        assert all(results[w][r][1] for w in range(writers))
    store = stores[0]
    assert store.user_summary("same")[0] == rounds
    assert [e.item_id for e in store.user_events("same")] == [f"item{r}" for r in range(rounds)]
    assert store.count() == rounds * (writers + 1)


class CatalogueOf:
    """The profile book's view of the embedding service, over a fixed set."""

    def __init__(self, items):
        self.items = items
        self.calls = 0

    def lookup(self, item_ids, timeout):
        self.calls += 1
        return {i: self.items[i] for i in item_ids if i in self.items}


@pytest.fixture
def book(event_store):
    items = {name: ItemInfo("C", vector) for name, vector in BASIS.items()}
    return ProfileBook(event_store, CatalogueOf(items), 200, 10, 100,
                       drift_settings=DriftSettings(long_decay=0.05, short_decay=0.5))


def incoming(item, user="u", type_=PURCHASE, **kw):
    fields = dict(user_id=user, item_id=item, type=type_, timestamp=0, rating=0.0, review_text="", idempotency_key="")
    fields.update(kw)
    return IncomingEvent(**fields)


def test_book_ingest_updates_profile_and_popularity(book):
    assert not book.profile("u", 1.0).known
    assert book.ingest([incoming("a"), incoming("b")], 1.0) == (2, 0)
    profile = book.profile("u", 1.0)
    assert profile.known and profile.event_count == 2 and profile.recent[0].item_id == "b"
    book.ingest([incoming("c")], 1.0)
    assert book.profile("u", 1.0).recent[0].item_id == "c", "ingest invalidates the cached profile"
    assert book.popular(2, [], []) == [("a", "C", 1), ("b", "C", 1)]


def test_book_counts_a_resent_event_once(book):
    keyed = incoming("a", idempotency_key="order-1")
    assert book.ingest([keyed, incoming("b", idempotency_key="order-2")], 1.0) == (2, 0)
    assert book.ingest([keyed, incoming("c", idempotency_key="order-3")], 1.0) == (1, 1)
    assert book.profile("u", 1.0).event_count == 3
    assert book.item_popularity(["a", "b", "c"])[0] == [1, 1, 1], "a duplicate adds no popularity"


def test_book_refuses_bad_batches_whole(book):
    with pytest.raises(NotFound, match=r"events\[1\].item_id"):
        book.ingest([incoming("a"), incoming("missing")], 1.0)
    with pytest.raises(InvalidArgument, match="events"):
        book.ingest([incoming("a")] * 11, 1.0)
    assert book.store.count() == 0
    with pytest.raises(InvalidArgument, match="categories"):
        book.popular(3, ["nope"], [])
    for bad in (float("nan"), float("inf"), 2e9):
        with pytest.raises(InvalidArgument, match=r"events\[0\].amount"):
            book.ingest([incoming("a", amount=bad)], 1.0)
    with pytest.raises(InvalidArgument, match=r"events\[0\].order_id"):
        book.ingest([incoming("a", order_id="x" * 200)], 1.0)
    assert book.store.count() == 0


def test_book_stores_what_was_spent_and_on_which_order(book):
    assert book.ingest([incoming("a", amount=15.3, order_id="536365"), incoming("b", amount=-2.5, order_id="C1")], 1.0)
    stored = book.store.user_events("u")
    assert [(e.amount, e.order_id) for e in stored] == [(15.3, "536365"), (-2.5, "C1")]


def test_a_store_written_before_events_carried_money_opens_and_keeps_its_events(tmp_path):
    import sqlite3

    from recsys_core.store.sqlite_store import SQLiteEventStore

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,"
        " category TEXT NOT NULL, type INTEGER NOT NULL, ts INTEGER, rating REAL, review TEXT,"
        " idempotency_key TEXT UNIQUE);"
        "INSERT INTO events (user_id, item_id, category, type, ts) VALUES ('u', 'a', 'c', 2, 100);"
    )
    old.commit()
    old.close()
    store = SQLiteEventStore(path)
    assert store.user_events("u") == [StoredEvent("u", "a", "c", PURCHASE, 100)]
    assert store.append([StoredEvent("u", "b", "c", PURCHASE, 101, amount=9.5, order_id="o1")]) == [True]
    assert [(e.item_id, e.amount, e.order_id) for e in store.user_events("u")] == [("a", None, None), ("b", 9.5, "o1")]
    store.close()


def test_data_sets_load_once_also_into_stores_of_earlier_versions(tmp_path):
    import hashlib

    from recsys_core.data import paths
    from services.profile.server import load_dataset_events, load_retail_events
    from recsys_core.store.sqlite_store import SQLiteEventStore

    store = SQLiteEventStore(tmp_path / "events.sqlite3")
    # Earlier versions marked the bundled set by its interactions file's digest.
    digest = hashlib.sha256((paths.BUNDLED_DATA_DIR / "interactions.csv.gz").read_bytes()).hexdigest()[:16]
    clocks = load_dataset_events(store, paths.BUNDLED_DATA_DIR)
    loaded = store.count()
    assert store.meta(f"loaded:interactions.csv.gz:{digest}") == str(loaded)
    assert clocks["Beauty"] > 1_300_000_000 and "Toys_and_Games" not in clocks  # Toys has no dates
    load_retail_events(store, paths.BUNDLED_RETAIL_DIR)
    with_retail = store.count()
    assert with_retail > loaded
    load_dataset_events(store, paths.BUNDLED_DATA_DIR)
    load_retail_events(store, paths.BUNDLED_RETAIL_DIR)
    assert store.count() == with_retail
    store.close()


def test_a_restart_finds_loaded_data_sets_without_reading_their_files(tmp_path, monkeypatch):
    from recsys_core.data import paths, shopping
    from recsys_core.store.sqlite_store import SQLiteEventStore
    from services.profile import server

    known = server.LoadedSets(tmp_path / "notes")
    store = SQLiteEventStore(tmp_path / "events.sqlite3")
    clocks = server.load_dataset_events(store, paths.BUNDLED_DATA_DIR, known)
    retail = server.load_retail_events(store, paths.BUNDLED_RETAIL_DIR, known)
    loaded = store.count()

    def no_reading(*_args, **_kwargs):
        raise AssertionError("a loaded data set's files were read again")

    with monkeypatch.context() as patched:
        patched.setattr(shopping, "load_interactions", no_reading)
        patched.setattr("recsys_core.data.retail.retail_items_and_events", no_reading)
        assert server.load_dataset_events(store, paths.BUNDLED_DATA_DIR, known) == clocks
        assert server.load_retail_events(store, paths.BUNDLED_RETAIL_DIR, known) == retail
    assert store.count() == loaded
    store.close()
    # The notes are only a hint: a store without the data set (a new one) is loaded from the files.
    empty = SQLiteEventStore(tmp_path / "new.sqlite3")
    assert server.load_dataset_events(empty, paths.BUNDLED_DATA_DIR, known) == clocks
    assert empty.count() > 0
    empty.close()


def test_a_new_encoder_version_in_the_catalogue_drops_cached_items_and_profiles(book, monkeypatch):
    """A promotion swaps the embedding service's vectors (hot swap): the
    profile's cached items and the interests made of them must follow
    within the check interval, never mixing two versions' vectors."""
    from services.profile import profiles

    monkeypatch.setattr(profiles, "CATALOGUE_VERSION_CHECK_SECONDS", 0.0)
    book.ingest([incoming("a"), incoming("b")], 1.0)
    before = book.profile("u", 1.0)
    assert np.argmax(before.long_term) in (0, 1)
    # Version 2 maps every item to another axis: a to d, b to c.
    book.items.items = {name: ItemInfo("C", BASIS[new], model_version="sequence/2")
                        for name, new in zip("abcd", "dcba")}
    after = book.profile("u", 1.0)
    assert after is not before
    # Which version made them travels with the vectors (retrieval searches that version's index).
    assert before.vectors_model_version == "" and after.vectors_model_version == "sequence/2"
    assert set(np.flatnonzero(after.long_term > 0.1)) == {2, 3}, after.long_term
    # And a read of items partly cached (c) and partly not fetches all from the new version.
    book.items.items["e"] = ItemInfo("C", BASIS["a"], model_version="sequence/2")
    book.ingest([incoming("c", user="w"), incoming("e", user="w")], 1.0)
    assert set(np.flatnonzero(book.profile("w", 1.0).long_term > 0.1)) == {0, 1}
