"""Profile service: shoppers' events, interest vectors and item popularity."""
from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import pandas as pd
from prometheus_client import Counter

from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys_core.data import shopping
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
from recsys_core.signals.value import ValueModel, ValueModelError

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


def load_dataset_events(store: EventStore, data_dir: Path) -> dict[str, int]:
    events = shopping.chronological(shopping.load_interactions(data_dir))
    rows = benchmark_stored_events(events)
    load_once(store, rows, len(events), data_marker(data_dir), data_dir)
    return category_clocks(events)


def load_retail_events(store: EventStore, retail_dir: Path) -> dict[str, int]:
    """Online-retail invoice lines as purchases with their amounts and orders."""
    from recsys_core.data.retail import retail_items_and_events
    from recsys_core.signals.value import retail_stored_events

    _, events = retail_items_and_events(retail_dir)
    load_once(store, retail_stored_events(events), len(events), frame_marker("online-retail", events), retail_dir)
    return category_clocks(events)


def load_value_model(config: ProfileConfig) -> ValueModel | None:
    try:
        model = ValueModel.load(config.value_model or None)
    except ValueModelError as error:
        log.warning("GetProfile will answer without churn and lifetime value: %s", error)
        return None
    log.info("value model %s loaded", model.version)
    return model


def load_book(config: ProfileConfig, tracing: Tracing = Tracing.OFF) -> ProfileBook:
    store = open_store(config, sweep=True)
    clocks: dict[str, int] = {}
    if config.data_path is not None:
        clocks.update(load_dataset_events(store, config.data_path))
    if config.retail_path is not None:
        clocks.update(load_retail_events(store, config.retail_path))
    book = ProfileBook(
        store,
        EmbeddingServiceLookup(config.embedding_address, config.security, tracing),
        interest_window=config.interest_window,
        max_events_per_request=config.max_events_per_request,
        profile_cache_size=config.profile_cache_size,
        drift_settings=config.drift_settings,
        cluster_settings=config.cluster_settings,
        user_tower=connect(config.user_tower_triton_url, config.user_tower_model, tracing.tracer),
        value_model=load_value_model(config),
        review_classifier=connect_reviews(config.review_triton_url, config.review_model, tracing.tracer),
        value_clock=config.value_clock,
        category_clocks=clocks,
    )
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
    server.add(profile_pb2_grpc.add_ProfileServiceServicer_to_server, servicer)
    server.after_drain(servicer.close)
    server.readiness.start(lambda: servicer.attach(load_book(config, server.tracing)))
    return server, port


def main() -> int:
    return serve_main("profile", ProfileConfig, create_server)


if __name__ == "__main__":
    sys.exit(main())
