"""Item embeddings on disk, so that a restart, a benchmark or an evaluation
re-encodes only the texts it has not seen with the same weights."""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recsys_core.data.paths import replacing
from recsys_core.models.encoder import Encoder

# Encoding in chunks lets a long start-up show progress and save partial work.
ENCODE_CHUNK = 512
# A catalogue load is batch work: a chunk may wait behind other load on a
# busy machine, which must not fail the start the way an interactive call would.
CHUNK_TIMEOUT_SECONDS = 600.0


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class EmbeddingCache:
    """Keyed by encoder fingerprint (one .npz each), then by item id and a
    digest of its text."""

    def __init__(self, cache_dir: Path | None, fingerprint: str):
        self.path = None if cache_dir is None else Path(cache_dir) / "embeddings" / f"{fingerprint}.npz"
        self._lock = threading.Lock()
        self._vectors: dict[str, tuple[str, np.ndarray]] | None = None

    @property
    def vectors(self) -> dict[str, tuple[str, np.ndarray]]:
        """Read at first use, not at construction: an embedding replica whose
        store already holds every vector never needs the file, and reading
        it (80 MB on the full data) would only lengthen its restart."""
        if self._vectors is None:
            with self._lock:
                if self._vectors is None:
                    vectors = {}
                    if self.path is not None and self.path.is_file():
                        with np.load(self.path, allow_pickle=False) as stored:
                            for key, digest, vector in zip(stored["keys"], stored["digests"], stored["vectors"]):
                                vectors[str(key)] = (str(digest), vector)
                    self._vectors = vectors
        return self._vectors

    def lookup(self, key: str, digest: str) -> np.ndarray | None:
        hit = self.vectors.get(key)
        return hit[1] if hit is not None and hit[0] == digest else None

    def store(self, keys: Sequence[str], digests: Sequence[str], vectors: np.ndarray) -> None:
        known = self.vectors
        with self._lock:
            for key, digest, vector in zip(keys, digests, vectors):
                known[key] = (digest, vector)

    def save(self) -> None:
        known = self.vectors
        if self.path is None or not known:
            return
        with self._lock:
            keys = list(known)
            digests = [known[k][0] for k in keys]
            vectors = np.stack([known[k][1] for k in keys])
        with replacing(self.path) as tmp:
            np.savez(tmp, keys=np.asarray(keys), digests=np.asarray(digests), vectors=vectors)


def encode_cached(
    encoder: Encoder, cache: EmbeddingCache, keys: Sequence[str], texts: Sequence[str], show_progress: bool = False,
    save: bool = True,
) -> np.ndarray:
    """Embeddings of `texts`, from the cache where the same key had the same text.
    `save`: write the cache file when something was encoded (batch work); an
    online upsert passes False, as rewriting every vector (80 MB on the full
    data) for a few new ones would cost more than encoding them."""
    digests = [text_digest(t) for t in texts]
    vectors = np.zeros((len(texts), encoder.dimension), dtype=np.float32)
    missing = []
    for position, (key, digest) in enumerate(zip(keys, digests)):
        cached = cache.lookup(key, digest)
        if cached is None:
            missing.append(position)
        else:
            vectors[position] = cached
    if missing:
        progress = tqdm(total=len(missing), desc="embedding items", unit="item", disable=not show_progress)
        for start in range(0, len(missing), ENCODE_CHUNK):
            chunk = missing[start : start + ENCODE_CHUNK]
            encoded = encoder.encode([texts[p] for p in chunk], timeout=CHUNK_TIMEOUT_SECONDS)
            vectors[chunk] = encoded
            cache.store([keys[p] for p in chunk], [digests[p] for p in chunk], encoded)
            progress.update(len(chunk))
        progress.close()
        if save:
            cache.save()
    return vectors
