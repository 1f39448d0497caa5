"""Cross-category co-purchases: the counts, the profile book's answers over
both stores, the ranking term, and the offline scorer's leave-own-out."""
from __future__ import annotations

import random
import threading

import numpy as np
import pandas as pd
import pytest

from bench.copurchase import PerRequestCoPurchases
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


# -- the precomputed matrix against counting per request (the oracle) -----------


def spec_most_shared(related: dict[str, int], k: int) -> list[tuple[str, int]]:
    return sorted(related.items(), key=lambda pair: (-pair[1], pair[0]))[:k]


def assert_same_answers(index: CoPurchases, oracle: PerRequestCoPurchases, rng: random.Random, items: list[str],
                        users: list[str], categories: list[str], queries: int) -> None:
    for _ in range(queries):
        history = rng.choices(items, k=rng.randint(0, 8)) + (["never-sold"] if rng.random() < 0.1 else [])
        wanted = rng.sample(categories + ["NoSuchCategory"], rng.randint(0, 2))
        exclude = rng.sample(items, rng.randint(0, 3))
        leave_out = rng.choice(users + [None, "stranger"])
        expected = oracle.related(history, wanted, exclude, leave_out)
        assert index.related(history, wanted, exclude, leave_out) == expected, (history, wanted, exclude, leave_out)
        for k in (1, 3, 50):
            assert index.most_shared(history, k, wanted, exclude, leave_out) == spec_most_shared(expected, k)
    for item_id in items + ["never-sold"]:
        assert index.category(item_id) == oracle.category(item_id)


@pytest.mark.parametrize("seed", range(6))
def test_the_matrix_answers_as_counting_per_request_did_before_and_after_new_events(seed):
    """Random baskets with few items, so that pairs, ties at the k-th count
    and shoppers with the asked items are common; loaded in bulk (counted as
    one sparse product), then event by event through the delta, folded into
    the matrix every few counts."""
    rng = random.Random(seed)
    items = [f"i{n:02d}" for n in range(rng.randint(5, 30))]
    users = [f"u{n}" for n in range(rng.randint(3, 25))]
    categories = ["Beauty", "Sports", "Toys"]
    category_of = {item_id: rng.choice(categories) for item_id in items}

    def rows(n):
        return [(u, i, category_of[i]) for u, i in zip(rng.choices(users, k=n), rng.choices(items, k=n))]

    bulk = rows(rng.randint(0, 120))
    index, oracle = CoPurchases(fold_at=5, fold_in_background=False), PerRequestCoPurchases()
    index.add_many(bulk)
    oracle.add_many(bulk)
    assert_same_answers(index, oracle, rng, items, users, categories, 60)
    folded = index.footprint()["nonzero"]
    for user_id, item_id, category in rows(80):
        index.add(user_id, item_id, category)
        oracle.add(user_id, item_id, category)
        assert_same_answers(index, oracle, rng, items, users, categories, 3)
    assert index.footprint()["nonzero"] > folded or not bulk, "new counts were folded into the matrix"
    few = rows(3)  # a small bulk load goes through the delta
    index.add_many(few)
    oracle.add_many(few)
    index.fold()
    assert index.footprint()["delta_entries"] == 0
    assert_same_answers(index, oracle, rng, items, users, categories, 40)


def test_a_new_pair_counts_at_the_next_read_before_and_after_a_fold():
    index = CoPurchases(fold_at=4, fold_in_background=False)
    index.add_many(BASKETS)  # 10 counts: over fold_at, counted as a matrix
    assert index.footprint()["delta_entries"] == 0
    index.add("dan", "doll", "Toys")  # a new item, past the matrix's last row
    index.add("dan", "tent", "Sports")
    assert index.footprint()["delta_entries"] == 2, "counted in the delta, not by recounting"
    assert index.related(["doll"]) == {"tent": 1}
    assert index.related(["tent"], ["Toys"]) == {"doll": 1}
    index.fold()
    assert index.footprint()["delta_entries"] == 0
    assert index.related(["doll"]) == {"tent": 1}
    assert index.related(["tent"]) == {"suncream": 2, "lipstick": 1, "boots": 1, "doll": 1}


def test_counts_past_uint16_widen_the_matrix_instead_of_wrapping():
    index = CoPurchases(fold_at=10, fold_in_background=False)
    index.add_many([(f"u{n}", item_id, "Toys") for n in range(2**16 + 1) for item_id in ("a", "b")])
    assert index.related(["a"]) == {"b": 2**16 + 1}
    index.add("last", "a", "Toys")
    index.add("last", "b", "Toys")
    index.fold()
    assert index.related(["a"]) == {"b": 2**16 + 2}


def test_a_bulk_load_while_a_fold_merges_is_not_undone_by_the_fold(monkeypatch):
    """A bulk load recounts everything, the frozen delta included; a fold
    that started before it must not then put back the matrix it merged."""
    from recsys_core.signals import copurchase

    bulk = [(f"x{n}", item_id, "Toys") for n in range(3) for item_id in ("tent", "doll")]
    index, oracle = CoPurchases(fold_at=2, fold_in_background=False), PerRequestCoPurchases()
    merge = copurchase._merge

    def merge_while_a_bulk_load_runs(matrix, delta, size):
        monkeypatch.setattr(copurchase, "_merge", merge)
        index.add_many(bulk)  # 6 counts: over fold_at, recounted
        return merge(matrix, delta, size)

    monkeypatch.setattr(copurchase, "_merge", merge_while_a_bulk_load_runs)
    for row in BASKETS:
        index.add(*row)
        oracle.add(*row)
    oracle.add_many(bulk)
    assert copurchase._merge is merge, "the fold ran"
    for item_id in ("tent", "suncream", "lipstick", "boots", "doll"):
        assert index.related([item_id]) == oracle.related([item_id])


def test_reads_during_writes_and_background_folds_see_every_acknowledged_pair():
    """Writers add baskets while readers ask: a writer's own pair is visible
    to its next read (the profile service's ingest then GetCoPurchasedItems),
    no read fails while folds run in the background, and the end state is
    what counting per request gives."""
    index, oracle = CoPurchases(fold_at=50), PerRequestCoPurchases()
    start = [(f"u{n}", f"i{n % 7}", "Toys") for n in range(40)]
    index.add_many(start)
    oracle.add_many(start)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            rng = random.Random(w)
            for n in range(300):
                user_id, item_id = f"w{w}-{n % 20}", f"i{rng.randrange(40)}"
                before = index.related(["anchor"]).get(item_id, 0)
                index.add(user_id, "anchor", "Toys")
                index.add(user_id, item_id, "Toys")
                after = index.related(["anchor"]).get(item_id, 0)
                assert after >= before + (item_id != "anchor" and n < 20), (user_id, item_id, before, after)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def reader() -> None:
        try:
            for n in range(300):
                index.most_shared([f"i{n % 40}", "anchor"], 5, leave_out_user=f"w0-{n % 20}")
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)] + \
        [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    for w in range(3):
        rng = random.Random(w)
        for n in range(300):
            user_id, item_id = f"w{w}-{n % 20}", f"i{rng.randrange(40)}"
            oracle.add(user_id, "anchor", "Toys")
            oracle.add(user_id, item_id, "Toys")
    index.fold()
    items = ["anchor"] + [f"i{n}" for n in range(40)]
    for item_id in items:
        assert index.related([item_id]) == oracle.related([item_id])
        assert index.related([item_id, "anchor"], leave_out_user="w1-3") == \
            oracle.related([item_id, "anchor"], leave_out_user="w1-3")


def test_the_matrix_answers_as_counting_per_request_on_the_bundled_data(dataset):
    """Shoppers of the bundled data asking as the profile service asks
    (their first 100 items, their own items excluded and baskets left out),
    half of them restricted to their latest item's category."""
    rows = list(dict.fromkeys(zip(dataset.interactions.user_id, dataset.interactions.item_id,
                                  dataset.interactions.category)))
    index, oracle = CoPurchases(), PerRequestCoPurchases()
    index.add_many(rows)
    oracle.add_many(rows)
    assert index.footprint()["nonzero"] > 0 and index.footprint()["delta_entries"] == 0, "counted as a matrix"
    items_of: dict[str, list[tuple[str, str]]] = {}
    for user_id, item_id, category in rows:
        items_of.setdefault(user_id, []).append((item_id, category))
    longest = sorted(items_of, key=lambda u: (-len(items_of[u]), u))[:10]
    sample = longest + random.Random(7).sample(sorted(items_of), 150)
    nonempty = 0
    for n, user_id in enumerate(sample):
        seen = [item_id for item_id, _ in items_of[user_id]]
        wanted = [items_of[user_id][-1][1]] if n % 2 else []
        expected = oracle.related(seen[:100], wanted, set(seen), user_id)
        assert index.related(seen[:100], wanted, set(seen), user_id) == expected, user_id
        assert index.most_shared(seen[:100], 50, wanted, set(seen), user_id) == spec_most_shared(expected, 50)
        nonempty += bool(expected)
    assert nonempty > len(sample) // 2, "most shoppers have co-purchases to compare"


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
