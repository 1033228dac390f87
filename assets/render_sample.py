"""Render assets/sample.png: a small room corner with a sphere and a box, ray-cast with Lambert shading.

A rendered scene (not a photograph) so the repository owns every pixel. Run: python assets/render_sample.py
"""

from pathlib import Path

import numpy as np
from PIL import Image

W, H, FOCAL = 256, 192, 220.0
LIGHT = np.array([-0.4, -0.8, -0.45]) / np.linalg.norm([-0.4, -0.8, -0.45])


def render() -> np.ndarray:
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    dirs = np.stack([(xs - W / 2) / FOCAL, (ys - H / 2) / FOCAL, np.ones_like(xs)], axis=-1)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    t_best = np.full((H, W), np.inf)
    normal = np.zeros((H, W, 3))
    albedo = np.zeros((H, W, 3))

    def hit(t: np.ndarray, n: np.ndarray, colour: np.ndarray) -> None:
        closer = (t > 1e-6) & (t < t_best)
        t_best[closer] = t[closer]
        normal[closer] = n[closer] if n.ndim == 3 else n
        albedo[closer] = colour[closer] if colour.ndim == 3 else colour

    # floor y = 1 with a checker texture, back wall z = 6, left wall x = -2.5
    t = np.where(dirs[..., 1] > 0, 1.0 / np.maximum(dirs[..., 1], 1e-9), np.inf)
    p = dirs * t[..., None]
    checker = ((np.floor(p[..., 0] * 1.5) + np.floor(p[..., 2] * 1.5)) % 2)[..., None]
    hit(t, np.array([0.0, -1.0, 0.0]), 0.55 + 0.3 * checker * np.array([1.0, 0.9, 0.7]))
    t = 6.0 / np.maximum(dirs[..., 2], 1e-9)
    stripes = (0.5 + 0.5 * np.sin((dirs * t[..., None])[..., 0] * 3.0))[..., None]
    hit(t, np.array([0.0, 0.0, -1.0]), 0.45 + 0.25 * stripes * np.array([0.6, 0.8, 1.0]))
    t = np.where(dirs[..., 0] < 0, -2.5 / np.minimum(dirs[..., 0], -1e-9), np.inf)
    hit(t, np.array([1.0, 0.0, 0.0]), np.array([0.75, 0.55, 0.45]))
    # sphere
    centre, radius = np.array([0.7, 0.35, 3.6]), 0.65
    b = dirs @ centre
    disc = b**2 - (centre @ centre - radius**2)
    t = np.where(disc > 0, b - np.sqrt(np.maximum(disc, 0)), np.inf)
    n = dirs * t[..., None] - centre
    hit(t, n / np.linalg.norm(n, axis=-1, keepdims=True), np.array([0.85, 0.25, 0.2]))
    # axis-aligned box (slab test)
    lo, hi = np.array([-1.6, 0.2, 3.2]), np.array([-0.7, 1.0, 4.2])
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = lo / dirs, hi / dirs
    tmin = np.minimum(t1, t2).max(axis=-1)
    tmax = np.maximum(t1, t2).min(axis=-1)
    t = np.where(tmax >= tmin, tmin, np.inf)
    axis = np.minimum(t1, t2).argmax(axis=-1)
    n = -np.sign(dirs) * np.eye(3)[axis]
    hit(t, n, np.array([0.3, 0.55, 0.85]))

    shade = 0.25 + 0.75 * np.clip(normal @ -LIGHT, 0, 1)[..., None]
    fog = np.exp(-0.04 * np.where(np.isfinite(t_best), t_best, 50))[..., None]
    return np.clip(albedo * shade * fog + (1 - fog) * 0.7, 0, 1)


if __name__ == "__main__":
    out = Path(__file__).with_name("sample.png")
    with np.errstate(all="ignore"):  # rays that miss a surface give inf/nan, masked out by the depth test
        rgb = render()
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(out)
    print(f"wrote {out}")
