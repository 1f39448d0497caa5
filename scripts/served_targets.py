"""Issue #18's served targets, side by side: for each category, what the
stack returned (`recsys evaluate --served --json`), the learned order and
its best single source offline (`recsys train-ranker --json`'s manifest,
OUT.json), and the strongest published row (scripts/results.py, PUBLISHED).
Prints the markdown table docs/results.md shows and plots it.

    python scripts/served_targets.py \
        --category Toys_and_Games var/ranker/toys-model-search.txt.json docs/results/served-toys-ranker.json \
        --plot docs/results-served-ranker.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from recsys_cli.served import plot  # noqa: E402
from scripts.results import PUBLISHED  # noqa: E402

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
SERVED = "served (learned ranker)"
PUBLISHED_ROW = "published: strongest"


def strongest_published(category: str) -> tuple[str, dict] | None:
    rows = [(name, figures) for name, figures in PUBLISHED.get(category, {}).items() if figures[1] is not None]
    if not rows:
        return None
    name, (recall, ndcg) = max(rows, key=lambda row: row[1][1])
    return name, {"recall@10": recall, "ndcg@10": ndcg}


def gather(category: str, manifest_path: Path, served_path: Path | None) -> dict:
    manifest = json.loads(manifest_path.read_text())
    if manifest["data"]["category"] != category:
        raise SystemExit(f"{manifest_path} is a {manifest['data']['category']} ranker, not {category}")
    single = manifest["test"]["single_source"]
    best_single = max(single, key=lambda name: single[name]["ndcg@10"])
    rows = {}
    if served_path is not None:
        served = json.loads(served_path.read_text())["results"][category]["served"]
        rows[SERVED] = served
    rows["offline: learned"] = manifest["test"]["learned"]
    # Generic names, so that every category's bars line up in the plot; the
    # table names the source and the paper.
    rows["offline: best single source"] = {**single[best_single], "named": best_single.removesuffix("_similarity")}
    published = strongest_published(category)
    if published:
        rows[PUBLISHED_ROW] = {**published[1], "named": published[0]}
    return rows


def verdict(rows: dict) -> str:
    published, served = rows.get(PUBLISHED_ROW), rows.get(SERVED)
    if published is None or served is None:
        return "not measured"
    beaten = [served[m] > published[m] for m in ("recall@10", "ndcg@10")]
    return "**beaten**" if all(beaten) else ("Recall@10 only" if beaten[0] else
                                             "NDCG@10 only" if beaten[1] else "**not beaten**")


def markdown(summary: dict) -> str:
    lines = ["| category | figures | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 | shoppers |", "|---" * 7 + "|"]
    for category, rows in summary.items():
        for name, figures in rows.items():
            cells = [f"{figures[m]:.4f}" if m in figures else "" for m in METRICS]
            named = f" ({figures['named']})" if "named" in figures else ""
            lines.append(f"| {category} | {name}{named} | " + " | ".join(cells) + f" | {figures.get('users', '')} |")
        lines.append(f"| {category} | served against the published row | {verdict(rows)} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", nargs="+", action="append", required=True,
                        metavar=("NAME RANKER_MANIFEST", "SERVED_JSON"),
                        help="a category, its ranker's manifest and (optional) its served evaluation's JSON")
    parser.add_argument("--plot", type=Path, help="write the bars here (PNG)")
    args = parser.parse_args(argv)
    summary = {}
    for given in args.category:
        if len(given) not in (2, 3):
            parser.error("--category NAME RANKER_MANIFEST [SERVED_JSON]")
        summary[given[0]] = gather(given[0], Path(given[1]), Path(given[2]) if len(given) == 3 else None)
    print(markdown(summary))
    if args.plot:
        # served.plot's layout: a "served" row per category, the others beside it.
        served = {category: {("served" if name == SERVED else name): figures for name, figures in rows.items()}
                  for category, rows in summary.items() if SERVED in rows}
        if not served:
            parser.error("--plot: no category has a served evaluation to plot")
        plot({"results": served}, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
