"""Conversions between protobuf messages and numpy, shared by every service."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.common.v1 import common_pb2
from recsys_core.errors import InvalidArgument

FLOAT32_LE = np.dtype("<f4")


def to_vector(values: np.ndarray) -> common_pb2.Vector:
    return common_pb2.Vector(float32_le=np.ascontiguousarray(values, dtype=FLOAT32_LE).tobytes())


def from_vector(vector: common_pb2.Vector, field: str = "vector") -> np.ndarray:
    raw = vector.float32_le
    if len(raw) % FLOAT32_LE.itemsize:
        raise InvalidArgument(field, f"float32_le holds {len(raw)} bytes, not a whole number of float32 values")
    values = np.frombuffer(raw, dtype=FLOAT32_LE)
    # A NaN would score every candidate NaN and order them arbitrarily.
    if not np.isfinite(values).all():
        raise InvalidArgument(field, "holds NaN or infinite values")
    return values


def has_values(vector: common_pb2.Vector) -> bool:
    return len(vector.float32_le) > 0


def dimension(vector: common_pb2.Vector) -> int:
    return len(vector.float32_le) // FLOAT32_LE.itemsize


def stack(vectors: Sequence[common_pb2.Vector], field: str) -> np.ndarray:
    """Rows of one matrix; every vector must have the first one's dimension."""
    if not vectors:
        return np.zeros((0, 0), dtype=np.float32)
    rows = [from_vector(v, f"{field}[{i}]") for i, v in enumerate(vectors)]
    width = len(rows[0])
    for position, row in enumerate(rows):
        if len(row) != width:
            raise InvalidArgument(f"{field}[{position}]", f"has {len(row)} values, expected {width}")
    return np.stack(rows).astype(np.float32, copy=False)
