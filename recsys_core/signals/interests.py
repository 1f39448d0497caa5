"""A shopper's interests read from item embeddings: drift between recent and
long-term taste, interest clusters, and spreading a list across them.

Pure numpy/scipy and gRPC-free: the profile service computes these for
GetProfile, the ranking service and the gateway apply them, and the offline
evaluation (training/interests_eval.py) measures exactly the same
functions. docs/profiles.md defines each signal and reports its measured effect.

Arrays of history are ordered oldest first; `evidence` is each event's signed
weight (a purchase 1, a view less, a disliked item negative).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

# Category paths in the catalogue read "Beauty, Skin Care, Face, Creams & Moisturizers".
PATH_SEPARATOR = ", "


def interest_category(category: str, category_path: str) -> str:
    """The grain at which a shopper's category mix is read: the second level
    of the category path ("Beauty, Makeup") where items have one, else the
    catalogue category. Top-level categories alone would hide a move from
    skin care to make-up."""
    return path_prefix(category_path, 2) if category_path else category


def path_prefix(path: str, depth: int) -> str:
    return PATH_SEPARATOR.join(path.split(PATH_SEPARATOR)[:depth])


def recency_weights(length: int, decay: float) -> np.ndarray:
    """exp(-decay * age), age 0 being the latest of `length` events."""
    ages = np.arange(length - 1, -1, -1, dtype=np.float64)
    return np.exp(-decay * ages)


def unit_mix(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """Unit vector of sum_i weights_i * vectors_i; None when the evidence
    cancels out or is against everything (no direction to recommend toward)."""
    if len(vectors) == 0 or weights.sum() <= 0:
        return None
    mixed = weights @ vectors
    norm = float(np.linalg.norm(mixed))
    return None if norm < 1e-6 else (mixed / norm).astype(np.float32)


def category_mix(categories: Sequence[str], weights: np.ndarray) -> dict[str, float]:
    """Share of the positive evidence per category, largest first."""
    totals: dict[str, float] = {}
    for category, weight in zip(categories, weights):
        if weight > 0:
            totals[category] = totals.get(category, 0.0) + float(weight)
    whole = sum(totals.values())
    if whole <= 0:
        return {}
    return dict(sorted(((c, w / whole) for c, w in totals.items()), key=lambda cw: -cw[1]))


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(key, 0.0) - q.get(key, 0.0)) for key in set(p) | set(q))


# -- drift -------------------------------------------------------------------


@dataclass(frozen=True)
class DriftSettings:
    # The last `recent_events` are "recent"; everything before them is the
    # long-term taste they are compared with.
    # Defaults: the settings chosen on Beauty's validation targets
    # (recsys evaluate-interests; docs/profiles.md, "Interest drift").
    recent_events: int = 3
    # Fewer past events than this and there is no long-term taste to drift from.
    min_past_events: int = 2
    long_decay: float = 0.05
    short_decay: float = 1.5
    # drift score >= threshold raises the flag: about the top quarter of
    # Beauty shoppers with enough history. The lean toward recent interest
    # follows the score itself, not the flag.
    threshold: float = 0.88
    # Share of the short-term interest in the shopper's query mix when recent
    # behaviour matches long-term taste, and when it has moved away entirely;
    # between them it follows the drift score.
    short_share_stable: float = 0.65
    short_share_drifting: float = 1.0


@dataclass(frozen=True)
class Drift:
    score: float
    drifting: bool
    embedding_distance: float
    category_shift: float
    long_term_categories: dict[str, float]
    short_term_categories: dict[str, float]
    enough_history: bool
    threshold: float = DriftSettings.threshold


NO_DRIFT = Drift(0.0, False, 0.0, 0.0, {}, {}, False)


def measure_drift(vectors: np.ndarray, evidence: np.ndarray, categories: Sequence[str],
                  settings: DriftSettings = DriftSettings()) -> Drift:
    """Drift of the recent events away from the long-term taste before them.

    embedding_distance = 1 - cos(long-term mix of the past, short-term mix of the recent events),
    category_shift = total variation distance between the two category mixes,
    score = 1 - (1 - embedding_distance) * (1 - category_shift):
    either kind of move raises it; both at once raise it most.
    """
    n = len(vectors)
    recent = min(settings.recent_events, n)
    past = n - recent
    no_drift = replace(NO_DRIFT, threshold=settings.threshold)
    if past < settings.min_past_events or recent == 0:
        return no_drift
    past_weights = evidence[:past] * recency_weights(past, settings.long_decay)
    recent_weights = evidence[past:] * recency_weights(recent, settings.short_decay)
    long_vector = unit_mix(vectors[:past], past_weights)
    short_vector = unit_mix(vectors[past:], recent_weights)
    if long_vector is None or short_vector is None:
        return no_drift
    embedding_distance = float(np.clip(1.0 - float(long_vector @ short_vector), 0.0, 1.0))
    long_categories = category_mix(categories[:past], past_weights)
    short_categories = category_mix(categories[past:], recent_weights)
    category_shift = total_variation(long_categories, short_categories)
    score = 1.0 - (1.0 - embedding_distance) * (1.0 - category_shift)
    return Drift(
        score=score,
        drifting=score >= settings.threshold,
        embedding_distance=embedding_distance,
        category_shift=category_shift,
        long_term_categories=long_categories,
        short_term_categories=short_categories,
        enough_history=True,
        threshold=settings.threshold,
    )


def short_term_share(drift_score: float, settings: DriftSettings = DriftSettings()) -> float:
    """How much of the shopper's query follows the short-term interest: the
    stable share at drift 0, rising linearly with the score to the drifting
    share at drift 1."""
    score = min(max(drift_score, 0.0), 1.0)
    return settings.short_share_stable + (settings.short_share_drifting - settings.short_share_stable) * score


def drift_aware_weights(long_weight: float, short_weight: float, drift_score: float | None,
                        settings: DriftSettings = DriftSettings()) -> tuple[float, float]:
    """The ranking's long- and short-term weights moved toward the recent
    interest as drift rises; their sum, and so the balance with the other
    signals, stays. Without a drift score the weights are left as they are."""
    if drift_score is None:
        return long_weight, short_weight
    total = long_weight + short_weight
    share = short_term_share(drift_score, settings)
    return total * (1.0 - share), total * share


# -- interest clusters ---------------------------------------------------------


@dataclass(frozen=True)
class ClusterSettings:
    max_clusters: int = 5
    # Ward linkage keeps interests of comparable size; average linkage on
    # cosine distance tends to one giant cluster plus single-item outliers.
    linkage: str = "ward"
    # Linkage distance at which two groups of items stop being one interest
    # (Ward on unit vectors; chosen on Beauty shoppers against the category
    # tree, which clustering never sees: docs/profiles.md).
    distance: float = 1.2
    decay: float = 0.05


@dataclass(frozen=True)
class InterestCluster:
    members: np.ndarray  # indices into the history, oldest first
    centroid: np.ndarray  # unit vector
    weight: float  # share of the recency-weighted positive evidence
    last_position: int  # events since the cluster was last touched (0 = the latest)


def cluster_interests(vectors: np.ndarray, evidence: np.ndarray,
                      settings: ClusterSettings = ClusterSettings()) -> list[InterestCluster]:
    """Groups the history's items into at most `max_clusters` interests
    (agglomerative clustering of their unit embeddings), heaviest first.
    Items the shopper spoke against (negative evidence) shape no interest."""
    from scipy.cluster.hierarchy import fcluster, linkage

    positive = np.flatnonzero(evidence > 0)
    if len(positive) == 0:
        return []
    points = vectors[positive].astype(np.float64)
    if len(positive) == 1:
        labels = np.ones(1, dtype=int)
    else:
        metric = "euclidean" if settings.linkage in ("ward", "centroid", "median") else "cosine"
        tree = linkage(points, method=settings.linkage, metric=metric)
        labels = fcluster(tree, t=settings.distance, criterion="distance")
        if labels.max() > settings.max_clusters:
            labels = fcluster(tree, t=settings.max_clusters, criterion="maxclust")
    weights = (evidence * recency_weights(len(vectors), settings.decay))[positive]
    total = weights.sum()
    clusters = []
    for label in np.unique(labels):
        inside = labels == label
        members = positive[inside]
        centroid = unit_mix(points[inside], weights[inside])
        if centroid is None:
            continue
        clusters.append(InterestCluster(
            members=members,
            centroid=centroid,
            weight=float(weights[inside].sum() / total),
            last_position=int(len(vectors) - 1 - members.max()),
        ))
    return sorted(clusters, key=lambda c: (-c.weight, c.last_position))


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")
_STOPWORDS = frozenset(
    "the and for with from this that your you are all new one set pack per inch inches size color colour "
    "brand category oz fl ml count pieces piece pcs by of in on to a an".split()
)


def cluster_label(paths: Sequence[str], titles: Sequence[str], majority: float = 0.5) -> str:
    """The deepest category path shared by a majority of the cluster's items;
    without category paths (e.g. Sports), its items' most frequent title words."""
    paths = [p for p in paths if p]
    if paths:
        depth = max(len(p.split(PATH_SEPARATOR)) for p in paths)
        for level in range(depth, 0, -1):
            prefix, count = Counter(path_prefix(p, level) for p in paths).most_common(1)[0]
            if count >= majority * len(paths):
                return prefix.replace(PATH_SEPARATOR, " > ")
    words = Counter(
        word.lower() for title in titles for word in set(_WORD.findall(title)) if word.lower() not in _STOPWORDS
    )
    return ", ".join(word for word, _ in words.most_common(3)) or "miscellaneous"


# -- spreading a list across interests -------------------------------------


def quotas(weights: np.ndarray, slots: int) -> np.ndarray:
    """Slots per interest in proportion to its weight (largest remainder)."""
    if slots <= 0 or len(weights) == 0:
        return np.zeros(len(weights), dtype=int)
    shares = weights / weights.sum() * slots
    counts = np.floor(shares).astype(int)
    for index in np.argsort(-(shares - counts), kind="stable")[: slots - counts.sum()]:
        counts[index] += 1
    return counts


def spread(scores: np.ndarray, item_vectors: np.ndarray, centroids: np.ndarray, weights: np.ndarray, k: int,
           explore: int = 0, novel: np.ndarray | None = None) -> np.ndarray:
    """Indices of k candidates, best score first, spread across the shopper's
    interests: each candidate belongs to its nearest interest centroid, each
    interest gets slots in proportion to its weight and fills them with its
    best-scored candidates. `explore` slots go to the best-scored `novel`
    candidates (e.g. from parts of the catalogue the shopper has not touched)
    that are not picked already. Slots an interest cannot fill go to the best
    remaining candidates, so the list is always as long as it can be."""
    similarity = item_vectors @ centroids.T if len(centroids) else np.zeros((len(scores), 0), dtype=np.float32)
    return spread_by_similarity(scores, similarity, weights, k, explore, novel)


def spread_by_similarity(scores: np.ndarray, similarity: np.ndarray, weights: np.ndarray, k: int,
                         explore: int = 0, novel: np.ndarray | None = None) -> np.ndarray:
    """`spread` from each candidate's similarity to each centroid (rows:
    candidates, columns: interests) instead of the vectors: what the gateway
    receives, so that no item vector travels for it."""
    k = min(k, len(scores))
    order = np.argsort(-scores, kind="stable")
    if similarity.shape[1] == 0 or k == 0:
        return order[:k]
    nearest = np.argmax(similarity, axis=1)
    explore = min(explore, k) if novel is not None else 0
    chosen: list[int] = []
    taken = np.zeros(len(scores), dtype=bool)
    for interest, quota in enumerate(quotas(np.asarray(weights, dtype=np.float64), k - explore)):
        picked = [i for i in order if nearest[i] == interest][:quota]
        chosen += picked
        taken[picked] = True
    if explore:
        picked = [i for i in order if novel[i] and not taken[i]][:explore]
        chosen += picked
        taken[picked] = True
    if len(chosen) < k:
        chosen += [i for i in order if not taken[i]][: k - len(chosen)]
    chosen_array = np.asarray(chosen, dtype=np.int64)
    return chosen_array[np.argsort(-scores[chosen_array], kind="stable")]


def intra_list_diversity(item_vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance within a list (unit vectors)."""
    n = len(item_vectors)
    if n < 2:
        return 0.0
    similarity = item_vectors @ item_vectors.T
    return float(1.0 - (similarity.sum() - np.trace(similarity)) / (n * (n - 1)))
