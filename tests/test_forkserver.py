"""The fork server runs a script as `python script.py` does: the same output, status and signals,
compared with a real interpreter started by subprocess."""
import os
import signal
import subprocess
import sys

import pytest

from tests import forkserver

pytestmark = pytest.mark.skipif(os.environ.get("MDLAB_TEST_FORK") == "0",
                                reason="MDLAB_TEST_FORK=0: scripts run in new interpreters, no server to compare")

PROBE = r'''
import os, signal, sys
import torch
print("argv", sys.argv)
print("cwd", os.getcwd())
print("env", os.environ.get("PROBE_VALUE"))
print("name file", __name__, globals().get("__file__"))
print("path0", sys.path[0])
print("threads", torch.get_num_threads())
print("sigint", signal.getsignal(signal.SIGINT))
print("sigterm", signal.getsignal(signal.SIGTERM))
print("buffering", sys.stdout.line_buffering, sys.stderr.line_buffering, sys.stdout.write_through)
print("main", sys.modules["__main__"].__dict__ is globals())
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "raise":
    raise ValueError("from the probe")
if how == "interrupt":
    raise KeyboardInterrupt
if how == "message":
    sys.exit("a message")
sys.exit(int(how))
'''


def both(tmp_path, how, start=("probe.py",), **kwargs):
    """(subprocess.run's result, the fork server's) for the probe run with `how`: as a script
    (`start`: probe.py) or as a module (-m probe)"""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    kwargs = dict(capture_output=True, text=True, cwd=str(tmp_path), timeout=120, **kwargs)
    command = [sys.executable, *start, how]
    assert forkserver.forkable(command, kwargs)
    return subprocess.run(command, **kwargs), forkserver.run(command, **kwargs)


@pytest.mark.parametrize("start", [("probe.py",), ("-m", "probe")])
@pytest.mark.parametrize("how", ["0", "3", "raise", "interrupt", "message"])
def test_output_and_status_are_the_interpreters(tmp_path, how, start):
    env = dict(os.environ, PROBE_VALUE="seen", OMP_NUM_THREADS="1")
    real, forked = both(tmp_path, how, start, env=env)
    assert forked.returncode == real.returncode
    assert forked.stdout == real.stdout
    assert forked.stderr == real.stderr


@pytest.mark.parametrize("unbuffered", [True, False])
def test_buffering_and_default_threads_are_the_interpreters(tmp_path, unbuffered):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONUNBUFFERED")}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    real, forked = both(tmp_path, "0", env=env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_pid_reaches_the_script(number):
    """the script's own handlers run (KeyboardInterrupt prints a traceback), the status is the signal's.
    The script installs Python's SIGINT handler itself: a background shell starts its jobs ignoring SIGINT."""
    code = ("import signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    command = [sys.executable, "-c", code]
    statuses = []
    for start in (subprocess.Popen, forkserver.Popen):
        process = start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "ready\n"
        assert process.poll() is None
        process.send_signal(number)
        stdout, stderr = process.communicate(timeout=60)
        statuses.append((process.returncode, stderr.splitlines()[-1:] if stderr else []))
    assert statuses[0] == statuses[1]
    assert statuses[1][0] == -number


@pytest.mark.parametrize("start, status", [(("missing.py",), 2), (("-m", "missing"), 1)])
def test_a_missing_script_or_module_is_the_interpreters_message_and_status(tmp_path, start, status):
    command = [sys.executable, *start, "--x=1"]
    real = subprocess.run(command, capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    forked = forkserver.run(command, capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert real.returncode == status
    command = [sys.executable, "missing.py"]
    with pytest.raises(FileNotFoundError):
        forkserver.run(command, cwd=str(tmp_path / "no_such_folder"))


def test_other_commands_are_started_by_subprocess():
    assert not forkserver.forkable(["bash", "-c", "true"], {})
    assert not forkserver.forkable([sys.executable, "-m", "torch.distributed.run", "x.py"], {})
    assert not forkserver.forkable([sys.executable, "x.py"], dict(preexec_fn=print))
    assert not forkserver.forkable([sys.executable, "x.py"], dict(env=dict(PYTHONPATH="/elsewhere")))
    result = forkserver.run(["bash", "-c", "echo $$; exit 4"], capture_output=True, text=True)
    assert result.returncode == 4 and result.stdout.strip().isdigit()


def test_a_failed_flush_at_exit_is_the_interpreters_message_and_status_120():
    """stdout's reader gone before the buffered text is flushed: CPython's finalization reports it.
    The script waits for its stdin to close, which the test does after closing stdout."""
    command = [sys.executable, "-c", "import sys\nsys.stdin.read()\nprint('x' * 100)"]
    results = []
    for start in (subprocess.Popen, forkserver.Popen):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # flushed at exit
        process = start(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env=env)
        process.stdout.close()
        process.stdin.close()
        results.append((process.wait(timeout=120), process.stderr.read()))
        process.stderr.close()
    assert results[0] == results[1]
    assert results[1][0] == 120 and "BrokenPipeError" in results[1][1]
