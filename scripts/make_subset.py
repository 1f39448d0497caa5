"""Cut the bundled data/ subsets out of the full public sets.

Amazon: keeps whole shoppers (every event of theirs, so leave-one-out still
works), biased toward shoppers active in several categories, which carry the
cross-category signal. Online Retail: every invoice line of a random sample of
customers, both public files in one schema (recsys_core/data/retail.py).
Reviews: a random sample of each review corpus, the multi-domain set balanced
by domain and label, in the public files' schema (training/reviews.py).
Deterministic: the same input gives the same subset.

    python scripts/make_subset.py --source ../shared/data/amazon-2014 --out data
    python scripts/make_subset.py --retail-source ../shared/data/online-retail --out data
    python scripts/make_subset.py --reviews-source ../shared/data/reviews --out data
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_core.data.shopping import INTERACTIONS_FILE, ITEMS_FILE


def retail_subset(source: Path, out: Path, customers: int, seed: int) -> None:
    """Every line (cancellations and non-product lines included, so that the
    cleaning is exercised) of `customers` customers drawn at random, into
    out/online-retail/transactions.parquet."""
    from recsys_core.data.retail import TRANSACTIONS_FILE, load_transactions

    lines = load_transactions(source)
    pool = np.sort(lines.customer_id.dropna().unique())
    chosen = np.random.default_rng(seed).choice(pool, size=min(customers, len(pool)), replace=False)
    subset = lines[lines.customer_id.isin(chosen)].sort_values(["customer_id", "invoice_date", "invoice"], kind="stable")
    target = out / "online-retail"
    target.mkdir(parents=True, exist_ok=True)
    subset.to_parquet(target / TRANSACTIONS_FILE, index=False, compression="gzip")
    print(f"online retail: {len(chosen)} customers, {len(subset)} lines, "
          f"{subset.invoice_date.min()}..{subset.invoice_date.max()} -> {target / TRANSACTIONS_FILE}")


def reviews_subset(source: Path, out: Path, per_group: int, beauty_reviews: int, seed: int) -> None:
    """`per_group` reviews of each (domain, rating) of the multi-domain set and
    `beauty_reviews` of All_Beauty, into out/reviews/ under the public names."""
    from training.reviews import BEAUTY_FILE, MULTI_DOMAIN_FILE

    rng = np.random.default_rng(seed)
    target = out / "reviews"
    target.mkdir(parents=True, exist_ok=True)
    multi = pd.read_csv(source / MULTI_DOMAIN_FILE)
    chosen = multi.groupby(["domain", "rating"], group_keys=False)[multi.columns.tolist()].apply(
        lambda g: g.iloc[np.sort(rng.choice(len(g), size=min(per_group, len(g)), replace=False))])
    chosen.to_csv(target / MULTI_DOMAIN_FILE, index=False, compression="gzip")
    beauty = pd.read_csv(source / BEAUTY_FILE)
    picked = beauty.iloc[np.sort(rng.choice(len(beauty), size=min(beauty_reviews, len(beauty)), replace=False))]
    picked.to_csv(target / BEAUTY_FILE, index=False, compression="gzip")
    print(f"reviews: {len(chosen)} multi-domain, {len(picked)} All_Beauty -> {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="the amazon-2014 set")
    parser.add_argument("--retail-source", type=Path, help="the online-retail set")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--multi-category-users", type=int, default=700)
    parser.add_argument("--users-per-category", type=int, default=330)
    parser.add_argument("--retail-customers", type=int, default=400)
    parser.add_argument("--reviews-source", type=Path, help="the reviews folder")
    parser.add_argument("--reviews-per-group", type=int, default=150, help="per multi-domain (domain, rating)")
    parser.add_argument("--beauty-reviews", type=int, default=600)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.source is None and args.retail_source is None and args.reviews_source is None:
        parser.error("give --source, --retail-source, --reviews-source or several")
    if args.reviews_source is not None:
        reviews_subset(args.reviews_source, args.out, args.reviews_per_group, args.beauty_reviews, args.seed)
    if args.retail_source is not None:
        retail_subset(args.retail_source, args.out, args.retail_customers, args.seed)
    if args.source is not None:
        amazon_subset(args)


def amazon_subset(args) -> None:
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
