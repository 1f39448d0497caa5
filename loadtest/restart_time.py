"""Seconds from a service's process start to SERVING, as `recsys serve
--replicas 2` starts it (the stack's environment, bundled data), first on an
empty state directory (the first start seeds the stores) and then again on
the same state (what a restart after kill -9 costs; issue #16, part 6a, asks
for at most 5 s).

    PYTHONPATH=$PWD .venv/bin/python loadtest/restart_time.py [--services embedding,profile] [--starts 3]

Each started process is kept running for --hold seconds before it is killed
(kill -9), so the work a service does once SERVING (embedding's start
snapshot) is done as it would be in a running stack. Timings depend on the
machine's load: the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from recsys_cli.stack import LocalStack, free_port, wait_until_serving  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", default="embedding,profile")
    parser.add_argument("--starts", type=int, default=3, help="starts of each service (the first on empty state)")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds each process runs once SERVING")
    parser.add_argument("--state", type=Path, default=None, help="state directory (default: a fresh one)")
    args = parser.parse_args(argv)
    state = args.state or Path(tempfile.mkdtemp(prefix="restart-time-"))
    stack = LocalStack(gateway_port=free_port(), state_dir=state, encoder="onnx", replicas=2, transport="plaintext")
    env = stack.environment()
    print(f"state in {state}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)", flush=True)
    for name in args.services.split(","):
        own = stack.replica_environments(name, env)[0]
        for start in range(args.starts):
            log = state / f"{name}-{start}.log"
            began = time.monotonic()
            with open(log, "w") as output:
                process = subprocess.Popen([sys.executable, "-m", f"services.{name}.server"], env=own,
                                           cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
            try:
                wait_until_serving(own[name.upper() + "_ADDRESS"], 600, process)
                took = time.monotonic() - began
                print(f"{name} start {start + 1} ({'empty state' if start == 0 else 'restart'}): "
                      f"SERVING after {took:.2f} s (log {log})", flush=True)
                time.sleep(args.hold)
            finally:
                process.kill()
                process.wait()
    print(f"load average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
