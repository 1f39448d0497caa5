"""Domain errors. Each maps to exactly one gRPC status in recsys_core.rpc.grpc_util;
domain code raises these and never imports grpc."""
from __future__ import annotations


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


class DeadlineExceeded(RecsysError):
    pass
