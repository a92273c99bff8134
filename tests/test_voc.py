"""The VOC loader on small trees written by ``write_voc_tree``: labels, boxes, has-masks, errors."""
from __future__ import annotations

import pytest
import torch

from amtl.data import collate
from amtl.data.registry import build_datasets
from amtl.data.voc import VOC, DatasetError, write_voc_tree

H, W = 24, 32


def _image(seed: int) -> torch.Tensor:
    # Smooth ramps: JPEG (with chroma subsampling) keeps them close, unlike pixel noise.
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img = torch.stack([x * 6 + seed * 10, y * 8, (x + y) * 4 + 30])
    return img.clamp(0, 255).to(torch.uint8)


def _seg(seed: int) -> torch.Tensor:
    seg = torch.zeros(H, W, dtype=torch.long)
    seg[4:12, 6:20] = 1 + seed % 20
    seg[0, :] = -1  # ignore border, stored as 255
    return seg


def _det(seed: int) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([[6.0, 4.0, 20.0, 12.0], [0.0, 0.0, 32.0, 24.0]]),
            "labels": torch.tensor([seed % 20, 14])}


@pytest.fixture
def tree(tmp_path):
    """train: a, b in both lists, c only in Main, d only in Segmentation. val: e, f in both."""
    ids = {"train": ["a", "b", "c", "d"], "val": ["e", "f"]}
    splits = {}
    for split, names in ids.items():
        seeds = {n: i for i, n in enumerate(names)}
        splits[split] = {
            "images": {n: _image(seeds[n]) for n in names},
            "segmentation": {n: _seg(seeds[n]) for n in names if n != "c"},
            "detection": {n: _det(seeds[n]) for n in names if n != "d"},
        }
    write_voc_tree(tmp_path, splits)
    return tmp_path


def test_round_trip_labels_boxes_and_has(tree):
    ds = VOC(tree, "train", size=None)
    assert ds.ids == ["a", "b", "c", "d"]
    by_id = {i: ds[k] for k, i in enumerate(ds.ids)}
    a = by_id["a"]
    assert a["image"].shape == (3, H, W) and 0 <= a["image"].min() and a["image"].max() <= 1
    # JPEG is lossy, but a quality-95 round trip stays close.
    assert (a["image"] * 255 - _image(0).float()).abs().mean() < 4
    assert torch.equal(a["segmentation"], _seg(0))  # 255 came back as -1
    assert torch.equal(a["detection"]["boxes"], _det(0)["boxes"])
    assert torch.equal(a["detection"]["labels"], _det(0)["labels"])
    assert a["has"] == {"segmentation": True, "detection": True}
    c, d = by_id["c"], by_id["d"]
    assert c["has"] == {"segmentation": False, "detection": True}
    assert c["segmentation"].shape == (H, W) and bool((c["segmentation"] == -1).all())
    assert d["has"] == {"segmentation": True, "detection": False}
    assert d["detection"]["boxes"].shape == (0, 4) and d["detection"]["labels"].shape == (0,)


def test_tasks_choose_lists(tree):
    seg_only = VOC(tree, "train", tasks=("segmentation",), size=None)
    assert seg_only.ids == ["a", "b", "d"] and "detection" not in seg_only[0]
    det_only = VOC(tree, "train", tasks=("detection",), size=None)
    assert det_only.ids == ["a", "b", "c"]


def test_resize_and_crop_scale_boxes(tree):
    ds = VOC(tree, "train", size=12)  # shorter side 24 -> 12 (scale 0.5), width 32 -> 16, crop 2 left
    s = ds[0]
    assert s["image"].shape == (3, 12, 12) and s["segmentation"].shape == (12, 12)
    boxes = s["detection"]["boxes"]
    assert torch.allclose(boxes[0], torch.tensor([1.0, 2.0, 8.0, 6.0]))
    assert torch.allclose(boxes[1], torch.tensor([0.0, 0.0, 12.0, 12.0]))  # clipped to the crop
    # Nearest resize of the label keeps class ids; the object sits where the box says.
    seg = s["segmentation"]
    assert set(seg.unique().tolist()) <= {-1, 0, 1}
    assert bool((seg[2:6, 1:8] == 1).all())
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (4, 3, 12, 12) and len(batch["detection"]) == 4
    assert batch["has"]["segmentation"].tolist() == [True, True, False, True]


def test_difficult_objects_dropped_unless_kept(tmp_path):
    det = {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0], [2.0, 2.0, 8.0, 8.0]]), "labels": torch.tensor([0, 1]),
           "difficult": torch.tensor([False, True])}
    write_voc_tree(tmp_path, {"train": {"images": {"x": _image(0)}, "detection": {"x": det}}})
    assert VOC(tmp_path, "train", tasks=("detection",), size=None)[0]["detection"]["labels"].tolist() == [0]
    kept = VOC(tmp_path, "train", tasks=("detection",), size=None, keep_difficult=True)
    assert kept[0]["detection"]["labels"].tolist() == [0, 1]


def test_root_may_be_the_year_folder(tree):
    assert VOC(tree / "VOCdevkit" / "VOC2012", "val", size=None).ids == ["e", "f"]


def test_missing_image_set_names_file(tree):
    (tree / "VOCdevkit/VOC2012/ImageSets/Main/val.txt").unlink()
    with pytest.raises(DatasetError, match=r"ImageSets/Main/val\.txt"):
        VOC(tree, "val")
    VOC(tree, "val", tasks=("segmentation",))  # the other task's list is still enough for itself


def test_missing_image_names_file(tree):
    (tree / "VOCdevkit/VOC2012/JPEGImages/b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"JPEGImages/b\.jpg"):
        VOC(tree, "train")


def test_missing_label_png_names_file(tree):
    (tree / "VOCdevkit/VOC2012/SegmentationClass/a.png").unlink()
    with pytest.raises(DatasetError, match=r"SegmentationClass/a\.png"):
        VOC(tree, "train")


@pytest.mark.parametrize("text, message", [
    ("<annotation><object><name>car", "cannot parse"),
    ("<annotation><object><name>unicorn</name></object></annotation>", "unknown object class 'unicorn'"),
    ("<annotation><object><name>car</name><bndbox><xmin>1</xmin></bndbox></object></annotation>", "bndbox"),
])
def test_bad_xml_names_file(tree, text, message):
    (tree / "VOCdevkit/VOC2012/Annotations/c.xml").write_text(text)
    with pytest.raises(DatasetError, match=rf"Annotations/c\.xml.*{message}"):
        VOC(tree, "train")


def test_no_tree(tmp_path):
    with pytest.raises(DatasetError, match="no VOC tree"):
        VOC(tmp_path, "train")


def test_registry_splits_val_into_val_and_test(tree):
    data = build_datasets("voc", ("segmentation", "detection"), root=tree, image_size=16)
    assert data.num_classes == 21 and data.num_detection_classes == 20
    assert len(data.train) == 4 and len(data.val) == 1 and len(data.test) == 1
    val_ids = {data.val.dataset.ids[i] for i in data.val.indices}
    test_ids = {data.test.dataset.ids[i] for i in data.test.indices}
    assert val_ids == {"e"} and test_ids == {"f"}
