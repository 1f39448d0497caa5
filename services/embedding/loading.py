"""Building the embedding service's catalogue: the configured encoder (in
process, or Triton pinned to a version), and a Catalogue of it over the
shared store. Used at start (services/embedding/server.py) and for each
promoted model (services/embedding/promotion.py)."""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
from pathlib import Path

from recsys_core.index.embedding_cache import EmbeddingCache
from recsys_core.models.encoder import METADATA_FILE, Encoder, OnnxEncoder, latest_version_dir, weights
from recsys_core.models.model_serving import ModelDir
from recsys_core.store.catalogue_backends import open_catalogue_store
from recsys_core.store.catalogue_store import CatalogueStore
from services.embedding.catalogue import Catalogue
from services.embedding.config import EmbeddingConfig

log = logging.getLogger(__name__)


def load_encoder(config: EmbeddingConfig, model: ModelDir | None = None, tracer=None,
                 triton_version: int | None = None, background: bool = False) -> Encoder:
    """The configured encoder; with a trained `model`, that model's encoder.
    A `tracer` (ManagedServer.tracing.tracer) spans each call to Triton;
    `triton_version` pins that version (default: the newest loaded)."""
    if config.encoder == "triton":
        from recsys_core.models.triton_encoder import TritonEncoder

        encoder = TritonEncoder(config.triton_url, config.triton_model, version=triton_version, tracer=tracer)
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
    # `background`: loads while the catalogue is read (the start waits for it before SERVING).
    return OnnxEncoder(version_dir, threads=config.encoder_threads, precision=config.precision,
                       background=background)


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


def open_store(config: EmbeddingConfig) -> CatalogueStore:
    return open_catalogue_store(
        config.catalogue_store, path=config.catalogue_path, redis_url=config.catalogue_redis_url,
        prefix=config.catalogue_redis_prefix, username=config.catalogue_redis_username,
        password_file=config.catalogue_redis_password_file, durability=config.catalogue_redis_durability,
        redis_mode=config.catalogue_redis_mode, cluster_nodes=config.catalogue_redis_cluster_nodes,
    )


def open_catalogue(config: EmbeddingConfig, encoder: Encoder, model: ModelDir | None, store: CatalogueStore,
                   show_progress: bool = False, model_version: str = "", build_encoder: Encoder | None = None,
                   snapshot: bool = False) -> Catalogue:
    """A catalogue of `encoder` (and `model`'s ID vectors) over `store`,
    every item of the store indexed: at start, and beside the serving one
    when a model is promoted (items stored under another encoder are
    encoded again, never mixed in). `build_encoder`, the same weights (its
    fingerprint must match), encodes the store's items instead of `encoder`:
    a promotion's single-threaded one, so the build leaves the cores to calls.
    With `snapshot`, this replica's start snapshot (save_snapshot) is read
    first where it matches, and only the store's changes since it after."""
    if build_encoder is not None and build_encoder.fingerprint != encoder.fingerprint:
        raise ValueError(f"the build encoder ({build_encoder.fingerprint}) is not the serving one ({encoder.fingerprint})")
    # Keyed by the encoder's weights: a fine-tuned encoder never reads the
    # pretrained one's vectors (ID vectors are added after the cache). Only a
    # start-up accelerator now: the store holds every item's vector.
    cache = EmbeddingCache(Path(config.cache_dir) if config.cache_dir else None, encoder.fingerprint)
    id_vectors = model.id_vectors() if model is not None else None
    catalogue = Catalogue(build_encoder or encoder, cache, use_gpu=config.use_gpu, id_vectors=id_vectors,
                          index_settings=config.index, store=store, model_version=model_version)
    if model is not None:
        log.info("serving model %s%s: encoder %s, %d items with ID vectors", model.path,
                 f" ({model_version})" if model_version else "", encoder.fingerprint,
                 len(id_vectors) if id_vectors is not None else 0)
    saved = snapshot_path(config, catalogue) if snapshot else None
    from_snapshot = catalogue.load_snapshot(*saved) if saved is not None else None
    changed = catalogue.sync(show_progress=show_progress, save_cache=True)
    # Before any call sees it: the same weights, so the index stays one encoder's.
    catalogue.encoder = encoder
    if from_snapshot is None:
        log.info("read %d items from the catalogue store %r (version %d)", len(catalogue), store,
                 catalogue.applied_version)
    else:
        log.info("read %d items from snapshot %s (version %d), then %d changes from the catalogue store %r "
                 "(version %d)", len(catalogue) - changed, saved[0], from_snapshot, changed, store,
                 catalogue.applied_version)
        if changed == 0:
            catalogue.snapshot_version = from_snapshot
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
    # The model's ID vectors are in the indexed vectors: its directory (or registry version) keys them too.
    model = config.model_dir or catalogue.model_version
    if model:
        key += "-" + hashlib.sha256(str(Path(model).resolve() if config.model_dir else model).encode()).hexdigest()[:16]
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

