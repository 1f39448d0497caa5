"""The load-test machinery, small: ghz (installed by scripts/install_ghz.sh,
as `make loadtest` does) runs the loadtest/ configurations for a few requests
against the in-process stack, through server reflection and through the
.proto files, and the echo server's proto drives bench/recommend.py's echo
server. The long runs are `make loadtest`."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from google.protobuf import json_format

from recsys.embedding.v1 import embedding_pb2
from recsys.gateway.v1 import gateway_pb2
from recsys.profile.v1 import profile_pb2
from recsys_core.data import paths

pytestmark = pytest.mark.integration

REPO = paths.REPO_ROOT
LOADTEST = REPO / "loadtest"
GHZ = REPO / ".tools" / "bin" / "ghz"
GATEWAY_PROTO = ["--proto", "protos/recsys/gateway/v1/gateway.proto", "--import-paths", "protos"]
DATA_MESSAGES = {
    "recommend": gateway_pb2.RecommendRequest,
    "similar_items": gateway_pb2.SimilarItemsRequest,
    "ingest_events": profile_pb2.IngestEventsRequest,
    "embed_texts": embedding_pb2.EmbedTextsRequest,
}


def load_module(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ghz():
    """ghz, installed once if missing; failing (not skipping) when that is impossible."""
    result = subprocess.run(["bash", str(REPO / "scripts" / "install_ghz.sh")],
                            capture_output=True, text=True, timeout=1200, cwd=REPO)
    if result.returncode != 0:
        pytest.fail(f"scripts/install_ghz.sh failed:\n{result.stdout}\n{result.stderr}")
    return GHZ


# The service each configuration calls: ghz gets its TLS and token flags
# (the configurations carry none; echo.json is plaintext).
SERVICE_OF = {"recommend": "gateway", "similar_items": "gateway", "ingest_events": "profile",
              "embed_texts": "embedding"}


def run_ghz(ghz, tmp_path, config: str, host: str, total: int, *extra: str) -> dict:
    from tests.conftest import admin_token, tls_material

    out = tmp_path / f"{config}-{len(list(tmp_path.iterdir()))}.json"
    security = tls_material().ghz_args(SERVICE_OF[config], token=admin_token()) if config in SERVICE_OF else []
    command = [str(ghz), "--config", f"loadtest/configs/{config}.json", "-n", str(total), "-c", "2",
               "-O", "json", "-o", str(out), *security, *extra, host]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return json.loads(out.read_text())


def assert_all_ok(report: dict, total: int) -> None:
    assert report["count"] == total, report.get("errorDistribution")
    assert report["statusCodeDistribution"] == {"OK": total}, report.get("errorDistribution")
    assert not report.get("errorDistribution")
    assert [entry["percentage"] for entry in report["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]


def test_data_files_hold_varied_valid_messages(dataset):
    known = set(dataset.interactions.user_id)
    items = set(dataset.items.item_id)
    loaded = {}
    for name, message_type in DATA_MESSAGES.items():
        messages = json.loads((LOADTEST / "data" / f"{name}.json").read_text())
        assert len(messages) >= 500, name
        loaded[name] = [json_format.ParseDict(m, message_type()) for m in messages]
    recommend = loaded["recommend"]
    unknown = sum(r.user_id not in known for r in recommend) / len(recommend)
    assert 0.05 < unknown < 0.15
    assert 0.15 < sum(bool(r.categories) for r in recommend) / len(recommend) < 0.4
    assert len({r.user_id for r in recommend}) > 500
    assert all(i in items for r in recommend for i in r.context_item_ids)
    assert all(r.item_id in items for r in loaded["similar_items"])
    events = [e for r in loaded["ingest_events"] for e in r.events]
    assert len({e.idempotency_key for e in events}) == len(events)
    assert all(e.user_id in known and e.item_id in items for e in events)
    assert all(1 <= len(r.texts) <= 8 for r in loaded["embed_texts"])


def test_make_data_is_deterministic(tmp_path):
    make_data = load_module("make_data", LOADTEST / "make_data.py")
    make_data.make(paths.BUNDLED_DATA_DIR, tmp_path)
    for name in DATA_MESSAGES:
        assert (tmp_path / f"{name}.json").read_text() == (LOADTEST / "data" / f"{name}.json").read_text(), (
            f"loadtest/data/{name}.json is stale: rerun loadtest/make_data.py")


def test_recommend_through_reflection_and_through_proto_files(ghz, stack, tmp_path):
    assert_all_ok(run_ghz(ghz, tmp_path, "recommend", stack.gateway, 20), 20)
    assert_all_ok(run_ghz(ghz, tmp_path, "recommend", stack.gateway, 20, *GATEWAY_PROTO), 20)


def test_read_only_rpcs_of_the_other_configurations(ghz, stack, tmp_path):
    # IngestEvents is checked by its data file above: writing to the shared
    # test store would change the popularity other tests rely on.
    assert_all_ok(run_ghz(ghz, tmp_path, "similar_items", stack.gateway, 10), 10)
    assert_all_ok(run_ghz(ghz, tmp_path, "embed_texts", stack.embedding, 5), 5)


def test_echo_server_through_its_proto(ghz, tmp_path):
    bench = load_module("bench_recommend", REPO / "bench" / "recommend.py")
    echo = bench.EchoProcess(workers=2)
    echo.start()
    try:
        assert_all_ok(run_ghz(ghz, tmp_path, "echo", echo.address, 20), 20)
    finally:
        echo.stop()


def test_step_figures_split_calls_by_the_step_they_were_sent_in():
    run = load_module("loadtest_run", LOADTEST / "run.py")
    begin = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def call(sent_at: float, latency_ms: float, status: str = "OK") -> dict:
        end = begin + timedelta(seconds=sent_at, milliseconds=latency_ms)
        return {"timestamp": end.isoformat().replace("+00:00", "Z"), "latency": int(latency_ms * 1e6), "status": status}

    details = [call(0.1 * n, 10) for n in range(10)]  # step 1: 10/s for 1 s
    details += [call(1 + 0.05 * n, 30) for n in range(19)] + [call(1.96, 5, "ResourceExhausted")]
    steps = run.per_step({"details": details}, start=10, step=10, end=20, step_seconds=1.0)
    assert [s["rate"] for s in steps] == [10, 20]
    assert steps[0]["requests"] == 10 and steps[0]["ok"] == 10 and steps[0]["errors"] == {}
    assert steps[0]["p50_ms"] == pytest.approx(10) and steps[0]["throughput_rps"] == 10
    assert steps[1]["requests"] == 20 and steps[1]["ok"] == 19
    assert steps[1]["errors"] == {"ResourceExhausted": 1}
    assert steps[1]["p99_ms"] == pytest.approx(30)
