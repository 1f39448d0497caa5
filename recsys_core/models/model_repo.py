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
