"""Reliability: killed runs resume to the same weights, checkpoints survive crashes, NaN stops cleanly."""
import os
import random
import signal
import subprocess
import sys
import time

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
