"""Multi-process training under ``torchrun``: process group, rank helpers, gradient and metric reduction.

``torchrun --nproc_per_node=N -m mitoseg train --config C.yaml`` starts N processes
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`setup` joins them into a
process group (NCCL on CUDA, gloo on the CPU), each rank on GPU ``LOCAL_RANK``.
Without those variables everything here is a no-op for a single process.

Gradients are synchronised explicitly (:func:`all_reduce_gradients`, one flat
all-reduce per dtype after ``backward``) rather than through DistributedDataParallel's
forward wrapper: the methods call ``model.features``, ``model.head`` and
``model.seg_head`` directly, several times per step, which DDP's reducer cannot
follow, while the explicit average is correct for any such call pattern. BatchNorm
statistics are kept equal across ranks by SyncBatchNorm on CUDA and by broadcasting
rank 0's buffers (:func:`broadcast_buffers`) after each step, as DDP does.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment variables (defaults: one process)."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def setup(device_name: str = "auto") -> DistInfo:
    """Join the process group once (a no-op for a single process or when already joined)."""
    info = env_info()
    if not info.enabled or is_initialized():
        return info
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return info


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is untouched). A confusion matrix may live on the CPU under NCCL:
    it travels through the current CUDA device then."""
    if world_size() == 1:
        return tensor
    device = tensor.device
    work = tensor.clone()
    if dist.get_backend() == "nccl" and device.type != "cuda":
        work = work.cuda()
    dist.all_reduce(work)
    return work.to(device)


def all_gather_objects(obj) -> list:
    """``obj`` of every rank, as a list indexed by rank (pickled; for small states such as RNG states)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    return all_reduce_sum(tensor.float()) / world_size()


def _collective_in_place(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective`` (in place on one flat tensor) over ``tensors``, one flat buffer per device and
    dtype (a few large messages instead of one per tensor), and copy the results back."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


@torch.no_grad()
def all_reduce_gradients(parameters) -> None:
    """Average the gradients of ``parameters`` over ranks (missing gradients count as zeros on that rank,
    so every rank takes part in the same collectives)."""
    if world_size() == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    scale = 1.0 / world_size()

    def average(flat):
        dist.all_reduce(flat)
        flat.mul_(scale)

    _collective_in_place([p.grad for p in params], average)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) on every rank."""
    if world_size() == 1:
        return
    _collective_in_place(list(module.buffers()), lambda flat: dist.broadcast(flat, src))


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank (identical starting weights)."""
    if world_size() == 1:
        return
    _collective_in_place([p.data for p in module.parameters()], lambda flat: dist.broadcast(flat, src))
    broadcast_buffers(module, src)


def rank_indices(iteration: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """Sample indices of ``rank``'s batch at ``iteration``: ``i*B*W + r*B .. + B``. With one rank this is
    ``i*B .. (i+1)*B``, the single-process stream, so every sample stays a function of (seed, index)."""
    start = iteration * batch_size * world_size + rank * batch_size
    return range(start, start + batch_size)


class ShardedIndices(torch.utils.data.Sampler):
    """Indices of this rank's batches for iterations ``start .. stop - 1`` (batched by the DataLoader)."""

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.stop, self.batch_size = start, stop, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        for iteration in range(self.start, self.stop):
            yield from rank_indices(iteration, self.batch_size, self.rank, self.world_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.batch_size
