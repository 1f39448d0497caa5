"""What Triton's Python backend does when a model's stub is not scheduled
for a while during a request: the cause of the failed Triton hot swap
(docs/operations.md, "Hot swap under Triton").

    python bench/triton_stub_stall.py [--stall S] [--rows N]

Starts tritonserver on a serving repository holding text_encoder alone,
sends one request of --rows texts, stops the model's stub process
(SIGSTOP) 0.2 s after sending it, lets it run again (SIGCONT) --stall
seconds later, and then sends three small requests. With this wheel's Triton (nvidia-pytriton 0.7.0) a stall of
a second or more fails the request after 1.0 s with "Stub process
'text_encoder_0_0' is not healthy", and the next request to the instance
makes tritonserver abort (boost::interprocess::lock_exception): the log's
tail is printed. Run it again after a Triton upgrade to see whether a
promotion could build through Triton again.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from promotion import small_catalogue, triton_repository  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stall", type=float, default=2.5, help="seconds the stub is stopped")
    parser.add_argument("--rows", type=int, default=64, help="texts in the stalled request")
    args = parser.parse_args(argv)

    from recsys_core.data import paths, shopping
    from recsys_core.models.triton import TritonServer
    from recsys_core.models.triton_encoder import TritonEncoder

    work = Path(tempfile.mkdtemp(prefix="recsys-stub-stall-"))
    texts = list(shopping.load_items(small_catalogue(work / "data", args.rows + 24)).text)
    repo = triton_repository(work / "model_repo")
    with TritonServer(repo, log_path=work / "triton.log", startup_timeout=300) as triton:
        encoder = TritonEncoder(triton.grpc_url, timeout=120)
        stub = int(subprocess.check_output(
            ["pgrep", "-f", f"{repo}/{paths.TEXT_ENCODER_MODEL}/1/model.py"]).split()[0])
        encoder.encode(texts[:4])

        def stall():
            time.sleep(0.2)
            os.kill(stub, signal.SIGSTOP)
            time.sleep(args.stall)
            os.kill(stub, signal.SIGCONT)

        staller = threading.Thread(target=stall)
        staller.start()
        started = time.monotonic()
        try:
            encoder.encode(texts[: args.rows])
            print(f"{args.rows}-row request with the stub stopped for {args.stall} s: answered in "
                  f"{time.monotonic() - started:.1f} s")
        except Exception as error:  # noqa: BLE001 - what happens is the point
            print(f"{args.rows}-row request with the stub stopped for {args.stall} s: failed after "
                  f"{time.monotonic() - started:.1f} s: {error}")
        staller.join()
        time.sleep(1)
        for n in range(3):
            try:
                encoder.encode(texts[args.rows + 8 * n: args.rows + 8 * (n + 1)])
                print(f"next request {n + 1}: answered")
            except Exception as error:  # noqa: BLE001
                print(f"next request {n + 1}: failed: {str(error)[:160]}")
        print(f"tritonserver running: {triton.is_running()}; its log's tail:\n{triton.log_tail(6)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
