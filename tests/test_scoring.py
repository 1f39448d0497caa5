"""The score in two halves: features from vectors (the embedding service),
score from features (ranking); offline evaluation chains both."""
from __future__ import annotations

import numpy as np

from recsys_core.ranking.scoring import SERVING_WEIGHTS, UserVectors, explain, features, score, score_features


def unit_rows(rng, n, d=8):
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_features_are_the_vector_terms_and_absent_vectors_give_zeros():
    rng = np.random.default_rng(3)
    candidates, (long_term, context), disliked = unit_rows(rng, 6), unit_rows(rng, 2), unit_rows(rng, 2)
    model = 20 * unit_rows(rng, 1)[0]
    found = features(UserVectors(long_term=long_term, short_term=None, context=context, history=None,
                                 disliked=disliked, model_interest=model), candidates)
    assert np.allclose(found.long_term, candidates @ long_term)
    assert np.allclose(found.context, candidates @ context)
    assert not found.short_term.any()
    assert np.allclose(found.model, candidates @ model / 20, atol=1e-6)  # on a cosine's scale
    assert np.allclose(found.disliked, np.maximum(candidates @ disliked.T, 0).max(axis=1))
    assert all(f.dtype == np.float32 for f in (found.long_term, found.short_term, found.model, found.disliked))
    assert (explain(candidates, None) == -1).all()
    assert list(explain(candidates, candidates[[4, 1]])[[4, 1]]) == [0, 1]


def test_score_from_features_is_the_score_from_vectors():
    rng = np.random.default_rng(4)
    candidates = unit_rows(rng, 50)
    user = UserVectors(long_term=unit_rows(rng, 1)[0], short_term=unit_rows(rng, 1)[0], context=None, history=None,
                       drift_score=0.4, churn_probability=0.7, disliked=unit_rows(rng, 3))
    popularity = rng.integers(0, 100, 50).astype(np.float32)
    co_purchases = rng.integers(0, 5, 50).astype(np.float32)
    top = np.full(50, 120, dtype=np.float32)
    # What travels between the services is float32: the halves meet on it.
    wire = features(user, candidates)
    from_wire = score_features(wire, popularity, top, SERVING_WEIGHTS, 0.4, 0.7, co_purchases)
    assert np.array_equal(score(user, candidates, popularity, top, SERVING_WEIGHTS, co_purchases), from_wire)
