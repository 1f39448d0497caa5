"""Profile service: shoppers' events, interest vectors and item popularity."""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys_core.data import paths, shopping
from recsys_core.data.paths import replacing
from recsys_core.rpc.grpc_util import ManagedServer, build_server, serve_main
from recsys_core.rpc.tracing import Tracing
from services.profile.catalogue_client import EmbeddingServiceLookup
from services.profile.config import ProfileConfig
from services.profile.profiles import ProfileBook
from services.profile.servicer import ProfileServicer
from recsys_core.store.events import EventStore, benchmark_stored_events
from recsys_core.store.backends import open_store
from services.profile.review_reader import connect as connect_reviews
from services.profile.user_tower import connect
from recsys_core.models.hot_swap import Loaded, follow_promotions
from recsys_core.models.registry import ModelVersion, Registry
from recsys_core.signals.value import ValueModel, ValueModelError, load_version

log = logging.getLogger(__name__)
SERVICE_NAME = profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name


def data_marker(data_dir: Path) -> str:
    """Identifies a data set's content, so a restart does not load it twice.
    Stores loaded by earlier versions carry this very marker: keep its form."""
    digest = hashlib.sha256((data_dir / shopping.INTERACTIONS_FILE).read_bytes()).hexdigest()[:16]
    return f"{shopping.INTERACTIONS_FILE}:{digest}"


def frame_marker(name: str, frame: pd.DataFrame) -> str:
    """Identifies a table's content (the retail invoices come from one file or two)."""
    digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes()).hexdigest()[:16]
    return f"{name}:{digest}"


def category_clocks(events: pd.DataFrame) -> dict[str, int]:
    """The latest event time of each category: where a historical data set ends."""
    dated = events.dropna(subset=["timestamp"])
    return {category: int(ts) for category, ts in dated.groupby("category")["timestamp"].max().items()}


def load_once(store: EventStore, rows, total: int, marker: str, source: Path) -> None:
    if store.meta(f"loaded:{marker}") is not None:
        log.info("events of %s already in the store", source)
        return
    store.bulk_load(rows, total=total, marker=marker)
    log.info("loaded %d events from %s", total, source)


class LoadedSets:
    """What a restart needs of a data set the store already holds (its
    store marker and the latest event time per category), kept in the cache
    directory under a digest of its files: a restart then reads neither the
    files nor their frames (seconds on a busy machine, most of profile's
    restart before). Only a hint: the store's own marker decides what is loaded."""

    def __init__(self, directory: Path | None):
        self.directory = directory

    def _path(self, digest: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{digest}.json"

    def get(self, digest: str, store: EventStore) -> dict[str, int] | None:
        path = self._path(digest)
        try:
            known = json.loads(path.read_text()) if path is not None and path.is_file() else None
        except (OSError, ValueError):
            return None
        if known is None or store.meta(f"loaded:{known['marker']}") is None:
            return None
        return {category: int(ts) for category, ts in known["clocks"].items()}

    def put(self, digest: str, marker: str, clocks: dict[str, int]) -> None:
        path = self._path(digest)
        if path is None:
            return
        try:
            with replacing(path) as tmp:
                tmp.write_text(json.dumps({"marker": marker, "clocks": clocks}))
        except OSError as error:
            log.warning("cannot note data set %s in %s: %s", marker, path, error)


def load_dataset_events(store: EventStore, data_dir: Path, known: LoadedSets = LoadedSets(None)) -> dict[str, int]:
    digest = paths.files_digest([data_dir / shopping.INTERACTIONS_FILE])
    clocks = known.get(digest, store)
    if clocks is not None:
        log.info("events of %s already in the store", data_dir)
        return clocks
    events = shopping.chronological(shopping.load_interactions(data_dir))
    rows = benchmark_stored_events(events)
    marker = data_marker(data_dir)
    load_once(store, rows, len(events), marker, data_dir)
    clocks = category_clocks(events)
    known.put(digest, marker, clocks)
    return clocks


def load_retail_events(store: EventStore, retail_dir: Path, known: LoadedSets = LoadedSets(None)) -> dict[str, int]:
    """Online-retail invoice lines as purchases with their amounts and orders."""
    from recsys_core.data.retail import retail_items_and_events
    from recsys_core.signals.value import retail_stored_events

    digest = paths.files_digest(paths.directory_files(retail_dir))
    clocks = known.get(digest, store)
    if clocks is not None:
        log.info("events of %s already in the store", retail_dir)
        return clocks
    _, events = retail_items_and_events(retail_dir)
    marker = frame_marker("online-retail", events)
    load_once(store, retail_stored_events(events), len(events), marker, retail_dir)
    clocks = category_clocks(events)
    known.put(digest, marker, clocks)
    return clocks


VALUE_KIND = "value"


def load_value_model(config: ProfileConfig) -> Loaded[ValueModel | None]:
    """What forecasts value at start: the registry's promoted value version
    (PROFILE_VALUE_MODEL_REGISTRY), else PROFILE_VALUE_MODEL's file (or
    train-value's default), else none."""
    if config.value_model_registry:
        promoted = Registry(config.value_model_registry).promoted(VALUE_KIND)
        if promoted is None:
            log.info("no value version promoted in %s yet: serving PROFILE_VALUE_MODEL's until one is",
                     config.value_model_registry)
        else:
            try:
                model = load_version(promoted)
            except ValueModelError as error:
                # As a missing file: GetProfile answers, without value, and a
                # newly promoted version is loaded when it comes.
                log.error("PROFILE_VALUE_MODEL_REGISTRY: promoted %s: %s; serving PROFILE_VALUE_MODEL's",
                          promoted.label, error)
            else:
                log.info("value model %s loaded from %s", promoted.label, promoted.path)
                return Loaded(model, promoted.version, promoted.label)
    try:
        model = ValueModel.load(config.value_model or None)
    except ValueModelError as error:
        log.warning("GetProfile will answer without churn and lifetime value: %s", error)
        return Loaded(None)
    log.info("value model %s loaded", model.version)
    return Loaded(model, label=model.version)


class ValueModelCollector:
    """The registry version of the value model forecasting (0: none from the
    registry, or the book not loaded yet) and swaps since start."""

    def __init__(self, servicer: ProfileServicer):
        self.servicer = servicer

    def collect(self):
        book = self.servicer._book
        label = "" if book is None or book.value_model is None else book.value_model.version
        kind, _, number = label.partition("/")
        version = GaugeMetricFamily("recsys_profile_value_model_version",
                                    "Registry version of the value model forecasting (0: PROFILE_VALUE_MODEL's "
                                    "file, or none).")
        version.add_metric([], float(number) if kind == VALUE_KIND and number.isdigit() else 0.0)
        yield version
        swaps = GaugeMetricFamily("recsys_profile_value_model_swaps", "Value models swapped in since start.")
        swaps.add_metric([], float(0 if book is None else book.value_model_swaps))
        yield swaps


def follow_value_models(config: ProfileConfig, book: ProfileBook, already: int | None, stop: threading.Event) -> None:
    """Each newly promoted value version, loaded whole and then swapped in
    (recsys_core/models/hot_swap.py's loop: one that fails to load is refused
    and the old one keeps forecasting)."""
    def swap(version: ModelVersion) -> None:
        book.use_value_model(load_version(version))

    follow_promotions(Registry(config.value_model_registry), VALUE_KIND, swap, stop, config.value_poll_seconds,
                      already=already, name="profile value")


def load_book(config: ProfileConfig, tracing: Tracing = Tracing.OFF,
              stop: threading.Event | None = None) -> ProfileBook:
    # Unpickling the value model imports scikit-learn and SciPy: in a thread
    # of its own, it overlaps the store's reads (which let go of the
    # interpreter lock); the book waits for it, so no profile is ever answered without it.
    with ThreadPoolExecutor(1, thread_name_prefix="value-model-load") as loader:
        value_model = loader.submit(load_value_model, config)
        book = _load_book(config, tracing, value_model)
    if config.value_model_registry and stop is not None:
        threading.Thread(target=follow_value_models,
                         args=(config, book, value_model.result().version, stop),
                         name="value-model-follow", daemon=True).start()
    return book


def _load_book(config: ProfileConfig, tracing: Tracing, value_model: Future) -> ProfileBook:
    store = open_store(config, sweep=True)
    clocks: dict[str, int] = {}
    known = LoadedSets(paths.cache_dir() / "profile-data-sets")
    if config.data_path is not None:
        clocks.update(load_dataset_events(store, config.data_path, known))
    if config.retail_path is not None:
        clocks.update(load_retail_events(store, config.retail_path, known))
    book = ProfileBook(
        store,
        EmbeddingServiceLookup(config.embedding_address, config.security, tracing),
        interest_window=config.interest_window,
        max_events_per_request=config.max_events_per_request,
        profile_cache_size=config.profile_cache_size,
        drift_settings=config.drift_settings,
        cluster_settings=config.cluster_settings,
        user_tower=connect(config.user_tower_triton_url, config.user_tower_model, tracing.tracer),
        review_classifier=connect_reviews(config.review_triton_url, config.review_model, tracing.tracer),
        value_clock=config.value_clock,
        category_clocks=clocks,
    )
    # Before the book is handed to the servicer: nothing has read it yet.
    book.value_model = value_model.result().value
    log.info("store %r holds %d events", store, store.count())
    return book


def register_metrics(server: ManagedServer) -> None:
    """Events through IngestEvents: stored, and dropped as re-sent (idempotency key seen)."""
    registry = server.metrics.registry
    ingested = Counter("recsys_profile_events_ingested_total", "Events stored by IngestEvents.", registry=registry)
    duplicates = Counter(
        "recsys_profile_events_duplicates_total", "Events IngestEvents dropped as re-sent (known idempotency key).",
        registry=registry,
    )

    def count(_request, reply) -> None:
        ingested.inc(reply.accepted)
        duplicates.inc(reply.duplicates)

    server.metrics.on_reply(SERVICE_NAME, "IngestEvents", count)


def create_server(config: ProfileConfig) -> tuple[ManagedServer, int]:
    """Bound, not yet started; the store loads in the background and health
    turns SERVING once it is in."""
    server, port = build_server(
        config.address, config.workers, [SERVICE_NAME], "profile", metrics_port=config.metrics_port,
        security=config.security, auth=config.auth, limits=config.limits, health_port=config.health_port,
        tracing=config.tracing,
    )
    register_metrics(server)
    servicer = ProfileServicer(server.readiness, config, server.blocking)
    server.metrics.registry.register(ValueModelCollector(servicer))
    server.add(profile_pb2_grpc.add_ProfileServiceServicer_to_server, servicer)
    server.after_drain(servicer.close)
    server.readiness.start(lambda: servicer.attach(load_book(config, server.tracing, server.stopping)))
    return server, port


def main() -> int:
    return serve_main("profile", ProfileConfig, create_server)


if __name__ == "__main__":
    sys.exit(main())
