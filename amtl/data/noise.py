"""Synthetic label noise: corrupt one task's targets on a fixed random subset of instances.

For label-noise robustness experiments and for evaluating instance-level methods (ILTP): with the
corrupt instances known (:attr:`NoisyLabels.noisy`), one can measure how well learned per-instance
weights or losses single them out. Corruptions imitate real annotation errors (a label map pasted
from the wrong image, a class-id mix-up, a depth map in the wrong unit) rather than pixel noise,
and each corrupt instance gets the *same* wrong target every epoch, as a mislabelled file would.
Pixels invalid in the original target stay invalid.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

#: Corruption kinds and the tasks they apply to.
KINDS: dict[str, tuple[str, ...]] = {
    "swap": ("segmentation", "depth", "normal"),  # the target of another (random) image
    "permute": ("segmentation",),  # class ids relabelled by a random derangement
    "scale": ("depth",),  # depth times a factor far from 1 (x0.25-0.4 or x2.5-4)
}
#: Range of the depth scale factor's distance from 1, in log space: |log f| in [log 2.5, log 4].
SCALE_RANGE = (2.5, 4.0)


class NoisyLabels(Dataset):
    """Wrap ``dataset`` and corrupt ``task``'s target on ``round(fraction * len)`` instances.

    The corrupt instances and their corruptions are drawn once from ``seed``. ``noisy[i]`` is True
    when the sample with ``"index" == i`` is corrupt (the data contract makes ``index`` the position
    in the split). Other tasks, the image and ``has`` pass through unchanged; attributes such as
    ``num_classes`` and ``set_epoch`` are forwarded, so ``DataSplits(train=NoisyLabels(...), ...)``
    works with the trainer.
    """

    def __init__(self, dataset: Dataset, task: str, fraction: float = 0.1, seed: int = 0,
                 kind: str = "swap") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown corruption kind {kind!r} (known: {', '.join(KINDS)})")
        if task not in KINDS[kind]:
            raise ValueError(f"corruption kind {kind!r} applies to {', '.join(KINDS[kind])}, not {task!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        n = len(dataset)
        if kind == "swap" and n < 2 and fraction > 0:
            raise ValueError("kind 'swap' needs at least 2 instances")
        self.dataset, self.task, self.fraction, self.seed, self.kind = dataset, task, fraction, seed, kind
        # A derived seed, not `seed` itself: torch.randperm(n) from manual_seed(0) is also the
        # trainer's epoch-0 order for seed 0, which would put every corrupt instance in the first
        # batches and confound any order-dependent score with the noise.
        g = torch.Generator().manual_seed(_derive_seed("amtl-noisy-labels", seed))
        chosen = torch.randperm(n, generator=g)[: int(round(fraction * n))]
        self.noisy = torch.zeros(n, dtype=torch.bool)
        self.noisy[chosen] = True
        # Per-instance corruption parameters, drawn for every instance (noisy or not) so that a
        # given seed corrupts an instance the same way whatever the fraction.
        offset = torch.randint(1, max(n, 2), (n,), generator=g)
        self.donor = (torch.arange(n) + offset) % max(n, 1)  # never the instance itself
        log_f = torch.empty(n).uniform_(math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1]), generator=g)
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        self.scale = torch.exp(sign * log_f)
        self._num_classes = getattr(dataset, "num_classes", None)
        self._g_perm = torch.randint(0, 2**62, (n,), generator=g)  # per-instance permutation seeds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict[str, Any]:
        sample = self.dataset[position]
        index = int(sample["index"])
        if self.noisy[index] and self.task in sample:
            sample = dict(sample)
            sample[self.task] = self.corrupt(sample[self.task], index)
        return sample

    def corrupt(self, target: Tensor, index: int) -> Tensor:
        """The corrupt version of instance ``index``'s ``target``; invalid pixels stay invalid."""
        if self.kind == "swap":
            other = self.dataset[int(self.donor[index])][self.task]
            return _mask_like(other, target, self.task)
        if self.kind == "permute":
            perm = _derangement(self._classes(), int(self._g_perm[index]))
            out = perm[target.clamp(min=0)]
            return torch.where(target < 0, target, out)
        return target * self.scale[index].to(target.dtype)  # "scale": 0 (invalid) stays 0

    def _classes(self) -> int:
        if self._num_classes is None:
            raise ValueError("kind 'permute' needs the wrapped dataset's num_classes")
        return int(self._num_classes)

    def set_epoch(self, epoch: int) -> None:
        """Forward per-epoch augmentation draws to the wrapped dataset (through Subsets)."""
        inner = self.dataset
        while isinstance(inner, Subset):
            inner = inner.dataset
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)

    def task_labels(self, tasks: Sequence[str]) -> dict[str, Tensor]:
        """Corruption keeps ``has``: the wrapped dataset's label table (through Subsets too)."""
        from amtl.data.labels import task_labels
        return task_labels(self.dataset, tasks)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on self; "dataset" itself must not recurse (e.g.
        # while unpickling in a DataLoader worker, before __init__'s attributes exist).
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return (f"NoisyLabels({self.dataset!r}, task={self.task!r}, fraction={self.fraction}, "
                f"kind={self.kind!r}, seed={self.seed}, noisy={int(self.noisy.sum())})")


def _mask_like(other: Tensor, target: Tensor, task: str) -> Tensor:
    """``other`` with the invalid pixels of ``target`` made invalid (-1 for segmentation, else 0).

    The donor's own invalid pixels stay invalid as well: there is no label to paste there.
    """
    if task == "segmentation":
        return torch.where(target < 0, torch.full_like(other, -1), other)
    invalid = (target == 0).all(dim=0, keepdim=True)  # depth [1,H,W], normal [3,H,W]: zero = invalid
    return torch.where(invalid, torch.zeros_like(other), other)


def _derive_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _derangement(k: int, seed: int) -> Tensor:
    """A random permutation of ``range(k)`` with no fixed point, so every labelled pixel changes class."""
    g = torch.Generator().manual_seed(seed)
    if k < 2:
        raise ValueError("a class permutation needs at least 2 classes")
    # A random cyclic shift of a random order has no fixed point: cheap and uniform enough.
    order = torch.randperm(k, generator=g)
    perm = torch.empty(k, dtype=torch.long)
    perm[order] = order.roll(1)
    return perm


__all__ = ["KINDS", "NoisyLabels"]
