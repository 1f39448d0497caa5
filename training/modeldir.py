"""The versioned model directory `recsys train --out DIR` writes, and what
reads it back.

    DIR/
      manifest.json        written last: its presence marks a complete directory.
                           format, created, git commit, package versions; data,
                           categories, items and shoppers trained on; the model
                           config; training (epochs, minutes, seconds per epoch,
                           losses, validation NDCG@10 history, best validation
                           metrics, the model it started from, world_size: the
                           torchrun ranks that trained it, 1 without torchrun,
                           and under torchrun `distributed`: backend, positions
                           per rank, each rank's weights fingerprint); test metrics when
                           measured (scripts/results.py adds them)
      encoder/             the fine-tuned MiniLM as recsys_core/models/export.py writes a
                           model_repo/text_encoder version: model.onnx (fp32),
                           model.int8.onnx, tokenizer.json, encoder.json
                           (fingerprints). Serve it as a new version of
                           model_repo/text_encoder (copy the folder to
                           text_encoder/<N>/; `export.copy_backend_code` adds
                           model.py). TEXT in, EMBEDDING [n, 384] unit vectors out.
      user_tower/          model.onnx (fp32), model.int8.onnx, user_tower.json.
                           Inputs ITEM_VECTORS float32 [batch, L, 384] (the
                           history's item vectors, left-padded, latest last,
                           L <= max_len: keep the latest max_len items) and MASK
                           float32 [batch, L] (1 where an item is, 0 padding);
                           output SHOPPER_VECTOR float32 [batch, 384], scored by
                           inner product against item vectors.
      items/               item_ids.json: the training catalogue, row i = item i.
                           text_vectors.npy float32 [items, 384]: the fine-tuned
                           encoder's vectors (what encoder/ computes, up to ONNX
                           rounding). id_vectors.npy float32 [items, 384], only
                           when the model uses ID embeddings.
      training/            checkpoint.pt (the best weights, for evaluation and for
                           fine-tuning from this model) and transformer/ (the
                           fine-tuned transformers folder with projection.pt:
                           `recsys export --source DIR/training/transformer`
                           exports it again).

An item's vector, for the index and for the user tower's input, is
encoder(text) + id_vectors[row of its id in item_ids.json] for an item of the
training catalogue, and encoder(text) alone for any other (cold) item; a model
without id_vectors.npy is text only. A shopper's vector is the user tower on
their latest items' vectors; recommendations are the items with the largest
inner product with it.
"""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recsys_core.models import encoder as enc
from recsys_core.models import export, model_serving
from recsys_core.data import paths
from recsys_core.models import user_tower as ut
from training import finetune, twotower
from training.items import split_item_texts
from training.protocol import CategorySplit

log = logging.getLogger(__name__)

# The names serving reads (model_serving.py and user_tower.py need no torch,
# so they own them); the training/ part is only read back here.
FORMAT = model_serving.FORMAT
MANIFEST = model_serving.MANIFEST
ENCODER_DIR = model_serving.ENCODER_DIR
USER_TOWER_DIR = model_serving.USER_TOWER_DIR
ITEMS_DIR = model_serving.ITEMS_DIR
ITEM_IDS_FILE = model_serving.ITEM_IDS_FILE
ID_VECTORS_FILE = model_serving.ID_VECTORS_FILE
TEXT_VECTORS_FILE = "text_vectors.npy"
USER_TOWER_METADATA = ut.METADATA_FILE
ITEM_VECTORS = ut.ITEM_VECTORS
MASK = ut.MASK
SHOPPER_VECTOR = ut.SHOPPER_VECTOR
TRAINING_DIR = "training"
CHECKPOINT = "checkpoint.pt"
TRANSFORMER_DIR = "transformer"


def checkpoint_path(out: Path) -> Path:
    return out / TRAINING_DIR / CHECKPOINT


def is_model_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "git_commit": commit}


def save(model: twotower.TwoTowerRecommender, split: CategorySplit, out: Path, manifest: dict) -> Path:
    """Write the whole directory for `model` trained on `split`; `manifest`
    adds what only the caller knows (data, training figures)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    model.eval()
    training = out / TRAINING_DIR
    training.mkdir(exist_ok=True)
    torch.save(model.state_dict(), checkpoint_path(out))
    transformer_dir = finetune.save_transformer(model.items.encoder, model.tokenizer, training / TRANSFORMER_DIR)

    items = out / ITEMS_DIR
    items.mkdir(exist_ok=True)
    (items / ITEM_IDS_FILE).write_text(json.dumps(split.item_ids))
    np.save(items / TEXT_VECTORS_FILE, model.items.table.numpy())
    if model.items.ids is not None:
        np.save(items / ID_VECTORS_FILE, model.items.ids.weight.detach().numpy())

    export.export_encoder(transformer_dir, out / ENCODER_DIR)
    user_tower = export_user_tower(model, out / USER_TOWER_DIR)
    encoder_meta = json.loads((out / ENCODER_DIR / enc.METADATA_FILE).read_text())
    (out / MANIFEST).write_text(json.dumps({
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "categories": split.category.split("+"),
        "items": split.num_items,
        "shoppers": len(split.users),
        "config": asdict(model.config),
        "encoder": {"dir": ENCODER_DIR, "dimension": encoder_meta["dimension"],
                    "fingerprints": {p: w["fingerprint"] for p, w in encoder_meta["weights"].items()}},
        "user_tower": {"dir": USER_TOWER_DIR, **user_tower},
        "id_vectors": model.items.ids is not None,
        **manifest,
    }, indent=2))
    return out


def export_user_tower(model: twotower.TwoTowerRecommender, out: Path, sample_batch: int = 64) -> dict:
    """ONNX fp32 and int8 of the user tower; how close int8 stays to fp32 on
    real item vectors goes into user_tower.json."""
    import onnxruntime as ort

    out.mkdir(parents=True, exist_ok=True)
    wrapper = twotower.ShopperVector(model.user).eval()
    length = model.config.max_len
    rng = np.random.default_rng(0)
    item_matrix = model.item_matrix().detach()
    rows = rng.integers(0, item_matrix.shape[0], size=(sample_batch, length))
    vectors = item_matrix[torch.as_tensor(rows)]
    mask = torch.ones(sample_batch, length)
    for row, keep in enumerate(rng.integers(1, length + 1, size=sample_batch)):
        mask[row, : length - keep] = 0  # left padding, as serving sends it
    fp32 = out / enc.WEIGHTS_FILE
    fast_path = torch.backends.mha.get_fastpath_enabled()
    # The fused inference kernel of nn.TransformerEncoderLayer has no ONNX form.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper, (vectors[:2], mask[:2]), str(fp32),
                input_names=[ITEM_VECTORS, MASK], output_names=[SHOPPER_VECTOR],
                dynamic_axes={ITEM_VECTORS: {0: "batch", 1: "length"}, MASK: {0: "batch", 1: "length"},
                              SHOPPER_VECTOR: {0: "batch"}},
                opset_version=export.OPSET, dynamo=False,
            )
            expected = wrapper(vectors * mask.unsqueeze(-1), mask).numpy()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    int8 = export.quantize_int8(fp32, out / enc.INT8_WEIGHTS_FILE)

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([SHOPPER_VECTOR], {ITEM_VECTORS: (vectors * mask.unsqueeze(-1)).numpy(),
                                              MASK: mask.numpy()})[0]

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    got_fp32, got_int8 = run(fp32), run(int8)
    metadata = {
        "dimension": int(item_matrix.shape[1]),
        "max_len": length,
        "inputs": {ITEM_VECTORS: "float32 [batch, L, dimension], left-padded, latest item last",
                   MASK: "float32 [batch, L], 1 where an item is"},
        "outputs": {SHOPPER_VECTOR: "float32 [batch, dimension]"},
        "weights": export.weights_metadata(fp32, int8),
        "fp32_max_abs_error_vs_torch": float(np.abs(got_fp32 - expected).max()),
        "int8_cosine_to_fp32": cosine(got_int8, got_fp32),
    }
    (out / USER_TOWER_METADATA).write_text(json.dumps(metadata, indent=2))
    return {k: metadata[k] for k in ("max_len", "weights", "fp32_max_abs_error_vs_torch", "int8_cosine_to_fp32")}


def read_manifest(model_dir: Path) -> dict:
    if not is_model_dir(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a model directory written by `recsys train` (no {MANIFEST})")
    return json.loads((model_dir / MANIFEST).read_text())


def config_of(model_dir: Path) -> twotower.TwoTowerConfig:
    return twotower.TwoTowerConfig(**read_manifest(model_dir)["config"])


def encode_items(model_dir: Path, split: CategorySplit, items: pd.DataFrame, progress: bool = True) -> torch.Tensor:
    """`split`'s item vectors by the model's fine-tuned encoder (fp32, over the
    cached states of its frozen layers; the exported ONNX encoder gives the
    same vectors, tests/test_finetune.py)."""
    config = config_of(model_dir)
    encoder, tokenizer = finetune.load_encoder(model_dir / TRAINING_DIR / TRANSFORMER_DIR, config.finetune_layers)
    states = finetune.lower_token_states(encoder, tokenizer, split_item_texts(split, items), progress=progress)
    return finetune.encode_all(encoder, states, progress)


def load_for_scoring(model_dir: Path, split: CategorySplit, items: pd.DataFrame, progress: bool = True,
                     text_vectors: dict[str, np.ndarray] | None = None) -> twotower.TwoTowerRecommender:
    """The saved model over `split`'s catalogue. The catalogue it was trained
    on keeps its table and ID vectors; any other is scored through text alone,
    its items encoded by the fine-tuned encoder (`encode_items`) or, given
    `text_vectors` (item id -> vector, from `encode_items` on catalogues
    covering this one), looked up there."""
    config = config_of(model_dir)
    encoder, tokenizer = finetune.load_encoder(model_dir / TRAINING_DIR / TRANSFORMER_DIR, config.finetune_layers)
    trained_on = json.loads((model_dir / ITEMS_DIR / ITEM_IDS_FILE).read_text())
    state = torch.load(checkpoint_path(model_dir), weights_only=True)
    if trained_on == split.item_ids:
        table = torch.from_numpy(np.load(model_dir / ITEMS_DIR / TEXT_VECTORS_FILE))
    else:
        config.use_ids = False
        state = {k: v for k, v in state.items() if not k.startswith("items.")}
        if text_vectors is None:
            table = encode_items(model_dir, split, items, progress)
        else:
            missing = [i for i in split.item_ids if i not in text_vectors]
            if missing:
                raise KeyError(f"no text vector for {len(missing)} items of {split.category}, e.g. {missing[:3]}")
            table = torch.from_numpy(np.stack([text_vectors[i] for i in split.item_ids]))
    tower = twotower.TextItemTower(encoder, table, config.use_ids, config.encoder_batch)
    model = twotower.TwoTowerRecommender(config, tower, tokenizer)
    state.pop("items.table", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("items.") for k in missing):
        raise ValueError(f"{model_dir}: checkpoint does not match its config (missing {missing}, unexpected {unexpected})")
    return model.eval()


def load_for_training(model_dir: Path, split: CategorySplit, items: pd.DataFrame,
                      config: twotower.TwoTowerConfig, progress: bool = True) -> twotower.TwoTowerRecommender:
    """A model to go on training on `split`, from a saved one's fine-tuned
    encoder and user tower (transfer: ID vectors never carry over to another
    catalogue; on the same one they do)."""
    source = read_manifest(model_dir)
    model = twotower.build(split, items, config, source_dir=model_dir / TRAINING_DIR / TRANSFORMER_DIR,
                           progress=progress)
    state = torch.load(checkpoint_path(model_dir), weights_only=True)
    model.user.load_state_dict({k.removeprefix("user."): v for k, v in state.items() if k.startswith("user.")})
    same_catalogue = json.loads((model_dir / ITEMS_DIR / ITEM_IDS_FILE).read_text()) == split.item_ids
    if same_catalogue and config.use_ids and source["id_vectors"]:
        model.items.ids.weight.data.copy_(state["items.ids.weight"])
    return model
