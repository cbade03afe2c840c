"""
A Vision Transformer written from scratch, with every option that CLIP, DINO, DeiT and
BEiT v2 need, so that their official weights load into one class.

Images come in as floats in [0, 1], shape (B, 3, H, W); the model owns its normalization.
Masks are bool (B, N) over patches, True = masked (the patch embedding is replaced by the
learned mask token before position terms are added).
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (embed_dim, depth, num_heads, img_size, patch_size)
PRESETS = {
    "Ti/16": (192, 12, 3, 224, 16),
    "S/16": (384, 12, 6, 224, 16),
    "B/16": (768, 12, 12, 224, 16),
    "L/16": (1024, 24, 16, 224, 16),
    "tiny/4": (96, 6, 3, 32, 4),   # embedded-dataset teacher / student, 8x8 = 64 patches
    "nano/4": (48, 2, 2, 32, 4),   # unit tests
}


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: str = "all"        # "all": q, k and v biases; "qv": no k bias (BEiT); "none"
    patch_bias: bool = True      # CLIP's conv1 has no bias
    act: str = "gelu"            # "gelu" (exact) or "quick_gelu" (CLIP: x * sigmoid(1.702 x))
    norm_eps: float = 1e-6       # CLIP: 1e-5
    pre_norm: bool = False       # LayerNorm after embeddings (CLIP's ln_pre)
    abs_pos: bool = True         # learned absolute position embedding (CLS included)
    rel_pos: str = "none"        # relative position bias: "none", "shared" (BEiT v2 pretraining), "layer"
    layer_scale: float = 0.0     # init value of per-channel residual scales; 0 = off
    drop_path: float = 0.0       # stochastic depth rate, linear over depth
    mask_token: bool = False     # learned token for masked patches
    num_classes: int = 0         # 0 = no classification head
    global_pool: str = "mean"    # "mean": final norm, mean of patches, fc_norm; "cls": CLS token
                                 # "avg": BEiT's and timm's mean pooling: no final norm, fc_norm
    mean: tuple = IMAGENET_MEAN  # input normalization, owned by the model
    std: tuple = IMAGENET_STD

    @property
    def grid(self):
        return self.img_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid ** 2

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model size '{name}': choose one of {', '.join(PRESETS)}")
        dim, depth, heads, img, patch = PRESETS[name]
        preset = dict(embed_dim=dim, depth=depth, num_heads=heads, img_size=img, patch_size=patch)
        return cls(**{**preset, **overrides})

    @classmethod
    def beit_v2(cls, name, **overrides):
        """The BEiT v2 student of the paper (MD, VQ-KD encoder, fine-tuning from scratch): relative
        positions shared by all blocks instead of absolute ones, q/v biases, layer scale 0.1."""
        beit = dict(abs_pos=False, rel_pos="shared", qkv_bias="qv", layer_scale=0.1)
        return cls.from_name(name, **{**beit, **overrides})

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def to_dict(self):
        return asdict(self)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RelativePositionBias(nn.Module):
    """BEiT's learned bias per head for each relative offset between patches, plus 3 rows
    for CLS-to-token, token-to-CLS and CLS-to-CLS. Table: ((2G-1)^2 + 3, heads)."""

    def __init__(self, grid, num_heads):
        super().__init__()
        num_offsets = (2 * grid - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_offsets + 3, num_heads))
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        rel = coords[:, :, None] - coords[:, None, :] + grid - 1  # (2, N, N), offsets made >= 0
        N = grid * grid
        index = torch.empty(N + 1, N + 1, dtype=torch.long)
        index[1:, 1:] = rel[0] * (2 * grid - 1) + rel[1]
        index[0, 1:] = num_offsets      # CLS query -> patch keys
        index[1:, 0] = num_offsets + 1  # patch queries -> CLS key
        index[0, 0] = num_offsets + 2
        self.register_buffer("index", index, persistent=False)

    def forward(self):
        N1 = self.index.shape[0]
        bias = self.relative_position_bias_table[self.index.view(-1)].view(N1, N1, -1)
        return bias.permute(2, 0, 1).contiguous()  # (heads, N+1, N+1)


class Attention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.scale = (D // cfg.num_heads) ** -0.5
        self.qkv = nn.Linear(D, 3 * D, bias=cfg.qkv_bias == "all")
        if cfg.qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(D))
            self.v_bias = nn.Parameter(torch.zeros(D))
        self.proj = nn.Linear(D, D)
        self.rel_pos = None
        if cfg.rel_pos == "layer":
            self.rel_pos = RelativePositionBias(cfg.grid, cfg.num_heads)
        self.fused = True  # False: always the explicit softmax path (benchmarks, debugging)

    def forward(self, x, bias=None, return_attn=False):
        """x: (B, N, D); bias: (heads, N, N) added to the logits. With return_attn the explicit
        softmax path runs and the maps (B, heads, N, N) are returned beside the output: the
        probabilities, or with return_attn="logits" the logits before the softmax (bias added)."""
        B, N, D = x.shape
        if hasattr(self, "q_bias"):
            qkv = F.linear(x, self.qkv.weight, torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]))
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, nh, N, hs) each
        if self.rel_pos is not None:
            bias = self.rel_pos() if bias is None else bias + self.rel_pos()
        if bias is not None:
            bias = bias.to(q.dtype)
        attn = None
        if return_attn or not self.fused:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, N, N)
            if bias is not None:
                logits = logits + bias
            attn = logits.float().softmax(dim=-1).to(q.dtype)
            y = attn @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = y.transpose(1, 2).reshape(B, N, D)
        return self.proj(y), logits if return_attn == "logits" else attn


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.act = QuickGELU() if cfg.act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability p."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
        keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):

    def __init__(self, cfg, drop_path=0.0):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if cfg.layer_scale > 0:
            self.gamma_1 = nn.Parameter(cfg.layer_scale * torch.ones(D))
            self.gamma_2 = nn.Parameter(cfg.layer_scale * torch.ones(D))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, bias=None, return_attn=False):
        x, attn = self.attention_residual(x, bias, return_attn)
        return self.mlp_residual(x), attn

    def attention_residual(self, x, bias=None, return_attn=False):
        """the first half of the block: x + attention branch (analysis reads the state here)"""
        y, attn = self.attn(self.norm1(x), bias, return_attn)
        return x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y), attn

    def mlp_residual(self, x):
        """the second half of the block: x + MLP branch"""
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class PatchEmbed(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class ViT(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        D = cfg.embed_dim
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.mask_token else None
        self.pos_embed = None
        if cfg.abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.rel_pos_bias = None
        if cfg.rel_pos == "shared":
            self.rel_pos_bias = RelativePositionBias(cfg.grid, cfg.num_heads)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.norm = nn.Identity() if cfg.global_pool == "avg" else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc_norm = None
        if cfg.global_pool == "avg" or (cfg.num_classes and cfg.global_pool == "mean"):
            self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes else None
        self.apply(self._init_weights)
        for t in (self.cls_token, self.mask_token, self.pos_embed):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)
        for i, block in enumerate(self.blocks):  # BEiT's rescale: deeper residuals start smaller
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, images, mask=None):
        """images (B, 3, H, W) in [0, 1], mask (B, N) bool -> tokens (B, N+1, D)"""
        x = self.patch_embed((images - self.mean) / self.std)  # (B, N, D)
        if mask is not None:
            assert self.mask_token is not None, "this model has no mask token (mask_token=False)"
            w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.norm_pre(x)

    def forward_features(self, images, mask=None):
        """-> (B, N+1, D) tokens after the final norm; the fast (fused attention) path"""
        x = self.embed(images, mask)
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x, _ = block(x, bias)
        return self.norm(x)

    def forward_all(self, images, mask=None):
        """One forward that keeps what analysis needs: 'hidden' = [embeddings, block 1, ..., block L]
        (each (B, N+1, D), before the final norm), 'attn' = per block (B, heads, N+1, N+1),
        'features' = final normed tokens. Uses the explicit attention path."""
        x = self.embed(images, mask)
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        hidden, attns = [x], []
        for block in self.blocks:
            x, attn = block(x, bias, return_attn=True)
            hidden.append(x)
            attns.append(attn)
        return dict(hidden=hidden, attn=attns, features=self.norm(x))

    def forward_head(self, features):
        """(B, N+1, D) -> (B, num_classes)"""
        if self.config.global_pool in ("mean", "avg"):
            pooled = self.fc_norm(features[:, 1:].mean(dim=1))
        else:
            pooled = features[:, 0]
        return self.head(pooled)

    def forward(self, images, mask=None):
        features = self.forward_features(images, mask)
        return self.forward_head(features) if self.head is not None else features

    # ------------------------------------------------------------------------------------
    # optimization

    def layer_id(self, name):
        """BEiT's layer ids for layer-wise lr decay: embeddings 0, block i -> i + 1,
        everything else (final norm, head, shared relative bias) -> depth + 1.
        norm_pre (CLIP's ln_pre) belongs to the embedding stem, so it gets 0 too."""
        if name.startswith(("cls_token", "mask_token", "pos_embed", "patch_embed", "norm_pre")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.config.depth + 1

    @staticmethod
    def no_weight_decay(name, param):
        """biases, norms (all 1-d), tokens and absolute position tables (the ViT's, the MD decoder
        head's pos_embed, the VQ-KD decoder's decoder_pos) get no weight decay; relative position bias
        tables do, as in BEiT and FD (whose skip lists are pos_embed and cls_token; BEiT exempts the
        tables only with --disable_weight_decay_on_rel_pos_bias)"""
        return param.ndim <= 1 or name.split(".")[-1] in ("cls_token", "mask_token", "pos_embed", "decoder_pos")

    def param_groups(self, weight_decay, layer_decay=None, extra=()):
        """AdamW groups: one per (layer id, decay or not), each with 'lr_scale' =
        layer_decay ** (depth + 1 - layer_id) (1.0 without layer decay). `extra` adds
        (name, param) pairs of modules outside the ViT (e.g. a decoder head) at the top layer."""
        groups = {}
        named = [(n, p) for n, p in self.named_parameters()] + list(extra)
        for name, p in named:
            if not p.requires_grad:
                continue
            lid = self.layer_id(name) if layer_decay is not None else 0
            no_decay = self.no_weight_decay(name, p)
            key = (lid, no_decay)
            if key not in groups:
                scale = 1.0
                if layer_decay is not None:
                    scale = layer_decay ** (self.config.depth + 1 - lid)
                decay = 0.0 if no_decay else weight_decay
                groups[key] = dict(params=[], names=[], weight_decay=decay, lr_scale=scale)
            groups[key]["params"].append(p)
            groups[key]["names"].append(name)
        return list(groups.values())

    def configure_optimizers(self, weight_decay, lr, betas, layer_decay=None, extra=()):
        groups = self.param_groups(weight_decay, layer_decay, extra)
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        fused = next(self.parameters()).device.type == "cuda"
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                 lr=lr, betas=betas, fused=fused)

    def flops_per_image(self):
        """Forward FLOPs of one image (2 per multiply-add), matmuls only."""
        c = self.config
        N, D = c.num_patches + 1, c.embed_dim
        hidden = int(D * c.mlp_ratio)
        projections = 2 * N * (3 * D * D + D * D + 2 * D * hidden)  # qkv, proj, MLP
        per_block = projections + 2 * 2 * N * N * D  # + QK^T and AV
        return c.depth * per_block + 2 * c.num_patches * D * 3 * c.patch_size ** 2


# ----------------------------------------------------------------------------------------
# carrying pretrained weights to a fine-tuning configuration

def resize_pos_embed(pos_embed, grid):
    """(1, 1 + G*G, D) -> (1, 1 + grid*grid, D): bicubic over the patch grid, CLS kept."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    G, D = int(round(patches.shape[1] ** 0.5)), patches.shape[-1]
    if G == grid:
        return pos_embed
    patches = patches.reshape(1, G, G, D).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def resize_rel_pos_table(table, grid):
    """((2G-1)^2 + 3, heads) -> ((2g-1)^2 + 3, heads). The table is a (2G-1) x (2G-1) image of
    biases per relative offset (dy, dx); it is resized bicubically to (2g-1) x (2g-1) (offset 0
    stays at the center), and the 3 CLS rows are kept as they are."""
    offsets, heads = table.shape[0] - 3, table.shape[1]
    S, s = int(round(offsets ** 0.5)), 2 * grid - 1
    if S == s:
        return table
    image = table[:offsets].T.reshape(1, heads, S, S).float()
    image = F.interpolate(image, size=(s, s), mode="bicubic", align_corners=True)
    return torch.cat([image.reshape(heads, s * s).T.to(table.dtype), table[offsets:]], dim=0)


def adapt_state_dict(sd, cfg):
    """Fit pretrained weights to `cfg` (a fine-tuning configuration): a shared relative position
    table is copied into every layer when cfg wants per-layer tables (layers without one start
    at zero, the model's init); position tables are resized to cfg's grid; the mask token and
    anything cfg has no place for (mask token, old head) is dropped."""
    sd = dict(sd)
    shared = sd.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None and cfg.rel_pos == "layer":
        for i in range(cfg.depth):
            sd[f"blocks.{i}.attn.rel_pos.relative_position_bias_table"] = shared.clone()
    elif shared is not None and cfg.rel_pos == "shared":
        sd["rel_pos_bias.relative_position_bias_table"] = shared
    for k in list(sd):
        if k == "pos_embed" and cfg.abs_pos:
            sd[k] = resize_pos_embed(sd[k], cfg.grid)
        elif k.endswith("relative_position_bias_table"):
            sd[k] = resize_rel_pos_table(sd[k], cfg.grid)
    if not cfg.mask_token:
        sd.pop("mask_token", None)
    return sd


# ----------------------------------------------------------------------------------------
# MD decoder heads D

DECODER_HEADS = ("linear", "mlp", "transformer")


class DecoderHead(nn.Module):
    """D: student tokens (B, N+1, D_s) -> a prediction per patch (B, N, out_dim). 'linear' and
    'mlp' act on each patch token; 'transformer' first runs `depth` blocks of its own width over
    all tokens (CLS and mask tokens included) with its own learned positions (MILAN-style)."""

    def __init__(self, kind, in_dim, out_dim, num_tokens=0, width=256, depth=2, heads=8):
        super().__init__()
        if kind not in DECODER_HEADS:
            raise ValueError(f"unknown decoder head '{kind}': choose {', '.join(DECODER_HEADS)}")
        self.blocks = None
        if kind == "mlp":
            hidden = in_dim * 4
            self.out = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        elif kind == "linear":
            self.out = nn.Linear(in_dim, out_dim)
        else:
            cfg = ViTConfig(embed_dim=width, depth=depth, num_heads=heads)
            self.proj_in = nn.Linear(in_dim, width)
            self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
            self.blocks = nn.ModuleList([Block(cfg) for _ in range(depth)])
            self.norm = nn.LayerNorm(width, eps=cfg.norm_eps)
            self.out = nn.Linear(width, out_dim)

    def forward(self, tokens):
        x = tokens
        if self.blocks is not None:
            x = self.proj_in(x) + self.pos_embed
            for block in self.blocks:
                x, _ = block(x)
            x = self.norm(x)
        return self.out(x[:, 1:])


class MDStudent(nn.Module):
    """S and D in one module (what gets compiled and wrapped in DDP): the student ViT sees the
    masked images, the decoder head predicts the teacher's target at every patch. The loss R is
    train_md.py's, so the objective is changed in one place."""

    def __init__(self, student, head):
        super().__init__()
        self.student, self.head = student, head

    def forward(self, images, masks):
        """images (B, 3, H, W), masks (B, N) bool -> predictions (B, N, out_dim)"""
        tokens = self.student.forward_features(images, masks)  # (B, N+1, D_s)
        return self.head(tokens)
