"""gRPC face of the catalogue: parse, call the domain in the server's blocking
pool (encoding, FAISS and the catalogue's locks block), build the reply."""
from __future__ import annotations

from recsys.common.v1 import common_pb2
from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recsys_core.errors import FailedPrecondition, InvalidArgument
from recsys_core.models.hot_swap import Loaded, Served
from recsys_core.rpc.access import current_caller, is_admin
from recsys_core.rpc.grpc_util import Readiness, handle_errors, Deadline
from recsys_core.rpc.runtime import BlockingPool
from recsys_core.rpc.messages import from_vector, has_values, to_vector
from services.embedding.catalogue import Catalogue, ItemRecord
from services.embedding.retrieval import RetrievalRequest, retrieve
from services.embedding.config import EmbeddingConfig

ENCODER_CALL_SECONDS = 30.0


def item_message(record: ItemRecord, with_text: bool = True) -> common_pb2.Item:
    return common_pb2.Item(
        item_id=record.item_id,
        category=record.category,
        title=record.title,
        text=record.text if with_text else "",
        category_path=record.category_path,
    )


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, readiness: Readiness, config: EmbeddingConfig, blocking: BlockingPool):
        self.readiness = readiness
        self.config = config
        self.blocking = blocking
        self._served: Served[Catalogue] | None = None

    def attach(self, catalogue: Catalogue | Served[Catalogue]) -> None:
        """The catalogue to serve, or the versions a promotion swaps (services/embedding/promotion.py)."""
        if isinstance(catalogue, Catalogue):
            catalogue = Served(Loaded(catalogue, None, catalogue.model_version))
        self._served = catalogue

    @property
    def catalogue(self) -> Catalogue:
        """The serving version's catalogue (encoder and index together). Each
        call reads it once and uses that object to the end: a promotion
        swapping in another version meanwhile never mixes the two in a reply."""
        self.readiness.require()
        return self._served.current.value

    def catalogue_of(self, model_version: str) -> Catalogue:
        """The catalogue of the version a request's vectors were made by: the
        serving one, or one a promotion replaced that this replica still
        holds (its grace period). Vectors of a version it no longer holds are
        refused, never searched in another encoder's index."""
        current = self.catalogue
        if not model_version or model_version == current.model_version:
            return current
        kind, _, number = model_version.rpartition("/")
        if not kind or not number.isdigit():
            raise InvalidArgument("model_version", f"{model_version!r} is not a model version (e.g. sequence/3)")
        held = self._served.get(int(number))
        if held is None or held.value.model_version != model_version:
            raise FailedPrecondition(
                f"model_version: the vectors are {model_version}'s, which this replica does not hold (it serves "
                f"{current.model_version or 'the encoder it started with'}); read the profile again")
        return held.value

    @handle_errors
    async def EmbedTexts(self, request, context):
        catalogue, deadline = self.catalogue, Deadline(context, ENCODER_CALL_SECONDS)
        vectors = await self.blocking.run(
            lambda: catalogue.embed_texts(
                list(request.texts),
                max_texts=self.config.max_texts_per_request,
                max_chars=self.config.max_text_chars,
                timeout=deadline.left(),
            )
        )
        return embedding_pb2.EmbedTextsResponse(
            vectors=[to_vector(v) for v in vectors], dimension=catalogue.dimension,
            model_version=catalogue.model_version,
        )

    @handle_errors
    async def SearchItems(self, request, context):
        catalogue = self.catalogue
        vectors = [from_vector(v, f"vectors[{i}]") for i, v in enumerate(request.vectors)]
        return await self.blocking.run(self._search, catalogue, request, vectors)

    def _search(self, catalogue: Catalogue, request, vectors) -> embedding_pb2.SearchItemsResponse:
        """Search, and the reply: in the pool, since filling it reads the
        catalogue (items and embeddings of the hits) under its locks. Query
        items' vectors come from `catalogue`, the version whose index is
        searched: a promotion meanwhile cannot pair one encoder's vector with
        another's index."""
        query_items = catalogue.get(list(request.query_item_ids), field="query_item_ids")
        if query_items:
            vectors = vectors + list(catalogue.embeddings([r.item_id for r in query_items]))
        queries = catalogue.check_vectors(vectors)
        results = catalogue.search(
            queries, request.k, self.config.max_k, list(request.categories), list(request.exclude_item_ids)
        )
        response = embedding_pb2.SearchItemsResponse(model_version=catalogue.model_version)
        if request.include_items:
            response.query_items.extend(item_message(r, with_text=False) for r in query_items)
        for hits in results:
            result = response.results.add()
            if request.include_items and hits:
                ids = [item_id for item_id, _ in hits]
                records = catalogue.get(ids)
                embeddings = catalogue.embeddings(ids)
                for (item_id, score), record, embedding in zip(hits, records, embeddings):
                    result.hits.add(
                        item_id=item_id,
                        score=score,
                        # Hits carry what a result list shows; long texts would
                        # multiply the reply's size (GetItems has them).
                        item=item_message(record, with_text=False),
                        embedding=to_vector(embedding),
                    )
            else:
                for item_id, score in hits:
                    result.hits.add(item_id=item_id, score=score)
        return response

    @handle_errors
    async def RetrieveCandidates(self, request, context):
        catalogue = self.catalogue_of(request.model_version)

        def optional(vector, name):
            return from_vector(vector, name) if has_values(vector) else None

        query = RetrievalRequest(
            long_term=optional(request.long_term_interest, "long_term_interest"),
            short_term=optional(request.short_term_interest, "short_term_interest"),
            model=optional(request.model_interest, "model_interest"),
            context_ids=list(request.context_item_ids),
            centroids=[from_vector(v, f"interest_centroids[{i}]") for i, v in enumerate(request.interest_centroids)],
            extra_ids=list(request.extra_item_ids),
            history_ids=list(request.history_item_ids),
            disliked_ids=list(request.disliked_item_ids),
            k=request.k,
            categories=list(request.categories),
            exclude_ids=list(request.exclude_item_ids),
        )
        return await self.blocking.run(self._retrieve, catalogue, query, request.include_embeddings)

    def _retrieve(self, catalogue: Catalogue, query: RetrievalRequest, with_embeddings: bool):
        """In the pool: the reply is large enough that building it off the loop pays."""
        found = retrieve(catalogue, query, self.config.max_k)
        response = embedding_pb2.RetrieveCandidatesResponse(
            model_version=catalogue.model_version,
            context_items=[item_message(r, with_text=False) for r in found.context],
            history_items=[item_message(r, with_text=False) for r in found.history],
        )
        features = found.features
        columns = zip(found.records, found.scores.tolist(), found.retrieved.tolist(), features.long_term.tolist(),
                      features.short_term.tolist(), features.context.tolist(), features.model.tolist(),
                      features.disliked.tolist(), found.because, found.interest_similarity.tolist())
        for position, (record, score, retrieved, long, short, ctx, model, disliked, because, interests) in enumerate(columns):
            candidate = response.candidates.add(
                item=item_message(record, with_text=False),
                retrieval_score=score,
                retrieved=retrieved,
                features=common_pb2.CandidateFeatures(
                    long_term_similarity=long, short_term_similarity=short, context_similarity=ctx,
                    model_similarity=model, disliked_similarity=disliked,
                ),
                because_item_id=because,
                interest_similarities=interests,
            )
            if with_embeddings:
                candidate.embedding.CopyFrom(to_vector(found.embeddings[position]))
        return response

    @handle_errors
    async def UpsertItems(self, request, context):
        # How many items and how long their texts: recsys_core/rpc/limits.py (LIMITS).
        # The caller is known here, on the loop; the pool's threads do not see it.
        new_categories = is_admin(current_caller())
        records = [
            ItemRecord(item_id=i.item_id, category=i.category, title=i.title or i.text[:120], text=i.text or i.title,
                       category_path=i.category_path)
            for i in request.items
        ]
        inserted, updated = await self.blocking.run(
            lambda: self.catalogue.upsert(records, new_categories=new_categories))
        return embedding_pb2.UpsertItemsResponse(inserted=inserted, updated=updated)

    @handle_errors
    async def GetItems(self, request, context):
        catalogue = self.catalogue
        records, embeddings = await self.blocking.run(
            self._records, catalogue, list(request.item_ids), request.skip_missing, request.include_embeddings
        )
        response = embedding_pb2.GetItemsResponse(model_version=catalogue.model_version)
        for position, record in enumerate(records):
            entry = response.items.add(item=item_message(record))
            if embeddings is not None:
                entry.embedding.CopyFrom(to_vector(embeddings[position]))
        return response

    @staticmethod
    def _records(catalogue: Catalogue, item_ids: list[str], skip_missing: bool, with_embeddings: bool):
        records = catalogue.get(item_ids, skip_missing=skip_missing)
        return records, catalogue.embeddings([r.item_id for r in records]) if with_embeddings else None

    @handle_errors
    async def ListCategories(self, request, context):
        catalogue = self.catalogue
        categories = await self.blocking.run(catalogue.categories)
        return embedding_pb2.ListCategoriesResponse(
            categories=[
                embedding_pb2.CategoryInfo(name=name, items=count)
                for name, count in sorted(categories.items())
            ],
            dimension=catalogue.dimension,
            model_version=catalogue.model_version,
        )
