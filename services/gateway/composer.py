"""Composes profile, embedding and ranking calls into recommendations.

The composer runs on the gateway's event loop with grpc.aio stubs: a call
downstream holds no thread while it waits. Every outbound call carries a
deadline cut from what the caller has left; calls that do not depend on
each other go out together (asyncio.gather).

A Recommend for a known shopper is four calls in four steps:
profile.GetShopperSignals (profile, co-purchases), embedding.RetrieveCandidates
(search plus every vector feature), profile.GetItemPopularity, ranking.Rank
(ids and features, no vectors); an unknown shopper is one call.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np

from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.errors import NotFound, Unavailable
from recsys_core.rpc.grpc_util import Deadline, aio_channel, status_code
from recsys_core.rpc.messages import has_values
from recsys_core.signals.interests import interest_category, spread_by_similarity
from services.gateway import requests as rq
from services.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

PERSONALISED, COLD_START, FALLBACK = "personalised", "cold_start", "fallback"
MAX_CO_PURCHASED = 1000  # GetShopperSignals' limit


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    category: str
    title: str
    score: float
    reason: str


def is_unavailable(error: BaseException) -> bool:
    return status_code(error) == grpc.StatusCode.UNAVAILABLE


def popular_recommendations(items, titles) -> list[Recommendation]:
    """Popular items as a reply, scored relative to the most popular one."""
    if not items:
        return []
    top = items[0].events or 1
    return [
        Recommendation(p.item_id, p.category, title, p.events / top, rq.popular_reason(p.category))
        for p, title in zip(items, titles)
    ]


async def run_inline(function, *args):
    return function(*args)


def parse_candidates(raw: bytes):
    """RetrieveCandidates' reply, its candidates and their ids."""
    retrieved = embedding_pb2.RetrieveCandidatesResponse.FromString(raw)
    candidates = list(retrieved.candidates)
    return retrieved, candidates, [c.item.item_id for c in candidates]


def rank_request(profile, candidates, popularity, co_purchases: dict[str, int], k: int) -> ranking_pb2.RankRequest:
    user = ranking_pb2.UserFeatures(drift_score=profile.drift.score)
    if profile.HasField("value"):
        user.churn_probability = profile.value.churn_probability
    return ranking_pb2.RankRequest(
        user=user,
        candidates=[
            ranking_pb2.Candidate(
                item_id=candidate.item.item_id,
                features=candidate.features,
                popularity=count,
                max_popularity=popularity.max_events,
                co_purchases=co_purchases.get(candidate.item.item_id, 0),
            )
            for candidate, count in zip(candidates, popularity.events)
        ],
        k=k,
    )


class Composer:
    def __init__(self, config: GatewayConfig, run_cpu=run_inline, tracing=None):
        self.config = config
        # The gateway server's tracing (ManagedServer.tracing): a client span
        # per downstream call, the trace context sent along.
        self._tracing = tracing
        # Runs the message work between calls (parsing the candidates,
        # building Rank's request, wording the reply) off the event loop: the
        # server's pool (BlockingPool.run_admitted), so that a burst of large
        # requests does not keep the loop from accepting calls.
        self._cpu = run_cpu
        self._channels: list[grpc.aio.Channel] = []
        self._categories: frozenset[str] = frozenset()
        self._categories_fetched = 0.0

    def _connect(self) -> None:
        """The channels, made on first use: aio channels belong to the event
        loop they are made on, the gateway server's, which runs every call."""
        if self._channels:
            return
        self._channels = [aio_channel(address, self.config.security, service, self._tracing) for address, service in (
            (self.config.profile_address, "profile"), (self.config.embedding_address, "embedding"),
            (self.config.ranking_address, "ranking"))]
        self._profile = profile_pb2_grpc.ProfileServiceStub(self._channels[0])
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channels[1])
        self._ranking = ranking_pb2_grpc.RankingServiceStub(self._channels[2])
        # Raw bytes back, parsed in the pool (`_cpu`): the largest reply.
        self._retrieve_raw = self._channels[1].unary_unary(
            "/recsys.embedding.v1.EmbeddingService/RetrieveCandidates",
            request_serializer=embedding_pb2.RetrieveCandidatesRequest.SerializeToString,
        )

    @property
    def profile(self) -> profile_pb2_grpc.ProfileServiceStub:
        self._connect()
        return self._profile

    @property
    def embedding(self) -> embedding_pb2_grpc.EmbeddingServiceStub:
        self._connect()
        return self._embedding

    @property
    def ranking(self) -> ranking_pb2_grpc.RankingServiceStub:
        self._connect()
        return self._ranking

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        await asyncio.gather(*(channel.close() for channel in channels))

    # -- catalogue categories, cached -----------------------------------------

    async def refresh_categories(self, timeout: float) -> frozenset[str]:
        reply = await self.embedding.ListCategories(embedding_pb2.ListCategoriesRequest(), timeout=timeout)
        self._categories = frozenset(c.name for c in reply.categories)
        self._categories_fetched = time.monotonic()
        return self._categories

    async def known_categories(self, deadline: Deadline) -> frozenset[str]:
        if time.monotonic() - self._categories_fetched > self.config.categories_refresh_seconds:
            try:
                return await self.refresh_categories(min(deadline.left(), 1.0))
            except grpc.RpcError as error:
                log.warning("could not refresh categories, keeping the cached list: %s", error)
        return self._categories

    # -- helpers -----------------------------------------------------------------

    async def _items(self, item_ids: list[str], deadline: Deadline, embeddings: bool) -> dict[str, embedding_pb2.ItemWithEmbedding]:
        if not item_ids:
            return {}
        reply = await self.embedding.GetItems(
            embedding_pb2.GetItemsRequest(item_ids=item_ids, include_embeddings=embeddings, skip_missing=True),
            timeout=deadline.left(),
        )
        return {entry.item.item_id: entry for entry in reply.items}

    async def _popular(self, k: int, categories: list[str], exclude: list[str], deadline: Deadline, with_titles: bool):
        reply = await self.profile.GetPopularItems(
            profile_pb2.GetPopularItemsRequest(k=k, categories=categories, exclude_item_ids=exclude),
            timeout=deadline.left(),
        )
        titles = {}
        if with_titles and reply.items:
            titles = {i: e.item.title for i, e in (await self._items([p.item_id for p in reply.items], deadline, False)).items()}
        return popular_recommendations(reply.items, [titles.get(p.item_id, "") for p in reply.items])

    # -- public operations ----------------------------------------------------

    async def recommend(
        self, user_id: str, k: int, categories: list[str], exclude_seen: bool, context_ids: list[str], deadline: Deadline,
        spread_interests: bool = False, explore_slots: int = 0,
    ) -> tuple[list[Recommendation], str]:
        rq.check_user_id(user_id)
        rq.check_k(k)
        explore_slots = rq.check_exploration(spread_interests, explore_slots, k)
        context_ids = rq.check_context(context_ids, self.config.max_context_items)
        categories = rq.check_categories(categories, await self.known_categories(deadline))

        pool = min(max(self.config.min_candidates, 3 * k), self.config.max_candidates)
        signals = await self.profile.GetShopperSignals(
            profile_pb2.GetShopperSignalsRequest(
                user_id=user_id, history_limit=max(self.config.explain_history, 1),
                # On a product page, what was bought with that product; else with the shopper's items.
                co_purchase_k=min(pool, MAX_CO_PURCHASED), categories=categories, exclude_item_ids=context_ids,
                anchor_item_ids=context_ids, include_seen=not exclude_seen,
                # With context items there is always something to retrieve with.
                popular_k=0 if context_ids else k, include_centroids=spread_interests,
            ),
            timeout=deadline.left(),
        )
        profile = signals.profile
        # model_interest: a served model's shopper vector (recsys serve --model),
        # which retrieves the items that model scores highest.
        vectors = {name: getattr(profile, name) for name in ("long_term_interest", "short_term_interest", "model_interest")
                   if has_values(getattr(profile, name))}
        if not vectors and not context_ids:
            return popular_recommendations(signals.popular, signals.popular_titles), COLD_START
        # Each interest retrieves its own neighbourhood, so that a minor
        # interest has candidates to fill its slots with.
        interests = list(profile.interests) if spread_interests else []

        exclude = list(context_ids)
        if exclude_seen:
            exclude += list(profile.seen_item_ids)
        excluded = set(exclude)
        # Other shoppers' baskets: candidates the shopper's vectors alone would
        # not retrieve, above all in a category they never shopped in.
        co_purchases = {item.item_id: item.shoppers for item in signals.co_purchased if item.item_id not in excluded}
        history = list(profile.recent_history[: self.config.explain_history])
        self._connect()
        try:
            raw = await self._retrieve_raw(
                embedding_pb2.RetrieveCandidatesRequest(
                    **vectors, context_item_ids=context_ids, interest_centroids=[i.centroid for i in interests],
                    extra_item_ids=list(co_purchases), history_item_ids=[h.item_id for h in history],
                    disliked_item_ids=list(profile.preferences.disliked_item_ids), k=pool, categories=categories,
                    exclude_item_ids=exclude,
                ),
                timeout=deadline.left(),
            )
        except grpc.RpcError as error:
            if not is_unavailable(error):
                raise
            return await self._fallback(k, categories, exclude, deadline)
        retrieved, candidates, ids = await self._cpu(parse_candidates, raw)
        if not candidates:
            return await self._popular(k, categories, exclude, deadline, with_titles=True), COLD_START
        popularity = await self.profile.GetItemPopularity(
            profile_pb2.GetItemPopularityRequest(item_ids=ids), timeout=deadline.left()
        )
        request = await self._cpu(rank_request, profile, candidates, popularity, co_purchases, 0 if interests else k)
        ranked = await self._rank(request, deadline)
        if ranked is None:
            # Ranking is down: retrieval similarity alone still orders well.
            ordered = sorted(candidates, key=lambda c: -c.retrieval_score)[:k]
            return [
                Recommendation(c.item.item_id, c.item.category, c.item.title, c.retrieval_score,
                               "close to your recent interests")
                for c in ordered
            ], FALLBACK
        return await self._cpu(self._compose, ranked, candidates, retrieved, interests, profile, history,
                               co_purchases, k, explore_slots), PERSONALISED

    def _compose(self, ranked, candidates, retrieved, interests, profile, history, co_purchases, k: int,
                 explore_slots: int) -> list[Recommendation]:
        """The ranked list spread over interests if asked, each item with its reason."""
        by_id = {c.item.item_id: c for c in candidates}
        spread_reasons = {}
        if interests:
            ranked, spread_reasons = self._spread(ranked, by_id, interests, profile, k, explore_slots)
        context_titles = {item.item_id: item.title for item in retrieved.context_items}
        history_titles = {item.item_id: item.title for item in retrieved.history_items}
        event_of = {h.item_id: h for h in reversed(history)}  # the latest event wins
        recommendations = []
        for scored in ranked:
            candidate = by_id[scored.item_id]
            because = candidate.because_item_id
            if scored.item_id in spread_reasons:
                reason = spread_reasons[scored.item_id]
            elif because in context_titles:
                reason = rq.similar_reason(context_titles[because])
            elif not candidate.retrieved:
                reason = rq.co_purchase_reason(co_purchases[scored.item_id])
            elif because in history_titles:
                reason = rq.because_reason(event_of[because].type, history_titles[because])
            else:
                reason = "matches your interests"
            item = candidate.item
            recommendations.append(Recommendation(item.item_id, item.category, item.title, scored.score, reason))
        return recommendations

    @staticmethod
    def _spread(ranked, by_id, interests, profile, k: int, explore: int):
        """The ranked candidates spread across the shopper's interests
        (recsys_core.signals.interests.spread, the rule docs/profiles.md measures),
        with the reason each was picked. Each candidate's similarity to each
        interest comes from the embedding service, so no vector travels for it."""
        scores = np.asarray([c.score for c in ranked], dtype=np.float32)
        similarity = np.asarray([by_id[c.item_id].interest_similarities for c in ranked],
                                dtype=np.float32).reshape(len(ranked), len(interests))
        weights = np.asarray([i.weight for i in interests], dtype=np.float64)
        touched = {share.category for share in profile.interest_categories}
        grains = [interest_category(by_id[c.item_id].item.category, by_id[c.item_id].item.category_path)
                  for c in ranked]
        novel = np.asarray([grain not in touched for grain in grains])
        chosen = spread_by_similarity(scores, similarity, weights, k, explore, novel if explore else None)
        nearest = np.argmax(similarity[chosen], axis=1)
        reasons = {}
        for position, interest in zip(chosen, nearest):
            item_id = ranked[position].item_id
            reasons[item_id] = (rq.explore_reason(grains[position]) if explore and novel[position]
                                else rq.interest_reason(interests[interest].label))
        return [ranked[position] for position in chosen], reasons

    async def _rank(self, request: ranking_pb2.RankRequest, deadline: Deadline):
        try:
            reply = await self.ranking.Rank(request, timeout=deadline.left())
        except grpc.RpcError as error:
            if not is_unavailable(error):
                raise
            log.warning("ranking unavailable, answering in retrieval order")
            return None
        return list(reply.candidates)

    async def _fallback(self, k, categories, exclude, deadline):
        """The embedding service is down: popular items from the profile
        service, without titles, beat an error for a storefront."""
        log.warning("embedding service unavailable, answering with popular items")
        try:
            return await self._popular(k, categories, exclude, deadline, with_titles=False), FALLBACK
        except grpc.RpcError as error:
            if is_unavailable(error):
                raise Unavailable("the profile and embedding services are both unavailable") from error
            raise

    async def shopper_profile(self, user_id: str, history_limit: int, deadline: Deadline) -> profile_pb2.GetProfileResponse:
        rq.check_user_id(user_id)
        return await self.profile.GetProfile(
            profile_pb2.GetProfileRequest(user_id=user_id, history_limit=history_limit), timeout=deadline.left()
        )

    async def delete_user(self, user_id: str, deadline: Deadline) -> profile_pb2.DeleteUserResponse:
        """Forget the shopper: the profile service holds everything made of
        their events (the gateway and the embedding service keep nothing of
        a shopper between calls)."""
        rq.check_user_id(user_id)
        return await self.profile.DeleteUser(profile_pb2.DeleteUserRequest(user_id=user_id), timeout=deadline.left())

    async def similar_items(self, item_id: str, k: int, categories: list[str], deadline: Deadline) -> list[Recommendation]:
        rq.check_item_id(item_id, "item_id")
        rq.check_k(k)
        categories = rq.check_categories(categories, await self.known_categories(deadline))
        anchor = (await self._items([item_id], deadline, embeddings=True)).get(item_id)
        if anchor is None:
            raise NotFound(f"item_id: no item {item_id!r} in the catalogue")
        search = await self.embedding.SearchItems(
            embedding_pb2.SearchItemsRequest(
                vectors=[anchor.embedding], k=k, categories=categories, exclude_item_ids=[item_id], include_items=True
            ),
            timeout=deadline.left(),
        )
        reason = rq.similar_reason(anchor.item.title)
        return [
            Recommendation(h.item_id, h.item.category, h.item.title, h.score, reason) for h in search.results[0].hits
        ]
