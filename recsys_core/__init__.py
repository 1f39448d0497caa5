"""Shared, gRPC-agnostic building blocks of the recommendation platform."""
