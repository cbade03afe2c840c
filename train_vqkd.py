"""
The VQ-KD tokenizer of BEiT v2 (the paper's Table 1, VQ-KD column): discrete codes that MD can
predict instead of whitened features (Section 5, "should we employ a tokenizer?").

    python train_vqkd.py config/vqkd_embedded.py            # embedded dataset, CPU, minutes
    torchrun --nproc_per_node=8 train_vqkd.py --teacher=clip
then MD on the codes (cross-entropy on masked patches):
    python train_md.py config/md_embedded.py --target=vqkd --tokenizer=out/vqkd_embedded/tokenizer.pt

The log line adds codebook usage (fraction of codes used since the last line) and perplexity;
a usage under collapse_threshold is reported as a collapse. Every log line is also a record in
out_dir/log.jsonl (analyze.py --metric curves).
"""
import os
import sys

import torch
from tqdm import tqdm

from common import (CheckpointError, Context, Meter, accumulation_steps, apply_overrides,
                    check_out_dir, cosine_lr, lock_out_dir, log, micro_batches, peak_flops,
                    record_nonfinite, resume_from, rng_state, save_checkpoint, schedule_lengths,
                    stop_if_nonfinite, wrap_for_training)
from common import append_jsonl, trim_log, wandb_init
from data import DataError, ImageFolder, TrainTransform, make_loader, resolve_data_dir
from model import ViTConfig
from teacher import load_teacher
from vqkd import VQKD, codebook_usage

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
commitment = 1.0              # weight of ||z - q||^2
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
dtype = "bfloat16"            # autocast dtype: bfloat16 | float16 | float32
compile = False               # torch.compile the tokenizer
backend = ""
# -----------------------------------------------------------------------------


def main():
    ctx = Context(device, dtype, backend)
    if ctx.master:  # before any work: out_dir is writable and no other run uses it
        check_out_dir(out_dir)
        run_lock = lock_out_dir(out_dir)  # held until this process ends
    wandb_run = wandb_init(ctx.master, wandb_log, wandb_project, wandb_run_name, config)
    accum = accumulation_steps(total_batch_size, micro_batch_size, ctx.world_size)
    torch.manual_seed(seed)
    try:
        cfg = ViTConfig.beit_v2(model, img_size=img_size)
        train_transform = TrainTransform(img_size, min_crop_scale, 0.5, 0.0)
        train_set = ImageFolder(os.path.join(resolve_data_dir(data_dir), "train"), train_transform, None, seed)
        teacher_model = load_teacher(teacher, teacher_path or None).to(ctx.device)
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if teacher_model.vit.config.num_patches != cfg.num_patches:
        raise SystemExit(f"error: teacher '{teacher}' has {teacher_model.vit.config.num_patches} patches, the "
                         f"tokenizer {cfg.num_patches}: match img_size and patch size")
    vq = VQKD(cfg, teacher_model.out_dim, codebook_size, code_dim, decoder_depth, ema_decay, dead_threshold)
    vq = vq.to(ctx.device)
    other_params = [(n, p) for n, p in vq.named_parameters() if not n.startswith("encoder.")]
    optimizer = vq.encoder.configure_optimizers(weight_decay, lr, (beta1, beta2), extra=other_params)
    loader, sampler = make_loader(train_set, micro_batch_size, True, ctx.rank, ctx.world_size, seed, num_workers)
    iters_per_epoch, max_iters, warmup_iters, end_iter = schedule_lengths(
        sampler, micro_batch_size, accum, epochs, warmup_epochs, stop_iter)
    path = os.path.join(out_dir, "tokenizer.pt")
    iter_num = 0
    if resume:
        iter_num = resume_from(ctx, path, optimizer, model=vq)["iter_num"]
    log_path = os.path.join(out_dir, "log.jsonl")  # a JSON record per log line
    if ctx.master:  # a new run starts it afresh; a resumed one drops records past its checkpoint
        trim_log(log_path, iter_num)
    train_model = wrap_for_training(vq, ctx, compile)  # compiled and/or DDP; vq is saved
    log(ctx, f"VQ-KD: teacher {teacher} -> {model} encoder, {codebook_size} x {code_dim} codebook, "
             f"{len(train_set)} images, {iters_per_epoch} iters/epoch, {max_iters} iters, accumulation {accum}, "
             f"{ctx.world_size} process(es) on {ctx.device}")
    meter = Meter(3 * vq.encoder.flops_per_image() + teacher_model.vit.flops_per_image(), peak_flops(ctx.device))

    # -------------------------------------------------------------------------
    # training loop
    batches = micro_batches(loader, sampler, iter_num, accum, iters_per_epoch)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    nonfinite = torch.full((3,), -1.0, dtype=torch.float64, device=ctx.device)  # checked at log lines only
    counts = torch.zeros(codebook_size, device=ctx.device)  # code assignments since the last log line
    skipped = 0  # unreadable training images since the last log line
    bar = tqdm(total=end_iter, initial=iter_num, disable=None if ctx.master else True, desc="VQ-KD",
               dynamic_ncols=True)
    vq.train()
    while iter_num < end_iter:
        lr_now = cosine_lr(iter_num, max_iters, warmup_iters, lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr_now * group["lr_scale"]
        for micro_step in range(accum):
            images, _, _, n_skipped = next(batches)
            skipped += n_skipped
            if images is None:  # every image of this micro-batch was unreadable
                continue
            images = images.to(ctx.device, non_blocking=True)
            if ctx.ddp:  # sync gradients on the last micro-step only
                train_model.require_backward_grad_sync = micro_step == accum - 1
            targets = teacher_model(images)[:, 1:]  # (B, N, D_t) teacher patch features
            with ctx.autocast():
                loss, codes = train_model(images, targets, commitment)  # reconstruction + commitment
            counts.add_(torch.bincount(codes.flatten(), minlength=codebook_size))
            nonfinite = record_nonfinite(nonfinite, loss, iter_num, 0)
            (loss / accum).backward()
            meter.update(len(images) * ctx.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        nonfinite = record_nonfinite(nonfinite, grad_norm, iter_num, 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        bar.update(1)

        if iter_num % log_interval == 0:
            stop_if_nonfinite(nonfinite, out_dir)
            if ctx.master:
                loss_value = loss.item()  # the last micro-batch's loss: read only here
                bar.set_postfix(loss=f"{loss_value:.4f}")
                speed_text, speed = meter.read(log_interval)
                line = f"iter {iter_num}: loss {loss_value:.4f}, lr {lr_now:.2e}, {speed_text}"
                if skipped:
                    line += f", {skipped} unreadable images skipped"
                bar.write(line)
                used, perplexity = codebook_usage(counts)
                line = (f"iter {iter_num}: codebook usage {100 * used:.1f}% of {codebook_size} codes, "
                        f"perplexity {perplexity:.1f}")
                if used < collapse_threshold:
                    line += f"; COLLAPSE: under {100 * collapse_threshold:.0f}% of the codes in use"
                bar.write(line)
                record = dict(iter=iter_num, epoch=iter_num / iters_per_epoch, loss=loss_value,
                              lr=lr_now, grad_norm=grad_norm.item(), skipped=skipped, **speed,
                              codebook_usage=used, perplexity=perplexity)
                append_jsonl(log_path, record, wandb_run)
            counts.zero_()
            skipped = 0
        if iter_num % save_interval == 0 or iter_num == end_iter:
            stop_if_nonfinite(nonfinite, out_dir)  # a non-finite step is never saved
            if ctx.master:
                checkpoint = dict(model=vq.state_dict(), vqkd_args=vq.config, model_args=cfg.to_dict(), config=config,
                                  optimizer=optimizer.state_dict(), iter_num=iter_num, rng=rng_state())
                save_checkpoint(checkpoint, path)
    bar.close()
    log(ctx, f"done: {iter_num} iterations, tokenizer {path}")
    ctx.close()


if __name__ == "__main__":
    config = apply_overrides(globals(), sys.argv[1:])
    main()
