"""Hot swap (issue #19): the embedding and ranking services serve the
registry's promoted version and swap a newly promoted one in under load,
without a failed call, a reply that mixes two versions, or health leaving
SERVING; a version that fails to load is refused and the old one stays."""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from recsys_core.data import paths, shopping
from recsys_core.models.hot_swap import Loaded, Served, follow_promotions
from recsys_core.models.registry import Registry

sys.path.insert(0, str(paths.REPO_ROOT / "bench"))
from promotion import ranker_version, sequence_version, small_catalogue  # noqa: E402

SWAP_SECONDS = 60
CATALOGUE_ITEMS = 60


# -- the holder and the loop -------------------------------------------------------


def test_served_swaps_whole_versions_and_keeps_others_by_number():
    served = Served(Loaded("pretrained"))
    assert served.current.value == "pretrained" and served.current.version is None
    first = Loaded("one", 1, "sequence/1")
    assert served.add(first).value == "pretrained"
    assert served.current is first and served.swaps == 1
    # An arm's version: loaded and reachable by number, not the default.
    assert served.add(Loaded("two", 2, "sequence/2"), current=False) is None
    assert served.current is first and served.get(2).value == "two" and served.versions() == [1, 2]
    with pytest.raises(ValueError, match="current"):
        served.retire(1)
    served.retire(2)
    assert served.get(2) is None and served.get() is first


def test_follow_promotions_loads_each_new_version_once_and_survives_a_failing_one(tmp_path, caplog):
    registry = Registry(tmp_path / "registry")
    source = tmp_path / "artifact"
    source.mkdir()
    (source / "weights.txt").write_text("w")
    for _ in range(3):
        registry.add("ranker", source)
    registry.promote("ranker", 1)
    loaded, stop = [], threading.Event()

    def load(version):
        if version.version == 3:
            raise RuntimeError("cannot read weights")
        loaded.append(version.version)

    thread = threading.Thread(target=follow_promotions,
                              args=(registry, "ranker", load, stop, 0.02), kwargs={"already": 1})
    thread.start()
    try:
        time.sleep(0.2)
        assert loaded == [], "the version loaded at start was loaded again"
        registry.promote("ranker", 2)
        wait_for(lambda: loaded == [2], "version 2 loaded")
        with caplog.at_level(logging.ERROR, "recsys_core.models.hot_swap"):
            registry.promote("ranker", 3)
            wait_for(lambda: "refused ranker/3" in caplog.text, "version 3 refused with a log line")
        registry.promote("ranker", 1)
        wait_for(lambda: loaded == [2, 1], "a rollback to version 1 loaded")
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def wait_for(condition, what: str, seconds: float = SWAP_SECONDS, load: "Load | None" = None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline or (load is not None and load.failures):
            raise AssertionError(f"not within {seconds} s: {what}" + (
                f"; the load's failures: {load.failures[:3]}" if load is not None and load.failures else ""))
        time.sleep(0.02)


# -- registries ---------------------------------------------------------------


@pytest.fixture(scope="module")
def versions(exported_encoder, tmp_path_factory):
    """Two sequence versions (the pretrained encoder; the same with its
    output dimensions permuted, so every vector differs) and three rankers
    (ascending, descending by long-term similarity; one not a model)."""
    work = tmp_path_factory.mktemp("hot-swap")
    registry = Registry(work / "registry")
    made = {
        "seq1": registry.add("sequence", sequence_version(exported_encoder, work / "seq1")),
        "seq2": registry.add("sequence", sequence_version(exported_encoder, work / "seq2", permute_seed=1)),
        "rank_high": registry.add("ranker", ranker_version(work / "r1" / "ranker.txt", descending=True)),
        "rank_low": registry.add("ranker", ranker_version(work / "r2" / "ranker.txt", descending=False)),
    }
    garbage = work / "r3" / "ranker.txt"
    garbage.parent.mkdir()
    garbage.write_text("not a model\n")
    made["rank_bad"] = registry.add("ranker", garbage)
    broken = work / "seq-broken"
    broken.mkdir()
    (broken / "notes.txt").write_text("a training that never wrote its manifest\n")
    made["seq_broken"] = registry.add("sequence", broken)
    made["registry"] = registry
    made["data"] = small_catalogue(work / "data", CATALOGUE_ITEMS)
    return made


class Load:
    """`threads` threads calling `call(thread, n)` back to back until stopped;
    failures and each thread's sequence of reply versions are kept."""

    def __init__(self, call, threads: int = 3):
        self.call, self.stop = call, threading.Event()
        self.failures: list[str] = []
        self.seen: list[list[str]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                self.seen[index].append(self.call(index, n))
            except grpc.RpcError as error:
                self.failures.append(f"{error.code()}: {error.details()}")
            except AssertionError as error:
                self.failures.append(f"inconsistent reply: {error}")
            n += 1

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def labels(self) -> set[str]:
        return {label for seen in self.seen for label in seen}

    def count(self, label: str) -> int:
        return sum(seen.count(label) for seen in self.seen)


def assert_never_back(load: Load, old: str, new: str) -> None:
    """Calls of one thread are sequential: once one saw the new version, no
    later call may see the old (it started after the swap)."""
    for seen in load.seen:
        if new in seen:
            assert old not in seen[seen.index(new):], f"{old} answered after {new}: {seen}"


# -- ranking ----------------------------------------------------------------------


def rank_request():
    from recsys.common.v1 import common_pb2
    from recsys.ranking.v1 import ranking_pb2

    similarities = [0.9, -0.8, 0.1, -0.2, 0.7, -0.95, 0.3]
    return ranking_pb2.RankRequest(k=3, candidates=[
        ranking_pb2.Candidate(item_id=f"i{n}", features=common_pb2.CandidateFeatures(long_term_similarity=s))
        for n, s in enumerate(similarities)])


@pytest.mark.integration
def test_ranking_swaps_the_promoted_ranker_under_load_and_refuses_a_bad_one(versions, caplog):
    from conftest import secured, service_channel, start
    from recsys.ranking.v1 import ranking_pb2_grpc
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    registry, high, low = versions["registry"], versions["rank_high"], versions["rank_low"]
    registry.promote("ranker", high.version, "test: start")
    server, address = start(create_server(RankingConfig(
        address="127.0.0.1:0", model_registry=str(registry.root), model_poll_seconds=0.05, **secured("ranking"))))
    # What each version puts first (trees score in steps: one of the highest
    # similarities, or one of the lowest).
    expected_top = {high.label: {"i0", "i4"}, low.label: {"i5", "i1"}}
    try:
        with service_channel(address, "ranking") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)

            def call(_thread, _n):
                reply = stub.Rank(rank_request(), timeout=10)
                assert reply.candidates[0].item_id in expected_top[reply.model_version], reply
                return reply.model_version

            with Load(call) as load:
                wait_for(lambda: load.count(high.label) > 20, "ranker/1 answering", load=load)
                registry.promote("ranker", low.version, "test: swap under load")
                wait_for(lambda: load.count(low.label) > 20, "the promoted ranker answering", load=load)
                with caplog.at_level(logging.ERROR):
                    registry.promote("ranker", versions["rank_bad"].version, "test: a broken ranker")
                    wait_for(lambda: f"refused {versions['rank_bad'].label}" in caplog.text, "the bad ranker refused", load=load)
                after_refusal = load.count(low.label)
                wait_for(lambda: load.count(low.label) > after_refusal + 20, "the old ranker still answering", load=load)
        assert load.failures == []
        assert load.labels() == {high.label, low.label}
        assert_never_back(load, high.label, low.label)
        assert server.metrics.registry.get_sample_value("recsys_ranking_model_version") == low.version
    finally:
        server.stop(None)


@pytest.mark.integration
def test_ranking_serves_the_weights_until_a_ranker_is_promoted(versions, tmp_path):
    from conftest import secured, service_channel, start
    from recsys.ranking.v1 import ranking_pb2_grpc
    from services.ranking.config import RankingConfig
    from services.ranking.server import create_server

    registry = Registry(tmp_path / "registry")
    server, address = start(create_server(RankingConfig(
        address="127.0.0.1:0", model_registry=str(registry.root), model_poll_seconds=0.05, **secured("ranking"))))
    try:
        with service_channel(address, "ranking") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            weighted = stub.Rank(rank_request(), timeout=10)
            assert weighted.model_version == "hand" and weighted.candidates[0].item_id == "i0"
            low = registry.add("ranker", versions["rank_low"].path / "ranker.txt")
            registry.promote("ranker", low.version, "test: the first ranker")
            wait_for(lambda: stub.Rank(rank_request(), timeout=10).model_version == low.label, "the ranker serving")
            assert stub.Rank(rank_request(), timeout=10).candidates[0].item_id in {"i5", "i1"}
    finally:
        server.stop(None)


def test_a_bad_promoted_ranker_stops_the_start_and_the_two_sources_exclude_each_other(versions):
    from recsys_core.rpc.envconfig import ConfigError
    from services.ranking.config import RankingConfig
    from services.ranking.server import initial_models

    registry = versions["registry"]
    registry.promote("ranker", versions["rank_bad"].version, "test: bad at start")
    with pytest.raises(ConfigError, match="RANKING_MODEL_REGISTRY: promoted ranker/3"):
        initial_models(RankingConfig(model_registry=str(registry.root)))
    with pytest.raises(ConfigError, match="exclusive"):
        RankingConfig.from_env({"RANKING_INSECURE": "1", "RANKING_MODEL": "a.txt",
                                "RANKING_MODEL_REGISTRY": str(registry.root)})
    registry.promote("ranker", versions["rank_high"].version, "test: back to a good one")


# -- embedding ------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.integration
def test_embedding_swaps_encoder_and_index_together_under_load(versions, tmp_path, caplog):
    server = swap_under_load(versions, tmp_path, caplog)
    assert server.metrics.registry.get_sample_value("recsys_embedding_model_version") == versions["seq2"].version
    assert server.metrics.registry.get_sample_value("recsys_embedding_model_swaps") == 1


@pytest.mark.integration
def test_triton_loads_the_promoted_encoder_as_a_new_version_and_builds_its_index_beside_it(versions, tmp_path,
                                                                                          caplog):
    """The same under Triton (explicit model control): the promoted encoder
    becomes text_encoder version 2 of the served repository, loaded beside
    version 1. The catalogue is re-encoded in process, not through Triton:
    version 2 never gets a request larger than the probe (re-encoding sent
    64-row requests, which failed the Python backend's stub health check on
    a busy CPU). Version 1 stays loaded after the swap: a sibling replica
    sharing this Triton may still serve it."""
    import tritonclient.grpc as grpcclient

    from promotion import triton_repository

    from recsys_core.models.triton import TritonServer
    from services.embedding.config import EmbeddingConfig
    from services.embedding.promotion import PROBE_TEXTS, served_triton_versions

    repo = triton_repository(tmp_path / "model_repo")
    with TritonServer(repo, log_path=tmp_path / "triton.log", startup_timeout=300) as triton:
        config = dict(encoder="triton", triton_url=triton.grpc_url, model_repo=str(repo))
        # The batch sizes version 2 ran, read while it runs: Triton starts
        # them afresh when a load request reloads the model.
        batches: set[int] = set()
        done = threading.Event()

        def watch_batches():
            client = grpcclient.InferenceServerClient(triton.grpc_url)
            try:
                while not done.wait(0.1):
                    try:
                        stats = client.get_inference_statistics(paths.TEXT_ENCODER_MODEL, "2", as_json=True)
                    except Exception:  # noqa: BLE001 - version 2 not loaded yet
                        continue
                    batches.update(int(b["batch_size"]) for m in stats["model_stats"] for b in m.get("batch_stats", []))
            finally:
                client.close()

        watcher = threading.Thread(target=watch_batches, daemon=True)
        watcher.start()
        try:
            swap_under_load(versions, tmp_path, caplog, **config)
        finally:
            done.set()
            watcher.join(10)
        assert batches and max(batches) <= len(PROBE_TEXTS), f"version 2 ran batches of {sorted(batches)} rows"
        assert served_triton_versions(EmbeddingConfig(**config)) == {1, 2}
        assert (repo / paths.TEXT_ENCODER_MODEL / "2" / "encoder.json").is_file()
        assert not (paths.MODEL_REPO / paths.TEXT_ENCODER_MODEL / "2").exists(), "the committed repository was written"


def test_a_triton_pods_follower_loads_each_promotion_and_the_embedding_swaps_only_once_it_is_served(
        versions, tmp_path, caplog):
    """Kubernetes' arrangement: several Triton pods behind one Service, so
    each pod's own follower (recsys triton-follow) loads what the registry
    promotes as text_encoder version 1000+N, and the embedding service
    (EMBEDDING_TRITON_MODEL_CONTROL=follower) writes and loads nothing: it
    waits for its Triton to serve the version, checks the vectors, swaps.
    The embedding's model_repo is the committed one, as in its image: the
    installed weights are not on its disk (the probe vectors are compared)."""
    from promotion import triton_repository

    import json
    import subprocess
    import urllib.error
    import urllib.request

    from recsys_cli.stack import free_port
    from recsys_core.models import triton_control
    from recsys_core.models.triton import TritonServer

    caplog.set_level(logging.INFO, "services.embedding.promotion")
    registry = versions["registry"]
    first, second = (triton_control.registry_triton_version(versions[k].version) for k in ("seq1", "seq2"))
    repo = triton_repository(tmp_path / "model_repo")

    def ready() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=5) as reply:
                return reply.status if json.loads(reply.read())["ready"] else 0
        except urllib.error.HTTPError as error:
            return error.code
        except urllib.error.URLError:  # not listening yet
            return 0

    def served() -> set[int]:
        return triton_control.served_versions(triton.grpc_url, paths.TEXT_ENCODER_MODEL)

    with TritonServer(repo, log_path=tmp_path / "triton.log", startup_timeout=300) as triton:
        # As the Triton pod runs it (k8s/base/triton.yaml), polling faster.
        health, log_path = free_port(), tmp_path / "follower.log"
        with open(log_path, "w") as log_file:
            follower = subprocess.Popen(
                [sys.executable, "-m", "recsys_cli.main", "triton-follow", "--registry", str(registry.root),
                 "--repository", str(repo), "--triton-url", triton.grpc_url, "--health-port", str(health),
                 "--interval", "0.1"], cwd=paths.REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: follower.poll() is None and ready() == 200, "the follower ready")
            swap_under_load(versions, tmp_path, caplog, encoder="triton", triton_url=triton.grpc_url,
                            triton_model_control="follower")
            wait_for(lambda: f"not loading sequence/{versions['seq_broken'].version}" in log_path.read_text(),
                     "the follower refusing the broken version")
            # The broken promotion left what served before it loaded: the repository's own
            # version, the promoted sequence/2 and sequence/1, which it replaced.
            time.sleep(0.5)
            assert served() == {1, first, second} and ready() == 200
            # The next good promotion keeps the one it replaces; sequence/1 is unloaded and its files go.
            third = registry.add("sequence", versions["seq1"].path, notes="test: a third version").version
            registry.promote("sequence", third, "test: a third")
            third = triton_control.registry_triton_version(third)
            wait_for(lambda: served() == {1, second, third}, "Triton serving its own version, sequence/2 and the third")
            # The files go once Triton has unloaded the version: just after the load call returns.
            wait_for(lambda: not (repo / paths.TEXT_ENCODER_MODEL / str(first)).exists(),
                     "the unserved version's files removed", seconds=10)
            assert f"version {second} (sequence/{versions['seq2'].version}), loaded by its follower" in caplog.text
        finally:
            follower.terminate()
            assert follower.wait(30) == 0, log_path.read_text()


def test_a_fixed_triton_version_number_holds_one_encoder_and_a_cut_copy_is_made_again(versions, tmp_path):
    """Every Triton pod's follower installs registry version N at the same
    number (1000+N), so a number must never come to hold other weights."""
    from promotion import triton_repository

    from recsys_core.models.model_serving import ModelDirError, install_encoder, open_model_dir

    repo = triton_repository(tmp_path / "repo")
    first, second = (open_model_dir(versions[k].path) for k in ("seq1", "seq2"))
    assert install_encoder(first, repo, version=1001) == 1001
    assert install_encoder(first, repo, version=1001) == 1001  # already there: nothing written
    with pytest.raises(ModelDirError, match="other weights"):
        install_encoder(second, repo, version=1001)
    cut = repo / paths.TEXT_ENCODER_MODEL / "1002"
    cut.mkdir()
    (cut / "model.onnx").write_bytes(b"half a file")  # the metadata, written last, never came
    assert install_encoder(second, repo, version=1002) == 1002
    assert (cut / "encoder.json").is_file() and (cut / "model.onnx").read_bytes() != b"half a file"


def test_the_follower_wants_the_promoted_version_the_one_it_replaced_and_the_repositorys_own(versions, tmp_path):
    from promotion import triton_repository

    from recsys_core.models import promotion
    from recsys_core.models.triton_follow import promoted_pair, wanted

    registry = Registry(tmp_path / "registry")
    one, two, three = (registry.add("sequence", versions[k].path).version for k in ("seq1", "seq2", "seq_broken"))
    repo = triton_repository(tmp_path / "repo")
    assert promoted_pair(registry) == (None, None)
    assert wanted(registry, repo, {}, None, None, set()).versions == {1}
    promotion.promote(registry, "sequence", one, "first", by="test")
    promotion.promote(registry, "sequence", two, "second", by="test")
    assert promoted_pair(registry) == (two, one)
    installed, refused = {}, set()
    target = wanted(registry, repo, installed, two, one, refused)
    assert target.versions == {1, 1000 + one, 1000 + two} and target.promoted == 1000 + two
    # A version without a manifest is left out, once, and noted.
    target = wanted(registry, repo, installed, three, two, refused)
    assert refused == {three} and target.promoted is None and target.versions == {1, 1000 + two}


def test_a_replica_unloads_only_triton_versions_older_than_the_one_it_swapped_from():
    from services.embedding.promotion import triton_versions_to_keep

    # Swapped 2 -> 3: 2 stays for siblings still serving it, 1 goes, 4 (a sibling's next) stays.
    assert triton_versions_to_keep({1, 2, 3, 4}, previous=2, current=3) == {2, 3, 4}
    # A rollback to an older version keeps everything from it up.
    assert triton_versions_to_keep({1, 2, 3}, previous=3, current=2) == {2, 3}
    # The start's encoder (no previous) keeps what is current and newer.
    assert triton_versions_to_keep({1, 2}, previous=None, current=2) == {2}
    # What this replica now serves is kept even if Triton did not list it.
    assert triton_versions_to_keep(set(), previous=1, current=2) == {2}


def swap_under_load(versions, tmp_path, caplog, **config):
    """An embedding service on sequence/1 answering EmbedTexts,
    RetrieveCandidates and SearchItems in three threads while sequence/2 is
    promoted, then a broken version; checks every reply and returns the
    (stopped) server for its metrics."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from conftest import secured, service_channel, start
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from recsys_core.models.encoder import OnnxEncoder
    from recsys_core.models.model_serving import open_model_dir
    from recsys_core.rpc.messages import from_vector, to_vector
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import create_server

    registry, first, second = versions["registry"], versions["seq1"], versions["seq2"]
    registry.promote("sequence", first.version, "test: start")
    items = shopping.load_items(versions["data"])
    texts = dict(zip(items.item_id, items.text))
    ids = list(items.item_id)
    # Every item's vector under each version, encoded here as the service does.
    encoders = {v.label: OnnxEncoder(open_model_dir(v.path).encoder_dir) for v in (first, second)}
    expected = {label: dict(zip(ids, encoder.encode([texts[i] for i in ids]))) for label, encoder in encoders.items()}
    other = {first.label: second.label, second.label: first.label}

    def check(label: str, item_ids, vectors) -> None:
        """Each vector is its item's under `label`'s encoder, not the other's."""
        mine = np.stack([expected[label][i] for i in item_ids])
        theirs = np.stack([expected[other[label]][i] for i in item_ids])
        got = np.stack(vectors)
        assert (cosine(got, mine) > 0.98).all(), f"vectors not {label}'s"
        assert (cosine(got, theirs) < 0.9).all(), f"vectors of {other[label]} in a {label} reply"

    server, address = start(create_server(EmbeddingConfig(
        address="127.0.0.1:0", data_dir=str(versions["data"]), retail_dir="",
        catalogue_path=str(tmp_path / "catalogue.sqlite3"), cache_dir=str(tmp_path / "cache"),
        model_registry=str(registry.root), model_poll_seconds=0.05, grace_seconds=0.5, encoder_threads=1,
        **config, **secured("embedding"))))
    not_serving = []
    try:
        with service_channel(address, "embedding") as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert stub.ListCategories(embedding_pb2.ListCategoriesRequest(), timeout=10).model_version == first.label

            def call(thread: int, n: int) -> str:
                item_id = ids[(thread * 37 + n) % len(ids)]
                kind = n % 3
                if kind == 0:  # a text query is encoded by the version that answers
                    reply = stub.EmbedTexts(embedding_pb2.EmbedTextsRequest(texts=[texts[item_id]]), timeout=10)
                    check(reply.model_version, [item_id], [from_vector(v) for v in reply.vectors])
                elif kind == 1:  # the query (a context item's vector) and the index from one version
                    reply = stub.RetrieveCandidates(embedding_pb2.RetrieveCandidatesRequest(
                        context_item_ids=[item_id], k=10, include_embeddings=True), timeout=10)
                    found = [c.item.item_id for c in reply.candidates]
                    assert found[0] == item_id, "the context item is not its own nearest neighbour"
                    check(reply.model_version, found, [from_vector(c.embedding) for c in reply.candidates])
                else:
                    query = expected[first.label][item_id]
                    reply = stub.SearchItems(embedding_pb2.SearchItemsRequest(
                        vectors=[to_vector(query)], k=5, include_items=True), timeout=10)
                    hits = reply.results[0].hits
                    check(reply.model_version, [h.item_id for h in hits], [from_vector(h.embedding) for h in hits])
                return reply.model_version

            def watch_health():
                while not load.stop.is_set():
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    if status != health_pb2.HealthCheckResponse.SERVING:
                        not_serving.append(status)
                    time.sleep(0.05)

            with Load(call) as load:
                watcher = threading.Thread(target=watch_health, daemon=True)
                watcher.start()
                wait_for(lambda: load.count(first.label) > 10, "sequence/1 answering", load=load)
                registry.promote("sequence", second.version, "test: swap under load")
                wait_for(lambda: load.count(second.label) > 10, "the promoted version answering", load=load)
                with caplog.at_level(logging.ERROR):
                    registry.promote("sequence", versions["seq_broken"].version, "test: a broken model")
                    wait_for(lambda: f"refused {versions['seq_broken'].label}" in caplog.text,
                             "the broken version refused", load=load)
                after_refusal = load.count(second.label)
                wait_for(lambda: load.count(second.label) > after_refusal + 5, "the old version still answering", load=load)
            watcher.join(10)
        assert load.failures == []
        assert load.labels() == {first.label, second.label}
        assert_never_back(load, first.label, second.label)
        assert not_serving == []
        return server
    finally:
        server.stop(None)


def test_the_pretrained_encoder_is_sequence_0_and_its_vectors_are_not_searched_in_the_first_promotions_index(
        versions, tmp_path):
    """Before the first promotion a registry-following replica serves the
    pretrained encoder, named sequence/0 like any version: a profile's
    vectors made by it are searched in its own index while the replica holds
    it after that promotion, and refused once it is gone (before, they were
    unlabelled, which means "the serving one", the new encoder's index)."""
    from conftest import secured, service_channel, start
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import create_server

    registry = Registry(tmp_path / "registry")
    first = registry.add("sequence", versions["seq1"].path)
    anchor = shopping.load_items(versions["data"]).item_id.iloc[0]
    server, address = start(create_server(EmbeddingConfig(
        address="127.0.0.1:0", data_dir=str(versions["data"]), retail_dir="",
        catalogue_path=str(tmp_path / "catalogue.sqlite3"), cache_dir=str(tmp_path / "cache"),
        model_registry=str(registry.root), model_poll_seconds=0.05, grace_seconds=2.0, encoder_threads=1,
        **secured("embedding"))))
    try:
        with service_channel(address, "embedding") as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

            def retrieve(version: str):
                return stub.RetrieveCandidates(embedding_pb2.RetrieveCandidatesRequest(
                    context_item_ids=[anchor], k=5, model_version=version), timeout=30)

            def serving() -> str:
                return stub.ListCategories(embedding_pb2.ListCategoriesRequest(), timeout=10).model_version

            assert serving() == "sequence/0" and retrieve("").model_version == "sequence/0"
            registry.promote("sequence", first.version, "test: the first promotion")
            wait_for(lambda: serving() == first.label, "the first promotion swapped in")
            # Within the grace period the pretrained index still answers its own vectors.
            assert retrieve("sequence/0").model_version == "sequence/0"
            assert retrieve("").model_version == first.label
            give_up = time.monotonic() + 30
            while time.monotonic() < give_up:
                try:
                    retrieve("sequence/0")
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                    break
                time.sleep(0.2)
            else:
                pytest.fail("sequence/0's vectors still searched 30 s after the promotion (grace 2 s)")
    finally:
        server.stop(None)


def test_embedding_refuses_what_a_swap_cannot_serve(versions):
    from recsys_core.models.model_serving import ModelDirError, open_model_dir
    from recsys_core.rpc.envconfig import ConfigError
    from services.embedding.config import EmbeddingConfig
    from services.embedding.promotion import model_encoder

    with pytest.raises(ConfigError, match="exclusive"):
        EmbeddingConfig(model_dir="a", model_registry="b")
    with pytest.raises(ConfigError, match="EMBEDDING_TRITON_MODEL"):
        EmbeddingConfig(model_registry="b", encoder="triton", triton_model="text_encoder_ensemble")
    # Promotions install encoder versions: never into the committed repository.
    second = versions["seq2"]
    with pytest.raises(ModelDirError, match="committed"):
        model_encoder(EmbeddingConfig(encoder="triton", model_registry="b", model_repo=str(paths.MODEL_REPO)),
                      open_model_dir(second.path), second)
    assert not (paths.MODEL_REPO / paths.TEXT_ENCODER_MODEL / "2").exists()


@pytest.mark.integration
def test_a_vector_is_searched_only_in_its_own_versions_index(versions, tmp_path, monkeypatch):
    """A promotion swaps the embedding service's version at the worst moment
    for SimilarItems: right after the gateway's first embedding call read the
    serving version (the real registry, follow loop and swap; the hook only
    picks the moment). The reply must be one version's answer, whole: the
    item's vector and the index it searched from the same encoder."""
    from conftest import gateway_channel, secured, service_channel, start
    from recsys.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from recsys.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import create_server as create_embedding
    from services.embedding.servicer import EmbeddingServicer
    from recsys_core.rpc.grpc_util import Deadline
    from services.gateway.composer import EMBEDDING, Composer
    from services.gateway.config import GatewayConfig
    from services.gateway.server import create_server as create_gateway

    registry, first, second = versions["registry"], versions["seq1"], versions["seq2"]
    registry.promote("sequence", first.version, "test: start")
    anchor = shopping.load_items(versions["data"]).item_id.iloc[0]
    armed = threading.Event()
    reading = EmbeddingServicer.catalogue.fget

    def swap_after_this_read(servicer):
        catalogue = reading(servicer)
        if armed.is_set():
            armed.clear()
            registry.promote("sequence", second.version, "test: between a call's read and the next")
            wait_for(lambda: servicer._served.current.version == second.version, "sequence/2 swapped in")
        return catalogue

    monkeypatch.setattr(EmbeddingServicer, "catalogue", property(swap_after_this_read))
    servers = {}
    try:
        servers["embedding"], embedding = start(create_embedding(EmbeddingConfig(
            address="127.0.0.1:0", data_dir=str(versions["data"]), retail_dir="",
            catalogue_path=str(tmp_path / "catalogue.sqlite3"), cache_dir=str(tmp_path / "cache"),
            model_registry=str(registry.root), model_poll_seconds=0.05, grace_seconds=30, encoder_threads=1,
            **secured("embedding"))))
        # SimilarItems needs only the embedding service; nothing listens on the others' addresses.
        servers["gateway"], gateway = start(create_gateway(GatewayConfig(
            address="127.0.0.1:0", profile_address="127.0.0.1:1", ranking_address="127.0.0.1:1",
            embedding_address=embedding, request_timeout_seconds=60, **secured("gateway"))))
        with gateway_channel(gateway) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            def similar():
                reply = stub.SimilarItems(gateway_pb2.SimilarItemsRequest(item_id=anchor, k=5), timeout=60)
                return reply.model_version, [(i.item_id, round(i.score, 4)) for i in reply.items]

            before = similar()  # also fills the gateway's category cache: no ListCategories below
            armed.set()
            during = similar()
            assert not armed.is_set(), "the hook never ran: no promotion happened during the call"
            after = similar()
        # Recommend's retrieval: a profile's vectors are searched in the index
        # of the version that made them while this replica holds it (the
        # replaced one until the grace period ends), else refused.
        with service_channel(embedding, "embedding") as channel:
            retrieval = embedding_pb2_grpc.EmbeddingServiceStub(channel)

            def retrieve(version: str):
                return retrieval.RetrieveCandidates(embedding_pb2.RetrieveCandidatesRequest(
                    context_item_ids=[anchor], k=5, model_version=version), timeout=30)

            assert retrieve(first.label).model_version == first.label
            assert retrieve("").model_version == retrieve(second.label).model_version == second.label
            for version, code in (("sequence/99", grpc.StatusCode.FAILED_PRECONDITION),
                                  ("nonsense", grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.RpcError) as refused:
                    retrieve(version)
                assert refused.value.code() == code and "model_version" in refused.value.details()

        async def gateway_retrieves(version: str):
            """The gateway's retrieval step: a version no replica holds is
            tried twice, then answered without the embedding stage."""
            composer, skipped = Composer(GatewayConfig(embedding_address=embedding, **secured("gateway"))), []
            try:
                raw = await composer._retrieve(embedding_pb2.RetrieveCandidatesRequest(
                    context_item_ids=[anchor], k=5, model_version=version), Deadline(None, 30), skipped)
            finally:
                await composer.close()
            return raw, skipped

        raw, skipped = asyncio.run(gateway_retrieves(first.label))
        assert embedding_pb2.RetrieveCandidatesResponse.FromString(raw).model_version == first.label and not skipped
        assert asyncio.run(gateway_retrieves("sequence/99")) == (None, [EMBEDDING])
    finally:
        for server in servers.values():
            server.stop(None)
    assert before[0] == first.label and after[0] == second.label
    # sequence/2 is sequence/1 with its dimensions permuted: each version
    # alone finds the same neighbours; one's vector in the other's index does not.
    assert during in (before, after), f"a reply mixing versions: {during}, not {before} nor {after}"
