"""The guard of `recsys train`: a trained model is served only where it
beats what serving answers without one.

Without a model the profile service forms the shopper's query from the
pretrained encoder's vectors, long- and short-term interest mixed by the
drift score ("zero-shot, drift-aware query" in docs/results.md;
training/interests_eval.py scores it offline). After training, both are
scored on the split's validation targets; unless the trained model's best
epoch is above the untrained path on Recall@10 and NDCG@10 alike, each
difference's 95 % paired bootstrap interval above zero, the model
directory falls back: its weights are reset to the untrained start (the
pretrained encoder and the zero-shot recency mix, no ID vectors' effect)
and its manifest's `guard.serve_model` is false, which `recsys serve
--model` reads to serve the untrained path (recsys_core/models/model_serving.py,
`serves_model`) and `recsys evaluate --model` to score it. So a default
`recsys train` on a category it suits badly never makes serving worse than
serving without it, and says so.
"""
from __future__ import annotations

import numpy as np

from recsys_core.signals.interests import DriftSettings
from training import interests_eval, protocol

UNTRAINED_PATH = "pretrained encoder, drift-aware query (what serving answers without a model)"
METRICS = ("recall@10", "ndcg@10")


def untrained_scorer(split: protocol.CategorySplit, items, vectors: np.ndarray):
    """The untrained serving path's scorer over `vectors` (the pretrained
    encoder's, one unit row per split item)."""
    return interests_eval.query_scorer(interests_eval.workload_with(split, items, vectors), DriftSettings())


def untrained_valid(split: protocol.CategorySplit, items, vectors: np.ndarray) -> dict[str, float]:
    return protocol.metrics_from_ranks(untrained_ranks(split, items, vectors))


def untrained_ranks(split: protocol.CategorySplit, items, vectors: np.ndarray) -> np.ndarray:
    return protocol.target_ranks(untrained_scorer(split, items, vectors), split.inputs("valid"),
                                 split.targets("valid"))


def compare(trained_ranks: np.ndarray, baseline_ranks: np.ndarray) -> dict:
    """`decide`'s arguments from both sides' validation ranks, shopper by shopper."""
    return dict(trained=protocol.metrics_from_ranks(trained_ranks),
                untrained=protocol.metrics_from_ranks(baseline_ranks),
                difference=interests_eval.paired_difference(trained_ranks, baseline_ranks))


def decide(trained: dict[str, float], untrained: dict[str, float], difference: dict | None = None) -> dict:
    """The manifest's `guard` entry: serve the trained model only if its
    validation figures beat the untrained path's on every metric of METRICS
    (ties fall back: a model no better is not worth serving) and, given the
    paired `difference` (interests_eval.paired_difference), the 95 % interval
    of each difference lies above zero. Without that a small category's
    validation noise decides: on the bundled Sports subset (796 shoppers)
    the model led on validation by 0.0012 NDCG@10 and trailed the untrained
    path on test by 0.0134."""
    beats = bool(trained) and all(trained[m] > untrained[m] for m in METRICS)
    if difference is not None:
        beats = beats and all(difference[m]["ci95"][0] > 0 for m in METRICS)
    return {
        "decision": "trained" if beats else "untrained",
        "serve_model": beats,
        "untrained_path": UNTRAINED_PATH,
        "rule": "serve the trained model only if its best validation " + " and ".join(METRICS)
                + " are both above the untrained path's, each paired difference's 95 % bootstrap interval above 0",
        "valid": {"trained": {m: trained.get(m) for m in METRICS},
                  "untrained": {m: untrained[m] for m in METRICS}},
        **({"difference": {m: difference[m] for m in METRICS}} if difference is not None else {}),
    }


def describe(guard: dict) -> str:
    trained, untrained = guard["valid"]["trained"], guard["valid"]["untrained"]

    def figures(m: dict) -> str:
        return " / ".join("-" if m[k] is None else f"{m[k]:.4f}" for k in METRICS)

    verdict = ("serving the trained model" if guard["serve_model"] else
               "NOT serving the trained model: the directory falls back to the untrained serving path")
    return (f"guard: validation {'/'.join(METRICS)} trained {figures(trained)}, untrained path "
            f"{figures(untrained)}: {verdict}")
