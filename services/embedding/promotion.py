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
control API beside every version Triton has loaded
(recsys_core.models.triton_control). The new index is NOT built through
Triton: the catalogue is re-encoded in this process by a one-thread,
lowest-priority session of the same weights file (their fingerprints must
match), and a few probe texts are then encoded through Triton's new version
and compared with it before the swap, so the index and the queries Triton
encodes for it are one encoder's. Why not through Triton: the Python
backend declares a model's stub dead when a request is outstanding for more
than a second while the stub misses its heartbeat, and re-encoding the
catalogue sent it 64-row requests that took 35 s each on a busy CPU; one
such verdict failed the build ("Stub process 'text_encoder_0_0' is not
healthy"), after which that instance answers the next request with the
failed one's reply and then aborts tritonserver
(boost::interprocess::lock_exception), the serving version with it
(docs/operations.md, "Hot swap under Triton"; bench/triton_stub_stall.py). Several replicas share one
Triton, too: each re-encoding the catalogue through it would multiply the
load on the server their queries need.

Unloading, with replicas sharing one Triton: a replica never unloads the
version it swapped away from (a sibling may still be serving it, its own
swap not done), only versions older than that one, once its swap is done
and calls holding the old catalogue had grace_seconds to finish. Loading
keeps every version Triton has loaded or is loading (a sibling's). A
replica two promotions behind its siblings can lose its version: promote
again only once every replica serves the last promotion (the
recsys_embedding_model_version gauge).

Where several Triton pods sit behind one Service (Kubernetes), no replica
can load a version into all of them: there each Triton pod runs `recsys
triton-follow` (recsys_core.models.triton_follow), which loads registry
version N as text_encoder version 1000+N and keeps the previous one, and this
service (EMBEDDING_TRITON_MODEL_CONTROL=follower) writes and unloads nothing:
it waits until its Triton serves that version, then builds and checks as
above.

Health stays SERVING throughout: the old version answers until the new one
is whole, and a version that fails to build is refused (logged) while the
old one keeps serving.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

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
# How replies name the pretrained encoder a registry-following replica serves
# before the first promotion: a version like any other, so that a profile's
# vectors made by it are searched in its index (RetrieveCandidates'
# model_version) while the replica holds it after that promotion, and refused
# after, never searched in the new encoder's index.
PRETRAINED_LABEL = f"{KIND}/0"
# The build's nice value: served calls first, the new version's encoding after.
BUILD_NICENESS = 19
# Encoded through Triton's new version and by the build encoder before a
# swap: one request of a few rows, well inside the Python backend's
# one-second health window even on a busy CPU. Everyday titles of several
# lengths (int8 vectors shift slightly with what they are batched with).
PROBE_TEXTS = (
    "Wireless noise cancelling over-ear headphones with 30 hour battery",
    "Stainless steel cookware set, 12 pieces",
    "Dry dog food, chicken and rice, 35 lb",
    "Men's running shoe",
    "Rechargeable electric toothbrush with two brush heads and a travel case",
    "Board book for toddlers",
)
# Cosine a probe's vector from Triton must reach against the build
# encoder's: the same weights give 0.98 and more across batches
# (tests/test_triton.py); another encoder's vectors are far below.
PROBE_COSINE = 0.98


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

    if config.triton_model_control == "follower":
        # The weights are not on this disk to compare: the vectors are,
        # by swap_in on a promotion and check_at_start at start.
        return load_encoder(config, model, tracer, triton_version=wait_for_follower(config, version))
    repo = Path(config.model_repo)
    if repo.resolve() == paths.MODEL_REPO.resolve():
        raise ModelDirError(
            f"EMBEDDING_MODEL_REPO is the committed {paths.MODEL_REPO}, which promotions must not write to: point "
            "it (and Triton) at a serving repository (python -m recsys_core.models.model_serving --out)")
    triton_version = model_serving.install_encoder(model, repo)
    # Every version loaded or loading stays: a sibling replica may serve it,
    # or be loading its own promotion's.
    serving = served_triton_versions(config, states=LIVE_STATES)
    triton_control.serve_versions(config.triton_url, config.triton_model, serving | {triton_version})
    log.info("Triton loaded %s version %d (%s) beside %s", config.triton_model, triton_version,
             version.label if version else model.path, sorted(serving - {triton_version}) or "nothing")
    return load_encoder(config, model, tracer, triton_version=triton_version)


def check_at_start(config: EmbeddingConfig, model: ModelDir | None, encoder: Encoder) -> None:
    """At start with a follower's version: Triton's vectors against the
    model's own weights, as swap_in checks a promotion's (its build encoder
    does the job there, so this runs only here)."""
    if model is None or config.encoder != "triton" or config.triton_model_control != "follower":
        return
    builder = build_encoder(config, model, encoder)
    try:
        check_same_vectors(encoder, builder)
    except BaseException:
        close_encoder(encoder)
        raise
    finally:
        close_encoder(builder)


def wait_for_follower(config: EmbeddingConfig, version: ModelVersion | None) -> int:
    """The Triton version a pod's follower loads `version` as
    (recsys_core.models.triton_follow), once this service's Triton serves
    it: the swap waits, the serving version answering meanwhile."""
    from recsys_core import errors
    from recsys_core.models import triton_control

    if version is None:
        raise ModelDirError("EMBEDDING_TRITON_MODEL_CONTROL=follower serves registry versions only "
                            "(EMBEDDING_MODEL_REGISTRY), not a model directory")
    wanted = triton_control.registry_triton_version(version.version)
    give_up = time.monotonic() + config.triton_load_wait_seconds
    announced = False
    while True:
        try:
            if wanted in served_triton_versions(config):
                log.info("Triton serves %s version %d (%s), loaded by its follower", config.triton_model, wanted,
                         version.label)
                return wanted
        except Exception as error:  # noqa: BLE001 - Triton away for a moment: asked again below
            log.debug("cannot read Triton's versions: %s", error)
        if time.monotonic() > give_up:
            raise errors.Unavailable(
                f"Triton at {config.triton_url} did not serve {config.triton_model} version {wanted} ({version.label}) "
                f"within {config.triton_load_wait_seconds:.0f} s: is `recsys triton-follow` running beside it "
                f"on the same registry?")
        if not announced:
            log.info("waiting for Triton's follower to load %s as %s version %d", version.label, config.triton_model,
                     wanted)
            announced = True
        time.sleep(1.0)


# Triton's model states of a version that is, or is about to be, served.
LIVE_STATES = ("READY", "LOADING")


def served_triton_versions(config: EmbeddingConfig, states: tuple[str, ...] = ("READY",)) -> set[int]:
    """The text_encoder versions Triton has in `states` now (default: ready)."""
    from recsys_core.models import triton_control

    return triton_control.served_versions(config.triton_url, config.triton_model, states)


def triton_versions_to_keep(live: set[int], previous: int | None, current: int) -> set[int]:
    """What Triton keeps after this replica swapped from Triton version
    `previous` to `current`: `current`, `previous` (siblings whose swap is
    not done still serve it) and anything newer (a sibling's next
    promotion); only versions older than `previous` go."""
    floor = current if previous is None else min(previous, current)
    return {v for v in live if v >= floor} | {current}


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
    builder = None
    try:
        builder = build_encoder(config, model, encoder)
        if config.encoder == "triton":
            check_same_vectors(encoder, builder)
        catalogue = in_background(lambda: open_catalogue(
            config, encoder, model, old.store, model_version=version.label, build_encoder=builder))
        # Upserts the old version applied while this one was built.
        catalogue.sync()
    except BaseException:
        # A Triton version that failed here stays loaded: a sibling replica
        # may have swapped to it (the next promotion's swap unloads it).
        close_encoder(encoder)
        raise
    finally:
        if builder is not None:
            close_encoder(builder)
    served.add(Loaded(catalogue, version.version, version.label))
    log.info("swapped %s in for %s: %d items re-indexed under encoder %s", version.label,
             old.model_version or "the pretrained encoder", len(catalogue), encoder.fingerprint)
    return old


def build_encoder(config: EmbeddingConfig, model: ModelDir, serving: Encoder) -> Encoder:
    """What re-encodes the catalogue for a promotion: a session of the
    model's weights in this process, on one thread (the serving encoder's
    threads would take every core from the calls while it builds), at the
    precision the serving encoder runs (Triton's: its config's parameter).
    With Triton too (the module's docstring says why); open_catalogue
    refuses it unless its fingerprint is the served version's."""
    return OnnxEncoder(model.encoder_dir, threads=1, precision=getattr(serving, "precision", config.precision))


def check_same_vectors(served: Encoder, builder: Encoder) -> None:
    """Triton's new version and the build encoder must give the same
    vectors, or the index would be another encoder's than the queries
    Triton encodes for it: PROBE_TEXTS through both, in one small request."""
    got = served.encode(list(PROBE_TEXTS))
    want = builder.encode(list(PROBE_TEXTS))
    cosines = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    if cosines.min() < PROBE_COSINE:
        raise ModelDirError(
            f"{getattr(served, 'fingerprint', served)} does not give the vectors of the build encoder "
            f"{builder.fingerprint} (lowest cosine {cosines.min():.3f} on the probe texts): refusing to "
            f"index with one and query with the other")


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
    grace period to finish; with Triton, unload the encoder versions older
    than the old one (never the old one: siblings may still serve it)."""
    number = version_number(old)
    if number is not None:
        served.retire(number)
    close_encoder(old.encoder)
    current = served.current.value
    # A follower unloads for its pod (it keeps the version replicas may still be on).
    if config.encoder == "triton" and config.triton_model_control == "own" \
            and getattr(current.encoder, "weights_version", None) is not None:
        from recsys_core.models import triton_control

        previous = getattr(old.encoder, "weights_version", None)
        try:
            live = served_triton_versions(config, states=LIVE_STATES)
            keep = triton_versions_to_keep(live, None if previous is None else int(previous),
                                           int(current.encoder.weights_version))
            if keep != live:
                triton_control.serve_versions(config.triton_url, config.triton_model, keep)
                log.info("Triton unloaded %s versions %s, keeping %s", config.triton_model,
                         sorted(live - keep), sorted(keep))
        except Exception:
            log.exception("could not unload old %s versions from Triton; they stay loaded", config.triton_model)


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
