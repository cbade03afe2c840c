"""
How close the MD training step is to the machine's limit, measured against baselines in the
same run. Prints one table; every ratio compares numbers taken here, now.

    python bench.py --quick          # tiny config, no analysis rows, CPU, about 2 minutes
    python bench.py                  # + ViT-Ti/S/B at 224 px (minutes on a 2-core CPU)
    python bench.py --analysis       # only the analysis and curvature rows (--sizes=tiny/4,B/16;
                                     # --counts=0: only the timed ones, not the product counts)
    python bench.py --gpu            # on a GPU: ViT-B/16 at batch 64 and 128 (section at the end)

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import option_error, peak_flops, print_help
from data import TrainTransform, load_image
from data.masks import BEIT_RATIO, MaskGenerator
from hessian import (HessianOperator, cross_entropy, curvature, hutchinson, keep_freed_memory, lanczos,
                     power_iteration)
from model import PRESETS, DecoderHead, MDStudent, ViT, ViTConfig
from teacher import Teacher, Whitening
from train_md import md_loss

args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in sys.argv[1:])
QUICK = "quick" in args
DEVICE = args.get("device", "cuda" if torch.cuda.is_available() else "cpu")
if "sizes" in args:
    SIZES = args["sizes"].split(",")
else:
    SIZES = ["tiny/4"] if QUICK else ["tiny/4", "Ti/16", "S/16", "B/16"]
STEPS = int(args["steps"]) if args.get("steps", "").isdigit() else 3  # checked in bench_option_error
rows = []


def timeit(fn, steps=STEPS, warmup=1):
    """median seconds of fn() over steps runs, after warmup runs"""
    for _ in range(warmup):
        fn()
    return float(np.median([seconds_of(fn) for _ in range(steps)]))


def seconds_of(fn):
    """wall seconds of one fn() call, the device's queue drained before and after"""
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def gemm_peak(dtype, n=2048):
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    return 2 * n ** 3 / timeit(lambda: a @ b, steps=5)


def batch_for(size):
    if "batch" in args:
        return int(args["batch"])
    if DEVICE.startswith("cuda"):  # enough work per kernel launch
        return {"tiny/4": 256, "Ti/16": 128, "S/16": 64, "B/16": 32}.get(size, 32)
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
    masks = [MaskGenerator("block", cfg.grid, BEIT_RATIO)(g).flatten() for _ in range(B)]
    masks = torch.from_numpy(np.stack(masks)).to(DEVICE)
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
        # train_md.py's R (its defaults: smooth L1, masked patches)
        loss = md_loss(pred, targets, masks)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if compiled:
        step()  # the compilation, before compare's warm-up call
    # taking turns, the fastest of each: a busy machine slows both alike (timed apart, the
    # teacher's share once came out at 134%)
    seconds, teacher_seconds = compare([step, teacher_only], rounds=STEPS)
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
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=cfg.img_size,
                            patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                            num_heads=cfg.num_heads).to(DEVICE)
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
    # alternate the two, so that drifts of the machine hit both alike
    for i in range(2 * STEPS + 2):
        for j in (0, 1):
            seconds = timeit(steps[j], steps=1, warmup=0)
            if i >= 2:
                times[j].append(seconds)
    return [float(np.median(t)) for t in times]


def bench_data(n=16):
    """decode + RandomResizedCrop + flip + jitter + block mask of ImageNet-sized JPEGs, one
    worker"""
    with tempfile.TemporaryDirectory() as d:
        g = np.random.default_rng(0)
        paths = []
        for i in range(n):
            path = os.path.join(d, f"{i}.jpg")
            smooth = np.kron(g.integers(0, 256, (47, 63, 3)), np.ones((8, 8, 1)))
            smooth = smooth[:375, :500].astype(np.uint8)
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


def compare(fns, rounds=5, warmup=True):
    """the minimum seconds of each fn over `rounds` runs, the fns taking turns: drifts of a shared
    machine hit all of them alike, and the minimum is the run least disturbed by other jobs"""
    for fn in fns if warmup else ():
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], seconds_of(fn))
    return best


def median_ratios(fns, rounds=7):
    """fns[i] / fns[0] for i >= 1: each fns[i] run between two runs of fns[0], divided by their
    mean, median over `rounds`. On a shared machine whose speed drifts, and where the first run
    after another kind of work is slow, this is steadier than the ratio of two minima."""
    for fn in fns:
        fn()
    base, *others = fns
    ratios = []
    for _ in range(rounds):
        before = seconds_of(base)
        row = []
        for fn in others:
            seconds = seconds_of(fn)
            after = seconds_of(base)
            row.append(2 * seconds / (before + after))
            before = after
        ratios.append(row)
    return np.median(np.array(ratios), axis=0).tolist()


def bench_analysis(size, n, batch_size=16):
    """collect() for every representation metric (Fourier after each block, and at half blocks)
    and for each group of metrics alone vs plain forwards over the same images -> the median
    ratios"""
    from analyze import collect
    model = ViT(ViTConfig.from_name(size)).to(DEVICE).eval()
    images = torch.rand(n, 3, model.config.img_size, model.config.img_size)

    def stack(batch):
        return torch.stack([x[0] for x in batch]), None, None, 0

    loader = torch.utils.data.DataLoader([(images[i], 0, None) for i in range(n)],
                                         batch_size=batch_size, collate_fn=stack)
    attention = {"attn_distance", "attn_entropy", "nmi"}
    runs = {"all": (attention | {"fourier", "svd"}, "blocks"),
            "half": (attention | {"fourier", "svd"}, "half"),
            "attention": (attention, "blocks"), "fourier": ({"fourier"}, "blocks"),
            "svd": ({"svd"}, "blocks")}

    @torch.no_grad()
    def plain():
        for x, _, _, _ in loader:
            model.forward_features(x.to(DEVICE))

    def analysis(want, fourier_at):
        return lambda: collect(model, loader, DEVICE, want, None, fourier_at)
    rounds = 3 if DEVICE.startswith("cuda") else 7  # a GPU's times drift less; gpu_check's time limit
    ratios = median_ratios([plain] + [analysis(*run) for run in runs.values()], rounds)
    return dict(zip(runs, ratios))


def bench_eigensolvers(n, count, per_task):
    """GPU only: float64 eigenvalues of `count` random symmetric n x n matrices (analyze.py's svd
    metric solves one per image and layer) two ways, ms per matrix: torch's batched eigvalsh on
    the device (cuSOLVER, one matrix after another for n > 32); the host's LAPACK as
    analyze.collect runs it, tasks of `per_task` matrices (one layer of a batch) on
    analyze.SPECTRA_POOL's workers. -> (device, host, largest difference from device)"""
    from analyze import SPECTRA_POOL
    a = torch.randn(count, n, n, dtype=torch.float64, device=DEVICE)
    matrices = a @ a.transpose(-1, -2)

    def device():
        return torch.linalg.eigvalsh(matrices)

    def on_host(chunk):
        return torch.linalg.eigvalsh(chunk.cpu())

    def host():
        tasks = [SPECTRA_POOL.submit(on_host, chunk) for chunk in matrices.split(per_task)]
        return torch.cat([task.result() for task in tasks]).to(DEVICE)

    seconds = compare([device, host], rounds=3)
    reference = device()
    difference = (host() - reference).abs().max().item() / reference.abs().max().item()
    return [1000 * s / count for s in seconds] + [difference]


def classifier_batch(size, B):
    cfg = ViTConfig.from_name(size, num_classes=10)
    torch.manual_seed(0)
    model = ViT(cfg).to(DEVICE).eval()
    x = torch.rand(B, 3, cfg.img_size, cfg.img_size, device=DEVICE)
    y = torch.randint(0, 10, (B,), device=DEVICE)
    return model, [(x, y)]


def bench_hvp(size="tiny/4", vectors=8):
    """one Hessian-vector product / one forward+backward over the same batch, four ways: the code
    before (`Before`); double backward building its own gradient graph; double backward with one
    graph serving `vectors` products (HessianOperator: the trace's vectors, Lanczos on one
    batch); forward-over-reverse (torch.func.jvp of torch.func.grad). All through the math
    attention kernel. Then a shared-graph product's FLOPs / a forward+backward's: the least a
    product can cost at the same arithmetic speed; and the trace's quadratic forms r^T H r by
    Taylor mode (HessianOperator.quadratic, `vectors` per call), time and FLOPs per form."""
    from torch.func import functional_call, grad, jvp
    model, batches = classifier_batch(size, batch_for(size))
    (x, y), = batches
    shared = HessianOperator(model, batches)
    V = shared.random(torch.Generator().manual_seed(0), count=vectors)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangent = dict(zip(names, shared.unflat(V[0])))

    def fwd_bwd():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def loss(p):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    def forward_over_reverse():
        with sdpa_kernel(SDPBackend.MATH):
            return jvp(grad(loss), (params,), (tangent,))[1]

    def own_graph():
        return HessianOperator(model, batches)(V[0])

    def before():
        return Before(model, batches)(V[0])

    base, old, fresh, many, forward, forms = compare([fwd_bwd, before, own_graph, lambda: shared(V),
                                                      forward_over_reverse, lambda: shared.quadratic(V)])
    # shared keeps its latest graph, so the count below is one product's own work
    fb_flops, product_flops = flops_of(fwd_bwd), flops_of(lambda: shared(V[:1]))
    form_flops = flops_of(lambda: shared.quadratic(V)) / vectors
    return (old / base, fresh / base, many / vectors / base, forward / base,
            product_flops / fb_flops, forms / vectors / base, form_flops / fb_flops)


def flops_of(fn):
    """matmul and convolution FLOPs of one call of fn (torch's FlopCounterMode, which does not
    count the in-place addmm_ and baddbmm_ of Taylor mode: counted here, 2 per multiply-add)"""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_(out, a, b, *rest, out_shape=None, **kwargs):  # shapes: a (M, K), b (K, N)
        return 2 * a[0] * a[1] * b[1]

    def baddbmm_(out, a, b, *rest, out_shape=None, **kwargs):  # a (B, M, K), b (B, K, N)
        return 2 * a[0] * a[1] * a[2] * b[2]

    in_place = {torch.ops.aten.addmm_: addmm_, torch.ops.aten.baddbmm_: baddbmm_}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        fn()
    return counter.get_total_flops()


class Before(HessianOperator):
    """the Hessian-vector product of the code before Lanczos (hessian.py at commit 1a52275, the
    form PyHessian uses): every product builds its own gradient graph g (one forward + backward
    with create_graph) and differentiates the scalar g . v"""

    def __init__(self, model, batches, loss_fn=cross_entropy):
        super().__init__(model, batches, loss_fn)
        self.mask = torch.ones(self.size).to(self.params[0])  # every weight is a direction
        self.taylor = False  # its trace samples were v . (H v), not quadratic forms by Taylor mode

    def __call__(self, vectors):
        vectors = vectors.reshape(-1, self.size)
        out = torch.zeros_like(vectors)
        for v, o in zip(vectors, out):
            for inputs, targets in self.batches:
                with sdpa_kernel(SDPBackend.MATH):
                    loss = self.loss_fn(self.model, inputs, targets)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                self.passes += len(targets) / self.total
                used = [(g, u) for g, u in zip(grads, self.unflat(v)) if g is not None]
                product = sum((g * u).sum() for g, u in used)
                if not torch.is_tensor(product) or not product.requires_grad:
                    continue
                hv = torch.autograd.grad(product, self.params, allow_unused=True)
                hv = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, self.params)]
                o.add_(self.flat(hv), alpha=len(targets) / self.total)
        self.products += len(vectors)
        return out


def embedded_batches(n):
    """the embedded teacher (a trained tiny/4 classifier) and n seeded val images as
    `analyze.py --metric hessian embedded --n_images=n --batch_size=n` picks them"""
    from analyze import DEFAULTS, image_folder, labelled_batches, subset_of
    from teacher import load_model
    from data import EvalTransform
    model, _ = load_model("embedded")
    model.to(DEVICE)
    opts = dict(DEFAULTS, metric="hessian", n_images=n, batch_size=n)
    dataset = image_folder(opts, "val")
    dataset.transform = EvalTransform(model.config.img_size)
    return model, labelled_batches(model, dataset, subset_of(dataset, opts), opts, DEVICE)


def bench_curvature(n=64, rounds=2):
    """`analyze.py --metric hessian embedded --n_images=64 --batch_size=64` with the README's
    settings (top 2 to tol 1e-3, 50 trace products), before (the code before Lanczos: power
    iteration, plain Hutchinson, the `Before` product) and now (`curvature`: Lanczos, deflated
    Hutchinson by quadratic forms in Taylor mode, one graph for all products), in forward+backward
    times over the same images; and now at before's accuracy (`--trace_tol` = before's standard
    error / |trace|, the samples stop there). The runs alternate, `rounds` each, and the fastest
    counts"""
    model, batches = embedded_batches(n)
    (x, y), = batches

    def fwd_bwd():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    old, new, equal = {}, {}, {}

    def before():
        operator = Before(model, batches)
        old["values"], _, _ = power_iteration(operator, 2, 1e-3, 100)
        old["trace"], old["stderr"], _ = hutchinson(operator, 50, seed=1, chunk=1)
        old["products"] = operator.products

    def now():
        new.update(curvature(model, batches, 2, 1e-3, 100, 50))

    def at_equal_error():  # runs after before() has set the error to match
        equal["tol"] = old["stderr"] / abs(old["trace"])
        equal.update(curvature(model, batches, 2, 1e-3, 100, 500, equal["tol"]))

    fb_s, = compare([fwd_bwd])
    before_s, now_s, equal_s = compare([before, now, at_equal_error], rounds=rounds, warmup=False)
    fb_s = min(fb_s, *compare([fwd_bwd]))  # the fastest forward+backward, before or after
    return dict(old=old, new=new, equal=equal, before_fb=before_s / fb_s, now_fb=now_s / fb_s,
                equal_fb=equal_s / fb_s)


def eigen_counts(model, batches, seeds=3, cap=60):
    """Hessian-vector products for the top 2 eigenvalues to relative 1e-3, per seed: by each
    method's own stop rule (with the error it leaves), and until the values stay within 1e-3 of
    the exact ones (power iteration run `cap` products per eigenvalue, None: not within); and
    power iteration at equal delivered accuracy: its tol tightened until every seed's values are
    within 1e-3 of the exact ones -> (tol, products over the seeds), or None"""
    hessian = HessianOperator(model, batches, keep_graphs=True)  # the counts, not the time
    exact = lanczos(hessian, 3, 1e-10, 300)["values"]  # the reference

    def error(values):
        by_magnitude = sorted(values, key=abs, reverse=True)
        return max(abs(v - e) / abs(e) for v, e in zip(by_magnitude, exact))

    def stays_within(history, i):
        out = [j for j, v in enumerate(history) if abs(v - exact[i]) > 1e-3 * abs(exact[i])]
        last_out = out[-1] if out else -1
        return last_out + 2 if last_out + 1 < len(history) else None

    rows = []
    for seed in range(seeds):
        values, _, histories = power_iteration(hessian, 2, 1e-3, 100, seed)
        _, _, long_histories = power_iteration(hessian, 2, 0.0, cap, seed)
        needed = [stays_within(h, i) for i, h in enumerate(long_histories)]
        found = lanczos(hessian, 2, 1e-3, 100, seed)
        history = lanczos(hessian, 2, 0.0, cap, seed)["history"]  # Ritz values only move closer
        within = [j + 1 for j, vs in enumerate(history)
                  if len(vs) == 2 and error(vs) <= 1e-3]
        rows.append(dict(power=sum(len(h) for h in histories), power_error=error(values),
                         power_needed=None if None in needed else sum(needed),
                         lanczos=found["steps"], lanczos_error=error(found["values"]),
                         lanczos_needed=within[0] if within else None))
    for tol in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5):
        runs = [power_iteration(hessian, 2, tol, 100, seed) for seed in range(seeds)]
        if all(error(values) <= 1e-3 for values, _, _ in runs):
            return exact, rows, (tol, sum(len(h) for _, _, histories in runs for h in histories))
    return exact, rows, None


def main():
    torch.manual_seed(0)
    on_gpu = DEVICE.startswith("cuda")
    if on_gpu:
        machine = torch.cuda.get_device_name(DEVICE)
    else:
        cpu = platform.processor() or platform.machine()
        machine = f"{cpu}, {torch.get_num_threads()} threads"
    print(f"machine: {machine}; torch {torch.__version__}")
    if on_gpu:
        peaks = {"fp32": peak_flops(DEVICE), "bf16": peak_flops(DEVICE)}
    else:
        peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
        print(f"measured GEMM peak (2048^3): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
              f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"\n{'MD step':<34} {'batch':>5} {'ms/step':>9} {'img/s':>8} {'MFU':>6} {'teacher':>8}")
    variants = [("fp32", False, True, False), ("bf16", False, True, True),
                ("fp32 explicit attention", False, False, False),
                ("bf16, teacher fp32", False, True, False)]
    if not QUICK or on_gpu:
        variants.append(("bf16 + compile", True, True, True))
    for size in SIZES:
        for name, compiled, fused, teacher_bf16 in variants:
            dtype = "bf16" if name.startswith("bf16") else "fp32"
            seconds, teacher_seconds, flops, B = bench_md(size, dtype, compiled, fused,
                                                          teacher_bf16)
            mfu = flops / seconds / peaks[dtype] if peaks[dtype] else float("nan")
            row = size + " " + name
            teacher_share = 100 * teacher_seconds / seconds
            print(f"{row:<34} {B:>5} {1000 * seconds:>9.1f} {B / seconds:>8.1f} "
                  f"{100 * mfu:>5.1f}% {teacher_share:>7.1f}%")
    header = "student step vs timm (same size)"
    print(f"\n{header:<34} {'ours ms':>9} {'timm ms':>9} {'ours/timm speed':>16}")
    for size in SIZES:
        for dtype in ("fp32", "bf16"):
            r = bench_timm(size, dtype)
            if r is None:
                print(f"{size} {dtype}: skipped (timm not installed)")
                break
            row = size + " " + dtype
            print(f"{row:<34} {1000 * r[0]:>9.1f} {1000 * r[1]:>9.1f} {r[1] / r[0]:>16.2f}")
    per_worker = bench_data()
    best = max(B / s for s, _, _, B in [bench_md(SIZES[-1], "bf16")])
    print(f"\ndata: {per_worker:.0f} img/s per worker "
          "(JPEG 500x375 decode + crop + flip + jitter + block mask); "
          f"{int(np.ceil(best / per_worker))} worker(s) feed the {SIZES[-1]} bf16 step "
          f"({best:.0f} img/s)")
    print()
    if QUICK:
        print("(--quick: no analysis and curvature rows; python bench.py --analysis gives them)")
    else:
        analysis_main()


def analysis_main():
    """the analysis rows: --metric all overhead, Hessian-vector product cost, eigenvalue counts,
    trace error and the cost of --metric hessian, each against its baseline in this run"""
    keep_freed_memory()  # as analyze.py does, for the baselines as well
    on_gpu = DEVICE.startswith("cuda")
    print(f"analysis rows on {torch.cuda.get_device_name(DEVICE) if on_gpu else 'the CPU'}, "
          f"torch {torch.__version__}")
    for size in (SIZES[0], SIZES[-1]) if len(SIZES) > 1 else SIZES:
        # ViT-B on CPU: two batches, so that one's eigenvalues overlap the next one's forward
        n = 128 if on_gpu else 64 if size == "tiny/4" else 32
        for batch_size in (16, 64) if on_gpu else (16,):  # 16: analyze.py's default
            r = bench_analysis(size, n, batch_size)
            print(f"analysis: analyze.py --metric all on {size} costs {r['all']:.2f}x the plain "
                  f"forwards over the same {n} images, {batch_size} per batch, median over rounds "
                  f"({r['half']:.2f}x with --fourier_at=half; each group alone: attention metrics "
                  f"{r['attention']:.2f}x, fourier {r['fourier']:.2f}x, svd {r['svd']:.2f}x)")
    from analyze import SPECTRA_WORKERS
    for size, n, depth in (("tiny/4", 64, 6), ("B/16", 196, 12)) if on_gpu else ():
        device, host, difference = bench_eigensolvers(n, 64 * depth, per_task=64)
        print(f"eigenvalues of {size}'s {64 * depth} token covariances from 64 images ({n} x {n}, "
              f"float64), ms per matrix: torch's batched eigvalsh on the GPU {device:.3f}; the host's "
              f"LAPACK on analyze.py's {SPECTRA_WORKERS} workers {host:.3f} (largest "
              f"difference {difference:.0e} of the largest eigenvalue)")
    for size in (SIZES[0], SIZES[-1]) if len(SIZES) > 1 else SIZES:
        before, fresh, shared, forward, flops, form, form_flops = bench_hvp(size)
        print(f"Hessian-vector product, {size} batch {batch_for(size)}, in forward+backward "
              f"passes: before {before:.2f}x; double backward {fresh:.2f}x with its own graph, "
              f"{shared:.2f}x per product when one graph serves 8 (its FLOPs: {flops:.2f}x); "
              f"forward-over-reverse {forward:.2f}x; a trace sample r^T H r by Taylor mode "
              f"{form:.2f}x (its FLOPs: {form_flops:.2f}x)")
    if args.get("counts", "1") == "0":  # the counts below do not depend on the machine
        return
    print("top-2 eigenvalues to relative 1e-3, Hessian-vector products per run (3 seeds): by each "
          "method's stop rule [largest error], and until both values stay within 1e-3 of the exact")
    models = [("embedded teacher, 64 val images", embedded_batches(64)),
              ("random-init tiny/4 classifier, 16 random images", classifier_batch("tiny/4", 16))]
    for name, (model, batches) in models:
        exact, counts, tightened = eigen_counts(model, batches, cap=80)
        print(f"  {name} (exact top 3: {', '.join(f'{v:.4g}' for v in exact)})")
        for method in ("power", "lanczos"):
            label = "power iteration" if method == "power" else "Lanczos"
            stops = ", ".join(f"{c[method]} [{c[method + '_error']:.0e}]" for c in counts)
            needed = ", ".join(str(c[method + "_needed"]) for c in counts)
            print(f"    {label:<16} stop rule: {stops}; within 1e-3 after: {needed}")
        needed = [(c["power_needed"], c["lanczos_needed"]) for c in counts]
        if all(p and q for p, q in needed):
            ratio = sum(q for _, q in needed) / sum(p for p, _ in needed)
            print(f"    Lanczos / power iteration, products until within 1e-3: {ratio:.2f}x")
        else:
            print("    (None: not within 1e-3 in the products run; no ratio)")
        lanczos_stops = sum(c["lanczos"] for c in counts)
        if tightened:
            tol, products = tightened
            print(f"    at equal delivered accuracy: power iteration needs tol {tol:g} to be within "
                  f"1e-3 on every seed, {products} products; Lanczos's own stop {lanczos_stops}: "
                  f"{lanczos_stops / products:.2f}x")
        else:
            print("    power iteration is not within 1e-3 on every seed at any tol down to 1e-5")
    r = bench_curvature()
    old, new = r["old"], r["new"]
    ratio = new["trace_stderr"] / old["stderr"]
    print(f"trace from 50 products: plain Hutchinson {old['trace']:.4g} +- {old['stderr']:.3g}, "
          f"Lanczos-deflated ({new['lanczos_steps']} basis + {new['trace_samples']} samples) "
          f"{new['trace']:.4g} +- {new['trace_stderr']:.3g}: standard error {ratio:.2f}x")
    print(f"--metric hessian (top 2 to tol 1e-3, 50 trace products, 64 images) in forward+backward "
          f"passes over the images (time): before {r['before_fb']:.0f} ({old['products']} "
          f"products, eigenvalues {old['values'][0]:.2f}, {old['values'][1]:.2f}), now "
          f"{r['now_fb']:.0f} ({new['products']} products + {new['forms']} quadratic forms, "
          f"{new['eigenvalues'][0]:.2f}, "
          f"{new['eigenvalues'][1]:.2f}): {r['now_fb'] / r['before_fb']:.2f}x")
    equal = r["equal"]
    print(f"  at before's trace error (--trace_tol={equal['tol']:.3g}, samples 10 at a time): "
          f"{r['equal_fb']:.0f} ({equal['products']} products + {equal['forms']} forms, "
          f"{equal['trace']:.4g} +- "
          f"{equal['trace_stderr']:.3g}): {r['equal_fb'] / r['before_fb']:.2f}x")


# ----------------------------------------------------------------------------------------
# GPU: python bench.py --gpu. The MD step of train_md.py for ViT-B/16 at batch 64 and 128,
# bf16 + compile and eager, its teacher share, our classifier step against timm's, peak memory.
# Rows are printed as they are measured (the key ones first), the markdown tables last.

import gc
import math

from common import first_line, record_nonfinite


def gpu_synchronize():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize(DEVICE)


def gpu_reset():
    """free the last configuration: compiled code, cached blocks, the peak-memory counter"""
    torch._dynamo.reset()
    gc.collect()
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(DEVICE)


def gpu_peak_memory():
    """GiB allocated at most since gpu_reset (nan on CPU)"""
    if not DEVICE.startswith("cuda"):
        return float("nan")
    return torch.cuda.max_memory_allocated(DEVICE) / 2 ** 30


def time_steps(fn, steps, warmup):
    """-> (seconds per step, mean over `steps` runs back to back as in training: no host sync
    between steps; seconds the `warmup` runs took, torch.compile's compilation included)"""
    t = time.perf_counter()
    for _ in range(warmup):
        fn()
    gpu_synchronize()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    gpu_synchronize()
    return (time.perf_counter() - t) / steps, warm


def measure_md_step(size, batch, compiled, steps, before=False):
    """train_md.py's loop body at its defaults, one micro-batch per step: teacher forward
    under bf16 without grad (compiled with the student), whitening N (ln), student + linear head
    under bf16 autocast (compiled or not), smooth-L1 on the masked patches (md_loss), backward,
    clip at 3.0, AdamW (fused on CUDA). Random images, BEiT block masks, a DeiT-like teacher of
    the size. before=True: the previous version, whose teacher was not compiled."""
    gpu_reset()
    torch.manual_seed(0)
    cfg = ViTConfig.beit_v2(size, mask_token=True)
    student = ViT(cfg).to(DEVICE)
    teacher = Teacher(ViT(ViTConfig.from_name(size)).to(DEVICE), dtype=torch.bfloat16)
    decoder = DecoderHead("linear", cfg.embed_dim, teacher.out_dim).to(DEVICE)
    md_student = MDStudent(student, decoder)
    whitener = Whitening("ln", teacher.out_dim).to(DEVICE)
    decoder_params = [("decoder." + n, p) for n, p in decoder.named_parameters()]
    optimizer = student.configure_optimizers(0.05, 1.5e-3, (0.98, 0.999), extra=decoder_params)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    train_model = torch.compile(md_student, dynamic=False) if compiled else md_student
    images = torch.rand(batch, 3, cfg.img_size, cfg.img_size, device=DEVICE)
    g = np.random.default_rng(0)
    mask_fn = MaskGenerator("block", cfg.grid, BEIT_RATIO)
    masks = np.stack([mask_fn(g).flatten() for _ in range(batch)])
    masks = torch.from_numpy(masks).to(DEVICE)  # (B, N) True = masked
    nonfinite = torch.full((3,), -1.0, dtype=torch.float64, device=DEVICE)
    device_type = DEVICE.split(":")[0]

    teacher_run = torch.compile(teacher) if compiled and not before else teacher

    def targets_of():
        return whitener(teacher_run(images)[:, 1:])  # N(T(I)): (B, N, D_t)

    def step():
        nonlocal nonfinite
        targets = targets_of()
        with torch.autocast(device_type, dtype=torch.bfloat16):
            pred = train_model(images, masks)  # D(S(M(I)))
        loss = md_loss(pred, targets, masks)
        nonfinite = record_nonfinite(nonfinite, loss, 0, 0)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 3.0)
        nonfinite = record_nonfinite(nonfinite, grad_norm, 0, 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, warm = time_steps(step, steps, warmup=3 if compiled else 2)
    teacher_seconds, _ = time_steps(targets_of, steps, warmup=1)
    flops = batch * (3 * student.flops_per_image() + teacher.vit.flops_per_image())
    return dict(seconds=seconds, warm=warm, teacher=teacher_seconds / seconds, flops=flops,
                memory=gpu_peak_memory(), finite=nonfinite[0].item() < 0)


def measure_classifier_step(size, batch, compiled, steps, use_timm):
    """a supervised train step (bf16 autocast, cross-entropy over 1000 classes, fused AdamW on
    CUDA) of our ViT or of timm's vit_base_patch16_224 with the same shape; same architecture
    (class token, absolute positions, q/k/v biases), so the difference is the implementation"""
    gpu_reset()
    torch.manual_seed(0)
    cfg = ViTConfig.from_name(size, num_classes=1000, global_pool="cls")
    if use_timm:
        import timm
        shape = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                     depth=cfg.depth, num_heads=cfg.num_heads)  # the defaults for B/16
        model = timm.create_model("vit_base_patch16_224", pretrained=False, **shape)
    else:
        model = ViT(cfg)
    model.to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE.startswith("cuda"))
    run = torch.compile(model, dynamic=False) if compiled else model
    x = torch.rand(batch, 3, cfg.img_size, cfg.img_size, device=DEVICE)
    y = torch.randint(0, 1000, (batch,), device=DEVICE)
    device_type = DEVICE.split(":")[0]

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, warm = time_steps(step, steps, warmup=3 if compiled else 2)
    return dict(seconds=seconds, warm=warm, memory=gpu_peak_memory())


BEFORE = " (before: teacher not compiled)"


def mode_name(compiled):
    return "bf16 + compile" if compiled else "bf16, no compile"


def percent(x):
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def gib(x):
    return "n/a" if math.isnan(x) else f"{x:.1f} GiB"


def gpu_main():
    """python bench.py --gpu [--sizes=B/16] [--batch=64,128] [--steps=20] [--device=cuda]"""
    if not DEVICE.startswith("cuda") and "device" not in args:
        raise SystemExit(f"error: bench.py --gpu: no CUDA device (torch {torch.__version__}), "
                         "nothing measured")
    size = args.get("sizes", "B/16")
    batches = sorted({int(b) for b in args.get("batch", "64,128").split(",")}, reverse=True)
    steps = int(args.get("steps", 20))
    start = time.perf_counter()
    peak = peak_flops(DEVICE)
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.startswith("cuda") else DEVICE
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)"
    print(f"machine: {name}; torch {torch.__version__}; dense bf16 peak {peak_text}; "
          f"{steps} timed steps per row", flush=True)
    try:
        import timm
        print(f"timm {timm.__version__}", flush=True)
    except ImportError:
        timm = None
    md_rows, timm_rows = {}, {}

    def md_row(batch, compiled, before=False):
        r = measure_md_step(size, batch, compiled, steps, before)
        r["mfu"] = r["flops"] / r["seconds"] / peak if peak else float("nan")
        mode = mode_name(compiled) + (BEFORE if before else "")
        if not before:
            md_rows[(batch, compiled)] = r
        print(f"MD {size} {mode}, batch {batch}: {1000 * r['seconds']:.1f} ms/step, "
              f"{batch / r['seconds']:.0f} img/s, MFU {percent(r['mfu'])}, "
              f"teacher {percent(r['teacher'])}, peak memory {gib(r['memory'])} "
              f"(warmup {r['warm']:.0f} s){'' if r['finite'] else ', NOT FINITE'}", flush=True)

    def timm_row(batch, compiled):
        label = f"ours vs timm, {size} classifier {mode_name(compiled)}, batch {batch}"
        if timm is None:
            print(f"{label}: skipped (timm is not installed)", flush=True)
            return
        ours = measure_classifier_step(size, batch, compiled, steps, use_timm=False)
        ref = measure_classifier_step(size, batch, compiled, steps, use_timm=True)
        timm_rows[(batch, compiled)] = (ours, ref)
        print(f"{label}: {1000 * ours['seconds']:.1f} ms vs {1000 * ref['seconds']:.1f} ms, "
              f"ours/timm speed {ref['seconds'] / ours['seconds']:.2f}, peak memory "
              f"{gib(ours['memory'])} / {gib(ref['memory'])} "
              f"(warmup {ours['warm']:.0f} s / {ref['warm']:.0f} s)", flush=True)

    def md_row_before(batch, compiled):
        md_row(batch, compiled, before=True)

    # the targets' rows first, so that a run cut short still has them
    plan = [(md_row, batches[0], True), (md_row_before, batches[0], True), (md_row, batches[0], False),
            (timm_row, batches[0], True)]
    plan += [(md_row, batch, compiled) for batch in batches[1:] for compiled in (True, False)]
    plan.append((timm_row, batches[0], False))
    failed = 0
    for row, batch, compiled in plan:
        try:
            row(batch, compiled)
        except Exception as e:  # out of memory, a compile error: one line, the other rows still run
            failed += 1
            what = "ours vs timm," if row is timm_row else "MD"
            mode = mode_name(compiled) + (BEFORE if row is md_row_before else "")
            print(f"{what} {size} {mode}, batch {batch}: FAILED, "
                  f"{type(e).__name__}: {first_line(e)}", flush=True)

    def table_order(item):  # by batch, compiled first
        (batch, compiled), _ = item
        return batch, not compiled

    print(f"\ntotal {time.perf_counter() - start:.0f} s\n")
    print(f"{name}, torch {torch.__version__}, `python bench.py --gpu`, "
          f"MFU against the dense bf16 peak {peak_text}:\n")
    print(f"| MD step, {size} student + {size} teacher | batch | ms/step | img/s | MFU "
          f"| teacher share | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for (batch, compiled), r in sorted(md_rows.items(), key=table_order):
        print(f"| {mode_name(compiled)} | {batch} | {1000 * r['seconds']:.1f} | "
              f"{batch / r['seconds']:.0f} | {percent(r['mfu'])} | {percent(r['teacher'])} | "
              f"{gib(r['memory'])} |")
    if timm_rows:
        print(f"\n| {size} classifier train step | batch | ours ms | timm ms | ours/timm speed "
              f"| peak memory ours / timm |")
        print("|---|---|---|---|---|---|")
        for (batch, compiled), (ours, ref) in sorted(timm_rows.items(), key=table_order):
            print(f"| {mode_name(compiled)} | {batch} | {1000 * ours['seconds']:.1f} | "
                  f"{1000 * ref['seconds']:.1f} | {ref['seconds'] / ours['seconds']:.2f} | "
                  f"{gib(ours['memory'])} / {gib(ref['memory'])} |")
    if failed:
        raise SystemExit(f"error: {failed} of {len(plan)} rows failed (see above)")


OPTIONS = ("quick", "analysis", "gpu", "sizes", "device", "steps", "batch", "counts")


def bench_option_error():
    """the first option value that cannot work, as one line, or None"""
    def positive(raw):
        return raw.isdigit() and int(raw) >= 1

    unknown_sizes = [size for size in args.get("sizes", "").split(",") if size and size not in PRESETS]
    return option_error(dict(device=args.get("device", "auto")), [
        (positive(args.get("steps", "1")), f"--steps={args.get('steps')} must be an integer >= 1"),
        (all(positive(b) for b in args.get("batch", "1").split(",")),
         f"--batch={args.get('batch')} must be integers >= 1, comma-separated"),
        (not unknown_sizes, f"unknown model size '{unknown_sizes and unknown_sizes[0]}': choose "
                            f"one or more of {', '.join(PRESETS)}, comma-separated"),
    ])


if __name__ == "__main__":
    unknown = [a for a in sys.argv[1:] if not a.startswith("--") or a[2:].split("=")[0] not in OPTIONS]
    if unknown and unknown[0] in ("-h", "--help"):
        print_help(__doc__.strip())
    if unknown:
        raise SystemExit(f"error: unknown option '{unknown[0]}': python bench.py --help lists them")
    problem = bench_option_error()
    if problem:
        raise SystemExit(f"error: {problem}")
    if "gpu" in args:
        gpu_main()
    elif "analysis" in args:
        analysis_main()
    else:
        main()
