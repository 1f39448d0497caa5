import re
import threading

import numpy as np
import pytest

from recsys_core.index import kinds
from recsys_core.index.kinds import IndexSettings
from recsys_core.index.vector_index import VectorIndex

# Every behaviour below must hold for the exact index and for HNSW forced on
# a small set (with its tombstones), so the approximate path keeps the contract.
SMALL_SETTINGS = {"flat": IndexSettings(kind="flat"), "hnsw": IndexSettings(kind="hnsw", hnsw_m=4)}


def unit_rows(n, dimension=8, seed=0):
    rows = np.random.default_rng(seed).normal(size=(n, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(params=sorted(SMALL_SETTINGS))
def index(request):
    vectors = unit_rows(30)
    index = VectorIndex(8, use_gpu=False, settings=SMALL_SETTINGS[request.param])
    ids = [f"i{n}" for n in range(30)]
    categories = ["a" if n < 10 else "b" if n < 20 else "c" for n in range(30)]
    index.upsert(ids, categories, vectors)
    return index, vectors, ids, categories


def brute_force(vectors, query, allowed):
    scores = vectors @ query
    return [f"i{n}" for n in np.argsort(-scores) if allowed(n)]


def test_search_is_exact_and_ordered(index):
    index, vectors, ids, _ = index
    query = vectors[3]
    hits = index.search(query, 5)[0]
    assert [i for i, _ in hits] == brute_force(vectors, query, lambda n: True)[:5]
    assert hits[0] == ("i3", pytest.approx(1.0, abs=1e-5))
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_categories_restrict_and_merge(index):
    index, vectors, _, categories = index
    query = vectors[0]
    hits = index.search(query, 7, categories=["b", "c"])[0]
    assert [i for i, _ in hits] == brute_force(vectors, query, lambda n: categories[n] in ("b", "c"))[:7]
    with pytest.raises(KeyError):
        index.search(query, 3, categories=["zzz"])


def test_excluded_items_never_return_and_k_is_still_met(index):
    index, vectors, _, categories = index
    query = vectors[12]
    top = [i for i, _ in index.search(query, 5, categories=["b"])[0]]
    hits = [i for i, _ in index.search(query, 5, categories=["b"], exclude_item_ids=top)[0]]
    assert len(hits) == 5 and not set(hits) & set(top)
    everything_in_b = [f"i{n}" for n in range(10, 20)]
    assert index.search(query, 5, categories=["b"], exclude_item_ids=everything_in_b)[0] == []


def test_upsert_moves_an_item_to_its_new_vector_and_category(index):
    index, vectors, _, _ = index
    inserted, updated = index.upsert(["i0", "new"], ["c", "c"], unit_rows(2, seed=9))
    assert (inserted, updated) == (1, 1)
    assert len(index) == 31
    assert index.categories() == {"a": 9, "b": 10, "c": 12}
    assert "i0" not in {i for i, _ in index.search(vectors[0], 30, categories=["a"])[0]}
    np.testing.assert_allclose(index.vectors_of(["new"])[0], unit_rows(2, seed=9)[1])


def test_upsert_rejects_wrong_shapes(index):
    index, *_ = index
    with pytest.raises(ValueError):
        index.upsert(["x"], ["a"], np.zeros((1, 3), dtype=np.float32))


def clustered_rows(n, dimension, clusters, seed):
    """Unit vectors around a few centres, like item embeddings (uniformly
    random vectors have no neighbourhoods for an approximate index to find)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dimension))
    rows = centres[rng.integers(clusters, size=n)] + 0.35 * rng.normal(size=(n, dimension))
    rows = rows.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def ids_of(hits):
    return [[i for i, _ in row] for row in hits]


def test_kind_follows_size_and_override():
    auto = IndexSettings(hnsw_min_items=100, ivfpq_min_items=5000)
    assert [auto.kind_for(n) for n in (0, 99, 100, 4999, 5000)] == ["flat", "flat", "hnsw", "hnsw", "ivfpq"]
    assert IndexSettings(kind="flat").kind_for(10**7) == "flat"
    assert IndexSettings(kind="hnsw").kind_for(3) == "hnsw"
    # Too few items to train PQ codes on: exact instead.
    assert IndexSettings(kind="ivfpq").kind_for(kinds.IVFPQ_MIN_ITEMS - 1) == "flat"
    assert IndexSettings(kind="ivfpq").kind_for(kinds.IVFPQ_MIN_ITEMS) == "ivfpq"


def test_auto_upgrades_each_scope_by_its_own_size():
    index = VectorIndex(8, use_gpu=False, settings=IndexSettings(hnsw_min_items=25, pq_m=4))
    index.upsert([f"i{n}" for n in range(20)], ["a"] * 10 + ["b"] * 10, unit_rows(20))
    assert index.kinds() == {None: "flat", "a": "flat", "b": "flat"}
    index.upsert([f"j{n}" for n in range(10)], ["a"] * 10, unit_rows(10, seed=1))
    assert index.kinds() == {None: "hnsw", "a": "flat", "b": "flat"}
    assert len(index) == 30 and index.categories() == {"a": 20, "b": 10}


def test_a_large_catalogue_compresses_every_scope_that_is_not_small():
    auto = IndexSettings(hnsw_min_items=100, ivfpq_min_items=5000)
    # A 2,000-item category of a 5,000-item catalogue: its HNSW copy would sit
    # beside the global scope's, so it is compressed too; a small one stays exact.
    assert auto.kind_for(2000, catalogue_items=4999) == "hnsw"
    assert auto.kind_for(2000, catalogue_items=5000) == "ivfpq"
    assert auto.kind_for(99, catalogue_items=10**6) == "flat"
    assert IndexSettings(kind="hnsw").kind_for(1000, catalogue_items=10**7) == "hnsw"


def test_categories_move_to_ivfpq_once_the_catalogue_does():
    settings = IndexSettings(hnsw_min_items=25, ivfpq_min_items=3000, pq_m=4)
    index = VectorIndex(8, use_gpu=False, settings=settings)
    index.upsert([f"i{n}" for n in range(2200)], ["a"] * 1100 + ["b"] * 1100, unit_rows(2200))
    assert index.kinds() == {None: "hnsw", "a": "hnsw", "b": "hnsw"}
    index.upsert([f"j{n}" for n in range(900)], ["b"] * 900, unit_rows(900, seed=1))
    # "a" gained nothing but is rebuilt smaller at its next change; the
    # scopes this upsert touched move now.
    assert index.kinds()[None] == "ivfpq" and index.kinds()["b"] == "ivfpq"
    index.upsert(["i0"], ["a"], unit_rows(1, seed=2))
    assert index.kinds()["a"] == "ivfpq"


def test_the_global_build_reads_the_vectors_in_place(monkeypatch):
    """At 5M items a copy of every vector for the build is 7.2 GiB."""
    seen = {}
    real_build = kinds.build

    def spying_build(kind, dimension, settings, vectors, rows, *rest, **named):
        seen[named.get("scope", rest[1] if len(rest) > 1 else "")] = vectors
        return real_build(kind, dimension, settings, vectors, rows, *rest, **named)

    monkeypatch.setattr(kinds, "build", spying_build)
    index = VectorIndex(8, use_gpu=False, settings=IndexSettings(hnsw_min_items=25, pq_m=4))
    index.upsert([f"i{n}" for n in range(40)], ["a"] * 40, unit_rows(40))
    assert np.shares_memory(seen[""], index._vectors)
    assert not np.shares_memory(seen["a"], index._vectors)  # a category's rows are gathered


@pytest.mark.parametrize("bad, message", [
    (dict(kind="annoy"), "must be one of auto, flat, hnsw, ivfpq"),
    (dict(hnsw_ef_search=0), "hnsw_ef_search=0 must be a positive integer"),
    (dict(hnsw_min_items=10, ivfpq_min_items=5), "ivfpq_min_items=5 is below hnsw_min_items=10"),
    (dict(rebuild_fraction=0.0), "rebuild_fraction=0.0 must be in (0, 1]"),
])
def test_bad_settings_fail_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        IndexSettings(**bad)


def test_pq_width_must_divide_the_vectors():
    with pytest.raises(ValueError, match="pq_m=48 must divide the vector width 100"):
        VectorIndex(100, use_gpu=False, settings=IndexSettings(kind="ivfpq"))
    VectorIndex(100, use_gpu=False, settings=IndexSettings(kind="hnsw"))  # PQ never used: no constraint


@pytest.mark.parametrize("settings, floor", [
    (IndexSettings(kind="hnsw", hnsw_ef_search=64), 0.95),
    (IndexSettings(kind="ivfpq", pq_m=8, ivf_nprobe=8), 0.9),
])
def test_approximate_recall_is_high(settings, floor):
    vectors = clustered_rows(4000, 32, 40, seed=3)
    ids = [f"i{n}" for n in range(4000)]
    approx = VectorIndex(32, use_gpu=False, settings=settings)
    approx.upsert(ids, ["c"] * 4000, vectors)
    assert approx.kinds()[None] == settings.kind
    queries = clustered_rows(200, 32, 40, seed=3)[:200] + 0.05
    exact = vectors @ queries.T
    truth = [set(np.asarray(ids)[np.argsort(-exact[:, q])[:50]]) for q in range(len(queries))]
    found = ids_of(approx.search(queries, 50))
    recall = np.mean([len(truth[q] & set(found[q])) / 50 for q in range(len(queries))])
    assert recall >= floor
    # ...while a degenerate index (every query answered by the same items) would score near 0:
    assert np.mean([len(truth[q] & set(found[0])) / 50 for q in range(1, len(queries))]) < floor


def replay(settings, steps=6, seed=0):
    """The same upserts (replacements and moves between categories) and
    searches against one index; returns every search's item ids."""
    rng = np.random.default_rng(seed)
    index = VectorIndex(16, use_gpu=False, settings=settings)
    ids = [f"i{n}" for n in range(120)]
    index.upsert(ids, [("a", "b", "c")[n % 3] for n in range(120)], clustered_rows(120, 16, 6, seed))
    answers = []
    for step in range(steps):
        moved = sorted(rng.choice(120, size=15, replace=False).tolist())
        index.upsert([ids[n] for n in moved], [("a", "b", "c")[(n + step + 1) % 3] for n in moved],
                     clustered_rows(15, 16, 6, seed + step + 1))
        queries = clustered_rows(5, 16, 6, seed + 100 + step)
        excluded = [ids[n] for n in rng.choice(120, size=10, replace=False)]
        answers.append(ids_of(index.search(queries, 12, exclude_item_ids=excluded)))
        answers.append(ids_of(index.search(queries, 12, categories=["b", "c"], exclude_item_ids=excluded)))
        answers.append(ids_of(index.search(queries, 45, categories=["a"])))
    return index, answers


def test_hnsw_with_tombstones_answers_exactly_like_the_flat_index():
    _, exact = replay(IndexSettings(kind="flat"))
    hnsw, approx = replay(IndexSettings(kind="hnsw", hnsw_m=8))
    assert approx == exact
    assert hnsw.categories() == replay(IndexSettings(kind="flat"))[0].categories()


def test_tombstones_are_hidden_and_trigger_a_rebuild():
    settings = IndexSettings(kind="hnsw", hnsw_m=8, rebuild_fraction=0.3)
    index = VectorIndex(8, use_gpu=False, settings=settings)
    vectors = unit_rows(40)
    index.upsert([f"i{n}" for n in range(40)], ["a"] * 40, vectors)
    # Replace i0..i9 by vectors far from their old ones: 10 tombstones of 50 positions.
    index.upsert([f"i{n}" for n in range(10)], ["a"] * 10, -vectors[:10])
    graph = index._scopes[None]
    assert graph.dead_count == 10 and len(graph) == 40
    for n in range(10):
        hits = index.search(vectors[n], 40)[0]
        assert [i for i, _ in hits].count(f"i{n}") == 1  # once, at its new place
        assert dict(hits)[f"i{n}"] == pytest.approx(-1.0, abs=1e-5)
    index.upsert([f"i{n}" for n in range(10, 20)], ["a"] * 10, -vectors[10:20])
    rebuilt = index._scopes[None]
    assert rebuilt is not graph and rebuilt.dead_count == 0 and len(rebuilt) == 40


def test_k_results_come_back_when_almost_everything_is_excluded():
    index = VectorIndex(8, use_gpu=False, settings=IndexSettings(kind="hnsw", hnsw_m=4))
    vectors = unit_rows(60)
    ids = [f"i{n}" for n in range(60)]
    index.upsert(ids, ["a"] * 60, vectors)
    nearest = [i for i, _ in index.search(vectors[0], 55)[0]]
    hits = index.search(vectors[0], 5, exclude_item_ids=nearest)[0]
    assert sorted(i for i, _ in hits) == sorted(set(ids) - set(nearest))


def test_approximate_builds_are_deterministic_and_stored(tmp_path):
    settings = IndexSettings(hnsw_min_items=1000, hnsw_m=8, hnsw_ef_search=16, pq_m=4)
    vectors = clustered_rows(3000, 16, 30, seed=5)
    ids = [f"i{n}" for n in range(3000)]
    queries = clustered_rows(50, 16, 30, seed=6)
    answers = []
    for store in (None, tmp_path, tmp_path):  # built, built and written, read back
        index = VectorIndex(16, use_gpu=False, settings=settings, store_dir=store)
        index.upsert(ids, ["a" if n % 2 else "b" for n in range(3000)], vectors)
        assert index.kinds() == {None: "hnsw", "a": "hnsw", "b": "hnsw"}
        answers.append(index.search(queries, 20))
    assert answers[0] == answers[1] == answers[2]
    assert len(list(tmp_path.glob("hnsw-*.faiss"))) == 3


def signed_rows(categories, seed):
    """Unit rows whose first coordinate is positive in category a and negative
    in b, so a search's scores alone tell which category each hit was in."""
    rows = np.random.default_rng(seed).normal(size=(len(categories), 8))
    rows[:, 0] = np.where(np.asarray(categories) == "a", 1, -1) * (np.abs(rows[:, 0]) + 1.0)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_concurrent_searches_during_moves_never_see_wrong_or_excluded_items():
    index = VectorIndex(8, use_gpu=False, settings=IndexSettings(kind="hnsw", hnsw_m=4, rebuild_fraction=0.5))
    ids = [f"i{n}" for n in range(200)]
    categories = ["a" if n % 2 else "b" for n in range(200)]
    index.upsert(ids, categories, signed_rows(categories, 0))
    excluded = set(ids[:40])
    stop, problems, searches = threading.Event(), [], []

    def searcher(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            # Dominated by the first coordinate: |50 v0| > 10 beats the rest (< 3),
            # so a hit scores above 0 exactly when it is in category a.
            query = np.concatenate([[50.0], rng.normal(size=7) / 3]).astype(np.float32)
            for category, sign in (("a", 1), ("b", -1)):
                hits = index.search(query, 10, categories=[category], exclude_item_ids=excluded)[0]
                searches.append(1)
                if len(hits) != 10 or {i for i, _ in hits} & excluded:
                    problems.append(("count or excluded", hits))
                if any(score * sign <= 0 for _, score in hits):
                    problems.append(("category", category, hits))

    threads = [threading.Thread(target=searcher, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for step in range(30):  # move items between the categories, new vectors each time
        moved = [ids[n] for n in range(step % 7, 200, 7)]
        moved_to = ["b" if (step + n) % 2 else "a" for n in range(len(moved))]
        index.upsert(moved, moved_to, signed_rows(moved_to, 100 + step))
    stop.set()
    for thread in threads:
        thread.join()
    assert problems == []
    assert len(searches) > 30  # the searches really ran beside the upserts
    assert index.categories()["a"] + index.categories()["b"] == 200
