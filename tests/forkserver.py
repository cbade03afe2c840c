"""Start the tests' `python script.py ...` processes with torch already imported.

Importing torch costs about 1.5 s on a 2-core machine, and the tests start a few hundred
scripts. A server process imports torch, numpy, PIL and tqdm once, then forks one child per
command. The child takes the command's stdin/stdout/stderr (passed as file descriptors), working
directory, environment, arguments and SIGINT disposition, imports the project's modules fresh and
runs the script as `__main__`, then exits with the status `python script.py` would: the code of
SystemExit, 1 and a traceback on an exception, death by SIGINT on an uncaught KeyboardInterrupt.
Signals sent to `proc.pid` reach the script itself.

`Popen` and `run` take subprocess's arguments. These are started by subprocess as usual: a command
that is not `[sys.executable, FILE.py | -c CODE | -m MODULE, ...]`; torchrun (`-m
torch.distributed.run`); one with preexec_fn, pass_fds, another executable, a shell or a
PYTHONPATH that could hide a preloaded module; and every command when MDLAB_TEST_FORK=0 (to check
that the suite does not depend on the server).
"""
import io
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = "import torch, torch.nn.functional, torch.utils.data, torch.distributed, numpy, PIL.Image, tqdm"

_server = None  # (process, socket path) of this pytest process's server, started on first use


# ---- the client side: subprocess.Popen, with the fork and exec done by the server ----------

def forkable(args, kwargs):
    """True if `args`/`kwargs` describe a plain `python FILE.py|-c ...` the server can run"""
    if os.environ.get("MDLAB_TEST_FORK", "1") == "0" or isinstance(args, (str, bytes)):
        return False
    args = [os.fspath(a) for a in args]
    if len(args) < 2 or args[0] != sys.executable or not (args[1].endswith(".py") or args[1] in ("-c", "-m")):
        return False
    if args[1:3] == ["-m", "torch.distributed.run"]:  # torchrun starts its workers itself: left as it was
        return False
    plain = ("preexec_fn", "pass_fds", "executable", "shell", "user", "group", "extra_groups", "umask")
    if any(kwargs.get(name) for name in plain):
        return False
    env = kwargs.get("env")
    python_path = (env if env is not None else os.environ).get("PYTHONPATH")
    return python_path in (None, os.environ.get("PYTHONPATH"), ROOT)


def server_path():
    """the socket of this process's server; started (and waited for) on first use"""
    global _server
    if _server is not None and _server[0].poll() is None:
        return _server[1]
    path = os.path.join(tempfile.mkdtemp(prefix="mdlab-fork-"), "socket")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's own default thread count
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), path, str(os.getpid())], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120
    while not os.path.exists(path):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the fork server did not start (exit {process.poll()})")
        time.sleep(0.02)
    _server = (process, path)
    return path


class Popen(subprocess.Popen):
    """subprocess.Popen; a plain `python FILE.py ...` is forked from the server instead of exec'd"""

    def __init__(self, args, **kwargs):
        self._forked = forkable(args, kwargs)
        self._new_session = bool(kwargs.get("start_new_session"))
        self._connection = None
        super().__init__(args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        self._forked = self._forked and os.path.isdir(cwd or ".")  # subprocess raises for a missing cwd
        if not self._forked:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                                          startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread,
                                          c2pwrite, errread, errwrite, *rest)
        request = dict(argv=[os.fspath(a) for a in args], cwd=os.fspath(cwd or os.getcwd()),
                       env=dict(env if env is not None else os.environ), new_session=self._new_session,
                       ignore_sigint=signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
        child_fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                     errwrite if errwrite != -1 else 2]
        self._connection = socket.socket(socket.AF_UNIX)
        self._connection.connect(server_path())
        socket.send_fds(self._connection, [json.dumps(request).encode() + b"\n"], child_fds)
        self._reply = b""
        self.pid = int(self._read_line(block=True))
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _read_line(self, block):
        """the server's next line (the pid, then the wait status), or None if none yet and not `block`"""
        while b"\n" not in self._reply:
            if not block and not select.select([self._connection], [], [], 0)[0]:
                return None
            part = self._connection.recv(64)
            if not part:
                raise RuntimeError("the fork server closed the connection")
            self._reply += part
        line, self._reply = self._reply.split(b"\n", 1)
        return line

    def _waitpid(self, pid, flags):
        line = self._read_line(block=not flags & os.WNOHANG)
        if line is None:
            return 0, 0
        self._connection.close()
        return pid, int(line)

    def _try_wait(self, wait_flags):
        if not self._forked:
            return super()._try_wait(wait_flags)
        return self._waitpid(self.pid, wait_flags)

    def _internal_poll(self, _deadstate=None, **kwargs):
        if not self._forked:
            return super()._internal_poll(_deadstate, **kwargs)
        return super()._internal_poll(_deadstate, _waitpid=self._waitpid)


def run(args, *, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """subprocess.run with this module's Popen"""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with Popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


# ---- the server side ---------------------------------------------------------------------

def exit_code(error):
    """the status Python gives an uncaught SystemExit"""
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)
    return 1


def standard_streams(env):
    """new sys.stdin/stdout/stderr on fds 0-2, named and buffered as a fresh interpreter makes them"""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        raw = io.FileIO(fd, mode, closefd=False)
        raw.name = f"<{name}>"
        if mode == "r":
            binary = io.BufferedReader(raw)
        else:
            binary = raw if unbuffered else io.BufferedWriter(raw)
        line_buffered = not unbuffered and (name == "stderr" or raw.isatty())
        original = getattr(sys, f"__{name}__")
        stream = io.TextIOWrapper(binary, encoding=original.encoding, errors=original.errors,
                                  line_buffering=line_buffered, write_through=unbuffered and mode == "w")
        stream.mode = mode
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def finalize(code):
    """what the interpreter does after the main module: join non-daemon threads, run atexit
    functions, flush stdout and stderr (a failed flush: a message and status 120)"""
    import atexit
    import threading
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception as error:
            try:
                sys.__stderr__.write(f"Exception ignored in: {stream!r}\n")
                sys.__stderr__.write("".join(traceback.format_exception_only(type(error), error)))
                sys.__stderr__.flush()
            except Exception:
                pass
            code = 120
    return code


def child(request, fds):
    """in the forked process: become `python ARGV...` and never return"""
    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for number in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN if request["ignore_sigint"] else signal.default_int_handler)
    import torch
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    standard_streams(os.environ)
    sys.orig_argv = request["argv"]
    argv = request["argv"][1:]
    if argv[0] == "-m":  # python -m: the working directory first on the path, then runpy as python calls it
        sys.argv = ["-m", *argv[2:]]
        set_path(os.getcwd())
        run_main(lambda: runpy._run_module_as_main(argv[1], alter_argv=True))
    main = types.ModuleType("__main__")
    if argv[0] == "-c":
        sys.argv, source, file_name, first_path = ["-c", *argv[2:]], argv[1], "<string>", ""
    else:
        sys.argv, file_name = argv, argv[0]
        try:
            source = open(file_name, "rb").read()
        except OSError as error:  # python's own message and status
            print(f"{sys.executable}: can't open file {os.path.abspath(file_name)!r}: [Errno {error.errno}] "
                  f"{error.strerror}", file=sys.stderr)
            finalize(2)
            os._exit(2)
        first_path = os.path.dirname(os.path.realpath(file_name))
        main.__file__ = file_name = os.path.abspath(file_name)  # as Python 3.9+ sets it
    set_path(first_path)
    sys.modules["__main__"] = main
    run_main(lambda: exec(compile(source, file_name, "exec"), main.__dict__))


def set_path(first):
    """sys.path as python builds it: `first`, PYTHONPATH, then the installation's folders"""
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *python_path, *[p for p in sys.path[1:] if p not in python_path]]


def run_main(main):
    """call `main`, then exit as the interpreter does after its main module"""
    code, interrupted = 0, False
    try:
        main()
    except SystemExit as error:
        code = exit_code(error)
    except BaseException as error:  # reported by sys.excepthook without this function's frames
        error.__traceback__ = error.__traceback__.tb_next.tb_next
        sys.excepthook(type(error), error, error.__traceback__)
        code, interrupted = 1, isinstance(error, KeyboardInterrupt)
    code = finalize(code)
    if interrupted:  # Python dies by the signal after an uncaught KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def serve(path, client_pid):
    """accept requests on `path` until the client process `client_pid` is gone"""
    exec(PRELOAD, {})
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the client waits for `path`: it exists once we listen
    children = {}  # pid -> connection to the client that asked for it
    while os.getppid() == client_pid:
        ready = select.select([listener], [], [], 0.01)[0]
        if ready:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
            while not message.endswith(b"\n"):
                message += connection.recv(1 << 16)
            request = json.loads(message)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    listener.close()
                    connection.close()
                    child(request, fds)
                finally:  # child() never returns; this is for a failure of the server's own code
                    traceback.print_exc()
                    os._exit(1)
            for fd in fds:
                os.close(fd)
            connection.sendall(f"{pid}\n".encode())
            children[pid] = connection
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid, None)
            if connection is not None:
                try:
                    connection.sendall(f"{status}\n".encode())
                except OSError:
                    pass
                connection.close()
    os.unlink(path)
    os.rmdir(os.path.dirname(path))


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
