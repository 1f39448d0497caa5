"""Composes profile, embedding and ranking calls into recommendations.

Every outbound call carries a deadline cut from what the caller has left.
Calls that do not depend on each other run concurrently (futures).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.errors import NotFound, Unavailable
from recsys_core.rpc.grpc_util import Deadline, channel
from recsys_core.signals.interests import interest_category, spread
from recsys_core.rpc.messages import from_vector, has_values, to_vector
from services.gateway import requests as rq
from services.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

PERSONALISED, COLD_START, FALLBACK = "personalised", "cold_start", "fallback"
MAX_CO_PURCHASED = 1000  # GetCoPurchasedItems' limit


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    category: str
    title: str
    score: float
    reason: str


def is_unavailable(error: grpc.RpcError) -> bool:
    return isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNAVAILABLE


class Composer:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self._channels = [
            channel(config.profile_address, config.security, "profile"),
            channel(config.embedding_address, config.security, "embedding"),
            channel(config.ranking_address, config.security, "ranking"),
        ]
        self.profile = profile_pb2_grpc.ProfileServiceStub(self._channels[0])
        self.embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channels[1])
        self.ranking = ranking_pb2_grpc.RankingServiceStub(self._channels[2])
        self._categories: frozenset[str] = frozenset()
        self._categories_fetched = 0.0
        self._categories_lock = threading.Lock()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    # -- catalogue categories, cached -----------------------------------------

    def refresh_categories(self, timeout: float) -> frozenset[str]:
        reply = self.embedding.ListCategories(embedding_pb2.ListCategoriesRequest(), timeout=timeout)
        with self._categories_lock:
            self._categories = frozenset(c.name for c in reply.categories)
            self._categories_fetched = time.monotonic()
        return self._categories

    def known_categories(self, deadline: Deadline) -> frozenset[str]:
        if time.monotonic() - self._categories_fetched > self.config.categories_refresh_seconds:
            try:
                return self.refresh_categories(min(deadline.left(), 1.0))
            except grpc.RpcError as error:
                log.warning("could not refresh categories, keeping the cached list: %s", error)
        return self._categories

    # -- helpers -----------------------------------------------------------------

    def _items(self, item_ids: list[str], deadline: Deadline, embeddings: bool) -> dict[str, embedding_pb2.ItemWithEmbedding]:
        return self._items_result(self._items_future(item_ids, deadline, embeddings))

    def _items_future(self, item_ids: list[str], deadline: Deadline, embeddings: bool = True):
        """A GetItems call started now (None for no ids), read with _items_result:
        lets Recommend fetch items while the search runs."""
        if not item_ids:
            return None
        return self.embedding.GetItems.future(
            embedding_pb2.GetItemsRequest(item_ids=item_ids, include_embeddings=embeddings, skip_missing=True),
            timeout=deadline.left(),
        )

    @staticmethod
    def _items_result(call) -> dict[str, embedding_pb2.ItemWithEmbedding]:
        return {} if call is None else {entry.item.item_id: entry for entry in call.result().items}

    def _popular(self, k: int, categories: list[str], exclude: list[str], deadline: Deadline, with_titles: bool):
        reply = self.profile.GetPopularItems(
            profile_pb2.GetPopularItemsRequest(k=k, categories=categories, exclude_item_ids=exclude),
            timeout=deadline.left(),
        )
        if not reply.items:
            return []
        top = reply.items[0].events or 1
        titles = {}
        if with_titles:
            titles = {i: e.item.title for i, e in self._items([p.item_id for p in reply.items], deadline, False).items()}
        return [
            Recommendation(p.item_id, p.category, titles.get(p.item_id, ""), p.events / top, rq.popular_reason(p.category))
            for p in reply.items
        ]

    # -- public operations ----------------------------------------------------

    def recommend(
        self, user_id: str, k: int, categories: list[str], exclude_seen: bool, context_ids: list[str], deadline: Deadline,
        spread_interests: bool = False, explore_slots: int = 0,
    ) -> tuple[list[Recommendation], str]:
        rq.check_user_id(user_id)
        rq.check_k(k)
        explore_slots = rq.check_exploration(spread_interests, explore_slots, k)
        context_ids = rq.check_context(context_ids, self.config.max_context_items)
        categories = rq.check_categories(categories, self.known_categories(deadline))

        pool = min(max(self.config.min_candidates, 3 * k), self.config.max_candidates)
        profile_call = self.profile.GetProfile.future(
            profile_pb2.GetProfileRequest(user_id=user_id, history_limit=max(self.config.explain_history, 1)),
            timeout=deadline.left(),
        )
        co_purchase_call = self.profile.GetCoPurchasedItems.future(
            # On a product page, what was bought with that product; else with the shopper's items.
            profile_pb2.GetCoPurchasedItemsRequest(user_id=user_id, k=min(pool, MAX_CO_PURCHASED), categories=categories,
                                                   exclude_item_ids=context_ids, anchor_item_ids=context_ids,
                                                   include_seen=not exclude_seen),
            timeout=deadline.left(),
        )
        try:
            context_items = self._items(context_ids, deadline, embeddings=True)
        except grpc.RpcError as error:
            if not is_unavailable(error):
                raise
            return self._fallback(k, categories, context_ids, deadline)
        for position, item_id in enumerate(context_ids):
            if item_id not in context_items:
                raise NotFound(f"context_item_ids[{position}]: no item {item_id!r} in the catalogue")
        profile = profile_call.result()

        queries = []
        # model_interest: a served model's shopper vector (recsys serve --model),
        # which retrieves the items that model scores highest.
        for vector in (profile.long_term_interest, profile.short_term_interest, profile.model_interest):
            if has_values(vector):
                queries.append(vector)
        context_vector = None
        if context_items:
            mixed = np.mean([from_vector(e.embedding) for e in context_items.values()], axis=0)
            context_vector = to_vector(mixed / max(float(np.linalg.norm(mixed)), 1e-6))
            queries.append(context_vector)
        if not queries:
            return self._popular(k, categories, context_ids, deadline, with_titles=True), COLD_START
        # Each interest retrieves its own neighbourhood, so that a minor
        # interest has candidates to fill its slots with.
        interests = list(profile.interests) if spread_interests else []
        queries += [interest.centroid for interest in interests]

        exclude = list(context_ids)
        if exclude_seen:
            exclude += list(profile.seen_item_ids)
        excluded = set(exclude)
        search_call = self.embedding.SearchItems.future(
            embedding_pb2.SearchItemsRequest(
                vectors=queries, k=pool, categories=categories, exclude_item_ids=exclude, include_items=True
            ),
            timeout=deadline.left(),
        )
        # The exact search is the slowest call (it scans every vector); what
        # does not depend on its hits is asked for while it runs. The replies
        # are read below where the sequential code read them, so errors
        # surface in the same order.
        history = list(profile.recent_history[: self.config.explain_history])
        disliked_ids = list(profile.preferences.disliked_item_ids)
        history_call = self._items_future(list(dict.fromkeys([h.item_id for h in history] + disliked_ids)), deadline)
        co_purchased_call = None
        if co_purchase_call.exception() is None:
            # Every co-purchased candidate, though those the search also
            # finds need no embedding from here: nearly all are not found.
            co_purchased_call = self._items_future(
                [item.item_id for item in co_purchase_call.result().items if item.item_id not in excluded], deadline
            )
        try:
            search = search_call.result()
        except grpc.RpcError as error:
            if not is_unavailable(error):
                raise
            return self._fallback(k, categories, exclude, deadline)
        hits: dict[str, embedding_pb2.SearchHit] = {}
        for result in search.results:
            for hit in result.hits:
                if hit.item_id not in hits or hit.score > hits[hit.item_id].score:
                    hits[hit.item_id] = hit
        # Other shoppers' baskets: candidates the shopper's vectors alone would
        # not retrieve, above all in a category they never shopped in.
        co_purchases = {item.item_id: item.shoppers for item in self._co_purchased(co_purchase_call)
                        if item.item_id not in excluded}
        only_co_purchased = {item_id for item_id in co_purchases if item_id not in hits}
        co_purchased_items = self._items_result(co_purchased_call) if only_co_purchased else {}
        for item_id in sorted(only_co_purchased):
            entry = co_purchased_items.get(item_id)
            if entry is not None:  # not in the catalogue (any more)
                hits[item_id] = embedding_pb2.SearchHit(item_id=item_id, score=0.0, item=entry.item,
                                                        embedding=entry.embedding)
        if not hits:
            return self._popular(k, categories, exclude, deadline, with_titles=True), COLD_START
        candidate_ids = list(hits)

        popularity_call = self.profile.GetItemPopularity.future(
            profile_pb2.GetItemPopularityRequest(item_ids=candidate_ids), timeout=deadline.left()
        )
        history_items = self._items_result(history_call)
        popularity = popularity_call.result()

        ranked = self._rank(profile, context_vector, context_items, history, history_items, hits, candidate_ids,
                            popularity, co_purchases, 0 if interests else k, deadline)
        if ranked is None:
            # Ranking is down: retrieval similarity alone still orders well.
            ordered = sorted(hits.values(), key=lambda h: -h.score)[:k]
            return [
                Recommendation(h.item_id, h.item.category, h.item.title, h.score, "close to your recent interests")
                for h in ordered
            ], FALLBACK

        spread_reasons = {}
        if interests:
            ranked, spread_reasons = self._spread(ranked, hits, interests, profile, k, explore_slots)
        event_of = {h.item_id: h for h in reversed(history)}  # the latest event wins
        recommendations = []
        for scored in ranked:
            hit = hits[scored.item_id]
            because = scored.because_item_id
            if scored.item_id in spread_reasons:
                reason = spread_reasons[scored.item_id]
            elif because in context_items:
                reason = rq.similar_reason(context_items[because].item.title)
            elif scored.item_id in only_co_purchased:
                reason = rq.co_purchase_reason(co_purchases[scored.item_id])
            elif because in history_items:
                reason = rq.because_reason(event_of[because].type, history_items[because].item.title)
            else:
                reason = "matches your interests"
            recommendations.append(Recommendation(hit.item_id, hit.item.category, hit.item.title, scored.score, reason))
        return recommendations, PERSONALISED

    @staticmethod
    def _spread(ranked, hits, interests, profile, k: int, explore: int):
        """The ranked candidates spread across the shopper's interests
        (recsys_core.signals.interests.spread, the rule docs/profiles.md measures),
        with the reason each was picked."""
        scores = np.asarray([c.score for c in ranked], dtype=np.float32)
        vectors = np.stack([from_vector(hits[c.item_id].embedding) for c in ranked])
        centroids = np.stack([from_vector(i.centroid) for i in interests])
        weights = np.asarray([i.weight for i in interests], dtype=np.float64)
        touched = {share.category for share in profile.interest_categories}
        grains = [interest_category(hits[c.item_id].item.category, hits[c.item_id].item.category_path) for c in ranked]
        novel = np.asarray([grain not in touched for grain in grains])
        chosen = spread(scores, vectors, centroids, weights, k, explore, novel if explore else None)
        nearest = np.argmax(vectors[chosen] @ centroids.T, axis=1)
        reasons = {}
        for position, interest in zip(chosen, nearest):
            item_id = ranked[position].item_id
            reasons[item_id] = (rq.explore_reason(grains[position]) if explore and novel[position]
                                else rq.interest_reason(interests[interest].label))
        return [ranked[position] for position in chosen], reasons

    def _rank(self, profile, context_vector, context_items, history, history_items, hits, candidate_ids, popularity,
              co_purchases, k, deadline):
        user = ranking_pb2.UserFeatures(
            long_term_interest=profile.long_term_interest,
            short_term_interest=profile.short_term_interest,
            # Items being looked at can explain a recommendation too.
            recent_items=[
                ranking_pb2.HistoryItem(item_id=item_id, embedding=entry.embedding)
                for item_id, entry in context_items.items()
            ] + [
                ranking_pb2.HistoryItem(item_id=h.item_id, embedding=history_items[h.item_id].embedding)
                for h in history
                if h.item_id in history_items
            ],
            drift_score=profile.drift.score,
            model_interest=profile.model_interest,
            disliked=[
                history_items[item_id].embedding
                for item_id in profile.preferences.disliked_item_ids
                if item_id in history_items
            ],
        )
        if profile.HasField("value"):
            user.churn_probability = profile.value.churn_probability
        if context_vector is not None:
            user.context_interest.CopyFrom(context_vector)
        candidates = [
            ranking_pb2.Candidate(
                item_id=item_id,
                embedding=hits[item_id].embedding,
                popularity=count,
                max_popularity=popularity.max_events,
                co_purchases=co_purchases.get(item_id, 0),
            )
            for item_id, count in zip(candidate_ids, popularity.events)
        ]
        try:
            reply = self.ranking.Rank(
                ranking_pb2.RankRequest(user=user, candidates=candidates, k=k), timeout=deadline.left()
            )
        except grpc.RpcError as error:
            if not is_unavailable(error):
                raise
            log.warning("ranking unavailable, answering in retrieval order")
            return None
        return reply.candidates

    @staticmethod
    def _co_purchased(call) -> list:
        """Co-purchases are an extra signal: a profile service without them
        (older, or down since the profile came back) leaves ranking to the rest."""
        try:
            return list(call.result().items)
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call) and error.code() in (grpc.StatusCode.UNAVAILABLE,
                                                                  grpc.StatusCode.UNIMPLEMENTED):
                log.warning("co-purchases unavailable, ranking without them: %s", error.code())
                return []
            raise

    def _fallback(self, k, categories, exclude, deadline):
        """The embedding service is down: popular items from the profile
        service, without titles, beat an error for a storefront."""
        log.warning("embedding service unavailable, answering with popular items")
        try:
            return self._popular(k, categories, exclude, deadline, with_titles=False), FALLBACK
        except grpc.RpcError as error:
            if is_unavailable(error):
                raise Unavailable("the profile and embedding services are both unavailable") from error
            raise

    def shopper_profile(self, user_id: str, history_limit: int, deadline: Deadline) -> profile_pb2.GetProfileResponse:
        rq.check_user_id(user_id)
        return self.profile.GetProfile(
            profile_pb2.GetProfileRequest(user_id=user_id, history_limit=history_limit), timeout=deadline.left()
        )

    def similar_items(self, item_id: str, k: int, categories: list[str], deadline: Deadline) -> list[Recommendation]:
        rq.check_item_id(item_id, "item_id")
        rq.check_k(k)
        categories = rq.check_categories(categories, self.known_categories(deadline))
        anchor = self._items([item_id], deadline, embeddings=True).get(item_id)
        if anchor is None:
            raise NotFound(f"item_id: no item {item_id!r} in the catalogue")
        search = self.embedding.SearchItems(
            embedding_pb2.SearchItemsRequest(
                vectors=[anchor.embedding], k=k, categories=categories, exclude_item_ids=[item_id], include_items=True
            ),
            timeout=deadline.left(),
        )
        reason = rq.similar_reason(anchor.item.title)
        return [
            Recommendation(h.item_id, h.item.category, h.item.title, h.score, reason) for h in search.results[0].hits
        ]
