"""The Triton model repository (model_repo/) and the configs the Kubernetes
overlays mount over it: every config parses with Triton's own ModelConfig
proto and is consistent with its folder, the ensemble and its steps; the
ensemble text_encoder_ensemble gives the vectors of the Python-backend
text_encoder, in process and through a real Triton (the onnxruntime step
stood in for by the Python backend, the only one the local tritonserver has).
Each check is shown to fail on a broken repository."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from recsys_core.data import paths
from recsys_core.models import encoder as enc
from recsys_core.models import export
from recsys_core.models import model_repo
from recsys_core.models.encoder import OnnxEncoder

OVERLAYS = paths.REPO_ROOT / "k8s" / "overlays"
ENSEMBLE = paths.TEXT_ENCODER_ENSEMBLE_MODEL
# "The same embeddings": cosine to the Python-backend model's vector.
SAME_VECTOR_COSINE = 1 - 1e-4
TITLES = [
    "Logitech MX Master 3S Wireless Performance Mouse, Graphite",
    "Crayola 64 Count Crayons with Built-in Sharpener",
    "Café Bustelo Espresso Style Dark Roast Ground Coffee, 10 oz",
    "",
    "The Very Hungry Caterpillar (Board Book)",
    "Burt's Bees Lip Balm Multipack - Original Beeswax " * 8,  # past MAX_TOKENS
]


def overlay_config_files() -> list[Path]:
    return sorted(OVERLAYS.glob("*/triton/*.pbtxt"))


def overlay_overrides(overlay: str) -> dict[str, object]:
    return {path.stem: model_repo.parse_config(path.read_text())
            for path in sorted((OVERLAYS / overlay / "triton").glob("*.pbtxt"))}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="session")
def ensemble_members(exported_encoder):
    """The export installed into the ensemble's members (make setup does it)."""
    export.main([])
    assert export.ensemble_members_installed(exported_encoder, paths.MODEL_REPO)
    return exported_encoder


# --- the configs on their own ---------------------------------------------------


def test_every_config_parses_and_the_repository_is_consistent():
    configs = model_repo.model_configs(paths.MODEL_REPO)
    assert {paths.TEXT_ENCODER_MODEL, paths.TEXT_TOKENIZER_MODEL, paths.TEXT_ENCODER_ONNX_MODEL, ENSEMBLE} <= set(configs)
    assert model_repo.repository_problems(paths.MODEL_REPO) == []


def triton_overlay(overlay: str) -> str:
    """The overlay whose Triton configs `overlay` serves: its own, or those of
    the overlay it builds on (cpu-redis is the cpu overlay plus Redis)."""
    if (OVERLAYS / overlay / "triton").is_dir():
        return overlay
    kustomization = (OVERLAYS / overlay / "kustomization.yaml").read_text()
    bases = [line.split("../", 1)[1].strip() for line in kustomization.splitlines() if line.strip().startswith("- ../")]
    assert len(bases) == 1, f"{overlay}: no triton/ configs of its own and no single overlay to build on"
    return triton_overlay(bases[0])


@pytest.mark.parametrize("overlay", sorted(p.name for p in OVERLAYS.iterdir()))
def test_overlay_configs_parse_and_fit_the_repository(overlay):
    overrides = overlay_overrides(triton_overlay(overlay))
    own = {paths.TEXT_TOKENIZER_MODEL, paths.TEXT_ENCODER_ONNX_MODEL}
    # The CPU overlay also sets text_encoder's threads (the GPU image carries its GPU config).
    assert set(overrides) == own | ({paths.TEXT_ENCODER_MODEL} if triton_overlay(overlay) == "cpu" else set()), overlay
    assert model_repo.repository_problems(paths.MODEL_REPO, overrides) == []


def test_the_ensemble_has_text_encoders_interface():
    """Clients change only the model name: same tensors, same batch limit."""
    configs = model_repo.model_configs(paths.MODEL_REPO)
    python_model, ensemble = configs[paths.TEXT_ENCODER_MODEL], configs[ENSEMBLE]
    assert ensemble.platform == "ensemble"
    assert model_repo.tensors(ensemble) == model_repo.tensors(python_model)
    assert ensemble.max_batch_size == python_model.max_batch_size
    # The onnxruntime graph takes exactly what the tokenizer gives it.
    graph = configs[paths.TEXT_ENCODER_ONNX_MODEL]
    assert [t.name for t in graph.input] == [enc.INPUT_IDS, enc.ATTENTION_MASK]
    assert graph.backend == "onnxruntime"


def test_cpu_serves_int8_and_gpu_fp32_with_tensorrt_on_two_gpu_instances():
    kind = model_config_pb2.ModelInstanceGroup
    committed = model_repo.model_configs(paths.MODEL_REPO)[paths.TEXT_ENCODER_ONNX_MODEL]
    cpu = overlay_overrides("cpu")[paths.TEXT_ENCODER_ONNX_MODEL]
    gpu = overlay_overrides("gpu")[paths.TEXT_ENCODER_ONNX_MODEL]
    python_cpu = model_repo.model_configs(paths.MODEL_REPO)[paths.TEXT_ENCODER_MODEL]
    python_gpu = model_repo.parse_config((paths.REPO_ROOT / "deploy/triton/text_encoder.gpu.pbtxt").read_text())
    # The ensemble serves the weights text_encoder serves on the same hardware.
    by_precision = {"int8": enc.INT8_WEIGHTS_FILE, "fp32": enc.WEIGHTS_FILE}
    assert committed.default_model_filename == cpu.default_model_filename == by_precision[
        python_cpu.parameters["precision"].string_value]
    assert gpu.default_model_filename == by_precision[python_gpu.parameters["precision"].string_value]
    assert [(g.kind, g.count) for g in cpu.instance_group] == [(kind.KIND_CPU, 2)]
    assert [(g.kind, g.count) for g in gpu.instance_group] == [(kind.KIND_GPU, 2)]
    (trt,) = gpu.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert trt.parameters["precision_mode"] == "FP32", "FP16 would change the vectors under the fp32 fingerprint"
    # One profile up to the client's largest request: max_batch_size texts of MAX_TOKENS.
    assert trt.parameters["trt_profile_max_shapes"] == ",".join(
        f"{name}:{gpu.max_batch_size}x{enc.MAX_TOKENS}" for name in (enc.INPUT_IDS, enc.ATTENTION_MASK))
    assert not cpu.optimization.execution_accelerators.gpu_execution_accelerator


def test_export_installs_the_members_and_refreshes_stale_ones(exported_encoder, tmp_path):
    model_dir = tmp_path / paths.TEXT_ENCODER_MODEL
    shutil.copytree(exported_encoder, model_dir / "1", ignore=shutil.ignore_patterns("__pycache__"))
    assert not export.ensemble_members_installed(model_dir / "1", tmp_path)
    assert export.main(["--repo", str(tmp_path)]) == 0
    assert export.ensemble_members_installed(model_dir / "1", tmp_path)
    onnx_dir = tmp_path / paths.TEXT_ENCODER_ONNX_MODEL / "1"
    for name in (enc.WEIGHTS_FILE, enc.INT8_WEIGHTS_FILE, enc.METADATA_FILE):
        assert (onnx_dir / name).read_bytes() == (model_dir / "1" / name).read_bytes()
    assert (tmp_path / paths.TEXT_TOKENIZER_MODEL / "1" / enc.TOKENIZER_FILE).is_file()
    # A re-export changes the metadata (fingerprints): the members follow.
    metadata = json.loads((model_dir / "1" / enc.METADATA_FILE).read_text())
    metadata["source"] = "elsewhere"
    (model_dir / "1" / enc.METADATA_FILE).write_text(json.dumps(metadata))
    assert not export.ensemble_members_installed(model_dir / "1", tmp_path)
    assert export.main(["--repo", str(tmp_path)]) == 0
    assert json.loads((onnx_dir / enc.METADATA_FILE).read_text())["source"] == "elsewhere"
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted(
        export.ENSEMBLE_MEMBER_FILES[paths.TEXT_ENCODER_ONNX_MODEL]), "no temporary files left"


# --- each check can fail ----------------------------------------------------------


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """The repository's configs and version folders, without weights."""
    for config in paths.MODEL_REPO.glob("*/config.pbtxt"):
        target = tmp_path / config.parent.name
        target.mkdir()
        shutil.copyfile(config, target / "config.pbtxt")
        (target / "1").mkdir()
    return tmp_path


def edit(repo: Path, model: str, old: str, new: str) -> None:
    path = repo / model / "config.pbtxt"
    text = path.read_text()
    assert old in text, (model, old)
    path.write_text(text.replace(old, new, 1))


BROKEN = {
    "unknown field": (paths.TEXT_ENCODER_ONNX_MODEL, "instance_group [", "instance_groups [", "does not parse"),
    "bad data type": (paths.TEXT_ENCODER_ONNX_MODEL, "TYPE_INT64", "TYPE_INT65", "does not parse"),
    "name differs from folder": (paths.TEXT_TOKENIZER_MODEL, 'name: "text_tokenizer"', 'name: "tokenizer"',
                                 "config names the model"),
    "tensor not UPPER_SNAKE": (paths.TEXT_TOKENIZER_MODEL, 'name: "INPUT_IDS"', 'name: "input_ids"',
                               "is not UPPER_SNAKE"),
    "step output the model lacks": (ENSEMBLE, 'output_map { key: "INPUT_IDS"', 'output_map { key: "TOKEN_IDS"',
                                    "has no output 'TOKEN_IDS'"),
    "step model missing": (ENSEMBLE, 'model_name: "text_encoder_onnx"', 'model_name: "text_encoder_onx"',
                           "no such model"),
    "dtype mismatch along the ensemble": (paths.TEXT_ENCODER_ONNX_MODEL, "TYPE_INT64", "TYPE_INT32",
                                          "input INPUT_IDS is"),
    "dims mismatch along the ensemble": (paths.TEXT_TOKENIZER_MODEL, "dims: [ -1 ]", "dims: [ 128 ]",
                                         "input INPUT_IDS is"),
    "max_batch_size mismatch": (paths.TEXT_ENCODER_ONNX_MODEL, "max_batch_size: 64", "max_batch_size: 32",
                                "max_batch_size 32"),
    "ensemble output not produced as declared": (ENSEMBLE, "dims: [ 384 ]", "dims: [ 768 ]",
                                                 "output EMBEDDING declared"),
    "step input unmapped": (ENSEMBLE, '      input_map { key: "ATTENTION_MASK" value: "ATTENTION_MASK" }\n', "",
                            "inputs ['ATTENTION_MASK'] not mapped"),
    "internal tensor not UPPER_SNAKE": (ENSEMBLE, 'value: "INPUT_IDS" }\n      output_map',
                                        'value: "ids" }\n      output_map', "ensemble tensor 'ids'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_repository_is_reported(repo_copy, case):
    assert model_repo.repository_problems(repo_copy) == []
    model, old, new, expected = BROKEN[case]
    edit(repo_copy, model, old, new)
    problems = model_repo.repository_problems(repo_copy)
    assert any(expected in p for p in problems), problems


def test_version_folders_must_be_numeric(repo_copy):
    (repo_copy / paths.TEXT_TOKENIZER_MODEL / "v2").mkdir()
    assert any("are not numeric versions" in p for p in model_repo.repository_problems(repo_copy))
    shutil.rmtree(repo_copy / paths.TEXT_TOKENIZER_MODEL / "v2")
    shutil.rmtree(repo_copy / paths.TEXT_TOKENIZER_MODEL / "1")
    assert any("no version folder" in p for p in model_repo.repository_problems(repo_copy))


def test_an_override_must_keep_the_interface(repo_copy):
    override = overlay_overrides("gpu")[paths.TEXT_ENCODER_ONNX_MODEL]
    override.output[0].dims[:] = [768]
    problems = model_repo.repository_problems(repo_copy, {paths.TEXT_ENCODER_ONNX_MODEL: override})
    assert any("override changes" in p for p in problems), problems
    unknown = model_repo.repository_problems(repo_copy, {"text_encoder_trt": override})
    assert any("does not have" in p for p in unknown), unknown


def test_overlay_config_files_name_their_model():
    for path in overlay_config_files():
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.stem, path


# --- the ensemble computes what text_encoder computes ------------------------------


class _Tensor:
    def __init__(self, name: str, array):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors or [], error


class _Error(Exception):
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


@pytest.fixture
def python_backend(monkeypatch):
    """Enough of Triton's triton_python_backend_utils to run a model.py in
    this process (the real module needs the stub's C extension)."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = _Tensor
    fake.InferenceResponse = _Response
    fake.TritonError = _Error
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "recsys_core.models.triton_backend", raising=False)
    yield
    sys.modules.pop("recsys_core.models.triton_backend", None)


def load_python_model(model_dir: Path, version: str, config) -> object:
    spec = importlib.util.spec_from_file_location(f"_model_{model_dir.name}", model_dir / version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from google.protobuf import json_format

    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(model_dir), "model_version": version, "model_name": model_dir.name,
                      "model_config": json_format.MessageToJson(config), "model_instance_kind": "CPU"})
    return model


def run_ensemble_in_process(repo: Path, texts: list[str], overrides: dict | None = None) -> np.ndarray:
    """text_encoder_ensemble as Triton runs it, in this process: each step's
    real code (the tokenizer's model.py, the onnxruntime backend's file from
    default_model_filename), tensors passed by the ensemble's maps and checked
    against each step's declared types."""
    configs = {**model_repo.model_configs(repo), **(overrides or {})}
    ensemble = configs[ENSEMBLE]
    values = {"TEXT": np.array([t.encode() for t in texts], dtype=np.object_).reshape(-1, 1)}
    for step in ensemble.ensemble_scheduling.step:
        config = configs[step.model_name]
        inputs = {own: values[shared] for own, shared in step.input_map.items()}
        version = str(step.model_version)
        if model_repo.backend_of(config) == "python":
            (response,) = load_python_model(repo / step.model_name, version, config).execute([
                {name: _Tensor(name, array) for name, array in inputs.items()}])
            assert response.error is None, response.error
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors}
        else:
            assert model_repo.backend_of(config) == "onnxruntime"
            session = enc.onnx_session(repo / step.model_name / version / config.default_model_filename)
            declared = {t.name: t.data_type for t in config.input}
            numpy_of = {model_config_pb2.TYPE_INT64: np.int64, model_config_pb2.TYPE_INT32: np.int32}
            for name, array in inputs.items():
                assert array.dtype == numpy_of[declared[name]], (step.model_name, name, array.dtype)
            names = [t.name for t in config.output]
            outputs = dict(zip(names, session.run(names, inputs)))
        for own, shared in step.output_map.items():
            values[shared] = outputs[own]
    return values["EMBEDDING"]


def python_backend_vectors(texts: list[str], precision: str) -> np.ndarray:
    """What text_encoder's model.py computes (its engine is OnnxEncoder)."""
    version_dir = paths.MODEL_REPO / paths.TEXT_ENCODER_MODEL / "1"
    return OnnxEncoder(version_dir, precision=precision).encode(texts)


@pytest.mark.parametrize("overlay, precision", [(None, "int8"), ("cpu", "int8"), ("gpu", "fp32")])
def test_ensemble_in_process_gives_the_python_models_vectors(ensemble_members, python_backend, overlay, precision):
    overrides = overlay_overrides(overlay) if overlay else None
    served = run_ensemble_in_process(paths.MODEL_REPO, TITLES, overrides)
    expected = python_backend_vectors(TITLES, precision)
    assert served.shape == expected.shape == (len(TITLES), 384)
    assert cosines(served, expected).min() >= SAME_VECTOR_COSINE


def test_a_miswired_ensemble_gives_other_vectors(ensemble_members, python_backend, tmp_path):
    """The comparison catches what the static checks cannot: the token ids
    and the mask swapped between steps (both int64 [-1])."""
    ensemble = model_repo.model_configs(paths.MODEL_REPO)[ENSEMBLE]
    step = ensemble.ensemble_scheduling.step[1]
    step.input_map["INPUT_IDS"], step.input_map["ATTENTION_MASK"] = "ATTENTION_MASK", "INPUT_IDS"
    assert model_repo.repository_problems(paths.MODEL_REPO, {ENSEMBLE: ensemble}) == []
    served = run_ensemble_in_process(paths.MODEL_REPO, TITLES, {ENSEMBLE: ensemble})
    assert cosines(served, python_backend_vectors(TITLES, "int8")).min() < SAME_VECTOR_COSINE


# --- through a real Triton ------------------------------------------------------------


def test_local_triton_loads_what_its_backends_run(ensemble_members):
    from recsys_core.models.triton import TritonServer, TritonStartError, wheel_backends

    assert "onnxruntime" not in wheel_backends(), "the local tritonserver has onnxruntime now: serve the ensemble"
    loadable = TritonServer(paths.MODEL_REPO).loadable_models()
    assert paths.TEXT_ENCODER_MODEL in loadable and paths.TEXT_TOKENIZER_MODEL in loadable
    assert paths.TEXT_ENCODER_ONNX_MODEL not in loadable and ENSEMBLE not in loadable
    with pytest.raises(TritonStartError, match="cannot load"):
        TritonServer(paths.MODEL_REPO, models=(ENSEMBLE,)).start()


def standin_repository(target: Path, overrides: dict | None = None) -> Path:
    """model_repo's ensemble with text_encoder_onnx on the Python backend
    (tests/triton_models/onnx_standin), everything else as committed."""
    configs = {**model_repo.model_configs(paths.MODEL_REPO), **(overrides or {})}
    for name in (paths.TEXT_TOKENIZER_MODEL, paths.TEXT_ENCODER_ONNX_MODEL, ENSEMBLE):
        (target / name).mkdir(parents=True)
        source = paths.MODEL_REPO / name / "1"
        (target / name / "1").symlink_to(source)
        config = configs[name]
        if name == paths.TEXT_ENCODER_ONNX_MODEL:
            config = type(config)()
            config.CopyFrom(configs[name])
            config.parameters["weights_file"].string_value = config.default_model_filename
            config.backend, config.default_model_filename = "python", ""
            config.ClearField("optimization")
            (target / name / "1").unlink()
            (target / name / "1").mkdir()
            for file in source.iterdir():
                (target / name / "1" / file.name).symlink_to(file)
            shutil.copyfile(Path(__file__).parent / "triton_models" / "onnx_standin" / "1" / "model.py",
                            target / name / "1" / "model.py")
        (target / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return target


@pytest.mark.integration
def test_ensemble_through_a_real_triton_gives_the_python_models_vectors(ensemble_members, tmp_path):
    from recsys_core.models.triton import TritonServer
    from recsys_core.models.triton_encoder import TritonEncoder
    from services.embedding.config import EmbeddingConfig
    from services.embedding.server import load_encoder

    repo = standin_repository(tmp_path / "repo")
    with TritonServer(repo, log_path=tmp_path / "triton.log", models=(ENSEMBLE,)) as server:
        with TritonEncoder(server.grpc_url, ENSEMBLE) as encoder:
            assert (encoder.weights_model, encoder.weights_version) == (paths.TEXT_ENCODER_ONNX_MODEL, "1")
            assert encoder.precision == "int8" and encoder.dimension == 384 and encoder.max_batch_size == 64
            served = encoder.encode(TITLES)
            assert cosines(served, python_backend_vectors(TITLES, "int8")).min() >= SAME_VECTOR_COSINE
            # Past max_batch_size the client chunks; rows come back in order.
            many = [f"{t} {i}" for i in range(70) for t in TITLES[:2]]
            assert cosines(encoder.encode(many), python_backend_vectors(many, "int8")).min() >= 0.98
        # The embedding service finds the ensemble's weights on its disk and
        # keys its vector cache as the in-process int8 encoder does.
        config = EmbeddingConfig(encoder="triton", triton_url=server.grpc_url, triton_model=ENSEMBLE)
        served_encoder = load_encoder(config)
        try:
            assert served_encoder.fingerprint == python_backend_fingerprint("int8")
        finally:
            served_encoder.close()


def python_backend_fingerprint(precision: str) -> str:
    return enc.weights(paths.MODEL_REPO / paths.TEXT_ENCODER_MODEL / "1", precision)[1]


def test_the_stubs_onnxruntime_threads_do_not_spin(exported_encoder):
    """text_encoder's stub shares the cores with Triton's front end and the
    clients: its config turns onnxruntime's busy-waiting off, and the vectors
    stay the same (docs/performance.md, "Per-call overhead at batch 1")."""
    config = model_repo.model_configs(paths.MODEL_REPO)[paths.TEXT_ENCODER_MODEL]
    assert config.parameters["allow_spinning"].string_value == "0"
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    quiet = OnnxEncoder(exported_encoder, spin=False)
    options = quiet.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    np.testing.assert_allclose(quiet.encode(TITLES), OnnxEncoder(exported_encoder).encode(TITLES), atol=1e-6)
