"""Embedding service: text encoder, item catalogue and FAISS index."""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable

import faiss
from prometheus_client.core import GaugeMetricFamily

from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys_core.data import paths
from recsys_core.rpc.grpc_util import ManagedServer, ServingHealth, build_server, serve_main
from recsys_core.models.hot_swap import Loaded, Served
from recsys_core.models.model_serving import open_model_dir
from services.embedding import promotion
from services.embedding.catalogue import Catalogue, records_from_frame
from services.embedding.config import EmbeddingConfig
from services.embedding.loading import load_encoder, open_catalogue, open_store, save_snapshot
from services.embedding.servicer import EmbeddingServicer

log = logging.getLogger(__name__)
SERVICE_NAME = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


ENCODER_HEALTH_NAME = "text_encoder"
ENCODER_POLL_SECONDS = 1.0


def watch_encoder(current: Callable[[], Catalogue], serving: ServingHealth, stop: threading.Event) -> None:
    """Follow a remote encoder's readiness in the `text_encoder` health entry;
    `current()` is the serving catalogue, whose encoder a promotion replaces.

    The service itself stays SERVING while Triton is down: its index still
    answers SearchItems, GetItems and so every recommendation for known shoppers.
    """
    while True:
        catalogue = current()
        is_ready = getattr(catalogue.encoder, "is_ready", None)
        ready = True if is_ready is None else is_ready(ENCODER_POLL_SECONDS)
        if ready != catalogue.encoder_ready:
            log.warning("text encoder %s", "ready again" if ready else "NOT ready: EmbedTexts answers UNAVAILABLE")
        catalogue.encoder_ready = ready
        serving.set_component(ENCODER_HEALTH_NAME, ready)
        if stop.wait(ENCODER_POLL_SECONDS):
            return


def load_catalogue(config: EmbeddingConfig, show_progress: bool = True, tracer=None) -> Catalogue:
    """The catalogue from the shared store, seeded with the configured data
    where the store lacks their items (the first start of an empty store).
    With a registry, of its promoted sequence model (or the pretrained
    encoder before any is promoted)."""
    faiss.omp_set_num_threads(config.faiss_threads)
    if config.model_registry:
        model, version = promotion.promoted_model(config)
        encoder = promotion.model_encoder(config, model, version, tracer)
        promotion.check_at_start(config, model, encoder)
        label = version.label if version is not None else promotion.PRETRAINED_LABEL
    else:
        model = open_model_dir(config.model_dir) if config.model_dir else None
        encoder, label = load_encoder(config, model, tracer, background=True), ""
    store = open_store(config)
    catalogue = open_catalogue(config, encoder, model, store, show_progress, label, snapshot=True)
    seed_with_data(config, catalogue, show_progress)
    loaded = getattr(encoder, "loaded", None)
    if loaded is not None:
        # A broken encoder still fails the start, as it did before it loaded in the background.
        loaded()
    log.info("catalogue holds %d items in %d categories; index kinds: %s", len(catalogue),
             len(catalogue.categories()), {scope or "(all)": kind for scope, kind in catalogue.index.kinds().items()})
    return catalogue


def seed_marker(config: EmbeddingConfig) -> str | None:
    """Names the configured data by content: the store notes each set it was
    seeded with, so a restart (every restart of every replica) skips reading
    and comparing the files, most of its start-up on the bundled data."""
    files = []
    if config.data_path is not None:
        files.append(config.data_path / paths.ITEMS_FILE)
    if config.retail_path is not None:
        files += paths.directory_files(config.retail_path)
    if not files:
        return None
    return f"seeded:{paths.files_digest(files)}"


def seed_with_data(config: EmbeddingConfig, catalogue: Catalogue, show_progress: bool) -> None:
    """Add the configured data's items the store lacks. Items are only ever
    added (never replaced: an upsert wins over the bundled text), so once a
    data set's items are all in, the store's note of it is enough."""
    marker = seed_marker(config)
    if marker is None:
        return
    if catalogue.store is not None and catalogue.store.meta(marker) is not None:
        log.info("the catalogue store holds every item of %s already",
                 ", ".join(str(p) for p in (config.data_path, config.retail_path) if p))
        return
    # Only here: a restart with a seeded store needs none of this.
    import pandas as pd

    from recsys_core.data import shopping

    frames = []
    if config.data_path is not None:
        frames.append(shopping.load_items(config.data_path))
    if config.retail_path is not None:
        from recsys_core.data.retail import retail_items_and_events

        frames.append(shopping.with_text(retail_items_and_events(config.retail_path)[0]))
    items = pd.concat(frames, ignore_index=True)
    missing = [r for r in records_from_frame(items) if r.item_id not in catalogue]
    if missing:
        log.info("adding %d of %d items from %s to the catalogue store", len(missing), len(items),
                 ", ".join(str(p) for p in (config.data_path, config.retail_path) if p))
        catalogue.upsert(missing, show_progress=show_progress, only_new=True, save_cache=True)
    if catalogue.store is not None:
        # After the items are durable: a start that died before this seeds again (only_new: harmless).
        catalogue.store.set_meta(marker, str(catalogue.applied_version))


def follow_catalogue(current: Callable[[], Catalogue], stop: threading.Event, interval: float) -> None:
    """Apply other replicas' upserts to this one's index as they land in the
    store; `current()` is the serving catalogue (a promotion replaces it).
    Searches go on meanwhile: the index is locked only while a change is
    applied. A store that cannot be read is tried again each interval, while
    the index serves what it has."""
    failing = False
    while not stop.wait(interval):
        catalogue = current()
        try:
            changed = catalogue.sync()
        except Exception:
            if not failing:
                log.exception("cannot follow the catalogue store; serving the index as it is")
            failing = True
            continue
        if failing:
            log.warning("following the catalogue store again (version %d)", catalogue.applied_version)
        failing = False
        if changed:
            log.debug("applied %d catalogue changes (version %d)", changed, catalogue.applied_version)


class CatalogueCollector:
    """Index size per category and encoder readiness, read from the catalogue
    at scrape time (nothing to keep in step as items and Triton come and go)."""

    def __init__(self):
        self.served: Served[Catalogue] | None = None

    @property
    def catalogue(self) -> Catalogue | None:
        return self.served.current.value if self.served is not None else None

    def collect(self):
        items = GaugeMetricFamily(
            "recsys_embedding_index_items", "Items in the FAISS index, per category.", labels=["category"]
        )
        ready = GaugeMetricFamily(
            "recsys_embedding_encoder_ready", "1 while the text encoder answers (EmbedTexts works), else 0."
        )
        version = GaugeMetricFamily(
            "recsys_embedding_catalogue_version",
            "The catalogue store's version this replica's index reflects (replicas in step show the same).",
        )
        catalogue = self.catalogue
        if catalogue is not None:
            for category, count in sorted(catalogue.categories().items()):
                items.add_metric([category], count)
            version.add_metric([], catalogue.applied_version)
            yield version
            model = GaugeMetricFamily(
                "recsys_embedding_model_version",
                "Registry version of the sequence model whose encoder and index serve (0: the pretrained "
                "encoder or EMBEDDING_MODEL_DIR's model).")
            model.add_metric([], float(self.served.current.version or 0))
            yield model
            swaps = GaugeMetricFamily("recsys_embedding_model_swaps", "Promoted models swapped in since start.")
            swaps.add_metric([], float(self.served.swaps))
            yield swaps
        ready.add_metric([], 1.0 if catalogue is not None and catalogue.encoder_ready else 0.0)
        yield items
        yield ready


def create_server(config: EmbeddingConfig) -> tuple[ManagedServer, int]:
    """Bound, not yet started; the catalogue loads in the background and
    health turns SERVING once it is in."""
    server, port = build_server(
        config.address, config.workers, [SERVICE_NAME], "embedding", metrics_port=config.metrics_port,
        security=config.security, auth=config.auth, limits=config.limits, health_port=config.health_port,
        tracing=config.tracing,
    )
    servicer = EmbeddingServicer(server.readiness, config, server.blocking)
    server.add(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, servicer)
    server.serving.set_component(ENCODER_HEALTH_NAME, False)
    collector = CatalogueCollector()
    server.metrics.registry.register(collector)

    def load() -> None:
        catalogue = load_catalogue(config, tracer=server.tracing.tracer)
        served = Served(Loaded(catalogue, promotion.version_number(catalogue), catalogue.model_version))
        servicer.attach(served)
        collector.served = served

        def current() -> Catalogue:
            return served.current.value

        threading.Thread(
            target=watch_encoder, args=(current, server.serving, server.stopping), name="encoder-watch", daemon=True
        ).start()
        follower = threading.Thread(
            target=follow_catalogue, args=(current, server.stopping, config.catalogue_poll_seconds),
            name="catalogue-follow", daemon=True,
        )
        follower.start()
        if config.model_registry:
            threading.Thread(
                target=promotion.follow, args=(config, served, server.stopping, server.tracing.tracer),
                name="model-follow", daemon=True,
            ).start()
        if catalogue.snapshot_version != catalogue.applied_version:
            threading.Thread(target=save_snapshot, args=(config, catalogue), name="catalogue-snapshot",
                             daemon=True).start()

        async def close_store() -> None:
            # Once no call uses it: the follower stops with `stopping`, set before the drain.
            # Every version's catalogue shares the one store.
            await asyncio.to_thread(follower.join, config.catalogue_poll_seconds + 5)
            # A drained replica's state is the next start's: it then reads only what changes meanwhile.
            await asyncio.to_thread(save_snapshot, config, current())
            current().store.close()

        server.after_drain(close_store)

    server.readiness.start(load)
    return server, port


def main() -> int:
    return serve_main("embedding", EmbeddingConfig, create_server)


if __name__ == "__main__":
    sys.exit(main())
