"""On a CUDA GPU: the MD step compiled in bf16 against eager fp32, the paper's commands under
torchrun with NCCL (train_md.py, finetune.py: 30 iterations, then resumed), a float16 fine-tune
against float32, analyze.py on the GPU, and tools/eigen_probe.py's batched eigensolver against
LAPACK. Every test is skipped without
CUDA.

    python -m pytest -q tests/test_cuda.py      # or bash tools/gpu_check.sh (benchmark + these)

torch.compile is on only where it is the point: the MD step comparison and train_md.py (the
paper's command runs compiled); finetune.py and analyze.py run eager, so that the file takes a
few minutes on one GPU (4 min 26 s on an H200 on 2026-11-30, most of it compilation). Teacher and
fine-tuned model are ViT-B/16 in DeiT's file layout; the MD student is ViT-S/16 (its blocks have
the shapes of the first test's, so inductor's on-disk cache may already hold their kernels).
"""
import json
import math
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common import peak_flops
from data import EvalTransform, ImageFolder
from data.masks import BEIT_RATIO, MaskGenerator
from model import DecoderHead, MDStudent, ViT, ViTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda"         # where the tests run
DDP_DEVICE = "cuda:0"   # what train_md.py / finetune.py report under torchrun
BACKEND = "nccl"
TEACHER = "B/16"        # DeiT-B's shape: the teacher file, the fine-tuned and the analyzed model
STUDENT = "S/16"        # the MD student of train_md.py
IMG_SIZE = 224
CLASSES = ("circle", "square", "triangle", "cross")  # 4 of the embedded dataset's shapes
ITERS, RESUMED_ITERS = 30, 40

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A 224 px ImageFolder with train/ (12 images per class) and val/ (2 per class): the
    embedded dataset's textured shapes drawn at 32 px, upscaled and saved as JPEG like ImageNet."""
    from data.embedded import CLASSES as ALL_CLASSES, TEXTURES, draw
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 2)):
        for name in CLASSES:
            os.makedirs(root / split / name)
            for k in range(per_class):
                pixels = draw(name, TEXTURES[ALL_CLASSES.index(name)], rng)  # (32, 32, 3) uint8
                image = Image.fromarray(pixels).resize((IMG_SIZE, IMG_SIZE), Image.BICUBIC)
                image.save(root / split / name / f"{name}{k:02d}.JPEG", quality=90)
    return str(root)


@pytest.fixture(scope="module")
def deit_file(tmp_path_factory):
    """A random ViT-B/16 saved as DeiT's official file is: {"model": state dict}, timm's key
    names (ours), the 1000-class head on the CLS token (teacher.convert_timm reads it back)."""
    torch.manual_seed(0)
    cfg = ViTConfig.from_name(TEACHER, num_classes=1000, global_pool="cls")
    path = tmp_path_factory.mktemp("deit") / "deit_base_patch16_224.pth"
    torch.save({"model": ViT(cfg).state_dict()}, path)
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd):
    """-> (return code, stdout + stderr)"""
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return result.returncode, result.stdout + result.stderr


def torchrun(script, args):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                f"--master_port={free_port()}"]
    return run([*launcher, os.path.join(ROOT, script), *args])


def common_args(out_dir, image_folder):
    """48 train images, 16 per step: 3 iterations per epoch, 20 epochs in the schedule"""
    return [f"--out_dir={out_dir}", f"--data_dir={image_folder}", f"--img_size={IMG_SIZE}",
            "--epochs=20", "--warmup_epochs=1", "--total_batch_size=16", "--micro_batch_size=16",
            "--num_workers=2", f"--device={DEVICE}", f"--backend={BACKEND}", "--dtype=bfloat16",
            f"--eval_interval={ITERS}", "--log_interval=10"]


def check_log_line(log, iteration):
    """the log line of `iteration`: a finite loss, and the MFU where the GPU's peak is known"""
    lines = [line for line in log.splitlines() if line.startswith(f"iter {iteration}: loss ")]
    assert lines, log[-3000:]
    assert math.isfinite(float(lines[-1].split("loss ")[1].split(",")[0])), lines[-1]
    if peak_flops(DEVICE) is not None:
        assert re.search(r"MFU \d+\.\d%", lines[-1]), lines[-1]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_compiled_bf16_md_step_matches_eager_fp32():
    """One MD step as train_md.py runs it on a GPU (teacher under bf16, student + head compiled
    under bf16 autocast, the relative-position bias as SDPA's mask) against the same step eager
    in fp32 (TF32 off), same weights and batch. bf16 keeps 8 bits of mantissa (rounding 2^-9 =
    0.2% per operand). Tolerances: the loss, a mean over 16 x 75 masked patches, within 1%; all
    gradients together within 5% in relative L2 norm (measured on CPU: eager bf16 0.5%, compiled
    bf16 0.4%); every parameter's gradient keeps its direction, cosine > 0.9 (a gradient summed
    over all B x 197 tokens cancels: the first LayerNorm's bias is 41% off in eager bf16 on CPU,
    at cosine 0.987). Two blocks of S/16 width keep the compilation short."""
    import train_md
    from teacher import Teacher, Whitening
    torch.manual_seed(0)
    cfg = ViTConfig.beit_v2(STUDENT, depth=2, mask_token=True)
    student = ViT(cfg)
    with torch.no_grad():  # a bias that changes the numbers (the tables start at zero)
        student.rel_pos_bias.relative_position_bias_table.normal_(0, 0.5)
    teacher_vit = ViT(ViTConfig.from_name(STUDENT, depth=2)).to(DEVICE)
    md = MDStudent(student, DecoderHead("linear", cfg.embed_dim, cfg.embed_dim)).to(DEVICE)
    whiten = Whitening("ln", cfg.embed_dim)
    B = 16
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(B, 3, cfg.img_size, cfg.img_size, generator=generator)
    rng = np.random.default_rng(0)
    mask_fn = MaskGenerator("block", cfg.grid, BEIT_RATIO)
    masks = torch.from_numpy(np.stack([mask_fn(rng).flatten() for _ in range(B)]))  # (B, N)
    images, masks = images.to(DEVICE), masks.to(DEVICE)

    def step(model, bf16):
        teacher = Teacher(teacher_vit, dtype=torch.bfloat16 if bf16 else None)
        targets = whiten(teacher(images)[:, 1:])  # N(T(I))
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            pred = model(images, masks)
        loss = train_md.md_loss(pred, targets, masks)  # the script's R at its defaults
        loss.backward()
        grads = {n: p.grad.double() for n, p in md.named_parameters()}
        md.zero_grad(set_to_none=True)
        return loss.item(), grads

    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            ref_loss, ref_grads = step(md, bf16=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    loss, grads = step(torch.compile(md), bf16=True)

    assert loss == pytest.approx(ref_loss, rel=1e-2)
    error = sum((grads[n] - ref_grads[n]).pow(2).sum() for n in ref_grads).sqrt()
    norm = sum(g.pow(2).sum() for g in ref_grads.values()).sqrt()
    assert error / norm < 5e-2, f"relative gradient error {error / norm:.3g}"
    for n, ref in ref_grads.items():
        cosine = F.cosine_similarity(grads[n].flatten(), ref.flatten(), dim=0).item()
        assert cosine > 0.9, f"{n}: cosine {cosine:.4f}"


def test_train_md_torchrun_compiled_bf16_resumes(image_folder, deit_file, tmp_path):
    """The paper's command on one GPU: torchrun with NCCL, the student compiled under bf16
    autocast, fused AdamW, the DeiT teacher under bf16 from a local file (--teacher_path). 30
    iterations with a checkpoint, then --resume=True continues to 40."""
    out = tmp_path / "md"
    args = [*common_args(out, image_folder), "--teacher=deit", f"--teacher_path={deit_file}",
            f"--model={STUDENT}", "--compile=True", "--eval_images=16"]
    code, log = torchrun("train_md.py", [*args, f"--stop_iter={ITERS}"])
    assert code == 0, log[-3000:]
    assert f"1 process(es) on {DDP_DEVICE}" in log, log[-3000:]
    check_log_line(log, ITERS)
    assert re.search(rf"iter {ITERS}: val loss \d+\.\d+", log), log[-3000:]
    ckpt = load(out / "ckpt.pt")
    assert ckpt["iter_num"] == ITERS
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    before = ckpt["model"]["blocks.0.attn.qkv.weight"]

    code, log = torchrun("train_md.py", [*args, f"--stop_iter={RESUMED_ITERS}", "--resume=True"])
    assert code == 0, log[-3000:]
    assert f"resumed from {out / 'ckpt.pt'} at iteration {ITERS}" in log, log[-3000:]
    check_log_line(log, RESUMED_ITERS)
    ckpt = load(out / "ckpt.pt")
    assert ckpt["iter_num"] == RESUMED_ITERS
    assert not torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], before)


def test_finetune_torchrun_bf16_resumes(image_folder, deit_file, tmp_path):
    """finetune.py from the DeiT file (--init=deit --init_path) with the paper's recipe
    (RandAugment, random erasing, layer decay, per-layer relative position bias as SDPA's mask),
    torchrun with NCCL, bf16, eager: 30 iterations, then --resume=True continues to 40."""
    out = tmp_path / "ft"
    args = [*common_args(out, image_folder), "--init=deit", f"--init_path={deit_file}",
            "--compile=False"]
    code, log = torchrun("finetune.py", [*args, f"--stop_iter={ITERS}"])
    assert code == 0, log[-3000:]
    assert "fine-tune from deit" in log and f"1 process(es) on {DDP_DEVICE}" in log, log[-3000:]
    check_log_line(log, ITERS)
    assert re.search(rf"iter {ITERS} \(epoch [\d.]+\): val top-1 \d+\.\d+%", log), log[-3000:]
    assert load(out / "ckpt.pt")["iter_num"] == ITERS

    code, log = torchrun("finetune.py", [*args, f"--stop_iter={RESUMED_ITERS}", "--resume=True"])
    assert code == 0, log[-3000:]
    assert f"resumed from {out / 'ckpt.pt'} at iteration {ITERS}" in log, log[-3000:]
    check_log_line(log, RESUMED_ITERS)
    result = json.load(open(out / "result.json"))
    assert result["iter_num"] == RESUMED_ITERS and 0 <= result["top1"] <= 100


def test_finetune_float16_on_cuda_follows_float32(image_folder, deit_file, tmp_path):
    """--dtype=float16 on the GPU (fused AdamW with the loss scaler): three fine-tuning steps from
    the DeiT file move every block's weights in the direction that float32 moves them, cosine
    above 0.9 for each tensor (on the CPU, nano/4: 0.99999; without the loss scale 0.49), and the
    log records the loss scale."""
    init = load(deit_file)["model"]
    moved = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        code, log = run([sys.executable, os.path.join(ROOT, "finetune.py"),
                         *common_args(out, image_folder), "--init=deit", f"--init_path={deit_file}",
                         "--compile=False", f"--dtype={dtype}",
                         "--stop_iter=3", "--log_interval=1"])
        assert code == 0, log[-3000:]
        tuned = load(out / "ckpt.pt")["model"]
        moved[dtype] = {k: (tuned[k] - init[k]).double().flatten()
                        for k in init if k.startswith("blocks.")}
    cosines = {k: F.cosine_similarity(moved["float16"][k], reference, dim=0).item()
               for k, reference in moved["float32"].items() if reference.norm() > 0}
    worst = min(cosines, key=cosines.get)
    print(f"float16 vs float32 update cosine: min {cosines[worst]:.5f} ({worst}), "
          f"mean {sum(cosines.values()) / len(cosines):.5f} over {len(cosines)} tensors")
    assert cosines[worst] > 0.9, f"{worst}: cosine {cosines[worst]:.4f}"
    records = [json.loads(line) for line in open(tmp_path / "float16" / "log.jsonl")]
    assert all(math.isfinite(r["loss_scale"]) and r["loss_scale"] >= 1
               for r in records if "loss" in r)


def test_analyze_all_on_cuda_matches_cpu(image_folder, deit_file, tmp_path):
    """analyze.py --metric all on ViT-B/16 (the DeiT file), 8 images, on the GPU and on the CPU,
    fp32 both: every metric's per-block headline agrees within 1%. The GPU may run the patch
    convolution in TF32 (relative rounding 2^-11); on the CPU, noise of 1e-3 relative on the
    patch embeddings moves these headlines of this model by at most 3e-4 relative."""
    metrics = ("attn_distance", "attn_entropy", "nmi", "fourier", "svd")
    results = {}
    for device in (DEVICE, "cpu"):
        out = tmp_path / device
        code, log = run([sys.executable, os.path.join(ROOT, "analyze.py"), "--metric=all",
                         deit_file, "--labels=deit", f"--data={image_folder}", "--n_images=8",
                         "--batch_size=8", f"--device={device}", f"--out={out}"])
        assert code == 0, log[-3000:]
        results[device] = {m: json.load(open(out / f"{m}.json"))["models"]["deit"]["per_layer"]
                           for m in metrics}
    depth = ViTConfig.from_name(TEACHER).depth
    for metric in metrics:
        gpu, cpu = results[DEVICE][metric], results["cpu"][metric]
        assert len(gpu) == depth and all(map(math.isfinite, gpu)), metric
        assert gpu == pytest.approx(cpu, rel=1e-2), metric


def test_analyze_hessian_on_cuda(image_folder, deit_file, tmp_path):
    """analyze.py --metric hessian on the GPU, for ViT-B/16 (the DeiT file with its head cut to
    the data's 4 classes), 8 images: finite eigenvalues (largest magnitude first) and trace, and the loss
    is the cross-entropy computed on the CPU. Then the GPU's Hessian-vector product (double
    backward through the math attention kernel) against central differences of gradients, in
    fp64: they agree to 1e-4 (truncation eps^2 and rounding 1e-16 / eps are far below)."""
    from hessian import HessianOperator
    from teacher import load_model
    sd = load(deit_file)["model"]
    for key in ("head.weight", "head.bias"):
        sd[key] = sd[key][:len(CLASSES)]
    path = tmp_path / "deit4.pth"
    torch.save({"model": sd}, path)
    out = tmp_path / "hessian"
    code, log = run([sys.executable, os.path.join(ROOT, "analyze.py"), "--metric=hessian",
                     str(path), "--labels=deit", f"--data={image_folder}", "--n_images=8",
                     "--batch_size=8", "--top_k=2", "--lanczos_steps=20", "--trace_products=10",
                     f"--device={DEVICE}", f"--out={out}"])
    assert code == 0, log[-3000:]
    r = json.load(open(out / "hessian.json"))["models"]["deit"]
    assert r["images"] == 8 and all(map(math.isfinite, [*r["eigenvalues"], r["trace"]]))
    assert r["eigenvalues"] == sorted(r["eigenvalues"], key=abs, reverse=True)  # largest magnitude first

    model, _ = load_model(str(path))  # CPU, fp32
    val = ImageFolder(os.path.join(image_folder, "val"), EvalTransform(IMG_SIZE))
    images = torch.stack([val[i][0] for i in range(len(val))])  # all 8: analyze's subset
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        cpu_loss = F.cross_entropy(model(images), labels).item()
    assert r["loss"] == pytest.approx(cpu_loss, rel=1e-3)

    model = model.double().to(DEVICE)
    x, y = images[:4].double().to(DEVICE), labels[:4].to(DEVICE)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    norm = math.sqrt(sum(t.pow(2).sum().item() for t in v))
    v = [(t / norm).to(DEVICE) for t in v]  # a unit direction
    hessian = HessianOperator(model, [(x, y)])
    hv = hessian.unflat(hessian(hessian.flat(v)[None])[0])

    def gradient_at(t):  # gradient of the loss at theta + t v
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(d, alpha=t)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(d, alpha=t)
        return grads

    eps = 1e-4
    difference = [(a - b) / (2 * eps) for a, b in zip(gradient_at(eps), gradient_at(-eps))]
    error = math.sqrt(sum((h - d).pow(2).sum().item() for h, d in zip(hv, difference)))
    scale = math.sqrt(sum(d.pow(2).sum().item() for d in difference))
    assert error / scale < 1e-4, f"relative error {error / scale:.3g}"


def test_symmetric_eigenvalues_on_cuda_match_lapack():
    """tools/eigen_probe.py's batched solver on the GPU, on ViT-B/16-sized (196 x 196) token
    covariances, against the host's LAPACK on the same float64 matrices: token-like covariances
    whose spectrum decays over 8 decades, and one that is rank-deficient (196 tokens of rank 40)"""
    from tools.eigen_probe import symmetric_eigenvalues
    g = torch.Generator().manual_seed(0)
    decay = torch.logspace(0, -4, 768, dtype=torch.float64)  # singular values of the channels
    tokens = torch.randn(24, 196, 768, generator=g, dtype=torch.float64) * decay
    few = torch.randn(2, 196, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 768, generator=g,
                                                                                 dtype=torch.float64)
    for x in (tokens, few):
        x = x - x.mean(1, keepdim=True)
        gram = x @ x.transpose(-1, -2) / 195  # (B, 196, 196), as analyze.relative_log_singular_values
        expected = torch.linalg.eigvalsh(gram)
        got = symmetric_eigenvalues(gram.to(DEVICE)).cpu()
        top = expected.abs().amax(-1, keepdim=True)
        assert ((got - expected).abs() / top).max() < 1e-12
