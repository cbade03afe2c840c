"""MD pretraining: the loss, one step, exact resume, DDP, and the command line."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import train_md
from model import DecoderHead, MDStudent, ViT, ViTConfig

from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MDWithLoss(torch.nn.Module):
    """train_md.py's objective as one callable for these tests: MDStudent (S + D) predicts, then
    train_md.md_loss (R over the masked patches) with the script's settings set as it reads them.
    loss='ce' is the script's target=vqkd (cross-entropy on code indices)."""

    def __init__(self, md_student, loss="smooth_l1", loss_on="masked"):
        super().__init__()
        self.md_student, self.loss, self.loss_on = md_student, loss, loss_on
        self.student, self.head = md_student.student, md_student.head

    def forward(self, images, masks, targets):
        settings = dict(loss="smooth_l1" if self.loss == "ce" else self.loss, loss_on=self.loss_on,
                        target="vqkd" if self.loss == "ce" else "features", smooth_l1_beta=2.0)
        saved = {k: getattr(train_md, k) for k in settings}
        vars(train_md).update(settings)
        try:
            return train_md.md_loss(self.md_student(images, masks), targets, masks)
        finally:
            vars(train_md).update(saved)


def md_model(loss="smooth_l1"):
    torch.manual_seed(0)
    cfg = ViTConfig.beit_v2("nano/4", mask_token=True)
    student = ViT(cfg)
    return MDWithLoss(MDStudent(student, DecoderHead("linear", cfg.embed_dim, 16)), loss)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 3, 32, 32, generator=g)
    masks = torch.zeros(4, 64, dtype=torch.bool)
    for b in range(4):
        masks[b, torch.randperm(64, generator=g)[:25]] = True
    targets = torch.randn(4, 64, 16, generator=g)
    return images, masks, targets


def test_loss_ignores_visible_patches():
    md = md_model().eval()
    images, masks, targets = batch()
    base = md(images, masks, targets)
    visible = targets.clone()
    visible[~masks] = 100.0  # every visible target changed
    assert torch.equal(md(images, masks, visible), base)
    hidden = targets.clone()
    b, n = masks.nonzero()[0]
    hidden[b, n] += 5.0  # one masked target changed
    assert md(images, masks, hidden) != base


@pytest.mark.parametrize("loss", ["smooth_l1", "mse", "cosine"])
def test_loss_closed_form_with_zero_prediction_head(loss):
    md = md_model(loss).eval()
    torch.nn.init.zeros_(md.head.out.weight)
    with torch.no_grad():
        md.head.out.bias.copy_(torch.linspace(-1, 1, 16))
    images, masks, targets = batch(1)
    pred = torch.linspace(-1, 1, 16)  # the head outputs only its bias
    d = (pred - targets[masks]).abs()  # (M, 16)
    if loss == "smooth_l1":  # beta 2: 0.5 d^2 / beta below beta, d - beta / 2 above
        expected = torch.where(d < 2.0, 0.5 * d ** 2 / 2.0, d - 1.0).mean()
    elif loss == "mse":
        expected = (d ** 2).mean()
    else:
        t = targets[masks]
        expected = (1 - (t @ pred) / (t.norm(dim=-1) * pred.norm())).mean()
    assert md(images, masks, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_is_the_mean_over_all_masked_patches_of_the_batch(monkeypatch):
    """md_loss with loss_on='masked' averages over every masked patch of the batch (its
    docstring), not per image first: images with 1 and 3 masked patches, MSE by hand"""
    for name, value in dict(loss="mse", loss_on="masked", target="features").items():
        monkeypatch.setattr(train_md, name, value)
    pred = torch.zeros(2, 4, 2)
    targets = torch.full((2, 4, 2), 10.0)  # the visible patches: MSE 100, ignored
    masks = torch.tensor([[True, False, False, False], [True, True, True, False]])
    targets[0, 0] = 2.0  # MSE of a patch: mean over channels of (pred - target)^2 = 4
    targets[1, :3] = 1.0  # 1 each
    # (4 + 1 + 1 + 1) / 4 masked patches = 7/4 (per image first: (4 + 1) / 2 = 5/2)
    assert train_md.md_loss(pred, targets, masks).item() == pytest.approx(7 / 4, rel=1e-6)

def test_one_step_lowers_the_loss_on_a_fixed_batch():
    md = md_model()
    images, masks, targets = batch(2)
    head_params = [("decoder." + n, p) for n, p in md.head.named_parameters()]
    opt = md.student.configure_optimizers(0.05, 1e-3, (0.9, 0.98), extra=head_params)
    before = md(images, masks, targets)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = md(images, masks, targets)
    assert after < before


# ---- the script, end to end ----------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_md(args, tiny_data, tiny_teacher, launcher=()):
    cmd = [*launcher] if launcher else [sys.executable]
    cmd += [os.path.join(ROOT, "train_md.py"), f"--data_dir={tiny_data}", f"--teacher={tiny_teacher}",
            "--model=nano/4", "--img_size=32", "--epochs=4", "--warmup_epochs=1", "--total_batch_size=16",
            "--micro_batch_size=8", "--num_workers=0", "--device=cpu", "--dtype=float32", "--compile=False",
            "--teacher_bf16=False", "--eval_images=24", "--log_interval=1", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    return result


def load(path):
    return torch.load(path, weights_only=True)


def run_vqkd(out, tiny_data, teacher, iters, resume):
    """train_vqkd.py into `out` for `iters` iterations: its tokenizer.pt, the targets of --target=vqkd"""
    cmd = [sys.executable, os.path.join(ROOT, "train_vqkd.py"), f"--data_dir={tiny_data}",
           f"--teacher={teacher}", "--model=nano/4", "--img_size=32", "--epochs=1", "--total_batch_size=16",
           "--micro_batch_size=8", "--codebook_size=16", "--num_workers=0", "--device=cpu", "--dtype=float32",
           "--compile=False", f"--stop_iter={iters}", f"--resume={resume}", f"--out_dir={out}"]
    return forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def retrain_tokenizer(out, tiny_data, tiny_teacher, iters, resume):
    result = run_vqkd(out, tiny_data, tiny_teacher, iters, resume)
    assert result.returncode == 0, result.stderr[-2000:]
    return str(out / "tokenizer.pt")


@pytest.mark.slow
def test_tokenizer_resume_refuses_a_teacher_changed_in_place(tiny_data, tiny_teacher, tmp_path):
    """train_vqkd.py's targets are its teacher's features: the same check as train_md.py's"""
    source = str(tmp_path / "teacher.pt")
    torch.save(load(tiny_teacher), source)
    original = open(source, "rb").read()
    retrain_tokenizer(tmp_path / "tok", tiny_data, source, 1, False)
    saved = (tmp_path / "tok" / "tokenizer.pt").read_bytes()
    other = load(source)
    other["model"] = {k: torch.randn_like(v) for k, v in other["model"].items()}
    torch.save(other, source)
    refused = run_vqkd(tmp_path / "tok", tiny_data, source, 2, True)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume=True but the teacher '{source}' has other weights than when this run started")
    assert (tmp_path / "tok" / "tokenizer.pt").read_bytes() == saved
    with open(source, "wb") as f:
        f.write(original)
    retrain_tokenizer(tmp_path / "tok", tiny_data, source, 2, True)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["features", "vqkd", "activation"])
def test_resume_refuses_targets_changed_in_place(tiny_data, tiny_teacher, tmp_path, target):
    """the teacher's file (or the tokenizer's) holds other weights at --resume than at the start, under
    the same path, or the same weights with another activation (teacher.py export --act over it): the
    targets would change mid-run, so the resume is refused and the checkpoint kept; the original file
    back, it resumes"""
    if target == "vqkd":  # a tokenizer trained 1 iteration, then retrained in place to 2
        source = retrain_tokenizer(tmp_path / "tok", tiny_data, tiny_teacher, 1, False)
        args = ["--target=vqkd", f"--tokenizer={source}"]
    else:  # a copy of the teacher, later overwritten by another random one of the same shape
        source = str(tmp_path / "teacher.pt")
        torch.save(load(tiny_teacher), source)
        args = []
    original = open(source, "rb").read()
    out = tmp_path / "md"
    first = run_md([*args, f"--out_dir={out}", "--stop_iter=1"], tiny_data, source)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = (out / "ckpt.pt").read_bytes()
    if target == "vqkd":
        retrain_tokenizer(tmp_path / "tok", tiny_data, tiny_teacher, 2, True)
    else:
        other = load(source)
        if target == "activation":
            other["model_args"]["act"] = "quick_gelu" if other["model_args"]["act"] == "gelu" else "gelu"
        else:
            other["model"] = {k: torch.randn_like(v) for k, v in other["model"].items()}
        torch.save(other, source)
    assert open(source, "rb").read() != original
    resumed = run_md([*args, f"--out_dir={out}", "--stop_iter=2", "--resume=True"], tiny_data, source)
    assert resumed.returncode != 0
    what = f"the tokenizer {source}" if target == "vqkd" else f"the teacher '{source}'"
    assert resumed.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume=True but {what} has other weights than when this run started")
    assert (out / "ckpt.pt").read_bytes() == saved
    with open(source, "wb") as f:  # the original weights back under the same path
        f.write(original)
    resumed = run_md([*args, f"--out_dir={out}", "--stop_iter=2", "--resume=True"], tiny_data, source)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load(out / "ckpt.pt")["iter_num"] == 2


@pytest.mark.slow
def test_tokenizer_run_resumes_whatever_the_teacher_settings(tiny_data, tiny_teacher, tmp_path):
    """--target=vqkd reads no teacher: --teacher, --whitening, --loss changed at --resume are no change of
    the run (before: refused as 'settings that change the run'); --tokenizer changed still is"""
    source = retrain_tokenizer(tmp_path / "tok", tiny_data, tiny_teacher, 1, False)
    args = ["--target=vqkd", f"--tokenizer={source}", f"--out_dir={tmp_path / 'md'}"]
    first = run_md([*args, "--stop_iter=1"], tiny_data, tiny_teacher)
    assert first.returncode == 0, first.stderr[-2000:]
    # as a run of --whitening=bn saved it before its whitening was left out for codes: running statistics
    saved = load(tmp_path / "md" / "ckpt.pt")
    codes = saved["decoder"]["out.weight"].shape[0]  # the head's outputs: one logit per code
    saved["whitening"] = dict(running_mean=torch.zeros(codes), running_var=torch.ones(codes))
    saved["config"]["whitening"] = "bn"
    torch.save(saved, tmp_path / "md" / "ckpt.pt")
    unread = ["--whitening=ln", "--loss=mse", "--teacher_layer=0", "--stop_iter=2", "--resume=True"]
    resumed = run_md([*args, *unread], tiny_data, "dino")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load(tmp_path / "md" / "ckpt.pt")["iter_num"] == 2
    other = str(tmp_path / "other.pt")
    shutil.copy(source, other)
    refused = run_md([*args, f"--tokenizer={other}", "--stop_iter=3", "--resume=True"], tiny_data, tiny_teacher)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume=True with settings that change the run: tokenizer '{source}' -> '{other}'")


def test_resume_equals_uninterrupted_run(tiny_data, tiny_teacher, tmp_path):
    # 144 images, total batch 32: 4 iterations per epoch; stop at 3, resume to 6 (across an epoch boundary)
    common = ["--total_batch_size=32", "--eval_interval=100"]
    straight = run_md([*common, f"--out_dir={tmp_path / 'a'}", "--stop_iter=6"], tiny_data, tiny_teacher)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run_md([*common, f"--out_dir={tmp_path / 'b'}", "--stop_iter=3"], tiny_data, tiny_teacher)
    assert first.returncode == 0, first.stderr[-2000:]
    assert load(tmp_path / "b" / "ckpt.pt")["iter_num"] == 3
    saved = (tmp_path / "b" / "ckpt.pt").read_bytes()
    again = run_md([*common, f"--out_dir={tmp_path / 'b'}", "--stop_iter=6"], tiny_data, tiny_teacher)
    assert again.returncode != 0  # the same command without --resume: refused, the checkpoint kept
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'b' / 'ckpt.pt'} exists (an earlier run's checkpoint) and a new run would replace "
        f"it: continue that run with --resume=True, or choose another out_dir")
    assert (tmp_path / "b" / "ckpt.pt").read_bytes() == saved
    second = run_md([*common, f"--out_dir={tmp_path / 'b'}", "--stop_iter=6", "--resume=True"], tiny_data, tiny_teacher)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 6
    for part in ("model", "decoder"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    # the checkpoint: plain data, no compile/DDP prefixes, no teacher, the teacher named in the config
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in a["model"])
    assert set(a) >= {"model", "decoder", "model_args", "config", "optimizer", "iter_num"}
    assert a["config"]["teacher"] == tiny_teacher
    n_student = sum(v.numel() for v in a["model"].values())
    assert n_student == sum(p.numel() for p in ViT(ViTConfig.from_dict(a["model_args"])).parameters())


def test_loss_falls_and_is_logged(tiny_data, tiny_teacher, tmp_path):
    args = ["--total_batch_size=16", "--lr=2e-3", "--eval_interval=9", f"--out_dir={tmp_path}", "--stop_iter=18"]
    result = run_md(args, tiny_data, tiny_teacher)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (result.stdout + result.stderr).splitlines()
    losses = [float(line.split("val loss ")[1]) for line in lines if "val loss" in line]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert "img/s" in result.stdout + result.stderr


def test_ddp_two_processes_match_one_process(tiny_data, tiny_teacher, tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU), micro 8 each, against one process with accumulation 2:
    the same total batch of 16 gives the same weights and the same val loss."""
    common = ["--total_batch_size=16", "--eval_interval=100", "--stop_iter=2"]
    single = run_md([*common, f"--out_dir={tmp_path / 'one'}"], tiny_data, tiny_teacher)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}")
    double = run_md([*common, f"--out_dir={tmp_path / 'two'}"], tiny_data, tiny_teacher, launcher)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 process(es)" in double.stdout
    a, b = load(tmp_path / "one" / "ckpt.pt"), load(tmp_path / "two" / "ckpt.pt")
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=2e-5), k
    assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], rel=1e-5)


def test_corrupt_training_image_is_skipped(tiny_data, tiny_teacher, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = data / "train" / "circle" / "circle9999.png"
    bad.write_bytes(b"\x89PNG garbage")
    result = run_md(["--total_batch_size=8", "--epochs=1", f"--out_dir={tmp_path / 'out'}"], str(data), tiny_teacher)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipping unreadable image {bad}" in result.stderr
    assert "unreadable images skipped" in result.stdout + result.stderr


@pytest.mark.parametrize("args, message", [
    (["--foo=1"], "error: unknown option '--foo': valid options are"),
    (["--epochs=abc"], "error: --epochs=abc: 'epochs' must be int"),
    (["--mask_ratio=1.5"], "error: mask ratio 1.5 must be in (0, 1)"),
    (["--total_batch_size=20"], "error: total_batch_size 20 is not divisible by micro_batch_size x world size = 8 x 1"),
    (["--data_dir=/nonexistent"], "error: data directory '/nonexistent' not found"),
    (["--teacher=clp"], "error: unknown model 'clp': choose clip, dino, deit, embedded or a checkpoint path"),
    (["--loss=l3"], "error: unknown loss 'l3': choose smooth_l1, mse, cosine"),
    (["--resume=True"], "error: --resume=True but there is no checkpoint"),
])
def test_bad_input_is_one_clear_line(tiny_data, tiny_teacher, tmp_path, args, message):
    result = run_md([f"--out_dir={tmp_path}", *args], tiny_data, tiny_teacher)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert lines[-1].startswith(message), result.stderr[-1000:]
    assert "Traceback" not in result.stderr


def test_optimized_paths_compute_the_same_loss():
    """performance switches change no numbers: explicit vs fused attention, and torch.compile"""
    md = md_model().eval()
    images, masks, targets = batch(3)
    with torch.no_grad():
        fused = md(images, masks, targets)
        for block in md.student.blocks:
            block.attn.fused = False
        explicit = md(images, masks, targets)
        for block in md.student.blocks:
            block.attn.fused = True
    assert explicit.item() == pytest.approx(fused.item(), rel=1e-5)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    md = md_model()
    images, masks, targets = batch(4)
    eager = md(images, masks, targets)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in md.named_parameters()}
    md.zero_grad()
    compiled = MDWithLoss(torch.compile(md.md_student))(images, masks, targets)  # as train_md.py compiles
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-4)
    for n, p in md.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5, rtol=1e-3), n


@pytest.mark.parametrize("head", ["linear", "mlp", "transformer"])
@pytest.mark.parametrize("loss", ["smooth_l1", "mse", "cosine", "ce"])
def test_every_head_and_objective_trains_a_step(head, loss):
    torch.manual_seed(0)
    cfg = ViTConfig.beit_v2("nano/4", mask_token=True)
    out = 32 if loss == "ce" else 16  # ce: logits over a codebook of 32 codes
    decoder = DecoderHead(head, cfg.embed_dim, out, cfg.num_patches + 1, width=32, depth=1, heads=2)
    md = MDWithLoss(MDStudent(ViT(cfg), decoder), loss)
    images, masks, targets = batch(5)
    if loss == "ce":
        targets = torch.randint(0, 32, (4, 64), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(md.parameters(), lr=3e-3)
    before = md(images, masks, targets)
    for _ in range(3):
        opt.zero_grad()
        md(images, masks, targets).backward()
        opt.step()
    with torch.no_grad():
        assert md(images, masks, targets) < before


def test_cross_entropy_on_codes_and_loss_on_all_patches():
    md = md_model().eval()
    md.loss = "ce"
    torch.nn.init.zeros_(md.head.out.weight)
    torch.nn.init.zeros_(md.head.out.bias)  # uniform logits over 16 codes: CE = log 16 for every patch
    images, masks, _ = batch(6)
    codes = torch.randint(0, 16, (4, 64))
    assert md(images, masks, codes).item() == pytest.approx(math.log(16), rel=1e-6)
    # loss_on='all' averages over every patch: a visible-patch target now matters
    md.loss, md.loss_on = "mse", "all"
    targets = torch.zeros(4, 64, 16)
    with torch.no_grad():
        md.head.out.bias.fill_(1.0)  # prediction 1 everywhere
    assert md(images, masks, targets).item() == pytest.approx(1.0)
    targets[~masks] = 1.0  # visible targets now equal the prediction: only masked patches (25 of 64) err
    assert md(images, masks, targets).item() == pytest.approx(25 / 64)


def test_transformer_head_sees_all_tokens():
    """its output at a patch depends on other tokens (attention), unlike the linear head"""
    torch.manual_seed(0)
    head = DecoderHead("transformer", 8, 4, num_tokens=5, width=16, depth=1, heads=2).eval()
    x = torch.randn(1, 5, 8)
    y = x.clone()
    y[0, 3] += 1.0  # change one token
    a, b = head(x), head(y)
    assert a.shape == (1, 4, 4) and not torch.allclose(a[0, 0], b[0, 0])
    linear = DecoderHead("linear", 8, 4).eval()
    assert torch.equal(linear(x)[0, 0], linear(y)[0, 0])


def test_ablation_flags_reach_the_run(tiny_data, tiny_teacher, tmp_path):
    """--head, --decoder_*, --whitening=bn, --loss_on, --mask, --teacher_layer end up in the trained objects"""
    args = ["--head=transformer", "--decoder_depth=1", "--decoder_width=24", "--decoder_heads=2",
            "--whitening=bn", "--loss_on=all", "--mask=random", "--mask_ratio=0.5", "--teacher_layer=1",
            "--stop_iter=2", f"--out_dir={tmp_path}"]
    result = run_md(args, tiny_data, tiny_teacher)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = load(tmp_path / "ckpt.pt")
    assert ckpt["decoder"]["proj_in.weight"].shape == (24, 48)
    assert "blocks.1.norm1.weight" not in ckpt["decoder"]
    running_var = ckpt["whitening"]["running_var"]
    assert running_var.shape == (48,) and not torch.equal(running_var, torch.ones(48))
    assert ckpt["config"]["loss_on"] == "all" and ckpt["config"]["teacher_layer"] == 1


@pytest.mark.parametrize("args, option", [
    (["--smooth_l1_beta=-1.0"], "smooth_l1_beta"),            # smooth_l1_loss refuses beta < 0
    (["--head=transformer", "--decoder_width=256", "--decoder_heads=7"], "decoder_heads"),  # 256 % 7
    (["--decoder_heads=0"], "decoder_heads"),
    (["--target=vqkd"], "target"),                            # no --tokenizer: "checkpoint '' not found"
    (["--lr=1e38"], "lr"),                                    # Adam's lr / (1 - beta1) overflows float32
    (["--min_lr=1e38"], "min_lr"),
    (["--weight_decay=1e300"], "weight_decay"),               # 1 - lr x weight_decay overflows float32
    (["--head=transformer", "--decoder_depth=-1"], "decoder_depth"),
    (["--decoder_width=0"], "decoder_width"),
])
def test_option_that_cannot_work_is_one_line_before_training(tiny_data, tiny_teacher, tmp_path, args, option):
    """values that used to crash mid-run (or were silently accepted) stop before any work, in one line"""
    cmd = [sys.executable, os.path.join(ROOT, "train_md.py"), f"--data_dir={tiny_data}",
           f"--teacher={tiny_teacher}", "--model=nano/4", "--img_size=32", "--epochs=4", "--warmup_epochs=0",
           "--total_batch_size=16", "--micro_batch_size=8", "--num_workers=0", "--device=cpu",
           "--dtype=float32", "--compile=False", "--teacher_bf16=False", "--eval_images=24",
           f"--out_dir={tmp_path / 'out'}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        result = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args} was not refused before training")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --{option}="), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("script", ["train_md.py", "finetune.py", "train_vqkd.py"])
def test_help_lists_every_option_with_its_commented_default(script):
    """--help (before: "option '--help' needs a value") prints the docstring and each setting's
    line of the config block, as the file writes it"""
    result = forkserver.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    source = open(os.path.join(ROOT, script)).read()
    assert result.stdout.startswith(source.split('"""')[1].strip().splitlines()[0])
    for name in ("lr", "out_dir", "seed"):
        (line,) = [x for x in source.splitlines() if x.startswith(f"{name} = ")]
        assert line in result.stdout.splitlines()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_teacher_export_help_is_its_usage(flag):
    """python teacher.py --help (before: "'--help' is no command", exit 1): the docstring and the
    export command's usage line, exit 0"""
    result = forkserver.run([sys.executable, "teacher.py", flag], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert result.stdout.startswith("Frozen teachers for masked distillation")
    assert result.stdout.splitlines()[-1] == ("usage: python teacher.py export "
                                              "[--format=mdlab|timm] [--act=quick_gelu|gelu] "
                                              "SRC DST")


def test_transformer_head_with_zero_blocks_works():
    """--decoder_depth=0 is allowed: the transformer head is then projection, positions, norm, output"""
    head = DecoderHead("transformer", 8, 4, num_tokens=5, width=6, depth=0, heads=7)
    assert head(torch.randn(2, 5, 8)).shape == (2, 4, 4)


@pytest.mark.parametrize("script", ["train_md.py", "analyze.py"])
def test_help_into_a_pipe_closed_early_is_no_error(script):
    """python SCRIPT --help | head: the reader is gone before the text is written (here: closed at
    once, so the
    write fails every time); before, a BrokenPipeError traceback"""
    proc = forkserver.Popen([sys.executable, script, "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            cwd=ROOT, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and stderr == ""


def test_a_config_file_may_import_what_it_computes_with(tmp_path):
    """a config file is Python: `import math` there is a tool, not an option (before: "unknown
    option 'math'"); its assignments still must be options"""
    from common import apply_overrides
    path = tmp_path / "cfg.py"
    path.write_text("import math\nlr = math.pi / 1000\n")
    config = dict(lr=1e-3, epochs=3)
    assert apply_overrides(config, [str(path)]) == dict(lr=math.pi / 1000, epochs=3)
    path.write_text("import math\nlr_typo = math.pi\n")
    with pytest.raises(SystemExit, match="unknown option 'lr_typo' in"):
        apply_overrides(config, [str(path)])


def test_val_loss_is_recomputed_from_the_checkpoint_and_an_independent_teacher(
        tiny_data, tiny_teacher, tmp_path):
    """The logged val loss against the same quantity computed here by hand: the teacher ViT
    loaded from its file (final norm, CLS token 0 dropped, patch j's target is token j + 1),
    LayerNorm without affine, the saved student + linear head on the eval subset's images and
    masks, smooth L1 (beta 2) averaged over the masked patches of each batch, batches weighted
    by their images. A target shifted by one token (CLS as patch 0's) changes the loss."""
    from data import EvalTransform, ImageFolder, make_loader
    from data.masks import BEIT_RATIO, MaskGenerator
    args = [f"--out_dir={tmp_path}", "--stop_iter=1", "--lr=1e-2"]
    result = run_md(args, tiny_data, tiny_teacher)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = load(tmp_path / "ckpt.pt")
    records = map(json.loads, open(tmp_path / "log.jsonl"))
    logged = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(logged) == 1
    saved = load(tiny_teacher)
    teacher = ViT(ViTConfig.from_dict(saved["model_args"]))
    teacher.load_state_dict(saved["model"])
    cfg = ViTConfig.from_dict(ckpt["model_args"])
    student = ViT(cfg)
    student.load_state_dict(ckpt["model"])
    head = DecoderHead("linear", cfg.embed_dim, teacher.config.embed_dim, cfg.num_patches + 1)
    head.load_state_dict(ckpt["decoder"])
    md_student = MDStudent(student, head).eval()
    teacher.eval()
    val_set = ImageFolder(os.path.join(tiny_data, "val"), EvalTransform(32),
                          MaskGenerator("block", cfg.grid, BEIT_RATIO), 1)  # the script's seed + 1
    loader, _ = make_loader(val_set, 8, False, seed=0, num_workers=0, num_samples=24)
    total = images_read = 0.0
    with torch.no_grad():
        for images, _, masks, _ in loader:
            tokens = teacher.forward_features(images)  # (B, 1 + N, D): CLS first
            targets = torch.nn.functional.layer_norm(tokens[:, 1:], tokens.shape[-1:], eps=1e-6)
            d = (md_student(images, masks) - targets).abs()
            per_patch = torch.where(d < 2.0, 0.5 * d ** 2 / 2.0, d - 1.0).mean(-1)  # (B, N)
            batch_loss = per_patch[masks].mean()
            total += batch_loss.item() * len(images)
            images_read += len(images)
    assert images_read == 24
    assert logged[0] == pytest.approx(total / images_read, rel=1e-6)
    assert ckpt["best_val_loss"] == pytest.approx(total / images_read, rel=1e-6)


def test_a_tiny_grad_clip_leaves_only_weight_decay(tiny_data, tiny_teacher, tmp_path):
    """--grad_clip=1e-14 scales the gradients far below AdamW's eps (1e-8): the first step's
    update lr * g / (|g| + eps) is below 1e-7, so each weight moves by decoupled weight decay
    alone, to w * (1 - lr * wd) for matrices and w for the no-decay tensors (biases, norms,
    tokens, absolute position tables); without clipping most weights would move by about lr.
    The initial weights come from the same run at --lr=0 (no step, no decay)."""
    lr, wd = 0.1, 0.05
    common = ["--stop_iter=1", "--warmup_epochs=0", f"--weight_decay={wd}", "--grad_clip=1e-14"]
    start = run_md([*common, f"--out_dir={tmp_path / 'start'}", "--lr=0"], tiny_data, tiny_teacher)
    assert start.returncode == 0, start.stderr[-2000:]
    args = [*common, f"--out_dir={tmp_path / 'step'}", f"--lr={lr}"]
    step = run_md(args, tiny_data, tiny_teacher)
    assert step.returncode == 0, step.stderr[-2000:]
    a, b = load(tmp_path / "start" / "ckpt.pt"), load(tmp_path / "step" / "ckpt.pt")
    no_decay_names = ("cls_token", "mask_token", "pos_embed", "decoder_pos")
    checked = decayed = 0
    for part in ("model", "decoder"):
        for k, w0 in a[part].items():
            if not w0.is_floating_point() or "relative_position_index" in k:
                continue
            decays = w0.ndim >= 2 and k.split(".")[-1] not in no_decay_names
            expected = w0 * (1 - lr * wd) if decays else w0
            assert torch.allclose(b[part][k], expected, rtol=0, atol=1e-6), k
            checked += 1
            decayed += decays
    assert checked > 10 and decayed > 5
