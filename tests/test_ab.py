"""A/B arms (issue #19, part 2): stable weighted assignment, ranker versions
held side by side, the exposure log in both stores, attribution of later
events to the arm that showed the item, and `recsys ab-report`."""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import grpc
import numpy as np
import pytest

from recsys.profile.v1 import profile_pb2
from recsys_core.errors import FailedPrecondition
from recsys_core.experiments import report
from recsys_core.experiments.arms import Arm, ArmsError, Experiment, parse_arms
from recsys_core.models.registry import Registry
from recsys_core.ranking.learned import FEATURE_NAMES
from recsys_core.ranking.versions import RankerVersions
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.store.events import PURCHASE, VIEW, StoredEvent, StoredExposure

HOUR = 3600


# -- assignment -----------------------------------------------------------------------

def ids(n: int) -> list[str]:
    return [f"shopper-{i}" for i in range(n)]


def test_assignment_is_stable_and_respects_the_weights_on_10k_ids():
    arms = parse_arms("control=ranker/3:20,treatment=ranker/4:80")
    experiment = Experiment("exp-1", arms)
    first = [experiment.assign(u).name for u in ids(10_000)]
    # Another object, as another replica or a restart would make: the same arms.
    again = [Experiment("exp-1", parse_arms("control=ranker/3:20,treatment=ranker/4:80")).assign(u).name
             for u in ids(10_000)]
    assert first == again
    shares = Counter(first)
    # Binomial sd at p=0.2, n=10k is 0.4 %: 1.5 % is beyond 3.5 sd.
    assert abs(shares["control"] / 10_000 - 0.2) < 0.015, shares
    three = Experiment("exp-1", parse_arms("a=hand:1,b=ranker/1:1,c=ranker/2:2"))
    spread = Counter(three.assign(u).name for u in ids(10_000))
    for name, share in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
        assert abs(spread[name] / 10_000 - share) < 0.02, spread
    # A new experiment (salt) reshuffles independently: about half agree.
    other = [Experiment("exp-2", arms).assign(u).name for u in ids(10_000)]
    agree = sum(a == b for a, b in zip(first, other)) / 10_000
    assert abs(agree - (0.2 ** 2 + 0.8 ** 2)) < 0.02
    # Pinned: the bucket is SHA-256's, not Python's per-process hash(), so
    # another process (a replica, a restart) computes the same; changing the
    # definition would reshuffle every running experiment.
    from recsys_core.experiments.arms import bucket

    assert (bucket("exp-1", "shopper-0", 1000), bucket("exp-1", "A2V5R832QCSOMX", 1000)) == (238, 373)
    # A parked arm (weight 0) gets nobody.
    parked = Experiment("exp-1", parse_arms("old=ranker/1:0,new=ranker/2:5"))
    assert {parked.assign(u).name for u in ids(1000)} == {"new"}


def test_arms_config_is_checked_with_clear_messages():
    assert parse_arms("") == ()
    assert parse_arms(" control = ranker/3:50 , t=hand:50") == (Arm("control", "ranker/3", 50), Arm("t", "hand", 50))
    for spec, message in (("control=ranker/3", "expected name=model:weight"),
                          ("a=ranker/3:50", "at least two arms"),
                          ("a=ranker/3:50,a=ranker/4:50", "repeat"),
                          ("a=model-x:1,b=hand:1", "expected 'hand' or 'ranker/<version>'"),
                          ("a=ranker/0:1,b=hand:1", "expected 'hand' or 'ranker/<version>'"),
                          ("a=hand:x,b=hand:1", "not a whole number"),
                          ("a=hand:-1,b=hand:1", "must not be negative"),
                          ("a=hand:0,b=hand:0", "sum to 1.."),
                          ("a b=hand:1,c=hand:1", "an arm's name")):
        with pytest.raises(ArmsError, match=message):
            parse_arms(spec)
    from services.gateway.config import GatewayConfig

    base = {"GATEWAY_INSECURE": "1"}
    with pytest.raises(ConfigError, match="GATEWAY_AB_SALT: required"):
        GatewayConfig.from_env({**base, "GATEWAY_AB_ARMS": "a=hand:1,b=ranker/2:1"})
    with pytest.raises(ConfigError, match="GATEWAY_AB_ARMS: .*at least two"):
        GatewayConfig.from_env({**base, "GATEWAY_AB_ARMS": "a=hand:1", "GATEWAY_AB_SALT": "x"})
    config = GatewayConfig.from_env({**base, "GATEWAY_AB_ARMS": "a=hand:1,b=ranker/2:1", "GATEWAY_AB_SALT": "x"})
    assert config.experiment.arms[1] == Arm("b", "ranker/2", 1)
    assert GatewayConfig.from_env(base).experiment is None


# -- attribution and the statistics ------------------------------------------------------

def exposure(user, arm, ts, items, version="ranker/1", experiment="e"):
    return StoredExposure(f"{user}-{arm}-{ts}", user, experiment, arm, version, ts, tuple(items))


def test_purchases_go_to_the_last_exposure_that_showed_the_item_within_the_window():
    shown = [exposure("u", "a", 1000, ["x", "y", "z"]), exposure("u", "b", 2000, ["y", "w"])]
    events = {"u": [
        StoredEvent("u", "y", "C", PURCHASE, 2500, amount=10.0),  # both showed y: the later (b) wins
        StoredEvent("u", "x", "C", PURCHASE, 2600, amount=5.0),  # only a showed x
        StoredEvent("u", "w", "C", PURCHASE, 2000 + 2 * HOUR, amount=7.0),  # outside a 1 h window
        StoredEvent("u", "q", "C", PURCHASE, 2100, amount=3.0),  # never shown
        StoredEvent("u", "z", "C", VIEW, 1500),  # a view: a hit for a, no conversion
        StoredEvent("u", "x", "C", PURCHASE, 900, amount=1.0),  # before any exposure
    ]}
    outcomes = {o.arm: o for o in report.attribute(shown, events, window_seconds=HOUR, k=10)}
    assert (outcomes["a"].conversions, outcomes["a"].value) == (1, 5.0)
    assert (outcomes["b"].conversions, outcomes["b"].value) == (1, 10.0)
    # a's window [1000, 4600] holds y, x, z, q (and w at 9200 is out): shown x, y, z all relevant.
    assert outcomes["a"].hit == 1.0
    relevant_a = {"y", "x", "z", "q"}
    assert outcomes["a"].ndcg == pytest.approx(report.ndcg_at(["x", "y", "z"], relevant_a, 10))
    assert outcomes["a"].ndcg == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(4))
                                               / (1 + 1 / np.log2(3) + 1 / np.log2(4) + 1 / np.log2(5)))
    # b's window [2000, 5600]: y, x, q; shown y (1st) relevant, w not.
    assert outcomes["b"].ndcg == pytest.approx(1 / (1 + 1 / np.log2(3) + 1 / np.log2(4)))
    # Nothing after an exposure: a miss with NDCG 0, still counted.
    [late] = report.attribute([exposure("v", "a", 10_000, ["x"])], {"v": []})
    assert (late.hit, late.ndcg, late.conversions) == (0.0, 0.0, 0)


def test_intervals_resample_shoppers_not_exposures():
    # One shopper with 100 exposures, half hits: resampling shoppers cannot
    # move the rate (one shopper drawn is always the same one); resampling
    # exposures would give a wide interval.
    one = [report.Outcome("u", "a", "ranker/1", hit=float(i % 2), ndcg=0.5 * (i % 2)) for i in range(100)]
    [arm] = report.summarise(one, resamples=500)
    assert arm.metrics["hit_rate"] == report.Estimate(0.5, 0.5, 0.5)
    rng = np.random.default_rng(1)
    many = [report.Outcome(f"u{i}", arm_name, "v", hit=float(rng.random() < p), ndcg=0.0, conversions=int(
        rng.random() < p / 4), value=10.0 * (rng.random() < p / 4))
        for arm_name, p in (("control", 0.2), ("treatment", 0.4)) for i in range(400)]
    control, treatment = report.summarise(many, ["control", "treatment"], resamples=1000)
    for r in (control, treatment):
        for name, estimate in r.metrics.items():
            assert estimate.low <= estimate.value <= estimate.high, (name, estimate)
    assert control.metrics["hit_rate"].high < treatment.metrics["hit_rate"].low
    assert treatment.versus_first["hit_rate"].low > 0
    assert control.shoppers == 400 and control.exposures == 400
    # Seeded: the same intervals again.
    assert report.summarise(many, ["control", "treatment"], resamples=1000)[1].metrics == treatment.metrics


def test_report_text_json_and_plot(tmp_path):
    outcomes = [report.Outcome(f"u{i}", arm, "ranker/1" if arm == "a" else "", hit=float(i % 3 == 0),
                               ndcg=0.3 * (i % 3 == 0), conversions=i % 5 == 0, value=2.5 * (i % 5 == 0))
                for arm in ("a", "b") for i in range(30)]
    reports = report.summarise(outcomes, ["a", "b"], resamples=200)
    text = report.as_text(reports, "exp", 7 * 24 * HOUR, 10)
    assert "bootstrap over shoppers" in text and "b - a: hit@10" in text and "unranked: 30" in text
    parsed = json.loads(report.as_json(reports, experiment="exp"))
    assert [a["arm"] for a in parsed["arms"]] == ["a", "b"] and parsed["arms"][0]["conversions"] == 6
    out = tmp_path / "ab.png"
    report.plot(reports, out, "exp", 10)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


# -- the store ---------------------------------------------------------------------------

def test_store_keeps_exposures_once_and_forgets_them_with_the_shopper(event_store):
    first = StoredExposure("x1", "u1", "e", "a", "ranker/1", 1000, ("i1", "i2"))
    second = StoredExposure("x2", "u2", "e", "b", "", 1100, ("i3",))
    assert event_store.record_exposures([first, second, first]) == [True, True, False]
    assert event_store.record_exposures([first]) == [False]
    assert sorted(event_store.exposures(), key=lambda e: e.exposure_id) == [first, second]
    assert list(event_store.exposures(since=1050)) == [second]
    event_store.forget_user("u1", now=2000)
    assert list(event_store.exposures()) == [second]
    # One from before the forgetting (queued at the gateway meanwhile) is not stored again; a later one is.
    assert event_store.record_exposures([first, StoredExposure("x3", "u1", "e", "a", "", 2500, ("i1",))]) == \
        [False, True]
    assert {e.exposure_id for e in event_store.exposures()} == {"x2", "x3"}


# -- ranker versions ----------------------------------------------------------------------

def tiny_ranker(path, sign: float):
    """A LambdaRank model on two of the service's features that orders by
    sign * long_term_similarity: two versions with opposite orders."""
    import lightgbm

    rng = np.random.default_rng(0)
    similarity = rng.random(2000)
    popularity = rng.random(2000)
    labels = np.digitize(sign * similarity, np.quantile(sign * similarity, np.linspace(0, 1, 9)[1:-1]))
    data = lightgbm.Dataset(np.column_stack([similarity, popularity]), labels, group=[20] * 100,
                            feature_name=["long_term_similarity", "log_popularity"])
    booster = lightgbm.train({"objective": "lambdarank", "verbosity": -1, "num_threads": 1, "min_data_in_leaf": 5},
                             data, num_boost_round=15)
    booster.save_model(str(path))
    path.with_name(path.name + ".json").write_text(json.dumps({"feature_names": booster.feature_name()}))
    return path


@pytest.fixture(scope="module")
def ranker_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    registry = Registry(root / "models")
    for number, sign in ((1, 1.0), (2, -1.0)):
        folder = root / f"trained-{number}"
        folder.mkdir()
        version = registry.add("ranker", tiny_ranker(folder / "ranker.txt", sign), metrics={"sign": sign})
        assert version.version == number
    return registry


def test_versions_load_once_keep_the_recent_ones_and_refuse_unknown(ranker_registry):
    versions = RankerVersions(ranker_registry, capacity=1)
    one = versions.get(1)
    assert versions.get(1) is one and versions.held() == [1]
    assert set(one.feature_names) <= set(FEATURE_NAMES)
    versions.get(2)
    assert versions.held() == [2]  # capacity 1: version 1 let go
    with pytest.raises(FailedPrecondition, match="ranker/7 is not in the model registry"):
        versions.get(7)
    with pytest.raises(FailedPrecondition, match="no model registry"):
        RankerVersions(None).get(1)


# -- the exposure log ------------------------------------------------------------------------

def test_exposure_log_drops_and_counts_when_full_and_never_waits():
    from prometheus_client import CollectorRegistry

    from services.gateway.exposures import ExposureLog, exposure as make

    sent: list[int] = []
    release = None

    async def send(request, timeout):
        await release.wait()
        sent.append(len(request.exposures))
        return profile_pb2.RecordExposuresResponse(recorded=len(request.exposures))

    async def scenario():
        nonlocal release
        release = asyncio.Event()
        registry = CollectorRegistry()
        log = ExposureLog(send, capacity=5, batch=3, flush_seconds=0.05, registry=registry)
        started = time.monotonic()
        accepted = [log.offer(make("u", "e", "a", "ranker/1", ["i"])) for _ in range(20)]
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(0.2)  # the sender took a batch of 3 and waits on the profile service
        accepted += [log.offer(make("u", "e", "a", "ranker/1", ["i"])) for _ in range(5)]
        release.set()
        await asyncio.sleep(0.5)
        await log.close()
        value = {o: registry.get_sample_value("recsys_gateway_exposures_total", {"outcome": o})
                 for o in ("recorded", "dropped_queue_full")}
        return accepted, value

    accepted, counted = asyncio.run(scenario())
    assert accepted[:5] == [True] * 5 and not any(accepted[5:20])
    assert sum(accepted) == 5 + 3  # three places freed by the batch in flight
    assert counted == {"recorded": float(sum(sent)), "dropped_queue_full": float(25 - sum(accepted))}
    assert sum(sent) == sum(accepted)


# -- over gRPC ------------------------------------------------------------------------------

def candidates(similarities):
    from recsys.common.v1 import common_pb2
    from recsys.ranking.v1 import ranking_pb2

    return [ranking_pb2.Candidate(item_id=f"i{i}", popularity=3, max_popularity=10,
                                  features=common_pb2.CandidateFeatures(long_term_similarity=s))
            for i, s in enumerate(similarities)]


@pytest.mark.integration
def test_ranking_serves_registry_versions_side_by_side_and_refuses_unknown_ones(ranker_registry):
    from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server
    from tests.conftest import secured, service_channel, start

    with pytest.raises(ConfigError, match="RANKING_MODEL_VERSIONS: ranker/9 is not in the model registry"):
        create_server(RankingConfig(address="127.0.0.1:0", model_registry=str(ranker_registry.root),
                                    model_versions=(9,), **secured("ranking")))
    server, address = start(create_server(RankingConfig(
        address="127.0.0.1:0", model_registry=str(ranker_registry.root), model_versions=(1,), **secured("ranking"))))
    try:
        with service_channel(address, "ranking") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            request = ranking_pb2.RankRequest(candidates=candidates([0.3, 0.9, 0.1, 0.6]))
            orders = {}
            for asked in ("ranker/1", "ranker/2", "hand", ""):
                request.model_version = asked
                reply = stub.Rank(request, timeout=10)
                orders[asked] = [c.item_id for c in reply.candidates]
                assert reply.model_version == (asked or "hand")
            assert orders["ranker/1"] == ["i1", "i3", "i0", "i2"]
            assert orders["ranker/2"] == orders["ranker/1"][::-1]  # learnt the opposite order
            assert orders["hand"] == orders[""]
            for asked, code, message in (("ranker/9", grpc.StatusCode.FAILED_PRECONDITION, "ranker/9 is not in"),
                                         ("ranker/x", grpc.StatusCode.INVALID_ARGUMENT, "model_version")):
                request.model_version = asked
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Rank(request, timeout=10)
                assert refused.value.code() == code and message in refused.value.details()
    finally:
        server.stop(None)


def wait_for(condition, seconds=30.0):
    give_up = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < give_up, "timed out"
        time.sleep(0.1)
    return found


@pytest.mark.integration
def test_two_ranker_arms_over_the_stack_and_ab_report_attributes_a_purchase(stack, dataset, ranker_registry,
                                                                            tmp_path, tmp_path_factory, capsys):
    """Real servers: the stack's profile and embedding, a ranking service
    holding two registry versions, a gateway with two arms. Each reply names
    its arm and the version that ranked it, a shopper keeps their arm, the
    exposures reach the store, and a purchase of a shown item counts for
    its arm in `recsys ab-report`."""
    from recsys.common.v1 import common_pb2
    from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from recsys.profile.v1 import profile_pb2_grpc
    from recsys_cli.abreport import ab_report_main
    from recsys_core.store.sqlite_store import SQLiteEventStore
    from services.gateway.config import GatewayConfig
    from services.gateway.server import create_server as create_gateway
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server as create_ranking
    from tests.conftest import gateway_channel, secured, service_channel, start

    salt = "test-ab-stack"
    ranking_server, ranking = start(create_ranking(RankingConfig(
        address="127.0.0.1:0", model_registry=str(ranker_registry.root), **secured("ranking"))))
    servers = [ranking_server]
    try:
        def gateway(arms):
            server, address = start(create_gateway(GatewayConfig(
                address="127.0.0.1:0", profile_address=stack.profile, embedding_address=stack.embedding,
                ranking_address=ranking, ab_arms=parse_arms(arms), ab_salt=salt, exposure_flush_seconds=0.05,
                **secured("gateway"))))
            servers.append(server)
            return address

        address = gateway("control=ranker/1:50,treatment=ranker/2:50")
        # Shoppers of this test's own, known from a few views of popular
        # items, so that the session's other tests see their shoppers unchanged.
        users = [f"ab-shopper-{n}" for n in range(12)]
        popular = dataset.interactions.item_id.value_counts().index[:20].tolist()
        with service_channel(stack.profile, "profile") as channel:
            profile_pb2_grpc.ProfileServiceStub(channel).IngestEvents(profile_pb2.IngestEventsRequest(events=[
                common_pb2.Event(user_id=user, item_id=popular[(n + j) % len(popular)],
                                 type=common_pb2.EVENT_TYPE_VIEW, timestamp=int(time.time()) - 60,
                                 idempotency_key=f"{salt}-{user}-{j}")
                for n, user in enumerate(users) for j in range(3)]), timeout=30)
        experiment = Experiment(salt, parse_arms("control=ranker/1:50,treatment=ranker/2:50"))
        expected = {user: experiment.assign(user).name for user in users}
        assert set(expected.values()) == {"control", "treatment"}
        version_of = {"control": "ranker/1", "treatment": "ranker/2"}
        shown = {}
        with gateway_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for _ in range(2):
                for user in users:
                    reply = stub.Recommend(gateway_pb2.RecommendRequest(user_id=user, k=10), timeout=30)
                    assert reply.path == gateway_pb2.RECOMMENDATION_PATH_PERSONALISED
                    assert reply.arm == expected[user], user
                    assert reply.model_version == version_of[reply.arm]
                    shown.setdefault(user, [i.item_id for i in reply.items])
        def recorded():
            # The stack's store (start_stack: a session folder named profile<n>).
            for path in tmp_path_factory.getbasetemp().glob("profile*/events.sqlite3"):
                store = SQLiteEventStore(path)
                try:
                    found = [e for e in store.exposures() if e.experiment == salt]
                finally:
                    store.close()
                if len(found) == 2 * len(users):
                    return path, found
            return None

        path, mine = wait_for(recorded)
        assert {(e.user_id, e.arm, e.model_version) for e in mine} == {
            (u, expected[u], version_of[expected[u]]) for u in users}
        assert all(list(e.item_ids) == shown[e.user_id] for e in mine)

        buyer = next(u for u in users if expected[u] == "control")
        viewer = next(u for u in users if expected[u] == "treatment")
        with service_channel(stack.profile, "profile") as channel:
            profile = profile_pb2_grpc.ProfileServiceStub(channel)
            profile.IngestEvents(profile_pb2.IngestEventsRequest(events=[
                common_pb2.Event(user_id=buyer, item_id=shown[buyer][2], type=common_pb2.EVENT_TYPE_PURCHASE,
                                 amount=12.5, idempotency_key=f"{salt}-buy"),
                common_pb2.Event(user_id=viewer, item_id=shown[viewer][0], type=common_pb2.EVENT_TYPE_VIEW,
                                 idempotency_key=f"{salt}-view"),
            ]), timeout=30)
            # The exposure write is the gateway's alone.
            with pytest.raises(grpc.RpcError) as refused:
                with service_channel(stack.profile, "profile", identity="ingest", token=None) as ingest:
                    profile_pb2_grpc.ProfileServiceStub(ingest).RecordExposures(
                        profile_pb2.RecordExposuresRequest(exposures=[profile_pb2.Exposure(
                            exposure_id="x", user_id=buyer, experiment=salt, arm="control")]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as refused:
                profile.RecordExposures(profile_pb2.RecordExposuresRequest(exposures=[profile_pb2.Exposure(
                    exposure_id="x", user_id=buyer, experiment=salt, arm="")]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "exposures[0].arm: must not be empty" in refused.value.details()

        plot = tmp_path / "ab.png"
        capsys.readouterr()
        assert ab_report_main(["--store", "sqlite", "--store-path", str(path), "--experiment", salt, "--json",
                               "--arms", "control,treatment", "--resamples", "200", "--plot", str(plot)]) == 0
        result = {arm["arm"]: arm for arm in json.loads(capsys.readouterr().out)["arms"]}
        control, treatment = result["control"], result["treatment"]
        assert (control["conversions"], control["value"]) == (1, 12.5)
        assert (treatment["conversions"], treatment["value"]) == (0, 0.0)
        assert control["shoppers"] == sum(a == "control" for a in expected.values())
        assert control["exposures"] == 2 * control["shoppers"]
        # The buyer's two exposures both hit (the purchase follows both); the viewer's too.
        assert control["metrics"]["hit_rate"]["value"] == pytest.approx(2 / control["exposures"])
        assert treatment["metrics"]["hit_rate"]["value"] == pytest.approx(2 / treatment["exposures"])
        assert treatment["metrics"]["ndcg"]["value"] > 0
        assert control["model_versions"] == {"ranker/1": control["exposures"]}
        assert plot.read_bytes()[:4] == b"\x89PNG"

        # An arm naming a version ranking cannot load: the shopper still gets
        # a list, unranked, and the reply says nothing ranked it.
        broken = gateway("a=ranker/9:1,b=ranker/9:1")
        with gateway_channel(broken) as channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
                gateway_pb2.RecommendRequest(user_id=users[0], k=5), timeout=30)
        assert reply.arm in ("a", "b") and reply.model_version == "" and len(reply.items) == 5
        assert list(reply.skipped_stages) == [gateway_pb2.STAGE_RANKING]
    finally:
        for server in servers:
            server.stop(None)


def test_exposure_log_sends_what_it_holds_when_closed():
    """A batch being filled or sent when the gateway drains goes out on close, with the queue."""
    from services.gateway.exposures import ExposureLog, exposure as make

    received: list[str] = []

    async def send(request, timeout):
        received.extend(e.exposure_id for e in request.exposures)
        return profile_pb2.RecordExposuresResponse(recorded=len(request.exposures))

    async def scenario():
        log = ExposureLog(send, capacity=100, batch=50, flush_seconds=30.0)
        offered = [make("u", "e", "a", "", ["i"]) for _ in range(7)]
        for item in offered:
            log.offer(item)
        await asyncio.sleep(0.1)  # the task holds all 7, waiting 30 s for more
        assert received == [] and log.pending() == 0
        await log.close()
        return [e.exposure_id for e in offered]

    offered = asyncio.run(scenario())
    assert received == offered


def test_ranking_names_its_own_model_and_reads_the_versions_to_load(ranker_registry, tmp_path):
    from services.ranking.config import RankingConfig
    from services.ranking.servicer import model_label

    in_registry = ranker_registry.get("ranker", 2).path / "ranker.txt"
    assert model_label(str(in_registry)) == "ranker/2"
    loose = tmp_path / "beauty.txt"
    loose.write_text("x")
    assert model_label(str(loose)) == str(loose)
    base = {"RANKING_INSECURE": "1"}
    assert RankingConfig.from_env({**base, "RANKING_MODEL_VERSIONS": "3, ranker/4"}).model_versions == (3, 4)
    with pytest.raises(ConfigError, match="RANKING_MODEL_VERSIONS: 'x' is not a ranker version"):
        RankingConfig.from_env({**base, "RANKING_MODEL_VERSIONS": "3,x"})


def test_the_report_reads_exposures_and_events_from_each_store(event_store):
    """collect() over SQLite, Redis and a Redis Cluster: the latest experiment
    by default, its exposures, and the events that attribute to them."""
    event_store.append([StoredEvent("u1", "i2", "C", PURCHASE, 1500, amount=4.0),
                        StoredEvent("u2", "i9", "C", PURCHASE, 1600, amount=9.0)])
    event_store.record_exposures([
        StoredExposure("old", "u1", "exp-0", "a", "ranker/1", 100, ("i2",)),
        StoredExposure("x1", "u1", "exp-1", "a", "ranker/1", 1000, ("i1", "i2")),
        StoredExposure("x2", "u2", "exp-1", "b", "ranker/2", 1100, ("i3",)),
    ])
    collected = report.collect(event_store)
    assert collected.experiment == "exp-1" and collected.experiments == ["exp-0", "exp-1"]
    assert {e.exposure_id for e in collected.exposures} == {"x1", "x2"}
    outcomes = {o.arm: o for o in report.attribute(collected.exposures, collected.events_of)}
    assert (outcomes["a"].conversions, outcomes["a"].value, outcomes["a"].hit) == (1, 4.0, 1.0)
    assert (outcomes["b"].conversions, outcomes["b"].hit) == (0, 0.0)
    assert report.collect(event_store, experiment="exp-0").exposures[0].exposure_id == "old"
    assert report.collect(event_store, since=1050).experiment == "exp-1"
