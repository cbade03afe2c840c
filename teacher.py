"""
Frozen teachers for masked distillation, and the one loader every script uses for models.

Any place that takes a model accepts three forms:
  - a teacher name: clip | dino | deit (official ViT-B/16 weights: a local file given as
    `path`, else the cached download of the public URL), or `embedded` (the small teacher
    shipped for the embedded dataset);
  - an official checkpoint file (CLIP TorchScript archive or state dict, timm/DINO/DeiT layout,
    DINO's full training checkpoint, timm's `beit` layout: BEiT v2 as timm stores it, or
    microsoft/unilm's own files);
  - a project checkpoint written by train_md.py / finetune.py, or its timm export.

    from teacher import load_teacher
    t = load_teacher("clip", path="ViT-B-16.pt")
    features = t(images)  # (B, 3, 224, 224) in [0, 1] -> (B, 197, 768), last block after final norm

Any model form goes out in the layout of timm's beit / vision_transformer models (the error names
the option timm has no counterpart for, if any) or as a project checkpoint:
    python teacher.py export --format=timm out/md/ckpt.pt md_timm.pth
"""
import dataclasses
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (CACHE_DIR, CheckpointError, check_finite, download, file_sha256, print_help,
                    read_checkpoint, save_atomic)
from model import ViT, ViTConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_TEACHER = os.path.join(HERE, "data", "embedded_teacher.pt")

# name -> (url, expected SHA-256 or its published prefix, layout)
OFFICIAL = {
    "clip": ("https://openaipublic.azureedge.net/clip/models/"
             "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
             "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "clip"),
    "dino": ("https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
             None, "timm"),
    "deit": ("https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth", "b5f2ef4d", "timm"),
}
NAMES = ", ".join(list(OFFICIAL) + ["embedded"])


def is_path(name):
    """a model name that is meant as a file: one that exists, or looks like a path"""
    return os.path.exists(name) or os.sep in name or name.endswith((".pt", ".pth", ".bin"))


# ----------------------------------------------------------------------------------------
# reading state dicts

def unwrap_state_dict(obj):
    """Strip the usual wrappers: {'model': ...}, {'state_dict': ...}, DINO's {'teacher': ...},
    BEiT v2's {'module': ...} (as timm's beit checkpoint_filter_fn unwraps it), and the
    'module.' / 'backbone.' / '_orig_mod.' (torch.compile) prefixes."""
    for key in ("teacher", "model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError("not a state dict of tensors")
    out = {}
    for k, v in obj.items():
        while k.startswith(("module.", "backbone.", "_orig_mod.")):  # DDP(compile(m)) and compile(DDP(m)) alike
            k = k.partition(".")[2]
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------
# converting official layouts into model.py's ViT

def detect_layout(sd):
    if any(k.endswith("transformer.resblocks.0.attn.in_proj_weight") for k in sd):
        return "clip"
    if "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
        beit_only = ("attn.q_bias", "relative_position_bias_table", ".gamma_1")  # not in timm's vit
        return "beit" if any(k.endswith(beit_only) for k in sd) else "timm"
    return None


def pool_of(sd):
    """global_pool from the norms a file has: BEiT's and timm's mean pooling ("avg") has fc_norm
    and no final norm; "mean" (both) is model.py's own."""
    if "norm.weight" not in sd:
        return "avg"
    return "mean" if "fc_norm.weight" in sd else "cls"


# embed_dim -> number of heads, for files that do not record it (the keys cannot tell): model.py's PRESETS, every
# registered ViT of that width with a class token in timm (vision_transformer, beit, deit) and open_clip's ViT
# towers (model_configs/*.json). Not embed_dim / 64 for nano/4, tiny/4, timm's test_vit, vit_so400m, vit_huge,
# vit_giant, vit_gigantic, open_clip's ViT-H, ViT-g, ViT-bigG, ViT-e (tests/test_teacher.py reads both libraries).
KNOWN_HEADS = {48: 2, 64: 2, 96: 3, 192: 3, 384: 6, 512: 8, 768: 12, 896: 14, 1024: 16, 1152: 16, 1280: 16,
               1408: 16, 1536: 24, 1664: 16, 1792: 16}


def heads_of(D, source):
    """the number of heads of a D-wide ViT whose file does not record it: KNOWN_HEADS, else a guess, with a warning"""
    if D in KNOWN_HEADS:
        return KNOWN_HEADS[D]
    print(f"warning: {source} does not record its number of heads, and width {D} is not in teacher.KNOWN_HEADS: "
          f"guessed {max(1, D // 64)} (embed_dim / 64); if wrong, the model computes something else: add the width "
          "to KNOWN_HEADS, or give a project checkpoint whose model_args hold num_heads", file=sys.stderr)
    return max(1, D // 64)


CLIP_ACTS = ("quick_gelu", "gelu")


def convert_clip(sd, source, act="quick_gelu"):
    """OpenAI CLIP visual tower -> (ViTConfig, state dict). ln_post becomes the final norm
    (applied to every token); the projection to the joint space is dropped. The keys do not say
    the activation: QuickGELU is OpenAI's (and open_clip's `-quickgelu` models'), GELU open_clip's
    other models' (LAION's ViT-B-16, ...)."""
    sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")} or sd
    D = sd["conv1.weight"].shape[0]
    patch = sd["conv1.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
    cfg = ViTConfig(img_size=grid * patch, patch_size=patch, embed_dim=D, depth=depth,
                    num_heads=heads_of(D, source), patch_bias=False, act=act, norm_eps=1e-5,
                    pre_norm=True, global_pool="cls", mean=CLIP_MEAN, std=CLIP_STD)
    renames = [("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_weight", "attn.qkv.weight"),
               ("attn.in_proj_bias", "attn.qkv.bias"), ("attn.out_proj.", "attn.proj."),
               ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]
    out = {"patch_embed.proj.weight": sd["conv1.weight"],
           "cls_token": sd["class_embedding"].view(1, 1, D),
           "pos_embed": sd["positional_embedding"].unsqueeze(0)}
    for a, b in (("ln_pre.", "norm_pre."), ("ln_post.", "norm.")):
        for p in ("weight", "bias"):
            out[b + p] = sd[a + p]
    for k, v in sd.items():
        if k.startswith("transformer.resblocks."):
            k = "blocks." + k[len("transformer.resblocks."):]
            for a, b in renames:
                k = k.replace(a, b)
            out[k] = v
    return cfg, out


def convert_timm(sd, source, cfg=None, act=None):
    """timm `vision_transformer` layout (DINO, DeiT, timm vit_*, export_timm's files): the key
    names are ours but for layer scale (timm's ls1.gamma / ls2.gamma are gamma_1 / gamma_2).
    Without `cfg` the shapes tell the rest but the number of heads: like CLIP's,
    heads_of(embed_dim). timm's CLIP towers (vit_*_clip_*: a norm_pre) also fix what their keys do
    not tell: LayerNorm eps 1e-5 and CLIP's mean/std; `act` their activation (GELU, or QuickGELU for
    vit_*_clip_quickgelu_*)."""
    if "dist_token" in sd:  # every block attends to it: dropping it would be another model
        raise CheckpointError("is a distilled DeiT (it has a distillation token, which model.py's ViT has "
                              "not): give the DeiT without distillation (deit_base_patch16_224)")
    if "cls_token" not in sd:
        raise CheckpointError("is a ViT without a class token, which model.py's ViT always has")
    out = {}
    for k, v in sd.items():
        if k.startswith(("head.mlp.", "head.last_layer.")):  # DINO's projection head (its training checkpoint)
            continue
        out[k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = v
    if cfg is not None:
        return cfg, out
    D = out["cls_token"].shape[-1]
    patch = out["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    grid = int(round((out["pos_embed"].shape[1] - 1) ** 0.5))
    num_classes = out["head.weight"].shape[0] if "head.weight" in out else 0
    clip_tower = {}
    # timm/models/vision_transformer.py's CLIP registrations: pre_norm, nn.LayerNorm
    if "norm_pre.weight" in out:
        clip_tower = dict(pre_norm=True, norm_eps=1e-5, act=act or "gelu", mean=CLIP_MEAN,
                          std=CLIP_STD)
    cfg = ViTConfig(img_size=grid * patch, patch_size=patch, embed_dim=D, depth=depth,
                    num_heads=heads_of(D, source), num_classes=num_classes, global_pool=pool_of(out),
                    qkv_bias="all" if "blocks.0.attn.qkv.bias" in out else "none",
                    layer_scale=LAYER_SCALE if "blocks.0.gamma_1" in out else 0.0,
                    patch_bias="patch_embed.proj.bias" in out,
                    mlp_ratio=out["blocks.0.mlp.fc1.weight"].shape[0] / D, **clip_tower)
    return cfg, out


LAYER_SCALE = 0.1  # files do not store layer scale's init value; any value > 0 is the same model
BEIT_PRETRAINING_HEADS = ("lm_head.", "cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")


def convert_beit(sd, source, cfg=None):
    """timm `beit` layout -> (ViTConfig, state dict). Followed: timm/models/beit.py (Beit and its
    checkpoint_filter_fn, which drops the relative position index buffers: they are the same
    function of the grid as RelativePositionBias.index here) and microsoft/unilm
    beit2/modeling_pretrain.py, whose pretraining heads (lm_head, cls_pt_*) are not part of the
    ViT. The key names are ours but for the per-layer table (attn.relative_position_bias_table).
    Without `cfg` the shapes tell the rest; the number of heads comes from a relative position
    table where there is one, else heads_of(embed_dim). Input normalization is not in the file:
    ImageNet's mean/std, as BEiT v2 uses (BEiT v1 used 0.5, 0.5)."""
    layer_key = "blocks.0.attn.rel_pos.relative_position_bias_table"
    shared_key = "rel_pos_bias.relative_position_bias_table"
    out = {}
    for k, v in sd.items():
        if "relative_position_index" in k or k.startswith(BEIT_PRETRAINING_HEADS):
            continue
        out[k.replace(".attn.relative_", ".attn.rel_pos.relative_")] = v
    if cfg is not None:
        return cfg, out
    if layer_key in out and shared_key in out:
        raise CheckpointError("has a shared and a per-layer relative position bias; ViT takes one")
    D = out["cls_token"].shape[-1]
    patch = out["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    table = out.get(layer_key, out.get(shared_key))
    if "pos_embed" in out:
        grid = int(round((out["pos_embed"].shape[1] - 1) ** 0.5))
    elif table is not None:  # (2G-1)^2 + 3 rows
        grid = (int(round((table.shape[0] - 3) ** 0.5)) + 1) // 2
    else:
        raise CheckpointError("has no position embedding or table: its image size is unknown")
    rel_pos = "layer" if layer_key in out else "shared" if shared_key in out else "none"
    cfg = ViTConfig(img_size=grid * patch, patch_size=patch, embed_dim=D, depth=depth,
                    num_heads=table.shape[1] if table is not None else heads_of(D, source),
                    mlp_ratio=out["blocks.0.mlp.fc1.weight"].shape[0] / D,
                    qkv_bias="qv" if "blocks.0.attn.q_bias" in out else "none",
                    abs_pos="pos_embed" in out, rel_pos=rel_pos,
                    layer_scale=LAYER_SCALE if "blocks.0.gamma_1" in out else 0.0,
                    mask_token="mask_token" in out,
                    num_classes=out["head.weight"].shape[0] if "head.weight" in out else 0,
                    global_pool=pool_of(out))
    return cfg, out


def build_vit(cfg, sd, source):
    """A ViT with exactly these weights, or one error line naming what does not fit or is not finite."""
    model = ViT(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}"
             for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        parts = [f"{name} {items[:4]}{' ...' if len(items) > 4 else ''}" for name, items in problems if items]
        raise CheckpointError(f"{source} does not fit the model it describes: {'; '.join(parts)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    check_finite(model, source)
    return model


def class_names(classes, cfg, source):
    """a checkpoint's class names (finetune.py saves the data's, one per output of the head) -> the
    list, or None where it has none; a list that cannot name the outputs is one line (analysis would
    pick a wrong output or fail deep inside, an IndexError)"""
    if classes is None:
        return None
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"'{source}' has class names this version cannot read: a "
                              f"{type(classes).__name__}, not a list of names")
    if not classes:  # an empty list names nothing, as for a model without a head
        return None
    if len(classes) != cfg.num_classes:
        raise CheckpointError(f"'{source}' names {len(classes)} classes but its head has {cfg.num_classes} "
                              "outputs: not as finetune.py writes it (edited by hand?)")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise CheckpointError(f"'{source}' names the class {twice[0]!r} twice")
    return list(classes)


def load_model(name_or_path, path=None, cache_dir=CACHE_DIR, act=None):
    """Any model form -> (ViT in eval mode, info dict). `path` is a local copy of an official
    teacher's file (no download). `act` is the activation of a CLIP-layout file, which its keys do
    not tell: "quick_gelu" (OpenAI's; assumed without `act`, with a warning unless it is teacher
    `clip`'s file) or "gelu" (open_clip's models without -quickgelu in their name)."""
    name = str(name_or_path)
    if name in OFFICIAL:
        url, sha, layout = OFFICIAL[name]
        source = path or download(url, sha, cache_dir)
    elif name == "embedded":
        source, layout = path or EMBEDDED_TEACHER, None
    elif is_path(name) and path:  # two files for one model: the second would be ignored
        raise CheckpointError(f"'{name}' is a file itself; a local copy ('{path}') is given for "
                              f"{NAMES} only: leave it out")
    elif is_path(name):
        source, layout = name, None
    else:
        raise CheckpointError(f"unknown model '{name}': choose {NAMES} or a checkpoint path")
    if act not in (None, *CLIP_ACTS):
        raise CheckpointError(f"unknown activation '{act}' for a CLIP-layout file: choose {' or '.join(CLIP_ACTS)}")
    obj = read_checkpoint(source)
    if isinstance(obj, dict) and "vqkd_args" in obj:
        raise CheckpointError(f"'{source}' is a VQ-KD tokenizer (train_vqkd.py), not a ViT: give it to "
                              f"train_md.py as --target=vqkd --tokenizer={source}")
    project = isinstance(obj, dict) and "model_args" in obj and "model" in obj
    try:
        sd = unwrap_state_dict(obj["model"] if project else obj)  # a project's 'model' may have DDP/compile prefixes
    except CheckpointError as e:
        raise CheckpointError(f"'{source}' is {e}") from None
    found = "project" if project else detect_layout(sd)
    if found is None:
        raise CheckpointError(f"'{source}' is not a CLIP, DINO/DeiT (timm), BEiT or project "
                              f"checkpoint: keys start {list(sd)[:3]}")
    # export_timm's file: its config says the activation
    exported = isinstance(obj, dict) and "mdlab_args" in obj
    clip_tower = found == "timm" and "norm_pre.weight" in sd and not exported  # timm's vit_*_clip_*
    if act is not None and found != "clip" and not clip_tower:
        raise CheckpointError(f"'{source}' is a {found} checkpoint: an activation is chosen for CLIP-layout files "
                              f"(OpenAI's, open_clip's, timm's CLIP towers) only, "
                              "whose keys do not tell it")
    # a run's weights as --init=deit --init_path=out/md/ckpt.pt: its fine-tunes would be filed as
    # deit's (a converted copy, teacher.py export of the official file with --act, has an empty config)
    if project and name in OFFICIAL and obj.get("config"):
        raise CheckpointError(f"'{source}' is a training run's checkpoint, not a copy of the "
                              f"official file of teacher '{name}': give the file itself in "
                              f"place of '{name}'")
    if project:
        cfg = config_of(obj["model_args"], source)
        model = build_vit(cfg, sd, f"'{source}'")
        classes = class_names(obj.get("classes"), cfg, source)
        info = dict(source=source, kind="project", config=obj.get("config", {}), classes=classes)
        return model.eval(), info
    if layout is not None and found != layout:
        raise CheckpointError(f"'{source}' has the {found} layout, but teacher '{name}' needs the {layout} "
                              f"layout")
    published = OFFICIAL[name][1] if name in OFFICIAL else None
    if path and published and not file_sha256(path).startswith(published):  # a local copy of another file
        print(f"warning: '{path}' is not the published file of teacher '{name}' (its SHA-256 differs from "
              f"{published[:16]}...): read in {name}'s layout" + (" with OpenAI's QuickGELU (for open_clip's GELU "
              "models: python teacher.py export --act=gelu SRC DST)" if layout == "clip" else ""),
              file=sys.stderr)
    # export_timm's files carry what timm has no place for: ViTConfig, mask token, class names
    extra = obj if exported else {}
    cfg = config_of(extra["mdlab_args"], source) if extra else None
    try:
        if found == "clip":
            if act is None and name not in OFFICIAL:
                print(f"warning: '{source}' has CLIP's layout, whose keys do not tell the activation: QuickGELU "
                      "assumed (OpenAI's CLIP, open_clip's -quickgelu models); for open_clip's GELU models "
                      "(LAION's ViT-B-16, ...) write a teacher with python teacher.py export --act=gelu SRC DST",
                      file=sys.stderr)
            cfg, sd = convert_clip(sd, f"'{source}'", act or "quick_gelu")
        elif clip_tower:
            if act is None:
                print(f"warning: '{source}' has the layout of timm's CLIP towers (vit_*_clip_*), "
                      "whose keys do not tell the activation: GELU assumed; for the "
                      "vit_*_clip_quickgelu_* ones write a teacher with "
                      "python teacher.py export --act=quick_gelu SRC DST", file=sys.stderr)
            cfg, sd = convert_timm(sd, f"'{source}'", act=act)
        else:
            cfg, sd = (convert_beit if found == "beit" else convert_timm)(sd, f"'{source}'", cfg)
    except CheckpointError as e:
        raise CheckpointError(f"'{source}' {e}") from None
    except KeyError as e:  # a variant of the family without a part model.py's ViT has
        raise CheckpointError(f"'{source}' has the {found} layout but no {e.args[0]!r}, which "
                              "model.py's ViT needs: a variant it cannot hold (open_clip's CLIPA "
                              "towers have no ln_pre, timm's relpos models no pos_embed)") from None
    if "mask_token" in extra:
        sd["mask_token"] = extra["mask_token"]
    model = build_vit(cfg, sd, f"'{source}'")
    info = dict(source=source, kind=found, classes=class_names(extra.get("classes"), model.config, source))
    return model.eval(), info


def config_of(model_args, source):
    """a checkpoint's model_args -> ViTConfig; an unknown key, a value not of its field's type, or one
    out of its field's range (which would fail later, deep in building the model, or build another model
    silently) is one line"""
    if not isinstance(model_args, dict):
        raise CheckpointError(f"'{source}' has model_args this version cannot read: a "
                              f"{type(model_args).__name__}, not a dict of ViT settings")
    try:
        cfg = ViTConfig.from_dict(model_args)
    except TypeError as e:  # an unknown field
        raise CheckpointError(f"'{source}' has model_args this version cannot read: {e}") from None
    except KeyError as e:  # mean or std missing
        raise CheckpointError(f"'{source}' has model_args this version cannot read: no {e}") from None
    for field in dataclasses.fields(cfg):
        if not of_field_type(getattr(cfg, field.name), field.default):
            expected = "a tuple of numbers" if isinstance(field.default, tuple) else type(field.default).__name__
            stored = dict(model_args)[field.name]  # as in the file: from_dict made a tuple of a list
            raise CheckpointError(f"'{source}' has model_args this version cannot read: "
                                  f"{field.name}={stored!r}, expected {expected}")
    problem = value_problem(cfg)
    if problem:
        name, allowed = problem
        raise CheckpointError(f"'{source}' has model_args model.py's ViT does not take: "
                              f"{name}={dict(model_args)[name]!r}, expected {allowed}")
    return cfg


CHOICES = dict(qkv_bias=("all", "qv", "none"), act=("gelu", "quick_gelu"), rel_pos=("none", "shared", "layer"),
               global_pool=("mean", "cls", "avg"))  # model.py would read any other string as one of these


def value_problem(cfg):
    """(field, what it allows) for the first value of a ViTConfig of the right types that model.py's ViT
    cannot be built or run with, or would read as another option; None if there is none"""
    D = cfg.embed_dim
    checks = [("img_size", cfg.img_size >= 1, ">= 1"),
              ("patch_size", 1 <= cfg.patch_size <= cfg.img_size, f"1..img_size ({cfg.img_size})"),
              ("embed_dim", D >= 1, ">= 1"), ("depth", cfg.depth >= 1, ">= 1"),
              ("num_heads", cfg.num_heads >= 1 and D % cfg.num_heads == 0, f"a divisor of embed_dim ({D})"),
              ("mlp_ratio", 1 <= D * cfg.mlp_ratio < math.inf, "> 0, at least one hidden unit"),
              ("norm_eps", 0 < cfg.norm_eps < math.inf, "> 0"),
              ("layer_scale", 0 <= cfg.layer_scale < math.inf, ">= 0 (0: off)"),
              ("drop_path", 0 <= cfg.drop_path < 1, "in [0, 1)"),
              ("num_classes", cfg.num_classes >= 0, ">= 0 (0: no head)"),
              ("mean", len(cfg.mean) == 3 and all(map(math.isfinite, cfg.mean)), "3 finite numbers (R, G, B)"),
              ("std", len(cfg.std) == 3 and all(0 < s < math.inf for s in cfg.std), "3 positive numbers (R, G, B)")]
    checks += [(name, getattr(cfg, name) in allowed, " or ".join(map(repr, allowed)))
               for name, allowed in CHOICES.items()]
    return next(((name, allowed) for name, ok, allowed in checks if not ok), None)


def of_field_type(value, default):
    """value has the type of a ViTConfig field whose default is `default`: bool is no number here,
    an int is a float, a tuple (from_dict makes one of a list) holds numbers"""
    if isinstance(default, tuple):
        return isinstance(value, tuple) and all(of_field_type(v, 0.0) for v in value)
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


# ----------------------------------------------------------------------------------------
# teacher T and whitening N

class Teacher(nn.Module):
    """A frozen ViT that returns the tokens of one layer: layer -1 (default) is the last block
    after the final norm, and so is layer depth (the same tokens); layer k in 1..depth-1 is the raw
    output of block k."""

    def __init__(self, vit, layer=-1, dtype=None):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        depth = vit.config.depth
        if not (layer == -1 or 1 <= layer <= depth):
            raise ValueError(f"teacher layer {layer} out of range: use -1 or 1..{depth}")
        self.layer = depth if layer == -1 else layer
        self.dtype = dtype  # e.g. torch.bfloat16: computed under autocast

    def train(self, mode=True):
        return super().train(False)  # always eval: no dropout, no drop path

    @property
    def out_dim(self):
        return self.vit.config.embed_dim

    @torch.no_grad()
    def forward(self, images):
        """(B, 3, H, W) in [0, 1] -> (B, N+1, D)"""
        enabled = self.dtype is not None
        with torch.autocast(images.device.type, dtype=self.dtype or torch.float32, enabled=enabled):
            if self.layer == self.vit.config.depth:
                x = self.vit.forward_features(images)
            else:
                x = self.vit.embed(images)
                bias = self.vit.rel_pos_bias() if self.vit.rel_pos_bias is not None else None
                for block in self.vit.blocks[:self.layer]:
                    x, _ = block(x, bias)
        return x.to(self.dtype) if self.dtype is not None else x


def load_teacher(name_or_path, path=None, layer=-1, dtype=None, cache_dir=CACHE_DIR, act=None):
    vit, _ = load_model(name_or_path, path, cache_dir, act)
    return Teacher(vit, layer, dtype)


WHITENINGS = ("ln", "bn", "none")


class Whitening(nn.Module):
    """N, applied to teacher tokens (B, N, D), in fp32:
    'ln'   per token: LayerNorm over channels, no affine (FD). Every target token has mean 0 and
           variance 1 over its channels; token norms (how salient a patch is) are discarded.
    'bn'   per channel: standardized by statistics over tokens and images (the batch's while
           training, running averages in eval). Keeps the relative sizes of tokens; depends on the
           batch (per process under DDP) and needs its running statistics saved with the run
           (train_md.py averages them over the ranks after each step: every rank evaluates alike).
    'none' raw teacher features (their scale differs a lot between CLIP, DINO and DeiT)."""

    def __init__(self, kind, dim, eps=1e-6, momentum=0.1):
        super().__init__()
        if kind not in WHITENINGS:
            raise ValueError(f"unknown whitening '{kind}': choose {', '.join(WHITENINGS)}")
        self.kind, self.eps, self.momentum = kind, eps, momentum
        if kind == "bn":
            self.register_buffer("running_mean", torch.zeros(dim))
            self.register_buffer("running_var", torch.ones(dim))

    def forward(self, features):
        x = features.float()
        if self.kind == "ln":
            return F.layer_norm(x, x.shape[-1:], eps=self.eps)
        if self.kind == "bn":
            flat = F.batch_norm(x.reshape(-1, x.shape[-1]), self.running_mean, self.running_var,
                                training=self.training, momentum=self.momentum, eps=self.eps)
            return flat.view_as(x)
        return x


EXPORT_KEPT = "any file there before is kept"  # export's files are written atomically (save_atomic)


def export_weights(src, dst, act=None):
    """A project checkpoint reduced to what a teacher needs (weights, model_args, config): no
    optimizer or RNG state. This is how data/embedded_teacher.pt is made from a finetune.py run.
    A train_vqkd.py tokenizer keeps its vqkd_args, so that --tokenizer still reads it.
    Any other model form (a timm file, say) becomes such a checkpoint of its converted weights
    (`act`: a CLIP-layout file's activation, as load_model takes it). `src` may be a teacher's name."""
    source = EMBEDDED_TEACHER if src == "embedded" else src
    obj = None if src in OFFICIAL else read_checkpoint(source)  # an official name: load_model downloads it
    if isinstance(obj, dict) and "model_args" in obj and act is None:
        keep = ("model", "model_args", "vqkd_args", "config", "classes")
        save_atomic({k: obj[k] for k in keep if k in obj}, dst, EXPORT_KEPT)
        return
    vit, info = load_model(src, act=act)
    out = dict(model=vit.state_dict(), model_args=vit.config.to_dict(), config={})
    if info.get("classes"):
        out["classes"] = info["classes"]
    save_atomic(out, dst, EXPORT_KEPT)


# ----------------------------------------------------------------------------------------
# export to timm's `beit` and `vision_transformer` models

# timm model name -> (embed_dim, depth, num_heads) its registration fixes (timm/models/beit.py,
# timm/models/vision_transformer.py); the CLIP ones also fix pre_norm and LayerNorm eps 1e-5
TIMM_MODELS = {
    "beitv2_base_patch16_224": (768, 12, 12), "beitv2_large_patch16_224": (1024, 24, 16),
    "vit_base_patch16_224": (768, 12, 12), "vit_tiny_patch16_224": (192, 12, 3),
    "vit_small_patch16_224": (384, 12, 6), "vit_large_patch16_224": (1024, 24, 16),
    "vit_base_patch16_clip_224": (768, 12, 12),
    "vit_base_patch16_clip_quickgelu_224": (768, 12, 12),
}
# what those registrations and the Beit / VisionTransformer classes leave as defaults
TIMM_DEFAULTS = {
    "beit": dict(img_size=224, patch_size=16, mlp_ratio=4.0, qkv_bias=True, use_abs_pos_emb=False,
                 use_rel_pos_bias=True, use_shared_rel_pos_bias=False, init_values=1e-5),
    "vit": dict(img_size=224, patch_size=16, mlp_ratio=4.0, qkv_bias=True, init_values=None,
                pos_embed="learn"),
}
EXPORT_FORMATS = ("mdlab", "timm")


def timm_obstacle(cfg, family):
    """the option of cfg that the timm family (beit or vit) has no counterpart for, or None"""
    if cfg.num_classes and cfg.global_pool == "mean":
        return ("global_pool='mean' (the final norm on every token, the mean, then fc_norm): "
                "timm pools after one norm only ('avg': fc_norm, as BEiT; 'token': the final norm)")
    if family == "vit":
        if cfg.patch_bias == cfg.pre_norm:
            return (f"patch_bias={cfg.patch_bias} with pre_norm={cfg.pre_norm}: timm's "
                    "vision_transformer has a patch bias exactly when pre_norm is off")
        if cfg.norm_eps != (1e-5 if cfg.pre_norm else 1e-6):
            return (f"norm_eps={cfg.norm_eps} with pre_norm={cfg.pre_norm}: timm's ViTs use 1e-6 "
                    "(1e-5 with pre_norm, as CLIP)")
        return None
    why = "with relative position bias" if cfg.rel_pos != "none" else "with q and v biases only"
    checks = [(cfg.qkv_bias == "all", f"qkv_bias='all' {why}: timm's beit has no k bias"),
              (cfg.act != "gelu", f"act='{cfg.act}' {why}: timm's beit has exact GELU only"),
              (cfg.pre_norm, f"pre_norm=True {why}: timm's beit has no norm after the embeddings"),
              (not cfg.patch_bias, f"patch_bias=False {why}: timm's beit always has a patch bias"),
              (cfg.norm_eps != 1e-6, f"norm_eps={cfg.norm_eps} {why}: timm's beit uses 1e-6")]
    return next((message for failed, message in checks if failed), None)


def to_timm(vit):
    """model.py's ViT -> (timm model name, create_model kwargs, state dict in that model's layout).
    Relative position bias or q/v-only biases go to timm's `beit` (timm/models/beit.py: q_bias /
    v_bias, gamma_1 / gamma_2, the per-layer table under attn., the same relative position index
    as RelativePositionBias here), the rest to `vision_transformer` (ls1.gamma / ls2.gamma,
    norm_pre, a patch bias exactly when pre_norm is off). Pooling: 'token' = our "cls", 'avg' =
    our "avg"; a model without head gets '' (timm's forward then returns all tokens, as ours).
    The mask token has no place in timm. Raises CheckpointError naming the option timm lacks."""
    cfg = vit.config
    family = "beit" if cfg.rel_pos != "none" or cfg.qkv_bias == "qv" else "vit"
    problem = timm_obstacle(cfg, family)
    if problem:
        raise CheckpointError(f"has no timm equivalent: {problem}")
    wanted = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                  depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                  init_values=cfg.layer_scale)  # 0: off (create_model drops None-valued kwargs)
    if family == "beit":
        names = ["beitv2_base_patch16_224", "beitv2_large_patch16_224"]
        wanted.update(qkv_bias=cfg.qkv_bias == "qv", use_abs_pos_emb=cfg.abs_pos,
                      use_rel_pos_bias=cfg.rel_pos == "layer",
                      use_shared_rel_pos_bias=cfg.rel_pos == "shared")
        renames = [(".attn.rel_pos.", ".attn.")]
    else:
        quick = cfg.act == "quick_gelu"
        if cfg.pre_norm:  # CLIP: the activation is part of the name
            clip = "vit_base_patch16_clip_quickgelu_224" if quick else "vit_base_patch16_clip_224"
            names = [clip]
        else:
            names = [n for n in TIMM_MODELS if n.startswith("vit_") and "clip" not in n]
            if quick:
                wanted["act_layer"] = "quick_gelu"
        wanted.update(qkv_bias=cfg.qkv_bias == "all", pos_embed="learn" if cfg.abs_pos else "none")
        renames = [(".gamma_1", ".ls1.gamma"), (".gamma_2", ".ls2.gamma")]
    size = (cfg.embed_dim, cfg.depth, cfg.num_heads)
    name = next((n for n in names if TIMM_MODELS[n] == size), names[0])
    defaults = dict(TIMM_DEFAULTS[family])
    defaults.update(zip(("embed_dim", "depth", "num_heads"), TIMM_MODELS[name]))
    pooled = cfg.num_classes or cfg.global_pool == "avg"
    pool = {"cls": "token", "avg": "avg"}[cfg.global_pool] if pooled else ""
    kwargs = dict(num_classes=cfg.num_classes, global_pool=pool)
    for k, v in wanted.items():
        # layer scale: only whether it is on shapes the model; its values are weights
        same = bool(v) == bool(defaults[k]) if k == "init_values" else v == defaults.get(k)
        if not same:
            kwargs[k] = v
    sd = {}
    for k, v in vit.state_dict().items():
        if k != "mask_token":
            for a, b in renames:
                k = k.replace(a, b)
            sd[k] = v
    return name, kwargs, sd


def export_timm(src, dst, act=None):
    """Any model form -> a file that timm.create_model(name, checkpoint_path=dst, **kwargs) loads
    with no missing or unexpected keys: {"state_dict", "arch", "timm_kwargs"}, the entries timm's
    load_checkpoint reads and its train script writes (timm/models/_helpers.py load_state_dict,
    timm/utils/checkpoint_saver.py), beside what the way back needs and timm has no place for:
    "mdlab_args" (the ViTConfig), the mask token, class names. `act` as load_model takes it.
    -> (name, kwargs, ViTConfig)"""
    vit, info = load_model(src, act=act)
    try:
        name, kwargs, sd = to_timm(vit)
    except CheckpointError as e:
        raise CheckpointError(f"'{src}' {e}") from None
    out = dict(state_dict=sd, arch=name, timm_kwargs=kwargs, mdlab_args=vit.config.to_dict())
    if vit.mask_token is not None:
        out["mask_token"] = vit.mask_token.detach()
    if info.get("classes"):
        out["classes"] = info["classes"]
    save_atomic(out, dst, EXPORT_KEPT)
    return name, kwargs, vit.config


def is_training_checkpoint(path):
    """a file a training script saves for --resume (a checkpoint with an optimizer state)"""
    try:
        obj = read_checkpoint(path)
    except CheckpointError:
        return False
    return isinstance(obj, dict) and "optimizer" in obj


def main(argv):
    usage = "usage: python teacher.py export [--format=mdlab|timm] [--act=quick_gelu|gelu] SRC DST"
    if "--help" in argv or "-h" in argv:
        print_help(f"{__doc__.strip()}\n\n{usage}")
    if argv[:1] != ["export"]:
        given = f"'{argv[0]}' is no command" if argv else "no command given"
        raise SystemExit(f"error: {given}: the command is export; {usage}")
    opts, paths, rest = dict(format="mdlab", act=None), [], list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--"):
            paths.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        if key not in opts:
            raise SystemExit(f"error: unknown option '{arg}'; {usage}")
        if not eq and not rest:
            raise SystemExit(f"error: option '--{key}' needs a value; {usage}")
        opts[key] = value if eq else rest.pop(0)  # --format=timm or --format timm
    if len(paths) != 2:
        raise SystemExit(f"error: export takes two paths, SRC and DST; got {len(paths)}; {usage}")
    fmt = opts["format"]
    if fmt not in EXPORT_FORMATS:
        raise SystemExit(f"error: unknown --format '{fmt}': choose {' or '.join(EXPORT_FORMATS)}")
    src, dst = paths
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: no folder '{folder}' to write {dst} in")
    if os.path.isdir(dst):
        raise SystemExit(f"error: '{dst}' is a folder: give the file to write in it, like {dst}/export.pt")
    source = EMBEDDED_TEACHER if src == "embedded" else src
    if os.path.isfile(dst) and os.path.isfile(source) and os.path.samefile(source, dst):
        raise SystemExit(f"error: '{dst}' is the file being exported: write the export to another file")
    if os.path.isfile(dst) and is_training_checkpoint(dst):
        raise SystemExit(f"error: '{dst}' is a run's training checkpoint (it holds the optimizer state for "
                         f"--resume): write the export to another file")
    try:
        if fmt == "mdlab":
            export_weights(src, dst, opts["act"])
            return print(f"wrote {dst}")
        name, kwargs, cfg = export_timm(src, dst, opts["act"])
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    print(f"wrote {dst}; load it with\n"
          f"    timm.create_model({name!r}, pretrained=False{args}, checkpoint_path={dst!r})\n"
          f"its input: images normalized with mean {cfg.mean} and std {cfg.std} "
          "(model.py's ViT does that inside)")


if __name__ == "__main__":
    main(sys.argv[1:])

