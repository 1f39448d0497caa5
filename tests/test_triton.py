"""The text encoder served by a real Triton Inference Server (the binary in
the nvidia-pytriton wheel, on CPU) against the in-process OnnxEncoder."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from recsys_core import errors
from recsys_core.data import paths
from recsys_core.models.encoder import EMBEDDING, OnnxEncoder
from recsys_core.models.triton import TritonServer
from recsys_core.models.triton_encoder import TEXT, TritonEncoder

pytestmark = pytest.mark.integration

TITLES = [
    "Apple iPhone 13 Silicone Case with MagSafe - Midnight",
    "Logitech MX Master 3S Wireless Performance Mouse, Graphite",
    "Instant Pot Duo 7-in-1 Electric Pressure Cooker, 6 Quart",
    "Nike Men's Revolution 6 Next Nature Running Shoe",
    'Kindle Paperwhite (16 GB) - Now with a 6.8" display and adjustable warm light',
    "Hydro Flask Standard Mouth Water Bottle with Flex Cap, 21 oz",
    "Sony WH-1000XM5 Wireless Industry Leading Noise Canceling Headphones",
    "LEGO Star Wars Millennium Falcon 75257 Building Kit (1,351 Pieces)",
    "Crayola 64 Count Crayons with Built-in Sharpener",
    "Anker PowerCore 10000 Portable Charger",
    "Cuisinart 12-Piece Stainless Steel Cookware Set",
    "The Very Hungry Caterpillar (Board Book)",
    "Levi's Women's 501 Original Fit Jeans",
    "Philips Sonicare 4100 Rechargeable Electric Toothbrush, Black",
    "Purina Pro Plan High Protein Dry Dog Food, Chicken & Rice 35 lb",
    "Samsung 970 EVO Plus 1TB NVMe M.2 SSD",
    "Yeti Rambler 20 oz Tumbler, Stainless Steel, Vacuum Insulated",
    "Café Bustelo Espresso Style Dark Roast Ground Coffee, 10 oz",
    "",
    "Burt's Bees Lip Balm Multipack - Original Beeswax " * 8,  # longer than MAX_TOKENS
]


@pytest.fixture(scope="session")
def version_dir(exported_encoder):
    return exported_encoder


@pytest.fixture(scope="session")
def local_encoder(version_dir, encoder):
    # The same weights Triton serves (its config's precision).
    return OnnxEncoder(version_dir, precision=encoder.precision)


# int8 scales activations per batch, so a text's vector shifts slightly with
# what it is batched with (cosine above 0.99); same-batch results are identical.
CROSS_BATCH_COSINE = 0.98


def assert_same_rows(served: np.ndarray, local: np.ndarray) -> None:
    """Row i of `served` is the text of row i of `local`: close to it, and
    closer to it than to any other row."""
    assert cosines(served, local).min() >= CROSS_BATCH_COSINE
    assert (np.argmax(served @ local.T, axis=1) == np.arange(len(local))).all()


@pytest.fixture(scope="session")
def server(triton_server):
    return triton_server


@pytest.fixture(scope="session")
def encoder(server):
    with TritonEncoder(server.grpc_url) as encoder:
        yield encoder


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_server_reports_model_ready(server):
    import tritonclient.grpc as grpcclient

    assert server.is_running()
    assert server.grpc_url.startswith("127.0.0.1:")
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(paths.TEXT_ENCODER_MODEL)


def test_config_matches_onnx_model(version_dir):
    import onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    onnx_dimension = ort.InferenceSession(
        str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    ).get_outputs()[0].shape[-1]
    assert isinstance(onnx_dimension, int)

    cpu = paths.MODEL_REPO / paths.TEXT_ENCODER_MODEL / "config.pbtxt"
    gpu = paths.REPO_ROOT / "deploy" / "triton" / "text_encoder.gpu.pbtxt"
    for path, kind in ((cpu, model_config_pb2.ModelInstanceGroup.KIND_CPU),
                       (gpu, model_config_pb2.ModelInstanceGroup.KIND_GPU)):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == paths.TEXT_ENCODER_MODEL
        assert config.backend == "python"
        assert config.max_batch_size > 0
        # Batching on, and a lone request never waits more than 2 ms for company.
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.max_queue_delay_microseconds <= 2000
        assert [g.kind for g in config.instance_group] == [kind]
        (text,) = config.input
        assert (text.name, text.data_type, list(text.dims)) == (TEXT, model_config_pb2.TYPE_STRING, [1])
        (embedding,) = config.output
        assert (embedding.name, embedding.data_type, list(embedding.dims)) == (
            EMBEDDING, model_config_pb2.TYPE_FP32, [onnx_dimension],
        )


def test_embeddings_match_in_process_encoder(encoder, local_encoder, version_dir):
    assert encoder.dimension == local_encoder.dimension
    assert encoder.fingerprint == f"triton:{paths.TEXT_ENCODER_MODEL}:{version_dir.name}"
    assert encoder.precision == "int8", "the CPU model config serves int8"
    served = encoder.encode(TITLES)
    local = local_encoder.encode(TITLES)
    assert served.shape == (len(TITLES), local_encoder.dimension)
    assert served.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-4)
    assert cosines(served, local).min() >= 0.999


def test_batch_larger_than_max_batch_size(encoder, local_encoder, dataset):
    texts = list(dict.fromkeys(t for t in dataset.items.title if t))[:150]
    assert len(texts) > encoder.max_batch_size * 2
    served = encoder.encode(texts)
    assert served.shape == (len(texts), encoder.dimension)
    # Rows must come back in request order across chunks.
    assert_same_rows(served, local_encoder.encode(texts))


def test_concurrent_requests_are_split_back_correctly(encoder, local_encoder):
    # Simultaneous requests land in one dynamic batch on the server; each
    # caller must still get exactly its own rows.
    groups = [TITLES[i : i + 3] for i in range(0, 18, 3)]
    expected = [local_encoder.encode(g) for g in groups]
    results: list = [None] * len(groups)
    start = threading.Barrier(len(groups))

    def call(i):
        start.wait()
        results[i] = encoder.encode(groups[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for got, want in zip(results, expected):
        assert got is not None
        assert_same_rows(got, want)


def test_empty_input(encoder):
    assert encoder.encode([]).shape == (0, encoder.dimension)


def test_tiny_timeout_is_deadline_exceeded(encoder):
    with pytest.raises(errors.DeadlineExceeded):
        encoder.encode(TITLES * 3, timeout=1e-4)


def test_unavailable_after_server_stops(version_dir, tmp_path):
    # Its own server: stopping the shared one would break the other tests.
    server = TritonServer(paths.MODEL_REPO, log_path=tmp_path / "server.log").start()
    try:
        encoder = TritonEncoder(server.grpc_url, timeout=5)
        assert encoder.encode(TITLES[:2]).shape == (2, encoder.dimension)
    finally:
        assert server.stop() == 0
    assert not server.is_running()

    started = time.monotonic()
    with pytest.raises(errors.Unavailable):
        encoder.encode(TITLES[:2])
    assert time.monotonic() - started < 5
    with pytest.raises(errors.Unavailable):
        TritonEncoder(server.grpc_url, timeout=5)
    encoder.close()


def test_triton_down_embed_texts_unavailable_fast_while_recommendations_go_on(stack, tmp_path, dataset):
    """Stop the Triton behind an embedding service mid-run: EmbedTexts answers
    UNAVAILABLE at once, its `text_encoder` health entry turns NOT_SERVING, and
    recommendations for known shoppers keep coming from the index."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import create_server as create_embedding
    from services.gateway.config import GatewayConfig
    from services.gateway.server import create_server as create_gateway
    from tests.conftest import gateway_channel as to_gateway, secured, service_channel, start

    triton = TritonServer(paths.MODEL_REPO, log_path=tmp_path / "server.log").start()
    embedding_server, embedding = start(create_embedding(
        EmbeddingConfig(address="127.0.0.1:0", encoder="triton", triton_url=triton.grpc_url,
                        catalogue_path=str(tmp_path / "catalogue.sqlite3"), **secured("embedding"))
    ))
    gateway_server, gateway = start(create_gateway(GatewayConfig(
        address="127.0.0.1:0", profile_address=stack.profile, embedding_address=embedding,
        ranking_address=stack.ranking, **secured("gateway"),
    )))
    shopper = dataset.interactions.user_id.iloc[0]
    try:
        with service_channel(embedding, "embedding") as channel, to_gateway(gateway) as gateway_channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            recommend = gateway_pb2_grpc.GatewayServiceStub(gateway_channel).Recommend
            request = embedding_pb2.EmbedTextsRequest(texts=["wooden train set"])
            assert len(stub.EmbedTexts(request, timeout=10).vectors) == 1

            assert triton.stop() == 0
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.EmbedTexts(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 2, "no hang while Triton is down"

            reply = recommend(gateway_pb2.RecommendRequest(user_id=shopper, k=10), timeout=10)
            assert reply.path == gateway_pb2.RECOMMENDATION_PATH_PERSONALISED and len(reply.items) == 10

            give_up = time.monotonic() + 10
            while health.Check(health_pb2.HealthCheckRequest(service="text_encoder"), timeout=5).status \
                    != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < give_up, "the text_encoder health entry never followed Triton"
                time.sleep(0.2)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.EmbedTexts(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 0.5, "known-down encoder fails at once"
    finally:
        gateway_server.stop(None)
        embedding_server.stop(None)
        triton.stop()
