"""Fixtures that start the real services in process, on free ports."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recsys_core import data, paths  # noqa: E402
from recsys_core.encoder import latest_version_dir  # noqa: E402
from recsys_core.grpc_util import ManagedServer  # noqa: E402

STARTUP_SECONDS = 900


@pytest.fixture(scope="session")
def exported_encoder():
    """The pretrained encoder exported to model_repo/ (make setup does it; a
    bare pytest run does it here)."""
    try:
        return latest_version_dir()
    except FileNotFoundError:
        from recsys_core import export

        export.main([])
        return latest_version_dir()


@pytest.fixture(scope="session")
def triton_server(exported_encoder, tmp_path_factory):
    """A real Triton Inference Server on the repo's model repository, shared
    by the session. Tests that stop a Triton start their own."""
    from recsys_core.triton import TritonServer

    with TritonServer(paths.MODEL_REPO, log_path=tmp_path_factory.mktemp("triton") / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def dataset():
    return data.Dataset.load(paths.BUNDLED_DATA_DIR)


def start(server_and_port: tuple[ManagedServer, int]) -> tuple[ManagedServer, str]:
    server, port = server_and_port
    server.start()
    if not server.readiness.ready.wait(STARTUP_SECONDS):
        raise RuntimeError(f"{server.readiness.name} not ready: {server.readiness.error}")
    return server, f"127.0.0.1:{port}"


@dataclass
class Stack:
    embedding: str
    profile: str
    ranking: str
    gateway: str
    servers: dict

    def channel(self, name: str) -> grpc.Channel:
        return grpc.insecure_channel(getattr(self, name))


@pytest.fixture(scope="session")
def stack(triton_server, tmp_path_factory):
    """All four services on the bundled data with the encoder on Triton, as
    `recsys serve` runs them, but in this process so tests can reach their objects."""
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import create_server as create_embedding
    from services.gateway.config import GatewayConfig
    from services.gateway.server import create_server as create_gateway
    from services.profile.config import ProfileConfig
    from services.profile.server import create_server as create_profile
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server as create_ranking

    servers = {}
    servers["embedding"], embedding = start(create_embedding(
        EmbeddingConfig(address="127.0.0.1:0", encoder="triton", triton_url=triton_server.grpc_url)
    ))
    servers["ranking"], ranking = start(create_ranking(RankingConfig(address="127.0.0.1:0")))
    store = tmp_path_factory.mktemp("profile") / "events.sqlite3"
    servers["profile"], profile = start(
        create_profile(ProfileConfig(address="127.0.0.1:0", store_path=str(store), embedding_address=embedding))
    )
    gateway_config = GatewayConfig(
        address="127.0.0.1:0", profile_address=profile, embedding_address=embedding, ranking_address=ranking
    )
    servers["gateway"], gateway = start(create_gateway(gateway_config))
    yield Stack(embedding=embedding, profile=profile, ranking=ranking, gateway=gateway, servers=servers)
    for server in servers.values():
        server.stop(None)


@pytest.fixture(scope="session")
def gateway_config_for(stack):
    """A gateway configuration wired to the running stack, to vary in tests."""
    from services.gateway.config import GatewayConfig

    base = GatewayConfig(
        address="127.0.0.1:0",
        profile_address=stack.profile,
        embedding_address=stack.embedding,
        ranking_address=stack.ranking,
    )
    return lambda **changes: replace(base, **changes)
