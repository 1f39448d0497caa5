"""Domain errors. Each maps to exactly one gRPC status in recsys_core.rpc.grpc_util;
domain code raises these and never imports grpc."""
from __future__ import annotations

import re


class RecsysError(Exception):
    """Base class: a failure the caller should hear about as a clear status."""


class InvalidArgument(RecsysError):
    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")


class NotFound(RecsysError):
    pass


class Unavailable(RecsysError):
    pass


class ResourceExhausted(RecsysError):
    pass


class PermissionDenied(RecsysError):
    """A known caller asks for something its role does not allow (a new category without admin)."""


class DeadlineExceeded(RecsysError):
    pass


class FailedPrecondition(RecsysError):
    """The request is well formed but the service is not set up to answer it
    (a model version it cannot load): sending it again will not help, fixing
    the configuration will."""


# C0 and C1 control characters (NUL included), and the bidirectional marks,
# embeddings, overrides and isolates that make an id display as another.
_NOT_IN_IDS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def check_id_characters(value: str, field: str) -> str:
    """An id (shopper, item, category) holds no control or bidirectional
    character: they corrupt logs and terminals and let one id pose as another."""
    found = _NOT_IN_IDS.search(value)
    if found is not None:
        raise InvalidArgument(field, f"holds the control or bidirectional character U+{ord(found.group()):04X} "
                                     f"at position {found.start()}")
    return value


def quoted(value: str, limit: int = 64) -> str:
    """What an error message may show of a rejected value: an escaped prefix.
    The whole value could be megabytes, overflowing the caller's metadata
    limit, or carry characters that rewrite the reader's terminal."""
    if len(value) <= limit:
        return ascii(value)
    return f"{ascii(value[:limit])}... ({len(value):,} characters)"
