"""Does the churn model, trained on the gift retailer, hold up on the Amazon
benchmark shoppers it also serves? Out of time, per category: features from
each shopper's events before a cutoff 90 days before the category's data
ends, churn = no purchase in the 90 days after it (docs/profiles.md, "Churn
and lifetime value").

    .venv/bin/python scripts/value_amazon_check.py [--data ../shared/data/amazon-2014] [--json OUT]

Three forecasts per shopper: the served one (`ValueModel.forecast`, exactly
what GetProfile returns, with the retailer's BG/NBD posterior), BG/NBD
refitted on the category's own shoppers at the cutoff (a baseline the
service does not have), and recency alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from recsys_core import data, paths  # noqa: E402
from recsys_core.btyd import BGNBD  # noqa: E402
from recsys_core.offline import value  # noqa: E402
from services.profile.store import PURCHASE, StoredEvent  # noqa: E402
from services.profile.value import CHURN_HORIZON_DAYS, DAY, ShopperHistory, ValueModel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=paths.shared_data_dir())
    parser.add_argument("--model", type=Path, help="value model artifact (default: the served one)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    model = ValueModel.load(args.model)
    interactions = data.chronological(data.load_interactions(args.data)).dropna(subset=["timestamp"])
    figures = {"model_version": model.version}
    for category, events in interactions.groupby("category"):
        by_user: dict[str, list[StoredEvent]] = {}
        for row in events.itertuples(index=False):
            by_user.setdefault(row.user_id, []).append(
                StoredEvent(row.user_id, row.item_id, category, PURCHASE, int(row.timestamp)))
        end = (int(events.timestamp.max()) // DAY + 1) * DAY
        cutoff = end - CHURN_HORIZON_DAYS * DAY
        histories = {user: ShopperHistory(user_events) for user, user_events in by_user.items()}
        frame = value.snapshot(histories, cutoff, end)
        refitted = BGNBD.fit(frame.x, frame.t_x, frame["T"])  # no amounts: no Gamma-Gamma
        churned = frame.churned.to_numpy().astype(int)
        served = np.array([model.forecast(by_user[user], cutoff).churn_probability for user in frame.user_id])
        forecasts = {"served model": served,
                     "BG/NBD refitted on the category": refitted.p_no_purchase(
                         CHURN_HORIZON_DAYS, frame.x, frame.t_x, frame["T"])}
        result = {"cutoff": value.date(cutoff), "shoppers": len(frame), "churn_rate": float(churned.mean()),
                  "recency_only_roc_auc": float(roc_auc_score(churned, frame.recency_days))}
        print(f"\n{category}: {len(frame)} shoppers with a purchase before {value.date(cutoff)}, "
              f"{churned.mean():.1%} bought nothing in the next {CHURN_HORIZON_DAYS} days; "
              f"recency alone ROC-AUC {result['recency_only_roc_auc']:.3f}")
        for name, probabilities in forecasts.items():
            metrics = value.churn_metrics(np.asarray(probabilities), churned)
            result[name] = metrics
            print(f"  {name:34s} ROC-AUC {metrics['roc_auc']:.3f}  ECE {metrics['ece']:.3f}  "
                  f"mean predicted {metrics['mean_predicted']:.3f}")
        figures[category] = result
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
