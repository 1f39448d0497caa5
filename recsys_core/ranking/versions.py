"""The learned rankers a ranking service holds at once, keyed by their
registry version: what lets one service score an A/B experiment's arms
(RankRequest.model_version "ranker/<n>") side by side.

A ranker is a few hundred kB of trees, so several fit in one process. A
version is loaded from the registry (RANKING_MODEL_REGISTRY) the first time
it is asked for, or at start for those RANKING_MODEL_VERSIONS names, and then
kept; at most `capacity` are kept, the least recently used one going first.
A version the registry does not hold, or cannot serve, is refused with
FailedPrecondition naming it: scoring an arm with another model than the
one it names would make the experiment's numbers lie.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from recsys_core.errors import FailedPrecondition, NotFound
from recsys_core.models.registry import MANIFEST, ModelVersion, Registry
from recsys_core.ranking.learned import MANIFEST_SUFFIX, LearnedRanker, ModelError

log = logging.getLogger(__name__)

KIND = "ranker"
DEFAULT_CAPACITY = 8


def model_file(version: ModelVersion) -> Path:
    """The LightGBM file of a ranker version: the one file beside its
    manifests (`recsys train-ranker --out` names it; ranker.txt by custom)."""
    files = [p for p in version.path.iterdir()
             if p.is_file() and p.name != MANIFEST and not p.name.endswith(MANIFEST_SUFFIX)]
    if len(files) != 1:
        raise ModelError(f"{version.path}: expected one model file beside {MANIFEST}, found "
                         f"{sorted(p.name for p in files)}")
    return files[0]


class RankerVersions:
    """Rankers by registry version, loaded on first use and kept (LRU-bounded)."""

    def __init__(self, registry: Registry | None, capacity: int = DEFAULT_CAPACITY):
        self.registry = registry
        self.capacity = capacity
        self._held: OrderedDict[int, LearnedRanker] = OrderedDict()
        self._lock = threading.Lock()

    def held(self) -> list[int]:
        with self._lock:
            return list(self._held)

    def held_ranker(self, version: int) -> LearnedRanker | None:
        """The ranker of `version` if it is held (no loading, no disk): the
        fast path a request takes once its version is in."""
        with self._lock:
            ranker = self._held.get(version)
            if ranker is not None:
                self._held.move_to_end(version)
            return ranker

    def get(self, version: int) -> LearnedRanker:
        """The ranker of `version`, loading it once; FailedPrecondition when
        there is no registry, no such version, or a model that cannot be served."""
        with self._lock:
            ranker = self._held.get(version)
            if ranker is not None:
                self._held.move_to_end(version)
                return ranker
        # Loaded outside the lock: a slow disk does not hold up the versions
        # already held; two first requests for one version may both load it.
        ranker = self._load(version)
        with self._lock:
            self._held[version] = ranker
            self._held.move_to_end(version)
            while len(self._held) > self.capacity:
                evicted, _ = self._held.popitem(last=False)
                log.info("ranker version %d let go (more than %d held)", evicted, self.capacity)
        return ranker

    def _load(self, version: int) -> LearnedRanker:
        if self.registry is None:
            raise FailedPrecondition(f"ranker/{version} was asked for, but this ranking service has no model "
                                     "registry (set RANKING_MODEL_REGISTRY)")
        try:
            found = self.registry.get(KIND, version)
        except NotFound:
            raise FailedPrecondition(f"ranker/{version} is not in the model registry at {self.registry.root} "
                                     "(`recsys models` lists the versions; check GATEWAY_AB_ARMS)") from None
        try:
            ranker = LearnedRanker.load(model_file(found))
        except ModelError as error:
            raise FailedPrecondition(f"ranker/{version} cannot be served: {error}") from error
        log.info("ranker/%d loaded from %s (%d features, %d trees)", version, found.path, len(ranker.feature_names),
                 ranker.booster.num_trees())
        return ranker
