"""Reliability: killed runs resume to the same weights, checkpoints survive crashes, NaN stops
cleanly, no file runs code when loaded, a full disk and a busy out_dir are one line."""
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from typing import Dict, List, Tuple

import pytest
import torch
from PIL import Image

from data import EvalTransform, load_image
from tests import forkserver
from tests.test_train_md import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

COMMON = ["--img_size=32", "--total_batch_size=16", "--micro_batch_size=8", "--num_workers=0", "--device=cpu",
          "--dtype=float32", "--compile=False", "--log_interval=1", "--eval_interval=1"]
MD = ["train_md.py", "--model=nano/4", "--epochs=3", "--warmup_epochs=1", "--teacher_bf16=False",
      "--eval_images=16", *COMMON]
FT = ["finetune.py", "--epochs=1", "--warmup_epochs=0", *COMMON]
TOKENIZER = ["train_vqkd.py", "--model=nano/4", "--codebook_size=16", *COMMON[:-1]]  # it has no eval_interval
RANDOM_MD = MD + ["--drop_path=0.2"]  # random draws in the forward pass
RANDOM_FT = FT + ["--drop_path=0.2", "--mixup=0.8", "--cutmix=1.0"]  # and in the batch mixing


def script_args(script, teacher, every, extra):
    """-> (the arguments of train_md.py, finetune.py or train_vqkd.py on the tiny model from `teacher`,
    evaluating or saving every `every` iterations, then `extra`; the file the run saves in out_dir)"""
    if script == "md":
        return MD + [f"--teacher={teacher}", f"--eval_interval={every}", *extra], "ckpt.pt"
    if script == "ft":
        return FT + [f"--init={teacher}", f"--eval_interval={every}", *extra], "ckpt.pt"
    return TOKENIZER + [f"--teacher={teacher}", f"--save_interval={every}", *extra], "tokenizer.pt"


def command(script_args, data, extra):
    return [sys.executable, *script_args, f"--data_dir={data}", *extra]


def run(script_args, data, extra, launcher=()):
    cmd = command(script_args, data, extra)
    if launcher:
        cmd = [*launcher, *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def wait_for_checkpoint(path, iteration, proc, timeout=600):
    """poll until `path` holds a checkpoint of `iteration` or later (it is replaced atomically)"""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and torch.load(path, weights_only=True)["iter_num"] >= iteration:
            return
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {iteration}"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of iteration {iteration} in {timeout} s")


@pytest.mark.parametrize("script", ["md", "ft"])
def test_kill_minus_9_then_resume_is_bit_identical(tiny_data, tiny_teacher, tmp_path, script):
    """Drop path on (and mixup + cutmix for fine-tuning): every random draw follows from (seed,
    rank, iteration, micro-step), so wherever the kill falls the resumed run ends with the same
    weights. The kill follows the checkpoint of a randomly chosen iteration (a file event). The
    fine-tune's init is deleted before the resume: its weights are in the checkpoint (before: the resume
    read --init again, and stopped where it was gone)."""
    init = tmp_path / "init.pt"
    if script == "md":
        args = RANDOM_MD + [f"--teacher={tiny_teacher}"]
    else:
        shutil.copy(tiny_teacher, init)
        args = RANDOM_FT + [f"--init={init}"]
    stop = "--stop_iter=8"
    straight = run(args, tiny_data, [stop, f"--out_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    proc = forkserver.Popen(command(args, tiny_data, [stop, f"--out_dir={out}"]), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wait_for_checkpoint(out / "ckpt.pt", random.Random(script).randint(1, 5), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if script == "ft":
        os.remove(init)
    resumed = run(args, tiny_data, [stop, f"--out_dir={out}", "--resume=True"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(weights(out / "ckpt.pt"), weights(tmp_path / "straight" / "ckpt.pt"))


@pytest.mark.parametrize("whitening", ["ln", "bn"])
def test_ddp_resume_matches_uninterrupted_ddp(tiny_data, tiny_teacher, tmp_path, whitening):
    """with drop path: each rank's random draws follow from (seed, rank, iteration, micro-step). With
    'bn' whitening the ranks' running statistics are averaged after each step: before, each rank kept
    its own and evaluated with them, so the resumed run (all ranks loading rank 0's) had the same weights
    but another val loss"""
    args = MD + [f"--teacher={tiny_teacher}", "--eval_interval=100", "--drop_path=0.2", f"--whitening={whitening}"]
    launcher = lambda: (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}")
    a = run(args, tiny_data, ["--stop_iter=4", f"--out_dir={tmp_path / 'a'}"], launcher())
    assert a.returncode == 0, a.stderr[-2000:]
    b1 = run(args, tiny_data, ["--stop_iter=2", f"--out_dir={tmp_path / 'b'}"], launcher())
    b2 = run(args, tiny_data, ["--stop_iter=4", f"--out_dir={tmp_path / 'b'}", "--resume=True"], launcher())
    assert b1.returncode == 0, b1.stderr[-2000:]
    assert b2.returncode == 0, b2.stderr[-2000:]
    assert_same(weights(tmp_path / "a" / "ckpt.pt"), weights(tmp_path / "b" / "ckpt.pt"))
    a, b = weights_at(tmp_path / "a" / "ckpt.pt"), weights_at(tmp_path / "b" / "ckpt.pt")
    assert_same(a["whitening"], b["whitening"])
    assert a["best_val_loss"] == last_val_loss(tmp_path / "b" / "log.jsonl")


def test_ddp_bn_running_mean_is_the_mean_of_the_global_batch(tiny_data, tiny_teacher, tmp_path):
    """'bn' whitening under DDP: the running mean is linear in the batch means
    (m <- 0.9 m + 0.1 mean), so the ranks' average after each step equals what one process reading
    the whole batch of 16 at once keeps (the teacher is frozen: its features do not depend on the
    student). A sum over the ranks instead of their mean would double it."""
    args = MD + [f"--teacher={tiny_teacher}", "--eval_interval=100", "--whitening=bn",
                 "--stop_iter=3"]
    one = run(args, tiny_data, ["--micro_batch_size=16", f"--out_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}")
    two = run(args, tiny_data, [f"--out_dir={tmp_path / 'two'}"], launcher)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = weights_at(tmp_path / "one" / "ckpt.pt"), weights_at(tmp_path / "two" / "ckpt.pt")
    assert a["whitening"]["running_mean"].abs().max() > 0
    assert torch.allclose(a["whitening"]["running_mean"], b["whitening"]["running_mean"],
                          rtol=1e-4, atol=1e-6)


def test_ddp_tokenizer_counts_every_rank_codes(tiny_data, tiny_teacher, tmp_path):
    """train_vqkd.py under torchrun --nproc_per_node=2: the code assignments it logs (codebook usage,
    collapse) and saves are those of all ranks: 2 steps of 16 images of 64 patches = 2048, also when the
    run stops after step 1 and resumes (before: rank 0's alone, 1024, and after a resume 1536)"""
    args = TOKENIZER + [f"--teacher={tiny_teacher}", "--log_interval=100"]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2")
    for name, stops in (("straight", (2,)), ("resumed", (1, 2))):
        for i, stop in enumerate(stops):
            extra = [f"--out_dir={tmp_path / name}", f"--stop_iter={stop}", f"--resume={i > 0}"]
            result = run(args, tiny_data, extra, (*launcher, f"--master_port={free_port()}"))
            assert result.returncode == 0, result.stderr[-2000:]
            counts = weights_at(tmp_path / name / "tokenizer.pt")["counts"]
            assert counts.sum().item() == stop * 16 * 64, (name, stop)


@pytest.mark.parametrize("script, positions", [("md", (1, 3)), ("ft", (1, 3)), ("vqkd", (1, 3)), ("md", (0, 2)),
                                               ("vqkd", (0, 2))])
def test_ddp_rank_that_reads_no_image_keeps_step(tiny_data, tiny_teacher, tmp_path, script, positions):
    """Micro-batches of one image: under torchrun --nproc_per_node=2 rank 1 reads positions 1 and 3 of
    the epoch's order (rank 0: 0 and 2), made unreadable. Before, that rank skipped its forward/backward
    and the ranks' gradient all-reduces fell out of step (an error or a hang). Now it runs a stand-in
    batch that adds zero gradient, which is what one process does with accumulation 2 when it skips
    those two micro-batches: the same weights after 2 steps. The tokenizer's codebook starts from (and
    restarts on) the vectors of a rank that read its batch: rank 0's stand-in gave it 2 distinct codes
    of 16. (vqkd with rank 0's broken: one process draws its codes under another micro-step's seed.)"""
    from data import EpochSampler, ImageFolder
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train = ImageFolder(str(data / "train"), transform=None)
    order = EpochSampler(len(train), shuffle=True, seed=0).indices()  # epoch 0, one process: seed 0
    broken = [train.samples[order[position]][0] for position in positions]
    for path in broken:
        with open(path, "wb") as f:
            f.write(b"\x89PNG broken")
    one = ["--micro_batch_size=1", "--total_batch_size=2", "--stop_iter=2"]
    args, saved = script_args(script, tiny_teacher, 100, one)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}")
    double = forkserver.run([*launcher, *command(args, data, [f"--out_dir={tmp_path / 'two'}"])[1:]],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 process(es)" in double.stdout
    for path in broken:
        assert f"skipping unreadable image {path}" in double.stderr
    b = weights(tmp_path / "two" / saved)
    # each step's log line: the one image of the 4 that could not be read, on whichever rank
    # (before: rank 0's count alone, 0 with rank 1's broken), and a loss also where rank 0 has read
    # none yet (before: nan)
    double_log = train_records(tmp_path / "two" / "log.jsonl")
    assert [r["skipped"] for r in double_log] == [1, 1]
    if script == "vqkd" and positions == (0, 2):
        distinct = torch.unique(b["codebook"].round(decimals=5), dim=0)
        assert len(distinct) >= 8, len(distinct)
        assert all(math.isfinite(r["loss"]) for r in double_log)
        return
    single = run(args, data, [f"--out_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-2000:]
    a = weights(tmp_path / "one" / saved)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k
    # one rank read one image per step: the ranks' mean loss is that image's, as one process's last
    # readable one
    single_losses = [r["loss"] for r in train_records(tmp_path / "one" / "log.jsonl")]
    assert [r["loss"] for r in double_log] == pytest.approx(single_losses, rel=1e-5)


KILL_DURING_SAVE = """
import sys, torch
sys.path.insert(0, {root!r})
from common import save_checkpoint
big = {{"model": {{"w%d" % i: torch.ones(4_000_000) for i in range(40)}}}}  # 640 MB: the write takes a while
print("writing", flush=True)
save_checkpoint(big, {path!r})
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    from common import save_checkpoint
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.arange(5.0)}, "iter_num": 7}, path)
    code = KILL_DURING_SAVE.format(root=ROOT, path=path)
    proc = forkserver.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.time() + 60
    while not (os.path.exists(path + ".tmp") and os.path.getsize(path + ".tmp") > 1_000_000) and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert os.path.exists(path + ".tmp")  # killed mid-write
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["iter_num"] == 7 and torch.equal(ckpt["model"]["w"], torch.arange(5.0))


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from common import save_checkpoint
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.zeros(3)}}, path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit, match="could not write .*No space left on device.*the last good checkpoint is "):
        save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.zeros(3))
    assert not os.path.exists(path + ".tmp")


def test_non_finite_weights_are_never_saved(tmp_path):
    from common import save_checkpoint
    with pytest.raises(SystemExit, match="weight 'w' is not finite; no checkpoint was saved before"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}}, str(tmp_path / "c.pt"))
    assert not os.path.exists(tmp_path / "c.pt")


def test_nan_loss_stops_with_one_line_and_keeps_the_good_checkpoint(tiny_data, tiny_teacher, tmp_path):
    # lr 1e6 without warmup: the first step's weights are finite (its checkpoint is saved, eval_interval
    # 1), the second step's loss is not. (A resume whose teacher goes bad is refused before any step:
    # test_train_md's targets-changed-in-place test.)
    out = tmp_path / "run"
    bad = run(MD + [f"--teacher={tiny_teacher}"], tiny_data,
              ["--stop_iter=4", f"--out_dir={out}", "--lr=1e6", "--warmup_epochs=0"])
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: iteration 1: loss is (nan|inf|-inf); stopping, the last good checkpoint is "
                    rf"{re.escape(str(out / 'ckpt.pt'))}", last), last
    kept = torch.load(out / "ckpt.pt", weights_only=True)
    assert kept["iter_num"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values())
    # fine-tuning with the largest learning rate the options allow: AdamW's decay, 1 - lr x
    # weight_decay, is -1.5e36, so the second step overflows the weights to inf; the first save,
    # after iteration 4, is refused, and no checkpoint is written
    ft = tmp_path / "ft"
    blown = run(FT + [f"--init={tiny_teacher}"], tiny_data,
                ["--stop_iter=4", "--eval_interval=4", f"--out_dir={ft}", "--lr=3e37"])
    assert blown.returncode != 0 and "Traceback" not in blown.stderr
    last = blown.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and ("not finite" in last or "is nan" in last), last
    assert "no checkpoint was saved before" in last
    assert not (ft / "ckpt.pt").exists()


def test_float16_gradients_that_overflow_at_every_scale_stop_with_one_line(tmp_path):
    """float16 skips a step whose gradients overflow and halves the loss scale: at a scale below 1
    the gradients are not finite unscaled either (17 skips in a row from 2^16), and the run stops
    like a non-finite step. (A unit test of the rule and its message: no real run overflows
    17 times.)"""
    from common import stop_if_nonfinite
    nothing = torch.full((3,), -1.0, dtype=torch.float64)  # no non-finite loss recorded
    scaler = torch.amp.GradScaler("cpu")
    stop_if_nonfinite(nothing, str(tmp_path / "ckpt.pt"), scaler)  # 2^16: goes on
    state = scaler.state_dict()
    scaler.load_state_dict(state | dict(scale=2.0 ** -1))
    with pytest.raises(SystemExit, match=r"^error: the float16 gradients are not finite even at "
                                         r"loss scale 0\.5 \(their steps were skipped\); stopping, "
                                         r"no checkpoint was saved before"):
        stop_if_nonfinite(nothing, str(tmp_path / "ckpt.pt"), scaler)
    stop_if_nonfinite(nothing, str(tmp_path / "ckpt.pt"),
                      torch.amp.GradScaler("cpu", enabled=False))


def test_nan_loss_in_float16_stops_with_one_line(tiny_data, tiny_teacher, tmp_path):
    """lr 1e6 in float16: the first step that is not skipped blows the weights up, the next forward
    overflows float16, and its loss stops the run (a loss scale cannot help a forward)"""
    out = tmp_path / "run"
    bad = run(MD + [f"--teacher={tiny_teacher}"], tiny_data,
              ["--stop_iter=30", f"--out_dir={out}", "--lr=1e6", "--warmup_epochs=0",
               "--dtype=float16"])
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert re.match(r"error: iteration \d+: loss is (nan|inf|-inf); stopping, ", last), last


def test_huge_image_is_decoded(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (10000, 10000), (200, 10, 10)).save(path, quality=30)
    img = load_image(str(path))
    assert img.size == (1250, 1250)  # JPEG draft: 1/8, still >= 1024 on each side
    x = EvalTransform(224)(img)
    assert x.shape == (3, 224, 224) and abs(x[0].mean().item() - 200 / 255) < 0.02


# ---- files never run code: TorchScript archives are read as data ----------------------------

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2)  # in_proj_weight, and parameters set to None
        self.norm = torch.nn.LayerNorm(8)
        self.attn_mask = torch.ones(3, 3)  # a plain tensor attribute (OpenAI's CLIP): not state

    def forward(self, x):
        return self.norm(x + self.attn(x, x, x, need_weights=False)[0])


class ClipLike(torch.nn.Module):
    """OpenAI CLIP's shape: the state under the root module's attributes, fp16 weights,
    a ModuleList, buffers (one non-persistent), views of one storage, list and dict attributes."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d(3, 8, 4, bias=False)
        self.visual = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(8))
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6).half())
        self.register_buffer("steps", torch.arange(5))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.shared = self.blocks[0].norm.weight[2:5]  # a view, not state
        self.sizes: List[int] = [1, 2]
        self.extra: Dict[str, torch.Tensor] = {"a": torch.zeros(2)}

    def forward(self, x):
        return self.visual(x).mean() * self.logit_scale.float()


class SetStateWritesAFile(torch.nn.Module):
    """torch.jit.load runs this class's __setstate__, stored in the archive: it writes a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.marker = marker

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        torch.save(state[0], state[1])
        self.weight = state[0]
        self.marker = state[1]
        self.training = state[2]


def assert_same_state(path):
    """read_torchscript(path) against torch.jit.load(path).state_dict() of a benign archive"""
    from common import read_torchscript
    ours, truth = read_torchscript(path), torch.jit.load(path).state_dict()
    assert list(ours) == list(truth)
    for k in truth:
        assert ours[k].dtype == truth[k].dtype and torch.equal(ours[k], truth[k]), k


def test_torchscript_weights_match_torch_jit_load(tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(ClipLike().eval())
    torch.jit.save(scripted, tmp_path / "scripted.pt")
    assert_same_state(tmp_path / "scripted.pt")
    assert "shared" not in torch.jit.load(tmp_path / "scripted.pt").state_dict()  # not state
    model = ClipLike().eval()
    traced = torch.jit.trace(model, torch.rand(1, 3, 8, 8), check_trace=False)
    torch.jit.save(traced, tmp_path / "traced.pt")
    assert_same_state(tmp_path / "traced.pt")


def test_torchscript_clip_archive_loads_as_the_teacher(tmp_path):
    """a traced open_clip CLIP (image and text towers, as OpenAI ships): same weights, same features
    (64-channel heads: the head count is not stored, the loader takes width / 64 like OpenAI)"""
    open_clip = pytest.importorskip("open_clip")
    from teacher import load_model
    torch.manual_seed(0)
    vision_cfg = dict(layers=2, width=128, head_width=64, patch_size=8, image_size=32)
    text_cfg = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    clip = open_clip.CLIP(16, vision_cfg, text_cfg, quick_gelu=True).eval()
    images, text = torch.rand(2, 3, 32, 32), torch.zeros(1, 8, dtype=torch.long)
    traced = torch.jit.trace(clip, (images[:1], text), check_trace=False)
    path = tmp_path / "clip.pt"
    torch.jit.save(traced, path)
    assert_same_state(path)
    vit, info = load_model(str(path))
    clip.visual.output_tokens = True
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        _, tokens = clip.visual((images - mean) / std)
        ours = vit.forward_features(images)
    assert info["kind"] == "clip" and (ours[:, 1:] - tokens).abs().max().item() < 1e-4


def evil_archive(tmp_path):
    """(archive, marker): torch.jit.load(archive) writes marker"""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(SetStateWritesAFile(str(marker))), path)
    return str(path), marker


def test_torchscript_setstate_never_runs(tmp_path, tiny_data):
    from common import resume_checkpoint
    from teacher import CheckpointError, load_model, load_teacher, read_checkpoint
    path, marker = evil_archive(tmp_path)
    torch.jit.load(path)
    assert marker.exists()  # the archive really runs code under torch.jit.load
    marker.unlink()
    for load in (read_checkpoint, load_model, load_teacher):
        with pytest.raises(CheckpointError, match="restores its state with its own code") as e:
            load(path)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="restores its state with its own code") as e:  # a resume file
        resume_checkpoint(path, {}, ())
    assert "\n" not in str(e.value)
    ft = run(FT + [f"--init={path}"], tiny_data, [f"--out_dir={tmp_path / 'ft'}"])
    md = run(MD + [f"--teacher={path}"], tiny_data, [f"--out_dir={tmp_path / 'md'}"])
    analyze = [sys.executable, "analyze.py", "--metric=attn_distance", path, f"--data={tiny_data}",
               f"--out={tmp_path / 'an'}"]
    an = forkserver.run(analyze, capture_output=True, text=True, cwd=ROOT, timeout=600)
    for result in (ft, md, an):
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert last.startswith("error:") and "restores its state with its own code" in last
    assert not marker.exists()


class OpensAFile:
    def __reduce__(self):
        return (open, (os.environ["MDLAB_PWNED"], "w"))


def test_torchscript_data_pickle_builds_no_objects(tmp_path, monkeypatch):
    """an archive whose data.pkl would call open(): the reader refuses the global, nothing runs"""
    from teacher import CheckpointError, load_model
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MDLAB_PWNED", str(marker))
    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(ClipLike()), good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/data.pkl"):
                data = pickle.dumps({"x": OpensAFile()}, protocol=2)
            dst.writestr(name, data)
    with pytest.raises(CheckpointError, match="global 'io.open' is not plain data"):
        load_model(str(bad))
    assert not marker.exists()


# ---- the disk: a real full filesystem, an unusable out_dir, two runs on one out_dir ----------

def mount_tmpfs(path, options):
    """a real small filesystem at path (needs the right to mount: root, in most sandboxes and CI
    containers); the test skips where mounting is not allowed"""
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    result = subprocess.run(mount, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def test_real_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    from common import save_checkpoint
    disk = tmp_path / "small"
    mount_tmpfs(disk, "size=4m")
    try:
        path = str(disk / "ckpt.pt")
        save_checkpoint({"model": {"w": torch.arange(5.0)}, "iter_num": 7}, path)
        with pytest.raises(SystemExit) as e:
            save_checkpoint({"model": {"w": torch.ones(2_000_000)}}, path)  # 8 MB on a 4 MB disk
        message = str(e.value)
        assert message.startswith(f"error: could not write {path} (No space left on device)")
        assert f"the last good checkpoint is {path}" in message and "\n" not in message
        assert os.listdir(disk) == ["ckpt.pt"]  # no ckpt.pt.tmp left behind
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["iter_num"] == 7 and torch.equal(ckpt["model"]["w"], torch.arange(5.0))
    finally:
        subprocess.run(["umount", str(disk)])


def test_bench_help_and_an_unknown_option_start_no_benchmark():
    """before: every --word was taken as an option and unknown ones ignored, so --help or a typo ran
    the whole benchmark (minutes)"""
    shown = forkserver.run([sys.executable, "bench.py", "--help"], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
    assert shown.returncode == 0 and shown.stdout.startswith("How close the MD training step is")
    typo = forkserver.run([sys.executable, "bench.py", "--qick"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert typo.returncode == 1 and typo.stdout == ""
    assert typo.stderr == "error: unknown option '--qick': python bench.py --help lists them\n"


@pytest.mark.parametrize("option, line", [
    ("--steps=abc", "error: --steps=abc must be an integer >= 1"),  # before: a traceback on import
    ("--steps=0", "error: --steps=0 must be an integer >= 1"),  # before: nan rows, then a traceback
    ("--batch=64,x", "error: --batch=64,x must be integers >= 1, comma-separated"),
    ("--sizes=tiny/4,huge/99", "error: unknown model size 'huge/99': choose one or more of"),
    ("--device=tpu", "error: --device=tpu is not a device: use auto, cpu, cuda or cuda:N"),
])
def test_bench_option_values_are_checked_before_any_benchmark(option, line):
    """a value bench.py cannot use is one line on stderr, exit 1, nothing measured"""
    r = forkserver.run([sys.executable, "bench.py", "--quick", option], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(line), r.stderr


def test_analyze_out_on_a_read_only_filesystem_says_so(tmp_path, tiny_teacher):
    """a real read-only mount as --out's parent: the reason is the filesystem's (before: "Permission
    denied", fixed in the message)"""
    disk = tmp_path / "ro"
    mount_tmpfs(disk, "ro,size=1m")
    try:
        result = forkserver.run([sys.executable, "analyze.py", "--metric=attn_entropy", tiny_teacher,
                                 f"--out={disk / 'an'}"], capture_output=True, text=True, cwd=ROOT,
                                timeout=300)
    finally:
        subprocess.run(["umount", str(disk)])
    assert result.returncode != 0
    assert result.stderr.strip() == (f"error: --out={disk / 'an'} cannot be a directory (Read-only "
                                      "file system): give a directory for NAME.json and NAME.png")


def file_size_limit(size):
    """preexec_fn: writes past `size` bytes fail with EFBIG in the child (Python ignores SIGXFSZ)"""
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_failed_write_with_loader_workers_ends_the_process(tiny_data, tiny_teacher, tmp_path):
    """A checkpoint (700 KB) that cannot be written in a run whose loader has a worker: one error
    line, and the process ends. Before, it hung at exit: multiprocessing's exit handler sends the
    workers SIGTERM, which they ignore (data.init_worker), then waits for them."""
    args = [*MD, f"--teacher={tiny_teacher}", "--num_workers=1", "--eval_interval=2", "--stop_iter=4"]
    cmd = command(args, tiny_data, [f"--out_dir={tmp_path / 'run'}"])
    r = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), preexec_fn=file_size_limit(300_000))
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().startswith(f"error: could not write {tmp_path / 'run' / 'ckpt.pt'} (File too large)")
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "no checkpoint was saved before" in r.stderr  # the first save: there is no previous one to keep


def test_log_and_lock_write_failures_are_one_line(tiny_data, tiny_teacher, tmp_path):
    """log.jsonl and run.lock on a disk with no room: one error line, not an OSError traceback"""
    disk = tmp_path / "full"
    mount_tmpfs(disk, "size=1m")
    try:
        out = disk / "run"
        out.mkdir()
        (out / "run.lock").write_text("pid 1 on x")  # the lock's file exists: the run gets past it
        with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk to its last block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        r = run([*MD, f"--teacher={tiny_teacher}", "--stop_iter=2"], tiny_data, [f"--out_dir={out}"])
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
        assert "No space left on device" in r.stderr and r.stderr.startswith("error: could not write")
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_figure_that_cannot_be_written_is_one_line_and_keeps_the_older_one(tmp_path):
    """analyze.py writes its PNGs through a temporary file: under a file size limit (a full disk is
    the same write error) one line, and the figure of an earlier run is kept whole; before, an
    OSError traceback from PIL and a cut PNG"""
    pytest.importorskip("matplotlib")
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(dict(iter=i, loss=1 / i, lr=1e-3)) + "\n" for i in range(1, 50)))
    cmd = [sys.executable, "analyze.py", "--metric=curves", str(log), f"--out={tmp_path / 'figs'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    png = (tmp_path / "figs" / "curves.png").read_bytes()
    json_size = os.path.getsize(tmp_path / "figs" / "curves.json")
    assert png.startswith(b"\x89PNG") and len(png) > 4 * json_size
    limit = 2 * json_size  # the JSON fits, the figure does not
    again = forkserver.run([*cmd, "--labels=again"], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=300, preexec_fn=file_size_limit(limit))
    assert again.returncode == 1, again.stderr[-2000:]
    png_path = tmp_path / "figs" / "curves.png"
    assert again.stderr.strip() == (f"error: could not write {png_path} (File too large): free space there "
                                    "or write to another folder")
    assert png_path.read_bytes() == png
    assert sorted(os.listdir(tmp_path / "figs")) == ["curves.json", "curves.png"]  # no temporary file left


@pytest.mark.parametrize("folder, says", [
    ("ckpt.pt", "is a folder, not a checkpoint file"),  # before: "checkpoint ... not found"
    ("run.lock", "error: could not write {out}/run.lock (Is a directory)"),  # before: IsADirectoryError
    ("log.jsonl", "error: could not read {out}/log.jsonl (Is a directory)"),
    ("ckpt.pt.tmp", "error: {out}/ckpt.pt.tmp is a folder; the run writes ckpt.pt through a file of that name"),
])  # (ckpt.pt.tmp, before: found at the first checkpoint, after the work up to it, with ckpt.pt named)
def test_a_folder_where_a_run_keeps_a_file_is_one_line(tiny_data, tiny_teacher, tmp_path, folder, says):
    out = tmp_path / "run"
    (out / folder).mkdir(parents=True)
    r = run([*MD, f"--teacher={tiny_teacher}", "--stop_iter=1"], tiny_data,
            [f"--out_dir={out}", f"--resume={folder == 'ckpt.pt'}"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("error:") and says.format(out=out) in lines[0], lines[0]


def test_out_dir_that_is_a_file_or_read_only_stops_before_any_work(tmp_path):
    from common import check_out_dir
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit, match=f"error: out_dir '{afile}' is a file, not a directory"):
        check_out_dir(str(afile))
    with pytest.raises(SystemExit, match="cannot write to out_dir .*Not a directory"):
        check_out_dir(str(afile / "run"))
    check_out_dir(str(tmp_path / "new" / "run"))
    assert os.listdir(tmp_path / "new" / "run") == []  # made, and the probe leaves nothing
    read_only = tmp_path / "ro"
    mount_tmpfs(read_only, "ro,size=1m")  # root writes anywhere else: a read-only disk refuses it
    try:
        with pytest.raises(SystemExit) as e:
            check_out_dir(str(read_only))
        assert str(e.value) == (f"error: cannot write to out_dir '{read_only}' "
                                "(Read-only file system): choose a writable out_dir")
    finally:
        subprocess.run(["umount", str(read_only)])


HOLD_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from common import lock_out_dir
lock = lock_out_dir({out!r})
print("locked", flush=True)
time.sleep(3600)
"""


def test_second_run_on_an_out_dir_is_refused_until_the_first_dies(tmp_path):
    """the first run is a real process holding the lock; this test's process is the next two"""
    from common import lock_out_dir
    out = str(tmp_path)
    hold = [sys.executable, "-c", HOLD_LOCK.format(root=ROOT, out=out)]
    first = forkserver.Popen(hold, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"  # waits until the first holds the lock
        with pytest.raises(SystemExit) as e:
            lock_out_dir(out)
        holder = f"pid {first.pid} on {os.uname().nodename}"
        assert str(e.value) == (f"error: out_dir '{out}' is in use by a running run ({holder}): "
                                "wait for it to end or choose another out_dir")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = lock_out_dir(out)  # a killed run leaves nothing stuck
    third.seek(0)
    assert third.read() == f"pid {os.getpid()} on {os.uname().nodename}"
    third.close()


NO_POSIX_LOCKS = """
import errno, fcntl, os, sys
import common

def lockf(f, how):  # what NFS without its lock daemon answers (ENOSYS: Lustre mounted without flock)
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

fcntl.lockf = lockf
common.lock_out_dir(sys.argv[1])
print(open(os.path.join(sys.argv[1], "run.lock")).read())
"""


def test_an_out_dir_on_a_filesystem_without_locks_is_a_warning(tmp_path):
    """a unit test of the message (no such filesystem here): lockf's ENOLCK was a traceback; now the
    run goes on with one warning, and run.lock still names it"""
    result = forkserver.run([sys.executable, "-c", NO_POSIX_LOCKS, str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: out_dir '{tmp_path / 'run'}' cannot be locked (No locks available: its "
        "filesystem has no POSIX locks): a second run started on it would not be refused"]
    assert re.fullmatch(r"pid \d+ on \S+\n", result.stdout), result.stdout


def test_a_run_leaves_no_lock_and_a_failed_start_no_folder(tiny_data, tiny_teacher, tmp_path):
    """run.lock goes when the run ends; an out_dir the run made and wrote nothing in (a start that
    failed) goes too, one that was there before stays"""
    done = run([*MD, f"--teacher={tiny_teacher}", "--stop_iter=1"], tiny_data, [f"--out_dir={tmp_path / 'done'}"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ckpt.pt" in os.listdir(tmp_path / "done") and "run.lock" not in os.listdir(tmp_path / "done")
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "new" / "run", tmp_path / "mine"):
        failed = run([*MD, f"--teacher={tiny_teacher}"], str(tmp_path / "no_data"), [f"--out_dir={out}"])
        assert failed.returncode == 1 and failed.stderr.startswith("error: data directory"), failed.stderr[-2000:]
    assert os.listdir(tmp_path / "new") == [] and os.listdir(tmp_path / "mine") == []


# ---- issue 16 (second pass): resume refusals, signals, sharpness log, options, broken splits ----
# Signals go to running processes; each test waits for a log line or a checkpoint file, no sleep.

VQKD = ["train_vqkd.py", "--model=nano/4", "--codebook_size=64", "--epochs=50", "--img_size=32",
        "--total_batch_size=16", "--micro_batch_size=8", "--num_workers=0", "--device=cpu",
        "--dtype=float32", "--log_interval=1"]
STOPPED = r"stopped by SIGTERM after iteration (\d+): checkpoint \S+; continue with --resume=True"


def start(cmd, tmp_path):
    """a run in its own process group (a terminal or scheduler signals the whole group), stdout
    line by line; stderr to a file -> (process, stderr path)"""
    err = tmp_path / f"stderr{len(list(tmp_path.glob('stderr*')))}.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = forkserver.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(err, "w"), text=True,
                            env=env, start_new_session=True, preexec_fn=default_sigint)
    return proc, err


def default_sigint():
    """Ctrl-C as in a terminal: a shell that runs the suite in the background (`cmd &`) starts it
    with SIGINT ignored, which Python and its children would keep"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_line(proc, prefix, err):
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"the run ended without a line '{prefix}...': {open(err).read()[-2000:]}")


def weights_at(path):
    return torch.load(path, weights_only=True)


def stopped_at(stdout_rest):
    """N of the run's last line 'stopped by SIGTERM after iteration N: checkpoint ...'"""
    last = stdout_rest.strip().splitlines()[-1]
    match = re.fullmatch(STOPPED, last)
    assert match, last
    return int(match[1])


def test_sigterm_saves_the_finished_step_and_resumes_exactly(tiny_data, tiny_teacher, tmp_path):
    """SIGTERM to the whole process group, DataLoader workers included (as a scheduler sends it),
    after the log line of iteration 2 of a long run: the run finishes its step, saves it, says so
    in one line and exits 143; resumed, it ends where an uninterrupted run ends, bit for bit."""
    args = RANDOM_MD + [f"--teacher={tiny_teacher}", "--epochs=50", "--eval_interval=100",
                        "--num_workers=2"]
    out = tmp_path / "stopped"
    proc, err = start(command(args, tiny_data, [f"--out_dir={out}"]), tmp_path)
    wait_for_line(proc, "iter 2:", err)
    os.killpg(proc.pid, signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=600) == 143
    n = stopped_at(rest)
    assert n >= 2 and weights_at(out / "ckpt.pt")["iter_num"] == n
    assert "Traceback" not in open(err).read()
    end = f"--stop_iter={n + 2}"
    straight = run(args, tiny_data, [end, f"--out_dir={tmp_path / 'straight'}"])
    resumed = run(args, tiny_data, [end, f"--out_dir={out}", "--resume=True"])
    assert straight.returncode == 0 and resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights_at(out / "ckpt.pt"), weights_at(tmp_path / "straight" / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == n + 2
    assert_same(a["model"], b["model"])
    assert_same(a["decoder"], b["decoder"])


def test_sigterm_stops_the_tokenizer_with_a_checkpoint(tiny_data, tiny_teacher, tmp_path):
    out = tmp_path / "tok"
    cmd = [sys.executable, *VQKD, f"--data_dir={tiny_data}", f"--teacher={tiny_teacher}",
           f"--out_dir={out}"]
    proc, err = start(cmd, tmp_path)
    wait_for_line(proc, "iter 2:", err)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=600) == 143
    assert weights_at(out / "tokenizer.pt")["iter_num"] == stopped_at(rest) >= 2
    assert "Traceback" not in open(err).read()


# The script run as __main__ with one library function wrapped so that the process sends itself a
# real SIGTERM when it reaches that point: the signal comes during the evaluation or the save.
SIGTERM_WHEN_CALLED = """
import os, runpy, signal, sys
import common, data
during, sys.argv = sys.argv[1], sys.argv[2:]
module = {"make_loader": data, "save_checkpoint": common}[during]
original = getattr(module, during)

def signal_then_call(*args, **kwargs):
    if during == "save_checkpoint" or args[2] is False:  # a save; a loader that is not the train one
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

setattr(module, during, signal_then_call)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script, during", [("md", "make_loader"), ("ft", "make_loader"),
                                            ("md", "save_checkpoint"), ("ft", "save_checkpoint"),
                                            ("tok", "save_checkpoint")])
def test_a_signal_during_the_evaluation_or_the_save_stops_at_that_step(script, during, tiny_data,
                                                                       tiny_teacher, tmp_path):
    """SIGTERM while the run evaluates or saves at iteration 2: the run stops there, with that step
    saved (before: it trained iteration 3, saved again and said it stopped after iteration 3)"""
    args, saved = script_args(script, tiny_teacher, 2, ["--epochs=50", f"--out_dir={tmp_path}"])
    cmd = [sys.executable, "-c", SIGTERM_WHEN_CALLED, during, *args, f"--data_dir={tiny_data}"]
    result = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 143, result.stderr[-2000:]
    assert stopped_at(result.stdout) == 2
    assert weights_at(tmp_path / saved)["iter_num"] == 2
    trained = [json.loads(line)["iter"] for line in open(tmp_path / "log.jsonl")
               if '"loss"' in line]
    assert trained == [1, 2]
    assert "Traceback" not in result.stderr


BROKEN_PIPE_IN_A_WORKER = """
import multiprocessing, sys, threading
from data import init_worker
init_worker(0)  # what a loader worker runs first
reader, writer = multiprocessing.Pipe(duplex=False)
reader.close()  # the main process is gone

def serve(error):  # as multiprocessing's resource sharer thread reports its errors
    try:
        if error is not None:
            raise error
        writer.send_bytes(b"x" * 100000)
    except Exception:
        sys.excepthook(*sys.exc_info())

for error in (None, ValueError("a real fault")):
    thread = threading.Thread(target=serve, args=(error,))
    thread.start()
    thread.join()
"""


def test_a_closed_stdout_does_not_end_the_run(tiny_data, tiny_teacher, tmp_path):
    """stdout a pipe whose reader is gone (`train_md.py | head` after head exits): the run goes on to
    its end and saves (before: a BrokenPipeError traceback at the first line, no checkpoint)"""
    out = tmp_path / "run"
    cmd = command([*MD, f"--teacher={tiny_teacher}", "--stop_iter=6"], tiny_data, [f"--out_dir={out}"])
    reader, writer = os.pipe()
    proc = forkserver.Popen(cmd, cwd=ROOT, stdout=writer, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(writer)
    os.close(reader)  # closed before the run writes its first line: every write finds no reader
    stderr = proc.stderr.read()
    assert proc.wait(timeout=600) == 0, stderr[-2000:]
    assert stderr.count("warning: stdout was closed; the run goes on, its log lines are in log.jsonl") == 1
    assert "Traceback" not in stderr
    assert weights_at(out / "ckpt.pt")["iter_num"] == 6


def test_a_worker_whose_main_process_left_prints_no_broken_pipe(tmp_path):
    """Ctrl-C on a busy machine: a worker's thread can still be handing the main process a
    batch's memory when it exits; the real broken pipe prints nothing, other faults still do"""
    result = forkserver.run([sys.executable, "-c", BROKEN_PIPE_IN_A_WORKER], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "BrokenPipeError" not in result.stderr and "ValueError: a real fault" in result.stderr


def test_ctrl_c_saves_the_finished_step(tiny_data, tiny_teacher, tmp_path):
    """SIGINT to the whole foreground group (what a terminal sends on Ctrl-C), workers included:
    the step in progress finishes and is saved, as on SIGTERM, and the run says so in one line"""
    args = FT + [f"--init={tiny_teacher}", "--epochs=50", "--eval_interval=100", "--num_workers=2"]
    out = tmp_path / "ft"
    proc, err = start(command(args, tiny_data, [f"--out_dir={out}"]), tmp_path)
    wait_for_line(proc, "iter 1:", err)
    os.killpg(proc.pid, signal.SIGINT)
    last = proc.stdout.read().strip().splitlines()[-1]
    assert proc.wait(timeout=600) == 130
    match = re.fullmatch(STOPPED.replace("SIGTERM", "Ctrl-C"), last)
    assert match, last
    assert weights_at(out / "ckpt.pt")["iter_num"] == int(match[1]) >= 1
    stderr = open(err).read()
    assert "Ctrl-C: the run saves and stops after this step (Ctrl-C again: at once)" in stderr
    assert "Traceback" not in stderr


CTRL_C_IN_EACH_PHASE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from common import Context, save_on_ctrl_c, stop_signals, stopped_by
def ctrl_c():  # a signal to this process is handled before kill returns
    try:
        os.kill(os.getpid(), signal.SIGINT)
        return "not interrupted"
    except KeyboardInterrupt:
        return "interrupted"
received = stop_signals()
print("start-up:", ctrl_c())
save_on_ctrl_c(received)  # the training loop starts
print("first:", ctrl_c(), received == [signal.SIGINT], stopped_by(received, Context("cpu", "float32")))
print("second:", ctrl_c())
"""


def test_ctrl_c_during_start_up_and_twice_stops_at_once(tmp_path):
    """a Ctrl-C before the training loop stops at once (no step, no checkpoint); in the loop the first
    only asks for a stop at the step's end, the second raises KeyboardInterrupt (the scripts' one line
    'stopped by Ctrl-C: the last checkpoint ... is kept', exit 130)"""
    result = forkserver.run([sys.executable, "-c", CTRL_C_IN_EACH_PHASE.format(root=ROOT)], capture_output=True,
                            text=True, timeout=120, preexec_fn=default_sigint)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["start-up: interrupted", "first: not interrupted True ('Ctrl-C', 130)",
                                          "second: interrupted"]
    assert result.stderr.strip() == "Ctrl-C: the run saves and stops after this step (Ctrl-C again: at once)"


def test_ctrl_c_in_analyze_is_one_line(tiny_data, tiny_teacher, tmp_path):
    """analyze.py had no handler: a KeyboardInterrupt traceback"""
    cmd = [sys.executable, "analyze.py", "--metric=landscape", "--steps=400", "--n_images=8", f"--data={tiny_data}",
           f"--out={tmp_path / 'out'}", tiny_teacher]  # 160,000 losses: long after its first line
    proc, err = start(cmd, tmp_path)
    wait_for_line(proc, "teacher:", err)
    os.killpg(proc.pid, signal.SIGINT)
    proc.stdout.read()
    assert proc.wait(timeout=600) == 130
    assert open(err).read().strip() == "stopped by Ctrl-C: the JSON and figures written before are kept"


def process_of_rank(parent, rank):
    """the pid of the torchrun worker of `rank` among the children of `parent` (from /proc)"""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_signal_to_one_rank_stops_all_after_one_step(tiny_data, tiny_teacher, tmp_path, signum, name):
    """DDP: only rank 1 gets the signal; the ranks agree (a CPU all-reduce each iteration),
    rank 0 saves that step, and no rank is left waiting in a collective. The stop line names the
    signal rank 1 had (before: a Ctrl-C to rank 1 alone was reported as SIGTERM by rank 0)."""
    args = MD + [f"--teacher={tiny_teacher}", "--epochs=50", "--eval_interval=100"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}"]
    out = tmp_path / "ddp"
    proc, err = start([*launcher, *command(args, tiny_data, [f"--out_dir={out}"])[1:]], tmp_path)
    wait_for_line(proc, "iter 2:", err)
    os.kill(process_of_rank(proc.pid, 1), signum)
    rest = proc.stdout.read()
    proc.wait(timeout=600)
    stops = [line for line in rest.splitlines() if line.startswith("stopped by ")]
    assert len(stops) == 1, rest[-2000:] + open(err).read()[-2000:]
    match = re.fullmatch(STOPPED.replace("SIGTERM", name), stops[0])
    assert match, stops[0]
    assert weights_at(out / "ckpt.pt")["iter_num"] == int(match[1])


def test_sharpness_log_after_a_resume_has_each_iteration_once(tiny_data, tiny_teacher, tmp_path):
    """A run killed after logging the sharpness of iterations beyond its checkpoint: the resumed
    run drops those entries and logs them again, so the log equals an uninterrupted run's."""
    args = FT + [f"--init={tiny_teacher}", "--hessian_every=1", "--epochs=3", "--eval_interval=100"]
    straight = run(args, tiny_data, ["--stop_iter=4", f"--out_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "run"
    first = run(args, tiny_data, ["--stop_iter=2", f"--out_dir={out}"])  # checkpoint at 2
    assert first.returncode == 0, first.stderr[-2000:]
    # resumed again with no stop_iter: its next checkpoint would be at 27
    proc, err = start(command(args, tiny_data, [f"--out_dir={out}", "--resume=True"]), tmp_path)
    wait_for_line(proc, "iter 3: sharpness", err)
    proc.kill()
    proc.wait()
    logged = [e["iter"] for e in json.load(open(out / "sharpness.json"))]
    assert weights_at(out / "ckpt.pt")["iter_num"] == 2 and logged[:3] == [1, 2, 3]  # 3 is after it
    resumed = run(args, tiny_data, ["--stop_iter=4", f"--out_dir={out}", "--resume=True"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = json.load(open(tmp_path / "straight" / "sharpness.json"))
    assert [e["iter"] for e in expected] == [1, 2, 3, 4]
    assert json.load(open(out / "sharpness.json")) == expected
    assert_same(weights(out / "ckpt.pt"), weights(tmp_path / "straight" / "ckpt.pt"))


def test_a_fine_tune_whose_result_json_failed_writes_it_on_resume(tiny_data, tiny_teacher, tmp_path):
    """The last checkpoint is saved, then result.json cannot be written (here a folder stands in its
    place; a full disk or a kill at that moment is the same): after the user clears it, --resume
    writes the result from the checkpoint. Before, it said "nothing to do" and the result was lost."""
    args = FT + [f"--init={tiny_teacher}", "--stop_iter=2"]
    straight = run(args, tiny_data, [f"--out_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "run"
    (out / "result.json").mkdir(parents=True)
    failed = run(args, tiny_data, [f"--out_dir={out}"])
    assert failed.returncode != 0 and failed.stderr.strip().startswith(f"error: could not write {out / 'result.json'}")
    assert weights_at(out / "ckpt.pt")["iter_num"] == 2
    (out / "result.json").rmdir()
    resumed = run(args, tiny_data, [f"--out_dir={out}", "--resume=True"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = json.load(open(tmp_path / "straight" / "result.json"))
    got = json.load(open(out / "result.json"))
    assert {k: got[k] for k in ("top1", "top5", "best_top1", "iter_num")} == \
           {k: expected[k] for k in ("top1", "top5", "best_top1", "iter_num")}


def child_pids(pid):
    """the running processes whose parent is pid, from /proc (a worker that has ended and waits to be
    reaped, state Z, is left out: a signal to it changes nothing)"""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:  # not a process, or it ended meanwhile
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z":
            found.append(int(entry))
    return found


def test_a_killed_loader_worker_is_one_line(tiny_data, tiny_teacher, tmp_path):
    """SIGKILL to a loader worker (what the kernel's OOM killer does): torch's DataLoader raises in
    the main process; the run ends with one line that says how to go on, not a traceback. (torch's
    SIGCHLD handler raises wherever the main thread is: landing in a finalizer, Python prints it as
    "Exception ignored in ..." before that line, and the run still ends with it.)"""
    args = MD + [f"--teacher={tiny_teacher}", "--num_workers=1", "--epochs=50"]
    proc, err = start(command(args, tiny_data, [f"--out_dir={tmp_path / 'run'}"]), tmp_path)
    wait_for_line(proc, "iter 2", err)
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # the pipe never fills
    # every worker, until the run ends: at an epoch's end the old worker may finish just before the
    # signal (a run that then trained on, with nobody reading its output, hung the suite once)
    killed, deadline = [], time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in child_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.05)
    proc.kill()  # (if it is still running at the deadline)
    proc.wait()
    stderr = open(err).read()
    assert killed and proc.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    # torch's line, or ours when the worker died while this process fetched its batch (once in CI)
    assert last.startswith("error: DataLoader worker ") and last.endswith("with --resume=True"), last


@pytest.mark.parametrize("damage", ["cut", "older", "folder"])
def test_resume_with_a_cut_sharpness_log_sets_it_aside(tiny_data, tiny_teacher, tmp_path, damage):
    """a sharpness.json cut or edited by hand (the run itself writes it atomically), written by an
    older version (no `parameters`: its Hessian was over the trained weights only, another quantity),
    or a folder of that name: the resumed run keeps it beside, says so, and logs the curve again;
    before, a JSONDecodeError, one curve of two definitions, or an IsADirectoryError traceback"""
    args = FT + [f"--init={tiny_teacher}", "--hessian_every=1", "--epochs=3", "--eval_interval=100"]
    out = tmp_path / "run"
    first = run(args, tiny_data, ["--stop_iter=2", f"--out_dir={out}"])
    assert first.returncode == 0, first.stderr[-2000:]
    text = (out / "sharpness.json").read_text()
    if damage == "cut":
        kept = text[: len(text) // 2]
    else:
        kept = json.dumps([{k: v for k, v in e.items() if k != "parameters"} for e in json.loads(text)])
    (out / "sharpness.json").write_text(kept)
    if damage == "folder":  # with a file in it
        (out / "sharpness.json").rename(out / "kept.json")
        (out / "sharpness.json").mkdir()
        (out / "kept.json").rename(out / "sharpness.json" / "kept.json")
    resumed = run(args, tiny_data, ["--stop_iter=3", f"--out_dir={out}", "--resume=True"])
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-2000:]
    assert f"warning: {out / 'sharpness.json'} cannot be continued" in resumed.stdout + resumed.stderr
    aside = out / "sharpness.json.unreadable"
    assert (aside / "kept.json" if damage == "folder" else aside).read_text() == kept
    assert [e["iter"] for e in json.load(open(out / "sharpness.json"))] == [3]


REFUSED = ("error: --resume=True with settings that change the run: {}; resume with the "
           "checkpoint's values, or start a new run in another out_dir")


def test_resume_refuses_changes_of_the_run_and_allows_the_rest(tiny_data, tiny_teacher, tmp_path):
    import shutil
    args = MD + [f"--teacher={tiny_teacher}"]
    out = tmp_path / "run"
    first = run(args, tiny_data, ["--stop_iter=1", f"--out_dir={out}"])
    assert first.returncode == 0, first.stderr[-2000:]
    saved = (out / "ckpt.pt").read_bytes()
    other_data = tmp_path / "data_copy"
    shutil.copytree(tiny_data, other_data)
    mask_ratio = 75 / 196
    refused = [  # (changes, the differences named on the line)
        (["--lr=1e-3", "--seed=1"], "lr 0.0015 -> 0.001, seed 0 -> 1"),
        (["--model=tiny/4"], "model 'nano/4' -> 'tiny/4'"),
        (["--total_batch_size=8"], "total_batch_size 16 -> 8"),
        (["--mask_ratio=0.5", "--epochs=4"], f"epochs 3 -> 4, mask_ratio {mask_ratio!r} -> 0.5"),
    ]
    for changes, named in refused:
        result = run(args, tiny_data, ["--stop_iter=2", f"--out_dir={out}", "--resume=True",
                                       *changes])
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and lines == [REFUSED.format(named)], result.stderr[-2000:]
        assert (out / "ckpt.pt").read_bytes() == saved
    # where (the data moved too), how often and how fast: allowed, and the result is the
    # uninterrupted run's
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    allowed = run(args, other_data, ["--stop_iter=2", f"--out_dir={moved}", "--resume=True",
                                    "--eval_interval=3", "--log_interval=2", "--num_workers=1",
                                    "--device=cpu", "--wandb_run_name=resumed"])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    straight = run(args, tiny_data, ["--stop_iter=2", f"--out_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert_same(weights(moved / "ckpt.pt"), weights(tmp_path / "straight" / "ckpt.pt"))


@pytest.mark.parametrize("script, change, named", [
    ("md", "6 images added", "144 images -> 150 (the schedule would change)"),
    ("ft", "a class folder renamed",
     "class folders changed (added zzz; removed circle: the labels would change)"),
    ("ft", "a class folder added", "144 images -> 168 (the schedule would change); class folders "
                                   "changed (added zzz: the labels would change)"),
    ("tok", "6 images removed", "144 images -> 138 (the schedule would change)")])
def test_resume_refuses_a_train_split_that_changed(script, change, named, tiny_data, tiny_teacher,
                                                   tmp_path):
    """images added or removed, class folders added or renamed between a stop and --resume=True:
    one line, the checkpoint kept (before: the schedule was stretched to the new count in silence, a
    renamed class relabelled the images in silence, an added one gave a size-mismatch traceback)"""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    args, saved_as = script_args(script, tiny_teacher, 100, [f"--out_dir={tmp_path / 'run'}"])
    first = run(args, data, ["--stop_iter=1"])
    assert first.returncode == 0, first.stderr[-2000:]
    saved = (tmp_path / "run" / saved_as).read_bytes()
    train = data / "train"
    circles = sorted((train / "circle").iterdir())
    if change == "6 images added":
        for i, image in enumerate(circles[:6]):
            shutil.copy(image, train / "circle" / f"copy{i}{image.suffix}")
    elif change == "6 images removed":
        for image in circles[:6]:
            image.unlink()
    elif change == "a class folder renamed":
        (train / "circle").rename(train / "zzz")
        # the fine-tune's val classes are the train ones
        (data / "val" / "circle").rename(data / "val" / "zzz")
    else:
        shutil.copytree(train / "circle", train / "zzz")
        shutil.copytree(data / "val" / "circle", data / "val" / "zzz")
    result = run(args, data, ["--stop_iter=2", "--resume=True"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert lines == [f"error: --resume=True but the train split {train} is not the one the run "
                     f"started with: {named}; restore it, or start a new run in another out_dir"]
    assert (tmp_path / "run" / saved_as).read_bytes() == saved


def test_a_path_option_with_a_tilde_is_under_home_and_stop_iter_says_it_stopped(
        tiny_data, tiny_teacher, tmp_path):
    """--out_dir=~/run: the shell does not expand ~ after --key=, the script does (before: a folder
    named '~' in the working directory); a run that --stop_iter ends early does not say 'done'"""
    cmd = command([os.path.join(ROOT, "train_md.py"), *MD[1:], f"--teacher={tiny_teacher}",
                   "--stop_iter=1", "--epochs=1"], tiny_data, ["--out_dir=~/run"])
    result = forkserver.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env=dict(os.environ, HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.listdir(tmp_path) == ["home"]  # no '~' folder
    assert weights_at(tmp_path / "home" / "run" / "ckpt.pt")["iter_num"] == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last == (f"stopped at iteration 1 of 9 (--stop_iter), checkpoint "
                    f"{tmp_path / 'home' / 'run' / 'ckpt.pt'}")


def test_an_error_of_rank_0_alone_is_one_line_on_every_rank(tiny_data, tiny_teacher, tmp_path):
    """under torchrun, rank 0 stops on an error only it meets (log.jsonl is a folder: only rank 0
    writes the log); the other rank's next collective finds its peer gone: one line, not gloo's
    traceback (before: '[rank1]: Traceback ... Connection closed by peer')"""
    (tmp_path / "log.jsonl").mkdir()
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}")
    result = run([*MD, f"--teacher={tiny_teacher}", "--micro_batch_size=4"], tiny_data,
                 [f"--out_dir={tmp_path}"], launcher)
    assert result.returncode != 0
    assert f"error: could not read {tmp_path / 'log.jsonl'} (Is a directory)" in result.stderr, result.stderr[-3000:]
    assert ("error: another process of this torchrun job stopped (its error is above); this one stops too"
            in result.stderr), result.stderr[-3000:]
    assert "[rank1]: Traceback" not in result.stderr and "Connection closed by peer" not in result.stderr


@pytest.mark.parametrize("backend, says", [("foo", "--backend=foo must be gloo or nccl (empty: nccl on GPUs, "
                                                    "gloo on CPU)"),
                                           ("nccl", "--backend=nccl needs GPUs; this run is on the CPU: use "
                                                    "--backend=gloo (or leave it empty)")])
def test_a_backend_that_cannot_work_is_one_line_before_any_work(backend, says, tiny_data, tiny_teacher, tmp_path):
    """a single-process run took any --backend without a word; the typo showed up under torchrun as a
    traceback on every rank"""
    result = run([*MD, f"--teacher={tiny_teacher}", f"--backend={backend}"], tiny_data,
                 [f"--out_dir={tmp_path / 'out'}"])
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"error: {says}"], result.stderr
    assert not (tmp_path / "out").exists()


def test_resume_from_a_checkpoint_with_a_missing_or_misfit_entry_is_one_line(tiny_data, tiny_teacher, tmp_path):
    """ckpt.pt files edited by hand or written by another version: an entry missing, a weight of
    another shape, an optimizer with other parameter groups. Before, a KeyError or load_state_dict
    traceback; then a line that named no key ('Error(s) in loading state_dict for ViT:')."""
    args = MD + [f"--teacher={tiny_teacher}"]
    out = tmp_path / "run"
    first = run(args, tiny_data, ["--stop_iter=1", f"--out_dir={out}"])
    assert first.returncode == 0, first.stderr[-2000:]
    good = torch.load(out / "ckpt.pt", weights_only=True)
    no_decoder = {k: v for k, v in good.items() if k != "decoder"}
    wrong_shape = dict(good, model=dict(good["model"],
                                        **{"patch_embed.proj.weight": torch.zeros(5, 3, 4, 4)}))
    other_groups = dict(good, optimizer=dict(good["optimizer"], param_groups=good["optimizer"]["param_groups"][:1]))
    cases = [(no_decoder, "is not this script's training checkpoint (no decoder)"),
             (wrong_shape, "its 'model' does not fit this run (size mismatch for "
                           "patch_embed.proj.weight: copying a param with shape "
                           "torch.Size([5, 3, 4, 4]) from checkpoint, the shape in current model "
                           "is torch.Size(["),
             (other_groups, "its 'optimizer' does not fit this run ("),
             # before: a list config skipped the check of changed settings; a str iter_num, a traceback
             (dict(good, config=[1]), "its 'config' is a list, not a dict: not this script's"),
             (dict(good, iter_num="1"), "its 'iter_num' is a str, not an int: not this script's")]
    for ckpt, says in cases:
        torch.save(ckpt, out / "ckpt.pt")
        saved = (out / "ckpt.pt").read_bytes()
        result = run(args, tiny_data, ["--stop_iter=2", f"--out_dir={out}", "--resume=True"])
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
        assert lines[0].startswith(f"error: {out / 'ckpt.pt'}") and says in lines[0], lines[0]
        assert (out / "ckpt.pt").read_bytes() == saved


def test_fine_tuning_resume_refuses_a_changed_recipe(tiny_data, tiny_teacher, tmp_path):
    args = FT + [f"--init={tiny_teacher}"]
    first = run(args, tiny_data, ["--stop_iter=1", f"--out_dir={tmp_path}"])
    assert first.returncode == 0, first.stderr[-2000:]
    result = run(args, tiny_data, ["--stop_iter=2", f"--out_dir={tmp_path}", "--resume=True",
                                   "--mixup=0.5", "--drop_path=0.1", "--hessian_every=5"])
    lines = result.stderr.strip().splitlines()
    named = "drop_path 0.0 -> 0.1, mixup 0.0 -> 0.5"  # hessian_every may change
    assert result.returncode != 0 and lines == [REFUSED.format(named)], result.stderr[-2000:]


BAD_CONFIG = "lr = 1e-3\nwarmup = 1 / 0\n"
NOT_TILED = "error: --img_size=30 is not a multiple of the patch size 4 of nano/4"
OPTION_CASES = [  # (script, options, the one line)
    ("md", ["--micro_batch_size=0"], "error: --micro_batch_size=0 must be >= 1"),
    ("md", ["--eval_interval=0"], "error: --eval_interval=0 must be >= 1"),
    ("md", ["--log_interval=0"], "error: --log_interval=0 must be >= 1"),
    ("md", ["--lr=-0.001"], "error: --lr=-0.001 must be >= 0"),
    ("md", ["--beta1=1.0"], "error: --beta1=1.0 must be in [0, 1)"),
    ("md", ["--beta2=-0.5"], "error: --beta2=-0.5 must be in [0, 1)"),
    ("md", ["--seed=-1"], "error: --seed=-1 must be in [0, 2**64)"),
    # before: torch.manual_seed's overflow traceback
    ("ft", ["--seed=99999999999999999999"], "error: --seed=99999999999999999999 must be in [0, 2**64)"),
    ("md", ["--num_workers=-2"], "error: --num_workers=-2 must be >= 0"),
    ("md", ["--drop_path=1.0"], "error: --drop_path=1.0 must be in [0, 1)"),
    ("md", ["--min_crop_scale=0.0"], "error: --min_crop_scale=0.0 must be in (0, 1]"),
    ("md", ["--device=gpu"], "error: --device=gpu is not a device: use auto, cpu, cuda or cuda:N"),
    ("md", ["--epochs=0"], "error: --epochs=0 must be >= 1"),
    ("md", ["--teacher_path={a_file}"],  # before: the teacher file read, the second file ignored
     "error: '{teacher}' is a file itself; a local copy ('{a_file}') is given for clip, dino, deit, "
     "embedded only: leave it out"),
    ("ft", ["--init_path={a_file}"],
     "error: '{teacher}' is a file itself; a local copy ('{a_file}') is given for clip, dino, deit, "
     "embedded only: leave it out"),
    ("md", ["--tokenizer={teacher}"],  # before: trained on the teacher's features, without a word
     "error: --tokenizer is read only with --target=vqkd (the codes as targets): add --target=vqkd, or"),
    ("md", ["--total_batch_size=-16"], "error: --total_batch_size=-16 must be >= 1"),
    ("md", ["--img_size=30"], NOT_TILED),
    ("md", ["--mask_ratio=0.005"],  # before: a loss of 0 and no gradient at every step
     "error: mask ratio 0.005 masks 0 of the 64 patches: the loss needs masked patches"),
    ("md", ["{config}"], "error: config file '{config}' line 2: ZeroDivisionError: division"),
    ("ft", ["--crop_pct=0.0"], "error: --crop_pct=0.0 must be in (0, 1]"),
    ("ft", ["--layer_decay=1.5"], "error: --layer_decay=1.5 must be in (0, 1] (1 = off)"),  # before: flat lr, silently
    ("ft", ["--init=scratch", "--model=nano/4", "--img_size=30"], NOT_TILED),
    ("ft", ["--min_crop_scale=1.5"], "error: --min_crop_scale=1.5 must be in (0, 1]"),
    ("ft", ["--lr=1e38"], "error: --lr=1e+38 must be <= 3.4e+37 (float32's max x (1 - beta1))"),  # Adam overflows
    ("vqkd", ["--save_interval=0"], "error: --save_interval=0 must be >= 1"),
    # before: a run without a decoder
    ("vqkd", ["--decoder_depth=-1"], "error: --decoder_depth=-1 must be >= 0"),
    ("vqkd", ["--collapse_threshold=-2"], "error: --collapse_threshold=-2.0 must be in [0, 1]"),
    ("vqkd", ["--model=Ti/16", "--img_size=128"],  # 64 patches as the teacher's; before: a shape traceback
     "error: the teacher '{teacher}' takes 32 px / patch 4, the tokenizer 128 px / patch 16: the patch grids"),
    ("vqkd", ["--weight_decay=1e300"], "error: --weight_decay=1e+300 must be <= 3.4e+38 / max(lr, min_lr)"),
    ("analyze", ["--out={a_file}", "{teacher}"],
     "error: --out={a_file} cannot be a directory (File exists)"),
    ("analyze", ["--device=gpu", "{teacher}"],
     "error: --device=gpu is not a device: use auto, cpu, cuda or cuda:N"),
    ("analyze", ["--batch_size=0", "{teacher}"], "error: --batch_size=0 must be >= 1"),
    ("analyze", ["--queries=a,b", "{teacher}"], "error: --queries=a,b: give comma-separated patch indices"),
    ("analyze", ["--metric=attn_map", "--queries=5000", "{teacher}"],
     "error: --queries=5000: teacher has patch indices 0.."),
    ("md", ["--teacher={nan_model}"],  # before: "loss is nan" after log_interval iterations
     "error: '{nan_model}' has non-finite (NaN/inf) weights, first in blocks.0.mlp.fc1.weight"),
    ("ft", ["--init={nan_model}"], "error: '{nan_model}' has non-finite (NaN/inf) weights, first in blocks.0.mlp.fc1"),
    ("ft", ["--hessian_samples=1"], "error: --hessian_samples=1 must be >= 2 (a standard error needs two)"),
    ("ft", ["--init=scrach"],  # before: the list left out scratch
     "error: unknown --init 'scrach': choose clip, dino, deit, embedded, scratch or a checkpoint path"),
    ("ft", ["--img_size=0"], "error: --img_size=0 must be >= 1"),  # before: a PIL or interpolate traceback
    ("md", ["--dtype=fp16"], "error: dtype 'fp16' must be bfloat16, float16 or float32"),
    ("vqkd", ["--dtype=half"], "error: dtype 'half' must be bfloat16, float16 or float32"),
    ("vqkd", ["--teacher={nan_model}"],
     "error: '{nan_model}' has non-finite (NaN/inf) weights, first in blocks.0.mlp.fc1.weight"),
    ("analyze", ["{nan_model}"],
     "error: '{nan_model}' has non-finite (NaN/inf) weights, first in blocks.0.mlp.fc1.weight"),
]


@pytest.mark.parametrize("script, options, message", OPTION_CASES)
def test_bad_option_is_one_line_before_any_work(tiny_data, tiny_teacher, tmp_path, script, options,
                                                message):
    names = dict(config=tmp_path / "bad_config.py", a_file=tmp_path / "a_file",
                 nan_model=tmp_path / "nan.pt", teacher=tiny_teacher)
    names["config"].write_text(BAD_CONFIG)
    names["a_file"].write_text("not a directory")
    obj = torch.load(tiny_teacher, weights_only=True)
    obj["model"]["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save(obj, names["nan_model"])
    options = [o.format(**names) for o in options]
    out = tmp_path / "out"
    if script == "analyze":  # a later --out wins
        cmd = [sys.executable, "analyze.py", "--metric=attn_distance", f"--data={tiny_data}",
               "--n_images=4", f"--out={out}", *options]
    else:
        base = {"md": MD + [f"--teacher={tiny_teacher}"], "ft": FT + [f"--init={tiny_teacher}"],
                "vqkd": VQKD + [f"--teacher={tiny_teacher}"]}[script]
        cmd = command(base, tiny_data, [f"--out_dir={out}", *options])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(message.format(**names)), lines[0]
    assert not (out / "ckpt.pt").exists() and not (out / "tokenizer.pt").exists()


def write_garbage_split(root, classes, per_class=8):
    """files with image names whose bytes are no image"""
    for c in classes:
        os.makedirs(root / c)
        for i in range(per_class):
            (root / c / f"{c}{i}.jpg").write_bytes(b"not a JPEG at all " * i)


def test_unreadable_train_or_val_split_is_one_clear_error(tiny_data, tiny_teacher, tmp_path):
    import shutil
    classes = sorted(os.listdir(os.path.join(tiny_data, "train")))
    bad_train = tmp_path / "bad_train"
    write_garbage_split(bad_train / "train", classes)
    shutil.copytree(os.path.join(tiny_data, "val"), bad_train / "val")
    bad_val = tmp_path / "bad_val"
    shutil.copytree(os.path.join(tiny_data, "train"), bad_val / "train")
    write_garbage_split(bad_val / "val", classes)
    md, ft = MD + [f"--teacher={tiny_teacher}"], FT + [f"--init={tiny_teacher}"]
    no_train = "error: iteration 0: none of the 16 images of the step could be read"
    no_val = f"error: iteration 1: no val image under {bad_val / 'val'} could be read"
    cases = [(md, bad_train, no_train), (ft, bad_train, no_train), (md, bad_val, no_val),
             (ft, bad_val, no_val)]  # (script, data, the last line)
    for i, (args, data, message) in enumerate(cases):
        result = run(args, str(data), [f"--out_dir={tmp_path / str(i)}", "--stop_iter=1"])
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and last.startswith(message), result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        # an unreadable val split is found at the first evaluation, after training: that step is saved
        assert (tmp_path / str(i) / "ckpt.pt").exists() == (data == bad_val)
        if data == bad_val:  # --stop_iter=1: the evaluation of the run's last step
            ending = "then continue with --resume=True" if args is ft else "the run's final weights are saved"
            assert f"{ending} (checkpoint {tmp_path / str(i) / 'ckpt.pt'})" in last, last
    # the val split mended, each run continues: the MD run to iteration 2, the fine-tune (which
    # ended at iteration 1 unevaluated) evaluates its final weights and writes result.json
    shutil.rmtree(bad_val / "val")
    shutil.copytree(os.path.join(tiny_data, "val"), bad_val / "val")
    for i, stop in ((2, 2), (3, 1)):
        result = run(cases[i][0], str(bad_val), [f"--out_dir={tmp_path / str(i)}", f"--stop_iter={stop}",
                                                 "--resume=True"])
        assert result.returncode == 0, result.stderr[-2000:]
        assert torch.load(tmp_path / str(i) / "ckpt.pt", weights_only=True)["iter_num"] == stop
    result = json.loads((tmp_path / "3" / "result.json").read_text())
    assert result["iter_num"] == 1 and 0 <= result["top1"] <= 100 and result["best_top1"] == result["top1"]
    saved = torch.load(tmp_path / "3" / "ckpt.pt", weights_only=True)  # the evaluation it lacked
    assert (saved["top1"], saved["best_top1"]) == (result["top1"], result["top1"])


def train_records(path):
    """the log-line records of a run's log.jsonl (those with a train loss)"""
    return [record for record in map(json.loads, open(path)) if "loss" in record]


def last_val_loss(path):
    return [json.loads(line) for line in open(path) if "val_loss" in line][-1]["val_loss"]


def log_iterations(path):
    """the iterations of the training records in a run's log.jsonl (evaluation records skipped)"""
    if not os.path.exists(path):
        return []
    lines = open(path).read().splitlines()
    return [json.loads(line)["iter"] for line in lines if line.endswith("}") and '"loss"' in line]


@pytest.mark.parametrize("script", ["md", "ft", "vqkd"])
def test_train_split_unreadable_mid_run_keeps_the_finished_steps(tiny_data, tiny_teacher, tmp_path, script):
    """The train split becomes unreadable while the run trains (every file overwritten with bytes that
    are no image): the run stops with one line at the first step without a readable image, and the
    steps finished before it are saved (before: lost back to the last checkpoint, here none at all,
    evaluations and saves being 1000 steps apart). The files mended, --resume=True continues."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    long = ["--epochs=50", "--stop_iter=400"]
    args, saved = script_args(script, tiny_teacher, 1000, long)
    out = tmp_path / "out"
    with open(tmp_path / "stderr", "w") as err:
        proc = forkserver.Popen(command(args, data, [f"--out_dir={out}"]), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.time() + 300
        while not [i for i in log_iterations(out / "log.jsonl") if i >= 2]:
            assert proc.poll() is None and time.time() < deadline, open(tmp_path / "stderr").read()[-2000:]
            time.sleep(0.05)
        for path in sorted((data / "train").rglob("*.png")):
            path.write_bytes(b"no image any more")
        assert proc.wait(timeout=300) == 1
    last = open(tmp_path / "stderr").read().strip().splitlines()[-1]
    match = re.fullmatch(r"error: iteration (\d+): none of the 16 images of the step could be read \(see the "
                         r"warnings\): fix the train split under (.*); then continue with --resume=True "
                         r"\(checkpoint (.*)\)", last)
    assert match, last
    stopped = int(match.group(1))
    assert stopped >= 2 and match.group(3) == str(out / saved)
    assert torch.load(out / saved, weights_only=True)["iter_num"] == stopped
    shutil.rmtree(data / "train")
    shutil.copytree(os.path.join(tiny_data, "train"), data / "train")
    resumed = run(args, data, [f"--out_dir={out}", f"--stop_iter={stopped + 1}", "--resume=True"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(out / saved, weights_only=True)["iter_num"] == stopped + 1


def test_a_new_run_in_another_scripts_run_folder_is_refused_and_its_log_kept(
        tiny_data, tiny_teacher, tmp_path):
    """train_vqkd.py started in the out_dir of a train_md.py run: before, refuse_overwrite looked
    for its own
    checkpoint name (tokenizer.pt) only, and the new run emptied the MD run's log.jsonl"""
    out = tmp_path / "md"
    first = run(MD + [f"--teacher={tiny_teacher}"], tiny_data,
                ["--stop_iter=1", f"--out_dir={out}"])
    assert first.returncode == 0, first.stderr[-2000:]
    log = (out / "log.jsonl").read_bytes()
    assert log
    refused = run(TOKENIZER + [f"--teacher={tiny_teacher}"], tiny_data,
                  ["--stop_iter=1", f"--out_dir={out}"])
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [
        f"error: {out / 'ckpt.pt'} exists (another script's run) and a new run in its folder "
        "would replace its "
        "log.jsonl: choose another out_dir"]
    assert (out / "log.jsonl").read_bytes() == log and not (out / "tokenizer.pt").exists()


def test_a_new_run_where_another_script_saved_its_ckpt_pt_is_not_told_to_resume_it(
        tiny_data, tiny_teacher, tmp_path):
    """finetune.py and train_md.py both save ckpt.pt: a fine-tune started in an MD run's out_dir
    (and an MD run in a fine-tune's) was told to continue "that run" with --resume=True, which
    then refused the file as not its own. The MD checkpoint has no best_top1, the fine-tune's no
    decoder (their RESUME_ENTRIES): the first line says so, and both files stay as they were."""
    md_out, ft_out = tmp_path / "md", tmp_path / "ft"
    md = run(MD + [f"--teacher={tiny_teacher}"], tiny_data, ["--stop_iter=1", f"--out_dir={md_out}"])
    assert md.returncode == 0, md.stderr[-2000:]
    ft = run(FT + [f"--init={tiny_teacher}"], tiny_data, ["--stop_iter=1", f"--out_dir={ft_out}"])
    assert ft.returncode == 0, ft.stderr[-2000:]
    saved = {out: (out / "ckpt.pt").read_bytes() for out in (md_out, ft_out)}
    for script, out, missing in ((FT + [f"--init={tiny_teacher}"], md_out, "best_top1"),
                                 (MD + [f"--teacher={tiny_teacher}"], ft_out,
                                  "decoder, whitening, best_val_loss")):
        refused = run(script, tiny_data, ["--stop_iter=1", f"--out_dir={out}"])
        assert refused.returncode != 0
        assert refused.stderr.strip().splitlines() == [
            f"error: {out / 'ckpt.pt'} exists and is not this script's training checkpoint (no "
            f"{missing}): a new run would replace it: choose another out_dir"]
        assert (out / "ckpt.pt").read_bytes() == saved[out]


def sigint_state(pid):
    """-> (whether the process has a handler for SIGINT, its state letter), from /proc/PID/status"""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    caught = int(fields["SigCgt"], 16) >> (signal.SIGINT - 1) & 1
    return bool(caught), fields["State"].split()[0]


@pytest.mark.parametrize("script", ["train_md.py", "finetune.py", "train_vqkd.py", "analyze.py"])
def test_ctrl_c_while_torch_loads_ends_without_a_traceback(script):
    """Ctrl-C in the first seconds, while the script imports torch (nothing to save yet): the process
    ends at once, without the KeyboardInterrupt traceback that it printed before. The signal is sent
    when Python's own SIGINT handler, installed as the interpreter starts, has been taken off again
    (the script's first lines), read from /proc: no guess at the time the imports take"""
    proc = forkserver.Popen([sys.executable, script, "--no_such_option=1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    handled_once = sent = False
    while proc.poll() is None and not sent:
        try:
            caught, state = sigint_state(proc.pid)
        except OSError:  # it ended meanwhile
            break
        if state == "Z":
            break
        handled_once |= caught
        if handled_once and not caught:
            os.kill(proc.pid, signal.SIGINT)
            sent = True
        time.sleep(0.001)
    _, err = proc.communicate(timeout=300)
    assert sent, f"SIGINT stayed handled through the whole start-up: {err[-1000:]}"
    assert proc.returncode == -signal.SIGINT and "Traceback" not in err, err[-2000:]
    assert "unknown option" not in err  # ended before its options were read (Python also takes its
    # handler off as it exits: a signal then would end a script that has printed its error)


def broken_connection(how):
    """a real multiprocessing Connection whose TCP peer resets it ("reset") or closes it ("closed"),
    and the error its recv_bytes raises"""
    import multiprocessing.connection
    import socket
    import struct
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    if how == "reset":  # linger 0: close sends RST
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    connection = multiprocessing.connection.Connection(client.detach())
    try:
        connection.recv_bytes()
    except (ConnectionError, EOFError) as e:
        return e
    finally:
        connection.close()
    raise AssertionError("recv_bytes on a closed connection returned")


@pytest.mark.parametrize("how, kind", [("reset", ConnectionResetError), ("closed", EOFError)])
def test_a_worker_lost_mid_handover_is_the_workers_line(how, kind):
    """CI once ended a run with a ConnectionResetError traceback: the killed worker reset the connection
    over which this process fetched its batch (multiprocessing's resource sharer) before torch saw it dead.
    Tested on the error a real multiprocessing Connection raises; a reset outside multiprocessing's
    connection code (a dataset's own network error) is no lost worker, nor a torchrun peer"""
    from common import lost_worker_line
    error = broken_connection(how)
    assert type(error) is kind
    line = lost_worker_line(error)
    assert line.startswith(f"error: DataLoader worker lost while handing over a batch ({kind.__name__}")
    assert line.endswith("continue from the last checkpoint with --resume=True")
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError as e:
        assert lost_worker_line(e) is None
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert lost_worker_line(gloo).startswith("error: another process of this torchrun job stopped")
