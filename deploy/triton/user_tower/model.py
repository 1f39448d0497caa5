"""Triton Python backend for the trained user tower.

Left-padded item vectors and their mask in, the shopper vector out, through
the same OnnxUserTower an in-process caller would use; requests of different
history lengths are padded to the longest and run together. Request handling
is shared with our other models (recsys_core.models.triton_backend).
"""
from __future__ import annotations

import triton_python_backend_utils as pb_utils

from recsys_core.models import user_tower as ut
from recsys_core.models.triton_backend import TritonModel


class TritonPythonModel(TritonModel):
    OUTPUT = ut.SHOPPER_VECTOR

    def load(self, version_dir, parameters, providers, output_dims):
        if not (version_dir / ut.METADATA_FILE).is_file():
            raise FileNotFoundError(f"no exported user tower in {version_dir}: install one with `recsys serve --model DIR`")
        tower = ut.OnnxUserTower(version_dir, precision=parameters.get("precision") or ut.DEFAULT_PRECISION,
                                 threads=int(parameters.get("intra_op_threads") or 0), providers=providers)
        if output_dims != [tower.dimension]:
            # Fail the load rather than serve vectors the config misdescribes.
            raise ValueError(f"config.pbtxt declares {ut.SHOPPER_VECTOR} dims {output_dims} but "
                             f"{version_dir / ut.METADATA_FILE} says {tower.dimension}")
        return tower

    def decode(self, request):
        vectors = pb_utils.get_input_tensor_by_name(request, ut.ITEM_VECTORS).as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, ut.MASK).as_numpy()
        ut.check_batch(vectors, mask, self.engine.dimension)
        return (vectors, mask), len(vectors)

    def run(self, decoded):
        return self.engine(*ut.concatenate_batches(decoded))
