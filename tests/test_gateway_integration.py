"""The platform end to end: four real servers, real channels, bundled data."""
from __future__ import annotations

import json
import time

import grpc
import pytest

from recsys.common.v1 import common_pb2
from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from services.profile.config import ProfileConfig
from tests.conftest import admin_token, gateway_channel, secured, start, tls_material


def use_test_credentials(monkeypatch) -> None:
    """The `recsys` CLI's credentials: the test CA and an admin token."""
    monkeypatch.setenv("RECSYS_GATEWAY_CA", str(tls_material().ca))
    monkeypatch.setenv("RECSYS_TOKEN", admin_token())

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


def all_events(dataset):
    """Every event the stack's profile store loaded: the bundled benchmark
    subset and the bundled online-retail invoice lines."""
    import pandas as pd

    from recsys_core.data import paths
    from recsys_core.data.retail import retail_items_and_events

    return pd.concat([dataset.interactions, retail_items_and_events(paths.BUNDLED_RETAIL_DIR)[1]], ignore_index=True)


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
        # Explained by the shopper's own item, or by other shoppers' baskets.
        assert item.reason.startswith(("because you ", "bought by ")), item.reason


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
    counts = all_events(dataset).item_id.value_counts()
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
    # Other shoppers' baskets may bring toys in already (half the bundled
    # Beauty shoppers shop Toys too); the shopper's own toys must bring more.
    toys_before = sum(item.category == "Toys_and_Games" for item in before.items)

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
    assert toys_after >= max(toys_before + 3, 5), "the recent interest in toys shows in the list"


def test_co_purchases_carry_a_shopper_into_a_category_they_never_bought_in(gateway, profile, dataset):
    """Three shoppers bought a Beauty item and a Toys item that its text
    does not suggest; a fourth bought only the Beauty item. Their baskets,
    not the text, must put that toy first in the fourth shopper's Toys list."""
    counts = all_events(dataset).item_id.value_counts()
    items = dataset.items.assign(events=dataset.items.item_id.map(counts).fillna(0))
    anchor = items[items.category == "Beauty"].sort_values(["events", "item_id"]).item_id.iloc[0]
    toy = items[items.category == "Toys_and_Games"].sort_values(["events", "item_id"]).item_id.iloc[0]
    probe = "co-purchase-probe"
    baskets = [(f"co-purchase-buyer-{n}", item_id) for n in range(3) for item_id in (anchor, toy)] + [(probe, anchor)]
    now = int(time.time())
    events = [common_pb2.Event(user_id=user, item_id=item_id, type=common_pb2.EVENT_TYPE_PURCHASE, timestamp=now)
              for user, item_id in baskets]
    assert profile.IngestEvents(profile_pb2.IngestEventsRequest(events=events), timeout=10).accepted == len(events)

    related = profile.GetCoPurchasedItems(
        profile_pb2.GetCoPurchasedItemsRequest(user_id=probe, k=5, categories=["Toys_and_Games"]), timeout=10)
    found = [(i.item_id, i.category, i.shoppers) for i in related.items]
    assert found[0] == (toy, "Toys_and_Games", 3)
    assert all(category == "Toys_and_Games" and shoppers < 3 for _, category, shoppers in found[1:])
    reply = gateway.Recommend(
        gateway_pb2.RecommendRequest(user_id=probe, k=10, categories=["Toys_and_Games"]), timeout=10)
    assert reply.path == PERSONALISED
    assert reply.items[0].item_id == toy
    assert reply.items[0].reason == "bought by 3 shoppers with purchases like yours"
    assert {item.category for item in reply.items} == {"Toys_and_Games"}

    for bad, field in ((dict(user_id=probe, k=0), "k"), (dict(user_id="", k=5), "user_id")):
        with pytest.raises(grpc.RpcError) as error:
            profile.GetCoPurchasedItems(profile_pb2.GetCoPurchasedItemsRequest(**bad), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.value.details()


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
    from recsys_cli.stack import free_port
    from services.gateway.server import create_server

    server, address = start(create_server(gateway_config_for(ranking_address=f"127.0.0.1:{free_port()}")))
    try:
        with gateway_channel(address) as channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
                gateway_pb2.RecommendRequest(user_id=multi_category_shopper, k=10), timeout=10
            )
        assert reply.path == FALLBACK and list(reply.skipped_stages) == [gateway_pb2.STAGE_RANKING]
        assert len(reply.items) == 10
    finally:
        server.stop(None)


def test_deadline_shorter_than_the_work_is_deadline_exceeded(gateway, multi_category_shopper):
    with pytest.raises(grpc.RpcError) as caught:
        gateway.Recommend(gateway_pb2.RecommendRequest(user_id=multi_category_shopper, k=500), timeout=0.001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.fixture(scope="module")
def long_history_shopper(dataset):
    counts = dataset.interactions.groupby("user_id").size()
    return counts.sort_values(ascending=False, kind="stable").index[0]


def test_profile_reads_interests_and_drift_of_a_real_shopper(profile, dataset, long_history_shopper):
    reply = profile.GetProfile(profile_pb2.GetProfileRequest(user_id=long_history_shopper), timeout=10)
    events = dataset.interactions[dataset.interactions.user_id == long_history_shopper]
    assert reply.known and reply.event_count == len(events)
    assert 1 <= len(reply.interests) <= 5
    assert sum(i.weight for i in reply.interests) == pytest.approx(1.0, abs=1e-4)
    assert [i.weight for i in reply.interests] == sorted((i.weight for i in reply.interests), reverse=True)
    window = ProfileConfig().interest_window  # interests read the most recent events
    assert sum(i.events for i in reply.interests) == min(len(events), window)
    history = set(events.item_id)
    for interest in reply.interests:
        assert interest.label and set(interest.item_ids) <= history
        assert len(interest.centroid.float32_le) == 4 * 384
    # The bundled categories have category trees: labels and the category mix read from them.
    paths = set(dataset.items.category_path)
    assert any(any(p.startswith(i.label.replace(" > ", ", ")) for p in paths) for i in reply.interests)
    assert sum(c.share for c in reply.interest_categories) == pytest.approx(1.0, abs=1e-4)
    drift = reply.drift
    assert 0.0 <= drift.score <= 1.0 and drift.threshold > 0
    assert drift.drifting == (drift.score >= drift.threshold)
    if len(events) >= 10:
        assert drift.long_term_categories and drift.short_term_categories
    # Dated purchases without money: a churn probability, no spend forecast.
    assert reply.HasField("value") and 0.0 < reply.value.churn_probability < 1.0
    assert reply.value.expected_spend_3m == -1 and reply.value.churn_horizon_days == 90
    # Forecast where the data of the shopper's categories ends (or later, once
    # other tests ingested live events into them).
    assert reply.value.as_of >= int(dataset.interactions.loc[
        dataset.interactions.category.isin(set(events.category)), "timestamp"].max())


def test_retail_shoppers_get_churn_and_spend_forecasts(profile, gateway):
    from recsys_core.data import paths
    from recsys_core.data.retail import retail_items_and_events

    _, events = retail_items_and_events(paths.BUNDLED_RETAIL_DIR)
    spend = events.groupby("user_id")["amount"].sum().sort_values()
    big, small = spend.index[-1], spend[spend > 0].index[0]
    forecasts = {}
    for shopper in (big, small):
        reply = profile.GetProfile(profile_pb2.GetProfileRequest(user_id=shopper), timeout=10)
        assert reply.known and reply.event_count == int((events.user_id == shopper).sum())
        value = reply.value
        assert 0.0 < value.churn_probability < 1.0 and value.model_version
        assert value.as_of == int(events.timestamp.max())
        assert 0.0 <= value.expected_spend_3m and 0.0 <= value.expected_spend_12m
        forecasts[shopper] = value
    # The biggest spender is expected to keep spending more than the smallest.
    assert forecasts[big].expected_spend_12m > forecasts[small].expected_spend_12m
    # Their products are in the catalogue: recommendations for them work.
    reply = gateway.Recommend(gateway_pb2.RecommendRequest(user_id=big, k=5), timeout=10)
    assert reply.path == PERSONALISED and len(reply.items) == 5


@pytest.fixture(scope="module")
def narrow_shopper(dataset):
    """A Beauty shopper with a real history in few corners of the catalogue: room to explore."""
    from recsys_core.signals.interests import interest_category

    path = dict(zip(dataset.items.item_id, dataset.items.category_path))
    events = dataset.interactions[dataset.interactions.category == "Beauty"]
    grains = events.assign(grain=[interest_category("Beauty", path.get(i, "")) for i in events.item_id])
    per_shopper = grains.groupby("user_id").agg(events=("item_id", "size"), grains=("grain", "nunique"))
    candidates = per_shopper[per_shopper.events >= 10].sort_values(["grains", "events"], ascending=[True, False])
    return candidates.index[0]


def test_spread_lists_cover_more_interests_and_say_why(gateway, profile, dataset, narrow_shopper):
    plain = gateway.Recommend(gateway_pb2.RecommendRequest(user_id=narrow_shopper, k=10), timeout=10)
    spread = gateway.Recommend(
        gateway_pb2.RecommendRequest(user_id=narrow_shopper, k=10, spread_interests=True), timeout=10
    )
    explored = gateway.Recommend(
        gateway_pb2.RecommendRequest(user_id=narrow_shopper, k=10, spread_interests=True, explore_slots=3),
        timeout=10,
    )
    labels = {i.label for i in profile.GetProfile(
        profile_pb2.GetProfileRequest(user_id=narrow_shopper), timeout=10).interests}
    for reply in (plain, spread, explored):
        assert reply.path == PERSONALISED and len(reply.items) == 10
        assert len({i.item_id for i in reply.items}) == 10
        assert not {i.item_id for i in reply.items} & seen_items(dataset, narrow_shopper)
    assert all(i.reason.startswith(("for your interest in", "something new")) for i in spread.items)
    assert {i.reason.removeprefix("for your interest in ") for i in spread.items} <= {
        label if len(label) <= 60 else label[:59].rstrip() + "…" for label in labels}
    assert sum(i.reason.startswith("something new") for i in explored.items) >= 1
    grain = dict(zip(dataset.items.item_id, dataset.items.category_path.str.split(", ").str[:2].str.join(", ")))
    assert len({grain[i.item_id] for i in explored.items}) >= len({grain[i.item_id] for i in plain.items})


@pytest.mark.parametrize("request_fields, field", [
    (dict(k=5, spread_interests=True, explore_slots=6), "explore_slots"),
    (dict(k=5, explore_slots=2), "explore_slots"),
    (dict(k=5, spread_interests=True, explore_slots=-1), "explore_slots"),
])
def test_bad_exploration_requests_are_refused(gateway, long_history_shopper, request_fields, field):
    with pytest.raises(grpc.RpcError) as error:
        gateway.Recommend(gateway_pb2.RecommendRequest(user_id=long_history_shopper, **request_fields), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


def test_recsys_profile_prints_the_profile_readably_and_as_json(stack, long_history_shopper, monkeypatch, capsys,
                                                                tmp_path):
    from recsys_cli import main as cli

    monkeypatch.setenv("RECSYS_GATEWAY", stack.gateway)
    use_test_credentials(monkeypatch)
    assert cli.main(["profile", long_history_shopper]) == 0
    text = capsys.readouterr().out
    assert f"shopper {long_history_shopper}:" in text
    for heading in ("interest drift:", "interests:", "recent history:"):
        assert heading in text
    assert cli.main(["profile", long_history_shopper, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["user_id"] == long_history_shopper and data["known"]
    assert data["interests"] and "centroid" not in data["interests"][0]
    assert "long_term_interest" not in data
    assert cli.main(["profile", " "]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    timeline = tmp_path / "timeline.png"
    assert cli.main(["profile", long_history_shopper, "--timeline", str(timeline)]) == 0
    assert timeline.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and timeline.stat().st_size > 10_000


def test_recsys_recommend_can_spread_and_explore(stack, narrow_shopper, monkeypatch, capsys):
    from recsys_cli import main as cli

    monkeypatch.setenv("RECSYS_GATEWAY", stack.gateway)
    use_test_credentials(monkeypatch)
    assert cli.main(["recommend", narrow_shopper, "--k", "8", "--spread-interests", "--explore", "2", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert len(items) == 8
    assert any(i["reason"].startswith("something new") for i in items)
    assert cli.main(["recommend", narrow_shopper, "--explore", "2"]) == 1
    assert "explore_slots: needs spread_interests" in capsys.readouterr().err


def test_reviews_shape_preferences_and_push_disliked_items_away(gateway, profile, dataset):
    beauty = dataset.items[dataset.items.category == "Beauty"].item_id.tolist()
    bought, loved, hated = beauty[10], beauty[11], beauty[12]
    shopper = "review-writer-1"
    now = int(time.time())
    review = common_pb2.EVENT_TYPE_REVIEW
    events = [
        common_pb2.Event(user_id=shopper, item_id=bought, type=common_pb2.EVENT_TYPE_PURCHASE, timestamp=now - 30),
        common_pb2.Event(user_id=shopper, item_id=loved, type=review, timestamp=now - 20,
                         review_text="I love this. The scent is wonderful and lasts all day. Great price too."),
        common_pb2.Event(user_id=shopper, item_id=hated, type=review, timestamp=now - 10,
                         review_text="Terrible. It smells awful and broke after one use. Waste of money."),
    ]
    assert profile.IngestEvents(profile_pb2.IngestEventsRequest(events=events), timeout=10).accepted == 3
    reply = profile.GetProfile(profile_pb2.GetProfileRequest(user_id=shopper), timeout=10)
    preferences = reply.preferences
    assert (preferences.reviews, preferences.positive, preferences.negative) == (2, 1, 1)
    assert list(preferences.disliked_item_ids) == [hated]
    aspects = {a.aspect: a for a in preferences.aspects}
    assert "scent" in aspects and aspects["scent"].praised + aspects["scent"].criticised >= 1
    assert reply.value.churn_probability >= 0  # live events: forecast at "now" of the Beauty clock
    # The negative review counts against its item: it shapes no interest cluster.
    assert all(hated not in interest.item_ids for interest in reply.interests)
    assert any(loved in interest.item_ids for interest in reply.interests)
    # With seen items allowed back, what the shopper liked ranks and the hated
    # item does not (other shoppers' co-purchases take the first places).
    recommended = gateway.Recommend(
        gateway_pb2.RecommendRequest(user_id=shopper, k=100, exclude_seen=False), timeout=10)
    ids = [i.item_id for i in recommended.items]
    assert recommended.path == PERSONALISED and {bought, loved} & set(ids) and hated not in ids


def test_embedding_down_falls_back_to_popular_items(gateway_config_for, multi_category_shopper, dataset):
    """An embedding service that still lists its categories but fails the
    retrieval with UNAVAILABLE: popular items, flagged FALLBACK, seen ones left out."""
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from recsys_core.rpc.grpc_util import build_server
    from services.gateway.server import create_server

    class Failing(embedding_pb2_grpc.EmbeddingServiceServicer):
        async def ListCategories(self, request, context):
            return embedding_pb2.ListCategoriesResponse(
                categories=[embedding_pb2.CategoryInfo(name=c) for c in dataset.items.category.unique()])

        async def RetrieveCandidates(self, request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "index not loaded")

    failing, port = build_server("127.0.0.1:0", 1, ["recsys.embedding.v1.EmbeddingService"], "failing",
                                 **secured("embedding"))
    failing.add(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, Failing())
    failing.readiness.start(lambda: None)
    _, embedding = start((failing, port))
    server, address = start(create_server(gateway_config_for(embedding_address=embedding)))
    try:
        with gateway_channel(address) as channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
                gateway_pb2.RecommendRequest(user_id=multi_category_shopper, k=10), timeout=10
            )
        assert reply.path == FALLBACK and list(reply.skipped_stages) == [gateway_pb2.STAGE_EMBEDDING]
        assert len(reply.items) == 10
        assert not {i.item_id for i in reply.items} & seen_items(dataset, multi_category_shopper)
    finally:
        server.stop(None)
        failing.stop(None)


def test_the_public_port_refuses_requests_over_its_size_limit(stack):
    """64 KiB at the edge (GATEWAY_MAX_REQUEST_BYTES, the largest any gateway
    method takes): the transport refuses a larger body before Python sees it;
    GetProfile's own limit (4 KiB, recsys_core/rpc/limits.py) refuses a
    smaller one unparsed; a list within the limit but too long is the
    servicer's to refuse, by field."""
    with gateway_channel(stack.gateway) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        recommend = gateway.Recommend
        for kibibytes, code in ((5 * 1024, grpc.StatusCode.RESOURCE_EXHAUSTED), (65, grpc.StatusCode.RESOURCE_EXHAUSTED),
                                (32, grpc.StatusCode.INVALID_ARGUMENT)):
            ids = ["B" + "0" * 1022] * kibibytes
            with pytest.raises(grpc.RpcError) as refused:
                recommend(gateway_pb2.RecommendRequest(user_id="A2V5R832QCSOMX", k=5, context_item_ids=ids), timeout=10)
            assert refused.value.code() == code, (kibibytes, refused.value.details())
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # gRPC's own words: the transport refused it, not a method limit further in.
                assert "larger than max" in refused.value.details() and "65536" in refused.value.details(), \
                    refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            gateway.GetProfile(profile_pb2.GetProfileRequest(user_id="A" * 8 * 1024), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details().endswith("GetProfile takes at most 4,096"), refused.value.details()
        assert recommend(gateway_pb2.RecommendRequest(user_id="A2V5R832QCSOMX", k=5), timeout=10).items
