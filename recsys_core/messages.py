"""Conversions between protobuf messages and numpy, shared by every service."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.common.v1 import common_pb2


def to_vector(values: np.ndarray) -> common_pb2.Vector:
    return common_pb2.Vector(values=np.asarray(values, dtype=np.float32).tolist())


def from_vector(vector: common_pb2.Vector) -> np.ndarray:
    return np.asarray(vector.values, dtype=np.float32)


def has_values(vector: common_pb2.Vector) -> bool:
    return len(vector.values) > 0


def stack(vectors: Sequence[common_pb2.Vector]) -> list[list[float]]:
    return [list(v.values) for v in vectors]
