"""experiments/paper.sh's bookkeeping, with every python command it runs recorded instead of run (a
`python` first on PATH that runs only `python -c`, the script's own look-ups): which steps run, which
are skipped on a rerun."""
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.test_faults import default_sigint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paper_environment(tmp_path, teachers, stub_tail="", **environment):
    """the environment of experiments/paper.sh smoke with TEACHERS, its `python` a stub that records
    each command in tmp_path/commands.txt and then runs stub_tail (sh)"""
    stub_dir, record = tmp_path / "bin", tmp_path / "commands.txt"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "python"
    stub.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then exec {sys.executable} \"$@\"; fi\n"
                    f"echo \"$*\" >> '{record}'\n{stub_tail}")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"  # where teacher.py looks for the official files: present, never read
    cache.mkdir(exist_ok=True)
    (cache / "ViT-B-16.pt").write_bytes(b"")
    record.write_text("")
    return dict(os.environ, PATH=f"{stub_dir}:{os.environ['PATH']}", ROOT=str(tmp_path / "run"),
                TEACHERS=teachers, MDLAB_CACHE=str(cache), PYTHONPATH=ROOT, **environment)


def recorded(tmp_path):
    return [line.split() for line in (tmp_path / "commands.txt").read_text().splitlines()]


def run_paper(tmp_path, teachers, **environment):
    """experiments/paper.sh smoke with TEACHERS (and other environment variables); -> the commands
    it ran (script and arguments), stdout"""
    env = paper_environment(tmp_path, teachers, **environment)
    result = subprocess.run(["bash", "experiments/paper.sh", "smoke"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return recorded(tmp_path), result.stdout


def test_a_rerun_with_more_teachers_trains_and_analyses_the_new_ones(tmp_path):
    first, _ = run_paper(tmp_path, "embedded")
    scripts = [c[0] for c in first]
    assert scripts.count("train_md.py") == 1 and scripts.count("analyze.py") == 7  # 6 analyses + report
    again, out = run_paper(tmp_path, "embedded")  # nothing changed: only the report is written again
    assert [c[:3] for c in again] == [["analyze.py", "--metric", "report"]]
    grown, out = run_paper(tmp_path, "embedded clip")
    trained = [next(a for a in c if a.startswith("--out_dir=")) for c in grown if c[0] != "analyze.py"]
    run = tmp_path / "run"
    # CLIP now present, the better baseline is tested on it: its fine-tune at FD's lr too
    assert trained == [f"--out_dir={run / 'md_clip'}", f"--out_dir={run / 'ft_md_clip'}",
                       f"--out_dir={run / 'ft_clip'}", f"--out_dir={run / 'ft_clip_fd_lr'}"]
    # every analysis lists the new models, so each runs again (before: all skipped as finished)
    analysed = [c for c in grown if c[0] == "analyze.py" and c[2] != "report"]
    assert len(analysed) == 6 and all(any("md_clip" in a for a in c) for c in analysed)
    assert out.count("which the finished one") == 6 and "its command has 'clip'" in out
    assert "== md_embedded: finished before, skipped" in out
    # back to a subset of the teachers: the analyses of all of them are kept, not replaced
    subset, out = run_paper(tmp_path, "embedded")
    assert [c[:3] for c in subset] == [["analyze.py", "--metric", "report"]]


def test_a_changed_or_dropped_analysis_setting_runs_it_again(tmp_path):
    """the landscape finished with --steps=16 (its .done file says so): the scale now says
    --steps=3, a value that --lanczos_steps=3 also has (before: '3' was found among the finished
    command's words, and the step was
    skipped); the hessian finished with a --span the scale no longer sets (before: never noticed)"""
    run_paper(tmp_path, "embedded")
    steps = tmp_path / "run" / "steps"
    landscape = (steps / "landscape.done").read_text()
    assert " --steps=3 " in landscape and " --lanczos_steps=3" in landscape
    (steps / "landscape.done").write_text(landscape.replace(" --steps=3 ", " --steps=16 "))
    hessian = (steps / "hessian.done").read_text()
    (steps / "hessian.done").write_text(hessian.rstrip("\n") + " --span=0.5\n")
    again, out = run_paper(tmp_path, "embedded")
    assert sorted(c[2] for c in again) == ["hessian", "landscape", "report"]
    assert "== landscape: its command has '--steps=3', which the finished one" in out
    assert ("== hessian: the finished one" in out
            and "set --span, which its command does not: run again" in out)


def test_a_rerun_with_a_subset_of_teachers_trains_no_other_baseline(tmp_path):
    """the better baseline at FD's lr was fine-tuned from CLIP; rerun without CLIP: before, the
    baseline became the first teacher left and a new fine-tune at FD's lr was trained, which the
    report does not read"""
    run_paper(tmp_path, "embedded clip")
    subset, out = run_paper(tmp_path, "embedded")
    assert [c[:3] for c in subset] == [["analyze.py", "--metric", "report"]]
    assert "== ft_clip_fd_lr: finished before, skipped" in out


def test_a_missing_teacher_of_shape_bias_is_said_before_any_work(tmp_path):
    """SHAPE_TEACHERS=deit with no deit file: one 'missing:' line up front and nothing runs (before:
    found by
    the shape_bias step after every training, and the run stopped without a report);
    SHAPE_TEACHERS="" runs"""
    env = dict(os.environ, ROOT=str(tmp_path / "run"), MDLAB_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=ROOT,
               SHAPE_TEACHERS="deit")
    result = subprocess.run(["bash", "experiments/paper.sh", "smoke"], capture_output=True,
                            text=True, cwd=ROOT,
                            env=env, timeout=300)
    assert result.returncode != 0 and not (tmp_path / "run").exists()
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"missing: teacher deit ({tmp_path / 'cache'}/"
                               "deit_base_patch16_224-b5f2ef4d.pth)")
    assert lines[0].endswith('or run without it: SHAPE_TEACHERS="" experiments/paper.sh smoke')
    assert lines[1] == "error: scale 'smoke' lacks 1 piece(s) above; nothing was run"
    commands, _ = run_paper(tmp_path, "embedded", SHAPE_TEACHERS="")
    shape = [c for c in commands if c[:3] == ["analyze.py", "--metric", "shape_bias"]]
    assert len(shape) == 1 and "embedded" not in shape[0][3:5]  # the fine-tuned models only


def test_a_run_folder_with_a_space_in_its_path_skips_what_it_finished(tmp_path):
    """the .done file keeps the command as one line of words: a path with a space is compared word
    by word on both sides (before this stop's option-by-option check was mended: every analysis ran
    again on every rerun)"""
    spaced = tmp_path / "with space"
    spaced.mkdir()
    run_paper(spaced, "embedded")
    again, out = run_paper(spaced, "embedded")
    assert [c[:3] for c in again] == [["analyze.py", "--metric", "report"]], out


# the MD pretraining of the stub: says it is ready, then trains until a signal; SIGTERM: it saves and
# stops (exit 143), Ctrl-C: its last iteration ends the training normally (exit 0)
TRAINING_UNTIL_A_SIGNAL = """if [ "$1" = train_md.py ]; then
  trap 'echo INT >> "$SIGNALS"; exit 0' INT
  trap 'echo TERM >> "$SIGNALS"; exit 143' TERM
  touch "$READY"
  while :; do sleep 1; done
fi
"""


@pytest.mark.parametrize("stop", ["SIGTERM to the script", "Ctrl-C in the last iteration"])
def test_a_stop_signal_reaches_the_step_and_ends_the_script(tmp_path, stop):
    """a real signal while the first training runs. SIGTERM to paper.sh alone (kill, a scheduler)
    is passed on to the training, and the script ends after it with 143 (before: bash ended at once
    and the training went on without it). Ctrl-C, which the terminal sends to the whole process
    group, in a training's last iteration: the training finishes (exit 0), its .done file is
    written and the script ends with 130 (before: the next step started). A rerun goes on, and the
    seconds of the stopped try count in the step's time (before: only the last try's)."""
    ready, signals = tmp_path / "ready", tmp_path / "signals"
    env = paper_environment(tmp_path, "embedded", TRAINING_UNTIL_A_SIGNAL, READY=str(ready),
                            SIGNALS=str(signals))
    # its own process group with Ctrl-C's default action, as a terminal's job (a shell cannot trap
    # a signal that was ignored when it started)
    process = subprocess.Popen(["bash", "experiments/paper.sh", "smoke"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=default_sigint)
    try:
        for _ in range(1200):  # the stub training is ready (at most 2 minutes)
            if ready.exists() or process.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), process.communicate()[1][-2000:]
        if stop == "SIGTERM to the script":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        try:  # a training left behind (the old script's fault)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # none: the whole group has ended
            pass
    finished = tmp_path / "run" / "steps" / "md_embedded.done"
    go_on = "run experiments/paper.sh smoke again to go on from here"
    assert [c[0] for c in recorded(tmp_path)] == ["train_md.py"]  # no later step started
    if stop == "SIGTERM to the script":
        assert signals.read_text() == "TERM\n" and process.returncode == 143
        assert not finished.exists()
        assert err.strip().endswith("stopped by SIGTERM: " + go_on)
        spent = finished.with_suffix(".spent")  # the stopped try's seconds, added to the next one's
        assert int(spent.read_text()) >= 0
        spent.write_text("1000\n")  # as if that try had trained for 1000 s
    else:
        assert signals.read_text() == "INT\n" and process.returncode == 130
        assert finished.exists()
        assert err.strip().endswith("stopped by Ctrl-C: " + go_on)
    again, out = run_paper(tmp_path, "embedded")
    scripts = [c[0] for c in again]
    assert scripts.count("finetune.py") == 4 and scripts.count("analyze.py") == 7
    trained_again = "train_md.py" in scripts
    assert trained_again == (stop == "SIGTERM to the script")
    if trained_again:  # the .done time counts both tries (before: the last one only)
        assert int(finished.read_text().split("\t")[0]) >= 1000
        assert not finished.with_suffix(".spent").exists()


def test_an_unknown_scale_is_named_beside_the_usage_line():
    """the scales are the files of experiments/scales/ (listed here by the test itself): a name
    that is none of them is said to be unknown (before: the usage line alone)"""
    scales = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "experiments", "scales")))
    r = subprocess.run(["bash", "experiments/paper.sh", "bogus"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: unknown scale 'bogus'; usage: experiments/paper.sh "
                                     f"SCALE, with SCALE one of: {' '.join(scales)}"]
