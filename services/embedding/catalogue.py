"""The item catalogue and its embedding index: the embedding service's domain.

With a store (recsys_core/store/catalogue_store.py) the catalogue is shared:
an upsert is written to the store first, and every replica's index follows
the store's changes in the order of its sequence (`sync`), the replica that
took the upsert included. So all replicas converge on the same state, and a
replica that starts reads everything from the store."""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
from recsys_core.index.embedding_cache import EmbeddingCache, encode_cached
from recsys_core.models.encoder import Encoder
from recsys_core.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable, check_id_characters, quoted
from recsys_core.models.model_serving import IdVectors
from recsys_core.index.kinds import IndexSettings
from recsys_core.index.vector_index import VectorIndex
from recsys_core.data.paths import replacing
from recsys_core.store.catalogue_store import CatalogueEntry, CatalogueStore

log = logging.getLogger(__name__)

MAX_ID_CHARS = 128
SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    category: str
    title: str
    text: str
    category_path: str = ""


class Catalogue:
    def __init__(self, encoder: Encoder, cache: EmbeddingCache, use_gpu: bool | None = None,
                 id_vectors: IdVectors | None = None, index_settings: IndexSettings | None = None,
                 store: CatalogueStore | None = None, model_version: str = ""):
        self.encoder = encoder
        # The registry version (`sequence/3`) whose encoder and ID vectors
        # built this index, "" for none: replies name it. A promotion builds
        # a new Catalogue rather than changing this one, so the encoder that
        # encodes a query is always the one that built the index it searches.
        self.model_version = model_version
        self.cache = cache
        # None: this process's catalogue alone (unit tests, benchmarks).
        self.store = store
        # The store's version this index reflects; `sync` applies what came after.
        self.applied_version = 0
        self._sync_lock = threading.Lock()
        # A trained model's: an item it was trained on is indexed as
        # encoder(text) + its ID vector, as the model scored it.
        self.id_vectors = id_vectors
        # Approximate indexes are stored beside the vectors they were built from.
        store_dir = cache.path.parent.parent / "indexes" if cache.path is not None else None
        self.index = VectorIndex(encoder.dimension, use_gpu=use_gpu, settings=index_settings, store_dir=store_dir)
        self._items: dict[str, ItemRecord] = {}
        self._write_lock = threading.Lock()
        # The version of the start snapshot on disk, where known (server.save_snapshot).
        self.snapshot_version: int | None = None
        # A remote encoder known to be down fails calls at once instead of
        # letting each one wait out its retries.
        self.encoder_ready = True

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._items

    @property
    def dimension(self) -> int:
        return self.encoder.dimension

    def categories(self) -> dict[str, int]:
        return self.index.categories()

    # -- validation -----------------------------------------------------

    def check_categories(self, categories: Sequence[str], field: str = "categories") -> list[str]:
        known = self.index.categories()
        for name in categories:
            if name not in known:
                raise InvalidArgument(field, f"unknown category {quoted(name)}; known: {', '.join(sorted(known))}")
        return list(dict.fromkeys(categories))

    def check_vectors(self, vectors: list[np.ndarray], field: str = "vectors") -> np.ndarray:
        if not vectors:
            raise InvalidArgument(field, "at least one query vector is required")
        for position, vector in enumerate(vectors):
            if len(vector) != self.dimension:
                raise InvalidArgument(f"{field}[{position}]", f"has {len(vector)} values, expected {self.dimension}")
        matrix = np.stack(vectors).astype(np.float32, copy=False)
        if not np.isfinite(matrix).all():
            raise InvalidArgument(field, "values must be finite")
        return matrix

    # -- catalogue ----------------------------------------------------------

    def upsert(self, records: Sequence[ItemRecord], show_progress: bool = False, only_new: bool = False,
               save_cache: bool | None = None, new_categories: bool = True) -> tuple[int, int]:
        """Encode and index items; unchanged texts come from the cache. Every
        record is validated before anything is written, so a bad batch changes
        nothing. With a store, the batch is durable there before this returns
        and before this replica indexes it; `only_new` keeps items the store
        has (seeding). `save_cache`: also write the vector cache file; by
        default only without a store, whose own copy of every vector makes
        rewriting the file (80 MB on the full data) per upsert a waste.
        Without `new_categories` (a caller who is not an admin), every item's
        category must be in the catalogue already: a category is part of the
        public API (Recommend's filter), not something a feed invents."""
        for position, record in enumerate(records):
            if not record.item_id or len(record.item_id) > MAX_ID_CHARS:
                raise InvalidArgument(f"items[{position}].item_id", f"must be 1..{MAX_ID_CHARS} characters")
            check_id_characters(record.item_id, f"items[{position}].item_id")
            check_id_characters(record.category, f"items[{position}].category")
            if not record.category or len(record.category) > MAX_ID_CHARS:
                raise InvalidArgument(f"items[{position}].category", f"must be 1..{MAX_ID_CHARS} characters")
            if not (record.text.strip() or record.title.strip()):
                raise InvalidArgument(f"items[{position}].text", "an item needs a title or text to be embedded")
        if not new_categories:
            known = self.index.categories()
            for position, record in enumerate(records):
                if record.category not in known:
                    raise PermissionDenied(f"items[{position}].category: {quoted(record.category)} is not in the "
                                           "catalogue; only admin callers may add a category")
        # Later duplicates in one batch win, as a sequence of upserts would.
        records = list({r.item_id: r for r in records}.values())
        if save_cache is None:
            save_cache = self.store is None
        vectors = self._encode(records, show_progress, save_cache)
        if self.store is None:
            return self._index(records, vectors)
        fingerprint = self.encoder.fingerprint
        written = self.store.put(
            [CatalogueEntry(r.item_id, r.category, r.title, r.text, r.category_path, fingerprint, v)
             for r, v in zip(records, vectors)],
            only_new=only_new,
        )
        # Applied in the store's order with every other replica's writes, so
        # an older write of the same item never lands after this one.
        self.sync(show_progress=show_progress, save_cache=save_cache)
        return written.inserted, written.updated

    def sync(self, show_progress: bool = False, save_cache: bool = False) -> int:
        """Index the store's changes since the version applied last: every
        replica's background task calls this a few times a second. Returns
        how many items changed."""
        if self.store is None:
            return 0
        with self._sync_lock:
            if self.store.version() <= self.applied_version:
                return 0
            entries, version = self.store.changes(self.applied_version)
            if entries:
                records = [ItemRecord(e.item_id, e.category, e.title, e.text, e.category_path) for e in entries]
                vectors = np.zeros((len(entries), self.dimension), dtype=np.float32)
                foreign = []
                for position, entry in enumerate(entries):
                    if entry.encoder == self.encoder.fingerprint and len(entry.vector) == self.dimension:
                        vectors[position] = entry.vector
                    else:
                        foreign.append(position)
                if foreign:
                    # Written by a replica with other weights (a rollout of a
                    # new encoder): encoded here, never mixed into this index.
                    log.info("re-encoding %d catalogue items stored by another encoder", len(foreign))
                    vectors[foreign] = self._encode([records[p] for p in foreign], show_progress, save_cache)
                self._index(records, vectors)
            self.applied_version = version
            return len(entries)

    # -- start-up snapshot -------------------------------------------------
    #
    # A replica's index as of one store version, in one file (records as
    # JSON, indexed vectors as float32), so a restart reads one file and then
    # only the store's changes since that version, instead of every item
    # from the store (most of a restart on the bundled data; docs/operations.md,
    # "Replicas"). `key` names what the vectors depend on besides the store:
    # the encoder's weights and a model's ID vectors. A snapshot of another
    # store (`store_id`), of another key, or of a version the store has not
    # reached (a store emptied and refilled) is never used.

    def save_snapshot(self, path: Path, key: str, store_id: str) -> int:
        """Write this index's state atomically; returns the version it holds."""
        with self._sync_lock:
            version = self.applied_version
            item_ids, categories, vectors = self.index.export()
            items = [astuple(self._items[i]) for i in item_ids]
        header = {"format": SNAPSHOT_FORMAT, "key": key, "store": store_id, "version": version,
                  "dimension": self.dimension, "items": items}
        with replacing(path) as tmp:
            np.savez(tmp, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), vectors=vectors)
        return version

    def load_snapshot(self, path: Path, key: str, store_id: str) -> int | None:
        """Index a snapshot's items; the version it holds, or None where there
        is none this replica may use (then `sync` reads everything)."""
        if self.store is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                header = json.loads(stored["header"].tobytes())
                vectors = stored["vectors"]
            version = int(header["version"])
            if (header.get("format"), header.get("key"), header.get("store"), header.get("dimension")) != (
                    SNAPSHOT_FORMAT, key, store_id, self.dimension):
                log.info("snapshot %s is of another store or encoder: reading the store", path)
                return None
            current = self.store.version()
            if version > current:
                log.warning("snapshot %s holds version %d, the store only %d (emptied since?): reading the store",
                            path, version, current)
                return None
            records = [ItemRecord(*item) for item in header["items"]]
            if vectors.shape != (len(records), self.dimension):
                raise ValueError(f"{vectors.shape} vectors for {len(records)} items")
        except Exception as error:  # noqa: BLE001 - a bad snapshot costs a full read, never the start
            log.warning("cannot use snapshot %s (%s): reading the store", path, error)
            return None
        with self._sync_lock:
            if self.applied_version or len(self._items):
                return None
            with self._write_lock:
                # Vectors as indexed (ID vectors included): not added again.
                for record in records:
                    self._items[record.item_id] = record
                self.index.upsert([r.item_id for r in records], [r.category for r in records], vectors)
            self.applied_version = version
        return version

    def _encode(self, records: Sequence[ItemRecord], show_progress: bool, save_cache: bool) -> np.ndarray:
        texts = [r.text.strip() or r.title.strip() for r in records]
        return encode_cached(self.encoder, self.cache, [r.item_id for r in records], texts, show_progress,
                             save=save_cache)

    def _index(self, records: Sequence[ItemRecord], vectors: np.ndarray) -> tuple[int, int]:
        if self.id_vectors is not None:
            vectors = self.id_vectors.add_to([r.item_id for r in records], vectors)
        with self._write_lock:
            # Records first: a search that finds a new item can always read
            # it; `get` hides it until its vector is indexed too.
            for record in records:
                self._items[record.item_id] = record
            inserted, updated = self.index.upsert(
                [r.item_id for r in records], [r.category for r in records], vectors
            )
        return inserted, updated

    def get(self, item_ids: Sequence[str], skip_missing: bool = False, field: str = "item_ids") -> list[ItemRecord]:
        found = []
        for position, item_id in enumerate(item_ids):
            record = self._items.get(item_id)
            if record is None or not self.index.contains(item_id):
                if skip_missing:
                    continue
                raise NotFound(f"{field}[{position}]: no item {quoted(item_id)} in the catalogue")
            found.append(record)
        return found

    def embeddings(self, item_ids: Sequence[str]) -> np.ndarray:
        return self.index.vectors_of(item_ids)

    def embed_texts(self, texts: Sequence[str], max_texts: int, max_chars: int, timeout: float | None = None) -> np.ndarray:
        if not texts:
            raise InvalidArgument("texts", "at least one text is required")
        if len(texts) > max_texts:
            raise InvalidArgument("texts", f"at most {max_texts} texts per request, got {len(texts)}")
        for position, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{position}]", "is empty")
            if len(text) > max_chars:
                raise InvalidArgument(f"texts[{position}]", f"is {len(text)} characters, the limit is {max_chars}")
        if not self.encoder_ready:
            raise Unavailable("the text encoder is not ready; item search keeps working")
        return self.encoder.encode(list(texts), timeout=timeout)

    def search(
        self, vectors: np.ndarray, k: int, max_k: int, categories: Sequence[str], exclude_item_ids: Sequence[str]
    ) -> list[list[tuple[str, float]]]:
        if not 1 <= k <= max_k:
            raise InvalidArgument("k", f"must be between 1 and {max_k}, got {k}")
        categories = self.check_categories(categories)
        return self.index.search(vectors, k, categories, exclude_item_ids)


def records_from_frame(items) -> list[ItemRecord]:
    """Catalogue records from a frame produced by recsys_core.data.shopping.load_items."""
    return [
        ItemRecord(item_id=row.item_id, category=row.category, title=row.display_title, text=row.text,
                   category_path=row.category_path)
        for row in items.itertuples(index=False)
        if row.text.strip()
    ]
