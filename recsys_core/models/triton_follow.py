"""A Triton pod's follower of the registry's `sequence` promotions
(`recsys triton-follow`; Kubernetes runs it beside each Triton, k8s/base/triton.yaml).

Where several Triton pods sit behind one Service, no embedding replica can
load a version into all of them (a model control call reaches one pod). So
each pod loads what the registry promotes itself, the same way: the promoted
version N's encoder becomes text_encoder version REGISTRY_VERSION_BASE + N of
the pod's own repository (a writable copy of the image's), loaded through the
local model control API beside the repository's own versions (the pretrained
encoder, which embedding replicas serve until a first promotion) and the
previously promoted one (replicas whose index for N is still being built go
on serving it); older promoted versions are unloaded. The embedding service,
with EMBEDDING_TRITON_MODEL_CONTROL=follower, works the number out alike,
waits until its Triton serves it, checks the vectors against the weights it
indexes with, and only then swaps (services/embedding/promotion.py).

It reconciles rather than reacts: every poll compares what Triton serves with
what should be served and loads again when they differ, so a Triton
container restarted in the pod (loading only what its config's version
policy picks) is put right within a poll. The pod is ready (GET /ready on
--health-port) once Triton first serves what is promoted, and stays so: a
new pod takes no call for a version it does not hold yet, and a registry
volume briefly away does not take every pod out of the Service at once.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from recsys_core import errors
from recsys_core.data import paths
from recsys_core.models import model_serving, promotion, triton_control
from recsys_core.models.model_serving import ModelDirError, open_model_dir
from recsys_core.models.registry import Registry

log = logging.getLogger(__name__)

KIND = "sequence"


@dataclass(frozen=True)
class Wanted:
    """What Triton should serve: `versions`, of which `promoted` (None before a first promotion) gates readiness."""

    versions: frozenset[int]
    promoted: int | None


def own_versions(repo: Path, model: str = paths.TEXT_ENCODER_MODEL) -> set[int]:
    """The repository's own versions of `model` (the image's), below the registry's numbers."""
    folder = repo / model
    return {int(p.name) for p in folder.iterdir()
            if p.name.isdigit() and int(p.name) < triton_control.REGISTRY_VERSION_BASE} if folder.is_dir() else set()


def promoted_pair(registry: Registry) -> tuple[int | None, int | None]:
    """The promoted `sequence` version and the one it replaced (from the
    promotion history; None where unknown or none)."""
    record = registry.promotion_record(KIND)
    if record is None:
        return None, None
    current = int(record["version"])
    previous = None
    for entry in reversed(promotion.history(registry, KIND)):
        if entry.get("event") == "promotion":
            if entry.get("version") == current and entry.get("previous") is not None:
                previous = int(entry["previous"])
            break
    return current, previous


def wanted(registry: Registry, repo: Path, installed: dict[int, int], current: int | None,
           previous: int | None, refused: set[int]) -> Wanted:
    """Installs the promoted (`current`) and the previously promoted encoder
    into `repo` (once each: `installed` maps registry to Triton versions
    already done) and says which text_encoder versions Triton should serve.
    A version that cannot be installed is left out and noted in `refused`
    (logged once): the embedding replicas refuse it too and keep serving
    what they have, which stays loaded."""
    versions = set(own_versions(repo))
    promoted = None
    for number in (previous, current):
        if number is None or number in refused:
            continue
        if number not in installed:
            try:
                model = open_model_dir(registry.get(KIND, number).path)
                installed[number] = model_serving.install_encoder(
                    model, repo, version=triton_control.registry_triton_version(number))
            except (errors.NotFound, ModelDirError) as error:
                refused.add(number)
                log.error("not loading %s/%d into Triton: %s", KIND, number, error)
                continue
            log.info("installed %s/%d as %s version %d", KIND, number, paths.TEXT_ENCODER_MODEL, installed[number])
        versions.add(installed[number])
        if number == current:
            promoted = installed[number]
    return Wanted(frozenset(versions), promoted)


class Follower:
    """The reconcile loop and its readiness."""

    def __init__(self, registry: Registry, repo: Path, triton_url: str, interval: float = 2.0):
        self.registry, self.repo, self.triton_url, self.interval = registry, repo, triton_url, interval
        self.installed: dict[int, int] = {}
        self.refused: set[int] = set()
        self.ready = threading.Event()
        self._failing = False
        # The promoted version this follower last had Triton serve, and the
        # one that served before it: the previous one where the promotion
        # left no history record (Registry.promote alone writes none).
        self._served_promoted: int | None = None
        self._replaced: int | None = None

    def reconcile(self) -> Wanted:
        """One pass: install what is missing, and make Triton serve exactly what is wanted."""
        current, previous = promoted_pair(self.registry)
        if previous is None:
            previous = self._replaced if current == self._served_promoted else self._served_promoted
        target = wanted(self.registry, self.repo, self.installed, current, previous, self.refused)
        if target.promoted is None and self._served_promoted is not None and current is not None:
            # The promoted version refused: what served before stays, as on the embedding replicas.
            target = wanted(self.registry, self.repo, self.installed, self._served_promoted, self._replaced,
                            self.refused)
        live = triton_control.served_versions(self.triton_url, paths.TEXT_ENCODER_MODEL)
        if live != set(target.versions):
            triton_control.serve_versions(self.triton_url, paths.TEXT_ENCODER_MODEL, target.versions)
            log.info("Triton serves %s versions %s (was %s)", paths.TEXT_ENCODER_MODEL, sorted(target.versions),
                     sorted(live))
        self._remove_unserved(target)
        if target.promoted is not None:
            number = next(n for n, v in self.installed.items() if v == target.promoted)
            if number != self._served_promoted:
                self._replaced, self._served_promoted = self._served_promoted, number
        self.ready.set()
        return target

    def _remove_unserved(self, target: Wanted) -> None:
        """Registry versions Triton no longer serves leave the repository
        (a pod's disk would otherwise hold every promotion since it started)."""
        self.installed = {n: v for n, v in self.installed.items() if v in target.versions}
        for folder in (self.repo / paths.TEXT_ENCODER_MODEL).iterdir():
            if folder.name.isdigit() and int(folder.name) >= triton_control.REGISTRY_VERSION_BASE \
                    and int(folder.name) not in target.versions:
                shutil.rmtree(folder, ignore_errors=True)
                log.info("removed %s version %s, no longer served", paths.TEXT_ENCODER_MODEL, folder.name)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.reconcile()
                if self._failing:
                    log.info("following %s again", self.registry.root)
                self._failing = False
            except Exception:  # noqa: BLE001 - Triton starting, the volume briefly away: next poll
                # `ready` stays as it is: Triton still serves what it last
                # loaded, and a registry volume briefly away must not take
                # every Triton pod out of its Service at once.
                if not self._failing:
                    log.exception("cannot bring Triton at %s to the registry's %s versions; trying every %.0f s",
                                  self.triton_url, KIND, self.interval)
                self._failing = True
            stop.wait(self.interval)


def serve_health(follower: Follower, port: int) -> ThreadingHTTPServer:
    """GET /ready: 200 once Triton first served what the registry promotes,
    503 before; GET /live: 200. For the kubelet's httpGet probes."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/live":
                code, body = 200, {"live": True}
            elif self.path == "/ready":
                ready = follower.ready.is_set()
                code, body = (200 if ready else 503), {"ready": ready}
            else:
                code, body = 404, {"error": f"no {self.path}: /ready or /live"}
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # probes every few seconds: not a log line each
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="follower-health", daemon=True).start()
    return server
