"""The model lifecycle (training/lifecycle.py, recsys_cli/models.py): the
holdout window, reading the event store, audited promotion, `recsys models`,
and one real retrain cycle on the bundled Office_Products events."""
from __future__ import annotations

import json
import math
import shutil
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_cli.main import main as recsys
from recsys_core.data import paths, shopping
from recsys_core.models import promotion
from recsys_core.models.registry import MANIFEST, PROMOTED, Registry
from recsys_core.store.events import PURCHASE, VIEW, StoredEvent, benchmark_stored_events
from recsys_core.store.sqlite_store import SQLiteEventStore
from training import lifecycle, modeldir, versions

DAY = 86400


def frame(rows) -> pd.DataFrame:
    """(user, item, category, ts or None) rows, in append order, as store_events returns them."""
    events = pd.DataFrame([(u, i, c, math.nan if t is None else float(t), math.nan, PURCHASE) for u, i, c, t in rows],
                          columns=["user_id", "item_id", "category", "timestamp", "rating", "type"])
    events.insert(3, "seq", events.groupby(["user_id", "category"], sort=False).cumcount())
    return events


def catalogue(item_ids, category="C") -> pd.DataFrame:
    return pd.DataFrame({"item_id": sorted(item_ids), "category": category, "text": "t"})


def items_of(split, sequence) -> list[str]:
    return [split.item_ids[i] for i in sequence]


def test_holdout_window_holds_out_each_sequences_last_window_event_and_trains_before_the_window():
    t = 1_000 * DAY
    events = frame([
        # a: three old events, then two in the window: trains on the three,
        # predicts a5 from a1..a4 (a4 is history, never trained on).
        ("a", "a1", "C", t - 30 * DAY), ("a", "a2", "C", t - 20 * DAY), ("a", "a3", "C", t - 9 * DAY),
        ("a", "a4", "C", t - 5 * DAY), ("a", "a5", "C", t),
        # b: nothing in the window: all training, no case.
        ("b", "b1", "C", t - 40 * DAY), ("b", "b2", "C", t - 30 * DAY), ("b", "b3", "C", t - 20 * DAY),
        # c: undated events are old; one dated event in the window.
        ("c", "c1", "C", None), ("c", "c2", "C", None), ("c", "c3", "C", None), ("c", "c4", "C", t - DAY),
        # d: too short to train on (two events before), still a case.
        ("d", "d1", "C", t - 30 * DAY), ("d", "d2", "C", t - 30 * DAY), ("d", "d3", "C", t - 2 * DAY),
        # e: only a window event, no history: neither.
        ("e", "e1", "C", t - DAY),
    ])
    windows = lifecycle.holdout_window(events, catalogue(set(events.item_id) | {"cold"}), ["C"], days=7)
    assert windows.cutoff == t - 7 * DAY and windows.last == t
    train = {u: items_of(windows.train, s) for u, s in zip(windows.train.users, windows.train.sequences)}
    assert train == {"a": ["a1", "a2", "a3"], "b": ["b1", "b2", "b3"], "c": ["c1", "c2", "c3"]}
    cases = {u: items_of(windows.holdout, s) for u, s in zip(windows.holdout.users, windows.holdout.sequences)}
    assert cases == {"a": ["a1", "a2", "a3", "a4", "a5"], "c": ["c1", "c2", "c3", "c4"], "d": ["d1", "d2", "d3"]}
    # The protocol's test stage reads the target and its history off each case.
    assert items_of(windows.holdout, windows.holdout.targets("test")) == ["a5", "c4", "d3"]
    # One catalogue for both, with items no event names.
    assert windows.train.item_ids == windows.holdout.item_ids and "cold" in windows.train.item_ids
    assert sorted(windows.train_events.item_id) == ["a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2", "c3"]
    assert windows.describe()["cases"] == 3


@pytest.mark.parametrize("seed", range(5))
def test_no_holdout_event_is_ever_trained_on(seed):
    """Random logs, every event its own item (so items name events), times
    out of order within a sequence and some undated: nothing at or after a
    sequence's first window event reaches training, and every target is in the window."""
    rng = np.random.default_rng(seed)
    rows, time_of = [], {}
    for user in range(40):
        for category in ("X", "Y"):
            for n in range(int(rng.integers(1, 12))):
                item = f"{user}-{category}-{n}"
                ts = None if rng.random() < 0.1 else float(rng.integers(0, 60)) * DAY
                rows.append((f"u{user}", item, category, ts))
                time_of[item] = ts
    events = frame(rows)
    days = float(rng.integers(1, 30))
    windows = lifecycle.holdout_window(events, catalogue([]), ["X", "Y"], days=days)
    trained = {item for s in windows.train.sequences for item in items_of(windows.train, s)}
    in_window = {item for item, ts in time_of.items() if ts is not None and ts >= windows.cutoff}
    after_window = set()
    for (_, _), group in events.groupby(["user_id", "category"]):
        dated = group.timestamp.to_numpy() >= windows.cutoff
        if dated.any():
            after_window |= set(group.item_id.iloc[int(np.argmax(dated)):])
    assert in_window and windows.holdout.users
    assert not trained & in_window and not trained & after_window
    targets = set(items_of(windows.holdout, windows.holdout.targets("test")))
    assert targets <= in_window
    histories = {item for s in windows.holdout.sequences for item in items_of(windows.holdout, s[:-1])}
    assert not trained & (histories & after_window)
    assert set(windows.train_events.item_id) == trained


def test_holdout_window_needs_dated_events_and_a_positive_window():
    events = frame([("a", "a1", "C", None), ("a", "a2", "C", None)])
    with pytest.raises(lifecycle.RetrainError, match="no dated events"):
        lifecycle.holdout_window(events, catalogue([]), ["C"], days=7)
    with pytest.raises(lifecycle.RetrainError, match="positive"):
        lifecycle.holdout_window(events, catalogue([]), ["C"], days=0)


def test_store_events_are_read_in_append_order_with_their_times(event_store):
    event_store.append([StoredEvent("s1", "i2", "Beauty", PURCHASE, 200), StoredEvent("s2", "i1", "Toys", VIEW, None),
                        StoredEvent("s1", "i1", "Beauty", VIEW, 100), StoredEvent("s1", "i3", "Toys", PURCHASE, 300,
                                                                                   rating=4.0)])
    events = lifecycle.store_events(event_store, progress=False)
    s1 = events[events.user_id == "s1"]
    assert list(s1.item_id) == ["i2", "i1", "i3"]  # append order, not time order
    assert list(s1.seq) == [0, 1, 0]  # numbered per shopper and category
    assert list(s1.timestamp) == [200.0, 100.0, 300.0] and s1.rating.iloc[2] == 4.0
    assert math.isnan(events[events.user_id == "s2"].timestamp.iloc[0])
    assert len(events) == 4


def test_not_worse_is_within_the_tolerance_below_the_promoted_version():
    assert lifecycle.not_worse({"ndcg@10": 0.01}, None, 0.0)  # the first version
    assert lifecycle.not_worse({"ndcg@10": 0.046}, {"ndcg@10": 0.05}, 0.005)
    assert lifecycle.not_worse({"ndcg@10": 0.05}, {"ndcg@10": 0.05}, 0.0)
    assert not lifecycle.not_worse({"ndcg@10": 0.044}, {"ndcg@10": 0.05}, 0.005)


def test_data_window_and_register_record_what_was_trained_on(tmp_path):
    events = frame([("a", "a1", "C", 0), ("a", "a2", "C", DAY), ("b", "b1", "D", None)])
    window = versions.data_window(events)
    assert window == {"first_event": "1970-01-01T00:00:00+00:00", "last_event": "1970-01-02T00:00:00+00:00",
                      "events": 3, "shoppers": 2, "categories": ["C", "D"]}
    artifact = tmp_path / "ranker.txt"
    artifact.write_text("tree")
    registry = tmp_path / "reg"
    assert versions.register(Namespace(register=False, registry=registry), "ranker", artifact, window, {}) is None
    assert not registry.exists()
    added = versions.register(Namespace(register=True, registry=registry), "ranker", artifact, window,
                              {"test": {"ndcg@10": 0.1}}, data="x")
    assert added.label == "ranker/1" and added.manifest["data_window"] == window
    assert added.manifest["metrics"] == {"test": {"ndcg@10": 0.1}} and added.manifest["data"] == "x"


def small_registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "reg")
    for n in (1, 2):
        folder = tmp_path / f"m{n}"
        folder.mkdir()
        (folder / "weights").write_text(str(n))
        registry.add("ranker", folder, parent=n - 1 or None,
                     data_window={"first_event": "2014-01-01T00:00:00+00:00", "last_event": "2014-07-01T00:00:00+00:00",
                                  "events": 100 * n, "shoppers": 10 * n},
                     metrics={"test": {"ndcg@10": 0.1 * n}, "held_out_ndcg@10": 0.05})
    return registry


def test_promote_records_who_and_why_and_models_lists_it(tmp_path, monkeypatch, capsys):
    registry = small_registry(tmp_path)
    monkeypatch.setenv("RECSYS_ACTOR", "ops-alice")
    assert recsys(["promote", "ranker", "2", "--reason", "better on test", "--registry", str(registry.root)]) == 0
    assert registry.promoted("ranker").version == 2
    assert "by ops-alice" in registry.promotion_record("ranker")["reason"]
    assert recsys(["promote", "ranker", "1", "--reason", "rollback", "--by", "bob",
                   "--registry", str(registry.root)]) == 0
    trail = promotion.history(registry, "ranker")
    assert [(t["version"], t["previous"], t["by"], t["reason"]) for t in trail] == [
        (2, None, "ops-alice", "better on test"), (1, 2, "bob", "rollback")]
    capsys.readouterr()

    assert recsys(["models", "--kind", "ranker", "--json", "--registry", str(registry.root)]) == 0
    listed = json.loads(capsys.readouterr().out)["versions"]
    assert [(v["version"], v["parent"], v["promoted"]) for v in listed] == [(1, None, True), (2, 1, False)]
    assert listed[1]["metrics"] == {"test ndcg@10": 0.2, "held_out_ndcg@10": 0.05}
    assert listed[1]["window"]["events"] == 200
    assert recsys(["models", "--registry", str(registry.root)]) == 0
    table = capsys.readouterr().out
    assert "* ranker/1" in table and "  ranker/2" in table and "test ndcg@10 0.2000" in table


def test_promote_refuses_what_is_not_there_and_needs_a_reason(tmp_path, capsys):
    registry = small_registry(tmp_path)
    assert recsys(["promote", "ranker", "2", "--reason", "ok", "--registry", str(registry.root)]) == 0
    assert recsys(["promote", "ranker", "7", "--reason", "typo", "--registry", str(registry.root)]) == 2
    assert "no ranker version 7" in capsys.readouterr().err
    assert registry.promoted("ranker").version == 2 and len(promotion.history(registry, "ranker")) == 1
    with pytest.raises(SystemExit) as exit_:
        recsys(["promote", "ranker", "1", "--registry", str(registry.root)])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        recsys(["promote", "encoder", "1", "--reason", "x", "--registry", str(registry.root)])
    assert recsys(["models", "--registry", str(tmp_path / "empty")]) == 0
    assert "no versions" in capsys.readouterr().out


def test_retrain_says_what_is_wrong(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROFILE_STORE", "sqlite")
    monkeypatch.setenv("PROFILE_STORE_PATH", str(tmp_path / "missing.sqlite3"))
    args = ["retrain", "--registry", str(tmp_path / "reg"), "--no-progress"]
    assert recsys(args) == 2
    assert "no event store at" in capsys.readouterr().err
    store = SQLiteEventStore(tmp_path / "events.sqlite3")
    store.append([StoredEvent("s", "i", "Beauty", PURCHASE, 1)])
    store.close()
    monkeypatch.setenv("PROFILE_STORE_PATH", str(tmp_path / "events.sqlite3"))
    assert recsys(args + ["--categories", "Shoes"]) == 2
    assert "Shoes" in capsys.readouterr().err
    # Too few holdout cases to compare versions on: nothing trained, nothing added.
    assert recsys(args) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["decision"] == "skip" and "min-holdout" in decision["why"]
    assert Registry(tmp_path / "reg").versions("sequence") == []
    with pytest.raises(SystemExit):
        recsys(args + ["--tolerance", "-1"])


@pytest.mark.integration
def test_train_ranker_register_adds_a_version_with_its_window_and_test_metrics(tmp_path, exported_encoder, capsys):
    registry = tmp_path / "reg"
    out = tmp_path / "ranker.txt"
    assert recsys(["train-ranker", "--data", str(paths.BUNDLED_DATA_DIR), "--category", "Office_Products",
                   "--out", str(out), "--no-ablation", "--no-progress", "--max-shoppers", "100",
                   "--register", "--registry", str(registry)]) == 0
    (version,) = Registry(registry).versions("ranker")
    assert (version.path / "ranker.txt").read_bytes() == out.read_bytes() and (version.path / "ranker.txt.json").is_file()
    manifest = version.manifest
    assert manifest["data_window"]["events"] == 3408 and manifest["data_window"]["shoppers"] == 330
    assert manifest["data_window"]["categories"] == ["Office_Products"] and manifest["shoppers_trained_on"] == 100
    assert manifest["metrics"]["test"]["users"] == 100 and 0 <= manifest["metrics"]["test"]["ndcg@10"] <= 1
    assert Registry(registry).promoted("ranker") is None  # registering is not promoting
    capsys.readouterr()
    assert recsys(["models", "--registry", str(registry)]) == 0
    assert "  ranker/1" in capsys.readouterr().out


def test_retrain_reads_the_redis_store_the_profile_config_names(redis_server, tmp_path, monkeypatch, capsys):
    """PROFILE_STORE=redis: the job opens the store as the profile service
    does and counts the holdout cases from what it read (too few here: skip)."""
    from conftest import unique_redis_prefix
    from recsys_core.store.redis_store import RedisEventStore

    prefix = unique_redis_prefix()
    store = RedisEventStore(redis_server.url, prefix=prefix)
    store.append([StoredEvent(f"s{s}", f"i{s}-{n}", "Beauty", PURCHASE, 1_000 * DAY + n * DAY)
                  for s in range(3) for n in range(4)])
    store.close()
    monkeypatch.setenv("PROFILE_STORE", "redis")
    monkeypatch.setenv("PROFILE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PROFILE_REDIS_PREFIX", prefix)
    assert recsys(["retrain", "--registry", str(tmp_path / "reg"), "--no-progress", "--holdout-days", "1.5",
                   "--min-holdout", "4"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["decision"] == "skip" and decision["why"].startswith("3 holdout cases in the last 1.5 days")


@pytest.mark.integration
def test_train_value_register_adds_the_artifact_and_report(tmp_path):
    registry = Registry(tmp_path / "reg")
    assert recsys(["train-value", "--out", str(tmp_path / "out"), "--register", "--registry", str(registry.root)]) == 0
    (version,) = registry.versions("value")
    assert sorted(p.name for p in version.path.iterdir()) == ["report.json", "value_model.joblib", MANIFEST]
    report = json.loads((version.path / "report.json").read_text())
    window = version.manifest["data_window"]
    assert [window["first_event"], window["last_event"]] == report["cutoffs"]["data"]
    assert window["shoppers"] == report["cleaning"]["customers"] and window["events"] == report["cleaning"]["kept_lines"]
    assert version.manifest["metrics"]["churn_roc_auc"] == report["churn"]["model"]["roc_auc"]
    assert version.manifest["model_version"] == report["model_version"]


# -- one real cycle --------------------------------------------------------

CATEGORY = "Office_Products"  # the bundled set's smallest: 330 shoppers, 1.4k items


def broken_copy(version, out):
    """The version's model with its item vectors shuffled: a candidate that must rank worse."""
    shutil.copytree(version.path, out, ignore=shutil.ignore_patterns(MANIFEST))
    rng = np.random.default_rng(0)
    table = np.load(out / "items" / "text_vectors.npy")
    np.save(out / "items" / "text_vectors.npy", table[rng.permutation(len(table))])
    state = torch.load(modeldir.checkpoint_path(out), weights_only=True)
    if "items.ids.weight" in state:
        state["items.ids.weight"] = state["items.ids.weight"][torch.randperm(len(table))]
    torch.save(state, modeldir.checkpoint_path(out))
    return out


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    """The bundled Office_Products events without each shopper's last one in
    a SQLite store; `recsys retrain` (a first version); then the last events
    ingested a day after the newest, and `recsys retrain` again."""
    root = tmp_path_factory.mktemp("lifecycle")
    dataset = shopping.Dataset.load(paths.BUNDLED_DATA_DIR)
    office = dataset.interactions[dataset.interactions.category == CATEGORY].sort_values(["user_id", "seq"])
    newest = office.groupby("user_id").tail(1)
    older = office.drop(newest.index)
    store = SQLiteEventStore(root / "events.sqlite3")
    store.append(list(benchmark_stored_events(older)))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PROFILE_STORE", "sqlite")
        env.setenv("PROFILE_STORE_PATH", str(store.path))
        env.setenv("RECSYS_MODEL_REGISTRY", str(root / "models"))
        env.setenv("RECSYS_ACTOR", "retrain-test")
        common = ["retrain", "--categories", CATEGORY, "--max-epochs", "1", "--min-holdout", "5", "--no-progress",
                  "--threads", "2"]
        assert recsys(common + ["--holdout-days", "30"]) == 0
        unchanged = recsys(common + ["--holdout-days", "30"])
        ingested = store.append(list(benchmark_stored_events(newest.assign(timestamp=older.timestamp.max() + DAY))))
        assert all(ingested)
        assert recsys(common + ["--holdout-days", "1"]) == 0
    yield Namespace(root=root, store=store, registry=Registry(root / "models"), dataset=dataset, newest=newest,
                    unchanged=unchanged)
    store.close()


@pytest.mark.integration
def test_retrain_adds_versions_with_their_window_and_numbers(cycle):
    first, second = cycle.registry.versions("sequence")
    assert cycle.unchanged == 0  # the second run found no new events and added nothing
    assert first.manifest["parent"] is None and first.manifest["retrain"]["decision"] == "promote"
    assert second.manifest["parent"] == 1
    # Warm-started from the promoted version.
    assert modeldir.read_manifest(second.path)["training"]["init"] == str(first.path)
    window = second.manifest["data_window"]
    assert window["store"]["events"] == len(cycle.dataset.interactions.query("category == @CATEGORY"))
    assert window["holdout"]["cases"] == len(cycle.newest)  # each shopper's newest event, held out
    # Trained on events before the window only: none of the newly ingested ones.
    assert window["events"] <= window["store"]["events"] - len(cycle.newest)
    assert window["last_event"] < window["holdout"]["from"]
    decision = second.manifest["retrain"]
    assert decision["promoted"]["version"] == 1 and decision["holdout"]["cases"] == decision["candidate"]["users"]
    assert second.manifest["metrics"]["holdout"] == decision["candidate"] and "valid" in second.manifest["metrics"]
    expected = lifecycle.not_worse(decision["candidate"], decision["promoted"], decision["tolerance"])
    assert decision["decision"] == ("promote" if expected else "keep")
    assert cycle.registry.promoted("sequence").version == (2 if expected else 1)
    trail = promotion.history(cycle.registry, "sequence")
    assert trail[0]["version"] == 1 and trail[0]["by"] == "retrain-test"


@pytest.mark.integration
def test_a_worse_candidate_is_not_promoted_and_an_equal_one_is(cycle, tmp_path):
    registry = cycle.registry
    events = lifecycle.store_events(cycle.store, progress=False)
    windows = lifecycle.holdout_window(events, cycle.dataset.items, [CATEGORY], days=1)
    incumbent = registry.promoted("sequence")
    before = (registry.root / "sequence" / PROMOTED).read_text()

    worse = lifecycle.consider(registry, broken_copy(incumbent, tmp_path / "broken"), windows, cycle.dataset.items,
                               parent=incumbent, tolerance=0.005, progress=False)
    assert worse["decision"] == "keep"
    assert worse["candidate"]["ndcg@10"] < worse["promoted"]["ndcg@10"] - 0.005
    assert (registry.root / "sequence" / PROMOTED).read_text() == before  # untouched
    kept = registry.get("sequence", worse["version"])
    assert kept.manifest["retrain"]["decision"] == "keep" and kept.manifest["parent"] == incumbent.version

    same = tmp_path / "same"
    shutil.copytree(incumbent.path, same, ignore=shutil.ignore_patterns(MANIFEST))
    equal = lifecycle.consider(registry, same, windows, cycle.dataset.items, parent=incumbent, tolerance=0.0,
                               progress=False)
    assert equal["candidate"]["ndcg@10"] == equal["promoted"]["ndcg@10"]
    assert equal["decision"] == "promote" and registry.promoted("sequence").version == equal["version"]


@pytest.mark.integration
def test_retrain_ranker_compares_with_the_promoted_ranker_on_the_same_pools(tmp_path, exported_encoder, monkeypatch,
                                                                             capsys):
    dataset = shopping.Dataset.load(paths.BUNDLED_DATA_DIR)
    store = SQLiteEventStore(tmp_path / "events.sqlite3")
    store.append(list(benchmark_stored_events(dataset.interactions[dataset.interactions.category == CATEGORY])))
    store.close()
    monkeypatch.setenv("PROFILE_STORE_PATH", str(tmp_path / "events.sqlite3"))
    registry = Registry(tmp_path / "reg")
    # An old ranker nothing serves: what --keep prunes once a retrain promotes.
    stale = tmp_path / "stale" / "ranker.txt"
    stale.parent.mkdir()
    stale.write_text("an earlier experiment's trees\n")
    registry.add("ranker", stale)
    args = ["retrain", "--kind", "ranker", "--categories", CATEGORY, "--max-shoppers", "100", "--no-progress",
            "--registry", str(registry.root), "--min-holdout", "50"]
    assert recsys(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["decision"] == "promote" and first["promoted"] is None and first["candidate"]["users"] == 100
    assert "pruned" not in first  # no --keep: nothing deleted
    assert recsys(args + ["--keep", "1"]) == 0  # nothing new in the store: no promotion, no pruning
    assert json.loads(capsys.readouterr().out)["decision"] == "skip"
    assert [v.version for v in registry.versions("ranker")] == [1, 2]
    # The same data and seed again: LightGBM is deterministic, so the candidate
    # equals the promoted ranker on the same pools, which is not worse.
    assert recsys(args + ["--force", "--tolerance", "0", "--keep", "1"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["promoted"]["version"] == 2
    assert {k: v for k, v in second["promoted"].items() if k != "version"} == second["candidate"]
    assert second["decision"] == "promote" and registry.promoted("ranker").version == 3
    # Pruned after the promotion: the stale one; ranker/2 stays, the new one's parent.
    assert second["pruned"] == ["ranker/1"] and [v.version for v in registry.versions("ranker")] == [2, 3]
    version = registry.get("ranker", 3)
    assert version.manifest["parent"] == 2 and version.manifest["category"] == CATEGORY
    model = lifecycle.ranker_file(version)
    assert json.loads(model.with_name(model.name + ".json").read_text())["test"]["compared"]["ranker/2"] == \
        second["candidate"]
    with pytest.raises(SystemExit):
        recsys(["retrain", "--kind", "ranker", "--registry", str(registry.root)])  # which category?


@pytest.mark.integration
def test_retrain_on_new_events_promotes_into_a_serving_embedding_service_under_load(cycle, tmp_path):
    """The whole loop (issue #19): an embedding service serves the
    registry's promoted sequence version while calls keep coming; new
    shoppers' events reach the store; `recsys retrain` trains warm from the
    promoted version and promotes; the service swaps the new encoder and its
    index in. Not one call fails, and once a thread sees the new version it
    never sees the old again. The promotion is forced (--tolerance 1): that
    the rule keeps worse candidates is the test above's."""
    import sys
    import threading
    import time

    import grpc

    from conftest import secured, service_channel, start
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import create_server

    sys.path.insert(0, str(paths.REPO_ROOT / "bench"))
    from promotion import small_catalogue

    registry = cycle.registry
    serving = registry.promoted("sequence")
    data = small_catalogue(tmp_path / "data", 60)
    ids = list(shopping.load_items(data).item_id)
    server, address = start(create_server(EmbeddingConfig(
        address="127.0.0.1:0", data_dir=str(data), retail_dir="", catalogue_path=str(tmp_path / "catalogue.sqlite3"),
        cache_dir=str(tmp_path / "cache"), model_registry=str(registry.root), model_poll_seconds=0.1,
        grace_seconds=0.5, encoder_threads=1, **secured("embedding"))))
    stop, failures, seen = threading.Event(), [], []
    try:
        with service_channel(address, "embedding") as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            assert stub.ListCategories(embedding_pb2.ListCategoriesRequest(), timeout=30).model_version == serving.label

            def load():
                n = 0
                while not stop.is_set():
                    try:
                        reply = stub.RetrieveCandidates(embedding_pb2.RetrieveCandidatesRequest(
                            context_item_ids=[ids[n % len(ids)]], k=5), timeout=10)
                        assert reply.candidates[0].item.item_id == ids[n % len(ids)]
                        seen.append(reply.model_version)
                    except (grpc.RpcError, AssertionError) as error:
                        failures.append(repr(error))
                    n += 1
                    time.sleep(0.02)  # a steady trickle, leaving the cores to the training

            caller = threading.Thread(target=load, daemon=True)
            caller.start()
            # New shoppers, a day after the store's newest event: their last
            # events are the holdout, and training sees only what came before.
            office = cycle.dataset.interactions.query("category == @CATEGORY")
            newest = int(lifecycle.store_events(cycle.store, progress=False).timestamp.max())
            copies = office.assign(user_id="again-" + office.user_id, timestamp=newest + DAY)
            last = copies.sort_values(["user_id", "seq"]).groupby("user_id").tail(1).index
            copies.loc[last, "timestamp"] = newest + 2 * DAY
            assert all(cycle.store.append(list(benchmark_stored_events(copies))))
            with pytest.MonkeyPatch.context() as env:
                env.setenv("PROFILE_STORE", "sqlite")
                env.setenv("PROFILE_STORE_PATH", str(cycle.store.path))
                env.setenv("RECSYS_MODEL_REGISTRY", str(registry.root))
                assert recsys(["retrain", "--categories", CATEGORY, "--max-epochs", "1", "--min-holdout", "5",
                               "--no-progress", "--threads", "2", "--holdout-days", "1.5", "--tolerance", "1"]) == 0
            promoted = registry.promoted("sequence")
            assert promoted.version > serving.version and promoted.manifest["parent"] == serving.version
            deadline = time.monotonic() + 120
            while promoted.label not in seen[-5:] and time.monotonic() < deadline and not failures:
                time.sleep(0.1)
            stop.set()
            caller.join(15)
    finally:
        stop.set()
        server.stop(None)
    assert failures == []
    assert seen[0] == serving.label and seen[-1] == promoted.label, (seen[0], seen[-1])
    assert serving.label not in seen[seen.index(promoted.label):], "the old version answered after the new one"
