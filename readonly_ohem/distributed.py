"""Data-parallel training with torch.distributed (``torchrun --nproc_per_node N -m readonly_ohem train``).

Each process is one replica: it reads its own shard of the training images, runs its own
forward passes (readonly head and OHEM selection included) and backward; before the SGD update
the accumulated param diffs are averaged over the processes (as Caffe's multi-GPU solver does:
sum, then scale by 1/solver_count), so every replica applies the same update and stays identical.

Effective batch of one SGD iteration = world_size × iter_size × TRAIN.IMS_PER_BATCH images
(the OHEM experiment: N × 2 × 1 images, up to N × 2 × 64 hard RoIs). The learning rate is not
rescaled: with N processes the averaged gradient is that of an N-times larger batch, so keep
``base_lr`` (as Caffe multi-GPU did) or scale it yourself.

Backend: NCCL for CUDA devices, gloo on CPU. Rendezvous from torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str = "cpu") -> DistContext | None:
    """Join the process group torchrun describes; None when not launched with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def device_for(device: str, ctx: DistContext | None) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if ctx is not None and device == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


class GradReducer:
    """The solver's ``reducer``: averages param diffs across the processes, in one flat buffer."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)

    @torch.no_grad()
    def reduce_grads(self, tensors: list[torch.Tensor]) -> None:
        """Average ``t.grad`` of every tensor over the processes (a missing grad counts as 0)."""
        if not tensors:
            return
        grads = []
        for t in tensors:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
            grads.append(t.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat.mul_(1.0 / self.world_size)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds in every process (so all stop together on a NaN loss)."""
        backend = dist.get_backend(self.group)
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())


@torch.no_grad()
def broadcast_params(tensors: list[torch.Tensor], src: int = 0, group=None) -> None:
    """Make every replica start from process ``src``'s weights."""
    for t in tensors:
        dist.broadcast(t.data, src=src, group=group)


def shard(items: list, ctx: DistContext | None) -> list:
    """This process's share of the training images: every world_size-th, from its rank."""
    if ctx is None:
        return list(items)
    return list(items)[ctx.rank::ctx.world_size]


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None:
        dist.barrier()
