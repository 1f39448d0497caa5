"""`recsys retrain`: the sequence model retrained on the event store,
compared with the promoted version on the newest events, and promoted only
if it is not worse.

1. Every stored event is read through the EventStore interface (SQLite or
   Redis, as the profile service's configuration selects), in the order it
   was appended, into the interactions schema `training/` trains on.
2. The holdout window (`holdout_window`): the cutoff is the newest event's
   time less `days`. Each (shopper, category) sequence with an event at or
   after the cutoff gives one holdout case, the papers' leave-one-out
   protocol restricted to that window: its last such event is the target,
   everything before it the history. Training sees only each sequence's
   events before its first event in the window, so no holdout event (target
   or window history) is ever trained on.
3. The candidate is trained warm from the promoted version (its encoder,
   user tower and, on the same catalogue, ID vectors; `modeldir.load_for_training`),
   or from the pretrained encoder when nothing is promoted yet.
4. Candidate and promoted version are both scored on the same holdout
   (full ranking over the catalogue, history items left out). The candidate
   is promoted when its NDCG@10 >= the promoted one's - `tolerance`
   (absolute); the first version is promoted when it exists. Either way it is
   added to the registry, its manifest holding the data window, both sets of
   numbers and the decision, and the decision is logged as one JSON line.

The ranker (`retrain_ranker`) and the value model (training/value_lifecycle.py)
go through the same decision (`decide`), each on its own figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from recsys_core.data import shopping
from recsys_core.models import promotion, pruning
from recsys_core.models.registry import MANIFEST, ModelVersion, Registry, now_iso
from recsys_core.store.events import EventStore
from training import modeldir, protocol, seqmodel, twotower
from training.protocol import CategorySplit
from training.versions import data_window, iso

log = logging.getLogger("recsys.retrain")
KIND = "sequence"
DAY = 86400
DEFAULT_TOLERANCE = 0.005
DEFAULT_HOLDOUT_DAYS = 30.0
DEFAULT_MIN_HOLDOUT = 20
# As protocol.category_split: a sequence trains only with a validation and a
# test position left over for fit's early stopping.
MIN_TRAIN_EVENTS = 3


class RetrainError(ValueError):
    """Nothing sensible to retrain on: said to the operator, not a traceback."""


def store_events(store: EventStore, progress: bool = True) -> pd.DataFrame:
    """Every stored event as interactions (user_id, item_id, category, seq,
    timestamp, rating, type): `seq` numbers a shopper's events of one
    category in the order they were appended; undated events have a NaN timestamp."""
    users = sorted({user_id for user_id, _, _ in store.user_items()})
    rows = []
    for user_id in tqdm(users, desc="reading events", unit="shopper", disable=not progress):
        for event in store.user_events(user_id):
            rows.append((event.user_id, event.item_id, event.category,
                         math.nan if event.ts is None else float(event.ts),
                         math.nan if event.rating is None else float(event.rating), event.type))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "category", "timestamp", "rating", "type"])
    events.insert(3, "seq", events.groupby(["user_id", "category"], sort=False).cumcount().astype("int64"))
    return events


@dataclass(frozen=True)
class Windows:
    train: CategorySplit  # sequences before the window: all a model may learn from
    holdout: CategorySplit  # per case: history then target (stage "test" reads them)
    train_events: pd.DataFrame  # the events `train` is made of
    cutoff: float  # unix seconds: events at or after it are in the window
    last: float  # the newest event's time

    def describe(self) -> dict:
        return {"from": iso(self.cutoff), "to": iso(self.last), "cases": len(self.holdout.users),
                "shoppers": len(set(self.holdout.users))}


def holdout_window(events: pd.DataFrame, items: pd.DataFrame, categories: Sequence[str], days: float,
                   min_train_events: int = MIN_TRAIN_EVENTS) -> Windows:
    """Split `events` (as `store_events` returns them) at the newest event's
    time less `days` into training sequences and holdout cases (module
    docstring). One catalogue for both: the categories' items and every item
    their events name."""
    if days <= 0:
        raise RetrainError(f"the holdout window must be positive, got {days} days")
    events = events[events.category.isin(categories)].sort_values(["user_id", "category", "seq"], kind="stable")
    if events.timestamp.notna().sum() == 0:
        raise RetrainError("no dated events: a holdout window needs event times")
    last = float(events.timestamp.max())
    cutoff = last - days * DAY
    item_ids = sorted(set(items.loc[items.category.isin(categories), "item_id"]) | set(events.item_id))
    index_of = {item_id: position for position, item_id in enumerate(item_ids)}
    train_users, train_sequences, kept = [], [], []
    holdout_users, holdout_sequences = [], []
    for (user_id, _), group in events.groupby(["user_id", "category"], sort=True):
        sequence = np.asarray([index_of[i] for i in group.item_id], dtype=np.int64)
        # NaN (undated) compares False: undated events are old.
        in_window = np.flatnonzero(group.timestamp.to_numpy() >= cutoff)
        first = int(in_window[0]) if len(in_window) else len(sequence)
        if first >= min_train_events:
            train_users.append(user_id)
            train_sequences.append(sequence[:first])
            kept.append(group.iloc[:first])
        if len(in_window):
            target = int(in_window[-1])
            if target >= 1:  # a case needs some history to predict from
                holdout_users.append(user_id)
                holdout_sequences.append(sequence[: target + 1])
    name = "+".join(categories)
    train_events = pd.concat(kept) if kept else events.iloc[:0]
    return Windows(
        train=CategorySplit(category=name, item_ids=item_ids, users=train_users, sequences=train_sequences),
        holdout=CategorySplit(category=name, item_ids=item_ids, users=holdout_users, sequences=holdout_sequences),
        train_events=train_events, cutoff=cutoff, last=last)


def evaluate_model(model_dir: Path, holdout: CategorySplit, items: pd.DataFrame, progress: bool = True,
                   label: str = "") -> dict[str, float]:
    """The model directory's Recall/NDCG@10 and @20 and MRR on the holdout
    cases (each target ranked among the whole catalogue, history items out)."""
    model = modeldir.load_for_scoring(model_dir, holdout, items, progress=progress)
    return protocol.evaluate(seqmodel.scorer(model), holdout, "test", progress=f"holdout {label}" if progress else None)


KEYS = ("ndcg@10",)


def not_worse(candidate: dict, promoted: dict | None, tolerance: float, keys: Sequence[str] = KEYS) -> bool:
    """The promotion rule: nothing promoted yet, or each of `keys` (NDCG@10
    for the sequence model and the ranker) no more than `tolerance`
    (absolute) below the promoted version's on the same holdout."""
    return promoted is None or all(candidate[key] >= promoted[key] - tolerance for key in keys)


def rounded(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}


def consider(registry: Registry, candidate_dir: Path, windows: Windows, items: pd.DataFrame, *,
             parent: ModelVersion | None, tolerance: float = DEFAULT_TOLERANCE, window: dict | None = None,
             metrics: dict | None = None, progress: bool = True, **notes) -> dict:
    """Score the candidate model directory and the promoted version `parent`
    on the holdout, add the candidate as the next version with the decision
    in its manifest, promote it if it is not worse, and log the decision as
    one JSON line. Returns the decision."""
    candidate = evaluate_model(candidate_dir, windows.holdout, items, progress, "candidate")
    promoted = None if parent is None else evaluate_model(parent.path, windows.holdout, items, progress,
                                                          parent.label)
    return decide(registry, KIND, candidate_dir, candidate, promoted, parent=parent, tolerance=tolerance,
                  holdout=windows.describe(), window=window or data_window(windows.train_events), metrics=metrics,
                  **notes)


def decide(registry: Registry, kind: str, source: Path, candidate: dict, promoted: dict | None, *,
           parent: ModelVersion | None, tolerance: float, holdout: dict, window: dict, metrics: dict | None = None,
           keys: Sequence[str] = KEYS, **notes) -> dict:
    """The not-worse rule (on each of `keys`) on two sets of numbers measured
    on the same holdout; adds `source` as the next `kind` version with the
    decision in its manifest, promotes it when not worse, logs the decision
    as one JSON line."""
    promote = not_worse(candidate, promoted, tolerance, keys)
    decision = {
        "event": "retrain_decision", "kind": kind, "at": now_iso(),
        "decision": "promote" if promote else "keep",
        "rule": " and ".join(f"candidate {key} >= promoted {key} - {tolerance}" for key in keys),
        "tolerance": tolerance,
        "holdout": holdout,
        "candidate": rounded(candidate),
        "promoted": None if parent is None else {"version": parent.version, **rounded(promoted)},
    }
    added = registry.add(kind, source, parent=None if parent is None else parent.version, data_window=window,
                         metrics={"holdout": rounded(candidate), **(metrics or {})}, retrain=decision, **notes)
    decision["version"] = added.version
    if promote:
        # Another promotion (a person's) while this one was evaluated wins:
        # the candidate was compared with a version that is no longer served.
        record = registry.promotion_record(kind)
        now = None if record is None else record.get("version")
        if now != (None if parent is None else parent.version):
            decision["decision"] = "keep"
            decision["why"] = f"{kind}/{now} was promoted while the candidate was evaluated"
        else:
            reason = ("first version" if parent is None else
                      "retrain: holdout " + ", ".join(f"{key} {candidate[key]:.4f}" for key in keys)
                      + f" vs {parent.label} " + ", ".join(f"{promoted[key]:.4f}" for key in keys)
                      + f" (tolerance {tolerance})")
            promotion.promote(registry, kind, added.version, reason)
    log.info(json.dumps(decision, sort_keys=True))
    return decision


@dataclass(frozen=True)
class RetrainSettings:
    holdout_days: float = DEFAULT_HOLDOUT_DAYS
    tolerance: float = DEFAULT_TOLERANCE
    min_holdout: int = DEFAULT_MIN_HOLDOUT
    max_epochs: int = 3
    max_minutes: float = 30.0
    seed: int = 42
    force: bool = False  # retrain even when the store has no events the promoted version lacks


def training_config(parent: ModelVersion | None, settings: RetrainSettings) -> twotower.TwoTowerConfig:
    """The promoted version's architecture (a warm start needs the same
    shapes), with this run's budget; the defaults for a first version."""
    base = modeldir.config_of(parent.path) if parent is not None else twotower.TwoTowerConfig()
    return dataclasses.replace(base, max_epochs=settings.max_epochs, max_minutes=settings.max_minutes,
                               seed=settings.seed)


def retrain(store: EventStore, registry: Registry, items: pd.DataFrame, categories: Sequence[str] | None = None,
            settings: RetrainSettings = RetrainSettings(), progress: bool = True, source: str = "",
            work_dir: Path | None = None) -> dict:
    """The whole cycle (module docstring); returns the decision (also
    logged), "skip" with why when there is nothing to decide on."""
    from training.commands import train_split

    events = store_events(store, progress)
    known = sorted(set(events.category) & set(items.category))
    categories = sorted(categories) if categories else known
    unknown = sorted(set(categories) - set(known))
    if unknown:
        raise RetrainError(f"categories {unknown} have no stored events or no catalogue items (have: {known})")
    if not categories:
        raise RetrainError("the event store holds no events of any catalogue category")
    store_window = data_window(events[events.category.isin(categories)])
    parent = registry.promoted(KIND)
    if not settings.force and (seen := already_seen(registry, KIND, store_window)):
        return skip(f"no new events since {seen.label} ({store_window['events']} events, "
                    f"last at {store_window['last_event']})")
    windows = holdout_window(events, items, categories, settings.holdout_days)
    if len(windows.holdout.users) < settings.min_holdout:
        return skip(f"{len(windows.holdout.users)} holdout cases in the last {settings.holdout_days:g} days, "
                    f"fewer than --min-holdout {settings.min_holdout}: too few to compare versions on")
    if not windows.train.sequences:
        return skip("no sequence has enough events before the holdout window to train on")
    config = training_config(parent, settings)
    window = {**data_window(windows.train_events),
              "store": {k: store_window[k] for k in ("events", "last_event")}, "holdout": windows.describe()}
    work_root = Path(work_dir) if work_dir is not None else registry.root
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".retrain-", dir=work_root) as work:
        out = Path(work) / "model"
        _, _, result = train_split(windows.train, items, out, config,
                                   init=None if parent is None else parent.path, progress=progress,
                                   manifest={"data": source or repr(store), "started_from": parent and parent.label})
        return consider(registry, out, windows, items, parent=parent, tolerance=settings.tolerance, window=window,
                        metrics={"valid": rounded(result.best_valid), "epochs": result.epochs,
                                 "minutes": round(result.seconds / 60, 2)},
                        progress=progress, source_store=source or repr(store))


def already_seen(registry: Registry, kind: str, store_window: dict) -> ModelVersion | None:
    """The newest version, when it was retrained on a store of this size and
    newest event: promoted or kept, training again on the same events would
    only repeat it."""
    latest = registry.latest(kind)
    seen = None if latest is None else (latest.manifest.get("data_window") or {}).get("store")
    return latest if seen == {k: store_window[k] for k in ("events", "last_event")} else None


def ranker_file(version: ModelVersion) -> Path:
    """The LightGBM file of a ranker version: the file with its `<file>.json` manifest beside it."""
    found = [p for p in version.path.iterdir() if p.is_file() and p.name != MANIFEST
             and p.with_name(p.name + ".json").is_file()]
    if len(found) != 1:
        raise RetrainError(f"{version.label}: expected one model file with its manifest, found {len(found)}")
    return found[0]


def retrain_ranker(store: EventStore, registry: Registry, items: pd.DataFrame, category: str,
                   settings: RetrainSettings = RetrainSettings(), progress: bool = True, source: str = "",
                   max_shoppers: int | None = None, threads: int = 2, work_dir: Path | None = None) -> dict:
    """The ranking service's LightGBM model retrained on the store's events
    of one category (`recsys train-ranker`'s protocol: trained on each
    shopper's second-to-last item, so the holdout, each shopper's newest
    event, is never trained on), and the promoted ranker scored on the same
    test pools; the same not-worse rule. LightGBM trains from scratch in
    seconds: no warm start, the parent is the version it was compared with."""
    from recsys_core.ranking.learned import LearnedRanker
    from training import ranker as ranking
    from training.items import default_encoder, split_item_vectors

    events = store_events(store, progress)
    known = sorted(set(events.category) & set(items.category))
    if category not in known:
        raise RetrainError(f"category {category!r} has no stored events or no catalogue items (have: {known})")
    in_category = events[events.category == category]
    window = data_window(in_category)
    snapshot = {k: window[k] for k in ("events", "last_event")}
    parent = registry.promoted("ranker")
    if not settings.force and (seen := already_seen(registry, "ranker", window)):
        return skip(f"no new {category} events since {seen.label}", "ranker")
    promoted_model = None if parent is None else LearnedRanker.load(ranker_file(parent))
    dataset = shopping.Dataset(items=items, interactions=in_category.drop(columns="type"))
    encoder = default_encoder()
    result = ranking.train_ranker(
        dataset, category, lambda split: split_item_vectors(split, items, encoder, progress), threads=threads,
        seed=settings.seed, max_shoppers=max_shoppers, ablation=False, progress=progress, data_label=source,
        compare=None if promoted_model is None else {parent.label: promoted_model})
    test = result.manifest["test"]
    candidate = test["learned"]
    if candidate["users"] < settings.min_holdout:
        return skip(f"{candidate['users']} {category} shoppers to test on, fewer than --min-holdout "
                    f"{settings.min_holdout}", "ranker")
    promoted = None if parent is None else test["compared"][parent.label]
    work_root = Path(work_dir) if work_dir is not None else registry.root
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".retrain-", dir=work_root) as work:
        path = Path(work) / f"ranker-{category}.txt"
        ranking.save(result, path)
        return decide(registry, "ranker", path, candidate, promoted, parent=parent, tolerance=settings.tolerance,
                      holdout={"cases": candidate["users"], "protocol": result.manifest["data"]["evaluated_on"]},
                      window={**window, "store": snapshot},
                      metrics={"hand_weighted": test["hand_weighted"],
                               "held_out_ndcg@10": result.manifest["training"]["held_out_ndcg@10"]},
                      source_store=source, category=category)


def skip(why: str, kind: str = KIND) -> dict:
    decision = {"event": "retrain_decision", "kind": kind, "at": now_iso(), "decision": "skip", "why": why}
    log.info(json.dumps(decision, sort_keys=True))
    return decision


def prune_after_promotion(registry: Registry, kind: str, keep: int, pinned, model_repo: Path | None) -> list[str]:
    """`--keep`: the kind pruned once its new version is promoted (the
    promotion makes the old promoted version the new one's parent, so both
    stay). What went, as labels."""
    [(_, done)] = pruning.prune(registry, keep, [kind], {kind: pinned}, reason=f"recsys retrain --keep {keep}",
                                model_repo=model_repo)
    return [f"{r['kind']}/{r['version']}" if "version" in r else f"{r['triton_model']}:{r['triton_version']}"
            for r in done]


def retrain_main(argv: list[str] | None, open_store: Callable[[], EventStore], store_label: str,
                 default_items: Path, pinned: Callable[[list[str]], dict[str, set[int]]] | None = None,
                 retrain_value: Callable[..., dict] | None = None) -> int:
    """`recsys retrain`; the caller (recsys_cli) opens the profile service's
    store, `pinned` reads --pin and the A/B configuration's versions
    (recsys_cli.models.pinned_versions) for --keep, and `retrain_value` is
    training/value_lifecycle.py's (which builds on this module, so it cannot
    be imported from here)."""
    defaults = RetrainSettings()
    parser = argparse.ArgumentParser(prog="recsys retrain", description=(
        "Retrain the sequence model on the event store the profile service is configured with "
        "(PROFILE_STORE, PROFILE_STORE_PATH or PROFILE_REDIS_*), warm-started from the promoted version; "
        "evaluate it and the promoted version on the newest events (each shopper's last event in the holdout "
        "window, history before it, never trained on) and promote it only if its NDCG@10 is not worse than "
        "the promoted one's by more than --tolerance. Prints the decision as one JSON line."))
    parser.add_argument("--kind", choices=("sequence", "ranker", "value"), nargs="+", default=["sequence"],
                        help="what to retrain, one after the other (one decision line each; one that cannot be "
                             "retrained does not stop the next, and makes the exit status 2). "
                             "sequence: the two-tower model (default); ranker: the ranking service's LightGBM "
                             "model of one category (--categories C); value: the profile service's churn and "
                             "lifetime-value model (its holdout is the 90-day churn horizon, not --holdout-days; "
                             "judged on churn ROC-AUC and 3-month spend Spearman, training/value_lifecycle.py)")
    parser.add_argument("--max-shoppers", type=int, help="ranker: a random sample of the category's shoppers")
    parser.add_argument("--registry", type=Path, help="model registry (default $RECSYS_MODEL_REGISTRY, else var/models)")
    parser.add_argument("--items", type=Path, default=default_items,
                        help="the catalogue's texts: a directory with items.csv.gz (default: %(default)s)")
    parser.add_argument("--categories", nargs="+", help="categories to train on (default: every stored one)")
    parser.add_argument("--holdout-days", type=float, default=defaults.holdout_days,
                        help="the holdout window: events this many days before the newest one or later")
    parser.add_argument("--tolerance", type=float, default=defaults.tolerance,
                        help="how far (absolute NDCG@10) the candidate may fall below the promoted version "
                             "and still be promoted")
    parser.add_argument("--min-holdout", type=int, default=defaults.min_holdout,
                        help="fewest holdout cases to decide on; fewer: skip")
    parser.add_argument("--max-epochs", type=int, default=defaults.max_epochs)
    parser.add_argument("--max-minutes", type=float, default=defaults.max_minutes)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, help="torch threads (default: every core); --kind value: the fits' "
                                                    "threads (default 1)")
    parser.add_argument("--force", action="store_true", help="retrain even without new events")
    parser.add_argument("--no-progress", action="store_true")
    pruning.add_arguments(parser, "after a promotion, delete this kind's versions beyond the newest N as "
                                  "`recsys models prune --keep N` does (default: delete nothing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.holdout_days <= 0 or args.tolerance < 0 or args.min_holdout < 1 or args.max_epochs < 1 \
            or args.max_minutes <= 0:
        parser.error("--holdout-days and --max-minutes must be > 0, --tolerance >= 0, --min-holdout and "
                     "--max-epochs >= 1")
    if len(set(args.kind)) != len(args.kind):
        parser.error("--kind: each kind once")
    if "ranker" in args.kind and len(args.categories or ()) != 1:
        parser.error("--kind ranker: one category (--categories C): the ranker is trained per category")
    if args.keep is not None and args.keep < 1:
        parser.error("--keep must be at least 1")
    try:
        # Before training: a bad --pin or A/B setting is said now, not after an hour.
        pins = pinned(args.pin) if pinned is not None else {}
        pruning.check_model_repo(args.model_repo)
    except ValueError as error:
        parser.error(str(error))
    from training.commands import torch_threads

    torch_threads(args.threads)
    try:
        # The value model reads no catalogue.
        items = None if args.kind == ["value"] else shopping.load_items(args.items)
    except shopping.DataError as error:
        parser.error(f"--items: {error}")
    settings = RetrainSettings(holdout_days=args.holdout_days, tolerance=args.tolerance, min_holdout=args.min_holdout,
                               max_epochs=args.max_epochs, max_minutes=args.max_minutes, seed=args.seed,
                               force=args.force)
    registry = Registry(args.registry)
    status = 0
    for kind in args.kind:
        try:
            store = open_store()
            try:
                if kind == "value":
                    if retrain_value is None:
                        raise RetrainError("this entry point cannot retrain the value model")
                    decision = retrain_value(store, registry, settings, progress=not args.no_progress,
                                             source=store_label, threads=args.threads or 1)
                elif kind == "ranker":
                    decision = retrain_ranker(store, registry, items, args.categories[0], settings,
                                              progress=not args.no_progress, source=store_label,
                                              max_shoppers=args.max_shoppers, threads=args.threads or 2)
                else:
                    decision = retrain(store, registry, items, args.categories, settings,
                                       progress=not args.no_progress, source=store_label)
            finally:
                store.close()
        except (RetrainError, shopping.DataError) as error:
            print(f"recsys retrain --kind {kind}: {error}" if len(args.kind) > 1 else f"recsys retrain: {error}",
                  file=sys.stderr)
            status = 2
            continue
        if args.keep is not None and decision["decision"] == "promote":
            decision["pruned"] = prune_after_promotion(registry, kind, args.keep, pins.get(kind, ()),
                                                       args.model_repo)
        print(json.dumps(decision, sort_keys=True), flush=True)
    return status
