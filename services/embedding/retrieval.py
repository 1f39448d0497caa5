"""Recommend's retrieval, where the item vectors are: search with the
shopper's vectors, add extra candidates, and turn every vector the ranking
needs into per-candidate features (recsys_core.ranking.scoring.features), so
that what leaves this service is ids, titles and a few floats per candidate.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from recsys_core.errors import InvalidArgument
from recsys_core.ranking.scoring import Features, UserVectors, explain, features
from services.embedding.catalogue import Catalogue, ItemRecord

# Size limits per list: the gateway sends at most 50 context items, 20 (and
# at most 1000) history items, 1000 co-purchases and 50 interests.
MAX_CONTEXT_ITEMS = 100
MAX_CENTROIDS = 50
MAX_EXTRA_ITEMS = 1000
MAX_HISTORY_ITEMS = 1000
MAX_DISLIKED_ITEMS = 1000
MAX_EXCLUDED_ITEMS = 100_000
MAX_CATEGORIES = 100


@dataclass(frozen=True)
class RetrievalRequest:
    long_term: np.ndarray | None
    short_term: np.ndarray | None
    model: np.ndarray | None
    context_ids: Sequence[str]
    centroids: Sequence[np.ndarray]
    extra_ids: Sequence[str]
    history_ids: Sequence[str]
    disliked_ids: Sequence[str]
    k: int
    categories: Sequence[str] = ()
    exclude_ids: Sequence[str] = ()


@dataclass(frozen=True)
class Retrieved:
    records: list[ItemRecord]  # the candidates
    scores: np.ndarray  # best inner product with a query; 0 for extra items not retrieved
    retrieved: np.ndarray  # bool: found by a query
    features: Features
    because: list[str]  # closest context or history item, "" without either
    interest_similarity: np.ndarray  # candidates x centroids
    embeddings: np.ndarray  # candidates' rows
    context: list[ItemRecord] = field(default_factory=list)
    history: list[ItemRecord] = field(default_factory=list)


def check_limits(request: RetrievalRequest) -> None:
    for name, values, limit in (
        ("context_item_ids", request.context_ids, MAX_CONTEXT_ITEMS),
        ("interest_centroids", request.centroids, MAX_CENTROIDS),
        ("extra_item_ids", request.extra_ids, MAX_EXTRA_ITEMS),
        ("history_item_ids", request.history_ids, MAX_HISTORY_ITEMS),
        ("disliked_item_ids", request.disliked_ids, MAX_DISLIKED_ITEMS),
        ("exclude_item_ids", request.exclude_ids, MAX_EXCLUDED_ITEMS),
        ("categories", request.categories, MAX_CATEGORIES),
    ):
        if len(values) > limit:
            raise InvalidArgument(name, f"at most {limit} per request, got {len(values)}")


def retrieve(catalogue: Catalogue, request: RetrievalRequest, max_k: int) -> Retrieved:
    check_limits(request)
    single = [(name, vector) for name, vector in (("long_term_interest", request.long_term),
                                                   ("short_term_interest", request.short_term),
                                                   ("model_interest", request.model)) if vector is not None]
    checked = {name: catalogue.check_vectors([vector], name)[0] for name, vector in single}
    centroids = (catalogue.check_vectors(list(request.centroids), "interest_centroids") if request.centroids
                 else np.zeros((0, catalogue.dimension), dtype=np.float32))
    # Positions in a NOT_FOUND message are the request's own.
    context = list({r.item_id: r for r in catalogue.get(list(request.context_ids), field="context_item_ids")}.values())
    context_ids = [record.item_id for record in context]
    context_vector = None
    if context:
        # The items being looked at, as one query: their mean direction.
        mixed = np.mean(catalogue.embeddings(context_ids), axis=0)
        context_vector = mixed / max(float(np.linalg.norm(mixed)), 1e-6)
    # The order of the queries fixes the order of the candidates, and so
    # which of two equally scored candidates ranks first.
    queries = list(checked.values()) + ([context_vector] if context_vector is not None else []) + list(centroids)
    if not queries:
        raise InvalidArgument("long_term_interest", "no query: give an interest vector, a context item or a centroid")
    results = catalogue.search(np.stack(queries).astype(np.float32, copy=False), request.k, max_k,
                               list(request.categories), list(request.exclude_ids))

    hits: dict[str, float] = {}
    for result in results:
        for item_id, score in result:
            if item_id not in hits or score > hits[item_id]:
                hits[item_id] = score
    retrieved_count = len(hits)
    excluded = set(request.exclude_ids)
    extra = sorted({i for i in request.extra_ids if i not in hits and i not in excluded})
    records = catalogue.get(list(hits)) + catalogue.get(extra, skip_missing=True)
    ids = [record.item_id for record in records]
    scores = np.asarray([hits.get(i, 0.0) for i in ids], dtype=np.float32)
    retrieved = np.arange(len(ids)) < retrieved_count

    history = catalogue.get(list(dict.fromkeys(request.history_ids)), skip_missing=True)
    disliked = catalogue.get(list(dict.fromkeys(request.disliked_ids)), skip_missing=True)
    explaining = [r.item_id for r in context] + [r.item_id for r in history]
    embeddings = catalogue.embeddings(ids) if ids else np.zeros((0, catalogue.dimension), dtype=np.float32)
    user = UserVectors(
        long_term=checked.get("long_term_interest"),
        short_term=checked.get("short_term_interest"),
        context=context_vector,
        history=None,
        disliked=catalogue.embeddings([r.item_id for r in disliked]) if disliked else None,
        model_interest=checked.get("model_interest"),
    )
    closest = explain(embeddings, catalogue.embeddings(explaining) if explaining else None)
    return Retrieved(
        records=records,
        scores=scores,
        retrieved=retrieved,
        features=features(user, embeddings),
        because=[explaining[row] if row >= 0 else "" for row in closest],
        interest_similarity=embeddings @ centroids.T,
        embeddings=embeddings,
        context=context,
        history=history,
    )
