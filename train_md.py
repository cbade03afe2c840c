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
Resume a stopped run with the same command plus --resume=True.
"""
import os
import sys

import torch

from common import (Context, Meter, accumulation_steps, apply_overrides, cosine_lr, log,
                    micro_batches, peak_flops, rng_state, resume_from, save_checkpoint, schedule_lengths, train_iteration,
                    train_loop, wrap_for_training)
from data import DataError, EvalTransform, ImageFolder, TrainTransform, make_loader, resolve_data_dir
from data.masks import BEIT_RATIO, MaskGenerator
from model import DECODER_HEADS, MD_LOSSES, DecoderHead, MaskedDistillation, ViT, ViTConfig
from teacher import WHITENINGS, CheckpointError, Whitening, load_teacher, load_tokenizer

# -----------------------------------------------------------------------------
# defaults (override with a config file and/or --key=value)
# I/O
out_dir = "out/md"            # checkpoint ckpt.pt goes here
data_dir = "data/imagenet"    # ImageFolder root with train/ and val/; 'embedded' = the generated demo set
num_workers = 8               # DataLoader workers per process
eval_interval = 2000          # iterations between evaluation + checkpoint (and at the end)
eval_images = 10000           # val images for the MD eval loss (0 = all)
log_interval = 20             # iterations between log lines
resume = False                # continue from out_dir/ckpt.pt
stop_iter = 0                 # stop (and save) after this iteration without changing the schedule; 0 = run to the end
# targets: whitened teacher features N(T(I)), or the codes of a VQ-KD tokenizer
target = "features"           # features | vqkd (code indices from `tokenizer`, cross-entropy; no teacher needed)
tokenizer = ""                # train_vqkd.py's tokenizer.pt, for target=vqkd
teacher = "clip"              # clip | dino | deit | embedded | path to a checkpoint
teacher_path = ""             # local copy of the official teacher file (no download)
teacher_layer = -1            # -1: last block after the final norm; k: raw output of block k
teacher_bf16 = True           # teacher forward under bf16 autocast (it is frozen and runs without grad)
whitening = "ln"              # ln (LayerNorm per token, no affine, as FD) | bn (per-channel running standardization) | none
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
loss_on = "masked"            # masked (MD) | all (every patch, FD-style)
mask = "block"                # block (BEiT) | random
mask_ratio = BEIT_RATIO       # fraction of patches masked: 75/196
# optimization (paper Table 1, BEiT v2 base column)
epochs = 300                  # schedule length
warmup_epochs = 10            # linear warmup
total_batch_size = 2048       # images per optimizer step over all GPUs and accumulation steps
micro_batch_size = 128        # images per GPU per forward
lr = 1.5e-3                   # peak learning rate
min_lr = 1e-5                 # end of the cosine
weight_decay = 0.05           # AdamW; none on biases, norms, tokens, position tables
beta1 = 0.98                  # AdamW betas as printed in Table 1
beta2 = 0.999
grad_clip = 3.0               # max global grad norm; 0 = off
# augmentation
min_crop_scale = 0.2          # RandomResizedCrop scale (0.2, 1)
color_jitter = 0.4            # brightness/contrast/saturation strength
flip = 0.5                    # horizontal flip probability
# system
seed = 0                      # model init, data order, augmentations, masks
device = "auto"               # auto | cpu | cuda | cuda:1 ...
dtype = "bfloat16"            # autocast dtype for the student: bfloat16 | float16 | float32
compile = True                # torch.compile the student + head
backend = ""                  # DDP backend; default nccl on GPU, gloo on CPU
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def main():
    ctx = Context(device, dtype, backend)
    accum = accumulation_steps(total_batch_size, micro_batch_size, ctx.world_size)
    torch.manual_seed(seed + ctx.rank)

    # settings and data first (cheap); the teacher (maybe a download) after them
    try:
        cfg = ViTConfig.from_name(model, img_size=img_size, abs_pos=False, rel_pos="shared", qkv_bias="qv",
                                  layer_scale=layer_scale, drop_path=drop_path, mask_token=True)
        for name, value, choices in (("loss", loss, MD_LOSSES[:3]), ("head", head, DECODER_HEADS), ("whitening", whitening, WHITENINGS),
                                     ("loss_on", loss_on, ("masked", "all"))):
            if value not in choices:
                raise ValueError(f"unknown {name} '{value}': choose {', '.join(choices)}")
        root = resolve_data_dir(data_dir)
        mask_fn = MaskGenerator(mask, cfg.grid, mask_ratio)
        train_set = ImageFolder(os.path.join(root, "train"), TrainTransform(img_size, min_crop_scale, flip, color_jitter), mask_fn, seed)
        val_set = ImageFolder(os.path.join(root, "val"), EvalTransform(img_size), mask_fn, seed + 1) if os.path.isdir(os.path.join(root, "val")) else None
        if target == "vqkd":
            tok = load_tokenizer(tokenizer).to(ctx.device)
            source_cfg, out_dim, target_flops = tok.encoder.config, tok.config["codebook_size"], tok.encoder.flops_per_image()
        elif target == "features":
            tch = load_teacher(teacher, teacher_path or None, teacher_layer, torch.bfloat16 if teacher_bf16 else None).to(ctx.device)
            source_cfg, out_dim, target_flops = tch.vit.config, tch.out_dim, tch.vit.flops_per_image()
        else:
            raise ValueError(f"unknown target '{target}': choose features or vqkd")
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if source_cfg.img_size != img_size or source_cfg.patch_size != cfg.patch_size:  # targets are per patch
        raise SystemExit(f"error: the {'tokenizer' if target == 'vqkd' else f'teacher {teacher!r}'} takes {source_cfg.img_size} px / patch "
                         f"{source_cfg.patch_size}, the student {img_size} px / patch {cfg.patch_size}: the patch grids must match")
    train_loader, train_sampler = make_loader(train_set, micro_batch_size, True, ctx.rank, ctx.world_size, seed, num_workers)
    iters_per_epoch, max_iters, warmup_iters, end_iter = schedule_lengths(train_sampler, micro_batch_size, accum, epochs, warmup_epochs, stop_iter)

    student = ViT(cfg).to(ctx.device)
    head_module = DecoderHead(head, cfg.embed_dim, out_dim, cfg.num_patches + 1, decoder_width, decoder_depth, decoder_heads).to(ctx.device)
    md = MaskedDistillation(student, head_module, "ce" if target == "vqkd" else loss, smooth_l1_beta, loss_on)
    whitener = Whitening(whitening, out_dim).to(ctx.device)
    optimizer = student.configure_optimizers(weight_decay, lr, (beta1, beta2),
                                             extra=[("decoder." + n, p) for n, p in head_module.named_parameters()])
    iter_num, best_val_loss = 0, float("inf")
    if resume:
        ckpt = resume_from(ctx, os.path.join(out_dir, "ckpt.pt"), optimizer, model=student, decoder=head_module, whitening=whitener)
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    train_model = wrap_for_training(md, ctx, compile)

    def targets_of(images):
        if target == "vqkd":
            with torch.no_grad():
                return tok.encode(images)[1]  # (B, N) code indices
        return whitener(tch(images)[:, 1:])  # (B, N, D_t): drop CLS, whiten

    @torch.no_grad()
    def evaluate():
        """mean MD loss over (a fixed subset of) the val split, all ranks together"""
        md.eval()
        whitener.eval()
        loader, _ = make_loader(val_set, micro_batch_size, False, ctx.rank, ctx.world_size, seed, num_workers, eval_images)
        total = torch.zeros(2, device=ctx.device)  # (sum of loss x images, images)
        for images, _, masks, _ in loader:
            if images is None:
                continue
            images, masks = images.to(ctx.device), masks.to(ctx.device)
            with ctx.autocast():
                total += torch.stack([md(images, masks, targets_of(images)) * len(images), torch.tensor(float(len(images)), device=ctx.device)])
        ctx.all_reduce_sum(total)
        md.train()
        whitener.train()
        return (total[0] / total[1].clamp(min=1)).item()

    log(ctx, f"MD: {'tokenizer ' + tokenizer if target == 'vqkd' else 'teacher ' + teacher} -> student {model} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params), "
             f"{len(train_set)} train images, {iters_per_epoch} iters/epoch, {max_iters} iters, accumulation {accum}, {ctx.world_size} process(es) on {ctx.device}")
    flops = 3 * student.flops_per_image() + target_flops  # student fwd+bwd, teacher (or tokenizer) fwd
    meter = Meter(flops, peak_flops(ctx.device))
    batches = micro_batches(train_loader, train_sampler, iter_num, accum, iters_per_epoch)

    def step(it, lr_now):
        def step_loss(images, labels, masks):
            targets = targets_of(images)
            with ctx.autocast():
                return train_model(images, masks, targets)
        return train_iteration(ctx, train_model, optimizer, batches, accum, lr_now, grad_clip, step_loss, it, out_dir, meter)

    def evaluate_and_save(it, write):
        nonlocal best_val_loss
        if val_set is not None:
            val_loss = evaluate()
            best_val_loss = min(best_val_loss, val_loss)
            if ctx.master:
                write(f"iter {it}: val loss {val_loss:.4f}")
        if ctx.master:
            save_checkpoint(dict(model=student.state_dict(), decoder=head_module.state_dict(), whitening=whitener.state_dict(), model_args=cfg.to_dict(),
                                 config=config, optimizer=optimizer.state_dict(), iter_num=it,
                                 best_val_loss=best_val_loss, rng=rng_state()), os.path.join(out_dir, "ckpt.pt"))

    md.train()
    iter_num = train_loop(ctx, "MD", iter_num, end_iter, lambda it: cosine_lr(it, max_iters, warmup_iters, lr, min_lr),
                          step, meter, log_interval, eval_interval, evaluate_and_save)
    log(ctx, f"done: {iter_num} iterations, checkpoint {os.path.join(out_dir, 'ckpt.pt')}")
    ctx.close()


if __name__ == "__main__":
    main()
