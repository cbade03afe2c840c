"""
Leaf helpers the scripts share, values in and values out: --key=value overrides, the option
checks, the torchrun/DDP context, the lr schedule, the data position, the per-step seed, the
non-finite flag, checkpoint write / read / resume, the SIGTERM flag, the download with its SHA-256
check, the MFU meter, logging. Nothing here imports the project and
nothing here runs a training loop: each script writes its own.
"""
import argparse
import ast
import atexit
import contextlib
import errno
import hashlib
import http.client
import io
import json
import math
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
import types
import urllib.request
import zipfile

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------
# configuration: nanoGPT-style `python script.py [config/file.py] [--key=value ...]`

def parse_value(raw, default):
    """A command-line string -> a value of the default's type, or raise ValueError."""
    if isinstance(default, str):
        return raw
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError
        return raw.lower() in ("true", "1")
    value = ast.literal_eval(raw)
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if type(value) is not type(default):
        raise ValueError
    return value


def apply_overrides(config, argv):
    """Update `config` (a script's globals) in place from config files (python files of
    assignments) and --key=value arguments, then return the settings as a plain dict. Keys must
    exist; values keep the default's type. Anything wrong exits with one line."""
    keys = sorted(k for k, v in config.items()
                  if not k.startswith("_") and not k.isupper() and isinstance(v, (bool, int, float, str)))
    if "--help" in argv or "-h" in argv:
        print_help(usage(config, keys))
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"error: option '{arg}' needs a value: --{key}=VALUE")
            if key not in keys:
                raise SystemExit(f"error: unknown option '--{key}': valid options are {', '.join(keys)}")
            try:
                config[key] = parse_value(raw, config[key])
            except (ValueError, SyntaxError):
                kind = type(config[key]).__name__
                raise SystemExit(f"error: {arg}: '{key}' must be {kind} like the default {config[key]!r}") from None
            # the shell leaves ~ after --key=
            if isinstance(config[key], str) and config[key].startswith("~"):
                config[key] = os.path.expanduser(config[key])
        else:
            if os.path.isdir(arg):
                files = sorted(name for name in os.listdir(arg) if name.endswith(".py"))
                example = f", like {os.path.join(arg, files[0])}" if files else ""
                raise SystemExit(f"error: config file '{arg}' is a folder: give a file in it{example} "
                                 "(options are --key=value)")
            if not os.path.isfile(arg):
                raise SystemExit(f"error: config file '{arg}' not found (options are --key=value)")
            file_globals = {}
            try:
                exec(compile(open(arg).read(), arg, "exec"), file_globals)
            except Exception as e:  # a config file is Python: its error becomes one line
                raise SystemExit(f"error: config file {config_error(arg, e)}") from None
            for key, value in file_globals.items():
                if key.startswith("_") or isinstance(value, types.ModuleType):  # import math: a tool
                    continue
                if key not in keys:
                    valid = ", ".join(keys)
                    raise SystemExit(f"error: unknown option '{key}' in {arg}: valid options are {valid}")
                if isinstance(config[key], float) and type(value) is int:
                    value = float(value)
                if type(value) is not type(config[key]):
                    kind = type(config[key]).__name__
                    raise SystemExit(f"error: {arg}: '{key}' must be {kind}, got {value!r}")
                config[key] = value
    return {k: config[k] for k in keys}


def print_help(text):
    """--help: text on stdout, then exit 0; a reader that stops early (| head) is no error"""
    try:
        print(text, flush=True)
    except BrokenPipeError:  # no traceback; and the exit's own flush then writes to /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


def usage(config, keys):
    """--help: the script's docstring, then its settings as its config block writes them (each
    default with its comment, in the file's order), then name = value for any setting without such a line"""
    lines = [(config.get("__doc__") or "").strip(), "", "options (--key=value, or config files of such assignments):"]
    source = config.get("__file__")
    written = {}
    if source and os.path.isfile(source):
        for line in open(source):
            name = line.split("=")[0].strip()
            if line[:1].isalpha() and name in keys and name not in written:
                written[name] = line.rstrip()
    lines += list(written.values()) + [f"{k} = {config[k]!r}" for k in keys if k not in written]
    return "\n".join(lines)


def config_error(path, error):
    """'PATH' line N: ErrorType: message, for an exception raised while running a config file"""
    if isinstance(error, SyntaxError):
        line, text = error.lineno, error.msg
    else:
        frames = traceback.extract_tb(error.__traceback__)
        lines = [frame.lineno for frame in frames if frame.filename == path]
        line, text = (lines[-1] if lines else None), first_line(error)
    where = f" line {line}" if line else ""
    return f"'{path}'{where}: {type(error).__name__}: {text}"


# ----------------------------------------------------------------------------------------
# option checks: every script calls option_error once, before any work

def option_error(config, extra=()):
    """The first option value that cannot work, as one line that says what to change, or None.
    Checks the options the scripts share (each where the script has it), the device, then the
    script's own `extra` (ok, message) pairs."""
    rules = (  # (requirement, test, options)
        (">= 1", lambda v: v >= 1,
         ("micro_batch_size", "total_batch_size", "epochs", "log_interval", "save_interval", "img_size")),
        (">= 0", lambda v: v >= 0,
         ("warmup_epochs", "stop_iter", "lr", "min_lr", "weight_decay", "grad_clip",
          "num_workers", "eval_images", "hessian_every", "mixup", "cutmix", "color_jitter",
          "commitment", "dead_threshold")),
        ("in [0, 1)", lambda v: 0 <= v < 1,
         ("beta1", "beta2", "drop_path", "label_smoothing", "ema_decay")),
        ("in (0, 1]", lambda v: 0 < v <= 1, ("min_crop_scale", "crop_pct")),
        ("in [0, 1]", lambda v: 0 <= v <= 1, ("flip", "reprob")),
        ("in [0, 2**64)", lambda v: 0 <= v < 2 ** 64, ("seed",)),  # torch.manual_seed's range
    )
    for requirement, ok, names in rules:
        for name in names:
            if name in config and not ok(config[name]):  # NaN fails every test
                return f"--{name}={config[name]} must be {requirement}"
    if {"lr", "min_lr", "weight_decay", "beta1"} <= set(config):
        # Adam's first step moves by lr / (1 - beta1), AdamW's decay multiplies by 1 - lr x weight_decay:
        # both must fit a float32 (the cosine schedule never exceeds max(lr, min_lr))
        float_max, beta1 = torch.finfo(torch.float32).max, config["beta1"]
        for name in ("lr", "min_lr"):
            if config[name] > float_max * (1 - beta1):
                return (f"--{name}={config[name]} must be <= {float_max * (1 - beta1):.3g} (float32's max x "
                        f"(1 - beta1)): Adam's first step, lr / (1 - beta1), must fit a float32")
        weight_decay = config["weight_decay"]
        if max(config["lr"], config["min_lr"]) * weight_decay > float_max:
            return (f"--weight_decay={weight_decay} must be <= {float_max:.3g} / max(lr, min_lr): "
                    f"AdamW's decay, 1 - lr x weight_decay, must fit a float32")
    device = config.get("device", "auto")
    if device != "auto":
        try:
            kind, index = torch.device(device).type, torch.device(device).index
        except RuntimeError:
            return f"--device={device} is not a device: use auto, cpu, cuda or cuda:N"
        if kind not in ("cpu", "cuda"):
            return f"--device={device}: only cpu and cuda are supported: use cpu, cuda or cuda:N"
        if kind == "cuda" and not torch.cuda.is_available():
            return f"--device={device}: no CUDA GPU is visible: use --device=cpu (or auto)"
        gpus = torch.cuda.device_count() if kind == "cuda" else 0
        if kind == "cuda" and index is not None and index >= gpus:
            return f"--device={device}: there are {gpus} GPUs (cuda:0 ...): pick one of them"
    backend = config.get("backend", "")
    if backend not in ("", "gloo", "nccl"):  # checked here, not first under torchrun
        return f"--backend={backend} must be gloo or nccl (empty: nccl on GPUs, gloo on CPU)"
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if backend == "nccl" and not on_gpu:
        return "--backend=nccl needs GPUs; this run is on the CPU: use --backend=gloo (or leave it empty)"
    for ok, message in extra:
        if not ok:
            return message
    return None


# ----------------------------------------------------------------------------------------
# devices and distributed

class Context:
    """Where this process runs: rank, world size, device, autocast."""

    def __init__(self, device="auto", dtype="bfloat16", backend=""):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.ddp:
            self.rank = int(os.environ["RANK"])
            self.local_rank = int(os.environ["LOCAL_RANK"])
            self.world_size = int(os.environ["WORLD_SIZE"])
            if device.startswith("cuda"):
                device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(device)
            default_backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend=backend or default_backend)
            # host-side flags (a stop request) travel over gloo: no device sync in the loop
            gloo = dist.get_backend() == "gloo"
            self.cpu_group = None if gloo else dist.new_group(backend="gloo")
        else:
            self.rank, self.local_rank, self.world_size = 0, 0, 1
        self.device = device
        self.device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.master = self.rank == 0
        if dtype not in ("float32", "bfloat16", "float16"):
            raise SystemExit(f"error: dtype '{dtype}' must be bfloat16, float16 or float32")
        self.dtype = dtype  # float16: the scripts scale the loss (torch.amp.GradScaler)
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16,
                               "float16": torch.float16}[dtype]

    def autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    def all_reduce_sum(self, tensor):
        if self.ddp:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag):
        """True on every rank when `flag` (a host bool) is True on at least one rank"""
        if not self.ddp:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item())

    def log_values(self, loss, skipped, images):
        """At a log line (every rank calls it): the mean over the ranks of each one's last
        micro-batch loss (a rank that has read no image yet holds NaN and is left out), and the
        ranks' unreadable and read images in all (each rank reads its own share: a rank that skips
        images reads fewer). -> (float, int, int)"""
        value = loss.item()
        if not self.ddp:
            return value, skipped, images
        has_loss = not math.isnan(value)  # a real NaN has stopped the run before the log line
        counts = [value if has_loss else 0.0, float(has_loss), float(skipped), float(images)]
        t = torch.tensor(counts, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.cpu_group)
        loss_sum, ranks_with_loss, all_skipped, all_images = t.tolist()
        mean_loss = loss_sum / ranks_with_loss if ranks_with_loss else float("nan")
        return mean_loss, int(all_skipped), int(all_images)

    def barrier(self):
        if self.ddp:
            dist.barrier(group=self.cpu_group)

    def close(self):
        if self.ddp:
            dist.destroy_process_group()


def accumulation_steps(total_batch_size, micro_batch_size, world_size):
    """Gradient accumulation from the total batch: total = micro x world x accum, exactly."""
    per_step = micro_batch_size * world_size
    if total_batch_size % per_step:
        # the same recipe with a smaller micro-batch: the largest one that divides exactly
        fits = [m for m in range(micro_batch_size, 0, -1) if total_batch_size % (m * world_size) == 0]
        keep = f", or keep it with --micro_batch_size={fits[0]}" if fits else ""
        raise SystemExit(f"error: total_batch_size {total_batch_size} is not divisible by micro_batch_size x "
                         f"world size = {micro_batch_size} x {world_size}: choose a multiple of {per_step}"
                         f"{keep}")
    return total_batch_size // per_step


def wrap_for_training(model, ctx, compile):
    """torch.compile (optional), then DDP under torchrun; the unwrapped model is what gets saved"""
    from torch.nn.parallel import DistributedDataParallel as DDP
    wrapped = torch.compile(model) if compile else model
    if ctx.ddp:
        wrapped = DDP(wrapped, device_ids=[ctx.local_rank] if ctx.device_type == "cuda" else None)
    return wrapped


# ----------------------------------------------------------------------------------------
# schedule and data position

def schedule_lengths(sampler, micro_batch_size, accum, epochs, warmup_epochs, stop_iter):
    """-> iterations per epoch (whole optimizer steps), total, warmup, and where this run stops"""
    iters_per_epoch = len(sampler) // micro_batch_size // accum
    if iters_per_epoch == 0:
        raise SystemExit(f"error: {len(sampler)} training images per process are fewer than one optimizer step "
                         f"({micro_batch_size} x {accum} accumulation steps): lower total_batch_size")
    max_iters = epochs * iters_per_epoch
    end_iter = min(stop_iter, max_iters) if stop_iter else max_iters
    return iters_per_epoch, max_iters, warmup_epochs * iters_per_epoch, end_iter


def warmup_warning(warmup_epochs, epochs, warmup_iters, max_iters):
    """None, or the warning line for a warmup as long as the run (allowed, for short trial runs): the lr
    then only rises and ends at max_iters / warmup_iters of --lr, with no cosine decay"""
    if warmup_iters < max_iters:
        return None
    return (f"warning: --warmup_epochs={warmup_epochs} >= --epochs={epochs}: the lr only rises, to "
            f"{100 * max_iters / warmup_iters:.0f}% of --lr at the end, with no cosine decay")


def cosine_lr(it, max_iters, warmup_iters, lr, min_lr):
    """linear warmup, lr (it + 1) / warmup_iters (step 0 at lr / warmup_iters, the last warmup
    step at lr; BEiT's linspace starts at 0), then cosine from lr to min_lr at max_iters"""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def micro_batches(loader, sampler, start_iter, accum, iters_per_epoch):
    """Endless micro-batches starting exactly where iteration `start_iter` begins: the epoch
    and the position within it follow from the iteration number, so resume needs no extra state."""
    epoch, step_in_epoch = divmod(start_iter, iters_per_epoch)
    start = step_in_epoch * accum
    while True:
        sampler.set_epoch(epoch, start * loader.batch_size)
        for i, batch in enumerate(loader, start=start):
            if i >= iters_per_epoch * accum:
                break
            yield batch
        epoch, start = epoch + 1, 0


def derived_seed(*keys):
    """A seed for torch.manual_seed from integers such as (seed, rank, iteration, micro-step): the
    first 8 bytes of their SHA-256. The loops reseed every micro-step with it, so drop path,
    mixup and codebook restarts draw the same numbers in a resumed run as in an uninterrupted
    one, on every rank, and no RNG state needs to be saved."""
    digest = hashlib.sha256(",".join(str(int(k)) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def record_nonfinite(record, value, iter_num, what):
    """Remember, on the device and without a host sync, the first iteration whose `value` (a 0-d
    tensor; what: 0 = loss, 1 = gradient norm) is not finite. record: float64 (3,) on the device,
    [iteration or -1, what, value], made by torch.full((3,), -1.0, dtype=torch.float64, device=...)."""
    value = value.detach().double()
    first = (record[0] < 0) & ~torch.isfinite(value)
    found = torch.stack([torch.full_like(value, iter_num), torch.full_like(value, what), value])
    return torch.where(first, found, record)


def stop_if_nonfinite(record, ckpt_path, scaler):
    """Read the record to the CPU (one sync: at log lines and before each checkpoint, never per step)
    and stop with one line if a step was not finite; its weights are then never saved. float16
    (`scaler` enabled): a step whose gradients overflow is skipped and the loss scale halved, so
    gradients that are not finite even at a scale below 1 (17 skips in a row from 2^16) stop too."""
    iteration, what, value = record.tolist()
    if iteration >= 0:
        name = "loss" if what == 0 else "gradient norm"
        kept = kept_checkpoint(ckpt_path)
        raise SystemExit(f"error: iteration {int(iteration)}: {name} is {value}; stopping, {kept}")
    if scaler.is_enabled() and scaler.get_scale() < 1:
        raise SystemExit("error: the float16 gradients are not finite "
                         f"even at loss scale {scaler.get_scale():.3g} "
                         f"(their steps were skipped); stopping, {kept_checkpoint(ckpt_path)}: "
                         f"try --dtype=bfloat16 or float32")


def kept_checkpoint(path):
    """what a run that stops without saving leaves the user"""
    if os.path.exists(path):
        return f"the last good checkpoint is {path}"
    return f"no checkpoint was saved before ({path} does not exist)"


# ----------------------------------------------------------------------------------------
# reading files

CACHE_DIR = os.environ.get("MDLAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mdlab"))


class CheckpointError(ValueError):
    """Bad model input; the message is one line that names the file and the problem."""


@contextlib.contextmanager
def exclusive(path):
    """Hold an exclusive POSIX lock on the file `path` (made if missing, left in place) for the with
    block: another process asking for it waits until this one leaves the block or ends. On a
    filesystem without locks (some NFS and Lustre mounts) the block runs unlocked, as before locks."""
    import fcntl
    with open(path, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX)
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ...: no locks here
            print(f"warning: no file lock on {path} ({e.strerror or e}): processes that start together "
                  "may do this work twice", file=sys.stderr)
        yield


def file_sha256(path):
    """SHA-256 of a file's bytes, in hex, read in 1 MiB pieces"""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def download(url, sha256=None, cache_dir=CACHE_DIR, instead="give its path instead of the name"):
    """Fetch url into cache_dir once (atomic rename), checking the SHA-256 (or its prefix). Processes
    that start together (torchrun's ranks) take turns on a lock: the first downloads, the others wait
    and find the file. instead: what the caller's user can do without a network, said when the fetch
    fails."""
    dest = os.path.join(cache_dir, os.path.basename(url))
    if os.path.exists(dest):
        return dest
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with exclusive(dest + ".lock"):
            if not os.path.exists(dest):  # not fetched by another process while this one waited
                fetch(url, dest, sha256, instead)
    except OSError as e:  # a cache folder that cannot be written
        raise CheckpointError(f"cannot write the download of {url} to {cache_dir} ({e.strerror or e}): set "
                              f"MDLAB_CACHE to a writable folder, or {instead}") from None
    return dest


DOWNLOAD_TIMEOUT = 60  # seconds a download may wait for the server's next bytes before it gives up


def fetch(url, dest, sha256, instead):
    """download's transfer: url -> dest + '.part', checked, renamed to dest"""
    from tqdm import tqdm
    tmp, digest = dest + ".part", hashlib.sha256()
    print(f"downloading {url} -> {dest}")
    received = 0
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)
        with response, open(tmp, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=size, unit="B", unit_scale=True) as bar:
                # a connection closed early ends it too, without an error
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if size and received != size:  # DINO's file has no published hash that would catch it
            raise OSError(f"the connection ended after {received} of {size} bytes")
    # no network, a refused, stalled or cut connection, HTTP errors (URLError; IncompleteRead of a
    # chunked reply)
    except (OSError, http.client.HTTPException) as e:
        if os.path.isfile(tmp):  # (a folder of that name stays)
            os.remove(tmp)
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise CheckpointError(f"could not download {url} ({reason}): fetch the file elsewhere and "
                              f"{instead}") from None
    if sha256 and not digest.hexdigest().startswith(sha256):
        os.remove(tmp)
        raise CheckpointError(f"download of {url} has SHA-256 {digest.hexdigest()}, expected {sha256}: "
                              f"retry or fetch it by hand")
    os.replace(tmp, dest)


def first_line(error):
    text = str(error).splitlines()
    return text[0] if text else ""


# DINO's training checkpoints (main_dino.py) hold its argparse options: plain attributes, safe to read
torch.serialization.add_safe_globals([argparse.Namespace])


def read_checkpoint(path):
    """Load a file as plain data; nothing stored in it runs. Pickles are read with
    weights_only=True (which also admits argparse.Namespace, above), so a file that would run code
    on load is refused; TorchScript archives (CLIP's) give their parameters and buffers by
    read_torchscript, never torch.jit.load."""
    # a run's folder: its checkpoint (a tokenizer run's tokenizer.pt) as the example
    if os.path.isdir(path):
        found = [name for name in RUN_CHECKPOINTS if os.path.isfile(os.path.join(path, name))]
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file: give a file in it, like "
                              f"{os.path.join(path, (found or RUN_CHECKPOINTS)[0])}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' not found")
    # torch.load checks no checksum: a flipped byte would load as a wrong weight. A flipped byte in
    # the zip's own records makes zipfile raise one of many errors (BadZipFile, a "version"
    # NotImplementedError, an "encrypted" RuntimeError, UnicodeDecodeError in a name, ...)
    try:
        is_zip, damaged = zipfile.is_zipfile(path), None
        if is_zip:
            with zipfile.ZipFile(path) as z:
                is_torchscript = any(n.endswith("constants.pkl") for n in z.namelist())
                damaged = z.testzip()  # the first record whose bytes fail their CRC-32, or None
                # torch's reader (miniz) takes a record whose MS-DOS folder bit (0x10) is set for a
                # folder and gives its tensor uninitialized memory, without an error
                folders = [i.filename for i in z.infolist() if i.external_attr & 0x10 and not i.is_dir()]
    except Exception as e:
        raise CheckpointError(f"'{path}' is damaged: its zip records cannot be read "
                              f"({first_line(e) or type(e).__name__}): not a readable checkpoint") from None
    if is_zip:
        if damaged:
            raise CheckpointError(f"'{path}' is damaged: {damaged} in it does not match its checksum "
                                  "(CRC-32): not a readable checkpoint")
        if folders:
            raise CheckpointError(f"'{path}' is damaged: its record {folders[0]} is marked as a folder: "
                                  "not a readable checkpoint")
        if is_torchscript:  # CLIP's file: its tensors, read without running any code stored in it
            try:
                state_dict = read_torchscript(path)
            except Exception as e:
                raise CheckpointError(f"'{path}' is a TorchScript archive whose weights cannot be read as "
                                      f"plain data: {first_line(e) or type(e).__name__}") from None
            return {k: v.float() for k, v in state_dict.items()}
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as e:
            raise CheckpointError(f"'{path}' cannot be read ({e.strerror or type(e).__name__})") from None
        if head.startswith(b"PK"):  # a zip archive's first record, but not its end: cut or damaged
            raise CheckpointError(f"'{path}' is a cut or damaged zip archive (its end record is missing): "
                                  "not a readable checkpoint")
        if not head:
            raise CheckpointError(f"'{path}' is empty: not a checkpoint")
        if head[8:9] == b"{":  # a safetensors file: its header's length, then the header (JSON)
            try:
                return read_safetensors(path)
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"'{path}' is a damaged safetensors file "
                                      f"({first_line(e) or type(e).__name__}): "
                                      "not a readable checkpoint") from None
        if not head.startswith(b"\x80"):  # torch.save writes a zip archive, or a pickle (protocol >= 2)
            raise CheckpointError(f"'{path}' is not a checkpoint: neither a zip archive nor a pickle, as "
                                  f"torch.save writes them, nor a safetensors file (it begins "
                                  f"{head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        marker = "WeightsUnpickler error:"
        detail = first_line(str(e).split(marker)[-1].strip()) if marker in str(e) else type(e).__name__
        raise CheckpointError(f"'{path}' is not a plain-data checkpoint (objects or code, or not a checkpoint "
                              f"at all), refused by torch.load(weights_only=True): {detail}") from None
    except Exception as e:
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {first_line(e)})") from None


# safetensors files (Hugging Face's format, timm's weights on the hub) without the safetensors
# package

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """The tensors of a .safetensors file: 8 bytes, the header's length n (little-endian); n bytes of
    JSON, {name: {"dtype", "shape", "data_offsets": [begin, end]}} and an optional "__metadata__";
    then the tensors' little-endian bytes, each at its offsets from the end of the header.
    Plain data by construction: nothing in the file runs. A size or offset that does not add up raises."""
    with open(path, "rb") as f:
        data = f.read()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])
    body = memoryview(data)[8 + header_length:]
    state_dict = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], [int(n) for n in entry["shape"]]
        begin, end = (int(n) for n in entry["data_offsets"])
        size = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != size:
            raise ValueError(f"{name}: data_offsets [{begin}, {end}] do not hold a "
                             f"{entry['dtype']} tensor of shape {shape} in the file's {len(body)} "
                             "bytes of data")
        if size == 0:  # frombuffer refuses an empty buffer
            state_dict[name] = torch.empty(shape, dtype=dtype)
        else:
            state_dict[name] = torch.frombuffer(bytearray(body[begin:end]),
                                                dtype=dtype).reshape(shape)
    return state_dict


# TorchScript archives without torch.jit.load

# element type of each storage class a TorchScript archive names
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ScriptObject:
    """Stands in for an object of a class defined in a TorchScript archive: pickle's BUILD hands
    it the object's state, which is kept as data; no code of the class ever runs."""
    qualname = ""

    def __setstate__(self, state):
        self.state = state


class ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl building nothing but tensors, plain containers and
    ScriptObjects: every other global is refused, so unpickling runs no code from the file. The
    callables it hands out are builtins and bound methods, which the pickle cannot modify."""

    def __init__(self, file, read_storage):
        super().__init__(file)
        self.read_storage = read_storage  # (key, dtype) -> flat tensor
        self.classes = {}
        lists = {("torch.jit._pickle", f"build_{kind}list"): list
                 for kind in ("int", "double", "bool", "tensor")}
        self.safe_globals = {  # what a TorchScript data.pkl calls -> what is called instead
            ("torch._utils", "_rebuild_tensor_v2"): self.strided_view,
            ("collections", "OrderedDict"): dict,  # a tensor's (empty) backward hooks
            ("torch.jit._pickle", "restore_type_tag"): self.keep_value, **lists}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if (module, name) not in self.safe_globals:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not plain data")
        return self.safe_globals[(module, name)]

    def persistent_load(self, pid):
        # ('storage', storage class, key of the file under data/, device, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        if pid[1] not in STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"storage type {str(pid[1])[:80]} is not supported")
        return self.read_storage(str(pid[2]), STORAGE_DTYPES[pid[1]])

    def strided_view(self, storage, offset, size, stride, requires_grad, hooks, metadata=None):
        """torch._utils._rebuild_tensor_v2 for a storage given as a flat tensor (B,) -> a view"""
        if not torch.is_tensor(storage):
            raise pickle.UnpicklingError("a tensor without a storage")
        return storage.as_strided(tuple(size), tuple(stride), offset)

    def keep_value(self, value, type_str):
        return value  # torch.jit._pickle.restore_type_tag: the static type does not matter here


def read_torchscript(path):
    """The parameters and buffers of a TorchScript archive as {dotted name: tensor}: the keys and
    values of torch.jit.load(path).state_dict(), read without running anything from the file
    (torch.jit.load compiles the archive's code and runs the __setstate__ methods it defines).
    OpenAI's CLIP files are such archives. Layout, as torch.jit.save writes it
    (torch/csrc/jit/serialization/export_module.cpp) and torch.jit.load reads it (import.cpp):
      ARCHIVE/data.pkl    the root module pickled: each module an object of a class
          __torch__.<module>.<Class> whose state is the dict of its attributes; each tensor
          torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) with the storage
          the persistent id ('storage', torch.<Type>Storage, key, device, numel)
      ARCHIVE/data/<key>  the storage's bytes (little-endian; ARCHIVE/byteorder says so)
      ARCHIVE/code/<module, / for .>.py  the class declarations in Python syntax, parsed only:
          __parameters__ and __buffers__ name the attributes that make up the state dict.
    A module class with its own __setstate__ keeps a state that is not its attributes: refused.
    Anything else unexpected raises ValueError or pickle.UnpicklingError with a one-line reason."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        archive = names[0].split("/")[0]  # every record sits under one folder
        if f"{archive}/byteorder" in names and z.read(f"{archive}/byteorder").strip() != b"little":
            raise ValueError("the archive stores big-endian tensors")
        storages = {}

        def read_storage(key, dtype):
            if key not in storages:
                data = bytearray(z.read(f"{archive}/data/{key}"))
                flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                storages[key] = flat
            return storages[key]

        with z.open(f"{archive}/data.pkl") as f:
            root = ArchiveUnpickler(f, read_storage).load()
        classes = {}  # qualified class name -> its declaration (ast.ClassDef)
        code = f"{archive}/code/"
        for name in names:
            if name.startswith(code) and name.endswith(".py"):
                module = name[len(code):-len(".py")].replace("/", ".")
                for node in ast.parse(z.read(name).decode()).body:
                    if isinstance(node, ast.ClassDef):
                        classes[f"{module}.{node.name}"] = node
    state_dict = {}
    add_module_state(root, classes, "", state_dict)
    return state_dict


def is_script_module(obj, classes):
    """an object of a TorchScript class declared as `class Name(Module)`"""
    if not isinstance(obj, ScriptObject):
        return False
    if obj.qualname not in classes:
        raise ValueError(f"class {obj.qualname} is not declared in the archive")
    bases = classes[obj.qualname].bases
    return any(isinstance(base, ast.Name) and base.id == "Module" for base in bases)


def add_module_state(module, classes, prefix, state_dict):
    """A module's parameters, then its buffers, then its submodules' (nn.Module.state_dict's
    order), into state_dict under prefix."""
    if not is_script_module(module, classes):
        raise ValueError(f"{prefix or 'the root'} is not a module")
    lists = {"__parameters__": [], "__buffers__": []}
    for stmt in classes[module.qualname].body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "__setstate__":
            raise ValueError(f"class {module.qualname} restores its state with its own code "
                             "(__setstate__)")
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if isinstance(target, ast.Name) and target.id in lists:
                lists[target.id] = ast.literal_eval(stmt.value)
    attributes = getattr(module, "state", None)
    if not isinstance(attributes, dict):
        raise ValueError(f"module {module.qualname} has no attributes")
    for name in lists["__parameters__"] + lists["__buffers__"]:
        value = attributes.get(name)
        if value is not None and not torch.is_tensor(value):
            raise ValueError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
        if value is not None:
            state_dict[prefix + name] = value
    for name, value in attributes.items():
        if is_script_module(value, classes):
            add_module_state(value, classes, f"{prefix}{name}.", state_dict)


# ----------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(checkpoint, path):
    """Atomic: write a temp file, fsync, rename over the old one. A crash or a full disk leaves the
    previous checkpoint as it was; non-finite weights are never written."""
    for name, t in checkpoint["model"].items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SystemExit(f"error: not saving {path}: weight '{name}' is not finite; {kept_checkpoint(path)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_atomic(checkpoint, path, f"{kept_checkpoint(path)}: free space there or choose another out_dir")


def save_atomic(obj, path, kept):
    """torch.save through a temp file beside path, fsync and a rename: a crash, Ctrl-C or a full
    disk leaves what was at path as it was, and no temp file. A failed write is one line that
    ends with `kept` (what the user still has)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.isfile(tmp):  # (a folder of that name stays)
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        # torch.save's zip writer turns a failed write (a full disk) into a RuntimeError whose
        # context is the OSError
        cause = e if isinstance(e, OSError) else e.__context__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else f"{e}".split("\n")[0]
        where = tmp if os.path.isdir(tmp) else path  # a folder of the temp file's name, not path, is in the way
        raise SystemExit(f"error: could not write {where} ({reason}); {kept}") from None


def check_finite(module, source):
    """a loaded model whose weights hold NaN or inf (a checkpoint saved after training diverged)
    is one line naming the file (source, as the message shows it) and the first such weight"""
    bad = [k for k, t in module.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise CheckpointError(f"{source} has non-finite (NaN/inf) weights, first in {bad[0]}: use a "
                              f"checkpoint saved before training diverged")


def resume_checkpoint(path, config, may_change, entries=()):
    """--resume=True: read the run's checkpoint, and refuse it when it lacks one of the script's
    `entries` or when a setting outside `may_change` has another value than the checkpoint's
    `config` (the continued run would then not be the uninterrupted one): one line names each.
    -> the checkpoint"""
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume=True but there is no checkpoint at {path}: start without --resume")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    missing = missing_entries(ckpt, entries)
    if missing:
        raise SystemExit(f"error: {path} is not this script's training checkpoint (no {', '.join(missing)}): "
                         f"start without --resume or in another out_dir")
    for key, kind, expected in (("config", dict, "a dict"), ("iter_num", int, "an int")):
        if not isinstance(ckpt[key], kind):  # edited by hand, or another program's file
            raise SystemExit(f"error: {path}: its '{key}' is a {type(ckpt[key]).__name__}, not {expected}: "
                             "not this script's training checkpoint")
    saved = ckpt["config"]
    changed = [k for k in sorted(config)
               if k in saved and k not in may_change and saved[k] != config[k]]
    if changed:
        diff = ", ".join(f"{k} {saved[k]!r} -> {config[k]!r}" for k in changed)
        raise SystemExit(f"error: --resume=True with settings that change the run: {diff}; resume "
                         f"with the checkpoint's values, or start a new run in another out_dir")
    return ckpt


def weights_fingerprint(module, settings=None):
    """SHA-256 of a module's state (names, dtypes, shapes and bytes) and of `settings` (a dict of plain
    values: what the weights do not tell, such as a CLIP file's activation), in hex: the same model
    gives the same fingerprint wherever it is read from, and one changed in place gives another"""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        flat = t.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def refuse_changed_targets(ckpt, fingerprint, source):
    """--resume=True: the checkpoint's `target_fingerprint` (weights_fingerprint of the teacher or
    tokenizer when the run started; none in older checkpoints) must be `fingerprint`, that of `source`
    as read now: a file retrained or replaced in place would change the targets mid-run. One line."""
    if ckpt.get("target_fingerprint", fingerprint) != fingerprint:
        raise SystemExit(f"error: --resume=True but {source} has other weights than when this run started "
                         f"(retrained or replaced in place): its targets would change mid-run; resume with "
                         f"the original weights, or start a new run in another out_dir")


def train_split_summary(dataset):
    """what a run's checkpoint keeps of its train split, for --resume=True: its image count (the
    schedule's iterations per epoch follow from it) and its class folders (a classifier's labels)"""
    return dict(images=len(dataset), classes=list(dataset.classes))


def refuse_changed_split(ckpt, dataset, train_dir):
    """--resume=True: the train split must have the image count and class folders it had when the run
    started (the checkpoint's `train_split`; older checkpoints have none, or only a fine-tune's `classes`):
    otherwise the schedule, or the labels, would change mid-run. One line."""
    saved = ckpt.get("train_split")
    if not isinstance(saved, dict):
        saved = {"classes": ckpt["classes"]} if isinstance(ckpt.get("classes"), list) else {}
    now = train_split_summary(dataset)
    changed = []
    if "images" in saved and saved["images"] != now["images"]:
        changed.append(f"{saved['images']} images -> {now['images']} (the schedule would change)")
    if "classes" in saved and saved["classes"] != now["classes"]:
        added = sorted(set(now["classes"]) - set(saved["classes"]))
        removed = sorted(set(saved["classes"]) - set(now["classes"]))
        change = "; ".join(f"{what} {', '.join(names)}"
                           for what, names in (("added", added), ("removed", removed)) if names)
        changed.append(f"class folders changed ({change or 'renamed'}: the labels would change)")
    if changed:
        raise SystemExit(f"error: --resume=True but the train split {train_dir} is not the one the "
                         f"run started with: {'; '.join(changed)}; restore it, or start a new run "
                         "in another out_dir")


# what train_md.py / finetune.py and train_vqkd.py save in out_dir
RUN_CHECKPOINTS = ("ckpt.pt", "tokenizer.pt")


def missing_entries(ckpt, entries=()):
    """the entries a script's training checkpoint holds (config, iter_num, optimizer and the
    script's own `entries`) that `ckpt` lacks"""
    needed = ("config", "iter_num", "optimizer", *entries)
    return [key for key in needed if not isinstance(ckpt, dict) or key not in ckpt]


def refuse_overwrite(path, entries=()):
    """A new run (no --resume) saves its checkpoint at `path`: where a file is there already, from
    an earlier run, it would be replaced and that run lost; where another script's run is in the
    folder, its log.jsonl would be. One line, before any work: --resume=True is advised only where
    the file is this script's training checkpoint (it holds the script's resume `entries`)."""
    if os.path.exists(path):
        try:
            missing = missing_entries(read_checkpoint(path), entries)
        except CheckpointError as e:
            raise SystemExit(f"error: {path} exists and a new run would replace it, but it cannot be "
                             f"resumed ({e}): move it, or choose another out_dir") from None
        if missing:  # another script's checkpoint (finetune.py's ckpt.pt in train_md.py's out_dir)
            raise SystemExit(f"error: {path} exists and is not this script's training checkpoint (no "
                             f"{', '.join(missing)}): a new run would replace it: choose another out_dir")
        raise SystemExit(f"error: {path} exists (an earlier run's checkpoint) and a new run would replace it: "
                         f"continue that run with --resume=True, or choose another out_dir")
    for name in RUN_CHECKPOINTS:
        other = os.path.join(os.path.dirname(path), name)
        if os.path.exists(other):
            raise SystemExit(f"error: {other} exists (another script's run) and a new run in its "
                             "folder would replace its log.jsonl: choose another out_dir")


def resume_from(ckpt, path, optimizer, **modules):
    """Load a checkpoint's state: each module from the entry of its name, and the optimizer; an
    entry that does not fit (another model, or a file edited by hand) is one line."""
    for key, target in [*modules.items(), ("optimizer", optimizer)]:
        try:
            target.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            # torch's message: a heading line, then one line per problem (size mismatch for KEY:
            # ...)
            problems = [line.strip() for line in str(e).splitlines() if line.strip()]
            if problems and problems[0].startswith("Error(s) in loading state_dict"):
                problems = problems[1:]
            reason = (problems[0] if problems else type(e).__name__)[:300]
            if len(problems) > 1:
                reason += f"; {len(problems) - 1} more"
            raise SystemExit(f"error: {path}: its '{key}' does not fit this run ({reason}): start without "
                             f"--resume or in another out_dir") from None


# ----------------------------------------------------------------------------------------
# stopping on a signal

def stop_signals():
    """SIGTERM (what a scheduler sends before preemption; torchrun passes it on) no longer ends the
    process at once: it appends its number to the returned list, which the training loop reads once
    per iteration to save the finished step and stop. Ctrl-C still stops at once until the loop
    starts (save_on_ctrl_c): a Ctrl-C during start-up writes no checkpoint."""
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    return received


def save_on_ctrl_c(received):
    """Call as the training loop starts: from here a first Ctrl-C (SIGINT) also appends to
    stop_signals' list (the loop saves the finished step and stops) and says so on stderr; a second
    one stops at once (KeyboardInterrupt), losing the step in progress."""
    def on_ctrl_c(signum, frame):
        if signum in received:
            raise KeyboardInterrupt
        if os.environ.get("RANK", "0") == "0":
            os.write(2, b"\nCtrl-C: the run saves and stops after this step (Ctrl-C again: at once)\n")
        received.append(signum)

    signal.signal(signal.SIGINT, on_ctrl_c)


def stopped_by(received, ctx):
    """the signal a run stops on, from stop_signals' list, agreed by all ranks (one may have had the
    signal alone): ('Ctrl-C', 130) if one came to any, else ('SIGTERM', 143); 128 + the signal number
    is the shell's code for a process it ended"""
    return ("Ctrl-C", 130) if ctx.any_rank(signal.SIGINT in received) else ("SIGTERM", 143)


# ----------------------------------------------------------------------------------------
# throughput and MFU

PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peak by GPU name
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A6000": 155e12, "4090": 165e12, "3090": 71e12,
}


def peak_flops(device):
    """The device's peak bf16 FLOP/s, or None when unknown (then no MFU is shown)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class Meter:
    """Throughput and MFU over the last logging interval, of all processes together: read() gets the
    images every process read (summed over the ranks by Context.log_values), so MFU divides by the
    peak of one device times the processes."""

    def __init__(self, flops_per_image, peak, iter_num=0, processes=1):
        """peak: FLOP/s of one device (None: unknown); iter_num: the iteration the run starts from (a
        resumed run's checkpoint); processes: the world size, one device each"""
        self.flops_per_image, self.peak = flops_per_image, peak * processes if peak else None
        self.t0, self.iter_num = time.time(), iter_num

    def read(self, iter_num, images):
        """-> (text, numbers) since the last read, iter_num the iteration now and images those
        all the processes read since the last read: numbers = {ms_per_iter,
        img_per_s, and mfu in % where the peak is known}; the text shows the same numbers. The
        iterations are counted from the last read's iter_num, as the first interval after a resume is
        shorter than log_interval where the checkpoint's iteration is not a multiple of it."""
        dt = max(time.time() - self.t0, 1e-9)
        iters = iter_num - self.iter_num
        numbers = dict(ms_per_iter=1000 * dt / max(iters, 1), img_per_s=images / dt)
        text = f"{numbers['ms_per_iter']:.0f} ms/iter, {numbers['img_per_s']:.1f} img/s"
        if self.peak:
            numbers["mfu"] = 100 * numbers["img_per_s"] * self.flops_per_image / self.peak
            text += f", MFU {numbers['mfu']:.1f}%"
        self.t0, self.iter_num = time.time(), iter_num
        return text, numbers

    def leave_out(self, seconds):
        """time spent between steps on other work (evaluation, the sharpness, a checkpoint) is not
        counted in the interval's ms/iter and img/s"""
        self.t0 += seconds


def handing_over_a_batch(error):
    """True for a broken connection of Python's multiprocessing: a loader worker hands each batch's
    shared memory to this process over one (multiprocessing/resource_sharer.py, connection.py), and
    one killed mid-handover raises this before torch's own check sees the worker gone. A dataset's
    own ConnectionError reaches this process re-raised by torch, without these frames."""
    files = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
    return isinstance(error, (ConnectionError, EOFError)) and any(
        os.path.basename(os.path.dirname(f)) == "multiprocessing"
        and os.path.basename(f) in ("connection.py", "resource_sharer.py") for f in files)


# the errors lost_worker_line may name: the scripts catch these around main()
LOST_PROCESS_ERRORS = (RuntimeError, ConnectionError, EOFError)


def lost_worker_line(error):
    """The one line for torch's DataLoader error when a loader worker died (the kernel's OOM killer,
    a signal) or for the broken connection of one that died handing over a batch, or for a collective
    whose peer process is gone (under torchrun: another rank stopped on an error it printed), or None
    for any other error"""
    text = f"{error}"
    peer_gone = "Connection closed by peer" in text or "Connection reset by peer" in text  # gloo's words
    if handing_over_a_batch(error):  # the worker died as this process fetched its batch's shared memory
        lost = f"DataLoader worker lost while handing over a batch ({type(error).__name__}: {text})"
    elif isinstance(error, dist.DistBackendError) or (isinstance(error, RuntimeError) and peer_gone):
        return "error: another process of this torchrun job stopped (its error is above); this one stops too"
    elif isinstance(error, RuntimeError) and text.startswith("DataLoader worker"):
        lost = text.splitlines()[0]
    else:
        return None
    return (f"error: {lost} (out of memory? lower --num_workers or --micro_batch_size); "
            f"continue from the last checkpoint with --resume=True")


def stopped_early(result):
    """' (stopped at iteration i of n)' for finetune.py's result.json of a run --stop_iter ended
    early (iter_num < max_iters; files without max_iters ran to their end), else ''"""
    if result["iter_num"] < result.get("max_iters", result["iter_num"]):
        return f" (stopped at iteration {result['iter_num']} of {result['max_iters']})"
    return ""


def write_error(path, e):
    """the one line for an OSError e while writing path (a full disk, a file size limit)"""
    # not: a folder of that name, no permission
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    fix = "free space there or write to another folder" if full else "write to another folder"
    return f"error: could not write {path} ({e.strerror or e}): {fix}"


def write_atomic(path, data):
    """Write data (text, or bytes) to path through a temp file and a rename: a crash or a full disk
    leaves the old file as it was (and no temp file); a failed write is one line."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.isfile(tmp):  # (a folder of that name stays)
            os.remove(tmp)
        raise SystemExit(write_error(path, e)) from None


def save_figure(fig, path, dpi):
    """fig as a PNG at path, rendered in memory and written by write_atomic: a full disk, a file size
    limit or a kill while writing leaves an older figure of that name whole"""
    png = io.BytesIO()
    fig.savefig(png, dpi=dpi, format="png")
    write_atomic(path, png.getvalue())


def append_jsonl(path, record, wandb_run=None):
    """Append one record (a dict with 'iter') to path as a line of JSON, written and closed at once,
    so a killed run loses at most a truncated last line; also to the W&B run when there is one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise SystemExit(write_error(path, e)) from None
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])


def trim_log(path, last_iter):
    """Keep the records of path up to iteration last_iter, the checkpoint a run starts from (0 for a
    new run: the file starts afresh). A killed run may have logged past its last checkpoint and left
    a truncated last line; both go, so the resumed run appends without duplicates."""
    if not os.path.exists(path):
        return
    kept = []
    try:
        f = open(path, errors="replace")
    except OSError as e:  # e.g. a folder of that name
        raise SystemExit(f"error: could not read {path} ({e.strerror or e}): move it away or choose another "
                         f"out_dir") from None
    with f:
        for line in f:
            try:
                keep = json.loads(line)["iter"] <= last_iter
            except (ValueError, KeyError, TypeError):  # the cut-off line of a killed run
                continue
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept))


def wandb_init(master, wandb_log, project, run_name, config):
    """The Weights & Biases run (master process only) when wandb_log, else None. Asked for but not
    installed, or a run wandb cannot start (no API key, no connection): one line, before any work."""
    if not wandb_log:
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --wandb_log=True needs the wandb package: pip install wandb, "
                         "or drop --wandb_log") from None
    if not master:
        return None
    try:
        return wandb.init(project=project, name=run_name, config=config)
    except wandb.errors.Error as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: --wandb_log=True but wandb cannot start a run ({reason}): run `wandb login`, "
                         f"or set WANDB_MODE=offline, or drop --wandb_log") from None


def log(ctx, *args):
    if ctx.master:
        print(*args, flush=True)


class StdoutThatMayClose:
    """sys.stdout for a long run: when its reader goes away (`| head`, a closed ssh session), the
    run goes on writing to /dev/null, with one warning on stderr, instead of stopping on a
    BrokenPipeError; log.jsonl keeps every record."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.drop()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.drop()

    def drop(self):
        """point the file descriptor at /dev/null: what the stream still buffers goes there too"""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)
        os.write(2, b"warning: stdout was closed; the run goes on, its log lines are in log.jsonl\n")

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the stream's
        return getattr(self.stream, name)


def pyplot():
    """matplotlib's pyplot (headless), or None where the optional extra is not installed"""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------
# the output directory

def check_out_dir(out_dir):
    """Make out_dir and write a file in it, before any work: an out_dir that is a file, or where
    nothing can be written (permissions, read-only disk), stops with one line.
    -> whether this call made out_dir"""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: out_dir '{out_dir}' is a file, not a directory: "
                         "choose another out_dir")
    made = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise SystemExit(f"error: cannot write to out_dir '{out_dir}' ({e.strerror or e}): "
                         "choose a writable out_dir") from None
    return made


def lock_out_dir(out_dir):
    """Claim out_dir for this run, before any work: check_out_dir (made, writable), then a second
    run on it is refused with one line while this process lives. A POSIX lock (fcntl) on
    out_dir/run.lock, which the OS drops when the process ends however it ends (kill -9 included),
    and which forked workers do not hold. The file stays open until the process exits (its exit
    handler holds it); open run.lock nowhere else (closing any descriptor of the file drops a POSIX
    lock). Call it on the master process only. At exit the process removes run.lock, and out_dir
    too where this call made it and the run left nothing in it (a start that failed). A folder where
    a checkpoint's temporary file goes (save_atomic) is refused here, not at the first save."""
    import fcntl
    made = check_out_dir(out_dir)
    for name in RUN_CHECKPOINTS:
        tmp = os.path.join(out_dir, name + ".tmp")
        if os.path.isdir(tmp):
            raise SystemExit(f"error: {tmp} is a folder; the run writes {name} through a file of that name: "
                             "move the folder or choose another out_dir")
    path = os.path.join(out_dir, "run.lock")
    while True:
        try:
            f = open(path, "a+")
        except OSError as e:  # e.g. a folder of that name
            raise SystemExit(write_error(path, e)) from None
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise SystemExit(f"error: out_dir '{out_dir}' is in use by a running run ({holder}): "
                             "wait for it to end or choose another out_dir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise SystemExit(write_error(path, e)) from None
            # NFS without its lock daemon, Lustre without flock: the run goes on, unguarded
            print(f"warning: out_dir '{out_dir}' cannot be locked ({e.strerror}: its filesystem "
                  "has no POSIX locks): a second run started on it would not be refused",
                  file=sys.stderr)
        try:
            still_there = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            still_there = False
        if still_there:
            break
        f.close()  # the run that held it removed the file as it ended: lock the new one
    try:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
    except OSError as e:
        f.close()
        raise SystemExit(write_error(path, e)) from None
    atexit.register(release_out_dir, f, out_dir, made, os.getpid())
    return f


def release_out_dir(lock, out_dir, made, owner):
    """At exit (atexit, this process only, not forked workers): remove run.lock while still holding
    it, so that a run waiting on the old file sees it gone, then let go; then out_dir if `made` and
    now empty."""
    if os.getpid() != owner:
        return
    try:
        os.unlink(os.path.join(out_dir, "run.lock"))
    except OSError:  # removed by hand
        pass
    if made:
        try:
            os.rmdir(out_dir)  # only an empty folder: anything the run wrote keeps it
        except OSError:
            pass
    lock.close()
