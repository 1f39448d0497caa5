"""Versions of every trained artifact, and which one is promoted.

    REGISTRY/                         RECSYS_MODEL_REGISTRY, default var/models
      <kind>/                         sequence | ranker | value
        <version>/                    1, 2, 3 ...: never reused, never changed once added
          version.json                the registry's manifest, written last (its
                                      presence marks a complete version): kind,
                                      version, created, parent (the version it
                                      was warm-started from, or null), data_window
                                      (what it was trained on: first and last
                                      event time, events, shoppers), metrics (what
                                      its trainer measured), source (where it was
                                      added from), and any notes the trainer adds
          ...                         the artifact as its trainer writes it:
                                      sequence: `recsys train --out` (its own
                                      manifest.json, encoder/, user_tower/, items/);
                                      ranker: `recsys train-ranker` (ranker.txt and
                                      ranker.txt.json); value: `recsys train-value`
                                      or `recsys retrain --kind value`
                                      (value_model.joblib, report.json)
        PROMOTED                      {"version", "promoted_at", "reason"}: what
                                      serving loads; replaced in one step

Adding a version copies the artifact into a temporary folder beside the
others and renames it into place, so a reader never sees half a version; two
writers adding at once get distinct numbers (the rename fails for the second,
which takes the next). Promotion replaces PROMOTED in one rename, so a
service that polls it sees the old version or the new, never neither.

The registry is a folder: on one machine, the local stack's; in Kubernetes,
a volume the retrain CronJob writes and the serving pods read.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from recsys_core import errors
from recsys_core.data import paths

KINDS = ("sequence", "ranker", "value")
MANIFEST = "version.json"
PROMOTED = "PROMOTED"
ENV = "RECSYS_MODEL_REGISTRY"


def default_path() -> Path:
    return Path(os.environ.get(ENV) or paths.REPO_ROOT / "var" / "models")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ModelVersion:
    kind: str
    version: int
    path: Path
    manifest: dict

    @property
    def label(self) -> str:
        """How replies and logs name it: `ranker/3`."""
        return f"{self.kind}/{self.version}"


class Registry:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_path()

    def _kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise errors.InvalidArgument("kind", f"unknown model kind {kind!r}; one of {', '.join(KINDS)}")
        return self.root / kind

    def path(self, kind: str, version: int) -> Path:
        return self._kind_dir(kind) / str(int(version))

    def get(self, kind: str, version: int) -> ModelVersion:
        folder = self.path(kind, version)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            raise errors.NotFound(f"no {kind} version {version} in {self.root}") from None
        return ModelVersion(kind, int(version), folder, manifest)

    def versions(self, kind: str) -> list[ModelVersion]:
        """Complete versions, oldest first."""
        folder = self._kind_dir(kind)
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            if child.name.isdigit() and (child / MANIFEST).is_file():
                found.append(self.get(kind, int(child.name)))
        return sorted(found, key=lambda v: v.version)

    def latest(self, kind: str) -> ModelVersion | None:
        versions = self.versions(kind)
        return versions[-1] if versions else None

    def add(self, kind: str, source: Path | str, *, parent: int | None = None, data_window: dict | None = None,
            metrics: dict | None = None, **notes) -> ModelVersion:
        """Copy `source` (a folder, or one file with its `<file>.json`
        manifest beside it when there is one) in as the next version."""
        source = Path(source)
        folder = self._kind_dir(kind)
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".adding-{uuid.uuid4().hex}"
        try:
            if source.is_dir():
                shutil.copytree(source, staging)
            elif source.is_file():
                staging.mkdir()
                shutil.copy2(source, staging / source.name)
                sidecar = source.with_name(source.name + ".json")
                if sidecar.is_file():
                    shutil.copy2(sidecar, staging / sidecar.name)
            else:
                raise errors.NotFound(f"nothing to add at {source}")
            while True:
                number = max([0, *(int(c.name) for c in folder.iterdir() if c.name.isdigit())]) + 1
                manifest = {"kind": kind, "version": number, "created": now_iso(), "parent": parent,
                            "data_window": data_window or {}, "metrics": metrics or {}, "source": str(source),
                            **notes}
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                try:
                    # rename() of a folder onto a missing name is atomic; onto a
                    # name another writer just took it fails, and we take the next.
                    os.rename(staging, folder / str(number))
                    return self.get(kind, number)
                except OSError:
                    if (folder / str(number)).exists():
                        continue
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def promote(self, kind: str, version: int, reason: str = "") -> ModelVersion:
        chosen = self.get(kind, version)
        record = {"version": chosen.version, "promoted_at": now_iso(), "reason": reason}
        with paths.replacing(self._kind_dir(kind) / PROMOTED) as tmp:
            tmp.write_text(json.dumps(record) + "\n")
        return chosen

    def promoted(self, kind: str) -> ModelVersion | None:
        """What serving should load: the promoted version, None before any."""
        try:
            record = json.loads((self._kind_dir(kind) / PROMOTED).read_text())
        except FileNotFoundError:
            return None
        return self.get(kind, int(record["version"]))

    def promotion_record(self, kind: str) -> dict | None:
        try:
            return json.loads((self._kind_dir(kind) / PROMOTED).read_text())
        except FileNotFoundError:
            return None


class PromotionWatcher:
    """What a serving process polls: `changed()` is the newly promoted
    version once each time PROMOTED names another, else None. Cheap: one
    stat per poll, the file read only when its mtime or size moved."""

    def __init__(self, registry: Registry, kind: str):
        self.registry, self.kind = registry, kind
        self._seen: tuple | None = None
        self._version: int | None = None

    def changed(self) -> ModelVersion | None:
        try:
            stat = (self.registry.root / self.kind / PROMOTED).stat()
        except FileNotFoundError:
            return None
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if key == self._seen:
            return None
        self._seen = key
        current = self.registry.promoted(self.kind)
        if current is None or current.version == self._version:
            return None
        self._version = current.version
        return current

