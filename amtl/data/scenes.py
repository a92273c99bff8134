"""Procedurally rendered 3D rooms: an embedded, download-free multi-task dataset.

Each scene is a box-shaped room (floor, four walls, ceiling) with 2-6 objects resting on the
floor (spheres, boxes rotated about the vertical axis, capped vertical cylinders), a pinhole
camera with random height, pitch and yaw, and one point or directional light with hard shadows.
Everything is ray-cast analytically in torch, vectorised over images, objects and pixels.

Conventions
-----------
- World frame: y up, floor at ``y = 0``, ceiling at ``y = room height``; room centred on x = z = 0.
- Camera frame (for normals): OpenCV style, x right, y down, z forward (the viewing axis).
- ``depth`` is **z-depth** in metres along the camera's viewing axis (as NYUv2 stores it), not
  the Euclidean ray length.
- ``normal`` is the unit surface normal in the camera frame, oriented towards the camera.
- ``detection`` boxes are ``xyxy`` in pixel-edge coordinates: a box covering columns ``c0..c1``
  (inclusive) has ``x0 = c0`` and ``x1 = c1 + 1``. They are computed from each object's visible
  pixels *before* the invalid-pixel masking below (that masking models a depth sensor; the RGB
  still shows the object), so occlusion is handled exactly.
- Invalid pixels (NYUv2-like sensor holes: random elliptic blobs, pixels beyond ``max_depth``
  and grazing surfaces) have segmentation ``-1``, depth ``0`` and normal ``(0, 0, 0)``, all on the
  same mask. The RGB image is unaffected there.

Rendering is deterministic from ``(config, seed)``: every chunk of :data:`CHUNK` scenes draws its
parameters and pixel noise from its own generator seeded by ``(seed, chunk index)``. Splits use
different derived seeds. :class:`SceneDataset` caches each split on disk, keyed by a hash of the
config and :data:`FORMAT_VERSION`, written atomically and verified by a checksum on load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CLASSES",
    "DETECTION_CLASSES",
    "SceneBatch",
    "SceneConfig",
    "SceneDataset",
    "render_params",
    "render_scenes",
    "sample_scenes",
]

log = logging.getLogger(__name__)

CLASSES = ("floor", "wall", "ceiling", "sphere", "box", "cylinder")
DETECTION_CLASSES = ("sphere", "box", "cylinder")
TASKS = ("segmentation", "depth", "normal", "detection")
SPLITS = ("train", "val", "test")

#: Bump whenever the renderer's output for a given config changes; it is part of the cache key.
FORMAT_VERSION = 1
#: Scenes per parameter-sampling chunk. Fixed (not a config knob) because it defines which
#: generator draws which scene; changing it changes the data, so it is part of the cache key too.
CHUNK = 32
#: Upper bound on pixels rendered at once (images x pixels), to bound memory at large sizes.
_PIXEL_BUDGET = 1 << 17
#: Ignore value of the stored uint8 segmentation.
IGNORE_U8 = 255

# Object kinds (slot value -1 = empty slot). Semantic id = kind + 3, detection label = kind.
SPHERE, BOX, CYLINDER = 0, 1, 2
FLOOR, WALL, CEILING = 0, 1, 2
# Boxes carry a huge bounding sphere as their "quadric" so one interval test handles all kinds.
_BOX_SPHERE_RADIUS = 1000.0


@dataclass(frozen=True)
class SceneConfig:
    """All render parameters. Its hash (with :data:`FORMAT_VERSION`) keys the on-disk cache.

    Ranges are ``(low, high)`` and sampled uniformly per scene (per object for object knobs).
    Angles are in degrees, lengths in metres, colour values in [0, 1].
    """

    size: int = 64
    seed: int = 0
    n_train: int = 3000
    n_val: int = 500
    n_test: int = 500
    # camera
    fov_deg: float = 60.0
    cam_height_range: tuple[float, float] = (0.9, 1.9)
    cam_pitch_range: tuple[float, float] = (-35.0, 0.0)  # negative = looking down
    # room
    room_size_range: tuple[float, float] = (5.0, 9.0)  # floor extent along x and along z
    room_height_range: tuple[float, float] = (2.6, 3.4)
    # objects
    objects_range: tuple[int, int] = (2, 6)
    object_size_range: tuple[float, float] = (0.2, 0.6)  # radius / half-width
    object_distance_range: tuple[float, float] = (1.3, 5.0)  # horizontal distance from camera
    # appearance
    saturation_range: tuple[float, float] = (0.35, 0.9)
    brightness_range: tuple[float, float] = (0.45, 1.0)
    texture_scale_range: tuple[float, float] = (0.3, 0.8)  # checker square side (m)
    checker_contrast_range: tuple[float, float] = (0.45, 0.75)  # dark/light checker ratio
    noise_std: float = 0.02
    # lighting
    point_light_prob: float = 0.6
    light_intensity_range: tuple[float, float] = (0.7, 1.1)
    ambient_range: tuple[float, float] = (0.15, 0.35)
    # NYUv2-like invalid pixels
    blob_count_range: tuple[int, int] = (0, 4)
    blob_radius_range: tuple[float, float] = (0.03, 0.09)  # fraction of image size
    max_depth: float = 8.0  # z-depth beyond this is invalid (sensor range)
    grazing_cos: float = 0.08  # |cos(view, normal)| below this is invalid

    def __post_init__(self) -> None:
        if self.size < 4:
            raise ValueError(f"size must be >= 4, got {self.size}")
        lo, hi = self.objects_range
        if not 0 <= lo <= hi or hi > 254:
            raise ValueError(f"objects_range must satisfy 0 <= low <= high <= 254, got {self.objects_range}")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def key(self) -> str:
        """Stable hash of every render parameter, the renderer version and the chunk size."""
        payload = json.dumps({"config": asdict(self), "version": FORMAT_VERSION, "chunk": CHUNK},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def split_size(self, split: str) -> int:
        """Number of images in ``split``."""
        _check_split(split)
        return getattr(self, f"n_{split}")


# -- scene parameters ------------------------------------------------------------------------------
@dataclass
class SceneBatch:
    """Parameters of ``B`` scenes with ``K`` object slots each (world frame, metres, radians).

    Object slots with ``obj_kind == -1`` are empty. ``obj_half`` holds half extents along the
    object's local axes: sphere ``(r, r, r)``, box ``(ex, ey, ez)``, cylinder ``(r, h/2, r)``;
    objects rest on the floor, so ``obj_center[..., 1] == obj_half[..., 1]``. Blobs are invalid
    ellipses in normalised image coordinates ``(cx, cy, rx, ry)``; ``rx == 0`` means none.
    """

    room: Tensor  # [B, 3] full extents (x, y = height, z)
    cam_pos: Tensor  # [B, 3]
    cam_yaw: Tensor  # [B]; yaw 0 looks along +z
    cam_pitch: Tensor  # [B]; negative looks down
    obj_kind: Tensor  # [B, K] long
    obj_center: Tensor  # [B, K, 3]
    obj_angle: Tensor  # [B, K] rotation about +y
    obj_half: Tensor  # [B, K, 3]
    obj_color: Tensor  # [B, K, 3]
    floor_colors: Tensor  # [B, 2, 3] checker colours
    checker_scale: Tensor  # [B]
    wall_color: Tensor  # [B, 3]
    ceiling_color: Tensor  # [B, 3]
    light_is_point: Tensor  # [B] bool
    light_pos: Tensor  # [B, 3] point light position
    light_dir: Tensor  # [B, 3] unit direction the directional light travels in
    light_intensity: Tensor  # [B]
    ambient: Tensor  # [B]
    blobs: Tensor  # [B, M, 4]

    def __len__(self) -> int:
        return self.room.shape[0]

    def slice(self, start: int, stop: int) -> SceneBatch:
        """Scenes ``start:stop``."""
        return SceneBatch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


def _uniform(g: torch.Generator, rng: tuple[float, float], *shape: int) -> Tensor:
    lo, hi = rng
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Vectorised HSV -> RGB; inputs of equal shape in [0, 1], output ``[..., 3]``."""
    k = torch.tensor([5.0, 3.0, 1.0])
    kk = (k + h.unsqueeze(-1) * 6.0) % 6.0
    ramp = torch.clamp(torch.minimum(kk, 4.0 - kk), 0.0, 1.0)
    return v.unsqueeze(-1) * (1.0 - s.unsqueeze(-1) * ramp)


def _footprint(kind: Tensor, half: Tensor) -> Tensor:
    """Radius of the object's bounding circle on the floor."""
    box_r = torch.sqrt(half[..., 0] ** 2 + half[..., 2] ** 2)
    return torch.where(kind == BOX, box_r, half[..., 0])


def sample_scenes(n: int, config: SceneConfig, generator: torch.Generator) -> SceneBatch:
    """Draw ``n`` random scenes. Consumes a fixed number of draws for a given ``n`` and config."""
    g, c = generator, config
    k_max = c.objects_range[1]
    tries = 12
    # Room, camera.
    room = torch.stack([_uniform(g, c.room_size_range, n), _uniform(g, c.room_height_range, n),
                        _uniform(g, c.room_size_range, n)], dim=1)
    yaw = _uniform(g, (0.0, 2 * math.pi), n)
    pitch = torch.deg2rad(_uniform(g, c.cam_pitch_range, n))
    height = torch.minimum(_uniform(g, c.cam_height_range, n), room[:, 1] - 0.3)
    fwd = torch.stack([torch.sin(yaw), torch.cos(yaw)], dim=1)  # horizontal (x, z)
    side = torch.stack([torch.cos(yaw), -torch.sin(yaw)], dim=1)
    half_room = room[:, [0, 2]] / 2
    # Place the camera back from the room centre, looking roughly into the room, so views show
    # floor, walls and objects rather than a wall at arm's length.
    back = _uniform(g, (0.15, 0.55), n) * half_room.min(dim=1).values
    lateral = _uniform(g, (-0.3, 0.3), n) * half_room.min(dim=1).values
    cam_xz = -fwd * back[:, None] + side * lateral[:, None]
    cam_xz = torch.maximum(torch.minimum(cam_xz, half_room - 0.4), -(half_room - 0.4))
    cam_pos = torch.stack([cam_xz[:, 0], height, cam_xz[:, 1]], dim=1)

    # Objects: kind and size first, then rejection-sample a floor position in front of the camera
    # that stays inside the room and does not overlap earlier objects or the camera.
    count = torch.randint(c.objects_range[0], k_max + 1, (n,), generator=g)
    kind = torch.randint(0, 3, (n, k_max), generator=g)
    base = _uniform(g, c.object_size_range, n, k_max)
    width2 = _uniform(g, c.object_size_range, n, k_max)
    tall = _uniform(g, (0.6, 1.8), n, k_max)
    half = torch.stack([base, base, base], dim=-1)
    is_box, is_cyl = kind == BOX, kind == CYLINDER
    half[..., 1] = torch.where(is_box, base * tall, half[..., 1])
    half[..., 2] = torch.where(is_box, width2, half[..., 2])
    half[..., 0] = torch.where(is_cyl, base * 0.85, half[..., 0])
    half[..., 2] = torch.where(is_cyl, base * 0.85, half[..., 2])
    half[..., 1] = torch.where(is_cyl, base * tall * 1.1, half[..., 1])
    angle = _uniform(g, (0.0, math.pi), n, k_max)
    foot = _footprint(kind, half)
    half_fov = math.radians(c.fov_deg) / 2
    dist = _uniform(g, c.object_distance_range, n, k_max, tries)
    bearing = _uniform(g, (-0.85 * half_fov, 0.85 * half_fov), n, k_max, tries)
    cand_dir = (torch.cos(bearing)[..., None] * fwd[:, None, None, :]
                + torch.sin(bearing)[..., None] * side[:, None, None, :])
    cand = cam_xz[:, None, None, :] + dist[..., None] * cand_dir  # [n, K, T, 2]
    limit = (half_room[:, None, None, :] - foot[..., None, None] - 0.05).clamp_min(0.0)
    cand = torch.maximum(torch.minimum(cand, limit), -limit)
    active = torch.arange(k_max)[None, :] < count[:, None]
    xz = torch.zeros(n, k_max, 2)
    for j in range(k_max):  # loop over slots only (<= 6), vectorised over scenes and tries
        cj = cand[:, j]  # [n, T, 2]
        ok = (cj - cam_xz[:, None, :]).norm(dim=-1) > foot[:, j, None] + 0.35
        for i in range(j):
            gap = (cj - xz[:, None, i]).norm(dim=-1) - foot[:, j, None] - foot[:, i, None] - 0.05
            ok &= (gap > 0) | ~active[:, None, i]
        first = ok.to(torch.int8).argmax(dim=1)
        xz[:, j] = cj[torch.arange(n), first]
        active[:, j] &= ok.any(dim=1)
    kind = torch.where(active, kind, torch.full_like(kind, -1))
    center = torch.stack([xz[..., 0], half[..., 1], xz[..., 1]], dim=-1)

    # Appearance. Colours are independent of class, so class must be read from shape.
    obj_color = _hsv_to_rgb(torch.rand(n, k_max, generator=g), _uniform(g, c.saturation_range, n, k_max),
                            _uniform(g, c.brightness_range, n, k_max))
    floor_light = _hsv_to_rgb(torch.rand(n, generator=g), 0.6 * _uniform(g, c.saturation_range, n),
                              _uniform(g, c.brightness_range, n))
    contrast = _uniform(g, c.checker_contrast_range, n)
    floor_colors = torch.stack([floor_light, floor_light * contrast[:, None]], dim=1)
    checker = _uniform(g, c.texture_scale_range, n)
    wall = _hsv_to_rgb(torch.rand(n, generator=g), 0.35 * _uniform(g, c.saturation_range, n),
                       0.5 + 0.5 * _uniform(g, c.brightness_range, n))
    ceiling = _hsv_to_rgb(torch.rand(n, generator=g), _uniform(g, (0.0, 0.1), n), _uniform(g, (0.75, 0.95), n))

    # Light: a point light just below the ceiling, or a directional light from above.
    is_point = torch.rand(n, generator=g) < c.point_light_prob
    lxz = (_uniform(g, (-0.8, 0.8), n, 2)) * half_room
    light_pos = torch.stack([lxz[:, 0], room[:, 1] - 0.15, lxz[:, 1]], dim=1)
    elev = torch.deg2rad(_uniform(g, (35.0, 75.0), n))
    azim = _uniform(g, (0.0, 2 * math.pi), n)
    light_dir = -torch.stack([torch.cos(elev) * torch.sin(azim), torch.sin(elev),
                              torch.cos(elev) * torch.cos(azim)], dim=1)
    intensity = _uniform(g, c.light_intensity_range, n)
    ambient = _uniform(g, c.ambient_range, n)

    # Invalid blobs.
    m = max(c.blob_count_range[1], 1)
    n_blobs = torch.randint(c.blob_count_range[0], c.blob_count_range[1] + 1, (n,), generator=g)
    radius = _uniform(g, c.blob_radius_range, n, m)
    aspect = torch.exp(_uniform(g, (-0.7, 0.7), n, m))
    blobs = torch.stack([torch.rand(n, m, generator=g), torch.rand(n, m, generator=g),
                         radius * aspect.sqrt(), radius / aspect.sqrt()], dim=-1)
    blobs[..., 2:] *= (torch.arange(m)[None, :] < n_blobs[:, None])[..., None]

    return SceneBatch(room=room, cam_pos=cam_pos, cam_yaw=yaw, cam_pitch=pitch, obj_kind=kind,
                      obj_center=center, obj_angle=angle, obj_half=half, obj_color=obj_color,
                      floor_colors=floor_colors, checker_scale=checker, wall_color=wall,
                      ceiling_color=ceiling, light_is_point=is_point, light_pos=light_pos,
                      light_dir=light_dir, light_intensity=intensity, ambient=ambient, blobs=blobs)


# -- ray casting -----------------------------------------------------------------------------------
def _safe(d: Tensor) -> Tensor:
    """Replace exact zeros so reciprocals stay finite-signed (slab tests then behave)."""
    return torch.where(d == 0, torch.full_like(d, 1e-20), d)


class _Objects:
    """Per-slot object parameters shaped ``[B, K, 1]`` for broadcasting against ``[B, 1, P]`` rays.

    Every object is the intersection of a quadric ``x^2 + ay*y^2 + z^2 <= rq^2`` (local frame) and
    the slab box ``|x| <= ex, |y| <= ey, |z| <= ez``: sphere (ay = 1, loose slabs), cylinder
    (ay = 0, slabs cap it at y = +-h/2), box (a huge bounding sphere, tight slabs). One convex
    interval test then serves all kinds.
    """

    def __init__(self, s: SceneBatch) -> None:
        kind = s.obj_kind
        half = s.obj_half
        self.active = (kind >= 0)[..., None]
        self.cx, self.cy, self.cz = (s.obj_center[..., i, None] for i in range(3))
        self.cos = torch.cos(s.obj_angle)[..., None]
        self.sin = torch.sin(s.obj_angle)[..., None]
        self.ay = (kind != CYLINDER).float()[..., None]
        rq = torch.where(kind == BOX, torch.full_like(half[..., 0], _BOX_SPHERE_RADIUS), half[..., 0])
        self.rq2 = (rq * rq)[..., None]
        loose = kind != BOX  # sphere/cylinder x/z slabs at 2r never bind
        self.ex = torch.where(loose, 2 * half[..., 0], half[..., 0])[..., None]
        self.ey = torch.where(kind == SPHERE, 2 * half[..., 1], half[..., 1])[..., None]
        self.ez = torch.where(loose, 2 * half[..., 2], half[..., 2])[..., None]

    def intervals(self, o: tuple[Tensor, Tensor, Tensor], d: tuple[Tensor, Tensor, Tensor]
                  ) -> tuple[Tensor, Tensor]:
        """Entry and exit ray parameters ``[B, K, P]`` (entry > exit means a miss)."""
        ox, oy, oz = o
        dx, dy, dz = d
        rx, ry, rz = ox - self.cx, oy - self.cy, oz - self.cz
        # Quadric terms use rotation-invariant xz dot products, so no rotation is needed here.
        a = (dx * dx + dz * dz + 1e-12) + self.ay * (dy * dy)
        b = (rx * dx + rz * dz) + self.ay * (ry * dy)
        cq = (rx * rx + rz * rz) + self.ay * (ry * ry) - self.rq2
        disc = b * b - a * cq
        sq = torch.sqrt(disc.clamp_min(0.0))
        q_in = torch.where(disc >= 0, (-b - sq) / a, torch.inf)
        q_out = (-b + sq) / a
        # Slabs in the object's local frame (rotation about y by -angle).
        oxl = self.cos * rx - self.sin * rz
        ozl = self.sin * rx + self.cos * rz
        inv_x = 1.0 / _safe(self.cos * dx - self.sin * dz)
        inv_z = 1.0 / _safe(self.sin * dx + self.cos * dz)
        inv_y = 1.0 / _safe(dy)
        t_in, t_out = q_in, q_out
        for o_l, inv, e in ((oxl, inv_x, self.ex), (ry, inv_y, self.ey), (ozl, inv_z, self.ez)):
            mid = -o_l * inv
            span = e * inv.abs()
            t_in = torch.maximum(t_in, mid - span)
            t_out = torch.minimum(t_out, mid + span)
        return t_in, t_out

    def normal_at(self, k: Tensor, p: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """World normal ``[B, P, 3]`` of object slot ``k`` ``[B, P]`` at surface points ``p``.

        The active surface is whichever of quadric and slab box has the larger normalised
        "level" at the point (both are 1 on their own boundary, below 1 inside).
        """
        def take(t: Tensor) -> Tensor:
            return torch.gather(t[..., 0], 1, k)

        rx, ry, rz = p[0] - take(self.cx), p[1] - take(self.cy), p[2] - take(self.cz)
        cos, sin, ay = take(self.cos), take(self.sin), take(self.ay)
        xl, zl = cos * rx - sin * rz, sin * rx + cos * rz
        quad = torch.sqrt((rx * rx + rz * rz + ay * ry * ry) / take(self.rq2))
        lx, ly, lz = xl.abs() / take(self.ex), ry.abs() / take(self.ey), zl.abs() / take(self.ez)
        slab = torch.maximum(torch.maximum(lx, ly), lz)
        use_quad = quad >= slab
        # Slab normal: the axis with the largest level, signed outward.
        nx = torch.where((lx >= ly) & (lx >= lz), torch.sign(xl), torch.zeros_like(xl))
        ny = torch.where((ly > lx) & (ly >= lz), torch.sign(ry), torch.zeros_like(ry))
        nz = torch.where((lz > lx) & (lz > ly), torch.sign(zl), torch.zeros_like(zl))
        # Back to world: x = cos*xl + sin*zl, z = -sin*xl + cos*zl.
        sx, sz = cos * nx + sin * nz, -sin * nx + cos * nz
        n = torch.stack([torch.where(use_quad, rx, sx), torch.where(use_quad, ay * ry, ny),
                         torch.where(use_quad, rz, sz)], dim=-1)
        return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _camera_axes(s: SceneBatch) -> tuple[Tensor, Tensor, Tensor]:
    """World-frame right, down and forward unit vectors ``[B, 3]`` (camera x, y, z axes)."""
    cy, sy = torch.cos(s.cam_yaw), torch.sin(s.cam_yaw)
    cp, sp = torch.cos(s.cam_pitch), torch.sin(s.cam_pitch)
    fwd = torch.stack([cp * sy, sp, cp * cy], dim=1)
    right = torch.stack([-cy, torch.zeros_like(cy), sy], dim=1)  # from yaw, valid at pitch -90 too
    down = torch.linalg.cross(fwd, right, dim=1)
    return right, down, fwd


def render_params(scenes: SceneBatch, config: SceneConfig, noise: Tensor | None = None
                  ) -> dict[str, Tensor]:
    """Render given scene parameters to compact arrays (see :func:`render_scenes`).

    Also returns ``"instance"`` uint8 ``[B, H, W]``: 0 for room surfaces, ``k + 1`` for object slot
    ``k`` (before invalid masking). ``noise`` ``[B, 3, H, W]`` is added to the linear RGB.
    """
    b_total, size = len(scenes), config.size
    step = max(1, _PIXEL_BUDGET // (size * size))
    parts = [_render(scenes.slice(i, i + step), config,
                     None if noise is None else noise[i:i + step]) for i in range(0, b_total, step)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _render(s: SceneBatch, c: SceneConfig, noise: Tensor | None) -> dict[str, Tensor]:
    bsz, size = len(s), c.size
    npx = size * size
    focal = (size / 2) / math.tan(math.radians(c.fov_deg) / 2)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5 - size / 2) / focal
    v_img, u_img = torch.meshgrid(coords, coords, indexing="ij")
    u_img, v_img = u_img.reshape(1, npx, 1), v_img.reshape(1, npx, 1)
    right, down, fwd = _camera_axes(s)
    # Camera-frame direction (u, v, 1): the ray parameter t then *is* the z-depth.
    d = u_img * right[:, None] + v_img * down[:, None] + fwd[:, None]  # [B, P, 3]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    ox, oy, oz = (s.cam_pos[:, i, None] for i in range(3))  # [B, 1]

    # Room: the camera is inside a convex box, so the hit is the nearest exit over the 3 axes.
    hx, hy_top, hz = s.room[:, 0, None] / 2, s.room[:, 1, None], s.room[:, 2, None] / 2
    # ">= 0" pairs with _safe's positive stand-in for zero, so axis-parallel rays get t = +huge.
    tx = (torch.where(dx >= 0, hx, -hx) - ox) / _safe(dx)
    ty = (torch.where(dy >= 0, hy_top, torch.zeros_like(hy_top)) - oy) / _safe(dy)
    tz = (torch.where(dz >= 0, hz, -hz) - oz) / _safe(dz)
    t_room, axis = torch.stack([tx, ty, tz]).min(dim=0)
    room_cls = torch.where(axis == 1, torch.where(dy < 0, FLOOR, CEILING), torch.full_like(axis, WALL))
    # Inward normal: minus the sign of the ray along the exit axis.
    n_room = -torch.nn.functional.one_hot(axis, 3).float() * torch.sign(d)

    # Objects.
    objs = _Objects(s)
    t_in, t_out = objs.intervals((ox[..., None], oy[..., None], oz[..., None]),
                                 (dx[:, None], dy[:, None], dz[:, None]))
    hit = objs.active & (t_in <= t_out) & (t_in > 1e-4)
    t_obj, k = torch.where(hit, t_in, torch.inf).min(dim=1)  # [B, P]
    on_obj = t_obj < t_room
    t = torch.where(on_obj, t_obj, t_room)
    px, py, pz = ox + t * dx, oy + t * dy, oz + t * dz
    n_obj = objs.normal_at(k, (px, py, pz))
    n_world = torch.where(on_obj[..., None], n_obj, n_room)
    kind_px = torch.gather(s.obj_kind, 1, k)
    cls = torch.where(on_obj, kind_px + 3, room_cls)
    instance = torch.where(on_obj, k + 1, torch.zeros_like(k))

    # Albedo: checkerboard floor, flat walls/ceiling, per-object colour.
    scale = s.checker_scale[:, None]
    parity = (torch.floor(px / scale) + torch.floor(pz / scale)).remainder(2).long()
    floor_rgb = torch.gather(s.floor_colors, 1, parity[..., None].expand(-1, -1, 3))
    obj_rgb = torch.gather(s.obj_color, 1, k[..., None].expand(-1, -1, 3))
    albedo = torch.where((cls == FLOOR)[..., None], floor_rgb, s.wall_color[:, None])
    albedo = torch.where((cls == CEILING)[..., None], s.ceiling_color[:, None], albedo)
    albedo = torch.where(on_obj[..., None], obj_rgb, albedo)

    # Lighting with hard shadows: cast a ray from each surface point towards the light; only
    # objects can occlude (the room is convex and the light is inside it or, if directional,
    # treated as shining through the ceiling).
    eps = 1e-3
    sx, sy, sz = (p + eps * n_world[..., i] for i, p in enumerate((px, py, pz)))
    point = s.light_is_point[:, None]
    lx = torch.where(point, s.light_pos[:, 0, None] - sx, -s.light_dir[:, 0, None].expand_as(sx))
    ly = torch.where(point, s.light_pos[:, 1, None] - sy, -s.light_dir[:, 1, None].expand_as(sy))
    lz = torch.where(point, s.light_pos[:, 2, None] - sz, -s.light_dir[:, 2, None].expand_as(sz))
    t_max = torch.where(point, 1.0, torch.inf)  # point light sits at t = 1 along (light - p)
    s_in, s_out = objs.intervals((sx[:, None], sy[:, None], sz[:, None]),
                                 (lx[:, None], ly[:, None], lz[:, None]))
    blocked = (objs.active & (s_in <= s_out) & (s_out > 0) & (s_in < t_max[..., None])).any(dim=1)
    dist2 = lx * lx + ly * ly + lz * lz
    lambert = ((n_world[..., 0] * lx + n_world[..., 1] * ly + n_world[..., 2] * lz)
               / dist2.sqrt()).clamp_min(0.0)
    falloff = torch.where(point, 1.0 / (1.0 + 0.04 * dist2), torch.ones_like(dist2))
    direct = s.light_intensity[:, None] * lambert * falloff * (~blocked)
    shade = s.ambient[:, None] + direct
    rgb = (albedo * shade[..., None]).reshape(bsz, size, size, 3).permute(0, 3, 1, 2)
    if noise is not None:
        rgb = rgb + noise
    image = (rgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).contiguous()

    # Camera-frame normal (x right, y down, z forward), oriented towards the camera.
    n_cam = torch.stack([(n_world * ax[:, None]).sum(-1) for ax in (right, down, fwd)], dim=-1)
    ray_cam = torch.stack([u_img.expand(bsz, -1, -1)[..., 0], v_img.expand(bsz, -1, -1)[..., 0],
                           torch.ones(bsz, npx)], dim=-1)
    cos_view = (n_cam * ray_cam).sum(-1) / ray_cam.norm(dim=-1)
    n_cam = torch.where((cos_view > 0)[..., None], -n_cam, n_cam)

    # NYUv2-like invalid pixels: blobs, out-of-range depth, grazing angles.
    grid_x = ((u_img[..., 0] * focal + size / 2) / size)  # normalised pixel centres in [0, 1]
    grid_y = ((v_img[..., 0] * focal + size / 2) / size)
    bl = s.blobs[:, None]  # [B, 1, M, 4]
    rx_b, ry_b = bl[..., 2].clamp_min(1e-6), bl[..., 3].clamp_min(1e-6)
    inside = (((grid_x[..., None] - bl[..., 0]) / rx_b) ** 2 + ((grid_y[..., None] - bl[..., 1]) / ry_b) ** 2) <= 1
    in_blob = (inside & (bl[..., 2] > 0)).any(dim=-1)
    invalid = in_blob | (t > c.max_depth) | (cos_view.abs() < c.grazing_cos)

    seg = torch.where(invalid, IGNORE_U8, cls).to(torch.uint8).reshape(bsz, size, size)
    depth = torch.where(invalid, 0.0, t).reshape(bsz, 1, size, size).to(torch.float16)
    normal = torch.where(invalid[..., None], 0.0, n_cam).reshape(bsz, size, size, 3)
    normal = normal.permute(0, 3, 1, 2).to(torch.float16).contiguous()
    instance = instance.reshape(bsz, size, size)
    boxes, labels, counts = _boxes(instance, s.obj_kind)
    return {"image": image, "segmentation": seg, "depth": depth, "normal": normal, "boxes": boxes,
            "box_labels": labels, "box_counts": counts, "instance": instance.to(torch.uint8)}


def _boxes(instance: Tensor, kind: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tight xyxy boxes of each object's visible pixels, compacted to the front of ``K`` slots."""
    bsz, size, _ = instance.shape
    k_max = kind.shape[1]
    masks = instance[:, None] == torch.arange(1, k_max + 1)[None, :, None, None]  # [B, K, H, W]
    area = masks.sum(dim=(2, 3))
    cols, rows = masks.any(dim=2), masks.any(dim=3)  # [B, K, W], [B, K, H]
    x0 = cols.to(torch.int8).argmax(dim=2)
    x1 = size - cols.flip(2).to(torch.int8).argmax(dim=2)
    y0 = rows.to(torch.int8).argmax(dim=2)
    y1 = size - rows.flip(2).to(torch.int8).argmax(dim=2)
    # Drop tiny or slot-empty boxes: too few pixels or thinner than 2 pixels.
    keep = (kind >= 0) & (area >= 4) & (x1 - x0 >= 2) & (y1 - y0 >= 2)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept slots first
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4))
    labels = torch.gather(kind, 1, order)
    counts = keep.sum(dim=1)
    valid = torch.arange(k_max)[None] < counts[:, None]
    boxes = torch.where(valid[..., None], boxes, 0).to(torch.int16)
    labels = torch.where(valid, labels, IGNORE_U8).to(torch.uint8)
    return boxes, labels, counts.to(torch.uint8)


def _derive_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def render_scenes(n: int, config: SceneConfig, seed: int,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Tensor]:
    """Render ``n`` scenes deterministically from ``(config, seed)``; returns compact arrays.

    Keys: ``image`` uint8 ``[N, 3, H, W]``; ``segmentation`` uint8 ``[N, H, W]`` (255 = ignore);
    ``depth`` float16 ``[N, 1, H, W]`` z-depth in metres (0 = invalid); ``normal`` float16
    ``[N, 3, H, W]`` camera frame (0 = invalid); ``boxes`` int16 ``[N, K, 4]`` xyxy, the first
    ``box_counts[i]`` rows valid; ``box_labels`` uint8 ``[N, K]`` indices into
    :data:`DETECTION_CLASSES` (255 = padding); ``box_counts`` uint8 ``[N]``. ``K`` is
    ``config.objects_range[1]``. ``progress(done, n)`` is called after each chunk.
    """
    parts: list[dict[str, Tensor]] = []
    size = config.size
    for chunk, start in enumerate(range(0, n, CHUNK)):
        g = torch.Generator().manual_seed(_derive_seed("amtl-scenes", seed, chunk))
        # Always draw a full chunk so a scene's content does not depend on n.
        scenes = sample_scenes(CHUNK, config, g)
        noise = torch.randn(CHUNK, 3, size, size, generator=g) * config.noise_std
        m = min(CHUNK, n - start)
        out = render_params(scenes.slice(0, m), config, noise[:m] if config.noise_std > 0 else None)
        out.pop("instance")
        parts.append(out)
        if progress is not None:
            progress(start + m, n)
    if not parts:
        k = config.objects_range[1]
        return {"image": torch.zeros(0, 3, size, size, dtype=torch.uint8),
                "segmentation": torch.zeros(0, size, size, dtype=torch.uint8),
                "depth": torch.zeros(0, 1, size, size, dtype=torch.float16),
                "normal": torch.zeros(0, 3, size, size, dtype=torch.float16),
                "boxes": torch.zeros(0, k, 4, dtype=torch.int16),
                "box_labels": torch.zeros(0, k, dtype=torch.uint8),
                "box_counts": torch.zeros(0, dtype=torch.uint8)}
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


# -- cache + dataset -------------------------------------------------------------------------------
_ARRAY_KEYS = ("image", "segmentation", "depth", "normal", "boxes", "box_labels", "box_counts")


def _checksum(arrays: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in _ARRAY_KEYS:
        t = arrays[key].contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$AMTL_CACHE_DIR`` if set, else ``~/.cache/amtl``."""
    env = os.environ.get("AMTL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "amtl"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _load_cache(path: Path, config: SceneConfig, split: str, n: int) -> dict[str, Tensor] | None:
    """The cached arrays, or None when missing, unreadable, stale or corrupt."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta, arrays = blob["meta"], blob["arrays"]
        ok = (meta["key"] == config.key() and meta["split"] == split and meta["n"] == n
              and set(arrays) == set(_ARRAY_KEYS) and arrays["image"].shape[0] == n
              and meta["checksum"] == _checksum(arrays))
    except Exception as err:  # any unreadable file is treated as a miss and re-rendered
        log.warning("scene cache %s is unreadable (%s); re-rendering", path, err)
        return None
    if not ok:
        log.warning("scene cache %s is corrupt or stale; re-rendering", path)
        return None
    return arrays


def _save_cache(path: Path, arrays: dict[str, Tensor], config: SceneConfig, split: str, n: int) -> None:
    """Write atomically: a temporary file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": config.key(), "split": split, "n": n, "checksum": _checksum(arrays),
            "config": json.dumps(asdict(config), sort_keys=True)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"meta": meta, "arrays": arrays}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SceneDataset(Dataset):
    """One split of the procedural scenes, rendered once and cached on disk.

    Samples follow the format of :mod:`amtl.data`; ``has[task]`` is True for every requested task.
    Attributes: ``data`` (the compact arrays), ``cache_path``, ``loaded_from_cache`` (whether this
    instance read an existing cache instead of rendering), ``num_classes`` (6).
    """

    num_classes: int = len(CLASSES)
    classes = CLASSES
    detection_classes = DETECTION_CLASSES

    def __init__(self, split: str = "train", config: SceneConfig = SceneConfig(),
                 tasks: Sequence[str] | None = None, cache_dir: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        _check_split(split)
        tasks = tuple(TASKS if tasks is None else tasks)
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; valid tasks: {', '.join(TASKS)}")
        self.split, self.config, self.tasks = split, config, tasks
        n = config.split_size(split)
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path = root / f"scenes-{config.key()}-{split}.pt"
        data = self._load_or_render(n, progress)
        self.data = data

    def _load_or_render(self, n: int, progress: Callable[[int, int], None] | None) -> dict[str, Tensor]:
        from filelock import FileLock  # a torch dependency; serialises concurrent renders

        path = self.cache_path
        data = _load_cache(path, self.config, self.split, n)
        self.loaded_from_cache = data is not None
        if data is not None:
            return data
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            data = _load_cache(path, self.config, self.split, n)  # another process may have won
            self.loaded_from_cache = data is not None
            if data is not None:
                return data
            log.info("rendering %d %s scenes at %dx%d into %s", n, self.split, self.config.size,
                     self.config.size, path)
            seed = _derive_seed("split", self.config.seed, self.split)
            data = render_scenes(n, self.config, seed, progress)
            _save_cache(path, data, self.config, self.split, n)
        return data

    def __len__(self) -> int:
        return self.data["image"].shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        d = self.data
        sample: dict[str, Any] = {"image": d["image"][index].float() / 255.0, "index": index,
                                  "has": {t: True for t in self.tasks}}
        if "segmentation" in self.tasks:
            seg = d["segmentation"][index].long()
            sample["segmentation"] = torch.where(seg == IGNORE_U8, -1, seg)
        if "depth" in self.tasks:
            sample["depth"] = d["depth"][index].float()
        if "normal" in self.tasks:
            n = d["normal"][index].float()
            norm = n.norm(dim=0, keepdim=True)
            # Re-normalise away float16 rounding; invalid pixels stay exactly zero.
            sample["normal"] = torch.where(norm > 0, n / norm.clamp_min(1e-12), torch.zeros_like(n))
        if "detection" in self.tasks:
            count = int(d["box_counts"][index])
            sample["detection"] = {"boxes": d["boxes"][index, :count].float(),
                                   "labels": d["box_labels"][index, :count].long()}
        return sample

    def task_labels(self, tasks: Sequence[str]) -> dict[str, Tensor]:
        """Every sample carries the label of each task this dataset was built with (see :mod:`amtl.data.labels`)."""
        return {t: torch.full((len(self),), t in self.tasks, dtype=torch.bool) for t in tasks}

    def __repr__(self) -> str:
        return (f"SceneDataset(split={self.split!r}, n={len(self)}, size={self.config.size}, "
                f"tasks={self.tasks})")
