"""Our model: the MiniLM as the item tower, adapted to shopping sequences,
and a sequential user tower in the same 384-dimensional space.

Item tower: an item's vector is the MiniLM embedding of its text through a
trained projection after the pooling (identity at the start), with the top
`finetune_layers` transformer layers fine-tuned too when asked (finetune.py;
the default is 0, chosen on validation), plus, with `use_ids`, a learned ID vector for the
items of the training catalogue (zero at the start; a cold item is its text
alone).

User tower (`ShopperTower`): left-padded history item vectors [B, L, 384] in,
the shopper vector [B, 384] out, scored by inner product against item
vectors. It is the pretrained encoder's own zero-shot scorer (the
recency-weighted mix of the history's vectors, e^(-decay * age), normalised,
times a learned scale) plus a learned correction: a causal transformer over
the history (positions counted back from the latest item), read out into the
item space by a layer that starts at zero. So training starts from the
pretrained geometry instead of a random projection of it, which is what keeps
transfer to unseen categories from falling below the pretrained encoder.

Objective: next-item cross-entropy on every position of the training
sequences, against every item of the catalogue (or in-batch plus uniformly
sampled negatives, `negatives`), logits scaled by the learned temperature.
The catalogue's vectors come from a table computed by the current encoder;
each step re-encodes up to `encoder_batch` of the batch's target items with
gradient (they are positives, in-batch negatives for every other position,
and history inputs), writes them into the table, and the whole table is
re-encoded after every epoch.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from training import finetune, seqmodel
from training.items import split_item_texts
from training.protocol import CategorySplit

log = logging.getLogger(__name__)
ENCODER_CHUNK = 32


@dataclass
class TwoTowerConfig(seqmodel.SeqConfig):
    use_text: bool = True
    # Top MiniLM layers trained (0: only the projection after pooling). On
    # Beauty's validation split (docs/results.md) 0 peaked highest: NDCG@10
    # 0.0684, against 0.0656 with the top layer at encoder_lr 1e-5 and 0.0605
    # at 5e-5.
    finetune_layers: int = 0
    encoder_batch: int = 128  # items re-encoded with gradient per step
    encoder_lr: float = 5e-5  # of the projection and any fine-tuned layers
    id_lr: float | None = None  # of the ID vectors (default: lr)
    recency_decay: float = 0.3  # of the zero-shot mix the user tower starts from
    zero_shot_scale: float = 20.0  # its logit scale at the start (1 / temperature)
    # False: the user tower is the zero-shot mix alone, with its recency
    # decay and scale learned. What carries to a category never trained on
    # (docs/results.md, transfer): the learned correction and projection did not.
    correction: bool = True
    # Robust defaults (issue #18): a small category peaked at epoch 3 or 4
    # and then overfitted, mostly through the ID vectors, which memorise a
    # small catalogue's training sequences. Validation every epoch (a
    # two-epoch stride misses a peak at epoch 3), patience 3, and the
    # learning rate halved on every evaluation without a new best
    # (seqmodel.Schedule); the ID vectors decay toward zero, i.e. toward
    # the item's text vector. Chosen on Office_Products' validation split
    # (bench/train_defaults_sweep.py, docs/results.md "Robust defaults"):
    # best NDCG@10 before 0.0704, halving 0.0730, halving and ID decay 0.1
    # 0.0734; ID dropout 0.1 (whole items' ID vectors dropped per step)
    # 0.0709, and with a 20-step warmup and dropout 0.2 0.0672 after 15
    # epochs, still rising: both off by default.
    eval_every: int = 1
    patience: int = 3
    warmup_steps: int = 0
    plateau_factor: float = 0.5
    id_weight_decay: float = 0.1
    id_dropout: float = 0.0


class ShopperTower(nn.Module):
    """History item vectors [B, L, D] (left-padded, latest last) to a shopper
    vector per position [B, L, D] in the item space."""

    def __init__(self, config: TwoTowerConfig, item_dim: int):
        super().__init__()
        self.into = nn.Linear(item_dim, config.dim)
        self.sequence = seqmodel.UserTower(config)
        self.out = nn.Linear(config.dim, item_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.log_decay = nn.Parameter(torch.tensor(math.log(config.recency_decay)))
        self.scale = nn.Parameter(torch.tensor(config.zero_shot_scale))
        self.with_correction = config.correction

    def forward(self, item_vectors: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        length = item_vectors.shape[1]
        steps = torch.arange(length, device=item_vectors.device)
        age = (steps.unsqueeze(1) - steps.unsqueeze(0)).to(item_vectors.dtype)  # query t, key j: t - j
        weights = torch.exp(-torch.exp(self.log_decay) * age.clamp(min=0)) * (age >= 0).to(item_vectors.dtype)
        weights = weights.unsqueeze(0) * (~padding).unsqueeze(1).to(item_vectors.dtype)
        mix = nn.functional.normalize(weights @ item_vectors, p=2.0, dim=-1)
        if not self.with_correction:
            return self.scale * mix
        correction = self.out(self.sequence(self.into(item_vectors), padding))
        return self.scale * mix + correction


class ShopperVector(nn.Module):
    """The exported user tower: (item vectors [B, L, D], mask [B, L], 1 where
    an item is) to the shopper vector [B, D] after the latest item."""

    def __init__(self, tower: ShopperTower):
        super().__init__()
        self.tower = tower

    def forward(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        padding = mask < 0.5
        return self.tower(item_vectors * mask.unsqueeze(-1).to(item_vectors.dtype), padding)[:, -1]


class TextItemTower(nn.Module):
    def __init__(self, encoder: finetune.FineTunableEncoder, table: torch.Tensor, use_ids: bool,
                 encoder_batch: int, token_states: finetune.TokenStates | None = None, id_dropout: float = 0.0):
        super().__init__()
        self.id_dropout = id_dropout
        self.encoder = encoder
        # None when the model only scores: the table then is final.
        self.token_states = token_states
        self.encoder_batch = encoder_batch
        self.register_buffer("table", table.float().clone())
        self.dimension = table.shape[1]
        self.ids = nn.Embedding(table.shape[0], self.dimension) if use_ids else None
        if self.ids is not None:
            nn.init.zeros_(self.ids.weight)

    def all_items(self) -> torch.Tensor:
        return self.table if self.ids is None else self.table + self.ids.weight

    def training_matrix(self, targets: torch.Tensor) -> torch.Tensor:
        if self.token_states is None:
            raise RuntimeError("this item tower was loaded for scoring: it has no token states to train on")
        device = self.table.device
        items = torch.unique(targets[targets >= 0]).cpu()
        items = items[torch.randperm(len(items))[: self.encoder_batch]]
        # In chunks of similar length: one long text would otherwise pad every
        # other one to its length (lengths run from 10 to 128 tokens).
        items = items[np.argsort(self.token_states.lengths()[items.numpy()], kind="stable")]
        fresh = torch.cat([self.encoder.upper(*(t.to(device) for t in self.token_states.batch(chunk.numpy())))
                           for chunk in items.split(ENCODER_CHUNK)])
        items = items.to(device)
        with torch.no_grad():
            self.table[items] = fresh.detach()
        text = self.table.index_put((items,), fresh)  # out of place: gradient flows into `fresh`
        if self.ids is None:
            return text
        ids = self.ids.weight
        if self.training and self.id_dropout > 0:
            # Whole items, not coordinates: a dropped item is scored, and
            # read in histories, as its text alone (a cold item's vector).
            keep = torch.rand(ids.shape[0], 1, device=ids.device) >= self.id_dropout
            ids = ids * keep
        return text + ids

    def refresh(self, progress: bool = False) -> None:
        if self.token_states is not None:
            self.table.copy_(finetune.encode_all(self.encoder, self.token_states, progress))


class TwoTowerRecommender(seqmodel.SequentialRecommender):
    """The fine-tuned text item tower and the shopper tower, on `seqmodel.fit`'s loop."""

    def __init__(self, config: TwoTowerConfig, items: TextItemTower, tokenizer=None):
        nn.Module.__init__(self)
        self.config = config
        self.items = items
        self.user = ShopperTower(config, items.dimension)
        self.tokenizer = tokenizer

    def item_matrix(self) -> torch.Tensor:
        return self.items.all_items()

    def training_matrix(self, targets: torch.Tensor) -> torch.Tensor:
        return self.items.training_matrix(targets)

    def optimiser_groups(self) -> list[dict]:
        encoder = self.items.encoder.trainable_parameters()
        ids = [] if self.items.ids is None else [self.items.ids.weight]
        others = [p for n, p in self.named_parameters()
                  if p.requires_grad and not n.startswith(("items.encoder.", "items.ids."))]
        return [{"params": others}, {"params": encoder, "lr": self.config.encoder_lr},
                {"params": ids, "lr": self.config.id_lr or self.config.lr, "weight_decay": self.config.id_weight_decay}]

    def end_epoch(self) -> None:
        self.items.refresh()

    def user_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if k.startswith("user.")}


def build(split: CategorySplit, items: pd.DataFrame, config: TwoTowerConfig,
          source_dir=None, progress: bool = True) -> TwoTowerRecommender:
    """A model to train on `split`, its encoder read from `source_dir` (a
    transformers folder; default: the pretrained MiniLM)."""
    from recsys_core.models.export import pretrained_model_dir

    encoder, tokenizer = finetune.load_encoder(source_dir or pretrained_model_dir(), config.finetune_layers)
    states = finetune.lower_token_states(encoder, tokenizer, split_item_texts(split, items), progress=progress)
    table = finetune.encode_all(encoder, states, progress)
    tower = TextItemTower(encoder, table, config.use_ids, config.encoder_batch, token_states=states,
                          id_dropout=config.id_dropout)
    return TwoTowerRecommender(config, tower, tokenizer)


def shopper_vectors(model: TwoTowerRecommender, histories: Sequence[np.ndarray]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model.encode_users(histories, model.item_matrix()).numpy()
