"""Data parallelism without the DDP wrapper: the trainer decides exactly what is all-reduced.

Gradient balancers need control over communication (per-task gradients are reduced *before*
aggregation, and then the shared update must not be averaged a second time), so instead of
``DistributedDataParallel`` the trainer calls :func:`all_reduce_mean_` once per step over one
flattened buffer of the gradients that still need it. Works with any initialised process group
(gloo on CPU, NCCL on GPU); every function is a no-op in a single process.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return world()[1] > 1


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of every *global* batch of one shuffled epoch.

    The permutation depends only on ``(seed, epoch)``, so N workers with ``global_batch / N``
    samples each see exactly the global batches a single process would: multi-worker training
    follows the single-worker run instead of merely resembling it.

    With ``weights`` (e.g. task-balanced ones, :mod:`amtl.data.labels`) an epoch is ``n`` draws with
    replacement in proportion to them instead of a permutation, from the same ``(seed, epoch)``
    generator, so every rank still slices the same global batches.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, shuffle: bool = True, drop_last: bool = True,
                 weights: Tensor | None = None) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world_size} workers")
        if weights is not None and len(weights) != n:
            raise ValueError(f"{len(weights)} sampling weights for {n} samples")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.local = global_batch // world_size
        self.seed, self.epoch, self.shuffle, self.drop_last = seed, epoch, shuffle, drop_last
        self.weights = weights

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist()
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for start in range(0, self.n, self.global_batch):
            batch = order[start:start + self.global_batch]
            if len(batch) < self.global_batch and self.drop_last:
                return
            local = batch[self.rank * self.local:(self.rank + 1) * self.local]
            if local:
                yield local

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full if self.drop_last or rest <= self.rank * self.local else full + 1


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: disjoint shards covering the split exactly once.

    Unlike ``DistributedSampler`` it never pads with repeated samples, so split-level metrics summed
    across ranks count each sample once.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """In-place sum across ranks (no-op in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(grads: Sequence[Tensor]) -> None:
    """Average tensors across ranks in place with a single collective over one flat buffer."""
    rank, size = world()
    if size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class Collectives:
    """Cross-rank operations a balancer may apply to its step's data; identities with one rank.

    Convention (the trainer's, see ``Trainer.compute_losses``): every rank's task loss has the
    global batch's *value*, and a gradient ``size`` times its own shard's share of the global
    gradient. Hence a gradient w.r.t. something all ranks share (parameters) is made global by
    :meth:`mean_`, while a gradient w.r.t. per-sample tensors (the representation) is this rank's
    block of the global one, divided by ``size``.
    """

    def __init__(self, size: int = 1) -> None:
        self.size = size

    @classmethod
    def current(cls) -> "Collectives":
        """The initialised process group's (size 1 outside one)."""
        return cls(world()[1])

    def sum_(self, tensor: Tensor) -> Tensor:
        """In-place sum over ranks; returns ``tensor``."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean_(self, tensor: Tensor) -> Tensor:
        """In-place mean over ranks; returns ``tensor``."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.size
        return tensor

    def cat(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order (lengths may differ)."""
        if self.size == 1:
            return tensor
        length = torch.tensor([tensor.shape[0]], device=tensor.device)
        lengths = [torch.zeros_like(length) for _ in range(self.size)]
        dist.all_gather(lengths, length)
        lengths = [int(n) for n in torch.cat(lengths).tolist()]
        # all_gather needs equal shapes: pad to the longest, then trim each rank's rows.
        longest = max(lengths)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, lengths)])


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Copy ``src``'s tensors to every rank (so all workers start from identical parameters)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)
