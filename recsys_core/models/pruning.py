"""Deleting old registry versions: `recsys models prune` and `recsys
retrain --keep` (docs/operations.md, "Pruning old versions").

A sequence version is about 300 MB and the retrain CronJob adds one a night,
so the registry keeps the newest `keep` versions of a kind and deletes older
ones, except a version that something may still load:

- the promoted version (what serving loads);
- its rollback targets: its parent (the version it was warm-started from and
  compared with) and the version promoted before it (promotions.jsonl);
- every version newer than the promoted one (candidates kept for a person to
  promote, or being added);
- versions pinned by the caller: the rankers A/B arms serve
  (GATEWAY_AB_ARMS, RANKING_MODEL_VERSIONS), or any `--pin kind/N`.

A kind with nothing promoted is left alone: every version is a candidate.
The newest version is always kept, so a version number is never reused.

Deleting is safe against a serving process reading the registry: the
version's folder is first renamed to a tombstone (`.pruned-<n>-<id>`, which
`Registry.versions` does not list, in one rename: a reader sees the whole
version or none), then removed. Files a process already opened stay
readable until it closes them (POSIX). Tombstones a crash left behind are
removed by the next prune. Each deletion is one audit line in
`<registry>/<kind>/prunes.jsonl` and on the `recsys.prune` logger, as
promotions are (recsys_core.models.promotion).

With Triton, each promoted sequence version's encoder was installed as a
text_encoder version of the served model repository (EMBEDDING_MODEL_REPO,
model_serving.install_encoder); a pruned version's text_encoder version goes
too, when no kept version has the same weights (versions not made from the
registry, such as the pretrained version 1, are never touched; nor is the
committed model_repo/, which promotions never write). Triton keeps
serving a loaded version from the files it opened until it unloads it.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from recsys_core import errors
from recsys_core.data import paths
from recsys_core.models import promotion
from recsys_core.models.model_serving import ENCODER_DIR, encoder_fingerprints
from recsys_core.models.registry import KINDS, ModelVersion, Registry, now_iso

log = logging.getLogger("recsys.prune")
TRAIL = "prunes.jsonl"
TOMBSTONE = ".pruned-"


@dataclass(frozen=True)
class Plan:
    """One kind's versions: which go, and why each other one stays."""

    kind: str
    doomed: list[ModelVersion]
    kept: dict[int, str]  # version -> why it stays
    encoder_versions: list[int] = field(default_factory=list)  # text_encoder versions of the served repo that go


def plan(registry: Registry, kind: str, keep: int, pinned: Iterable[int] = (), model_repo: Path | None = None) -> Plan:
    """What pruning `kind` to the newest `keep` versions would delete (nothing yet)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    versions = registry.versions(kind)
    record = registry.promotion_record(kind)
    if record is None:
        return Plan(kind, [], {v.version: "nothing is promoted yet: every version is a candidate" for v in versions})
    promoted = int(record["version"])
    kept: dict[int, str] = {}

    def protect(version, why: str) -> None:
        if version is not None:
            kept.setdefault(int(version), why)

    try:
        parent = registry.get(kind, promoted).manifest.get("parent")
    except errors.NotFound:
        # Its parent is unknown: nothing is safe to delete.
        return Plan(kind, [], {v.version: f"the promoted {kind}/{promoted} is missing" for v in versions})
    protect(promoted, "promoted")
    protect(parent, f"parent of the promoted {kind}/{promoted}")
    trail = [r for r in promotion.history(registry, kind) if r.get("version") == promoted]
    if trail:
        protect(trail[-1].get("previous"), f"promoted before {kind}/{promoted} (rollback target)")
    for version in pinned:
        protect(version, "pinned (an A/B arm or --pin)")
    for version in versions:
        if version.version > promoted:
            protect(version.version, f"newer than the promoted {kind}/{promoted}")
    for version in versions[-keep:]:
        protect(version.version, f"one of the newest {keep}")
    doomed = [v for v in versions if v.version not in kept]
    encoder_versions = []
    if model_repo is not None and kind == "sequence" and doomed:
        encoder_versions = doomed_encoder_versions(model_repo, [v for v in versions if v.version in kept], doomed)
    return Plan(kind, doomed, {v.version: kept[v.version] for v in versions if v.version in kept}, encoder_versions)


def doomed_encoder_versions(model_repo: Path, kept: list[ModelVersion], doomed: list[ModelVersion]) -> list[int]:
    """The served repository's text_encoder versions holding a doomed
    version's encoder and no kept version's."""
    keep = [encoder_fingerprints(v.path / ENCODER_DIR) for v in kept]
    going = [f for f in (encoder_fingerprints(v.path / ENCODER_DIR) for v in doomed) if f is not None]
    check_model_repo(model_repo)
    model_dir = Path(model_repo) / paths.TEXT_ENCODER_MODEL
    if not model_dir.is_dir():
        return []
    found = []
    for child in model_dir.iterdir():
        # Version 1 is the repository's own (the pretrained encoder, which a
        # registry version may share weights with): never a promotion's.
        if child.name.isdigit() and int(child.name) > 1:
            weights = encoder_fingerprints(child)
            if weights is not None and weights in going and weights not in keep:
                found.append(int(child.name))
    return sorted(found)


def check_model_repo(model_repo: Path | None) -> None:
    if model_repo is not None and Path(model_repo).resolve() == paths.MODEL_REPO.resolve():
        raise ValueError(f"--model-repo {model_repo} is the committed model repository, which promotions never "
                         "write to: name the served one (EMBEDDING_MODEL_REPO)")


def entomb(folder: Path) -> Path:
    """The first step of a deletion, in one rename: readers never see a
    half-deleted folder (removing the tombstone is the second)."""
    tombstone = folder.with_name(f"{TOMBSTONE}{folder.name}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, tombstone)
    return tombstone


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def execute(registry: Registry, found: Plan, reason: str, by: str | None = None,
            model_repo: Path | None = None) -> list[dict]:
    """Delete what `found` (plan's answer) dooms; returns the audit records."""
    by = by or promotion.current_user()
    done = []
    for version in found.doomed:
        now = registry.promotion_record(found.kind) or {}
        if now.get("version") == version.version:
            # Promoted (a rollback) since the plan was made.
            log.warning("not pruning %s: promoted meanwhile", version.label)
            continue
        size = size_of(version.path)
        try:
            tombstone = entomb(version.path)
        except FileNotFoundError:  # another prune took it first
            continue
        # Audited once gone from readers' view, before the removal a crash may cut short.
        record = {"event": "prune", "kind": found.kind, "version": version.version, "at": now_iso(), "by": by,
                  "reason": reason, "created": version.manifest.get("created"), "bytes": size}
        promotion.audit(registry, found.kind, TRAIL, log, record)
        done.append(record)
        shutil.rmtree(tombstone)
    model_dir = Path(model_repo) / paths.TEXT_ENCODER_MODEL if model_repo is not None else None
    for number in found.encoder_versions:
        folder = model_dir / str(number)
        size = size_of(folder)
        try:
            tombstone = entomb(folder)
        except FileNotFoundError:
            continue
        record = {"event": "prune", "kind": found.kind, "model_repo": str(model_repo),
                  "triton_model": paths.TEXT_ENCODER_MODEL, "triton_version": number, "at": now_iso(), "by": by,
                  "reason": reason, "bytes": size}
        promotion.audit(registry, found.kind, TRAIL, log, record)
        done.append(record)
        shutil.rmtree(tombstone)
    sweep(registry.root / found.kind)
    if model_dir is not None and model_dir.is_dir():
        sweep(model_dir)
    return done


def sweep(folder: Path) -> None:
    """Tombstones an interrupted prune left."""
    for child in folder.glob(f"{TOMBSTONE}*"):
        shutil.rmtree(child, ignore_errors=True)


def prune(registry: Registry, keep: int, kinds: Iterable[str] = KINDS, pinned: Mapping[str, Iterable[int]] | None = None,
          dry_run: bool = False, reason: str = "", by: str | None = None,
          model_repo: Path | None = None) -> list[tuple[Plan, list[dict]]]:
    """Plan (and unless `dry_run`, carry out) the pruning of each kind."""
    results = []
    for kind in kinds:
        found = plan(registry, kind, keep, (pinned or {}).get(kind, ()), model_repo)
        done = [] if dry_run else execute(registry, found, reason or f"keep the newest {keep}", by, model_repo)
        results.append((found, done))
    return results


def add_arguments(parser: argparse.ArgumentParser, keep_help: str, required: bool = False) -> None:
    """`recsys models prune`'s and `recsys retrain --keep`'s options (the
    CLI reads --pin and the A/B environment: recsys_cli.models.pinned_versions)."""
    parser.add_argument("--keep", type=int, required=required, metavar="N", help=keep_help)
    parser.add_argument("--pin", action="append", default=[], metavar="KIND/N",
                        help="also keep this version (repeatable); the rankers named by GATEWAY_AB_ARMS and "
                             "RANKING_MODEL_VERSIONS, where set, are kept too")
    parser.add_argument("--model-repo", type=Path, default=os.environ.get("EMBEDDING_MODEL_REPO") or None,
                        help="the served Triton repository whose text_encoder versions promotions installed: a "
                             "pruned sequence version's goes too (default $EMBEDDING_MODEL_REPO, else none)")
