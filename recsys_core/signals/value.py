"""Churn and lifetime value of one shopper, from their stored events.

The features below are the only definition of what the models see: training
(training/value.py) turns invoices into StoredEvents and calls the
same ShopperHistory, btyd_columns and design, so a served forecast reads
exactly what the model learnt from. docs/profiles.md ("Churn and lifetime
value") has the definitions and the measured quality.

The models stand on the BG/NBD + Gamma-Gamma posterior of the shopper
(recsys_core/signals/btyd.py) and correct it with what that model cannot see: last
year's purchases in the coming season, recent activity, cancellations, basket
breadth. Money is optional: the churn models read only timing and counts, so
shoppers whose events carry no amounts (the Amazon benchmark shoppers) still
get a churn probability; only the spend forecasts need amounts. Those
shoppers get a churn model of their own, trained on such histories: a
reviewer's rhythm is not a gift shop customer's.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import ThreadpoolController

from recsys_core.signals.btyd import BTYD
from recsys_core.store.events import PURCHASE, RATING, REVIEW, StoredEvent

if TYPE_CHECKING:
    import pandas as pd

    from recsys_core.models.registry import ModelVersion

DAY = 86_400
# Churn: no purchase in the 90 days after as_of. Spend: net spend in the next
# 90 ("3 months") and 365 ("12 months") days.
CHURN_HORIZON_DAYS = 90
SPEND_HORIZONS = {"3m": 90, "12m": 365}
# Each of these says the shopper bought the item: the benchmark's ratings and
# reviews are of bought items. Views are not purchases.
BUYING_TYPES = (PURCHASE, RATING, REVIEW)
# Below this tenure a purchase rate is mostly noise (one order yesterday is not
# "30 orders a month").
MIN_RATE_DAYS = 30.0

CHURN_FEATURES = (
    "recency_days",
    "tenure_days",
    "purchase_days",
    "purchase_days_90d",
    "purchase_days_180d",
    "purchase_days_365d",
    # Purchase days in the 90 days that followed the same date a year earlier:
    # a gift shop's customers come back for the same season.
    "purchase_days_next_90d_last_year",
    "purchase_days_per_30d",
    "mean_gap_days",
    "last_gap_days",
    "recency_over_mean_gap",
    "distinct_items",
    "lines_per_purchase_day",
    "cancelled_line_share",
)
MONEY_FEATURES = (
    "net_spend",
    "net_spend_90d",
    "net_spend_365d",
    "net_spend_next_90d_last_year",
    "mean_spend_per_purchase_day",
    "max_spend_per_purchase_day",
    "cancelled_amount_share",
)
SPEND_FEATURES = CHURN_FEATURES + MONEY_FEATURES
# The BG/NBD + Gamma-Gamma summary of the purchase days: x repeat purchase
# days, t_x first to last and T first purchase to as_of in days, m_x the mean
# value of the repeat days net of cancellations (NaN without amounts or repeats).
SUMMARY = ("x", "t_x", "T", "m_x")
FEATURES = SPEND_FEATURES + SUMMARY
# The posterior of the BG/NBD + Gamma-Gamma model fitted on the customer base.
BTYD_COLUMNS = ("btyd_logit_no_purchase", "btyd_log_spend_3m", "btyd_log_spend_12m")


@dataclass(frozen=True)
class SeasonCalendar:
    """The shop's net spend per day, to say how busy a 90-day window is
    against the year around it (its seasonal index). The 3-month spend model
    learns buyers' spend with the season divided out and forecasts it
    multiplied back by the index of the same window a year earlier: the
    seasonal-naive level of the whole shop (docs/profiles.md)."""
    first_day: int           # unix day number of daily[0]
    daily: np.ndarray        # net spend per day

    @classmethod
    def of(cls, timestamps: np.ndarray, amounts: np.ndarray) -> "SeasonCalendar":
        days = np.asarray(timestamps, dtype=np.int64) // DAY
        first = int(days.min())
        daily = np.bincount(days - first, weights=np.asarray(amounts, dtype=np.float64))
        return cls(first, daily)

    @property
    def start(self) -> int:
        return self.first_day * DAY

    @property
    def end(self) -> int:
        """Exclusive: midnight after the last day."""
        return (self.first_day + len(self.daily)) * DAY

    def spend(self, begin: int, end: int) -> float:
        first, last = (np.clip(t // DAY - self.first_day, 0, len(self.daily)) for t in (begin, end))
        return float(self.daily[first:last].sum())

    def index(self, at: int, known_until: int) -> float:
        """Spend in [at, at + 90 days) over the mean 90 days of the 365 around
        it; that year is moved to lie within what is known by `known_until`.
        1 where the calendar cannot say."""
        horizon, year = SPEND_HORIZONS["3m"] * DAY, 365 * DAY
        if at < self.start or at + horizon > min(known_until, self.end):
            return 1.0
        begin = max(self.start, min(at - year // 2, known_until - year))
        yearly = self.spend(begin, begin + year) * horizon / year
        window = self.spend(at, at + horizon)
        return window / yearly if yearly > 0 and window > 0 else 1.0

    def forecast_index(self, as_of: int) -> float:
        """The index expected for the 90 days after `as_of`: the same window
        a whole number of years earlier, the latest the calendar holds whole."""
        horizon, year = SPEND_HORIZONS["3m"] * DAY, 365 * DAY
        years_back = max(1, -(-(as_of + horizon - self.end) // year))
        return self.index(as_of - years_back * year, min(as_of, self.end))


@dataclass(frozen=True)
class ValueFeatures:
    values: dict[str, float]   # every name of FEATURES
    has_amounts: bool


@dataclass(frozen=True)
class PurchaseDays:
    """A shopper's purchases before some time, one entry per distinct day
    (the unit BG/NBD counts transactions in)."""
    days: np.ndarray          # day numbers (unix days), ascending
    gross_spend: np.ndarray   # bought amount per day (0 without amounts)
    net_ratio: float          # 1 - cancelled/bought amount, clipped to 0..1; 1 without amounts


class ShopperHistory:
    """One shopper's buying events as arrays, sorted by time.

    A cancellation is a buying event with a negative amount (the retail data's
    "C" invoices); events without a timestamp cannot be placed before or after
    a cutoff and are left out.
    """

    def __init__(self, events: Sequence[StoredEvent]):
        dated = [e for e in events if e.type in BUYING_TYPES and e.ts is not None]
        dated.sort(key=lambda e: e.ts)
        self.ts = np.asarray([e.ts for e in dated], dtype=np.int64)
        self.amount = np.asarray([np.nan if e.amount is None else e.amount for e in dated], dtype=np.float64)
        self.item_ids = np.asarray([e.item_id for e in dated], dtype=object)
        self.cancelled = self.amount < 0
        self.bought = ~self.cancelled
        self.day = self.ts // DAY
        self.has_amounts = bool(np.isfinite(self.amount).any())

    def count_before(self, as_of: int) -> int:
        """How many of the shopper's dated buying events (cancellations too) precede `as_of`."""
        return int(np.searchsorted(self.ts, as_of, side="left"))

    def purchase_days(self, as_of: int) -> PurchaseDays:
        end = self.count_before(as_of)
        bought = self.bought[:end]
        days, inverse = np.unique(self.day[:end][bought], return_inverse=True)
        amounts = np.nan_to_num(self.amount[:end], nan=0.0)
        gross_spend = np.bincount(inverse, weights=amounts[bought], minlength=len(days))
        gross, cancelled = amounts[bought].sum(), -amounts[~bought].sum()
        net_ratio = float(np.clip(1.0 - cancelled / gross, 0.0, 1.0)) if gross > 0 else 1.0
        return PurchaseDays(days, gross_spend, net_ratio)

    def features(self, as_of: int) -> ValueFeatures | None:
        """The models' inputs at `as_of` (unix seconds) from events strictly
        before it; None when the shopper had bought nothing by then."""
        end = self.count_before(as_of)
        purchases = self.purchase_days(as_of)
        days = purchases.days
        if len(days) == 0:
            return None
        now = as_of / DAY
        recency = now - days[-1]
        tenure = now - days[0]
        gaps = np.diff(days).astype(np.float64)
        mean_gap = float(gaps.mean()) if len(gaps) else math.nan
        lines_bought = int(self.bought[:end].sum())
        lines_cancelled = end - lines_bought
        values = {
            "recency_days": recency,
            "tenure_days": tenure,
            "purchase_days": float(len(days)),
            "purchase_days_90d": float((days >= now - 90).sum()),
            "purchase_days_180d": float((days >= now - 180).sum()),
            "purchase_days_365d": float((days >= now - 365).sum()),
            "purchase_days_next_90d_last_year": float(((days >= now - 365) & (days < now - 275)).sum()),
            "purchase_days_per_30d": 30.0 * len(days) / max(tenure, MIN_RATE_DAYS),
            "mean_gap_days": mean_gap,
            "last_gap_days": float(gaps[-1]) if len(gaps) else math.nan,
            "recency_over_mean_gap": recency / mean_gap if len(gaps) and mean_gap > 0 else math.nan,
            "distinct_items": float(len(set(self.item_ids[:end][self.bought[:end]]))),
            "lines_per_purchase_day": lines_bought / len(days),
            "cancelled_line_share": lines_cancelled / end,
            "x": float(len(days) - 1),
            "t_x": float(days[-1] - days[0]),
            "T": tenure,
            "m_x": math.nan,
        }
        amounts = self.amount[:end]
        has_amounts = bool(np.isfinite(amounts).any())
        if has_amounts:
            recent_90 = self.ts[:end] >= as_of - 90 * DAY
            recent_365 = self.ts[:end] >= as_of - 365 * DAY
            season_last_year = recent_365 & (self.ts[:end] < as_of - 275 * DAY)
            gross = float(purchases.gross_spend.sum())
            values.update({
                "net_spend": float(np.nansum(amounts)),
                "net_spend_90d": float(np.nansum(amounts[recent_90])),
                "net_spend_365d": float(np.nansum(amounts[recent_365])),
                "net_spend_next_90d_last_year": float(np.nansum(amounts[season_last_year])),
                "mean_spend_per_purchase_day": gross / len(days),
                "max_spend_per_purchase_day": float(purchases.gross_spend.max()),
                "cancelled_amount_share": float(-np.nansum(amounts[self.cancelled[:end]]) / gross) if gross > 0 else math.nan,
            })
            if len(days) > 1:
                values["m_x"] = float(purchases.gross_spend[1:].mean() * purchases.net_ratio)
        else:
            values.update({name: math.nan for name in MONEY_FEATURES})
        return ValueFeatures(values, has_amounts)

    def outcome(self, start: int, days: int) -> tuple[bool, float]:
        """What happened in [start, start + days): whether the shopper bought
        anything, and their net spend (purchases minus cancellations, at least
        0: refunds of older orders do not make a shopper worth less than
        nothing; NaN without amounts)."""
        first, end = self.count_before(start), self.count_before(start + days * DAY)
        bought = bool(self.bought[first:end].any())
        window = self.amount[first:end]
        spend = max(0.0, float(np.nansum(window))) if self.has_amounts else math.nan
        return bought, spend


def features(events: Sequence[StoredEvent], as_of: int) -> ValueFeatures | None:
    """The models' features for one shopper's events at `as_of` (unix seconds)."""
    return ShopperHistory(events).features(as_of)


def btyd_columns(values: Mapping[str, np.ndarray], btyd: BTYD) -> dict[str, np.ndarray]:
    """The BG/NBD + Gamma-Gamma posterior of each row's summary (x, t_x, T, m_x):
    log-odds of no purchase in the churn horizon, log expected spend per horizon."""
    x, t_x, T, m_x = (np.asarray(values[name], dtype=np.float64) for name in SUMMARY)
    quiet = np.clip(btyd.p_no_purchase(CHURN_HORIZON_DAYS, x, t_x, T), 1e-6, 1 - 1e-6)
    columns = {"btyd_logit_no_purchase": np.log(quiet / (1 - quiet))}
    for name, days in SPEND_HORIZONS.items():
        columns[f"btyd_log_spend_{name}"] = np.log(np.maximum(btyd.expected_spend(days, x, t_x, T, m_x), 1e-2))
    assert tuple(columns) == BTYD_COLUMNS
    return columns


def design(values: Mapping[str, np.ndarray], columns: Sequence[str]) -> np.ndarray:
    """The model matrix: posterior columns as they are, every other feature as
    sign(v) log(1 + |v|) (counts and money are long-tailed), undefined
    values (a gap with one purchase day, money without amounts) as 0."""
    matrix = []
    for name in columns:
        column = np.asarray(values[name], dtype=np.float64)
        if not name.startswith("btyd_"):
            column = np.nan_to_num(column, nan=0.0)
            column = np.sign(column) * np.log1p(np.abs(column))
        matrix.append(column)
    return np.column_stack(matrix)


def predict(model: dict, values: Mapping[str, np.ndarray], as_of: np.ndarray | int) -> np.ndarray:
    """One model's forecasts for rows of features made at `as_of` (per row,
    or one time for all): P(churn), or a spend, never below 0; times
    P(buy) = 1 - P(churn) when the model has a purchase part, and at the
    level of the coming season when it has a calendar."""
    estimator = model["estimator"]
    matrix = design(values, model["columns"])
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(matrix)[:, 1]
    spend = np.maximum(estimator.predict(matrix), 0.0)
    purchase: dict | None = model.get("purchase")
    if purchase is not None:
        spend = spend * (1.0 - predict(purchase, values, as_of))
    season: SeasonCalendar | None = model.get("season")
    if season is None:
        return spend
    times = np.broadcast_to(np.asarray(as_of, dtype=np.int64), spend.shape)
    factors = {int(t): season.forecast_index(int(t)) for t in np.unique(times)}
    return spend * np.array([factors[int(t)] for t in times])


@dataclass(frozen=True)
class ValueForecast:
    churn_probability: float
    churn_horizon_days: int
    # None when the shopper's events carry no amounts.
    expected_spend_3m: float | None
    expected_spend_12m: float | None
    as_of: int
    model_version: str


class ValueModelError(RuntimeError):
    pass


ARTIFACT_FILE = "value_model.joblib"
ARTIFACT_KEYS = {"version", "features", "churn_horizon_days", "spend_horizon_days", "btyd", "models"}


def default_artifact_path() -> Path:
    from recsys_core.data import paths

    return paths.cache_dir() / "value" / ARTIFACT_FILE


class ValueModel:
    """The churn and spend models written by `recsys train-value`."""

    def __init__(self, artifact: dict):
        missing = ARTIFACT_KEYS - artifact.keys()
        if missing:
            raise ValueModelError(f"value model artifact lacks {sorted(missing)}")
        if (tuple(artifact["features"]) != FEATURES or artifact["churn_horizon_days"] != CHURN_HORIZON_DAYS
                or dict(artifact["spend_horizon_days"]) != SPEND_HORIZONS):
            raise ValueModelError(
                f"value model {artifact['version']} was trained on other features or horizons than this code "
                "computes: retrain it (recsys train-value)")
        if "churn_without_amounts" not in artifact["models"]:
            raise ValueModelError(
                f"value model {artifact['version']} predates the churn model of shoppers without amounts: "
                "retrain it (recsys train-value)")
        if not {"season", "purchase"} <= artifact["models"].get("spend_3m", {}).keys():
            raise ValueModelError(
                f"value model {artifact['version']} predates the two-part seasonal 3-month spend model: "
                "retrain it (recsys train-value)")
        self.artifact = artifact
        self.version: str = artifact["version"]
        self.btyd: BTYD = artifact["btyd"]
        self.models = artifact["models"]
        self._threads = ThreadpoolController()

    @classmethod
    def load(cls, path: Path | str | None = None) -> "ValueModel":
        import joblib

        path = Path(path) if path is not None else default_artifact_path()
        if path.is_dir():
            path = path / ARTIFACT_FILE
        if not path.is_file():
            raise ValueModelError(f"no value model at {path}: train one with `recsys train-value`")
        try:
            artifact = joblib.load(path)
        except (ModuleNotFoundError, AttributeError) as error:
            # The artifact pickles our BTYD class by its module path, which
            # moved when the code was layered (recsys_core.btyd ->
            # recsys_core.signals.btyd).
            raise ValueModelError(
                f"value model at {path} was written by another version of the code ({error}): "
                "retrain it (recsys train-value)") from error
        return cls(artifact)

    def _predict(self, name: str, values: Mapping[str, np.ndarray], as_of: int) -> float:
        return float(predict(self.models[name], values, as_of)[0])

    def forecast(self, events: Sequence[StoredEvent], as_of: int) -> ValueForecast | None:
        """None when the shopper has no dated purchase before `as_of`."""
        found = features(events, as_of)
        if found is None:
            return None
        values = {name: np.asarray([value]) for name, value in found.values.items()}
        values.update(btyd_columns(values, self.btyd))
        # Boosted trees spread one row's prediction over OpenMP threads: on a
        # busy machine that costs ~80 ms instead of ~3.
        with self._threads.limit(limits=1, user_api="openmp"):
            churn = self._predict("churn" if found.has_amounts else "churn_without_amounts", values, as_of)
            spend_3m = self._predict("spend_3m", values, as_of) if found.has_amounts else None
            spend_12m = self._predict("spend_12m", values, as_of) if found.has_amounts else None
        return ValueForecast(churn, CHURN_HORIZON_DAYS, spend_3m, spend_12m, int(as_of), self.version)


def load_version(version: ModelVersion) -> ValueModel:
    """A registry `value` version (`recsys retrain --kind value`, `recsys
    train-value --register`) as served: its artifact, named in replies by its
    registry label (`value/3`) rather than its training digest."""
    model = ValueModel.load(version.path / ARTIFACT_FILE)
    model.version = version.label
    return model


def retail_stored_events(events: pd.DataFrame) -> Iterator[StoredEvent]:
    """Rows of retail_events() as the profile store keeps them: every line a
    PURCHASE, the cancellations with their negative amount."""
    for row in events.itertuples(index=False):
        yield StoredEvent(user_id=row.user_id, item_id=row.item_id, category=row.category, type=PURCHASE,
                          ts=int(row.timestamp), amount=float(row.amount), order_id=row.order_id)
