"""NYUv2 in the MTAN/LibMTL preprocessed ``.npy`` layout.

Layout (``i`` runs 0..N-1 with no gaps, the same N in every modality)::

    root/{train,val}/image/{i}.npy    float (H, W, 3) in [0, 1]
    root/{train,val}/label/{i}.npy    float (H, W), classes 0..12, -1 = ignore
    root/{train,val}/depth/{i}.npy    float (H, W, 1) metres, 0 = invalid
    root/{train,val}/normal/{i}.npy   float (H, W, 3) unit vectors, zero vector = invalid

The official NYUv2 test set is stored as ``val`` (LibMTL calls it ``test``); ``split="test"`` is
accepted as an alias for ``val``. Any consistent H, W is accepted (MTAN's files are 288 x 384).
Samples follow the format in :mod:`amtl.data`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "NYUv2",
    "DatasetError",
    "AugmentParams",
    "scale_crop",
    "hflip",
    "write_nyuv2_tree",
    "TASKS",
    "NUM_CLASSES",
]

NUM_CLASSES = 13
TASKS = ("segmentation", "depth", "normal")
#: Directory holding each task's target; ``image`` is always required.
TASK_DIR = {"segmentation": "label", "depth": "depth", "normal": "normal"}
SPLIT_ALIASES = {"train": "train", "val": "val", "test": "val"}
DEFAULT_SCALES = (1.0, 1.2, 1.5)

# Canonical index names only: "01.npy" would collide with "1.npy" after int().
_INDEX_NAME = re.compile(r"^(0|[1-9][0-9]*)\.npy$")


class DatasetError(ValueError):
    """A dataset tree on disk is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class AugmentParams:
    """One sample's augmentation: crop a ``1/scale`` window at (top, left), then maybe flip."""

    scale: float
    top: int
    left: int
    flip: bool


def _expected_shape(modality: str, h: int, w: int) -> tuple[int, ...]:
    return {"image": (h, w, 3), "label": (h, w), "depth": (h, w, 1), "normal": (h, w, 3)}[modality]


_SHAPE_DOC = {
    "image": "(H, W, 3) float RGB in [0, 1]",
    "label": "(H, W) float class ids with -1 = ignore",
    "depth": "(H, W, 1) float metres with 0 = invalid",
    "normal": "(H, W, 3) float unit normals with the zero vector = invalid",
}


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """Load one array, turning any read failure into a DatasetError naming the file."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(
            f"{path}: cannot read as a .npy array ({type(e).__name__}: {e}). "
            "Hint: the file is corrupt or truncated; re-create it with numpy.save."
        ) from e
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
        raise DatasetError(f"{path}: expected a numeric array, got dtype {getattr(arr, 'dtype', None)}. "
                           "Hint: re-create it with numpy.save from a float array.")
    return arr


def _check_array(path: Path, modality: str, arr: np.ndarray, hw: tuple[int, int] | None) -> None:
    """Check ndim/shape (against ``hw`` when known), image dtype and label values."""
    doc = _SHAPE_DOC[modality]
    want_ndim = 2 if modality == "label" else 3
    if arr.ndim != want_ndim:
        raise DatasetError(f"{path}: {modality} must have {want_ndim} dims {doc}, got shape {arr.shape}. "
                           f"Hint: save each {modality} as {doc}.")
    if hw is None:
        hw = (arr.shape[0], arr.shape[1])
    want = _expected_shape(modality, *hw)
    if arr.shape != want:
        raise DatasetError(f"{path}: {modality} has shape {arr.shape}, expected {want} {doc}. "
                           "Hint: all modalities of a split must share one H, W.")
    if modality == "image" and arr.dtype.kind != "f":
        # A uint8 image would silently feed 0..255 into a model that expects [0, 1].
        raise DatasetError(f"{path}: image dtype is {arr.dtype}, expected float in [0, 1]. "
                           "Hint: convert with image.astype(np.float32) / 255.")
    if modality == "label":
        _check_label_values(path, arr)


def _check_label_values(where: Path | str, lab: np.ndarray) -> None:
    lab = np.asarray(lab)
    # Written as "not inside" so NaN counts as bad too.
    bad = ~((lab >= -1) & (lab <= NUM_CLASSES - 1) & (lab == np.round(lab)))
    if bad.any():
        vals = np.unique(lab[bad])[:5].tolist()
        raise DatasetError(f"{where}: label values must be integers in -1..{NUM_CLASSES - 1} "
                           f"(-1 = ignore), found {vals}. Hint: map unlabelled pixels to -1 and "
                           "classes to the 13-class NYUv2 set.")


def _list_indices(directory: Path) -> int:
    """Return N after checking that ``directory`` holds exactly 0.npy..{N-1}.npy."""
    indices = set()
    for p in directory.iterdir():
        if p.suffix != ".npy":
            continue  # stray non-array files (README, .DS_Store) are harmless
        if not _INDEX_NAME.match(p.name):
            raise DatasetError(f"{p}: file name is not a sample index. "
                               "Hint: name files 0.npy, 1.npy, ... with no leading zeros.")
        indices.add(int(p.stem))
    n = len(indices)
    if n and max(indices) != n - 1:
        missing = min(set(range(max(indices) + 1)) - indices)
        raise DatasetError(f"{directory}: indices are not contiguous from 0: {missing}.npy is missing "
                           f"({n} files, largest index {max(indices)}). "
                           "Hint: renumber the files 0..N-1 consistently in every modality.")
    return n


class NYUv2(Dataset):
    """NYUv2 segmentation (13 classes), depth and surface normals from the MTAN ``.npy`` tree.

    ``split`` is ``"train"`` or ``"val"`` (``"test"`` is an alias for ``"val"``). Only the
    modalities for ``tasks`` (plus ``image``) need to exist. With ``augment=True`` (train only)
    each sample gets a random scale-crop (``scales``) and a horizontal flip with probability 1/2,
    drawn from a private generator seeded by ``(seed, epoch, index)``: call :meth:`set_epoch`
    each epoch for fresh draws. With DataLoader workers, ``set_epoch`` only reaches workers that
    are (re)started after it, i.e. not ``persistent_workers=True``.

    The tree is checked at construction (directories, contiguous indices, equal counts, and the
    first file of each modality); every other file is checked when it is loaded. Problems raise
    :class:`DatasetError` naming the file or directory.
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] = TASKS,
        augment: bool = False,
        seed: int = 0,
        *,
        scales: Sequence[float] = DEFAULT_SCALES,
    ) -> None:
        if split not in SPLIT_ALIASES:
            raise ValueError(f"split must be 'train' or 'val' ('test' = 'val'), got {split!r}")
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in TASK_DIR]
        if unknown or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct names from {TASKS}, got {tasks}")
        self.split = SPLIT_ALIASES[split]
        if augment and self.split != "train":
            raise ValueError("augment=True is for the train split only; evaluate without augmentation")
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or any(not s >= 1.0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty sequence of values >= 1, got {scales}")
        self.root = Path(root)
        self.tasks = tasks
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.modalities = ("image",) + tuple(TASK_DIR[t] for t in tasks)
        self.split_dir = self.root / self.split
        self._validate_tree()

    # -- construction-time validation ------------------------------------------------------------
    def _validate_tree(self) -> None:
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root directory does not exist. "
                               "Hint: pass the directory that contains train/ and val/.")
        if not self.split_dir.is_dir():
            raise DatasetError(f"{self.split_dir}: split directory does not exist. "
                               f"Hint: expected {self.root}/{{train,val}}/{{image,label,depth,normal}}/.")
        counts: dict[str, int] = {}
        for m in self.modalities:
            d = self.split_dir / m
            if not d.is_dir():
                raise DatasetError(f"{d}: {m} directory does not exist (needed for tasks {self.tasks}). "
                                   f"Hint: create it with {m}/0.npy.. or drop the task that needs it.")
            counts[m] = _list_indices(d)
        n = counts["image"]
        if n == 0:
            raise DatasetError(f"{self.split_dir / 'image'}: no .npy samples found. "
                               "Hint: write the split with write_nyuv2_tree or point root elsewhere.")
        for m, c in counts.items():
            if c != n:
                raise DatasetError(f"{self.split_dir / m}: has {c} files but "
                                   f"{self.split_dir / 'image'} has {n}. "
                                   "Hint: every modality needs the same indices 0..N-1.")
        self._len = n
        # Check the first file of each modality only, memory-mapped, to keep construction fast.
        hw: tuple[int, int] | None = None
        for m in self.modalities:
            path = self._path(m, 0)
            arr = _load_npy(path, mmap=True)
            if hw is not None and arr.ndim >= 2 and tuple(arr.shape[:2]) != hw:
                raise DatasetError(f"{path}: spatial size {tuple(arr.shape[:2])} does not match "
                                   f"{self._path('image', 0)} {hw}. "
                                   "Hint: all modalities of a sample must share one H, W.")
            _check_array(path, m, arr, hw)
            hw = (arr.shape[0], arr.shape[1])
        self.hw: tuple[int, int] = hw  # type: ignore[assignment]

    def _path(self, modality: str, index: int) -> Path:
        return self.split_dir / modality / f"{index}.npy"

    # -- Dataset API -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws ``__getitem__`` uses."""
        self.epoch = int(epoch)

    def augmentation_params(self, index: int) -> AugmentParams:
        """The deterministic augmentation for ``index`` at the current epoch and seed."""
        # SeedSequence mixes (seed, epoch, index) so neighbouring tuples give unrelated streams.
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        h, w = self.hw
        scale = self.scales[int(torch.randint(len(self.scales), (1,), generator=g))]
        ch, cw = _crop_size(h, w, scale)
        top = int(torch.randint(h - ch + 1, (1,), generator=g))
        left = int(torch.randint(w - cw + 1, (1,), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5)
        return AugmentParams(scale, top, left, flip)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for NYUv2 {self.split} with {self._len} samples")
        arrays = {}
        for m in self.modalities:
            path = self._path(m, index)
            arr = _load_npy(path)
            _check_array(path, m, arr, self.hw)
            arrays[m] = arr
        sample: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(arrays["image"].transpose(2, 0, 1))).float(),
            "index": index,
            "has": {t: True for t in self.tasks},
        }
        if "segmentation" in self.tasks:
            sample["segmentation"] = torch.from_numpy(np.asarray(arrays["label"])).long()
        if "depth" in self.tasks:
            sample["depth"] = torch.from_numpy(np.ascontiguousarray(arrays["depth"].transpose(2, 0, 1))).float()
        if "normal" in self.tasks:
            sample["normal"] = torch.from_numpy(np.ascontiguousarray(arrays["normal"].transpose(2, 0, 1))).float()
        if self.augment:
            p = self.augmentation_params(index)
            sample = scale_crop(sample, p.scale, p.top, p.left)
            if p.flip:
                sample = hflip(sample)
        return sample

    def task_labels(self, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every sample carries the label of each task this dataset was built with (see :mod:`amtl.data.labels`)."""
        return {t: torch.full((self._len,), t in self.tasks, dtype=torch.bool) for t in tasks}

    def __repr__(self) -> str:
        return (f"NYUv2(root={str(self.root)!r}, split={self.split!r}, tasks={self.tasks}, "
                f"augment={self.augment}, n={self._len}, hw={self.hw})")


# -- augmentation ------------------------------------------------------------------------------------
def _crop_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, int(h / scale)), max(1, int(w / scale))


def scale_crop(sample: dict[str, Any], scale: float, top: int, left: int) -> dict[str, Any]:
    """Crop a ``1/scale`` window at (top, left) and resize it back to H, W (MTAN's RandomScaleCrop).

    Image is resized bilinearly; segmentation, depth and normal with nearest neighbour so no
    invalid value gets blended into a valid one. Depth is divided by ``scale`` (zooming in is like
    moving closer), and valid normals are re-normalised. Returns a new dict.
    """
    h, w = sample["image"].shape[-2:]
    ch, cw = _crop_size(h, w, scale)
    if not (0 <= top <= h - ch and 0 <= left <= w - cw):
        raise ValueError(f"crop ({top}, {left}) of size {(ch, cw)} does not fit in {(h, w)}")
    out = dict(sample)
    win = (slice(top, top + ch), slice(left, left + cw))
    identity = (ch, cw) == (h, w)

    def resize(x: torch.Tensor, mode: str) -> torch.Tensor:
        x = x[..., win[0], win[1]]
        if identity:
            return x.clone()
        kw = {"align_corners": True} if mode == "bilinear" else {}
        return F.interpolate(x[None], size=(h, w), mode=mode, **kw)[0]

    out["image"] = resize(sample["image"], "bilinear")
    if "segmentation" in sample:
        seg = sample["segmentation"]
        out["segmentation"] = resize(seg[None].float(), "nearest")[0].to(seg.dtype)
    if "depth" in sample:
        out["depth"] = resize(sample["depth"], "nearest") / scale
    if "normal" in sample:
        n = resize(sample["normal"], "nearest")
        norm = n.norm(dim=0, keepdim=True)
        out["normal"] = torch.where(norm > 0, n / norm.clamp_min(1e-12), torch.zeros_like(n))
    return out


def hflip(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror every dense field left-right; the normal's x component changes sign. Returns a new dict."""
    out = dict(sample)
    for key in ("image", "segmentation", "depth", "normal"):
        if key in sample:
            out[key] = sample[key].flip(-1)
    if "normal" in out:
        # + 0.0 turns the -0.0 of negated invalid normals back into 0.0.
        out["normal"][0] = -out["normal"][0] + 0.0
    return out


# -- writer ------------------------------------------------------------------------------------------
def write_nyuv2_tree(
    root: str | Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    depths: np.ndarray | None,
    normals: np.ndarray | None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write arrays (N,H,W,3)/(N,H,W)/(N,H,W,1)/(N,H,W,3) as ``root/split/<modality>/{i}.npy``.

    Arrays are stored as float32. A modality passed as ``None`` is skipped. Refuses to write into
    a modality directory that already holds ``.npy`` files unless ``overwrite=True`` (which deletes
    them first, so no stale indices survive). Returns the split directory.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
    n, h, w = images.shape[:3]
    data = {"image": images, "label": labels, "depth": depths, "normal": normals}
    for m, arr in data.items():
        if arr is None:
            continue
        arr = np.asarray(arr)
        want = (n, *_expected_shape(m, h, w))
        if arr.shape != want:
            raise ValueError(f"{m} array must have shape {want} to match images, got {arr.shape}")
        if m == "label":
            _check_label_values("labels array", arr)
        data[m] = arr
    split_dir = Path(root) / split
    for m, arr in data.items():
        if arr is None:
            continue
        d = split_dir / m
        d.mkdir(parents=True, exist_ok=True)
        existing = list(d.glob("*.npy"))
        if existing and not overwrite:
            raise FileExistsError(f"{d} already holds {len(existing)} .npy files; pass overwrite=True")
        for p in existing:
            p.unlink()
        for i in range(n):
            np.save(d / f"{i}.npy", arr[i].astype(np.float32))
    return split_dir
