"""PASCAL VOC (2007-2012) in torchvision's on-disk layout: segmentation and detection.

Layout (``root`` holds ``VOCdevkit``; ``root`` may also be ``VOCdevkit/VOC2012`` itself)::

    VOCdevkit/VOC2012/JPEGImages/{id}.jpg
    VOCdevkit/VOC2012/SegmentationClass/{id}.png      palette PNG: 0 background, 1-20, 255 ignore
    VOCdevkit/VOC2012/Annotations/{id}.xml            objects with name and bndbox (1-based pixels)
    VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt
    VOCdevkit/VOC2012/ImageSets/Main/{split}.txt

A split's images are the union of the lists of the requested tasks. ``has["segmentation"]`` is
whether the id is in ``ImageSets/Segmentation/{split}.txt`` and ``has["detection"]`` whether it is in
``ImageSets/Main/{split}.txt``: list membership, not file existence, decides, so an image labelled
for one task in train and listed for another in val never leaks labels across splits. A missing
label is filled with the task's invalid value (segmentation -1, detection no boxes).

Images are resized so the shorter side is ``size`` and centre-cropped to ``size x size`` (bilinear
for the image, nearest for labels); boxes are scaled, shifted, clipped, and dropped when less than
2 pixels wide or high remain. Boxes are xyxy in pixel-edge coordinates: VOC's 1-based inclusive
``xmin..xmax`` becomes ``x0 = xmin - 1``, ``x1 = xmax``. ``difficult`` objects are dropped unless
``keep_difficult`` (VOC's evaluation ignores them). Samples follow :mod:`amtl.data`.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from amtl.data.nyuv2 import DatasetError

__all__ = ["VOC", "CLASSES", "DETECTION_CLASSES", "TASKS", "DatasetError", "write_voc_tree"]

DETECTION_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                     "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                     "train", "tvmonitor")
CLASSES = ("background", *DETECTION_CLASSES)
TASKS = ("segmentation", "detection")
IGNORE_U8 = 255
#: The ImageSets list that says which images carry a task's label.
LIST_DIR = {"segmentation": "Segmentation", "detection": "Main"}
MIN_BOX = 2.0


def _find_base(root: Path, year: str) -> Path:
    for base in (root / "VOCdevkit" / f"VOC{year}", root):
        if (base / "JPEGImages").is_dir():
            return base
    raise DatasetError(f"{root}: no VOC tree found; expected {root / 'VOCdevkit' / f'VOC{year}' / 'JPEGImages'} "
                       f"(pass the folder that holds VOCdevkit)")


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: image list missing; a VOC tree lists each split's ids there")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: an id is listed twice")
    return ids


def parse_annotation(path: Path, keep_difficult: bool = False) -> tuple[Tensor, Tensor]:
    """Boxes ``[N, 4]`` (xyxy, pixel edges, 0-based) and labels ``[N]`` of one VOC XML file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetError(f"{path}: cannot parse annotation XML ({e})") from e
    boxes, labels = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in DETECTION_CLASSES:
            raise DatasetError(f"{path}: unknown object class '{name}' (known: {', '.join(DETECTION_CLASSES)})")
        if not keep_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        box = obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: object '{name}' has no valid bndbox (xmin, ymin, xmax, ymax)") from e
        if xmax < xmin or ymax < ymin:
            raise DatasetError(f"{path}: object '{name}' has xmax < xmin or ymax < ymin")
        boxes.append([xmin - 1, ymin - 1, xmax, ymax])
        labels.append(DETECTION_CLASSES.index(name))
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long)


class VOC(Dataset):
    """One split (``train`` or ``val``) of a VOC tree; see the module docstring.

    ``size`` is the square side samples are resized and cropped to (``None`` keeps each image's own
    size, which then cannot be batched). Attributes: ``ids``, ``num_classes`` (21),
    ``detection_classes``.
    """

    num_classes: int = len(CLASSES)
    classes = CLASSES
    detection_classes = DETECTION_CLASSES

    def __init__(self, root: str | Path, split: str = "train", tasks: Sequence[str] = TASKS,
                 size: int | None = 320, year: str = "2012", keep_difficult: bool = False) -> None:
        tasks = tuple(tasks)
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"unknown or no task(s) {bad}; valid tasks: {', '.join(TASKS)}")
        if size is not None and size < 2:
            raise ValueError(f"size must be at least 2, got {size}")
        self.split, self.tasks, self.size = split, tasks, size
        self.base = _find_base(Path(root), year)
        listed = {t: set(_read_list(self.base / "ImageSets" / LIST_DIR[t] / f"{split}.txt")) for t in tasks}
        self.ids = sorted(set().union(*listed.values()))
        self.has = {t: [i in listed[t] for i in self.ids] for t in tasks}
        for i in self.ids:  # fail now, naming the file, rather than in the middle of an epoch
            self._require(self._image_path(i))
        if "segmentation" in tasks:
            for i, ok in zip(self.ids, self.has["segmentation"]):
                if ok:
                    self._require(self._seg_path(i))
        # Annotations are small: parse them all up front, which also surfaces bad XML early.
        self.annotations: dict[str, tuple[Tensor, Tensor]] = {}
        if "detection" in tasks:
            for i, ok in zip(self.ids, self.has["detection"]):
                if ok:
                    path = self.base / "Annotations" / f"{i}.xml"
                    self._require(path)
                    self.annotations[i] = parse_annotation(path, keep_difficult)

    def _image_path(self, image_id: str) -> Path:
        return self.base / "JPEGImages" / f"{image_id}.jpg"

    def _seg_path(self, image_id: str) -> Path:
        return self.base / "SegmentationClass" / f"{image_id}.png"

    def _require(self, path: Path) -> None:
        if not path.is_file():
            raise DatasetError(f"{path}: file missing for an id listed in {self.base / 'ImageSets'} ({self.split})")

    def __len__(self) -> int:
        return len(self.ids)

    def _open(self, path: Path, mode: str | None) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return np.array(img.convert(mode) if mode else img)
        except OSError as e:
            raise DatasetError(f"{path}: cannot read image ({e})") from e

    def _geometry(self, h: int, w: int) -> tuple[float, int, int, int, int]:
        """Scale, resized (h, w), crop (top, left) of the shorter-side resize + centre crop."""
        if self.size is None:
            return 1.0, h, w, 0, 0
        scale = self.size / min(h, w)
        rh, rw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        return scale, rh, rw, (rh - self.size) // 2, (rw - self.size) // 2

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image_id = self.ids[index]
        image = torch.from_numpy(self._open(self._image_path(image_id), "RGB")).permute(2, 0, 1).float() / 255.0
        h, w = image.shape[-2:]
        scale, rh, rw, top, left = self._geometry(h, w)
        out_h, out_w = (self.size, self.size) if self.size is not None else (h, w)

        def crop(x: Tensor) -> Tensor:
            return x[..., top:top + out_h, left:left + out_w]
        if (rh, rw) != (h, w):
            image = F.interpolate(image[None], size=(rh, rw), mode="bilinear", align_corners=False,
                                  antialias=True)[0].clamp(0, 1)
        sample: dict[str, Any] = {"image": crop(image).contiguous(), "index": index,
                                  "has": {t: self.has[t][index] for t in self.tasks}}
        if "segmentation" in self.tasks:
            if sample["has"]["segmentation"]:
                path = self._seg_path(image_id)
                seg = torch.from_numpy(self._open(path, None).astype(np.int64))
                if seg.shape != (h, w):
                    raise DatasetError(f"{path}: label is {tuple(seg.shape)} but the image is {(h, w)}")
                if (rh, rw) != (h, w):
                    seg = F.interpolate(seg[None, None].float(), size=(rh, rw), mode="nearest")[0, 0].long()
                seg = crop(seg)
                bad = (seg >= self.num_classes) & (seg != IGNORE_U8)
                if bool(bad.any()):
                    raise DatasetError(f"{path}: class ids above {self.num_classes - 1} other than {IGNORE_U8}")
                sample["segmentation"] = torch.where(seg == IGNORE_U8, -1, seg).contiguous()
            else:
                sample["segmentation"] = torch.full((out_h, out_w), -1, dtype=torch.long)
        if "detection" in self.tasks:
            boxes, labels = self.annotations.get(image_id, (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
            boxes = boxes * scale - torch.tensor([left, top, left, top], dtype=torch.float32)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h)
            keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX)
            sample["detection"] = {"boxes": boxes[keep], "labels": labels[keep].clone()}
        return sample

    def task_labels(self, tasks: Sequence[str]) -> dict[str, Tensor]:
        """List membership per task (see :mod:`amtl.data.labels`); tasks not loaded are unlabelled."""
        return {t: torch.tensor(self.has[t] if t in self.tasks else [False] * len(self), dtype=torch.bool)
                for t in tasks}

    def __repr__(self) -> str:
        return f"VOC(split={self.split!r}, n={len(self)}, size={self.size}, tasks={self.tasks})"


def _palette() -> list[int]:
    """VOC's colour map (bit-interleaved class ids), 256 RGB entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_voc_tree(root: str | Path, splits: dict[str, dict[str, Any]], year: str = "2012") -> Path:
    """Write a VOC tree for tests and fixtures; returns ``root/VOCdevkit/VOC{year}``.

    ``splits[split]`` maps ``"images"`` to ``{id: uint8 [3, H, W] or float [3, H, W] in [0, 1]}``,
    ``"segmentation"`` to ``{id: long [H, W] (-1 or 255 = ignore)}`` and ``"detection"`` to
    ``{id: {"boxes": xyxy pixel edges, "labels": indices into DETECTION_CLASSES}}``. An id's label is
    written and listed only where given, so trees with partial labels are easy to make. Images are
    stored as JPEG (quality 95), as in VOC.
    """
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    palette = _palette()
    for split, parts in splits.items():
        for image_id, img in parts.get("images", {}).items():
            img = torch.as_tensor(img)
            arr = (img.float().clamp(0, 1) * 255).round() if img.is_floating_point() else img
            Image.fromarray(arr.to(torch.uint8).permute(1, 2, 0).numpy()).save(
                base / "JPEGImages" / f"{image_id}.jpg", quality=95)
        for image_id, seg in parts.get("segmentation", {}).items():
            seg = torch.as_tensor(seg)
            seg = torch.where(seg < 0, IGNORE_U8, seg).to(torch.uint8)
            png = Image.fromarray(seg.numpy(), mode="P")
            png.putpalette(palette)
            png.save(base / "SegmentationClass" / f"{image_id}.png")
        for image_id, det in parts.get("detection", {}).items():
            _write_annotation(base / "Annotations" / f"{image_id}.xml", image_id, det,
                              tuple(parts["images"][image_id].shape[-2:]))
        for task, sub in LIST_DIR.items():
            ids = list(parts.get(task, {}))
            if ids or task in parts:
                (base / "ImageSets" / sub / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return base


def _write_annotation(path: Path, image_id: str, det: dict[str, Tensor], hw: tuple[int, int]) -> None:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(ann, "size")
    for key, value in (("width", hw[1]), ("height", hw[0]), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    difficult = det.get("difficult", torch.zeros(len(det["labels"]), dtype=torch.bool))
    for box, label, diff in zip(torch.as_tensor(det["boxes"]).tolist(), torch.as_tensor(det["labels"]).tolist(),
                                torch.as_tensor(difficult).tolist()):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = DETECTION_CLASSES[int(label)]
        ET.SubElement(obj, "difficult").text = "1" if diff else "0"
        bnd = ET.SubElement(obj, "bndbox")
        # Back to VOC's 1-based inclusive pixel indices.
        x0, y0, x1, y1 = box
        for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bnd, key).text = f"{value:g}"
    ET.ElementTree(ann).write(path)
