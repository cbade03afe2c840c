"""
Mask generators M. Each returns a bool array (H, W) over the patch grid, True = masked.
"""
import math

import numpy as np

BEIT_RATIO = 75 / 196  # BEiT / BEiT v2: 75 of 196 patches
BEIT_MIN_BLOCK = 16    # smallest block on the 14 x 14 grid


def block_mask(height, width, ratio, rng, min_aspect=0.3):
    """BEiT block-wise masking: add rectangles of >= min_block patches with aspect ratio
    log-uniform in [min_aspect, 1/min_aspect] (10 placement tries each) until round(ratio * N)
    patches are masked, then add random patches if the blocks fell short, so the count is exact
    (BEiT v2).
    The smallest block scales with the grid: 16 patches on 14 x 14."""
    N = height * width
    target = int(round(ratio * N))
    min_block = max(1, int(round(BEIT_MIN_BLOCK * N / 196)))
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < target:
        budget = target - count
        added = 0
        for _ in range(10):
            # like random.uniform: budget may be < min_block
            area = min_block + (budget - min_block) * rng.random()
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < h < height and 0 < w < width:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                region = mask[top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= budget:
                    region[:] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    if count < target:  # blocks never overshoot (new <= budget); top up with random patches
        flat = mask.reshape(-1)  # a view: writes go to mask
        flat[rng.choice(np.flatnonzero(~flat), target - count, replace=False)] = True
    return mask


def random_mask(height, width, ratio, rng):
    """Exactly round(ratio * N) patches chosen uniformly at random."""
    N = height * width
    mask = np.zeros(N, dtype=bool)
    mask[rng.permutation(N)[:int(round(ratio * N))]] = True
    return mask.reshape(height, width)


class MaskGenerator:
    """Picklable callable rng -> (grid, grid) bool mask, for DataLoader workers."""

    def __init__(self, kind, grid, ratio):
        if kind not in ("block", "random"):
            raise ValueError(f"unknown mask kind '{kind}': choose block or random")
        if not 0 < ratio < 1:
            raise ValueError(f"mask ratio {ratio} must be in (0, 1)")
        masked = int(round(ratio * grid * grid))  # the count both generators mask exactly
        if not 0 < masked < grid * grid:
            raise ValueError(f"mask ratio {ratio} masks {masked} of the {grid * grid} patches: the loss needs "
                             f"masked patches and the student visible ones; choose a ratio that rounds to 1 to "
                             f"{grid * grid - 1} of them")
        self.kind, self.grid, self.ratio = kind, grid, ratio

    def __call__(self, rng):
        fn = block_mask if self.kind == "block" else random_mask
        return fn(self.grid, self.grid, self.ratio, rng)
