"""The text encoder in process (onnxruntime) against the same model on a real
local Triton server, at batch 1, 8 and 64 and concurrency 1, 4 and 16.

    python bench/encoder.py [--requests N] [--seconds S] [--json OUT]
                            [--batches 1,8,64] [--concurrency 1,4,16] [--model NAME]

Both sides run the same weights at the same precision (the Triton model
config's, int8 on CPU). Requests are real catalogue titles from the bundled
data, a different slice each call. Prints a table and the Triton/in-process
throughput ratio, and checks the targets: Triton at concurrency 16 reaches at
least 80% of in-process throughput; p50 of one request of 8 titles <= 10 ms.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "bench")]

from loadloop import closed_loop  # noqa: E402

BATCHES = (1, 8, 64)
CONCURRENCIES = (1, 4, 16)
WARMUP_CALLS = 10
RATIO_TARGET = 0.8
P50_TARGET_MS = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="calls per cell at most")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per cell at most")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batches", type=int_list, default=BATCHES, help="texts per call, comma-separated")
    parser.add_argument("--concurrency", type=int_list, default=CONCURRENCIES, help="calls in flight, comma-separated")
    parser.add_argument("--model", default=None, help="Triton model to call (default: text_encoder)")
    parser.add_argument("--repo", type=Path, default=None, help="model repository (default: model_repo/)")
    args = parser.parse_args()

    from recsys_core.data import shopping, paths
    from recsys_core.models.encoder import OnnxEncoder, latest_version_dir
    from recsys_core.models.triton import TritonServer
    from recsys_core.models.triton_encoder import TritonEncoder

    titles = [t for t in shopping.load_items(paths.BUNDLED_DATA_DIR).display_title if t]
    print(f"{len(titles)} catalogue titles; starting Triton ...", flush=True)
    rows = []
    model = args.model or paths.TEXT_ENCODER_MODEL
    with TritonServer(args.repo or paths.MODEL_REPO, models=(model,)) as server, TritonEncoder(server.grpc_url, model) as remote:
        local = OnnxEncoder(latest_version_dir(), precision=remote.precision)
        print(f"Triton {server.grpc_url}, model {model} version {remote.version}, precision {remote.precision}\n", flush=True)
        for batch in args.batches:
            for concurrency in args.concurrency:
                cell = {"batch": batch, "concurrency": concurrency}
                for name, encoder in (("in_process", local), ("triton", remote)):
                    payloads = [titles[start : start + batch] for start in range(0, len(titles) - batch, batch)]

                    def call(texts, timeout, encoder=encoder):
                        return encoder.encode(texts, timeout=timeout)

                    abort = threading.Event()
                    closed_loop(call, payloads, concurrency, WARMUP_CALLS, 30, abort)
                    cell[name] = closed_loop(call, payloads[WARMUP_CALLS:], concurrency, args.requests, args.seconds, abort)
                    cell[name]["texts_per_second"] = round(cell[name]["throughput_rps"] * batch, 1)
                cell["ratio"] = round(cell["triton"]["texts_per_second"] / cell["in_process"]["texts_per_second"], 3)
                rows.append(cell)
                print_row(cell, header=len(rows) == 1)

    # The targets need their cells; a partial grid (--batches, --concurrency) reports what it has.
    at16 = [r for r in rows if r["concurrency"] == 16]
    if at16:
        worst_ratio = min(r["ratio"] for r in at16)
        ratios = ", ".join(f"batch {r['batch']}: {r['ratio']:.2f}" for r in at16)
        print(f"\nTriton/in-process throughput at concurrency 16: {ratios}"
              f" (target >= {RATIO_TARGET}: {'met' if worst_ratio >= RATIO_TARGET else 'NOT met'})")
    eight = [r for r in rows if r["batch"] == 8 and r["concurrency"] == 1]
    if eight:
        p50_8 = eight[0]["triton"]["p50_ms"]
        print(f"Triton p50 for one request of 8 titles: {p50_8:.1f} ms (target <= {P50_TARGET_MS} ms: "
              f"{'met' if p50_8 <= P50_TARGET_MS else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def print_row(cell: dict, header: bool) -> None:
    if header:
        print(f"{'batch':>5} {'conc':>4} | {'in-process texts/s':>18} {'p50 ms':>7} {'p99 ms':>7} | "
              f"{'Triton texts/s':>14} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>5}")
    local, remote = cell["in_process"], cell["triton"]
    print(f"{cell['batch']:>5} {cell['concurrency']:>4} | {local['texts_per_second']:>18.1f} {local['p50_ms']:>7.1f} "
          f"{local['p99_ms']:>7.1f} | {remote['texts_per_second']:>14.1f} {remote['p50_ms']:>7.1f} "
          f"{remote['p99_ms']:>7.1f} | {cell['ratio']:>5.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
