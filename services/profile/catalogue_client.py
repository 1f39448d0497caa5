"""The profile service's view of the embedding service."""
from __future__ import annotations

from collections.abc import Sequence

from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys_core.rpc.grpc_util import channel
from recsys_core.rpc.transport import Security
from recsys_core.rpc.messages import from_vector
from services.profile.profiles import ItemInfo

# One GetItems call stays well under the message size limit.
LOOKUP_BATCH = 2000


class EmbeddingServiceLookup:
    def __init__(self, address: str, security: Security, tracing=None):
        self.channel = channel(address, security, "embedding", tracing)
        self.stub = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)

    def lookup(self, item_ids: Sequence[str], timeout: float) -> dict[str, ItemInfo]:
        found = {}
        for start in range(0, len(item_ids), LOOKUP_BATCH):
            reply = self.stub.GetItems(
                embedding_pb2.GetItemsRequest(
                    item_ids=item_ids[start : start + LOOKUP_BATCH], include_embeddings=True, skip_missing=True
                ),
                timeout=timeout,
            )
            for entry in reply.items:
                found[entry.item.item_id] = ItemInfo(
                    category=entry.item.category,
                    vector=from_vector(entry.embedding),
                    title=entry.item.title,
                    category_path=entry.item.category_path,
                    model_version=reply.model_version,
                )
        return found

    def close(self) -> None:
        self.channel.close()
