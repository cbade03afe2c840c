"""Fine-tuning: augmentations against their definitions, freezing, the recipe end to end."""
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.augment import RAND_OPS, RandAugment, RandomErasing, mixup_cutmix, smooth_one_hot

from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gradient_image():
    x = np.arange(64, dtype=np.uint8)[None, :].repeat(64, 0) * 4  # 0..252 along x
    return Image.fromarray(np.stack([x, x.T, np.full_like(x, 100)], -1))


class Fixed:
    """an rng whose random() is fixed: chooses the sign of signed ops"""
    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


def test_randaugment_spec_parsing():
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.magnitude_std, ra.num_ops, ra.prob) == (9.0, 0.5, 2, 0.5)
    assert len(ra.names) == 15 and "Cutout" not in ra.names
    with pytest.raises(ValueError, match="unsupported RandAugment spec"):
        RandAugment("rand-m9")


def test_randaugment_ops_follow_their_definitions():
    img = gradient_image()
    a = np.asarray(img).astype(int)
    level = 0.9  # m = 9
    assert np.array_equal(np.asarray(RAND_OPS["Invert"](img, level, None)), 255 - a)
    # Solarize: threshold 256 - int(256 * 0.9) = 26: pixels >= 26 are inverted
    solarized = np.asarray(RAND_OPS["SolarizeIncreasing"](img, level, None))
    assert np.array_equal(solarized, np.where(a >= 26, 255 - a, a))
    # SolarizeAdd: + int(110 * 0.9) = 99 below 128, capped at 255
    added = np.asarray(RAND_OPS["SolarizeAdd"](img, level, None))
    assert np.array_equal(added, np.where(a < 128, np.minimum(a + 99, 255), a))
    # Posterize: keep 4 - int(4 * 0.9) = 1 bit
    posterized = np.asarray(RAND_OPS["PosterizeIncreasing"](img, level, None))
    assert np.array_equal(posterized, a & 0b10000000)
    # m = 10: no bits kept
    assert np.asarray(RAND_OPS["PosterizeIncreasing"](img, 1.0, None)).max() == 0
    # Brightness: factor 1 +- 0.81 (sign by the rng): blend with black
    bright = np.asarray(RAND_OPS["BrightnessIncreasing"](img, level, Fixed(0.0))).astype(int)
    assert np.abs(bright - np.clip(np.round(a * 1.81), 0, 255)).max() <= 1
    dark = np.asarray(RAND_OPS["BrightnessIncreasing"](img, level, Fixed(1.0))).astype(int)
    assert np.abs(dark - np.round(a * 0.19)).max() <= 1
    # TranslateXRel: 0.45 * 0.9 * 64 = 25.92 px; content moves by 26 px
    # (sign: negative for random() > 0.5)
    moved = np.asarray(RAND_OPS["TranslateXRel"](img, level, Fixed(0.0))).astype(int)
    assert np.abs(moved[:, 10:30, 0] - a[:, 36:56, 0]).max() <= 4
    # Rotate by 30 deg x 0.9 = 27 deg keeps the center pixel; corners are filled with the mean color
    rot = np.asarray(RAND_OPS["Rotate"](img, level, Fixed(0.0)))
    assert np.abs(rot[32, 32].astype(int) - a[32, 32]).max() <= 4
    assert rot[0, 0].tolist() == [124, 116, 104]


def asymmetric_image():
    """64 x 64: a linear ramp along x, a quadratic ramp along y (an uneven histogram), and a
    bright rectangle off the center, so no flip, transpose or rotation maps it onto itself"""
    x = np.arange(64)[None, :].repeat(64, 0)
    y = x.T
    rgb = np.stack([4 * x, y * y // 16, np.full_like(x, 100)], -1)
    rgb[10:20, 40:56] = (230, 200, 30)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("name", list(RAND_OPS))
@pytest.mark.parametrize("draw", [0.0, 1.0])
def test_each_randaugment_op_is_timms_op_of_the_same_name(name, draw, monkeypatch):
    """every op at m = 9 with each sign against timm.data.auto_augment's AugmentOp of the same
    name (rand-m9-inc1, bicubic, the ImageNet mean as fill), pixel for pixel: timm negates a
    level when random() > 0.5, as _sign does, so both take the same fixed draw"""
    aa = pytest.importorskip("timm.data.auto_augment")
    monkeypatch.setattr(aa, "_randomly_negate", lambda v: -v if draw > 0.5 else v)
    hparams = dict(img_mean=(124, 116, 104), interpolation=Image.BICUBIC)
    img = asymmetric_image()
    ours = np.asarray(RAND_OPS[name](img, 0.9, Fixed(draw)))
    theirs = np.asarray(aa.AugmentOp(name, prob=1.0, magnitude=9, hparams=hparams)(img))
    assert np.array_equal(ours, theirs)
    assert not np.array_equal(ours, np.asarray(img))  # the op did change the image


def test_randaugment_applies_each_op_with_probability_half():
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    calls = []
    ra.names = ["Probe"]
    RAND_OPS["Probe"] = lambda img, level, rng: calls.append(level) or img
    try:
        rng = np.random.default_rng(0)
        for _ in range(2000):
            ra(None, rng)
    finally:
        del RAND_OPS["Probe"]
    assert len(calls) / 4000 == pytest.approx(0.5, abs=0.03)  # 2 ops per image, p = 0.5 each
    levels = np.array(calls) * 10
    assert levels.mean() == pytest.approx(9.0, abs=0.05)
    assert levels.std() == pytest.approx(0.5, abs=0.05)


def test_random_erasing_pixel_mode():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    erase = RandomErasing(1.0, mean, std)
    rng = np.random.default_rng(0)
    fractions, values = [], []
    for _ in range(200):
        image = torch.full((3, 64, 64), -1.0)  # a value noise never produces here... almost
        out = erase(image.clone(), rng)
        changed = (out != -1.0).any(0)
        fractions.append(changed.float().mean().item())
        values.append(out[:, changed])
    # area in [0.02, 1/3] of the image
    assert min(fractions) >= 0.015 and max(fractions) <= 1 / 3 + 0.02
    v = torch.cat(values, dim=1)
    normalized = (v - torch.tensor(mean)[:, None]) / torch.tensor(std)[:, None]
    # N(0, 1) in model space
    assert normalized.mean().abs() < 0.02 and (normalized.std() - 1).abs() < 0.02
    never = RandomErasing(0.0, mean, std)
    img = torch.rand(3, 8, 8)
    assert torch.equal(never(img.clone(), rng), img)
    sometimes = RandomErasing(0.25, mean, std)
    hits = sum(not torch.equal(sometimes(img.clone(), rng), img) for _ in range(2000))
    assert hits / 2000 == pytest.approx(0.25, abs=0.03)


def test_random_erasing_count_is_uniform_from_one_to_count():
    """timm's RandomErasing draws the number of rectangles with
    random.randint(min_count, max_count): uniform over 1..count, both ends included. With count 3
    each of 1, 2, 3 comes a third of the time (600 draws: 5 standard errors are 0.1); each rectangle
    is one fill of noise, counted here."""
    class CountingRng:  # numpy's generator, counting the noise fills
        def __init__(self, seed):
            self.rng, self.fills = np.random.default_rng(seed), 0

        def __getattr__(self, name):
            return getattr(self.rng, name)

        def standard_normal(self, shape):
            self.fills += 1
            return self.rng.standard_normal(shape)

    erase = RandomErasing(1.0, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), count=3)
    counts = []
    for seed in range(600):
        rng = CountingRng(seed)
        erase(torch.zeros(3, 224, 224), rng)
        counts.append(rng.fills)
    assert set(counts) == {1, 2, 3}
    for n in (1, 2, 3):
        assert abs(counts.count(n) / len(counts) - 1 / 3) < 0.1, (n, counts.count(n))


def test_random_erasing_of_several_rectangles_erases_what_timms_does():
    """count 3: 1 to 3 rectangles that share the area drawn (timm RandomErasing, max_count=3):
    the mean erased fraction over many draws agrees with timm's"""
    timm_erasing = pytest.importorskip("timm.data.random_erasing")
    import random
    random.seed(0)
    theirs = timm_erasing.RandomErasing(1.0, mode="pixel", max_count=3, device="cpu")
    ours = RandomErasing(1.0, (0.0,) * 3, (1.0,) * 3, count=3)
    rng = np.random.default_rng(0)

    def erased(out):
        return (out != -9.0).any(0).float().mean().item()
    draws = 3000
    mine = np.mean([erased(ours(torch.full((3, 64, 64), -9.0), rng)) for _ in range(draws)])
    timms = np.mean([erased(theirs(torch.full((3, 64, 64), -9.0))) for _ in range(draws)])
    assert mine == pytest.approx(timms, abs=0.012)  # 0.168 each; 0.41 with the area not shared


def test_cutmix_box_is_timms(monkeypatch):
    """the pasted box of timm's rand_bbox for the same centre and lambda, odd cuts included"""
    mixup = pytest.importorskip("timm.data.mixup")
    images = torch.stack([torch.zeros(1, 9, 9), torch.ones(1, 9, 9)])
    for seed in range(20):
        cut, soft = mixup_cutmix(images, torch.eye(2), 0.0, 1.0, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)  # the draws mixup_cutmix made: lambda, then centre
        lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g))).beta(1, 1))
        centre = iter([int(torch.randint(0, 9, (1,), generator=g)), int(torch.randint(0, 9, (1,), generator=g))])
        monkeypatch.setattr(mixup.np.random, "randint", lambda *args, **kw: next(centre))
        y0, y1, x0, x1 = mixup.rand_bbox((1, 9, 9), lam)
        expected = torch.zeros(9, 9)
        expected[y0:y1, x0:x1] = 1
        assert torch.equal(cut[0, 0], expected), seed


def test_label_smoothing_closed_form():
    targets = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    expected = torch.tensor([[0.025, 0.025, 0.925, 0.025],
                             [0.925, 0.025, 0.025, 0.025]])
    assert torch.allclose(targets, expected)
    logits = torch.randn(2, 4)
    ours = torch.sum(-targets * F.log_softmax(logits, -1), -1).mean()
    torch_loss = F.cross_entropy(logits, torch.tensor([2, 0]), label_smoothing=0.1)
    assert ours.item() == pytest.approx(torch_loss.item(), rel=1e-6)
    # uniform logits: the loss is log C whatever the smoothing
    uniform = torch.sum(-targets * F.log_softmax(torch.zeros(2, 4), -1), -1).mean()
    assert uniform.item() == pytest.approx(np.log(4))


def test_mixup_mixes_images_and_targets_with_the_same_lambda():
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    targets = torch.eye(2)
    mixed, soft = mixup_cutmix(images, targets, 0.8, 0.0, torch.Generator().manual_seed(0))
    lam = soft[0, 0].item()
    assert torch.allclose(mixed[0], torch.full((3, 8, 8), 1 - lam))
    assert torch.allclose(soft.sum(1), torch.ones(2))
    cut, soft = mixup_cutmix(images, targets, 0.0, 1.0, torch.Generator().manual_seed(1))
    kept = (cut[0] == 0).float().mean().item()  # fraction of image 0 still its own
    assert soft[0, 0].item() == pytest.approx(kept)


# ---- the script ----------------------------------------------------------------------------

def run_ft(args, tiny_data, launcher=()):
    cmd = [*launcher] if launcher else [sys.executable]
    cmd += [os.path.join(ROOT, "finetune.py"), f"--data_dir={tiny_data}", "--img_size=32",
            "--epochs=2", "--warmup_epochs=1", "--total_batch_size=16", "--micro_batch_size=8",
            "--num_workers=0", "--device=cpu", "--dtype=float32", "--compile=False",
            "--log_interval=1", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def load(path):
    return torch.load(path, weights_only=True)


def test_frozen_blocks_and_patch_projection_stay_bit_identical(tiny_data, tiny_teacher, tmp_path):
    init = load(tiny_teacher)["model"]
    args = [f"--init={tiny_teacher}", "--freeze_blocks=1", "--lr=1e-2", "--stop_iter=3",
            f"--out_dir={tmp_path}"]
    result = run_ft(args, tiny_data)
    assert result.returncode == 0, result.stderr[-2000:]
    tuned = load(tmp_path / "ckpt.pt")["model"]
    frozen = ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
              "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias")
    for k in frozen:
        assert torch.equal(tuned[k], init[k]), k
    assert not torch.equal(tuned["blocks.1.attn.qkv.weight"], init["blocks.1.attn.qkv.weight"])
    # BEiT's and FD's pooling: no final norm, the mean of the patch tokens into a new fc_norm (from 1), trained
    assert "norm.weight" not in tuned and not torch.equal(tuned["fc_norm.weight"], torch.ones_like(init["norm.weight"]))
    # per-layer relative position bias was added, zero-initialized, and trains in unfrozen blocks
    table0 = tuned["blocks.0.attn.rel_pos.relative_position_bias_table"]
    assert torch.equal(table0, torch.zeros_like(table0))
    assert tuned["blocks.1.attn.rel_pos.relative_position_bias_table"].abs().sum() > 0


@pytest.mark.parametrize("shared_table", [False, True])
def test_linear_probe_trains_only_the_head(tiny_data, tiny_teacher, tmp_path, shared_table):
    """also from a BEiT v2 init that keeps its shared relative position table (--rel_pos=False):
    every block reads the table, so it is frozen with them"""
    path, extra = tiny_teacher, []
    if shared_table:
        from model import ViT, ViTConfig
        cfg = ViTConfig.from_name("nano/4", num_classes=6, rel_pos="shared")
        vit = ViT(cfg)
        torch.nn.init.normal_(vit.rel_pos_bias.relative_position_bias_table)
        path, extra = tmp_path / "shared.pt", ["--rel_pos=False"]
        torch.save(dict(model=vit.state_dict(), model_args=cfg.to_dict(), config={}), path)
    init = load(path)["model"]
    args = [f"--init={path}", "--freeze_blocks=2", "--lr=1e-2", "--stop_iter=2", *extra,
            f"--out_dir={tmp_path}"]
    result = run_ft(args, tiny_data)
    assert result.returncode == 0, result.stderr[-2000:]
    tuned = load(tmp_path / "ckpt.pt")["model"]
    assert ("rel_pos_bias.relative_position_bias_table" in tuned) == shared_table
    changed = {k for k in init if k in tuned and not torch.equal(init[k], tuned[k])}
    assert changed <= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert "head.weight" in changed


def test_float16_scales_the_loss_and_follows_float32(tiny_data, tiny_teacher, tmp_path):
    """--dtype=float16 (GPUs without bfloat16: V100, T4) with loss scaling: three fine-tuning steps
    move every block's weights in the direction float32 moves them (cosine 0.99999 measured;
    bfloat16 0.9997). Without the loss scale, the gradients reaching the blocks through the head
    (initialized at 0.001x) round to 0 in float16 and AdamW moves them by weight decay alone: cosine
    0.49 for the worst tensor, 0.81 on average (measured with the scaler turned off)."""
    init = load(tiny_teacher)["model"]
    moved = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        result = run_ft([f"--init={tiny_teacher}", "--stop_iter=3", f"--out_dir={out}",
                         f"--dtype={dtype}"], tiny_data)
        assert result.returncode == 0, result.stderr[-2000:]
        tuned = load(out / "ckpt.pt")["model"]
        moved[dtype] = {k: (tuned[k] - init[k]).double().flatten()
                        for k in init if k.startswith("blocks.")}
    for k, reference in moved["float32"].items():
        cosine = F.cosine_similarity(moved["float16"][k], reference, dim=0).item()
        assert cosine > 0.99, f"{k}: cosine {cosine:.4f}"


def test_float16_loss_scale_is_saved_and_resumed(tiny_data, tiny_teacher, tmp_path):
    """The loss scale's state is in the checkpoint and a resumed run goes on with it: the scaler
    counts the steps since its last overflow (none here: the scale stays 2^16, as the log says), 2
    after a run stopped at iteration 2 and 4 after its resume to 4 (a new scaler would count 2).
    The resumed weights are the uninterrupted run's."""
    args = [f"--init={tiny_teacher}", "--dtype=float16"]
    run_ft([*args, "--stop_iter=2", f"--out_dir={tmp_path / 'a'}"], tiny_data).check_returncode()
    assert load(tmp_path / "a" / "ckpt.pt")["scaler"]["_growth_tracker"] == 2
    resumed = run_ft([*args, "--stop_iter=4", f"--out_dir={tmp_path / 'a'}", "--resume=True"],
                     tiny_data)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ckpt = load(tmp_path / "a" / "ckpt.pt")
    assert ckpt["iter_num"] == 4 and ckpt["scaler"]["_growth_tracker"] == 4
    assert ckpt["scaler"]["scale"] == 2.0 ** 16
    records = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["loss_scale"] for r in records if "loss" in r] == [2.0 ** 16] * 4
    run_ft([*args, "--stop_iter=4", f"--out_dir={tmp_path / 'b'}"], tiny_data).check_returncode()
    uninterrupted = load(tmp_path / "b" / "ckpt.pt")["model"]
    assert all(torch.equal(v, uninterrupted[k]) for k, v in ckpt["model"].items())


def test_md_checkpoint_finetunes_and_reports_top1(tiny_data, tiny_teacher, tmp_path):
    md_cmd = [sys.executable, "train_md.py", f"--data_dir={tiny_data}", f"--teacher={tiny_teacher}",
              "--model=nano/4", "--img_size=32", "--epochs=1", "--total_batch_size=16",
              "--micro_batch_size=16", "--num_workers=0", "--device=cpu", "--dtype=float32",
              "--compile=False", "--teacher_bf16=False", "--stop_iter=2",
              f"--out_dir={tmp_path / 'md'}"]
    md = forkserver.run(md_cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert md.returncode == 0, md.stderr[-2000:]
    args = [f"--init={tmp_path / 'md' / 'ckpt.pt'}", "--img_size=48", "--stop_iter=2",
            f"--out_dir={tmp_path / 'ft'}"]
    result = run_ft(args, tiny_data)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val top-1" in result.stdout + result.stderr
    ckpt = load(tmp_path / "ft" / "ckpt.pt")
    assert ckpt["model_args"]["img_size"] == 48 and ckpt["model_args"]["rel_pos"] == "layer"
    table = ckpt["model"]["blocks.0.attn.rel_pos.relative_position_bias_table"]
    assert table.shape[0] == (2 * 12 - 1) ** 2 + 3
    assert os.path.exists(tmp_path / "ft" / "result.json")
    summary = forkserver.run([sys.executable, "finetune.py", f"--summarize={tmp_path}"],
                             capture_output=True, text=True, cwd=ROOT)
    assert summary.returncode == 0 and "top-1" in summary.stdout
    # the MD checkpoint fine-tuned into its own out_dir, and a new run over a finished one: refused, nothing replaced
    md_saved, ft_saved = (tmp_path / "md" / "ckpt.pt").read_bytes(), (tmp_path / "ft" / "ckpt.pt").read_bytes()
    onto_init = run_ft([*args[:-1], f"--out_dir={tmp_path / 'md'}"], tiny_data)
    assert onto_init.returncode != 0 and onto_init.stderr.strip().splitlines()[-1] == (
        f"error: --init={tmp_path / 'md' / 'ckpt.pt'} is the checkpoint this run writes (out_dir/ckpt.pt), "
        f"which the fine-tune would overwrite: choose another --out_dir")
    rerun = run_ft(args, tiny_data)
    assert rerun.returncode != 0 and "exists (an earlier run's checkpoint)" in rerun.stderr
    assert (tmp_path / "md" / "ckpt.pt").read_bytes() == md_saved
    assert (tmp_path / "ft" / "ckpt.pt").read_bytes() == ft_saved


def test_summary_skips_a_result_with_a_value_edited_to_null(tmp_path):
    """--summarize over a sweep where one result.json has top1 null: that run is skipped with a
    warning, the others are listed; before, a TypeError traceback from sorting"""
    import json
    for name, top1 in (("good", 71.5), ("edited", None)):
        (tmp_path / name).mkdir()
        result = dict(top1=top1, top5=90.0, best_top1=top1, iter_num=10, max_iters=10,
                      config=dict(init="clip", freeze_blocks=0, lr=5e-5))
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    summary = forkserver.run([sys.executable, "finetune.py", f"--summarize={tmp_path}"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert f"warning: skipping {tmp_path / 'edited' / 'result.json'}" in summary.stderr
    (row,) = [line for line in summary.stdout.splitlines() if line.startswith("clip")]
    assert "71.50" in row and row.endswith(str(tmp_path / "good"))


def test_summary_lists_the_best_top1_beside_the_last(tmp_path):
    """--summarize: top-1 and top-5 are the last evaluation's; `best` is result.json's best top-1
    over the run's evaluations (BEiT's and FD's "max accuracy"), '-' where a result.json has none"""
    for name, top1, best in (("a", 80.25, 82.5), ("b", 70.0, None)):
        (tmp_path / name).mkdir()
        result = dict(top1=top1, top5=95.0, iter_num=10, max_iters=10,
                      config=dict(init="clip", freeze_blocks=0, lr=1e-4 if name == "a" else 1e-3))
        if best is not None:
            result["best_top1"] = best
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    summary = forkserver.run([sys.executable, "finetune.py", f"--summarize={tmp_path}"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert summary.returncode == 0, summary.stderr[-2000:]
    header, *rows = [line.split() for line in summary.stdout.splitlines()[:3]]
    assert header == ["init", "frozen", "lr", "top-1", "top-5", "best", "run"]
    assert rows == [["clip", "0", "1.00e-04", "80.25", "95.00", "82.50", str(tmp_path / "a")],
                    ["clip", "0", "1.00e-03", "70.00", "95.00", "-", str(tmp_path / "b")]]


def test_summary_figure_points():
    """Fig. 8b/8c points of --summarize: runs at the same lr are averaged (each is still drawn as a dot; before,
    a vertical segment joined them), a run stopped early (a smoke test) is left out, an 8c point is
    the runs at the best lr of that number of frozen blocks (before: every lr's runs averaged), and
    an init with one
    number of frozen blocks has no 8c curve (that panel says so instead of staying empty)"""
    from finetune import summary_curves
    runs = [("md", 0, 1e-3, 80.0, 95.0, "a", False), ("md", 0, 1e-3, 84.0, 96.0, "b", False),
            ("md", 0, 1e-3, 20.0, 30.0, "smoke (stopped at iteration 2 of 90)", True),
            ("md", 0, 5e-4, 70.0, 90.0, "c", False), ("md", 6, 1e-3, 50.0, 80.0, "probe", False),
            ("scratch", 0, 1e-3, 40.0, 70.0, "d", False)]
    assert summary_curves(runs) == {
        # 0: best lr's
        "md": dict(lr={5e-4: [70.0], 1e-3: [80.0, 84.0]}, frozen={0: [80.0, 84.0], 6: [50.0]}),
        "scratch": dict(lr={1e-3: [40.0]}, frozen={})}


def test_summary_of_a_missing_or_empty_folder_says_which(tmp_path):
    """--summarize of a path that does not exist is said to be no folder (before: 'no result.json
    found', as for a real folder without runs)"""
    from finetune import print_summary
    with pytest.raises(SystemExit, match=f"^error: --summarize: no folder '{tmp_path / 'gone'}'$"):
        print_summary(str(tmp_path / "gone"))
    with pytest.raises(SystemExit, match=f"^error: --summarize: no result.json found under '{tmp_path}'$"):
        print_summary(str(tmp_path))


def test_summary_figure_says_why_a_panel_is_empty_when_runs_stopped_early(tmp_path):
    """two lrs, both runs stopped by --stop_iter: the figure leaves them out (table only), and the
    empty panel says so (before: 'fine-tune with several --lr', though there were two)"""
    import json
    plt = pytest.importorskip("matplotlib.pyplot")
    from finetune import print_summary
    for lr_ in (1e-3, 3e-3):
        (tmp_path / f"lr{lr_}").mkdir()
        result = dict(top1=50.0, top5=90.0, best_top1=50.0, iter_num=2, max_iters=750,
                      config=dict(init="embedded", freeze_blocks=0, lr=lr_))
        (tmp_path / f"lr{lr_}" / "result.json").write_text(json.dumps(result))
    print_summary(str(tmp_path))
    texts = [t.get_text() for ax in plt.gcf().axes for t in ax.texts]
    plt.close("all")
    assert texts == [f"no runs to compare:\nfine-tune with several {option}\n(2 run(s) stopped "
                     "early left out)" for option in ("--lr", "--freeze_blocks")]


def test_summary_names_each_init_whole(tmp_path):
    """two MD students whose checkpoint paths differ only near the start: each row shows its whole
    path (before: the last 28 characters, the same for both). The root's name has glob's special
    characters (before: 'no result.json found')"""
    import json
    root = tmp_path / "sweep[lr]"
    inits = [f"/storage/{who}/experiments/masked_distillation/out/md_clip/ckpt.pt" for who in ("ann", "bob")]
    for i, init_ in enumerate(inits):
        (root / f"run{i}").mkdir(parents=True)
        result = dict(top1=80.0 + i, top5=95.0, best_top1=80.0 + i, iter_num=10, max_iters=10,
                      config=dict(init=init_, freeze_blocks=0, lr=5e-5))
        (root / f"run{i}" / "result.json").write_text(json.dumps(result))
    summary = forkserver.run([sys.executable, "finetune.py", f"--summarize={root}"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert summary.returncode == 0, summary.stderr[-2000:]
    rows = summary.stdout.splitlines()[1:3]
    for i, init_ in enumerate(inits):
        assert rows[i].split() == [init_, "0", "5.00e-05", f"{80 + i}.00", "95.00", f"{80 + i}.00",
                                   str(root / f"run{i}")]


def test_ddp_eval_counts_each_image_once(tiny_data, tiny_teacher, tmp_path):
    """48 val images over 2 ranks: top-1 equals the one-process value exactly."""
    from tests.test_train_md import free_port
    args = [f"--init={tiny_teacher}", "--stop_iter=1", "--micro_batch_size=8",
            "--total_batch_size=16", "--lr=0"]
    one = run_ft([*args, f"--out_dir={tmp_path / 'one'}"], tiny_data)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}")
    two = run_ft([*args, f"--out_dir={tmp_path / 'two'}"], tiny_data, launcher)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    import json
    a = json.load(open(tmp_path / "one" / "result.json"))
    b = json.load(open(tmp_path / "two" / "result.json"))
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    # a whole number of the 48 images
    assert (a["top1"] * 48 / 100) == pytest.approx(round(a["top1"] * 48 / 100))


@pytest.mark.parametrize("args, message", [
    (["--init=/no/such/file.pt"], "error: checkpoint '/no/such/file.pt' not found"),
    (["--init=nothing"], "error: unknown --init 'nothing'"),
    (["--keep_head=True", "--init={ten}"], "has a head for 10 classes but the data has 6"),
    (["--keep_head=True", "--init={swapped}"],  # the data's 6 names in another order: before, accepted
     "has a head for other classes than the data: output 0 is"),
    (["--init=scratch", "--model=nano/4", "--freeze_blocks=3"],
     "error: freeze_blocks=3 must be in 0..2"),
])
def test_bad_input_is_one_clear_line(tiny_data, tmp_path, args, message):
    from model import ViT, ViTConfig
    cfg = ViTConfig.from_name("nano/4", num_classes=10)
    ten = tmp_path / "ten.pt"
    torch.save(dict(model=ViT(cfg).state_dict(), model_args=cfg.to_dict(), config={}), ten)
    six = ViTConfig.from_name("nano/4", num_classes=6)
    swapped = tmp_path / "swapped.pt"
    classes = sorted(os.listdir(os.path.join(tiny_data, "train")))
    torch.save(dict(model=ViT(six).state_dict(), model_args=six.to_dict(), config={}, classes=classes[::-1]),
               swapped)
    names = dict(ten=ten, swapped=swapped)
    result = run_ft([f"--out_dir={tmp_path}", *[a.format(**names) for a in args]], tiny_data)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr, result.stderr[-1500:]


def test_train_and_val_with_other_classes_are_named(tiny_data, tmp_path):
    import shutil
    shutil.copytree(tiny_data, tmp_path / "data")
    first = sorted(os.listdir(tmp_path / "data" / "val"))[0]
    os.rename(tmp_path / "data" / "val" / first, tmp_path / "data" / "val" / "zebra")
    result = run_ft(["--init=scratch", "--model=nano/4", f"--out_dir={tmp_path / 'out'}"], str(tmp_path / "data"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"only in train/: {first}; only in val/: zebra" in last, result.stderr[-2000:]


def test_dataset_without_images_is_one_clear_line(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    result = run_ft(["--init=scratch", "--model=nano/4"], str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no images found under")


def test_every_randaugment_op_runs_at_both_ends_of_the_magnitude_range():
    for name, op in RAND_OPS.items():
        for level in (0.0, 1.0):
            out = op(gradient_image(), level, np.random.default_rng(0))
            assert out.size == (64, 64) and out.mode == "RGB", name


def test_summary_keeps_runs_of_other_recipes_apart(tmp_path):
    """runs from one init that differ in a setting other than lr, frozen blocks and seed (the README's
    30-epoch and 10-epoch fine-tunes from scratch) are other experiments: each named with that setting
    (before: one init, their top-1 averaged into one point); runs differing only in seed or out_dir
    stay one recipe"""
    import json
    runs = [("long", 30, 0, 97.0), ("long_seed1", 30, 1, 95.0), ("short", 10, 0, 58.0)]
    for name, epochs, seed, top1 in runs:
        (tmp_path / name).mkdir()
        config = dict(init="scratch", freeze_blocks=0, lr=1e-3, seed=seed, epochs=epochs, mixup=0.8,
                      out_dir=str(tmp_path / name))
        result = dict(top1=top1, top5=99.0, best_top1=top1, iter_num=10, max_iters=10,
                      config=config)
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    summary = forkserver.run([sys.executable, "finetune.py", f"--summarize={tmp_path}"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert summary.returncode == 0, summary.stderr[-2000:]
    named = {line.split()[-1]: line.split("  ")[0].strip()
             for line in summary.stdout.splitlines()[1:4]}
    assert named == {str(tmp_path / "long"): "scratch (epochs=30)",
                     str(tmp_path / "long_seed1"): "scratch (epochs=30)",
                     str(tmp_path / "short"): "scratch (epochs=10)"}


def test_layer_decay_scales_each_groups_lr_by_its_depth(tiny_data, tiny_teacher, tmp_path):
    """After one step with --layer_decay=0.5 the saved AdamW groups hold the lr of iteration 0
    (warmup of 1 epoch = 144 / 16 = 9 iterations: lr * 1 / 9) times 0.5 ** (depth + 1 - id),
    with BEiT's layer ids worked out here from the parameter names: patch embedding, CLS and
    positions 0, block i -> i + 1, the rest (fc_norm, head) depth + 1. The groups are matched to
    names through ViT.param_groups' order, checked against the shapes of AdamW's saved moments."""
    from model import ViT, ViTConfig
    lr = 1e-2
    args = [f"--init={tiny_teacher}", "--layer_decay=0.5", f"--lr={lr}", "--stop_iter=1",
            f"--out_dir={tmp_path}"]
    result = run_ft(args, tiny_data)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = load(tmp_path / "ckpt.pt")
    vit = ViT(ViTConfig.from_dict(ckpt["model_args"]))
    vit.patch_embed.requires_grad_(False)  # --freeze_patch_embed=True: not in the optimizer
    depth = vit.config.depth
    shapes = {n: p.shape for n, p in vit.named_parameters()}

    def layer_id(name):
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    lr_now = lr * 1 / 9  # warmup: lr * (it + 1) / warmup_iters at it = 0
    saved, state = ckpt["optimizer"]["param_groups"], ckpt["optimizer"]["state"]
    groups = vit.param_groups(0.05, 0.5)
    assert len(saved) == len(groups)
    seen = set()
    for group, names in zip(saved, (g["names"] for g in groups)):
        assert len(group["params"]) == len(names)
        for i, name in zip(group["params"], names):
            assert state[i]["exp_avg"].shape == shapes[name], name
        ids = {layer_id(name) for name in names}
        assert len(ids) == 1, names
        lid = ids.pop()
        seen.add(lid)
        assert group["lr"] == pytest.approx(lr_now * 0.5 ** (depth + 1 - lid), rel=1e-9), names
    assert seen == set(range(depth + 2))


def test_accumulation_gives_the_gradient_of_the_whole_step(tiny_data, tiny_teacher, tmp_path):
    """Micro-batches of 8 with 2 accumulation steps against one micro-batch of 16: the same 16
    images per step (the order and every augmentation draw depend on the seed and the image, not
    the micro-batch size), so the same mean loss, whose gradient norm each step logs (before
    clipping). Summing the two halves' losses without dividing by 2 would double it; AdamW's
    update, invariant to a constant gradient scale, would hide that in the weights."""
    records = {}
    for micro in (8, 16):
        out = tmp_path / str(micro)
        args = [f"--init={tiny_teacher}", "--lr=1e-2", "--stop_iter=2",
                f"--micro_batch_size={micro}", f"--out_dir={out}"]
        result = run_ft(args, tiny_data)
        assert result.returncode == 0, result.stderr[-2000:]
        records[micro] = [r for r in map(json.loads, open(out / "log.jsonl")) if "grad_norm" in r]
        records[micro].append(load(out / "ckpt.pt")["model"])
    *accumulated, tuned_accumulated = records[8]
    *whole, tuned_whole = records[16]
    assert len(accumulated) == len(whole) == 2
    for a, b in zip(accumulated, whole):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for k, v in tuned_whole.items():
        assert torch.allclose(tuned_accumulated[k], v, rtol=0, atol=1e-4), k


def test_top1_counts_the_images_of_a_short_last_batch(tiny_data, tiny_teacher, tmp_path):
    """result.json's top-1 and top-5 against the saved model's, computed here over the 48 val
    images (EvalTransform, argmax / top 5 of the logits): with batches of 32 the last holds 16
    images, which must count as 16, not 32."""
    from data import EvalTransform, ImageFolder
    from model import ViT, ViTConfig
    args = [f"--init={tiny_teacher}", "--lr=1e-2", "--stop_iter=1", "--total_batch_size=32",
            "--micro_batch_size=32", f"--out_dir={tmp_path}"]
    result = run_ft(args, tiny_data)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = load(tmp_path / "ckpt.pt")
    reported = json.load(open(tmp_path / "result.json"))
    vit = ViT(ViTConfig.from_dict(ckpt["model_args"]))
    vit.load_state_dict(ckpt["model"])
    vit.eval()
    val_set = ImageFolder(os.path.join(tiny_data, "val"), EvalTransform(32, 0.875))
    items = [val_set[i] for i in range(len(val_set))]
    assert len(items) == 48
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items])
    with torch.no_grad():
        logits = vit(images)
    top1 = (logits.argmax(-1) == labels).sum().item()
    top5 = (logits.topk(5, -1).indices == labels[:, None]).any(-1).sum().item()
    assert top1 > 0 and top5 > 0
    assert reported["top1"] == pytest.approx(100 * top1 / 48, abs=1e-6)
    assert reported["top5"] == pytest.approx(100 * top5 / 48, abs=1e-6)


# ---- freezing, heads and the summary, in process (mutation-driven) ---------------------------

def test_freeze_blocks_freezes_the_stem_the_first_k_blocks_and_at_depth_the_norm(monkeypatch):
    """requires_grad of every weight for k = 0..depth (2), from a checkpoint and from scratch,
    against the definition with the names parsed here: the patch projection always from a
    checkpoint, never from scratch before k > 0; for k > 0 the stem (CLS, positions, ln_pre), the
    shared relative table and blocks 0..k-1, and the final norm only at k = depth (the probe).
    AdamW holds exactly the trainable weights."""
    import finetune
    from model import ViT, ViTConfig
    cfg = ViTConfig.from_name("nano/4", num_classes=6, pre_norm=True, rel_pos="shared")
    stem = ("patch_embed", "cls_token", "pos_embed", "norm_pre", "rel_pos_bias")
    for init in ("ckpt.pt", "scratch"):
        for k in range(3):
            monkeypatch.setattr(finetune, "init", init)
            monkeypatch.setattr(finetune, "freeze_blocks", k)
            vit = ViT(cfg)
            finetune.freeze(vit)
            expected = set()
            for name, _ in vit.named_parameters():
                top, *rest = name.split(".")
                if (top == "patch_embed" and init != "scratch"
                        or k > 0 and (top in stem or top == "blocks" and int(rest[0]) < k)
                        or k == 2 and top == "norm"):
                    expected.add(name)
            frozen = {name for name, p in vit.named_parameters() if not p.requires_grad}
            assert frozen == expected, (init, k)
            optimizer = vit.configure_optimizers(0.05, 1e-3, (0.9, 0.95), 0.6)
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            assert held == {id(p) for p in vit.parameters() if p.requires_grad}, (init, k)


def test_keep_head_computes_the_source_network_and_a_new_head_starts_at_a_thousandth(
        tiny_teacher, monkeypatch):
    """--keep_head: the built model is the checkpoint's network itself (its pooling, final norm and
    head unscaled; the added per-layer relative tables start at 0), so its logits equal those of
    the plain source ViT loaded here. A new head is BEiT's 0.001 x the init's trunc normal of std
    0.02: weights of std 2e-5 (288 of them: the estimate is within 10%), biases 0"""
    import finetune
    from model import ViT, ViTConfig
    ckpt = load(tiny_teacher)
    source = ViT(ViTConfig.from_dict(ckpt["model_args"]))
    source.load_state_dict(ckpt["model"])
    for name, value in dict(init=tiny_teacher, init_path="", img_size=32, rel_pos=True,
                            drop_path=0.0, keep_head=True).items():
        monkeypatch.setattr(finetune, name, value)
    kept, _ = finetune.build_model(ckpt["classes"])
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(kept.eval()(images), source.eval()(images), atol=1e-6)
    monkeypatch.setattr(finetune, "keep_head", False)
    torch.manual_seed(0)
    new, _ = finetune.build_model(ckpt["classes"])
    assert new.head.weight.shape == (6, 48)
    assert new.head.weight.std().item() == pytest.approx(2e-5, rel=0.1)
    assert torch.equal(new.head.bias, torch.zeros(6))


def test_summary_names_runs_by_the_settings_that_differ_within_their_own_init(tmp_path, capsys,
                                                                               monkeypatch):
    """three clip runs, two on one data_dir at two lrs and one on another, and two scratch runs
    of 30 and 10 epochs: by hand, clip's runs differ in data_dir only (another data set is
    another experiment, not a repeat) and scratch's in epochs only, so clip's labels name no
    epochs"""
    import finetune
    monkeypatch.setattr(finetune, "pyplot", lambda: None)
    runs = [("c1", "clip", "data/a", 50, 1e-4), ("c2", "clip", "data/a", 50, 1e-3),
            ("c3", "clip", "data/b", 50, 1e-4), ("s1", "scratch", "data/a", 30, 1e-3),
            ("s2", "scratch", "data/a", 10, 1e-3)]
    for name, init, data, epochs, lr in runs:
        (tmp_path / name).mkdir()
        config = dict(init=init, freeze_blocks=0, lr=lr, seed=0, epochs=epochs, data_dir=data,
                      out_dir=str(tmp_path / name))
        result = dict(top1=80.0, top5=95.0, best_top1=80.0, iter_num=9, max_iters=9,
                      config=config)
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    finetune.print_summary(str(tmp_path))
    rows = capsys.readouterr().out.splitlines()[1:6]
    named = {row.split()[-1]: row.split("  ")[0].strip() for row in rows}
    assert named == {str(tmp_path / "c1"): "clip (data_dir=data/a)",
                     str(tmp_path / "c2"): "clip (data_dir=data/a)",
                     str(tmp_path / "c3"): "clip (data_dir=data/b)",
                     str(tmp_path / "s1"): "scratch (epochs=30)",
                     str(tmp_path / "s2"): "scratch (epochs=10)"}


def test_summary_frozen_point_is_at_the_lr_of_the_best_mean():
    """Fig. 8c takes each number of frozen blocks at the lr whose runs have the best mean top-1,
    worked out by hand: 0 blocks, means 50 (two runs) and 80 -> [80] (their sum would pick 100);
    2 blocks, means 75 (60, 90) and 80 -> [80] (the best single run would pick 90)"""
    from finetune import summary_curves
    runs = [("md", 0, 1e-3, 50.0, 0.0, "a", False), ("md", 0, 1e-3, 50.0, 0.0, "b", False),
            ("md", 0, 1e-4, 80.0, 0.0, "c", False), ("md", 2, 1e-3, 60.0, 0.0, "d", False),
            ("md", 2, 1e-3, 90.0, 0.0, "e", False), ("md", 2, 1e-4, 80.0, 0.0, "f", False)]
    assert summary_curves(runs)["md"]["frozen"] == {0: [80.0], 2: [80.0]}


def test_best_top1_is_the_maximum_over_every_evaluation_across_a_resume(tiny_data, tiny_teacher,
                                                                       tmp_path):
    """result.json's best_top1 against the maximum of log.jsonl's val_top1 records, an evaluation
    each iteration, in a run stopped at 2 and resumed to 4: here the top-1 is highest before the
    resume, so neither the last top-1 nor the best since the resume is that maximum"""
    args = [f"--init={tiny_teacher}", "--lr=1e-2", "--eval_interval=1", f"--out_dir={tmp_path}"]
    run_ft([*args, "--stop_iter=2"], tiny_data).check_returncode()
    resumed = run_ft([*args, "--stop_iter=4", "--resume=True"], tiny_data)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    top1s = [r["val_top1"] for r in map(json.loads, open(tmp_path / "log.jsonl"))
             if "val_top1" in r]
    assert len(top1s) == 4 and max(top1s[:2]) > max(top1s[2:])
    result = json.load(open(tmp_path / "result.json"))
    assert result["top1"] == top1s[-1] and result["best_top1"] == max(top1s)
