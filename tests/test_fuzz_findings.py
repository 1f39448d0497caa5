"""What tests/test_fuzz.py found, each fixed at its cause and pinned here as a
unit test of the domain code (no servers)."""
from __future__ import annotations

import numpy as np
import pytest

from recsys.common.v1 import common_pb2
from recsys.ranking.v1 import ranking_pb2
from recsys_core.errors import InvalidArgument
from services.ranking.servicer import candidate_features


def candidates(**features) -> list:
    return [ranking_pb2.Candidate(item_id="a", features=common_pb2.CandidateFeatures()),
            ranking_pb2.Candidate(item_id="b", features=common_pb2.CandidateFeatures(**features))]


@pytest.mark.parametrize("value", [3.4e38, -3.4e38, 2e6])
def test_rank_refuses_features_beyond_any_similarity(value):
    """A finite 3.4e38 overflowed the weighted sum: infinite and NaN scores."""
    with pytest.raises(InvalidArgument, match=r"candidates\[1\]\.features\.model_similarity: is .*; a similarity "
                                              r"lies within \+-1e\+06"):
        candidate_features(candidates(model_similarity=value))


def test_rank_takes_similarities_of_vectors_that_are_not_unit():
    """A trained model's item vectors (encoder output plus ID vector) give similarities above 1."""
    features = candidate_features(candidates(long_term_similarity=1.0, model_similarity=7.5, disliked_similarity=-1.0))
    assert features.model.tolist() == [0.0, 7.5] and np.isfinite(features.disliked).all()
