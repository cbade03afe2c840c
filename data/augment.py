"""
Fine-tuning augmentations with timm's semantics, on PIL images with an explicit numpy
Generator (so they are reproducible per sample): RandAugment, random erasing, mixup/cutmix.
"""
import math
import re

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

# RandAugment "rand-m9-mstd0.5-inc1" (timm):
#   n = 2 ops per image, chosen uniformly with replacement from the 15 "increasing" ops below;
#   each op is applied with probability 0.5;
#   magnitude m ~ Normal(9, 0.5) drawn per applied op, clipped to [0, 10]; level = m / 10;
#   ops whose severity grows with the level ("inc1"):
#     AutoContrast, Equalize, Invert                      (no magnitude)
#     Rotate        +-30 deg x level                       (random sign, bicubic, mean-color fill)
#     ShearX/Y      +-0.3 x level                          (affine shear)
#     TranslateX/YRel +-0.45 x level x image size pixels
#     Posterize     keep 4 - int(4 level) bits
#     Solarize      invert pixels >= 256 - int(256 level)
#     SolarizeAdd   add min(128, int(110 level)) to pixels < 128
#     Color/Contrast/Brightness/Sharpness  factor max(0.1, 1 +- 0.9 level)
FILL = (124, 116, 104)  # ImageNet mean as 8-bit color, timm's fill for geometric ops


def _sign(rng):
    return -1.0 if rng.random() > 0.5 else 1.0


def _affine(img, matrix):
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL)


def _posterize(img, bits):
    """keep the `bits` most significant bits (0 bits: black, which PIL's posterize refuses)"""
    mask = (0xFF << (8 - bits)) & 0xFF
    return img.point([v & mask for v in range(256)] * len(img.getbands()))


def _solarize_add(img, add):
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhance(enhancer):
    """an ImageEnhance op with timm's factor for the *Increasing ops: 1 +/- 0.9 level, at least 0.1"""
    return lambda img, level, rng: enhancer(img).enhance(max(0.1, 1 + _sign(rng) * 0.9 * level))


def _solarize(img, level, rng):
    return ImageOps.solarize(img, 256 - min(256, int(256 * level)))


def _rotate(img, level, rng):
    return img.rotate(_sign(rng) * 30.0 * level, resample=Image.BICUBIC, fillcolor=FILL)


def _translate(img, level, rng, axis):
    shift = _sign(rng) * 0.45 * level * img.size[axis]  # a fraction of the image size
    return _affine(img, (1, 0, shift, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, shift))


RAND_OPS = {
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Invert": lambda img, level, rng: ImageOps.invert(img),
    "Rotate": _rotate,
    "PosterizeIncreasing": lambda img, level, rng: _posterize(img, 4 - int(4 * level)),
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": lambda img, level, rng: _solarize_add(img, min(128, int(110 * level))),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, level, rng: _affine(img, (1, _sign(rng) * 0.3 * level, 0, 0, 1, 0)),
    "ShearY": lambda img, level, rng: _affine(img, (1, 0, 0, _sign(rng) * 0.3 * level, 1, 0)),
    "TranslateXRel": lambda img, level, rng: _translate(img, level, rng, 0),
    "TranslateYRel": lambda img, level, rng: _translate(img, level, rng, 1),
}


class RandAugment:
    """timm-style RandAugment from a spec like 'rand-m9-mstd0.5-inc1' (only the increasing
    op set is implemented: inc1 is required)."""

    def __init__(self, spec):
        parts = spec.split("-")
        if parts[0] != "rand" or "inc1" not in parts[1:]:
            raise ValueError(f"unsupported RandAugment spec '{spec}': use rand-m<M>[-mstd<S>][-n<N>]-inc1")
        self.magnitude, self.magnitude_std, self.num_ops, self.prob = 10.0, 0.0, 2, 0.5
        for part in parts[1:]:
            key, value = re.match(r"([a-z]+)([\d.]*)", part).groups()
            if key == "m":
                self.magnitude = float(value)
            elif key == "mstd":
                self.magnitude_std = float(value)
            elif key == "n":
                self.num_ops = int(value)
            elif key != "inc":
                raise ValueError(f"unsupported RandAugment option '{part}' in '{spec}'")
        self.names = list(RAND_OPS)

    def __call__(self, img, rng):
        for i in rng.integers(0, len(self.names), self.num_ops):
            if rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = rng.normal(self.magnitude, self.magnitude_std)
            img = RAND_OPS[self.names[i]](img, max(0.0, min(10.0, m)) / 10.0, rng)
        return img


class RandomErasing:
    """timm RandomErasing, mode 'pixel' (timm/data/random_erasing.py): with probability prob,
    n ~ U{1..count} rectangles (n = 1 when count is 1), each of area fraction ~U(min_area,
    max_area) / n and log-uniform aspect in [0.3, 1/0.3] (10 tries each), are filled with
    per-pixel Normal noise in the model's normalized space, i.e. mean + std * N(0, 1) in [0, 1]
    space, since the model normalizes its own input. image: (3, H, W) float."""

    def __init__(self, prob, mean, std, count=1, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
        self.prob, self.count, self.min_aspect = prob, count, min_aspect
        self.area = (min_area, max_area)
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image, rng):
        if rng.random() >= self.prob:
            return image
        _, H, W = image.shape
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        count = 1 if self.count == 1 else int(rng.integers(1, self.count + 1))
        for _ in range(count):
            for _ in range(10):
                area = H * W * rng.uniform(*self.area) / count
                aspect = math.exp(rng.uniform(*log_aspect))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if h < H and w < W:
                    top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
                    noise = torch.from_numpy(rng.standard_normal((3, h, w))).float()
                    image[:, top:top + h, left:left + w] = self.mean + self.std * noise
                    break
        return image


def smooth_one_hot(labels, num_classes, smoothing):
    """soft targets (B, C): 1 - smoothing + smoothing / C at the label, smoothing / C elsewhere"""
    one_hot = torch.nn.functional.one_hot(labels, num_classes).float()
    return one_hot * (1 - smoothing) + smoothing / num_classes


def mixup_cutmix(images, targets, mixup_alpha, cutmix_alpha, generator=None):
    """Batch mixing (timm Mixup, mode 'batch', 50/50 between the two when both are on):
    images are mixed with the flipped batch; targets (B, C) soft labels likewise with lam."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator))).beta(alpha, alpha))
    flipped = images.flip(0)
    if use_cutmix:
        H, W = images.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy = int(torch.randint(0, H, (1,), generator=generator))
        cx = int(torch.randint(0, W, (1,), generator=generator))
        # timm's rand_bbox: an odd cut keeps its extra pixel on the far side
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, W)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually kept
    else:
        images = lam * images + (1 - lam) * flipped
    return images, lam * targets + (1 - lam) * targets.flip(0)
