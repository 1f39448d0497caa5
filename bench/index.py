"""The approximate index against the exact one, on real item vectors.

The pretrained encoder's vectors of every catalogue item (from the embedding
cache; encoded once if missing) go into an exact VectorIndex and into one with
the settings given here, as the embedding service builds them (one index per
category plus one over all). Queries are real shoppers' zero-shot interest
vectors: the recency-weighted mix of their history in one category, as
`recsys evaluate --baseline zero-shot` scores (leave-one-out by seq, test
stage), searched within that category with the history excluded, as
Recommend searches. Reported, both indexes in the same run:

- recall@100: the share of the exact top 100 that the approximate search
  returns, within the shopper's category and over all items (global);
- search latency p50/p99 of one query (k=100), alternating exact and approximate;
- Recall@10 / NDCG@10 of the held-out item among the retrieved top 100, per
  category, and the relative change;
- with --sizes, flat vs HNSW on the global index cut to each size (the
  measurement behind the auto threshold).

python bench/index.py --data ../shared/data/amazon-2014 [--kind hnsw] [--ef-search 64,128]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from recsys_core.data import paths, shopping
from recsys_core.index.embedding_cache import EmbeddingCache, encode_cached
from recsys_core.index.kinds import IndexSettings
from recsys_core.index.vector_index import VectorIndex
from training import protocol
from training.baselines import ZERO_SHOT_DECAY, recency_mix
from training.items import default_encoder

K = 100


def catalogue_vectors(items):
    encoder = default_encoder()
    cache = EmbeddingCache(paths.cache_dir(), encoder.fingerprint)
    texts = [t.strip() or title.strip() for t, title in zip(items.text, items.display_title)]
    return encode_cached(encoder, cache, list(items.item_id), texts, show_progress=True)


def shopper_queries(dataset, vector_of, per_category, seed):
    """(category, query vector, history item ids, held-out item id) per sampled shopper."""
    rng = np.random.default_rng(seed)
    out = []
    for category in sorted(dataset.interactions.category.unique()):
        split = protocol.category_split(dataset.interactions, dataset.items, category)
        histories, targets = split.inputs("test"), split.targets("test")
        chosen = rng.permutation(len(histories))[:per_category]
        for user in np.sort(chosen):
            history = [split.item_ids[i] for i in histories[user] if split.item_ids[i] in vector_of]
            target = split.item_ids[targets[user]]
            if not history:
                continue
            query = recency_mix(np.stack([vector_of[i] for i in history]), ZERO_SHOT_DECAY)
            out.append((category, (query / np.linalg.norm(query)).astype(np.float32), history, target))
    return out


def timed_build(settings, ids, categories, vectors):
    faiss.omp_set_num_threads(1)  # as the service runs (EMBEDDING_FAISS_THREADS=1)
    index = VectorIndex(vectors.shape[1], use_gpu=False, settings=settings)
    start = time.perf_counter()
    index.upsert(ids, categories, vectors)
    return index, time.perf_counter() - start


def percentiles(seconds):
    ms = np.asarray(seconds) * 1000
    return round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3)


def compare(exact, approx, queries):
    """Per query: exact and approximate top 100 within its category, history excluded."""
    exact_times, approx_times, recalls = [], [], []
    global_exact, global_approx, global_recalls = [], [], []
    quality = {"exact": {}, "approx": {}}
    for category, query, history, target in queries:
        # Unrestricted, as Recommend searches without categories: the global index.
        start = time.perf_counter()
        truth = exact.search(query, K, (), history)[0]
        global_exact.append(time.perf_counter() - start)
        start = time.perf_counter()
        found = approx.search(query, K, (), history)[0]
        global_approx.append(time.perf_counter() - start)
        global_recalls.append(len({i for i, _ in truth} & {i for i, _ in found}) / max(len(truth), 1))
        start = time.perf_counter()
        truth = exact.search(query, K, [category], history)[0]
        exact_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        found = approx.search(query, K, [category], history)[0]
        approx_times.append(time.perf_counter() - start)
        truth_ids, found_ids = [i for i, _ in truth], [i for i, _ in found]
        recalls.append(len(set(truth_ids) & set(found_ids)) / max(len(truth_ids), 1))
        for name, ranked in (("exact", truth_ids), ("approx", found_ids)):
            rank = ranked.index(target) if target in ranked else K
            quality[name].setdefault(category, []).append(rank)
    metrics = {}
    for name, by_category in quality.items():
        metrics[name] = {}
        for category, ranks in by_category.items():
            ranks = np.asarray(ranks)
            hit = ranks < 10
            metrics[name][category] = {"recall@10": float(hit.mean()),
                                       "ndcg@10": float((hit / np.log2(ranks + 2)).mean()), "users": len(ranks)}
    return {"recall@100": float(np.mean(recalls)), "recall@100_min": float(np.min(recalls)),
            "exact_ms_p50_p99": percentiles(exact_times), "approx_ms_p50_p99": percentiles(approx_times),
            "global_recall@100": float(np.mean(global_recalls)),
            "global_exact_ms_p50_p99": percentiles(global_exact), "global_approx_ms_p50_p99": percentiles(global_approx),
            "quality": metrics}


def size_sweep(ids, vectors, queries, sizes, settings):
    """The global index cut to each size: flat vs HNSW latency and recall (no categories, no exclusions)."""
    rows = []
    query_matrix = np.stack([q for _, q, _, _ in queries[:500]])
    for size in sizes:
        part = slice(0, size)
        cats = ["all"] * size
        flat, flat_build = timed_build(IndexSettings(kind="flat"), ids[part], cats, vectors[part])
        hnsw, hnsw_build = timed_build(IndexSettings(**{**settings.__dict__, "kind": "hnsw"}), ids[part], cats,
                                       vectors[part])
        flat_times, hnsw_times, recalls = [], [], []
        for query in query_matrix:
            start = time.perf_counter()
            truth = flat.search(query, K)[0]
            flat_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            found = hnsw.search(query, K)[0]
            hnsw_times.append(time.perf_counter() - start)
            recalls.append(len({i for i, _ in truth} & {i for i, _ in found}) / K)
        rows.append({"items": size, "flat_build_s": round(flat_build, 2), "hnsw_build_s": round(hnsw_build, 2),
                     "flat_ms_p50_p99": percentiles(flat_times), "hnsw_ms_p50_p99": percentiles(hnsw_times),
                     "recall@100": round(float(np.mean(recalls)), 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=paths.shared_data_dir())
    parser.add_argument("--kind", choices=("auto", "hnsw", "ivfpq"), default="auto")
    parser.add_argument("--ef-search", default=str(IndexSettings().hnsw_ef_search),
                        help="comma-separated HNSW efSearch values, each compared with the exact index")
    parser.add_argument("--nprobe", type=int, default=IndexSettings().ivf_nprobe)
    parser.add_argument("--shoppers", type=int, default=3000, help="sampled shoppers per category")
    parser.add_argument("--sizes", default="", help="comma-separated global index sizes for the flat/HNSW sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    dataset = shopping.Dataset.load(args.data)
    items = dataset.items
    vectors = catalogue_vectors(items)
    ids, categories = list(items.item_id), list(items.category)
    vector_of = dict(zip(ids, vectors))
    queries = shopper_queries(dataset, vector_of, args.shoppers, args.seed)
    print(f"{len(ids)} items, {len(queries)} sampled shoppers' queries", file=sys.stderr)
    report = {"items": len(ids), "queries": len(queries), "categories": dict(items.category.value_counts())}
    report["categories"] = {c: int(n) for c, n in report["categories"].items()}
    if args.sizes:
        report["sizes"] = size_sweep(ids, vectors, queries, [int(s) for s in args.sizes.split(",")], IndexSettings())
    exact, exact_build = timed_build(IndexSettings(kind="flat"), ids, categories, vectors)
    report["exact_build_s"] = round(exact_build, 2)
    report["runs"] = []
    for ef in [int(e) for e in args.ef_search.split(",")]:
        settings = IndexSettings(kind=args.kind, hnsw_ef_search=ef, ivf_nprobe=args.nprobe)
        approx, build_s = timed_build(settings, ids, categories, vectors)
        run = {"kind": args.kind, "ef_search": ef, "nprobe": args.nprobe, "build_s": round(build_s, 2),
               "index_kinds": {str(k): v for k, v in approx.kinds().items()}}
        run.update(compare(exact, approx, queries))
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
