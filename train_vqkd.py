"""
The VQ-KD tokenizer of BEiT v2 (the paper's Table 1, VQ-KD column): discrete codes that MD can
predict instead of whitened features (Section 5, "should we employ a tokenizer?").

    python train_vqkd.py config/vqkd_embedded.py            # embedded dataset, CPU, minutes
    torchrun --nproc_per_node=8 train_vqkd.py --teacher=clip
then MD on the codes (cross-entropy on masked patches):
    python train_md.py config/md_embedded.py --target=vqkd --tokenizer=out/vqkd_embedded/tokenizer.pt

The log line adds codebook usage (fraction of codes used since the last line, by all ranks) and
perplexity; a usage under collapse_threshold is reported as a collapse. Every log line is also a record
in out_dir/log.jsonl (analyze.py --metric curves).

The codebook moves by an EMA once per forward: one process with accumulation updates it after each
micro-batch, torchrun once per micro-step over all ranks' codes, so the two differ (unlike train_md.py
and finetune.py, where the same total batch gives the same weights).
"""
import signal
SIGINT_AT_START = signal.getsignal(signal.SIGINT)  # put back after the imports
if SIGINT_AT_START is signal.default_int_handler:  # Ctrl-C while torch loads ends it, without a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import os
import sys

import torch
from tqdm import tqdm

from common import (CheckpointError, Context, Meter, StdoutThatMayClose, accumulation_steps, append_jsonl,
                    apply_overrides, cosine_lr, derived_seed, lock_out_dir, log, lost_worker_line, micro_batches,
                    option_error, peak_flops, record_nonfinite, refuse_changed_targets, refuse_overwrite,
                    refuse_changed_split, resume_checkpoint, resume_from, save_checkpoint,
                    save_on_ctrl_c, schedule_lengths, stop_if_nonfinite, stop_signals, stopped_by,
                    train_split_summary, trim_log, wandb_init, warmup_warning, weights_fingerprint,
                    wrap_for_training, LOST_PROCESS_ERRORS)
from data import DataError, ImageFolder, TrainTransform, make_loader, resolve_data_dir
from model import PRESETS, ViTConfig
from teacher import load_teacher
from vqkd import VQKD, codebook_usage
signal.signal(signal.SIGINT, SIGINT_AT_START)  # as it was: from here Ctrl-C raises KeyboardInterrupt

# -----------------------------------------------------------------------------
# defaults (override with a config file and/or --key=value)
out_dir = "out/vqkd"          # tokenizer.pt goes here
data_dir = "data/imagenet"    # ImageFolder root with train/; 'embedded' = the generated demo set
num_workers = 8               # DataLoader workers per process
log_interval = 20             # iterations between log lines (with codebook usage)
wandb_log = False             # also send the records of log.jsonl to W&B (needs pip install wandb)
wandb_project = "mdlab"       # W&B project
wandb_run_name = "vqkd"       # W&B run name
save_interval = 1000          # iterations between checkpoints (and at the end)
resume = False                # continue from out_dir/tokenizer.pt
stop_iter = 0                 # stop (and save) after this iteration, schedule unchanged; 0 = run to the end
teacher = "clip"              # clip | dino | deit | embedded | checkpoint path: features to reconstruct
teacher_path = ""             # local copy of the official teacher file
model = "B/16"                # encoder size preset
img_size = 224                # input resolution
codebook_size = 8192          # K codes
code_dim = 32                 # code vector size (l2-normalized)
decoder_depth = 1             # decoder blocks
ema_decay = 0.99              # codebook EMA
dead_threshold = 0.05         # restart codes used at under this fraction of the uniform rate
commitment = 1.0              # beta: weight of the mean of (z - q)^2, as BEiT v2's
collapse_threshold = 0.1      # report a collapse when fewer than this fraction of codes were used
epochs = 100                  # Table 1, VQ-KD column
warmup_epochs = 5
total_batch_size = 512
micro_batch_size = 64
lr = 2e-4
min_lr = 1e-5
weight_decay = 1e-4
beta1 = 0.9
beta2 = 0.99
grad_clip = 0.0               # none in Table 1
min_crop_scale = 0.08         # RandomResizedCrop scale; no color jitter (Table 1)
seed = 0
device = "auto"
dtype = "bfloat16"            # autocast: bfloat16 | float32 | float16 (loss scaled; V100, T4)
compile = False               # torch.compile the tokenizer
backend = ""
# -----------------------------------------------------------------------------
# settings a resumed run may change: they decide where, how fast and how often to report, not
# what is computed (device, compile and backend change float rounding only; a moved data_dir is
# checked by refuse_changed_split); resume refuses others
RESUME_MAY_CHANGE = ("out_dir", "data_dir", "resume", "stop_iter", "wandb_log", "wandb_project",
                     "wandb_run_name", "save_interval", "log_interval", "num_workers", "device",
                     "compile", "backend", "teacher_path", "collapse_threshold")
# the checkpoint entries --resume reads, besides config, iter_num and optimizer
RESUME_ENTRIES = ("model", "counts")


def main():
    # -------------------------------------------------------------------------
    # options, all checked here before any work; then the checkpoint to resume, if any
    patch_size = ViTConfig.from_name(model).patch_size if model in PRESETS else 1
    problem = option_error(config, [
        (codebook_size >= 1, f"--codebook_size={codebook_size} must be >= 1"),
        (code_dim >= 1, f"--code_dim={code_dim} must be >= 1"),
        (decoder_depth >= 0, f"--decoder_depth={decoder_depth} must be >= 0 (0: a linear decoder)"),
        (0 <= collapse_threshold <= 1, f"--collapse_threshold={collapse_threshold} must be in "
                                       "[0, 1] (a fraction of the codes)"),
        (model in PRESETS, f"unknown model size '{model}': choose one of {', '.join(PRESETS)}"),
        (img_size % patch_size == 0, f"--img_size={img_size} is not a multiple of the patch size "
                                     f"{patch_size} of {model}: the patches must tile the image"),
    ])
    if problem:
        raise SystemExit(f"error: {problem}")
    path = os.path.join(out_dir, "tokenizer.pt")
    if not resume:  # a new run must not replace an earlier run's checkpoint
        refuse_overwrite(path, RESUME_ENTRIES)
    ckpt = resume_checkpoint(path, config, RESUME_MAY_CHANGE, RESUME_ENTRIES) if resume else None
    stop_signal = stop_signals()  # from here a SIGTERM only sets this flag; the loop saves and stops
    ctx = Context(device, dtype, backend)
    if ctx.master:  # before any work: out_dir is writable and no other run uses it
        lock_out_dir(out_dir)  # held until this process ends
    # after the out_dir checks: a refused start makes no W&B run
    wandb_run = wandb_init(ctx.master, wandb_log, wandb_project, wandb_run_name, config)
    accum = accumulation_steps(total_batch_size, micro_batch_size, ctx.world_size)
    torch.manual_seed(seed)
    try:
        cfg = ViTConfig.beit_v2(model, img_size=img_size)
        train_transform = TrainTransform(img_size, min_crop_scale, 0.5, 0.0)
        train_dir = os.path.join(resolve_data_dir(data_dir), "train")
        train_set = ImageFolder(train_dir, train_transform, None, seed)
        teacher_model = load_teacher(teacher, teacher_path or None).to(ctx.device)
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    source_cfg = teacher_model.vit.config
    if source_cfg.img_size != img_size or source_cfg.patch_size != cfg.patch_size:  # targets are per patch
        raise SystemExit(f"error: the teacher {teacher!r} takes {source_cfg.img_size} px / patch "
                         f"{source_cfg.patch_size}, the tokenizer {img_size} px / patch {cfg.patch_size}: "
                         f"the patch grids must match")
    teacher_fingerprint = weights_fingerprint(teacher_model, source_cfg.to_dict())
    if resume:
        refuse_changed_targets(ckpt, teacher_fingerprint, f"the teacher {teacher!r}")
        refuse_changed_split(ckpt, train_set, train_dir)
    vq = VQKD(cfg, teacher_model.out_dim, codebook_size, code_dim, decoder_depth, ema_decay, dead_threshold)
    vq = vq.to(ctx.device)
    other_params = [(n, p) for n, p in vq.named_parameters() if not n.startswith("encoder.")]
    optimizer = vq.encoder.configure_optimizers(weight_decay, lr, (beta1, beta2), extra=other_params)
    # float16: the loss is scaled up before backward so that small gradients do not round to 0,
    # and a step whose gradients overflow is skipped with the scale halved; bfloat16, float32:
    # a pass-through
    scaler = torch.amp.GradScaler(ctx.device_type, enabled=dtype == "float16")
    loader, sampler = make_loader(train_set, micro_batch_size, True, ctx.rank, ctx.world_size, seed, num_workers)
    iters_per_epoch, max_iters, warmup_iters, end_iter = schedule_lengths(
        sampler, micro_batch_size, accum, epochs, warmup_epochs, stop_iter)
    iter_num = 0
    if resume:
        # float16: the loss scale goes on
        scaled = dict(scaler=scaler) if scaler.is_enabled() else {}
        resume_from(ckpt, path, optimizer, model=vq, **scaled)
        iter_num = ckpt["iter_num"]
        log(ctx, f"resumed from {path} at iteration {iter_num}")
        if iter_num >= end_iter:
            log(ctx, f"nothing to do: the checkpoint is at iteration {iter_num}, "
                     f"this run ends at {end_iter}")
            ctx.close()
            return
    log_path = os.path.join(out_dir, "log.jsonl")  # a JSON record per log line
    if ctx.master:  # a new run starts it afresh; a resumed one drops records past its checkpoint
        trim_log(log_path, iter_num)
    train_model = wrap_for_training(vq, ctx, compile)  # compiled and/or DDP; vq is saved

    def checkpoint(all_counts):
        """the run after iteration iter_num, as plain data (torch.load(weights_only=True) reads it)"""
        return dict(model=vq.state_dict(), vqkd_args=vq.config, model_args=cfg.to_dict(), config=config,
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
                    counts=all_counts.cpu(),
                    target_fingerprint=teacher_fingerprint,
                    train_split=train_split_summary(train_set))

    log(ctx, f"VQ-KD: teacher {teacher} -> {model} encoder, {codebook_size} x {code_dim} codebook, "
             f"{len(train_set)} images, {iters_per_epoch} iters/epoch, {max_iters} iters, accumulation {accum}, "
             f"{ctx.world_size} process(es) on {ctx.device}")
    warning = warmup_warning(warmup_epochs, epochs, warmup_iters, max_iters)
    if warning:
        log(ctx, warning)
    flops = 3 * vq.encoder.flops_per_image() + teacher_model.vit.flops_per_image()  # encoder fwd+bwd, teacher fwd
    meter = Meter(flops, peak_flops(ctx.device), iter_num, ctx.world_size)

    # -------------------------------------------------------------------------
    # training loop
    batches = micro_batches(loader, sampler, iter_num, accum, iters_per_epoch)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    nonfinite = torch.full((3,), -1.0, dtype=torch.float64, device=ctx.device)  # checked at log lines only
    # this rank's code assignments since the last log line, summed over the ranks where read (log, save): a
    # resumed run continues the checkpoint's sum (on rank 0), whose iteration need not be a multiple of log_interval
    counts = torch.zeros(codebook_size, device=ctx.device)
    if resume and ctx.master:
        counts = ckpt["counts"].to(ctx.device)
    skipped = images_read = 0  # this process's unreadable, read training images since the log line
    loss = torch.tensor(float("nan"))  # the last micro-batch's loss, shown at log lines (none read yet)
    # under DDP a rank that read no image of a micro-batch runs this batch of zeros (images, teacher features)
    # with a loss that counts 0 and no part in the codebook: the other ranks' all-reduces wait for it
    stand_in = (torch.zeros(micro_batch_size, 3, img_size, img_size, device=ctx.device),  # (B, 3, H, W)
                torch.zeros(micro_batch_size, cfg.num_patches, teacher_model.out_dim, device=ctx.device))  # (B, N, D_t)
    bar = tqdm(total=end_iter, initial=iter_num, disable=None if ctx.master else True, desc="VQ-KD",
               dynamic_ncols=True)
    vq.train()
    save_on_ctrl_c(stop_signal)  # from here a first Ctrl-C saves the finished step
    while iter_num < end_iter:
        lr_now = cosine_lr(iter_num, max_iters, warmup_iters, lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr_now * group["lr_scale"]
        readable = 0  # images of this step that could be read
        for micro_step in range(accum):
            images, _, _, n_skipped = next(batches)
            # this micro-step's random draws (codebook init and restarts) follow from (seed,
            # iteration, micro-step): a resumed run draws what the uninterrupted run drew; the
            # same on every rank, as the codebook must be
            torch.manual_seed(derived_seed(seed, iter_num, micro_step))
            skipped += n_skipped
            if ctx.ddp:  # sync gradients on the last micro-step only
                train_model.require_backward_grad_sync = micro_step == accum - 1
            if images is None:  # every image of this micro-batch was unreadable
                if ctx.ddp:  # under autocast, as the real batches
                    with ctx.autocast():
                        stand_in_loss = train_model(*stand_in, commitment, 0.0)[0]
                    (stand_in_loss * 0).backward()
                continue
            readable += len(images)
            images = images.to(ctx.device, non_blocking=True)
            targets = teacher_model(images)[:, 1:]  # (B, N, D_t) teacher patch features
            with ctx.autocast():
                loss, codes = train_model(images, targets, commitment)  # reconstruction + commitment
            counts.add_(torch.bincount(codes.flatten(), minlength=codebook_size))
            nonfinite = record_nonfinite(nonfinite, loss, iter_num, 0)
            scaler.scale(loss / accum).backward()
            images_read += len(images)
        if not ctx.any_rank(readable > 0):  # no rank read an image in a whole step: the train split is unreadable
            stop_if_nonfinite(nonfinite, path, scaler)  # a non-finite step is never saved
            all_counts = ctx.all_reduce_sum(counts.clone())
            if ctx.master and iter_num > 0:  # the finished steps are kept; this one is read again at resume
                save_checkpoint(checkpoint(all_counts), path)
            ctx.barrier()
            then = f"; then continue with --resume=True (checkpoint {path})" if iter_num > 0 else ""
            raise SystemExit(f"error: iteration {iter_num}: none of the {accum * micro_batch_size * ctx.world_size} "
                             f"images of the step could be read (see the warnings): "
                             f"fix the train split under {data_dir}{then}")
        scaler.unscale_(optimizer)  # float16: the true gradients before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        # float16: an overflow skips the step (stop_if_nonfinite watches the scale)
        if not scaler.is_enabled():
            nonfinite = record_nonfinite(nonfinite, grad_norm, iter_num, 1)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        bar.update(1)

        if iter_num % log_interval == 0:
            stop_if_nonfinite(nonfinite, path, scaler)
            all_counts = ctx.all_reduce_sum(counts.clone())
            # over the ranks: mean loss, all skipped
            loss_value, skipped, images_read = ctx.log_values(loss, skipped, images_read)
            if ctx.master:
                bar.set_postfix(loss=f"{loss_value:.4f}")
                speed_text, speed = meter.read(iter_num, images_read)
                line = f"iter {iter_num}: loss {loss_value:.4f}, lr {lr_now:.2e}, {speed_text}"
                if skipped:
                    line += f", {skipped} unreadable images skipped"
                bar.write(line)
                used, perplexity = codebook_usage(all_counts)
                line = (f"iter {iter_num}: codebook usage {100 * used:.1f}% of {codebook_size} codes, "
                        f"perplexity {perplexity:.1f}")
                if used < collapse_threshold:
                    line += f"; COLLAPSE: under {100 * collapse_threshold:.0f}% of the codes in use"
                bar.write(line)
                record = dict(iter=iter_num, epoch=iter_num / iters_per_epoch, loss=loss_value,
                              lr=lr_now, grad_norm=grad_norm.item(), skipped=skipped, **speed,
                              codebook_usage=used, perplexity=perplexity)
                if scaler.is_enabled():
                    record["loss_scale"] = scaler.get_scale()
                append_jsonl(log_path, record, wandb_run)
            counts.zero_()
            skipped = images_read = 0
        # a stop signal seen by any rank: all ranks save this finished step together, then stop
        stop = ctx.any_rank(bool(stop_signal)) and iter_num < end_iter
        if iter_num % save_interval == 0 or iter_num == end_iter or stop:
            stop_if_nonfinite(nonfinite, path, scaler)  # a non-finite step is never saved
            all_counts = ctx.all_reduce_sum(counts.clone())
            if ctx.master:
                save_checkpoint(checkpoint(all_counts), path)
            # a signal during the save: this step is saved, the run stops here
            stop = stop or (ctx.any_rank(bool(stop_signal)) and iter_num < end_iter)
        if stop:
            bar.close()
            signal_name, exit_code = stopped_by(stop_signal, ctx)
            log(ctx, f"stopped by {signal_name} after iteration {iter_num}: checkpoint {path}; "
                     f"continue with --resume=True")
            ctx.barrier()  # the other ranks wait for rank 0's checkpoint
            ctx.close()
            raise SystemExit(exit_code)
    bar.close()
    ended = (f"done: {iter_num} iterations" if iter_num >= max_iters else
             f"stopped at iteration {iter_num} of {max_iters} (--stop_iter)")
    log(ctx, f"{ended}, tokenizer {path}")
    ctx.barrier()  # ranks leave together: one gone mid-save can abort rank 0's gloo (SIGABRT, once in CI)
    ctx.close()


if __name__ == "__main__":
    config = apply_overrides(globals(), sys.argv[1:])
    sys.stdout = StdoutThatMayClose(sys.stdout)  # `| head` does not end the run
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: stop at once with one line (rank 0's); checkpoints are kept
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped by Ctrl-C: the last checkpoint in {out_dir} (if any) is kept; "
                  f"continue with --resume=True", file=sys.stderr)
        raise SystemExit(130)  # 128 + SIGINT
    except LOST_PROCESS_ERRORS as e:  # a lost loader worker or DDP peer: one line, not a traceback
        line = lost_worker_line(e)
        if line is None:
            raise
        raise SystemExit(line) from None
