"""Benchmark the procedural scene renderer and save a PNG grid of samples to look at.

Usage: python bench/render.py [grid.png] [--n 1000] [--size 64] [--rows 6] [--threads N]
Prints images/s for an uncached render; the grid shows image | segmentation | depth | normals.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from amtl.data.scenes import CLASSES, SceneConfig, render_scenes

# One colour per class (floor, wall, ceiling, sphere, box, cylinder); ignore is black.
PALETTE = np.array([[140, 110, 80], [90, 140, 200], [230, 230, 120],
                    [220, 60, 60], [60, 190, 90], [170, 80, 200]], dtype=np.uint8)


def grid(out: dict[str, torch.Tensor], rows: int, scale: int = 4, max_depth: float = 8.0) -> Image.Image:
    """Tile ``rows`` samples as image | segmentation (+ boxes) | depth | normals, upscaled."""
    tiles = []
    for i in range(rows):
        img = out["image"][i].permute(1, 2, 0).numpy()
        seg = out["segmentation"][i].numpy()
        seg_rgb = np.zeros_like(img)
        valid = seg != 255
        seg_rgb[valid] = PALETTE[seg[valid]]
        for (x0, y0, x1, y1) in out["boxes"][i, : int(out["box_counts"][i])].tolist():
            seg_rgb[y0, x0:x1] = seg_rgb[y1 - 1, x0:x1] = 255
            seg_rgb[y0:y1, x0] = seg_rgb[y0:y1, x1 - 1] = 255
        depth = out["depth"][i, 0].float().numpy()
        depth_rgb = np.repeat((np.clip(depth / max_depth, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)
        normal = out["normal"][i].float().permute(1, 2, 0).numpy()
        normal_rgb = np.where(np.abs(normal).sum(-1, keepdims=True) > 0, (normal + 1) * 127.5, 0).astype(np.uint8)
        tiles.append(np.concatenate([img, seg_rgb, depth_rgb, normal_rgb], axis=1))
    arr = np.concatenate(tiles, axis=0)
    return Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("grid", nargs="?", default=None, help="path of the PNG grid to write")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is fastest on a busy shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SceneConfig(size=args.size)
    render_scenes(8, config, seed=args.seed + 1)  # warm-up
    start = time.perf_counter()
    out = render_scenes(args.n, config, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(f"rendered {args.n} images at {args.size}x{args.size} in {elapsed:.2f} s: "
          f"{args.n / elapsed:.0f} images/s ({torch.get_num_threads()} threads)")
    seg = out["segmentation"]
    shares = ", ".join(f"{name} {(seg == i).float().mean():.3f}" for i, name in enumerate(CLASSES))
    print(f"pixel shares: {shares}, invalid {(seg == 255).float().mean():.3f}; "
          f"boxes/image {out['box_counts'].float().mean():.2f}")
    if args.grid:
        grid(out, min(args.rows, args.n)).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
