"""Tests for the NYUv2 ``.npy`` loader: round trip, batching, augmentation and tree validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from amtl.data import collate
from amtl.data.nyuv2 import NYUv2, DatasetError, hflip, scale_crop, write_nyuv2_tree

N, H, W = 6, 24, 32


def make_arrays(n: int = N, h: int = H, w: int = W, seed: int = 0):
    """Arrays with known values; invalid pixels coincide across label/depth/normal.

    Valid depth encodes the pixel position (1 + r*W + c) so tests can trace where each output
    pixel came from after cropping and flipping.
    """
    rng = np.random.default_rng(seed)
    images = rng.random((n, h, w, 3), dtype=np.float32)
    labels = rng.integers(0, 13, (n, h, w)).astype(np.float32)
    rc = np.arange(h * w, dtype=np.float32).reshape(h, w) + 1
    depths = np.repeat(rc[None, :, :, None], n, axis=0).copy()
    normals = rng.normal(size=(n, h, w, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    invalid = rng.random((n, h, w)) < 0.2
    invalid[:, 0, 0] = True  # at least one invalid pixel per image
    labels[invalid] = -1
    depths[invalid] = 0
    normals[invalid] = 0
    return images, labels, depths, normals


@pytest.fixture
def tree(tmp_path: Path):
    arrays = make_arrays()
    write_nyuv2_tree(tmp_path, "train", *arrays)
    write_nyuv2_tree(tmp_path, "val", *make_arrays(n=3, seed=1))
    return tmp_path, arrays


def test_round_trip_exact(tree):
    root, (images, labels, depths, normals) = tree
    ds = NYUv2(root, "train")
    assert len(ds) == N and ds.num_classes == 13
    for i in range(N):
        s = ds[i]
        assert s["index"] == i and s["has"] == {"segmentation": True, "depth": True, "normal": True}
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, H, W)
        assert torch.equal(s["image"], torch.from_numpy(images[i]).permute(2, 0, 1))
        assert s["segmentation"].dtype == torch.long and s["segmentation"].shape == (H, W)
        assert torch.equal(s["segmentation"], torch.from_numpy(labels[i]).long())
        assert s["depth"].shape == (1, H, W)
        assert torch.equal(s["depth"], torch.from_numpy(depths[i]).permute(2, 0, 1))
        assert s["normal"].shape == (3, H, W)
        assert torch.equal(s["normal"], torch.from_numpy(normals[i]).permute(2, 0, 1))
        invalid = torch.from_numpy(labels[i] == -1)
        assert (s["segmentation"][invalid] == -1).all()
        assert (s["depth"][0][invalid] == 0).all()
        assert (s["normal"][:, invalid] == 0).all()


def test_val_split_test_alias_and_task_subset(tree):
    root, _ = tree
    assert len(NYUv2(root, "val")) == 3 and len(NYUv2(root, "test")) == 3
    with pytest.raises(ValueError, match="split"):
        NYUv2(root, "validation")
    with pytest.raises(ValueError, match="tasks"):
        NYUv2(root, tasks=("segmentation", "edges"))
    with pytest.raises(ValueError, match="train split only"):
        NYUv2(root, "val", augment=True)
    # Only the modalities of the requested tasks are needed.
    for d in ("label", "normal"):
        for p in (root / "train" / d).iterdir():
            p.unlink()
        (root / "train" / d).rmdir()
    s = NYUv2(root, tasks=("depth",))[0]
    assert set(s) == {"image", "index", "has", "depth"} and s["has"] == {"depth": True}


def test_dataloader_collate(tree):
    root, _ = tree
    ds = NYUv2(root, "train", augment=True)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, H, W)
    assert batch["segmentation"].shape == (4, H, W) and batch["segmentation"].dtype == torch.long
    assert batch["depth"].shape == (4, 1, H, W) and batch["normal"].shape == (4, 3, H, W)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["has"]["depth"].dtype == torch.bool and batch["has"]["depth"].all()


def trace_check(sample, src, index, scale, flip, top=0, left=0):
    """Every valid output pixel must carry the label/normal/depth of the source pixel its depth names."""
    images, labels, depths, normals = src
    d = sample["depth"][0] * scale
    valid = d > 0
    # Invalid pixels stay invalid in every modality, together.
    assert torch.equal(valid, sample["segmentation"] != -1)
    assert torch.equal(valid, sample["normal"].norm(dim=0) > 0)
    ids = torch.round(d[valid]).long() - 1
    assert torch.allclose(d[valid], ids.float() + 1, atol=1e-3)
    r, c = ids // W, ids % W
    ch, cw = int(H / scale), int(W / scale)
    assert ((r >= top) & (r < top + ch) & (c >= left) & (c < left + cw)).all()
    assert torch.equal(sample["segmentation"][valid], torch.from_numpy(labels[index])[r, c].long())
    n_src = torch.from_numpy(normals[index])[r, c].T.clone()  # [3, K]
    if flip:
        n_src[0] = -n_src[0]
    assert torch.allclose(sample["normal"][:, valid], n_src, atol=1e-6)
    # Column order: increasing left to right, or decreasing if flipped.
    cols = torch.round(sample["depth"][0] * scale).long() - 1
    row_cols = torch.where(valid, cols % W, -1)
    for y in range(H):
        cs = row_cols[y][row_cols[y] >= 0]
        diffs = cs.diff()
        assert (diffs <= 0).all() if flip else (diffs >= 0).all()
    assert torch.allclose(sample["normal"][:, valid].norm(dim=0), torch.ones(int(valid.sum())), atol=1e-5)


def test_hflip_mirrors_consistently(tree):
    root, src = tree
    s = NYUv2(root)[2]
    f = hflip(s)
    assert torch.equal(f["image"], s["image"].flip(-1))
    assert torch.equal(f["segmentation"], s["segmentation"].flip(-1))
    assert torch.equal(f["depth"], s["depth"].flip(-1))
    assert torch.equal(f["normal"][0], -s["normal"][0].flip(-1))
    assert torch.equal(f["normal"][1:], s["normal"][1:].flip(-1))
    assert not (torch.signbit(f["normal"][0]) & (f["normal"][0] == 0)).any()  # no -0.0
    assert torch.equal(s["normal"], NYUv2(root)[2]["normal"])  # input untouched
    trace_check(f, src, 2, 1.0, True)


@pytest.mark.parametrize("scale,top,left", [(1.2, 3, 5), (1.5, 8, 0), (1.5, 0, 10), (2.0, 12, 16)])
@pytest.mark.parametrize("flip", [False, True])
def test_scale_crop_divides_depth_keeps_invalid(tree, scale, top, left, flip):
    root, src = tree
    s = NYUv2(root)[1]
    out = scale_crop(s, scale, top, left)
    if flip:
        out = hflip(out)
    for k in ("image", "segmentation", "depth", "normal"):
        assert out[k].shape == s[k].shape and out[k].dtype == s[k].dtype
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    trace_check(out, src, 1, scale, flip, top, left)
    with pytest.raises(ValueError, match="does not fit"):
        scale_crop(s, 1.5, H, 0)


def test_augmentation_deterministic_and_traceable(tree):
    root, src = tree
    a = NYUv2(root, augment=True, seed=7)
    b = NYUv2(root, augment=True, seed=7)
    flips, scales, changed = set(), set(), False
    state = torch.get_rng_state()
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(N):
            p = a.augmentation_params(i)
            sa, sb = a[i], b[i]
            for k in ("image", "segmentation", "depth", "normal"):
                assert torch.equal(sa[k], sb[k])
            trace_check(sa, src, i, p.scale, p.flip, p.top, p.left)
            flips.add(p.flip)
            scales.add(p.scale)
            c = NYUv2(root, augment=True, seed=8)
            c.set_epoch(epoch)
            changed |= c.augmentation_params(i) != p
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert flips == {False, True} and scales == {1.0, 1.2, 1.5} and changed
    # A new epoch gives new draws; returning to an epoch gives the same ones.
    a.set_epoch(0)
    p0 = [a.augmentation_params(i) for i in range(N)]
    a.set_epoch(1)
    assert [a.augmentation_params(i) for i in range(N)] != p0
    a.set_epoch(0)
    assert [a.augmentation_params(i) for i in range(N)] == p0
    # Scale 1 without flip is the identity.
    ident = NYUv2(root, augment=True, scales=(1.0,))
    for i in range(N):
        if not ident.augmentation_params(i).flip:
            assert torch.equal(ident[i]["image"], NYUv2(root)[i]["image"])


# -- malformed trees ----------------------------------------------------------------------------------
def _save(path: Path, arr) -> None:
    np.save(path, np.asarray(arr, dtype=np.float32))


def _rename_last(root: Path, new: int) -> None:
    for m in ("image", "label", "depth", "normal"):
        (root / "train" / m / f"{N - 1}.npy").rename(root / "train" / m / f"{new}.npy")


def _empty_split(root: Path) -> None:
    for m in ("image", "label", "depth", "normal"):
        for p in (root / "train" / m).iterdir():
            p.unlink()


CASES = {
    # name: (mutate(root), root to pass (relative), substring of the path the message must name, what)
    "missing_root": (lambda r: None, "nope", "nope", "does not exist"),
    "missing_split": (lambda r: __import__("shutil").rmtree(r / "train"), ".", "train", "split directory"),
    "missing_modality": (lambda r: __import__("shutil").rmtree(r / "train" / "depth"), ".",
                         "train/depth", "does not exist"),
    "non_contiguous": (lambda r: _rename_last(r, N + 1), ".", "train/image", f"{N - 1}.npy is missing"),
    "hole_in_one_modality": (lambda r: (r / "train" / "label" / "2.npy").unlink(), ".", "train/label",
                             "2.npy is missing"),
    "count_mismatch": (lambda r: (r / "train" / "normal" / f"{N - 1}.npy").unlink(), ".", "train/normal",
                       f"has {N - 1} files"),
    "bad_name": (lambda r: _save(r / "train" / "image" / "01.npy", np.zeros((H, W, 3))), ".",
                 "train/image/01.npy", "not a sample index"),
    "empty_split": (_empty_split, ".", "train/image", "no .npy samples"),
    "corrupt": (lambda r: (r / "train" / "image" / "0.npy").write_bytes(b"not a numpy file"), ".",
                "train/image/0.npy", "cannot read"),
    "truncated": (lambda r: (r / "train" / "depth" / "0.npy").write_bytes(
        (r / "train" / "depth" / "0.npy").read_bytes()[:200]), ".", "train/depth/0.npy", "cannot read"),
    "depth_ndim": (lambda r: _save(r / "train" / "depth" / "0.npy", np.ones((H, W))), ".",
                   "train/depth/0.npy", "3 dims"),
    "label_ndim": (lambda r: _save(r / "train" / "label" / "0.npy", np.zeros((H, W, 1))), ".",
                   "train/label/0.npy", "2 dims"),
    "normal_channels": (lambda r: _save(r / "train" / "normal" / "0.npy", np.zeros((H, W, 2))), ".",
                        "train/normal/0.npy", "expected (24, 32, 3)"),
    "image_uint8": (lambda r: np.save(r / "train" / "image" / "0.npy", np.zeros((H, W, 3), np.uint8)), ".",
                    "train/image/0.npy", "dtype"),
    "modality_hw_mismatch": (lambda r: _save(r / "train" / "label" / "0.npy", np.zeros((H + 2, W))), ".",
                             "train/label/0.npy", "does not match"),
    "label_out_of_range": (lambda r: _save(r / "train" / "label" / "0.npy", np.full((H, W), 13.0)), ".",
                           "train/label/0.npy", "-1..12"),
    "label_below_ignore": (lambda r: _save(r / "train" / "label" / "0.npy", np.full((H, W), -2.0)), ".",
                           "train/label/0.npy", "-1..12"),
    "label_fractional": (lambda r: _save(r / "train" / "label" / "0.npy", np.full((H, W), 2.5)), ".",
                         "train/label/0.npy", "integers"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_tree_raises(tree, case):
    root, _ = tree
    mutate, rel, names, what = CASES[case]
    mutate(root)
    with pytest.raises(DatasetError) as info:
        NYUv2(root / rel, "train")
    msg = str(info.value)
    assert str(root / names) in msg, msg
    assert what in msg, msg
    assert "Hint" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("modality,arr,what", [
    ("image", np.zeros((H, W + 1, 3)), "expected (24, 32, 3)"),
    ("label", np.full((H, W), 99.0), "-1..12"),
    ("depth", np.zeros((H, W, 1, 1)), "3 dims"),
    ("normal", None, "cannot read"),
])
def test_per_file_errors_on_load(tree, modality, arr, what):
    root, _ = tree
    path = root / "train" / modality / "3.npy"
    if arr is None:
        path.write_bytes(b"\x93NUMPY garbage")
    else:
        _save(path, arr)
    ds = NYUv2(root)  # construction only checks file 0
    ds[2]
    with pytest.raises(DatasetError) as info:
        ds[3]
    assert str(path) in str(info.value) and what in str(info.value)


def test_writer_validates_and_refuses_overwrite(tmp_path):
    images, labels, depths, normals = make_arrays(n=2)
    with pytest.raises(ValueError, match="depth"):
        write_nyuv2_tree(tmp_path, "train", images, labels, depths[..., 0], normals)
    bad = labels.copy()
    bad[0, 0, 0] = 13
    with pytest.raises(ValueError, match="-1..12"):
        write_nyuv2_tree(tmp_path, "train", images, bad, depths, normals)
    write_nyuv2_tree(tmp_path, "train", images, labels, depths, normals)
    with pytest.raises(FileExistsError):
        write_nyuv2_tree(tmp_path, "train", images, labels, depths, normals)
    write_nyuv2_tree(tmp_path, "train", images[:1], labels[:1], depths[:1], normals[:1], overwrite=True)
    assert len(NYUv2(tmp_path)) == 1


def test_delta_m_counts_the_nine_metrics_of_the_published_nyuv2_protocol():
    """CAGrad, Nash-MTL, LibMTL and IMTL average 9 NYUv2 metrics; depth/delta1 is reported but not
    counted, so a Delta-m here compares with their tables. Datasets without a protocol count all."""
    from amtl.data.registry import delta_m_directions
    from amtl.tasks import delta_m, directions, make_task

    every = directions([make_task("segmentation", num_classes=13), make_task("depth"), make_task("normal")])
    counted = delta_m_directions("nyuv2", every)
    assert sorted(counted) == ["depth/abs_err", "depth/rel_err", "normal/mean_angle", "normal/median_angle",
                               "normal/within_11.25", "normal/within_22.5", "normal/within_30",
                               "segmentation/miou", "segmentation/pixel_acc"]
    assert "depth/delta1" in every and delta_m_directions("scenes", every) == every
    baselines = {k: 1.0 for k in every}
    assert delta_m({**baselines, "depth/delta1": 2.0}, baselines, counted) == 0.0
    assert delta_m({**baselines, "depth/abs_err": 1.9}, baselines, counted) == pytest.approx(10.0)  # 90% / 9
