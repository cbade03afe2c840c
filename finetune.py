"""
Supervised fine-tuning, frozen-block runs, linear probe and training from scratch, with the
recipe of the paper's Table 1, column CLIP/ViT-B/16 (the "better baseline": CLIP fine-tuned
directly at lr 5e-5 with layer decay 0.6 reaches 84.8% top-1 on ImageNet).

    torchrun --nproc_per_node=8 finetune.py --init=clip                  # the better baseline
    torchrun --nproc_per_node=8 finetune.py --init=out/md/ckpt.pt        # an MD checkpoint
    python finetune.py config/ft_embedded.py --init=out/md_embedded/ckpt.pt   # CPU, minutes
    python finetune.py config/embedded_teacher.py                          # makes the embedded teacher
    python finetune.py --summarize=out/sweep                               # lr / frozen blocks -> top-1

--freeze_blocks=k freezes the embedding and the first k blocks (k = depth: linear probe).
Every log line and evaluation is also a record in out_dir/log.jsonl (analyze.py --metric curves).
"""
import signal
SIGINT_AT_START = signal.getsignal(signal.SIGINT)  # put back after the imports
if SIGINT_AT_START is signal.default_int_handler:  # Ctrl-C while torch loads ends it, without a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import glob
import json
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (CheckpointError, Context, Meter, StdoutThatMayClose, accumulation_steps, append_jsonl,
                    apply_overrides, cosine_lr, derived_seed, lock_out_dir, log, lost_worker_line,
                    micro_batches, option_error, peak_flops, pyplot, record_nonfinite,
                    refuse_changed_split, refuse_overwrite, resume_checkpoint, resume_from,
                    save_checkpoint, save_figure, save_on_ctrl_c, schedule_lengths,
                    stop_if_nonfinite, stop_signals, stopped_by, stopped_early, train_split_summary,
                    trim_log, wandb_init, warmup_warning, wrap_for_training, write_atomic, LOST_PROCESS_ERRORS)
from data import (DataError, EvalTransform, ImageFolder, TrainTransform, check_same_classes, make_loader,
                  resolve_data_dir)
from data.augment import RandAugment, RandomErasing, mixup_cutmix, smooth_one_hot
from hessian import curvature
from model import PRESETS, ViT, ViTConfig, adapt_state_dict
from teacher import NAMES, OFFICIAL, config_of, is_path, load_model
signal.signal(signal.SIGINT, SIGINT_AT_START)  # as it was: from here Ctrl-C raises KeyboardInterrupt

# -----------------------------------------------------------------------------
# defaults (override with a config file and/or --key=value)
# I/O
out_dir = "out/finetune"      # ckpt.pt and result.json go here
data_dir = "data/imagenet"    # ImageFolder root with train/ and val/; 'embedded' = the generated demo set
num_workers = 8               # DataLoader workers per process
eval_interval = 0             # iterations between evaluations + checkpoints; 0 = once per epoch
log_interval = 20             # iterations between log lines
wandb_log = False             # also send the records of log.jsonl to W&B (needs pip install wandb)
wandb_project = "mdlab"       # W&B project
wandb_run_name = "finetune"   # W&B run name
resume = False                # continue from out_dir/ckpt.pt
stop_iter = 0                 # stop (and save) after this iteration without changing the schedule; 0 = run to the end
summarize = ""                # a directory of runs: print (and plot) lr / freeze_blocks -> top-1, then exit
hessian_every = 0             # every N iterations log the top Hessian eigenvalue and trace on a fixed val batch
                              # to out_dir/sharpness.json (Fig. 7c, 7f; plot: analyze.py --metric sharpness); 0 = off
hessian_samples = 30          # with --hessian_every: the trace's Hutchinson samples (after at most 20 Lanczos steps)
# model
init = "clip"                 # clip | dino | deit | embedded | checkpoint path | scratch
init_path = ""                # local copy of the official file for clip/dino/deit
model = "B/16"                # size preset, for init=scratch only
img_size = 224                # fine-tuning resolution; position tables are resized to it
rel_pos = True                # add per-layer relative position bias (zero init, or copied from a shared table)
layer_scale = 0.1             # for init=scratch only
drop_path = 0.0               # stochastic depth rate
keep_head = False             # reuse the checkpoint's classifier (its class count must match the data)
freeze_patch_embed = True     # frozen patch projection (ignored for init=scratch)
freeze_blocks = 0             # freeze the embedding and the first k blocks; k = depth is a linear probe
# optimization (paper Table 1, CLIP/ViT-B/16 column)
epochs = 50                   # schedule length
warmup_epochs = 10            # linear warmup
total_batch_size = 1024       # images per optimizer step over all GPUs and accumulation steps
micro_batch_size = 128        # images per GPU per forward
lr = 5e-5                     # peak learning rate (the lowered lr of the better baseline)
min_lr = 1e-7                 # end of the cosine
layer_decay = 0.6             # layer-wise lr decay: scale decay ** (depth + 1 - layer id); 1.0 = off
weight_decay = 0.05           # AdamW; none on biases, norms, tokens, absolute position tables
beta1 = 0.9                   # AdamW betas
beta2 = 0.95
grad_clip = 0.0               # max global grad norm; 0 = off
label_smoothing = 0.1         # target = (1 - e) one-hot + e / classes
# augmentation
min_crop_scale = 0.08         # RandomResizedCrop scale (0.08, 1)
color_jitter = 0.4            # used only without RandAugment (timm disables jitter when RandAugment is on)
randaug = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" = off
reprob = 0.25                 # random erasing probability (mode pixel, count 1)
recount = 1                   # random erasing rectangles
mixup = 0.0                   # mixup alpha; 0 = off
cutmix = 0.0                  # cutmix alpha; 0 = off
crop_pct = 0.875              # eval: resize to img_size / crop_pct, center crop
# system
seed = 0                      # init, data order, augmentations
device = "auto"               # auto | cpu | cuda | cuda:1 ...
dtype = "bfloat16"            # autocast: bfloat16 | float32 | float16 (loss scaled; V100, T4)
compile = True                # torch.compile the model
backend = ""                  # DDP backend; default nccl on GPU, gloo on CPU
# -----------------------------------------------------------------------------
# settings a resumed run may change: they decide where, how fast and how often to report, not
# what is computed (device, compile and backend change float rounding only; a moved data_dir is
# checked by refuse_changed_split); resume refuses others
RESUME_MAY_CHANGE = ("out_dir", "data_dir", "resume", "stop_iter", "wandb_log", "wandb_project",
                     "wandb_run_name", "eval_interval", "log_interval", "num_workers", "device",
                     "compile", "backend", "init_path", "hessian_every", "hessian_samples",
                     "summarize")
# the checkpoint entries --resume reads, besides config, iter_num and optimizer
RESUME_ENTRIES = ("model", "model_args", "best_top1")


def build_model(classes):
    """The ViT to fine-tune for the data's class names, and a note on where its weights came from."""
    num_classes = len(classes)
    if init == "scratch":
        cfg = ViTConfig.beit_v2(model, img_size=img_size, rel_pos="layer", layer_scale=layer_scale,
                                drop_path=drop_path, num_classes=num_classes, global_pool="avg")
        return ViT(cfg), "random init"
    if init not in OFFICIAL and init != "embedded" and not is_path(init):
        raise CheckpointError(f"unknown --init '{init}': choose {NAMES}, scratch or a checkpoint path")
    source, info = load_model(init, init_path or None)
    src_cfg = source.config
    if img_size % src_cfg.patch_size:
        raise CheckpointError(f"--img_size={img_size} is not a multiple of the patch size "
                              f"{src_cfg.patch_size} of '{init}': the patches must tile the image")
    if keep_head and src_cfg.num_classes != num_classes:
        raise CheckpointError(f"'{init}' has a head for {src_cfg.num_classes} classes but the data has {num_classes}: "
                              f"drop --keep_head to start a new head")
    if keep_head and info.get("classes") and list(info["classes"]) != list(classes):
        differ = next(i for i, (a, b) in enumerate(zip(info["classes"], classes)) if a != b)
        raise CheckpointError(f"'{init}' has a head for other classes than the data: output {differ} is "
                              f"{info['classes'][differ]!r}, the data's class {differ} is {classes[differ]!r}; "
                              f"drop --keep_head to start a new head")
    # a new head pools as BEiT, FD and MAE fine-tune ("avg"): the mean of the patch tokens into a new
    # fc_norm; the pretrained final norm is dropped (theirs is Identity under mean pooling)
    pool = src_cfg.global_pool if keep_head else "avg"
    cfg = replace(src_cfg, img_size=img_size, drop_path=drop_path, num_classes=num_classes, mask_token=False,
                  global_pool=pool,
                  rel_pos="layer" if rel_pos else src_cfg.rel_pos)
    sd = adapt_state_dict(source.state_dict(), cfg)
    if not keep_head:
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "norm."))}
    vit = ViT(cfg)
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    fresh = [k for k in missing if not k.startswith(("head.", "fc_norm.")) and "attn.rel_pos." not in k]
    if fresh or unexpected:
        raise CheckpointError(f"'{init}' does not fit the fine-tuning model: missing {fresh[:4]}, "
                              f"unexpected {unexpected[:4]}")
    if not keep_head:  # BEiT: a near-zero new head, so the first steps do not disturb the features
        vit.head.weight.data.mul_(0.001)
    return vit, f"from {init}"


def freeze(vit):
    """Freeze the patch projection and/or the embedding plus the first freeze_blocks blocks, and
    a shared relative position table (--rel_pos=False on a BEiT v2 init), which every block reads."""
    depth = vit.config.depth
    if not 0 <= freeze_blocks <= depth:
        raise SystemExit(f"error: freeze_blocks={freeze_blocks} must be in 0..{depth} ({depth} = linear probe)")
    if freeze_patch_embed and init != "scratch":
        vit.patch_embed.requires_grad_(False)
    if freeze_blocks > 0:
        for name, p in vit.named_parameters():
            last_norm = freeze_blocks == depth and name.startswith("norm.")
            if vit.layer_id(name) <= freeze_blocks or last_norm or name.startswith("rel_pos_bias."):
                p.requires_grad_(False)


# settings that do not make two fine-tunes different experiments in --summarize: the swept ones, the
# seed (its runs are repeats, averaged) and those a resume may change (where, how often, how fast)
NOT_RECIPE = {"init", "lr", "freeze_blocks", "seed", *RESUME_MAY_CHANGE} - {"data_dir"}


def recipe_labels(inits, recipes):
    """each run's name in the summary: its init, then the settings in which that init's runs differ
    (epochs, mixup, ...; not lr, frozen blocks, seed), so that other recipes are not averaged as repeats"""
    labels = []
    for init_, recipe in zip(inits, recipes):
        same_init = [other for i, other in zip(inits, recipes) if i == init_]
        differ = sorted({k for other in same_init for k in {*other, *recipe}
                         if other.get(k) != recipe.get(k)})
        labels.append(init_ + (f" ({', '.join(f'{k}={recipe.get(k)}' for k in differ)})"
                               if differ else ""))
    return labels


def print_summary(root):
    """lr and freeze_blocks -> top-1 of every run under root (each run's result.json): the last
    evaluation's top-1 and top-5 (the figure's), and the best top-1 over the run's evaluations
    (BEiT and FD log it as "max accuracy"; '-' in a result.json without it)."""
    runs, recipes, best = [], [], {}
    for path in sorted(glob.glob(os.path.join(glob.escape(root), "**", "result.json"),
                                 recursive=True)):
        try:
            r = json.load(open(path))
            settings = r["config"]
            scores = (str(settings["init"]), int(settings["freeze_blocks"]), float(settings["lr"]),
                      float(r["top1"]), float(r["top5"]))  # a value edited to null or text: skipped
            early = stopped_early(r)  # ' (stopped at iteration i of n)' or ''
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"warning: skipping {path}: not a result.json of finetune.py ({type(e).__name__}: {e})",
                  file=sys.stderr)
            continue
        runs.append((*scores, os.path.dirname(path) + early, bool(early)))
        best[runs[-1][-2]] = r.get("best_top1")
        recipes.append({k: v for k, v in settings.items() if k not in NOT_RECIPE})
    if not runs:
        found = "no result.json found under" if os.path.isdir(root) else "no folder"
        raise SystemExit(f"error: --summarize: {found} '{root}'")
    labels = recipe_labels([r[0] for r in runs], recipes)
    runs = [(label, *run[1:]) for label, run in zip(labels, runs)]
    # whole init paths and recipes: two runs stay apart
    width = max(len("init"), *(len(r[0]) for r in runs))
    print(f"{'init':<{width}} {'frozen':>6} {'lr':>9} {'top-1':>7} {'top-5':>7} {'best':>7}  run")
    for init_, frozen, lr_, top1, top5, run, _ in sorted(runs):
        best_top1 = f"{best[run]:>7.2f}" if isinstance(best[run], (int, float)) else f"{'-':>7}"
        print(f"{init_:<{width}} {frozen:>6} {lr_:>9.2e} {top1:>7.2f} {top5:>7.2f} "
              f"{best_top1}  {run}")
    plt = pyplot()
    if plt is None:
        print("(pip install matplotlib for the figure)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for init_, panels in summary_curves(runs).items():
        for ax, points in zip(axes, (panels["lr"], panels["frozen"])):
            if points:
                xs, means = zip(*sorted({x: sum(ys) / len(ys) for x, ys in points.items()}.items()))
                line, = ax.plot(xs, means, marker="o", label=init_)  # through the mean of the runs at each x
                dots = [(x, y) for x, ys in points.items() for y in ys]
                ax.scatter(*zip(*dots), color=line.get_color(), s=12)  # every run
    axes[0].set(xscale="log", xlabel="learning rate", ylabel="top-1 (%)", title="top-1 vs learning rate (Fig. 8b)")
    axes[1].set(xlabel="frozen blocks (depth = linear probe)", ylabel="top-1 (%)",
                title="top-1 vs frozen blocks (Fig. 8c), each at its best lr")
    early = sum(run[-1] for run in runs)  # runs --stop_iter ended: in the table only
    left_out = f"\n({early} run(s) stopped early left out)" if early else ""
    for ax, option in zip(axes, ("--lr", "--freeze_blocks")):
        if not ax.lines:
            ax.text(0.5, 0.5, f"no runs to compare:\nfine-tune with several {option}{left_out}", ha="center",
                    va="center", transform=ax.transAxes, color="gray")
        ax.grid(alpha=0.3)
    legend = {}  # one entry per init, below both panels (inside one, it hid points)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    legend_rows = (len(legend) + 2) // 3
    if legend:  # (every run stopped early: none)
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(len(legend), 3), fontsize="small")
    fig.tight_layout(rect=(0, 0.06 * legend_rows, 1, 1))
    save_figure(fig, os.path.join(root, "summary.png"), 120)
    print(f"figure: {os.path.join(root, 'summary.png')} (runs stopped early are in the table only)")


def summary_curves(runs):
    """the figure's points from print_summary's runs (init, frozen, lr, top-1, top-5, run, stopped early):
    per init, {"lr": {lr: [top-1 of each run without frozen blocks]}, "frozen": {blocks: [top-1, ...]}},
    the second only where the init has runs with more than one number of frozen blocks, each
    number's runs at the lr of the best mean top-1 for it (an lr sweep beside them is not averaged
    in). A run stopped early (a smoke test) is no point of a curve."""
    curves, by_lr = {}, {}
    for init_, frozen, lr_, top1, _, _, early in sorted(runs):
        if early:
            continue
        panels = curves.setdefault(init_, dict(lr={}, frozen={}))
        if frozen == 0:
            panels["lr"].setdefault(lr_, []).append(top1)
        by_lr.setdefault((init_, frozen), {}).setdefault(lr_, []).append(top1)
    for (init_, frozen), scores in by_lr.items():
        curves[init_]["frozen"][frozen] = max(scores.values(),
                                              key=lambda top1s: sum(top1s) / len(top1s))
    for panels in curves.values():
        if len(panels["frozen"]) < 2:
            panels["frozen"] = {}
    return curves


def main():
    if summarize:
        return print_summary(summarize)
    # -------------------------------------------------------------------------
    # options, all checked here before any work (the patch size of a checkpoint: in build_model);
    # then the checkpoint to resume, if any
    patch_size = ViTConfig.from_name(model).patch_size if model in PRESETS else 1
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    init_is_own_checkpoint = os.path.isfile(init) and os.path.isfile(ckpt_path) and os.path.samefile(init, ckpt_path)
    problem = option_error(config, [
        (not init_is_own_checkpoint, f"--init={init} is the checkpoint this run writes (out_dir/ckpt.pt), which "
                                     f"the fine-tune would overwrite: choose another --out_dir"),
        (eval_interval >= 0, f"--eval_interval={eval_interval} must be >= 0 (0 = once per epoch)"),
        (0 < layer_decay <= 1, f"--layer_decay={layer_decay} must be in (0, 1] (1 = off)"),
        (recount >= 1, f"--recount={recount} must be >= 1"),
        (hessian_samples >= 2, f"--hessian_samples={hessian_samples} must be >= 2 (a standard error needs two)"),
        (init != "scratch" or model in PRESETS,
         f"unknown model size '{model}': choose one of {', '.join(PRESETS)}"),
        (init != "scratch" or img_size % patch_size == 0,
         f"--img_size={img_size} is not a multiple of the patch size {patch_size} of {model}: "
         f"the patches must tile the image"),
    ])
    if problem:
        raise SystemExit(f"error: {problem}")
    if not resume:  # a new run must not replace an earlier run's checkpoint
        refuse_overwrite(ckpt_path, RESUME_ENTRIES)
    ckpt = resume_checkpoint(ckpt_path, config, RESUME_MAY_CHANGE, RESUME_ENTRIES) if resume else None
    stop_signal = stop_signals()  # from here a SIGTERM only sets this flag; the loop saves and stops
    ctx = Context(device, dtype, backend)
    if ctx.master:  # before any work: out_dir is writable and no other run uses it
        lock_out_dir(out_dir)  # held until this process ends
    # after the out_dir checks: a refused start makes no W&B run
    wandb_run = wandb_init(ctx.master, wandb_log, wandb_project, wandb_run_name, config)
    accum = accumulation_steps(total_batch_size, micro_batch_size, ctx.world_size)
    torch.manual_seed(seed)  # same init on every rank

    try:
        root = resolve_data_dir(data_dir)
        augment = RandAugment(randaug) if randaug else None
        train_set = ImageFolder(os.path.join(root, "train"), None, None, seed)
        val_set = ImageFolder(os.path.join(root, "val"), EvalTransform(img_size, crop_pct), None, seed)
        check_same_classes(train_set, val_set, root)
        if resume:  # the weights and their shapes come from the checkpoint: --init is not read again
            refuse_changed_split(ckpt, train_set, os.path.join(root, "train"))
            vit, origin = ViT(config_of(ckpt["model_args"], ckpt_path)), f"from {init}"
        else:
            vit, origin = build_model(train_set.classes)
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    erase = RandomErasing(reprob, vit.config.mean, vit.config.std, recount) if reprob > 0 else None
    jitter = 0.0 if augment else color_jitter  # timm turns color jitter off under RandAugment
    train_set.transform = TrainTransform(img_size, min_crop_scale, 0.5, jitter, augment, erase)
    num_classes = len(train_set.classes)
    freeze(vit)
    vit.to(ctx.device)
    optimizer = vit.configure_optimizers(weight_decay, lr, (beta1, beta2), layer_decay if layer_decay < 1 else None)
    # float16: the loss is scaled up before backward so that small gradients do not round to 0,
    # and a step whose gradients overflow is skipped with the scale halved; bfloat16, float32:
    # a pass-through
    scaler = torch.amp.GradScaler(ctx.device_type, enabled=dtype == "float16")

    train_loader, train_sampler = make_loader(train_set, micro_batch_size, True, ctx.rank, ctx.world_size, seed,
                                              num_workers)
    iters_per_epoch, max_iters, warmup_iters, end_iter = schedule_lengths(
        train_sampler, micro_batch_size, accum, epochs, warmup_epochs, stop_iter)
    eval_every = eval_interval or iters_per_epoch

    def write_result(top1, top5):
        """result.json, the numbers --summarize reads: the last evaluation's and the best top-1"""
        result = dict(top1=top1, top5=top5, best_top1=best_top1, iter_num=iter_num, max_iters=max_iters,
                      config=config)  # iter_num < max_iters: stopped early by --stop_iter
        write_atomic(os.path.join(out_dir, "result.json"), json.dumps(result, indent=1))
        ended = "done" if iter_num >= max_iters else f"stopped at iteration {iter_num} of {max_iters} (--stop_iter)"
        log(ctx, f"{ended}: top-1 {top1:.2f}%, top-5 {top5:.2f}% ({os.path.join(out_dir, 'result.json')})")

    iter_num, best_top1 = 0, 0.0
    if resume:
        # float16: the loss scale goes on
        scaled = dict(scaler=scaler) if scaler.is_enabled() else {}
        resume_from(ckpt, ckpt_path, optimizer, model=vit, **scaled)
        iter_num, best_top1 = ckpt["iter_num"], ckpt["best_top1"]
        log(ctx, f"resumed from {ckpt_path} at iteration {iter_num}")
        if iter_num >= end_iter and ckpt.get("top1") is not None:  # None: its last evaluation read no image
            log(ctx, f"nothing to do: the checkpoint is at iteration {iter_num}, "
                     f"this run ends at {end_iter}")
            if ctx.master:  # result.json again (a run killed before writing it)
                write_result(ckpt["top1"], ckpt["top5"])
            ctx.close()
            return
    log_path = os.path.join(out_dir, "log.jsonl")  # a JSON record per log line and per evaluation
    if ctx.master:  # a new run starts it afresh; a resumed one drops records past its checkpoint
        trim_log(log_path, iter_num)
    train_model = wrap_for_training(vit, ctx, compile)  # compiled and/or DDP; vit is saved

    @torch.no_grad()
    def evaluate():
        """top-1 / top-5 (%) over the whole val split; each image counted once over all ranks; None, None
        if no val image could be read (a top-1 over no image is not a number)"""
        vit.eval()
        loader, _ = make_loader(val_set, micro_batch_size, False, ctx.rank, ctx.world_size, seed, num_workers)
        counts = torch.zeros(3, device=ctx.device)  # top-1 hits, top-5 hits, images
        for images, labels, _, _ in loader:
            if images is None:
                continue
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            with ctx.autocast():
                logits = vit(images)
            top = logits.topk(min(5, num_classes), dim=-1).indices  # (B, k)
            hits = top == labels[:, None]
            counts[0] += hits[:, 0].sum()
            counts[1] += hits.any(-1).sum()
            counts[2] += len(labels)
        ctx.all_reduce_sum(counts)
        vit.train()
        top1_hits, top5_hits, images_read = counts.tolist()
        if images_read == 0:
            return None, None
        return 100 * top1_hits / images_read, 100 * top5_hits / images_read

    def no_val_image():
        """the error of an evaluation that read no val image (raised after the checkpoint is saved and
        the ranks met)"""
        return (f"error: iteration {iter_num}: no val image under {os.path.join(root, 'val')} could be read (see "
                f"the warnings): fix the val split, then continue with --resume=True (checkpoint {ckpt_path})")

    sharpness_path = os.path.join(out_dir, "sharpness.json")
    sharpness_log = []
    if resume and ctx.master and os.path.exists(sharpness_path):  # entries after the checkpoint are logged again
        try:
            with open(sharpness_path) as f:
                sharpness_log = [e for e in json.load(f) if e["iter"] <= iter_num]
            if any("parameters" not in e for e in sharpness_log):  # another definition: one curve, one
                raise ValueError("written by an older version, over the trained weights only")
        except (ValueError, TypeError, KeyError, OSError) as e:  # edited, cut, a folder: set aside, not lost
            aside, sharpness_log = sharpness_path + ".unreadable", []
            os.replace(sharpness_path, aside)
            log(ctx, f"warning: {sharpness_path} cannot be continued ({type(e).__name__}: {e}); moved to {aside}, "
                     f"the sharpness curve starts again at iteration {iter_num}")

    def log_sharpness():
        """top eigenvalue and Hutchinson trace of the loss on one val batch, model in eval mode: the same
        micro_batch_size images at every call, drawn at random with the seed (the first ones would be
        a class or two, as the val folder lists them class by class)"""
        loader, _ = make_loader(val_set, micro_batch_size, False, seed=seed, num_workers=0,
                                num_samples=micro_batch_size)
        images, labels, _, _ = next(iter(loader))
        if images is None:
            raise SystemExit("error: the val batch for the sharpness has no readable image: "
                             "--hessian_every needs one")
        batch = [(images.to(ctx.device), labels.to(ctx.device))]
        # over all the weights, frozen ones too: analyze.py's Hessian of the checkpoint, on the same terms
        frozen = [p for p in vit.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        vit.eval()
        try:
            r = curvature(vit, batch, k=1, max_iter=20, trace_samples=hessian_samples)
        finally:
            for p in frozen:
                p.requires_grad_(False)
            vit.train()
        value, trace, stderr = r["eigenvalues"][0], r["trace"], r["trace_stderr"]
        parameters = sum(t.numel() for t in r["vectors"][0])  # the dimension the Hessian acted on
        sharpness_log.append(dict(iter=iter_num, eigenvalue=value, trace=trace, trace_stderr=stderr,
                                  parameters=parameters, trace_samples=r["trace_samples"],
                                  lanczos_steps=r["lanczos_steps"], converged=r["converged"]))
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(sharpness_path, json.dumps(sharpness_log))
        return f"iter {iter_num}: sharpness (top Hessian eigenvalue) {value:.4g}, trace {trace:.4g}"

    def checkpoint(top1, top5):
        """the run after iteration iter_num and that iteration's evaluation, if any (else None), as plain
        data (torch.load(weights_only=True) reads it)"""
        return dict(model=vit.state_dict(), model_args=vit.config.to_dict(), config=config,
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
                    best_top1=best_top1,
                    classes=train_set.classes, top1=top1, top5=top5,
                    train_split=train_split_summary(train_set))

    trainable = sum(p.numel() for p in vit.parameters() if p.requires_grad)
    log(ctx, f"fine-tune {origin}: {vit.config.embed_dim}-d x {vit.config.depth} blocks, "
             f"{trainable:,} trainable params, {num_classes} classes, {len(train_set)} train / "
             f"{len(val_set)} val images, {iters_per_epoch} iters/epoch, {max_iters} iters, "
             f"accumulation {accum}, {ctx.world_size} process(es) on {ctx.device}")
    warning = warmup_warning(warmup_epochs, epochs, warmup_iters, max_iters)
    if warning:
        log(ctx, warning)
    meter = Meter(3 * vit.flops_per_image(), peak_flops(ctx.device), iter_num, ctx.world_size)

    # -------------------------------------------------------------------------
    # training loop
    batches = micro_batches(train_loader, train_sampler, iter_num, accum, iters_per_epoch)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    nonfinite = torch.full((3,), -1.0, dtype=torch.float64, device=ctx.device)  # checked at log lines only
    skipped = images_read = 0  # this process's unreadable, read training images since the log line
    loss = torch.tensor(float("nan"))  # the last micro-batch's loss, shown at log lines (none read yet)
    # under DDP a rank that read no image of a micro-batch runs this batch of zeros with a loss that counts 0:
    # the other ranks' gradient all-reduce waits for its gradients
    stand_in = torch.zeros(micro_batch_size, 3, img_size, img_size, device=ctx.device)  # (B, 3, H, W)
    top1 = top5 = None  # the last evaluation's
    bar = tqdm(total=end_iter, initial=iter_num, disable=None if ctx.master else True, desc="fine-tune",
               dynamic_ncols=True)
    vit.train()
    save_on_ctrl_c(stop_signal)  # from here a first Ctrl-C saves the finished step
    while iter_num < end_iter:
        lr_now = cosine_lr(iter_num, max_iters, warmup_iters, lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr_now * group["lr_scale"]  # lr_scale: layer decay
        readable = 0  # images of this step that could be read
        for micro_step in range(accum):
            images, labels, _, n_skipped = next(batches)
            # this micro-step's random draws (mixup, drop path) follow from (seed, rank, iteration,
            # micro-step): a resumed run draws exactly what the uninterrupted run drew
            torch.manual_seed(derived_seed(seed, ctx.rank, iter_num, micro_step))
            skipped += n_skipped
            if ctx.ddp:  # sync gradients on the last micro-step only
                train_model.require_backward_grad_sync = micro_step == accum - 1
            if images is None:  # every image of this micro-batch was unreadable
                if ctx.ddp:  # under autocast as the real batches: a compiled model compiles nothing new
                    with ctx.autocast():
                        stand_in_out = train_model(stand_in)
                    (stand_in_out.float().sum() * 0).backward()
                continue
            readable += len(images)
            images = images.to(ctx.device, non_blocking=True)
            labels = labels.to(ctx.device, non_blocking=True)
            targets = smooth_one_hot(labels, num_classes, label_smoothing)  # (B, classes)
            if mixup > 0 or cutmix > 0:
                images, targets = mixup_cutmix(images, targets, mixup, cutmix)
            with ctx.autocast():
                logits = train_model(images)  # (B, classes)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()  # soft-target CE
            nonfinite = record_nonfinite(nonfinite, loss, iter_num, 0)
            scaler.scale(loss / accum).backward()
            images_read += len(images)
        if not ctx.any_rank(readable > 0):  # no rank read an image in a whole step: the train split is unreadable
            stop_if_nonfinite(nonfinite, ckpt_path, scaler)  # a non-finite step is never saved
            if ctx.master and iter_num > 0:  # the finished steps are kept; this one is read again at resume
                save_checkpoint(checkpoint(None, None), ckpt_path)
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
        iter_num += 1
        bar.update(1)

        if iter_num % log_interval == 0:
            stop_if_nonfinite(nonfinite, ckpt_path, scaler)
            # over the ranks: mean loss, all skipped
            loss_value, skipped, images_read = ctx.log_values(loss, skipped, images_read)
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
        between_steps = time.time()  # evaluation, sharpness, checkpoint: not in ms/iter
        if hessian_every and iter_num % hessian_every == 0 and ctx.master:
            bar.write(log_sharpness())
        # a stop signal seen by any rank: all ranks save this finished step together, then stop
        stop = ctx.any_rank(bool(stop_signal)) and iter_num < end_iter
        at_eval = iter_num % eval_every == 0 or iter_num == end_iter
        if at_eval or stop:
            stop_if_nonfinite(nonfinite, ckpt_path, scaler)  # a non-finite step is never saved
            top1, top5 = evaluate() if at_eval else (None, None)
            if top1 is not None:
                best_top1 = max(best_top1, top1)
                if ctx.master:
                    epoch = iter_num / iters_per_epoch
                    bar.write(f"iter {iter_num} (epoch {epoch:.1f}): val top-1 {top1:.2f}%, "
                              f"top-5 {top5:.2f}%")
                    record = dict(iter=iter_num, epoch=epoch, val_top1=top1, val_top5=top5)
                    append_jsonl(log_path, record, wandb_run)
            if ctx.master:
                save_checkpoint(checkpoint(top1, top5), ckpt_path)
            if at_eval and top1 is None:  # after the save: the steps are kept
                ctx.barrier()
                raise SystemExit(no_val_image())
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
    if top1 is None:  # resumed at the end from a checkpoint whose last evaluation read no val image
        top1, top5 = evaluate()
        if top1 is None:
            ctx.barrier()
            raise SystemExit(no_val_image())
        best_top1 = max(best_top1, top1)
        if ctx.master:  # the checkpoint gets the evaluation it lacked (no step was taken since)
            save_checkpoint(ckpt | dict(top1=top1, top5=top5, best_top1=best_top1), ckpt_path)
    if ctx.master:
        write_result(top1, top5)
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
