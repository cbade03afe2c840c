"""teacher.py: official layouts load into our ViT and compute what the reference libraries
compute."""
import argparse
import os
import pickle
import random
import re
import subprocess
import sys

import pytest
import torch

from common import read_checkpoint
from model import PRESETS, ViT, ViTConfig
from teacher import CheckpointError, Whitening, load_model, load_teacher

from tests import forkserver

try:
    import timm
except ImportError:
    timm = None
try:
    import open_clip
except ImportError:
    open_clip = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
            torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
CLIP = (torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1),
        torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))
NORM_GAINS = ("ln_1.weight", "ln_2.weight", "norm1.weight", "norm2.weight", "norm.weight",
              "ln_pre.weight", "ln_post.weight", "fc_norm.weight")


def randomized_state_dict(module, seed):
    """random values in the module's own key layout (weights small, LayerNorm gains near 1)"""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            v = torch.randn(v.shape, generator=g) * 0.05 + (1.0 if k.endswith(NORM_GAINS) else 0.0)
        out[k] = v
    return out


def reference_model(library, name, build, seed):
    """a model of a reference library with random weights; the test skips where it is not
    installed"""
    if library is None:
        pytest.skip(f"{name} not installed (pip install -r requirements-dev.txt)")
    m = build().eval()
    m.load_state_dict(randomized_state_dict(m, seed))
    return m


@pytest.fixture(scope="module")
def timm_vit():
    def build():
        return timm.create_model("vit_base_patch16_224", pretrained=False)
    return reference_model(timm, "timm", build, 1)


@pytest.fixture(scope="module")
def clip_model():
    def build():
        return open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    return reference_model(open_clip, "open_clip", build, 2)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))


def dino_training_checkpoint(backbone, out_dim=512):
    """main_dino.py's save_dict: student (DDP-wrapped: module.), teacher (not wrapped for a ViT,
    which has no batch norm) = MultiCropWrapper(backbone, DINOHead): backbone.* and the head's
    mlp.{0,2,4} and weight-normed last_layer (weight_g, weight_v); the optimizer, epoch, the
    argparse options and the loss's centre. out_dim is 65536 in DINO's runs; smaller here."""
    D = backbone["cls_token"].shape[-1]
    head = {"head.mlp.0.weight": torch.randn(2048, D), "head.mlp.0.bias": torch.zeros(2048),
            "head.mlp.2.weight": torch.randn(2048, 2048), "head.mlp.2.bias": torch.zeros(2048),
            "head.mlp.4.weight": torch.randn(256, 2048), "head.mlp.4.bias": torch.zeros(256),
            "head.last_layer.weight_g": torch.ones(out_dim, 1),
            "head.last_layer.weight_v": torch.randn(out_dim, 256)}
    teacher = {**{"backbone." + k: v for k, v in backbone.items()}, **head}
    args = argparse.Namespace(arch="vit_base", patch_size=16, out_dim=out_dim, norm_last_layer=True,
                              momentum_teacher=0.996, use_bn_in_head=False, lr=0.0005,
                              global_crops_scale=(0.4, 1.0), data_path="/path/to/imagenet/train/")
    return {"student": {"module." + k: v.clone() for k, v in teacher.items()}, "teacher": teacher,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "weight_decay": 0.04, "params": [0]}]},
            "epoch": 100, "args": args, "dino_loss": {"center": torch.zeros(1, out_dim)}}


@pytest.mark.parametrize("layout", ["dino", "deit", "dino_full", "safetensors"])
def test_timm_layouts_match_timm(timm_vit, images, tmp_path, layout):
    sd = timm_vit.state_dict()
    path = str(tmp_path / f"{layout}.pth")
    # timm's weights on the Hugging Face hub: the state dict with its head
    if layout == "safetensors":
        path = str(tmp_path / "model.safetensors")
        pytest.importorskip("safetensors.torch").save_file(sd, path)
    elif layout == "dino":  # DINO: plain state dict, no head
        torch.save({k: v for k, v in sd.items() if not k.startswith("head")}, path)
    elif layout == "deit":  # DeiT: under "model", with the 1000-class head
        torch.save({"model": sd}, path)
    else:  # DINO's full training checkpoint, as facebookresearch/dino main_dino.py writes it
        torch.save(dino_training_checkpoint({k: v for k, v in sd.items() if not k.startswith("head")}), path)
    name = "deit" if layout in ("deit", "safetensors") else "dino"
    t = load_teacher(name, path=path)
    with torch.no_grad():
        expected = timm_vit.forward_features((images - IMAGENET[0]) / IMAGENET[1])
        out = t(images)
    assert out.shape == (2, 197, 768)
    assert (out - expected).abs().max().item() < 1e-4
    if layout in ("deit", "safetensors"):
        vit, _ = load_model(path)
        with torch.no_grad():
            logits = vit(images)
            ref = timm_vit((images - IMAGENET[0]) / IMAGENET[1])
        assert (logits - ref).abs().max().item() < 1e-4


def test_timm_layouts_model_py_cannot_hold_are_one_line(tmp_path):
    """a distilled DeiT (a second token every block attends to) and a ViT without a class token,
    in timm's own key layout, are refused in one line naming what is missing, not loaded as
    another model or a KeyError traceback"""
    if timm is None:
        pytest.skip("timm not installed (pip install -r requirements-dev.txt)")
    from timm.models.vision_transformer import VisionTransformer
    small = dict(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=1, num_classes=10)
    files = {"distilled DeiT": {"model": timm.create_model("deit_tiny_distilled_patch16_224").state_dict()},
             "ViT without a class token": VisionTransformer(class_token=False, global_pool="avg",
                                                            **small).state_dict()}
    for name, expected in (("distilled DeiT", "is a distilled DeiT"),
                           ("ViT without a class token", "is a ViT without a class token")):
        path = str(tmp_path / f"{name}.pth")
        torch.save(files[name], path)
        with pytest.raises(CheckpointError, match=expected):
            load_model(path)
        r = forkserver.run([sys.executable, os.path.join(ROOT, "teacher.py"), "export", "--format=timm", path,
                            str(tmp_path / "out.pth")], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and expected in r.stderr, r.stderr


def test_family_variants_without_a_part_of_model_py_are_one_line(tmp_path):
    """state dicts written by the libraries themselves: timm's relpos ViT (a class token, no
    pos_embed) and open_clip's CLIPA tower (no ln_pre): one line naming the missing key (before: a
    KeyError traceback from load_model, train_md.py --teacher, analyze.py and teacher.py export)"""
    if timm is None or open_clip is None:
        pytest.skip("timm or open_clip not installed (pip install -r requirements-dev.txt)")
    from open_clip.transformer import VisionTransformer as ClipTower
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos
    relpos = VisionTransformerRelPos(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2,
                                     class_token=True, global_pool="token", num_classes=0)
    clipa = ClipTower(image_size=32, patch_size=8, width=64, layers=1, heads=2, mlp_ratio=4.0,
                      output_dim=32, no_ln_pre=True, pool_type="avg", final_ln_after_pool=True)
    files = [("relpos.pth", relpos.state_dict(), "has the timm layout but no 'pos_embed'"),
             ("clipa.pt", {"visual." + k: v for k, v in clipa.state_dict().items()},
              "has the clip layout but no 'ln_pre.weight'")]
    for name, state_dict, expected in files:
        path = str(tmp_path / name)
        torch.save(state_dict, path)
        with pytest.raises(CheckpointError, match=expected):
            load_model(path)
        r = forkserver.run([sys.executable, os.path.join(ROOT, "teacher.py"), "export",
                            "--act=gelu" if "clip" in name else "--format=timm", path,
                            str(tmp_path / "out.pth")], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
        assert (r.returncode != 0 and r.stderr.strip().count("\n") == 0
                and expected in r.stderr), r.stderr


def test_clip_matches_open_clip(clip_model, images, tmp_path):
    sd = clip_model.state_dict()
    path = str(tmp_path / "clip_fp16.pt")
    torch.save({k: v.half() for k, v in sd.items()}, path)  # OpenAI stores fp16
    fp32_path = str(tmp_path / "clip_fp32.pt")
    torch.save(sd, fp32_path)
    visual = clip_model.visual
    visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = visual((images - CLIP[0]) / CLIP[1])
        out = load_teacher("clip", path=fp32_path)(images)
        out16 = load_teacher("clip", path=path)(images)
    assert out.shape == (2, 197, 768)
    # ln_post on every token, no projection; the CLS token projected is open_clip's image embedding
    assert (out[:, 1:] - tokens).abs().max().item() < 1e-4
    assert (out[:, 0] @ sd["visual.proj"] - pooled).abs().max().item() < 1e-4
    # from fp16 weights: the same function up to fp16 rounding of the weights
    assert (out16 - out).abs().max().item() < 5e-2


def test_clip_torchscript_archive(clip_model, images, tmp_path):
    """OpenAI ships a TorchScript archive whose state dict has 'visual.*' keys."""
    class Holder(torch.nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, x):
            return self.visual.conv1(x)

    visual = clip_model.visual
    visual.output_tokens = False
    archive = torch.jit.trace(Holder(visual), images[:1])
    path = str(tmp_path / "ViT-B-16.pt")
    torch.jit.save(archive, path)
    visual.output_tokens = True
    with torch.no_grad():
        _, tokens = visual((images - CLIP[0]) / CLIP[1])
        out = load_teacher("clip", path=path)(images)
    assert (out[:, 1:] - tokens).abs().max().item() < 1e-4


def small_clip(width, head_width, quick_gelu, seed):
    """open_clip's CLIP with a small vision tower (32 px, patch 4, 2 blocks) of width / head_width heads"""
    def build():
        from open_clip.model import CLIP as OpenCLIP
        vision = dict(image_size=32, patch_size=4, width=width, layers=2, head_width=head_width)
        text = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
        return OpenCLIP(16, vision, text, quick_gelu=quick_gelu)
    return reference_model(open_clip, "open_clip", build, seed)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_clip_layout_heads_from_the_table_and_the_activation_asked_for(quick_gelu, tmp_path, capsys):
    """a 96-wide tower of 3 heads (32 channels each: not embed_dim / 64) gets its heads from
    KNOWN_HEADS. The keys do not tell the activation: QuickGELU is assumed, with a warning saying
    so; open_clip's GELU models load with act='gelu', or as the project checkpoint export --act=gelu
    writes, which every script takes as a teacher"""
    from teacher import main
    m = small_clip(96, 32, quick_gelu, seed=5)
    path = str(tmp_path / "clip.pt")
    torch.save(m.state_dict(), path)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    m.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = m.visual((images - CLIP[0]) / CLIP[1])
        out = load_teacher(path, **({} if quick_gelu else dict(act="gelu")))(images)
    assert (out[:, 1:] - tokens).abs().max().item() < 1e-5
    assert ("QuickGELU assumed" in capsys.readouterr().err) == quick_gelu
    if quick_gelu:
        return
    main(["export", "--act=gelu", path, str(tmp_path / "teacher.pt")])
    with torch.no_grad():
        out = load_teacher(str(tmp_path / "teacher.pt"))(images)
    assert (out[:, 1:] - tokens).abs().max().item() < 1e-5
    vit, _ = load_model(path)  # not asked for: QuickGELU, and the warning says so in one line
    warning = capsys.readouterr().err.strip()
    assert vit.config.act == "quick_gelu" and "\n" not in warning and "--act=gelu" in warning, warning
    with pytest.raises(CheckpointError, match="is a project checkpoint: an activation is chosen for CLIP-layout"):
        load_model(str(tmp_path / "teacher.pt"), act="gelu")



def test_a_local_copy_of_an_official_teacher_is_checked_against_the_published_hash(tmp_path, capsys,
                                                                                   monkeypatch):
    """--teacher=clip --teacher_path=FILE: a file that is not the published one (here open_clip's, in
    CLIP's layout) loads, with one warning line that says so and what is assumed; a file with the
    published hash loads silently"""
    import hashlib
    import teacher
    path = tmp_path / "ViT-B-16.pt"
    torch.save(small_clip(64, 32, True, seed=7).state_dict(), path)
    vit, _ = load_model("clip", str(path))
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: '{path}' is not the published file of teacher 'clip'"), warning
    assert "\n" not in warning and "QuickGELU" in warning and vit.config.act == "quick_gelu"
    url, _, layout = teacher.OFFICIAL["clip"]
    monkeypatch.setitem(teacher.OFFICIAL, "clip", (url, hashlib.sha256(path.read_bytes()).hexdigest(), layout))
    load_model("clip", str(path))
    assert capsys.readouterr().err == ""
    # a project file (teacher.py export) says its own activation: no guess, no warning
    monkeypatch.setitem(teacher.OFFICIAL, "clip", (url, "0" * 64, layout))
    teacher.main(["export", "--act=gelu", str(path), str(tmp_path / "gelu.pt")])
    capsys.readouterr()
    vit, _ = load_model("clip", str(tmp_path / "gelu.pt"))
    assert capsys.readouterr().err == "" and vit.config.act == "gelu"

# one registered timm ViT of each width (with its class token, where one has it); built on the meta device
TIMM_HEADS = ("test_vit", "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_medium_patch16_clip_224",
              "vit_base_patch16_224", "vit_base_patch16_plus_240", "vit_large_patch16_224",
              "vit_so400m_patch14_reg1_tipsv2", "vit_huge_patch14_224", "vit_giant_patch14_224",
              "vit_giant_patch14_dinov2", "vit_gigantic_patch14_224")


def test_known_head_counts_are_the_reference_libraries():
    """KNOWN_HEADS, used where a file does not record its heads, against model.py's PRESETS, timm's
    registered models and every ViT tower in CLIP's layout among open_clip's model configs: the same
    heads for each width, and no width of theirs missing"""
    from teacher import KNOWN_HEADS
    if timm is None or open_clip is None:
        pytest.skip("timm or open_clip not installed (pip install -r requirements-dev.txt)")
    found = {}  # width -> {heads: [models]}
    for name, (width, _, heads, _, _) in PRESETS.items():
        found.setdefault(width, {}).setdefault(heads, []).append(name)
    for name in TIMM_HEADS:
        with torch.device("meta"):  # no memory, no weights
            m = timm.create_model(name)
        found.setdefault(m.embed_dim, {}).setdefault(m.blocks[0].attn.num_heads, []).append(name)
    default_head_width = open_clip.model.CLIPVisionCfg().head_width
    for name in open_clip.list_models():
        vision = open_clip.get_model_config(name).get("vision_cfg", {})
        if isinstance(vision.get("layers"), int) and not vision.get("timm_model_name"):  # not a ResNet, nor timm's
            heads = vision["width"] // vision.get("head_width", default_head_width)
            found.setdefault(vision["width"], {}).setdefault(heads, []).append(name)
    assert {w: sorted(h) for w, h in found.items()} == {w: [h] for w, h in KNOWN_HEADS.items()}, found


@pytest.mark.parametrize("name, act", [("vit_base_patch16_clip_224", None),
                                       ("vit_base_patch16_clip_quickgelu_224", "quick_gelu")])
def test_timm_clip_tower_state_dict_is_timms_model(tmp_path, capsys, images, name, act):
    """A state dict of timm's CLIP towers (norm_pre, no patch bias; before: refused as a file that
    'does not fit the model it describes'): the same features as timm's forward_features on its own
    pretrained_cfg normalization (CLIP's mean/std). Their keys do not tell the activation: GELU, as
    timm's vit_*_clip_*,
    with a warning; QuickGELU with act. The wrong activation gives other features."""
    def build():
        return timm.create_model(name, pretrained=False)
    reference = reference_model(timm, "timm", build, 4)
    path = tmp_path / "timm_clip.pth"
    torch.save(reference.state_dict(), path)
    vit, _ = load_model(str(path), act=act)
    warning = capsys.readouterr().err
    assert ("GELU assumed" in warning) == (act is None)
    mean, std = (torch.tensor(reference.pretrained_cfg[k]).view(1, 3, 1, 1)
                 for k in ("mean", "std"))
    with torch.no_grad():
        # (B, 197, 768), final norm on all tokens
        expected = reference.forward_features((images - mean) / std)
        assert torch.allclose(vit.forward_features(images), expected, atol=1e-4)
        other = load_model(str(path), act="gelu" if act else "quick_gelu")[0]
        assert (other.forward_features(images) - expected).abs().max() > 1e-2


def test_width_not_in_the_table_is_guessed_with_a_warning(tmp_path, capsys):
    if timm is None:
        pytest.skip("timm not installed (pip install -r requirements-dev.txt)")
    from timm.models.vision_transformer import VisionTransformer
    sd = VisionTransformer(img_size=32, patch_size=16, embed_dim=80, depth=1, num_heads=2).state_dict()
    torch.save(sd, tmp_path / "w80.pth")
    vit, _ = load_model(str(tmp_path / "w80.pth"))
    warning = capsys.readouterr().err.strip()
    assert vit.config.num_heads == 1 and warning.count("\n") == 0
    assert warning.startswith("warning: ") and "guessed 1" in warning and "KNOWN_HEADS" in warning, warning


def test_project_checkpoint_as_teacher_and_layer_choice(tiny_teacher):
    obj = torch.load(tiny_teacher, weights_only=True)
    vit = ViT(ViTConfig.from_dict(obj["model_args"]))
    vit.load_state_dict(obj["model"])
    vit.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_teacher(tiny_teacher)(x), vit.forward_features(x), atol=1e-6)
        hidden = vit.forward_all(x)["hidden"]
        assert torch.allclose(load_teacher(tiny_teacher, layer=1)(x), hidden[1], atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        load_teacher(tiny_teacher, layer=7)


def test_project_checkpoint_with_compile_or_ddp_prefixes(tiny_teacher, tmp_path):
    """'model' saved from torch.compile's module (its state_dict names every key _orig_mod.), from
    DDP's (module.), or both, in either order, loads as the plain checkpoint"""
    obj = torch.load(tiny_teacher, weights_only=True)
    vit, _ = load_model(tiny_teacher)
    compiled = torch.compile(vit).state_dict()  # only wrapped: nothing is compiled before a call
    assert all(k.startswith("_orig_mod.") for k in compiled)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for name, model in (("compiled", compiled), ("ddp", {"module." + k: v for k, v in obj["model"].items()}),
                        ("ddp_compiled", {"module." + k: v for k, v in compiled.items()}),
                        ("compiled_ddp", {"_orig_mod.module." + k: v for k, v in obj["model"].items()})):
        torch.save(dict(obj, model=model), tmp_path / f"{name}.pt")
        loaded, info = load_model(str(tmp_path / f"{name}.pt"))
        assert info["kind"] == "project"
        with torch.no_grad():
            assert torch.equal(loaded(images), vit(images)), name


def test_teacher_is_frozen_and_stays_in_eval(tiny_teacher):
    t = load_teacher(tiny_teacher)
    t.train()
    assert not t.vit.training and not any(p.requires_grad for p in t.parameters())
    out = t(torch.rand(1, 3, 32, 32))
    assert not out.requires_grad


def test_teacher_bf16(tiny_teacher):
    x = torch.rand(2, 3, 32, 32)
    fp32 = load_teacher(tiny_teacher)(x)
    bf16 = load_teacher(tiny_teacher, dtype=torch.bfloat16)(x)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max().item() < 0.1


def test_whitening_gives_zero_mean_unit_variance_per_token():
    x = torch.randn(2, 5, 64) * 7 + 3
    w = Whitening("ln", 64)(x)
    assert torch.allclose(w.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(w.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-4)
    assert torch.equal(Whitening("none", 64)(x), x)


def test_batch_whitening_standardizes_each_channel_and_tracks_running_statistics():
    g = torch.Generator().manual_seed(0)
    scale, shift = torch.linspace(0.5, 5, 8), torch.linspace(-3, 3, 8)
    bn = Whitening("bn", 8, momentum=0.5)
    x = torch.randn(4, 50, 8, generator=g) * scale + shift
    w = bn(x)  # training: this batch's statistics over images and tokens
    assert torch.allclose(w.reshape(-1, 8).mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(w.reshape(-1, 8).var(0, unbiased=False), torch.ones(8), atol=1e-3)
    # running estimates move halfway (momentum 0.5) from (0, 1) to the batch's mean and
    # unbiased variance
    flat = x.reshape(-1, 8)
    assert torch.allclose(bn.running_mean, 0.5 * flat.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, 0.5 + 0.5 * flat.var(0), atol=1e-4)
    bn.eval()  # eval: the running statistics, the same for every batch
    y = torch.randn(1, 3, 8, generator=g)
    expected = (y - bn.running_mean) / torch.sqrt(bn.running_var + 1e-6)
    assert torch.allclose(bn(y), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown whitening"):
        Whitening("zca", 8)


def test_batch_whitening_running_statistics_are_torchs_batch_norm_at_its_default_momentum():
    """'bn' at momentum 0.1 (0.5 cannot tell m from 1 - m): three training batches and an eval
    one give what torch.nn.BatchNorm1d(affine=False, eps=1e-6, momentum=0.1) gives on the
    (images x tokens, channels) rows: outputs and running mean / variance"""
    g = torch.Generator().manual_seed(4)
    bn = Whitening("bn", 8)
    truth = torch.nn.BatchNorm1d(8, eps=1e-6, momentum=0.1, affine=False)
    scale, shift = torch.linspace(0.5, 5, 8), torch.linspace(-3, 3, 8)
    for _ in range(3):
        x = torch.randn(4, 50, 8, generator=g) * scale + shift
        assert torch.allclose(bn(x), truth(x.reshape(-1, 8)).view(4, 50, 8), atol=1e-5)
    assert torch.allclose(bn.running_mean, truth.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, truth.running_var, atol=1e-5)
    bn.eval(), truth.eval()
    y = torch.randn(2, 3, 8, generator=g)
    assert torch.allclose(bn(y), truth(y.reshape(-1, 8)).view(2, 3, 8), atol=1e-5)


# ---- bad input: one clear line each -------------------------------------------------------

def test_unknown_teacher_name():
    message = "unknown model 'clp': choose clip, dino, deit, embedded or a checkpoint path"
    with pytest.raises(CheckpointError, match=message):
        load_teacher("clp")


def test_missing_file_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(random.Random(0).randbytes(1000))  # fixed bytes, not a pickle's first byte
    with pytest.raises(CheckpointError, match="is not a checkpoint: neither a zip archive nor a pickle"):
        load_teacher(str(junk))
    junk.write_bytes(b"\x80\x02" + random.Random(0).randbytes(1000))  # a pickle's start, then junk:
    # fixed, as 8% of os.urandom draws end in a pickle IndexError ("not a readable checkpoint")
    with pytest.raises(CheckpointError, match="not a plain-data checkpoint"):
        load_teacher(str(junk))
    whole = tmp_path / "whole.pt"
    torch.save({"vit.cls_token": torch.zeros(1, 1, 64)}, whole)
    cut = tmp_path / "cut.pt"  # the first half of a real torch.save file
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pt' is a cut or damaged zip archive"):
        load_teacher(str(cut))
    flipped = tmp_path / "flipped.pt"  # one byte of the tensor's data changed, the zip intact: torch.load
    data = bytearray(whole.read_bytes())  # reads it as another weight, the zip's CRC-32 tells
    at = data.index(bytes(256))  # the 64 float zeros of the tensor
    data[at + 100] ^= 0x40
    flipped.write_bytes(data)
    assert torch.load(flipped, weights_only=True)["vit.cls_token"].abs().max() > 0
    with pytest.raises(CheckpointError, match=r"flipped.pt' is damaged: whole/data/0 in it does not "
                                              r"match its checksum \(CRC-32\)"):
        load_teacher(str(flipped))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt' is empty: not a checkpoint"):
        load_teacher(str(tmp_path / "empty.pt"))
    log = tmp_path / "log.jsonl"  # a run's log given for its checkpoint (before: "not a plain-data
    log.write_text('{"iter": 10, "loss": 0.25}\n')  # checkpoint ...: Unsupported operand 123")
    with pytest.raises(CheckpointError, match=r"log.jsonl' is not a checkpoint: .* \(it begins b'\{\"iter"):
        load_teacher(str(log))
    weird = tmp_path / "weird.pt"
    torch.save({"foo.weight": torch.zeros(3)}, weird)
    with pytest.raises(CheckpointError, match="not a CLIP, DINO/DeiT"):
        load_teacher(str(weird))


def test_safetensors_from_the_library_read_exactly_and_a_damaged_one_is_one_line(tmp_path):
    """files written by the safetensors package (its own writer; every dtype it maps to torch's,
    an empty tensor, metadata), read without that package: the same tensors; cut or with a header
    that does not add up: one line"""
    save_file = pytest.importorskip("safetensors.torch").save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).half(),
               "b": torch.randn(2, 2, generator=g).bfloat16(),
               "d": torch.randn(2, generator=g).double(),
               "i": torch.arange(-3, 3), "j": torch.arange(4, dtype=torch.int32),
               "k": torch.arange(3, dtype=torch.int16),
               "c": torch.arange(-2, 2, dtype=torch.int8),
               "u": torch.arange(6, dtype=torch.uint8).view(2, 3),
               "m": torch.tensor([True, False]), "e": torch.zeros(0, 3)}
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    read = read_checkpoint(str(path))
    assert sorted(read) == sorted(tensors)
    for name, t in tensors.items():
        assert read[name].dtype == t.dtype and torch.equal(read[name], t), name
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1])
    header_length = int.from_bytes(data[:8], "little")
    (tmp_path / "header.safetensors").write_bytes(data[:8 + header_length - 1] + b"?"
                                                  + data[8 + header_length:])
    for name in ("cut", "header"):
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(str(tmp_path / f"{name}.safetensors"))
        assert str(e.value).startswith(f"'{tmp_path / name}.safetensors' is a damaged "
                                       "safetensors file (")


def test_a_flipped_byte_in_the_zip_records_is_one_line(tmp_path):
    """every single byte of a real torch.save file's zip records (its local file headers, its
    central directory and end record) flipped, one at a time: the file loads as it was, or is
    refused with one CheckpointError; before, about half of them raised zipfile's own errors
    (BadZipFile, a NotImplementedError for a "version", a RuntimeError for "encrypted", a
    UnicodeDecodeError in a name) as a traceback, and a record's MS-DOS folder bit made torch.load
    give that tensor uninitialized memory"""
    import zipfile
    from common import read_checkpoint
    model = ViT(ViTConfig.from_name("nano/4"))
    whole = tmp_path / "whole.pt"
    torch.save(dict(model=model.state_dict(), model_args=model.config.to_dict()), whole)
    original = whole.read_bytes()
    with zipfile.ZipFile(whole) as z:
        records = [range(info.header_offset, info.header_offset + 30 + len(info.filename))
                   for info in z.infolist()]  # each local header: 30 bytes and the name
        directory = range(z.start_dir, len(original))  # the central directory and the end record
    positions = [p for r in records + [directory] for p in r]
    flipped, outcomes = tmp_path / "flipped.pt", {"same": 0, "refused": 0}
    for at in positions:
        data = bytearray(original)
        data[at] ^= 0xFF
        flipped.write_bytes(data)
        try:
            loaded = read_checkpoint(str(flipped))["model"]
        except CheckpointError as e:
            assert "\n" not in str(e) and "flipped.pt" in str(e), (at, str(e))
            outcomes["refused"] += 1
            continue
        assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items()), at
        outcomes["same"] += 1
    assert outcomes["refused"] > len(positions) // 4, outcomes


def test_wrong_architecture_and_wrong_layout(tmp_path, tiny_teacher):
    vit = ViT(ViTConfig.from_name("nano/4"))
    sd = vit.state_dict()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 48)  # shapes that do not fit together
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_teacher(str(path))
    good = tmp_path / "timm.pth"
    torch.save(vit.state_dict(), good)
    message = "has the timm layout, but teacher 'clip' needs the clip layout"
    with pytest.raises(CheckpointError, match=message):
        load_teacher("clip", path=str(good))
    run = tmp_path / "run.pt"  # a training run's checkpoint (its config is the run's settings)
    torch.save(dict(torch.load(tiny_teacher, weights_only=True), config=dict(lr=1e-3)), run)
    with pytest.raises(CheckpointError,
                       match=f"'{run}' is a training run's checkpoint, not a copy of the official "
                             "file of teacher 'deit': give the file itself in place of 'deit'"):
        # before: read as deit's, and a fine-tune's result filed under deit
        load_teacher("deit", path=str(run))
    obj = torch.load(tiny_teacher, weights_only=True)
    obj["model_args"]["depth"] = 3  # a project checkpoint whose weights do not fit its own config
    bad_project = tmp_path / "project.pt"
    torch.save(obj, bad_project)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_teacher(str(bad_project))


@pytest.mark.slow
def test_model_args_of_the_wrong_type_is_one_line(tmp_path, tiny_teacher, tiny_data):
    """a value that from_dict takes but the model cannot build with: refused by name, in one line,
    by load_model and by the scripts that load a teacher or an init"""
    obj = torch.load(tiny_teacher, weights_only=True)
    obj["model_args"]["depth"] = "six"
    path = tmp_path / "argtype.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="model_args this version cannot read: depth='six', expected int"):
        load_model(str(path))
    torch.save(dict(obj, model_args="x"), tmp_path / "argstr.pt")  # before: "dictionary update sequence"
    with pytest.raises(CheckpointError, match="model_args this version cannot read: a str, not a dict"):
        load_model(str(tmp_path / "argstr.pt"))
    common = [f"--data_dir={tiny_data}", "--img_size=32", "--device=cpu", "--num_workers=0"]
    scripts = [["train_md.py", "--model=nano/4", f"--teacher={path}", f"--out_dir={tmp_path / 'md'}"],
               ["finetune.py", f"--init={path}", f"--out_dir={tmp_path / 'ft'}"]]
    for args in scripts:
        result = forkserver.run([sys.executable, *args, *common], capture_output=True, text=True, cwd=ROOT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and "depth='six', expected int" in last, last


@pytest.mark.parametrize("field, value, expected", [
    ("patch_size", 0, "patch_size=0, expected 1..img_size (32)"),  # was a ZeroDivisionError
    ("num_classes", -1, "num_classes=-1, expected >= 0 (0: no head)"),  # a RuntimeError
    ("mean", [0.5, 0.5], "mean=[0.5, 0.5], expected 3 finite numbers (R, G, B)"),  # a shape error
    ("std", [0.0, 0.0, 0.0], "std=[0.0, 0.0, 0.0], expected 3 positive numbers (R, G, B)"),  # NaN outputs
    ("act", "relu", "act='relu', expected 'gelu' or 'quick_gelu'"),  # exact GELU, silently
    ("rel_pos", "layers", "rel_pos='layers', expected 'none' or 'shared' or 'layer'"),  # 'none', silently
    ("num_heads", 5, "num_heads=5, expected a divisor of embed_dim (48)"),  # a view error in the forward
])
def test_model_args_out_of_range_is_one_line(field, value, expected, tmp_path, tiny_teacher):
    obj = torch.load(tiny_teacher, weights_only=True)
    obj["model_args"][field] = value
    torch.save(obj, tmp_path / "bad.pt")
    message = f"'{tmp_path / 'bad.pt'}' has model_args model.py's ViT does not take: {expected}"
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        load_model(str(tmp_path / "bad.pt"))


def test_export_of_a_folder_says_it_is_a_folder(tmp_path):
    from teacher import main
    message = f"'{tmp_path}' is a folder, not a checkpoint file: give a file in it, like {tmp_path / 'ckpt.pt'}"
    with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}$"):
        main(["export", str(tmp_path), str(tmp_path / "out.pt")])
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_teacher(str(tmp_path))
    assert os.listdir(tmp_path) == []
    # a train_vqkd.py run's folder: its file is the example
    (tmp_path / "tokenizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError,
                       match=re.escape(f"give a file in it, like {tmp_path / 'tokenizer.pt'}")):
        load_teacher(str(tmp_path))


def test_export_to_a_folder_that_is_not_there_is_one_line(tmp_path, tiny_teacher):
    from teacher import main
    with pytest.raises(SystemExit, match="error: no folder '.*nowhere' to write"):
        main(["export", tiny_teacher, str(tmp_path / "nowhere" / "teacher.pt")])
    assert not (tmp_path / "nowhere").exists()


def test_export_never_writes_over_its_source_or_a_training_checkpoint(tmp_path, tiny_teacher):
    """`teacher.py export out/md/ckpt.pt out/md/ckpt.pt` replaced the run's checkpoint with bare weights
    (no optimizer: --resume refused it); a plain export over an older export is still allowed"""
    from teacher import main
    run = tmp_path / "ckpt.pt"  # a training checkpoint: weights and the optimizer state --resume reads
    obj = torch.load(tiny_teacher, weights_only=True)
    torch.save(dict(obj, optimizer={"state": {}, "param_groups": []}, iter_num=3), run)
    saved = run.read_bytes()
    with pytest.raises(SystemExit, match=f"^error: '{re.escape(str(run))}' is the file being exported"):
        main(["export", str(run), str(run)])
    with pytest.raises(SystemExit, match=f"^error: '{re.escape(str(run))}' is a run's training checkpoint"):
        main(["export", tiny_teacher, str(run), "--format=timm"])
    assert run.read_bytes() == saved
    main(["export", str(run), str(tmp_path / "export.pt")])
    main(["export", tiny_teacher, str(tmp_path / "export.pt")])  # an export is no training checkpoint
    assert "optimizer" not in torch.load(tmp_path / "export.pt", weights_only=True)


def test_download_checks_the_hash_and_writes_atomically(tmp_path, monkeypatch):
    """download() over a file:// URL (no network): the right SHA-256 passes, a wrong one
    removes the file"""
    import hashlib
    import urllib.request
    import common
    # file:// only, here
    monkeypatch.setattr(urllib.request, "urlopen", urllib.request.build_opener().open)
    payload = os.urandom(3000)
    src = tmp_path / "weights.pth"
    src.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    path = common.download(src.as_uri(), sha[:8], cache_dir=str(tmp_path / "cache"))
    assert open(path, "rb").read() == payload
    assert not os.path.exists(path + ".part")
    # cached: not fetched again
    assert common.download(src.as_uri(), sha, cache_dir=str(tmp_path / "cache")) == path
    with pytest.raises(CheckpointError, match="expected 00000000"):
        common.download(src.as_uri(), "00000000", cache_dir=str(tmp_path / "other"))
    assert os.listdir(tmp_path / "other") == ["weights.pth.lock"]  # no file, no partial file
    # a URL that cannot be fetched (here: no such file; offline: no such host) is one line
    with pytest.raises(CheckpointError, match="could not download .*missing.pth.*instead of the name"):
        common.download((tmp_path / "missing.pth").as_uri(), cache_dir=str(tmp_path / "third"))
    with pytest.raises(CheckpointError, match="fetch the file elsewhere and give it with --archive=$"):
        common.download((tmp_path / "missing.pth").as_uri(), cache_dir=str(tmp_path / "third"),
                        instead="give it with --archive=")
    assert os.listdir(tmp_path / "third") == ["missing.pth.lock"]



def test_processes_that_start_together_download_once(tmp_path):
    """torchrun's ranks all load the teacher at once: one process downloads, the others wait for it
    and read its file (before: each fetched its own copy into the same .part file, and all but the
    first failed at the rename with a traceback). Four real processes, released together once all
    have imported, against a local HTTP server that sends the file slowly and counts the requests."""
    import http.server
    import threading
    payload = os.urandom(1 << 20)
    requests = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            for start in range(0, len(payload), 1 << 17):  # 8 pieces, 0.1 s apart
                self.wfile.write(payload[start:start + (1 << 17)])
                self.wfile.flush()
                threading.Event().wait(0.1)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ViT-B-16.pt"
    cache, gate = tmp_path / "cache", tmp_path / "gate"
    gate.mkdir()
    script = ("import os, sys, time; import common\n"  # each marks itself ready, then waits for all
              "open(os.path.join(sys.argv[2], sys.argv[3]), 'w').close()\n"
              "while len(os.listdir(sys.argv[2])) < 4: time.sleep(0.01)\n"
              "print(common.download(sys.argv[1], cache_dir=sys.argv[4]))\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    procs = [forkserver.Popen([sys.executable, "-c", script, url, str(gate), str(i), str(cache)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    server.shutdown()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == str(cache / "ViT-B-16.pt")
    assert len(requests) == 1
    assert (cache / "ViT-B-16.pt").read_bytes() == payload
    assert sorted(os.listdir(cache)) == ["ViT-B-16.pt", "ViT-B-16.pt.lock"]

def test_a_cut_or_stalled_download_is_one_line_and_leaves_nothing_in_the_cache(tmp_path,
                                                                                monkeypatch):
    """A real local HTTP server. It says 1 MiB and sends 200 kB, then closes (before: the cut file
    was
    kept as the download of a teacher without a published hash, DINO's, and every later run failed
    on
    it), or sends 100 bytes and then nothing (before: no timeout, the run waited forever); then it
    sends the whole file, which the next call fetches."""
    import http.server
    import threading
    import urllib.request
    import common
    # loopback only, here
    monkeypatch.setattr(urllib.request, "urlopen", urllib.request.build_opener().open)
    payload = os.urandom(1 << 20)
    mode, release = ["cut"], threading.Event()

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if mode[0] == "cut":
                self.wfile.write(payload[:200_000])
            elif mode[0] == "stall":
                self.wfile.write(payload[:100])
                self.wfile.flush()
                release.wait(60)
            else:
                self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dino_vitbase16_pretrain.pth"
    cache = tmp_path / "cache"
    try:
        with pytest.raises(CheckpointError, match=r"could not download .* \(the connection ended "
                                                  r"after 200000 "
                                                  r"of 1048576 bytes\): fetch the file elsewhere"):
            common.download(url, None, str(cache))
        assert os.listdir(cache) == ["dino_vitbase16_pretrain.pth.lock"]
        mode[0] = "stall"
        monkeypatch.setattr(common, "DOWNLOAD_TIMEOUT", 1)  # the server waits 60 s
        with pytest.raises(CheckpointError, match=r"could not download .* \(timed out\)"):
            common.download(url, None, str(cache))
        release.set()
        assert os.listdir(cache) == ["dino_vitbase16_pretrain.pth.lock"]
        mode[0] = "whole"
        assert open(common.download(url, None, str(cache)), "rb").read() == payload
    finally:
        release.set()
        server.shutdown()


class RunsCode:
    def __reduce__(self):
        return (open, (os.environ["MDLAB_PWNED"], "w"))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MDLAB_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    with pytest.raises(CheckpointError, match="not a plain-data checkpoint"):
        load_teacher(str(path))
    assert not marker.exists()


def test_shipped_embedded_teacher_is_far_better_than_chance():
    """data/embedded_teacher.pt on the held-out val split of the embedded dataset
    (6 classes: chance 16.7%)."""
    from data import EvalTransform, ImageFolder, collate
    from data.embedded import ensure_embedded
    vit, info = load_model("embedded")
    assert info["kind"] == "project" and vit.config.num_classes == 6
    val = ImageFolder(os.path.join(ensure_embedded(), "val"), EvalTransform(32))
    loader = torch.utils.data.DataLoader(val, batch_size=200, collate_fn=collate)
    correct = 0
    with torch.no_grad():
        for images, labels, _, _ in loader:
            correct += (vit(images).argmax(-1) == labels).sum().item()
    assert correct / len(val) > 0.8
    # as an MD teacher it gives (B, 65, 96) tokens for 32 px images
    assert load_teacher("embedded")(torch.rand(2, 3, 32, 32)).shape == (2, 65, 96)


def test_export_that_cannot_be_written_keeps_the_older_file_and_is_one_line(tmp_path, tiny_teacher):
    """export writes atomically: a write cut short by a full disk (here a 100 kB file-size limit, so the write
    fails with EFBIG) onto an older export leaves that file whole and no temp file; DST a folder: one line too"""
    import resource
    import shutil
    src, older = str(tmp_path / "src.pt"), str(tmp_path / "older.pt")
    shutil.copy(tiny_teacher, src)
    shutil.copy(tiny_teacher, older)
    before = open(older, "rb").read()
    assert len(before) > 100_000

    def export(dst, limit=False):
        return forkserver.run([sys.executable, os.path.join(ROOT, "teacher.py"), "export", src, dst],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)))
                              if limit else None)
    for dst, limit, expected in ((older, True, "File too large"), (str(tmp_path), False, "is a folder")):
        r = export(dst, limit)
        assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
        assert r.stderr.startswith("error:") and expected in r.stderr, r.stderr
        assert open(older, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["older.pt", "src.pt"]
    load_model(older)


def test_class_names_that_do_not_name_the_head_are_one_line(tmp_path):
    """finetune.py saves one class name per output of the head; a checkpoint whose names are more or
    fewer than its outputs, name one class twice, or are not names is refused when read (before:
    analyze.py's hessian, landscape and shape_bias ended in an IndexError deep inside)"""
    model = ViT(ViTConfig.from_name("nano/4", num_classes=4))
    path = tmp_path / "ft.pt"
    names = ["cat", "dog", "owl", "yak"]
    for classes, message in ((names + ["emu", "fox"], "names 6 classes but its head has 4 outputs"),
                             (names[:3], "names 3 classes but its head has 4 outputs"),
                             (["cat", "dog", "cat", "yak"], "names the class 'cat' twice"),
                             ("cat dog owl yak", "has class names this version cannot read: a str"),
                             ([0, 1, 2, 3], "has class names this version cannot read: a list")):
        torch.save(dict(model=model.state_dict(), model_args=model.config.to_dict(), classes=classes), path)
        with pytest.raises(CheckpointError) as error:
            load_model(str(path))
        assert str(error.value).startswith(f"'{path}' {message}"), str(error.value)
    torch.save(dict(model=model.state_dict(), model_args=model.config.to_dict(), classes=names), path)
    assert load_model(str(path))[1]["classes"] == names
