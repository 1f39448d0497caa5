"""The registry's promoted sequence model, served and hot-swapped
(EMBEDDING_MODEL_REGISTRY; issue #19, hot swap).

A version is one Catalogue: its encoder and the index that encoder (plus the
model's ID vectors) built, never changed into another version's. On a
promotion the new version's catalogue is built beside the serving one, in
this background thread, from the shared catalogue store (every item encoded
again by the new encoder; the embedding cache keeps the vectors for a later
start), and then `Served.add` replaces one reference: a call reads the
current catalogue once at its start, so its query is encoded by the encoder
that built the index it searches, and nothing of the other version reaches
its reply.

With Triton (--model-control-mode=explicit), the new encoder becomes the next
numbered version of text_encoder in the served model repository
(EMBEDDING_MODEL_REPO, the folder Triton reads), loaded through the model
control API beside the serving version (recsys_core.models.triton_control);
once the swap is done and calls that held the old catalogue have had
grace_seconds to finish, the old version is unloaded.

Health stays SERVING throughout: the old version answers until the new one
is whole, and a version that fails to build is refused (logged) while the
old one keeps serving.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from recsys_core.data import paths
from recsys_core.models import model_serving
from recsys_core.models.encoder import Encoder, OnnxEncoder
from recsys_core.models.hot_swap import Loaded, Served, follow_promotions
from recsys_core.models.model_serving import ModelDir, ModelDirError, open_model_dir
from recsys_core.models.registry import ModelVersion, Registry
from services.embedding.catalogue import Catalogue
from services.embedding.config import EmbeddingConfig
from services.embedding.loading import load_encoder, open_catalogue

log = logging.getLogger(__name__)

KIND = "sequence"
# The build's nice value: served calls first, the new version's encoding after.
BUILD_NICENESS = 19


def promoted_model(config: EmbeddingConfig) -> tuple[ModelDir | None, ModelVersion | None]:
    """The registry's promoted sequence model at start; (None, None) before
    any is promoted (the pretrained encoder serves until one is)."""
    version = Registry(config.model_registry).promoted(KIND)
    if version is None:
        log.info("no sequence model promoted in %s yet: serving the pretrained encoder until one is",
                 config.model_registry)
        return None, None
    return open_model_dir(version.path), version


def version_number(catalogue: Catalogue) -> int | None:
    label = catalogue.model_version
    return int(label.rsplit("/", 1)[1]) if label else None


def model_encoder(config: EmbeddingConfig, model: ModelDir | None, version: ModelVersion | None,
                  tracer=None) -> Encoder:
    """The encoder of `model` (None: the pretrained one). With Triton, the
    model's encoder is installed as a text_encoder version of the served
    repository and loaded beside what Triton serves; the client is pinned to it."""
    if model is None or config.encoder != "triton":
        return load_encoder(config, model, tracer)
    from recsys_core.models import triton_control

    repo = Path(config.model_repo)
    if repo.resolve() == paths.MODEL_REPO.resolve():
        raise ModelDirError(
            f"EMBEDDING_MODEL_REPO is the committed {paths.MODEL_REPO}, which promotions must not write to: point "
            "it (and Triton) at a serving repository (python -m recsys_core.models.model_serving --out)")
    triton_version = model_serving.install_encoder(model, repo)
    serving = served_triton_versions(config)
    triton_control.serve_versions(config.triton_url, config.triton_model, serving | {triton_version})
    log.info("Triton loaded %s version %d (%s) beside %s", config.triton_model, triton_version,
             version.label if version else model.path, sorted(serving) or "nothing")
    return load_encoder(config, model, tracer, triton_version=triton_version)


def served_triton_versions(config: EmbeddingConfig) -> set[int]:
    """The text_encoder versions Triton has ready now."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(config.triton_url)
    try:
        index = client.get_model_repository_index(as_json=True).get("models", [])
    finally:
        client.close()
    return {int(m["version"]) for m in index
            if m.get("name") == config.triton_model and m.get("state") == "READY" and m.get("version", "").isdigit()}


def swap_in(config: EmbeddingConfig, served: Served[Catalogue], version: ModelVersion, tracer=None) -> Catalogue:
    """Build `version`'s catalogue beside the serving one and make it current."""
    old = served.current.value
    model = open_model_dir(version.path)
    if model.dimension != old.dimension:
        # Clients hold vectors of the serving dimension (profiles); a swap
        # would turn every one of their calls into INVALID_ARGUMENT.
        raise ModelDirError(f"{version.label} makes {model.dimension}-dimensional vectors, the serving "
                            f"version {old.dimension}: a new dimension needs a new deployment")
    encoder = model_encoder(config, model, version, tracer)
    try:
        catalogue = in_background(lambda: open_catalogue(
            config, encoder, model, old.store, model_version=version.label,
            build_encoder=build_encoder(config, model, encoder)))
        # Upserts the old version applied while this one was built.
        catalogue.sync()
    except BaseException:
        close_encoder(encoder)
        raise
    served.add(Loaded(catalogue, version.version, version.label))
    log.info("swapped %s in for %s: %d items re-indexed under encoder %s", version.label,
             old.model_version or "the pretrained encoder", len(catalogue), encoder.fingerprint)
    return old


def build_encoder(config: EmbeddingConfig, model: ModelDir, serving: Encoder) -> Encoder | None:
    """What re-encodes the catalogue for a promotion: in process, a second
    session of the same weights on one thread (the serving encoder's
    threads would take every core from the calls while it builds); with
    Triton, the served version itself (None)."""
    if config.encoder == "triton":
        return None
    return OnnxEncoder(model.encoder_dir, threads=1, precision=config.precision)


def in_background(build):
    """`build()` in a thread of its own at the lowest CPU priority (Linux
    threads each have a nice value; one that cannot be changed is left), so
    the calls being served get the cores first and the build the rest.
    Its own thread: a thread cannot raise its priority again unprivileged,
    and the next promotion's serving encoder must not inherit it."""
    result: dict = {}

    def run():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICENESS)
        except (AttributeError, OSError):
            pass
        try:
            result["value"] = build()
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=run, name="model-build", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def retire(config: EmbeddingConfig, served: Served[Catalogue], old: Catalogue) -> None:
    """After a swap: release the old version once calls that hold it had the
    grace period to finish; with Triton, unload its encoder version."""
    number = version_number(old)
    if number is not None:
        served.retire(number)
    close_encoder(old.encoder)
    current = served.current.value
    if config.encoder == "triton" and getattr(current.encoder, "weights_version", None) is not None:
        from recsys_core.models import triton_control

        keep = {int(current.encoder.weights_version)}
        try:
            triton_control.serve_versions(config.triton_url, config.triton_model, keep)
            log.info("Triton unloaded %s versions other than %s", config.triton_model, sorted(keep))
        except Exception:
            log.exception("could not unload the old %s version from Triton; it stays loaded", config.triton_model)


def close_encoder(encoder: Encoder) -> None:
    close = getattr(encoder, "close", None)
    if close is not None:
        close()


def follow(config: EmbeddingConfig, served: Served[Catalogue], stop: threading.Event, tracer=None) -> None:
    """The background loop: each newly promoted sequence version swapped in."""

    def load(version: ModelVersion) -> None:
        old = swap_in(config, served, version, tracer)
        # Calls that read the old catalogue just before the swap finish with
        # it; its Triton version must answer them until then.
        if not stop.wait(config.grace_seconds):
            retire(config, served, old)

    follow_promotions(Registry(config.model_registry), KIND, load, stop, config.model_poll_seconds,
                      already=version_number(served.current.value), name="embedding")
