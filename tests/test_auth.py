"""Transport security and authorisation: every method of every service,
tried by callers that must be refused, on real servers with real certificates.

The matrix (test_every_method_refuses_*): no credentials, a wrong shopper, a
wrong tenant, a forged identity (a certificate from another CA, a token
signed with another key, or a valid certificate of a service the method does
not admit). Each must be refused: UNAUTHENTICATED or PERMISSION_DENIED from
the access rules, or, for a certificate our CA did not sign, no connection at
all (the TLS handshake fails: UNAVAILABLE, and no handler runs).
"""
from __future__ import annotations

import logging
import time

import grpc
import pytest

from recsys.embedding.v1 import embedding_pb2
from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.profile.v1 import profile_pb2
from recsys.ranking.v1 import ranking_pb2
from recsys_core.rpc import access
from recsys_core.rpc.access import RULES, mint_token
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.rpc.transport import Security, client_channel, identity_of
from recsys_cli.stack import free_port
from tests.conftest import TENANTS, admin_token, gateway_channel, secured, service_channel, start, tls_material

pytestmark = pytest.mark.integration

DESCRIPTORS = {
    "gateway": gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
    "profile": profile_pb2.DESCRIPTOR.services_by_name["ProfileService"],
    "embedding": embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"],
    "ranking": ranking_pb2.DESCRIPTOR.services_by_name["RankingService"],
}
OPEN_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
VICTIM = "A2V5R832QCSOMX"  # an Amazon shopper (tenant amazon)
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def every_method():
    for service, descriptor in DESCRIPTORS.items():
        for method in descriptor.methods:
            yield service, method


def full_name(method) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def request_for(method):
    from google.protobuf import message_factory

    message = message_factory.GetMessageClass(method.input_type)()
    if "user_id" in method.input_type.fields_by_name:
        message.user_id = VICTIM
    return message


def call(channel, method, timeout=10):
    """The method's status code when called with a default request naming VICTIM."""
    assert not method.client_streaming and not method.server_streaming, full_name(method)
    from google.protobuf import message_factory

    reply_class = message_factory.GetMessageClass(method.output_type)
    stub = channel.unary_unary(full_name(method), request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=reply_class.FromString)
    try:
        stub(request_for(method), timeout=timeout)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# -- the rule table -------------------------------------------------------------------


def test_every_method_of_every_service_has_a_rule():
    """Deny by default: an RPC added to a proto stays refused until it has a
    line in access.RULES; this names any that has none."""
    missing = [full_name(method) for _, method in every_method() if full_name(method) not in RULES]
    assert not missing, f"methods without an access rule (refused by default): {missing}"


def test_only_health_is_open_and_no_internal_method_admits_tokens_but_admins():
    open_methods = {name for name, rule in RULES.items() if rule.open}
    assert open_methods == {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                            "/grpc.health.v1.Health/List"}
    for service, method in every_method():
        rule = RULES[full_name(method)]
        if service != "gateway":
            assert rule.services and not (rule.shopper_field or rule.shopper_tokens or rule.service_tokens
                                          or rule.any_caller), full_name(method)
    for write in ("/recsys.profile.v1.ProfileService/IngestEvents", "/recsys.embedding.v1.EmbeddingService/UpsertItems"):
        assert not RULES[write].services & {"gateway", "profile", "embedding", "ranking"}


def test_identity_is_the_spiffe_id_of_our_trust_domain():
    assert identity_of(b"spiffe://recsys/gateway") == "gateway"
    assert identity_of("spiffe://other/gateway") is None
    assert identity_of("spiffe://recsys/a/b") is None
    assert identity_of(None) is None


def test_services_refuse_to_start_without_certificates():
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    with pytest.raises(ConfigError, match="RANKING_TLS_DIR.*RANKING_INSECURE=1"):
        create_server(RankingConfig(address="127.0.0.1:0"))
    with pytest.raises(ConfigError, match="INSECURE=1 and RANKING_TLS"):
        RankingConfig.from_env({"RANKING_INSECURE": "1", "RANKING_TLS_DIR": "/x"})
    config = RankingConfig.from_env({"RANKING_TLS_DIR": "/nonexistent"})
    with pytest.raises(ConfigError, match="cannot read"):
        create_server(config)


def test_the_gateway_refuses_to_start_without_a_token_key():
    from services.gateway.config import GatewayConfig
    from services.gateway.server import create_server

    with pytest.raises(ConfigError, match="GATEWAY_AUTH_JWT_KEY_FILE"):
        create_server(GatewayConfig(address="127.0.0.1:0", security=tls_material().security("gateway")))


# -- servers for the matrix: the four services, nothing loaded -----------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The four services with the test CA's certificates, on nothing: the
    access rules answer before any servicer, so no data needs loading; an
    allowed call reaches the servicer and gets what it gets (UNAVAILABLE
    while loading, INVALID_ARGUMENT, ...), never a refusal."""
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import create_server as create_embedding
    from services.gateway.config import GatewayConfig
    from services.gateway.server import create_server as create_gateway
    from services.profile.config import ProfileConfig
    from services.profile.server import create_server as create_profile
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server as create_ranking

    nowhere = f"127.0.0.1:{free_port()}"
    health_port = free_port()
    made = {
        "ranking": create_ranking(RankingConfig(address="127.0.0.1:0", health_port=health_port,
                                                **secured("ranking", reflection=False))),
        "profile": create_profile(ProfileConfig(
            address="127.0.0.1:0", store_path=str(tmp_path_factory.mktemp("auth") / "e.sqlite3"), data_dir="",
            retail_dir="", embedding_address=nowhere, **secured("profile", reflection=False))),
        "embedding": create_embedding(EmbeddingConfig(
            address="127.0.0.1:0", data_dir="", retail_dir="", encoder="triton", triton_url=nowhere,
            catalogue_path=str(tmp_path_factory.mktemp("auth") / "catalogue.sqlite3"),
            **secured("embedding", reflection=False))),
        "gateway": create_gateway(GatewayConfig(
            address="127.0.0.1:0", profile_address=nowhere, embedding_address=nowhere, ranking_address=nowhere,
            startup_timeout_seconds=1, **secured("gateway", reflection=False))),
    }
    addresses = {"ranking-health": f"127.0.0.1:{health_port}"}
    for name, (server, port) in made.items():
        server.start()
        addresses[name] = f"127.0.0.1:{port}"
    yield addresses
    for server, _ in made.values():
        server.stop(None)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A second CA with certificates for the very same names: a forger's."""
    from recsys_cli.certs import LocalSecurity, make_certs

    directory = tmp_path_factory.mktemp("forged")
    make_certs(directory, ca_name="recsys local CA")  # same CA name, other key
    return LocalSecurity(directory)


def tokens():
    material = tls_material()
    return {
        "victim": material.token(VICTIM, ["shopper"], tenant="amazon"),
        "other shopper": material.token("A1OTHERSHOPPER", ["shopper"], tenant="amazon"),
        "retail service": material.token("retail-backend", ["service"], tenant="retail"),
        "amazon service": material.token("amazon-backend", ["service"], tenant="amazon"),
        "admin": admin_token(),
    }


def channel(servers, service, identity="admin", token=None):
    if service == "gateway":
        return gateway_channel(servers["gateway"], token=token)
    return service_channel(servers[service], service, identity=identity, token=token)


METHODS = [pytest.param(s, m, id=f"{s}.{m.name}") for s, m in every_method()]


@pytest.mark.parametrize("service,method", METHODS)
def test_every_method_refuses_a_caller_without_credentials(servers, service, method):
    if service == "gateway":
        with gateway_channel(servers["gateway"], token=None) as ch:
            assert call(ch, method) == grpc.StatusCode.UNAUTHENTICATED
        return
    # No client certificate: the handshake itself fails.
    with client_channel(servers[service], ca=str(tls_material().ca), server_name=service) as ch:
        assert call(ch, method) == grpc.StatusCode.UNAVAILABLE
    # A certificate of our CA that is no service's, and no token.
    with channel(servers, service, identity="admin") as ch:
        assert call(ch, method) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("service,method", METHODS)
def test_every_method_refuses_a_wrong_shopper(servers, service, method):
    """Another shopper's token (valid, tenant amazon) never reads the victim's data."""
    rule = RULES[full_name(method)]
    with channel(servers, service, token=tokens()["other shopper"]) as ch:
        code = call(ch, method)
    if service == "gateway" and rule.shopper_tokens:
        assert not rule.shopper_field  # no shopper's data: any shopper may ask
        assert code not in OPEN_CODES
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("service,method", METHODS)
def test_every_method_refuses_a_wrong_tenant(servers, service, method):
    """A service token of tenant retail never reads an amazon shopper's data."""
    rule = RULES[full_name(method)]
    with channel(servers, service, token=tokens()["retail service"]) as ch:
        code = call(ch, method)
    if service == "gateway" and rule.service_tokens:
        assert not rule.shopper_field
        assert code not in OPEN_CODES
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("service,method", METHODS)
def test_every_method_refuses_a_forged_identity(servers, service, method, other_ca):
    if service == "gateway":
        # A token signed with another key, and an admin token signed with it.
        forged = mint_token(other_ca.jwt_key.read_bytes(), "mallory", ["admin"])
        with gateway_channel(servers["gateway"], token=forged) as ch:
            assert call(ch, method) == grpc.StatusCode.UNAUTHENTICATED
        import jwt

        unsigned = jwt.encode({"sub": "mallory", "roles": ["admin"], "aud": "recsys", "exp": int(time.time()) + 600},
                              None, algorithm="none")
        with gateway_channel(servers["gateway"], token=unsigned) as ch:
            assert call(ch, method) == grpc.StatusCode.UNAUTHENTICATED
        return
    # The right name, another CA: no connection.
    forged = other_ca.security("gateway").channel(servers[service], service, options=[("grpc.max_reconnect_backoff_ms", 500)])
    with forged as ch:
        assert call(ch, method, timeout=5) == grpc.StatusCode.UNAVAILABLE
    # Valid certificates of every service the method does not admit.
    rule = RULES[full_name(method)]
    for identity in ("gateway", "profile", "embedding", "ranking", "ingest", "catalogue"):
        if identity in rule.services:
            continue
        with channel(servers, service, identity=identity) as ch:
            assert call(ch, method) == grpc.StatusCode.PERMISSION_DENIED, identity


@pytest.mark.parametrize("service,method", METHODS)
def test_every_method_lets_its_allowed_callers_through(servers, service, method):
    """The other side: an admin, and each admitted service or token, pass the rules."""
    rule = RULES[full_name(method)]
    with channel(servers, service, token=admin_token()) as ch:
        assert call(ch, method) not in OPEN_CODES
    for identity in rule.services:
        with channel(servers, service, identity=identity) as ch:
            assert call(ch, method) not in OPEN_CODES, identity
    if rule.shopper_field:
        for who in ("victim", "amazon service") if rule.tenant_services else ("victim",):
            with channel(servers, service, token=tokens()[who]) as ch:
                assert call(ch, method) not in OPEN_CODES, who
        if not rule.tenant_services:
            # Only the shopper themselves: not even a service of their own tenant.
            with channel(servers, service, token=tokens()["amazon service"]) as ch:
                assert call(ch, method) == grpc.StatusCode.PERMISSION_DENIED


def test_bad_tokens_are_unauthenticated(servers):
    material = tls_material()
    key = material.jwt_key.read_bytes()
    method = DESCRIPTORS["gateway"].methods_by_name["Recommend"]
    bad = {
        "expired": mint_token(key, VICTIM, ["shopper"], tenant="amazon", seconds=-120),
        "wrong audience": mint_token(key, VICTIM, ["shopper"], tenant="amazon", audience="other"),
        "unknown role": mint_token(key, VICTIM, ["superuser"], tenant="amazon"),
        "garbage": "not-a-token",
    }
    for what, token in bad.items():
        with gateway_channel(servers["gateway"], token=token) as ch:
            assert call(ch, method) == grpc.StatusCode.UNAUTHENTICATED, what
    with client_channel(servers["gateway"], ca=str(material.ca), server_name="gateway") as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        with pytest.raises(grpc.RpcError) as error:
            stub.Recommend(gateway_pb2.RecommendRequest(user_id=VICTIM, k=5), timeout=5,
                           metadata=[("authorization", "Basic dXNlcjpwYXNz")])
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_denial_is_logged_once_with_caller_and_method_and_no_token(servers, caplog):
    token = tokens()["other shopper"]
    method = DESCRIPTORS["gateway"].methods_by_name["GetProfile"]
    with caplog.at_level(logging.WARNING, logger="recsys_core.rpc.access"):
        with gateway_channel(servers["gateway"], token=token) as ch:
            assert call(ch, method) == grpc.StatusCode.PERMISSION_DENIED
        time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "recsys_core.rpc.access"]
    assert len(lines) == 1, lines
    assert "/recsys.gateway.v1.GatewayService/GetProfile" in lines[0] and "A1OTHERSHOPPER" in lines[0]
    assert "PERMISSION_DENIED" in lines[0] and token not in lines[0] and token.split(".")[2] not in lines[0]


def test_health_stays_open_and_reflection_is_off_by_default(servers):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with gateway_channel(servers["gateway"], token=None) as ch:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        with pytest.raises(grpc.RpcError) as error:
            list(replies)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_api_keys_map_to_principals(tmp_path):
    import json

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"sha256": access.api_key_digest("s3cret-key"), "sub": "shop", "tenant": "retail",
                                 "roles": ["service"]}]))
    authenticator = access.Authenticator(access.AuthConfig(api_keys_file=str(keys), tenants=TENANTS))
    principal = authenticator.authenticate({"x-api-key": "s3cret-key"})
    assert principal == access.Principal("shop", "retail", frozenset({"service"}), via="api-key")
    with pytest.raises(access.Unauthenticated):
        authenticator.authenticate({"x-api-key": "guess"})
    assert authenticator.tenant_of("retail-123") == "retail" and authenticator.tenant_of("A1") == "amazon"


def test_plaintext_is_explicit_and_still_checks_rules(tmp_path):
    """Development mode: no TLS, callers declare who they are; the rules still apply."""
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    server, address = start(create_server(RankingConfig(address="127.0.0.1:0", security=Security.plaintext("ranking"))))
    try:
        method = DESCRIPTORS["ranking"].methods_by_name["Rank"]
        with Security.plaintext("gateway").channel(address, "ranking") as ch:
            assert call(ch, method) not in OPEN_CODES
        with Security.plaintext("profile").channel(address, "ranking") as ch:
            assert call(ch, method) == grpc.StatusCode.PERMISSION_DENIED
        with grpc.insecure_channel(address) as ch:
            assert call(ch, method) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)


def test_the_health_port_serves_health_alone_in_plaintext(servers):
    """Kubernetes' gRPC probes speak no TLS: a second port answers health, and nothing else."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(servers["ranking-health"]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert call(ch, DESCRIPTORS["ranking"].methods_by_name["Rank"]) == grpc.StatusCode.UNIMPLEMENTED


def test_rs256_tokens_are_checked_with_the_public_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "jwt.pub"
    public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    authenticator = access.Authenticator(access.AuthConfig(jwt_key_file=str(public), jwt_algorithm="RS256"))
    token = mint_token(private, "shop", ["service"], tenant="retail", algorithm="RS256")
    assert authenticator.authenticate({"authorization": f"Bearer {token}"}).tenant == "retail"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(access.Unauthenticated):
        authenticator.authenticate({"authorization": f"Bearer {mint_token(other, 'shop', ['admin'], algorithm='RS256')}"})
    # An HS256 token made with the public key as its secret (algorithm confusion) is refused.
    import jwt

    with pytest.raises(Exception):
        confused = jwt.encode({"sub": "x", "roles": ["admin"], "aud": "recsys", "exp": int(time.time()) + 60},
                              public.read_bytes(), algorithm="HS256")
        authenticator.authenticate({"authorization": f"Bearer {confused}"})
