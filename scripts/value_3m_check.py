"""How the 3-month spend model was chosen: its variants measured on every
training cutoff with a year of data before it (a season a year back to
read), each model trained on the snapshots whose outcome ended by then,
exactly as `recsys train-value` trains the served one (docs/profiles.md,
"Churn and lifetime value").

    .venv/bin/python scripts/value_3m_check.py [--data ../shared/data/online-retail] [--test] [--json OUT]

Variants:
- `Poisson, no season`: a Poisson regression on SPEND_3M_COLUMNS, the
  first model served;
- `Poisson + calendar`: plus sine and cosine of the cutoff's day of the year;
- `Poisson over the seasonal index`: its target divided by the shop's
  seasonal index of the outcome window (SeasonCalendar: the 90 days' spend
  over the mean 90 days of the year around them) and its forecast
  multiplied by the index of the same window a year earlier, the
  seasonal-naive level; served second;
- `P(buy) x spend if buying (served)`: two parts, 1 - P(churn) from the
  churn model (the same 90 days) times a Gamma regression of the buyers'
  spend on the same columns, over the same seasonal index;
- `P(buy) from BG/NBD x spend if buying`: the same second part, with the
  baseline's own P(buy), to show which part carries the gain.
BG/NBD + Gamma-Gamma fitted at the cutoff is the baseline, as in the report.
`--test` adds the test cutoff: for the record only, since looking at it
is not a way to choose.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from training import value  # noqa: E402
from recsys_core.data.retail import SHARED_RETAIL_DIR, clean, load_transactions, retail_events  # noqa: E402
from recsys_core.signals.value import DAY, SPEND_HORIZONS, SeasonCalendar, design  # noqa: E402

HORIZON = SPEND_HORIZONS["3m"] * DAY
YEAR = 365 * DAY
BASELINE = "BG/NBD + Gamma-Gamma"


def calendar(frame: pd.DataFrame) -> np.ndarray:
    angle = frame.as_of.to_numpy() / DAY % 365.25 / 365.25 * 2 * np.pi
    return np.column_stack([np.sin(angle), np.cos(angle)])


def variants(train: pd.DataFrame, test: pd.DataFrame, season: SeasonCalendar, cutoff: int) -> dict[str, np.ndarray]:
    target = train.spend_3m.to_numpy()
    with_calendar = value.spend_3m_estimator().fit(
        np.hstack([design(train, value.SPEND_3M_COLUMNS), calendar(train)]), target)
    churn = value.fit_churn(train)
    two_part = value.fit_spend(train, "3m", 0, season, known_until=cutoff, purchase=churn)
    spend_if_buying = value.predict({k: v for k, v in two_part.items() if k != "purchase"}, test)
    bgnbd_buys = 1 / (1 + np.exp(test.btyd_logit_no_purchase.to_numpy()))
    return {
        BASELINE: np.exp(test.btyd_log_spend_3m.to_numpy()),
        "Poisson, no season": value.predict(value.fit_spend(train, "3m", seed=0), test),
        "Poisson + calendar": with_calendar.predict(np.hstack([design(test, value.SPEND_3M_COLUMNS), calendar(test)])),
        "Poisson over the seasonal index": value.predict(value.fit_spend(train, "3m", 0, season, known_until=cutoff), test),
        "P(buy) x spend if buying (served)": value.predict(two_part, test),
        "P(buy) from BG/NBD x spend if buying": bgnbd_buys * spend_if_buying,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_RETAIL_DIR)
    parser.add_argument("--test", action="store_true", help="also the test cutoff (not for choosing)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    events = retail_events(clean(load_transactions(args.data))[0])
    cutoffs = value.choose_cutoffs(events)
    histories = value.shopper_histories(events)
    season = SeasonCalendar.of(events.timestamp.to_numpy(), events.amount.to_numpy())
    train_cutoffs = sorted(cutoffs.churn_train)
    measured_at = [at for at in train_cutoffs if at - YEAR >= cutoffs.data_start] + (
        [cutoffs.churn_test] if args.test else [])
    frames = {at: value.with_posterior(value.snapshot(histories, at, cutoffs.data_end))[0]
              for at in sorted(set(train_cutoffs) | set(measured_at))}
    figures = {}
    for cutoff in measured_at:
        train = pd.concat([f for at, f in frames.items() if at + HORIZON <= cutoff], ignore_index=True)
        test = frames[cutoff]
        actual = test.spend_3m.to_numpy()
        kind = "test" if cutoff == cutoffs.churn_test else "validation"
        print(f"\n{kind} cutoff {value.date(cutoff)}: {len(test)} customers, trained on {len(train)} snapshot rows; "
              f"shop seasonal index {season.forecast_index(cutoff):.2f} forecast, "
              f"{season.index(cutoff, cutoffs.data_end):.2f} in fact")
        print(f"{'':38s} {'Spearman':>9s} {'top-decile error':>17s} {'total error':>12s}")
        figures[value.date(cutoff)] = {"kind": kind}
        for name, predicted in variants(train, test, season, cutoff).items():
            metrics = value.spend_metrics(predicted, actual)
            figures[value.date(cutoff)][name] = metrics
            print(f"{name:38s} {metrics['spearman']:9.4f} {metrics['top_decile_error']['by_predicted']:+17.1%} "
                  f"{metrics['total_error']:+12.1%}")
    validation = [f for f in figures.values() if f["kind"] == "validation"]
    print(f"\nmean over the {len(validation)} validation cutoffs")
    for name in (n for n in validation[0] if n != "kind"):
        print(f"{name:38s} {np.mean([f[name]['spearman'] for f in validation]):9.4f} "
              f"{np.mean([abs(f[name]['top_decile_error']['by_predicted']) for f in validation]):17.1%} "
              f"{np.mean([abs(f[name]['total_error']) for f in validation]):12.1%}  "
              f"above BG/NBD at {sum(f[name]['spearman'] > f[BASELINE]['spearman'] for f in validation)} cutoffs")
    print("(errors: mean of |error|; the last column counts cutoffs where the Spearman correlation is above BG/NBD's)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
