"""One process against two under torchrun: `recsys train` with the same
settings and seed, validation NDCG@10 of each, over several seeds, so the
gap between the two is read against the spread across seeds (docs/operations.md,
"Distributed training"). Popularity is printed as the floor both must beat.

    PYTHONPATH=. python bench/ddp_quality.py --seeds 42 43 44 --max-epochs 2

Each run is a real `recsys train` (model directory written and exported);
the two-process one is `torchrun --standalone --nproc_per_node 2`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recsys_core.data import paths, shopping
from training import baselines, protocol

TORCHRUN = Path(sys.executable).with_name("torchrun")


def train_command(out: Path, seed: int, args, processes: int) -> list[str]:
    train = ["-m", "recsys_cli.main", "train", "--data", str(args.data), "--categories", *args.categories,
             "--out", str(out), "--max-epochs", str(args.max_epochs), "--seed", str(seed), "--no-progress",
             "--no-guard"]
    if processes == 1:
        return [sys.executable, *train]
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes), *train]


def run(out: Path, seed: int, args, processes: int) -> dict:
    started = time.monotonic()
    subprocess.run(train_command(out, seed, args, processes), check=True, cwd=paths.REPO_ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=args.timeout)
    training = json.loads((out / "manifest.json").read_text())["training"]
    return {"processes": processes, "seed": seed, "ndcg@10": training["best_valid"]["ndcg@10"],
            "recall@10": training["best_valid"]["recall@10"], "world_size": training["world_size"],
            "losses": training["losses"], "fit_minutes": training["minutes"],
            "wall_seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=paths.BUNDLED_DATA_DIR)
    parser.add_argument("--categories", nargs="+", default=["Beauty"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    dataset = shopping.Dataset.load(args.data)
    split = protocol.category_split(dataset.interactions, dataset.items, args.categories)
    popularity = protocol.evaluate(baselines.popularity_scorer(split), split, "valid")["ndcg@10"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for processes in (1, 2):
                rows.append(run(Path(tmp) / f"{processes}-{seed}", seed, args, processes))
                print(json.dumps(rows[-1]), flush=True)
    one = [r["ndcg@10"] for r in rows if r["processes"] == 1]
    two = [r["ndcg@10"] for r in rows if r["processes"] == 2]
    gaps = [b - a for a, b in zip(one, two)]
    def spread(values: list[float]) -> dict:
        return {"mean": statistics.mean(values), "stdev": statistics.stdev(values) if len(values) > 1 else None}

    summary = {"popularity_ndcg@10": popularity, "one_process": spread(one), "two_processes": spread(two),
               "gap_same_seed": gaps}
    print(json.dumps(summary, indent=2))
    print("\n| seed | 1 process NDCG@10 | 2 processes NDCG@10 | gap | wall s (1 / 2) |")
    print("|---|---|---|---|---|")
    by_processes = {n: [r for r in rows if r["processes"] == n] for n in (1, 2)}
    for seed, a, b in zip(args.seeds, by_processes[1], by_processes[2]):
        print(f"| {seed} | {a['ndcg@10']:.4f} | {b['ndcg@10']:.4f} | {b['ndcg@10'] - a['ndcg@10']:+.4f} | "
              f"{a['wall_seconds']:.0f} / {b['wall_seconds']:.0f} |")
    print(f"\npopularity NDCG@10 (valid): {popularity:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
