"""A shopper's interests as vectors: recency-weighted mixes of the embeddings
of the items they interacted with, and the signals read from them (drift,
interest clusters) with the profile's own events and catalogue entries."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys_core.signals.interests import (
    ClusterSettings,
    Drift,
    category_mix,
    DriftSettings,
    cluster_interests,
    cluster_label,
    interest_category,
    measure_drift,
    recency_weights,
    unit_mix,
)
from recsys_core.store.events import PURCHASE, RATING, REVIEW, VIEW, StoredEvent

# A purchase says more about taste than a glance at a product page.
TYPE_WEIGHT = {VIEW: 0.3, PURCHASE: 1.0, RATING: 1.0, REVIEW: 1.0}
# A review the classifier reads as negative counts like a rating of 2 or less.
NEGATIVE_REVIEW_BELOW = 0.5


def event_weight(event: StoredEvent, positive_probability: float | None = None) -> float:
    """How strongly, and in which direction, an event speaks for its item.

    A low rating, or a review read as negative, is evidence against the item's
    neighbourhood: it pulls the interest vector away from it instead of toward it."""
    weight = TYPE_WEIGHT.get(event.type, 0.0)
    if event.rating:
        if event.rating <= 2:
            return -0.5 * weight
        if event.rating < 4:
            return 0.5 * weight
    elif positive_probability is not None and positive_probability < NEGATIVE_REVIEW_BELOW:
        return -0.5 * weight
    return weight


def interest_vector(
    events: Sequence[StoredEvent], vectors: dict[str, np.ndarray], decay: float,
    sentiment: dict[tuple[str, int | None], float] | None = None,
) -> np.ndarray | None:
    """Unit vector of sum_i w(event_i) * exp(-decay * age_i) * embedding_i,
    age 0 being the most recent event. None when nothing usable remains
    (no embeddings, or the evidence cancels out)."""
    usable = [e for e in events if e.item_id in vectors]
    if not usable:
        return None
    evidence = evidence_of(usable, sentiment or {})
    return unit_mix(np.stack([vectors[e.item_id] for e in usable]), evidence * recency_weights(len(usable), decay))


def evidence_of(events: Sequence[StoredEvent], sentiment: dict[tuple[str, int | None], float]) -> np.ndarray:
    """Signed weight of each event; `sentiment` holds P(positive) of reviews by (item_id, ts)."""
    return np.asarray([event_weight(e, sentiment.get((e.item_id, e.ts))) for e in events], dtype=np.float64)


@dataclass(frozen=True)
class Interest:
    label: str
    category: str
    weight: float
    events: int
    last_timestamp: int
    last_position: int
    centroid: np.ndarray
    item_ids: list[str]  # most recent first, each once


@dataclass(frozen=True)
class InterestReading:
    drift: Drift
    interests: list[Interest]
    # Recency-weighted share of each interest category (recsys_core.signals.interests.interest_category).
    categories: dict[str, float]


def read_interests(events: Sequence[StoredEvent], items: dict, sentiment: dict[tuple[str, int | None], float],
                   drift_settings: DriftSettings, cluster_settings: ClusterSettings) -> InterestReading:
    """Drift, labelled interest clusters and the category mix, from a
    shopper's events (oldest first) and the catalogue entries of their items
    (`items`: id -> ItemInfo)."""
    usable = [e for e in events if e.item_id in items]
    if not usable:
        return InterestReading(measure_drift(np.zeros((0, 1)), np.zeros(0), [], drift_settings), [], {})
    vectors = np.stack([items[e.item_id].vector for e in usable])
    evidence = evidence_of(usable, sentiment)
    grains = [interest_category(items[e.item_id].category, items[e.item_id].category_path) for e in usable]
    drift = measure_drift(vectors, evidence, grains, drift_settings)
    categories = category_mix(grains, evidence * recency_weights(len(usable), drift_settings.long_decay))
    interests = []
    for cluster in cluster_interests(vectors, evidence, cluster_settings):
        members = [usable[i] for i in cluster.members]
        info = [items[e.item_id] for e in members]
        item_ids = list(dict.fromkeys(e.item_id for e in reversed(members)))
        interests.append(Interest(
            label=cluster_label([i.category_path for i in info], [i.title for i in info]),
            category=Counter(i.category for i in info).most_common(1)[0][0],
            weight=cluster.weight,
            events=len(members),
            last_timestamp=max((e.ts or 0) for e in members),
            last_position=cluster.last_position,
            centroid=cluster.centroid,
            item_ids=item_ids,
        ))
    return InterestReading(drift, interests, categories)
