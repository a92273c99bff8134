"""Tests for the procedurally rendered scene dataset (amtl.data.scenes)."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils.data import DataLoader

from amtl.data import collate
from amtl.data.scenes import (BOX, CLASSES, CYLINDER, DETECTION_CLASSES, SPHERE, SceneBatch,
                              SceneConfig, SceneDataset, render_params, render_scenes,
                              sample_scenes)

SMALL = SceneConfig(size=32, n_train=48, n_val=16, n_test=16)
FLOOR, WALL, CEILING = 0, 1, 2


@pytest.fixture(scope="module")
def rendered() -> dict[str, torch.Tensor]:
    return render_scenes(64, SMALL, seed=7)


def make_scene(objects: list[tuple[int, tuple[float, float], tuple[float, float, float], float]],
               cam_pos: tuple[float, float, float] = (0.0, 1.0, -2.0), yaw: float = 0.0,
               pitch: float = 0.0, light: tuple[float, float, float] = (0.0, 2.8, 0.0),
               room: tuple[float, float, float] = (8.0, 3.0, 8.0)) -> SceneBatch:
    """One hand-built scene; objects are (kind, (x, z), half extents, angle), resting on the floor."""
    k = max(len(objects), 1)
    kind = torch.full((1, k), -1)
    center = torch.zeros(1, k, 3)
    half = torch.full((1, k, 3), 0.1)
    angle = torch.zeros(1, k)
    for i, (kd, (x, z), h, a) in enumerate(objects):
        kind[0, i] = kd
        half[0, i] = torch.tensor(h)
        center[0, i] = torch.tensor([x, h[1], z])
        angle[0, i] = a
    return SceneBatch(
        room=torch.tensor([room]), cam_pos=torch.tensor([cam_pos]), cam_yaw=torch.tensor([yaw]),
        cam_pitch=torch.tensor([pitch]), obj_kind=kind, obj_center=center, obj_angle=angle,
        obj_half=half, obj_color=torch.full((1, k, 3), 0.7),
        floor_colors=torch.tensor([[[0.8, 0.8, 0.8], [0.4, 0.4, 0.4]]]), checker_scale=torch.tensor([0.5]),
        wall_color=torch.tensor([[0.6, 0.6, 0.7]]), ceiling_color=torch.tensor([[0.9, 0.9, 0.9]]),
        light_is_point=torch.tensor([True]), light_pos=torch.tensor([light]),
        light_dir=torch.tensor([[0.0, -1.0, 0.0]]), light_intensity=torch.tensor([1.0]),
        ambient=torch.tensor([0.2]), blobs=torch.zeros(1, 1, 4))


def test_errors_name_valid_values(tmp_path):
    with pytest.raises(ValueError, match="train, val, test"):
        SceneDataset("dev", SMALL, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="segmentation, depth, normal, detection"):
        SceneDataset("val", SMALL, tasks=("segmentation", "edges"), cache_dir=tmp_path)


def test_shapes_dtypes_and_determinism(rendered):
    out = rendered
    n, s, k = 64, SMALL.size, SMALL.objects_range[1]
    expected = {"image": ((n, 3, s, s), torch.uint8), "segmentation": ((n, s, s), torch.uint8),
                "depth": ((n, 1, s, s), torch.float16), "normal": ((n, 3, s, s), torch.float16),
                "boxes": ((n, k, 4), torch.int16), "box_labels": ((n, k), torch.uint8),
                "box_counts": ((n,), torch.uint8)}
    assert set(out) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert out[key].shape == shape and out[key].dtype == dtype, key
    again = render_scenes(64, SMALL, seed=7)
    assert all(torch.equal(out[key], again[key]) for key in out)  # bit-identical
    other = render_scenes(8, SMALL, seed=8)
    assert not torch.equal(out["image"][:8], other["image"])
    # A scene does not depend on how many scenes are rendered with it.
    prefix = render_scenes(5, SMALL, seed=7)
    assert all(torch.equal(out[key][:5], prefix[key]) for key in out)


def test_invalid_masks_normals_and_depth(rendered):
    seg, depth, normal = rendered["segmentation"], rendered["depth"].float(), rendered["normal"].float()
    invalid = seg == 255
    # One mask for all three targets.
    assert torch.equal(invalid, depth[:, 0] == 0)
    assert torch.equal(invalid, (normal == 0).all(dim=1))
    frac = invalid.float().mean().item()
    assert 0.005 < frac < 0.08, frac  # a few percent: masking is exercised, not dominant
    valid = ~invalid
    norms = normal.norm(dim=1)[valid]
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)
    d = depth[:, 0][valid]
    assert d.min() > 0.1 and d.max() <= SMALL.max_depth + 0.01
    # Normals face the camera: negative cosine with the viewing ray (u, v, 1) of each pixel.
    s = SMALL.size
    coords = (torch.arange(s) + 0.5 - s / 2) / ((s / 2) / math.tan(math.radians(SMALL.fov_deg) / 2))
    ray = torch.stack([coords[None, :].expand(s, s), coords[:, None].expand(s, s), torch.ones(s, s)])
    cos = (normal * ray).sum(1) / ray.norm(dim=0)
    assert (cos[valid] < -SMALL.grazing_cos + 2e-3).all()
    # Floor normals point up, i.e. have a negative camera-y (down axis) component.
    assert (normal[:, 1][seg == FLOOR] < 0).all()


def test_every_class_appears_and_objects_are_not_rare(rendered):
    seg = rendered["segmentation"]
    shares = torch.bincount(seg[seg != 255].long(), minlength=len(CLASSES)).float() / (seg != 255).sum()
    assert (shares > 0).all(), shares
    assert shares[3:].sum() > 0.1, shares  # objects cover a real share of the pixels
    labels = rendered["box_labels"]
    counts = torch.bincount(labels[labels != 255].long(), minlength=len(DETECTION_CLASSES))
    assert (counts > 10).all(), counts


def test_boxes_tight_around_visible_instance_pixels():
    g = torch.Generator().manual_seed(3)
    scenes = sample_scenes(24, SMALL, g)
    out = render_params(scenes, SMALL)
    inst, s = out["instance"].long(), SMALL.size
    for i in range(len(scenes)):
        expected = []
        for k in range(scenes.obj_kind.shape[1]):
            ys, xs = torch.nonzero(inst[i] == k + 1, as_tuple=True)
            if len(xs) >= 4 and xs.max() - xs.min() >= 1 and ys.max() - ys.min() >= 1:
                expected.append(([xs.min().item(), ys.min().item(), xs.max().item() + 1,
                                  ys.max().item() + 1], scenes.obj_kind[i, k].item()))
        n = int(out["box_counts"][i])
        got = [(out["boxes"][i, j].tolist(), out["box_labels"][i, j].item()) for j in range(n)]
        assert got == expected
        boxes = out["boxes"][i, :n]
        assert (boxes >= 0).all() and (boxes <= s).all()
        assert (boxes[:, 2] - boxes[:, 0] >= 2).all() and (boxes[:, 3] - boxes[:, 1] >= 2).all()
        assert (out["box_labels"][i, n:] == 255).all()
        # Instance pixels carry their object's semantic class (or ignore).
        for k in range(scenes.obj_kind.shape[1]):
            px = out["segmentation"][i][inst[i] == k + 1]
            assert ((px == scenes.obj_kind[i, k] + 3) | (px == 255)).all()


def test_fully_hidden_object_has_no_box():
    wall_box = (BOX, (0.0, 1.0), (1.0, 1.0, 0.3), 0.0)  # 2 m wide, 2 m tall, in front of the camera
    hidden = make_scene([wall_box, (SPHERE, (0.0, 2.5), (0.3, 0.3, 0.3), 0.0)])
    visible = make_scene([wall_box, (SPHERE, (2.0, 2.5), (0.3, 0.3, 0.3), 0.0)])
    out_hidden, out_visible = render_params(hidden, SMALL), render_params(visible, SMALL)
    assert not (out_hidden["instance"] == 2).any()
    assert out_hidden["box_counts"].tolist() == [1] and out_hidden["box_labels"][0, 0] == BOX
    assert (out_visible["instance"] == 2).any()
    assert out_visible["box_counts"].tolist() == [2]
    assert sorted(out_visible["box_labels"][0].tolist()) == sorted([BOX, SPHERE])


def test_camera_looking_straight_down_sees_floor_at_camera_height():
    h = 1.3
    out = render_params(make_scene([], cam_pos=(0.2, h, -0.4), yaw=0.7, pitch=-math.pi / 2), SMALL)
    assert (out["segmentation"] == FLOOR).all()
    # z-depth of a plane perpendicular to the viewing axis is constant: the camera height.
    assert torch.allclose(out["depth"].float(), torch.full_like(out["depth"].float(), h), atol=2e-3)
    normal = out["normal"].float()[0]
    assert torch.allclose(normal[2], torch.full_like(normal[2], -1.0), atol=1e-3)  # towards camera
    assert normal[:2].abs().max() < 1e-3


def test_geometry_of_objects_in_view():
    # A sphere straight ahead: the centre pixel's depth is distance - radius, normal points back.
    r, dist = 0.5, 3.0
    out = render_params(make_scene([(SPHERE, (0.0, dist - 2.0), (r, r, r), 0.0)], cam_pos=(0.0, r, -2.0)),
                        SceneConfig(size=33))
    c = 16
    assert out["segmentation"][0, c, c] == 3
    assert abs(out["depth"][0, 0, c, c].item() - (dist - r)) < 1e-2
    assert torch.allclose(out["normal"][0, :, c, c].float(), torch.tensor([0.0, 0.0, -1.0]), atol=1e-2)
    # Viewed from above, a capped cylinder shows its top cap with an upward normal.
    cyl = render_params(make_scene([(CYLINDER, (0.0, 0.0), (0.4, 0.5, 0.4), 0.0)], cam_pos=(0.0, 2.5, 0.0),
                                   pitch=-math.pi / 2), SMALL)
    c = SMALL.size // 2
    assert cyl["segmentation"][0, c, c] == 5 and cyl["box_labels"][0, 0] == CYLINDER
    assert abs(cyl["depth"][0, 0, c, c].item() - 1.5) < 2e-3  # 2.5 m camera - 1.0 m cylinder
    assert torch.allclose(cyl["normal"][0, :, c, c].float(), torch.tensor([0.0, 0.0, -1.0]), atol=1e-3)


def test_sampled_objects_rest_on_floor_inside_room_without_overlap():
    s = sample_scenes(64, SMALL, torch.Generator().manual_seed(0))
    active = s.obj_kind >= 0
    counts = active.sum(1)
    assert counts.min() >= 1 and counts.max() <= SMALL.objects_range[1] and counts.float().mean() > 3
    assert torch.equal(s.obj_center[..., 1][active], s.obj_half[..., 1][active])  # resting on y = 0
    foot = torch.where(s.obj_kind == BOX, s.obj_half[..., [0, 2]].norm(dim=-1), s.obj_half[..., 0])
    xz = s.obj_center[..., [0, 2]]
    inside = (xz.abs() + foot[..., None] <= s.room[:, None, [0, 2]] / 2 + 1e-5).all(-1)
    assert inside[active].all()
    gap = (xz[:, :, None] - xz[:, None]).norm(dim=-1) - foot[:, :, None] - foot[:, None]
    pair = active[:, :, None] & active[:, None] & ~torch.eye(active.shape[1], dtype=torch.bool)
    assert (gap[pair] > 0).all()
    assert (s.cam_pos[:, 1] < s.room[:, 1]).all() and (s.cam_pos[:, [0, 2]].abs() < s.room[:, [0, 2]] / 2).all()


def test_shadows_darken_floor_behind_object():
    obj = [(SPHERE, (0.0, 0.0), (0.4, 0.4, 0.4), 0.0)]
    kw = dict(cam_pos=(0.0, 1.6, -2.5), pitch=-0.5, light=(0.0, 2.8, 0.4))
    with_obj, without = render_params(make_scene(obj, **kw), SMALL), render_params(make_scene([], **kw), SMALL)
    floor_both = (with_obj["segmentation"] == FLOOR) & (without["segmentation"] == FLOOR)
    a, b = with_obj["image"].float().sum(1), without["image"].float().sum(1)
    darker = floor_both & (a < b - 10)
    assert darker.sum() >= 5  # a visible cast shadow
    assert not (floor_both & (a > b + 1)).any()


def test_dataset_cache_hit_splits_and_corruption(tmp_path):
    cfg = SceneConfig(size=32, n_train=40, n_val=12, n_test=12)
    first = SceneDataset("val", cfg, cache_dir=tmp_path)
    assert not first.loaded_from_cache and first.cache_path.exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []  # atomic write left no temp
    mtime = first.cache_path.stat().st_mtime_ns
    second = SceneDataset("val", cfg, cache_dir=tmp_path)
    assert second.loaded_from_cache and first.cache_path.stat().st_mtime_ns == mtime
    assert all(torch.equal(first.data[k], second.data[k]) for k in first.data)
    # Splits use different seeds: no image is shared.
    test = SceneDataset("test", cfg, cache_dir=tmp_path)
    flat_val, flat_test = first.data["image"].flatten(1), test.data["image"].flatten(1)
    assert not (flat_val[:, None] == flat_test[None]).all(-1).any()
    # A different config gets a different cache file.
    assert SceneDataset("val", SceneConfig(size=32, n_val=12, seed=1), cache_dir=tmp_path).cache_path \
        != first.cache_path
    # Corruption: truncation and flipped bytes are both detected and re-rendered identically.
    raw = first.cache_path.read_bytes()
    first.cache_path.write_bytes(raw[: len(raw) // 2])
    redone = SceneDataset("val", cfg, cache_dir=tmp_path)
    assert not redone.loaded_from_cache
    assert all(torch.equal(first.data[k], redone.data[k]) for k in first.data)
    raw = bytearray(first.cache_path.read_bytes())
    marker = raw.find(first.data["image"][0].flatten()[:32].numpy().tobytes())
    assert marker > 0
    raw[marker] ^= 0xFF
    first.cache_path.write_bytes(bytes(raw))
    assert not SceneDataset("val", cfg, cache_dir=tmp_path).loaded_from_cache
    assert SceneDataset("val", cfg, cache_dir=tmp_path).loaded_from_cache


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AMTL_CACHE_DIR", str(tmp_path / "env"))
    ds = SceneDataset("test", SceneConfig(size=16, n_test=4))
    assert ds.cache_path.parent == tmp_path / "env" and ds.cache_path.exists()


def test_samples_and_collate_through_dataloader(tmp_path):
    ds = SceneDataset("val", SceneConfig(size=32, n_val=12), cache_dir=tmp_path)
    assert len(ds) == 12 and ds.num_classes == 6
    sample = ds[3]
    assert sample["index"] == 3 and sample["has"] == {t: True for t in
                                                     ("segmentation", "depth", "normal", "detection")}
    img = sample["image"]
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1
    seg, depth, normal = sample["segmentation"], sample["depth"], sample["normal"]
    assert seg.dtype == torch.long and seg.shape == (32, 32) and seg.min() >= -1 and seg.max() < 6
    assert depth.dtype == torch.float32 and depth.shape == (1, 32, 32)
    assert normal.dtype == torch.float32 and normal.shape == (3, 32, 32)
    valid = seg >= 0
    assert torch.equal(valid, depth[0] > 0)
    assert torch.allclose(normal.norm(dim=0)[valid], torch.ones(int(valid.sum())), atol=1e-5)
    det = sample["detection"]
    assert det["boxes"].dtype == torch.float32 and det["labels"].dtype == torch.long
    assert det["boxes"].shape == (len(det["labels"]), 4)
    loader = DataLoader(ds, batch_size=5, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["segmentation"].shape == (5, 32, 32)
    assert batch["depth"].shape == (5, 1, 32, 32) and batch["normal"].shape == (5, 3, 32, 32)
    assert isinstance(batch["detection"], list) and len(batch["detection"]) == 5
    assert batch["has"]["depth"].dtype == torch.bool and batch["has"]["depth"].all()
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    # A task subset yields only those targets.
    only = SceneDataset("val", SceneConfig(size=32, n_val=12), tasks=("depth",), cache_dir=tmp_path)[0]
    assert set(only) == {"image", "index", "has", "depth"} and only["has"] == {"depth": True}
    with pytest.raises(IndexError):
        ds[12]


def test_no_stray_output_by_default(tmp_path, capsys):
    SceneDataset("test", SceneConfig(size=16, n_test=3), cache_dir=tmp_path)
    assert capsys.readouterr() == ("", "")
    assert os.listdir(tmp_path)
