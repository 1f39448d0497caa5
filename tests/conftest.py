"""Fixtures that start the real services in process, on free ports."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recsys_core.data import shopping, paths  # noqa: E402
from recsys_core.models.encoder import latest_version_dir  # noqa: E402
from recsys_core.rpc.grpc_util import ManagedServer  # noqa: E402

STARTUP_SECONDS = 900

# Which shoppers belong to which tenant in the tests' stacks (as `recsys serve` sets it).
TENANTS = "retail=retail-,amazon="


@functools.cache
def tls_material():
    """The session's CA, certificates and token key (made once, in a temporary
    directory): every server the tests start uses them, as `recsys serve` does."""
    import tempfile

    from recsys_cli.certs import LocalSecurity

    # One directory for the process, even where this module is imported twice
    # (as tests.conftest and as conftest).
    directory = os.environ.setdefault("RECSYS_TEST_TLS_DIR", tempfile.mkdtemp(prefix="recsys-tls-"))
    return LocalSecurity.ensure(Path(directory))


def secured(name: str, reflection: bool = True) -> dict:
    """A service config's `security` and `auth`: mTLS with the test CA's
    certificate for `name`, tokens checked with the test key."""
    security = tls_material()
    return {"security": security.security(name, reflection=reflection), "auth": security.auth(tenants=TENANTS)}


def secured_env(name: str) -> dict[str, str]:
    """The same as `secured`, as the environment of a service's process."""
    material, prefix = tls_material(), name.upper() + "_"
    return {prefix + "TLS_DIR": str(material.tls_dir(name)), prefix + "AUTH_JWT_KEY_FILE": str(material.jwt_key),
            prefix + "AUTH_TENANTS": TENANTS}


@functools.cache
def admin_token() -> str:
    return tls_material().token("test-admin", ["admin"], seconds=86400)


def service_channel(address: str, service: str, identity: str = "admin", token: str | None = "admin") -> grpc.Channel:
    """A channel to an internal service with `identity`'s certificate; by
    default the admin certificate with an admin token (allowed everything)."""
    if token == "admin":
        token = admin_token()
    return tls_material().security(identity).channel(address, service, token=token)


def gateway_channel(address: str, token: str | None = "admin") -> grpc.Channel:
    """A channel to the gateway's public port: TLS checked against the test CA, with a token."""
    from recsys_core.rpc.transport import client_channel

    if token == "admin":
        token = admin_token()
    return client_channel(address, ca=str(tls_material().ca), token=token, server_name="gateway")


def channel_to(name: str, address: str) -> grpc.Channel:
    return gateway_channel(address) if name == "gateway" else service_channel(address, name)


@pytest.fixture(scope="session")
def exported_encoder():
    """The pretrained encoder exported to model_repo/ (make setup does it; a
    bare pytest run does it here)."""
    try:
        return latest_version_dir()
    except FileNotFoundError:
        from recsys_core.models import export

        export.main([])
        return latest_version_dir()


@pytest.fixture(scope="session")
def exported_review_classifier():
    """The review classifier exported to model_repo/ (make setup trains it
    with the quick recipe; a bare pytest run does it here). Triton loads every
    model of the repository, so it needs this before it starts."""
    from recsys_core.models import review_classifier

    try:
        return review_classifier.latest_version_dir()
    except FileNotFoundError:
        from training import reviews

        assert reviews.train_main(["--quick"]) == 0
        return review_classifier.latest_version_dir()


@pytest.fixture(scope="session")
def triton_server(exported_encoder, exported_review_classifier, tmp_path_factory):
    """A real Triton Inference Server on the repo's model repository, shared
    by the session. Tests that stop a Triton start their own."""
    from recsys_core.models.triton import TritonServer

    with TritonServer(paths.MODEL_REPO, log_path=tmp_path_factory.mktemp("triton") / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def dataset():
    return shopping.Dataset.load(paths.BUNDLED_DATA_DIR)


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
        """As an admin: the admin certificate and token (the gateway: TLS and the token)."""
        return channel_to(name, getattr(self, name))

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop(None)


@pytest.fixture(scope="session")
def value_model():
    """The churn and lifetime-value model GetProfile serves (make setup trains
    it; a bare pytest run trains it on the bundled retail subset here)."""
    from recsys_core.signals.value import default_artifact_path

    if not default_artifact_path().is_file():
        from training.value import train_value_main

        assert train_value_main([]) == 0
    return default_artifact_path()


def start_stack(triton_url: str, store_path: Path) -> Stack:
    """All four services on the bundled data with the encoder on Triton, as
    `recsys serve` runs them, in this process; the profile's events in `store_path`."""
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
        EmbeddingConfig(address="127.0.0.1:0", encoder="triton", triton_url=triton_url,
                        catalogue_path=str(Path(store_path).parent / "catalogue.sqlite3"), **secured("embedding"))
    ))
    servers["ranking"], ranking = start(create_ranking(RankingConfig(address="127.0.0.1:0", **secured("ranking"))))
    servers["profile"], profile = start(
        create_profile(ProfileConfig(address="127.0.0.1:0", store_path=str(store_path), embedding_address=embedding,
                                     review_triton_url=triton_url, **secured("profile")))
    )
    gateway_config = GatewayConfig(
        address="127.0.0.1:0", profile_address=profile, embedding_address=embedding, ranking_address=ranking,
        **secured("gateway"),
    )
    servers["gateway"], gateway = start(create_gateway(gateway_config))
    return Stack(embedding=embedding, profile=profile, ranking=ranking, gateway=gateway, servers=servers)


@pytest.fixture(scope="session")
def stack(triton_server, value_model, tmp_path_factory):
    """All four services (start_stack), shared by the session, so tests can reach their objects."""
    stack = start_stack(triton_server.grpc_url, tmp_path_factory.mktemp("profile") / "events.sqlite3")
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def gateway_config_for(stack):
    """A gateway configuration wired to the running stack, to vary in tests."""
    from services.gateway.config import GatewayConfig

    base = GatewayConfig(
        address="127.0.0.1:0",
        profile_address=stack.profile,
        embedding_address=stack.embedding,
        ranking_address=stack.ranking,
        **secured("gateway"),
    )
    return lambda **changes: replace(base, **changes)


# -- the profile service's event stores -------------------------------------------

STORE_BACKENDS = ("sqlite", "redis")
# The event-store suite runs on a Redis Cluster too.
STORE_SETUPS = ("sqlite", "redis", "redis-cluster")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port, durable as the Redis store
    requires (AOF, appendfsync always, no RDB), shared by the session; tests
    keep apart by key prefix. Tests that kill a Redis start their own."""
    from recsys_core.store.local_redis import LocalRedis, redis_server_binary

    if redis_server_binary() is None:
        message = "redis-server is not installed: `make setup` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Its `profile` ACL user may use the tests' key prefixes (test:...) too.
    with LocalRedis(tmp_path_factory.mktemp("redis"), profile_keys=("recsys:profile:*", "test:*")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(redis_server, tmp_path_factory):
    """A real Redis Cluster of 3 masters (redis-server with cluster-enabled
    yes, durable as the store requires, the same ACL users), on free loopback
    ports, shared by the session; tests keep apart by key prefix. Needs
    `redis_server` only to skip (fail in CI) without redis-server."""
    from recsys_core.store.local_redis import LocalRedisCluster

    with LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3,
                           profile_keys=("recsys:profile:*", "test:*")) as cluster:
        yield cluster


def unique_redis_prefix() -> str:
    import uuid

    return f"test:{uuid.uuid4().hex[:12]}:"


@dataclass
class StoreOpener:
    """Opens handles on one store's storage: a SQLite file, or a key prefix in Redis."""

    backend: str
    path: str = ""
    redis_url: str = ""
    prefix: str = ""
    redis_mode: str = "single"

    def __post_init__(self):
        self.opened = []

    def __call__(self):
        from services.profile.config import ProfileConfig
        from recsys_core.store.backends import open_store

        store = open_store(ProfileConfig(store=self.backend, store_path=self.path, redis_url=self.redis_url,
                                         redis_prefix=self.prefix, redis_mode=self.redis_mode))
        self.opened.append(store)
        return store


@pytest.fixture(params=STORE_SETUPS)
def open_event_store(request, tmp_path):
    """Opens stores of the parameter's backend on one fresh storage: SQLite,
    one Redis server, a Redis Cluster."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        opener = StoreOpener("redis", redis_url=server.url, prefix=unique_redis_prefix())
    elif request.param == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        opener = StoreOpener("redis", redis_url=cluster.url, prefix=unique_redis_prefix(), redis_mode="cluster")
    else:
        opener = StoreOpener("sqlite", path=str(tmp_path / "events.sqlite3"))
    yield opener
    for store in opener.opened:
        store.close()


@pytest.fixture
def event_store(open_event_store):
    """A fresh, empty event store: once SQLite, once Redis, once a Redis Cluster."""
    return open_event_store()


@pytest.fixture(scope="session", params=STORE_BACKENDS)
def profile_backend(request, stack):
    """The address of a profile service on the bundled data, once per store
    backend: the stack's own (SQLite), and one on the session's Redis."""
    if request.param == "sqlite":
        yield stack.profile
        return
    from services.profile.config import ProfileConfig
    from services.profile.server import create_server as create_profile

    server = request.getfixturevalue("redis_server")
    # Without the retail set: its 6.9 million co-purchase counts take minutes
    # to load into Redis, and no test here reads retail shoppers.
    config = ProfileConfig(address="127.0.0.1:0", store="redis", redis_url=server.url,
                           redis_prefix=unique_redis_prefix(), embedding_address=stack.embedding,
                           retail_dir="", **secured("profile"))
    profile, address = start(create_profile(config))
    yield address
    profile.stop(None)
