"""Recommend as it was before the four-call path (commit f8ba209), kept only
as the reference tests/test_recommend_equivalence.py compares against.

It makes the old calls (GetProfile, GetCoPurchasedItems, GetItems with
embeddings, SearchItems with embeddings, GetItemPopularity, GetPopularItems:
the profile and embedding services still offer them) one after another, and
scores with the formula as it stood then, on the item vectors: a frozen copy,
on purpose, so that the new split (features in the embedding service, score
from features in ranking) is checked against something it does not share.
"""
from __future__ import annotations

import numpy as np

from recsys.embedding.v1 import embedding_pb2
from recsys.profile.v1 import profile_pb2
from recsys_core.errors import NotFound
from recsys_core.ranking.scoring import Weights
from recsys_core.rpc.messages import from_vector, has_values, to_vector
from recsys_core.signals.interests import drift_aware_weights, interest_category, spread
from services.gateway import requests as rq
from services.gateway.composer import COLD_START, PERSONALISED, Recommendation
from services.gateway.config import GatewayConfig

TIMEOUT = 30


def old_score(long_term, short_term, context, disliked, model, drift, churn, candidates, popularity, max_popularity,
              co_purchases, weights: Weights) -> np.ndarray:
    """recsys_core/ranking/scoring.py `score` at f8ba209."""
    scores = np.zeros(len(candidates), dtype=np.float32)
    long_weight, short_weight = drift_aware_weights(weights.long_term, weights.short_term, drift, weights.drift)
    for vector, weight in ((long_term, long_weight), (short_term, short_weight), (context, weights.context)):
        if vector is not None and weight:
            scores += weight * (candidates @ vector)
    popularity_weight = weights.popularity * (1.0 + weights.churn_boost * (churn or 0.0))
    if popularity_weight:
        denominator = np.log1p(np.maximum(max_popularity, 1)).astype(np.float32)
        scores += popularity_weight * np.log1p(np.maximum(popularity, 0)).astype(np.float32) / denominator
    if disliked is not None and len(disliked) and weights.dislike:
        scores -= weights.dislike * np.maximum(candidates @ disliked.T, 0.0).max(axis=1)
    if model is not None and weights.model:
        length = float(np.linalg.norm(model))
        if length > 0:
            scores += weights.model * (candidates @ model) / length
    if co_purchases is not None and weights.co_purchase and len(co_purchases):
        strongest = float(np.max(co_purchases))
        if strongest > 0:
            scores += (weights.co_purchase / strongest) * np.maximum(co_purchases, 0).astype(np.float32)
    return scores


def _popular(profile, embedding, k, categories, exclude):
    reply = profile.GetPopularItems(profile_pb2.GetPopularItemsRequest(k=k, categories=categories,
                                                                       exclude_item_ids=exclude), timeout=TIMEOUT)
    if not reply.items:
        return []
    top = reply.items[0].events or 1
    titles = {e.item.item_id: e.item.title for e in embedding.GetItems(embedding_pb2.GetItemsRequest(
        item_ids=[p.item_id for p in reply.items], skip_missing=True), timeout=TIMEOUT).items}
    return [Recommendation(p.item_id, p.category, titles.get(p.item_id, ""), p.events / top,
                           rq.popular_reason(p.category)) for p in reply.items]


def _items(embedding, item_ids):
    if not item_ids:
        return {}
    reply = embedding.GetItems(embedding_pb2.GetItemsRequest(item_ids=item_ids, include_embeddings=True,
                                                            skip_missing=True), timeout=TIMEOUT)
    return {entry.item.item_id: entry for entry in reply.items}


def old_recommend(profile, embedding, weights: Weights, user_id: str, k: int, categories=(), exclude_seen=True,
                  context_ids=(), spread_interests=False, explore_slots=0, config=GatewayConfig()):
    """Composer.recommend at f8ba209, sequential, with the old scoring in process."""
    context_ids = list(dict.fromkeys(context_ids))
    categories = list(dict.fromkeys(categories))
    pool = min(max(config.min_candidates, 3 * k), config.max_candidates)
    co_purchased = profile.GetCoPurchasedItems(profile_pb2.GetCoPurchasedItemsRequest(
        user_id=user_id, k=min(pool, 1000), categories=categories, exclude_item_ids=context_ids,
        anchor_item_ids=context_ids, include_seen=not exclude_seen), timeout=TIMEOUT)
    context_items = _items(embedding, context_ids)
    for position, item_id in enumerate(context_ids):
        if item_id not in context_items:
            raise NotFound(f"context_item_ids[{position}]: no item {item_id!r} in the catalogue")
    shopper = profile.GetProfile(profile_pb2.GetProfileRequest(user_id=user_id,
                                                               history_limit=max(config.explain_history, 1)),
                                 timeout=TIMEOUT)
    queries = [v for v in (shopper.long_term_interest, shopper.short_term_interest, shopper.model_interest)
               if has_values(v)]
    context_vector = None
    if context_items:
        mixed = np.mean([from_vector(e.embedding) for e in context_items.values()], axis=0)
        context_vector = mixed / max(float(np.linalg.norm(mixed)), 1e-6)
        queries.append(to_vector(context_vector))
    if not queries:
        return _popular(profile, embedding, k, categories, context_ids), COLD_START
    interests = list(shopper.interests) if spread_interests else []
    queries += [interest.centroid for interest in interests]
    exclude = list(context_ids) + (list(shopper.seen_item_ids) if exclude_seen else [])
    excluded = set(exclude)
    search = embedding.SearchItems(embedding_pb2.SearchItemsRequest(
        vectors=queries, k=pool, categories=categories, exclude_item_ids=exclude, include_items=True),
        timeout=TIMEOUT)
    history = list(shopper.recent_history[: config.explain_history])
    disliked_ids = list(shopper.preferences.disliked_item_ids)
    history_items = _items(embedding, list(dict.fromkeys([h.item_id for h in history] + disliked_ids)))
    hits = {}
    for result in search.results:
        for hit in result.hits:
            if hit.item_id not in hits or hit.score > hits[hit.item_id].score:
                hits[hit.item_id] = hit
    co_purchases = {i.item_id: i.shoppers for i in co_purchased.items if i.item_id not in excluded}
    only_co_purchased = {i for i in co_purchases if i not in hits}
    extra = _items(embedding, [i.item_id for i in co_purchased.items if i.item_id not in excluded])
    for item_id in sorted(only_co_purchased):
        entry = extra.get(item_id)
        if entry is not None:
            hits[item_id] = embedding_pb2.SearchHit(item_id=item_id, score=0.0, item=entry.item,
                                                    embedding=entry.embedding)
    if not hits:
        return _popular(profile, embedding, k, categories, exclude), COLD_START
    candidate_ids = list(hits)
    popularity = profile.GetItemPopularity(profile_pb2.GetItemPopularityRequest(item_ids=candidate_ids),
                                           timeout=TIMEOUT)

    candidates = np.stack([from_vector(hits[i].embedding) for i in candidate_ids])
    explaining = list(context_items.items()) + [(h.item_id, history_items[h.item_id]) for h in history
                                                 if h.item_id in history_items]
    disliked = [from_vector(history_items[i].embedding) for i in disliked_ids if i in history_items]
    optional = lambda v: from_vector(v) if has_values(v) else None  # noqa: E731
    scores = old_score(optional(shopper.long_term_interest), optional(shopper.short_term_interest), context_vector,
                       np.stack(disliked) if disliked else None, optional(shopper.model_interest),
                       shopper.drift.score,
                       shopper.value.churn_probability if shopper.HasField("value") else None,
                       candidates, np.asarray(popularity.events, dtype=np.float32),
                       np.full(len(candidate_ids), popularity.max_events, dtype=np.float32),
                       np.asarray([co_purchases.get(i, 0) for i in candidate_ids], dtype=np.float32), weights)
    # float32 on the wire, as the old Rank reply carried them
    scores = scores.astype(np.float32)
    rank_k = 0 if interests else k
    order = np.argsort(-scores, kind="stable")[: len(scores) if rank_k <= 0 else min(rank_k, len(scores))]
    because = (np.argmax(candidates[order] @ np.stack([from_vector(e.embedding) for _, e in explaining]).T, axis=1)
               if explaining else np.full(len(order), -1))
    ranked = [(candidate_ids[p], float(scores[p]), explaining[b][0] if b >= 0 else "") for p, b in zip(order, because)]

    reasons = {}
    if interests:
        ranked_scores = np.asarray([s for _, s, _ in ranked], dtype=np.float32)
        vectors = np.stack([from_vector(hits[i].embedding) for i, _, _ in ranked])
        centroids = np.stack([from_vector(i.centroid) for i in interests])
        weights_ = np.asarray([i.weight for i in interests], dtype=np.float64)
        touched = {share.category for share in shopper.interest_categories}
        grains = [interest_category(hits[i].item.category, hits[i].item.category_path) for i, _, _ in ranked]
        novel = np.asarray([g not in touched for g in grains])
        chosen = spread(ranked_scores, vectors, centroids, weights_, k, explore_slots, novel if explore_slots else None)
        nearest = np.argmax(vectors[chosen] @ centroids.T, axis=1)
        for position, interest in zip(chosen, nearest):
            reasons[ranked[position][0]] = (rq.explore_reason(grains[position]) if explore_slots and novel[position]
                                            else rq.interest_reason(interests[interest].label))
        ranked = [ranked[p] for p in chosen]
    event_of = {h.item_id: h for h in reversed(history)}
    out = []
    for item_id, score, because_id in ranked:
        hit = hits[item_id]
        if item_id in reasons:
            reason = reasons[item_id]
        elif because_id in context_items:
            reason = rq.similar_reason(context_items[because_id].item.title)
        elif item_id in only_co_purchased:
            reason = rq.co_purchase_reason(co_purchases[item_id])
        elif because_id in history_items:
            reason = rq.because_reason(event_of[because_id].type, history_items[because_id].item.title)
        else:
            reason = "matches your interests"
        out.append(Recommendation(item_id, hit.item.category, hit.item.title, score, reason))
    return out, PERSONALISED
