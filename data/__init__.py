"""
Image loading for every script. Images leave as float tensors in [0, 1], (3, H, W); masks as
bool (N,) over patches, True = masked.

Randomness is per sample: the sampler yields (index, epoch) and the dataset seeds a
generator with (seed, epoch, index), so augmentations and masks do not depend on the number
of workers, and a resumed run sees exactly the samples an uninterrupted run would have.
"""
import atexit
import math
import multiprocessing
import os
import signal
import stat
import sys

import numpy as np
import torch
from PIL import Image, ImageEnhance, UnidentifiedImageError


# torchvision's
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# load_image refuses to decode more pixels than this (300 MB as RGB): a decompression bomb, a
# small file whose header says 21000 x 21000, is skipped unread. The check is on the size it
# would decode, after JPEG's reduced decoding, so PIL's own check (on the header) is off.
MAX_PIXELS = 10_000 * 10_000
Image.MAX_IMAGE_PIXELS = None


class DataError(ValueError):
    """Bad data input; the message is one line that names the path and the fix."""


def resolve_data_dir(data_dir):
    """'embedded' -> the generated embedded dataset (made on first use); else a directory."""
    if data_dir == "embedded":
        from data.embedded import ensure_embedded
        return ensure_embedded()
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory '{data_dir}' not found: give an ImageFolder root (with train/ and "
                        f"val/) or 'embedded'")
    return data_dir


def open_regular_file(path):
    """The file opened for reading, if it is a regular file (or a link to one). Opening does not
    block (O_NONBLOCK), so a named pipe with an image's name is refused instead of hanging."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"'{path}' is not a regular file (a named pipe, socket or device)")
    return os.fdopen(fd, "rb")


def float_to_uint8(arr):
    """A float image -> 8 bits: values within [0, 1] times 255; any other range mapped linearly
    from [min, max] to [0, 255] (NaN as the minimum, inf as the extremes)."""
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    return np.round((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)


def load_image(path):
    """Decode to 8-bit RGB: grayscale, palette, CMYK and alpha (composited on white) included.
    16-bit grayscale (PIL's 'I;16*' modes; 'I' from PNG or PPM, which PIL opens so too) has full
    scale 65535 whatever its pixel values: v -> round(v / 65535 * 255). 32-bit integer ('I', e.g.
    TIFF) and float ('F') images have no standard full scale and go through float_to_uint8.
    Raises for anything that is not a regular file and for more than MAX_PIXELS to decode."""
    with open_regular_file(path) as f, Image.open(f) as img:
        if img.format == "JPEG":
            img.draft("RGB", (1024, 1024))  # decode large JPEGs at reduced size: fast and small
        width, height = img.size  # from the header (and the JPEG reduction): nothing decoded yet
        if width * height > MAX_PIXELS:
            raise DataError(f"'{path}' is {width} x {height} pixels, more than MAX_PIXELS = "
                            f"{MAX_PIXELS} (a decompression bomb?): not decoded")
        img.load()
        if img.mode.startswith("I;16") or (img.mode == "I" and img.format in ("PNG", "PPM")):  # 16 bits
            img = Image.fromarray(np.round(np.asarray(img, dtype=np.float64) / 65535 * 255).astype(np.uint8))
        if img.mode in ("I", "F"):
            img = Image.fromarray(float_to_uint8(np.asarray(img, dtype=np.float64)))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def to_tensor(img):
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


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
    """Resize the short side to size / crop_pct (bicubic), center crop size x size, with
    torchvision's rounding (Resize(int) then CenterCrop: timm's eval transform). An image already
    size x size passes unchanged where keep_exact_size: by default only at size <= 32 (the
    embedded set), as BEiT's build_transform leaves input_size <= 32 unresized; at every size for
    the benchmark stimuli of shape bias and OOD, which model-vs-human's loader feeds whole (no
    resize for its 224 px datasets)."""

    def __init__(self, size, crop_pct=0.875, keep_exact_size=None):
        self.size, self.crop_pct = size, crop_pct
        self.keep_exact_size = size <= 32 if keep_exact_size is None else keep_exact_size

    def __call__(self, img, rng=None):
        short = int(math.floor(self.size / self.crop_pct))
        w, h = img.size
        if self.keep_exact_size and (w, h) == (self.size, self.size):
            return to_tensor(img)
        new_size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(new_size, Image.BICUBIC)
        w, h = img.size
        left, top = int(round((w - self.size) / 2)), int(round((h - self.size) / 2))
        return to_tensor(img.crop((left, top, left + self.size, top + self.size)))


# ----------------------------------------------------------------------------------------
# dataset, sampler, loader

def image_files(folder):
    """The regular files (or links to one) with an image extension under folder, in the order
    of sorted(os.walk(folder, followlinks=True)), as torchvision's ImageFolder lists them: links
    to folders are followed (a dataset assembled from linked folders), each real folder once (a
    link back to a parent is no loop). Named pipes, sockets and devices are not images, and hidden
    entries (names starting with '.': .ipynb_checkpoints, macOS's ._x.jpg) are skipped. The file
    type comes from the directory listing (a stat only for links), cheap for a million files."""
    names = {}  # directory -> its image file names
    pending, seen = [folder], {os.path.realpath(folder)}
    while pending:
        directory = pending.pop()
        names[directory] = []
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            raise DataError(f"cannot list '{directory}' ({e.strerror or e})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if real not in seen:
                    seen.add(real)
                    pending.append(entry.path)
            elif entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                names[directory].append(entry.name)
    return [os.path.join(d, name) for d in sorted(names) for name in sorted(names[d])]


class ImageFolder(torch.utils.data.Dataset):
    """root/class_name/image.ext; hidden folders are no classes, and a class folder without
    images is an error. Items are keyed by (index, epoch) and return (image (3, H, W), label,
    mask (N,) or None), or None for an unreadable file (reported)."""

    def __init__(self, root, transform, mask_fn=None, seed=0):
        if not os.path.isdir(root):
            raise DataError(f"image folder '{root}' not found: expected root/class_name/image.jpg")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        files = [image_files(os.path.join(root, c)) for c in self.classes]
        self.samples = [(path, label) for label, paths in enumerate(files) for path in paths]
        if not self.samples:
            raise DataError(f"no images found under '{root}': expected root/class_name/image.jpg "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        empty = [c for c, paths in zip(self.classes, files) if not paths]
        if empty:
            raise DataError(f"class folder(s) {', '.join(empty)} under '{root}' hold no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder(s)")
        self.root, self.transform, self.mask_fn, self.seed = root, transform, mask_fn, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            img = load_image(path)
        except Exception as e:  # corrupt, truncated, empty, not an image: skip it, never crash
            # PIL names the open file object, not the path: "cannot identify image file <_io...>"
            unknown = isinstance(e, UnidentifiedImageError)
            reason = "not an image format PIL can read" if unknown else f"{type(e).__name__}: {e}"
            print(f"warning: skipping unreadable image {path} ({reason})", file=sys.stderr)
            return None
        image = self.transform(img, rng)
        mask = torch.from_numpy(self.mask_fn(rng)).flatten() if self.mask_fn is not None else None
        return image, label, mask


def check_same_classes(train_set, val_set, root):
    """DataError naming the classes only in train/ and only in val/, where they differ"""
    train, val = set(train_set.classes), set(val_set.classes)
    if train != val:
        raise DataError(f"train/ and val/ under '{root}' have different classes: only in train/: "
                        f"{', '.join(sorted(train - val)) or 'none'}; only in val/: "
                        f"{', '.join(sorted(val - train)) or 'none'}: give both the same class folders")


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
    set_epoch(epoch, start) also skips this rank's first `start` samples (for resume).
    subset: the dataset indices that positions 0..n-1 stand for (default: the indices 0..n-1)."""

    def __init__(self, n, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True, subset=None):
        self.n, self.rank, self.world_size = n, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.subset = subset
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 100003 + self.epoch) % 2 ** 64)  # its range
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[:self.n - self.n % self.world_size]
        mine = order[self.rank::self.world_size]
        return mine if self.subset is None else [self.subset[i] for i in mine]

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.indices()[self.start:]])

    def __len__(self):
        return len(self.indices()) - self.start


def quiet_when_main_is_gone(kind, value, traceback):
    """A loader worker's sys.excepthook: a connection to the main process that broke (the main
    process stopped on Ctrl-C while a worker's thread was handing it a batch's shared memory) is
    not an error of the run and prints nothing; anything else prints as usual."""
    if not issubclass(kind, (BrokenPipeError, ConnectionResetError)):
        sys.__excepthook__(kind, value, traceback)


def init_worker(worker_id):
    """A loader worker ignores SIGTERM and SIGINT (a scheduler, or Ctrl-C in a terminal, signals the
    whole process group): the main process saves or stops, and shuts its workers down itself. A
    worker that ended on the signal first would otherwise turn the stop into a DataLoader error,
    and a worker whose main process left mid-transfer would print a traceback after the stop's one
    line."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = quiet_when_main_is_gone


def kill_workers_left():
    """At exit: loader workers still alive (the run ended on an error while its loader was still
    referenced, e.g. by the traceback) ignore the SIGTERM that multiprocessing's own exit handler
    sends them before it joins them, so the process would wait for them forever; SIGKILL ends them.
    Registered after multiprocessing's handler (torch imports it first), so it runs before it.
    torch's SIGCHLD handler, which reports a killed worker as an error, is put back first."""
    workers = [w for w in multiprocessing.active_children() if w.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()


atexit.register(kill_workers_left)


def make_loader(dataset, batch_size, train, rank=0, world_size=1, seed=0, num_workers=2, num_samples=0):
    """num_samples > 0 uses only num_samples items (a fixed eval subset): drawn at random with the seed,
    the same ones at every call, not the first ones (an ImageFolder lists its images class by class)"""
    n, subset = len(dataset), None
    if 0 < num_samples < len(dataset):
        drawn = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples]
        n, subset = num_samples, drawn.sort().values.tolist()  # read in file order
    sampler = EpochSampler(n, rank, world_size, shuffle=train, seed=seed, drop_last=train, subset=subset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, collate_fn=collate,
                                         drop_last=train, pin_memory=torch.cuda.is_available(),
                                         worker_init_fn=init_worker)
    return loader, sampler

