import numpy as np
import pytest

from recsys_core.index.vector_index import VectorIndex


def unit_rows(n, dimension=8, seed=0):
    rows = np.random.default_rng(seed).normal(size=(n, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def index():
    vectors = unit_rows(30)
    index = VectorIndex(8, use_gpu=False)
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
