"""Building the embedding service's catalogue: the configured encoder (in
process, or Triton pinned to a version), and a Catalogue of it over the
shared store. Used at start (services/embedding/server.py) and for each
promoted model (services/embedding/promotion.py)."""
from __future__ import annotations

import logging
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
                 triton_version: int | None = None) -> Encoder:
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
    return OnnxEncoder(version_dir, threads=config.encoder_threads, precision=config.precision)


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
    )


def open_catalogue(config: EmbeddingConfig, encoder: Encoder, model: ModelDir | None, store: CatalogueStore,
                   show_progress: bool = False, model_version: str = "", build_encoder: Encoder | None = None
                   ) -> Catalogue:
    """A catalogue of `encoder` (and `model`'s ID vectors) over `store`,
    every item of the store indexed: at start, and beside the serving one
    when a model is promoted (items stored under another encoder are
    encoded again, never mixed in). `build_encoder`, the same weights (its
    fingerprint must match), encodes the store's items instead of `encoder`:
    a promotion's single-threaded one, so the build leaves the cores to calls."""
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
    catalogue.sync(show_progress=show_progress, save_cache=True)
    # Before any call sees it: the same weights, so the index stays one encoder's.
    catalogue.encoder = encoder
    log.info("read %d items from the catalogue store %r (version %d)", len(catalogue), store,
             catalogue.applied_version)
    return catalogue
