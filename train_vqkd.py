"""
The VQ-KD tokenizer of BEiT v2 (the paper's Table 1, VQ-KD column): discrete codes that MD can
predict instead of whitened features (Section 5, "should we employ a tokenizer?").

    python train_vqkd.py config/vqkd_embedded.py            # embedded dataset, CPU, minutes
    torchrun --nproc_per_node=8 train_vqkd.py --teacher=clip
then MD on the codes (cross-entropy on masked patches):
    python train_md.py config/md_embedded.py --target=vqkd --tokenizer=out/vqkd_embedded/tokenizer.pt

The log line adds codebook usage (fraction of codes used since the last line) and perplexity;
a usage under collapse_threshold is reported as a collapse.
"""
import os
import sys

import torch

from common import (Context, Meter, accumulation_steps, apply_overrides, cosine_lr, log, micro_batches,
                    peak_flops, rng_state, resume_from, save_checkpoint, schedule_lengths, train_iteration,
                    train_loop, wrap_for_training)
from data import DataError, ImageFolder, TrainTransform, make_loader, resolve_data_dir
from model import VQKD, ViTConfig, codebook_usage
from teacher import CheckpointError, load_teacher

# -----------------------------------------------------------------------------
# defaults (override with a config file and/or --key=value)
out_dir = "out/vqkd"          # tokenizer.pt goes here
data_dir = "data/imagenet"    # ImageFolder root with train/; 'embedded' = the generated demo set
num_workers = 8               # DataLoader workers per process
log_interval = 20             # iterations between log lines (with codebook usage)
save_interval = 1000          # iterations between checkpoints (and at the end)
resume = False                # continue from out_dir/tokenizer.pt
stop_iter = 0                 # stop (and save) after this iteration without changing the schedule; 0 = run to the end
teacher = "clip"              # clip | dino | deit | embedded | checkpoint path: the features to reconstruct
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
config = apply_overrides(globals(), sys.argv[1:])


def main():
    ctx = Context(device, dtype, backend)
    accum = accumulation_steps(total_batch_size, micro_batch_size, ctx.world_size)
    torch.manual_seed(seed)
    try:
        cfg = ViTConfig.from_name(model, img_size=img_size, abs_pos=False, rel_pos="shared", qkv_bias="qv", layer_scale=0.1)
        train_set = ImageFolder(os.path.join(resolve_data_dir(data_dir), "train"), TrainTransform(img_size, min_crop_scale, 0.5, 0.0), None, seed)
        tch = load_teacher(teacher, teacher_path or None).to(ctx.device)
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if tch.vit.config.num_patches != cfg.num_patches:
        raise SystemExit(f"error: teacher '{teacher}' has {tch.vit.config.num_patches} patches, the tokenizer {cfg.num_patches}: match img_size and patch size")
    vq = VQKD(cfg, tch.out_dim, codebook_size, code_dim, decoder_depth, ema_decay, dead_threshold).to(ctx.device)
    optimizer = vq.encoder.configure_optimizers(weight_decay, lr, (beta1, beta2),
                                                extra=[(n, p) for n, p in vq.named_parameters() if not n.startswith("encoder.")])
    loader, sampler = make_loader(train_set, micro_batch_size, True, ctx.rank, ctx.world_size, seed, num_workers)
    iters_per_epoch, max_iters, warmup_iters, end_iter = schedule_lengths(sampler, micro_batch_size, accum, epochs, warmup_epochs, stop_iter)
    path = os.path.join(out_dir, "tokenizer.pt")
    iter_num = 0
    if resume:
        iter_num = resume_from(ctx, path, optimizer, model=vq)["iter_num"]
    train_model = wrap_for_training(vq, ctx, compile)
    meter = Meter(3 * vq.encoder.flops_per_image() + tch.vit.flops_per_image(), peak_flops(ctx.device))
    batches = micro_batches(loader, sampler, iter_num, accum, iters_per_epoch)
    counts = torch.zeros(codebook_size, device=ctx.device)  # code assignments since the last log line

    def step(it, lr_now):
        def step_loss(images, labels, masks):
            targets = tch(images)[:, 1:]  # (B, N, D_t) teacher patch features
            with ctx.autocast():
                loss, codes = train_model(images, targets, commitment)
            counts.add_(torch.bincount(codes.flatten(), minlength=codebook_size))
            return loss
        return train_iteration(ctx, train_model, optimizer, batches, accum, lr_now, grad_clip, step_loss, it, out_dir, meter)

    def report_usage(it, write):
        used, perplexity = codebook_usage(counts)
        write(f"iter {it}: codebook usage {100 * used:.1f}% of {codebook_size} codes, perplexity {perplexity:.1f}"
              + (f"; COLLAPSE: under {100 * collapse_threshold:.0f}% of the codes in use" if used < collapse_threshold else ""))
        counts.zero_()

    def save(it, write):
        if ctx.master:
            save_checkpoint(dict(model=vq.state_dict(), vqkd_args=vq.config, model_args=cfg.to_dict(), config=config,
                                 optimizer=optimizer.state_dict(), iter_num=it, rng=rng_state()), path)

    log(ctx, f"VQ-KD: teacher {teacher} -> {model} encoder, {codebook_size} x {code_dim} codebook, {len(train_set)} images, "
             f"{iters_per_epoch} iters/epoch, {max_iters} iters, accumulation {accum}, {ctx.world_size} process(es) on {ctx.device}")
    vq.train()
    iter_num = train_loop(ctx, "VQ-KD", iter_num, end_iter, lambda it: cosine_lr(it, max_iters, warmup_iters, lr, min_lr),
                          step, meter, log_interval, save_interval, save, hooks=[(log_interval, report_usage)])
    log(ctx, f"done: {iter_num} iterations, tokenizer {path}")
    ctx.close()


if __name__ == "__main__":
    main()
