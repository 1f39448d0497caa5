"""Drift, interest clusters and spread lists (recsys_core.signals.interests), and how
ranking applies them: domain code called directly."""
from __future__ import annotations

import numpy as np
import pytest

from recsys_core.signals.interests import (
    ClusterSettings,
    DriftSettings,
    cluster_interests,
    cluster_label,
    drift_aware_weights,
    interest_category,
    intra_list_diversity,
    measure_drift,
    quotas,
    short_term_share,
    spread,
)
from recsys_core.ranking.scoring import UserVectors, Weights, rank

AXES = np.eye(4, dtype=np.float32)


def noisy(axis: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = AXES[axis] + 0.05 * rng.standard_normal((count, 4)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_shopper_who_moved_to_another_interest_drifts_and_a_steady_one_does_not():
    settings = DriftSettings(recent_events=3, min_past_events=4)
    moved = np.concatenate([noisy(0, 6, 1), noisy(1, 3, 2)])
    drift = measure_drift(moved, np.ones(9), ["Skin"] * 6 + ["Makeup"] * 3, settings)
    assert drift.enough_history and drift.drifting
    assert drift.embedding_distance > 0.9 and drift.category_shift == pytest.approx(1.0)
    assert drift.score == pytest.approx(1.0, abs=1e-6)
    assert drift.long_term_categories == {"Skin": pytest.approx(1.0)}
    assert drift.short_term_categories == {"Makeup": pytest.approx(1.0)}

    steady = measure_drift(noisy(0, 9, 3), np.ones(9), ["Skin"] * 9, settings)
    assert steady.enough_history and not steady.drifting
    assert steady.category_shift == 0 and steady.score < 0.05


def test_drift_needs_a_past_to_drift_from():
    drift = measure_drift(noisy(0, 6, 4), np.ones(6), ["Skin"] * 6, DriftSettings(recent_events=3, min_past_events=5))
    assert not drift.enough_history and drift.score == 0 and not drift.drifting


def test_half_a_move_scores_between_and_the_category_mix_is_weighted():
    settings = DriftSettings(recent_events=2, min_past_events=2, short_decay=0.0, long_decay=0.0)
    vectors = np.concatenate([noisy(0, 4, 5), noisy(0, 1, 6), noisy(1, 1, 7)])
    drift = measure_drift(vectors, np.ones(6), ["A"] * 5 + ["B"], settings)
    assert drift.category_shift == pytest.approx(0.5)
    assert 0.5 < drift.score < 1.0


def test_the_balance_leans_to_the_short_term_as_drift_rises_and_keeps_its_sum():
    settings = DriftSettings(short_share_stable=0.3, short_share_drifting=0.9)
    assert short_term_share(0.0, settings) == pytest.approx(0.3)
    assert short_term_share(1.0, settings) == pytest.approx(0.9)
    assert short_term_share(0.5, settings) == pytest.approx(0.6)
    long_weight, short_weight = drift_aware_weights(0.5, 0.3, 0.5, settings)
    assert long_weight + short_weight == pytest.approx(0.8) and short_weight == pytest.approx(0.48)
    assert drift_aware_weights(0.5, 0.3, None, settings) == (0.5, 0.3)


def test_clusters_follow_the_groups_weigh_recent_ones_and_skip_disliked_items():
    vectors = np.concatenate([noisy(0, 5, 8), noisy(1, 3, 9), noisy(2, 1, 10)])
    evidence = np.ones(9)
    evidence[8] = -0.5  # the axis-2 item was disliked
    clusters = cluster_interests(vectors, evidence, ClusterSettings(distance=0.5, decay=0.0))
    assert [sorted(c.members.tolist()) for c in clusters] == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert [c.weight for c in clusters] == pytest.approx([5 / 8, 3 / 8])
    assert clusters[1].last_position == 1 and clusters[0].last_position == 4
    assert clusters[0].centroid @ AXES[0] > 0.99
    capped = cluster_interests(np.concatenate([noisy(a, 2, a) for a in range(4)]), np.ones(8),
                               ClusterSettings(max_clusters=2, distance=0.5))
    assert len(capped) == 2
    assert cluster_interests(vectors[:1], np.array([-1.0])) == []


def test_labels_come_from_the_shared_category_path_or_title_words():
    paths = ["Beauty, Makeup, Eyes, Mascara", "Beauty, Makeup, Eyes, Eyeliner", "Beauty, Makeup, Lips"]
    assert cluster_label(paths, ["", "", ""]) == "Beauty > Makeup > Eyes"
    assert cluster_label(["", ""], ["Trail running shoes", "Running socks for trail"]) in (
        "running, trail", "trail, running", "running, trail, shoes", "trail, running, shoes", "running, trail, socks",
        "trail, running, socks")
    assert interest_category("Beauty", "Beauty, Makeup, Eyes") == "Beauty, Makeup"
    assert interest_category("Sports_and_Outdoors", "") == "Sports_and_Outdoors"


def test_quotas_are_proportional_and_add_up():
    assert quotas(np.array([0.6, 0.3, 0.1]), 10).tolist() == [6, 3, 1]
    assert quotas(np.array([0.5, 0.5]), 3).sum() == 3
    assert quotas(np.array([1.0]), 0).tolist() == [0]


def test_spread_gives_each_interest_its_share_and_explores():
    # 10 candidates near interest 0 score highest, 10 near interest 1 lower, 2 novel ones lowest.
    vectors = np.concatenate([noisy(0, 10, 11), noisy(1, 10, 12), noisy(2, 2, 13)])
    scores = np.concatenate([np.linspace(1.0, 0.9, 10), np.linspace(0.5, 0.4, 10), [0.1, 0.05]])
    centroids = AXES[:2]
    plain = spread(scores, vectors, np.zeros((0, 4)), np.zeros(0), 6)
    assert set(plain.tolist()) == set(range(6))
    spread_list = spread(scores, vectors, centroids, np.array([0.5, 0.5]), 6)
    assert sorted(spread_list.tolist()) == [0, 1, 2, 10, 11, 12]
    assert scores[spread_list].tolist() == sorted(scores[spread_list], reverse=True)
    novel = np.zeros(22, dtype=bool)
    novel[20:] = True
    explored = spread(scores, vectors, centroids, np.array([0.5, 0.5]), 6, explore=2, novel=novel)
    assert {20, 21} <= set(explored.tolist()) and len(explored) == 6
    # An interest with too few candidates leaves its slots to the best of the rest.
    short = spread(scores[:12], vectors[:12], centroids, np.array([0.2, 0.8]), 8)
    assert len(short) == 8 and {10, 11} <= set(short.tolist())


def test_intra_list_diversity():
    assert intra_list_diversity(AXES[:3]) == pytest.approx(1.0)
    assert intra_list_diversity(np.stack([AXES[0], AXES[0]])) == pytest.approx(0.0)


def ranking_case(**user):
    candidates = np.stack([AXES[0], AXES[1], AXES[2]])
    vectors = UserVectors(long_term=AXES[0], short_term=AXES[1], context=None, history=None, **user)
    weights = Weights(long_term=0.5, short_term=0.3, context=0.0, popularity=0.1, churn_boost=5.0, dislike=1.0,
                      drift=DriftSettings(short_share_stable=0.2, short_share_drifting=0.9))
    return rank(vectors, candidates, np.array([0.0, 0.0, 100.0]), np.full(3, 100.0), weights, 3)


def test_ranking_leans_to_recent_interest_when_drifting_and_lets_churn_and_dislikes_shape_the_list():
    assert ranking_case().order[0] == 0
    assert ranking_case(drift_score=0.0).order[0] == 0
    assert ranking_case(drift_score=1.0).order[0] == 1
    # Popular item 2 overtakes once churn risk multiplies the popularity prior.
    assert ranking_case(churn_probability=0.0).order[0] == 0
    assert ranking_case(churn_probability=1.0).order[0] == 2
    disliked = ranking_case(disliked=np.stack([AXES[0]]))
    assert disliked.order[-1] == 0
