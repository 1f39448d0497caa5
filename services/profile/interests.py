"""A shopper's interests as vectors: recency-weighted mixes of the embeddings
of the items they interacted with."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.profile.store import PURCHASE, RATING, REVIEW, VIEW, StoredEvent

# A purchase says more about taste than a glance at a product page.
TYPE_WEIGHT = {VIEW: 0.3, PURCHASE: 1.0, RATING: 1.0, REVIEW: 1.0}


def event_weight(event: StoredEvent) -> float:
    """How strongly, and in which direction, an event speaks for its item.

    A low rating is evidence against the item's neighbourhood: it pulls the
    interest vector away from it instead of toward it."""
    weight = TYPE_WEIGHT.get(event.type, 0.0)
    if event.rating:
        if event.rating <= 2:
            return -0.5 * weight
        if event.rating < 4:
            return 0.5 * weight
    return weight


def interest_vector(
    events: Sequence[StoredEvent], vectors: dict[str, np.ndarray], decay: float
) -> np.ndarray | None:
    """Unit vector of sum_i w(event_i) * exp(-decay * age_i) * embedding_i,
    age 0 being the most recent event. None when nothing usable remains
    (no embeddings, or the evidence cancels out)."""
    usable = [e for e in events if e.item_id in vectors]
    if not usable:
        return None
    ages = np.arange(len(usable) - 1, -1, -1, dtype=np.float32)
    weights = np.exp(-decay * ages) * np.asarray([event_weight(e) for e in usable], dtype=np.float32)
    matrix = np.stack([vectors[e.item_id] for e in usable])
    mixed = weights @ matrix
    norm = float(np.linalg.norm(mixed))
    if norm < 1e-6 or weights.sum() <= 0:
        return None
    return (mixed / norm).astype(np.float32)
