"""Scale curve of the embedding index on synthetic catalogues (part 5).

For each catalogue size a fresh worker process generates synthetic item
vectors, builds the service's VectorIndex over them with its default
settings (EMBEDDING_INDEX=auto: one scope per category plus one over
everything, each choosing flat / HNSW / IVF-PQ by its own size), and reports:

- build time of the whole index (one upsert of the whole catalogue, as the
  embedding service does at start; IVF-PQ training included), which kind each
  scope chose;
- resident memory: before generating the data, after it, after the build with
  the generated input released (anonymous RSS, i.e. what the index holds) and
  the process's peak;
- search latency p50/p99 of one query at a time (k=100, the query's history
  excluded), unrestricted (the global scope) and restricted to the query's
  category, one FAISS thread (the service's EMBEDDING_FAISS_THREADS default);
- recall@100 of those searches against an exact brute-force scan (numpy,
  batched) of the same vectors with the same exclusions and category.

What is measured is the index search, the part of Recommend that grows with
the catalogue, not Recommend through the whole stack.

Synthetic data: uniform random unit vectors in 384-d have no neighbourhood
structure (every item is about equally far from every other), which makes
recall meaningless. Items here are clustered: random unit cluster centres,
each with its own random low-dimensional subspace (--local-dim) along which
its items spread (--spread), plus small isotropic noise (--noise), then
normalised to unit length like the encoder's vectors. Clusters are spread
round-robin over --categories categories. A query is the normalised mean of
--history items of one cluster (a shopper's interest in one kind of thing),
searched with those items excluded, as Recommend excludes the history.

python bench/scale.py --sizes 100000,1000000 --json docs/results/scale.json --plot docs/scale.png
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
from tqdm import tqdm

from recsys_core.index.kinds import IndexSettings
from recsys_core.index.vector_index import VectorIndex

K = 100
DIMENSION = 384  # the pretrained encoder's width
CHUNK = 100_000


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def proc_status_mib(field: str) -> float:
    """VmHWM (peak RSS) or RssAnon (RSS without file-backed pages) from /proc, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- synthetic data ---------------------------------------------------------

def generate(path: Path, size: int, clusters: int, categories: int, args, rng) -> tuple[np.memmap, np.ndarray]:
    """Clustered unit vectors written to a memory-mapped file (so the input
    does not count against the index's anonymous memory), and each item's cluster."""
    centres = rng.standard_normal((clusters, DIMENSION), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Per cluster an orthonormal-ish random basis of a local subspace.
    bases = rng.standard_normal((clusters, args.local_dim, DIMENSION), dtype=np.float32) / np.sqrt(DIMENSION)
    labels = rng.integers(0, clusters, size=size)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(size, DIMENSION))
    for start in tqdm(range(0, size, CHUNK), desc=f"generate {size:,}", unit="chunk", file=sys.stderr):
        part = labels[start:start + CHUNK]
        n = len(part)
        z = rng.standard_normal((n, args.local_dim), dtype=np.float32) * (args.spread / np.sqrt(args.local_dim))
        # Basis rows have norm ~1, so each item's offset along its subspace has norm ~spread.
        local = np.empty((n, DIMENSION), dtype=np.float32)
        order = np.argsort(part, kind="stable")
        bounds = np.flatnonzero(np.diff(part[order])) + 1
        for group in np.split(order, bounds):
            local[group] = z[group] @ bases[part[group[0]]]
        noise = rng.standard_normal((n, DIMENSION), dtype=np.float32) * (args.noise / np.sqrt(DIMENSION))
        block = centres[part] + local + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + n] = block
    out.flush()
    return out, labels


def make_queries(vectors, labels, categories: int, count: int, history: int, rng):
    """(query vector, history rows, category) per query: the mean of a few items of one cluster."""
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(labels.max() + 2))
    queries = []
    for _ in range(count):
        cluster = labels[rng.integers(len(labels))]
        members = order[starts[cluster]:starts[cluster + 1]]
        rows = np.sort(rng.choice(members, size=min(history, len(members)), replace=False))
        query = np.asarray(vectors[rows]).mean(axis=0)
        queries.append(((query / np.linalg.norm(query)).astype(np.float32), rows, f"cat{cluster % categories}"))
    return queries


def exact_top_k(vectors, row_category: np.ndarray, queries, restricted: bool) -> list[np.ndarray]:
    """Exact top-K rows per query by brute force, in row chunks (bounded memory),
    with each query's history excluded and, when restricted, only its category."""
    matrix = np.stack([q for q, _, _ in queries])
    wanted = np.asarray([int(c[3:]) for _, _, c in queries])
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), K), -1, dtype=np.int64)
    for start in tqdm(range(0, len(vectors), CHUNK * 2), desc="exact " + ("category" if restricted else "global"),
                      unit="chunk", file=sys.stderr):
        block = np.asarray(vectors[start:start + CHUNK * 2])
        scores = matrix @ block.T  # queries x rows
        rows = np.arange(start, start + len(block))
        if restricted:
            scores[row_category[rows][None, :] != wanted[:, None]] = -np.inf
        for q, (_, history, _) in enumerate(queries):
            inside = history[(history >= start) & (history < start + len(block))]
            scores[q, inside - start] = -np.inf
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_rows = np.concatenate([best_rows, np.broadcast_to(rows, scores.shape)], axis=1)
        top = np.argpartition(-merged_scores, K - 1, axis=1)[:, :K]
        best_scores = np.take_along_axis(merged_scores, top, axis=1)
        best_rows = np.take_along_axis(merged_rows, top, axis=1)
    return [r[s > -np.inf] for r, s in zip(best_rows, best_scores)]


def percentiles(seconds) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


class Heartbeat:
    """A line every `every` seconds while a long call (one upsert) runs."""

    def __init__(self, label: str, every: float = 30.0):
        self.label, self.every = label, every
        self.stop = threading.Event()
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(self.every):
            print(f"  {self.label}: {time.perf_counter() - self.start:.0f} s, RSS {rss_mib() / 1024:.2f} GiB",
                  file=sys.stderr, flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


# -- one size, in its own process -------------------------------------------

def run_size(size: int, args) -> dict:
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng([args.seed, size])
    clusters = args.clusters or max(args.categories, size // args.items_per_cluster)
    report = {"items": size, "categories": args.categories, "clusters": clusters, "seed": args.seed,
              "rss_start_mib": round(rss_mib(), 1)}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        path = Path(tmp) / "vectors.npy"
        vectors, labels = generate(path, size, clusters, args.categories, args, rng)
        row_category = (labels % args.categories).astype(np.int16)
        names = [f"cat{c}" for c in row_category.tolist()]
        ids = [str(r) for r in range(size)]
        queries = make_queries(vectors, labels, args.categories, args.queries, args.history, rng)
        report["rss_data_mib"] = round(rss_mib(), 1)
        anon_before = proc_status_mib("RssAnon")

        settings = IndexSettings(ivf_nprobe=args.nprobe, refine_factor=args.refine_factor)
        report["settings"] = {"ivf_nprobe": settings.ivf_nprobe, "refine_factor": settings.refine_factor}
        index = VectorIndex(DIMENSION, use_gpu=False, settings=settings)
        print(f"building the index over {size:,} items ...", file=sys.stderr, flush=True)
        with Heartbeat(f"build {size:,}"):
            start = time.perf_counter()
            index.upsert(ids, names, vectors)
            report["build_s"] = round(time.perf_counter() - start, 1)
        del vectors  # the generated input goes; what stays is the index
        report["scope_kinds"] = {("all" if k is None else k): v for k, v in index.kinds().items()}
        report["rss_after_build_mib"] = round(rss_mib(), 1)
        report["rss_anon_index_mib"] = round(proc_status_mib("RssAnon") - anon_before, 1)
        report["rss_peak_mib"] = round(proc_status_mib("VmHWM"), 1)
        print(f"built in {report['build_s']} s: {report['scope_kinds']}", file=sys.stderr, flush=True)

        # Latency: one query at a time, unrestricted and in the query's category alternately.
        timings = {"global": [], "category": []}
        found = {"global": [], "category": []}
        warm = min(args.warmup, len(queries))
        for i, (query, history, category) in enumerate(tqdm(queries, desc="search", unit="q", file=sys.stderr)):
            exclude = [ids[r] for r in history]
            for scope, cats in (("global", ()), ("category", (category,))):
                start = time.perf_counter()
                hits = index.search(query, K, cats, exclude)[0]
                elapsed = time.perf_counter() - start
                if i >= warm:
                    timings[scope].append(elapsed)
                if i < args.recall_queries:
                    found[scope].append(np.asarray([int(item) for item, _ in hits], dtype=np.int64))
        report["queries_timed"] = len(timings["global"])
        report["latency"] = {scope: percentiles(t) for scope, t in timings.items()}

        # Recall@100 against brute force on the same vectors (reopened from the file).
        vectors = np.load(path, mmap_mode="r")
        sample = queries[:args.recall_queries]
        report["recall_queries"] = len(sample)
        report["recall@100"] = {}
        for scope in ("global", "category"):
            truth = exact_top_k(vectors, row_category, sample, restricted=scope == "category")
            per_query = [len(np.intersect1d(t, f)) / max(len(t), 1) for t, f in zip(truth, found[scope])]
            report["recall@100"][scope] = {"mean": round(float(np.mean(per_query)), 4),
                                           "min": round(float(np.min(per_query)), 4)}
        del vectors
    print(json.dumps(report), file=sys.stderr, flush=True)
    return report


# -- the curve ----------------------------------------------------------------

def targets(sizes: list[dict]) -> dict:
    """The issue's targets: largest size's p99 within 2x of the smallest's, recall@100 >= 0.95."""
    if not sizes:
        return {}
    first, last = sizes[0], sizes[-1]
    out = {"from_items": first["items"], "to_items": last["items"]}
    for scope in ("global", "category"):
        ratio = last["latency"][scope]["p99_ms"] / first["latency"][scope]["p99_ms"]
        out[f"{scope}_p99_ratio"] = round(ratio, 2)
        out[f"{scope}_p99_within_2x"] = ratio <= 2.0
        out[f"{scope}_recall_min_over_sizes"] = min(s["recall@100"][scope]["mean"] for s in sizes)
    out["recall_at_least_0.95"] = all(s["recall@100"][scope]["mean"] >= 0.95
                                      for s in sizes for scope in ("global", "category"))
    return out


def plot(sizes: list[dict], path: Path) -> None:
    """Lines join the sizes run with the first size's category count; sizes run
    with another count (e.g. 5M with 2 categories, every scope IVF-PQ) are
    separate hollow markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main_count = sizes[0]["categories"]
    line = [s for s in sizes if s["categories"] == main_count]
    others = [s for s in sizes if s["categories"] != main_count]

    def draw(ax, value, style, colour, label):
        ax.plot([s["items"] for s in line], [value(s) for s in line], style, color=colour, label=label)
        if others:
            ax.plot([s["items"] for s in others], [value(s) for s in others], style[0], color=colour,
                    markerfacecolor="none", markersize=10, linestyle="none")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    for scope, colour in (("global", "tab:blue"), ("category", "tab:orange")):
        draw(ax, lambda s: s["latency"][scope]["p50_ms"], "o-", colour, f"{scope} p50")
        draw(ax, lambda s: s["latency"][scope]["p99_ms"], "s--", colour, f"{scope} p99")
    ax.set(xscale="log", xlabel="items", ylabel="ms per search (k=100)", title="Index search latency")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax = axes[1]
    for scope, colour in (("global", "tab:blue"), ("category", "tab:orange")):
        draw(ax, lambda s: s["recall@100"][scope]["mean"], "o-", colour, scope)
    ax.axhline(0.95, color="grey", linestyle=":", label="target 0.95")
    ax.set(xscale="log", xlabel="items", ylabel="recall@100 vs exact", title="Recall@100")
    ax.legend(fontsize=8)
    ax = axes[2]
    draw(ax, lambda s: s["rss_anon_index_mib"] / 1024, "o-", "tab:green", "index memory GiB")
    draw(ax, lambda s: s["rss_peak_mib"] / 1024, "s--", "tab:green", "process peak GiB")
    ax.set(xscale="log", xlabel="items", ylabel="GiB", title="Memory and build time")
    twin = ax.twinx()
    draw(twin, lambda s: s["build_s"], "^-", "tab:red", "build s")
    twin.set_ylabel("build s")
    lines = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8, loc="upper left")
    ticks = sorted({s["items"] for s in sizes})
    for axis in axes:
        axis.set_xticks(ticks)
        axis.set_xticklabels([f"{v:,}" for v in ticks], rotation=20, fontsize=8)
        axis.minorticks_off()

    def kinds(s):
        categories = "/".join(sorted(set(v for k, v in s["scope_kinds"].items() if k != "all")))
        return f"{s['items']:,}: all={s['scope_kinds']['all']}, {s['categories']} categories={categories}"

    title = "VectorIndex (auto), clustered synthetic 384-d vectors. Lines: " + " | ".join(kinds(s) for s in line)
    if others:
        title += "\nHollow markers: " + " | ".join(kinds(s) for s in others)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000", help="comma-separated catalogue sizes, each in its own process")
    parser.add_argument("--categories", type=int, default=8)
    parser.add_argument("--clusters", type=int, default=0, help="fixed cluster count (default: size / --items-per-cluster)")
    parser.add_argument("--items-per-cluster", type=int, default=2000)
    parser.add_argument("--local-dim", type=int, default=16, help="dimension of each cluster's subspace")
    parser.add_argument("--spread", type=float, default=0.6, help="items' spread along their cluster's subspace")
    parser.add_argument("--noise", type=float, default=0.15, help="isotropic noise (norm) before normalising")
    parser.add_argument("--queries", type=int, default=1000, help="timed queries per size (after --warmup)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--recall-queries", type=int, default=200, help="first N queries also scored against brute force")
    parser.add_argument("--history", type=int, default=5, help="items per query (averaged, then excluded)")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads (the service's default is 1)")
    parser.add_argument("--nprobe", type=int, default=IndexSettings().ivf_nprobe, help="IVF-PQ lists searched")
    parser.add_argument("--refine-factor", type=int, default=IndexSettings().refine_factor,
                        help="IVF-PQ candidates re-scored exactly, times k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp-dir", default=None, help="where generated vectors are memory-mapped")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--merge", default="", help="comma-separated JSON reports of earlier runs: combine "
                        "their sizes into --json/--plot without running anything")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    if args.worker:
        report = run_size(args.worker, args)
        args.worker_out.write_text(json.dumps(report))
        return 0

    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge.split(",")]
        sizes = sorted((dict(s, command=r["command"], load_average_start=r["load_average_start"])
                        for r in runs for s in r["sizes"]), key=lambda s: s["items"])
        # Targets along the sizes run with the smallest size's category count;
        # a size run with another count is compared with the smallest on its own.
        line = [s for s in sizes if s["categories"] == sizes[0]["categories"]]
        report = {"merged": [r["command"] for r in runs], "settings": runs[0]["settings"], "sizes": sizes,
                  "targets": targets(line),
                  "targets_other_category_counts": [dict(targets([sizes[0], s]), categories=s["categories"])
                                                    for s in sizes if s not in line]}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
        if args.plot:
            plot(sizes, args.plot)
        print(json.dumps({k: report[k] for k in ("targets", "targets_other_category_counts")}, indent=2))
        return 0

    report = {"command": " ".join(["python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])]),
              "load_average_start": [round(x, 2) for x in os.getloadavg()], "settings": IndexSettings().__dict__,
              "sizes": []}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for size in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "size.json"
            run = subprocess.run([sys.executable, __file__, *forwarded, "--worker", str(size), "--worker-out", str(out)])
            if run.returncode != 0:
                print(f"size {size:,} failed (exit {run.returncode}); stopping", file=sys.stderr)
                report["failed"] = {"items": size, "exit": run.returncode}
                break
            entry = json.loads(out.read_text())
        entry["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        report["sizes"].append(entry)
        report["targets"] = targets(report["sizes"])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
        if args.plot:
            plot(report["sizes"], args.plot)
    print(json.dumps(report, indent=2))
    return 0 if "failed" not in report else 1


if __name__ == "__main__":
    raise SystemExit(main())
