"""The Triton model repository as Triton reads it: each model's config.pbtxt
parsed with Triton's own ModelConfig proto, which backend it needs, and which
models a given tritonserver can load.

The local tritonserver (nvidia-pytriton's) ships the Python backend only, so
it cannot load model_repo/text_encoder_onnx (onnxruntime backend) nor the
ensemble built on it; the launcher (recsys_core.models.triton) loads what its
backends allow instead of failing on the rest. The production image has every
backend and loads everything (docs/operations.md, "Triton models").
"""
from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.pbtxt"
ENSEMBLE_PLATFORM = "ensemble"
# Backends a model may name through `platform` instead of `backend`.
PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "pytorch_libtorch": "pytorch",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
}


def parse_config(text: str):
    """A config.pbtxt's text as Triton's ModelConfig message; raises
    google.protobuf.text_format.ParseError on anything Triton would refuse to parse."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def read_config(model_dir: Path):
    return parse_config((model_dir / CONFIG_FILE).read_text())


def model_configs(repo: Path) -> dict[str, object]:
    """Every model of `repo` (a folder with a config.pbtxt) by folder name."""
    return {
        path.parent.name: read_config(path.parent)
        for path in sorted(Path(repo).glob(f"*/{CONFIG_FILE}"))
    }


def backend_of(config) -> str:
    """The backend a model runs on; "ensemble" for an ensemble (Triton's core
    runs those, no backend needed)."""
    if config.platform == ENSEMBLE_PLATFORM:
        return ENSEMBLE_PLATFORM
    return config.backend or PLATFORM_BACKENDS.get(config.platform, config.platform)


def loadable_models(configs: dict[str, object], backends: set[str]) -> list[str]:
    """The models a server with `backends` can load: those on a present
    backend, and ensembles whose every step is loadable (Triton refuses an
    ensemble with a step it cannot load)."""
    ensembles = {name for name, config in configs.items() if backend_of(config) == ENSEMBLE_PLATFORM}
    loadable = {name for name, config in configs.items() if name not in ensembles and backend_of(config) in backends}
    changed = True
    while changed:  # an ensemble may use another ensemble
        changed = False
        for name in ensembles - loadable:
            if all(step.model_name in loadable for step in configs[name].ensemble_scheduling.step):
                loadable.add(name)
                changed = True
    return sorted(loadable)


def step_producing(config, output: str):
    """The step of an ensemble whose output_map writes the ensemble's `output`."""
    for step in config.ensemble_scheduling.step:
        if output in step.output_map.values():
            return step
    raise ValueError(f"ensemble {config.name} has no step producing {output}")


# --- checks (tests/test_model_repo.py runs them on model_repo/ and the overlays) ---

UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
# Subfolders of a model folder that are not versions: Triton's per-name
# configurations (--model-config-name) and Python caches.
NOT_VERSIONS = {"configs", "__pycache__"}


def tensors(config) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Inputs and outputs by name: (data type, dims without the batch axis)."""
    return {t.name: (t.data_type, tuple(t.dims)) for t in [*config.input, *config.output]}


def config_problems(name: str, config) -> list[str]:
    """What is wrong with one model's configuration on its own."""
    problems = []
    if config.name != name:
        problems.append(f"{name}: config names the model {config.name!r}, its folder is {name!r}")
    if not backend_of(config):
        problems.append(f"{name}: neither backend nor platform set")
    for tensor in [*config.input, *config.output]:
        if not UPPER_SNAKE.match(tensor.name):
            problems.append(f"{name}: tensor {tensor.name!r} is not UPPER_SNAKE")
    for step in config.ensemble_scheduling.step:
        for internal in [*step.input_map.values(), *step.output_map.values()]:
            if not UPPER_SNAKE.match(internal):
                problems.append(f"{name}: ensemble tensor {internal!r} is not UPPER_SNAKE")
    return problems


def ensemble_problems(name: str, config, configs: dict[str, object]) -> list[str]:
    """An ensemble against its steps: each step names a model of the
    repository and only tensors that model has; every tensor a step reads has
    the same data type and dims as where it comes from (the ensemble's input
    or an earlier step's output); the ensemble's outputs are produced with
    their declared type; every step batches as far as the ensemble does."""
    problems = []
    available = {t.name: (t.data_type, tuple(t.dims)) for t in config.input}
    for step in config.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        where = f"{name}: step {step.model_name}"
        if model is None:
            problems.append(f"{where}: no such model in the repository")
            continue
        if model.max_batch_size != config.max_batch_size:
            problems.append(f"{where}: max_batch_size {model.max_batch_size}, the ensemble's is {config.max_batch_size}")
        inputs = {t.name: (t.data_type, tuple(t.dims)) for t in model.input}
        outputs = {t.name: (t.data_type, tuple(t.dims)) for t in model.output}
        for own, ensemble_tensor in step.input_map.items():
            if own not in inputs:
                problems.append(f"{where}: has no input {own!r}")
            elif ensemble_tensor not in available:
                problems.append(f"{where}: reads {ensemble_tensor!r} before any step writes it")
            elif available[ensemble_tensor] != inputs[own]:
                problems.append(f"{where}: input {own} is {inputs[own]}, gets {ensemble_tensor} {available[ensemble_tensor]}")
        missing = sorted(set(inputs) - set(step.input_map))
        if missing:
            problems.append(f"{where}: inputs {missing} not mapped")
        for own, ensemble_tensor in step.output_map.items():
            if own not in outputs:
                problems.append(f"{where}: has no output {own!r}")
            else:
                available[ensemble_tensor] = outputs[own]
    for output in config.output:
        got = available.get(output.name)
        if got is None:
            problems.append(f"{name}: no step produces output {output.name}")
        elif got != (output.data_type, tuple(output.dims)):
            problems.append(f"{name}: output {output.name} declared {(output.data_type, tuple(output.dims))}, produced {got}")
    return problems


def repository_problems(repo: Path, overrides: dict[str, object] | None = None) -> list[str]:
    """Everything wrong with the repository at `repo`, with the configs of
    `overrides` (model name -> ModelConfig, e.g. an overlay's) in place of
    the committed ones; each override must keep its model's interface (the
    same tensors and batch limit), changing only how it is served."""
    repo = Path(repo)
    problems = []
    configs = {}
    for path in sorted(repo.glob(f"*/{CONFIG_FILE}")):
        name = path.parent.name
        try:
            configs[name] = read_config(path.parent)
        except Exception as exc:  # text_format.ParseError: unknown field, bad enum, syntax
            problems.append(f"{name}: {CONFIG_FILE} does not parse as a Triton ModelConfig: {exc}")
            continue
        versions = [p.name for p in path.parent.iterdir() if p.is_dir() and p.name not in NOT_VERSIONS]
        bad = sorted(v for v in versions if not v.isdigit())
        if bad:
            problems.append(f"{name}: folders {bad} are not numeric versions")
        if not versions:
            problems.append(f"{name}: no version folder")
    for name, override in (overrides or {}).items():
        committed = configs.get(name)
        if committed is None:
            problems.append(f"{name}: override for a model the repository does not have")
            continue
        if (tensors(override), override.max_batch_size) != (tensors(committed), committed.max_batch_size):
            problems.append(f"{name}: override changes the model's tensors or max_batch_size")
        configs[name] = override
    for name, config in configs.items():
        problems += config_problems(name, config)
        if backend_of(config) == ENSEMBLE_PLATFORM:
            problems += ensemble_problems(name, config, configs)
    return problems
