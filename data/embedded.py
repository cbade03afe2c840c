"""
The embedded default dataset: 32 x 32 images of six shapes filled with six textures,
generated offline in seconds, deterministic from a seed.

  train/<shape>/     each class drawn with its own texture (shape and texture both predict it)
  val/<shape>/       held-out images of the same kind
  cue_conflict/<shape>/<shape>NNNN_<texture-class>.png
                     the shape of one class filled with the texture of another class (every
                     pair, agreeing pairs included, as in the texture-vs-shape stimuli)

    python -m data.embedded [--root=DIR]   # normally made on first use by the scripts
"""
import os
import shutil
import sys

import numpy as np
from PIL import Image

from common import exclusive

CLASSES = ("circle", "square", "triangle", "cross", "ring", "star")
TEXTURES = ("hstripes", "vstripes", "checker", "dots", "diagonal", "waves")  # class i's texture in train
SIZE = 32
VERSION = 1  # bump when the generator changes, so cached copies are rebuilt
DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
SPLITS = {"train": 400, "val": 100}  # images per class
CUE_CONFLICT_PER_PAIR = 8


def shape_mask(kind, u, v):
    """u, v: coordinates in units of the shape's radius, centered and rotated -> bool"""
    r = np.hypot(u, v)
    if kind == "circle":
        return r < 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if kind == "triangle":  # equilateral: three half-planes
        return (v > -0.5) & (np.sqrt(3) * u + v < 1.0) & (-np.sqrt(3) * u + v < 1.0)
    if kind == "cross":
        return ((np.abs(u) < 0.32) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.32) & (np.abs(u) < 1.0))
    if kind == "ring":
        return (r < 1.0) & (r > 0.55)
    if kind == "star":  # five points
        return r < 0.55 + 0.45 * np.cos(5 * np.arctan2(v, u))
    raise ValueError(kind)


def texture(kind, x, y, rng):
    """x, y: pixel coordinates -> bool pattern (which of two colors)"""
    period = rng.uniform(3.5, 5.0)
    phase = rng.uniform(0, 2 * np.pi)
    w = 2 * np.pi / period
    if kind == "hstripes":
        return np.sin(w * y + phase) > 0
    if kind == "vstripes":
        return np.sin(w * x + phase) > 0
    if kind == "checker":
        return (np.sin(w * x + phase) > 0) ^ (np.sin(w * y + phase) > 0)
    if kind == "dots":
        return np.sin(w * x + phase) * np.sin(w * y + phase) > 0.4
    if kind == "diagonal":
        return np.sin(w * (x + y) / np.sqrt(2) + phase) > 0
    if kind == "waves":  # concentric rings around a random center
        cx, cy = rng.uniform(0, SIZE, 2)
        return np.sin(w * np.hypot(x - cx, y - cy) + phase) > 0
    raise ValueError(kind)


def draw(shape, tex, rng):
    """-> (SIZE, SIZE, 3) uint8: textured shape on a noisy plain background"""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    cx, cy = rng.uniform(11, 21, 2)
    radius = rng.uniform(9, 13)
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
    inside = shape_mask(shape, u, v)
    pattern = texture(tex, x, y, rng)
    dark, light = rng.uniform(0, 90, 3), rng.uniform(165, 255, 3)
    fg = np.where(pattern[..., None], light, dark)
    bg = rng.uniform(60, 200, 3) + rng.normal(0, 8, (SIZE, SIZE, 3))
    img = np.where(inside[..., None], fg, bg)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(root, seed=0, splits=SPLITS, per_pair=CUE_CONFLICT_PER_PAIR):
    """Write every split under root (atomically: a temp dir, then rename)."""
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for c, name in enumerate(CLASSES):
            os.makedirs(os.path.join(tmp, split, name))
            for k in range(per_class):
                path = os.path.join(tmp, split, name, f"{name}{k:04d}.png")
                Image.fromarray(draw(name, TEXTURES[c], rng)).save(path)
    for s, shape in enumerate(CLASSES):
        os.makedirs(os.path.join(tmp, "cue_conflict", shape))
        for t, tex_class in enumerate(CLASSES):
            for k in range(per_pair):
                img = draw(shape, TEXTURES[t], rng)
                file_name = f"{shape}{t * per_pair + k:04d}_{tex_class}.png"
                Image.fromarray(img).save(os.path.join(tmp, "cue_conflict", shape, file_name))
    with open(os.path.join(tmp, "VERSION"), "w") as f:
        f.write(f"{VERSION} {seed}\n")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


def ensure_embedded(root=DEFAULT_ROOT, seed=0):
    """The dataset's root, generated first if missing or out of date. Processes that start together
    (torchrun's ranks, two demos) take turns on a lock beside root: one generates, the others find it."""
    marker = os.path.join(root, "VERSION")

    def current():
        return os.path.exists(marker) and open(marker).read().strip() == f"{VERSION} {seed}"

    if not current():
        os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)  # the lock file's folder
        with exclusive(root + ".lock"):
            if not current():  # not made by another process while this one waited
                print(f"generating the embedded dataset in {root} ...", file=sys.stderr)
                generate(root, seed)
    return root


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    print(ensure_embedded(args.get("root", DEFAULT_ROOT)))
