"""The embedding service's domain with the real exported encoder."""
import numpy as np
import pytest

from recsys_core.models.encoder import OnnxEncoder
from recsys_core.errors import InvalidArgument, NotFound
from recsys_core.index.embedding_cache import EmbeddingCache
from services.embedding.catalogue import Catalogue, ItemRecord


class CountingEncoder:
    """The real encoder, counting the texts it is asked to encode."""

    def __init__(self, inner):
        self.inner = inner
        self.dimension = inner.dimension
        self.fingerprint = inner.fingerprint
        self.encoded = 0

    def encode(self, texts, timeout=None):
        self.encoded += len(texts)
        return self.inner.encode(texts, timeout)


@pytest.fixture(scope="module")
def encoder(exported_encoder):
    return OnnxEncoder(exported_encoder)


RECORDS = [
    ItemRecord("n1", "Beauty", "Red nail polish", "Red nail polish. Category: Beauty, Nails"),
    ItemRecord("n2", "Beauty", "Nail polish remover", "Nail polish remover pads"),
    ItemRecord("t1", "Toys", "Wooden train set", "Wooden train set with tracks"),
    ItemRecord("t2", "Toys", "Plush teddy bear", "Plush teddy bear, 30 cm"),
]


def test_cache_spares_re_encoding_unchanged_items(encoder, tmp_path):
    counting = CountingEncoder(encoder)
    first = Catalogue(counting, EmbeddingCache(tmp_path, encoder.fingerprint), use_gpu=False)
    assert first.upsert(RECORDS) == (4, 0)
    assert counting.encoded == 4
    again = CountingEncoder(encoder)
    second = Catalogue(again, EmbeddingCache(tmp_path, encoder.fingerprint), use_gpu=False)
    changed = RECORDS[:3] + [ItemRecord("t2", "Toys", "Plush bear", "A different text now")]
    second.upsert(changed)
    assert again.encoded == 1, "only the item whose text changed is encoded again"
    np.testing.assert_allclose(second.embeddings(["n1"]), first.embeddings(["n1"]))


def test_search_finds_text_neighbours_within_categories(encoder):
    catalogue = Catalogue(encoder, EmbeddingCache(None, encoder.fingerprint), use_gpu=False)
    catalogue.upsert(RECORDS)
    query = catalogue.embed_texts(["toy trains"], max_texts=8, max_chars=100)
    assert catalogue.search(query, 1, 10, [], [])[0][0][0] == "t1"
    assert catalogue.search(query, 1, 10, ["Beauty"], [])[0][0][0] in {"n1", "n2"}
    assert catalogue.search(query, 1, 10, [], ["t1"])[0][0][0] != "t1"


def test_domain_errors_name_the_field(encoder):
    catalogue = Catalogue(encoder, EmbeddingCache(None, encoder.fingerprint), use_gpu=False)
    catalogue.upsert(RECORDS)
    with pytest.raises(InvalidArgument, match=r"^items\[1\].text"):
        catalogue.upsert([RECORDS[0], ItemRecord("x", "Toys", "", " ")])
    assert len(catalogue) == 4, "a refused batch changes nothing"
    with pytest.raises(InvalidArgument, match=r"^texts\[0\]"):
        catalogue.embed_texts(["x" * 50], max_texts=8, max_chars=10)
    with pytest.raises(InvalidArgument, match="^categories"):
        catalogue.search(np.zeros((1, 384), np.float32), 3, 10, ["Garden"], [])
    with pytest.raises(NotFound, match=r"item_ids\[1\]"):
        catalogue.get(["n1", "zzz"])
    assert [r.item_id for r in catalogue.get(["n1", "zzz"], skip_missing=True)] == ["n1"]


# -- with the shared store ------------------------------------------------------


def shared_catalogues(encoder, tmp_path, count=2):
    from recsys_core.store.catalogue_sqlite import SQLiteCatalogueStore

    return [Catalogue(encoder, EmbeddingCache(None, encoder.fingerprint), use_gpu=False,
                      store=SQLiteCatalogueStore(tmp_path / "catalogue.sqlite3")) for _ in range(count)]


def test_a_replica_indexes_what_another_upserted_once_it_syncs(encoder, tmp_path):
    writer, reader = shared_catalogues(encoder, tmp_path)
    assert writer.upsert(RECORDS) == (4, 0)
    assert len(writer) == 4, "the writer indexes its own upsert before it returns"
    assert len(reader) == 0 and reader.sync() == 4 and reader.sync() == 0
    np.testing.assert_allclose(reader.embeddings(["t1"]), writer.embeddings(["t1"]))
    assert writer.upsert([ItemRecord("t1", "Beauty", "Train soap", "Soap shaped like a train")]) == (0, 1)
    assert reader.sync() == 1
    assert reader.get(["t1"])[0].category == "Beauty"
    assert reader.categories() == {"Beauty": 3, "Toys": 1}, "the item left its old category's index"


def test_seeding_never_undoes_an_upsert(encoder, tmp_path):
    (catalogue,) = shared_catalogues(encoder, tmp_path, 1)
    catalogue.upsert([ItemRecord("n1", "Beauty", "Blue nail polish", "Blue now")])
    assert catalogue.upsert(RECORDS, only_new=True) == (3, 0)
    assert catalogue.get(["n1"])[0].text == "Blue now"


def test_vectors_of_another_encoder_are_encoded_again_not_mixed(encoder, tmp_path):
    from recsys_core.store.catalogue_store import CatalogueEntry

    (catalogue,) = shared_catalogues(encoder, tmp_path, 1)
    text = "Wooden train set with tracks"
    catalogue.store.put([CatalogueEntry("t1", "Toys", "Train", text, "", "another-encoder",
                                        np.ones(encoder.dimension, np.float32))])
    catalogue.sync()
    np.testing.assert_allclose(catalogue.embeddings(["t1"])[0], encoder.encode([text])[0], atol=1e-5)


# -- the start snapshot (a restarted replica reads one file, then the delta) ------


def state_of(catalogue):
    ids = sorted(catalogue._items)
    return [catalogue._items[i] for i in ids], catalogue.embeddings(ids), catalogue.categories()


def test_a_snapshot_restores_the_index_and_the_store_adds_what_came_after(encoder, tmp_path):
    writer, restarted, fresh = shared_catalogues(encoder, tmp_path, 3)
    writer.upsert(RECORDS)
    path = tmp_path / "snapshot.npz"
    assert writer.save_snapshot(path, "key", "store-1") == writer.applied_version
    # Written after the snapshot: an update, a move to another category, a new item.
    writer.upsert([ItemRecord("t1", "Beauty", "Train soap", "Soap shaped like a train"),
                   ItemRecord("n3", "Beauty", "Nail file", "A glass nail file")])
    assert restarted.load_snapshot(path, "key", "store-1") == 1
    assert len(restarted) == 4 and restarted.get(["t1"])[0].category == "Toys"
    assert restarted.sync() == 2, "only the changes after the snapshot's version are read"
    fresh.sync()
    for mine, theirs in zip(state_of(restarted), state_of(fresh)):
        if isinstance(mine, np.ndarray):
            np.testing.assert_array_equal(mine, theirs)
        else:
            assert mine == theirs
    assert restarted.categories() == {"Beauty": 4, "Toys": 1}


@pytest.mark.parametrize("wrong", ["key", "store", "version", "corrupt"])
def test_a_snapshot_that_does_not_match_is_never_used(encoder, tmp_path, wrong):
    writer, restarted = shared_catalogues(encoder, tmp_path, 2)
    writer.upsert(RECORDS)
    path = tmp_path / "snapshot.npz"
    writer.save_snapshot(path, "key", "store-1")
    if wrong == "version":
        # Of a store that was emptied and holds less now: the snapshot would resurrect items.
        from recsys_core.store.catalogue_sqlite import SQLiteCatalogueStore

        restarted.store = SQLiteCatalogueStore(tmp_path / "other.sqlite3")
    elif wrong == "corrupt":
        path.write_bytes(path.read_bytes()[:1000])
    key, store_id = ("other-encoder", "store-1") if wrong == "key" else ("key", "store-2") if wrong == "store" \
        else ("key", "store-1")
    assert restarted.load_snapshot(path, key, store_id) is None
    assert len(restarted) == 0 and restarted.applied_version == 0
