"""recsys-edge (edge/main.go) in front of the session's real gateway: calls and
their status codes pass through, and an oversized request is refused from its
length prefix before its body is sent (what grpcio, reading bodies whole, cannot)."""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from recsys.profile.v1 import profile_pb2
from recsys_cli.edge import EdgeUnavailable, edge_binary
from recsys_core.rpc.transport import client_channel
from tests.conftest import admin_token, tls_material

RECOMMEND = "/recsys.gateway.v1.GatewayService/Recommend"
LIMIT = 64 << 10
# A shopper of the bundled data with a long history.
SHOPPER = "A2V5R832QCSOMX"


@pytest.fixture(scope="module")
def binary():
    try:
        return edge_binary()
    except EdgeUnavailable as error:
        pytest.fail(f"recsys-edge could not be built: {error}")


def start_edge(binary, environment: dict[str, str]) -> tuple[subprocess.Popen, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGE_")}
    env.update(environment)
    process = subprocess.Popen([str(binary)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("recsys-edge listening on "):
        process.kill()
        raise AssertionError(f"the edge did not start: {line!r} {process.stderr.read()[-2000:]}")
    return process, line.split()[3]


@pytest.fixture(scope="module")
def edge(binary, stack):
    """Plaintext on loopback (raw HTTP/2 frames below), TLS to the gateway checked against the test CA."""
    process, address = start_edge(binary, {
        "EDGE_ADDRESS": "127.0.0.1:0", "EDGE_INSECURE": "1", "EDGE_UPSTREAM": stack.gateway,
        "EDGE_UPSTREAM_CA": str(tls_material().ca), "EDGE_MAX_REQUEST_BYTES": str(LIMIT),
        "EDGE_DRAIN_DELAY_SECONDS": "0"})
    yield address
    process.terminate()
    assert process.wait(15) == 0, process.stderr.read()[-2000:]


def stub_for(address: str, token: str | None):
    channel = client_channel(address, plaintext=True, token=token, options=[("grpc.max_send_message_length", 64 << 20)])
    return channel, gateway_pb2_grpc.GatewayServiceStub(channel)


def test_calls_and_their_status_codes_pass_through(edge):
    admin = admin_token()
    channel, stub = stub_for(edge, admin)
    with channel:
        reply = stub.Recommend(gateway_pb2.RecommendRequest(user_id=SHOPPER, k=5), timeout=30)
        assert len(reply.items) == 5
        with pytest.raises(grpc.RpcError) as bad:
            stub.Recommend(gateway_pb2.RecommendRequest(user_id="bad\x00id", k=5), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "U+0000" in bad.value.details()
        # Under the edge's limit, over the method's own: the gateway's refusal, passed on.
        with pytest.raises(grpc.RpcError) as large:
            stub.GetProfile(profile_pb2.GetProfileRequest(user_id="x" * 5000), timeout=10)
        assert large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "GetProfile" in large.value.details()
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    channel, stub = stub_for(edge, None)
    with channel, pytest.raises(grpc.RpcError) as anonymous:
        stub.Recommend(gateway_pb2.RecommendRequest(user_id=SHOPPER, k=5), timeout=10)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_oversized_request_gets_resource_exhausted_naming_the_limit(edge):
    channel, stub = stub_for(edge, admin_token())
    with channel:
        for size in (LIMIT + 1, 8 << 20):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Recommend(gateway_pb2.RecommendRequest(user_id=SHOPPER, k=5,
                                                            context_item_ids=["B" * 1023] * (size // 1024)), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"takes at most {LIMIT} (EDGE_MAX_REQUEST_BYTES)" in refused.value.details()
        assert len(stub.Recommend(gateway_pb2.RecommendRequest(user_id=SHOPPER, k=3), timeout=30).items) == 3


# -- raw HTTP/2: a caller that announces 8 MiB and sends 1 KiB ------------------------

def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK: a literal header field without indexing, new name, no Huffman (lengths < 127)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


# A Recommend's request headers, with the stream left open (END_HEADERS only).
RECOMMEND_HEADERS = b"".join(_literal(name, value) for name, value in (
    (b":method", b"POST"), (b":scheme", b"http"), (b":path", RECOMMEND.encode()),
    (b":authority", b"edge"), (b"content-type", b"application/grpc"), (b"te", b"trailers")))


@contextlib.contextmanager
def raw_connection(edge: str):
    """A plaintext HTTP/2 connection to the edge, its preface and SETTINGS sent."""
    host, port = edge.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.settimeout(5)
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
        yield sock


def _read_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """The next frame other than the edge's SETTINGS, which is acknowledged."""
    while True:
        kind, flags, stream, payload = _one_frame(sock)
        if kind == 4 and not flags & 0x1:
            sock.sendall(_frame(4, 0x1, 0, b""))  # SETTINGS ACK
            continue
        return kind, flags, stream, payload


def _one_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the edge closed the connection")
            data += chunk
        return data

    header = exactly(9)
    length = int.from_bytes(header[:3], "big")
    return header[3], header[4], int.from_bytes(header[5:9], "big") & 0x7FFFFFFF, exactly(length)


def test_the_refusal_comes_from_the_prefix_while_the_body_is_still_unsent(edge):
    """Were the edge to read the body before judging it, this call, whose
    body never comes, would get no answer at all."""
    with raw_connection(edge) as sock:
        sock.sendall(_frame(1, 0x4, 1, RECOMMEND_HEADERS)
                     + _frame(0, 0, 1, b"\x00" + struct.pack(">I", 8 << 20) + b"B" * 1024))
        begin, answered = time.monotonic(), set()
        while not {"headers", "reset"} <= answered:
            try:
                kind, flags, stream, payload = _read_frame(sock)
            except socket.timeout:
                pytest.fail(f"no answer {time.monotonic() - begin:.1f} s after an 8 MiB prefix and 1 KiB of body "
                            f"(seen: {answered or 'nothing'}): the edge waits for the body")
            if kind == 1 and stream == 1:
                assert flags & 0x1, "a trailers-only answer ends the stream in its HEADERS frame"
                answered.add("headers")
            elif kind == 3 and stream == 1:
                # RST_STREAM: the caller is told to stop sending the rest.
                answered.add("reset")
            elif kind == 7:
                pytest.fail(f"GOAWAY instead of a refusal of the one stream: {payload!r}")


def test_the_edge_refuses_to_start_without_tls_or_an_explicit_plaintext_flag(binary):
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGE_")}
    run = subprocess.run([str(binary)], env={**env, "EDGE_ADDRESS": "127.0.0.1:0", "EDGE_MAX_REQUEST_BYTES": "0"},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert "EDGE_TLS_CERT" in run.stderr and "EDGE_MAX_REQUEST_BYTES=\"0\"" in run.stderr


def test_garbage_through_the_edge_gets_no_internal_or_unknown_and_the_edge_keeps_serving(edge):
    """Random bodies of every size up to the limit and over it, to every
    public method: whatever the gateway or the edge answers, never INTERNAL
    or UNKNOWN (an edge that answered with a bare HTTP error would give
    UNKNOWN), and a real call still succeeds afterwards."""
    import random

    rng = random.Random(17)
    methods = [f"/recsys.gateway.v1.GatewayService/{m.name}"
               for m in gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods]
    codes: dict[grpc.StatusCode, int] = {}
    wrong: list[str] = []
    channel, stub = stub_for(edge, admin_token())
    with channel:
        calls = [channel.unary_unary(m, request_serializer=lambda b: b, response_deserializer=lambda b: b)
                 for m in methods]
        futures = []
        for n in range(240):
            size = rng.choice((0, 1, 7, 300, 4096, LIMIT, LIMIT + 1, 300_000))
            futures.append(calls[n % len(calls)].future(rng.randbytes(size), timeout=20))
        for future in futures:
            try:
                future.result()
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    wrong.append(f"{code.name}: {error.details()}")
            codes[code] = codes.get(code, 0) + 1
        assert not wrong, (codes, sorted(set(wrong)))
        assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) > 0, codes
        assert len(stub.Recommend(gateway_pb2.RecommendRequest(user_id=SHOPPER, k=3), timeout=30).items) == 3


def test_a_request_cut_inside_its_prefix_is_refused_and_the_connection_lives_on(edge):
    with raw_connection(edge) as sock:
        for stream in (1, 3):
            # Three bytes of a five-byte prefix, then the end of the stream.
            sock.sendall(_frame(1, 0x4, stream, RECOMMEND_HEADERS) + _frame(0, 0x1, stream, b"\x00\x00\x01"))
            while True:
                kind, flags, got, _ = _read_frame(sock)
                assert kind != 7, "GOAWAY: the connection was dropped for one bad stream"
                if kind == 1 and got == stream:
                    assert flags & 0x1
                    break
