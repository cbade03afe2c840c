"""
The VQ-KD tokenizer of BEiT v2 (the paper's Table 1, VQ-KD column): discrete codes that MD can
predict instead of whitened features. Trained by train_vqkd.py; train_md.py --target=vqkd reads
the tokenizer with load_tokenizer.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import CheckpointError, check_finite, read_checkpoint
from model import Block, ViT
from teacher import config_of


class VQKD(nn.Module):
    """Vector-quantized knowledge distillation. An encoder ViT maps each patch to a unit vector
    (code_dim); its nearest codebook entry by cosine is the patch's code; a shallow decoder must
    rebuild the teacher's features from the codes alone (loss 1 - cos), with a straight-through
    gradient through the quantization and a commitment term. The codebook is not learned by
    gradient: each code moves to the EMA of the (unit) encoder vectors assigned to it, and a code
    whose EMA share of the assignments falls below dead_threshold x the uniform share (1 / K) is
    restarted at a random encoder vector of the batch. The codebook starts on distinct vectors of
    the first batch, before that batch is quantized. As in BEiT v2 (microsoft/unilm
    beit2/modeling_vqkd.py, norm_ema_quantizer.py): cosine codes of unit vectors, the commitment
    term beta x the mean squared error (beta 1); unlike it: no k-means on the first batch, an EMA
    of the assigned vectors' sums (normalized after), and the restarts, which it has not."""

    def __init__(self, cfg, teacher_dim, codebook_size=8192, code_dim=32, decoder_depth=1, decay=0.99,
                 dead_threshold=0.05):
        super().__init__()
        self.config = dict(teacher_dim=teacher_dim, codebook_size=codebook_size, code_dim=code_dim,
                           decoder_depth=decoder_depth, decay=decay, dead_threshold=dead_threshold)
        D = cfg.embed_dim
        self.encoder = ViT(cfg)
        self.to_code = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, code_dim))
        self.register_buffer("codebook", F.normalize(torch.randn(codebook_size, code_dim), dim=-1))
        self.register_buffer("ema_count", torch.ones(codebook_size) / codebook_size)
        self.register_buffer("ema_sum", self.codebook.clone())
        # the codebook starts on the first batch's vectors
        self.register_buffer("initialized", torch.tensor(False))
        self.decoder_in = nn.Linear(code_dim, D)
        self.decoder_pos = nn.Parameter(torch.randn(1, cfg.num_patches, D) * 0.02)
        self.decoder = nn.ModuleList([Block(cfg) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.to_teacher = nn.Linear(D, teacher_dim)

    def encode(self, images):
        """-> unit code vectors z (B, N, code_dim) and code indices (B, N)"""
        z = self.code_vectors(images)
        return z, self.nearest(z)

    def code_vectors(self, images):
        """images (B, 3, H, W) -> the encoder's unit vector of each patch (B, N, code_dim), fp32"""
        return F.normalize(self.to_code(self.encoder.forward_features(images)[:, 1:]).float(),
                           dim=-1)

    def nearest(self, z):
        """the code of each unit vector: the entry of largest cosine, scored in fp32 under autocast
        too (bf16 scores tie close codes, and argmax takes the first: codes, and train_md's targets,
        followed --dtype)"""
        with torch.autocast(z.device.type, enabled=False):
            return (z @ self.codebook.T).argmax(-1)

    def decode(self, q):
        x = self.decoder_in(q) + self.decoder_pos
        for block in self.decoder:
            x, _ = block(x)
        return self.to_teacher(self.decoder_norm(x))  # (B, N, teacher_dim)

    def forward(self, images, targets, commitment=1.0, weight=1.0):
        """targets: teacher patch features (B, N, teacher_dim) -> (loss, codes). weight 0: a stand-in batch
        that keeps a DDP rank in step with the others (its vectors add nothing to the codebook's EMA)."""
        z = self.code_vectors(images)  # (B, N, code_dim)
        # the first batch is quantized on its own vectors
        if self.training and not self.initialized:
            self.initialize(z.detach(), weight)
        codes = self.nearest(z)  # (B, N)
        q = self.codebook[codes]
        if self.training:
            self.ema_update(z.detach(), codes, weight)
        q_st = z + (q - z).detach()  # straight-through: forward uses q, the gradient reaches z as is
        rebuilt = self.decode(q_st).float()  # (B, N, teacher_dim)
        reconstruction = 1 - F.cosine_similarity(rebuilt, targets.float(), dim=-1).mean()
        commit = F.mse_loss(z, q.detach())  # mean over patches and code dimensions, as BEiT v2's
        return reconstruction + commitment * commit, codes

    @torch.no_grad()
    def initialize(self, z, weight=1.0):
        """data-dependent init: the codebook becomes encoder vectors of this batch, not random
        directions"""
        chosen = self.drawn_vectors(z.reshape(-1, z.shape[-1]), self.codebook.shape[0], weight)
        if chosen is not None:  # else stand-ins on every rank: the next batch initializes
            self.codebook.copy_(chosen)
            self.ema_sum.copy_(chosen)
            self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, z, codes, weight=1.0):
        K, decay = self.codebook.shape[0], self.config["decay"]
        flat, idx = z.reshape(-1, z.shape[-1]), codes.reshape(-1)
        count = torch.bincount(idx, minlength=K).to(flat.dtype) * weight
        total = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat) * weight
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            torch.distributed.all_reduce(total)
        if count.sum() == 0:  # stand-ins on every rank: nothing was read, the codebook stays as it is
            return
        self.ema_count.mul_(decay).add_(count / count.sum(), alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(total, alpha=1 - decay)
        self.codebook.copy_(F.normalize(self.ema_sum, dim=-1))
        dead = self.ema_count < self.config["dead_threshold"] / K
        if dead.any():  # restart unused codes on encoder vectors of this batch (some rank read one: count > 0)
            chosen = self.drawn_vectors(flat, int(dead.sum()), weight)
            self.codebook[dead] = chosen
            self.ema_sum[dead] = chosen
            self.ema_count[dead] = 1.0 / K

    @staticmethod
    def drawn_vectors(flat, n, weight):
        """n encoder vectors of this batch drawn at random (n, code_dim), distinct where the batch
        has n, the same on every DDP rank: those of the lowest rank whose batch was read
        (weight > 0), never a stand-in's; None if no rank's was"""
        # without replacement: a repeated vector is a code that can never win
        if flat.shape[0] >= n:
            picked = torch.randperm(flat.shape[0], device=flat.device)[:n]
        else:
            picked = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        chosen = flat[picked]
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return chosen if weight > 0 else None
        world = torch.distributed.get_world_size()
        reading = torch.tensor([torch.distributed.get_rank() if weight > 0 else world], device=flat.device)
        torch.distributed.all_reduce(reading, op=torch.distributed.ReduceOp.MIN)
        source = int(reading.item())
        if source == world:
            return None
        torch.distributed.broadcast(chosen, source)
        return chosen


def codebook_usage(counts):
    """counts (K,) of code assignments -> (fraction of codes used, perplexity exp(H(p)))"""
    p = counts.float() / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return (counts > 0).float().mean().item(), torch.exp(entropy).item()


def load_tokenizer(path):
    """a VQ-KD tokenizer written by train_vqkd.py, frozen, in eval mode"""
    obj = read_checkpoint(path)
    if not (isinstance(obj, dict) and "vqkd_args" in obj):
        raise CheckpointError(f"'{path}' is not a VQ-KD tokenizer written by train_vqkd.py")
    try:
        vq = VQKD(config_of(obj["model_args"], path), **obj["vqkd_args"])
        vq.load_state_dict(obj["model"])
    except (KeyError, TypeError, RuntimeError) as e:  # an entry missing, or settings that do not fit the weights
        reason = " ".join(str(e).split())[:300]  # torch's list of keys and shapes, on one line
        raise CheckpointError(f"'{path}' is a VQ-KD tokenizer whose weights do not fit its own settings "
                              f"({type(e).__name__}: {reason}): write it again with train_vqkd.py") from None
    check_finite(vq, f"'{path}'")
    return vq.eval().requires_grad_(False)
