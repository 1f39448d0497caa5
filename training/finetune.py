"""The MiniLM item encoder, fine-tuned affordably on two CPU cores.

A full forward and backward pass of MiniLM over a category's 12k item texts
per epoch does not fit the budget. Item texts are short (title and category
path: 34 tokens on average on Beauty), and the lower transformer layers stay
frozen, so their output for every item's tokens is computed once
(`lower_token_states`, cached on disk) and training runs only the top
`trainable_layers` layers, the mean pooling and a projection that starts as
the identity (so the fine-tuned encoder starts exactly as the pretrained one).

`FineTunableEncoder.forward` is the whole encoder (tokens in, unit vector out),
which is what `save_transformer` writes for recsys_core/models/export.py to turn into
ONNX; training goes through `upper` on the cached states instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from recsys_core.models import encoder as enc
from recsys_core.data import paths
from recsys_core.models.export import PROJECTION_FILE, load_projection

log = logging.getLogger(__name__)

# Batches of similar length: short titles do not pay for one long one.
LOWER_BATCH = 128
STATES_CACHE = "token_states"


def load_transformer(source_dir: Path):
    """(transformer, tokenizer) from a transformers folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(str(source_dir)), AutoTokenizer.from_pretrained(str(source_dir))


def bidirectional_mask(transformer, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The attention mask in the form the transformer's layers take (as its own forward builds it)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=transformer.config, inputs_embeds=hidden, attention_mask=attention_mask)


class FineTunableEncoder(nn.Module):
    """MiniLM with its top `trainable_layers` layers and a projection (initialised
    to the identity) trainable, every other weight frozen; mean pooling and L2
    normalisation as the exported encoder does."""

    def __init__(self, transformer, trainable_layers: int, projection: nn.Linear | None = None):
        super().__init__()
        layers = len(transformer.encoder.layer)
        if not 0 <= trainable_layers <= layers:
            raise ValueError(f"trainable_layers must be between 0 and {layers}, got {trainable_layers}")
        self.transformer = transformer
        self.trainable_layers = trainable_layers
        self.split_at = layers - trainable_layers
        dimension = int(transformer.config.hidden_size)
        self.dimension = dimension
        if projection is None:
            projection = nn.Linear(dimension, dimension)
            with torch.no_grad():
                projection.weight.copy_(torch.eye(dimension))
                projection.bias.zero_()
        self.projection = projection
        for parameter in self.transformer.parameters():
            parameter.requires_grad_(False)
        for layer in self.upper_layers():
            for parameter in layer.parameters():
                parameter.requires_grad_(True)

    def upper_layers(self) -> Sequence[nn.Module]:
        return self.transformer.encoder.layer[self.split_at:]

    def lower_fingerprint(self) -> str:
        """Identifies the frozen part: cached token states are only valid for it."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(str(self.split_at).encode())
        frozen = [self.transformer.embeddings, *self.transformer.encoder.layer[: self.split_at]]
        for module in frozen:
            for name, tensor in module.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer.embeddings(input_ids=input_ids)
        mask = bidirectional_mask(self.transformer, hidden, attention_mask)
        for layer in self.transformer.encoder.layer[: self.split_at]:
            hidden = layer(hidden, attention_mask=mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    def upper(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit item vectors from the frozen layers' token states."""
        mask = bidirectional_mask(self.transformer, hidden, attention_mask)
        for layer in self.upper_layers():
            hidden = layer(hidden, attention_mask=mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(self.projection(pooled), p=2.0, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.upper(self.lower(input_ids, attention_mask), attention_mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


@dataclass
class TokenStates:
    """Every item's token states after the frozen layers, ragged (one row per
    token, items one after the other), in float16 to halve the memory."""
    states: torch.Tensor  # [tokens, dimension] float16
    offsets: np.ndarray  # [items + 1]: item i's tokens are rows offsets[i]:offsets[i+1]

    @property
    def num_items(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [m, T, dimension] float32, attention mask [m, T]), right-padded as the tokenizer pads."""
        lengths = self.lengths()[np.asarray(items)]
        hidden = torch.zeros(len(items), int(lengths.max()), self.states.shape[1])
        mask = torch.zeros(len(items), int(lengths.max()), dtype=torch.long)
        for row, (item, length) in enumerate(zip(items, lengths)):
            start = self.offsets[item]
            hidden[row, :length] = self.states[start : start + length]
            mask[row, :length] = 1
        return hidden, mask


def tokenize_items(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids as serving's tokenizer makes them (same truncation)."""
    return tokenizer(list(texts), truncation=True, max_length=enc.MAX_TOKENS)["input_ids"]


def lower_token_states(encoder: FineTunableEncoder, tokenizer, texts: Sequence[str],
                       cache_dir: Path | None = None, progress: bool = True) -> TokenStates:
    """The frozen layers' output for every text, from the disk cache when the
    same frozen weights already saw the same texts."""
    cache_dir = paths.cache_dir() if cache_dir is None else cache_dir
    digest = hashlib.blake2b(digest_size=10)
    digest.update(encoder.lower_fingerprint().encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    cached = cache_dir / STATES_CACHE / f"{digest.hexdigest()}.pt"
    if cached.is_file():
        stored = torch.load(cached, weights_only=True)
        return TokenStates(states=stored["states"], offsets=stored["offsets"].numpy())

    token_ids = tokenize_items(tokenizer, texts)
    lengths = np.asarray([len(t) for t in token_ids])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    states = torch.empty(int(offsets[-1]), encoder.dimension, dtype=torch.float16)
    order = np.argsort(lengths, kind="stable")
    encoder.eval()
    for start in tqdm(range(0, len(order), LOWER_BATCH), desc="frozen layers", unit="batch", disable=not progress):
        chunk = order[start : start + LOWER_BATCH]
        width = int(lengths[chunk].max())
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, item in enumerate(chunk):
            ids[row, : lengths[item]] = torch.as_tensor(token_ids[item])
            mask[row, : lengths[item]] = 1
        hidden = encoder.lower(ids, mask)
        for row, item in enumerate(chunk):
            states[offsets[item] : offsets[item + 1]] = hidden[row, : lengths[item]].half()
    with paths.replacing(cached) as tmp:
        torch.save({"states": states, "offsets": torch.from_numpy(offsets)}, tmp)
    return TokenStates(states=states, offsets=offsets)


@torch.no_grad()
def encode_all(encoder: FineTunableEncoder, token_states: TokenStates, progress: bool = False) -> torch.Tensor:
    """Every item's vector from its cached token states (the top layers only)."""
    was_training = encoder.training
    encoder.eval()
    out = torch.empty(token_states.num_items, encoder.dimension)
    order = np.argsort(token_states.lengths(), kind="stable")
    for start in tqdm(range(0, len(order), LOWER_BATCH), desc="item table", unit="batch", disable=not progress):
        chunk = order[start : start + LOWER_BATCH]
        device = encoder.projection.weight.device  # the cached states stay on the CPU
        out[torch.as_tensor(chunk)] = encoder.upper(*(t.to(device) for t in token_states.batch(chunk))).cpu()
    encoder.train(was_training)
    return out


def save_transformer(encoder: FineTunableEncoder, tokenizer, out: Path) -> Path:
    """A transformers folder (with the projection beside it) that
    recsys_core/models/export.py exports like the pretrained one."""
    out.mkdir(parents=True, exist_ok=True)
    encoder.transformer.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    torch.save(encoder.projection.state_dict(), out / PROJECTION_FILE)
    return out


def load_encoder(source_dir: Path, trainable_layers: int) -> tuple[FineTunableEncoder, object]:
    transformer, tokenizer = load_transformer(source_dir)
    return FineTunableEncoder(transformer, trainable_layers, load_projection(source_dir)), tokenizer
