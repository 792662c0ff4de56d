"""Collectives owned by the losses and the evaluation (models never call them).

``all_gather_with_grad`` concatenates a tensor's rows from every rank; the result keeps the
autograd graph: in backward, the gradient of the gathered tensor is summed over ranks
(all-reduce) and each rank keeps the slice of its own rows. With every rank computing a loss
from the gathered features and DDP averaging parameter gradients, this gives exactly the
gradient of the mean of the per-rank losses (see ``tests/test_ddp.py``).

Ranks may hold different numbers of rows (e.g. a variable number of captions per video):
rows are padded to the largest count for the collective and the padding is dropped.
Everything is a no-op (returns the input) when ``torch.distributed`` is not initialised
or the world has one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Row counts of every rank (one small all-gather)."""
    _, world = world_info()
    if world == 1:
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def _gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """All-gather rows ``x [n_r, ...]`` of every rank into ``[sum n_r, ...]`` (no autograd)."""
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        sizes = gather_sizes(x.shape[0], x.device)
        rank, _ = world_info()
        ctx.start = sum(sizes[:rank])
        ctx.size = x.shape[0]
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.size]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x [n_r, ...]`` over ranks (rank order) into ``[sum_r n_r, ...]``, differentiably.

    The backward pass all-reduces (sums) the incoming gradient and returns this rank's slice,
    so gradients computed on other ranks flow back to the rows that produced them.
    """
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x [n_r, ...]`` over ranks without autograd (evaluation, indices)."""
    if not is_distributed():
        return x
    return _gather_padded(x.detach(), gather_sizes(x.shape[0], x.device))


def gather_caption_index(caption_index: Tensor, num_videos: int) -> tuple[Tensor, int]:
    """Gather ``caption_index [A_r]`` (local video of each caption) into global video indices.

    Returns ``(global_caption_index [sum A_r], video_offset)`` where ``video_offset`` is the
    global index of this rank's first video (videos are concatenated in rank order).
    """
    if not is_distributed():
        return caption_index, 0
    rank, _ = world_info()
    video_sizes = gather_sizes(num_videos, caption_index.device)
    offset = sum(video_sizes[:rank])
    return all_gather_no_grad(caption_index + offset), offset


def all_gather_objects(obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` for picklable objects (e.g. lists of keys)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
