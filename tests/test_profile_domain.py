import numpy as np
import pytest

from recsys_core.errors import InvalidArgument, NotFound
from services.profile.interests import event_weight, interest_vector
from services.profile.popularity import Popularity
from services.profile.profiles import IncomingEvent, ProfileBook
from services.profile.store import PURCHASE, RATING, VIEW, SQLiteEventStore, StoredEvent


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


def test_store_keeps_order_idempotency_and_survives_reopening(tmp_path):
    path = tmp_path / "events.sqlite3"
    store = SQLiteEventStore(path)
    keyed = StoredEvent("u", "b", "c", PURCHASE, 10, idempotency_key="k")
    assert store.append([event("a"), keyed]) == [True, True]
    assert store.append([keyed]) == [False]
    store.close()
    reopened = SQLiteEventStore(path)
    assert [e.item_id for e in reopened.user_events("u")] == ["a", "b"]
    assert [e.item_id for e in reopened.user_events("u", limit=1)] == ["b"]
    assert reopened.user_summary("u") == (2, {"c": 2}, ["b", "a"])


def test_bulk_load_happens_once_per_marker(tmp_path):
    store = SQLiteEventStore(tmp_path / "s.sqlite3")
    assert store.bulk_load([event("a"), event("b")], total=2, marker="m", show_progress=False)
    assert not store.bulk_load([event("a")], total=1, marker="m", show_progress=False)
    assert store.count() == 2


class CatalogueOf:
    """The profile book's view of the embedding service, over a fixed set."""

    def __init__(self, items):
        self.items = items
        self.calls = 0

    def lookup(self, item_ids, timeout):
        self.calls += 1
        return {i: self.items[i] for i in item_ids if i in self.items}


@pytest.fixture
def book(tmp_path):
    items = {name: ("C", vector) for name, vector in BASIS.items()}
    return ProfileBook(SQLiteEventStore(tmp_path / "s.sqlite3"), CatalogueOf(items), 0.05, 0.5, 200, 10, 100)


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


def test_book_refuses_bad_batches_whole(book):
    with pytest.raises(NotFound, match=r"events\[1\].item_id"):
        book.ingest([incoming("a"), incoming("missing")], 1.0)
    with pytest.raises(InvalidArgument, match="events"):
        book.ingest([incoming("a")] * 11, 1.0)
    assert book.store.count() == 0
    with pytest.raises(InvalidArgument, match="categories"):
        book.popular(3, ["nope"], [])
