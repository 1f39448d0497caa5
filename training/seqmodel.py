"""Self-attentive sequential recommenders, trained with full softmax.

One model serves two roles:
- SASRec (Kang & McAuley, 2018), item-ID embeddings only: the strong ID
  baseline, on the recipe of its re-evaluations (`sasrec_config`), with
  item text as an optional side feature.
- The earlier text model (textmodel.py): each item is represented by a
  projection of its frozen MiniLM embedding, plus, for items seen in
  training, a learned ID embedding. Text lets the user tower transfer to
  categories it was never trained on (ids off); ids add memorised detail for
  warm items. twotower.py builds our current model, with the MiniLM itself
  fine-tuned, on the same training loop (`fit`).

The user tower is a causal transformer over the history's item vectors with
learned positions, so the shopper's vector follows their recent interests.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import distributed
from training.protocol import CategorySplit

log = logging.getLogger(__name__)


@dataclass
class SeqConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.5
    max_len: int = 50
    use_ids: bool = True
    use_text: bool = False
    temperature: float = 1.0
    negatives: int = 0  # 0: softmax over every item; N: in-batch targets plus N uniformly sampled items
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 5  # evaluations without validation NDCG@10 improving
    eval_every: int = 2
    # Learning-rate schedule, driven by the validation split: a linear warmup
    # over the first `warmup_steps` steps, then every evaluation without a
    # new best validation NDCG@10 multiplies every group's rate by
    # `plateau_factor` (1: a constant rate).
    warmup_steps: int = 0
    plateau_factor: float = 1.0
    max_minutes: float = 60.0
    seed: int = 42


class ItemTower(nn.Module):
    def __init__(self, num_items: int, config: SeqConfig, text: torch.Tensor | None):
        super().__init__()
        self.config = config
        self.ids = nn.Embedding(num_items, config.dim) if config.use_ids else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.02 if config.use_text else 1.0 / math.sqrt(config.dim))
        if config.use_text:
            if text is None:
                raise ValueError("a text model needs item text embeddings")
            self.register_buffer("text", text.float(), persistent=False)
            self.project = nn.Sequential(nn.Linear(text.shape[1], config.dim), nn.LayerNorm(config.dim))
        else:
            self.text = None
            self.project = None

    def all_items(self) -> torch.Tensor:
        parts = []
        if self.project is not None:
            parts.append(self.project(self.text))
        if self.ids is not None:
            parts.append(self.ids.weight)
        return sum(parts)


class UserTower(nn.Module):
    def __init__(self, config: SeqConfig):
        super().__init__()
        self.positions = nn.Embedding(config.max_len, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, dim_feedforward=config.dim * 4 if config.use_text else config.dim,
            dropout=config.dropout, batch_first=True, norm_first=True, activation="gelu",
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.heads = config.heads

    def forward(self, item_vectors: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """item_vectors [B, L, D], left-padded; padding [B, L] True where empty."""
        length = item_vectors.shape[1]
        # Positions count back from the latest item, so a batch padded only
        # to its own longest history means the same as one padded to max_len.
        start = self.positions.num_embeddings - length
        positions = self.positions(torch.arange(start, start + length, device=item_vectors.device))
        hidden = self.dropout(item_vectors * math.sqrt(item_vectors.shape[-1]) + positions)
        # Built from comparisons rather than triu/eye on booleans, which
        # onnxruntime has no kernels for (the user tower is exported).
        steps = torch.arange(length, device=item_vectors.device)
        future = steps.unsqueeze(0) > steps.unsqueeze(1)  # [query, key]
        # Blocked: the future, and padding keys. A padded query may still see
        # itself: a row with every key blocked turns NaN, and NaN leaks into
        # real rows through the attention product even at weight zero.
        itself = steps.unsqueeze(0) == steps.unsqueeze(1)
        blocked = future | (padding.unsqueeze(1) & ~itself)
        blocked = blocked.repeat_interleave(self.heads, dim=0)
        hidden = self.encoder(hidden, mask=blocked)
        return self.norm(hidden * ~padding.unsqueeze(-1))


class SequentialRecommender(nn.Module):
    def __init__(self, num_items: int, config: SeqConfig, text: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.items = ItemTower(num_items, config, text)
        self.user = UserTower(config)

    def encode_users(self, histories: Sequence[np.ndarray], item_matrix: torch.Tensor) -> torch.Tensor:
        batch, padding = left_pad(histories, self.config.max_len, shortest=True)
        batch, padding = batch.to(item_matrix.device), padding.to(item_matrix.device)
        vectors = item_matrix[batch.clamp(min=0)] * (~padding).unsqueeze(-1)
        return self.user(vectors, padding)[:, -1]

    # What `fit` and `scorer` need of a model; the fine-tuned two-tower model
    # (twotower.py) implements the same.
    def item_matrix(self) -> torch.Tensor:
        return self.items.all_items()

    def optimiser_groups(self) -> list[dict]:
        return [{"params": list(self.parameters())}]

    def training_matrix(self, targets: torch.Tensor) -> torch.Tensor:
        """Every item's vector for one training step."""
        return self.item_matrix()

    def next_item_loss(self, inputs: torch.Tensor, targets: torch.Tensor,
                       in_batch: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy of every position's next item (inputs and targets
        [B, L] item indices, -1 where empty), and the number of positions.
        Against every item, or with `negatives`, against the batch's targets
        (in-batch negatives; `in_batch`, when given, is the item indices of a
        larger batch this one is a shard of: distributed.py) and that many
        items drawn uniformly."""
        item_matrix = self.training_matrix(targets)
        padding = inputs < 0
        hidden = self.user(item_matrix[inputs.clamp(min=0)] * (~padding).unsqueeze(-1), padding)
        valid = targets >= 0
        wanted = targets[valid]
        if self.config.negatives:
            drawn = torch.randint(0, item_matrix.shape[0], (self.config.negatives,), device=item_matrix.device)
            negatives = wanted if in_batch is None else torch.cat([wanted, in_batch])
            candidates = torch.unique(torch.cat([negatives, drawn]))  # sorted
            logits = hidden[valid] @ item_matrix[candidates].T / self.config.temperature
            wanted = torch.searchsorted(candidates, wanted)
        else:
            logits = hidden[valid] @ item_matrix.T / self.config.temperature
        return nn.functional.cross_entropy(logits, wanted), int(valid.sum())

    def end_epoch(self) -> None:
        """Nothing to refresh: every item vector is computed from the weights as needed."""


def left_pad(histories: Sequence[np.ndarray], max_len: int, shortest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] item indices, -1 where empty, latest item last. L is max_len, or
    with `shortest` only as long as the longest history needs (much of a
    benchmark's histories are a handful of items: padding is wasted work)."""
    if shortest:
        max_len = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    batch = torch.full((len(histories), max_len), -1, dtype=torch.long)
    for row, history in enumerate(histories):
        tail = history[-max_len:]
        if len(tail):
            batch[row, -len(tail):] = torch.as_tensor(tail)
    return batch, batch < 0


def training_examples(sequences: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Every training sequence of at least two items, cut into windows of
    max_len + 1 so long histories train on all their positions."""
    examples = []
    for sequence in sequences:
        if len(sequence) < 2:
            continue
        for end in range(len(sequence), 1, -max_len):
            examples.append(sequence[max(0, end - max_len - 1) : end])
    return examples


def length_batches(examples: Sequence[np.ndarray], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of examples of similar length, in random order: each batch pads
    only to its own longest example. Ties are shuffled so batches differ per epoch."""
    lengths = np.asarray([len(e) for e in examples])
    order = np.lexsort((rng.random(len(examples)), lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class TrainResult:
    best_valid: dict
    epochs: int
    seconds: float
    losses: list[float]
    valid_history: list[tuple[int, float]]
    epoch_seconds: list[float] = field(default_factory=list)
    # Under torchrun (distributed.py): world size, backend, the positions
    # each rank trained on, and each rank's final weights' fingerprint.
    distributed: dict | None = None
    best_epoch: int = 0  # the epoch whose weights were restored (0: none evaluated)
    lr_scale: float = 1.0  # what the plateau schedule had cut the learning rates to at the end


def fit(model, split: CategorySplit, config: SeqConfig, progress: bool = True,
        checkpoint: Path | None = None, world: distributed.World = distributed.SINGLE) -> TrainResult:
    """Next-item training on every position (the model's `next_item_loss`),
    early stopping on validation NDCG@10; the best weights are restored, and
    written to `checkpoint` whenever validation improves, so a stopped run keeps them.
    With a distributed `world`, every rank calls this together and trains on
    its shard of each global batch (distributed.py says how)."""
    # Dropout and sampled negatives differ per rank, as they would across
    # the rows of one process's batch; rank 0 (and one process) keep `seed`.
    torch.manual_seed(config.seed + world.rank)
    # The batch order comes from the same seed on every rank: each rank then
    # knows the whole global batch, and trains on its rows of it.
    rng = np.random.default_rng(config.seed)
    examples = training_examples(split.training_sequences(), config.max_len)
    step = world.wrap(model)
    optimiser = torch.optim.AdamW(model.optimiser_groups(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = Schedule(optimiser, config)
    best, best_state, best_metrics, since_best, best_epoch = -1.0, None, {}, 0, 0
    losses, valid_history, epoch_seconds = [], [], []
    positions_trained = 0
    started = time.monotonic()
    for epoch in range(1, config.max_epochs + 1):
        epoch_started = time.monotonic()
        model.train()
        total, count = 0.0, 0
        batches = length_batches(examples, config.batch_size, rng)
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not progress, leave=False)
        for batch in bar:
            # An epoch can outlast the budget (large catalogues, a busy
            # machine); under DDP every rank must stop at the same step.
            if world.any((time.monotonic() - started) / 60 > config.max_minutes):
                break
            chunk = [examples[i] for i in batch]
            rows, in_batch = chunk, None
            if world.distributed:
                rows = world.shard(chunk)
                in_batch = torch.unique(torch.as_tensor(np.concatenate([c[1:] for c in chunk])))
            # A batch with fewer rows than ranks leaves a rank none: it still
            # steps (every rank's backward joins the gradient all-reduce), on
            # a row weighted zero.
            empty = not rows
            inputs, _ = left_pad([c[:-1] for c in rows or chunk[:1]], config.max_len, shortest=True)
            targets, _ = left_pad([c[1:] for c in rows or chunk[:1]], config.max_len, shortest=True)
            inputs, targets = inputs.to(world.device), targets.to(world.device)
            in_batch = None if in_batch is None else in_batch.to(world.device)
            loss, positions = step(inputs, targets, in_batch)
            weighted = loss
            if world.distributed:
                # DDP averages the ranks' gradients; weighted by its share of
                # the batch's positions, each rank's mean loss averages into
                # the mean over the whole batch: one process's loss.
                positions = 0 if empty else positions
                batch_positions = sum(min(len(c) - 1, config.max_len) for c in chunk)
                weighted = loss * (positions * world.size / batch_positions)
            optimiser.zero_grad()
            weighted.backward()
            schedule.before_step()
            optimiser.step()
            total += loss.item() * positions
            count += positions
            bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
        positions_trained += count
        total, count = world.sum([total, count])
        if count == 0:
            break  # the budget ran out before this epoch's first step
        model.end_epoch()
        losses.append(total / count)
        epoch_seconds.append(round(time.monotonic() - epoch_started, 1))
        out_of_time = world.any((time.monotonic() - started) / 60 > config.max_minutes)
        if epoch % config.eval_every == 0 or out_of_time or epoch == config.max_epochs:
            metrics = distributed.evaluate(scorer(model), split, "valid", world)
            valid_history.append((epoch, metrics["ndcg@10"]))
            log.info("epoch %d loss %.4f valid ndcg@10 %.4f recall@10 %.4f (%.0f s/epoch, %.1f min in all)",
                     epoch, losses[-1], metrics["ndcg@10"], metrics["recall@10"], epoch_seconds[-1],
                     (time.monotonic() - started) / 60)
            if metrics["ndcg@10"] > best:
                # On the CPU whatever the device: the checkpoint loads anywhere.
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best, since_best, best_metrics, best_epoch = metrics["ndcg@10"], 0, metrics, epoch
                if checkpoint is not None and world.main:
                    checkpoint.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(best_state, checkpoint.with_suffix(".tmp"))
                    checkpoint.with_suffix(".tmp").replace(checkpoint)
            else:
                since_best += 1
                schedule.plateau()
            if since_best >= config.patience:
                break
        if out_of_time:
            log.warning("stopping at the %.0f-minute budget", config.max_minutes)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    shared = None
    if world.distributed:
        shared = {**world.describe(), "positions_per_rank": world.gather(positions_trained),
                  "fingerprints": world.gather(distributed.fingerprint(model))}
    return TrainResult(best_valid=best_metrics, epochs=len(losses), seconds=time.monotonic() - started,
                       losses=losses, valid_history=valid_history, epoch_seconds=epoch_seconds, distributed=shared,
                       best_epoch=best_epoch, lr_scale=schedule.scale)


class Schedule:
    """`SeqConfig`'s learning-rate schedule over an optimiser's groups, each
    scaled from the rate it was built with: a fixed decay could not know
    when a run peaks (epoch 3 on Beauty, 4 on Office_Products), the
    validation split can."""

    def __init__(self, optimiser: torch.optim.Optimizer, config: SeqConfig):
        self.optimiser = optimiser
        self.base = [group["lr"] for group in optimiser.param_groups]
        self.warmup = config.warmup_steps
        self.factor = config.plateau_factor
        self.steps = 0
        self.scale = 1.0  # the plateau part

    def before_step(self) -> None:
        self.steps += 1
        warm = min(1.0, self.steps / self.warmup) if self.warmup else 1.0
        for group, base in zip(self.optimiser.param_groups, self.base):
            group["lr"] = base * warm * self.scale

    def plateau(self) -> None:
        self.scale *= self.factor


def scorer(model: SequentialRecommender):
    """Scores every item of the model's catalogue for a batch of histories."""

    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            item_matrix = model.item_matrix()
            users = model.encode_users(histories, item_matrix)
            return (users @ item_matrix.T).cpu().numpy()

    return score


# SASRec as the re-evaluations of it train it (Klenitskiy & Vasilev, "Turning
# Dross Into Gold Loss", RecSys'23; Petrov & Macdonald, gSASRec, RecSys'23):
# the original's binary cross-entropy against one sampled negative is what
# held it back; cross-entropy over every item (`negatives` 0) is what this
# loop trains with. Validation NDCG@10 after every epoch, stopped after
# SASREC_PATIENCE epochs without a better one, the best weights kept: the
# epoch budget is a ceiling, not the stopping rule.
SASREC_PATIENCE = 10
SASREC_MAX_EPOCHS = 400


def sasrec_config(text: bool = False, **overrides) -> SeqConfig:
    """The SASRec baseline's recipe; `text`: item text as a side feature
    (each item's frozen MiniLM vector through a learned projection, added to
    its ID embedding; the textmodel.py architecture)."""
    recipe = {"use_ids": True, "use_text": text, "negatives": 0, "eval_every": 1,
              "patience": SASREC_PATIENCE, "max_epochs": SASREC_MAX_EPOCHS}
    return SeqConfig(**{**recipe, **overrides})


def sasrec(num_items: int, config: SeqConfig, text: torch.Tensor | None = None) -> SequentialRecommender:
    """An untrained SASRec over `num_items` items (`fit` trains it); `text`
    ([items, 384] frozen MiniLM vectors, training/items.py) only with `config.use_text`."""
    if config.use_text != (text is not None):
        raise ValueError("item text vectors go with use_text, and only with it")
    return SequentialRecommender(num_items, config, text=text)


def describe(config: SeqConfig) -> dict:
    return asdict(config)
