"""Cut the bundled data/ subset out of the full amazon-2014 set.

Keeps whole shoppers (every event of theirs, so leave-one-out still works),
biased toward shoppers active in several categories, which carry the
cross-category signal. Deterministic: the same input gives the same subset.

    python scripts/make_subset.py --source ../shared/data/amazon-2014 --out data
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_core.data import INTERACTIONS_FILE, ITEMS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--multi-category-users", type=int, default=700)
    parser.add_argument("--users-per-category", type=int, default=330)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    items = pd.read_csv(args.source / ITEMS_FILE, dtype=str, keep_default_na=False)
    events = pd.read_csv(args.source / INTERACTIONS_FILE, dtype={"user_id": str, "item_id": str})

    categories_per_user = events.groupby("user_id")["category"].nunique()
    multi = np.sort(categories_per_user[categories_per_user > 1].index.to_numpy())
    chosen = set(rng.choice(multi, size=min(args.multi_category_users, len(multi)), replace=False))
    single = categories_per_user[categories_per_user == 1].index
    home = events[events.user_id.isin(single)].groupby("user_id")["category"].first()
    for category in sorted(events.category.unique()):
        pool = np.sort(home[home == category].index.to_numpy())
        chosen.update(rng.choice(pool, size=min(args.users_per_category, len(pool)), replace=False))

    subset = events[events.user_id.isin(chosen)]
    subset_items = items[items.item_id.isin(subset.item_id.unique())]
    args.out.mkdir(parents=True, exist_ok=True)
    subset.to_csv(args.out / INTERACTIONS_FILE, index=False)
    subset_items.to_csv(args.out / ITEMS_FILE, index=False)
    per_category = subset.groupby("category").agg(users=("user_id", "nunique"), items=("item_id", "nunique"), events=("item_id", "size"))
    print(per_category.to_string())
    print(f"{subset.user_id.nunique()} shoppers ({len(chosen & set(multi))} in several categories), "
          f"{len(subset_items)} items, {len(subset)} events")


if __name__ == "__main__":
    main()
