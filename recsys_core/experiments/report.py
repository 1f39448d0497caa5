"""What each A/B arm's exposures led to: attribution of later events, per-arm
hit rate, NDCG, conversions and value with 95 % confidence intervals, and a
plot (`recsys ab-report`; docs/operations.md, "A/B arms").

Attribution, computed when the report is made from what the store holds (an
exposure log and the shoppers' events), so nothing is decided at ingestion
and a longer window can be asked for later:

- An exposure is one Recommend reply: shopper, arm, the model that ranked
  it, the items in the order shown, the time shown.
- Its later interactions are the shopper's events of any type dated in
  [shown, shown + window]; `relevant` is the set of their items.
- hit@k: 1 when one of the first k shown items is relevant.
- NDCG@k: binary relevance of the first k shown items, discounted by
  log2(position + 1), over the ideal for min(|relevant|, k) relevant items;
  0 when nothing was interacted with (such an exposure counts, as a miss).
- A purchase is a conversion of the arm whose exposure showed its item to
  its shopper most recently before it within the window (last touch): each
  purchase counts once, for one arm, or for none when no exposure showed the
  item. Its amount (the shop's money, quantity x price, negative for a
  return) is the arm's value; purchases without an amount convert but add
  no value.

Intervals: a percentile bootstrap over shoppers (2,000 resamples by
default, seeded): shoppers are drawn with replacement within each arm and
every metric is recomputed from the drawn shoppers' exposures. Resampling
shoppers rather than exposures keeps a shopper's many exposures together,
which are not independent of each other (Wilson or normal intervals over
exposures would be too narrow). The differences to the first arm draw each
arm's shoppers independently.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from recsys_core.store.events import PURCHASE, StoredEvent, StoredExposure

DEFAULT_K = 10
DEFAULT_WINDOW_SECONDS = 7 * 24 * 3600
DEFAULT_RESAMPLES = 2000
METRICS = ("hit_rate", "ndcg", "conversion_rate", "value_per_shopper")


@dataclass(frozen=True)
class Outcome:
    """What one exposure led to."""

    user_id: str
    arm: str
    model_version: str
    hit: float
    ndcg: float
    conversions: int = 0
    value: float = 0.0


def ndcg_at(shown: Sequence[str], relevant: set[str], k: int) -> float:
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(position + 2) for position, item in enumerate(shown[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(position + 2) for position in range(min(len(relevant), k)))
    return dcg / ideal


def attribute(exposures: Iterable[StoredExposure], events_of: Mapping[str, Sequence[StoredEvent]],
              window_seconds: int = DEFAULT_WINDOW_SECONDS, k: int = DEFAULT_K) -> list[Outcome]:
    """Each exposure's outcome (module docstring): hit and NDCG from the
    shopper's events in its window, conversions and value from the purchases
    it was the last touch for."""
    by_user: dict[str, list[StoredExposure]] = defaultdict(list)
    for exposure in exposures:
        by_user[exposure.user_id].append(exposure)
    outcomes = []
    for user_id, shown in by_user.items():
        shown.sort(key=lambda e: (e.ts, e.exposure_id))
        events = [e for e in events_of.get(user_id, ()) if e.ts is not None]
        conversions = [0] * len(shown)
        value = [0.0] * len(shown)
        for event in events:
            if event.type != PURCHASE:
                continue
            # The latest exposure before it that showed the item, within the window.
            for position in range(len(shown) - 1, -1, -1):
                exposure = shown[position]
                if exposure.ts > event.ts:
                    continue
                if event.ts - exposure.ts > window_seconds:
                    break
                if event.item_id in exposure.item_ids:
                    conversions[position] += 1
                    value[position] += event.amount or 0.0
                    break
        for position, exposure in enumerate(shown):
            relevant = {e.item_id for e in events if exposure.ts <= e.ts <= exposure.ts + window_seconds}
            top = exposure.item_ids[:k]
            outcomes.append(Outcome(user_id, exposure.arm, exposure.model_version,
                                    hit=1.0 if relevant.intersection(top) else 0.0,
                                    ndcg=ndcg_at(exposure.item_ids, relevant, k),
                                    conversions=conversions[position], value=value[position]))
    return outcomes


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


@dataclass
class ArmReport:
    arm: str
    shoppers: int
    exposures: int
    conversions: int
    value: float
    # hit_rate, ndcg, conversion_rate (conversions per exposure), value_per_shopper.
    metrics: dict[str, Estimate]
    # The same metrics' difference to the first arm (absent for the first).
    versus_first: dict[str, Estimate] = field(default_factory=dict)
    # Exposures per model that ranked them ("" : unranked, e.g. cold start).
    model_versions: dict[str, int] = field(default_factory=dict)


def _per_shopper(outcomes: Sequence[Outcome]) -> np.ndarray:
    """[shoppers, 5]: exposures, hits, NDCG sum, conversions, value."""
    rows: dict[str, list[float]] = {}
    for o in outcomes:
        row = rows.setdefault(o.user_id, [0.0] * 5)
        row[0] += 1
        row[1] += o.hit
        row[2] += o.ndcg
        row[3] += o.conversions
        row[4] += o.value
    return np.asarray(list(rows.values()), dtype=np.float64).reshape(len(rows), 5)


def _metrics(sums: np.ndarray, shoppers: np.ndarray) -> np.ndarray:
    """sums: [..., 5] totals over drawn shoppers; shoppers: how many were drawn."""
    exposures = np.maximum(sums[..., 0], 1e-12)
    return np.stack([sums[..., 1] / exposures, sums[..., 2] / exposures, sums[..., 3] / exposures,
                     sums[..., 4] / np.maximum(shoppers, 1)], axis=-1)


def _replicates(table: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, len(METRICS)]: the metrics over shoppers drawn with replacement."""
    n = len(table)
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)  # times each shopper is drawn
    return _metrics(draws @ table, np.full(resamples, n))


def summarise(outcomes: Sequence[Outcome], arms: Sequence[str] | None = None, resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0) -> list[ArmReport]:
    """One ArmReport per arm (in `arms`' order, else first seen), each metric
    with its 95 % percentile-bootstrap interval over shoppers."""
    rng = np.random.default_rng(seed)
    by_arm: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_arm[outcome.arm].append(outcome)
    order = list(arms) if arms else list(by_arm)
    reports, replicates = [], []
    for arm in order:
        chosen = by_arm.get(arm, [])
        table = _per_shopper(chosen)
        versions: dict[str, int] = defaultdict(int)
        for o in chosen:
            versions[o.model_version] += 1
        if len(table):
            point = _metrics(table.sum(axis=0), np.asarray(len(table)))
            draws = _replicates(table, resamples, rng)
            low, high = np.percentile(draws, [2.5, 97.5], axis=0)
        else:
            point = low = high = np.full(len(METRICS), np.nan)
            draws = None
        replicates.append(draws)
        reports.append(ArmReport(
            arm=arm, shoppers=len(table), exposures=len(chosen), conversions=int(sum(o.conversions for o in chosen)),
            value=float(sum(o.value for o in chosen)),
            metrics={name: Estimate(float(point[i]), float(low[i]), float(high[i])) for i, name in enumerate(METRICS)},
            model_versions=dict(versions)))
    if reports and replicates[0] is not None:
        first = reports[0]
        for report, draws in zip(reports[1:], replicates[1:]):
            if draws is None:
                continue
            difference = draws - replicates[0]
            low, high = np.percentile(difference, [2.5, 97.5], axis=0)
            report.versus_first = {
                name: Estimate(report.metrics[name].value - first.metrics[name].value, float(low[i]), float(high[i]))
                for i, name in enumerate(METRICS)}
    return reports


def as_json(reports: Sequence[ArmReport], **context) -> str:
    return json.dumps({**context, "arms": [asdict(r) for r in reports]}, indent=2)


def _interval(estimate: Estimate, percent: bool, digits: int = 2) -> str:
    if math.isnan(estimate.value):
        return "-"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    return (f"{estimate.value * scale:.{digits}f}{unit} [{estimate.low * scale:.{digits}f}, "
            f"{estimate.high * scale:.{digits}f}]")


def as_text(reports: Sequence[ArmReport], experiment: str, window_seconds: int, k: int) -> str:
    lines = [f"experiment {experiment!r}: attribution window {window_seconds / 3600:g} h, k={k}; "
             "95 % intervals: percentile bootstrap over shoppers"]
    header = (f"{'arm':<14}{'shoppers':>9}{'exposures':>10}  {'hit@' + str(k):<24}{'NDCG@' + str(k):<24}"
              f"{'conv.':>6}  {'conv./exposure':<24}{'value':>10}  {'value/shopper':<24}")
    lines.append(header)
    for r in reports:
        m = r.metrics
        lines.append(f"{r.arm:<14}{r.shoppers:>9}{r.exposures:>10}  {_interval(m['hit_rate'], True):<24}"
                     f"{_interval(m['ndcg'], False, 3):<24}{r.conversions:>6}  {_interval(m['conversion_rate'], True):<24}"
                     f"{r.value:>10.2f}  {_interval(m['value_per_shopper'], False):<24}")
    for r in reports:
        ranked = ", ".join(f"{v or 'unranked'}: {n}" for v, n in sorted(r.model_versions.items()))
        lines.append(f"  {r.arm}: exposures by model: {ranked or '-'}")
        if r.versus_first:
            d = r.versus_first
            lines.append(f"  {r.arm} - {reports[0].arm}: hit@{k} {_interval(d['hit_rate'], True)}, "
                         f"NDCG@{k} {_interval(d['ndcg'], False, 3)}, conv./exposure "
                         f"{_interval(d['conversion_rate'], True)}, "
                         f"value/shopper {_interval(d['value_per_shopper'], False)}")
    return "\n".join(lines)


def plot(reports: Sequence[ArmReport], path, experiment: str, k: int) -> None:
    """One panel per metric: each arm's estimate with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"hit_rate": f"hit rate@{k}", "ndcg": f"NDCG@{k}", "conversion_rate": "conversions per exposure",
              "value_per_shopper": "value per shopper"}
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    names = [r.arm for r in reports]
    for axis, metric in zip(axes, METRICS):
        values = np.asarray([r.metrics[metric].value for r in reports], dtype=float)
        low = np.asarray([r.metrics[metric].low for r in reports], dtype=float)
        high = np.asarray([r.metrics[metric].high for r in reports], dtype=float)
        errors = np.nan_to_num(np.vstack([values - low, high - values]))
        axis.bar(names, np.nan_to_num(values), yerr=errors, capsize=6, color=[f"C{i}" for i in range(len(names))])
        axis.set_title(titles[metric])
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"A/B experiment {experiment!r} (95 % bootstrap intervals over shoppers)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@dataclass
class Collected:
    experiment: str
    exposures: list[StoredExposure]
    events_of: dict[str, list[StoredEvent]]
    # Every experiment the store holds exposures of.
    experiments: list[str]


def collect(store, since: int | None = None, experiment: str | None = None) -> Collected:
    """The exposures of one experiment (default: the one shown most recently)
    and their shoppers' events, read from an EventStore."""
    every = list(store.exposures(since))
    latest: dict[str, int] = {}
    for exposure in every:
        latest[exposure.experiment] = max(latest.get(exposure.experiment, exposure.ts), exposure.ts)
    if experiment is None:
        experiment = max(latest, key=latest.get) if latest else ""
    chosen = [e for e in every if e.experiment == experiment]
    users = sorted({e.user_id for e in chosen})
    return Collected(experiment, chosen, {user: store.user_events(user) for user in users},
                     sorted(latest, key=latest.get))
