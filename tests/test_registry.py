"""The model registry (recsys_core/models/registry.py): numbered versions
added whole, promotion in one step, and what a serving process polls."""
from __future__ import annotations

import json
import threading

import pytest

from recsys_core import errors
from recsys_core.models.registry import MANIFEST, PromotionWatcher, Registry


def artifact(tmp_path, name="model", text="weights"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "weights.bin").write_text(text)
    return folder


def test_versions_are_numbered_in_order_and_carry_their_manifest(tmp_path):
    registry = Registry(tmp_path / "reg")
    first = registry.add("sequence", artifact(tmp_path, "a", "one"), data_window={"events": 10},
                         metrics={"ndcg@10": 0.05})
    second = registry.add("sequence", artifact(tmp_path, "b", "two"), parent=first.version)
    assert [v.version for v in registry.versions("sequence")] == [1, 2]
    assert (second.path / "weights.bin").read_text() == "two"
    assert second.manifest["parent"] == 1 and second.manifest["kind"] == "sequence"
    assert first.manifest["data_window"] == {"events": 10} and first.manifest["metrics"] == {"ndcg@10": 0.05}
    assert registry.latest("sequence").label == "sequence/2"


def test_a_single_file_artifact_brings_its_manifest_along(tmp_path):
    model = tmp_path / "ranker.txt"
    model.write_text("tree")
    model.with_name("ranker.txt.json").write_text("{}")
    version = Registry(tmp_path / "reg").add("ranker", model)
    assert sorted(p.name for p in version.path.iterdir()) == ["ranker.txt", "ranker.txt.json", MANIFEST]


def test_an_incomplete_version_is_not_listed(tmp_path):
    registry = Registry(tmp_path / "reg")
    registry.add("value", artifact(tmp_path))
    (registry.root / "value" / "2").mkdir()  # a copy that died before its manifest
    assert [v.version for v in registry.versions("value")] == [1]
    assert registry.add("value", artifact(tmp_path, "b")).version == 3


def test_concurrent_adds_get_distinct_versions(tmp_path):
    registry = Registry(tmp_path / "reg")
    source = artifact(tmp_path)
    added, failures = [], []

    def add():
        try:
            added.append(registry.add("ranker", source).version)
        except Exception as error:  # noqa: BLE001 - the assertion reports it
            failures.append(error)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and sorted(added) == list(range(1, 9))


def test_promotion_is_what_the_watcher_reports_once(tmp_path):
    registry = Registry(tmp_path / "reg")
    watcher = PromotionWatcher(registry, "ranker")
    assert registry.promoted("ranker") is None and watcher.changed() is None
    one = registry.add("ranker", artifact(tmp_path, "a"))
    two = registry.add("ranker", artifact(tmp_path, "b"))
    registry.promote("ranker", one.version, reason="first")
    assert watcher.changed().version == 1 and watcher.changed() is None
    registry.promote("ranker", two.version, reason="better")
    assert watcher.changed().version == 2
    assert json.loads((registry.root / "ranker" / "PROMOTED").read_text())["reason"] == "better"


def test_unknown_kinds_and_versions_are_clear_errors(tmp_path):
    registry = Registry(tmp_path / "reg")
    with pytest.raises(errors.InvalidArgument, match="unknown model kind"):
        registry.versions("encoder2")
    with pytest.raises(errors.NotFound, match="no ranker version 7"):
        registry.promote("ranker", 7)
