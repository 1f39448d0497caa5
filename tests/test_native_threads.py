"""Every service caps its native maths libraries' thread pools at start
(recsys_core/rpc/grpc_util.py, `limit_native_threads`): a pool per library
with a thread per core busy-waits and takes the cores from the other
requests (docs/performance.md, "Native maths threads")."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from recsys_core.data import paths
from recsys_core.rpc.envconfig import ConfigError
from recsys_core.rpc.grpc_util import limit_native_threads

PROBE = """
import json, numpy
from recsys_core.rpc.grpc_util import limit_native_threads
from threadpoolctl import threadpool_info
before = {i["internal_api"]: i["num_threads"] for i in threadpool_info()}
cap = limit_native_threads()
after = {i["internal_api"]: i["num_threads"] for i in threadpool_info()}
import os
print(json.dumps({"cap": cap, "before": before, "after": after, "omp": os.environ.get("OMP_NUM_THREADS")}))
"""


def probe(**environ) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "MKL_NUM_THREADS", "RECSYS_NATIVE_THREADS")}
    env.update(environ, PYTHONPATH=str(paths.REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_service_process_runs_numpys_blas_on_one_thread_by_default():
    seen = probe()
    assert seen["cap"] == 1 and seen["omp"] == "1"
    assert "openblas" in seen["after"] and set(seen["after"].values()) == {1}, seen
    if (os.cpu_count() or 1) > 1:
        # What the cap changes: numpy's pool had a thread per core before.
        assert seen["before"]["openblas"] > 1, seen


def test_the_cap_is_set_by_recsys_native_threads_and_a_bad_value_is_refused():
    assert probe(RECSYS_NATIVE_THREADS="2")["omp"] == "2"
    with pytest.raises(ConfigError, match="RECSYS_NATIVE_THREADS"):
        limit_native_threads({"RECSYS_NATIVE_THREADS": "0"})
    with pytest.raises(ConfigError, match="not an integer"):
        limit_native_threads({"RECSYS_NATIVE_THREADS": "many"})
