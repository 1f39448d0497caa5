"""Offline evaluation and training on the published benchmark protocol."""
