"""A Python-backend stand-in for an onnxruntime-backend model, for the local
tritonserver, which has no onnxruntime backend (tests/test_model_repo.py).

It takes the real model's config with the backend swapped, runs the file the
real config names (parameter `weights_file`, copied from its
default_model_filename) with onnxruntime, feeds every input by its config
name and returns every output by its config name, one request at a time:
what Triton's onnxruntime backend does, minus its batching of requests. The
ensemble around it (scheduling, tensor mapping, types, shapes) is Triton's own.
"""
from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from recsys_core.models.encoder import onnx_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        weights = config["parameters"]["weights_file"]["string_value"]
        self.session = onnx_session(version_dir / weights)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            results = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in zip(self.outputs, results)]))
        return responses
