"""`recsys train-value`: churn and lifetime value on UCI Online Retail, with a
BG/NBD + Gamma-Gamma baseline in the same report.

Data. The two public files (Online Retail II 2009-12..2010-12 and Online
Retail 2010-12..2011-12) overlap from 2010-12-01 to 2010-12-09 with identical
rows; the older file is cut where the newer begins. Only lines with a customer
id describe a customer. Non-product lines (postage, carriage, manual
adjustments, discounts, bank charges, fees, commissions, samples, tests) are
bookkeeping rather than demand and are dropped; so are lines with a price of 0
or less. A cancellation ("C" invoice) stays as a negative amount: it lowers net
spend and counts as a cancelled line, never as a purchase. Repeated identical
lines within an invoice are kept: the till lists an item once per scan.

Split. Churn and 3-month spend are tested out of time, at the cutoff 90 days
before the data end: the models learn from snapshots every 30 days up to 90
days before it (so every training outcome is known by the test cutoff). A
12-month outcome fits only once in two years of data (cutoff 2010-12-10), so
the 12-month spend model is tested there on a held-out half of the customers
(by a hash of the id) and learns from the other half. The baseline is fitted
on each test cutoff's customers, on their history only.
docs/profiles.md ("Churn and lifetime value") has the figures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_core.data import shopping
from training import versions
from recsys_core.signals.btyd import BTYD
from recsys_core.data.shopping import DataError
from recsys_core.data.paths import BUNDLED_DATA_DIR, replacing, shared_data_dir
from recsys_core.data.retail import (
    BUNDLED_RETAIL_DIR, SHARED_RETAIL_DIR, RetailDataError, clean, load_transactions, retail_events,
)
from recsys_core.store.events import StoredEvent, benchmark_stored_events
from recsys_core.signals.value import (
    ARTIFACT_FILE, CHURN_FEATURES, CHURN_HORIZON_DAYS, DAY, FEATURES, MONEY_FEATURES, SPEND_FEATURES, SPEND_HORIZONS,
    SeasonCalendar, ShopperHistory, btyd_columns, default_artifact_path, design, retail_stored_events,
)
from recsys_core.signals.value import predict as served_predict

log = logging.getLogger(__name__)

# Training snapshots are this far apart; a snapshot needs this much history before it.
SNAPSHOT_STEP_DAYS = 30
MIN_HISTORY_DAYS = 90
ECE_BINS = 10
BOOTSTRAP_ROUNDS = 1000


def histories_of(events: Iterable[StoredEvent]) -> dict[str, ShopperHistory]:
    by_user: dict[str, list[StoredEvent]] = {}
    for event in events:
        by_user.setdefault(event.user_id, []).append(event)
    return {user: ShopperHistory(user_events) for user, user_events in by_user.items()}


def shopper_histories(events: pd.DataFrame) -> dict[str, ShopperHistory]:
    """The retail customers of retail_events() rows."""
    return histories_of(retail_stored_events(events))


# --- snapshots: features at a cutoff, outcomes after it ---------------------

def snapshot(histories: dict[str, ShopperHistory], as_of: int, data_end: int, min_events: int = 1) -> pd.DataFrame:
    """One row per shopper with `min_events` buying events before `as_of`:
    the served features (with the BG/NBD summary x, t_x, T, m_x) and the
    outcome of every horizon that ends by `data_end` (NaN for the others:
    not known yet)."""
    def known(horizon_days: int) -> bool:
        return as_of + horizon_days * DAY <= data_end

    rows = []
    for user, history in histories.items():
        if history.count_before(as_of) < min_events:
            continue
        found = history.features(as_of)
        if found is None:
            continue
        row = {"user_id": user, "as_of": as_of, **found.values}
        bought, _ = history.outcome(as_of, CHURN_HORIZON_DAYS)
        row["churned"] = int(not bought) if known(CHURN_HORIZON_DAYS) else math.nan
        for name, horizon in SPEND_HORIZONS.items():
            row[f"spend_{name}"] = history.outcome(as_of, horizon)[1] if known(horizon) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def with_posterior(frame: pd.DataFrame) -> tuple[pd.DataFrame, BTYD]:
    """The snapshot with the BG/NBD + Gamma-Gamma posterior columns, the
    model fitted on this snapshot's customers (their history only: no outcomes)."""
    btyd = BTYD.fit(frame.x, frame.t_x, frame["T"], frame.m_x)
    return frame.assign(**btyd_columns(frame, btyd)), btyd


def snapshots(histories: dict[str, ShopperHistory], cutoffs: Sequence[int], data_end: int) -> pd.DataFrame:
    from tqdm import tqdm

    frames = [with_posterior(snapshot(histories, cutoff, data_end))[0]
              for cutoff in tqdm(cutoffs, desc="snapshots", unit="cutoff")]
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class Cutoffs:
    data_start: int
    data_end: int      # exclusive: midnight after the last invoice
    churn_test: int    # churn and 3-month spend are tested here
    churn_train: tuple[int, ...]
    year_test: int     # 12-month spend is tested here (held-out customers)


def choose_cutoffs(events: pd.DataFrame) -> Cutoffs:
    start = int(events.timestamp.min()) // DAY * DAY
    end = (int(events.timestamp.max()) // DAY + 1) * DAY
    churn_test = end - max(CHURN_HORIZON_DAYS, SPEND_HORIZONS["3m"]) * DAY
    year_test = end - SPEND_HORIZONS["12m"] * DAY
    # Training outcomes must be known at the test cutoff: the last training
    # window ends where the test one begins.
    churn_train, cutoff = [], churn_test - CHURN_HORIZON_DAYS * DAY
    while cutoff - start >= MIN_HISTORY_DAYS * DAY:
        churn_train.append(cutoff)
        cutoff -= SNAPSHOT_STEP_DAYS * DAY
    if not churn_train or year_test - start < MIN_HISTORY_DAYS * DAY:
        raise RetailDataError(
            f"the data span {(end - start) / DAY:.0f} days; a 12-month outcome after "
            f"{MIN_HISTORY_DAYS} days of history needs at least {SPEND_HORIZONS['12m'] + MIN_HISTORY_DAYS}")
    return Cutoffs(start, end, churn_test, tuple(churn_train), year_test)


def held_out(user_id: str) -> bool:
    """Half of the customers, fixed by their id, for the 12-month test."""
    return hashlib.sha256(user_id.encode()).digest()[0] % 2 == 1


# --- models -------------------------------------------------------------------
# Chosen on validation cutoffs before the test (docs/profiles.md): models
# trained on earlier periods drift, and BG/NBD fitted on the customer base at
# the cutoff is hard to beat, so the out-of-time models are small linear
# corrections of its posterior; the 12-month model, trained at its test cutoff
# on other customers, can afford boosted trees over every feature.

CHURN_COLUMNS = ("btyd_logit_no_purchase", "purchase_days_next_90d_last_year", "purchase_days_90d",
                 "cancelled_line_share", "distinct_items", "lines_per_purchase_day")
SPEND_3M_COLUMNS = ("btyd_log_spend_3m", "net_spend_next_90d_last_year", "purchase_days_next_90d_last_year",
                    "net_spend_90d", "purchase_days_90d", "cancelled_amount_share")
SPEND_12M_COLUMNS = SPEND_FEATURES + ("btyd_log_spend_12m", "btyd_logit_no_purchase")
# Shoppers without amounts: review histories, one review per line, nothing cancelled.
NO_AMOUNT_CHURN_COLUMNS = tuple(name for name in CHURN_FEATURES
                                if name not in ("lines_per_purchase_day", "cancelled_line_share"))
assert not set(CHURN_COLUMNS + NO_AMOUNT_CHURN_COLUMNS) & set(MONEY_FEATURES), "the churn models must not need money"
assert CHURN_HORIZON_DAYS == SPEND_HORIZONS["3m"], "the 3-month spend's purchase part is 1 - churn"


def fit_churn(train: pd.DataFrame, columns: tuple[str, ...] = CHURN_COLUMNS) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = train[train.churned.notna()]
    estimator = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    estimator.fit(design(train, columns), train.churned.astype(int).to_numpy())
    return {"columns": columns, "estimator": estimator}


def spend_3m_estimator():
    from sklearn.linear_model import PoissonRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), PoissonRegressor(alpha=1e-4, max_iter=5000))


def spend_if_buying_estimator():
    from sklearn.linear_model import GammaRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), GammaRegressor(alpha=1e-4, max_iter=5000))


def seasonal_index(frame: pd.DataFrame, season: SeasonCalendar, known_until: int | None) -> np.ndarray:
    """Each snapshot row's seasonal index of its outcome window, as known by `known_until`."""
    return frame.as_of.map({at: season.index(int(at), known_until) for at in frame.as_of.unique()}).to_numpy()


def fit_spend(train: pd.DataFrame, horizon: str, seed: int, season: SeasonCalendar | None = None,
              known_until: int | None = None, purchase: dict | None = None) -> dict:
    """3 months: with `season`, the model learns each snapshot's spend over
    the shop's seasonal index of its outcome window, as known by `known_until`.
    With `purchase` as well (the churn model: its horizon is the same 90
    days), it has two parts, P(buy) x spend if buying; the second is a
    Gamma regression on the snapshots that bought."""
    train = train[train[f"spend_{horizon}"].notna()]
    target = train[f"spend_{horizon}"].to_numpy()
    if horizon == "3m":
        columns = SPEND_3M_COLUMNS
        if season is None:
            return {"columns": columns, "estimator": spend_3m_estimator().fit(design(train, columns), target)}
        if purchase is not None:
            bought = train[target > 0]
            # The Gamma deviance depends on spend / mean alone, so fitting
            # spend / index unweighted is the fit with log(index) as offset.
            estimator = spend_if_buying_estimator().fit(
                design(bought, columns), bought.spend_3m.to_numpy() / seasonal_index(bought, season, known_until))
            return {"columns": columns, "estimator": estimator, "season": season, "purchase": purchase}
        # A Poisson model of spend / index weighted by the index is one of
        # spend with log(index) as its offset.
        index = seasonal_index(train, season, known_until)
        estimator = spend_3m_estimator().fit(design(train, columns), target / index,
                                             poissonregressor__sample_weight=index)
        return {"columns": columns, "estimator": estimator, "season": season}
    from sklearn.ensemble import HistGradientBoostingRegressor

    # Poisson deviance fits the mean of a zero-heavy, long-tailed spend:
    # totals, not medians, are what a value forecast is summed into.
    # Leaves of 100 customers on the full set; a small set (the bundled
    # subset) still gets splits.
    estimator = HistGradientBoostingRegressor(
        loss="poisson", learning_rate=0.03, max_iter=200, max_leaf_nodes=15,
        min_samples_leaf=int(np.clip(len(train) // 20, 10, 100)),
        l2_regularization=1.0, early_stopping=False, random_state=seed)
    return {"columns": SPEND_12M_COLUMNS, "estimator": estimator.fit(design(train, SPEND_12M_COLUMNS), target)}


def predict(model: dict, frame: pd.DataFrame) -> np.ndarray:
    return served_predict(model, frame, frame.as_of.to_numpy())


def baseline_predictions(btyd: BTYD, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    x, t_x, T, m_x = frame.x, frame.t_x, frame["T"], frame.m_x
    out = {"churn": btyd.p_no_purchase(CHURN_HORIZON_DAYS, x, t_x, T)}
    for name, horizon in SPEND_HORIZONS.items():
        out[f"spend_{name}"] = btyd.expected_spend(horizon, x, t_x, T, m_x)
    return out


# --- metrics ------------------------------------------------------------------

def expected_calibration_error(probabilities: np.ndarray, outcomes: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over equal-width probability bins of (bin share) x |mean predicted - observed rate|."""
    return float(sum(b["n"] * abs(b["predicted"] - b["observed"]) for b in reliability(probabilities, outcomes, bins))
                 / len(probabilities))


def reliability(probabilities: np.ndarray, outcomes: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    probabilities, outcomes = np.asarray(probabilities, dtype=float), np.asarray(outcomes, dtype=float)
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    return [{"bin": b, "n": int((which == b).sum()), "predicted": float(probabilities[which == b].mean()),
             "observed": float(outcomes[which == b].mean())} for b in range(bins) if (which == b).any()]


def top_decile_errors(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Signed relative error of the predicted total over the top 10% of
    customers, ranked by predicted value (the decile a campaign would target:
    the primary figure) and by actual value (how well the true best are sized)."""
    predicted, actual = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    k = max(1, math.ceil(len(actual) / 10))
    out = {}
    for name, ranking in (("by_predicted", predicted), ("by_actual", actual)):
        top = np.argsort(-ranking, kind="stable")[:k]
        out[name] = float((predicted[top].sum() - actual[top].sum()) / actual[top].sum())
    return out


def churn_metrics(probabilities: np.ndarray, churned: np.ndarray) -> dict:
    from sklearn.metrics import brier_score_loss, roc_auc_score

    return {"roc_auc": float(roc_auc_score(churned, probabilities)),
            "ece": expected_calibration_error(probabilities, churned),
            "brier": float(brier_score_loss(churned, probabilities)),
            "mean_predicted": float(np.mean(probabilities)), "churn_rate": float(np.mean(churned))}


def spend_metrics(predicted: np.ndarray, actual: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    return {"spearman": float(spearmanr(predicted, actual).statistic),
            "top_decile_error": top_decile_errors(predicted, actual),
            "total_error": float((np.sum(predicted) - np.sum(actual)) / np.sum(actual)),
            "mae": float(np.mean(np.abs(predicted - actual)))}


def paired_bootstrap(predicted: np.ndarray, baseline: np.ndarray, actual: np.ndarray, seed: int,
                     rounds: int = BOOTSTRAP_ROUNDS) -> dict[str, dict[str, float]]:
    """Model minus baseline over customers resampled with replacement: the
    Spearman difference, and the difference of |top-decile error| (below 0:
    the model's top decile is sized closer). Mean and 95% interval."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    spearman, top_decile = [], []
    for _ in range(rounds):
        rows = rng.integers(0, len(actual), len(actual))
        spearman.append(spearmanr(predicted[rows], actual[rows]).statistic
                        - spearmanr(baseline[rows], actual[rows]).statistic)
        top_decile.append(abs(top_decile_errors(predicted[rows], actual[rows])["by_predicted"])
                          - abs(top_decile_errors(baseline[rows], actual[rows])["by_predicted"]))

    def summary(values: list[float]) -> dict[str, float]:
        low, high = np.percentile(values, [2.5, 97.5])
        return {"mean": float(np.mean(values)), "low": float(low), "high": float(high)}

    return {"rounds": rounds, "spearman": summary(spearman), "abs_top_decile_error": summary(top_decile)}


# --- shoppers without amounts: the Amazon review histories ------------------
# The benchmark keeps shoppers with 5 reviews or more over the whole data (its
# 5-core filter), so one with fewer before a cutoff is known to come back: the
# future leaking into the past. Snapshots keep only shoppers past that count,
# for whom the filter says nothing about what follows; at the data's end,
# where the service forecasts, every benchmark shopper is past it.
HISTORY_MIN_EVENTS = 5
HISTORY_TRAIN_CUTOFFS = 13   # every SNAPSHOT_STEP_DAYS, ending where the test window begins


@dataclass(frozen=True)
class CategoryHistories:
    category: str
    histories: dict[str, ShopperHistory]
    data_end: int          # exclusive: midnight after the last event
    test: int              # CHURN_HORIZON_DAYS before data_end
    train: tuple[int, ...]


def category_histories(data_dir: Path) -> list[CategoryHistories]:
    """Per category with timestamps (Toys has none), its shoppers as the
    profile service stores them, and the cutoffs of its snapshots."""
    interactions = shopping.chronological(shopping.load_interactions(data_dir)).dropna(subset=["timestamp"])
    found = category_histories_of({category: list(benchmark_stored_events(events))
                                   for category, events in interactions.groupby("category")})
    if not found:
        raise DataError(f"{data_dir}: no dated review histories to learn churn from")
    return found


def category_histories_of(by_category: dict[str, list[StoredEvent]]) -> list[CategoryHistories]:
    """Each category's dated events as shopper histories, with the category's
    own cutoffs (its data ends when its data set does, not when the newest
    category's does); categories without dated events are left out."""
    found = []
    for category, events in sorted(by_category.items()):
        times = [e.ts for e in events if e.ts is not None]
        if not times:
            continue
        end = (int(max(times)) // DAY + 1) * DAY
        test = end - CHURN_HORIZON_DAYS * DAY
        train = tuple(test - CHURN_HORIZON_DAYS * DAY - k * SNAPSHOT_STEP_DAYS * DAY
                      for k in range(HISTORY_TRAIN_CUTOFFS))
        found.append(CategoryHistories(category, histories_of(e for e in events if e.ts is not None), end, test,
                                       train))
    return found


def history_snapshots(categories: Sequence[CategoryHistories], which: str) -> pd.DataFrame:
    """Every category's snapshots at its `which` ("train" or "test") cutoffs."""
    frames = []
    for found in categories:
        cutoffs = found.train if which == "train" else (found.test,)
        frames += [snapshot(found.histories, at, found.data_end, HISTORY_MIN_EVENTS).assign(category=found.category)
                   for at in cutoffs]
    return pd.concat(frames, ignore_index=True)


def evaluate_history_churn(model: dict, retail_churn: dict, retail_btyd: BTYD, test: pd.DataFrame) -> dict:
    """Per category at its test cutoff: the model, the retailer's churn model
    (what these shoppers were served before), BG/NBD refitted on the
    category's shoppers, and recency alone."""
    from sklearn.metrics import roc_auc_score

    from recsys_core.signals.btyd import BGNBD

    report = {}
    for category, frame in test.groupby("category"):
        frame = frame.reset_index(drop=True)
        churned = frame.churned.to_numpy().astype(int)
        if len(set(churned)) < 2:  # a small or custom data set: nothing to rank
            report[category] = {"cutoff": date(int(frame.as_of.iloc[0])), "shoppers": len(frame),
                                "skipped": "every shopper had the same outcome"}
            continue
        refitted = BGNBD.fit(frame.x, frame.t_x, frame["T"])
        report[category] = {
            "cutoff": date(int(frame.as_of.iloc[0])), "shoppers": len(frame), "churn_rate": float(churned.mean()),
            "model": churn_metrics(predict(model, frame), churned),
            "retail_model": churn_metrics(predict(retail_churn, frame.assign(**btyd_columns(frame, retail_btyd))),
                                          churned),
            "bgnbd_refitted": churn_metrics(refitted.p_no_purchase(CHURN_HORIZON_DAYS, frame.x, frame.t_x, frame["T"]),
                                            churned),
            "recency_only": {"roc_auc": float(roc_auc_score(churned, frame.recency_days.to_numpy()))},
        }
    return report


# --- the run --------------------------------------------------------------

def date(ts: int) -> str:
    return pd.Timestamp(ts, unit="s").strftime("%Y-%m-%d")


def train_and_evaluate(data_dir: Path, histories_dir: Path, seed: int = 0) -> tuple[dict, dict]:
    """(report, artifact): the evaluation of the model and of BG/NBD + Gamma-Gamma
    on the held-out periods, and the served models refitted on every snapshot.
    The churn model of shoppers without amounts learns from `histories_dir`'s
    review histories, tested out of time in each category."""
    from sklearn.metrics import roc_auc_score

    started = time.monotonic()
    lines, cleaning = clean(load_transactions(data_dir))
    events = retail_events(lines)
    cutoffs = choose_cutoffs(events)
    histories = shopper_histories(events)
    log.info("%d customers, %d product lines; data %s..%s", len(histories), len(events),
             date(cutoffs.data_start), date(cutoffs.data_end))

    # Churn and 3-month spend: out of time. The baseline is the posterior the
    # model starts from, fitted on the test cutoff's customers.
    train = snapshots(histories, cutoffs.churn_train, cutoffs.data_end)
    test, btyd = with_posterior(snapshot(histories, cutoffs.churn_test, cutoffs.data_end))
    season = SeasonCalendar.of(events.timestamp.to_numpy(), events.amount.to_numpy())
    churn_model = fit_churn(train)
    spend_3m_model = fit_spend(train, "3m", seed, season, known_until=cutoffs.churn_test, purchase=churn_model)
    baseline = baseline_predictions(btyd, test)
    model_churn, model_spend_3m = predict(churn_model, test), predict(spend_3m_model, test)
    churned = test.churned.to_numpy().astype(int)
    recent = (test.recency_days <= 365).to_numpy()
    churn = {
        "model": churn_metrics(model_churn, churned),
        "bgnbd": churn_metrics(baseline["churn"], churned),
        "recency_only": {"roc_auc": float(roc_auc_score(churned, test.recency_days.to_numpy()))},
        "model_bought_within_365d": churn_metrics(model_churn[recent], churned[recent]),
        "bgnbd_bought_within_365d": churn_metrics(baseline["churn"][recent], churned[recent]),
        "reliability": {"model": reliability(model_churn, churned), "bgnbd": reliability(baseline["churn"], churned)},
    }
    actual_3m = test.spend_3m.to_numpy()
    spend_3m = {"model": spend_metrics(model_spend_3m, actual_3m),
                "bgnbd_gg": spend_metrics(baseline["spend_3m"], actual_3m),
                "last_90d": spend_metrics(np.maximum(test.net_spend_90d.to_numpy(), 0), actual_3m),
                "poisson_over_seasonal_index": spend_metrics(
                    predict(fit_spend(train, "3m", seed, season, known_until=cutoffs.churn_test), test), actual_3m),
                "seasonal_index": {"forecast": season.forecast_index(cutoffs.churn_test),
                                   "actual": season.index(cutoffs.churn_test, cutoffs.data_end)},
                "model_minus_bgnbd_gg": paired_bootstrap(model_spend_3m, baseline["spend_3m"], actual_3m, seed)}

    # 12-month spend: one cutoff has a 12-month outcome, so the test is on
    # held-out customers; the model learns from the other half.
    year, year_btyd = with_posterior(snapshot(histories, cutoffs.year_test, cutoffs.data_end))
    test_half = year.user_id.map(held_out).to_numpy()
    year_train, year_test = year[~test_half], year[test_half].reset_index(drop=True)
    spend_12m_model = fit_spend(year_train, "12m", seed)
    model_spend_12m = predict(spend_12m_model, year_test)
    baseline_12m = baseline_predictions(year_btyd, year_test)["spend_12m"]
    actual_12m = year_test.spend_12m.to_numpy()
    spend_12m = {"model": spend_metrics(model_spend_12m, actual_12m),
                 "bgnbd_gg": spend_metrics(baseline_12m, actual_12m),
                 "last_365d": spend_metrics(np.maximum(year_test.net_spend_365d.to_numpy(), 0), actual_12m),
                 "model_minus_bgnbd_gg": paired_bootstrap(model_spend_12m, baseline_12m, actual_12m, seed)}

    # Shoppers without amounts: out of time, at each category's test cutoff.
    categories = category_histories(histories_dir)
    history_train, history_test = history_snapshots(categories, "train"), history_snapshots(categories, "test")
    if "churned" not in history_train or history_train.churned.nunique() < 2:
        raise DataError(f"{histories_dir}: too few dated review histories to learn churn from "
                        f"({len(history_train)} snapshot rows of shoppers with {HISTORY_MIN_EVENTS}+ events)")
    history_churn = evaluate_history_churn(fit_churn(history_train, NO_AMOUNT_CHURN_COLUMNS), churn_model, btyd,
                                           history_test)

    report = {
        "data": str(data_dir),
        "cleaning": cleaning,
        "horizons_days": {"churn": CHURN_HORIZON_DAYS, **SPEND_HORIZONS},
        "cutoffs": {
            "data": [date(cutoffs.data_start), date(cutoffs.data_end)],
            "churn_and_3m_test": date(cutoffs.churn_test),
            "churn_and_3m_train": [date(cutoffs.churn_train[-1]), date(cutoffs.churn_train[0])],
            "churn_and_3m_train_every_days": SNAPSHOT_STEP_DAYS,
            "12m_test": date(cutoffs.year_test),
        },
        "rows": {"churn_and_3m_train": len(train), "churn_and_3m_test": len(test),
                 "12m_train": len(year_train), "12m_test": len(year_test)},
        "btyd_at_churn_test": btyd.describe(),
        "btyd_at_12m_test": year_btyd.describe(),
        "churn": churn,
        "spend_3m": spend_3m,
        "spend_12m": spend_12m,
        "churn_without_amounts": {
            "data": str(histories_dir), "min_events_before_cutoff": HISTORY_MIN_EVENTS,
            "train_cutoffs": {c.category: [date(c.train[-1]), date(c.train[0])] for c in categories},
            "rows": {"train": len(history_train), "test": len(history_test)},
            "categories": history_churn,
        },
        "ece_bins": f"{ECE_BINS} equal-width bins",
        "top_decile": "customers ranked by predicted value (primary) or by actual value; "
                      "signed relative error of the predicted total",
    }
    report["targets"] = targets(report)

    # The served models learn from every snapshot whose outcome is known, and
    # read the posterior of BG/NBD + Gamma-Gamma fitted at the end of the data.
    served_btyd = with_posterior(snapshot(histories, cutoffs.data_end, cutoffs.data_end))[1]
    served_train = pd.concat([train, test], ignore_index=True)
    served_churn = fit_churn(served_train)
    artifact = {
        "features": FEATURES,
        "churn_horizon_days": CHURN_HORIZON_DAYS,
        "spend_horizon_days": SPEND_HORIZONS,
        "btyd": served_btyd,
        "models": {"churn": served_churn,
                   "churn_without_amounts": fit_churn(pd.concat([history_train, history_test], ignore_index=True),
                                                      NO_AMOUNT_CHURN_COLUMNS),
                   "spend_3m": fit_spend(served_train, "3m", seed, season, known_until=cutoffs.data_end,
                                         purchase=served_churn),
                   "spend_12m": fit_spend(year, "12m", seed)},
        "trained_on": {"data": str(data_dir), "snapshot_rows_churn_3m": len(served_train),
                       "snapshot_rows_12m": len(year), "btyd_as_of": date(cutoffs.data_end),
                       "histories": str(histories_dir),
                       "snapshot_rows_churn_without_amounts": len(history_train) + len(history_test)},
    }
    digest = hashlib.sha256(pd.util.hash_pandas_object(events, index=False).to_numpy().tobytes())
    digest.update(pd.util.hash_pandas_object(history_train, index=False).to_numpy().tobytes())
    digest.update(repr((FEATURES, CHURN_COLUMNS, NO_AMOUNT_CHURN_COLUMNS, SPEND_3M_COLUMNS, "3m: P(buy) x seasonal Gamma", SPEND_12M_COLUMNS, seed)).encode())
    artifact["version"] = report["model_version"] = f"retail-{digest.hexdigest()[:10]}"
    report["seconds"] = round(time.monotonic() - started, 1)
    report["_plot_data"] = {
        "churn": (model_churn, baseline["churn"], churned),
        "spend_3m": (model_spend_3m, baseline["spend_3m"], actual_3m),
        "spend_12m": (model_spend_12m, baseline_12m, actual_12m),
    }
    return report, artifact


def targets(report: dict) -> dict:
    churn, s3, s12 = report["churn"]["model"], report["spend_3m"], report["spend_12m"]

    def beats(spend: dict) -> dict:
        return {
            "spearman": spend["model"]["spearman"] > spend["bgnbd_gg"]["spearman"],
            "top_decile_error": abs(spend["model"]["top_decile_error"]["by_predicted"])
            < abs(spend["bgnbd_gg"]["top_decile_error"]["by_predicted"]),
        }

    return {"churn_roc_auc_at_least_0.80": churn["roc_auc"] >= 0.80,
            "spend_3m_beats_bgnbd_gg": beats(s3), "spend_12m_beats_bgnbd_gg": beats(s12)}


def save_artifact(artifact: dict, path: Path) -> Path:
    import joblib

    with replacing(path) as partial:
        joblib.dump(artifact, partial)
    return path


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """The reliability diagram of the churn forecasts and the decile charts of the spend forecasts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    model_churn, baseline_churn, churned = report["_plot_data"]["churn"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for name, probabilities, style in (("model", model_churn, "o-"), ("BG/NBD", baseline_churn, "s-")):
        points = reliability(probabilities, churned)
        ax.plot([p["predicted"] for p in points], [p["observed"] for p in points], style,
                label=f"{name} (ECE {expected_calibration_error(probabilities, churned):.3f})")
    ax.set_xlabel(f"predicted P(no purchase in {CHURN_HORIZON_DAYS} days)")
    ax.set_ylabel("observed churn rate")
    ax.set_title(f"Churn reliability, test cutoff {report['cutoffs']['churn_and_3m_test']}\n"
                 f"({ECE_BINS} equal-width bins, {len(churned)} customers)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    reliability_png = out_dir / "value_churn_reliability.png"
    fig.savefig(reliability_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, horizon in zip(axes, ("3m", "12m")):
        model, baseline, actual = report["_plot_data"][f"spend_{horizon}"]
        for offset, (name, predicted, colour) in enumerate((("model", model, "tab:blue"), ("BG/NBD+GG", baseline, "tab:orange"))):
            order = np.argsort(-predicted, kind="stable")
            deciles = np.array_split(order, 10)
            positions = np.arange(1, 11) + (offset - 0.5) * 0.4
            ax.bar(positions, [predicted[d].sum() for d in deciles], width=0.4, color=colour, alpha=0.8,
                   label=f"{name}: predicted")
            ax.plot(positions, [actual[d].sum() for d in deciles], "k_", markersize=12, mew=2,
                    label="actual spend of the decile" if offset == 0 else None)
        ax.set_yscale("log")
        ax.set_xticks(range(1, 11))
        ax.set_xlabel("decile of customers by predicted spend (1 = highest)")
        ax.set_ylabel("total spend in the decile")
        test_at = report["cutoffs"]["churn_and_3m_test" if horizon == "3m" else "12m_test"]
        ax.set_title(f"{horizon} spend after {test_at}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    deciles_png = out_dir / "value_spend_deciles.png"
    fig.savefig(deciles_png, dpi=110)
    plt.close(fig)
    return [reliability_png, deciles_png]


def print_report(report: dict) -> None:
    c, s3, s12 = report["churn"], report["spend_3m"], report["spend_12m"]
    print(f"data {report['data']}: {report['cleaning']['customers']} customers, "
          f"{report['cleaning']['kept_lines']} product lines ({report['cleaning']['cancelled_lines']} cancelled)")
    print(f"churn / 3m test at {report['cutoffs']['churn_and_3m_test']} ({report['rows']['churn_and_3m_test']} customers, "
          f"trained on {report['rows']['churn_and_3m_train']} snapshot rows); "
          f"12m test at {report['cutoffs']['12m_test']} ({report['rows']['12m_test']} held-out customers)")
    print(f"{'':<12} {'churn AUC':>9} {'ECE':>6} {'Spear 3m':>8} {'top10% 3m':>9} {'Spear 12m':>9} {'top10% 12m':>10}")
    rows = (("model", c["model"], s3["model"], s12["model"]),
            ("BG/NBD+GG", c["bgnbd"], s3["bgnbd_gg"], s12["bgnbd_gg"]))
    for name, churn, three, twelve in rows:
        print(f"{name:<12} {churn['roc_auc']:>9.3f} {churn['ece']:>6.3f} {three['spearman']:>8.3f} "
              f"{three['top_decile_error']['by_predicted']:>+9.1%} {twelve['spearman']:>9.3f} "
              f"{twelve['top_decile_error']['by_predicted']:>+10.1%}")
    index = s3["seasonal_index"]
    before = s3["poisson_over_seasonal_index"]
    print(f"3m Poisson over the seasonal index, served before (index forecast {index['forecast']:.2f}, "
          f"actual {index['actual']:.2f}): Spearman {before['spearman']:.3f}, "
          f"top10% {before['top_decile_error']['by_predicted']:+.1%}")
    for horizon in ("3m", "12m"):
        gap = report[f"spend_{horizon}"]["model_minus_bgnbd_gg"]
        print(f"{horizon} model minus BG/NBD+GG ({gap['rounds']} bootstrap rounds, 95% interval): "
              f"Spearman {gap['spearman']['mean']:+.4f} [{gap['spearman']['low']:+.4f}, {gap['spearman']['high']:+.4f}], "
              f"|top10% error| {gap['abs_top_decile_error']['mean']:+.3f} "
              f"[{gap['abs_top_decile_error']['low']:+.3f}, {gap['abs_top_decile_error']['high']:+.3f}]")
    history = report["churn_without_amounts"]
    print(f"churn of shoppers without amounts ({history['data']}, shoppers with {history['min_events_before_cutoff']}+ "
          f"events before the cutoff), ROC-AUC / ECE:")
    for category, figures in history["categories"].items():
        if "skipped" in figures:
            print(f"  {category:<22} {figures['cutoff']} {figures['shoppers']:>6} shoppers: {figures['skipped']}")
            continue
        print(f"  {category:<22} {figures['cutoff']} {figures['shoppers']:>6} shoppers: "
              f"model {figures['model']['roc_auc']:.3f} / {figures['model']['ece']:.3f}, "
              f"retail model {figures['retail_model']['roc_auc']:.3f} / {figures['retail_model']['ece']:.3f}, "
              f"BG/NBD refitted {figures['bgnbd_refitted']['roc_auc']:.3f} / {figures['bgnbd_refitted']['ece']:.3f}, "
              f"recency {figures['recency_only']['roc_auc']:.3f}")
    print(f"targets: {json.dumps(report['targets'])}")
    print(f"model {report['model_version']} -> {report.get('artifact')}")


def train_value_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys train-value", description=(
        "Train churn and 3/12-month spend models on Online Retail invoices, evaluate them "
        "beside BG/NBD + Gamma-Gamma on held-out periods, save the served models."))
    parser.add_argument("--data", type=Path, default=BUNDLED_RETAIL_DIR,
                        help=f"Online Retail directory (default: the bundled subset; the full set: {SHARED_RETAIL_DIR})")
    parser.add_argument("--histories", type=Path, default=BUNDLED_DATA_DIR,
                        help="Amazon review histories (interactions.csv.gz) for the churn model of shoppers "
                             f"without amounts (default: the bundled subset; the full set: {shared_data_dir()})")
    parser.add_argument("--out", type=Path, help=f"directory for {ARTIFACT_FILE} and report.json "
                        f"(default: {default_artifact_path().parent})")
    parser.add_argument("--plots", type=Path, help="write the reliability and decile PNGs here")
    parser.add_argument("--threads", type=int, default=1, help="threads for tree fitting (the machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    versions.add_register_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from threadpoolctl import threadpool_limits

    try:
        with threadpool_limits(limits=args.threads):
            report, artifact = train_and_evaluate(args.data, args.histories, args.seed)
    except (RetailDataError, DataError) as error:
        print(f"recsys train-value: {error}", file=sys.stderr)
        return 2
    out_dir = args.out if args.out is not None else default_artifact_path().parent
    report["artifact"] = str(save_artifact(artifact, out_dir / ARTIFACT_FILE))
    if args.plots:
        report["plots"] = [str(p) for p in plot_report(report, args.plots)]
    del report["_plot_data"]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    if args.register:
        register_value(args, out_dir, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def register_value(args, out_dir: Path, report: dict) -> None:
    """The served artifact and its report, as the next `value` version: the
    data window is the invoices' span, the metrics the held-out figures."""
    import shutil
    import tempfile

    churn, s3, s12 = report["churn"]["model"], report["spend_3m"]["model"], report["spend_12m"]["model"]
    window = {"first_event": report["cutoffs"]["data"][0], "last_event": report["cutoffs"]["data"][1],
              "events": report["cleaning"]["kept_lines"], "shoppers": report["cleaning"]["customers"],
              "histories": report["churn_without_amounts"]["data"]}
    metrics = {"churn_roc_auc": churn["roc_auc"], "churn_ece": churn["ece"], "spend_3m_spearman": s3["spearman"],
               "spend_12m_spearman": s12["spearman"]}
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging) / "value"
        folder.mkdir()
        shutil.copy2(out_dir / ARTIFACT_FILE, folder / ARTIFACT_FILE)
        shutil.copy2(out_dir / "report.json", folder / "report.json")
        registered = versions.register(args, "value", folder, window, metrics, data=str(args.data),
                                       model_version=report["model_version"])
    print(f"registered {registered.label}", file=sys.stderr)
