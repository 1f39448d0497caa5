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
