"""What the learned ranker adds to one Rank call: the ranking service's two
scoring paths timed on the same requests, in one process.

    python bench/ranking_model.py MODEL [--data DIR] [--category Beauty]
                                  [--requests N] [--json OUT]

The requests are real: each shopper's test-position candidate pool as
`recsys train-ranker` builds it (as the gateway pools it), turned into what
a Rank request carries. Timed per request: `scoring.score_features` (hand
weights) and `learned.score_learned` (feature rows plus the Booster), each
p50/p99 over the same requests. The whole-stack effect on Recommend's p99
is bench/recommend.py with and without --ranking-model MODEL; both belong
on a quiet machine (docs/performance.md, "Learned ranker").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    from recsys_core.data import paths, shopping
    from recsys_core.ranking.learned import LearnedRanker, score_learned
    from recsys_core.ranking.scoring import SERVING_WEIGHTS, score_features
    from training import ranker
    from training.items import default_encoder, split_item_vectors

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a model file written by `recsys train-ranker`")
    parser.add_argument("--data", type=Path, default=paths.BUNDLED_DATA_DIR)
    parser.add_argument("--category", default="Beauty")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model = LearnedRanker.load(args.model)
    dataset = shopping.Dataset.load(args.data)
    encoder = default_encoder()
    category = ranker.prepare(dataset, args.category,
                              lambda split: split_item_vectors(split, dataset.items, encoder, False))
    rows = list(range(min(args.requests, len(category.split.users))))
    pools = category.pools("test", rows)
    timings = {"hand_weights": [], "learned": []}
    for features, popularity, most, drift, co_purchases in pools.inputs:
        started = time.perf_counter()
        score_features(features, popularity, most, SERVING_WEIGHTS, drift, None, co_purchases)
        middle = time.perf_counter()
        score_learned(model, features, popularity, most, drift, None, co_purchases)
        timings["hand_weights"].append(middle - started)
        timings["learned"].append(time.perf_counter() - middle)
    report = {"model": str(args.model), "data": str(args.data), "category": args.category, "requests": len(rows),
              "mean_candidates": round(float(np.mean([len(c) for c in pools.candidates])), 1),
              **{name: {"p50_ms": round(float(np.percentile(t, 50)) * 1e3, 3),
                        "p99_ms": round(float(np.percentile(t, 99)) * 1e3, 3)} for name, t in timings.items()}}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
