"""experiments/paper.sh's bookkeeping, with every python command it runs recorded instead of run (a
`python` first on PATH that runs only `python -c`, the script's own look-ups): which steps run, which
are skipped on a rerun."""
import os
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_paper(tmp_path, teachers):
    """experiments/paper.sh smoke with TEACHERS; -> the commands it ran (script and arguments), stdout"""
    stub_dir, record = tmp_path / "bin", tmp_path / "commands.txt"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "python"
    stub.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then exec {sys.executable} \"$@\"; fi\n"
                    f"echo \"$*\" >> {record}\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"  # where teacher.py looks for the official files: present, never read
    cache.mkdir(exist_ok=True)
    (cache / "ViT-B-16.pt").write_bytes(b"")
    record.write_text("")
    env = dict(os.environ, PATH=f"{stub_dir}:{os.environ['PATH']}", ROOT=str(tmp_path / "run"),
               TEACHERS=teachers, MDLAB_CACHE=str(cache), PYTHONPATH=ROOT)
    result = subprocess.run(["bash", "experiments/paper.sh", "smoke"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line.split() for line in record.read_text().splitlines()], result.stdout


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
