"""Profile service: shoppers' events, interest vectors and item popularity."""
from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

from prometheus_client import Counter

from recsys.profile.v1 import profile_pb2, profile_pb2_grpc
from recsys_core import data
from recsys_core.grpc_util import ManagedServer, build_server, serve_main
from services.profile.catalogue_client import EmbeddingServiceLookup
from services.profile.config import ProfileConfig
from services.profile.profiles import ProfileBook
from services.profile.servicer import ProfileServicer
from services.profile.store import PURCHASE, RATING, EventStore, StoredEvent, open_store

log = logging.getLogger(__name__)
SERVICE_NAME = profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name


def data_marker(data_dir: Path) -> str:
    """Identifies a data set's content, so a restart does not load it twice."""
    digest = hashlib.sha256((data_dir / data.INTERACTIONS_FILE).read_bytes()).hexdigest()[:16]
    return f"{data.INTERACTIONS_FILE}:{digest}"


def load_dataset_events(store: EventStore, data_dir: Path) -> None:
    """The benchmark events are reviews of bought items: purchases, or
    ratings where the set carries a star rating (Office)."""
    marker = data_marker(data_dir)
    if store.meta(f"loaded:{marker}") is not None:
        log.info("events of %s already in the store", data_dir)
        return
    events = data.chronological(data.load_interactions(data_dir))
    rows = (
        StoredEvent(
            user_id=row.user_id,
            item_id=row.item_id,
            category=row.category,
            type=RATING if row.rating == row.rating else PURCHASE,
            ts=None if row.timestamp != row.timestamp else int(row.timestamp),
            rating=None if row.rating != row.rating else float(row.rating),
        )
        for row in events.itertuples(index=False)
    )
    store.bulk_load(rows, total=len(events), marker=marker)
    log.info("loaded %d events from %s", len(events), data_dir)


def load_book(config: ProfileConfig) -> ProfileBook:
    store = open_store(config)
    if config.data_path is not None:
        load_dataset_events(store, config.data_path)
    book = ProfileBook(
        store,
        EmbeddingServiceLookup(config.embedding_address),
        long_term_decay=config.long_term_decay,
        short_term_decay=config.short_term_decay,
        interest_window=config.interest_window,
        max_events_per_request=config.max_events_per_request,
        profile_cache_size=config.profile_cache_size,
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
        config.address, config.workers, [SERVICE_NAME], "profile", metrics_port=config.metrics_port
    )
    register_metrics(server)
    servicer = ProfileServicer(server.readiness, config)
    server.add(profile_pb2_grpc.add_ProfileServiceServicer_to_server, servicer)
    server.readiness.start(lambda: servicer.attach(load_book(config)))
    return server, port


def main() -> int:
    return serve_main("profile", ProfileConfig, create_server)


if __name__ == "__main__":
    sys.exit(main())
