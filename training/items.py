"""Item texts and embeddings for offline work, shared with serving's cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recsys_core.data import paths
from recsys_core.index.embedding_cache import EmbeddingCache, encode_cached
from recsys_core.models.encoder import Encoder, OnnxEncoder, latest_version_dir
from training.protocol import CategorySplit


def default_encoder(model_repo: Path = paths.MODEL_REPO) -> OnnxEncoder:
    return OnnxEncoder(latest_version_dir(repo=model_repo))


def split_item_texts(split: CategorySplit, items: pd.DataFrame) -> list[str]:
    text_of = dict(zip(items.item_id, items.text))
    # An item of the event log missing from the catalogue keeps its id as text.
    return [text_of.get(item_id) or item_id for item_id in split.item_ids]


def split_item_vectors(split: CategorySplit, items: pd.DataFrame, encoder: Encoder, show_progress: bool = True) -> np.ndarray:
    cache = EmbeddingCache(paths.cache_dir(), encoder.fingerprint)
    return encode_cached(encoder, cache, split.item_ids, split_item_texts(split, items), show_progress)
