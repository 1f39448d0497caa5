"""Our model: a text item tower and a sequential user tower, trained on
shopping sequences; saved and loaded as a model directory."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recsys_core.models.encoder import Encoder
from training import seqmodel
from training.items import split_item_vectors
from training.protocol import CategorySplit

log = logging.getLogger(__name__)

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"


def text_tensor(split: CategorySplit, items: pd.DataFrame, encoder: Encoder) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(split_item_vectors(split, items, encoder)))


def build(split: CategorySplit, text: torch.Tensor, config: seqmodel.SeqConfig) -> seqmodel.SequentialRecommender:
    return seqmodel.SequentialRecommender(split.num_items, config, text=text)


def transfer(source: seqmodel.SequentialRecommender, split: CategorySplit, text: torch.Tensor,
             use_ids: bool) -> seqmodel.SequentialRecommender:
    """The source's user tower and text projection over another catalogue.
    ID embeddings never transfer (other items); with `use_ids` the new
    catalogue gets fresh ones to learn."""
    config = seqmodel.SeqConfig(**{**asdict(source.config), "use_ids": use_ids, "use_text": True})
    target = seqmodel.SequentialRecommender(split.num_items, config, text=text)
    target.user.load_state_dict(source.user.state_dict())
    target.items.project.load_state_dict(source.items.project.state_dict())
    return target


def save(model: seqmodel.SequentialRecommender, split: CategorySplit, out: Path, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    torch.save(state, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({
        "config": asdict(model.config),
        "categories": split.category.split("+"),
        "item_ids": split.item_ids,
        **extra,
    }))


def load(model_dir: Path, split: CategorySplit, text: torch.Tensor) -> seqmodel.SequentialRecommender:
    """The saved model over `split`'s catalogue: the same catalogue keeps its
    ID embeddings; another one is scored through text alone."""
    saved = json.loads((model_dir / CONFIG_FILE).read_text())
    config = seqmodel.SeqConfig(**saved["config"])
    state = torch.load(model_dir / WEIGHTS_FILE, weights_only=True)
    same_catalogue = saved["item_ids"] == split.item_ids
    if not same_catalogue:
        config.use_ids = False
        state = {k: v for k, v in state.items() if not k.startswith("items.ids.")}
    model = seqmodel.SequentialRecommender(split.num_items, config, text=text)
    model.load_state_dict(state, strict=False)
    return model
