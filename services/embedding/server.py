"""Embedding service: text encoder, item catalogue and FAISS index."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import threading
import time
import uuid
from pathlib import Path

import faiss
from prometheus_client.core import GaugeMetricFamily

from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys_core.data import paths
from recsys_core.models.encoder import METADATA_FILE, Encoder, OnnxEncoder, latest_version_dir, weights
from recsys_core.rpc.grpc_util import ManagedServer, ServingHealth, build_server, serve_main
from recsys_core.index.embedding_cache import EmbeddingCache
from recsys_core.models.model_serving import ModelDir, open_model_dir
from recsys_core.store.catalogue_backends import open_catalogue_store
from recsys_core.store.catalogue_store import CatalogueStore
from services.embedding.catalogue import Catalogue, records_from_frame
from services.embedding.config import EmbeddingConfig
from services.embedding.servicer import EmbeddingServicer

log = logging.getLogger(__name__)
SERVICE_NAME = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


ENCODER_HEALTH_NAME = "text_encoder"
ENCODER_POLL_SECONDS = 1.0


def load_encoder(config: EmbeddingConfig, model: ModelDir | None = None, tracer=None) -> Encoder:
    """The configured encoder; with a trained `model`, that model's encoder.
    A `tracer` (ManagedServer.tracing.tracer) spans each call to Triton."""
    if config.encoder == "triton":
        from recsys_core.models.triton_encoder import TritonEncoder

        encoder = TritonEncoder(config.triton_url, config.triton_model, tracer=tracer)
        # Where the served weights are also on this disk, their fingerprint
        # lets Triton share cached item vectors with the in-process encoder
        # (the two give the same vectors: tests/test_triton.py, and for the
        # ensemble, whose weights are text_encoder_onnx's, tests/test_model_repo.py).
        local = Path(config.model_repo) / encoder.weights_model / str(encoder.weights_version)
        if (local / METADATA_FILE).is_file():
            _, encoder.fingerprint, _ = weights(local, encoder.precision)
        if model is not None:
            check_served_encoder(encoder, model, local)
        return encoder
    version_dir = model.encoder_dir if model is not None else latest_version_dir(repo=Path(config.model_repo))
    # Loads while the catalogue is read (load_catalogue waits for it before SERVING).
    return OnnxEncoder(version_dir, threads=config.encoder_threads, precision=config.precision, background=True)


def check_served_encoder(encoder, model: ModelDir, local: Path) -> None:
    """Triton must serve the model's encoder: ID vectors added to another
    encoder's vectors would index nonsense. Where the served version is on
    this disk its weights are compared; elsewhere (Kubernetes) the model's
    fingerprint at least keys the cache, so pretrained vectors are never reused."""
    expected = model.encoder_fingerprint(encoder.precision)
    if (local / METADATA_FILE).is_file():
        if encoder.fingerprint != expected:
            raise RuntimeError(
                f"Triton serves {encoder.model_name} version {encoder.version} ({local}), not the encoder of "
                f"{model.path} (fingerprint {encoder.fingerprint}, expected {expected}): install the model's "
                f"encoder as the newest version (python -m recsys_core.models.model_serving, or recsys serve --model)")
    else:
        log.warning("cannot compare Triton's %s version %s with %s (not on this disk): trusting the configuration",
                    encoder.model_name, encoder.version, model.encoder_dir)
        encoder.fingerprint = expected


def watch_encoder(catalogue: Catalogue, serving: ServingHealth, stop: threading.Event) -> None:
    """Follow a remote encoder's readiness in the `text_encoder` health entry.

    The service itself stays SERVING while Triton is down: its index still
    answers SearchItems, GetItems and so every recommendation for known shoppers.
    """
    is_ready = getattr(catalogue.encoder, "is_ready", None)
    while True:
        ready = True if is_ready is None else is_ready(ENCODER_POLL_SECONDS)
        if ready != catalogue.encoder_ready:
            log.warning("text encoder %s", "ready again" if ready else "NOT ready: EmbedTexts answers UNAVAILABLE")
        catalogue.encoder_ready = ready
        serving.set_component(ENCODER_HEALTH_NAME, ready)
        if is_ready is None or stop.wait(ENCODER_POLL_SECONDS):
            return


def open_store(config: EmbeddingConfig) -> CatalogueStore:
    return open_catalogue_store(
        config.catalogue_store, path=config.catalogue_path, redis_url=config.catalogue_redis_url,
        prefix=config.catalogue_redis_prefix, username=config.catalogue_redis_username,
        password_file=config.catalogue_redis_password_file, durability=config.catalogue_redis_durability,
        redis_mode=config.catalogue_redis_mode, cluster_nodes=config.catalogue_redis_cluster_nodes,
    )


def load_catalogue(config: EmbeddingConfig, show_progress: bool = True, tracer=None) -> Catalogue:
    """The catalogue from the shared store, seeded with the configured data
    where the store lacks their items (the first start of an empty store)."""
    faiss.omp_set_num_threads(config.faiss_threads)
    model = open_model_dir(config.model_dir) if config.model_dir else None
    encoder = load_encoder(config, model, tracer)
    # Keyed by the encoder's weights: a fine-tuned encoder never reads the
    # pretrained one's vectors (ID vectors are added after the cache). Only a
    # start-up accelerator now: the store holds every item's vector.
    cache = EmbeddingCache(Path(config.cache_dir) if config.cache_dir else None, encoder.fingerprint)
    id_vectors = model.id_vectors() if model is not None else None
    store = open_store(config)
    catalogue = Catalogue(encoder, cache, use_gpu=config.use_gpu, id_vectors=id_vectors,
                          index_settings=config.index, store=store)
    if model is not None:
        log.info("serving model %s: encoder %s, %d items with ID vectors", model.path, encoder.fingerprint,
                 len(id_vectors) if id_vectors is not None else 0)
    snapshot = snapshot_path(config, catalogue)
    from_snapshot = catalogue.load_snapshot(*snapshot) if snapshot is not None else None
    changed = catalogue.sync(show_progress=show_progress, save_cache=True)
    if from_snapshot is None:
        log.info("read %d items from the catalogue store %r (version %d)", len(catalogue), store,
                 catalogue.applied_version)
    else:
        log.info("read %d items from snapshot %s (version %d), then %d changes from the catalogue store %r "
                 "(version %d)", len(catalogue) - changed, snapshot[0], from_snapshot, changed, store,
                 catalogue.applied_version)
    if from_snapshot is not None and changed == 0:
        catalogue.snapshot_version = from_snapshot
    seed_with_data(config, catalogue, show_progress)
    loaded = getattr(encoder, "loaded", None)
    if loaded is not None:
        # A broken encoder still fails the start, as it did before it loaded in the background.
        loaded()
    log.info("catalogue holds %d items in %d categories; index kinds: %s", len(catalogue),
             len(catalogue.categories()), {scope or "(all)": kind for scope, kind in catalogue.index.kinds().items()})
    return catalogue


STORE_ID = "store_id"


def snapshot_path(config: EmbeddingConfig, catalogue: Catalogue) -> tuple[Path, str, str] | None:
    """Where this replica's start snapshot lives and what it must match
    (Catalogue.load_snapshot): the store's identity, noted in the store when
    it is first opened (a new or emptied store has a new one), and the
    encoder's fingerprint with the model directory, whose ID vectors are in
    the indexed vectors. None without a cache directory."""
    if not config.cache_dir or catalogue.store is None:
        return None
    store_id = catalogue.store.meta(STORE_ID)
    if store_id is None:
        # Replicas starting together may each note one; the last stays, and a
        # snapshot keyed by another is read past once, then written again.
        catalogue.store.set_meta(STORE_ID, uuid.uuid4().hex)
        store_id = catalogue.store.meta(STORE_ID)
    key = catalogue.encoder.fingerprint
    if config.model_dir:
        key += "-" + hashlib.sha256(str(Path(config.model_dir).resolve()).encode()).hexdigest()[:16]
    return Path(config.cache_dir) / "catalogue-snapshots" / f"{store_id}-{key}.npz", key, store_id


def save_snapshot(config: EmbeddingConfig, catalogue: Catalogue) -> None:
    """Off the start path (after SERVING) and after the drain: the next start reads it."""
    if catalogue.snapshot_version == catalogue.applied_version:
        return
    started = time.monotonic()
    try:
        # The store's id is read here too: a store that is down costs the snapshot, never the stop.
        snapshot = snapshot_path(config, catalogue)
        if snapshot is None:
            return
        version = catalogue.save_snapshot(*snapshot)
    except Exception:  # noqa: BLE001 - only the next start is slower without it
        log.exception("cannot write the catalogue snapshot")
        return
    catalogue.snapshot_version = version
    log.info("catalogue snapshot %s written (version %d, %d items, %.2f s)", snapshot[0], version, len(catalogue),
             time.monotonic() - started)
    prune_snapshots(snapshot[0].parent)


# Snapshots kept in one cache directory: each is the size of the index (35 MB
# on the bundled data), and every new store (a test's, a new data set's) makes one.
SNAPSHOTS_KEPT = 3


def prune_snapshots(directory: Path) -> None:
    """All but the newest SNAPSHOTS_KEPT: a stack whose snapshot went reads its store at its next start."""
    try:
        found = sorted(directory.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in found[SNAPSHOTS_KEPT:]:
            old.unlink(missing_ok=True)
    except OSError as error:  # another replica pruning at once
        log.debug("pruning snapshots in %s: %s", directory, error)


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


def follow_catalogue(catalogue: Catalogue, stop: threading.Event, interval: float) -> None:
    """Apply other replicas' upserts to this one's index as they land in the
    store. Searches go on meanwhile: the index is locked only while a
    change is applied. A store that cannot be read is tried again each
    interval, while the index serves what it has."""
    failing = False
    while not stop.wait(interval):
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
        self.catalogue: Catalogue | None = None

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
        servicer.attach(catalogue)
        collector.catalogue = catalogue
        threading.Thread(
            target=watch_encoder, args=(catalogue, server.serving, server.stopping), name="encoder-watch", daemon=True
        ).start()
        follower = threading.Thread(
            target=follow_catalogue, args=(catalogue, server.stopping, config.catalogue_poll_seconds),
            name="catalogue-follow", daemon=True,
        )
        follower.start()
        if catalogue.snapshot_version != catalogue.applied_version:
            threading.Thread(target=save_snapshot, args=(config, catalogue), name="catalogue-snapshot",
                             daemon=True).start()

        async def close_store() -> None:
            # Once no call uses it: the follower stops with `stopping`, set before the drain.
            await asyncio.to_thread(follower.join, config.catalogue_poll_seconds + 5)
            # A drained replica's state is the next start's: it then reads only what changes meanwhile.
            await asyncio.to_thread(save_snapshot, config, catalogue)
            catalogue.store.close()

        server.after_drain(close_store)

    server.readiness.start(load)
    return server, port


def main() -> int:
    return serve_main("embedding", EmbeddingConfig, create_server)


if __name__ == "__main__":
    sys.exit(main())
