"""Reliability: killed runs resume to the same weights, checkpoints survive crashes, NaN stops
cleanly, no file runs code when loaded, a full disk and a busy out_dir are one line."""
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from typing import Dict, List, Tuple

import pytest
import torch
from PIL import Image

from data import EvalTransform, load_image
from tests.test_train_md import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

COMMON = ["--img_size=32", "--total_batch_size=16", "--micro_batch_size=8", "--num_workers=0", "--device=cpu",
          "--dtype=float32", "--compile=False", "--log_interval=1", "--eval_interval=1"]
MD = ["train_md.py", "--model=nano/4", "--epochs=3", "--warmup_epochs=1", "--teacher_bf16=False", "--eval_images=16", *COMMON]
FT = ["finetune.py", "--epochs=1", "--warmup_epochs=0", *COMMON]


def command(script_args, data, extra):
    return [sys.executable, *script_args, f"--data_dir={data}", *extra]


def run(script_args, data, extra, launcher=()):
    cmd = command(script_args, data, extra)
    if launcher:
        cmd = [*launcher, *cmd[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("script", ["md", "ft"])
def test_kill_minus_9_then_resume_is_bit_identical(tiny_data, tiny_teacher, tmp_path, script):
    args = MD + [f"--teacher={tiny_teacher}"] if script == "md" else FT + [f"--init={tiny_teacher}"]
    stop = "--stop_iter=8"
    straight = run(args, tiny_data, [stop, f"--out_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(args, tiny_data, [stop, f"--out_dir={out}"]), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(script).uniform(0.0, 1.0))  # a point somewhere in the run, after a first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(args, tiny_data, [stop, f"--out_dir={out}", "--resume=True"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(weights(out / "ckpt.pt"), weights(tmp_path / "straight" / "ckpt.pt"))


def test_ddp_resume_matches_uninterrupted_ddp(tiny_data, tiny_teacher, tmp_path):
    args = MD + [f"--teacher={tiny_teacher}", "--eval_interval=100"]
    launcher = lambda: (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}")
    a = run(args, tiny_data, ["--stop_iter=4", f"--out_dir={tmp_path / 'a'}"], launcher())
    assert a.returncode == 0, a.stderr[-2000:]
    b1 = run(args, tiny_data, ["--stop_iter=2", f"--out_dir={tmp_path / 'b'}"], launcher())
    b2 = run(args, tiny_data, ["--stop_iter=4", f"--out_dir={tmp_path / 'b'}", "--resume=True"], launcher())
    assert b1.returncode == 0 and b2.returncode == 0, b2.stderr[-2000:]
    assert_same(weights(tmp_path / "a" / "ckpt.pt"), weights(tmp_path / "b" / "ckpt.pt"))


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
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE.format(root=ROOT, path=path)], stdout=subprocess.PIPE, text=True)
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
    with pytest.raises(SystemExit, match="could not write .*No space left on device.*the previous checkpoint is kept"):
        save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.zeros(3)) and not os.path.exists(path + ".tmp")


def test_non_finite_weights_are_never_saved(tmp_path):
    from common import save_checkpoint
    with pytest.raises(SystemExit, match="weight 'w' is not finite"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}}, str(tmp_path / "c.pt"))
    assert not os.path.exists(tmp_path / "c.pt")


def test_nan_loss_stops_with_one_line_and_keeps_the_good_checkpoint(tiny_data, tiny_teacher, tmp_path):
    out = tmp_path / "run"
    good = run(MD + [f"--teacher={tiny_teacher}"], tiny_data, ["--stop_iter=2", f"--out_dir={out}"])
    assert good.returncode == 0, good.stderr[-2000:]
    before = weights(out / "ckpt.pt")
    obj = torch.load(tiny_teacher, weights_only=True)
    obj["model"]["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")  # a teacher that yields NaN targets
    bad_teacher = tmp_path / "nan_teacher.pt"
    torch.save(obj, bad_teacher)
    bad = run(MD + [f"--teacher={bad_teacher}"], tiny_data, ["--stop_iter=4", f"--out_dir={out}", "--resume=True"])
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: iteration 2: loss is nan; stopping, the last good checkpoint is in")
    assert_same(weights(out / "ckpt.pt"), before)
    # fine-tuning with an infinite learning rate: NaN weights after one step are refused, not saved
    ft = tmp_path / "ft"
    first = run(FT + [f"--init={tiny_teacher}"], tiny_data, ["--stop_iter=1", f"--out_dir={ft}"])
    assert first.returncode == 0, first.stderr[-2000:]
    ft_before = weights(ft / "ckpt.pt")
    blown = run(FT + [f"--init={tiny_teacher}"], tiny_data, ["--stop_iter=4", f"--out_dir={ft}", "--resume=True", "--lr=1e309"])
    assert blown.returncode != 0 and "Traceback" not in blown.stderr
    last = blown.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and ("not finite" in last or "is nan" in last), last
    assert_same(weights(ft / "ckpt.pt"), ft_before)


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
    from common import Context, resume_from
    from teacher import CheckpointError, load_model, load_teacher, read_checkpoint
    path, marker = evil_archive(tmp_path)
    torch.jit.load(path)
    assert marker.exists()  # the archive really runs code under torch.jit.load
    marker.unlink()
    resume = lambda p: resume_from(Context("cpu", "float32"), p, optimizer=None)  # a resume file
    for load in (read_checkpoint, load_model, load_teacher, resume):
        with pytest.raises(CheckpointError, match="restores its state with its own code") as e:
            load(path)
        assert "\n" not in str(e.value)
    ft = run(FT + [f"--init={path}"], tiny_data, [f"--out_dir={tmp_path / 'ft'}"])
    md = run(MD + [f"--teacher={path}"], tiny_data, [f"--out_dir={tmp_path / 'md'}"])
    analyze = [sys.executable, "analyze.py", "--metric=attn_distance", path, f"--data={tiny_data}",
               f"--out={tmp_path / 'an'}"]
    an = subprocess.run(analyze, capture_output=True, text=True, cwd=ROOT, timeout=600)
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
        assert "\n" not in message
        assert os.listdir(disk) == ["ckpt.pt"]  # no ckpt.pt.tmp left behind
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["iter_num"] == 7 and torch.equal(ckpt["model"]["w"], torch.arange(5.0))
    finally:
        subprocess.run(["umount", str(disk)])


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
    first = subprocess.Popen(hold, stdout=subprocess.PIPE, text=True)
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
