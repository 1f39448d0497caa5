"""Cross-category co-purchases: the counts, the profile book's answers over
both stores, the ranking term, and the offline scorer's leave-own-out."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_core.signals.copurchase import CoPurchases
from recsys_core.errors import InvalidArgument
from recsys_core.ranking.scoring import UserVectors, Weights, rank

BASKETS = [
    ("ann", "tent", "Sports"), ("ann", "suncream", "Beauty"),
    ("bob", "tent", "Sports"), ("bob", "suncream", "Beauty"), ("bob", "lipstick", "Beauty"),
    ("cat", "boots", "Sports"), ("cat", "tent", "Sports"),
    ("bob", "tent", "Sports"),  # bought again: still one shopper
]


def test_counts_shoppers_once_per_pair_in_any_category():
    index = CoPurchases()
    index.add_many(BASKETS)
    assert index.related(["tent"]) == {"suncream": 2, "lipstick": 1, "boots": 1}
    assert index.related(["boots"]) == {"tent": 1}
    assert index.related(["tent"], ["Beauty"]) == {"suncream": 2, "lipstick": 1}
    assert index.related(["suncream"], ["Sports"]) == {"tent": 2}
    assert index.related(["suncream"], ["Toys"]) == {}
    assert index.related(["tent", "tent"], ["Beauty"]) == {"suncream": 2, "lipstick": 1}, "history items count once"
    assert index.related(["tent", "suncream"], ["Beauty"]) == {"suncream": 2, "lipstick": 2}
    assert index.related(["tent"], ["Beauty"], exclude=["suncream"]) == {"lipstick": 1}
    assert index.category("lipstick") == "Beauty"


def test_leaving_a_shopper_out_removes_exactly_their_baskets():
    index = CoPurchases()
    index.add_many(BASKETS)
    assert index.related(["tent"], leave_out_user="bob") == {"suncream": 1, "boots": 1}
    assert index.related(["tent"], leave_out_user="ann") == {"suncream": 1, "lipstick": 1, "boots": 1}
    assert index.related(["tent"], leave_out_user="nobody") == {"suncream": 2, "lipstick": 1, "boots": 1}
    index.add("dan", "tent", "Sports")
    index.add("dan", "lipstick", "Beauty")
    assert index.related(["tent"], ["Beauty"]) == {"suncream": 2, "lipstick": 2}, "new events count at once"


def test_the_ranking_term_lifts_co_purchased_candidates():
    candidates = np.eye(3, dtype=np.float32)
    user = UserVectors(long_term=np.array([1.0, 0.0, 0.0], dtype=np.float32), short_term=None, context=None,
                       history=None)
    popularity, most = np.zeros(3, dtype=np.float32), np.ones(3, dtype=np.float32)
    weights = Weights(long_term=0.5, short_term=0.3, context=1.2, popularity=0.1, co_purchase=0.8)
    without = rank(user, candidates, popularity, most, weights, 0)
    with_counts = rank(user, candidates, popularity, most, weights, 0, np.array([0, 1, 4], dtype=np.float32))
    assert list(without.order)[0] == 0
    assert list(with_counts.order) == [2, 0, 1]
    assert with_counts.scores[0] == pytest.approx(0.8), "the most shared candidate gets the whole weight"
    unweighted = rank(user, candidates, popularity, most, Weights(0.5, 0.3, 1.2, 0.1), 0, np.array([0, 1, 4.0]))
    assert list(unweighted.order) == list(without.order)


# -- the profile book, over SQLite and Redis ------------------------------------


def test_stores_list_each_shoppers_items_once(event_store):
    from recsys_core.store.events import PURCHASE, VIEW, StoredEvent

    event_store.append([StoredEvent(u, i, c, PURCHASE, 1) for u, i, c in BASKETS]
                       + [StoredEvent("ann", "tent", "Sports", VIEW, 2)])
    assert sorted(event_store.user_items()) == sorted(set((u, i, c) for u, i, c in BASKETS))


def test_the_book_answers_co_purchases_and_keeps_them_current(event_store):
    from services.profile.profiles import IncomingEvent, ItemInfo, ProfileBook
    from recsys_core.store.events import PURCHASE, StoredEvent

    event_store.append([StoredEvent(u, i, c, PURCHASE, 1) for u, i, c in BASKETS])
    vectors = np.eye(5, dtype=np.float32)
    catalogue = {"tent": "Sports", "boots": "Sports", "suncream": "Beauty", "lipstick": "Beauty", "doll": "Toys"}

    class Catalogue:
        def lookup(self, item_ids, timeout):
            return {i: ItemInfo(catalogue[i], vectors[list(catalogue).index(i)]) for i in item_ids if i in catalogue}

    book = ProfileBook(event_store, Catalogue(), 200, 10, 100)
    assert book.co_purchased("cat", 5, [], []) == [("suncream", "Beauty", 2), ("lipstick", "Beauty", 1)]
    assert book.co_purchased("ann", 5, [], []) == [("lipstick", "Beauty", 2), ("boots", "Sports", 1)]
    assert book.co_purchased("bob", 5, [], []) == [("boots", "Sports", 1)], "a shopper's own items never come back"
    assert book.co_purchased("cat", 1, ["Beauty"], ["suncream"]) == [("lipstick", "Beauty", 1)]
    assert book.co_purchased("stranger", 5, [], []) == []
    assert book.co_purchased("stranger", 5, [], [], anchors=["suncream"]) == [("tent", "Sports", 2),
                                                                              ("lipstick", "Beauty", 1)]
    assert book.co_purchased("bob", 5, [], [], include_seen=True) == [
        ("boots", "Sports", 1), ("suncream", "Beauty", 1), ("tent", "Sports", 1)], "only others' baskets count"
    assert book.co_purchased("cat", 5, ["Toys"], []) == []
    book.ingest([IncomingEvent("eve", "boots", PURCHASE, 0, 0.0, "", ""),
                 IncomingEvent("eve", "doll", PURCHASE, 0, 0.0, "", "")], 1.0)
    assert book.co_purchased("cat", 5, ["Toys"], []) == [("doll", "Toys", 1)], "an ingested basket counts at once"
    for bad_k in (0, 1001):
        with pytest.raises(InvalidArgument, match="k"):
            book.co_purchased("cat", bad_k, [], [])
    with pytest.raises(InvalidArgument, match="user_id"):
        book.co_purchased("", 5, [], [])
    with pytest.raises(InvalidArgument, match="anchor_item_ids"):
        book.co_purchased("cat", 5, [], [], anchors=["tent"] * 101)


# -- the offline scorer ------------------------------------------------------------


def test_offline_scoring_leaves_the_shoppers_own_baskets_out():
    """The only evidence linking the source item to the held-out target is
    the shopper's own basket: left out, the target must get no co-purchase lift."""
    from training import crosscat, protocol

    rows = []
    for user in ("ann", "bob"):
        rows += [(user, "tent", "Sports", 1), (user, f"{user}-s2", "Sports", 2), (user, f"{user}-s3", "Sports", 3)]
    rows += [("ann", "b1", "Beauty", 1), ("ann", "b2", "Beauty", 2), ("ann", "suncream", "Beauty", 3),
             ("ann", "b3", "Beauty", 4), ("ann", "b4", "Beauty", 5),
             ("bob", "b1", "Beauty", 1), ("bob", "b2", "Beauty", 2), ("bob", "lipstick", "Beauty", 3),
             ("bob", "b5", "Beauty", 4), ("bob", "b6", "Beauty", 5)]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "category", "seq"])
    items = pd.DataFrame({"item_id": sorted(set(interactions.item_id)),
                          "category": [dict(zip(interactions.item_id, interactions.category))[i]
                                       for i in sorted(set(interactions.item_id))]})
    task = protocol.cross_category_task(interactions, items, "Sports", "Beauty")
    index = crosscat.training_copurchases(interactions)
    assert index.related(["tent"], ["Beauty"]) == {"b1": 2, "b2": 2, "suncream": 1, "lipstick": 1}
    assert index.related(["b1"], ["Beauty"]) == {"b2": 2, "suncream": 1, "lipstick": 1}
    only_co = Weights(long_term=0, short_term=0, context=0, popularity=0, co_purchase=1.0)
    scorer = crosscat.cross_scorer(task, index, np.ones((task.split.num_items, 4)), np.zeros(task.split.num_items),
                                     only_co)
    scores = scorer(task.inputs(), task.split.users)
    column = {item_id: i for i, item_id in enumerate(task.split.item_ids)}
    ann = task.split.users.index("ann")
    assert scores[ann, column["lipstick"]] > 0, "bob's basket lifts lipstick for ann"
    assert scores[ann, column["suncream"]] == 0, "ann's own basket is left out"
    assert scores[ann, column["tent"]] == -np.inf, "source items are not candidates"
    assert scores[ann, column["b5"]] == 0, "validation and test items are not counted"
