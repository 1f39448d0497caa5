"""Embedding service: text encoder, item catalogue and FAISS index."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys_core import data
from recsys_core.encoder import Encoder, OnnxEncoder, latest_version_dir
from recsys_core.grpc_util import ManagedServer, build_server, setup_logging
from services.embedding.catalogue import Catalogue, EmbeddingCache, records_from_frame
from services.embedding.config import EmbeddingConfig
from services.embedding.servicer import EmbeddingServicer

log = logging.getLogger(__name__)
SERVICE_NAME = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


def load_encoder(config: EmbeddingConfig) -> Encoder:
    if config.encoder == "triton":
        from recsys_core.triton_encoder import TritonEncoder

        return TritonEncoder(config.triton_url)
    return OnnxEncoder(latest_version_dir(repo=Path(config.model_repo)), threads=config.encoder_threads)


def load_catalogue(config: EmbeddingConfig, show_progress: bool = True) -> Catalogue:
    encoder = load_encoder(config)
    cache = EmbeddingCache(Path(config.cache_dir) if config.cache_dir else None, encoder.fingerprint)
    catalogue = Catalogue(encoder, cache, use_gpu=config.use_gpu)
    if config.data_path is not None:
        items = data.load_items(config.data_path)
        log.info("indexing %d items from %s", len(items), config.data_path)
        catalogue.upsert(records_from_frame(items), show_progress=show_progress)
    log.info("catalogue holds %d items in %d categories", len(catalogue), len(catalogue.categories()))
    return catalogue


def create_server(config: EmbeddingConfig) -> tuple[ManagedServer, int]:
    """Bound, not yet started; the catalogue loads in the background and
    health turns SERVING once it is in."""
    server, port = build_server(config.address, config.workers, [SERVICE_NAME], "embedding")
    servicer = EmbeddingServicer(server.readiness, config)
    server.add(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, servicer)
    server.readiness.start(lambda: servicer.attach(load_catalogue(config)))
    return server, port


def main() -> int:
    setup_logging("embedding")
    config = EmbeddingConfig.from_env()
    server, port = create_server(config)
    server.start()
    log.info("listening on port %d", port)
    return server.run_until_terminated(config.grace_seconds)


if __name__ == "__main__":
    sys.exit(main())
