"""The platform end to end: four real servers, real channels, bundled data."""
from __future__ import annotations

import time

import grpc
import pytest

from recsys.common.v1 import common_pb2
from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from tests.conftest import start

pytestmark = pytest.mark.integration

PERSONALISED = gateway_pb2.RECOMMENDATION_PATH_PERSONALISED
COLD_START = gateway_pb2.RECOMMENDATION_PATH_COLD_START
FALLBACK = gateway_pb2.RECOMMENDATION_PATH_FALLBACK


@pytest.fixture(scope="module")
def gateway(stack):
    with stack.channel("gateway") as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


@pytest.fixture(scope="module")
def profile(stack):
    with stack.channel("profile") as channel:
        yield profile_pb2_grpc.ProfileServiceStub(channel)


def shoppers_by_categories(dataset):
    return dataset.interactions.groupby("user_id")["category"].agg(lambda c: frozenset(c))


@pytest.fixture(scope="module")
def multi_category_shopper(dataset):
    categories = shoppers_by_categories(dataset)
    return sorted(u for u, c in categories.items() if len(c) >= 2)[0]


def seen_items(dataset, user_id):
    return set(dataset.interactions.loc[dataset.interactions.user_id == user_id, "item_id"])


def test_recommend_real_shopper_returns_k_distinct_existing_unseen_items_best_first(gateway, dataset, multi_category_shopper):
    reply = gateway.Recommend(gateway_pb2.RecommendRequest(user_id=multi_category_shopper, k=20), timeout=10)
    assert reply.path == PERSONALISED
    ids = [item.item_id for item in reply.items]
    assert len(ids) == 20
    assert len(set(ids)) == 20
    catalogue = set(dataset.items.item_id)
    assert set(ids) <= catalogue
    assert not set(ids) & seen_items(dataset, multi_category_shopper)
    scores = [item.score for item in reply.items]
    assert scores == sorted(scores, reverse=True)
    titles = dict(zip(dataset.items.item_id, dataset.items.display_title))
    for item in reply.items:
        assert item.title == titles[item.item_id]
        assert item.reason.startswith("because you ")


def test_seen_items_come_back_only_when_asked(gateway, dataset, multi_category_shopper):
    seen = seen_items(dataset, multi_category_shopper)
    reply = gateway.Recommend(
        gateway_pb2.RecommendRequest(user_id=multi_category_shopper, k=50, exclude_seen=False), timeout=10
    )
    assert {item.item_id for item in reply.items} & seen


def test_categories_restrict_results_even_ones_never_bought_in(gateway, dataset):
    categories = shoppers_by_categories(dataset)
    beauty_only = sorted(u for u, c in categories.items() if c == {"Beauty"})[0]
    for wanted in (["Toys_and_Games"], ["Sports_and_Outdoors", "Office_Products"]):
        reply = gateway.Recommend(
            gateway_pb2.RecommendRequest(user_id=beauty_only, k=15, categories=wanted), timeout=10
        )
        assert reply.path == PERSONALISED
        assert len(reply.items) == 15
        assert {item.category for item in reply.items} <= set(wanted)


def test_unknown_shopper_gets_popular_items_flagged_cold_start(gateway, dataset):
    reply = gateway.Recommend(gateway_pb2.RecommendRequest(user_id="never-seen-shopper", k=10), timeout=10)
    assert reply.path == COLD_START
    assert len(reply.items) == 10
    counts = dataset.interactions.item_id.value_counts()
    assert [counts[item.item_id] for item in reply.items] == sorted(counts.values, reverse=True)[:10]
    per_category = gateway.Recommend(
        gateway_pb2.RecommendRequest(user_id="never-seen-shopper", k=5, categories=["Office_Products"]), timeout=10
    )
    assert per_category.path == COLD_START
    assert {item.category for item in per_category.items} == {"Office_Products"}


def test_ingested_events_change_the_next_recommendations(gateway, profile, dataset):
    categories = shoppers_by_categories(dataset)
    shopper = sorted(u for u, c in categories.items() if c == {"Beauty"})[1]
    before = gateway.Recommend(gateway_pb2.RecommendRequest(user_id=shopper, k=20), timeout=10)
    assert {item.category for item in before.items} == {"Beauty"}

    toys = dataset.items[dataset.items.category == "Toys_and_Games"].item_id.tolist()[:5]
    now = int(time.time())
    events = [
        common_pb2.Event(user_id=shopper, item_id=item_id, type=common_pb2.EVENT_TYPE_PURCHASE, timestamp=now + i)
        for i, item_id in enumerate(toys)
    ]
    accepted = profile.IngestEvents(profile_pb2.IngestEventsRequest(events=events), timeout=10)
    assert accepted.accepted == 5

    after = gateway.Recommend(gateway_pb2.RecommendRequest(user_id=shopper, k=20), timeout=10)
    after_ids = [item.item_id for item in after.items]
    assert after_ids != [item.item_id for item in before.items]
    assert not set(after_ids) & set(toys), "just-bought items are seen now"
    toys_after = sum(item.category == "Toys_and_Games" for item in after.items)
    assert toys_after >= 5, "the recent interest in toys shows in the list"


def test_similar_items_cross_categories(gateway, dataset):
    anchor = dataset.items[dataset.items.category == "Toys_and_Games"].item_id.iloc[0]
    reply = gateway.SimilarItems(
        gateway_pb2.SimilarItemsRequest(item_id=anchor, k=8, categories=["Beauty", "Office_Products"]), timeout=10
    )
    assert len(reply.items) == 8
    assert anchor not in {item.item_id for item in reply.items}
    assert {item.category for item in reply.items} <= {"Beauty", "Office_Products"}
    assert [i.score for i in reply.items] == sorted((i.score for i in reply.items), reverse=True)


@pytest.mark.parametrize(
    "request_fields, field",
    [
        ({"user_id": "u", "k": 0}, "k"),
        ({"user_id": "u", "k": 501}, "k"),
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "x" * 129, "k": 5}, "user_id"),
        ({"user_id": "u", "k": 5, "categories": ["Garden"]}, "categories"),
        ({"user_id": "u", "k": 5, "context_item_ids": [""]}, "context_item_ids[0]"),
    ],
)
def test_bad_recommend_requests_are_invalid_argument_naming_the_field(gateway, request_fields, field):
    with pytest.raises(grpc.RpcError) as caught:
        gateway.Recommend(gateway_pb2.RecommendRequest(**request_fields), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field + ":")


def test_unknown_items_are_not_found(gateway):
    with pytest.raises(grpc.RpcError) as caught:
        gateway.SimilarItems(gateway_pb2.SimilarItemsRequest(item_id="NO-SUCH-ITEM", k=5), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "item_id" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        gateway.Recommend(
            gateway_pb2.RecommendRequest(user_id="u", k=5, context_item_ids=["NO-SUCH-ITEM"]), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "context_item_ids[0]" in caught.value.details()


def test_bad_similar_items_requests_are_invalid_argument(gateway, dataset):
    anchor = dataset.items.item_id.iloc[0]
    for fields, field in (({"item_id": anchor, "k": 0}, "k"), ({"item_id": "", "k": 3}, "item_id")):
        with pytest.raises(grpc.RpcError) as caught:
            gateway.SimilarItems(gateway_pb2.SimilarItemsRequest(**fields), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(field + ":")


def test_context_items_steer_recommendations(gateway, dataset, multi_category_shopper):
    office = dataset.items[dataset.items.category == "Office_Products"].item_id.tolist()[:3]
    reply = gateway.Recommend(
        gateway_pb2.RecommendRequest(user_id=multi_category_shopper, k=10, context_item_ids=office), timeout=10
    )
    assert reply.path == PERSONALISED
    assert not {item.item_id for item in reply.items} & set(office)
    assert sum(item.category == "Office_Products" for item in reply.items) >= 3


def test_ranking_down_falls_back_to_retrieval_order(gateway_config_for, multi_category_shopper):
    from recsys_core.localstack import free_port
    from services.gateway.server import create_server

    server, address = start(create_server(gateway_config_for(ranking_address=f"127.0.0.1:{free_port()}")))
    try:
        with grpc.insecure_channel(address) as channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
                gateway_pb2.RecommendRequest(user_id=multi_category_shopper, k=10), timeout=10
            )
        assert reply.path == FALLBACK
        assert len(reply.items) == 10
    finally:
        server.stop(None)


def test_deadline_shorter_than_the_work_is_deadline_exceeded(gateway, multi_category_shopper):
    with pytest.raises(grpc.RpcError) as caught:
        gateway.Recommend(gateway_pb2.RecommendRequest(user_id=multi_category_shopper, k=500), timeout=0.001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
