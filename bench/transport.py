"""What mTLS and tokens cost Recommend: bench/recommend.py on a plaintext
stack and on the default mTLS stack, back to back in one run.

    python bench/transport.py [--data DIR] [--rounds N] [--json OUT] [-- recommend.py options]

Each round runs bench/recommend.py once per transport, in alternating order
(plaintext first in odd rounds, mTLS first in even ones) so that a machine
warming up or cooling down does not favour one side; the figures per
transport are the median over rounds. "plaintext" is `recsys serve
--insecure`: nothing encrypted between services or at the gateway, callers
declare their identity unverified. The gateway still checks the caller's
token in both (it refuses to start without a token key), so the difference
is TLS on every hop plus certificate identities: what issue #17 asks to stay
within 15 % of plaintext throughput.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
TRANSPORTS = ("plaintext", "mtls")
TARGET_RATIO = 0.85


def run_once(transport: str, passthrough: list[str], out: Path) -> dict:
    command = [sys.executable, str(BENCH_DIR / "recommend.py"), "--transport", transport, "--json", str(out),
               *passthrough]
    print(f"\n=== {transport}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def by_concurrency(report: dict) -> dict[int, dict]:
    return {level["concurrency"]: level["recommend"] for level in report["levels"]}


def median_of(runs: list[dict], concurrency: int, key: str) -> float | None:
    values = [by_concurrency(run)[concurrency].get(key) for run in runs]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="runs per transport (default 1)")
    parser.add_argument("--json", help="also write both transports' figures to this file")
    args, passthrough = parser.parse_known_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    passthrough = [a for a in passthrough if a != "--"]
    if any(a.startswith(("--transport", "--json")) for a in passthrough):
        parser.error("--transport and --json are this script's to set")

    runs: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    with tempfile.TemporaryDirectory(prefix="recsys-transport-") as scratch:
        for round_number in range(args.rounds):
            order = TRANSPORTS if round_number % 2 == 0 else TRANSPORTS[::-1]
            for transport in order:
                out = Path(scratch) / f"{transport}-{round_number}.json"
                runs[transport].append(run_once(transport, passthrough, out))

    levels = sorted(by_concurrency(runs["mtls"][0]))
    rows = []
    print(f"\nRecommend, median of {args.rounds} round(s) per transport")
    print(f"{'concurrency':>11} {'plaintext req/s':>16} {'mTLS req/s':>11} {'ratio':>6} "
          f"{'plaintext p99 ms':>17} {'mTLS p99 ms':>12}")
    for concurrency in levels:
        plain = median_of(runs["plaintext"], concurrency, "throughput_rps")
        secure = median_of(runs["mtls"], concurrency, "throughput_rps")
        ratio = secure / plain if plain and secure else None
        plain_p99 = median_of(runs["plaintext"], concurrency, "p99_ms")
        secure_p99 = median_of(runs["mtls"], concurrency, "p99_ms")
        rows.append({"concurrency": concurrency, "plaintext_rps": plain, "mtls_rps": secure, "ratio": ratio,
                     "plaintext_p99_ms": plain_p99, "mtls_p99_ms": secure_p99})
        print(f"{concurrency:>11} {plain or 0:>16.1f} {secure or 0:>11.1f} {ratio or 0:>6.3f} "
              f"{plain_p99 or 0:>17.1f} {secure_p99 or 0:>12.1f}")
    worst = min((r["ratio"] for r in rows if r["ratio"] is not None), default=None)
    verdict = "met" if worst is not None and worst >= TARGET_RATIO else "NOT met"
    print(f"target: mTLS throughput within 15 % of plaintext at every level: {verdict} "
          f"(worst ratio {worst:.3f})" if worst is not None else "target: no figures")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "levels": rows, "runs": runs}, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
