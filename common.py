"""
The training skeleton shared by train_md.py and finetune.py: --key=value overrides,
torchrun/DDP set-up, the lr schedule, resumable data position, atomic checkpoints, MFU.
"""
import ast
import math
import os
import time

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
    keys = sorted(k for k, v in config.items() if not k.startswith("_") and not k.isupper() and isinstance(v, (bool, int, float, str)))
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
                raise SystemExit(f"error: {arg}: '{key}' must be {type(config[key]).__name__} like the default {config[key]!r}") from None
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"error: config file '{arg}' not found (options are --key=value)")
            file_globals = {}
            exec(open(arg).read(), file_globals)
            for key, value in file_globals.items():
                if key.startswith("_"):
                    continue
                if key not in keys:
                    raise SystemExit(f"error: unknown option '{key}' in {arg}: valid options are {', '.join(keys)}")
                if isinstance(config[key], float) and type(value) is int:
                    value = float(value)
                if type(value) is not type(config[key]):
                    raise SystemExit(f"error: {arg}: '{key}' must be {type(config[key]).__name__}, got {value!r}")
                config[key] = value
    return {k: config[k] for k in keys}


# ----------------------------------------------------------------------------------------
# devices and distributed

class Context:
    """Where this process runs: rank, world size, device, autocast."""

    def __init__(self, device="auto", dtype="bfloat16", backend=""):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.ddp:
            self.rank, self.local_rank, self.world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
            if device.startswith("cuda"):
                device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend or ("nccl" if device.startswith("cuda") else "gloo"))
        else:
            self.rank, self.local_rank, self.world_size = 0, 0, 1
        self.device = device
        self.device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.master = self.rank == 0
        if dtype not in ("float32", "bfloat16", "float16"):
            raise SystemExit(f"error: dtype '{dtype}' must be float32, bfloat16 or float16")
        if dtype == "float16" and self.device_type == "cpu":
            raise SystemExit("error: float16 autocast needs a GPU: use dtype=bfloat16 or float32 on CPU")
        self.dtype = dtype
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None)

    def all_reduce_sum(self, tensor):
        if self.ddp:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self):
        if self.ddp:
            dist.destroy_process_group()


def accumulation_steps(total_batch_size, micro_batch_size, world_size):
    """Gradient accumulation from the total batch: total = micro x world x accum, exactly."""
    per_step = micro_batch_size * world_size
    if total_batch_size % per_step:
        raise SystemExit(f"error: total_batch_size {total_batch_size} is not divisible by micro_batch_size x world size "
                         f"= {micro_batch_size} x {world_size}: choose a total that is a multiple of {per_step}")
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
    return iters_per_epoch, max_iters, warmup_epochs * iters_per_epoch, min(stop_iter, max_iters) if stop_iter else max_iters


def cosine_lr(it, max_iters, warmup_iters, lr, min_lr):
    """linear warmup from 0 to lr, then cosine to min_lr at max_iters"""
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


def train_iteration(ctx, train_model, optimizer, batches, accum, lr_now, grad_clip, step_loss, iter_num, out_dir, meter):
    """One optimizer step: lr = lr_now x each group's lr_scale; `accum` micro-batches with the
    gradient all-reduce only on the last one under DDP; global grad-norm clip; AdamW step.
    step_loss(images, labels, masks) -> scalar loss. A non-finite loss or gradient stops the
    run with one line (the last checkpoint, written before, stays good).
    Returns (loss of the last micro-batch, number of unreadable images skipped)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_now * group["lr_scale"]
    loss, skipped = torch.zeros(()), 0
    for micro in range(accum):
        images, labels, masks, n_skipped = next(batches)
        skipped += n_skipped
        if images is None:
            continue
        if ctx.ddp:
            train_model.require_backward_grad_sync = micro == accum - 1
        to = dict(device=ctx.device, non_blocking=True)
        loss = step_loss(images.to(**to), labels.to(**to), masks.to(**to) if masks is not None else None)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: iteration {iter_num}: loss is {loss.item()}; stopping, the last good checkpoint is in {out_dir}")
        (loss / accum).backward()
        meter.update(len(images) * ctx.world_size)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):
        raise SystemExit(f"error: iteration {iter_num}: gradient norm is {grad_norm.item()}; stopping, the last good checkpoint is in {out_dir}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), skipped


def train_loop(ctx, desc, iter_num, end_iter, schedule, step, meter, log_interval, eval_every, on_eval, hooks=()):
    """The loop both scripts run: step(iter_num, lr) -> (loss, skipped images) is one optimizer
    step (train_iteration); a log line every log_interval; on_eval(iter_num, write) evaluates and
    checkpoints every eval_every iterations and at the end; hooks are (every, fn(iter_num, write))
    run on the master process. A progress bar shows on a terminal, not in logs."""
    from tqdm import tqdm
    skipped = 0
    bar = tqdm(total=end_iter, initial=iter_num, disable=None if ctx.master else True, desc=desc, dynamic_ncols=True)
    while iter_num < end_iter:
        lr_now = schedule(iter_num)
        loss, n_skipped = step(iter_num, lr_now)
        skipped += n_skipped
        iter_num += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if iter_num % log_interval == 0 and ctx.master:
            bar.write(f"iter {iter_num}: loss {loss:.4f}, lr {lr_now:.2e}, {meter.read(log_interval)}"
                      + (f", {skipped} unreadable images skipped" if skipped else ""))
        for every, hook in hooks:
            if every and iter_num % every == 0 and ctx.master:
                hook(iter_num, bar.write)
        if iter_num % eval_every == 0 or iter_num == end_iter:
            on_eval(iter_num, bar.write)
    bar.close()
    return iter_num


# ----------------------------------------------------------------------------------------
# checkpoints

def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(checkpoint, path):
    """Atomic: write a temp file, fsync, rename over the old one. A crash or a full disk leaves the
    previous checkpoint as it was; non-finite weights are never written."""
    for name, t in checkpoint["model"].items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SystemExit(f"error: not saving {path}: weight '{name}' is not finite; the last good checkpoint is kept")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: could not write {path} ({e.strerror or e}); the previous checkpoint is kept") from None


def resume_from(ctx, path, optimizer, **modules):
    """Load a run's checkpoint: each module from the entry of its name, the optimizer, the RNG.
    -> the checkpoint (for iter_num and the rest)."""
    from teacher import read_checkpoint
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume=True but there is no checkpoint at {path}: start without --resume")
    ckpt = read_checkpoint(path)
    for key, module in modules.items():
        module.load_state_dict(ckpt[key])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    log(ctx, f"resumed from {path} at iteration {ckpt['iter_num']}")
    return ckpt


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
    """Throughput and MFU over the last logging interval."""

    def __init__(self, flops_per_image, peak):
        self.flops_per_image, self.peak = flops_per_image, peak
        self.t0, self.images = time.time(), 0

    def update(self, images):
        self.images += images

    def read(self, iters):
        dt = max(time.time() - self.t0, 1e-9)
        ips = self.images / dt
        text = f"{1000 * dt / max(iters, 1):.0f} ms/iter, {ips:.1f} img/s"
        if self.peak:
            text += f", MFU {100 * ips * self.flops_per_image / self.peak:.1f}%"
        self.t0, self.images = time.time(), 0
        return text


def log(ctx, *args):
    if ctx.master:
        print(*args, flush=True)


def pyplot():
    """matplotlib's pyplot (headless), or None where the optional extra is not installed"""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None
