"""The value-aware ranking objective (docs/results.md, "Value-aware ranking"):
its term in the shared scoring function, the item value it reads, the
ranking service's weight and validation, and the offline curve."""
from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.errors import InvalidArgument
from recsys_core.ranking.scoring import SERVING_WEIGHTS, Features, add_value, check_values, score_features, top
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.signals.item_value import PRIOR_PURCHASES, ItemValues, return_shares
from tests.conftest import secured, service_channel, start


def candidates(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    columns = [rng.uniform(-1, 1, n).astype(np.float32) for _ in range(5)]
    popularity = rng.integers(0, 100, n).astype(np.float32)
    return Features(*columns), popularity, np.full(n, 100, dtype=np.float32), rng.uniform(0, 1, n).astype(np.float32)


def test_weight_zero_is_the_plain_order():
    features, popularity, most, values = candidates()
    plain = score_features(features, popularity, most, replace(SERVING_WEIGHTS, value=0.0))
    with_values = score_features(features, popularity, most, replace(SERVING_WEIGHTS, value=0.0), values=values)
    np.testing.assert_array_equal(plain, with_values)
    # Every candidate at value 0 (the wire's unknown) leaves the order plain at any weight.
    unknown = score_features(features, popularity, most, replace(SERVING_WEIGHTS, value=0.7),
                             values=np.zeros_like(values))
    np.testing.assert_array_equal(top(plain, 0), top(unknown, 0))


def test_a_larger_weight_moves_high_value_items_up():
    features, popularity, most, values = candidates()
    weights = (0.0, 0.1, 0.3, 1.0, 3.0)
    orders = [top(score_features(features, popularity, most, replace(SERVING_WEIGHTS, value=w), values=values), 10)
              for w in weights]
    shown_value = [float(values[order].mean()) for order in orders]
    assert shown_value == sorted(shown_value) and shown_value[-1] > shown_value[0]
    # The most valuable candidate climbs, never falls, as the weight grows.
    best = int(np.argmax(values))
    positions = [int(np.flatnonzero(top(score_features(features, popularity, most, replace(SERVING_WEIGHTS, value=w),
                                                        values=values), 0) == best)[0]) for w in weights]
    assert positions == sorted(positions, reverse=True) and positions[-1] < positions[0]
    # Two candidates alike but for their value: the more valuable one first.
    twin = Features(*(np.array([0.5, 0.5], dtype=np.float32) for _ in range(5)))
    scores = score_features(twin, np.array([3, 3], np.float32), np.array([9, 9], np.float32),
                            replace(SERVING_WEIGHTS, value=0.2), values=np.array([0.2, 0.9], np.float32))
    assert list(top(scores, 0)) == [1, 0]


def test_the_sweep_adds_the_term_as_serving_does():
    features, popularity, most, values = candidates()
    plain = score_features(features, popularity, most, replace(SERVING_WEIGHTS, value=0.0))
    for w in (0.05, 0.3, 2.0):
        served = score_features(features, popularity, most, replace(SERVING_WEIGHTS, value=w), values=values)
        np.testing.assert_array_equal(add_value(plain.copy(), values, w), served)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_an_item_value_outside_0_to_1_is_refused(bad):
    with pytest.raises(InvalidArgument, match=r"candidates\[2\]\.value"):
        check_values(np.array([0.0, 1.0, bad, 0.5], dtype=np.float32))


def test_return_shares_count_later_occasions_and_shrink_small_counts():
    # Item 0 is always followed by a later purchase, item 2 never is (last);
    # item 1 shares its basket with the last purchase in the second sequence.
    sequences = [np.array([0, 1, 2]), np.array([0, 1, 2])]
    occasions = [np.array([0, 1, 2]), np.array([0, 1, 1])]
    shares = return_shares(sequences, 4, occasions)
    overall = 3 / 6
    assert shares[0] == pytest.approx((2 + PRIOR_PURCHASES * overall) / (2 + PRIOR_PURCHASES))
    assert shares[1] == pytest.approx((1 + PRIOR_PURCHASES * overall) / (2 + PRIOR_PURCHASES))
    assert shares[2] == pytest.approx((0 + PRIOR_PURCHASES * overall) / (2 + PRIOR_PURCHASES))
    assert shares[3] == pytest.approx(overall)  # never bought: the overall share
    # Without baskets every purchase is its own occasion.
    assert return_shares(sequences, 4)[1] > shares[1]
    with pytest.raises(ValueError, match="occasions"):
        return_shares(sequences, 4, [np.array([0, 1]), np.array([0, 1, 2])])


def test_value_weight_config_fails_fast():
    from services.ranking.config import MAX_VALUE_WEIGHT, RankingConfig

    base = {"RANKING_INSECURE": "1"}
    assert RankingConfig.from_env(base).value_weight == SERVING_WEIGHTS.value
    assert RankingConfig.from_env({**base, "RANKING_VALUE_WEIGHT": "0.3"}).value_weight == 0.3
    for bad in ("-0.1", "abc", "nan", "inf", str(MAX_VALUE_WEIGHT + 1)):
        with pytest.raises(ConfigError, match="RANKING_VALUE_WEIGHT"):
            RankingConfig.from_env({**base, "RANKING_VALUE_WEIGHT": bad})


@pytest.mark.integration
def test_ranking_service_applies_the_value_weight_and_refuses_bad_values():
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    def ranked(address, values):
        with service_channel(address, "ranking") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            request = ranking_pb2.RankRequest(candidates=[
                ranking_pb2.Candidate(item_id=f"i{n}", popularity=10 - n, max_popularity=10, value=value)
                for n, value in enumerate(values)])
            return [c.item_id for c in stub.Rank(request, timeout=5).candidates]

    plain_server, plain = start(create_server(RankingConfig(address="127.0.0.1:0", value_weight=0.0,
                                                            **secured("ranking"))))
    value_server, valued = start(create_server(RankingConfig(address="127.0.0.1:0", value_weight=1.0,
                                                             **secured("ranking"))))
    try:
        values = [0.0, 0.0, 0.9]
        assert ranked(plain, values) == ["i0", "i1", "i2"]  # popularity alone
        assert ranked(valued, values) == ["i2", "i0", "i1"]
        with pytest.raises(grpc.RpcError) as refused:
            ranked(valued, [0.2, 1.5])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("candidates[1].value")
    finally:
        plain_server.stop(None)
        value_server.stop(None)


@pytest.mark.integration
def test_ranking_service_reads_the_item_value_table_when_requests_carry_none(tmp_path):
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    table = ItemValues({"i1": 0.95, "i0": 0.1}, default=0.5).save(tmp_path / "values.json")
    server, address = start(create_server(RankingConfig(address="127.0.0.1:0", value_weight=1.0,
                                                        item_values=str(table), **secured("ranking"))))
    try:
        with service_channel(address, "ranking") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)

            def ranked(values=(0.0, 0.0, 0.0)):
                request = ranking_pb2.RankRequest(candidates=[
                    ranking_pb2.Candidate(item_id=f"i{n}", popularity=10 - n, max_popularity=10, value=value)
                    for n, value in enumerate(values)])
                return [c.item_id for c in stub.Rank(request, timeout=5).candidates]

            # From the table: i1 0.95, i2 unknown (the default 0.5), i0 0.1.
            assert ranked() == ["i1", "i2", "i0"]
            # A request's own values win over the table.
            assert ranked((0.9, 0.0, 0.0)) == ["i0", "i1", "i2"]
    finally:
        server.stop(None)


@pytest.mark.parametrize("content, problem", [
    ("not json", "not JSON"),
    ('{"kind": "item-values", "default": 0.5, "values": {"a": 1.7}}', "a: value 1.7 is not between 0 and 1"),
    ('{"kind": "item-values", "default": null, "values": {}}', "is not between 0 and 1"),
    ('{"values": {}}', "not an item-value table"),
])
def test_a_bad_item_value_table_stops_the_start(tmp_path, content, problem):
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    path = tmp_path / "values.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="RANKING_ITEM_VALUES: .*" + problem):
        create_server(RankingConfig(address="127.0.0.1:0", item_values=str(path), **secured("ranking")))
    with pytest.raises(ConfigError, match="RANKING_ITEM_VALUES: .*cannot read"):
        create_server(RankingConfig(address="127.0.0.1:0", item_values=str(tmp_path / "missing.json"),
                                    **secured("ranking")))


def test_item_values_command_on_the_bundled_data(tmp_path):
    from recsys_core.data import paths
    from training.value_curve import item_values_main

    out = tmp_path / "values.json"
    assert item_values_main(["--data-dir", str(paths.BUNDLED_DATA_DIR),
                             "--retail-dir", str(paths.BUNDLED_RETAIL_DIR), "--out", str(out)]) == 0
    table = ItemValues.load(out)
    assert any(item.startswith("retail-") for item in table.values)
    assert any(not item.startswith("retail-") for item in table.values)
    assert 0 < table.default < 1 and len(set(table.values.values())) > 10


def test_curve_on_the_bundled_data(tmp_path, exported_encoder):
    from recsys_core.data import paths, shopping
    from training import value_curve
    from training.items import default_encoder

    dataset = shopping.Dataset.load(paths.BUNDLED_DATA_DIR)
    # Beauty: the suite's other offline tests have its item vectors in the
    # embedding cache already (a category of its own would cost minutes to encode).
    work = value_curve.workload("Beauty", dataset.items, dataset.interactions, "Beauty",
                                default_encoder(), max_users=64)
    report = value_curve.run([work], weights=(0.0, 0.5, 5.0), progress=False)
    valid = report["data"]["Beauty"]["valid"]
    assert valid["0.0"]["users"] == 64
    assert valid["5.0"]["value@10"] > valid["0.5"]["value@10"] > valid["0.0"]["value@10"]
    assert report["chosen_weight"] in (0.0, 0.5, 5.0)
    assert set(report["data"]["Beauty"]["test"]) == {"0.0", str(float(report["chosen_weight"]))}
    assert value_curve.plot(report, tmp_path / "curve.png").stat().st_size > 0


def test_choice_is_the_largest_weight_within_the_loss_on_every_data_set():
    from training.value_curve import choose

    def curve(*ndcgs):
        return {w: {"ndcg@10": n} for w, n in zip((0.0, 0.1, 0.2, 0.5), ndcgs)}

    assert choose({"a": curve(0.100, 0.099, 0.0985, 0.090), "b": curve(0.050, 0.0495, 0.0489, 0.049)}) == 0.1
    assert choose({"a": curve(0.100, 0.090, 0.080, 0.070)}) == 0.0
