"""`recsys ab-report`: per-arm results of an A/B experiment from the profile
service's event store (docs/operations.md, "A/B arms")."""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone

from recsys_core.experiments import report
from recsys_core.experiments.arms import ArmsError, parse_arms
from recsys_core.rpc.envconfig import ConfigError


def parse_since(value: str) -> int:
    """Unix seconds, an ISO date/time (UTC unless it says), or a span back from now: 36h, 7d."""
    value = value.strip()
    now = datetime.now(timezone.utc).timestamp()
    units = {"m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
            return int(now - float(value[:-1]) * units[value[-1]])
        if value.isdigit():
            return int(value)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected unix seconds, an ISO time, or a span like 36h or 7d")\
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def open_store(args):
    """The store the profile service is configured with (PROFILE_STORE,
    PROFILE_STORE_PATH, PROFILE_REDIS_*), or the one the options name."""
    from recsys_core.store.backends import open_store as open_backend
    from services.profile.config import ProfileConfig
    from recsys_core.rpc.envconfig import EnvReader

    env = EnvReader("PROFILE_")
    defaults = ProfileConfig()
    store = args.store or env.choice("STORE", defaults.store, ("sqlite", "redis"))
    config = ProfileConfig(
        store=store,
        store_path=args.store_path or env.str("STORE_PATH", defaults.store_path),
        redis_url=args.redis_url or env.str("REDIS_URL", defaults.redis_url),
        redis_mode=env.choice("REDIS_MODE", defaults.redis_mode, ("single", "cluster")),
        redis_prefix=args.redis_prefix or env.str("REDIS_PREFIX", defaults.redis_prefix),
        redis_username=env.str("REDIS_USERNAME", ""),
        redis_password_file=env.str("REDIS_PASSWORD_FILE", ""),
        redis_durability=env.choice("REDIS_DURABILITY", defaults.redis_durability,
                                    ("always", "everysec", "unchecked")),
    )
    return open_backend(config)


def ab_report_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recsys ab-report",
        description="Per-arm hit rate, NDCG, conversions and value of an A/B experiment, with 95 %% bootstrap "
                    "intervals over shoppers, from the profile's event store (PROFILE_STORE, PROFILE_STORE_PATH, "
                    "PROFILE_REDIS_*).")
    parser.add_argument("--since", type=parse_since, help="only exposures from then on: unix seconds, an ISO time, "
                                                          "or a span back from now (36h, 7d)")
    parser.add_argument("--experiment", help="the experiment (GATEWAY_AB_SALT); default: the one shown most recently")
    parser.add_argument("--arms", help="arm order, the first compared with the others (default: GATEWAY_AB_ARMS' "
                                       "order when set, else by name)")
    parser.add_argument("--window", type=parse_window, default=report.DEFAULT_WINDOW_SECONDS,
                        help="attribution window after an exposure: 30m, 24h, 7d (default 7d)")
    parser.add_argument("--k", type=int, default=report.DEFAULT_K, help="cut-off of hit rate and NDCG (default 10)")
    parser.add_argument("--resamples", type=int, default=report.DEFAULT_RESAMPLES,
                        help="bootstrap resamples (default 2000)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="OUT.png", help="also save a plot of the arms' metrics with intervals")
    parser.add_argument("--store", choices=("sqlite", "redis"), help="default PROFILE_STORE, else sqlite")
    parser.add_argument("--store-path", help="the SQLite store (default PROFILE_STORE_PATH, else var/profile.sqlite3)")
    parser.add_argument("--redis-url", help="default PROFILE_REDIS_URL")
    parser.add_argument("--redis-prefix", help="default PROFILE_REDIS_PREFIX")
    args = parser.parse_args(argv)
    if args.k < 1 or args.resamples < 1:
        parser.error("--k and --resamples must be at least 1")
    order = None
    if args.arms:
        order = [a.strip() for a in args.arms.split(",") if a.strip()]
    elif os.environ.get("GATEWAY_AB_ARMS"):
        try:
            order = [arm.name for arm in parse_arms(os.environ["GATEWAY_AB_ARMS"])]
        except ArmsError as error:
            print(f"recsys ab-report: GATEWAY_AB_ARMS: {error}", file=sys.stderr)
            return 2
    try:
        store = open_store(args)
    except (ConfigError, OSError) as error:
        print(f"recsys ab-report: cannot open the event store: {error}", file=sys.stderr)
        return 2
    try:
        collected = report.collect(store, args.since, args.experiment)
    finally:
        store.close()
    if not collected.exposures:
        known = ", ".join(collected.experiments) or "none"
        print(f"recsys ab-report: no exposures of experiment {collected.experiment!r} "
              f"(experiments in the store: {known})", file=sys.stderr)
        return 1
    outcomes = report.attribute(collected.exposures, collected.events_of, args.window, args.k)
    seen = sorted({o.arm for o in outcomes})
    if order is not None:
        order = [arm for arm in order if arm in seen] + [arm for arm in seen if arm not in order]
    reports = report.summarise(outcomes, order or seen, resamples=args.resamples)
    if args.json:
        print(report.as_json(reports, experiment=collected.experiment, window_seconds=args.window, k=args.k,
                             since=args.since, interval="95% percentile bootstrap over shoppers",
                             resamples=args.resamples))
    else:
        print(report.as_text(reports, collected.experiment, args.window, args.k))
    if args.plot:
        report.plot(reports, args.plot, collected.experiment, args.k)
        print(f"plot saved to {args.plot}", file=sys.stderr)
    return 0


def parse_window(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = value.strip()
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value[-1:] in units else float(value)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{value!r}: expected seconds or a span like 30m, 24h, 7d") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must be positive")
    return int(seconds)
