"""What an A/B experiment adds to a Recommend reply's path at the gateway:
the shopper's arm (SHA-256 of salt and id) and the exposure message put on
the log's queue. The sending happens off the path (services/gateway/exposures.py).

    .venv/bin/python bench/ab.py [--n 20000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

from recsys.profile.v1 import profile_pb2
from recsys_core.experiments.arms import Experiment, parse_arms
from services.gateway.exposures import ExposureLog, exposure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    experiment = Experiment("bench", parse_arms("control=ranker/1:50,treatment=ranker/2:50"))
    items = [f"B00{i:07d}" for i in range(10)]
    users = [f"user-{i}" for i in range(args.n)]

    started = time.perf_counter()
    arms = [experiment.assign(user) for user in users]
    assign_us = (time.perf_counter() - started) / args.n * 1e6

    async def offer_all() -> float:
        async def send(request, timeout):
            return profile_pb2.RecordExposuresResponse(recorded=len(request.exposures))

        log = ExposureLog(send, capacity=args.n, batch=200, flush_seconds=1.0)
        started = time.perf_counter()
        for user, arm in zip(users, arms):
            log.offer(exposure(user, experiment.salt, arm.name, arm.model_version, items))
        elapsed = time.perf_counter() - started
        await log.close()
        return elapsed / args.n * 1e6

    offer_us = asyncio.run(offer_all())
    print(json.dumps({"n": args.n, "assign_us": round(assign_us, 2), "exposure_and_offer_us": round(offer_us, 2)}))


if __name__ == "__main__":
    main()
