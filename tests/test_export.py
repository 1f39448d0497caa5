"""The exported encoder: int8 against fp32, versions, and the model repository."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from recsys_core.models import encoder as enc
from recsys_core.models import export
from recsys_core.data import paths
from recsys_core.models.encoder import OnnxEncoder


@pytest.fixture(scope="module")
def catalogue_titles(dataset):
    titles = [t for t in dataset.items.title if t]
    return titles[:1000]


def top10(vectors: np.ndarray) -> np.ndarray:
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :10]


def test_int8_stays_close_to_fp32_on_catalogue_titles(exported_encoder, catalogue_titles):
    fp32 = OnnxEncoder(exported_encoder, precision="fp32").encode(catalogue_titles)
    int8 = OnnxEncoder(exported_encoder, precision="int8").encode(catalogue_titles)
    cosine = (fp32 * int8).sum(axis=1)
    assert cosine.mean() >= 0.99
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10(fp32), top10(int8))])
    assert overlap >= 0.9
    assert OnnxEncoder(exported_encoder, precision="int8").fingerprint != OnnxEncoder(
        exported_encoder, precision="fp32").fingerprint


def test_a_new_version_is_served_beside_the_previous_one(exported_encoder, tmp_path):
    """Export as the next version (as a fine-tuned model is), then a real
    Triton serves both: clients get the new one, the old one still answers."""
    from recsys_core.models.triton import TritonServer
    from recsys_core.models.triton_encoder import TritonEncoder

    model_dir = tmp_path / paths.TEXT_ENCODER_MODEL
    shutil.copytree(paths.MODEL_REPO / paths.TEXT_ENCODER_MODEL / "1", model_dir / "1")
    shutil.copyfile(paths.MODEL_REPO / paths.TEXT_ENCODER_MODEL / "config.pbtxt", model_dir / "config.pbtxt")
    assert export.main(["--repo", str(tmp_path), "--next-version"]) == 0
    assert (model_dir / "2" / "model.py").is_file() and export.is_exported(model_dir / "2")
    assert enc.latest_version_dir(repo=tmp_path) == model_dir / "2"

    with TritonServer(tmp_path, log_path=tmp_path / "triton.log") as server:
        newest = TritonEncoder(server.grpc_url)
        previous = TritonEncoder(server.grpc_url, version=1)
        assert newest.version == "2"
        texts = ["wooden train set", "nail polish"]
        np.testing.assert_allclose(newest.encode(texts), previous.encode(texts), atol=1e-5)
        newest.close()
        previous.close()
