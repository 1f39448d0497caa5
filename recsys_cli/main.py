"""`recsys`: run the platform locally and talk to it.

Thin by design: each command parses its arguments and calls one function of
the training layer (training/), the local stack (recsys_cli.stack), the
gateway client (recsys_cli.client) or the library (recsys_core)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from recsys_core.data import paths

DEFAULT_GATEWAY = "127.0.0.1:50051"


def gateway_address() -> str:
    return os.environ.get("RECSYS_GATEWAY", DEFAULT_GATEWAY)


def cmd_serve(args) -> int:
    from recsys_cli.stack import serve

    transport = "plaintext" if args.insecure else "mtls-plaintext-gateway" if args.plaintext_gateway else "mtls"
    if args.replicas < 1:
        print(f"recsys serve: --replicas must be at least 1, got {args.replicas}", file=sys.stderr)
        return 2
    return serve(args.data, args.port, args.encoder, args.model, args.retail, show_example=not args.no_example,
                 transport=transport, tracing=args.tracing, tracing_endpoint=args.tracing_endpoint,
                 tracing_sample_ratio=args.tracing_sample_ratio, triton_tracing_url=args.tracing_triton,
                 replicas=args.replicas, redis=args.redis, edge=not args.no_edge)


def sample_ratio(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return ratio





def cmd_recommend(args) -> int:
    from recsys_cli.client import recommend

    return recommend(gateway_address(), args.user_id, args.k, args.category or [], args.timeout,
                     args.spread_interests, args.explore, args.json)


def cmd_profile(args) -> int:
    from recsys_cli.client import profile

    return profile(gateway_address(), args.user_id, args.history, args.timeout, args.json,
                   args.timeline, args.timeline_events)


def cmd_delete_user(args) -> int:
    from recsys_cli.client import delete_user

    return delete_user(gateway_address(), args.user_id, args.timeout, args.json)


DELEGATED = {
    "export": "export the encoder to model_repo/ (fp32 and int8 ONNX)",
    "evaluate": "offline evaluation on the published benchmark protocol (--served GATEWAY: on a running stack)",
    "train": "train our sequence model on shopping data",
    "evaluate-interests": "measure drift-aware shopper vectors and interest-spread lists (docs/profiles.md)",
}


# Commands that parse their own arguments, imported only when run: name ->
# (help, "module:function taking the rest of argv"), in `recsys --help` order.
OWN_PARSERS = {
    # Churn and lifetime value (docs/profiles.md).
    "train-value": ("train and evaluate churn and 3/12-month spend models beside BG/NBD + Gamma-Gamma",
                    "training.value:train_value_main"),
    # The ranking service's learned model (docs/results.md, "Learned ranker").
    "train-ranker": ("train the ranking service's LightGBM LambdaRank model (RANKING_MODEL) on one category",
                     "training.ranker:train_ranker_main"),
    # The value-aware objective (docs/results.md, "Value-aware ranking").
    "value-curve": ("NDCG@10 against value@10 at several value weights (RANKING_VALUE_WEIGHT), chosen on validation",
                    "training.value_curve:value_curve_main"),
    "item-values": ("write the ranking service's item-value table (RANKING_ITEM_VALUES) from the events",
                    "training.value_curve:item_values_main"),
    # A/B arms' results (docs/operations.md, "A/B arms").
    "ab-report": ("per-arm hit rate, NDCG, conversions and value of an A/B experiment, with intervals",
                  "recsys_cli.abreport:ab_report_main"),
    # The model registry (docs/operations.md, "Model lifecycle").
    "models": ("list the model registry's versions and which is promoted", "recsys_cli.models:models_main"),
    "promote": ("promote a registry version (admin; logs who and why)", "recsys_cli.models:promote_main"),
    "retrain": ("retrain on the event store, warm from the promoted version; promote if not worse",
                "recsys_cli.models:retrain_main"),
    "triton-follow": ("beside one Triton, load each promoted sequence version (Kubernetes' Triton pods)",
                      "recsys_cli.models:triton_follow_main"),
    # Review sentiment (docs/profiles.md, "Preferences from review text").
    "train-reviews": ("fine-tune MiniLM for review sentiment, export it to model_repo/review_sentiment",
                      "training.reviews:train_main"),
    "evaluate-reviews": ("held-out accuracy of the exported review classifier and the lexicon baseline",
                         "training.reviews:evaluate_main"),
}


def run_delegated(name: str, rest: list[str]) -> int:
    if name == "export":
        from recsys_core.models import export

        return export.main(rest)
    if name == "evaluate-interests":
        from training import interests_eval

        return interests_eval.main(rest)
    if name == "evaluate" and any(a.split("=")[0] in ("--served", "--write-heldout") for a in rest):
        from recsys_cli import served

        return served.main(rest)
    from training import commands

    return {"evaluate": commands.evaluate_main, "train": commands.train_main}[name](rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys", description="E-commerce recommendations over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run every service locally on a data set")
    serve.add_argument("--data", default=str(paths.BUNDLED_DATA_DIR),
                       help="directory in the amazon-2014 schema (default: the bundled subset)")
    serve.add_argument("--retail", default=str(paths.BUNDLED_RETAIL_DIR),
                       help="UCI Online Retail invoices: shoppers with money for churn and lifetime value "
                            "(default: the bundled subset; ../shared/data/online-retail for all; '' for none)")
    serve.add_argument("--port", type=int, default=50051, help="gateway port")
    serve.add_argument("--encoder", choices=("triton", "onnx"), default="triton",
                       help="where the text encoder runs (default: a local Triton server)")
    serve.add_argument("--no-example", action="store_true", help="skip the example recommendations")
    serve.add_argument("--model", type=Path,
                       help="a model directory from `recsys train --out`: serve its encoder and user tower")
    serve.add_argument("--plaintext-gateway", action="store_true",
                       help="the gateway's port in plaintext (mTLS between services stays): grpcurl -plaintext")
    serve.add_argument("--insecure", action="store_true",
                       help="no TLS anywhere (development only; callers' identities are not verified)")
    serve.add_argument("--tracing", choices=("off", "otlp", "file", "console"), default="off",
                       help="OpenTelemetry spans of every call in every service: otlp (to --tracing-endpoint), "
                            "file (var/traces/<service>.jsonl), console (stdout); default off")
    serve.add_argument("--tracing-endpoint", default="", metavar="URL",
                       help="OTLP/gRPC collector for --tracing otlp, e.g. http://localhost:4317 (Jaeger, Tempo, "
                            "an OpenTelemetry Collector); default OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4317")
    serve.add_argument("--tracing-sample-ratio", type=sample_ratio, metavar="R",
                       help="share of requests traced, 0..1 (default 1: every one)")
    serve.add_argument("--tracing-triton", default="", metavar="URL",
                       help="Triton's own spans too, as OTLP/HTTP to URL, e.g. http://localhost:4318/v1/traces "
                            "(they continue the embedding service's trace)")
    serve.add_argument("--replicas", type=int, default=1,
                       help="processes of each service, balanced by their callers; any that exits is restarted "
                            "(profile stays 1 on SQLite; docs/operations.md, \"Replicas and supervision locally\")")
    serve.add_argument("--redis", action="store_true",
                       help="keep profile's events and the catalogue in a local redis-server (state in var/redis) "
                            "instead of SQLite files, so profile scales to --replicas too")
    serve.add_argument("--no-edge", action="store_true",
                       help="callers reach the gateway directly instead of through recsys-edge, which refuses "
                            "oversized requests before reading them (docs/operations.md, \"The edge\")")
    serve.set_defaults(run=cmd_serve)
    # Security material (docs/operations.md, "Security"); these parse their own arguments.
    commands.add_parser("certs", add_help=False, help="make a CA and per-service certificates (recsys certs --out DIR)")
    commands.add_parser("token", add_help=False, help="mint a JWT with a token key (recsys token --help)")

    recommend = commands.add_parser("recommend", help="ask the gateway (RECSYS_GATEWAY) for recommendations")
    recommend.add_argument("user_id")
    recommend.add_argument("--k", type=int, default=10)
    recommend.add_argument("--category", action="append", help="restrict to a category (repeatable)")
    recommend.add_argument("--spread-interests", action="store_true",
                           help="spread the list across the shopper's interests")
    recommend.add_argument("--explore", type=int, default=0,
                           help="slots for parts of the catalogue the shopper has not shopped in (with --spread-interests)")
    recommend.add_argument("--timeout", type=float, default=10.0)
    recommend.add_argument("--json", action="store_true")
    recommend.set_defaults(run=cmd_recommend)

    profile = commands.add_parser("profile", help="what the platform understands of a shopper (via RECSYS_GATEWAY)")
    profile.add_argument("user_id")
    profile.add_argument("--history", type=int, default=20, help="recent events to show")
    profile.add_argument("--timeout", type=float, default=10.0)
    profile.add_argument("--json", action="store_true")
    profile.add_argument("--timeline", metavar="PNG", help="also plot the shopper's interests over time")
    profile.add_argument("--timeline-events", type=int, default=200, help="events the timeline covers")
    profile.set_defaults(run=cmd_profile)

    delete_user = commands.add_parser(
        "delete-user", help="forget a shopper: their events, profile and share of every count (via RECSYS_GATEWAY)")
    delete_user.add_argument("user_id")
    delete_user.add_argument("--timeout", type=float, default=30.0)
    delete_user.add_argument("--json", action="store_true")
    delete_user.set_defaults(run=cmd_delete_user)

    # These parse their own arguments (see `recsys NAME --help`).
    for name, helptext in DELEGATED.items():
        commands.add_parser(name, help=helptext, add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("certs", "token"):
        from recsys_cli import certs as security_material

        return {"certs": security_material.certs_main, "token": security_material.token_main}[argv[0]](argv[1:])
    if argv and argv[0] in DELEGATED:
        return run_delegated(argv[0], argv[1:])

    # Commands that parse their own arguments: each function takes the rest of argv.
    for name, (helptext, _) in OWN_PARSERS.items():
        commands.add_parser(name, help=helptext, add_help=False)
    if argv and argv[0] in OWN_PARSERS:
        module, function = OWN_PARSERS[argv[0]][1].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
