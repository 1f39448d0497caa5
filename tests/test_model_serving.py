"""Serving a trained model (`recsys serve --model DIR`): a real model directory
trained here on a slice of the bundled data, its encoder and user tower on a
real Triton, and the four services on it."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from recsys_core import errors
from recsys_core.data import shopping, paths
from recsys_core.models import model_serving
from recsys_core.models import user_tower as ut
from recsys_core.models.encoder import OnnxEncoder, latest_version_dir
from recsys_core.ranking.scoring import UserVectors, Weights, rank

pytestmark = pytest.mark.integration

# Enough shoppers for leave-one-out training, few enough items to train and
# index in seconds; the first few keep their other categories' events, whose
# items the model never saw (indexed by their text alone).
SHOPPERS = 40
SHOPPERS_WITH_COLD_ITEMS = 5


@pytest.fixture(scope="module")
def small_data(dataset, tmp_path_factory) -> Path:
    events = dataset.interactions
    beauty = events[events.category == "Beauty"].groupby("user_id").size()
    shoppers = sorted(beauty[beauty >= 5].index)[:SHOPPERS]
    keep = events.user_id.isin(shoppers) & (
        (events.category == "Beauty") | events.user_id.isin(shoppers[:SHOPPERS_WITH_COLD_ITEMS]))
    out = tmp_path_factory.mktemp("small-data")
    events[keep].to_csv(out / shopping.INTERACTIONS_FILE, index=False)
    items = dataset.items[dataset.items.item_id.isin(events[keep].item_id)]
    items[list(shopping.ITEM_COLUMNS)].to_csv(out / shopping.ITEMS_FILE, index=False)
    return out


@pytest.fixture(scope="module")
def model(small_data, exported_encoder, tmp_path_factory) -> model_serving.ModelDir:
    """What `recsys train --out` writes, on a tiny budget."""
    from training import commands

    out = tmp_path_factory.mktemp("trained") / "model"
    assert commands.train_main(["--data", str(small_data), "--categories", "Beauty", "--out", str(out),
                                "--max-epochs", "1", "--max-minutes", "0.5", "--no-progress", "--no-guard",
                                # One short epoch: a large step makes the served encoder visibly not the pretrained one.
                                "--encoder-lr", "1e-3"]) == 0
    return model_serving.open_model_dir(out)


@dataclass
class Served:
    repo: Path
    versions: dict[str, int]
    triton: object


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    from recsys_core.models.triton import TritonServer

    repo = tmp_path_factory.mktemp("serving") / "model_repo"
    versions = model_serving.serving_repository(model, repo, models=(paths.TEXT_ENCODER_MODEL,))
    # fp32 Triton vectors do not depend on what a text is batched with, so
    # the tests can compare them with the model's files exactly.
    config = repo / paths.TEXT_ENCODER_MODEL / model_serving.CONFIG_FILE
    text = config.read_text()
    config.unlink()
    config.write_text(text.replace('string_value: "int8"', 'string_value: "fp32"'))
    log = tmp_path_factory.mktemp("triton-log") / "server.log"
    with TritonServer(repo, log_path=log, startup_timeout=300,
                      models=(paths.TEXT_ENCODER_MODEL, model_serving.USER_TOWER_MODEL)) as triton:
        yield Served(repo, versions, triton)


# How a shopper's model interest is scored: by the user tower alone.
ONLY_THE_MODEL = dict(long_term_weight=0.0, short_term_weight=0.0, context_weight=0.0, popularity_weight=0.0,
                      dislike_weight=0.0, churn_popularity_boost=0.0, model_weight=1.0, co_purchase_weight=0.0)


@pytest.fixture(scope="module")
def model_stack(served, model, small_data, tmp_path_factory):
    """The four services as `recsys serve --model` configures them, in process."""
    from conftest import Stack, secured, start
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import create_server as create_embedding
    from services.gateway.config import GatewayConfig
    from services.gateway.server import create_server as create_gateway
    from services.profile.config import ProfileConfig
    from services.profile.server import create_server as create_profile
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server as create_ranking

    state = tmp_path_factory.mktemp("model-stack")
    servers = {}
    servers["embedding"], embedding = start(create_embedding(EmbeddingConfig(
        address="127.0.0.1:0", data_dir=str(small_data), encoder="triton", triton_url=served.triton.grpc_url,
        model_repo=str(served.repo), model_dir=str(model.path), cache_dir=str(state / "cache"),
        catalogue_path=str(state / "catalogue.sqlite3"), **secured("embedding"))))
    servers["ranking"], ranking = start(create_ranking(RankingConfig(address="127.0.0.1:0", **ONLY_THE_MODEL, **secured("ranking"))))
    servers["profile"], profile = start(create_profile(ProfileConfig(
        address="127.0.0.1:0", store_path=str(state / "events.sqlite3"), data_dir=str(small_data),
        embedding_address=embedding, user_tower_triton_url=served.triton.grpc_url, **secured("profile"))))
    servers["gateway"], gateway = start(create_gateway(GatewayConfig(
        address="127.0.0.1:0", profile_address=profile, embedding_address=embedding, ranking_address=ranking,
        **secured("gateway"))))
    yield Stack(embedding=embedding, profile=profile, ranking=ranking, gateway=gateway, servers=servers)
    for server in servers.values():
        server.stop(None)


def catalogue_vectors(stack, item_ids: list[str]) -> dict[str, np.ndarray]:
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from recsys_core.rpc.messages import from_vector

    with stack.channel("embedding") as channel:
        reply = embedding_pb2_grpc.EmbeddingServiceStub(channel).GetItems(
            embedding_pb2.GetItemsRequest(item_ids=item_ids, include_embeddings=True), timeout=30)
    return {entry.item.item_id: from_vector(entry.embedding) for entry in reply.items}


def onnx_user_tower(model: model_serving.ModelDir, histories: list[np.ndarray]) -> np.ndarray:
    """The exported fp32 file on a bare onnxruntime session: each history's
    latest max_len items, left-padded to max_len."""
    import onnxruntime as ort

    metadata = json.loads((model.user_tower_dir / ut.METADATA_FILE).read_text())
    max_len = metadata["max_len"]
    session = ort.InferenceSession(str(model.user_tower_dir / metadata["weights"]["fp32"]["file"]),
                                   providers=["CPUExecutionProvider"])
    out = []
    for history in histories:
        kept = np.asarray(history, dtype=np.float32)[-max_len:]
        vectors = np.zeros((1, max_len, kept.shape[1]), dtype=np.float32)
        mask = np.zeros((1, max_len), dtype=np.float32)
        vectors[0, max_len - len(kept):] = kept
        mask[0, max_len - len(kept):] = 1
        out.append(session.run([ut.SHOPPER_VECTOR], {ut.ITEM_VECTORS: vectors, ut.MASK: mask})[0][0])
    return np.stack(out)


# -- the model directory ---------------------------------------------------------------


def test_serving_reads_the_layout_training_writes(model):
    from training import modeldir

    assert (model_serving.FORMAT, model_serving.MANIFEST, model_serving.ENCODER_DIR, model_serving.USER_TOWER_DIR,
            model_serving.ITEMS_DIR) == (modeldir.FORMAT, modeldir.MANIFEST, modeldir.ENCODER_DIR,
                                         modeldir.USER_TOWER_DIR, modeldir.ITEMS_DIR)
    assert (ut.METADATA_FILE, ut.ITEM_VECTORS, ut.MASK, ut.SHOPPER_VECTOR) == (
        modeldir.USER_TOWER_METADATA, modeldir.ITEM_VECTORS, modeldir.MASK, modeldir.SHOPPER_VECTOR)
    assert model.manifest["id_vectors"] and len(model.id_vectors()) == model.manifest["items"]


def copy_of(model: model_serving.ModelDir, target: Path) -> Path:
    shutil.copytree(model.path, target, copy_function=lambda s, d: Path(d).hardlink_to(s),
                    ignore=shutil.ignore_patterns("training"))
    return target


def test_a_bad_model_directory_gets_a_clear_error(model, tmp_path, capsys):
    from recsys_cli import main as cli

    def error_for(path: Path) -> str:
        with pytest.raises(model_serving.ModelDirError) as caught:
            model_serving.open_model_dir(path)
        return str(caught.value)

    assert "no such directory" in error_for(tmp_path / "missing")
    assert "no manifest.json" in error_for(model.encoder_dir)

    wrong_format = copy_of(model, tmp_path / "wrong-format")
    (wrong_format / "manifest.json").unlink()
    (wrong_format / "manifest.json").write_text(json.dumps({**model.manifest, "format": "recsys-two-tower/9"}))
    assert "'recsys-two-tower/9' is not one this version serves" in error_for(wrong_format)

    no_ids = copy_of(model, tmp_path / "no-id-vectors")
    (no_ids / "items" / "id_vectors.npy").unlink()
    assert "id_vectors.npy is missing" in error_for(no_ids)

    no_tower = copy_of(model, tmp_path / "no-user-tower")
    (no_tower / "user_tower" / "model.onnx").unlink()
    assert "lacks model.onnx" in error_for(no_tower)

    assert cli.main(["serve", "--model", str(no_tower), "--no-example"]) == 2
    assert "recsys serve: --model:" in capsys.readouterr().err


def test_model_repo_is_left_alone_and_installs_are_idempotent(model, served, tmp_path):
    pretrained = latest_version_dir()
    with pytest.raises(model_serving.ModelDirError, match="needs a path of its own"):
        model_serving.serving_repository(model, paths.MODEL_REPO)
    (tmp_path / "notes.txt").write_text("not a serving repository")
    with pytest.raises(model_serving.ModelDirError, match="not replacing it"):
        model_serving.serving_repository(model, tmp_path)
    assert served.versions == {paths.TEXT_ENCODER_MODEL: int(pretrained.name) + 1, model_serving.USER_TOWER_MODEL: 1}
    # The repository the tests and a plain `recsys serve` load is unchanged.
    assert OnnxEncoder(pretrained, precision="int8").fingerprint != model.encoder_fingerprint("int8")
    assert not (paths.MODEL_REPO / model_serving.USER_TOWER_MODEL).exists()
    assert model_serving.install_encoder(model, served.repo) == served.versions[paths.TEXT_ENCODER_MODEL]
    assert model_serving.install_user_tower(model, served.repo) == 1


# -- Triton -------------------------------------------------------------------------------


def test_triton_serves_the_models_encoder_as_its_newest_version(model, served):
    from recsys_core.models.triton_encoder import TritonEncoder

    texts = ["Maybelline Great Lash Mascara, Blackest Black", "wooden train set with 40 pieces", "SPF 50 sunscreen"]
    with TritonEncoder(served.triton.grpc_url) as newest, \
            TritonEncoder(served.triton.grpc_url, version=1) as pretrained:
        assert newest.version == str(served.versions[paths.TEXT_ENCODER_MODEL])
        fine_tuned = newest.encode(texts)
        np.testing.assert_allclose(fine_tuned, OnnxEncoder(model.encoder_dir, precision="fp32").encode(texts),
                                   atol=1e-4)
        assert np.abs(fine_tuned - pretrained.encode(texts)).max() > 1e-3


def test_triton_user_tower_matches_onnxruntime_on_the_exported_file(model, served):
    from services.profile.user_tower import ShopperVectors

    items = np.load(model.path / "items" / "text_vectors.npy") + model.id_vectors().vectors
    rng = np.random.default_rng(3)
    max_len = model.manifest["user_tower"]["max_len"]
    # One item, a few, exactly max_len, longer than max_len (its latest are
    # read), and more histories than Triton takes in one batch.
    lengths = [1, 4, max_len, max_len + 9] + list(rng.integers(1, 12, size=70))
    histories = [items[rng.integers(0, len(items), size=n)] for n in lengths]
    with ShopperVectors(served.triton.grpc_url) as tower:
        assert tower.max_len == max_len and tower.max_batch_size < len(histories)
        got = tower.encode(histories)
        expected = onnx_user_tower(model, histories)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert np.linalg.norm(got[0] - got[1]) > 1e-2, "different histories, different shoppers"

        with pytest.raises(ValueError, match=r"histories\[0\]"):
            tower.encode([np.zeros((2, 10), dtype=np.float32)])


def test_triton_user_tower_rejects_a_malformed_request_alone(served):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    def request(mask: np.ndarray):
        vectors = grpcclient.InferInput(ut.ITEM_VECTORS, [1, mask.shape[1], 384], "FP32")
        vectors.set_data_from_numpy(np.full((1, mask.shape[1], 384), 0.05, dtype=np.float32))
        masks = grpcclient.InferInput(ut.MASK, list(mask.shape), "FP32")
        masks.set_data_from_numpy(mask)
        return [vectors, masks]

    with grpcclient.InferenceServerClient(served.triton.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="left padding"):
            client.infer(model_serving.USER_TOWER_MODEL, request(np.array([[1, 0]], dtype=np.float32)))
        good = client.infer(model_serving.USER_TOWER_MODEL, request(np.array([[0, 1]], dtype=np.float32)))
        assert np.isfinite(good.as_numpy(ut.SHOPPER_VECTOR)).all()


# -- the services on the model ------------------------------------------------------------


def test_catalogue_indexes_trained_items_with_their_id_vectors(model, model_stack, small_data):
    items = shopping.load_items(small_data)
    vectors = catalogue_vectors(model_stack, list(items.item_id))
    assert len(vectors) == len(items)
    # What the model's encoder makes of each text: saved by training for the
    # items it trained on, encoded here for the others.
    trained = model.item_ids()
    text = dict(zip(trained, np.load(model.path / "items" / "text_vectors.npy")))
    cold = items[~items.item_id.isin(trained)]
    text.update(zip(cold.item_id, OnnxEncoder(model.encoder_dir, precision="fp32").encode(list(cold.text))))
    assert len(cold) and len(trained) > 100
    id_vectors = dict(zip(trained, model.id_vectors().vectors))
    for item_id in trained:
        residual = vectors[item_id] - text[item_id]
        assert np.linalg.norm(residual - id_vectors[item_id]) < 0.1 * np.linalg.norm(id_vectors[item_id]), item_id
    for item_id in cold.item_id:
        assert np.linalg.norm(vectors[item_id] - text[item_id]) < 1e-3, item_id


def test_profiles_and_recommendations_follow_the_model(model, model_stack, small_data):
    from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from recsys.profile.v1 import profile_pb2
    from recsys_core.rpc.messages import from_vector, has_values

    events = shopping.chronological(shopping.load_interactions(small_data))
    dated = events.groupby("user_id").timestamp.agg(lambda ts: ts.notna().all() and ts.is_unique)
    lengths = events.groupby("user_id").size()
    shopper = lengths[dated].sort_values(ascending=False).index[0]
    history = list(events[events.user_id == shopper].item_id)

    with model_stack.channel("gateway") as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        profile = gateway.GetProfile(profile_pb2.GetProfileRequest(user_id=shopper), timeout=30)
        assert has_values(profile.model_interest), "GetProfile carries the user tower's shopper vector"
        model_interest = from_vector(profile.model_interest)
        vectors = catalogue_vectors(model_stack, list(shopping.load_items(small_data).item_id))
        expected = onnx_user_tower(model, [np.stack([vectors[i] for i in history])])[0]
        np.testing.assert_allclose(model_interest, expected, rtol=1e-4, atol=1e-4)

        reply = gateway.Recommend(gateway_pb2.RecommendRequest(user_id=shopper, k=10), timeout=30)
    assert reply.path == gateway_pb2.RECOMMENDATION_PATH_PERSONALISED
    unseen = [i for i in vectors if i not in set(history)]
    by_model = sorted(unseen, key=lambda i: -float(vectors[i] @ model_interest))
    assert [item.item_id for item in reply.items] == by_model[:10]


# -- ranking ------------------------------------------------------------------------------


def test_the_model_term_ranks_by_inner_product_whatever_the_towers_scale():
    rng = np.random.default_rng(5)
    candidates = rng.normal(size=(30, 8)).astype(np.float32)
    interest = rng.normal(size=8).astype(np.float32)
    weights = Weights(long_term=0.0, short_term=0.0, context=0.0, popularity=0.0, model=1.0)
    zeros = np.zeros(30, dtype=np.float32)

    def ranked(vector):
        user = UserVectors(long_term=None, short_term=None, context=None, history=None, model_interest=vector)
        return rank(user, candidates, zeros, zeros, weights, 0)

    small, large = ranked(interest), ranked(20 * interest)
    assert list(small.order) == list(np.argsort(-(candidates @ interest), kind="stable"))
    assert list(large.order) == list(small.order)
    np.testing.assert_allclose(large.scores, small.scores, rtol=1e-5)
    with pytest.raises(errors.InvalidArgument, match="user.model_interest"):
        ranked(interest[:5])


def test_the_rankers_model_source_is_the_served_models_own_ranking(model, small_data):
    """`recsys train-ranker --model`: the pool's "model" source is what the
    model retrieves, so the pool ordered by model_similarity alone scores
    exactly what `recsys evaluate --model` scores over the whole catalogue
    (the learned order is then measured on the papers' protocol)."""
    from training import modeldir, protocol, ranker, seqmodel

    dataset = shopping.Dataset.load(small_data)
    vectors_of, shopper_model_of = ranker.served_model(model.path, dataset.items, progress=False)
    category = ranker.prepare(dataset, "Beauty", vectors_of, shopper_model_of)
    split = category.split
    pools = category.pools("test", list(range(len(split.users))), ranker.PoolSettings(per_source=25))
    assert pools.source_hits["model"].any()
    pooled = ranker.evaluate_scores(pools, ranker.single_source(pools, "model_similarity"), split.num_items)
    offline = protocol.evaluate(seqmodel.scorer(modeldir.load_for_scoring(model.path, split, dataset.items,
                                                                          progress=False)), split, "test")
    assert offline["recall@20"] > 0, offline  # some targets found: the equality below means something
    for metric in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):
        assert pooled[metric] == pytest.approx(offline[metric], abs=1e-6), (metric, pooled, offline)
    # Served vectors, not unit ones: the index holds text + ID vectors as they are.
    with_ids = model_serving.open_model_dir(model.path).id_vectors()
    assert with_ids is not None and not np.allclose(np.linalg.norm(category.vectors, axis=1), 1.0)
