"""Pruning old registry versions (recsys_core/models/pruning.py, `recsys
models prune`): the newest N stay, and so does every version something may
still load, whatever N is; deletions are audited and never leave a reader
half a version."""
from __future__ import annotations

import json

import pytest

from recsys_cli.main import main as recsys
from recsys_core.data import paths
from recsys_core.models import promotion, pruning
from recsys_core.models.encoder import METADATA_FILE
from recsys_core.models.registry import Registry


def add(registry: Registry, tmp_path, kind: str, number: int, parent: int | None = None) -> int:
    """A version whose encoder/ has weights of its own (fingerprint `w<number>`)."""
    source = tmp_path / "src" / f"{kind}{number}"
    (source / "encoder").mkdir(parents=True)
    (source / "encoder" / METADATA_FILE).write_text(json.dumps({"weights": {"fp32": {"fingerprint": f"w{number}"}}}))
    (source / "weights.bin").write_bytes(b"x" * 1000)
    version = registry.add(kind, source, parent=parent)
    assert version.version == number
    return number


@pytest.fixture
def registry(tmp_path):
    """sequence/1..8: 3 promoted first, then 6 (warm-started from 5); 7 and 8 are newer candidates."""
    registry = Registry(tmp_path / "reg")
    for number in range(1, 9):
        add(registry, tmp_path, "sequence", number, parent=number - 1 if number > 1 else None)
    promotion.promote(registry, "sequence", 3, "test", by="tester")
    promotion.promote(registry, "sequence", 6, "test", by="tester")
    return registry


def numbers(registry: Registry, kind: str = "sequence") -> list[int]:
    return [v.version for v in registry.versions(kind)]


def test_prune_keeps_the_newest_and_every_version_something_may_load(registry):
    found = pruning.plan(registry, "sequence", keep=1, pinned={2})
    assert [v.version for v in found.doomed] == [1, 4]
    assert found.kept == {2: "pinned (an A/B arm or --pin)", 3: "promoted before sequence/6 (rollback target)",
                          5: "parent of the promoted sequence/6", 6: "promoted",
                          7: "newer than the promoted sequence/6", 8: "newer than the promoted sequence/6"}
    # N beyond the protected ones keeps more: the newest first.
    assert [v.version for v in pruning.plan(registry, "sequence", keep=6).doomed] == [1, 2]
    with pytest.raises(ValueError):
        pruning.plan(registry, "sequence", keep=0)


def test_prune_deletes_through_a_tombstone_and_audits_each_deletion(registry, monkeypatch):
    doomed = registry.get("sequence", 1)
    # A serving process reading a version as it goes keeps what it opened.
    held = open(doomed.path / "weights.bin", "rb")
    with monkeypatch.context() as interrupted:
        interrupted.setattr(pruning.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError):
            pruning.prune(registry, 1, ["sequence"], {"sequence": {2}})
    # Killed between rename and removal: the version is gone whole, never half there.
    assert 1 not in numbers(registry) and any(p.name.startswith(pruning.TOMBSTONE)
                                              for p in (registry.root / "sequence").iterdir())
    [(found, done)] = pruning.prune(registry, 1, ["sequence"], {"sequence": {2}}, dry_run=True)
    assert [v.version for v in found.doomed] == [4] and done == []
    assert numbers(registry) == [2, 3, 4, 5, 6, 7, 8]  # a dry run deletes nothing

    [(_, done)] = pruning.prune(registry, 1, ["sequence"], {"sequence": {2}}, reason="disk", by="ops")
    with held:
        assert len(held.read()) == 1000
    assert numbers(registry) == [2, 3, 5, 6, 7, 8]
    assert [p.name for p in (registry.root / "sequence").iterdir() if p.name.startswith(".")] == []
    trail = [json.loads(line) for line in (registry.root / "sequence" / pruning.TRAIL).read_text().splitlines()]
    assert trail[0]["version"] == 1 and trail[1:] == done  # the interrupted prune's line came first
    assert [(r["event"], r["version"], r["by"], r["reason"]) for r in done] == [("prune", 4, "ops", "disk")]
    assert done[0]["bytes"] > 1000 and done[0]["created"]
    assert registry.promoted("sequence").version == 6
    # The numbers of pruned versions are never given again: the newest always stays.
    assert registry.add("sequence", doomed.path.parent / "2").version == 9


def test_nothing_promoted_nothing_pruned(tmp_path):
    registry = Registry(tmp_path / "reg")
    for number in (1, 2, 3):
        add(registry, tmp_path, "ranker", number)
    found = pruning.plan(registry, "ranker", keep=1)
    assert found.doomed == [] and set(found.kept) == {1, 2, 3}
    # A promoted version gone missing: its rollback target is unknown, so nothing goes either.
    (registry.root / "ranker" / "PROMOTED").write_text(json.dumps({"version": 7}))
    assert pruning.plan(registry, "ranker", keep=1).doomed == []


def test_prune_takes_the_promoted_versions_triton_encoders_along(registry, tmp_path):
    """The served repository's text_encoder versions made of pruned versions
    go; those of kept versions, and version 1 (the repository's own, which a
    registry version may share weights with), stay."""
    repo = tmp_path / "served"
    for number, weights in ((1, "w1"), (2, "w1"), (3, "w4"), (4, "w6"), (5, "w7")):
        folder = repo / paths.TEXT_ENCODER_MODEL / str(number)
        folder.mkdir(parents=True)
        (folder / METADATA_FILE).write_text(json.dumps({"weights": {"fp32": {"fingerprint": weights}}}))
    [(found, done)] = pruning.prune(registry, 1, ["sequence"], {"sequence": {2}}, model_repo=repo)
    assert found.encoder_versions == [2, 3]
    assert sorted(p.name for p in (repo / paths.TEXT_ENCODER_MODEL).iterdir()) == ["1", "4", "5"]
    assert [r.get("triton_version") for r in done] == [None, None, 2, 3]
    with pytest.raises(ValueError, match="committed"):
        pruning.plan(registry, "sequence", keep=1, model_repo=paths.MODEL_REPO)
    assert (paths.MODEL_REPO / paths.TEXT_ENCODER_MODEL / "1").is_dir()


def test_recsys_models_prune_keeps_the_rankers_the_ab_configuration_names(tmp_path, monkeypatch, capsys):
    registry = Registry(tmp_path / "reg")
    for number in range(1, 7):
        add(registry, tmp_path, "ranker", number)
    promotion.promote(registry, "ranker", 5, "test", by="tester")
    monkeypatch.setenv("GATEWAY_AB_ARMS", "control=ranker/1:50,treatment=hand:50")
    monkeypatch.setenv("RANKING_MODEL_VERSIONS", "2")
    args = ["models", "prune", "--keep", "1", "--registry", str(registry.root)]
    assert recsys(args + ["--dry-run", "--pin", "ranker/3"]) == 0
    out = capsys.readouterr().out
    assert "would prune ranker/4" in out and "would prune ranker/3" not in out and numbers(registry, "ranker") == [
        1, 2, 3, 4, 5, 6]
    assert recsys(args + ["--kind", "ranker"]) == 0
    assert "pruned ranker/3" in capsys.readouterr().out
    assert numbers(registry, "ranker") == [1, 2, 5, 6]
    monkeypatch.setenv("RANKING_MODEL_VERSIONS", "ranker/x")
    with pytest.raises(SystemExit):  # an A/B setting it cannot read: it says so and deletes nothing
        recsys(args)
    assert "RANKING_MODEL_VERSIONS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recsys(["models", "prune", "--registry", str(registry.root)])  # how many to keep?
    assert numbers(registry, "ranker") == [1, 2, 5, 6]
