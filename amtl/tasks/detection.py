"""Object detection: a CenterNet-style anchor-free head on the shared representation.

Zhou et al., "Objects as Points" (2019): every class has a heatmap at the representation's stride
whose peaks are object centres; at each cell the head also regresses the box size (log pixels over
the stride) and the offset from the cell to the centre. Loss: the penalty-reduced focal loss on
Gaussian heatmap targets plus L1 on size and offset around ground-truth centres (Gaussian-weighted,
as in TTFNet). Decoding: 3x3 peak picking, top-k, then class-wise NMS (``torchvision.ops.batched_nms``).

Metrics: ``map_50`` is VOC-style AP at IoU 0.5 (all-point interpolation, VOC 2010+ matching) and
``map`` is COCO-style AP (101-point interpolation, mean over IoU 0.50:0.05:0.95), both averaged over
the classes that have ground truth in the split. They are computed here rather than through
``torchmetrics.detection.MeanAveragePrecision``, whose backends (pycocotools, faster-coco-eval) are
not dependencies of this project.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchvision.ops import batched_nms, box_iou

from amtl.tasks.base import Task

#: IoU thresholds of COCO's ``map``.
COCO_IOUS = tuple(0.5 + 0.05 * i for i in range(10))
Pred = dict[str, Tensor]
Target = dict[str, Tensor]


class CenterNetHead(nn.Module):
    """Three small conv branches on the representation: class heatmap logits, log size, offset.

    Returns ``{"heatmap": [B, K, h, w] logits, "size": [B, 2, h, w] log(w/stride, h/stride),
    "offset": [B, 2, h, w] object centre minus cell, in cells, "image_size": [B, 2] (H, W)}``; the image size
    travels with the prediction so that loss and decoding know the stride.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels

        def branch(out: int) -> nn.Sequential:
            # GroupNorm, not BatchNorm: per-sample statistics, as in the dense heads.
            return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
                                 nn.GroupNorm(min(8, hidden), hidden), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, out, 1))
        self.heatmap, self.size, self.offset = branch(num_classes), branch(2), branch(2)
        # Start at a 0.1 foreground probability (CenterNet's prior) so the focal loss starts small.
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, representation: Tensor, size: tuple[int, int]) -> Pred:
        b = representation.shape[0]
        image_size = torch.tensor(size, dtype=torch.float32, device=representation.device).expand(b, 2)
        return {"heatmap": self.heatmap(representation), "size": self.size(representation),
                "offset": self.offset(representation), "image_size": image_size}


def _strides(pred: Pred) -> tuple[float, float]:
    """Pixels per cell along y and x."""
    h, w = pred["heatmap"].shape[-2:]
    if pred["image_size"].shape[0] == 0:
        return 1.0, 1.0
    img_h, img_w = pred["image_size"][0].tolist()
    return img_h / h, img_w / w


def decode(pred: Pred, max_detections: int = 100, score_threshold: float = 0.01,
           nms_iou: float = 0.6) -> list[dict[str, Tensor]]:
    """Per image ``{"boxes": [D, 4] xyxy pixels, "scores": [D], "labels": [D]}``, best first."""
    heat = pred["heatmap"].float().sigmoid()
    b, k, h, w = heat.shape
    sy, sx = _strides(pred)
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, flat = peaks.flatten(1).topk(min(max_detections, k * h * w), dim=1)
    labels, cell = flat // (h * w), flat % (h * w)
    ys, xs = (cell // w).float(), (cell % w).float()
    size = pred["size"].float().flatten(2).gather(2, cell[:, None].expand(-1, 2, -1)).clamp(max=10).exp()
    off = pred["offset"].float().flatten(2).gather(2, cell[:, None].expand(-1, 2, -1))
    cx, cy = (xs + off[:, 0]) * sx, (ys + off[:, 1]) * sy
    bw, bh = size[:, 0] * sx, size[:, 1] * sy
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
    img_h, img_w = (pred["image_size"][0].tolist() if b else (0.0, 0.0))
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, img_w)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, img_h)
    out = []
    for i in range(b):
        keep = scores[i] > score_threshold
        bx, sc, lb = boxes[i][keep], scores[i][keep], labels[i][keep]
        keep = batched_nms(bx, sc, lb, nms_iou)  # sorted by score, best first
        out.append({"boxes": bx[keep], "scores": sc[keep], "labels": lb[keep]})
    return out


def _gaussian_targets(pred: Pred, targets: list[Target]) -> tuple[Tensor, dict[str, Tensor]]:
    """Heatmap targets ``[B, K, h, w]`` and per-box regression targets and weights around centres."""
    heat_logits = pred["heatmap"]
    b, k, h, w = heat_logits.shape
    device = heat_logits.device
    sy, sx = _strides(pred)
    boxes = torch.cat([t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4) for t in targets])
    labels = torch.cat([t["labels"].to(device).reshape(-1) for t in targets]).long()
    image = torch.cat([torch.full((len(t["labels"]),), i, device=device, dtype=torch.long)
                       for i, t in enumerate(targets)]) if targets else torch.zeros(0, dtype=torch.long)
    # Centres and sizes in cells; degenerate boxes get a minimal size so log() stays finite.
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / sx, (boxes[:, 1] + boxes[:, 3]) / 2 / sy
    bw = ((boxes[:, 2] - boxes[:, 0]) / sx).clamp(min=1e-2)
    bh = ((boxes[:, 3] - boxes[:, 1]) / sy).clamp(min=1e-2)
    ix, iy = cx.floor().clamp(0, w - 1), cy.floor().clamp(0, h - 1)
    # Elliptic Gaussian around the centre cell (TTFNet's alpha = 0.54 sets its spread).
    sig_x, sig_y = (0.54 * bw / 6).clamp(min=0.3), (0.54 * bh / 6).clamp(min=0.3)
    gx = torch.arange(w, device=device, dtype=torch.float32)
    gy = torch.arange(h, device=device, dtype=torch.float32)
    gauss = torch.exp(-((gx[None, None, :] - ix[:, None, None]) ** 2) / (2 * sig_x[:, None, None] ** 2)
                      - ((gy[None, :, None] - iy[:, None, None]) ** 2) / (2 * sig_y[:, None, None] ** 2))
    heat = torch.zeros(b * k, h * w, device=device)
    # Overlapping objects of one class: the target is the maximum of their Gaussians.
    rows = (image * k + labels)[:, None].expand(-1, h * w)
    heat.scatter_reduce_(0, rows, gauss.flatten(1), "amax", include_self=True)
    # Regression targets at every cell near a centre (TTFNet's dense, Gaussian-weighted
    # regression): many more training signals per object than the centre cell alone, so size and
    # offset are learnt in far fewer steps. Weights sum to 1 per object.
    weight = gauss / gauss.flatten(1).sum(1).clamp(min=1e-12)[:, None, None]
    regression = {"image": image, "weight": weight, "size": torch.stack([bw.log(), bh.log()], dim=1),
                  "offset": torch.stack([(cx[:, None, None] - gx[None, None, :]).expand(-1, h, w),
                                         (cy[:, None, None] - gy[None, :, None]).expand(-1, h, w)], dim=1)}
    return heat.view(b, k, h, w), regression


class DetectionMetric(Metric):
    """VOC AP@0.5 (``map_50``) and COCO AP@[.5:.95] (``map``), mean over classes with ground truth.

    Each detection is matched on update (so predictions need not be kept): states are the
    detections' scores, labels and TP flags (concatenated; exact across DDP ranks, since AP needs
    the global score ranking) and the ground-truth count per class (a sum).
    """

    full_state_update = False

    def __init__(self, num_classes: int, max_detections: int = 100, score_threshold: float = 0.01) -> None:
        super().__init__()
        self.num_classes, self.max_detections, self.score_threshold = num_classes, max_detections, score_threshold
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("tp", default=[], dist_reduce_fx="cat")  # [D, 1 + len(COCO_IOUS)]
        self.add_state("gt_count", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Pred | list[dict[str, Tensor]], target: list[Target]) -> None:
        """``pred``: the head's output, or already decoded per-image dicts (with ``scores``)."""
        dets = decode(pred, self.max_detections, self.score_threshold) if isinstance(pred, dict) else pred
        if len(dets) != len(target):
            raise ValueError(f"{len(dets)} predictions for {len(target)} targets")
        for det, gt in zip(dets, target):
            gt_labels = gt["labels"].reshape(-1).long()
            self.gt_count += torch.bincount(gt_labels.cpu(), minlength=self.num_classes).to(self.gt_count.device)
            if len(det["scores"]) == 0:
                continue
            tp = _match(det["boxes"].float().cpu(), det["scores"].float().cpu(), det["labels"].long().cpu(),
                        gt["boxes"].float().reshape(-1, 4).cpu(), gt_labels.cpu())
            self.scores.append(det["scores"].float().reshape(-1))
            self.labels.append(det["labels"].long().reshape(-1))
            self.tp.append(tp.to(det["scores"].device))

    def compute(self) -> dict[str, Tensor]:
        def cat(x: list[Tensor] | Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            if isinstance(x, Tensor):
                return x
            return torch.cat(x) if x else torch.zeros(shape, dtype=dtype)
        scores = cat(self.scores, (0,), torch.float32).cpu()
        labels = cat(self.labels, (0,), torch.long).cpu()
        tp = cat(self.tp, (0, 1 + len(COCO_IOUS)), torch.bool).cpu()
        gt_count = self.gt_count.cpu()
        voc, coco = [], []
        for c in range(self.num_classes):
            n_gt = int(gt_count[c])
            if n_gt == 0:  # as in COCO: a class without ground truth has no AP
                continue
            mine = labels == c
            order = torch.argsort(scores[mine], descending=True, stable=True)
            hits = tp[mine][order].double()  # [D_c, 11]
            voc.append(_average_precision(hits[:, 0], n_gt, "voc"))
            coco.append(np.mean([_average_precision(hits[:, j], n_gt, "coco") for j in range(1, hits.shape[1])]))
        mean = (lambda v: torch.tensor(float(np.mean(v)) if v else 0.0))
        return {"map_50": mean(voc), "map": mean(coco)}


def _match(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> Tensor:
    """TP flags ``[D, 11]`` of one image's detections: column 0 VOC@0.5, then COCO's 10 IoUs.

    Detections are visited by descending score within each class. VOC: a detection takes the
    ground truth it overlaps most, and is a false positive if that one is already taken. COCO: it
    takes the most-overlapping ground truth still free at each threshold.
    """
    tp = torch.zeros(len(scores), 1 + len(COCO_IOUS), dtype=torch.bool)
    if len(gt_labels) == 0:
        return tp
    iou_all = box_iou(boxes, gt_boxes).numpy()
    thr = np.asarray(COCO_IOUS)
    for c in labels.unique().tolist():
        det_idx = torch.nonzero(labels == c).flatten()
        det_idx = det_idx[torch.argsort(scores[det_idx], descending=True, stable=True)].numpy()
        gt_idx = torch.nonzero(gt_labels == c).flatten().numpy()
        if len(gt_idx) == 0:
            continue
        iou = iou_all[np.ix_(det_idx, gt_idx)]
        taken_voc = np.zeros(len(gt_idx), dtype=bool)
        taken = np.zeros((len(thr), len(gt_idx)), dtype=bool)
        for row, d in enumerate(det_idx):
            ious = iou[row]
            best = int(ious.argmax())
            if ious[best] >= 0.5 and not taken_voc[best]:
                taken_voc[best] = True
                tp[d, 0] = True
            free = np.where(taken, -1.0, ious[None, :])  # [T, G]
            pick = free.argmax(1)
            ok = free[np.arange(len(thr)), pick] >= thr
            taken[np.arange(len(thr))[ok], pick[ok]] = True
            tp[d, 1:] = torch.from_numpy(ok)
    return tp


def _average_precision(hits: Tensor, n_gt: int, style: str) -> float:
    """AP from TP flags sorted by descending score: VOC all-point or COCO 101-point interpolation."""
    if len(hits) == 0:
        return 0.0
    tps = hits.cumsum(0)
    precision = tps / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    recall = tps / n_gt
    # Precision envelope: the best precision at any recall at least this high.
    envelope = precision.flip(0).cummax(0).values.flip(0)
    if style == "voc":
        prev = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
        return float(((recall - prev) * envelope).sum())
    points = torch.linspace(0, 1, 101, dtype=torch.float64)
    idx = torch.searchsorted(recall, points, side="left")
    return float(torch.where(idx < len(hits), envelope[idx.clamp(max=len(hits) - 1)], 0.0).mean())


class Detection(Task):
    name = "detection"
    kpi = "map_50"
    higher_is_better = {"map_50": True, "map": True}

    def __init__(self, num_classes: int, size_weight: float = 1.0, offset_weight: float = 1.0) -> None:
        if num_classes < 1:
            raise ValueError(f"detection needs at least 1 class, got {num_classes}; "
                             "the dataset has no detection labels")
        self.num_classes, self.size_weight, self.offset_weight = num_classes, size_weight, offset_weight

    def head(self, in_channels: int) -> nn.Module:
        return CenterNetHead(in_channels, self.num_classes)

    def sample_losses(self, pred: Pred, target: list[Target]) -> tuple[Tensor, Tensor]:
        """Focal heatmap loss normalised by the object count, plus L1 size/offset; every sample is valid.

        An image without objects is a labelled sample too (all heatmap cells negative); whether a
        sample carries a detection label is the trainer's ``has`` mask, not the box count.
        """
        logits = pred["heatmap"].float()
        b = logits.shape[0]
        heat, reg = _gaussian_targets(pred, target)
        # Penalty-reduced focal loss (CenterNet, alpha=2, beta=4), computed from logits for stability.
        prob = logits.sigmoid()
        pos = heat >= 1.0 - 1e-4  # the centre cell itself gets exactly 1
        pos_term = F.logsigmoid(logits) * (1 - prob) ** 2
        neg_term = F.logsigmoid(-logits) * prob ** 2 * (1 - heat) ** 4
        focal = -torch.where(pos, pos_term, neg_term).flatten(1).sum(1)
        n_obj = torch.bincount(reg["image"], minlength=b).to(logits)
        losses = focal / n_obj.clamp(min=1)
        if len(reg["image"]):
            size = pred["size"].float()[reg["image"]]  # [M, 2, h, w]: each object's image
            offset = pred["offset"].float()[reg["image"]]
            l1 = (self.size_weight * (size - reg["size"][:, :, None, None]).abs().sum(1)
                  + self.offset_weight * (offset - reg["offset"]).abs().sum(1))  # [M, h, w]
            per_object = (l1 * reg["weight"]).flatten(1).sum(1)
            losses = losses + torch.zeros(b, device=logits.device).index_add(0, reg["image"], per_object) \
                / n_obj.clamp(min=1)
        return losses, torch.ones(b, dtype=torch.bool, device=logits.device)

    def metric(self) -> Metric:
        return DetectionMetric(self.num_classes)

    def __repr__(self) -> str:
        return f"Detection(num_classes={self.num_classes})"
