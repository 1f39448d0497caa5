"""Data-parallel training under torchrun (DistributedDataParallel).

`recsys train` started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in the environment, WORLD_SIZE above 1) joins a
process group: NCCL where the process sees a GPU (each rank trains on
cuda:LOCAL_RANK), gloo on CPUs (RECSYS_DIST_BACKEND overrides). Started any
other way it is one process, as before: `SINGLE`.

How `seqmodel.fit` splits the work (docs/operations.md says why):
- every rank builds the same epoch's batches from the shared seed and trains
  on its rows (rank, rank + world, ...) of each: the global batch, the steps
  per epoch and so the learning rate are one process's;
- each rank's mean loss is weighted by its share of the batch's positions, so
  the gradient DDP averages is the one process's gradient on the same batch;
- the in-batch negatives of sampled softmax are the whole global batch's
  targets (every rank knows them: it built the same batches);
- validation is sharded by shopper: each rank ranks its shoppers, the ranks
  are gathered, and every rank computes the same metrics from the same
  gathered ranks, so early stopping decides the same everywhere;
- stopping on the time budget is an all-reduce (any rank out of time stops all);
- only rank 0 writes checkpoints and the model directory.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

log = logging.getLogger(__name__)

BACKEND_ENV = "RECSYS_DIST_BACKEND"
# A rank waits this long for the others at a collective (validation on a
# large catalogue, one rank's slow epoch) before the run fails.
TIMEOUT_ENV = "RECSYS_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank trains: its GPU under NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, rows: list) -> list:
        """This rank's rows of a global batch."""
        return rows[self.rank :: self.size]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (one collective)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value):
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def wrap(self, model: nn.Module):
        """The training step's callable: (inputs, targets, in_batch) -> (loss,
        positions). Under DDP the step goes through the wrapper's forward, which
        is what makes backward average the gradients across ranks."""
        if not self.distributed:
            return model.next_item_loss
        # broadcast_buffers=False: the two-tower item table is a buffer each
        # rank rewrites for its own targets during an epoch and recomputes
        # whole (identically, from the synchronised encoder) after it, so
        # sending the whole table (items x 384 floats) from rank 0 before
        # every step buys nothing. A user tower without its correction
        # (correction=False) leaves parameters out of every loss, which DDP
        # must be told of; otherwise the extra graph walk is not paid.
        unused = getattr(model.config, "correction", True) is False
        return nn.parallel.DistributedDataParallel(
            _NextItemLoss(model), device_ids=[self.local_rank] if self.backend == "nccl" else None,
            broadcast_buffers=False, find_unused_parameters=unused)

    def describe(self) -> dict:
        return {"world_size": self.size, "backend": self.backend}


SINGLE = World()


class _NextItemLoss(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs, targets, in_batch=None):
        return self.model.next_item_loss(inputs, targets, in_batch)


def from_env() -> World:
    """The process group torchrun's environment describes (joined here), or `SINGLE`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"{BACKEND_ENV}={backend!r}: gloo or nccl")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError(f"{BACKEND_ENV}=nccl needs a GPU, and this process sees none")
        # Before the process group: NCCL binds each rank to the current device.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    world = World(rank=dist.get_rank(), size=dist.get_world_size(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                  local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), backend=backend)
    log.info("rank %d of %d (%s)", world.rank, world.size, backend)
    return world


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def evaluate(scorer, split, stage: str, world: World) -> dict:
    """protocol.evaluate with the shoppers split across ranks: the same
    metrics on every rank (from the same gathered ranks)."""
    from training import protocol

    if not world.distributed:
        return protocol.evaluate(scorer, split, stage)
    inputs = world.shard(split.inputs(stage))
    targets = split.targets(stage)[world.rank :: world.size]
    ranks = protocol.target_ranks(scorer, inputs, targets)
    return protocol.metrics_from_ranks(np.concatenate(world.gather(ranks)))


def fingerprint(model: nn.Module) -> str:
    """Of the trained parameters: equal on every rank when DDP kept them in step."""
    digest = hashlib.blake2b(digest_size=8)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().numpy().tobytes())
    return digest.hexdigest()
