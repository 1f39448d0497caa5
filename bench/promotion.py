"""p99 of the embedding and ranking calls of a Recommend while a new model
is promoted (issue #19, hot swap: 0 failed calls, p99 within 2x of quiet).

    python bench/promotion.py [--items N] [--concurrency C] [--seconds S] [--encoder onnx|triton]
                              [--embed-texts] [--swap-timeout S] [--keep] [--json OUT]
    python bench/promotion.py --gateway [--rate R] [--seconds S] [--encoder onnx|triton] [--json OUT]

Starts the embedding and ranking services as processes of their own (so
the measuring client does not share their interpreter), each serving a
model registry (EMBEDDING_MODEL_REGISTRY, RANKING_MODEL_REGISTRY) in a
scratch folder holding two sequence versions (the pretrained encoder, and
the same encoder with its output dimensions permuted: other vectors, so the
whole catalogue is re-encoded and re-indexed on the swap, as for a
retrained encoder) and two small LightGBM rankers. A closed loop of
RetrieveCandidates (a Recommend's embedding call, the query from a context
item) and Rank runs three times: quiet; while sequence/2 and ranker/2 are
promoted (the phase lasts until both services report the new versions, and
at least --seconds); quiet again on the new versions. Every reply's
model_version is counted.

With --gateway, the whole local stack instead, as `recsys serve` runs it
(recsys-edge, mTLS, tokens; the bundled catalogue, all of it re-encoded on
the swap), both services following the same kind of registry, and ghz
sending --rate Recommend calls a second, open loop, through the gateway (as
loadtest/chaos.py does): quiet for --seconds, then the promotion (until the
embedding and ranking services answer with the new versions), then
--seconds on the new versions. Every call's outcome and latency come from
ghz's own report, split by when each call started.

The builders (`sequence_version`, `ranker_version`) are what
tests/test_hot_swap.py puts into its registries.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import numpy as np  # noqa: E402

from loadloop import closed_loop, round_or_none  # noqa: E402

TARGET_RATIO = 2.0
USER_TOWER_MAX_LEN = 50


# -- model versions ---------------------------------------------------------


def permuted_encoder(source: Path, out: Path, seed: int) -> Path:
    """An exported encoder (recsys export's layout) whose EMBEDDING is the
    source's with its dimensions permuted by `seed`: still unit vectors and
    still a good encoder, but every vector differs, as a retrained encoder's would."""
    import onnx
    from onnx import helper, numpy_helper

    from recsys_core.models import encoder as enc, export

    out.mkdir(parents=True, exist_ok=True)
    metadata = json.loads((source / enc.METADATA_FILE).read_text())
    permutation = np.random.default_rng(seed).permutation(int(metadata["dimension"])).astype(np.int64)
    for name in (enc.WEIGHTS_FILE, enc.INT8_WEIGHTS_FILE):
        model = onnx.load(str(source / name))
        graph = model.graph
        unpermuted = f"{enc.EMBEDDING}_unpermuted"
        for node in graph.node:
            node.output[:] = [unpermuted if o == enc.EMBEDDING else o for o in node.output]
        graph.initializer.append(numpy_helper.from_array(permutation, "embedding_permutation"))
        graph.node.append(helper.make_node("Gather", [unpermuted, "embedding_permutation"], [enc.EMBEDDING], axis=1))
        onnx.save(model, str(out / name))
    shutil.copyfile(source / enc.TOKENIZER_FILE, out / enc.TOKENIZER_FILE)
    metadata["weights"] = export.weights_metadata(out / enc.WEIGHTS_FILE, out / enc.INT8_WEIGHTS_FILE)
    metadata["permuted_with_seed"] = seed
    (out / enc.METADATA_FILE).write_text(json.dumps(metadata, indent=2))  # last: marks the export complete
    return out


def mean_user_tower(out: Path, dimension: int) -> Path:
    """A user tower that is the mean of the history's vectors (a real ONNX
    graph, no weights): what a sequence version needs beside its encoder
    for the profile service; the embedding service never runs it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from recsys_core.models import encoder as enc, export, user_tower as ut

    out.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("Unsqueeze", [ut.MASK, "last_axis"], ["mask3"]),
        helper.make_node("Mul", [ut.ITEM_VECTORS, "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "length_axis"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", [ut.MASK, "length_axis"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["safe_count"]),
        helper.make_node("Div", ["total", "safe_count"], [ut.SHOPPER_VECTOR]),
    ]
    graph = helper.make_graph(
        nodes, "mean_user_tower",
        [helper.make_tensor_value_info(ut.ITEM_VECTORS, TensorProto.FLOAT, ["batch", "length", dimension]),
         helper.make_tensor_value_info(ut.MASK, TensorProto.FLOAT, ["batch", "length"])],
        [helper.make_tensor_value_info(ut.SHOPPER_VECTOR, TensorProto.FLOAT, ["batch", dimension])],
        initializer=[numpy_helper.from_array(np.asarray([2], dtype=np.int64), "last_axis"),
                     numpy_helper.from_array(np.asarray([1], dtype=np.int64), "length_axis"),
                     numpy_helper.from_array(np.asarray([1.0], dtype=np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", export.OPSET)])
    onnx.save(model, str(out / enc.WEIGHTS_FILE))
    shutil.copyfile(out / enc.WEIGHTS_FILE, out / enc.INT8_WEIGHTS_FILE)
    (out / ut.METADATA_FILE).write_text(json.dumps({
        "dimension": dimension, "max_len": USER_TOWER_MAX_LEN,
        "weights": export.weights_metadata(out / enc.WEIGHTS_FILE, out / enc.INT8_WEIGHTS_FILE)}, indent=2))
    return out


def sequence_version(encoder_dir: Path, out: Path, permute_seed: int | None = None) -> Path:
    """A model directory in `recsys train --out`'s layout (recsys_core/models/
    model_serving.py reads it) around `encoder_dir`, permuted with
    `permute_seed` (None: the encoder as it is); no ID vectors."""
    from recsys_core.models import encoder as enc, model_serving

    out.mkdir(parents=True)
    target = out / model_serving.ENCODER_DIR
    if permute_seed is None:
        shutil.copytree(encoder_dir, target, ignore=shutil.ignore_patterns("__pycache__", "model.py"))
    else:
        permuted_encoder(encoder_dir, target, permute_seed)
    dimension = int(json.loads((target / enc.METADATA_FILE).read_text())["dimension"])
    mean_user_tower(out / model_serving.USER_TOWER_DIR, dimension)
    (out / model_serving.ITEMS_DIR).mkdir()
    (out / model_serving.ITEMS_DIR / model_serving.ITEM_IDS_FILE).write_text("[]")
    (out / model_serving.MANIFEST).write_text(json.dumps({
        "format": model_serving.FORMAT, "encoder": {"dimension": dimension}, "id_vectors": False,
        "notes": "built by bench/promotion.py: the pretrained encoder" + (
            f", dimensions permuted (seed {permute_seed})" if permute_seed is not None else "")}, indent=2))
    return model_serving.open_model_dir(out).path


def ranker_version(out: Path, descending: bool) -> Path:
    """A LightGBM LambdaRank model on one feature, long_term_similarity,
    trained (a few trees, a second) to rank by it ascending or descending:
    two versions order the same candidates oppositely."""
    import lightgbm

    rng = np.random.default_rng(0)
    rows = rng.uniform(-1, 1, size=(400, 1))
    grade = np.minimum(np.floor((rows[:, 0] + 1) * 2), 3)  # 0..3 from -1..1
    labels = grade if descending else 3 - grade
    booster = lightgbm.train({"objective": "lambdarank", "verbose": -1, "min_data_in_leaf": 1, "num_threads": 1},
                             lightgbm.Dataset(rows, labels.astype(float), group=[20] * 20,
                                              feature_name=["long_term_similarity"]),
                             num_boost_round=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(out))
    Path(str(out) + ".json").write_text(json.dumps({"feature_names": ["long_term_similarity"],
                                                    "notes": f"ranks long_term_similarity "
                                                             f"{'descending' if descending else 'ascending'}"}))
    return out


def small_catalogue(out: Path, items: int) -> Path:
    """A data folder holding the first `items` items of the bundled data."""
    import pandas as pd

    from recsys_core.data import paths, shopping

    frame = pd.read_csv(paths.BUNDLED_DATA_DIR / shopping.ITEMS_FILE, dtype=str, keep_default_na=False)
    out.mkdir(parents=True, exist_ok=True)
    frame.head(items).to_csv(out / shopping.ITEMS_FILE, index=False)
    return out


def triton_repository(out: Path) -> Path:
    """A serving repository for Triton holding text_encoder alone (the
    committed config and versions, linked): promotions add versions here,
    never to the committed model_repo/."""
    from recsys_core.data import paths
    from recsys_core.models import model_serving

    model_serving.serving_repository_of(out, paths.MODEL_REPO, (paths.TEXT_ENCODER_MODEL,))
    return out


# -- the measurement -----------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(name: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", f"services.{name}.server"], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_serving(channel, seconds: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + seconds
    if True:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"not SERVING within {seconds:.0f} s")


def make_calls(embedding, ranking, versions: Counter, lock: threading.Lock, texts: dict[str, str] | None = None):
    """One Recommend's embedding and ranking calls (on these channels), back
    to back, as one loop call; the model_version of every reply is counted.
    With `texts` (item id -> text), an EmbedTexts of the item's text first:
    a text query's encoding, the call that reaches Triton."""
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
    from recsys.common.v1 import common_pb2

    retrieve = embedding_pb2_grpc.EmbeddingServiceStub(embedding).RetrieveCandidates
    rank = ranking_pb2_grpc.RankingServiceStub(ranking).Rank

    embed = embedding_pb2_grpc.EmbeddingServiceStub(embedding).EmbedTexts

    def call(item_id: str, timeout: float):
        if texts is not None:
            embed(embedding_pb2.EmbedTextsRequest(texts=[texts[item_id][:200]]), timeout=timeout)
        found = retrieve(embedding_pb2.RetrieveCandidatesRequest(context_item_ids=[item_id], k=50), timeout=timeout)
        ranked = rank(ranking_pb2.RankRequest(k=10, candidates=[
            ranking_pb2.Candidate(item_id=c.item.item_id, features=common_pb2.CandidateFeatures(
                long_term_similarity=c.features.context_similarity)) for c in found.candidates]), timeout=timeout)
        with lock:
            versions[(found.model_version, ranked.model_version)] += 1
        return ranked

    return call


def phase(call, item_ids: list[str], concurrency: int, seconds: float, until=None, at_most: float = 0) -> dict:
    """A closed loop for `seconds`, or longer while `until()` is false (at most `at_most` seconds)."""
    abort = threading.Event()
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        closed_loop(call, item_ids, concurrency, 10**9, max(seconds, at_most) if until else seconds, abort)))
    runner.start()
    started = time.monotonic()
    if until is not None:
        while runner.is_alive() and (time.monotonic() - started < seconds or not until()):
            time.sleep(0.1)
        abort.set()
    runner.join()
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="catalogue size (re-encoded on the swap)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each quiet phase (and the least "
                                                                     "of the promotion phase)")
    parser.add_argument("--encoder", choices=("onnx", "triton"), default="onnx")
    parser.add_argument("--embed-texts", action="store_true",
                        help="each loop call also encodes the item's text (EmbedTexts): with --encoder triton, "
                             "the load then reaches Triton while the new version loads")
    parser.add_argument("--swap-timeout", type=float, default=600.0,
                        help="longest the promotion phase waits for both services to swap")
    parser.add_argument("--gateway", action="store_true",
                        help="the whole stack, ghz through the gateway (see above) instead of direct calls")
    parser.add_argument("--rate", type=float, default=20.0, help="with --gateway: Recommend calls a second")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, registry) and print it")
    return parser.parse_args(argv)


def p99_ratio(phases: dict) -> float | None:
    """The promotion phase's p99 over the quiet phase's."""
    quiet, promotion = phases["quiet"]["p99_ms"], phases["promotion"]["p99_ms"]
    return promotion / quiet if promotion and quiet else None


def write_report(report: dict, path: Path | None) -> None:
    print(json.dumps(report, indent=2))
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n")


def leave_scratch(work: Path, keep: bool) -> None:
    if keep:
        print(f"kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


def make_registry(work: Path, permute_seed: int = 1):
    """sequence/1 (the pretrained encoder) and ranker/1 promoted; sequence/2
    (other vectors: its dimensions permuted by `permute_seed`) and ranker/2
    (the other order) to promote."""
    from recsys_core.models.encoder import latest_version_dir
    from recsys_core.models.registry import Registry

    registry = Registry(work / "registry")
    pretrained = latest_version_dir()
    first = registry.add("sequence", sequence_version(pretrained, work / "seq1"))
    second = registry.add("sequence", sequence_version(pretrained, work / "seq2", permute_seed=permute_seed))
    ranker_a = registry.add("ranker", ranker_version(work / "r1" / "ranker.txt", descending=True))
    ranker_b = registry.add("ranker", ranker_version(work / "r2" / "ranker.txt", descending=False))
    registry.promote("sequence", first.version, "bench: start")
    registry.promote("ranker", ranker_a.version, "bench: start")
    return registry, second, ranker_b


def window(calls, begin: float, end: float) -> dict:
    from loadloop import percentile

    inside = [c for c in calls if begin <= c.started < end]
    latencies = sorted((c.ended - c.started) * 1000 for c in inside)
    failed = Counter(c.code for c in inside if c.code != "OK")
    return {"calls": len(inside), "failed": sum(failed.values()), "errors": dict(failed),
            "p50_ms": round_or_none(percentile(latencies, 50)), "p99_ms": round_or_none(percentile(latencies, 99)),
            "seconds": round(end - begin, 1)}


def through_gateway(args) -> int:
    sys.path.insert(0, str(REPO_ROOT / "loadtest"))
    from chaos import GHZ, GhzLoad
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from recsys.ranking.v1 import ranking_pb2, ranking_pb2_grpc
    from recsys_cli.stack import LocalStack, free_port as stack_port

    if not GHZ.exists():
        raise RuntimeError(f"{GHZ} is missing: scripts/install_ghz.sh")
    work = Path(tempfile.mkdtemp(prefix="recsys-promotion-gateway-"))
    stack = load = None
    try:
        # A permutation no earlier run used: the stack's embedding cache
        # (shared with `recsys serve`) holds no vector of it, so the swap
        # re-encodes the whole catalogue.
        registry, second, ranker_b = make_registry(work, permute_seed=int(time.time()))
        options = {"encoder": args.encoder}
        if args.encoder == "triton":
            options["model_repo"] = triton_repository(work / "model_repo")
        stack = LocalStack(gateway_port=stack_port(), state_dir=work / "state", edge=True, extra_env={
            "EMBEDDING_MODEL_REGISTRY": str(registry.root), "EMBEDDING_MODEL_POLL_SECONDS": "0.5",
            "RANKING_MODEL_REGISTRY": str(registry.root), "RANKING_MODEL_POLL_SECONDS": "0.5"}, **options)
        print("starting the stack ...", flush=True)
        stack.start()
        print(f"{stack.describe_transport()}; ghz at {args.rate:g} Recommend/s", flush=True)
        embedding = embedding_pb2_grpc.EmbeddingServiceStub(stack.channel("embedding"))
        ranking = ranking_pb2_grpc.RankingServiceStub(stack.channel("ranking"))

        from recsys_core.data import shopping

        probe_item = str(shopping.load_items(stack.data_dir).item_id.iloc[0])

        def serving_new() -> bool:
            found = embedding.RetrieveCandidates(embedding_pb2.RetrieveCandidatesRequest(
                context_item_ids=[probe_item], k=5), timeout=10)
            ranked = ranking.Rank(ranking_pb2.RankRequest(k=1, candidates=[
                ranking_pb2.Candidate(item_id=c.item.item_id) for c in found.candidates]), timeout=10)
            return found.model_version == second.label and ranked.model_version == ranker_b.label

        load = GhzLoad(stack, args.rate, max_seconds=args.swap_timeout + 4 * args.seconds + 60).start()
        time.sleep(3.0)  # ghz connected and warm; not reported
        quiet_from = time.time()
        time.sleep(args.seconds)
        promoted_at = time.time()
        registry.promote("sequence", second.version, "bench: promotion under ghz")
        registry.promote("ranker", ranker_b.version, "bench: promotion under ghz")
        swapped = False
        while time.time() - promoted_at < args.swap_timeout:
            swapped = serving_new()
            if swapped and time.time() - promoted_at >= args.seconds:
                break
            time.sleep(0.5)
        swapped_at = time.time()
        print(f"{'swapped' if swapped else 'NOT swapped'} after {swapped_at - promoted_at:.1f} s", flush=True)
        time.sleep(args.seconds)
        ended = time.time()
        calls = load.stop()
        load = None
        phases = {"quiet": window(calls, quiet_from, promoted_at),
                  "promotion": window(calls, promoted_at, swapped_at),
                  "after": window(calls, swapped_at, ended)}
        ratio = p99_ratio(phases)
        failed = sum(p["failed"] for p in phases.values())
        report = {"mode": "gateway", "rate": args.rate, "encoder": args.encoder, "transport": stack.describe_transport(),
                  "phases": phases, "swapped": swapped, "promotion_phase_seconds": round(swapped_at - promoted_at, 1),
                  "failed_calls": failed, "p99_ratio": round_or_none(ratio, 2), "target_ratio": TARGET_RATIO,
                  "load_average": [round(x, 2) for x in os.getloadavg()]}
        write_report(report, args.json)
        return 0 if failed == 0 and swapped else 1
    finally:
        if load is not None:
            load.stop()
        if stack is not None:
            stack.stop()
        leave_scratch(work, args.keep)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gateway:
        return through_gateway(args)
    work = Path(tempfile.mkdtemp(prefix="recsys-promotion-bench-"))
    processes: list[subprocess.Popen] = []
    triton = None
    try:
        registry, second, ranker_b = make_registry(work)
        data = small_catalogue(work / "data", args.items)
        embedding, ranking = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        # The services as deployed: mTLS and tokens (recsys serve's local CA).
        from recsys_cli.certs import LocalSecurity
        from recsys_core.rpc.grpc_util import CHANNEL_OPTIONS

        security = LocalSecurity.ensure(work / "tls")
        admin = security.security("admin")
        token = security.write_admin_token().read_text().strip()

        def secured(name: str) -> dict[str, str]:
            prefix = name.upper() + "_"
            return {prefix + "TLS_DIR": str(security.tls_dir(name)), prefix + "AUTH_JWT_KEY_FILE": str(security.jwt_key)}

        env = {"EMBEDDING_ADDRESS": embedding, **secured("embedding"), "EMBEDDING_DATA_DIR": str(data),
               "EMBEDDING_RETAIL_DIR": "", "EMBEDDING_CATALOGUE_PATH": str(work / "catalogue.sqlite3"),
               "EMBEDDING_CACHE_DIR": str(work / "cache"), "EMBEDDING_MODEL_REGISTRY": str(registry.root),
               "EMBEDDING_MODEL_POLL_SECONDS": "0.2", "EMBEDDING_GRACE_SECONDS": "2",
               "EMBEDDING_ENCODER": args.encoder}
        if args.encoder == "triton":
            from recsys_core.models.triton import TritonServer

            repo = triton_repository(work / "model_repo")
            triton = TritonServer(repo, log_path=work / "triton.log", startup_timeout=300).start()
            env.update(EMBEDDING_TRITON_URL=triton.grpc_url, EMBEDDING_MODEL_REPO=str(repo))
        processes.append(start_service("embedding", env, work / "embedding.log"))
        processes.append(start_service("ranking", {
            "RANKING_ADDRESS": ranking, **secured("ranking"), "RANKING_MODEL_REGISTRY": str(registry.root),
            "RANKING_MODEL_POLL_SECONDS": "0.2"}, work / "ranking.log"))
        embedding_channel = admin.channel(embedding, "embedding", CHANNEL_OPTIONS, token=token)
        ranking_channel = admin.channel(ranking, "ranking", CHANNEL_OPTIONS, token=token)
        wait_serving(ranking_channel, 60)
        wait_serving(embedding_channel, 900)
        from recsys_core.data import shopping

        items = shopping.load_items(data)
        item_ids = list(items.item_id)[:500]
        texts = dict(zip(items.item_id, items.text)) if args.embed_texts else None
        versions: Counter = Counter()
        lock = threading.Lock()
        call = make_calls(embedding_channel, ranking_channel, versions, lock, texts)
        warmup = phase(call, item_ids, args.concurrency, 2.0)  # not reported
        if warmup["error_count"]:
            raise RuntimeError(f"calls fail before any promotion: {warmup['errors']} (logs: {work})")
        versions.clear()
        results = {"quiet": phase(call, item_ids, args.concurrency, args.seconds)}
        quiet_versions = dict(versions)
        versions.clear()
        promoted_at = time.monotonic()
        registry.promote("sequence", second.version, "bench: promotion under load")
        registry.promote("ranker", ranker_b.version, "bench: promotion under load")
        new = (second.label, ranker_b.label)
        results["promotion"] = phase(call, item_ids, args.concurrency, args.seconds,
                                     until=lambda: versions.get(new, 0) > 0, at_most=args.swap_timeout)
        swap_seconds = time.monotonic() - promoted_at
        promotion_versions = dict(versions)
        versions.clear()
        results["after"] = phase(call, item_ids, args.concurrency, args.seconds)
        after_versions = dict(versions)
        ratio = p99_ratio(results)
        failed = sum(r["error_count"] for r in results.values())
        report = {
            "items": args.items, "concurrency": args.concurrency, "encoder": args.encoder,
            "embed_texts": args.embed_texts,
            "phases": results, "promotion_phase_seconds": round(swap_seconds, 1),
            "versions": {name: {f"{e}+{r}": n for (e, r), n in counts.items()} for name, counts in
                         (("quiet", quiet_versions), ("promotion", promotion_versions), ("after", after_versions))},
            "failed_calls": failed, "p99_ratio": round_or_none(ratio, 2), "target_ratio": TARGET_RATIO,
        }
        write_report(report, args.json)
        swapped = set(after_versions) == {new}
        if not swapped:
            print(f"the services did not both swap to {new}; their logs: {work}", file=sys.stderr)
            args.keep = True
        return 0 if failed == 0 and swapped else 1
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        if triton is not None:
            triton.stop()
        leave_scratch(work, args.keep)


if __name__ == "__main__":
    sys.exit(main())
