"""
How close the MD training step is to the machine's limit, measured against baselines in the
same run. Prints one table; every ratio compares numbers taken here, now.

    python bench.py --quick          # tiny config, CPU, about a minute
    python bench.py                  # + ViT-Ti/S/B at 224 px (minutes on a 2-core CPU)
    python bench.py --sizes=B/16 --batch=64 --steps=10   # on a GPU

MFU = achieved matmul FLOP/s (ViT.flops_per_image, x3 for forward+backward) / peak. On CUDA the
peak is the GPU's dense bf16 peak by name (common.PEAK_BF16_FLOPS); on CPU it is the GEMM
throughput of this machine measured first (fp32 for fp32 rows, bf16 for bf16 rows).
"""
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from common import peak_flops
from data import TrainTransform, load_image
from data.masks import BEIT_RATIO, MaskGenerator
from hessian import hessian_vector_product
from model import DecoderHead, MDStudent, ViT, ViTConfig
from teacher import Teacher, Whitening
from train_md import md_loss

args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in sys.argv[1:])
QUICK = "quick" in args
DEVICE = args.get("device", "cuda" if torch.cuda.is_available() else "cpu")
SIZES = args["sizes"].split(",") if "sizes" in args else (["tiny/4"] if QUICK else ["tiny/4", "Ti/16", "S/16", "B/16"])
STEPS = int(args.get("steps", 3))
rows = []


def timeit(fn, steps=STEPS, warmup=1):
    """median seconds of fn() over steps runs, after warmup runs"""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def gemm_peak(dtype, n=2048):
    a, b = torch.randn(n, n, device=DEVICE, dtype=dtype), torch.randn(n, n, device=DEVICE, dtype=dtype)
    return 2 * n ** 3 / timeit(lambda: a @ b, steps=5)


def batch_for(size):
    if "batch" in args:
        return int(args["batch"])
    return {"tiny/4": 64, "Ti/16": 16, "S/16": 8, "B/16": 4}.get(size, 4)


def md_setup(size, fused=True):
    cfg = ViTConfig.beit_v2(size, mask_token=True)
    torch.manual_seed(0)
    student = ViT(cfg).to(DEVICE)
    teacher_vit = ViT(ViTConfig.from_name(size)).to(DEVICE)  # a DeiT-like teacher of the same size
    for m in (student, teacher_vit):
        for block in m.blocks:
            block.attn.fused = fused
    head = DecoderHead("linear", cfg.embed_dim, cfg.embed_dim).to(DEVICE)
    md = MDStudent(student, head)
    head_params = [("decoder." + n, p) for n, p in head.named_parameters()]
    opt = student.configure_optimizers(0.05, 1e-4, (0.9, 0.98), extra=head_params)
    B = batch_for(size)
    g = np.random.default_rng(0)
    images = torch.rand(B, 3, cfg.img_size, cfg.img_size, device=DEVICE)
    masks = torch.from_numpy(np.stack([MaskGenerator("block", cfg.grid, BEIT_RATIO)(g).flatten() for _ in range(B)])).to(DEVICE)
    return cfg, student, teacher_vit, md, opt, images, masks


def autocast(dtype):
    return torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")


def bench_md(size, dtype="fp32", compiled=False, fused=True, teacher_bf16=True):
    cfg, student, teacher_vit, md, opt, images, masks = md_setup(size, fused)
    teacher = Teacher(teacher_vit, dtype=torch.bfloat16 if teacher_bf16 else None)
    model = torch.compile(md) if compiled else md

    def teacher_only():
        return whiten(teacher(images)[:, 1:])

    whiten = Whitening("ln", teacher_vit.config.embed_dim)

    def step():
        targets = teacher_only()
        with autocast(dtype):
            pred = model(images, masks)
        loss = md_loss(pred, targets, masks)  # train_md.py's R (its defaults: smooth L1, masked patches)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    seconds = timeit(step, warmup=2 if compiled else 1)
    teacher_seconds = timeit(teacher_only)
    flops = len(images) * (3 * student.flops_per_image() + teacher_vit.flops_per_image())
    return seconds, teacher_seconds, flops, len(images)


def bench_timm(size, dtype):
    """ours vs timm's ViT of the same size: a plain supervised train step (no mask), same batch"""
    try:
        import timm
    except ImportError:
        return None
    cfg = ViTConfig.from_name(size, num_classes=1000, global_pool="cls")
    B = batch_for(size)
    x = torch.rand(B, 3, cfg.img_size, cfg.img_size, device=DEVICE)
    y = torch.randint(0, 1000, (B,), device=DEVICE)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=cfg.img_size, patch_size=cfg.patch_size,
                            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads).to(DEVICE)
    ours = ViT(cfg).to(DEVICE)
    steps = []
    for model in (ours, ref):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            with autocast(dtype):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps.append(step)
    times = [[], []]
    for i in range(2 * STEPS + 2):  # alternate the two, so that drifts of the machine hit both alike
        for j in (0, 1):
            seconds = timeit(steps[j], steps=1, warmup=0)
            if i >= 2:
                times[j].append(seconds)
    return [float(np.median(t)) for t in times]


def bench_data(n=16):
    """decode + RandomResizedCrop + flip + jitter + block mask of ImageNet-sized JPEGs, one worker"""
    with tempfile.TemporaryDirectory() as d:
        g = np.random.default_rng(0)
        paths = []
        for i in range(n):
            path = os.path.join(d, f"{i}.jpg")
            smooth = np.kron(g.integers(0, 256, (47, 63, 3)), np.ones((8, 8, 1)))[:375, :500].astype(np.uint8)
            from PIL import Image
            Image.fromarray(smooth).save(path, quality=90)
            paths.append(path)
        transform, mask = TrainTransform(224, 0.2), MaskGenerator("block", 14, BEIT_RATIO)

        def load_all():
            for p in paths:
                rng = np.random.default_rng(0)
                transform(load_image(p), rng)
                mask(rng)
        return n / timeit(load_all)


def bench_analysis(size, n):
    """collect() for every representation metric vs plain forwards over the same images"""
    from analyze import collect
    model = ViT(ViTConfig.from_name(size)).to(DEVICE).eval()
    images = torch.rand(n, 3, model.config.img_size, model.config.img_size)
    loader = torch.utils.data.DataLoader([(images[i], 0, None) for i in range(n)], batch_size=16,
                                         collate_fn=lambda b: (torch.stack([x[0] for x in b]), None, None, 0))
    plain = timeit(lambda: [model.forward_features(x.to(DEVICE)) for x, _, _, _ in loader])
    full = timeit(lambda: collect(model, loader, DEVICE, {"attn_distance", "attn_entropy", "nmi", "fourier", "svd"}))
    return full / plain


def bench_hvp(size="tiny/4"):
    cfg = ViTConfig.from_name(size, num_classes=10)
    model = ViT(cfg).to(DEVICE).eval()
    x = torch.rand(batch_for(size), 3, cfg.img_size, cfg.img_size, device=DEVICE)
    y = torch.randint(0, 10, (len(x),), device=DEVICE)
    batches = [(x, y)]
    v = [torch.randn_like(p) for p in model.parameters()]

    def fwd_bwd():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    return timeit(lambda: hessian_vector_product(model, batches, v)) / timeit(fwd_bwd)


def main():
    torch.manual_seed(0)
    on_gpu = DEVICE.startswith("cuda")
    machine = torch.cuda.get_device_name(DEVICE) if on_gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"machine: {machine}; torch {torch.__version__}")
    peaks = {"fp32": peak_flops(DEVICE), "bf16": peak_flops(DEVICE)} if on_gpu else {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    if not on_gpu:
        print(f"measured GEMM peak (2048^3): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"\n{'MD step':<34} {'batch':>5} {'ms/step':>9} {'img/s':>8} {'MFU':>6} {'teacher':>8}")
    variants = [("fp32", False, True, False), ("bf16", False, True, True), ("fp32 explicit attention", False, False, False),
                ("bf16, teacher fp32", False, True, False)]
    if not QUICK or on_gpu:
        variants.append(("bf16 + compile", True, True, True))
    for size in SIZES:
        for name, compiled, fused, teacher_bf16 in variants:
            dtype = "bf16" if name.startswith("bf16") else "fp32"
            seconds, teacher_seconds, flops, B = bench_md(size, dtype, compiled, fused, teacher_bf16)
            mfu = flops / seconds / peaks[dtype] if peaks[dtype] else float("nan")
            print(f"{size + ' ' + name:<34} {B:>5} {1000 * seconds:>9.1f} {B / seconds:>8.1f} {100 * mfu:>5.1f}% {100 * teacher_seconds / seconds:>7.1f}%")
    print(f"\n{'student step vs timm (same size)':<34} {'ours ms':>9} {'timm ms':>9} {'ours/timm speed':>16}")
    for size in SIZES:
        for dtype in ("fp32", "bf16"):
            r = bench_timm(size, dtype)
            if r is None:
                print(f"{size} {dtype}: skipped (timm not installed)")
                break
            print(f"{size + ' ' + dtype:<34} {1000 * r[0]:>9.1f} {1000 * r[1]:>9.1f} {r[1] / r[0]:>16.2f}")
    per_worker = bench_data()
    best = max(B / s for s, _, _, B in [bench_md(SIZES[-1], "bf16")])
    print(f"\ndata: {per_worker:.0f} img/s per worker (JPEG 500x375 decode + crop + flip + jitter + block mask); "
          f"{int(np.ceil(best / per_worker))} worker(s) feed the {SIZES[-1]} bf16 step ({best:.0f} img/s)")
    for size in (SIZES[0], SIZES[-1]) if len(SIZES) > 1 else SIZES:
        n = 64 if size == "tiny/4" else 16
        print(f"analysis: analyze.py --metric all on {size} costs {bench_analysis(size, n):.2f}x the plain forwards over the same {n} images")
    print(f"Hessian-vector product: {bench_hvp():.2f}x one forward+backward")


if __name__ == "__main__":
    main()
