"""Datasets for multi-task learning.

Every dataset yields samples in one format, so tasks, trainer and balancers never special-case a
source:

``{"image": float [3, H, W] in [0, 1], "index": int, "has": {task: bool}, <task>: target, ...}``

- ``index`` is the sample's position in its split (instance-level balancers key on it).
- ``has[task]`` says whether this sample carries the task's label. A sample without a label still
  has a target of the right shape, filled with the task's *invalid* value (segmentation -1, depth 0,
  normal the zero vector), so it contributes nothing to loss or metrics.
- Targets: ``segmentation`` long [H, W] with -1 = ignore; ``depth`` float [1, H, W] metres with
  0 = invalid; ``normal`` float [3, H, W] unit vectors in the camera frame with 0 = invalid;
  ``detection`` a dict ``{"boxes": float [N, 4] xyxy pixels, "labels": long [N]}``.
- Composed datasets (:mod:`amtl.data.partial`) add ``"source"``: which source the sample comes from.
- Datasets may answer ``task_labels(tasks) -> {task: bool [N]}`` without loading images
  (:mod:`amtl.data.labels`: per-task counts, the task-balanced sampler).
"""
from amtl.data.collate import collate

__all__ = ["collate"]
