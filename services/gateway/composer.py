"""Composes profile, embedding and ranking calls into recommendations.

The composer runs on the gateway's event loop with grpc.aio stubs: a call
downstream holds no thread while it waits. Every outbound call carries a
deadline cut from what the caller has left; calls that do not depend on
each other go out together (asyncio.gather).

A Recommend for a known shopper is four calls in four steps:
profile.GetShopperSignals (profile, co-purchases), embedding.RetrieveCandidates
(search plus every vector feature), profile.GetItemPopularity, ranking.Rank
(ids and features, no vectors); an unknown shopper is one call.

Degrade, never fail: a stage whose service answers UNAVAILABLE (down,
restarting, every replica gone) is skipped, the reply is made from what is
left and names the stages it went without (RecommendResponse.skipped_stages):

- ranking down: candidates in retrieval order;
- embedding down: popular items from the profile service (titles from the
  popular-items cache below);
- profile down: the items being looked at still retrieve and rank (without
  popularity or co-purchases); otherwise the gateway's cache of the profile
  service's most popular items, refreshed in the background while it
  answers (GATEWAY_POPULAR_REFRESH_SECONDS): the last resort, which needs
  no other service at all. Only a gateway that never reached the profile
  service since it started has nothing to answer with (UNAVAILABLE).

Why a cache in the gateway rather than popular items from the embedding
service: popularity is the profile service's knowledge (events), and the
cache keeps a useful answer when *both* other stages are down.
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
# Stages a reply can go without (gateway.v1.Stage).
PROFILE, EMBEDDING, RANKING = "profile", "embedding", "ranking"
MAX_CO_PURCHASED = 1000  # GetShopperSignals' limit
WARN_EVERY_SECONDS = 5.0
_last_warned: dict[str, float] = {}


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    category: str
    title: str
    score: float
    reason: str


def is_unavailable(error: BaseException) -> bool:
    """The callee could not answer: down, draining, or restarting. CANCELLED
    counts: a gRPC error (not asyncio's cancellation of our own handler) with
    that code comes from a replica that cancelled the call as it stopped."""
    return status_code(error) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def describe(error: grpc.RpcError) -> str:
    """One line for the log: the status and its details."""
    code = status_code(error)
    if code is None:
        return str(error)
    return f"{code.name}: {error.details()}"


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
        # The last resort (see the module's doc): popular items and titles.
        self._popular_cache: list[tuple[profile_pb2.PopularItem, str]] = []
        self._popular_fetched = float("-inf")
        self._popular_titles: dict[str, str] = {}
        self._popular_refresh: asyncio.Task | None = None

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
        if self._popular_refresh is not None:
            self._popular_refresh.cancel()
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
                # Tried again in a second, not by every call while embedding is down.
                self._categories_fetched = time.monotonic() - self.config.categories_refresh_seconds + 1.0
                log.warning("could not refresh categories, keeping the cached list: %s", describe(error))
        return self._categories

    # -- popular items, cached: the last resort -------------------------------

    async def refresh_popular(self, timeout: float) -> int:
        """The profile service's most popular items with their titles, kept
        for when it is down. Titles are optional (embedding may be down too)."""
        if self.config.popular_cache_items <= 0:
            return 0
        deadline = time.monotonic() + timeout
        reply = await self.profile.GetPopularItems(
            profile_pb2.GetPopularItemsRequest(k=self.config.popular_cache_items), timeout=timeout)
        titles = {}
        try:
            found = await self.embedding.GetItems(
                embedding_pb2.GetItemsRequest(item_ids=[p.item_id for p in reply.items], skip_missing=True),
                timeout=max(deadline - time.monotonic(), 0.05))
            titles = {entry.item.item_id: entry.item.title for entry in found.items}
        except grpc.RpcError as error:
            log.warning("popular items cached without titles: %s", describe(error))
        if not titles and self._popular_cache:
            titles = {p.item_id: title for p, title in self._popular_cache}
        self._popular_cache = [(p, titles.get(p.item_id, "")) for p in reply.items]
        self._popular_titles = {p.item_id: title for p, title in self._popular_cache if title}
        self._popular_fetched = time.monotonic()
        return len(self._popular_cache)

    @property
    def popular_cached(self) -> int:
        return len(self._popular_cache)

    async def fill_popular(self, pause: float = 1.0) -> None:
        """Fills the cache in the background when start-up could not (the
        profile service still loading): a replica whose first calls come
        while the profile service is down still has popular items to answer
        with, instead of waiting for a call to ask for them."""
        if self.config.popular_cache_items <= 0:
            return
        # The slot the call-driven refresh checks, so the two never run together.
        self._popular_refresh = asyncio.current_task()
        wait = pause
        while not self._popular_cache:
            try:
                if await self.refresh_popular(timeout=2.0):
                    log.info("%d popular items cached", len(self._popular_cache))
                    return
                # A shop with no events yet is asked less and less often, up to the refresh period.
                wait = min(wait * 2, self.config.popular_refresh_seconds)
            except grpc.RpcError as error:
                # Still loading (or down): asked again every `pause`, so the
                # cache fills within a second of profile turning ready.
                log.debug("popular items not cached yet: %s", describe(error))
                wait = pause
            await asyncio.sleep(wait)

    def _refresh_popular_soon(self) -> None:
        """In the background, at most every popular_refresh_seconds: never on a call's path."""
        if time.monotonic() - self._popular_fetched < self.config.popular_refresh_seconds:
            return
        if self._popular_refresh is not None and not self._popular_refresh.done():
            return

        async def refresh():
            try:
                await self.refresh_popular(timeout=2.0)
            except grpc.RpcError as error:
                log.warning("could not refresh the popular-items cache, keeping %d items: %s",
                            len(self._popular_cache), describe(error))
            finally:
                # A failed refresh is tried again after a short pause, not at once on the next call.
                self._popular_fetched = max(self._popular_fetched,
                                            time.monotonic() - self.config.popular_refresh_seconds + 1.0)

        self._popular_refresh = asyncio.get_running_loop().create_task(refresh())

    def cached_popular(self, k: int, categories: list[str], exclude: list[str]) -> list[Recommendation]:
        if not self._popular_cache:
            raise Unavailable("the profile service is unavailable and this gateway has no popular items cached yet")
        wanted, excluded = set(categories), set(exclude)
        chosen = [(p, title) for p, title in self._popular_cache
                  if p.item_id not in excluded and (not wanted or p.category in wanted)][:k]
        return popular_recommendations([p for p, _ in chosen], [title for _, title in chosen])

    @staticmethod
    async def _optional(stage: str, skipped: list[str], call):
        """`call`'s reply, or None with `stage` noted as skipped when its service is unavailable."""
        try:
            return await call
        except grpc.RpcError as error:
            if not is_unavailable(error):
                raise
            # One line per stage every few seconds, not one per call of a busy gateway.
            now = time.monotonic()
            if now - _last_warned.get(stage, float("-inf")) >= WARN_EVERY_SECONDS:
                _last_warned[stage] = now
                log.warning("%s unavailable, answering without it (this warning at most every %.0f s): %s",
                            stage, WARN_EVERY_SECONDS, describe(error))
            if stage not in skipped:
                skipped.append(stage)
            return None

    # -- helpers -----------------------------------------------------------------

    async def _items(self, item_ids: list[str], deadline: Deadline) -> dict[str, embedding_pb2.ItemWithEmbedding]:
        if not item_ids:
            return {}
        reply = await self.embedding.GetItems(
            embedding_pb2.GetItemsRequest(item_ids=item_ids, skip_missing=True),
            timeout=deadline.left(),
        )
        return {entry.item.item_id: entry for entry in reply.items}

    async def _popular(self, k: int, categories: list[str], exclude: list[str], deadline: Deadline,
                       skipped: list[str]) -> list[Recommendation]:
        """Popular items: the profile service's, titled by the embedding
        service (or the cache's titles when it is down); the cached ones when
        the profile service is down too."""
        reply = None
        if PROFILE not in skipped:
            reply = await self._optional(PROFILE, skipped, self.profile.GetPopularItems(
                profile_pb2.GetPopularItemsRequest(k=k, categories=categories, exclude_item_ids=exclude),
                timeout=deadline.left()))
        if reply is None:
            return self.cached_popular(k, categories, exclude)
        titles = {}
        if reply.items and EMBEDDING not in skipped:
            found = await self._optional(EMBEDDING, skipped, self._items([p.item_id for p in reply.items], deadline))
            titles = {i: e.item.title for i, e in (found or {}).items()}
        return popular_recommendations(
            reply.items, [titles.get(p.item_id) or self._popular_titles.get(p.item_id, "") for p in reply.items])

    # -- public operations ----------------------------------------------------

    async def recommend(
        self, user_id: str, k: int, categories: list[str], exclude_seen: bool, context_ids: list[str], deadline: Deadline,
        spread_interests: bool = False, explore_slots: int = 0, model_version: str = "",
    ) -> tuple[list[Recommendation], str, list[str], str]:
        """The recommendations, the path that made them, the stages skipped
        on the way (PROFILE, EMBEDDING, RANKING; empty: none), and the model
        that ranked them as ranking names it ("" when nothing ranked them).
        `model_version`: the model an A/B arm asks ranking for ("" for its own)."""
        rq.check_user_id(user_id)
        rq.check_k(k)
        explore_slots = rq.check_exploration(spread_interests, explore_slots, k)
        context_ids = rq.check_context(context_ids, self.config.max_context_items)
        categories = rq.check_categories(categories, await self.known_categories(deadline))

        pool = min(max(self.config.min_candidates, 3 * k), self.config.max_candidates)
        self._refresh_popular_soon()
        skipped: list[str] = []
        signals = await self._optional(PROFILE, skipped, self.profile.GetShopperSignals(
            profile_pb2.GetShopperSignalsRequest(
                user_id=user_id, history_limit=max(self.config.explain_history, 1),
                # On a product page, what was bought with that product; else with the shopper's items.
                co_purchase_k=min(pool, MAX_CO_PURCHASED), categories=categories, exclude_item_ids=context_ids,
                anchor_item_ids=context_ids, include_seen=not exclude_seen,
                # With context items there is always something to retrieve with.
                popular_k=0 if context_ids else k, include_centroids=spread_interests,
            ),
            timeout=deadline.left(),
        ))
        # Without the profile service: an empty profile (no vectors, no
        # history, nothing seen), so only the context items retrieve.
        profile = signals.profile if signals is not None else profile_pb2.GetProfileResponse()
        # model_interest: a served model's shopper vector (recsys serve --model),
        # which retrieves the items that model scores highest.
        vectors = {name: getattr(profile, name) for name in ("long_term_interest", "short_term_interest", "model_interest")
                   if has_values(getattr(profile, name))}
        if not vectors and not context_ids:
            if signals is None:
                return self.cached_popular(k, categories, context_ids), FALLBACK, skipped, ""
            return popular_recommendations(signals.popular, signals.popular_titles), COLD_START, skipped, ""
        # Each interest retrieves its own neighbourhood, so that a minor
        # interest has candidates to fill its slots with.
        interests = list(profile.interests) if spread_interests else []

        exclude = list(context_ids)
        if exclude_seen:
            exclude += list(profile.seen_item_ids)
        excluded = set(exclude)
        # Other shoppers' baskets: candidates the shopper's vectors alone would
        # not retrieve, above all in a category they never shopped in.
        co_purchased = signals.co_purchased if signals is not None else []
        co_purchases = {item.item_id: item.shoppers for item in co_purchased if item.item_id not in excluded}
        history = list(profile.recent_history[: self.config.explain_history])
        raw = await self._retrieve(
            embedding_pb2.RetrieveCandidatesRequest(
                **vectors, context_item_ids=context_ids, interest_centroids=[i.centroid for i in interests],
                extra_item_ids=list(co_purchases), history_item_ids=[h.item_id for h in history],
                disliked_item_ids=list(profile.preferences.disliked_item_ids), k=pool, categories=categories,
                exclude_item_ids=exclude, model_version=profile.vectors_model_version,
            ),
            deadline, skipped,
        )
        if raw is None:
            # The embedding service is down: popular items beat an error for a storefront.
            return await self._popular(k, categories, exclude, deadline, skipped), FALLBACK, skipped, ""
        retrieved, candidates, ids = await self._cpu(parse_candidates, raw)
        if not candidates:
            popular = await self._popular(k, categories, exclude, deadline, skipped)
            return popular, (FALLBACK if skipped else COLD_START), skipped, ""
        popularity = None
        if PROFILE not in skipped:
            popularity = await self._optional(PROFILE, skipped, self.profile.GetItemPopularity(
                profile_pb2.GetItemPopularityRequest(item_ids=ids), timeout=deadline.left()))
        if popularity is None:
            # Ranked on similarity and the rest; no popularity prior.
            popularity = profile_pb2.GetItemPopularityResponse(events=[0] * len(ids), max_events=0)
        request = await self._cpu(rank_request, profile, candidates, popularity, co_purchases, 0 if interests else k)
        request.model_version = model_version
        ranked, ranked_by = await self._rank(request, deadline, skipped)
        if ranked is None:
            # Ranking is down: retrieval similarity alone still orders well.
            ordered = sorted(candidates, key=lambda c: -c.retrieval_score)[:k]
            return [
                Recommendation(c.item.item_id, c.item.category, c.item.title, c.retrieval_score,
                               "close to your recent interests")
                for c in ordered
            ], FALLBACK, skipped, ""
        recommendations = await self._cpu(self._compose, ranked, candidates, retrieved, interests, profile, history,
                                          co_purchases, k, explore_slots)
        return recommendations, (FALLBACK if skipped else PERSONALISED), skipped, ranked_by

    async def _retrieve(self, request: embedding_pb2.RetrieveCandidatesRequest, deadline: Deadline,
                        skipped: list[str]) -> bytes | None:
        """RetrieveCandidates' raw reply; None with the stage skipped when
        the embedding service is unavailable. The profile's vectors are
        searched only in the index of the encoder version that made them
        (the request's model_version): a replica that no longer holds that
        version answers FAILED_PRECONDITION, tried once more (another replica
        may hold it, or the profile moved on), then the stage is skipped as
        if down: popular items, never one encoder's vectors in another's index."""
        self._connect()
        for _ in range(2):
            try:
                return await self._optional(EMBEDDING, skipped, self._retrieve_raw(request, timeout=deadline.left()))
            except grpc.RpcError as error:
                if status_code(error) != grpc.StatusCode.FAILED_PRECONDITION or not request.model_version:
                    raise
                refused = error
        now = time.monotonic()
        if now - _last_warned.get("vectors_version", float("-inf")) >= WARN_EVERY_SECONDS:
            _last_warned["vectors_version"] = now
            log.warning("retrieval refused the profile's %s vectors twice, answering without it (this warning at "
                        "most every %.0f s): %s", request.model_version, WARN_EVERY_SECONDS, describe(refused))
        skipped.append(EMBEDDING)
        return None

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

    async def _rank(self, request: ranking_pb2.RankRequest, deadline: Deadline, skipped: list[str]):
        """The ranked candidates and the model ranking says scored them; (None, "") when ranking was skipped."""
        try:
            reply = await self._optional(RANKING, skipped, self.ranking.Rank(request, timeout=deadline.left()))
        except grpc.RpcError as error:
            # An A/B arm naming a version ranking cannot load: the shopper
            # still gets a list (retrieval order, as with ranking down), and
            # the reply's empty model_version shows it in the exposure log.
            if not request.model_version or status_code(error) != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            now = time.monotonic()
            if now - _last_warned.get("model_version", float("-inf")) >= WARN_EVERY_SECONDS:
                _last_warned["model_version"] = now
                log.warning("ranking cannot serve %s, answering unranked (this warning at most every %.0f s): %s",
                            request.model_version, WARN_EVERY_SECONDS, describe(error))
            skipped.append(RANKING)
            return None, ""
        return (None, "") if reply is None else (list(reply.candidates), reply.model_version)

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

    async def similar_items(self, item_id: str, k: int, categories: list[str],
                            deadline: Deadline) -> tuple[list[Recommendation], str]:
        """The item's nearest neighbours and the model version that found
        them. One SearchItems with the item as its query: the embedding
        service reads the item's vector from the version whose index it
        searches. (Reading the vector with GetItems first and searching with
        it after paired one encoder's vector with another's index whenever a
        promotion swapped versions between the two calls.)"""
        rq.check_item_id(item_id, "item_id")
        rq.check_k(k)
        categories = rq.check_categories(categories, await self.known_categories(deadline))
        try:
            search = await self.embedding.SearchItems(
                embedding_pb2.SearchItemsRequest(
                    query_item_ids=[item_id], k=k, categories=categories, exclude_item_ids=[item_id],
                    include_items=True,
                ),
                timeout=deadline.left(),
            )
        except grpc.RpcError as error:
            if status_code(error) != grpc.StatusCode.NOT_FOUND:
                raise
            # The caller's field, not the embedding service's.
            raise NotFound(f"item_id: no item {item_id!r} in the catalogue") from None
        reason = rq.similar_reason(search.query_items[0].title)
        return [
            Recommendation(h.item_id, h.item.category, h.item.title, h.score, reason) for h in search.results[0].hits
        ], search.model_version
