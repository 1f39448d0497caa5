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

from recsys_core import paths

DEFAULT_GATEWAY = "127.0.0.1:50051"


def gateway_address() -> str:
    return os.environ.get("RECSYS_GATEWAY", DEFAULT_GATEWAY)


def example_shopper(data_dir: Path) -> str:
    """A real shopper of the data set who shops in several categories: the
    most telling example of cross-category recommendations."""
    from recsys_core.data import load_interactions

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
    from recsys_core.localstack import LocalStack

    logging.basicConfig(level=logging.INFO, format="%(asctime)s recsys %(message)s")
    data_dir = Path(args.data).resolve()
    stack = LocalStack(data_dir=data_dir, gateway_port=args.port, encoder=args.encoder)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    where = "a local Triton Inference Server" if args.encoder == "triton" else "onnxruntime in the embedding service"
    print(f"starting the encoder on {where}, then profile, embedding, ranking and gateway on {data_dir} ...",
          flush=True)
    try:
        stack.start()
    except (RuntimeError, TimeoutError, OSError) as error:
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
        except Exception as error:  # noqa: BLE001 - the services keep running
            print(f"example request failed: {error}", file=sys.stderr)
    print("\nserving until Ctrl-C or SIGTERM", flush=True)
    stop.wait()
    print("stopping ...", flush=True)
    stack.stop()
    return 0


def call_recommend(address: str, user_id: str, k: int, categories: list[str], timeout: float | None):
    import grpc

    from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        return stub.Recommend(
            gateway_pb2.RecommendRequest(user_id=user_id, k=k, categories=categories), timeout=timeout or 10.0
        )


def cmd_recommend(args) -> int:
    import grpc

    try:
        reply = call_recommend(gateway_address(), args.user_id, args.k, args.category or [], args.timeout)
    except grpc.RpcError as error:
        print(f"recsys recommend: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print_recommendations(reply, args.json)
    return 0


DELEGATED = {
    "export": "export the encoder to model_repo/ (fp32 and int8 ONNX)",
    "evaluate": "offline evaluation on the published benchmark protocol",
    "train": "train our sequence model on shopping data",
}


def run_delegated(name: str, rest: list[str]) -> int:
    if name == "export":
        from recsys_core import export

        return export.main(rest)
    from recsys_core.offline import commands

    return {"evaluate": commands.evaluate_main, "train": commands.train_main}[name](rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys", description="E-commerce recommendations over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run every service locally on a data set")
    serve.add_argument("--data", default=str(paths.BUNDLED_DATA_DIR),
                       help="directory in the amazon-2014 schema (default: the bundled subset)")
    serve.add_argument("--port", type=int, default=50051, help="gateway port")
    serve.add_argument("--encoder", choices=("triton", "onnx"), default="triton",
                       help="where the text encoder runs (default: a local Triton server)")
    serve.add_argument("--no-example", action="store_true", help="skip the example recommendations")
    serve.set_defaults(run=cmd_serve)

    recommend = commands.add_parser("recommend", help="ask the gateway (RECSYS_GATEWAY) for recommendations")
    recommend.add_argument("user_id")
    recommend.add_argument("--k", type=int, default=10)
    recommend.add_argument("--category", action="append", help="restrict to a category (repeatable)")
    recommend.add_argument("--timeout", type=float, default=10.0)
    recommend.add_argument("--json", action="store_true")
    recommend.set_defaults(run=cmd_recommend)

    # These parse their own arguments (see `recsys NAME --help`).
    for name, helptext in DELEGATED.items():
        commands.add_parser(name, help=helptext, add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return run_delegated(argv[0], argv[1:])

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
