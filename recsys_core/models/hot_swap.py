"""Serving the registry's promoted version, and swapping to the next without
a restart (issue #19, hot swap).

`Loaded` is one version ready to serve: everything a call needs from that
version in one immutable object (for the embedding service, the encoder and
the index it built; for the ranking service, the booster). `Served` holds the
loaded versions of one kind by number and which one calls get by default;
a call reads that once, at its start, and uses the one object to the end, so
it sees the old version or the new, never a mix, while a promotion builds
the next version beside the old one and then replaces one reference.

`follow_promotions` is the background loop a service runs: it polls
PROMOTED (recsys_core.models.registry.PromotionWatcher) and hands each newly
promoted version to the service's `load`, which builds it and calls
`Served.swap`; a version that fails to load is refused with a log line and
the old one keeps serving.

Several versions at once (A/B arms): `Served.get(version)` is any loaded
version by number; an arm's choice of version selects it there, and
`Served.add(..., current=False)` loads a version without making it the default.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from recsys_core.models.registry import ModelVersion, PromotionWatcher, Registry

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """One servable version: `value` is what calls use, `version` its
    registry number (None: not from the registry, e.g. the pretrained
    encoder or RANKING_MODEL's file), `label` how replies name it."""

    value: T
    version: int | None = None
    label: str = ""


class Served(Generic[T]):
    """The loaded versions of one kind and which one is current.

    Reads take no lock: `current` is one attribute read of an immutable
    object, atomic under the interpreter; writers (the promotion loop, an
    arm being loaded) serialise on a lock and replace whole objects."""

    def __init__(self, initial: Loaded[T] | None = None):
        self._lock = threading.Lock()
        self._current: Loaded[T] | None = initial
        self._by_version: dict[int, Loaded[T]] = {}
        if initial is not None and initial.version is not None:
            self._by_version[initial.version] = initial
        self.swaps = 0

    @property
    def current(self) -> Loaded[T] | None:
        return self._current

    def get(self, version: int | None = None) -> Loaded[T] | None:
        """A loaded version by number, or the current one for None."""
        if version is None:
            return self._current
        return self._by_version.get(int(version))

    def versions(self) -> list[int]:
        return sorted(self._by_version)

    def add(self, loaded: Loaded[T], current: bool = True) -> Loaded[T] | None:
        """Make `loaded` available (and the default, with `current`); returns
        the version it replaced as current, which the caller may release once
        it no longer serves (`retire`)."""
        with self._lock:
            if loaded.version is not None:
                self._by_version[loaded.version] = loaded
            if not current:
                return None
            previous, self._current = self._current, loaded
            self.swaps += 1
            return previous

    def retire(self, version: int) -> None:
        """Forget a version that is not current; calls already holding it finish with it."""
        with self._lock:
            if self._current is not None and self._current.version == version:
                raise ValueError(f"version {version} is current: swap another in before retiring it")
            self._by_version.pop(int(version), None)


def follow_promotions(registry: Registry, kind: str, load: Callable[[ModelVersion], None], stop: threading.Event,
                      interval: float, already: int | None = None, name: str = "") -> None:
    """Until `stop`: each version newly promoted in `registry` for `kind` is
    passed to `load` (in this thread). `already`: the version loaded at
    start, not loaded again. A `load` that raises leaves the old version
    serving; that version is not tried again until another is promoted
    (re-promoting a fixed copy means adding it as a new version)."""
    watcher = PromotionWatcher(registry, kind)
    what = name or kind
    failing = False
    while True:
        try:
            promoted = watcher.changed()
            failing = False
        except Exception:
            # A registry volume that is briefly unreadable: keep serving, try next poll.
            if not failing:
                log.exception("cannot read %s's promoted %s version; serving what is loaded", registry.root, what)
            failing = True
            promoted = None
        if promoted is not None and promoted.version != already:
            started = time.monotonic()
            log.info("%s: %s promoted (%s); loading it beside the serving version", what, promoted.label,
                     (registry.promotion_record(kind) or {}).get("reason") or "no reason given")
            try:
                load(promoted)
            except Exception:
                log.exception("%s: refused %s, which failed to load; the previous version keeps serving",
                              what, promoted.label)
            else:
                already = promoted.version
                log.info("%s: now serving %s (loaded and swapped in %.1f s)", what, promoted.label,
                         time.monotonic() - started)
        if stop.wait(interval):
            return
