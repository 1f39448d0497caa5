"""`recsys retrain --kind value` (issue #19): the churn and lifetime-value
model retrained on a small event store, judged on its newest 90 days against
the promoted version, promoted or kept; the profile service follows the
promoted value version without a restart."""
from __future__ import annotations

import json
import logging
import sqlite3
import time

import joblib
import pytest

from recsys_cli.main import main as recsys
from recsys_core.data import paths, shopping
from recsys_core.data.retail import retail_items_and_events
from recsys_core.models import promotion
from recsys_core.models.registry import Registry
from recsys_core.signals.value import ARTIFACT_FILE, btyd_columns, design, load_version, retail_stored_events
from recsys_core.store.events import benchmark_stored_events
from recsys_core.store.sqlite_store import SQLiteEventStore
from training import value as training
from training import value_lifecycle

# The bundled retail subset's first customers (purchases with amounts) and
# the smallest review category (shoppers without amounts): seconds to fit.
CUSTOMERS = 70
REVIEW_CATEGORY = "Office_Products"


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("value-lifecycle")
    _, retail = retail_items_and_events(paths.BUNDLED_RETAIL_DIR)
    retail = retail[retail.user_id.isin(sorted(retail.user_id.unique())[:CUSTOMERS])]
    reviews = shopping.chronological(shopping.load_interactions(paths.BUNDLED_DATA_DIR))
    reviews = reviews[reviews.category == REVIEW_CATEGORY]
    store = SQLiteEventStore(root / "events.sqlite3")
    store.bulk_load(retail_stored_events(retail), total=len(retail), marker="retail", show_progress=False)
    store.bulk_load(benchmark_stored_events(reviews), total=len(reviews), marker="reviews", show_progress=False)
    store.close()
    return root / "events.sqlite3"


@pytest.fixture(scope="module")
def first(small_store, tmp_path_factory):
    """The first retrain on the store: (registry, its decision, the log lines)."""
    registry = Registry(tmp_path_factory.mktemp("value-registry"))
    store = SQLiteEventStore(small_store)
    logger, lines = logging.getLogger("recsys.retrain"), []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    # setLevel, not the attribute: it clears the loggers' isEnabledFor caches, which an
    # earlier INFO call at WARNING (tests/test_lifecycle.py's) left saying no.
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        decision = value_lifecycle.retrain_value(store, registry, progress=False, source="small store")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        store.close()
    return registry, decision, lines


def test_retrain_promotes_a_first_value_version_learnt_before_the_holdout(first):
    registry, decision, lines = first
    assert decision["decision"] == "promote" and decision["promoted"] is None
    assert json.loads(lines[-1]) == json.loads(json.dumps(decision))  # the one JSON line logged
    version = registry.promoted("value")
    assert version.version == decision["version"] == 1
    window = version.manifest["data_window"]
    holdout = window["holdout"]
    # Nothing in the 90-day window was learnt from; the review category's
    # events are learnt up to its own test cutoff, years later.
    assert holdout["days"] == 90 and holdout["shoppers"] >= 50 and holdout["shoppers_without_amounts"] > 0
    retail_learnt = set(window["categories"]) >= {"Online_Retail", REVIEW_CATEGORY}
    assert retail_learnt and window["store"]["events"] > window["events"]
    metrics = version.manifest["metrics"]
    assert 0.6 < metrics["churn_roc_auc"] <= 1 and metrics["holdout"]["churn_roc_auc"] == metrics["churn_roc_auc"]
    assert -1 <= metrics["spend_3m_spearman"] <= 1 and "churn_without_amounts_roc_auc" in metrics["holdout"]
    # Served as it was measured: the profile service's loader reads it.
    served = load_version(version)
    assert served.version == "value/1"
    assert sorted(served.models) == ["churn", "churn_without_amounts", "spend_12m", "spend_3m"]
    assert [t["version"] for t in promotion.history(registry, "value")] == [1]


@pytest.fixture(scope="module")
def window(first, small_store):
    """The holdout shoppers the first retrain scored versions on (features at
    its cutoff, outcomes in the 90 days after it), read from the store again."""
    from datetime import datetime

    from recsys_core.signals.value import CHURN_HORIZON_DAYS, DAY, ShopperHistory

    cutoff = int(datetime.fromisoformat(first[1]["holdout"]["from"]).timestamp())
    store = SQLiteEventStore(small_store)
    try:
        by_user = value_lifecycle.store_histories(store, False)
    finally:
        store.close()
    histories = {u: ShopperHistory(e) for u, e in by_user.items() if value_lifecycle.has_amounts(e)}
    test = training.snapshot(histories, cutoff, cutoff + CHURN_HORIZON_DAYS * DAY)
    assert len(test) == first[1]["holdout"]["shoppers"]
    return test


def seen_the_holdout(version, window, out):
    """The version with its churn model replaced by a tree grown on the
    holdout's own outcomes: a version that has seen the window ranks its
    churners almost perfectly, better than any honest candidate."""
    from sklearn.tree import DecisionTreeClassifier

    artifact = joblib.load(version.path / ARTIFACT_FILE)
    test = window.assign(**btyd_columns(window, artifact["btyd"]))
    columns = training.CHURN_COLUMNS
    tree = DecisionTreeClassifier(random_state=0).fit(design(test, columns), test.churned.astype(int))
    artifact["models"]["churn"] = {"columns": columns, "estimator": tree}
    artifact["version"] = "seen-the-holdout"
    out.mkdir()
    joblib.dump(artifact, out / ARTIFACT_FILE)
    return out


def test_retrain_keeps_a_better_promoted_version_and_skips_without_new_events(first, window, small_store, tmp_path,
                                                                              monkeypatch, capsys):
    registry, _, _ = first
    cheat = registry.add("value", seen_the_holdout(registry.promoted("value"), window, tmp_path / "cheat"))
    promotion.promote(registry, "value", cheat.version, "test: a version that has seen the holdout")
    monkeypatch.setenv("PROFILE_STORE", "sqlite")
    monkeypatch.setenv("PROFILE_STORE_PATH", str(small_store))
    argv = ["retrain", "--kind", "value", "--registry", str(registry.root), "--no-progress"]
    assert recsys(argv + ["--force"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["decision"] == "keep", decision
    assert decision["promoted"]["version"] == cheat.version
    assert decision["promoted"]["churn_roc_auc"] > decision["candidate"]["churn_roc_auc"] + decision["tolerance"]
    assert registry.promoted("value").version == cheat.version  # still serving
    kept = registry.get("value", decision["version"])
    assert kept.manifest["retrain"]["decision"] == "keep" and kept.manifest["parent"] == cheat.version
    # Nothing new in the store since the version just added: nothing to do.
    assert recsys(argv) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "skip"


def test_a_store_without_amounts_is_told_not_trained_on(tmp_path, capsys, monkeypatch):
    store = SQLiteEventStore(tmp_path / "events.sqlite3")
    reviews = shopping.chronological(shopping.load_interactions(paths.BUNDLED_DATA_DIR))
    reviews = reviews[reviews.category == REVIEW_CATEGORY]
    store.bulk_load(benchmark_stored_events(reviews), total=len(reviews), marker="reviews", show_progress=False)
    store.close()
    monkeypatch.setenv("PROFILE_STORE_PATH", str(tmp_path / "events.sqlite3"))
    assert recsys(["retrain", "--kind", "value", "--registry", str(tmp_path / "reg"), "--no-progress"]) == 2
    assert "no stored event carries an amount" in capsys.readouterr().err
    assert not (tmp_path / "reg" / "value").exists()
    with pytest.raises(SystemExit):
        recsys(["retrain", "--kind", "value", "value", "--registry", str(tmp_path / "reg")])
    assert "each kind once" in capsys.readouterr().err


@pytest.mark.integration
def test_profile_follows_the_promoted_value_version_without_a_restart(first, window, small_store, stack, tmp_path,
                                                                     caplog):
    from conftest import secured, service_channel, start
    from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
    from services.profile.config import ProfileConfig
    from services.profile.server import create_server

    source, _, _ = first
    registry = Registry(tmp_path / "registry")
    one = registry.add("value", source.get("value", 1).path / ARTIFACT_FILE)
    registry.promote("value", one.version, "test: start")
    # The backup API: a file copy could miss what is still in the write-ahead log.
    with sqlite3.connect(small_store) as source_db, sqlite3.connect(tmp_path / "events.sqlite3") as copy:
        source_db.backup(copy)
    server, address = start(create_server(ProfileConfig(
        address="127.0.0.1:0", store_path=str(tmp_path / "events.sqlite3"), data_dir="", retail_dir="",
        embedding_address=stack.embedding, value_model_registry=str(registry.root), value_poll_seconds=0.05,
        **secured("profile"))))
    store = SQLiteEventStore(small_store)
    shopper = min(user for user, _, _ in store.user_items() if user.startswith("retail-"))
    store.close()
    try:
        with service_channel(address, "profile") as channel:
            stub = profile_pb2_grpc.ProfileServiceStub(channel)

            def value():
                return stub.GetProfile(profile_pb2.GetProfileRequest(user_id=shopper), timeout=30).value

            before = value()
            assert before.model_version == one.label and 0 <= before.churn_probability <= 1
            cheat = registry.add("value", seen_the_holdout(one, window, tmp_path / "cheat"))
            registry.promote("value", cheat.version, "test: swap")
            deadline = time.monotonic() + 30
            while value().model_version != cheat.label:  # the cached profile is forecast again
                assert time.monotonic() < deadline, "the promoted value version never served"
                time.sleep(0.05)
            assert value().churn_probability != pytest.approx(before.churn_probability, abs=1e-9)
            metrics = server.metrics.registry
            assert metrics.get_sample_value("recsys_profile_value_model_version") == cheat.version
            assert metrics.get_sample_value("recsys_profile_value_model_swaps") == 1
            broken = tmp_path / "broken"
            broken.mkdir()
            (broken / ARTIFACT_FILE).write_bytes(b"not a model")
            bad = registry.add("value", broken)
            with caplog.at_level(logging.ERROR):
                registry.promote("value", bad.version, "test: a broken version")
                deadline = time.monotonic() + 30
                while f"refused {bad.label}" not in caplog.text:
                    assert time.monotonic() < deadline, "the broken version was not refused"
                    time.sleep(0.05)
            assert value().model_version == cheat.label  # the old one keeps forecasting
    finally:
        server.stop(None)


def test_value_registry_settings_are_read_and_checked():
    from recsys_core.rpc.envconfig import ConfigError
    from services.profile.config import ProfileConfig

    config = ProfileConfig.from_env({"PROFILE_INSECURE": "1", "PROFILE_VALUE_MODEL_REGISTRY": "/models",
                                     "PROFILE_VALUE_POLL_SECONDS": "0.5"})
    assert (config.value_model_registry, config.value_poll_seconds) == ("/models", 0.5)
    with pytest.raises(ConfigError, match="PROFILE_VALUE_POLL_SECONDS"):
        ProfileConfig.from_env({"PROFILE_INSECURE": "1", "PROFILE_VALUE_POLL_SECONDS": "0"})
