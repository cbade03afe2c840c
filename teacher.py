"""
Frozen teachers for masked distillation, and the one loader every script uses for models.

Any place that takes a model accepts three forms:
  - a teacher name: clip | dino | deit (official ViT-B/16 weights: a local file given as
    `path`, else the cached download of the public URL), or `embedded` (the small teacher
    shipped for the embedded dataset);
  - an official checkpoint file (CLIP TorchScript archive or state dict, timm/DINO/DeiT layout,
    DINO's full training checkpoint);
  - a project checkpoint written by train_md.py / finetune.py.

    from teacher import load_teacher
    t = load_teacher("clip", path="ViT-B-16.pt")
    features = t(images)  # (B, 3, 224, 224) in [0, 1] -> (B, 197, 768), last block after final norm
"""
import hashlib
import os
import pickle
import urllib.request
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import read_torchscript
from model import VQKD, ViT, ViTConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBEDDED_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "embedded_teacher.pt")
CACHE_DIR = os.environ.get("MDLAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mdlab"))

# name -> (url, expected SHA-256 or its published prefix, layout)
OFFICIAL = {
    "clip": ("https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
             "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "clip"),
    "dino": ("https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", None, "timm"),
    "deit": ("https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth", "b5f2ef4d", "timm"),
}
NAMES = ", ".join(list(OFFICIAL) + ["embedded"])


class CheckpointError(ValueError):
    """Bad model input; the message is one line that names the file and the problem."""


# ----------------------------------------------------------------------------------------
# reading files

def download(url, sha256=None, cache_dir=CACHE_DIR):
    """Fetch url into cache_dir once (atomic rename), checking the SHA-256 (or its prefix)."""
    from tqdm import tqdm
    dest = os.path.join(cache_dir, os.path.basename(url))
    if os.path.exists(dest):
        return dest
    os.makedirs(cache_dir, exist_ok=True)
    tmp, digest = dest + ".part", hashlib.sha256()
    print(f"downloading {url} -> {dest}")
    with urllib.request.urlopen(url) as response, open(tmp, "wb") as f:
        with tqdm(total=int(response.headers.get("Content-Length", 0)), unit="B", unit_scale=True) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if sha256 and not digest.hexdigest().startswith(sha256):
        os.remove(tmp)
        raise CheckpointError(f"download of {url} has SHA-256 {digest.hexdigest()}, expected {sha256}: retry or fetch it by hand")
    os.replace(tmp, dest)
    return dest


def read_checkpoint(path):
    """Load a file as plain data; nothing stored in it runs. Pickles are read with
    weights_only=True, so a file that would run code on load is refused; TorchScript archives
    (CLIP's) give their parameters and buffers by common.read_torchscript, never torch.jit.load."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' not found")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            is_torchscript = any(n.endswith("constants.pkl") for n in z.namelist())
        if is_torchscript:
            try:
                state_dict = read_torchscript(path)
            except Exception as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CheckpointError(f"'{path}' is a TorchScript archive whose weights cannot "
                                      f"be read as plain data: {reason}") from None
            return {k: v.float() for k, v in state_dict.items()}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if "WeightsUnpickler error:" in str(e) else type(e).__name__
        raise CheckpointError(f"'{path}' is not a plain-data checkpoint (objects or code, or not a checkpoint at all), "
                              f"refused by torch.load(weights_only=True): {detail}") from None
    except Exception as e:
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def unwrap_state_dict(obj):
    """Strip the usual wrappers: {'model': ...}, {'state_dict': ...}, DINO's {'teacher': ...},
    and the 'module.' / 'backbone.' prefixes."""
    for key in ("teacher", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError("not a state dict of tensors")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------
# converting official layouts into model.py's ViT

def detect_layout(sd):
    if any(k.endswith("transformer.resblocks.0.attn.in_proj_weight") for k in sd):
        return "clip"
    if "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "timm"
    return None


def convert_clip(sd):
    """OpenAI CLIP visual tower -> (ViTConfig, state dict). ln_post becomes the final norm
    (applied to every token); the projection to the joint space is dropped."""
    sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")} or sd
    D = sd["conv1.weight"].shape[0]
    patch = sd["conv1.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
    cfg = ViTConfig(img_size=grid * patch, patch_size=patch, embed_dim=D, depth=depth, num_heads=max(1, D // 64),
                    patch_bias=False, act="quick_gelu", norm_eps=1e-5, pre_norm=True, global_pool="cls",
                    mean=CLIP_MEAN, std=CLIP_STD)
    renames = [("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_weight", "attn.qkv.weight"),
               ("attn.in_proj_bias", "attn.qkv.bias"), ("attn.out_proj.", "attn.proj."),
               ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]
    out = {"patch_embed.proj.weight": sd["conv1.weight"], "cls_token": sd["class_embedding"].view(1, 1, D),
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


def convert_timm(sd):
    """timm layout (DINO, DeiT, timm vit_*): the key names are already ours. Shapes do not tell
    the number of heads: like CLIP's, it is taken as embed_dim / 64 (true for every official ViT)."""
    D = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    cfg = ViTConfig(img_size=grid * patch, patch_size=patch, embed_dim=D, depth=depth, num_heads=max(1, D // 64),
                    num_classes=num_classes, global_pool="cls",
                    mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D)
    return cfg, {k: v for k, v in sd.items() if not k.startswith(("head_dist", "dist_token"))}


def build_vit(cfg, sd, source):
    """A ViT with exactly these weights, or one error line naming what does not fit."""
    model = ViT(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}" for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{name} {items[:4]}{' ...' if len(items) > 4 else ''}" for name, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if items]
        raise CheckpointError(f"{source} does not fit the model it describes: {'; '.join(parts)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model


def load_model(name_or_path, path=None, cache_dir=CACHE_DIR):
    """Any model form -> (ViT in eval mode, info dict). `path` is a local copy of an official
    teacher's file (no download)."""
    name = str(name_or_path)
    if name in OFFICIAL:
        url, sha, layout = OFFICIAL[name]
        source = path or download(url, sha, cache_dir)
    elif name == "embedded":
        source, layout = path or EMBEDDED_TEACHER, None
    elif os.path.exists(name) or os.sep in name or name.endswith((".pt", ".pth", ".bin")):
        source, layout = name, None
    else:
        raise CheckpointError(f"unknown model '{name}': choose {NAMES} or a checkpoint path")
    obj = read_checkpoint(source)
    if isinstance(obj, dict) and "model_args" in obj and "model" in obj:  # project checkpoint
        try:
            cfg = ViTConfig.from_dict(obj["model_args"])
        except TypeError as e:
            raise CheckpointError(f"'{source}' has model_args this version cannot read: {e}") from None
        model = build_vit(cfg, obj["model"], f"'{source}'")
        return model.eval(), dict(source=source, kind="project", config=obj.get("config", {}), classes=obj.get("classes"))
    try:
        sd = unwrap_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"'{source}' is {e}") from None
    found = detect_layout(sd)
    if found is None:
        raise CheckpointError(f"'{source}' is not a CLIP, DINO/DeiT (timm) or project checkpoint: keys start {list(sd)[:3]}")
    if layout is not None and found != layout:
        raise CheckpointError(f"'{source}' has the {found} layout, but teacher '{name}' needs the {layout} layout")
    cfg, sd = convert_clip(sd) if found == "clip" else convert_timm(sd)
    return build_vit(cfg, sd, f"'{source}'").eval(), dict(source=source, kind=found)


# ----------------------------------------------------------------------------------------
# teacher T and whitening N

class Teacher(nn.Module):
    """A frozen ViT that returns the tokens of one layer: layer -1 (default) is the last block
    after the final norm; layer k in 1..depth-1 is the raw output of block k."""

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
        with torch.autocast(images.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            if self.layer == self.vit.config.depth:
                x = self.vit.forward_features(images)
            else:
                x = self.vit.embed(images)
                bias = self.vit.rel_pos_bias() if self.vit.rel_pos_bias is not None else None
                for block in self.vit.blocks[:self.layer]:
                    x, _ = block(x, bias)
        return x.to(self.dtype) if self.dtype is not None else x


def load_teacher(name_or_path, path=None, layer=-1, dtype=None, cache_dir=CACHE_DIR):
    vit, _ = load_model(name_or_path, path, cache_dir)
    return Teacher(vit, layer, dtype)


WHITENINGS = ("ln", "bn", "none")


class Whitening(nn.Module):
    """N, applied to teacher tokens (B, N, D), in fp32:
    'ln'   per token: LayerNorm over channels, no affine (FD). Every target token has mean 0 and
           variance 1 over its channels; token norms (how salient a patch is) are discarded.
    'bn'   per channel: standardized by statistics over tokens and images (the batch's while
           training, running averages in eval). Keeps the relative sizes of tokens; depends on the
           batch (per process under DDP) and needs its running statistics saved with the run.
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


def load_tokenizer(path):
    """a VQ-KD tokenizer written by train_vqkd.py, frozen, in eval mode"""
    obj = read_checkpoint(path)
    if not (isinstance(obj, dict) and "vqkd_args" in obj):
        raise CheckpointError(f"'{path}' is not a VQ-KD tokenizer written by train_vqkd.py")
    vq = VQKD(ViTConfig.from_dict(obj["model_args"]), **obj["vqkd_args"])
    vq.load_state_dict(obj["model"])
    return vq.eval().requires_grad_(False)


def export_weights(src, dst):
    """A project checkpoint reduced to what a teacher needs (weights, model_args, config): no
    optimizer or RNG state. This is how data/embedded_teacher.pt is made from a finetune.py run."""
    obj = read_checkpoint(src)
    if not (isinstance(obj, dict) and "model_args" in obj):
        raise CheckpointError(f"'{src}' is not a project checkpoint")
    torch.save({k: obj[k] for k in ("model", "model_args", "config", "classes") if k in obj}, dst)


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        raise SystemExit("usage: python teacher.py export SRC_CKPT DST_FILE")
    export_weights(sys.argv[2], sys.argv[3])
    print(f"wrote {sys.argv[3]}")

