"""
Masked distillation (MD) pretraining:

    L = mean over masked patches of R( N(T(I)), D(S(M(I))) )

T a frozen teacher, N whitening, S the student ViT (masked patches replaced by a mask
token), D a decoder head, M the mask, R the loss. Defaults: the BEiT v2 base column of the
paper's Table 1 (300 epochs, batch 2048, lr 1.5e-3, block masking of 75/196 patches).

Embedded demo (2 CPU cores, no network, about 3 minutes):
    python train_md.py config/md_embedded.py
The paper's run on 8 GPUs (ImageNet in data/imagenet/{train,val}/class/*.JPEG):
    torchrun --nproc_per_node=8 train_md.py --teacher=clip
Resume a stopped run with the same command plus --resume=True. Every log line and evaluation is
also a record in out_dir/log.jsonl (plot: python analyze.py --metric curves out_dir/log.jsonl).
"""
import signal
SIGINT_AT_START = signal.getsignal(signal.SIGINT)  # put back after the imports
if SIGINT_AT_START is signal.default_int_handler:  # Ctrl-C while torch loads ends it, without a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (CheckpointError, Context, Meter, StdoutThatMayClose, accumulation_steps, append_jsonl,
                    apply_overrides, cosine_lr, derived_seed, lock_out_dir, log, lost_worker_line, micro_batches,
                    option_error, peak_flops, record_nonfinite, refuse_changed_targets, refuse_overwrite,
                    refuse_changed_split, resume_checkpoint, resume_from, save_checkpoint,
                    save_on_ctrl_c, schedule_lengths, stop_if_nonfinite, stop_signals, stopped_by,
                    train_split_summary, trim_log, wandb_init, warmup_warning, weights_fingerprint,
                    wrap_for_training, LOST_PROCESS_ERRORS)
from data import DataError, EvalTransform, ImageFolder, TrainTransform, make_loader, resolve_data_dir
from data.masks import BEIT_RATIO, MaskGenerator
from model import DECODER_HEADS, PRESETS, DecoderHead, MDStudent, ViT, ViTConfig
from teacher import WHITENINGS, Whitening, load_teacher
from vqkd import load_tokenizer
signal.signal(signal.SIGINT, SIGINT_AT_START)  # as it was: from here Ctrl-C raises KeyboardInterrupt

# -----------------------------------------------------------------------------
# defaults (override with a config file and/or --key=value)
# I/O
out_dir = "out/md"            # checkpoint ckpt.pt goes here
data_dir = "data/imagenet"    # ImageFolder root with train/ and val/; 'embedded' = the generated demo set
num_workers = 8               # DataLoader workers per process
eval_interval = 2000          # iterations between evaluation + checkpoint (and at the end)
eval_images = 10000           # val images for the MD eval loss, a fixed random subset (0 = all)
log_interval = 20             # iterations between log lines
wandb_log = False             # also send the records of log.jsonl to W&B (needs pip install wandb)
wandb_project = "mdlab"       # W&B project
wandb_run_name = "md"         # W&B run name
resume = False                # continue from out_dir/ckpt.pt
stop_iter = 0                 # stop (and save) after this iteration, schedule unchanged; 0 = run to the end
# targets: whitened teacher features N(T(I)), or the codes of a VQ-KD tokenizer
target = "features"           # features | vqkd (codes of `tokenizer`, cross-entropy; no teacher needed)
tokenizer = ""                # train_vqkd.py's tokenizer.pt, for target=vqkd
teacher = "clip"              # clip | dino | deit | embedded | path to a checkpoint
teacher_path = ""             # local copy of the official teacher file (no download)
teacher_layer = -1            # -1: last block after the final norm; k: raw output of block k (1..depth)
teacher_bf16 = True           # teacher forward under bf16 autocast (it is frozen and runs without grad)
whitening = "ln"              # ln (per-token LayerNorm, no affine, as FD) | bn (per-channel running stats) | none
# student S, head D, loss R, mask M
model = "B/16"                # size preset: Ti/16, S/16, B/16, L/16, tiny/4, nano/4
img_size = 224                # input resolution (student and teacher)
layer_scale = 0.1             # layer scale init (BEiT v2 base)
drop_path = 0.0               # stochastic depth rate
head = "linear"               # decoder head: linear | mlp | transformer
decoder_width = 256           # transformer head: width
decoder_depth = 2             # transformer head: blocks
decoder_heads = 8             # transformer head: attention heads
loss = "smooth_l1"            # smooth_l1 | mse | cosine
smooth_l1_beta = 2.0          # FD's beta
loss_on = "masked"            # masked (MD) | all (every patch; the input is still masked, unlike FD)
mask = "block"                # block (BEiT) | random
mask_ratio = BEIT_RATIO       # fraction of patches masked: 75/196 = 0.383 (BEiT's 75 of 196)
# optimization (paper Table 1, BEiT v2 base column)
epochs = 300                  # schedule length
warmup_epochs = 10            # linear warmup
total_batch_size = 2048       # images per optimizer step over all GPUs and accumulation steps
micro_batch_size = 128        # images per GPU per forward
lr = 1.5e-3                   # peak learning rate
min_lr = 1e-5                 # end of the cosine
weight_decay = 0.05           # AdamW; none on biases, norms, tokens, absolute position tables
beta1 = 0.98                  # AdamW betas as printed in Table 1 (BEiT v2, 300 epochs: 0.9, 0.98)
beta2 = 0.999
grad_clip = 3.0               # max global grad norm; 0 = off
# augmentation
min_crop_scale = 0.2          # RandomResizedCrop scale (0.2, 1)
color_jitter = 0.4            # brightness/contrast/saturation strength
flip = 0.5                    # horizontal flip probability
# system
seed = 0                      # model init, data order, augmentations, masks
device = "auto"               # auto | cpu | cuda | cuda:1 ...
dtype = "bfloat16"            # student autocast bfloat16 | float32 | float16 (loss scaled; V100/T4)
compile = True                # torch.compile the student + head, and the teacher's forward
backend = ""                  # DDP backend; default nccl on GPU, gloo on CPU
# -----------------------------------------------------------------------------

LOSSES = ("smooth_l1", "mse", "cosine")
# settings a resumed run may change: they decide where, how fast and how often to report, not
# what is computed (device, compile and backend change float rounding only; a moved data_dir is
# checked by refuse_changed_split); resume refuses others
RESUME_MAY_CHANGE = ("out_dir", "data_dir", "resume", "stop_iter", "wandb_log", "wandb_project",
                     "wandb_run_name", "eval_interval", "log_interval", "num_workers", "device",
                     "compile", "backend", "teacher_path")
# settings that a target does not read: a resumed run may change them (a tokenizer run has no teacher)
UNREAD_BY_TARGET = dict(features=("tokenizer",),
                        vqkd=("teacher", "teacher_layer", "teacher_bf16", "whitening", "loss", "smooth_l1_beta"))
# the checkpoint entries --resume reads, besides config, iter_num and optimizer
RESUME_ENTRIES = ("model", "decoder", "whitening", "best_val_loss")


def md_loss(pred, targets, masks):
    """R, averaged over the masked patches (loss_on='masked', MD) or over every patch (loss_on='all':
    FD's positions without CLS; the input stays masked). pred (B, N, D_t) or code logits (B, N, K);
    targets (B, N, D_t) whitened teacher features or (B, N) code indices (target='vqkd':
    cross-entropy); masks (B, N) bool, True = masked.
    Training and evaluation both call this: change the objective here."""
    pred = pred.float()
    if target == "vqkd":
        per_patch = F.cross_entropy(pred.transpose(1, 2), targets, reduction="none")  # (B, N)
    elif loss == "smooth_l1":
        per_patch = F.smooth_l1_loss(pred, targets, beta=smooth_l1_beta, reduction="none").mean(-1)
    elif loss == "mse":
        per_patch = F.mse_loss(pred, targets, reduction="none").mean(-1)
    else:  # cosine
        per_patch = 1 - F.cosine_similarity(pred, targets, dim=-1)
    if loss_on == "all":
        return per_patch.mean()
    weights = masks.float()
    return (per_patch * weights).sum() / weights.sum().clamp(min=1)


def main():
    # -------------------------------------------------------------------------
    # options, all checked here before any work; then the checkpoint to resume, if any
    patch_size = ViTConfig.from_name(model).patch_size if model in PRESETS else 1
    choices = (("loss", loss, LOSSES), ("head", head, DECODER_HEADS),
               ("whitening", whitening, WHITENINGS), ("loss_on", loss_on, ("masked", "all")),
               ("target", target, ("features", "vqkd")))
    problem = option_error(config, [
        (target != "vqkd" or tokenizer, "--target=vqkd needs --tokenizer=PATH: the tokenizer.pt that "
                                        "train_vqkd.py writes in its out_dir"),
        (target == "vqkd" or not tokenizer, "--tokenizer is read only with --target=vqkd (the codes as "
                                            "targets): add --target=vqkd, or leave --tokenizer out"),
        (smooth_l1_beta >= 0, f"--smooth_l1_beta={smooth_l1_beta} must be >= 0 (0 = the L1 loss)"),
        (decoder_width >= 1, f"--decoder_width={decoder_width} must be >= 1"),
        (decoder_depth >= 0, f"--decoder_depth={decoder_depth} must be >= 0 (0 = no blocks: projection, "
                             f"positions, norm and output only)"),
        (decoder_heads >= 1, f"--decoder_heads={decoder_heads} must be >= 1"),
        (head != "transformer" or decoder_depth == 0 or decoder_heads < 1 or decoder_width % decoder_heads == 0,
         f"--decoder_heads={decoder_heads} must divide --decoder_width={decoder_width}: each attention head "
         f"of the transformer head gets width / heads channels"),
        (eval_interval >= 1, f"--eval_interval={eval_interval} must be >= 1"),
        (model in PRESETS, f"unknown model size '{model}': choose one of {', '.join(PRESETS)}"),
        (img_size % patch_size == 0, f"--img_size={img_size} is not a multiple of the patch size "
                                     f"{patch_size} of {model}: the patches must tile the image"),
        *[(value in allowed, f"unknown {name} '{value}': choose {', '.join(allowed)}")
          for name, value, allowed in choices],
    ])
    if problem:
        raise SystemExit(f"error: {problem}")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if not resume:  # a new run must not replace an earlier run's checkpoint
        refuse_overwrite(ckpt_path, RESUME_ENTRIES)
    may_change = RESUME_MAY_CHANGE + UNREAD_BY_TARGET[target]
    ckpt = resume_checkpoint(ckpt_path, config, may_change, RESUME_ENTRIES) if resume else None
    stop_signal = stop_signals()  # from here a SIGTERM only sets this flag; the loop saves and stops
    ctx = Context(device, dtype, backend)
    if ctx.master:  # before any work: out_dir is writable and no other run uses it
        lock_out_dir(out_dir)  # held until this process ends
    # after the out_dir checks: a refused start makes no W&B run
    wandb_run = wandb_init(ctx.master, wandb_log, wandb_project, wandb_run_name, config)
    accum = accumulation_steps(total_batch_size, micro_batch_size, ctx.world_size)
    torch.manual_seed(seed + ctx.rank)

    # -------------------------------------------------------------------------
    # settings and data first (cheap); the teacher (maybe a download) after them
    try:
        cfg = ViTConfig.beit_v2(model, img_size=img_size, layer_scale=layer_scale, drop_path=drop_path,
                                mask_token=True)
        mask_fn = MaskGenerator(mask, cfg.grid, mask_ratio)
        root = resolve_data_dir(data_dir)
        train_transform = TrainTransform(img_size, min_crop_scale, flip, color_jitter)
        train_set = ImageFolder(os.path.join(root, "train"), train_transform, mask_fn, seed)
        val_set = None
        if os.path.isdir(os.path.join(root, "val")):
            val_set = ImageFolder(os.path.join(root, "val"), EvalTransform(img_size), mask_fn, seed + 1)
        if target == "vqkd":
            tokenizer_model = load_tokenizer(tokenizer).to(ctx.device)
            source_cfg = tokenizer_model.encoder.config
            out_dim = tokenizer_model.config["codebook_size"]
            target_flops = tokenizer_model.encoder.flops_per_image()
        else:
            teacher_dtype = torch.bfloat16 if teacher_bf16 else None
            teacher_model = load_teacher(teacher, teacher_path or None, teacher_layer, teacher_dtype).to(ctx.device)
            source_cfg, out_dim = teacher_model.vit.config, teacher_model.out_dim
            target_flops = teacher_model.vit.flops_per_image()
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if source_cfg.img_size != img_size or source_cfg.patch_size != cfg.patch_size:  # targets are per patch
        source = "the tokenizer" if target == "vqkd" else f"the teacher {teacher!r}"
        raise SystemExit(f"error: {source} takes {source_cfg.img_size} px / patch {source_cfg.patch_size}, the "
                         f"student {img_size} px / patch {cfg.patch_size}: the patch grids must match")
    if target == "vqkd":
        source_fingerprint = weights_fingerprint(tokenizer_model, dict(vqkd=tokenizer_model.config,
                                                                       encoder=source_cfg.to_dict()))
    else:
        source_fingerprint = weights_fingerprint(teacher_model, source_cfg.to_dict())
    if resume:
        refuse_changed_targets(ckpt, source_fingerprint,
                               f"the tokenizer {tokenizer}" if target == "vqkd" else f"the teacher {teacher!r}")
        refuse_changed_split(ckpt, train_set, os.path.join(root, "train"))
    train_loader, train_sampler = make_loader(train_set, micro_batch_size, True, ctx.rank, ctx.world_size, seed,
                                              num_workers)
    iters_per_epoch, max_iters, warmup_iters, end_iter = schedule_lengths(
        train_sampler, micro_batch_size, accum, epochs, warmup_epochs, stop_iter)

    # -------------------------------------------------------------------------
    # student S, decoder head D, whitening N, optimizer; resume
    student = ViT(cfg).to(ctx.device)
    decoder = DecoderHead(head, cfg.embed_dim, out_dim, cfg.num_patches + 1, decoder_width, decoder_depth,
                          decoder_heads).to(ctx.device)
    md_student = MDStudent(student, decoder)
    whitener = Whitening(whitening if target == "features" else "none", out_dim).to(ctx.device)  # codes: none
    decoder_params = [("decoder." + n, p) for n, p in decoder.named_parameters()]
    optimizer = student.configure_optimizers(weight_decay, lr, (beta1, beta2), extra=decoder_params)
    # float16: the loss is scaled up before backward so that small gradients do not round to 0,
    # and a step whose gradients overflow is skipped with the scale halved; bfloat16, float32:
    # a pass-through
    scaler = torch.amp.GradScaler(ctx.device_type, enabled=dtype == "float16")
    iter_num, best_val_loss = 0, float("inf")
    if resume:
        whitened = dict(whitening=whitener) if target == "features" else {}  # codes: no whitening to restore
        # float16: the loss scale goes on
        scaled = dict(scaler=scaler) if scaler.is_enabled() else {}
        resume_from(ckpt, ckpt_path, optimizer, model=student, decoder=decoder, **whitened,
                    **scaled)
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        log(ctx, f"resumed from {ckpt_path} at iteration {iter_num}")
        if iter_num >= end_iter:
            log(ctx, f"nothing to do: the checkpoint is at iteration {iter_num}, "
                     f"this run ends at {end_iter}")
            ctx.close()
            return
    log_path = os.path.join(out_dir, "log.jsonl")  # a JSON record per log line and per evaluation
    if ctx.master:  # a new run starts it afresh; a resumed one drops records past its checkpoint
        trim_log(log_path, iter_num)
    train_model = wrap_for_training(md_student, ctx, compile)  # compiled and/or DDP; md_student is saved
    if target != "vqkd":  # the frozen teacher's forward (no grad), compiled with the student
        teacher_run = torch.compile(teacher_model) if compile else teacher_model

    def targets_of(images):
        """N(T(I)): whitened teacher features per patch (B, N, D_t), or the tokenizer's codes (B, N)"""
        if target == "vqkd":
            with torch.no_grad():
                return tokenizer_model.encode(images)[1]
        return whitener(teacher_run(images)[:, 1:])  # drop CLS, whiten

    @torch.no_grad()
    def evaluate():
        """mean MD loss over (a fixed subset of) the val split, all ranks together; None if no val
        image could be read (a loss of 0 over no image would be a lie)"""
        md_student.eval()
        whitener.eval()
        loader, _ = make_loader(val_set, micro_batch_size, False, ctx.rank, ctx.world_size, seed, num_workers,
                                eval_images)
        total = torch.zeros(2, device=ctx.device)  # (sum of loss x images, images)
        for images, _, masks, _ in loader:
            if images is None:
                continue
            images, masks = images.to(ctx.device), masks.to(ctx.device)
            with ctx.autocast():
                batch_loss = md_loss(md_student(images, masks), targets_of(images), masks)
            total[0] += batch_loss * len(images)
            total[1] += len(images)
        ctx.all_reduce_sum(total)
        md_student.train()
        whitener.train()
        loss_sum, images_read = total.tolist()
        return loss_sum / images_read if images_read else None

    def checkpoint():
        """the run after iteration iter_num, as plain data (torch.load(weights_only=True) reads it)"""
        return dict(model=student.state_dict(), decoder=decoder.state_dict(), whitening=whitener.state_dict(),
                    model_args=cfg.to_dict(), config=config, optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), iter_num=iter_num, best_val_loss=best_val_loss,
                    target_fingerprint=source_fingerprint,
                    train_split=train_split_summary(train_set))

    n_params = sum(p.numel() for p in student.parameters()) / 1e6
    source = f"tokenizer {tokenizer}" if target == "vqkd" else f"teacher {teacher}"
    log(ctx, f"MD: {source} -> student {model} ({n_params:.1f}M params), {len(train_set)} train images, "
             f"{iters_per_epoch} iters/epoch, {max_iters} iters, accumulation {accum}, "
             f"{ctx.world_size} process(es) on {ctx.device}")
    warning = warmup_warning(warmup_epochs, epochs, warmup_iters, max_iters)
    if warning:
        log(ctx, warning)
    flops = 3 * student.flops_per_image() + target_flops  # student fwd+bwd, teacher (or tokenizer) fwd
    meter = Meter(flops, peak_flops(ctx.device), iter_num, ctx.world_size)

    # -------------------------------------------------------------------------
    # training loop
    batches = micro_batches(train_loader, train_sampler, iter_num, accum, iters_per_epoch)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    nonfinite = torch.full((3,), -1.0, dtype=torch.float64, device=ctx.device)  # checked at log lines only
    skipped = images_read = 0  # this process's unreadable, read training images since the log line
    step_loss = torch.tensor(float("nan"))  # the last micro-batch's loss, shown at log lines (none read yet)
    # under DDP a rank that read no image of a micro-batch runs this batch of zeros with a loss that counts 0:
    # the other ranks' gradient all-reduce waits for its gradients
    stand_in = (torch.zeros(micro_batch_size, 3, img_size, img_size, device=ctx.device),  # (B, 3, H, W)
                torch.ones(micro_batch_size, cfg.num_patches, dtype=torch.bool, device=ctx.device))  # (B, N)
    bar = tqdm(total=end_iter, initial=iter_num, disable=None if ctx.master else True, desc="MD", dynamic_ncols=True)
    md_student.train()
    save_on_ctrl_c(stop_signal)  # from here a first Ctrl-C saves the finished step
    while iter_num < end_iter:
        lr_now = cosine_lr(iter_num, max_iters, warmup_iters, lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr_now * group["lr_scale"]  # lr_scale: layer decay (1 here)
        readable = 0  # images of this step that could be read
        for micro_step in range(accum):
            images, _, masks, n_skipped = next(batches)
            # this micro-step's random draws (drop path) follow from (seed, rank, iteration,
            # micro-step): a resumed run draws exactly what the uninterrupted run drew
            torch.manual_seed(derived_seed(seed, ctx.rank, iter_num, micro_step))
            skipped += n_skipped
            if ctx.ddp:  # sync gradients on the last micro-step only
                train_model.require_backward_grad_sync = micro_step == accum - 1
            if images is None:  # every image of this micro-batch was unreadable
                if ctx.ddp:  # under autocast as the real batches: a compiled model compiles nothing new
                    with ctx.autocast():
                        stand_in_out = train_model(*stand_in)
                    (stand_in_out.float().sum() * 0).backward()
                continue
            readable += len(images)
            images = images.to(ctx.device, non_blocking=True)
            masks = masks.to(ctx.device, non_blocking=True)  # (B, N) True = masked: M
            targets = targets_of(images)  # N(T(I))
            with ctx.autocast():
                pred = train_model(images, masks)  # D(S(M(I))): (B, N, D_t)
            step_loss = md_loss(pred, targets, masks)  # R, mean over masked patches
            nonfinite = record_nonfinite(nonfinite, step_loss, iter_num, 0)
            scaler.scale(step_loss / accum).backward()
            images_read += len(images)
        if not ctx.any_rank(readable > 0):  # no rank read an image in a whole step: the train split is unreadable
            stop_if_nonfinite(nonfinite, ckpt_path, scaler)  # a non-finite step is never saved
            if ctx.master and iter_num > 0:  # the finished steps are kept; this one is read again at resume
                save_checkpoint(checkpoint(), ckpt_path)
            ctx.barrier()
            then = f"; then continue with --resume=True (checkpoint {ckpt_path})" if iter_num > 0 else ""
            raise SystemExit(f"error: iteration {iter_num}: none of the {accum * micro_batch_size * ctx.world_size} "
                             f"images of the step could be read (see the warnings): "
                             f"fix the train split under {root}{then}")
        scaler.unscale_(optimizer)  # float16: the true gradients before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        # float16: an overflow skips the step (stop_if_nonfinite watches the scale)
        if not scaler.is_enabled():
            nonfinite = record_nonfinite(nonfinite, grad_norm, iter_num, 1)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        for stats in whitener.buffers():  # 'bn': running statistics of each rank's batches -> the ranks' mean
            ctx.all_reduce_sum(stats).div_(ctx.world_size)
        iter_num += 1
        bar.update(1)

        if iter_num % log_interval == 0:
            stop_if_nonfinite(nonfinite, ckpt_path, scaler)
            # over the ranks: mean loss, all skipped
            loss_value, skipped, images_read = ctx.log_values(step_loss, skipped, images_read)
            if ctx.master:
                bar.set_postfix(loss=f"{loss_value:.4f}")
                speed_text, speed = meter.read(iter_num, images_read)
                line = f"iter {iter_num}: loss {loss_value:.4f}, lr {lr_now:.2e}, {speed_text}"
                if skipped:
                    line += f", {skipped} unreadable images skipped"
                bar.write(line)
                record = dict(iter=iter_num, epoch=iter_num / iters_per_epoch, loss=loss_value,
                              lr=lr_now, grad_norm=grad_norm.item(), skipped=skipped, **speed)
                if scaler.is_enabled():
                    record["loss_scale"] = scaler.get_scale()
                append_jsonl(log_path, record, wandb_run)
            skipped = images_read = 0
        between_steps = time.time()  # evaluation and checkpoint: not in ms/iter
        # a stop signal seen by any rank: all ranks save this finished step together, then stop
        stop = ctx.any_rank(bool(stop_signal)) and iter_num < end_iter
        at_eval = iter_num % eval_interval == 0 or iter_num == end_iter
        if at_eval or stop:
            stop_if_nonfinite(nonfinite, ckpt_path, scaler)  # a non-finite step is never saved
            evaluating = at_eval and val_set is not None
            val_loss = evaluate() if evaluating else None
            if val_loss is not None:
                best_val_loss = min(best_val_loss, val_loss)
                if ctx.master:
                    bar.write(f"iter {iter_num}: val loss {val_loss:.4f}")
                    record = dict(iter=iter_num, epoch=iter_num / iters_per_epoch,
                                  val_loss=val_loss)
                    append_jsonl(log_path, record, wandb_run)
            if ctx.master:
                save_checkpoint(checkpoint(), ckpt_path)
            if evaluating and val_loss is None:  # after the save: the steps are kept
                ctx.barrier()
                then = ("then continue with --resume=True" if iter_num < end_iter else
                        "the run's final weights are saved")
                raise SystemExit(f"error: iteration {iter_num}: no val image under {os.path.join(root, 'val')} "
                                 f"could be read (see the warnings): fix the files, or remove the val split; "
                                 f"{then} (checkpoint {ckpt_path})")
            # a signal during the evaluation or the save: this step is saved, the run stops here
            stop = stop or (ctx.any_rank(bool(stop_signal)) and iter_num < end_iter)
        meter.leave_out(time.time() - between_steps)
        if stop:
            bar.close()
            signal_name, exit_code = stopped_by(stop_signal, ctx)
            log(ctx, f"stopped by {signal_name} after iteration {iter_num}: checkpoint {ckpt_path}; "
                     f"continue with --resume=True")
            ctx.barrier()  # the other ranks wait for rank 0's checkpoint
            ctx.close()
            raise SystemExit(exit_code)
    bar.close()
    ended = (f"done: {iter_num} iterations" if iter_num >= max_iters else
             f"stopped at iteration {iter_num} of {max_iters} (--stop_iter)")
    log(ctx, f"{ended}, checkpoint {ckpt_path}")
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
