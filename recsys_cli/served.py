"""`recsys evaluate --served GATEWAY`: the benchmark protocol, measured on
what a running stack's Recommend returns.

The protocol is training/protocol.py's (leave-one-out by `seq`, each
category's shoppers with 3 or more events, Recall and NDCG at 10 and 20): for
each test shopper, their history before the held-out item is replayed into
the profile service (IngestEvents, under a new shopper id of its own, one
idempotency key per event), Recommend is asked for that shopper's category,
and the held-out item's place in the reply is scored with the protocol's
metrics (`list_ranks`, `metrics_from_ranks`). The held-out item itself is
never sent. Afterwards each replayed shopper is forgotten (DeleteUser, which
takes their share of popularity and co-purchase counts back out) unless
`--keep-replays`.

A stack served on the full data knows every shopper's held-out item (it
counts in popularity and co-purchases): serve it on `--write-heldout DIR`'s
copy instead (docs/results.md, "As served").
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsys_core.data import paths

# Real shoppers asked about before a run: whether the stack holds their held-out items.
LEAK_PROBES = 5


class KnownTestItems(Exception):
    """The stack was served on data holding the held-out items."""


def served_k() -> int:
    """What Recommend is asked for: enough for the protocol's largest cutoff."""
    from training.protocol import CUTOFFS

    return max(CUTOFFS)


@dataclass
class Outcome:
    """One test shopper's result: the list returned, or the step that failed."""

    category: str
    index: int  # the shopper's position in the category's split
    replay_id: str
    returned: list[str] = field(default_factory=list)
    path: str = ""
    # Whether the held-out item is in the served catalogue (None: not asked).
    in_catalogue: bool | None = None
    failure: str = ""  # "<step>: <status code>" when a call failed
    detail: str = ""


def event_messages(rows, replay_id: str):
    """The history's events as the stack takes them: a star rating where the
    data has one, else a purchase; the data's own time (0, "now", where it has
    none); a key per event, so a rerun under the same id stores nothing twice."""
    from recsys.common.v1 import common_pb2

    events = []
    for row in rows:
        event = common_pb2.Event(user_id=replay_id, item_id=row.item_id,
                                 idempotency_key=f"{replay_id}:{int(row.seq)}")
        if row.rating == row.rating:  # not NaN
            event.type = common_pb2.EVENT_TYPE_RATING
            event.rating = float(row.rating)
        else:
            event.type = common_pb2.EVENT_TYPE_PURCHASE
        if row.timestamp == row.timestamp:
            event.timestamp = int(row.timestamp)
        events.append(event)
    return events


class ServedEvaluation:
    """Replays, asks and scores test shoppers against one running stack."""

    def __init__(self, gateway, profile, timeout: float, all_categories: bool, keep_replays: bool,
                 batch: int = 500):
        from recsys.gateway.v1 import gateway_pb2_grpc
        from recsys.profile.v1 import profile_pb2_grpc

        self.gateway = gateway_pb2_grpc.GatewayServiceStub(gateway)
        self.profile = profile_pb2_grpc.ProfileServiceStub(profile)
        self.timeout = timeout
        self.all_categories = all_categories
        self.keep_replays = keep_replays
        self.batch = batch
        self._catalogue: dict[str, bool] = {}
        self._lock = threading.Lock()

    def in_catalogue(self, item_id: str) -> bool:
        """Whether the stack knows the item: SimilarItems answers NOT_FOUND for one it does not."""
        import grpc

        from recsys.gateway.v1 import gateway_pb2

        with self._lock:
            if item_id in self._catalogue:
                return self._catalogue[item_id]
        try:
            self.gateway.SimilarItems(gateway_pb2.SimilarItemsRequest(item_id=item_id, k=1), timeout=self.timeout)
            known = True
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            known = False
        with self._lock:
            self._catalogue[item_id] = known
        return known

    def knows_test_items(self, probes) -> int:
        """How many of (real shopper, held-out item) the stack already holds
        as that shopper's event: a stack served on the full data does, and
        then its co-purchase counts lead a replayed twin of the shopper
        straight to the held-out item."""
        from recsys.profile.v1 import profile_pb2

        known = 0
        for user, target in probes:
            reply = self.gateway.GetProfile(profile_pb2.GetProfileRequest(user_id=user, history_limit=1),
                                            timeout=self.timeout)
            known += target in set(reply.seen_item_ids)
        return known

    def run(self, outcome: Outcome, history_rows, target_item: str, category: str) -> Outcome:
        import grpc

        from recsys.gateway.v1 import gateway_pb2
        from recsys.profile.v1 import profile_pb2

        step = "ingest"
        try:
            events = event_messages(history_rows, outcome.replay_id)
            for start in range(0, len(events), self.batch):
                self.profile.IngestEvents(profile_pb2.IngestEventsRequest(events=events[start:start + self.batch]),
                                          timeout=self.timeout)
            step = "recommend"
            reply = self.gateway.Recommend(gateway_pb2.RecommendRequest(
                user_id=outcome.replay_id, k=served_k(), categories=[] if self.all_categories else [category]),
                timeout=self.timeout)
            outcome.returned = [item.item_id for item in reply.items]
            outcome.path = gateway_pb2.RecommendationPath.Name(reply.path).removeprefix("RECOMMENDATION_PATH_").lower()
            step = "catalogue"
            outcome.in_catalogue = self.in_catalogue(target_item)
            if not self.keep_replays:
                step = "forget"
                self.gateway.DeleteUser(profile_pb2.DeleteUserRequest(user_id=outcome.replay_id), timeout=self.timeout)
        except grpc.RpcError as error:
            outcome.failure = f"{step}: {error.code().name}"
            outcome.detail = error.details() or ""
            if step != "forget" and not self.keep_replays:
                # What a failed shopper may have left in the stack goes too (at best effort: the failure is reported).
                try:
                    self.gateway.DeleteUser(profile_pb2.DeleteUserRequest(user_id=outcome.replay_id),
                                            timeout=self.timeout)
                except grpc.RpcError:
                    outcome.detail += " (and forgetting the replayed shopper failed too)"
        return outcome


def sample_indices(count: int, max_shoppers: int | None, seed: int) -> np.ndarray:
    """Every shopper, or a seeded sample of `max_shoppers`, in the split's order."""
    if max_shoppers is None or max_shoppers >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=max_shoppers, replace=False))


def histories_by_shopper(interactions, category: str) -> dict[str, object]:
    """Each shopper's events in `category`, in `seq` order (as category_split orders them)."""
    events = interactions[interactions.category == category].sort_values(["user_id", "seq"], kind="stable")
    return {user: frame for user, frame in events.groupby("user_id", sort=False)}


def summarise(outcomes: list[Outcome], targets: list[str]) -> dict:
    """The protocol's metrics over the shoppers scored (failures left out and
    counted), with how the replies were made."""
    from training import protocol

    scored = [(o, t) for o, t in zip(outcomes, targets) if not o.failure]
    ranks = protocol.list_ranks([o.returned for o, _ in scored], [t for _, t in scored])
    metrics = protocol.metrics_from_ranks(ranks) if scored else {"users": 0}
    if "mrr" in metrics:
        metrics[f"mrr@{served_k()}"] = metrics.pop("mrr")
    failures = Counter(o.failure for o in outcomes if o.failure)
    return {
        **metrics,
        "shoppers": len(outcomes),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "outside_catalogue": sum(1 for o, _ in scored if o.in_catalogue is False),
        "paths": dict(Counter(o.path for o, _ in scored)),
        "short_lists": sum(1 for o, _ in scored if len(o.returned) < served_k()),
    }


def offline_metrics(name: str, dataset, split, indices: np.ndarray) -> dict:
    """`recsys evaluate --baseline NAME`'s figures on the same shoppers."""
    from training import commands, protocol

    scorer = commands.baseline_scorer(name, split, dataset.items, 60.0, dataset.interactions)
    inputs = split.inputs("test")
    ranks = protocol.target_ranks(scorer, [inputs[i] for i in indices], split.targets("test")[indices],
                                  progress=f"{split.category} offline {name}",
                                  users=[split.users[i] for i in indices] if name == "ranking" else None)
    return protocol.metrics_from_ranks(ranks)


def write_heldout(data_dir: Path, out: Path, categories: list[str] | None = None) -> dict:
    """A copy of `data_dir` without any test target, for `recsys serve --data`;
    with `categories`, only their items and events (a stack serving one
    category's model need not encode the others' catalogues)."""
    import shutil

    import pandas as pd

    from recsys_core.data import shopping
    from training.protocol import heldout_interactions

    events = shopping.load_interactions(data_dir)
    if categories:
        unknown = sorted(set(categories) - set(events.category.unique()))
        if unknown:
            raise ValueError(f"--category {', '.join(unknown)}: no events in {data_dir}")
        events = events[events.category.isin(categories)]
    kept = heldout_interactions(events)
    out.mkdir(parents=True, exist_ok=True)
    if categories:
        items = pd.read_csv(Path(data_dir) / shopping.ITEMS_FILE, dtype=str, keep_default_na=False)
        # An item a category's shoppers bought may be filed under another
        # category (a baseball pant under Sports, bought in Toys): kept too.
        wanted = items.category.isin(categories) | items.item_id.isin(set(events.item_id))
        items[wanted].to_csv(out / shopping.ITEMS_FILE, index=False)
    else:
        shutil.copyfile(Path(data_dir) / shopping.ITEMS_FILE, out / shopping.ITEMS_FILE)
    kept.to_csv(out / shopping.INTERACTIONS_FILE, index=False)
    return {"events": len(events), "kept": len(kept), "held_out": len(events) - len(kept)}


def plot(summary: dict, out: Path) -> None:
    """Offline against served, one panel per metric, a pair of bars per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    categories = list(results)
    figures = list(dict.fromkeys(name for rows in results.values() for name in rows))
    metrics = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 3.6), sharey=False)
    width = 0.8 / len(figures)
    colours = ("tab:blue", "tab:orange", "silver", "dimgrey", "tab:green")  # served first, then offline
    for axis, metric in zip(axes, metrics):
        for offset, name in enumerate(figures):
            # A figure not measured (a published table without @20) has no bar, not a 0.
            values = [results[c].get(name, {}).get(metric, np.nan) for c in categories]
            bars = axis.bar([i + (offset - (len(figures) - 1) / 2) * width for i in range(len(categories))],
                            values, width, label=name, color=colours[offset % len(colours)])
            axis.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.3f}" for v in values], fontsize=6)
        axis.set_xticks(range(len(categories)), [c.replace("_and_", " & ").replace("_", " ") for c in categories],
                        fontsize=7, rotation=20)
        axis.set_title(metric.replace("recall", "Recall").replace("ndcg", "NDCG"), fontsize=9)
    # Below the panels: inside one it would cover the bars.
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(figures), fontsize=7)
    shoppers = sum(r["served"]["shoppers"] for r in results.values())
    figure.suptitle(f"offline against as served (Recommend through the gateway), the same {shoppers} test shoppers",
                    fontsize=9)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys evaluate --served", description=(
        "The benchmark protocol (leave-one-out by seq, Recall/NDCG@10 and @20) on what a running stack's "
        "Recommend returns: each test shopper's history before the held-out item is replayed into the profile "
        "service under a new shopper id, Recommend (k=20, the shopper's category) is scored, and the replayed "
        "shopper is forgotten. Serve the stack on --write-heldout's copy of the data, or its popularity and "
        "co-purchases know the held-out items."))
    p.add_argument("--served", metavar="GATEWAY", help="the running stack's gateway, host:port")
    p.add_argument("--profile", metavar="ADDRESS",
                   help="its profile service, for IngestEvents (with the `ingest` certificate of --certs); "
                        "default RECSYS_PROFILE; `recsys serve` prints it")
    p.add_argument("--write-heldout", type=Path, metavar="DIR",
                   help="instead: write --data without each test shopper's held-out item to DIR, to serve")
    p.add_argument("--data", type=Path, default=paths.BUNDLED_DATA_DIR,
                   help="the full data set (with the held-out items) the test shoppers come from "
                        "(default: the bundled subset)")
    p.add_argument("--category", action="append", help="category (repeatable; default: every one)")
    p.add_argument("--max-shoppers", type=int, metavar="N", help="a seeded sample of N test shoppers per category")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8, help="shoppers in flight at once")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, seconds")
    p.add_argument("--user-prefix", help="prefix of the replayed shoppers' ids (default: eval-<random>-, new each "
                                         "run); a rerun with the same prefix stores no event twice. Not after a run "
                                         "that forgot them: a forgotten id's earlier events are settled, never stored")
    p.add_argument("--keep-replays", action="store_true",
                   help="leave the replayed shoppers in the stack (default: forget each after scoring)")
    p.add_argument("--all-categories", action="store_true",
                   help="ask Recommend over every category, not only the shopper's (the protocol ranks within it)")
    p.add_argument("--offline", action="append", choices=("popularity", "cooccurrence", "zero-shot", "ranking"),
                   help="also `recsys evaluate --baseline NAME` on the same shoppers, side by side (repeatable; "
                        "ranking: the scoring serving does without a trained model)")
    p.add_argument("--certs", type=Path, default=paths.REPO_ROOT / "var" / "tls",
                   help="the stack's `recsys certs` directory: its CA, the `ingest` certificate, and admin.token "
                        "(RECSYS_TOKEN overrides) (default var/tls, as `recsys serve` writes it)")
    p.add_argument("--plaintext", action="store_true", help="a stack served with --insecure")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when calls failed")
    p.add_argument("--allow-known-test-items", action="store_true",
                   help="run even on a stack that holds the test shoppers' held-out items (its figures are "
                        "not the protocol's; for checking the machinery)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--plot", type=Path, metavar="PNG", help="plot the figures (offline beside served with --offline)")
    p.add_argument("--no-progress", action="store_true")
    return p


def channels(args):
    """The gateway (a token: RECSYS_TOKEN, else the certs' admin.token) and
    the profile service (the `ingest` certificate)."""
    import os

    from recsys_cli.certs import LocalSecurity
    from recsys_cli.client import gateway_channel
    from recsys_core.rpc.grpc_util import CHANNEL_OPTIONS
    from recsys_core.rpc.transport import Security

    if args.plaintext:
        os.environ["RECSYS_GATEWAY_PLAINTEXT"] = "1"
        profile = Security.plaintext("ingest").channel(args.profile, "profile", CHANNEL_OPTIONS)
    else:
        profile = LocalSecurity(args.certs).security("ingest").channel(args.profile, "profile", CHANNEL_OPTIONS)
    return gateway_channel(args.served, tls_dir=args.certs), profile


def evaluate_served(args) -> dict:
    from tqdm import tqdm

    from recsys_core.data import shopping
    from training import protocol

    dataset = shopping.Dataset.load(args.data)
    categories = args.category or sorted(dataset.interactions.category.unique())
    prefix = args.user_prefix if args.user_prefix is not None else f"eval-{uuid.uuid4().hex[:8]}-"
    work = []  # (category, index, replay id, history rows, target item)
    users_of = {}  # (category, index) -> the real shopper's id
    splits, samples, targets_of = {}, {}, {}
    for category in categories:
        split = protocol.category_split(dataset.interactions, dataset.items, category)
        indices = sample_indices(len(split.users), args.max_shoppers, args.seed)
        events = histories_by_shopper(dataset.interactions, category)
        splits[category], samples[category], targets_of[category] = split, indices, []
        test_targets = split.targets("test")  # once: it is built over every shopper
        for index in indices:
            user = split.users[index]
            rows = events[user]
            target = split.item_ids[test_targets[index]]
            # The guard of the whole method: the held-out event is the last by
            # seq, and only the rows before it are ever sent.
            assert rows.item_id.iloc[-1] == target and len(rows) == len(split.sequences[index])
            history = list(rows.iloc[:-1].itertuples(index=False))
            work.append((category, int(index), f"{prefix}{user}-{category}", history, target))
            users_of[(category, int(index))] = user
            targets_of[category].append(target)

    gateway, profile = channels(args)
    evaluation = ServedEvaluation(gateway, profile, args.timeout, args.all_categories, args.keep_replays)
    # A held-out item bought before too (a repeat) is rightly in the history: no sign.
    probes = [(users_of[(c, i)], target) for c, i, _, history, target in work
              if target not in {row.item_id for row in history}][:LEAK_PROBES]
    known = evaluation.knows_test_items(probes)
    if known and not args.allow_known_test_items:
        gateway.close()
        profile.close()
        raise KnownTestItems(
            f"the stack already holds the held-out item of {known} of the first {len(probes)} test "
            f"shoppers (their own events): its popularity and co-purchase counts know the answers. Serve it on "
            f"`recsys evaluate --write-heldout DIR --data {args.data}`'s copy, or pass --allow-known-test-items")
    outcomes: dict[tuple[str, int], Outcome] = {}
    with gateway, profile, ThreadPoolExecutor(max_workers=args.concurrency) as pool, \
            tqdm(total=len(work), desc="served", unit="shopper", disable=args.no_progress) as bar:
        futures = [pool.submit(evaluation.run, Outcome(category, index, replay_id), history, target, category)
                   for category, index, replay_id, history, target in work]
        failed = 0
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[(outcome.category, outcome.index)] = outcome
            failed += bool(outcome.failure)
            bar.update(1)
            if failed:
                bar.set_postfix(failed=failed)

    results = {}
    for category in categories:
        ordered = [outcomes[(category, int(i))] for i in samples[category]]
        results[category] = {"served": summarise(ordered, targets_of[category])}
        for name in args.offline or ():
            results[category][f"offline {name}"] = offline_metrics(name, dataset, splits[category], samples[category])
    failures = [o for o in outcomes.values() if o.failure]
    return {
        "gateway": args.served, "data": str(args.data), "user_prefix": prefix, "k": served_k(),
        "categories": "all" if args.all_categories else "the shopper's", "max_shoppers": args.max_shoppers,
        "seed": args.seed, "kept_replays": args.keep_replays, "results": results,
        "stack_holds_test_items": f"{known} of {len(probes)} probed",
        "failed": len(failures),
        "failure_examples": [{"shopper": o.replay_id, "failure": o.failure, "detail": o.detail} for o in failures[:5]],
    }


def report(summary: dict) -> None:
    print(f"{'category':<24} {'figures':<20} {'R@10':>7} {'N@10':>7} {'R@20':>7} {'N@20':>7} {'users':>6} "
          f"{'failed':>6} {'outside':>7}")
    for category, rows in summary["results"].items():
        for name, m in rows.items():
            if not m.get("users"):
                print(f"{category:<24} {name:<20} {'-':>7} {'-':>7} {'-':>7} {'-':>7} {0:>6} "
                      f"{m.get('failed', 0):>6}")
                continue
            print(f"{category:<24} {name:<20} {m['recall@10']:7.4f} {m['ndcg@10']:7.4f} {m['recall@20']:7.4f} "
                  f"{m['ndcg@20']:7.4f} {m['users']:6d} {m.get('failed', '-'):>6} {m.get('outside_catalogue', '-'):>7}")
    print("(outside: held-out items the served catalogue does not hold, each a miss; failed: shoppers not scored)")


def main(argv: list[str] | None = None) -> int:
    import os

    p = parser()
    args = p.parse_args(argv)
    if args.write_heldout:
        if args.served:
            p.error("--write-heldout writes data to serve; run --served against the stack afterwards")
        try:
            counts = write_heldout(args.data, args.write_heldout, args.category)
        except ValueError as error:
            p.error(str(error))
        print(f"wrote {args.write_heldout}: {counts['kept']} of {counts['events']} events "
              f"({counts['held_out']} held-out items left out); serve it with "
              f"`recsys serve --data {args.write_heldout}` and evaluate with `--data {args.data}`")
        return 0
    if not args.served:
        p.error("--served GATEWAY (or --write-heldout DIR)")
    args.profile = args.profile or os.environ.get("RECSYS_PROFILE")
    if not args.profile:
        p.error("--profile ADDRESS (or RECSYS_PROFILE): replaying histories needs the profile service's IngestEvents")
    if args.concurrency < 1 or args.timeout <= 0 or (args.max_shoppers is not None and args.max_shoppers < 1):
        p.error("--concurrency and --max-shoppers must be at least 1, --timeout positive")
    if not args.plaintext and not (args.certs / "ingest" / "tls.crt").is_file():
        p.error(f"--certs {args.certs}: no ingest/tls.crt (the certificate IngestEvents admits); "
                "`recsys serve` writes var/tls")
    import grpc

    try:
        summary = evaluate_served(args)
    except KnownTestItems as error:
        print(f"recsys evaluate --served: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"recsys evaluate --served: the stack at {args.served} did not answer GetProfile: "
              f"{error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    report(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot(summary, args.plot)
    if summary["failed"]:
        example = summary["failure_examples"][0]
        print(f"recsys evaluate --served: {summary['failed']} shoppers not scored; first: {example['shopper']} "
              f"{example['failure']}: {example['detail']}", file=sys.stderr)
        return 0 if args.allow_failures else 1
    return 0
