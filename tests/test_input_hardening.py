"""Bad input is refused cleanly (issue #17, part 3, the parts done so far):
undecodable bodies, control and bidirectional characters in ids, NaN and
infinite numbers, and error messages that quote only a short prefix."""
import logging

import grpc
import numpy as np
import pytest

from recsys.common.v1 import common_pb2
from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recsys_core.errors import InvalidArgument, check_id_characters, quoted
from recsys_core.rpc.messages import from_vector, to_vector
from services.gateway import requests as rq
from tests.conftest import secured, service_channel, start

RANK = "/recsys.ranking.v1.RankingService/Rank"


@pytest.mark.parametrize("bad, code_point", [
    ("A\x00B", 0x00), ("user\x1b[31m", 0x1B), ("abc\x7f", 0x7F), ("x\u202eexe.txt", 0x202E),
    ("\u2066id", 0x2066), ("id\u200f", 0x200F), ("a\x85b", 0x85),
])
def test_ids_with_control_or_bidirectional_characters_are_refused(bad, code_point):
    with pytest.raises(InvalidArgument, match=f"user_id: holds the control or bidirectional character U\\+{code_point:04X}"):
        rq.check_user_id(bad)
    with pytest.raises(InvalidArgument, match="item_id"):
        rq.check_item_id(bad, "item_id")


def test_ordinary_ids_pass_unicode_letters_included():
    for good in ("A2V5R832QCSOMX", "retail-13081", "Toys_and_Games", "Café-Crème", "商品-42"):
        assert check_id_characters(good, "id") == good


def test_error_messages_quote_a_short_escaped_prefix():
    assert quoted("Beauty") == "'Beauty'"
    long = "x" * 8_000_000
    shown = quoted(long)
    assert len(shown) < 120 and "8,000,000 characters" in shown
    assert quoted("\x1b[2Jcleared") == "'\\x1b[2Jcleared'"
    with pytest.raises(InvalidArgument) as refused:
        rq.check_categories(["y" * 1_000_000], {"Beauty"})
    assert len(str(refused.value)) < 300


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_infinite_vectors_are_refused(value):
    vector = np.ones(4, dtype=np.float32)
    vector[2] = value
    with pytest.raises(InvalidArgument, match="candidates.embedding: holds NaN or infinite values"):
        from_vector(to_vector(vector), "candidates.embedding")
    assert from_vector(to_vector(np.ones(4, dtype=np.float32))).tolist() == [1.0] * 4


@pytest.fixture(scope="module")
def ranking_address():
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    server, address = start(create_server(RankingConfig(address="127.0.0.1:0", **secured("ranking"))))
    yield address
    server.stop(None)


def test_an_undecodable_body_is_invalid_argument_with_one_log_line(ranking_address, caplog):
    with service_channel(ranking_address, "ranking") as channel:
        raw = channel.unary_unary(RANK, request_serializer=lambda body: body, response_deserializer=lambda body: body)
        with caplog.at_level(logging.WARNING, logger="recsys_core.rpc.grpc_util"):
            for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01garbage", bytes(range(256))):
                with pytest.raises(grpc.RpcError) as refused:
                    raw(garbage, timeout=5)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
                assert refused.value.details() == "the request body is not a valid Rank request"
        lines = [r for r in caplog.records if "undecodable request body" in r.getMessage()]
        assert len(lines) == 3 and all(r.exc_info is None for r in lines)
        # The server still answers well-formed calls.
        reply = ranking_pb2_grpc.RankingServiceStub(channel).Rank(
            ranking_pb2.RankRequest(candidates=[ranking_pb2.Candidate(item_id="a", features=common_pb2.CandidateFeatures())]),
            timeout=5)
        assert [c.item_id for c in reply.candidates] == ["a"]
