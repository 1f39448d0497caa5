"""gRPC face of the profile book: parse, call the domain in the server's
blocking pool (the store, the embedding lookups and the maths block), build the reply."""
from __future__ import annotations

from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys_core.rpc.access import audit
from recsys_core.rpc.grpc_util import Readiness, handle_errors, Deadline
from recsys_core.rpc.runtime import BlockingPool
from recsys_core.rpc.messages import to_vector
from services.profile import exposures
from services.profile.config import ProfileConfig
from services.profile.profiles import DEFAULT_HISTORY, MAX_HISTORY, IncomingEvent, ProfileBook
from recsys_core.errors import InvalidArgument
from recsys_core.signals.interests import Drift
from recsys_core.signals.reviews import Preferences
from recsys_core.signals.value import ValueForecast


def category_shares(shares: dict[str, float]) -> list:
    return [profile_pb2.CategoryShare(category=c, share=s) for c, s in shares.items()]


def fill_drift(message, drift: Drift) -> None:
    message.score = drift.score
    message.drifting = drift.drifting
    message.threshold = drift.threshold
    message.embedding_distance = drift.embedding_distance
    message.category_shift = drift.category_shift
    message.long_term_categories.extend(category_shares(drift.long_term_categories))
    message.short_term_categories.extend(category_shares(drift.short_term_categories))


def fill_value(message, forecast: ValueForecast) -> None:
    message.churn_probability = forecast.churn_probability
    message.churn_horizon_days = forecast.churn_horizon_days
    message.expected_spend_3m = -1.0 if forecast.expected_spend_3m is None else forecast.expected_spend_3m
    message.expected_spend_12m = -1.0 if forecast.expected_spend_12m is None else forecast.expected_spend_12m
    message.as_of = forecast.as_of
    message.model_version = forecast.model_version


def fill_preferences(message, preferences: Preferences) -> None:
    message.reviews = preferences.reviews
    message.positive = preferences.positive
    message.negative = preferences.negative
    for aspect in preferences.aspects:
        message.aspects.add(aspect=aspect.aspect, praised=aspect.praised, criticised=aspect.criticised)
    message.disliked_item_ids.extend(preferences.disliked_item_ids)


def check_history_limit(history_limit: int) -> int:
    limit = history_limit or DEFAULT_HISTORY
    if not 0 < limit <= MAX_HISTORY:
        raise InvalidArgument("history_limit", f"must be between 0 and {MAX_HISTORY}")
    return limit


def profile_message(profile, limit: int, centroids: bool = True) -> profile_pb2.GetProfileResponse:
    reply = profile_pb2.GetProfileResponse(
        user_id=profile.user_id,
        known=profile.known,
        event_count=profile.event_count,
        seen_item_ids=profile.seen_item_ids,
        vectors_model_version=profile.vectors_model_version,
        categories=[
            profile_pb2.CategoryCount(category=c, events=n) for c, n in sorted(profile.categories.items())
        ],
    )
    if profile.long_term is not None:
        reply.long_term_interest.CopyFrom(to_vector(profile.long_term))
    if profile.short_term is not None:
        reply.short_term_interest.CopyFrom(to_vector(profile.short_term))
    if profile.value is not None:
        fill_value(reply.value, profile.value)
    if profile.preferences is not None:
        fill_preferences(reply.preferences, profile.preferences)
    if profile.model_interest is not None:
        reply.model_interest.CopyFrom(to_vector(profile.model_interest))
    fill_drift(reply.drift, profile.drift)
    reply.interest_categories.extend(category_shares(profile.interest_categories))
    for interest in profile.interests:
        reply.interests.add(
            label=interest.label,
            weight=interest.weight,
            events=interest.events,
            last_timestamp=interest.last_timestamp,
            last_position=interest.last_position,
            centroid=to_vector(interest.centroid) if centroids else None,
            item_ids=interest.item_ids,
            category=interest.category,
        )
    for event in profile.recent[:limit]:
        reply.recent_history.add(
            item_id=event.item_id,
            category=event.category,
            type=event.type,
            timestamp=event.ts or 0,
            rating=event.rating or 0.0,
        )
    return reply


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(self, readiness: Readiness, config: ProfileConfig, blocking: BlockingPool):
        self.readiness = readiness
        self.config = config
        self.blocking = blocking
        self._book: ProfileBook | None = None

    def attach(self, book: ProfileBook) -> None:
        self._book = book

    async def close(self) -> None:
        """Once drained: the store's connections and its background sweep go."""
        if self._book is not None:
            self._book.store.close()

    @property
    def book(self) -> ProfileBook:
        self.readiness.require()
        return self._book

    def _deadline(self, context) -> Deadline:
        """For the embedding service's lookups; read (.left()) where they are made, in the pool."""
        return Deadline(context, self.config.embedding_timeout_seconds)

    @handle_errors
    async def IngestEvents(self, request, context):
        events = [
            IncomingEvent(
                user_id=e.user_id,
                item_id=e.item_id,
                type=int(e.type),
                timestamp=e.timestamp,
                rating=e.rating,
                review_text=e.review_text,
                idempotency_key=e.idempotency_key,
                amount=e.amount,
                order_id=e.order_id,
            )
            for e in request.events
        ]
        book, deadline = self.book, self._deadline(context)
        accepted, duplicates = await self.blocking.run(lambda: book.ingest(events, deadline.left()))
        return profile_pb2.IngestEventsResponse(accepted=accepted, duplicates=duplicates)

    @handle_errors
    async def GetProfile(self, request, context):
        limit = check_history_limit(request.history_limit)
        book, deadline = self.book, self._deadline(context)
        profile = await self.blocking.run(lambda: book.profile(request.user_id, deadline.left()))
        return profile_message(profile, limit)

    @handle_errors
    async def GetShopperSignals(self, request, context):
        limit = check_history_limit(request.history_limit)
        book, deadline = self.book, self._deadline(context)
        signals = await self.blocking.run(
            book.shopper_signals, request.user_id, deadline.left, request.co_purchase_k, list(request.categories),
            list(request.exclude_item_ids), list(request.anchor_item_ids), request.include_seen, request.popular_k,
        )
        return profile_pb2.GetShopperSignalsResponse(
            profile=profile_message(signals.profile, limit, centroids=request.include_centroids),
            co_purchased=[profile_pb2.CoPurchasedItem(item_id=i, category=c, shoppers=n) for i, c, n in signals.co_purchased],
            popular=[profile_pb2.PopularItem(item_id=i, category=c, events=n) for i, c, n in signals.popular],
            popular_titles=signals.popular_titles,
        )

    @handle_errors
    async def GetPopularItems(self, request, context):
        top = await self.blocking.run(
            self.book.popular, request.k, list(request.categories), list(request.exclude_item_ids)
        )
        return profile_pb2.GetPopularItemsResponse(
            items=[profile_pb2.PopularItem(item_id=i, category=c, events=n) for i, c, n in top]
        )

    @handle_errors
    async def GetCoPurchasedItems(self, request, context):
        related = await self.blocking.run(self.book.co_purchased, request.user_id, request.k, list(request.categories),
                                          list(request.exclude_item_ids), list(request.anchor_item_ids),
                                          request.include_seen)
        return profile_pb2.GetCoPurchasedItemsResponse(
            items=[profile_pb2.CoPurchasedItem(item_id=i, category=c, shoppers=n) for i, c, n in related]
        )

    @handle_errors
    async def GetItemPopularity(self, request, context):
        counts, max_count = await self.blocking.run(self.book.item_popularity, list(request.item_ids))
        return profile_pb2.GetItemPopularityResponse(events=counts, max_events=max_count)

    @handle_errors
    async def DeleteUser(self, request, context):
        book = self.book
        forgotten = await self.blocking.run(book.forget, request.user_id)
        audit("profile", "DeleteUser", user_id=forgotten.user_id, events_removed=forgotten.events,
              items_affected=forgotten.items)
        return profile_pb2.DeleteUserResponse(user_id=forgotten.user_id, events_removed=forgotten.events,
                                              items_affected=forgotten.items)

    @handle_errors
    async def RecordExposures(self, request, context):
        incoming = [
            exposures.IncomingExposure(
                exposure_id=e.exposure_id, user_id=e.user_id, experiment=e.experiment, arm=e.arm,
                model_version=e.model_version, timestamp=e.timestamp, item_ids=list(e.item_ids),
            )
            for e in request.exposures
        ]
        store = self.book.store
        recorded, duplicates = await self.blocking.run(exposures.record, store, incoming)
        return profile_pb2.RecordExposuresResponse(recorded=recorded, duplicates=duplicates)
