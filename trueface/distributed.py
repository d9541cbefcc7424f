"""Who this process is among the data-parallel workers, and the few collectives training needs.

Usage::

    di = DistInfo.current()                  # rank 0 of 1 without torch.distributed
    average_buffers(model, di)               # every rank now holds the same BatchNorm statistics
    mean_over_ranks(loss_sum, di)            # the same number on every rank
    broadcast_object(state, di)              # rank 0's state on every rank

Ray Train (or torchrun, or a test's torch.multiprocessing) initialises the process group; this
module only reads it, so the same code runs with one process and no process group at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "DistInfo":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


@torch.no_grad()
def average_buffers(model: nn.Module, di: DistInfo) -> None:
    """Replace every floating-point buffer (BatchNorm running mean and variance) by its mean over
    the ranks. DDP keeps the parameters identical on all ranks, but each rank updates its own
    BatchNorm statistics from its own micro-batches: without this, each rank would validate a
    different model and rank 0's checkpoint would not be the model whose scores were reported."""
    if di.world_size == 1:
        return
    buffers = [b for b in model.buffers() if b.dtype.is_floating_point]
    if not buffers:
        return
    flat = mean_over_ranks(torch.cat([b.reshape(-1).double() for b in buffers]), di)  # one collective, exact enough in float64
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def mean_over_ranks(value: torch.Tensor, di: DistInfo) -> torch.Tensor:
    """``value``'s mean over the ranks (``value`` itself on one rank). Every rank gets the same
    number, so every rank takes the same branch on it: a decision one rank made alone from its own
    numbers (a non-finite loss) would leave the others waiting in the next collective."""
    if di.world_size == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / di.world_size


def gather_objects(value: object, di: DistInfo) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if di.world_size == 1:
        return [value]
    out: list = [None] * di.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: object, di: DistInfo) -> object:
    """Rank 0's ``value`` (picklable; the others pass anything), on every rank. On NCCL the
    pickled bytes travel through the current GPU: tensors inside are best on the CPU."""
    if di.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(di: DistInfo) -> None:
    if di.world_size > 1:
        dist.barrier()
