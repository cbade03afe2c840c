"""The run's record: out_dir/log.jsonl written as it happens and continued by a resume without
duplicates, analyze.py --metric curves on it, and the same numbers in an offline W&B run."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

import analyze
from common import Meter, append_jsonl, cosine_lr, trim_log, warmup_warning

from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("ms_per_iter", "img_per_s", "mfu")  # measured, so they differ between two runs
COMMON = ["--img_size=32", "--micro_batch_size=8", "--num_workers=0", "--device=cpu",
          "--dtype=float32", "--compile=False", "--log_interval=1"]
MD = ["train_md.py", "--model=nano/4", "--epochs=4", "--warmup_epochs=1", "--total_batch_size=32",
      "--teacher_bf16=False", "--eval_images=16", "--eval_interval=3", *COMMON]
FT = ["finetune.py", "--epochs=1", "--warmup_epochs=0", "--total_batch_size=16",
      "--eval_interval=2", "--stop_iter=2", *COMMON]
VQKD = ["train_vqkd.py", "--model=nano/4", "--epochs=1", "--total_batch_size=16",
        "--codebook_size=64", "--stop_iter=3", *COMMON]


def run(args, data, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, *args, f"--data_dir={data}"]
    return forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def without_timing(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def shadow(tmp_path, module):
    """a folder that, first on PYTHONPATH, makes `import module` fail as if it were not installed"""
    folder = tmp_path / f"no_{module}"
    folder.mkdir()
    message = f"No module named '{module}'"
    (folder / f"{module}.py").write_text(f"raise ModuleNotFoundError({message!r})\n")
    return dict(PYTHONPATH=str(folder))


# ---- the writer: leaf helpers on real files ---------------------------------------------------

def test_trim_log_keeps_records_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    path = str(tmp_path / "log.jsonl")
    written = [dict(iter=i, loss=1.0 / i) for i in range(1, 6)] + [dict(iter=3, val_loss=0.5)]
    for r in written:
        append_jsonl(path, r)
    with open(path, "a") as f:
        f.write(json.dumps(dict(iter=6, loss=0.1))[:9])  # a killed run's last, cut-off line
    trim_log(path, 3)
    assert records(path) == [r for r in written if r["iter"] <= 3]
    append_jsonl(path, dict(iter=4, loss=0.2))  # the resumed run appends after them
    assert [r["iter"] for r in records(path)] == [1, 2, 3, 3, 4]
    trim_log(path, 0)  # a new run in the same out_dir starts the file afresh
    assert records(path) == []


def test_meter_numbers_are_the_numbers_of_its_text():
    meter = Meter(flops_per_image=2e9, peak=1e12)
    text, numbers = meter.read(4, 64)
    assert numbers["mfu"] == pytest.approx(100 * numbers["img_per_s"] * 2e9 / 1e12)
    expected = (f"{numbers['ms_per_iter']:.0f} ms/iter, {numbers['img_per_s']:.1f} img/s, "
                f"MFU {numbers['mfu']:.1f}%")
    assert text == expected
    text, numbers = Meter(2e9, None).read(4, 64)  # unknown peak: no MFU in text or numbers
    assert "mfu" not in numbers and "MFU" not in text


def test_meter_mfu_is_per_device_under_ddp():
    """8 processes, each 10 images per second on its own device of 1e12 FLOP/s at 2e9 FLOP per image:
    2% MFU (each device does 2e10 of its 1e12 FLOP/s), though read() gets the 80 images of all;
    before: 16%, the sum of the processes' work over one device's peak"""
    meter = Meter(flops_per_image=2e9, peak=1e12, processes=8)
    meter.t0 -= 1.0  # the 80 images took one second
    _, numbers = meter.read(1, 80)
    assert numbers["img_per_s"] == pytest.approx(80, rel=1e-2)
    assert numbers["mfu"] == pytest.approx(2.0, rel=1e-2)


LOG_VALUES_OF_TWO_RANKS = """
import os, sys
import torch
sys.path.insert(0, os.getcwd())
from common import Context
ctx = Context("cpu", "float32")
rank = ctx.rank
# rank 0 read no image since the last log line (its loss still NaN) and skipped 4; rank 1 read 3, skipped 1
loss = torch.tensor(float("nan") if rank == 0 else 0.5)
values = ctx.log_values(loss, 4 if rank == 0 else 1, 0 if rank == 0 else 3)
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:  # (the ranks' stdout lines interleave)
    f.write(" ".join(map(str, values)))
ctx.close()
"""


def test_log_values_sums_the_images_each_rank_read(tmp_path):
    """two real gloo processes: the images read are those of both ranks (before: the log line took
    rank 0's count times the world size, 0 img/s here while rank 1 trained), the unreadable too,
    and the loss is the mean of the ranks that have one"""
    from tests.test_train_md import free_port
    script = tmp_path / "two_ranks.py"
    script.write_text(LOG_VALUES_OF_TWO_RANKS)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(script), str(tmp_path)]
    result = forkserver.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["0.5 5 3", "0.5 5 3"]


def test_a_warmup_as_long_as_the_run_is_said():
    """epochs 1 of 4 iterations, warmup 5 epochs (20 iterations): the lr at the last step is 4/20 of lr by
    the schedule itself, and the warning says 20%; a warmup shorter than the run says nothing"""
    last_lr = cosine_lr(3, 4, 20, 1e-3, 1e-6)
    assert last_lr == pytest.approx(1e-3 * 4 / 20)
    assert warmup_warning(5, 1, 20, 4) == ("warning: --warmup_epochs=5 >= --epochs=1: the lr only rises, to "
                                           "20% of --lr at the end, with no cosine decay")
    assert warmup_warning(1, 4, 4, 16) is None


def test_meter_counts_the_iterations_since_its_last_read():
    """Resumed at iteration 6 with log_interval 4: the first interval (to 8) has 2 iterations, the next
    4. ms_per_iter and img_per_s must describe the same elapsed time in each."""
    meter = Meter(2e9, None, iter_num=6)
    for start, end in [(6, 8), (8, 12)]:
        images = 16 * (end - start)  # two micro-batches of 8 images per iteration
        _, numbers = meter.read(end, images)
        assert numbers["ms_per_iter"] * (end - start) == pytest.approx(1000 * images / numbers["img_per_s"])


# ---- the training scripts ----------------------------------------------------------------------

@pytest.mark.slow
def test_md_resume_continues_the_log_without_duplicates(tiny_data, tiny_teacher, tmp_path):
    """144 images, total batch 32: 4 iterations per epoch. Stop at 3 (a checkpoint), then resume to
    6 across the epoch boundary, after the log was given the lines a killed run writes past its last
    checkpoint (the uninterrupted run's own records 4 to 6, and a line cut short)."""
    md = [*MD, f"--teacher={tiny_teacher}"]
    straight = run([*md, "--stop_iter=6", f"--out_dir={tmp_path / 'a'}"], tiny_data)
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = records(tmp_path / "a" / "log.jsonl")
    evaluations = [(r["iter"], "val_loss" in r) for r in expected]
    assert evaluations == [(1, False), (2, False), (3, False), (3, True), (4, False), (5, False),
                           (6, False), (6, True)]

    first = run([*md, "--stop_iter=3", f"--out_dir={tmp_path / 'b'}"], tiny_data)
    assert first.returncode == 0, first.stderr[-2000:]
    log_b = tmp_path / "b" / "log.jsonl"
    assert without_timing(records(log_b)) == without_timing(expected[:4])
    past = (tmp_path / "a" / "log.jsonl").read_text().splitlines(keepends=True)[4:]
    with open(log_b, "a") as f:
        f.writelines(past)  # logged past the checkpoint at 3 ...
        f.write(past[0][:20])  # ... and killed while writing a line
    resumed = run([*md, "--stop_iter=6", "--resume=True", f"--out_dir={tmp_path / 'b'}"], tiny_data)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    # bit-identical resume: the same numbers at the same iterations, each once
    assert without_timing(records(log_b)) == without_timing(expected)
    for r in expected:
        assert r["epoch"] == r["iter"] / 4
        if "loss" in r:
            assert r["ms_per_iter"] > 0 and r["img_per_s"] > 0 and r["skipped"] == 0
            assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    printed = [line for line in straight.stdout.splitlines() if ": val loss " in line]
    logged = [f"iter {r['iter']}: val loss {r['val_loss']:.4f}" for r in expected
              if "val_loss" in r]
    assert printed == logged


@pytest.mark.slow
def test_finetune_records(tiny_data, tiny_teacher, tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps(dict(iter=99, loss=9.0)) + "\n")  # an older run's
    result = run([*FT, f"--init={tiny_teacher}", f"--out_dir={out}"], tiny_data)
    assert result.returncode == 0, result.stderr[-2000:]
    log = records(out / "log.jsonl")  # the new run starts it afresh
    assert [(r["iter"], "val_top1" in r) for r in log] == [(1, False), (2, False), (2, True)]
    final = json.load(open(out / "result.json"))
    assert (log[2]["val_top1"], log[2]["val_top5"]) == (final["top1"], final["top5"])
    lr, min_lr, max_iters = 5e-5, 1e-7, 9  # defaults; 144 images / batch 16; no warmup
    for r in log[:2]:
        progress = (r["iter"] - 1) / max_iters
        cosine = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
        assert r["lr"] == pytest.approx(cosine, rel=1e-12)  # the lr of the step that just ran
        assert r["epoch"] == r["iter"] / max_iters
        assert f"iter {r['iter']}: loss {r['loss']:.4f}, lr {r['lr']:.2e}" in result.stdout


@pytest.mark.slow
def test_vqkd_records(tiny_data, tiny_teacher, tmp_path):
    result = run([*VQKD, f"--teacher={tiny_teacher}", f"--out_dir={tmp_path}"], tiny_data)
    assert result.returncode == 0, result.stderr[-2000:]
    log = records(tmp_path / "log.jsonl")
    assert [r["iter"] for r in log] == [1, 2, 3]
    for r in log:
        # perplexity exp(H) is at most the number of codes in use
        assert 0 < r["codebook_usage"] <= 1
        assert 1 <= r["perplexity"] <= 64 * r["codebook_usage"] + 1e-6
        line = f"iter {r['iter']}: codebook usage {100 * r['codebook_usage']:.1f}% of 64 codes, " \
               f"perplexity {r['perplexity']:.1f}"
        assert line in result.stdout


@pytest.mark.slow
def test_vqkd_resume_logs_the_codebook_usage_of_the_uninterrupted_run(tiny_data, tiny_teacher, tmp_path):
    """log_interval 2: stopped at 3, mid-interval, and resumed to 4; the record at 4 counts the codes of
    iterations 3 and 4, as the uninterrupted run's does"""
    vqkd = [*VQKD, f"--teacher={tiny_teacher}", "--log_interval=2"]
    straight = run([*vqkd, "--stop_iter=4", f"--out_dir={tmp_path / 'a'}"], tiny_data)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run([*vqkd, "--stop_iter=3", f"--out_dir={tmp_path / 'b'}"], tiny_data)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run([*vqkd, "--stop_iter=4", "--resume=True", f"--out_dir={tmp_path / 'b'}"], tiny_data)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = without_timing(records(tmp_path / "a" / "log.jsonl"))
    assert [r["iter"] for r in expected] == [2, 4]
    assert without_timing(records(tmp_path / "b" / "log.jsonl")) == expected


# ---- Weights & Biases ----------------------------------------------------------------------------

def wandb_env(tmp_path):
    """offline, and everything wandb writes under tmp_path"""
    folder = str(tmp_path / "wandb")
    return dict(WANDB_MODE="offline", WANDB_DIR=folder, WANDB_CONFIG_DIR=folder,
                WANDB_CACHE_DIR=folder, WANDB_DATA_DIR=folder, WANDB_SILENT="true")


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_numbers(tiny_data, tiny_teacher, tmp_path):
    pytest.importorskip("wandb")
    reader = [sys.executable, "-m", "wandb", "leet", "inspect", "--json"]
    if forkserver.run([*reader[:-1], "--help"], capture_output=True).returncode != 0:
        pytest.skip("reading the offline run needs wandb >= 0.31 (wandb leet inspect)")
    env = wandb_env(tmp_path)
    out = tmp_path / "ft"
    result = run([*FT, f"--init={tiny_teacher}", f"--out_dir={out}", "--wandb_log=True",
                  "--wandb_run_name=tiny"], tiny_data, env)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_file,) = glob.glob(os.path.join(env["WANDB_DIR"], "wandb", "offline-run-*", "*.wandb"))
    dump = forkserver.run([*reader, run_file], capture_output=True, text=True,
                          env=dict(os.environ, **env))
    assert dump.returncode == 0, dump.stderr[-2000:]
    kinds = [json.loads(line) for line in dump.stdout.splitlines()]
    history = {r["history"]["step"]["num"]: r["history"]["item"]
               for r in kinds if r["type"] == "history"}
    run_record = next(r["run"] for r in kinds if r["type"] == "run")
    assert run_record["display_name"] == "tiny" and run_record["project"] == "mdlab"
    assert run_record["config"]["update"]["init"] == tiny_teacher  # the run's settings
    expected = {}  # the log.jsonl records merged per iteration, as W&B merges logs at one step
    for r in records(out / "log.jsonl"):
        expected.setdefault(r["iter"], {}).update({k: v for k, v in r.items() if k != "iter"})
    assert sorted(history) == sorted(expected) == [1, 2]
    for step, values in expected.items():
        for key, value in values.items():
            assert history[step][key] == pytest.approx(value, rel=1e-12), (step, key)


SCRIPTS = ["train_md.py", "finetune.py", "train_vqkd.py"]


def run_scripts_with_wandb(tmp_path, env):
    """each script run as __main__ with --wandb_log=True (in one process: torch is imported once) and
    a data dir that does not exist -> (result, [(script, its SystemExit's message)])"""
    argv = ["--wandb_log=True", "--device=cpu", f"--data_dir={tmp_path / 'no_data'}",
            f"--out_dir={tmp_path / 'out'}"]
    code = ("import runpy, sys\n"
            f"for script in {SCRIPTS!r}:\n"
            f"    sys.argv = [script, *{argv!r}]\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        print(script, e)\n")
    result = forkserver.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env=dict(env, OMP_NUM_THREADS="1"), stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # before any work
    return [tuple(line.split(" ", 1)) for line in result.stdout.splitlines()]


@pytest.mark.slow
def test_wandb_asked_for_but_missing_is_one_line_before_any_work(tmp_path):
    """wandb not importable: the wandb line comes first (before the missing data), nothing is written"""
    stopped = run_scripts_with_wandb(tmp_path, dict(os.environ, **shadow(tmp_path, "wandb")))
    line = "error: --wandb_log=True needs the wandb package: pip install wandb, or drop --wandb_log"
    assert stopped == [(script, line) for script in SCRIPTS]


@pytest.mark.slow
def test_wandb_without_an_api_key_is_one_line_before_any_work(tmp_path):
    """wandb installed, online mode, no API key anywhere (HOME and wandb's folders empty): each script
    stops with one line naming wandb's reason, before any work"""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(wandb_env(tmp_path), HOME=str(tmp_path))
    del env["WANDB_MODE"]  # online: wandb needs a key
    stopped = run_scripts_with_wandb(tmp_path, env)
    assert [script for script, _ in stopped] == SCRIPTS
    for _, line in stopped:  # wandb 0.31's reason: "No API key configured. Use `wandb login` to log in."
        start = "error: --wandb_log=True but wandb cannot start a run ("
        assert line.startswith(start) and "API key" in line
        assert line.endswith("): run `wandb login`, or set WANDB_MODE=offline, or drop --wandb_log")


@pytest.mark.slow
def test_a_refused_start_makes_no_wandb_run(tmp_path):
    """an out_dir that is a file is refused before W&B starts: no (offline) run is left behind"""
    pytest.importorskip("wandb")
    (tmp_path / "afile").write_text("x")
    env = dict(os.environ, **wandb_env(tmp_path))
    result = forkserver.run([sys.executable, "train_md.py", "--wandb_log=True", "--device=cpu",
                             f"--out_dir={tmp_path / 'afile'}"], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=600)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: out_dir '{tmp_path / 'afile'}' is a file")
    assert glob.glob(os.path.join(env["WANDB_DIR"], "**", "offline-run-*"), recursive=True) == []


# ---- analyze.py --metric curves ------------------------------------------------------------------

def write_logs(tmp_path):
    """an MD-like run (cut off while writing its last line) and a fine-tuning-like run"""
    md = [dict(iter=1, epoch=0.5, loss=0.9, lr=1e-4, grad_norm=2.0, skipped=0, ms_per_iter=10.0),
          dict(iter=2, epoch=1.0, loss=0.7, lr=2e-4, grad_norm=1.5, skipped=1, ms_per_iter=11.0),
          dict(iter=2, epoch=1.0, val_loss=0.8),
          dict(iter=3, epoch=1.5, loss=0.6, lr=1.5e-4, grad_norm=1.2, skipped=0, ms_per_iter=9.0)]
    ft = [dict(iter=10, epoch=1.0, loss=2.0, lr=5e-5),
          dict(iter=10, epoch=1.0, val_top1=40.0, val_top5=90.0),
          dict(iter=20, epoch=2.0, loss=1.5, lr=2e-5),
          dict(iter=20, epoch=2.0, val_top1=55.5, val_top5=95.0)]
    paths = []
    for name, recs in (("md_run", md), ("ft_run", ft)):
        os.makedirs(tmp_path / name)
        paths.append(str(tmp_path / name / "log.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    with open(paths[0], "a") as f:
        f.write('{"iter": 4, "epoch": 2.0, "lo')
    return paths, md, ft


def series(recs, field):
    having = [r for r in recs if field in r]
    return dict(iter=[r["iter"] for r in having], value=[r[field] for r in having])


def test_curves_json_holds_every_series_of_the_logs(tmp_path, capsys):
    paths, md, ft = write_logs(tmp_path)
    analyze.main(["--metric", "curves", *paths, f"--out={tmp_path / 'an'}"])
    printed = capsys.readouterr().out
    assert printed.count("cut short") == 1
    assert f"warning: {paths[0]}: the last line is cut short" in printed
    assert "read the 4 records before it" in printed
    result = json.load(open(tmp_path / "an" / "curves.json"))
    assert result["metric"] == "curves"
    assert list(result["models"]) == ["md_run", "ft_run"]  # the runs' folder names
    assert result["settings"]["models"] == {"md_run": paths[0], "ft_run": paths[1]}
    for label, recs in (("md_run", md), ("ft_run", ft)):
        fields = {k for r in recs for k in r} - {"iter"}
        assert set(result["models"][label]) == fields
        for field in fields:
            assert result["models"][label][field] == series(recs, field), (label, field)
    if analyze.pyplot() is not None:
        assert (tmp_path / "an" / "curves.png").stat().st_size > 0


def test_curves_bad_input_is_one_line(tmp_path):
    paths, _, _ = write_logs(tmp_path)
    with pytest.raises(SystemExit) as e:
        analyze.main(["--metric=curves", paths[1], str(tmp_path / "gone" / "log.jsonl")])
    assert str(e.value) == f"error: log '{tmp_path / 'gone' / 'log.jsonl'}' not found: give the " \
                           f"out_dir/log.jsonl of a run"
    with pytest.raises(SystemExit, match="--labels needs 2 distinct"):
        analyze.main(["--metric=curves", *paths, "--labels=a,a"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"iter": 1, "loss": 1.0}\n{"iter": 2, "lo\n{"iter": 3, "loss": 0.5}\n')
    with pytest.raises(SystemExit, match="line 2 is not JSON"):
        analyze.main(["--metric=curves", str(broken)])
    # records edited by hand (before: a TypeError, and a matplotlib ValueError for 0 columns)
    broken.write_text('{"iter": 1, "loss": 1.0}\n{"iter": "x", "loss": 0.5}\n')
    with pytest.raises(SystemExit, match=r"^error: .*broken.jsonl, line 2 is not a training "
                                         r"record \(no iteration"):
        analyze.main(["--metric=curves", str(broken)])
    broken.write_text('{"iter": 1, "loss": "1.0"}\n')
    with pytest.raises(SystemExit, match=r"^error: .*broken.jsonl holds no numbers beside 'iter'"):
        analyze.main(["--metric=curves", str(broken), f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_curves_without_matplotlib_writes_the_json_and_says_so(tmp_path):
    paths, _, ft = write_logs(tmp_path)
    env = dict(os.environ, **shadow(tmp_path, "matplotlib"))
    cmd = [sys.executable, "analyze.py", "--metric=curves", paths[1], "--labels=ft",
           f"--out={tmp_path / 'an'}"]
    result = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("pip install matplotlib") == 1
    assert not (tmp_path / "an" / "curves.png").exists()
    written = json.load(open(tmp_path / "an" / "curves.json"))
    assert written["models"]["ft"]["val_top1"] == series(ft, "val_top1")


def test_cosine_lr_is_linear_warmup_then_cosine_over_the_remaining_iterations():
    """Written out here: warmup lr (it + 1) / w for it < w (the convention the warning test above
    relies on: the last warmup step reaches lr), then with k = it - w iterations after warmup,
    min_lr + 0.5 (lr - min_lr) (1 + cos(pi k / (M - w))), so the cosine starts at lr right after
    warmup and ends at min_lr at M, and stays there after"""
    M, w, lr, min_lr = 100, 10, 1e-3, 1e-5
    for it in range(w):
        assert cosine_lr(it, M, w, lr, min_lr) == pytest.approx(lr * (it + 1) / w, rel=1e-12)
    for k in (0, 1, 15, 30, 45, 60, 89, 90):
        expected = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * k / (M - w)))
        assert cosine_lr(w + k, M, w, lr, min_lr) == pytest.approx(expected, rel=1e-12)
    assert cosine_lr(w, M, w, lr, min_lr) == pytest.approx(lr, rel=1e-12)
    assert cosine_lr(w + 45, M, w, lr, min_lr) == pytest.approx((lr + min_lr) / 2, rel=1e-12)
    assert cosine_lr(M + 5, M, w, lr, min_lr) == pytest.approx(min_lr, rel=1e-12)


class ListLoader:
    """A DataLoader's contract for micro_batches: batch_size, and batches of the sampler's
    items read when iterated (so after set_epoch), the last partial batch dropped"""

    def __init__(self, sampler, batch_size):
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self):
        items = list(self.sampler)
        for j in range(0, len(items) - self.batch_size + 1, self.batch_size):
            yield tuple(items[j:j + self.batch_size])


def test_micro_batches_are_each_epochs_first_iterations_in_order_and_resume_exactly():
    """14 samples in order, micro-batches of 2: 7 per epoch, of which 3 iterations x 2
    accumulation steps = 6 are used (the 7th, a partial iteration, never). The stream over epochs
    is epoch 0's 6 micro-batches, then epoch 1's, ...; resuming at iteration 1 (or 4: epoch 1,
    step 1) gives the same stream less its first 2 (or 8) micro-batches."""
    from itertools import islice

    from common import micro_batches
    from data import EpochSampler

    def expected(epoch):
        return [((2 * j, epoch), (2 * j + 1, epoch)) for j in range(6)]

    stream = expected(0) + expected(1) + expected(2) + expected(3)

    def run(start_iter, n):
        sampler = EpochSampler(14, shuffle=False)
        return list(islice(micro_batches(ListLoader(sampler, 2), sampler, start_iter, 2, 3), n))

    assert run(0, 18) == stream[:18]
    assert run(1, 16) == stream[2:18]
    assert run(4, 10) == stream[8:18]
