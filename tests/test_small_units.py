"""Configuration, validation, scoring and data loading."""
import gzip
import re

import numpy as np
import pytest

from recsys_core.data import shopping, paths
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.errors import InvalidArgument
from services.embedding.config import EmbeddingConfig
from services.gateway import requests as rq
from services.gateway.config import GatewayConfig
from recsys_core.ranking.scoring import UserVectors, Weights, rank


def test_config_reads_prefixed_environment_and_fails_fast():
    config = GatewayConfig.from_env({"GATEWAY_ADDRESS": "0.0.0.0:9", "GATEWAY_WORKERS": "3"})
    assert (config.address, config.workers) == ("0.0.0.0:9", 3)
    with pytest.raises(ConfigError, match="GATEWAY_WORKERS='four'"):
        GatewayConfig.from_env({"GATEWAY_WORKERS": "four"})
    with pytest.raises(ConfigError, match="EMBEDDING_ENCODER"):
        EmbeddingConfig.from_env({"EMBEDDING_ENCODER": "gpt"})
    with pytest.raises(ConfigError, match="minimum"):
        GatewayConfig.from_env({"GATEWAY_REQUEST_TIMEOUT_SECONDS": "0"})


def test_index_settings_come_from_the_environment_and_fail_fast():
    config = EmbeddingConfig.from_env({"EMBEDDING_INDEX": "hnsw", "EMBEDDING_HNSW_EF_SEARCH": "200",
                                       "EMBEDDING_IVF_NPROBE": "8"})
    assert (config.index.kind, config.index.hnsw_ef_search, config.index.ivf_nprobe) == ("hnsw", 200, 8)
    assert EmbeddingConfig.from_env({}).index.kind == "auto"
    for environ, message in (
        ({"EMBEDDING_INDEX": "annoy"}, "EMBEDDING_INDEX='annoy' must be one of auto, flat, hnsw, ivfpq"),
        ({"EMBEDDING_HNSW_M": "1"}, "EMBEDDING_HNSW_M=1 is below the minimum 2"),
        ({"EMBEDDING_HNSW_EF_SEARCH": "many"}, "EMBEDDING_HNSW_EF_SEARCH='many' is not an integer"),
        ({"EMBEDDING_INDEX_REBUILD_FRACTION": "2"}, "EMBEDDING_INDEX_REBUILD_FRACTION=2.0 is above"),
        ({"EMBEDDING_INDEX_HNSW_MIN_ITEMS": "10", "EMBEDDING_INDEX_IVFPQ_MIN_ITEMS": "5"},
         "ivfpq_min_items=5 is below hnsw_min_items=10"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            EmbeddingConfig.from_env(environ)


def test_request_checks_name_the_field():
    for call, field in (
        (lambda: rq.check_k(0), "k"),
        (lambda: rq.check_k(501), "k"),
        (lambda: rq.check_user_id(" "), "user_id"),
        (lambda: rq.check_categories(["X"], {"A"}), "categories"),
        (lambda: rq.check_context(["a"] * 3, 2), "context_item_ids"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            call()
        assert caught.value.field == field
    assert rq.check_categories(["A", "A"], {"A"}) == ["A"]
    assert rq.because_reason(2, "x" * 100).startswith("because you bought ") and rq.because_reason(2, "x" * 100).endswith("…")


def test_scoring_blends_interest_and_popularity():
    candidates = np.eye(3, dtype=np.float32)
    user = UserVectors(long_term=candidates[0], short_term=None, context=None, history=candidates[[2, 1]])
    ranked = rank(user, candidates, np.array([0, 0, 1000.0]), np.full(3, 1000.0), Weights(1, 1, 1, 0.1), k=3)
    assert list(ranked.order) == [0, 2, 1]
    assert list(ranked.because) == [0, 0, 1]
    popular_first = rank(user, candidates, np.array([0, 0, 1000.0]), np.full(3, 1000.0), Weights(0.01, 0, 0, 1), k=1)
    assert list(popular_first.order) == [2]
    with pytest.raises(InvalidArgument, match="user.long_term_interest"):
        rank(UserVectors(np.ones(2), None, None, None), candidates, np.zeros(3), np.ones(3), Weights(1, 1, 1, 1), 1)


def test_bundled_data_loads_with_text_for_every_item():
    dataset = shopping.Dataset.load(paths.BUNDLED_DATA_DIR)
    assert dataset.items.item_id.is_unique
    assert (dataset.items.text.str.len() > 0).all()
    sports = dataset.items[dataset.items.category == "Sports_and_Outdoors"].iloc[0]
    assert sports.text.startswith(sports.generated_keywords)
    assert set(dataset.interactions.item_id) <= set(dataset.items.item_id)
    per_user = dataset.interactions.groupby("user_id").category.nunique()
    assert (per_user > 1).sum() >= 500, "the subset keeps shoppers active in several categories"
    assert dataset.interactions.user_id.nunique() >= 2000


def test_chronological_keeps_benchmark_order_within_a_category():
    events = shopping.load_interactions(paths.BUNDLED_DATA_DIR)
    ordered = shopping.chronological(events)
    for _, group in ordered.groupby(["user_id", "category"], sort=False):
        assert group.seq.is_monotonic_increasing


def test_loader_explains_what_is_missing(tmp_path):
    with pytest.raises(shopping.DataError, match="items.csv.gz"):
        shopping.load_items(tmp_path)
    with gzip.open(tmp_path / shopping.ITEMS_FILE, "wt") as f:
        f.write("item_id,category\nA,B\n")
    with pytest.raises(shopping.DataError, match="lacks columns"):
        shopping.load_items(tmp_path)


def test_replacing_writes_whole_files_and_overlapping_writers_do_not_collide(tmp_path):
    target = tmp_path / "cache" / "vectors.npz"
    with paths.replacing(target) as first, paths.replacing(target) as second:
        assert first != second and first.suffix == second.suffix == ".npz"
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first", "the outer block finished last"
    with pytest.raises(RuntimeError):
        with paths.replacing(target) as broken:
            broken.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["vectors.npz"], "no temporary file is left"
