"""Each service over its own real channel: health, reflection, status codes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recsys.common.v1 import common_pb2
from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.data import paths
from recsys_core.rpc.messages import dimension, from_vector, to_vector
from recsys_cli.stack import free_port, wait_until_serving
from tests.conftest import gateway_channel, secured, secured_env, service_channel

pytestmark = pytest.mark.integration

SERVICE_NAMES = {
    "embedding": "recsys.embedding.v1.EmbeddingService",
    "profile": "recsys.profile.v1.ProfileService",
    "ranking": "recsys.ranking.v1.RankingService",
    "gateway": "recsys.gateway.v1.GatewayService",
}


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


@pytest.mark.parametrize("name", sorted(SERVICE_NAMES))
def test_every_service_reports_health_and_offers_reflection(stack, name):
    with stack.channel(name) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAMES[name]):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        listed = {s.name for reply in replies for s in reply.list_services_response.service}
        assert {SERVICE_NAMES[name], "grpc.health.v1.Health"} <= listed


@pytest.mark.parametrize("symbol,found", [
    ("recsys.gateway.v1.GatewayService", True),
    # Methods too, as the reflection protocol says (ghz asks for the method).
    ("recsys.gateway.v1.GatewayService.Recommend", True),
    ("recsys.gateway.v1.RecommendRequest", True),
    ("recsys.gateway.v1.GatewayService.NoSuchMethod", False),
    ("no.such.Service.Method", False),
])
def test_reflection_finds_the_file_of_a_service_method_or_type(stack, symbol, found):
    with stack.channel("gateway") as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]), timeout=5)
    if found:
        assert reply.HasField("file_descriptor_response"), reply
        assert reply.file_descriptor_response.file_descriptor_proto
    else:
        assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_a_service_is_not_serving_until_loaded(exported_encoder, tmp_path):
    """The profile service waits on a store load; until then health says
    NOT_SERVING and domain calls are UNAVAILABLE, not half answers."""
    from services.profile.config import ProfileConfig
    from services.profile.server import create_server

    gate = threading.Event()
    import services.profile.server as profile_server

    original = profile_server.load_book

    def slow_load(*args, **kwargs):
        gate.wait(10)
        return original(*args, **kwargs)

    profile_server.load_book = slow_load
    try:
        server, port = create_server(
            ProfileConfig(address="127.0.0.1:0", store_path=str(tmp_path / "s.sqlite3"), data_dir="",
                          embedding_address=f"127.0.0.1:{free_port()}", **secured("profile"))
        )
        server.start()
        with service_channel(f"127.0.0.1:{port}", "profile") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = profile_pb2_grpc.ProfileServiceStub(channel)
            code, _ = status_of(lambda: stub.GetProfile(profile_pb2.GetProfileRequest(user_id="u"), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
            gate.set()
            assert server.readiness.ready.wait(10)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        server.stop(None)
    finally:
        profile_server.load_book = original
        gate.set()


# -- embedding service ---------------------------------------------------------


@pytest.fixture(scope="module")
def embedding(stack):
    with stack.channel("embedding") as channel:
        yield embedding_pb2_grpc.EmbeddingServiceStub(channel)


def test_embed_texts_gives_unit_vectors_that_find_the_item(embedding, dataset):
    row = dataset.items[dataset.items.category == "Beauty"].iloc[0]
    reply = embedding.EmbedTexts(embedding_pb2.EmbedTextsRequest(texts=[row.text, "a red toy fire truck"]), timeout=30)
    assert reply.dimension == 384
    vectors = np.stack([from_vector(v) for v in reply.vectors])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    found = embedding.SearchItems(embedding_pb2.SearchItemsRequest(vectors=[reply.vectors[0]], k=1), timeout=10)
    assert found.results[0].hits[0].item_id == row.item_id
    # int8 activations are scaled per batch: the same text, batched differently, lands within 0.99.
    assert found.results[0].hits[0].score >= 0.98


def test_embedding_bad_input(embedding):
    cases = [
        (lambda: embedding.EmbedTexts(embedding_pb2.EmbedTextsRequest(texts=[]), timeout=5), "texts"),
        (lambda: embedding.EmbedTexts(embedding_pb2.EmbedTextsRequest(texts=["ok", "  "]), timeout=5), "texts[1]"),
        (lambda: embedding.SearchItems(embedding_pb2.SearchItemsRequest(
            vectors=[to_vector(np.full(3, 0.1))], k=5), timeout=5), "vectors[0]"),
        (lambda: embedding.SearchItems(embedding_pb2.SearchItemsRequest(
            vectors=[to_vector(np.full(384, 0.1))], k=0), timeout=5), "k"),
        (lambda: embedding.SearchItems(embedding_pb2.SearchItemsRequest(
            vectors=[to_vector(np.full(384, 0.1))], k=3, categories=["Garden"]), timeout=5), "categories"),
        (lambda: embedding.UpsertItems(embedding_pb2.UpsertItemsRequest(
            items=[common_pb2.Item(item_id="", category="Beauty", title="x")]), timeout=5), "items[0].item_id"),
    ]
    for call, field in cases:
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith(field + ":"), details
    code, details = status_of(lambda: embedding.GetItems(embedding_pb2.GetItemsRequest(item_ids=["nope"]), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


def test_upserted_items_are_searchable_and_can_move_category(embedding):
    item = common_pb2.Item(item_id="TEST-UPSERT-1", category="Garden_Test", title="Stainless steel garden trowel")
    reply = embedding.UpsertItems(embedding_pb2.UpsertItemsRequest(items=[item]), timeout=30)
    assert (reply.inserted, reply.updated) == (1, 0)
    query = embedding.EmbedTexts(embedding_pb2.EmbedTextsRequest(texts=["garden trowel"]), timeout=30).vectors[0]
    hits = embedding.SearchItems(
        embedding_pb2.SearchItemsRequest(vectors=[query], k=1, categories=["Garden_Test"]), timeout=5
    ).results[0].hits
    assert hits[0].item_id == "TEST-UPSERT-1"
    moved = common_pb2.Item(item_id="TEST-UPSERT-1", category="Tools_Test", title="Stainless steel garden trowel")
    reply = embedding.UpsertItems(embedding_pb2.UpsertItemsRequest(items=[moved]), timeout=30)
    assert (reply.inserted, reply.updated) == (0, 1)
    categories = {c.name: c.items for c in embedding.ListCategories(embedding_pb2.ListCategoriesRequest(), timeout=5).categories}
    assert categories["Tools_Test"] == 1 and categories["Garden_Test"] == 0


# -- profile service -----------------------------------------------------------


@pytest.fixture(scope="module")
def profile(profile_backend):
    """Every profile test runs twice: on the SQLite store, then on Redis."""
    with service_channel(profile_backend, "profile") as channel:
        yield profile_pb2_grpc.ProfileServiceStub(channel)


def test_profile_of_a_real_shopper(profile, dataset):
    shopper = dataset.interactions.user_id.iloc[0]
    expected = dataset.interactions[dataset.interactions.user_id == shopper]
    reply = profile.GetProfile(profile_pb2.GetProfileRequest(user_id=shopper), timeout=5)
    assert reply.known and reply.event_count == len(expected)
    assert set(reply.seen_item_ids) == set(expected.item_id)
    assert dimension(reply.long_term_interest) == 384 and dimension(reply.short_term_interest) == 384
    from recsys_core.data.shopping import chronological

    assert reply.recent_history[0].item_id == chronological(expected).item_id.iloc[-1]


def test_ingest_is_idempotent_by_key_and_all_or_nothing(profile, dataset):
    item_id = dataset.items.item_id.iloc[3]
    event = common_pb2.Event(user_id="ingest-user", item_id=item_id, type=common_pb2.EVENT_TYPE_VIEW, idempotency_key="k-1")
    first = profile.IngestEvents(profile_pb2.IngestEventsRequest(events=[event]), timeout=5)
    again = profile.IngestEvents(profile_pb2.IngestEventsRequest(events=[event]), timeout=5)
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (again.accepted, again.duplicates) == (0, 1)

    good = common_pb2.Event(user_id="ingest-user", item_id=item_id, type=common_pb2.EVENT_TYPE_PURCHASE)
    unknown = common_pb2.Event(user_id="ingest-user", item_id="NO-SUCH", type=common_pb2.EVENT_TYPE_PURCHASE)
    code, details = status_of(lambda: profile.IngestEvents(profile_pb2.IngestEventsRequest(events=[good, unknown]), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("events[1].item_id")
    reply = profile.GetProfile(profile_pb2.GetProfileRequest(user_id="ingest-user"), timeout=5)
    assert reply.event_count == 1, "a refused batch stores nothing"


def test_concurrent_requests_with_one_key_store_it_once(profile, dataset):
    """Clients retry; a retry may overtake the original. However many requests
    carry a key at once, its event is stored once."""
    items = dataset.items.item_id.iloc[10:20].tolist()
    calls = []
    for n, item_id in enumerate(items):
        event = common_pb2.Event(user_id="concurrent-user", item_id=item_id, type=common_pb2.EVENT_TYPE_VIEW,
                                 idempotency_key=f"concurrent-{n}")
        request = profile_pb2.IngestEventsRequest(events=[event])
        calls.append([profile.IngestEvents.future(request, timeout=10) for _ in range(4)])
    for n, same_key in enumerate(calls):
        replies = [(call.result().accepted, call.result().duplicates) for call in same_key]
        assert sorted(replies) == [(0, 1), (0, 1), (0, 1), (1, 0)], f"concurrent-{n}: {replies}"
    reply = profile.GetProfile(profile_pb2.GetProfileRequest(user_id="concurrent-user"), timeout=5)
    assert reply.event_count == len(items) and sorted(reply.seen_item_ids) == sorted(items)


@pytest.mark.parametrize(
    "event, field",
    [
        (dict(user_id="", item_id="B", type=2), "events[0].user_id"),
        (dict(user_id="u", item_id="B", type=0), "events[0].type"),
        (dict(user_id="u", item_id="B", type=3, rating=0), "events[0].rating"),
        (dict(user_id="u", item_id="B", type=3, rating=9), "events[0].rating"),
        (dict(user_id="u", item_id="B", type=2, timestamp=-5), "events[0].timestamp"),
    ],
)
def test_bad_events_are_invalid_argument(profile, event, field):
    code, details = status_of(lambda: profile.IngestEvents(
        profile_pb2.IngestEventsRequest(events=[common_pb2.Event(**event)]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field + ":")


def test_empty_ingest_and_bad_profile_requests(profile):
    code, details = status_of(lambda: profile.IngestEvents(profile_pb2.IngestEventsRequest(), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("events:")
    code, details = status_of(lambda: profile.GetProfile(profile_pb2.GetProfileRequest(user_id=""), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("user_id:")


# -- ranking service -----------------------------------------------------------


def test_rank_orders_by_features_and_refuses_bad_ones(stack):
    with stack.channel("ranking") as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        user = ranking_pb2.UserFeatures(drift_score=0.0)
        candidates = [
            ranking_pb2.Candidate(item_id="far", features=common_pb2.CandidateFeatures(long_term_similarity=0.0),
                                  popularity=100, max_popularity=100),
            ranking_pb2.Candidate(item_id="near", features=common_pb2.CandidateFeatures(long_term_similarity=1.0),
                                  popularity=1, max_popularity=100),
        ]
        reply = stub.Rank(ranking_pb2.RankRequest(user=user, candidates=candidates, k=2), timeout=5)
        assert [c.item_id for c in reply.candidates] == ["near", "far"]
        disliked = [ranking_pb2.Candidate(item_id="a", features=common_pb2.CandidateFeatures(disliked_similarity=0.9)),
                    ranking_pb2.Candidate(item_id="b")]
        reply = stub.Rank(ranking_pb2.RankRequest(user=user, candidates=disliked), timeout=5)
        assert [c.item_id for c in reply.candidates] == ["b", "a"]
        bad = [ranking_pb2.Candidate(item_id="x"),
               ranking_pb2.Candidate(item_id="y", features=common_pb2.CandidateFeatures(context_similarity=float("nan")))]
        code, details = status_of(lambda: stub.Rank(ranking_pb2.RankRequest(user=user, candidates=bad), timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("candidates[1].features.context_similarity")
        code, details = status_of(lambda: stub.Rank(ranking_pb2.RankRequest(
            user=ranking_pb2.UserFeatures(churn_probability=2.0), candidates=candidates), timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("user.churn_probability")


def test_retrieve_candidates_gives_features_of_the_vectors_it_holds(embedding, dataset):
    from recsys_core.ranking.scoring import UserVectors, explain, features

    beauty = dataset.items[dataset.items.category == "Beauty"].item_id.tolist()
    context, history, disliked, extra = beauty[:2], beauty[2:5], beauty[5:6], beauty[100:103]
    vectors = {e.item.item_id: from_vector(e.embedding) for e in embedding.GetItems(embedding_pb2.GetItemsRequest(
        item_ids=context + history + disliked, include_embeddings=True), timeout=10).items}
    long_term = vectors[history[0]]
    reply = embedding.RetrieveCandidates(embedding_pb2.RetrieveCandidatesRequest(
        long_term_interest=to_vector(long_term), context_item_ids=context, extra_item_ids=extra + ["NO-SUCH-ITEM"],
        history_item_ids=history + ["NO-SUCH-ITEM"], disliked_item_ids=disliked, k=10, exclude_item_ids=context,
        interest_centroids=[to_vector(vectors[history[1]])], include_embeddings=True), timeout=10)
    ids = [c.item.item_id for c in reply.candidates]
    assert len(ids) == len(set(ids)) and not set(ids) & set(context)
    assert set(extra) <= set(ids) and "NO-SUCH-ITEM" not in ids
    assert [c.item_id for c in reply.context_items] == context
    assert [c.item_id for c in reply.history_items] == history
    assert all(c.item.title and not c.item.text for c in reply.candidates)
    assert not any(c.retrieved for c in reply.candidates if c.item.item_id in extra and c.retrieval_score == 0)
    candidates = np.stack([from_vector(c.embedding) for c in reply.candidates])
    mixed = np.mean([vectors[i] for i in context], axis=0)
    user = UserVectors(long_term=long_term, short_term=None, context=mixed / np.linalg.norm(mixed), history=None,
                       disliked=np.stack([vectors[disliked[0]]]))
    expected = features(user, candidates)
    got = np.array([[c.features.long_term_similarity, c.features.context_similarity, c.features.disliked_similarity,
                     c.features.short_term_similarity, c.features.model_similarity] for c in reply.candidates])
    assert np.allclose(got[:, 0], expected.long_term, atol=1e-6)
    assert np.allclose(got[:, 1], expected.context, atol=1e-5)
    assert np.allclose(got[:, 2], expected.disliked, atol=1e-6)
    assert not got[:, 3:].any()  # no short-term or model vector: those terms are 0
    because = explain(candidates, np.stack([vectors[i] for i in context + history]))
    assert [c.because_item_id for c in reply.candidates] == [(context + history)[row] for row in because]
    assert np.allclose([c.interest_similarities[0] for c in reply.candidates], candidates @ vectors[history[1]],
                       atol=1e-6)
    # Without include_embeddings no vector travels back.
    lean = embedding.RetrieveCandidates(embedding_pb2.RetrieveCandidatesRequest(
        long_term_interest=to_vector(long_term), k=5), timeout=10)
    assert lean.candidates and not any(c.embedding.float32_le for c in lean.candidates)


@pytest.mark.parametrize("fields, field, code", [
    ({"k": 5}, "long_term_interest", grpc.StatusCode.INVALID_ARGUMENT),
    ({"long_term_interest": np.full(3, 0.1), "k": 5}, "long_term_interest", grpc.StatusCode.INVALID_ARGUMENT),
    ({"short_term_interest": np.full(384, np.inf), "k": 5}, "short_term_interest", grpc.StatusCode.INVALID_ARGUMENT),
    ({"long_term_interest": np.full(384, 0.1), "k": 0}, "k", grpc.StatusCode.INVALID_ARGUMENT),
    ({"long_term_interest": np.full(384, 0.1), "k": 5, "categories": ["Garden"]}, "categories",
     grpc.StatusCode.INVALID_ARGUMENT),
    ({"long_term_interest": np.full(384, 0.1), "k": 5, "history_item_ids": ["x"] * 1001}, "history_item_ids",
     grpc.StatusCode.INVALID_ARGUMENT),
    ({"long_term_interest": np.full(384, 0.1), "k": 5, "extra_item_ids": ["x"] * 1001}, "extra_item_ids",
     grpc.StatusCode.INVALID_ARGUMENT),
    ({"long_term_interest": np.full(384, 0.1), "k": 5, "categories": ["Beauty"] * 101}, "categories",
     grpc.StatusCode.INVALID_ARGUMENT),
    ({"long_term_interest": np.full(384, 0.1), "k": 5, "interest_centroids": [np.full(384, 0.1)] * 51},
     "interest_centroids", grpc.StatusCode.INVALID_ARGUMENT),
    ({"long_term_interest": np.full(384, 0.1), "k": 5, "interest_centroids": [np.full(384, 0.1), np.full(2, 0.1)]},
     "interest_centroids[1]", grpc.StatusCode.INVALID_ARGUMENT),
    ({"k": 5, "context_item_ids": ["KNOWN", "NO-SUCH-ITEM"]}, "context_item_ids[1]", grpc.StatusCode.NOT_FOUND),
])
def test_retrieve_candidates_bad_input_names_the_field(embedding, dataset, fields, field, code):
    known = dataset.items.item_id.iloc[0]
    fields = {name: (to_vector(value) if isinstance(value, np.ndarray) else
                     [known if v == "KNOWN" else v for v in value] if name == "context_item_ids" else
                     [to_vector(v) for v in value] if name == "interest_centroids" else value)
              for name, value in fields.items()}
    status, details = status_of(lambda: embedding.RetrieveCandidates(
        embedding_pb2.RetrieveCandidatesRequest(**fields), timeout=10))
    assert status == code, details
    assert details.startswith(field), details


def test_shopper_signals_are_the_profile_and_co_purchases_in_one_call(profile, dataset):
    from tests.test_gateway_integration import shoppers_by_categories

    user_id = sorted(u for u, c in shoppers_by_categories(dataset).items() if len(c) >= 2)[0]
    signals = profile.GetShopperSignals(profile_pb2.GetShopperSignalsRequest(
        user_id=user_id, history_limit=5, co_purchase_k=50, popular_k=10), timeout=10)
    alone = profile.GetProfile(profile_pb2.GetProfileRequest(user_id=user_id, history_limit=5), timeout=10)
    co_purchased = profile.GetCoPurchasedItems(profile_pb2.GetCoPurchasedItemsRequest(user_id=user_id, k=50),
                                               timeout=10)
    assert signals.profile.long_term_interest == alone.long_term_interest
    assert list(signals.profile.recent_history) == list(alone.recent_history)
    assert list(signals.co_purchased) == list(co_purchased.items)
    assert not signals.popular  # a shopper with interests needs no popular items
    assert all(not i.centroid.float32_le for i in signals.profile.interests)  # not asked for
    with_centroids = profile.GetShopperSignals(profile_pb2.GetShopperSignalsRequest(
        user_id=user_id, include_centroids=True), timeout=10)
    assert [i.centroid for i in with_centroids.profile.interests] == [i.centroid for i in alone.interests]

    cold = profile.GetShopperSignals(profile_pb2.GetShopperSignalsRequest(
        user_id="NOBODY-EVER", co_purchase_k=50, popular_k=7, categories=["Beauty"]), timeout=10)
    assert not cold.profile.known and not cold.co_purchased
    popular = profile.GetPopularItems(profile_pb2.GetPopularItemsRequest(k=7, categories=["Beauty"]), timeout=10)
    assert list(cold.popular) == list(popular.items)
    titles = dict(zip(dataset.items.item_id, dataset.items.display_title))
    assert list(cold.popular_titles) == [titles[p.item_id] for p in cold.popular]


@pytest.mark.parametrize("fields, field", [
    ({"user_id": ""}, "user_id"),
    ({"user_id": "u", "co_purchase_k": 1001}, "co_purchase_k"),
    ({"user_id": "u", "popular_k": -1}, "popular_k"),
    ({"user_id": "u", "history_limit": 5000}, "history_limit"),
    ({"user_id": "u", "co_purchase_k": 5, "anchor_item_ids": ["a"] * 101}, "anchor_item_ids"),
    ({"user_id": "u", "exclude_item_ids": ["a"] * 100_001}, "exclude_item_ids"),
    ({"user_id": "u", "categories": ["Beauty"] * 101}, "categories"),
])
def test_shopper_signals_bad_input_names_the_field(profile, fields, field):
    code, details = status_of(lambda: profile.GetShopperSignals(profile_pb2.GetShopperSignalsRequest(**fields),
                                                                timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(field), details


# -- graceful shutdown -----------------------------------------------------------


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(stack, dataset):
    """A real gateway process gets SIGTERM while requests are in flight: those
    complete with answers, later ones are refused, the process exits 0."""
    port = free_port()
    env = dict(os.environ, GATEWAY_ADDRESS=f"127.0.0.1:{port}", GATEWAY_PROFILE_ADDRESS=stack.profile,
               GATEWAY_EMBEDDING_ADDRESS=stack.embedding, GATEWAY_RANKING_ADDRESS=stack.ranking,
               GATEWAY_GRACE_SECONDS="20", GATEWAY_WORKERS="4", **secured_env("gateway"))
    process = subprocess.Popen([sys.executable, "-m", "services.gateway.server"], env=env, cwd=paths.REPO_ROOT)
    try:
        wait_until_serving(f"127.0.0.1:{port}", 60, process, channel=lambda: gateway_channel(f"127.0.0.1:{port}"))
        shoppers = dataset.interactions.user_id.unique()[:48]
        channel = gateway_channel(f"127.0.0.1:{port}")
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        # Large k makes each request take long enough that many are still
        # being worked on when the signal lands.
        calls = [stub.Recommend.future(gateway_pb2.RecommendRequest(user_id=u, k=500), timeout=60) for u in shoppers]
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        finished_after_signal = 0
        for call in calls:
            reply = call.result()
            assert len(reply.items) == 500
            finished_after_signal += time.monotonic() > signalled
        assert finished_after_signal > 0, "no request was in flight at the signal: the test proved nothing"
        assert process.wait(30) == 0
        code, _ = status_of(lambda: stub.Recommend(gateway_pb2.RecommendRequest(user_id="u", k=1), timeout=2))
        assert code == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
