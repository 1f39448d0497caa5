"""The four-call Recommend answers what the old path answered: for a sample
of real shoppers of the bundled data and every kind of request, the same
items in the same order, the same reasons and titles, and scores within
1e-5 of the old formula's (tests/old_recommend.py, frozen from f8ba209).

Exact ties: both paths sort with a stable sort on float32 scores, and the
candidates come in the same order, so equal scores keep the same order. A
score computed from the same terms in the same order is the same float; the
one term rounded differently is the model interest (w * (x / |m|) now, (w
* x) / |m| before), identical while its weight is 1 (the default) and a
stack without a served model has no such term at all. Two candidates whose
scores differ by less than that rounding could swap; none does here.
"""
from __future__ import annotations

import numpy as np
import pytest

from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.embedding.v1 import embedding_pb2_grpc
from recsys.profile.v1 import profile_pb2_grpc
from services.gateway.servicer import PATHS
from services.ranking.config import RankingConfig
from services.ranking.servicer import RankingServicer
from tests.old_recommend import old_recommend

pytestmark = pytest.mark.integration

SHOPPERS = 8


@pytest.fixture(scope="module")
def channels(stack):
    with stack.channel("gateway") as gateway, stack.channel("profile") as profile, \
            stack.channel("embedding") as embedding:
        yield (gateway_pb2_grpc.GatewayServiceStub(gateway), profile_pb2_grpc.ProfileServiceStub(profile),
               embedding_pb2_grpc.EmbeddingServiceStub(embedding))


def sample_shoppers(dataset) -> list[str]:
    """Shoppers spread over history lengths and categories, the same every run."""
    counts = dataset.interactions.groupby("user_id").agg(events=("item_id", "size"), categories=("category", "nunique"))
    counts = counts.sort_values(["events", "categories"], ascending=False, kind="stable")
    multi = counts[counts.categories >= 2].index[:3].tolist()
    picks = counts.index[np.linspace(0, len(counts) - 1, SHOPPERS - len(multi)).astype(int)].tolist()
    return list(dict.fromkeys(multi + picks))


def reviewing_shopper(profile, dataset) -> str:
    """A shopper of their own (other tests' shoppers stay as they are) with a
    history across two categories and a negative review: the dislike term."""
    import time

    from recsys.common.v1 import common_pb2
    from recsys.profile.v1 import profile_pb2

    beauty = dataset.items[dataset.items.category == "Beauty"].item_id.tolist()
    toys = dataset.items[dataset.items.category == "Toys_and_Games"].item_id.tolist()
    shopper, now = "equivalence-reviewer-1", int(time.time())
    purchase, review = common_pb2.EVENT_TYPE_PURCHASE, common_pb2.EVENT_TYPE_REVIEW
    events = [common_pb2.Event(user_id=shopper, item_id=item_id, type=purchase, timestamp=now - 100 + n,
                               idempotency_key=f"{shopper}-{n}")
              for n, item_id in enumerate(beauty[20:26] + toys[20:24])]
    events.append(common_pb2.Event(user_id=shopper, item_id=beauty[30], type=review, timestamp=now - 10,
                                   idempotency_key=f"{shopper}-review",
                                   review_text="Terrible. It smells awful and broke after one use. Waste of money."))
    profile.IngestEvents(profile_pb2.IngestEventsRequest(events=events), timeout=30)
    disliked = profile.GetProfile(profile_pb2.GetProfileRequest(user_id=shopper), timeout=30).preferences
    assert list(disliked.disliked_item_ids) == [beauty[30]]
    return shopper


def cases(dataset, profile):
    items = dataset.items.set_index("item_id")
    shoppers = sample_shoppers(dataset) + [reviewing_shopper(profile, dataset)]
    history = dataset.interactions.groupby("user_id").item_id.agg(list).to_dict()
    history[shoppers[-1]] = dataset.items[dataset.items.category == "Beauty"].item_id.tolist()[20:26]
    other = dataset.items.item_id.iloc[[10, 500, 2000]].tolist()
    for user_id in shoppers:
        yield dict(user_id=user_id, k=10)
        yield dict(user_id=user_id, k=10, exclude_seen=False)
        yield dict(user_id=user_id, k=8, spread_interests=True, explore_slots=2)
        yield dict(user_id=user_id, k=6, spread_interests=True)
        yield dict(user_id=user_id, k=10, categories=["Toys_and_Games"])
        yield dict(user_id=user_id, k=10, context_item_ids=other[:1])
        # A page of one of their own items, seen items shown.
        yield dict(user_id=user_id, k=12, context_item_ids=history[user_id][:2], exclude_seen=False)
        yield dict(user_id=user_id, k=5, categories=[items.loc[history[user_id][0], "category"], "Beauty"],
                   context_item_ids=other[1:])
    yield dict(user_id="NOBODY-AT-ALL", k=10)  # cold start
    yield dict(user_id="NOBODY-AT-ALL", k=10, categories=["Beauty"])
    yield dict(user_id="NOBODY-AT-ALL", k=10, context_item_ids=other[:2])  # unknown, on a product page


def test_the_new_path_answers_what_the_old_one_did(channels, dataset):
    gateway, profile, embedding = channels
    weights = RankingServicer(RankingConfig(), None).weights
    compared = 0
    for case in cases(dataset, profile):
        request = gateway_pb2.RecommendRequest(**{k: v for k, v in case.items() if k != "exclude_seen"})
        if "exclude_seen" in case:
            request.exclude_seen = case["exclude_seen"]
        reply = gateway.Recommend(request, timeout=30)
        old_case = {("context_ids" if k == "context_item_ids" else k): v for k, v in case.items()}
        expected, path = old_recommend(profile, embedding, weights, **old_case)
        assert reply.path == PATHS[path], case
        assert [i.item_id for i in reply.items] == [r.item_id for r in expected], case
        assert [i.reason for i in reply.items] == [r.reason for r in expected], case
        assert [(i.title, i.category) for i in reply.items] == [(r.title, r.category) for r in expected], case
        assert np.allclose([i.score for i in reply.items], [r.score for r in expected], rtol=0, atol=1e-5), case
        compared += len(reply.items)
    assert compared > 500
