"""`recsys models`, `recsys promote` and `recsys retrain`: the model
registry from the command line (docs/operations.md, "Model lifecycle")."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from recsys_core import errors
from recsys_core.models import promotion
from recsys_core.models.registry import ENV, KINDS, ModelVersion, Registry

# The figure each kind is judged by, first found wins: (metrics group, name).
KEY_METRICS = {
    "sequence": (("holdout", "ndcg@10"), ("valid", "ndcg@10")),
    "ranker": (("holdout", "ndcg@10"), ("test", "ndcg@10"), (None, "held_out_ndcg@10")),
    "value": ((None, "churn_roc_auc"), (None, "spend_3m_spearman")),
}


def key_metrics(version: ModelVersion) -> dict[str, float]:
    metrics, found = version.manifest.get("metrics") or {}, {}
    for group, name in KEY_METRICS.get(version.kind, ()):
        source = metrics if group is None else metrics.get(group) or {}
        if isinstance(source, dict) and isinstance(source.get(name), (int, float)):
            found[name if group is None else f"{group} {name}"] = source[name]
    return found


def describe(version: ModelVersion, promoted: int | None) -> dict:
    manifest = version.manifest
    window = manifest.get("data_window") or {}
    decision = (manifest.get("retrain") or {}).get("decision")
    return {"kind": version.kind, "version": version.version, "created": manifest.get("created"),
            "parent": manifest.get("parent"), "promoted": version.version == promoted,
            "window": {k: window.get(k) for k in ("first_event", "last_event", "events", "shoppers")},
            "metrics": key_metrics(version), "retrain": decision, "path": str(version.path)}


def models_main(argv: list[str]) -> int:
    if argv and argv[0] == "prune":
        return prune_main(argv[1:])
    parser = argparse.ArgumentParser(prog="recsys models", description=(
        "List the model registry's versions: version, created, parent (warm-started from), data window, "
        "key metrics, and which one is PROMOTED (*). `recsys models prune --help`: delete old versions."))
    parser.add_argument("--kind", choices=KINDS, action="append", help="only this kind (repeatable; default every one)")
    parser.add_argument("--registry", type=Path, help=f"model registry (default ${ENV}, else var/models)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    registry = Registry(args.registry)
    rows = []
    for kind in args.kind or KINDS:
        record = registry.promotion_record(kind)
        promoted = None if record is None else int(record["version"])
        rows += [describe(v, promoted) for v in registry.versions(kind)]
    if args.json:
        print(json.dumps({"registry": str(registry.root), "versions": rows}, indent=2))
        return 0
    if not rows:
        print(f"no versions in {registry.root}")
        return 0
    print(f"{'':1} {'model':<12} {'created':<25} {'parent':>6} {'window':<43} {'events':>7} {'shoppers':>8}  metrics")
    for row in rows:
        window = row["window"]
        span = f"{(window['first_event'] or '-')[:19]} .. {(window['last_event'] or '-')[:19]}"
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items())
        if row["retrain"]:
            metrics += f" [retrain: {row['retrain']}]"
        print(f"{'*' if row['promoted'] else ' ':1} {row['kind'] + '/' + str(row['version']):<12} "
              f"{row['created'] or '-':<25} {row['parent'] if row['parent'] is not None else '-':>6} {span:<43} "
              f"{window['events'] if window['events'] is not None else '-':>7} "
              f"{window['shoppers'] if window['shoppers'] is not None else '-':>8}  {metrics}")
    return 0


def pinned_versions(pins: list[str], environ=None) -> dict[str, set[int]]:
    """Versions pruning must keep besides its own rules: `--pin kind/N`
    and the rankers the A/B configuration names, as the gateway
    (GATEWAY_AB_ARMS) and the ranking service (RANKING_MODEL_VERSIONS) read
    them, when set in this environment. ValueError says what is unreadable."""
    from recsys_core.experiments.arms import ArmsError, parse_arms, ranker_version
    from services.ranking.config import parse_versions

    environ = os.environ if environ is None else environ
    pinned: dict[str, set[int]] = {kind: set() for kind in KINDS}
    for pin in pins:
        kind, _, number = pin.partition("/")
        if kind not in KINDS or not number.isdigit():
            raise ValueError(f"--pin {pin!r}: expected kind/version, e.g. ranker/3 (kinds: {', '.join(KINDS)})")
        pinned[kind].add(int(number))
    try:
        arms = parse_arms(environ.get("GATEWAY_AB_ARMS", ""))
    except ArmsError as error:
        raise ValueError(f"GATEWAY_AB_ARMS: {error}") from None
    pinned["ranker"] |= {v for v in (ranker_version(arm.model_version) for arm in arms) if v is not None}
    pinned["ranker"] |= set(parse_versions(environ.get("RANKING_MODEL_VERSIONS", "")))
    return pinned


def prune_main(argv: list[str]) -> int:
    from recsys_core.models import pruning

    parser = argparse.ArgumentParser(prog="recsys models prune", description=(
        "Delete the oldest registry versions beyond the newest N of each kind. Never deleted: the promoted "
        "version, its parent and the version promoted before it (rollback targets), any version newer than "
        "the promoted one, pinned versions (--pin, GATEWAY_AB_ARMS, RANKING_MODEL_VERSIONS); a kind with "
        "nothing promoted is left alone. Each deletion is logged and kept in <registry>/<kind>/prunes.jsonl."))
    pruning.add_arguments(parser, "keep the newest N versions of each kind (>= 1) besides the protected ones",
                          required=True)
    parser.add_argument("--kind", choices=KINDS, action="append", help="only this kind (repeatable; default every one)")
    parser.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    parser.add_argument("--reason", default="", help="kept with each deletion (default: keep the newest N)")
    parser.add_argument("--by", help="who prunes (default: RECSYS_ACTOR, else the login name)")
    parser.add_argument("--registry", type=Path, help=f"model registry (default ${ENV}, else var/models)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.keep < 1:
        parser.error("--keep must be at least 1")
    try:
        pinned = pinned_versions(args.pin)
        pruning.check_model_repo(args.model_repo)
    except ValueError as error:
        parser.error(str(error))
    registry = Registry(args.registry)
    results = pruning.prune(registry, args.keep, args.kind or KINDS, pinned, dry_run=args.dry_run,
                            reason=args.reason.strip(), by=args.by, model_repo=args.model_repo)
    for found, done in results:
        for version in found.doomed:
            if args.dry_run:
                print(f"would prune {version.label} (created {version.manifest.get('created') or '-'})")
        for record in done:
            what = (f"{record['kind']}/{record['version']}" if "version" in record else
                    f"{record['triton_model']} version {record['triton_version']} of {record['model_repo']}")
            print(f"pruned {what} ({record['bytes'] / 1e6:.1f} MB)")
        for number in (found.encoder_versions if args.dry_run else ()):
            print(f"would prune text_encoder version {number} of {args.model_repo}")
        for number, why in found.kept.items():
            print(f"kept {found.kind}/{number}: {why}")
    return 0


def promote_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys promote", description=(
        "Promote a registry version: serving loads it next (the services poll PROMOTED). An admin action: "
        "who (RECSYS_ACTOR, else the login name; or --by) and why are logged and kept in "
        "<registry>/<kind>/promotions.jsonl."))
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("version", type=int)
    parser.add_argument("--reason", required=True, help="why (kept with the promotion)")
    parser.add_argument("--by", help="who promotes (default: RECSYS_ACTOR, else the login name)")
    parser.add_argument("--registry", type=Path, help=f"model registry (default ${ENV}, else var/models)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if not args.reason.strip():
        parser.error("--reason must say why")
    registry = Registry(args.registry)
    try:
        chosen = promotion.promote(registry, args.kind, args.version, args.reason.strip(), by=args.by)
    except errors.NotFound as error:
        print(f"recsys promote: {error}", file=sys.stderr)
        return 2
    print(f"promoted {chosen.label} ({chosen.path})")
    return 0


def retrain_main(argv: list[str]) -> int:
    """The profile service's configuration says which store to read
    (PROFILE_STORE=sqlite: PROFILE_STORE_PATH; redis: PROFILE_REDIS_*), so the
    job reads exactly what serving writes."""
    from recsys_core.data import paths
    from recsys_core.store.backends import open_store
    from services.profile.config import ProfileConfig
    from training.lifecycle import retrain_main as run

    from training.lifecycle import RetrainError
    from training.value_lifecycle import retrain_value

    config = ProfileConfig.from_env()

    def store():
        if config.store == "sqlite" and not Path(config.store_path).is_file():
            # Opening would create an empty store: say what is missing instead.
            raise RetrainError(f"no event store at {config.store_path} (PROFILE_STORE_PATH)")
        return open_store(config)

    label = f"redis {config.redis_url.rpartition('@')[2]} {config.redis_prefix}" if config.store == "redis" \
        else f"sqlite {config.store_path}"
    items = Path(config.data_dir) if config.data_dir else paths.BUNDLED_DATA_DIR
    return run(argv, store, label, items, pinned=pinned_versions, retrain_value=retrain_value)


def triton_follow_main(argv: list[str]) -> int:
    """`recsys triton-follow`: beside one Triton, serve what the registry
    promotes (recsys_core.models.triton_follow); until SIGTERM."""
    import signal
    import threading

    from recsys_core.models import triton_follow

    parser = argparse.ArgumentParser(prog="recsys triton-follow", description=(
        "Beside one Triton (explicit model control), install and load each sequence version the registry "
        "promotes as text_encoder version 1000+N of Triton's repository, keeping the previous one and the "
        "repository's own; GET /ready on --health-port once Triton serves the promoted version."))
    parser.add_argument("--registry", type=Path, help=f"model registry (default ${ENV}, else var/models)")
    parser.add_argument("--repository", type=Path, required=True,
                        help="the model repository Triton reads (writable; not the committed model_repo)")
    parser.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC address (default %(default)s)")
    parser.add_argument("--health-port", type=int, default=8090, help="port of /ready and /live (default %(default)s)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from recsys_core.data import paths

    if args.repository.resolve() == paths.MODEL_REPO.resolve():
        parser.error(f"--repository is the committed {paths.MODEL_REPO}, which promotions must not write to")
    if not (args.repository / paths.TEXT_ENCODER_MODEL).is_dir():
        parser.error(f"--repository {args.repository} has no {paths.TEXT_ENCODER_MODEL} model")
    if args.interval <= 0 or not 0 < args.health_port < 65536:
        parser.error("--interval must be positive and --health-port a port number")
    follower = triton_follow.Follower(Registry(args.registry), args.repository, args.triton_url, args.interval)
    health = triton_follow.serve_health(follower, args.health_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    logging.getLogger(__name__).info("following %s for Triton at %s (repository %s; health on :%d)",
                                     follower.registry.root, args.triton_url, args.repository, args.health_port)
    try:
        follower.run(stop)
    finally:
        health.shutdown()
    return 0
