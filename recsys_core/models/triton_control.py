"""Which versions of a model Triton serves, through its model control API.

Our tritonserver runs with --model-control-mode=explicit (recsys_core/models/
triton.py), so a model is loaded, reloaded and unloaded only when a client
asks. A hot swap (services/embedding/promotion.py) installs the new
encoder as the next numbered version of the model's folder, asks Triton to
serve it beside every version it has loaded, moves its clients to the new
one, then asks for the versions older than the one it swapped away from to
go (several replicas share one Triton: a sibling may still serve that one).
Each request names the whole set of versions, so two replicas changing it
at the same instant can undo each other's change; promotions are minutes
apart and each replica's requests keep what it and its siblings serve.

The load request carries the model's own config (as Triton reports it) with
its version_policy replaced by `specific: versions`: the config file on disk
(`latest: {num_versions: 2}`) is left as it is for a restart.
"""
from __future__ import annotations

import json
from collections.abc import Iterable

from recsys_core import errors

LOAD_TIMEOUT_SECONDS = 300.0
# Where a Triton pod's follower (recsys_core.models.triton_follow) installs
# registry version N of `sequence`: text_encoder version BASE + N, a number
# every pod and the embedding service work out alike; the repository's own
# versions (the pretrained encoder, 1) stay below it.
REGISTRY_VERSION_BASE = 1000


def registry_triton_version(registry_version: int) -> int:
    return REGISTRY_VERSION_BASE + int(registry_version)


def served_versions(url: str, model_name: str, states: tuple[str, ...] = ("READY",),
                    timeout: float = LOAD_TIMEOUT_SECONDS) -> set[int]:
    """The versions of `model_name` Triton at `url` has in `states` now (default: ready)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        index = client.get_model_repository_index(as_json=True, client_timeout=timeout).get("models", [])
    finally:
        client.close()
    return {int(m["version"]) for m in index
            if m.get("name") == model_name and m.get("state") in states and m.get("version", "").isdigit()}


def serve_versions(url: str, model_name: str, versions: Iterable[int], timeout: float = LOAD_TIMEOUT_SECONDS) -> list[int]:
    """Make Triton at `url` serve exactly `versions` of `model_name`;
    returns them sorted. Raises errors.Unavailable when Triton cannot be
    reached or a version did not become ready (the versions served before
    stay as they were: Triton swaps a model in only once it loaded)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    wanted = sorted({int(v) for v in versions})
    if not wanted:
        raise ValueError("at least one version must stay served")
    client = grpcclient.InferenceServerClient(url)
    try:
        config = client.get_model_config(model_name, as_json=True, client_timeout=timeout)["config"]
        config["version_policy"] = {"specific": {"versions": wanted}}
        client.load_model(model_name, config=json.dumps(config), client_timeout=timeout)
        not_ready = [v for v in wanted if not client.is_model_ready(model_name, str(v), client_timeout=timeout)]
    except InferenceServerException as error:
        raise errors.Unavailable(f"Triton at {url} did not load {model_name} versions {wanted}: {error}") from error
    finally:
        client.close()
    if not_ready:
        raise errors.Unavailable(f"Triton at {url} loaded {model_name} but versions {not_ready} are not ready")
    return wanted
