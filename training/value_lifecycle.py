"""`recsys retrain --kind value`: the churn and lifetime-value model retrained
on the event store, compared with the promoted version on the newest events,
and promoted only if it is not worse (issue #19).

What the store holds. Every event carries its shopper, item, category, type
and time; purchases loaded from invoices (PROFILE_RETAIL_DIR, or ingested
with an `amount`) carry their amount (negative: a cancellation) and order.
That is all `recsys train-value` learns from (recsys_core/signals/value.py
makes the features from StoredEvents), so nothing has to be derived: the
shoppers whose events carry amounts train the churn and spend models, those
without (the review histories) the churn model of shoppers without amounts.
The store lacks the item prices of events ingested without an amount: those
events count as purchase days, never as spend.

The holdout window is the churn horizon (90 days) before the newest event
with an amount, not --holdout-days: a churn or 3-month spend outcome needs
those 90 days whole. Nothing in it is trained on:
- churn and 3-month spend learn from snapshots every 30 days whose outcome
  window ends by the holdout cutoff (training/value.py's out-of-time
  protocol), the seasonal calendar from spend before the cutoff, BG/NBD +
  Gamma-Gamma from the histories at the cutoff;
- 12-month spend learns from the snapshot a year before the cutoff (the
  latest whose 12-month outcome is known by then); it is not judged on the
  holdout, which is 90 days long;
- churn of shoppers without amounts: per category, snapshots before that
  category's own test cutoff (its data ends when its data set does).
The candidate registered and served is the model that was evaluated, not a
refit on everything: what is promoted is what was measured.

Candidate and promoted version are scored by the same code on the same
holdout: the features of every shopper at the cutoff, each model's own
BG/NBD posterior and estimators, the outcomes in the window. Promoted when
each of churn ROC-AUC and 3-month spend Spearman (and churn ROC-AUC of the
shoppers without amounts, when the store has any) is no more than
`tolerance` below the promoted version's; the first version is promoted when
it exists. The models are convex fits (logistic, Poisson and Gamma
regressions; the trees of the 12-month model are refitted from the data), so
there is no warm start to take from the parent: it is the version compared
with and named as the parent. A promoted version trained by hand on data
that reaches into the window (`recsys train-value --register` fits on
everything) has seen the holdout outcomes: the comparison then favours it,
which errs on the side of keeping what serves.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from recsys_core.models.registry import Registry
from recsys_core.signals.value import (
    ARTIFACT_FILE, CHURN_HORIZON_DAYS, DAY, FEATURES, SPEND_HORIZONS, SeasonCalendar, ShopperHistory, ValueModel,
    ValueModelError, btyd_columns, load_version, predict,
)
from recsys_core.store.events import StoredEvent, EventStore
from training import value as training
from training.lifecycle import RetrainError, RetrainSettings, already_seen, decide, rounded, skip
from training.versions import iso

log = logging.getLogger("recsys.retrain")
KIND = "value"
# The figures the not-worse rule reads; the last only when the store has
# shoppers without amounts (and both versions could be scored on them).
KEYS = ("churn_roc_auc", "spend_3m_spearman")
NO_AMOUNT_KEY = "churn_without_amounts_roc_auc"


def store_histories(store: EventStore, progress: bool = True) -> dict[str, list[StoredEvent]]:
    """Every stored event, by shopper."""
    users = sorted({user_id for user_id, _, _ in store.user_items()})
    return {user_id: store.user_events(user_id)
            for user_id in tqdm(users, desc="reading events", unit="shopper", disable=not progress)}


def has_amounts(events: Iterable[StoredEvent]) -> bool:
    return any(e.amount is not None and math.isfinite(e.amount) for e in events)


@dataclass(frozen=True)
class ValueHoldout:
    """What both versions are scored on and what the candidate learns from."""
    cutoff: int                          # the holdout window starts here (unix seconds)
    data_end: int                        # exclusive: midnight after the newest event with an amount
    test: pd.DataFrame                   # shoppers with amounts: features at the cutoff, outcomes in the window
    train: pd.DataFrame                  # their snapshots before it (with their BG/NBD posterior)
    year: pd.DataFrame                   # the snapshot a year before the cutoff, 12-month outcome known by it
    season: SeasonCalendar               # the shop's spend per day before the cutoff
    history_train: pd.DataFrame          # shoppers without amounts: snapshots before each category's test cutoff
    history_test: pd.DataFrame           # and at it
    learnt: pd.DataFrame                 # user_id, category, timestamp of every event learnt from

    def describe(self) -> dict:
        cases = {"from": iso(self.cutoff), "to": iso(self.data_end), "days": CHURN_HORIZON_DAYS,
                 "shoppers": len(self.test), "churn_rate": round(float(self.test.churned.mean()), 5)}
        if len(self.history_test):
            cases["shoppers_without_amounts"] = len(self.history_test)
            cases["categories_without_amounts"] = sorted(self.history_test.category.unique().tolist())
        return cases


def holdout(by_user: dict[str, list[StoredEvent]], progress: bool = True) -> ValueHoldout:
    """Split the store's shoppers at the cutoffs of the module docstring."""
    with_amounts = {u: ShopperHistory(events) for u, events in by_user.items() if has_amounts(events)}
    if not with_amounts:
        raise RetrainError("no stored event carries an amount: the spend models need purchases with amounts "
                           "(PROFILE_RETAIL_DIR, or events ingested with `amount`)")
    times = np.concatenate([h.ts for h in with_amounts.values()])
    amounts = np.concatenate([h.amount for h in with_amounts.values()])
    if not len(times):
        raise RetrainError("no dated purchase carries an amount: a holdout window needs event times")
    start, data_end = int(times.min()) // DAY * DAY, (int(times.max()) // DAY + 1) * DAY
    cutoff = data_end - max(CHURN_HORIZON_DAYS, SPEND_HORIZONS["3m"]) * DAY
    year_cutoff = cutoff - SPEND_HORIZONS["12m"] * DAY
    if year_cutoff - start < training.MIN_HISTORY_DAYS * DAY:
        raise RetrainError(
            f"the purchases with amounts span {(data_end - start) / DAY:.0f} days; the value model needs "
            f"{CHURN_HORIZON_DAYS + SPEND_HORIZONS['12m'] + training.MIN_HISTORY_DAYS} (a 90-day holdout, a "
            f"12-month outcome before it, {training.MIN_HISTORY_DAYS} days of history before that)")
    train_cutoffs, at = [], cutoff - CHURN_HORIZON_DAYS * DAY
    while at - start >= training.MIN_HISTORY_DAYS * DAY:
        train_cutoffs.append(at)
        at -= training.SNAPSHOT_STEP_DAYS * DAY
    test = training.snapshot(with_amounts, cutoff, data_end)
    # Outcomes are "known" up to the cutoff only: nothing in the window is learnt from.
    frames = []
    for at in tqdm(train_cutoffs, desc="snapshots", unit="cutoff", disable=not progress):
        try:
            frames.append(training.with_posterior(training.snapshot(with_amounts, at, cutoff))[0])
        except ValueError as error:
            # The store's first months: too few customers yet to fit BG/NBD on.
            log.info("no training snapshot at %s: %s", iso(at), error)
    if not frames:
        raise RetrainError(f"too few shoppers with amounts before {iso(cutoff)} to learn from")
    train = pd.concat(frames, ignore_index=True)
    try:
        year = training.with_posterior(training.snapshot(with_amounts, year_cutoff, cutoff))[0]
    except ValueError as error:
        raise RetrainError(f"the 12-month spend snapshot at {iso(year_cutoff)}: {error}") from error
    before = times < cutoff
    season = SeasonCalendar.of(times[before], np.nan_to_num(amounts[before], nan=0.0))

    without: dict[str, list[StoredEvent]] = {}
    for user_id, events in by_user.items():
        if user_id not in with_amounts:
            for event in events:
                without.setdefault(event.category, []).append(event)
    categories = training.category_histories_of(without)
    history_train = training.history_snapshots(categories, "train") if categories else pd.DataFrame()
    history_test = training.history_snapshots(categories, "test") if categories else pd.DataFrame()
    if "churned" in history_test:
        history_test = history_test[history_test.churned.notna()].reset_index(drop=True)

    # What was learnt from: purchases with amounts before the cutoff, and
    # each review history category's events before its own test cutoff.
    until = {found.category: found.test for found in categories}
    rows = [(e.user_id, e.category, e.ts) for user_id, events in by_user.items() for e in events
            if e.ts is not None and e.ts < (cutoff if user_id in with_amounts else until.get(e.category, 0))]
    events = pd.DataFrame(rows, columns=["user_id", "category", "timestamp"]).astype({"timestamp": "float64"})
    return ValueHoldout(cutoff, data_end, test, train, year, season, history_train, history_test, events)


def train_candidate(data: ValueHoldout, parent: ValueModel | None, seed: int) -> dict:
    """The served artifact (recsys_core/signals/value.py's ValueModel), learnt
    from what precedes the holdout window only."""
    if data.train.churned.nunique() < 2:
        raise RetrainError(f"the {len(data.train)} training snapshots before {iso(data.cutoff)} all have the "
                           "same churn outcome: nothing to learn churn from")
    # Fitted on the shoppers' histories at the cutoff: no outcome in it.
    try:
        _, btyd = training.with_posterior(data.test)
    except ValueError as error:
        raise RetrainError(f"BG/NBD + Gamma-Gamma at {iso(data.cutoff)}: {error}") from error
    churn = training.fit_churn(data.train)
    models = {
        "churn": churn,
        "spend_3m": training.fit_spend(data.train, "3m", seed, data.season, known_until=data.cutoff,
                                       purchase=churn),
        "spend_12m": training.fit_spend(data.year, "12m", seed),
    }
    trained_on = {"snapshot_rows_churn_3m": len(data.train), "snapshot_rows_12m": len(data.year),
                  "btyd_as_of": training.date(data.cutoff)}
    history = data.history_train
    if "churned" in history and history.churned.nunique() == 2:
        models["churn_without_amounts"] = training.fit_churn(history, training.NO_AMOUNT_CHURN_COLUMNS)
        trained_on["snapshot_rows_churn_without_amounts"] = len(history)
    elif parent is not None:
        # No review histories to learn from (a store of invoices alone): the
        # promoted version's model of those shoppers is carried over as it is.
        models["churn_without_amounts"] = parent.models["churn_without_amounts"]
        trained_on["churn_without_amounts"] = f"carried over from {parent.version}"
    else:
        raise RetrainError("no shoppers without amounts to learn their churn from, and no promoted value "
                           "version to carry that model over from")
    digest = hashlib.sha256(pd.util.hash_pandas_object(data.train, index=False).to_numpy().tobytes())
    digest.update(repr((data.cutoff, seed, len(history))).encode())
    return {"version": f"store-{digest.hexdigest()[:10]}", "features": FEATURES,
            "churn_horizon_days": CHURN_HORIZON_DAYS, "spend_horizon_days": SPEND_HORIZONS, "btyd": btyd,
            "models": models, "trained_on": trained_on}


def score(model: ValueModel, data: ValueHoldout) -> dict:
    """The version's figures on the holdout: churn ROC-AUC, ECE and Brier,
    3-month spend Spearman, mean absolute and total error; churn ROC-AUC of
    the shoppers without amounts (all categories' test snapshots pooled)."""
    from sklearn.metrics import roc_auc_score

    frame = data.test.assign(**btyd_columns(data.test, model.btyd))
    churned = frame.churned.to_numpy().astype(int)
    if len(set(churned)) < 2:
        raise RetrainError(f"every one of the {len(frame)} holdout shoppers had the same churn outcome")
    churn = training.churn_metrics(predict(model.models["churn"], frame, data.cutoff), churned)
    spend = training.spend_metrics(predict(model.models["spend_3m"], frame, data.cutoff), frame.spend_3m.to_numpy())
    figures = {"churn_roc_auc": churn["roc_auc"], "churn_ece": churn["ece"], "churn_brier": churn["brier"],
               "spend_3m_spearman": spend["spearman"], "spend_3m_mae": spend["mae"],
               "spend_3m_total_error": spend["total_error"], "shoppers": len(frame)}
    history = data.history_test
    if len(history) and history.churned.nunique() == 2:
        history = history.assign(**btyd_columns(history, model.btyd))
        probabilities = predict(model.models["churn_without_amounts"], history, history.as_of.to_numpy())
        figures[NO_AMOUNT_KEY] = float(roc_auc_score(history.churned.astype(int), probabilities))
        figures["shoppers_without_amounts"] = len(history)
    return figures


def retrain_value(store: EventStore, registry: Registry, settings: RetrainSettings = RetrainSettings(),
                  progress: bool = True, source: str = "", work_dir: Path | None = None, threads: int = 1) -> dict:
    """The whole cycle (module docstring); returns the decision (also
    logged), "skip" with why when there is nothing to decide on. `threads`
    bounds the fits' OpenMP and BLAS threads (the 12-month trees spin every
    core by default, which on a shared node costs more than it gains)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        return _retrain_value(store, registry, settings, progress, source, work_dir)


def _retrain_value(store: EventStore, registry: Registry, settings: RetrainSettings, progress: bool, source: str,
                   work_dir: Path | None) -> dict:
    by_user = store_histories(store, progress)
    if not by_user:
        raise RetrainError("the event store holds no events")
    parent = registry.promoted(KIND)
    every = pd.DataFrame([(e.user_id, e.ts) for events in by_user.values() for e in events],
                         columns=["user_id", "timestamp"]).astype({"timestamp": "float64"})
    snapshot_of_store = {"events": int(len(every)), "last_event": iso(every.timestamp.max())}
    if not settings.force and (seen := already_seen(registry, KIND, snapshot_of_store)):
        return skip(f"no new events since {seen.label} ({snapshot_of_store['events']} events, "
                    f"last at {snapshot_of_store['last_event']})", KIND)
    data = holdout(by_user, progress)
    if len(data.test) < settings.min_holdout:
        return skip(f"{len(data.test)} shoppers with amounts to forecast at {iso(data.cutoff)}, fewer than "
                    f"--min-holdout {settings.min_holdout}: too few to compare versions on", KIND)
    try:
        promoted_model = None if parent is None else load_version(parent)
    except ValueModelError as error:
        raise RetrainError(f"the promoted {parent.label} cannot be loaded to compare with ({error}); promote "
                           "a version this code serves (recsys promote value N) and retrain") from error
    artifact = train_candidate(data, promoted_model, settings.seed)
    candidate = score(ValueModel(artifact), data)
    promoted = None if promoted_model is None else score(promoted_model, data)
    keys = KEYS + ((NO_AMOUNT_KEY,) if NO_AMOUNT_KEY in candidate and promoted is not None
                   and NO_AMOUNT_KEY in promoted else ())
    learnt = data.learnt
    window = {"first_event": iso(learnt.timestamp.min()), "last_event": iso(learnt.timestamp.max()),
              "events": int(len(learnt)), "shoppers": int(learnt.user_id.nunique()),
              "categories": sorted(learnt.category.unique().tolist()),
              "store": snapshot_of_store, "holdout": data.describe()}
    work_root = Path(work_dir) if work_dir is not None else registry.root
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".retrain-", dir=work_root) as work:
        folder = Path(work) / "value"
        folder.mkdir()
        training.save_artifact(artifact, folder / ARTIFACT_FILE)
        (folder / "report.json").write_text(json.dumps(
            {"holdout": data.describe(), "candidate": rounded(candidate), "promoted": rounded(promoted),
             "trained_on": artifact["trained_on"], "model_version": artifact["version"]}, indent=2) + "\n")
        return decide(registry, KIND, folder, candidate, promoted, parent=parent,
                      tolerance=settings.tolerance, holdout=data.describe(), window=window, keys=keys,
                      metrics={k: rounded(candidate)[k] for k in KEYS}, source_store=source or repr(store),
                      model_version=artifact["version"])
