"""data/: masks, transforms, decoding of awkward files, sampling, the embedded dataset."""
import io
import os
import signal
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from data import (DataError, EpochSampler, EvalTransform, ImageFolder, TrainTransform, collate,
                  image_files, load_image, make_loader, random_resized_crop_box, resolve_data_dir)
from data.embedded import CLASSES, generate
from data.masks import BEIT_RATIO, MaskGenerator, block_mask, random_mask

from tests import forkserver


def masked_neighbours(mask):
    """mean number of masked 4-neighbours of a masked patch"""
    m = mask.astype(int)
    n = np.zeros_like(m)
    n[1:] += m[:-1]; n[:-1] += m[1:]; n[:, 1:] += m[:, :-1]; n[:, :-1] += m[:, 1:]
    return (n * m).sum() / m.sum()


def test_block_mask_count_and_blockiness():
    rng = np.random.default_rng(0)
    block = [block_mask(14, 14, BEIT_RATIO, rng) for _ in range(200)]
    rand = [random_mask(14, 14, BEIT_RATIO, rng) for _ in range(200)]
    assert all(m.shape == (14, 14) and m.dtype == bool and m.sum() == 75 for m in block + rand)
    # 75 random patches of 196: a masked patch has about 4 * 74/195 ~ 1.4 masked neighbours (less at the border);
    # BEiT blocks of >= 16 patches give far more
    assert np.mean([masked_neighbours(m) for m in rand]) < 1.6
    assert np.mean([masked_neighbours(m) for m in block]) > 2.5
    small = [block_mask(8, 8, BEIT_RATIO, rng) for _ in range(50)]
    assert all(m.sum() == round(BEIT_RATIO * 64) for m in small)


def test_random_mask_is_uniform():
    rng = np.random.default_rng(1)
    freq = np.mean([random_mask(8, 8, 0.25, rng) for _ in range(4000)], axis=0)
    assert np.abs(freq - 0.25).max() < 0.04  # 4000 draws: std of a frequency ~ 0.007


def test_mask_generator_rejects_bad_input():
    with pytest.raises(ValueError, match=r"mask ratio 1.5 must be in \(0, 1\)"):
        MaskGenerator("block", 14, 1.5)
    with pytest.raises(ValueError, match="unknown mask kind"):
        MaskGenerator("blocks", 14, 0.4)


def test_random_resized_crop_box_within_scale_and_ratio():
    rng = np.random.default_rng(2)
    for _ in range(500):
        l, t, r, b = random_resized_crop_box(200, 100, rng, scale=(0.2, 1.0))
        w, h = r - l, b - t
        assert 0 <= l and 0 <= t and r <= 200 and b <= 100
        if (w, h) != (133, 100) and (w, h) != (200, 100):  # not the fallback center crop
            assert 0.2 * 20000 * 0.9 <= w * h <= 20000 * 1.05
            assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_transforms_give_floats_in_unit_range():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    x = TrainTransform(32, 0.2)(img, np.random.default_rng(0))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    y = EvalTransform(32)(img)
    assert y.shape == (3, 32, 32)
    same = Image.fromarray(np.full((32, 32, 3), 51, dtype=np.uint8))
    assert torch.allclose(EvalTransform(32)(same), torch.full((3, 32, 32), 0.2))  # 51 / 255


@pytest.mark.parametrize("w, h, size",
                         [(300, 257, 224), (256, 259, 224), (224, 224, 224), (500, 375, 224), (33, 41, 32)])
def test_eval_transform_is_torchvisions_resize_and_center_crop(w, h, size):
    """timm's eval transform (Resize(size / 0.875) bicubic, CenterCrop(size)), pixel for pixel, for
    an image already size x size too (only at size <= 32 does such an image pass unchanged)"""
    T = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    reference = T.Compose([T.Resize(int(size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(size), T.ToTensor()])
    assert torch.equal(EvalTransform(size)(img), reference(img))


def test_same_seed_same_sample_regardless_of_order():
    tf = TrainTransform(32, 0.2)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    a = tf(img, np.random.default_rng([0, 1, 5]))
    tf(img, np.random.default_rng([0, 1, 6]))
    assert torch.equal(a, tf(img, np.random.default_rng([0, 1, 5])))


def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_awkward_images_decode(tmp_path):
    gray = save(Image.fromarray(np.full((8, 8), 100, dtype=np.uint8), "L"), tmp_path / "g.png")
    assert np.asarray(load_image(gray)).tolist() == np.full((8, 8, 3), 100).tolist()
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:4, ..., 3] = 255  # top half opaque red, bottom half transparent
    out = np.asarray(load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    assert out[0, 0].tolist() == [255, 0, 0] and out[7, 7].tolist() == [255, 255, 255]  # composited on white
    cmyk = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg")
    r, g, b = np.asarray(load_image(cmyk)).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert np.asarray(load_image(save(deep, tmp_path / "d.png"))).min() == 255  # scaled, not clipped to 255 by accident
    half = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert abs(int(np.asarray(load_image(save(half, tmp_path / "h.png")))[0, 0, 0]) - 128) <= 1
    pal = Image.new("P", (8, 8), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert np.asarray(load_image(save(pal, tmp_path / "p.png")))[0, 0].tolist() == [10, 20, 30]


def test_huge_jpeg_decodes_reduced(tmp_path):
    big = Image.new("RGB", (6000, 4000), (10, 200, 30))
    path = save(big, tmp_path / "big.jpg", quality=50)
    img = load_image(path)
    # JPEG draft mode: the strongest 1/2, 1/4, 1/8 reduction that keeps both sides >= 1024
    assert img.size == (3000, 2000)
    assert EvalTransform(224)(img).shape == (3, 224, 224)


def test_corrupt_files_are_skipped_with_their_path(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    save(Image.new("RGB", (16, 16), (1, 2, 3)), root / "a" / "good.png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (5, 5, 5)).save(buf, "JPEG")
    (root / "a" / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "text.png").write_text("not an image")
    ds = ImageFolder(str(root), EvalTransform(16))
    items = [ds[(i, 0)] for i in range(len(ds))]
    assert sum(item is None for item in items) == 3
    err = capsys.readouterr().err
    for name in ("truncated.jpg", "empty.jpg", "text.png"):
        assert f"skipping unreadable image {root / 'a' / name}" in err
    # PIL's own words name a file object ("<_io.BufferedReader name=12>"), which tells nothing
    assert f"{root / 'a' / 'text.png'} (not an image format PIL can read)" in err
    assert "_io." not in err
    images, labels, masks, skipped = collate(items)
    assert images.shape == (1, 3, 16, 16) and skipped == 3 and masks is None


@contextmanager
def fails_instead_of_hanging(seconds=60):
    """a call that blocks (opening a named pipe) raises here instead of hanging the suite"""
    def hung(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_only_regular_files_are_images(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    good = save(Image.new("RGB", (8, 8), (9, 9, 9)), root / "a" / "good.png")
    os.mkfifo(root / "a" / "pipe.jpg")  # opening it for reading would wait for a writer forever
    os.symlink(good, root / "a" / "link.png")  # a link to an image is an image
    os.symlink(root / "a" / "missing.png", root / "a" / "broken.png")
    ds = ImageFolder(str(root), EvalTransform(8))
    assert [path for path, _ in ds.samples] == [good, str(root / "a" / "link.png")]
    with fails_instead_of_hanging():
        with pytest.raises(DataError, match="pipe.jpg' is not a regular file"):
            load_image(str(root / "a" / "pipe.jpg"))
    os.remove(good)
    os.remove(root / "a" / "link.png")
    with pytest.raises(DataError, match=f"no images found under '{root}'"):  # a pipe is no image
        ImageFolder(str(root), EvalTransform(8))


def test_image_files_keep_the_order_of_os_walk(tmp_path):
    """the listing ImageFolder used before (sorted os.walk) is the reference order"""
    for sub in ("", "b", "b-c", "b/d", "B", "e.jpg.d"):
        (tmp_path / sub).mkdir(exist_ok=True)
        for name in ("z.png", "a.JPG", "m.txt"):
            (tmp_path / sub / name).write_bytes(b"")
    walk = sorted(os.walk(tmp_path))
    reference = [os.path.join(d, f) for d, _, files in walk for f in sorted(files)
                 if f.lower().endswith((".jpg", ".png"))]
    assert image_files(str(tmp_path)) == reference and len(reference) == 12


def test_linked_folders_and_pgm_files_are_listed_as_torchvision_lists_them(tmp_path):
    """a class folder with a link to a folder of images (a dataset assembled from links) and a .pgm
    file: the same samples as torchvision's ImageFolder (before: the linked images and the .pgm were
    left out without a word); a link back to a parent folder is listed once, no loop"""
    tv_folder = pytest.importorskip("torchvision.datasets").ImageFolder
    root, batch = tmp_path / "root", tmp_path / "batch"
    for folder in (root / "cat", root / "dog", batch):
        folder.mkdir(parents=True)
    for i in range(3):
        save(Image.new("RGB", (8, 8), (i, i, i)), batch / f"b{i}.png")
    save(Image.new("RGB", (8, 8)), root / "cat" / "a.png")
    os.symlink(batch, root / "cat" / "more")
    save(Image.new("RGB", (8, 8)), root / "dog" / "a.png")
    save(Image.new("L", (8, 8), 7), root / "dog" / "c.pgm")
    reference = [(path, label) for path, label in tv_folder(str(root)).samples]
    assert ImageFolder(str(root), EvalTransform(8)).samples == reference and len(reference) == 6
    # cat/more/back is cat again: torchvision's walk would not end
    os.symlink(root / "cat", batch / "back")
    assert ImageFolder(str(root), EvalTransform(8)).samples == reference
    assert load_image(str(root / "dog" / "c.pgm")).getpixel((0, 0)) == (7, 7, 7)


def bomb_png(path, side):
    """a valid 1-bit black PNG of side x side pixels, written row by row: 21000 x 21000 is a 54 kB
    file that decodes to 441 MB (1 byte per pixel in PIL) and 1.3 GB as RGB"""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then the packed bits
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind, body):  # length, type, data, CRC
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # size, 1 bit, grayscale
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return str(path)


def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024


def test_decompression_bomb_is_skipped_unread(tmp_path, capsys):
    small = bomb_png(tmp_path / "small.png", 40)
    assert np.asarray(load_image(small)).tolist() == np.zeros((40, 40, 3)).tolist()  # a valid PNG
    (tmp_path / "root" / "a").mkdir(parents=True)
    path = bomb_png(tmp_path / "root" / "a" / "bomb.png", 21000)
    assert os.path.getsize(path) < 100_000 and Image.open(path).size == (21000, 21000)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: the peak memory of this process restarts from what it uses now
        before = peak_rss_mb()
    except OSError:
        before = None
    with pytest.raises(DataError) as e:
        load_image(path)
    assert str(e.value) == (f"'{path}' is 21000 x 21000 pixels, more than MAX_PIXELS = 100000000 "
                            "(a decompression bomb?): not decoded")
    if before is not None:
        assert peak_rss_mb() - before < 100  # decoding would take 441 MB
    ds = ImageFolder(str(tmp_path / "root"), EvalTransform(8))
    assert ds[(0, 0)] is None and "skipping unreadable image" in capsys.readouterr().err


def test_float_tiff_is_scaled_not_black(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    unit = save(Image.fromarray(ramp, "F"), tmp_path / "unit.tif")
    assert Image.open(unit).mode == "F"
    assert np.asarray(Image.open(unit).convert("RGB")).max() <= 1  # PIL's own conversion: black
    out = np.asarray(load_image(unit))
    assert out.shape == (8, 8, 3) and np.abs(out[..., 1] - np.round(ramp * 255)).max() == 0
    wide = np.linspace(-3, 5, 64, dtype=np.float32).reshape(8, 8)  # stretched from min..max
    wide[0, 1] = np.nan
    wide_path = save(Image.fromarray(wide, "F"), tmp_path / "wide.tif")
    out = np.asarray(load_image(wide_path))[..., 0].astype(int)
    expected = np.round((np.nan_to_num(wide, nan=-3) + 3) / 8 * 255)
    assert np.abs(out - expected).max() == 0 and out[0, 1] == 0 and out.max() == 255


def png16(path, arr):
    """a 16-bit grayscale PNG (big-endian samples) written byte by byte, not by PIL"""
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in arr)  # filter byte, then the row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 16, 0, 0, 0, 0)  # size, 16 bits, grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return str(path)


def test_16_bit_images_have_full_scale_65535_whatever_their_values(tmp_path):
    """a dark 16-bit image stays dark: v -> round(v / 65535 * 255), from PIL's PNG, a PNG written
    byte by byte and a 16-bit PGM; 32-bit integer TIFFs are stretched from min..max"""
    def expected(v):
        return np.round(np.asarray(v, dtype=np.float64) / 65535 * 255).astype(int)
    for v in (200, 300):
        path = save(Image.fromarray(np.full((8, 8), v, dtype=np.uint16)), tmp_path / f"c{v}.png")
        out = np.asarray(load_image(path)).astype(int)
        assert (out == expected(v)).all(), (v, out[0, 0])  # 200 -> 1, not 200
        (tmp_path / f"c{v}.pgm").write_bytes(b"P5 8 8 65535\n" + np.full(64, v, dtype=">u2").tobytes())
        assert (np.asarray(load_image(str(tmp_path / f"c{v}.pgm"))) == expected(v)).all()
    ramp = np.array([[0, 1, 128, 200, 255, 256, 300, 32768, 40000, 65534, 65535, 0]] * 3)
    out = np.asarray(load_image(png16(tmp_path / "ramp.png", ramp))).astype(int)
    assert out.shape == (3, 12, 3) and (out == expected(ramp)[..., None]).all()
    wide = np.linspace(-1000, 5000, 64).astype(np.int32).reshape(8, 8)
    path = save(Image.fromarray(wide), tmp_path / "wide.tif")
    assert Image.open(path).mode == "I"
    out = np.asarray(load_image(path))[..., 2].astype(int)
    assert (out == np.round((wide + 1000) / 6000 * 255)).all()


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(str(tmp_path / "missing"), EvalTransform(8))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found under"):
        ImageFolder(str(tmp_path / "empty"), EvalTransform(8))
    with pytest.raises(DataError, match="data directory"):
        resolve_data_dir(str(tmp_path / "nowhere"))


def class_folders(root, classes):
    for c in classes:
        (root / c).mkdir(parents=True)
        save(Image.new("RGB", (8, 8), (1, 2, 3)), root / c / "1.png")


def test_hidden_folders_are_no_classes_and_empty_classes_are_errors(tmp_path):
    class_folders(tmp_path / "train", ["cat", "dog"])
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # Jupyter's, with an image in it
    save(Image.new("RGB", (8, 8)), tmp_path / "train" / ".ipynb_checkpoints" / "1-checkpoint.png")
    (tmp_path / "train" / "cat" / "._1.png").write_bytes(b"\0\5\26\7")  # macOS's AppleDouble file
    (tmp_path / "train" / "cat" / ".cache").mkdir()
    save(Image.new("RGB", (8, 8)), tmp_path / "train" / "cat" / ".cache" / "2.png")
    train = ImageFolder(str(tmp_path / "train"), EvalTransform(8))
    assert train.classes == ["cat", "dog"]
    assert train.samples == [(str(tmp_path / "train" / c / "1.png"), i) for i, c in enumerate(["cat", "dog"])]
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "train" / "emu" / "notes.txt").write_text("no image")
    (tmp_path / "train" / "fox").mkdir()
    with pytest.raises(DataError, match=r"^class folder\(s\) emu, fox under '.*train' hold no images"):
        ImageFolder(str(tmp_path / "train"), EvalTransform(8))


def test_train_and_val_classes_that_differ_are_named(tmp_path):
    from data import check_same_classes  # new: imported here, so that only this test needs it
    class_folders(tmp_path / "train", ["cat", "dog", "emu", "fox"])
    class_folders(tmp_path / "val", ["cat", "dog", "gnu"])
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()
    class_folders(tmp_path / "same", ["cat", "dog", "emu", "fox"])
    train = ImageFolder(str(tmp_path / "train"), EvalTransform(8))
    check_same_classes(train, ImageFolder(str(tmp_path / "same"), EvalTransform(8)), str(tmp_path))
    val = ImageFolder(str(tmp_path / "val"), EvalTransform(8))
    with pytest.raises(DataError) as e:
        check_same_classes(train, val, str(tmp_path))
    assert str(e.value) == (f"train/ and val/ under '{tmp_path}' have different classes: only in train/: emu, fox; "
                            "only in val/: gnu: give both the same class folders")


def test_sampler_shards_cover_each_sample_once():
    train = [EpochSampler(103, r, 4, shuffle=True, seed=5) for r in range(4)]
    for s in train:
        s.set_epoch(2)
    seen = [i for s in train for i, e in s]
    assert len(seen) == 100 and len(set(seen)) == 100  # cut to a multiple of the world size, no repeats
    evals = [EpochSampler(103, r, 4, shuffle=False, drop_last=False) for r in range(4)]
    assert sorted(i for s in evals for i, _ in s) == list(range(103))  # every val image exactly once
    full = EpochSampler(50, shuffle=True, seed=1)
    full.set_epoch(3)
    order = [i for i, _ in full]
    full.set_epoch(3, start=20)
    assert [i for i, _ in full] == order[20:]
    full.set_epoch(4)
    assert [i for i, _ in full] != order


def test_eval_subset_is_spread_over_the_classes_and_fixed():
    # 4 classes of 25 in folder order (index // 25 is the class); 20 of them for evaluation: the first
    # 20 would all be class 0, a subset drawn at random takes from every class
    def drawn(seed, rank=0, world_size=1):
        _, sampler = make_loader(range(100), 8, False, rank, world_size, seed, num_workers=0, num_samples=20)
        return [i for i, _ in sampler]
    subset = drawn(seed=3)
    assert len(subset) == len(set(subset)) == 20 and subset == sorted(subset)
    assert {i // 25 for i in subset} == {0, 1, 2, 3}
    assert drawn(seed=3) == subset and drawn(seed=4) != subset  # the same images at every evaluation
    assert sorted(i for r in range(3) for i in drawn(3, r, 3)) == subset  # ranks split the same subset
    _, everything = make_loader(range(100), 8, False, seed=3, num_workers=0, num_samples=100)
    assert [i for i, _ in everything] == list(range(100))  # a subset as large as the split: all of it


def test_embedded_dataset_is_deterministic_and_laid_out(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    generate(a, seed=7, splits={"train": 2, "val": 1}, per_pair=1)
    generate(b, seed=7, splits={"train": 2, "val": 1}, per_pair=1)
    for split in ("train", "val", "cue_conflict"):
        assert sorted(os.listdir(os.path.join(a, split))) == sorted(CLASSES)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    for f in files:
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
    cue = sorted(os.listdir(os.path.join(a, "cue_conflict", "star")))
    assert len(cue) == len(CLASSES)  # every texture once (per_pair=1), the agreeing pair included
    assert {name.split("_")[1][:-4] for name in cue} == set(CLASSES)
    assert all(name.startswith("star") for name in cue)



def test_two_processes_that_start_together_generate_the_dataset_once(tmp_path):
    """two demos started at once on a fresh checkout (or torchrun's ranks) both make the embedded
    dataset: one generates, the other waits and uses it (before: both wrote the same temp folder, one
    crashed and the other could mark an incomplete dataset as made). Real processes, released together."""
    import subprocess
    import sys
    from data.embedded import CUE_CONFLICT_PER_PAIR, SPLITS
    root, gate = tmp_path / "new" / "embedded", tmp_path / "gate"  # a --root whose folder does not exist yet
    gate.mkdir()
    script = ("import os, sys, time; from data.embedded import ensure_embedded\n"
              "open(os.path.join(sys.argv[1], sys.argv[2]), 'w').close()\n"
              "while len(os.listdir(sys.argv[1])) < 2: time.sleep(0.01)\n"
              "ensure_embedded(sys.argv[3])\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")
    procs = [forkserver.Popen([sys.executable, "-c", script, str(gate), str(i), str(root)], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert sum("generating the embedded dataset" in e for e in errors) == 1
    for split, per_class in SPLITS.items():
        for name in CLASSES:
            assert len(os.listdir(root / split / name)) == per_class, (split, name)
    for name in CLASSES:
        assert len(os.listdir(root / "cue_conflict" / name)) == CUE_CONFLICT_PER_PAIR * len(CLASSES)
    assert not os.path.exists(str(root) + ".tmp")

def test_imagenette_archive_extracts_to_imagefolder(tmp_path, tiny_data):
    import tarfile
    from data.prepare_imagenette import extract
    archive = tmp_path / "imagenette2-320.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(os.path.join(tiny_data, "train"), arcname="imagenette2-320/train")
        tar.add(os.path.join(tiny_data, "val"), arcname="imagenette2-320/val")
    root = extract(str(archive), str(tmp_path / "imagenette"))
    assert len(ImageFolder(os.path.join(root, "train"), EvalTransform(32))) == 6 * 24
    assert ImageFolder(os.path.join(root, "val"), EvalTransform(32)).classes == sorted(CLASSES)
    # a missing file, a file that is no archive, the archive cut short: one line, nothing left
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(archive.read_bytes()[:len(archive.read_bytes()) // 2])
    for bad, reason in ((tmp_path / "none.tgz", "No such file or directory"),
                        (tmp_path / "imagenette" / "train" / CLASSES[0], "Is a directory"),
                        (cut, "not a whole tar archive")):
        with pytest.raises(SystemExit, match=rf"error: cannot extract '.*' \({reason}\)"):
            extract(str(bad), str(tmp_path / "again"))
        assert sorted(os.listdir(tmp_path)) == ["cut.tgz", "imagenette", "imagenette2-320.tgz"]


def imagenette_archive(path, wnids=("n01440764", "n02102040")):
    """a real tar.gz in imagenette2-320's layout: {train,val}/<wnid>/*.JPEG and the csv at the top"""
    import tarfile
    src = path.parent / "src" / "imagenette2-320"
    for split in ("train", "val"):
        for i, wnid in enumerate(wnids):
            (src / split / wnid).mkdir(parents=True)
            for j in range(2):
                save(Image.new("RGB", (12, 10), (40 * i, 90, 30 * j)), src / split / wnid / f"{wnid}_{j}.JPEG")
    (src / "noisy_imagenette.csv").write_text("path,noisy_labels_0\n")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname="imagenette2-320")
    return str(path)


def tree(folder):
    """{relative path: bytes} of every file under folder"""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_imagenette_extract_never_deletes_a_users_files(tmp_path):
    """a --root with anything the tool did not write is refused and kept as it was (the old code
    deleted it whole); an empty folder or an earlier extraction is replaced; a user's folder named
    like the old fixed temporary one (root.tmp) is left alone"""
    from data.prepare_imagenette import extract
    archive = imagenette_archive(tmp_path / "imagenette2-320.tgz")
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my work")
    save(Image.new("RGB", (8, 8)), mine / "sub" / "keep.png")
    before, listing = tree(mine), sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit, match=r"^error: --root=.*mine is neither empty nor an earlier extraction of this "
                                         r"tool \(it holds 'notes.txt'\): give a new or empty folder"):
        extract(archive, str(mine))
    assert tree(mine) == before and sorted(os.listdir(tmp_path)) == listing  # nothing deleted, nothing left
    (tmp_path / "fresh.tmp").mkdir()
    (tmp_path / "fresh.tmp" / "keep.txt").write_text("mine too")
    fresh = extract(archive, str(tmp_path / "fresh"))
    assert (tmp_path / "fresh.tmp" / "keep.txt").read_text() == "mine too"
    train = ImageFolder(os.path.join(fresh, "train"), EvalTransform(8))
    assert train.classes == ["n01440764", "n02102040"] and len(train) == 4
    first = tree(fresh)
    assert extract(archive, fresh) == fresh and tree(fresh) == first  # an earlier extraction: replaced
    (tmp_path / "empty").mkdir()
    assert tree(extract(archive, str(tmp_path / "empty"))) == first
    user_image = os.path.join(fresh, "train", "n01440764", "mine.JPEG")
    save(Image.new("RGB", (8, 8)), user_image)
    with pytest.raises(SystemExit, match=r"it holds 'train/n01440764/mine.JPEG'"):
        extract(archive, fresh)
    assert tree(fresh) == {**first, "train/n01440764/mine.JPEG": open(user_image, "rb").read()}
    assert sorted(os.listdir(tmp_path)) == sorted(listing + ["empty", "fresh", "fresh.tmp"])


def test_imagenette_bad_options_are_one_line_before_any_download(tmp_path, tiny_data):
    """a misspelled or unknown option, or one without '=', is refused by name (not dropped, which would start
    the download); --root an existing file is refused before anything is extracted"""
    import sys
    import tarfile
    good = tmp_path / "imagenette2-320.tgz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(os.path.join(tiny_data, "val"), arcname="imagenette2-320/val")
        tar.add(os.path.join(tiny_data, "val"), arcname="imagenette2-320/train")
    root_file = tmp_path / "rootfile"
    root_file.write_text("not a folder")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my work")
    not_empty = "is neither empty nor an earlier extraction of this tool (it holds 'notes.txt')"
    missing = f"--archive={tmp_path / 'none.tgz'}"  # a file that is not there: never a download, even unchecked
    unknown = "unknown option '--archiv': valid options are archive, root"
    for args, expected in (([missing, "--archiv=in.tgz"], unknown),
                           ([missing, "--root", str(tmp_path / "out")], "option '--root' needs a value"),
                           ([missing, "--bogus=1"], "unknown option '--bogus'"),
                           ([f"--archive={good}", f"--root={root_file}"], f"--root={root_file} is a file"),
                           ([f"--archive={good}", f"--root={tmp_path / 'mine'}"], not_empty),
                           ([f"--root={tmp_path / 'mine'}"], not_empty)):  # refused before the download
        r = forkserver.run([sys.executable, "-m", "data.prepare_imagenette", *args], capture_output=True,
                           text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
        assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
        assert r.stderr.startswith("error:") and expected in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["imagenette2-320.tgz", "mine", "rootfile"]
    assert root_file.read_text() == "not a folder" and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_each_epoch_draws_new_augmentations_and_masks(tmp_path):
    """Per-sample randomness is keyed by (seed, epoch, index): the same index in epoch 0 and
    epoch 1 gets another crop and another mask, and the same (index, epoch) asked twice gets
    the identical sample; a plain index is epoch 0, and the sampler hands the epoch over."""
    rng = np.random.default_rng(4)
    (tmp_path / "a").mkdir()
    for i in range(3):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "a" / f"{i}.png")
    ds = ImageFolder(str(tmp_path), TrainTransform(16, 0.2), MaskGenerator("block", 8, 0.4), seed=3)
    for index in range(3):
        image0, _, mask0 = ds[(index, 0)]
        image1, _, mask1 = ds[(index, 1)]
        assert not torch.equal(image0, image1) and not torch.equal(mask0, mask1)
        again0, _, again_mask0 = ds[index]  # a plain index is epoch 0
        assert torch.equal(image0, again0) and torch.equal(mask0, again_mask0)
        again1, _, again_mask1 = ds[(index, 1)]
        assert torch.equal(image1, again1) and torch.equal(mask1, again_mask1)
    sampler = EpochSampler(3, shuffle=False)
    sampler.set_epoch(1)
    assert list(sampler) == [(0, 1), (1, 1), (2, 1)]


def test_block_masks_reach_the_last_row_and_column_as_often_as_the_first():
    """BEiT's block masking places each block uniformly among all positions where it fits, so
    it is mirror-symmetric: the last row (column) is masked as often as the first, within
    sampling error (2000 masks of 14 x 14: a row's frequency ~0.15 has a standard error
    below 0.01; the tolerance 0.04 is several of them), and every row and column is masked
    sometimes."""
    rng = np.random.default_rng(5)
    freq = np.mean([block_mask(14, 14, BEIT_RATIO, rng) for _ in range(2000)], axis=0)
    rows, cols = freq.mean(axis=1), freq.mean(axis=0)
    assert abs(rows[-1] - rows[0]) < 0.04 and abs(cols[-1] - cols[0]) < 0.04
    assert np.abs(rows - rows[::-1]).max() < 0.04 and np.abs(cols - cols[::-1]).max() < 0.04
    assert rows.min() > 0.05 and cols.min() > 0.05


def test_flip_probability_zero_never_flips_and_one_always_flips():
    """min crop scale 1 on a square image: the crop is the whole image, so without jitter the
    output is the input itself (flip=0) or PIL's own left-right mirror of it (flip=1), for every
    seed; the input is asymmetric, so the two differ"""
    pixels = np.random.default_rng(6).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    plain = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255
    mirrored = torch.from_numpy(np.asarray(img.transpose(Image.FLIP_LEFT_RIGHT)).copy())
    mirrored = mirrored.permute(2, 0, 1).float() / 255
    assert not torch.equal(plain, mirrored)
    for seed in range(20):
        never = TrainTransform(16, min_scale=1.0, flip=0.0, jitter=0.0)
        always = TrainTransform(16, min_scale=1.0, flip=1.0, jitter=0.0)
        assert torch.allclose(never(img, np.random.default_rng(seed)), plain, atol=1e-6)
        assert torch.allclose(always(img, np.random.default_rng(seed)), mirrored, atol=1e-6)


def test_train_transform_crops_at_least_its_min_scale(monkeypatch):
    """TrainTransform(min_scale=0.9) crops boxes of area fraction ~U(0.9, 1): every box it
    asks for (observed by wrapping random_resized_crop_box) covers >= 0.9 of the image, up to
    the rounding of its sides to whole pixels (100 x 100 image: under 2%); a box that does not
    fit falls back to the whole (square) image"""
    import data
    boxes = []

    def recording(*args, **kwargs):
        boxes.append(random_resized_crop_box(*args, **kwargs))
        return boxes[-1]

    monkeypatch.setattr(data, "random_resized_crop_box", recording)
    img = Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8))
    tf = TrainTransform(8, min_scale=0.9, jitter=0.0)
    for seed in range(200):
        tf(img, np.random.default_rng(seed))
    assert len(boxes) == 200
    fractions = [(r - l) * (b - t) / 10000 for l, t, r, b in boxes]
    assert min(fractions) >= 0.9 * 0.98 and max(fractions) <= 1.0


def test_palette_transparency_is_composited_on_white_like_alpha(tmp_path):
    """hand-written: a palette image whose index 0 is transparent (PNG tRNS, GIF's transparency)
    shows white there, as an RGBA pixel of alpha 0 does; its opaque index keeps its colour"""
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([10, 20, 30, 200, 0, 0] + [0, 0, 0] * 254)
    for x in range(2):
        pal.putpixel((x, 0), 1)
    for ext in ("png", "gif"):
        out = np.asarray(load_image(save(pal, tmp_path / f"t.{ext}", transparency=0)))
        assert out[0, 0].tolist() == [200, 0, 0], ext
        assert out[1, 3].tolist() == [255, 255, 255], ext


def test_eval_transform_passes_a_32_px_image_unchanged_at_32_as_beit_does():
    """BEiT's build_transform leaves input_size <= 32 unresized: a random 32 x 32 image at size 32
    is its own pixels / 255; at 33 (> 32) it is resized as torchvision's Resize + CenterCrop"""
    img = Image.fromarray(np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    expected = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(EvalTransform(32)(img), expected)
    T = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(np.random.default_rng(8).integers(0, 256, (33, 33, 3), dtype=np.uint8))
    reference = T.Compose([T.Resize(int(33 / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(33), T.ToTensor()])
    assert torch.equal(EvalTransform(33)(img), reference(img))


def test_an_image_just_over_max_pixels_is_refused_unread(tmp_path):
    """closed form: MAX_PIXELS is 10000 x 10000 (300 MB as RGB); a 1-bit PNG of 10001 x 10001,
    just over it (a small file), is refused by its header, one line with its size"""
    from data import MAX_PIXELS
    assert MAX_PIXELS == 10_000 * 10_000
    path = bomb_png(tmp_path / "over.png", 10_001)
    with pytest.raises(DataError, match=r"is 10001 x 10001 pixels, more than MAX_PIXELS = 100000000"):
        load_image(path)
