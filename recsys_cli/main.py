"""`recsys`: run the platform locally and talk to it."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from recsys_core.data import paths

DEFAULT_GATEWAY = "127.0.0.1:50051"


def gateway_address() -> str:
    return os.environ.get("RECSYS_GATEWAY", DEFAULT_GATEWAY)


def example_shopper(data_dir: Path) -> str:
    """A real shopper of the data set who shops in several categories: the
    most telling example of cross-category recommendations."""
    from recsys_core.data.shopping import load_interactions

    events = load_interactions(data_dir)
    spread = events.groupby("user_id").agg(categories=("category", "nunique"), events=("item_id", "size"))
    return spread.sort_values(["categories", "events"], ascending=False).index[0]


def print_recommendations(reply, as_json: bool) -> None:
    from recsys.gateway.v1 import gateway_pb2

    path = gateway_pb2.RecommendationPath.Name(reply.path).removeprefix("RECOMMENDATION_PATH_").lower()
    if as_json:
        print(json.dumps({
            "path": path,
            "items": [
                {"item_id": i.item_id, "category": i.category, "title": i.title, "score": round(i.score, 4), "reason": i.reason}
                for i in reply.items
            ],
        }, indent=2))
        return
    print(f"path: {path}")
    print(f"{'#':>3}  {'item':<12} {'category':<20} {'score':>6}  title / reason")
    for rank, item in enumerate(reply.items, 1):
        print(f"{rank:>3}  {item.item_id:<12} {item.category[:20]:<20} {item.score:>6.3f}  {item.title[:70]}")
        print(f"{'':>46}{item.reason}")


def cmd_serve(args) -> int:
    from recsys_cli.stack import LocalStack

    logging.basicConfig(level=logging.INFO, format="%(asctime)s recsys %(message)s")
    data_dir = Path(args.data).resolve()
    model = None
    if args.model is not None:
        from recsys_core.models.model_serving import ModelDirError, open_model_dir

        try:
            model = open_model_dir(args.model)
        except ModelDirError as error:
            print(f"recsys serve: --model: {error}", file=sys.stderr)
            return 2
    stack = LocalStack(data_dir=data_dir, gateway_port=args.port, encoder=args.encoder,
                       model_dir=model.path if model else None,
                       retail_dir=Path(args.retail).resolve() if args.retail else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    where = "a local Triton Inference Server" if args.encoder == "triton" else "onnxruntime in the embedding service"
    if model is not None:
        print(f"serving the model {model.path} (trained on {', '.join(model.manifest.get('categories', []))}): "
              f"its encoder indexes the catalogue, its user tower on Triton gives shoppers' vectors", flush=True)
    print(f"starting the encoder on {where}, then profile, embedding, ranking and gateway on {data_dir} ...",
          flush=True)
    try:
        stack.start()
    except (RuntimeError, TimeoutError, OSError, ValueError) as error:
        print(f"recsys serve: {error}", file=sys.stderr)
        return 1
    gateway = stack.addresses["gateway"]
    print(f"\nall services SERVING; gateway at {gateway}", flush=True)
    if stack.triton is not None:
        print(f"Triton gRPC at {stack.triton.grpc_url}, metrics at {stack.triton.metrics_url}", flush=True)
    print("Prometheus metrics: " + ", ".join(
        f"{name.removesuffix('-metrics')} http://{address}/metrics"
        for name, address in stack.addresses.items() if name.endswith("-metrics") and name != "triton-metrics"
    ), flush=True)
    if not args.no_example:
        shopper = example_shopper(data_dir)
        print(f"\nrecommendations for shopper {shopper} (recsys recommend {shopper}):")
        try:
            print_recommendations(call_recommend(gateway, shopper, 10, [], None), as_json=False)
            print(f"\nprofile of shopper {shopper} (recsys profile {shopper}):")
            print_profile(call_profile(gateway, shopper, 10, None))
        except Exception as error:  # noqa: BLE001 - the services keep running
            print(f"example request failed: {error}", file=sys.stderr)
    print("\nserving until Ctrl-C or SIGTERM", flush=True)
    stop.wait()
    print("stopping ...", flush=True)
    stack.stop()
    return 0


def call_recommend(address: str, user_id: str, k: int, categories: list[str], timeout: float | None,
                   spread_interests: bool = False, explore: int = 0):
    import grpc

    from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        return stub.Recommend(
            gateway_pb2.RecommendRequest(user_id=user_id, k=k, categories=categories,
                                         spread_interests=spread_interests, explore_slots=explore),
            timeout=timeout or 10.0,
        )


def cmd_recommend(args) -> int:
    import grpc

    try:
        reply = call_recommend(gateway_address(), args.user_id, args.k, args.category or [], args.timeout,
                               args.spread_interests, args.explore)
    except grpc.RpcError as error:
        print(f"recsys recommend: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print_recommendations(reply, args.json)
    return 0


def call_profile(address: str, user_id: str, history: int, timeout: float | None):
    import grpc

    from recsys.gateway.v1 import gateway_pb2_grpc
    from recsys.profile.v1 import profile_pb2

    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        return stub.GetProfile(profile_pb2.GetProfileRequest(user_id=user_id, history_limit=history),
                               timeout=timeout or 10.0)


def profile_dict(reply) -> dict:
    """The profile as JSON-ready data, without raw vectors (unreadable, and
    GetProfile returns them to programs that need them)."""
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for name in ("long_term_interest", "short_term_interest"):
        data.pop(name, None)
    for interest in data.get("interests", []):
        interest.pop("centroid", None)
    return data


def when(timestamp: int) -> str:
    import datetime

    if not timestamp:
        return "no date"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d")


def shares(entries, limit: int = 4) -> str:
    return " · ".join(f"{e.category.replace(', ', ' > ')} {e.share:.0%}" for e in list(entries)[:limit]) or "-"


def print_profile(reply) -> None:
    if not reply.known:
        print(f"shopper {reply.user_id}: no events (recommendations take the cold-start path)")
        return
    categories = ", ".join(f"{c.category} {c.events}" for c in reply.categories)
    print(f"shopper {reply.user_id}: {reply.event_count} events ({categories})")
    drift = reply.drift
    state = "DRIFTING" if drift.drifting else "steady"
    print(f"\ninterest drift: {drift.score:.2f} (flag at {drift.threshold:.2f}): {state}; "
          f"embedding distance {drift.embedding_distance:.2f}, category shift {drift.category_shift:.2f}")
    print(f"  long-term taste: {shares(drift.long_term_categories)}")
    print(f"  recent events:   {shares(drift.short_term_categories)}")
    print("\ninterests:")
    for rank, interest in enumerate(reply.interests, 1):
        print(f"  {rank}. {interest.label[:60]:<60} {interest.weight:>4.0%}  {interest.events:>3} events, "
              f"last {interest.last_position} events ago ({when(interest.last_timestamp)})")
    if reply.HasField("value"):
        value = reply.value
        spend = ("no amounts in the events" if value.expected_spend_3m < 0 else
                 f"next 3 months {value.expected_spend_3m:,.2f}, 12 months {value.expected_spend_12m:,.2f}")
        print(f"\nvalue (as of {when(value.as_of)}): churn {value.churn_probability:.0%} "
              f"within {value.churn_horizon_days} days; expected spend {spend}")
    if reply.HasField("preferences") and reply.preferences.reviews:
        p = reply.preferences
        aspects = ", ".join(f"{a.aspect} (+{a.praised} -{a.criticised})" for a in p.aspects) or "-"
        print(f"\nreviews: {p.reviews} ({p.positive} positive, {p.negative} negative); cares about: {aspects}")
    print("\nrecent history:")
    for event in reply.recent_history[:10]:
        rating = f" {event.rating:.0f}★" if event.rating else ""
        print(f"  {when(event.timestamp)}  {event.item_id:<14} {event.category}{rating}")


def plot_timeline(reply, out: Path) -> None:
    """The shopper's events over time, one row per interest cluster: when each
    interest was active, and which one the recent events belong to."""
    import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_of = {}
    for row, interest in enumerate(reply.interests):
        for item_id in interest.item_ids:
            row_of.setdefault(item_id, row)
    events = [e for e in reversed(reply.recent_history) if e.item_id in row_of]
    dated = all(e.timestamp for e in events)
    xs = [datetime.datetime.fromtimestamp(e.timestamp, datetime.timezone.utc) if dated else position
          for position, e in enumerate(events)]
    figure, axis = plt.subplots(figsize=(11, 1.2 + 0.6 * max(len(reply.interests), 1)))
    for row, interest in enumerate(reply.interests):
        mine = [x for x, e in zip(xs, events) if row_of[e.item_id] == row]
        axis.scatter(mine, [row] * len(mine), s=30 + 300 * interest.weight, alpha=0.6)
    axis.set_yticks(range(len(reply.interests)))
    axis.set_yticklabels([f"{i.label[:45]} ({i.weight:.0%})" for i in reply.interests])
    axis.invert_yaxis()
    axis.set_xlabel("date" if dated else "event (oldest first)")
    state = "drifting" if reply.drift.drifting else "steady"
    axis.set_title(f"shopper {reply.user_id}: interests over time; drift {reply.drift.score:.2f} ({state})")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def cmd_profile(args) -> int:
    import grpc

    history = max(args.history, args.timeline_events) if args.timeline else args.history
    try:
        reply = call_profile(gateway_address(), args.user_id, history, args.timeout)
    except grpc.RpcError as error:
        print(f"recsys profile: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    if args.timeline:
        plot_timeline(reply, Path(args.timeline))
        del reply.recent_history[args.history:]
    if args.json:
        print(json.dumps(profile_dict(reply), indent=2))
    else:
        print_profile(reply)
    if args.timeline:
        print(f"timeline written to {args.timeline}", file=sys.stderr)
    return 0


DELEGATED = {
    "export": "export the encoder to model_repo/ (fp32 and int8 ONNX)",
    "evaluate": "offline evaluation on the published benchmark protocol",
    "train": "train our sequence model on shopping data",
    "evaluate-interests": "measure drift-aware shopper vectors and interest-spread lists (docs/profiles.md)",
}


def run_delegated(name: str, rest: list[str]) -> int:
    if name == "export":
        from recsys_core.models import export

        return export.main(rest)
    if name == "evaluate-interests":
        from training import interests_eval

        return interests_eval.main(rest)
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
    serve.set_defaults(run=cmd_serve)

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

    # These parse their own arguments (see `recsys NAME --help`).
    for name, helptext in DELEGATED.items():
        commands.add_parser(name, help=helptext, add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return run_delegated(argv[0], argv[1:])

    # Churn and lifetime value (docs/profiles.md); parses its own arguments.
    commands.add_parser("train-value", add_help=False,
                        help="train and evaluate churn and 3/12-month spend models beside BG/NBD + Gamma-Gamma")
    if argv and argv[0] == "train-value":
        from training.value import train_value_main

        return train_value_main(argv[1:])

    # Review sentiment (docs/profiles.md "Preferences from review text"); these parse their own arguments.
    commands.add_parser("train-reviews", add_help=False,
                        help="fine-tune MiniLM for review sentiment, export it to model_repo/review_sentiment")
    commands.add_parser("evaluate-reviews", add_help=False,
                        help="held-out accuracy of the exported review classifier and the lexicon baseline")
    if argv and argv[0] in ("train-reviews", "evaluate-reviews"):
        from training import reviews as review_training

        main_of = {"train-reviews": review_training.train_main, "evaluate-reviews": review_training.evaluate_main}
        return main_of[argv[0]](argv[1:])

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
