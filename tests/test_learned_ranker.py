"""The learned ranker: trained on the bundled subset's validation positions,
it must beat the hand-weighted order on test positions, offline and as the
ranking service serves it over gRPC; a bad RANKING_MODEL stops the service
at start."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import numpy as np
import pandas as pd
import pytest

from recsys.common.v1 import common_pb2
from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.data import paths, shopping
from recsys_core.ranking.learned import FEATURE_NAMES, LearnedRanker, ModelError, feature_matrix, \
    manifest_path_of
from recsys_core.ranking.scoring import Features
from recsys_core.rpc.envconfig import ConfigError
from tests.conftest import secured, secured_env, service_channel, start
from training import ranker as training


def encoder_vectors(dataset):
    """`vectors_of` for training.prepare: the pretrained encoder's item vectors (cached)."""
    from training.items import default_encoder, split_item_vectors

    encoder = default_encoder()
    return lambda split: split_item_vectors(split, dataset.items, encoder, False)


def train_small(dataset, **kwargs):
    return training.train_ranker(dataset, "Beauty", encoder_vectors(dataset), threads=2, **kwargs)


@pytest.fixture(scope="module")
def small(dataset, exported_encoder):
    return train_small(dataset, ablation=False)


@pytest.fixture(scope="module")
def model_file(small, tmp_path_factory):
    path = tmp_path_factory.mktemp("ranker") / "beauty.txt"
    training.save(small, path)
    return path


def test_learned_order_beats_the_hand_weights_on_test_positions(small):
    test = small.manifest["test"]
    learned, hand = test["learned"], test["hand_weighted"]
    assert learned["users"] == hand["users"] > 500
    assert learned["ndcg@10"] > hand["ndcg@10"], test
    assert learned["recall@10"] > hand["recall@10"], test
    # What retrieval missed no ranker finds: the pool's recall bounds both.
    assert learned["recall@20"] <= small.manifest["pool"]["recall_test"]
    assert small.manifest["training"]["best_iteration"] >= 1


def test_no_test_item_reaches_training(dataset, small, exported_encoder):
    """Every shopper's test item swapped for another shopper's: the model
    trained must not change by a byte (its report on test positions does)."""
    events = dataset.interactions.sort_values(["user_id", "category", "seq"], kind="stable")
    beauty = events[events.category == "Beauty"]
    last = beauty.groupby("user_id").tail(1).index
    swapped = beauty.copy()
    swapped.loc[last, "item_id"] = np.roll(swapped.loc[last, "item_id"].to_numpy(), 1)
    other = shopping.Dataset(dataset.items, pd.concat([swapped, events[events.category != "Beauty"]]))
    retrained = train_small(other, ablation=False)
    assert retrained.booster.model_to_string() == small.booster.model_to_string()
    assert retrained.manifest["test"] != small.manifest["test"], "the swap changed nothing: the test proved nothing"


def test_model_file_and_manifest_load_as_the_service_loads_them(model_file, small):
    loaded = LearnedRanker.load(model_file)
    assert loaded.feature_names == FEATURE_NAMES
    assert loaded.manifest["data"]["category"] == "Beauty"
    pools_row = np.random.default_rng(0).normal(size=(7, len(FEATURE_NAMES))).astype(np.float32)
    assert np.allclose(loaded.score(pools_row), small.booster.predict(pools_row), atol=1e-6)


def test_a_model_asking_for_unknown_features_is_refused(tmp_path, model_file):
    import lightgbm

    rows = np.random.default_rng(0).normal(size=(40, 2))
    booster = lightgbm.train({"objective": "lambdarank", "verbose": -1, "min_data_in_leaf": 1},
                             lightgbm.Dataset(rows, (rows[:, 0] > 0).astype(float), group=[20, 20],
                                              feature_name=["long_term_similarity", "basket_value"]),
                             num_boost_round=2)
    unknown = tmp_path / "unknown.txt"
    booster.save_model(str(unknown))
    with pytest.raises(ModelError, match="basket_value"):
        LearnedRanker.load(unknown)
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("not a model\n")
    with pytest.raises(ModelError, match="not a LightGBM model"):
        LearnedRanker.load(garbage)
    # A manifest that lists other columns than the model: refused, not trusted.
    mismatched = tmp_path / "mismatched.txt"
    mismatched.write_bytes(model_file.read_bytes())
    manifest_path_of(mismatched).write_text('{"feature_names": ["log_popularity"]}')
    with pytest.raises(ModelError, match="manifest"):
        LearnedRanker.load(mismatched)


def rank_request(inputs) -> ranking_pb2.RankRequest:
    features, popularity, most, drift, co_purchases = inputs
    return ranking_pb2.RankRequest(user=ranking_pb2.UserFeatures(drift_score=drift), candidates=[
        ranking_pb2.Candidate(
            item_id=str(i), popularity=int(popularity[i]), max_popularity=int(most[i]), co_purchases=int(co_purchases[i]),
            features=common_pb2.CandidateFeatures(
                long_term_similarity=features.long_term[i], short_term_similarity=features.short_term[i],
                context_similarity=features.context[i], model_similarity=features.model[i],
                disliked_similarity=features.disliked[i]))
        for i in range(len(features))])


def served_scores(address: str, pools) -> list[np.ndarray]:
    """Each test shopper's pool ranked by the service, all requests in flight
    at once (the model scores in several of the server's threads together):
    scores back in pool order."""
    scores = []
    with service_channel(address, "ranking") as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        calls = [stub.Rank.future(rank_request(inputs), timeout=60) for inputs in pools.inputs]
        for inputs, call in zip(pools.inputs, calls):
            reply = call.result()
            scored = np.full(len(inputs[0]), -np.inf, dtype=np.float32)
            for candidate in reply.candidates:
                scored[int(candidate.item_id)] = candidate.score
            scores.append(scored)
    return scores


@pytest.mark.integration
def test_ranking_service_serves_the_model_and_beats_its_hand_weights(model_file, small, dataset, exported_encoder):
    """Both orders as the ranking service answers them over gRPC, on the
    same test pools the offline report scored: the model's NDCG@10 is the
    offline one and above the hand weights'."""
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    category = training.prepare(dataset, "Beauty", encoder_vectors(dataset))
    pools = category.pools("test", list(range(0, len(category.split.users), 3)))
    learned_server, learned = start(create_server(RankingConfig(address="127.0.0.1:0", model=str(model_file),
                                                                **secured("ranking"))))
    hand_server, hand = start(create_server(RankingConfig(address="127.0.0.1:0", **secured("ranking"))))
    try:
        served_learned = served_scores(learned, pools)
        served_hand = served_scores(hand, pools)
    finally:
        learned_server.stop(None)
        hand_server.stop(None)
    offline = training.score_pools(small.booster, pools, list(FEATURE_NAMES))
    for served, expected in zip(served_learned, offline):
        assert np.allclose(served, expected, atol=1e-5)
    for served, expected in zip(served_hand, pools.hand):
        assert np.allclose(served, expected, atol=1e-5)
    learned_metrics = training.evaluate_scores(pools, served_learned, category.split.num_items)
    hand_metrics = training.evaluate_scores(pools, served_hand, category.split.num_items)
    assert learned_metrics["ndcg@10"] > hand_metrics["ndcg@10"], (learned_metrics, hand_metrics)


@pytest.mark.integration
def test_ranking_service_refuses_bad_input_with_the_model(model_file):
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    server, address = start(create_server(RankingConfig(address="127.0.0.1:0", model=str(model_file),
                                                        **secured("ranking"))))
    try:
        with service_channel(address, "ranking") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            bad = [ranking_pb2.Candidate(item_id="x"), ranking_pb2.Candidate(
                item_id="y", features=common_pb2.CandidateFeatures(short_term_similarity=float("inf")))]
            with pytest.raises(grpc.RpcError) as refused:
                stub.Rank(ranking_pb2.RankRequest(candidates=bad), timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith("candidates[1].features.short_term_similarity")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Rank(ranking_pb2.RankRequest(user=ranking_pb2.UserFeatures(drift_score=1.5),
                                                  candidates=bad[:1]), timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Absent signals (all zero) are the model's missing values, not an error.
            reply = stub.Rank(ranking_pb2.RankRequest(candidates=bad[:1] * 3, k=2), timeout=5)
            assert len(reply.candidates) == 2
    finally:
        server.stop(None)


def test_bad_model_path_stops_the_service_before_it_serves(tmp_path):
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    with pytest.raises(ConfigError, match="RANKING_MODEL: .*no such model file"):
        create_server(RankingConfig(address="127.0.0.1:0", model=str(tmp_path / "missing.txt"), **secured("ranking")))
    assert RankingConfig.from_env({"RANKING_MODEL": "/m.txt", "RANKING_INSECURE": "1"}).model == "/m.txt"
    assert RankingConfig.from_env({"RANKING_INSECURE": "1"}).model == ""


@pytest.mark.integration
def test_ranking_process_with_a_bad_model_exits_nonzero(tmp_path):
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("not a model\n")
    env = dict(os.environ, RANKING_ADDRESS="127.0.0.1:0", RANKING_MODEL=str(garbage), **secured_env("ranking"))
    finished = subprocess.run([sys.executable, "-m", "services.ranking.server"], env=env, cwd=paths.REPO_ROOT,
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode != 0
    assert "RANKING_MODEL" in finished.stderr and "not a LightGBM model" in finished.stderr


def test_feature_rows_mark_absent_sources_missing_and_rank_ties_alike():
    zeros = np.zeros(3, dtype=np.float32)
    features = Features(long_term=np.asarray([0.2, 0.9, 0.2], dtype=np.float32), short_term=zeros, context=zeros,
                        model=zeros, disliked=zeros)
    rows = feature_matrix(features, np.asarray([5, 0, 1]), np.asarray([10, 10, 10]), None, 0.3,
                          np.asarray([0, 2, 0]))
    column = {name: rows[:, i] for i, name in enumerate(FEATURE_NAMES)}
    assert list(column["long_term_rank"]) == [1, 0, 1]
    assert np.isnan(column["short_term_similarity"]).all() and np.isnan(column["short_term_rank"]).all()
    assert list(column["retrieval_score"]) == pytest.approx([0.2, 0.9, 0.2])
    assert np.isnan(column["drift_score"]).all() and list(column["churn_probability"]) == pytest.approx([0.3] * 3)
    assert list(column["co_purchase_share"]) == [0, 1, 0] and list(column["co_purchase_rank"]) == [1, 0, 1]
    assert list(column["candidates"]) == [3, 3, 3]


def test_the_search_keeps_the_settings_best_on_held_out_validation(dataset, exported_encoder):
    """`--search`: every setting of the grid is fitted on validation pools
    and the one with the best held-out validation NDCG@10 is kept; a
    setting that can barely learn (one split per tree, tiny steps) loses."""
    category = training.prepare(dataset, "Beauty", encoder_vectors(dataset))
    valid = category.pools("valid", list(range(len(category.split.users))))
    crippled = {"num_leaves": 2, "learning_rate": 0.001, "min_data_in_leaf": 2000}
    (booster, _, held_out), chosen, tried = training.choose(valid, list(FEATURE_NAMES), 2, 0, [crippled, {}])
    assert [t["overrides"] for t in tried] == [crippled, {}]
    assert held_out == pytest.approx(max(t["held_out_ndcg@10"] for t in tried), abs=1e-5)
    assert chosen == {} and tried[1]["held_out_ndcg@10"] > tried[0]["held_out_ndcg@10"], tried
    assert booster.params["num_leaves"] == 31
