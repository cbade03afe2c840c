"""model.py against independent definitions: explicit math, closed forms, BEiT's layer ids."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import DecoderHead, QuickGELU, ViT, ViTConfig, adapt_state_dict, resize_pos_embed, resize_rel_pos_table


def beit_student(name="nano/4", **kw):
    return ViTConfig.from_name(name, abs_pos=False, rel_pos="shared", qkv_bias="qv", layer_scale=0.1,
                               mask_token=True, **kw)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("cfg", [beit_student(),
                                 ViTConfig.from_name("nano/4", rel_pos="layer", act="quick_gelu", pre_norm=True),
                                 ViTConfig.from_name("nano/4")])
def test_fused_and_explicit_attention_agree(cfg):
    model = randomize(ViT(cfg)).eval()
    x = torch.rand(3, 3, 32, 32)
    fused = model.forward_features(x)
    out = model.forward_all(x)
    assert torch.allclose(fused, out["features"], atol=1e-5)
    assert len(out["hidden"]) == cfg.depth + 1 and len(out["attn"]) == cfg.depth
    assert out["attn"][0].shape == (3, cfg.num_heads, 65, 65)
    assert torch.allclose(out["attn"][0].sum(-1), torch.ones(3, cfg.num_heads, 65), atol=1e-5)


def test_explicit_attention_matches_textbook_formula():
    """softmax(q k^T / sqrt(d) + bias) v per head, computed with plain loops."""
    cfg = ViTConfig.from_name("nano/4", rel_pos="layer", qkv_bias="qv")
    attn = randomize(ViT(cfg)).blocks[0].attn
    x = torch.randn(2, 65, cfg.embed_dim)
    y, maps = attn(x, return_attn=True)
    D, H = cfg.embed_dim, cfg.num_heads
    hs = D // H
    W = attn.qkv.weight
    bias = torch.cat([attn.q_bias, torch.zeros(D), attn.v_bias])
    qkv = x @ W.T + bias
    table = attn.rel_pos.relative_position_bias_table
    grid = cfg.grid
    out = torch.zeros(2, 65, D)
    for h in range(H):
        q = qkv[..., h * hs:(h + 1) * hs]
        k = qkv[..., D + h * hs:D + (h + 1) * hs]
        v = qkv[..., 2 * D + h * hs:2 * D + (h + 1) * hs]
        rel = torch.zeros(65, 65)
        for i in range(65):
            for j in range(65):
                if i == 0 and j == 0:
                    row = (2 * grid - 1) ** 2 + 2
                elif i == 0:
                    row = (2 * grid - 1) ** 2
                elif j == 0:
                    row = (2 * grid - 1) ** 2 + 1
                else:
                    (yi, xi), (yj, xj) = divmod(i - 1, grid), divmod(j - 1, grid)
                    row = (yi - yj + grid - 1) * (2 * grid - 1) + (xi - xj + grid - 1)
                rel[i, j] = table[row, h]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs) + rel, dim=-1)
        assert torch.allclose(maps[:, h], a, atol=1e-5)
        out[..., h * hs:(h + 1) * hs] = a @ v
    assert torch.allclose(y, attn.proj(out), atol=1e-5)


def test_masked_positions_get_the_mask_token():
    cfg = ViTConfig.from_name("nano/4", mask_token=True)  # absolute positions on
    model = randomize(ViT(cfg))
    x = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, [0, 5, 63]] = True
    mask[1, 10:20] = True
    tokens = model.embed(x, mask)  # (B, 65, D)
    # patch embedding written out: normalize, cut 4x4 patches, one matmul
    xn = (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    patches = F.unfold(xn, kernel_size=4, stride=4).transpose(1, 2)  # (B, 64, 48)
    projection = model.patch_embed.proj
    emb = patches @ projection.weight.reshape(cfg.embed_dim, -1).T + projection.bias
    pos = model.pos_embed[0]
    for b in range(2):
        for n in range(64):
            expected = (model.mask_token[0, 0] if mask[b, n] else emb[b, n]) + pos[n + 1]
            assert torch.allclose(tokens[b, n + 1], expected, atol=1e-5)
        assert torch.allclose(tokens[b, 0], model.cls_token[0, 0] + pos[0], atol=1e-6)


def test_quick_gelu_closed_form():
    x = torch.linspace(-5, 5, 101)
    assert torch.allclose(QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)), atol=1e-6)


def test_relative_position_table_size_and_sharing():
    cfg = beit_student()
    model = ViT(cfg)
    table = model.rel_pos_bias.relative_position_bias_table
    assert table.shape == ((2 * 8 - 1) ** 2 + 3, cfg.num_heads)
    assert all(b.attn.rel_pos is None for b in model.blocks)
    per_layer = ViT(ViTConfig.from_name("nano/4", rel_pos="layer"))
    assert per_layer.rel_pos_bias is None
    assert all(b.attn.rel_pos is not None for b in per_layer.blocks)


def expected_beit_layer_id(name, depth):
    """BEiT optim_factory.get_num_layer_for_vit, written from its description."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def test_layer_decay_groups_match_beit_for_vit_b():
    cfg = ViTConfig.from_name("B/16", abs_pos=False, rel_pos="layer", qkv_bias="qv", layer_scale=0.1,
                              num_classes=1000)
    model = ViT(cfg)
    groups = model.param_groups(0.05, layer_decay=0.6)
    seen = set()
    for g in groups:
        for name in g["names"]:
            lid = expected_beit_layer_id(name, 12)
            assert g["lr_scale"] == pytest.approx(0.6 ** (13 - lid)), name
            p = dict(model.named_parameters())[name]
            no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")  # BEiT's skip list; tables decay
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}
    # patch (w, b) and cls; 16 tensors per block; final norm, fc_norm and head (w, b each)
    assert len(seen) == 3 + 12 * 16 + 6
    # spot checks on the closed form
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.6 ** 13)
    assert scale["blocks.11.mlp.fc2.weight"] == pytest.approx(0.6)
    assert scale["head.weight"] == 1.0


def test_weight_decay_of_the_md_student_and_its_transformer_head():
    """as train_md.py builds its optimizer: the decoder head's learned positions are a position table
    like the ViT's (no decay); the shared relative position table decays, as in BEiT and FD"""
    cfg = ViTConfig.beit_v2("nano/4", img_size=32, mask_token=True)
    student = ViT(cfg)
    decoder = DecoderHead("transformer", cfg.embed_dim, 16, cfg.num_patches + 1, width=32, depth=1, heads=2)
    extra = [("decoder." + n, p) for n, p in decoder.named_parameters()]
    decay = {n: g["weight_decay"] for g in student.param_groups(0.05, extra=extra) for n in g["names"]}
    no_decay = {"cls_token", "mask_token", "decoder.pos_embed"}
    assert {"rel_pos_bias.relative_position_bias_table", "decoder.pos_embed"} <= decay.keys()
    for name, p in [*student.named_parameters(), *extra]:
        assert decay[name] == (0.0 if p.ndim == 1 or name in no_decay else 0.05), name


def test_flops_estimate_matches_counted_matmuls():
    cfg = ViTConfig.from_name("S/16")
    model = ViT(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_all(torch.rand(1, 3, 224, 224))  # explicit attention: the matmuls are visible
    counted = counter.get_total_flops()
    assert model.flops_per_image() == pytest.approx(counted, rel=0.01)


def test_drop_path_is_identity_in_eval_and_unbiased_in_train():
    cfg = ViTConfig.from_name("nano/4", drop_path=0.5)
    block = ViT(cfg).blocks[-1]
    assert block.drop_path.p == 0.5
    x = torch.ones(20000, 1, 1)
    torch.manual_seed(0)
    block.drop_path.train()
    y = block.drop_path(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert y.mean().item() == pytest.approx(1.0, abs=0.03)
    block.drop_path.eval()
    assert torch.equal(block.drop_path(x), x)


def test_drop_path_drops_whole_samples():
    """stochastic depth draws once per sample (timm's drop_path): on an (N, T, D) input each
    sample comes out either all zero or all x / keep_prob, never a mix of the two"""
    drop = ViT(ViTConfig.from_name("nano/4", drop_path=0.5)).blocks[-1].drop_path.train()
    x = torch.rand(64, 5, 7) + 0.5  # no zeros in the input
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).flatten(1).all(1)
    kept = torch.isclose(y, x / 0.5).flatten(1).all(1)  # keep_prob = 1 - p = 0.5
    assert torch.equal(dropped | kept, torch.ones(64, dtype=torch.bool))
    assert 0 < int(dropped.sum()) < 64  # both outcomes occur


def test_resize_pos_embed_keeps_constants_and_cls():
    """interpolation weights sum to one: a constant grid stays that constant; CLS is untouched"""
    pe = torch.cat([torch.full((1, 1, 3), 7.0), torch.full((1, 16, 3), -1.5)], dim=1)  # 4 x 4 grid
    out = resize_pos_embed(pe, 7)
    assert out.shape == (1, 50, 3)
    assert torch.equal(out[0, 0], torch.full((3,), 7.0))
    assert torch.allclose(out[0, 1:], torch.full((49, 3), -1.5), atol=1e-5)
    same = torch.randn(1, 17, 3)
    assert torch.equal(resize_pos_embed(same, 4), same)


def test_resize_rel_pos_table_keeps_center_and_cls_rows():
    heads, G, g = 2, 4, 6
    S, s = 2 * G - 1, 2 * g - 1
    offsets = torch.arange(S).float() - (G - 1)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    plane = (dx + 3 * dy).reshape(S * S, 1).repeat(1, heads)
    table = torch.cat([plane, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])])
    out = resize_rel_pos_table(table, g)
    assert out.shape == (s * s + 3, heads)
    assert torch.equal(out[-3:], table[-3:])
    center = (s * s) // 2
    assert out[center].abs().max() < 1e-4  # offset (0, 0) stays 0 for a plane through the origin


def test_resize_pos_embed_puts_each_old_position_where_align_corners_false_maps_it():
    """an asymmetric random 4 x 4 grid resized to 12 x 12: with align_corners=False new pixel i
    samples old coordinate (i + 0.5) * 4 / 12 - 0.5 = (i - 1) / 3, so new (1 + 3a, 1 + 3b) lies
    exactly on old (a, b), where the cubic kernel (1 at 0, 0 at +-1, +-2) returns the sample"""
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 16, 3)
    out = resize_pos_embed(pe, 12)
    old = pe[0, 1:].reshape(4, 4, 3)  # (row, col, channel), row-major patch order
    new = out[0, 1:].reshape(12, 12, 3)
    assert torch.allclose(new[1::3, 1::3], old, atol=1e-5)
    assert torch.equal(out[0, 0], pe[0, 0])


def test_resize_rel_pos_table_puts_each_old_offset_where_align_corners_true_maps_it():
    """a random (asymmetric) 5 x 5 offset table (grid 3) resized for grid 5 (9 x 9): with
    align_corners=True new index i samples old coordinate i * (5 - 1) / (9 - 1) = i / 2, so
    new (2a, 2b) lies exactly on old (a, b): offset (dy, dx) becomes (2 dy, 2 dx)"""
    torch.manual_seed(0)
    heads = 2
    table = torch.randn(5 * 5 + 3, heads)
    out = resize_rel_pos_table(table, 5)
    old = table[:25].reshape(5, 5, heads)  # (dy index, dx index, head)
    new = out[:81].reshape(9, 9, heads)
    assert torch.allclose(new[::2, ::2], old, atol=1e-5)
    assert torch.equal(out[81:], table[25:])


def test_adapt_state_dict_copies_shared_table_to_every_layer():
    src = randomize(ViT(beit_student()))
    dst_cfg = ViTConfig.from_name("nano/4", abs_pos=False, rel_pos="layer", qkv_bias="qv", layer_scale=0.1,
                                  num_classes=6)
    sd = adapt_state_dict(src.state_dict(), dst_cfg)
    assert "mask_token" not in sd
    dst = ViT(dst_cfg)
    missing, unexpected = dst.load_state_dict(sd, strict=False)
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert not unexpected
    for block in dst.blocks:
        shared_table = src.rel_pos_bias.relative_position_bias_table
        assert torch.equal(block.attn.rel_pos.relative_position_bias_table, shared_table)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(dst.eval().forward_features(x), src.eval().forward_features(x), atol=1e-5)


def test_drop_path_drops_a_fraction_p_of_the_samples():
    """DropPath(0.1) in training: each sample is zeroed with probability p = 0.1 (an asymmetric
    p, unlike 0.5), so over 40000 samples the zeroed fraction is 0.1 within 5 standard errors
    (sqrt(0.1 * 0.9 / 40000) = 0.0015); kept samples are x / (1 - p) = 1 / 0.9 exactly (up to
    float32), and the mean stays 1"""
    from model import DropPath
    drop = DropPath(0.1).train()
    x = torch.ones(40000, 1, 1)
    torch.manual_seed(0)
    y = drop(x).flatten()
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - 0.1) < 5 * math.sqrt(0.1 * 0.9 / 40000)
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.9), rtol=1e-6, atol=0)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)


def test_md_student_does_not_see_its_masked_patches():
    """MD: the student sees the masked image, i.e. each masked patch's embedding is replaced by
    the mask token before any block. So its whole output is unchanged when only the pixels of
    masked patches change, and changes when the pixels of an unmasked patch change."""
    from model import MDStudent
    cfg = beit_student()
    torch.manual_seed(0)
    md = MDStudent(randomize(ViT(cfg)), DecoderHead("linear", cfg.embed_dim, 5)).eval()
    x = torch.rand(2, 3, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[:, [0, 9, 27, 63]] = True  # patch n is rows 4 (n // 8) .. +4, columns 4 (n % 8) .. +4

    def repaint(images, patch):
        images = images.clone()
        r, c = divmod(patch, 8)
        images[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = torch.rand(2, 3, 4, 4)
        return images

    with torch.no_grad():
        out = md(x, masks)
        assert out.shape == (2, 64, 5)
        hidden = x
        for patch in (0, 9, 27, 63):
            hidden = repaint(hidden, patch)
        assert torch.allclose(md(hidden, masks), out, atol=1e-6)
        assert (md(repaint(x, 10), masks) - out).abs().max() > 1e-3


def test_qkv_bias_none_gives_zero_queries_keys_values_for_a_zero_input():
    """qkv_bias="none": q, k, v = x W with no bias, so a zero input attends uniformly over zero
    values and the attention's output is the output projection's bias alone"""
    cfg = ViTConfig.from_name("nano/4", qkv_bias="none")
    attn = randomize(ViT(cfg)).blocks[0].attn
    y, _ = attn(torch.zeros(2, 65, cfg.embed_dim))
    assert torch.allclose(y, attn.proj.bias.expand(2, 65, -1), atol=1e-6)


def test_drop_path_rates_rise_linearly_from_zero_as_in_timm():
    """the stochastic depth decay rule of BEiT and timm: block i drops its branches with
    torch.linspace(0, rate, depth)[i]; the first block (rate 0) has no DropPath at all"""
    model = ViT(ViTConfig.from_name("tiny/4", drop_path=0.3))
    rates = [getattr(block.drop_path, "p", 0.0) for block in model.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 6).tolist(), abs=1e-7)
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)


def test_init_is_beits():
    """BEiT's init (timm's beit.py): linear and patch weights truncated normal with std 0.02, zero
    biases, tokens std 0.02, layer scales at their init value, and block i's attn.proj and mlp.fc2
    weights divided by sqrt(2 (i + 1)) (fix_init_weight); checked on sample standard deviations"""
    torch.manual_seed(0)
    cfg = ViTConfig.from_name("Ti/16", depth=3, mask_token=True, layer_scale=0.1, num_classes=100)
    model = ViT(cfg)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
    std = 0.02
    for name in ("patch_embed.proj.weight", "head.weight", "pos_embed"):
        assert model.get_parameter(name).std().item() == pytest.approx(std, rel=0.03), name
    for name in ("cls_token", "mask_token"):  # 192 values each
        assert model.get_parameter(name).std().item() == pytest.approx(std, rel=0.25), name
    for i, block in enumerate(model.blocks):
        for w in (block.attn.qkv.weight, block.mlp.fc1.weight):
            assert w.std().item() == pytest.approx(std, rel=0.03)
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert w.std().item() == pytest.approx(std / math.sqrt(2 * (i + 1)), rel=0.03)
        for gamma in (block.gamma_1, block.gamma_2):
            assert torch.equal(gamma, torch.full((cfg.embed_dim,), 0.1))


def test_beit_v2_preset_is_the_papers_base_student():
    """unilm beit2/PRETRAINING.md (base): shared relative position bias and no absolute positions
    (beit_base_patch16_224_8k_vocab_cls_pt), q and v biases, --layer_scale_init_value 0.1"""
    cfg = ViTConfig.beit_v2("B/16")
    assert (cfg.abs_pos, cfg.rel_pos, cfg.qkv_bias) == (False, "shared", "qv")
    assert cfg.layer_scale == 0.1


def test_flops_estimate_equals_counted_matmuls_exactly_on_a_tiny_grid():
    """on a 4 x 4 grid the CLS token is 1/17 of the tokens (1/197 at S/16, inside the 1% above):
    FlopCounterMode's count of every matmul and the patch convolution equals the formula exactly"""
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0)
    model = ViT(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_all(torch.rand(1, 3, 32, 32))
    assert model.flops_per_image() == counter.get_total_flops()


def test_mean_pooling_is_final_norm_then_mean_of_patches_then_fc_norm():
    """global_pool="mean" as the config defines it, written out with F.layer_norm on the last
    block's tokens: final norm on every token, mean over the patch tokens (CLS left out), fc_norm,
    then the head"""
    cfg = ViTConfig.from_name("nano/4", num_classes=5, global_pool="mean")
    model = randomize(ViT(cfg)).eval()
    x = torch.rand(2, 3, 32, 32)
    D, eps = cfg.embed_dim, cfg.norm_eps
    with torch.no_grad():
        last = model.forward_all(x)["hidden"][-1]
        tokens = F.layer_norm(last, (D,), model.norm.weight, model.norm.bias, eps)
        fc_norm = model.fc_norm
        pooled = F.layer_norm(tokens[:, 1:].mean(1), (D,), fc_norm.weight, fc_norm.bias, eps)
        expected = pooled @ model.head.weight.T + model.head.bias
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_clip_pre_norm_gets_the_stem_layer_id():
    """CLIP's ln_pre acts on the embeddings before block 0, so under layer decay it is scaled
    as the patch embedding is: layer_decay ** (depth + 1)"""
    model = ViT(ViTConfig.from_name("nano/4", pre_norm=True, num_classes=3))
    groups = model.param_groups(0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    for name in ("norm_pre.weight", "norm_pre.bias", "patch_embed.proj.weight"):
        assert scale[name] == pytest.approx(0.5 ** 3), name


def test_configure_optimizers_starts_each_group_at_its_layer_decayed_lr():
    """AdamW's groups start at lr * layer_decay ** (depth + 1 - layer id), with BEiT's layer ids
    worked out from the parameter names (expected_beit_layer_id above)"""
    model = ViT(ViTConfig.from_name("nano/4", num_classes=3))
    opt = model.configure_optimizers(0.05, 1e-3, (0.9, 0.999), layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            lid = expected_beit_layer_id(names[id(p)], 2)
            assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (3 - lid)), names[id(p)]


def test_adapt_state_dict_keeps_a_shared_table_for_a_shared_config():
    """MD student weights into an MD student configuration: strict loading, the same outputs"""
    cfg = beit_student()
    src = randomize(ViT(cfg)).eval()
    dst = ViT(cfg)
    dst.load_state_dict(adapt_state_dict(src.state_dict(), cfg))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(dst.eval().forward_features(x), src.forward_features(x))


@pytest.mark.parametrize("kind, depth", [("linear", 1), ("mlp", 1), ("transformer", 0)])
def test_decoder_prediction_for_patch_k_reads_token_k_plus_one(kind, depth):
    """token 0 is CLS, so patch k is token k + 1: with a per-token head (linear, mlp, transformer
    of zero blocks) changing token k + 1 changes the prediction for patch k and no other"""
    torch.manual_seed(0)
    head = DecoderHead(kind, 8, 4, num_tokens=6, width=16, depth=depth, heads=2).eval()
    tokens = torch.randn(2, 6, 8)
    changed = tokens.clone()
    changed[:, 3] += 1.0
    with torch.no_grad():
        diff = (head(changed) - head(tokens)).abs().amax(dim=(0, 2))  # (5,) one per patch
    assert diff[2] > 1e-3
    assert diff[torch.arange(5) != 2].max() < 1e-6
