"""
Image loading for every script. Images leave as float tensors in [0, 1], (3, H, W); masks as
bool (N,) over patches, True = masked.

Randomness is per sample: the sampler yields (index, epoch) and the dataset seeds a
generator with (seed, epoch, index), so augmentations and masks do not depend on the number
of workers, and a resumed run sees exactly the samples an uninterrupted run would have.
"""
import math
import os
import signal
import sys

import numpy as np
import torch
from PIL import Image, ImageEnhance


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
Image.MAX_IMAGE_PIXELS = 20000 * 20000  # allow large photos; a decompression bomb beyond is skipped


class DataError(ValueError):
    """Bad data input; the message is one line that names the path and the fix."""


def resolve_data_dir(data_dir):
    """'embedded' -> the generated embedded dataset (made on first use); else a directory."""
    if data_dir == "embedded":
        from data.embedded import ensure_embedded
        return ensure_embedded()
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory '{data_dir}' not found: give an ImageFolder root (with train/ and val/) or 'embedded'")
    return data_dir


def load_image(path):
    """Decode to 8-bit RGB: grayscale, palette, CMYK and alpha (composited on white) included;
    16-bit images are scaled, not clipped."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (1024, 1024))  # decode large JPEGs at reduced size: fast and small
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr / (65535.0 if arr.max() > 255 else 255.0) * 255, 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


# ----------------------------------------------------------------------------------------
# transforms: callables (PIL image, numpy Generator) -> PIL image

def random_resized_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Box (left, top, right, bottom) of area fraction ~U(scale) and log-uniform aspect ratio;
    10 tries, then the largest center crop with a clamped ratio (torchvision's algorithm)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def color_jitter(img, rng, strength):
    """brightness, contrast and saturation factors ~U(1-s, 1+s), applied in random order"""
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for i in rng.permutation(3):
        img = enhancers[i](img).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return img


class TrainTransform:
    """RandomResizedCrop (bicubic) -> horizontal flip -> color jitter -> optional `extra`
    (PIL, rng) -> PIL (RandAugment for fine-tuning) -> tensor in [0, 1] -> optional
    `tensor_extra` (tensor, rng) -> tensor (random erasing)."""

    def __init__(self, size, min_scale=0.08, flip=0.5, jitter=0.4, extra=None, tensor_extra=None):
        self.size, self.min_scale, self.flip, self.jitter = size, min_scale, flip, jitter
        self.extra, self.tensor_extra = extra, tensor_extra

    def __call__(self, img, rng):
        box = random_resized_crop_box(*img.size, rng, scale=(self.min_scale, 1.0))
        img = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if rng.random() < self.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.jitter > 0:
            img = color_jitter(img, rng, self.jitter)
        if self.extra is not None:
            img = self.extra(img, rng)
        image = to_tensor(img)
        return self.tensor_extra(image, rng) if self.tensor_extra is not None else image


class EvalTransform:
    """Resize the short side to size / crop_pct (bicubic), center crop size x size."""

    def __init__(self, size, crop_pct=0.875):
        self.size, self.crop_pct = size, crop_pct

    def __call__(self, img, rng=None):
        short = int(math.floor(self.size / self.crop_pct))
        w, h = img.size
        if (w, h) != (self.size, self.size):
            scale = short / min(w, h)
            img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        return to_tensor(img)


# ----------------------------------------------------------------------------------------
# dataset, sampler, loader

class ImageFolder(torch.utils.data.Dataset):
    """root/class_name/image.ext. Items are keyed by (index, epoch) and return
    (image (3, H, W), label, mask (N,) or None), or None for an unreadable file (reported)."""

    def __init__(self, root, transform, mask_fn=None, seed=0):
        if not os.path.isdir(root):
            raise DataError(f"image folder '{root}' not found: expected root/class_name/image.jpg")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.samples = [(os.path.join(dirpath, f), label)
                        for label, c in enumerate(self.classes)
                        for dirpath, _, files in sorted(os.walk(os.path.join(root, c)))
                        for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise DataError(f"no images found under '{root}': expected root/class_name/image.jpg ({', '.join(IMAGE_EXTENSIONS)})")
        self.root, self.transform, self.mask_fn, self.seed = root, transform, mask_fn, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            img = load_image(path)
        except Exception as e:  # corrupt, truncated, empty, not an image: skip it, never crash the run
            print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})", file=sys.stderr)
            return None
        image = self.transform(img, rng)
        mask = torch.from_numpy(self.mask_fn(rng)).flatten() if self.mask_fn is not None else None
        return image, label, mask


def collate(batch):
    """-> (images (B, 3, H, W), labels (B,), masks (B, N) or None, number of skipped files)"""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, None, skipped
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good])
    masks = torch.stack([b[2] for b in good]) if good[0][2] is not None else None
    return images, labels, masks, skipped


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) for this rank. Training: a seeded permutation per epoch, cut to a
    multiple of the world size, rank r takes positions r, r + world, ... Eval (shuffle=False,
    drop_last=False): in order, no padding, so every sample is seen exactly once over all ranks.
    set_epoch(epoch, start) also skips this rank's first `start` samples (for resume)."""

    def __init__(self, n, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True):
        self.n, self.rank, self.world_size, self.shuffle, self.seed, self.drop_last = n, rank, world_size, shuffle, seed, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[:self.n - self.n % self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.indices()[self.start:]])

    def __len__(self):
        return len(self.indices()) - self.start


def leave_sigterm_to_main(worker_id):
    """A loader worker ignores SIGTERM (a scheduler may signal the whole process group): the main
    process saves, stops, and shuts its workers down itself"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size, train, rank=0, world_size=1, seed=0, num_workers=2, num_samples=0):
    """num_samples > 0 uses only the first num_samples items (a fixed eval subset)"""
    n = min(num_samples, len(dataset)) if num_samples > 0 else len(dataset)
    sampler = EpochSampler(n, rank, world_size, shuffle=train, seed=seed, drop_last=train)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, collate_fn=collate,
                                         drop_last=train, pin_memory=torch.cuda.is_available(),
                                         worker_init_fn=leave_sigterm_to_main)
    return loader, sampler

