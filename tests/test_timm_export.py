"""Models to and from timm: teacher.py's export loads into timm's `beit` / `vision_transformer`
models with no missing or unexpected keys and computes what our ViT computes; timm's `beit` files
(as timm stores them, and microsoft/unilm's pretraining files) load here exactly. timm is the
independent truth: its own classes, its own strict loading."""
import os
import sys

import pytest
import torch

from model import RelativePositionBias, ViT, ViTConfig
from teacher import export_timm, load_model, load_teacher, main

from tests import forkserver

timm = pytest.importorskip("timm", reason="pip install -r requirements-dev.txt")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=2)  # nano/4 in timm's words
MD_STUDENT = dict(abs_pos=False, rel_pos="shared", qkv_bias="qv", layer_scale=0.1, mask_token=True)
FINETUNED = dict(abs_pos=False, rel_pos="layer", qkv_bias="qv", layer_scale=0.1, num_classes=5)
CLIP = dict(patch_bias=False, act="quick_gelu", norm_eps=1e-5, pre_norm=True, global_pool="cls",
            mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))

BEIT, VIT = "beitv2_base_patch16_224", "vit_base_patch16_224"
# name -> (our config: nano/4 plus these options, the timm model it must become)
CASES = {
    "md_student": (MD_STUDENT, BEIT),  # train_md.py's student
    "finetuned_avg": (dict(FINETUNED, global_pool="avg"), BEIT),
    "finetuned_cls": (dict(FINETUNED, global_pool="cls"), BEIT),
    "beit_abs_pos": (dict(qkv_bias="qv", num_classes=5, global_pool="avg"), BEIT),
    "deit": (dict(num_classes=5, global_pool="cls"), VIT),
    "vit_layer_scale_avg": (dict(layer_scale=0.1, num_classes=5, global_pool="avg"), VIT),
    "clip": (CLIP, "vit_base_patch16_clip_quickgelu_224"),
}


def randomized(module, seed):
    """every float weight moved off its init (zero tables, unit norms, layer scales all random)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return module.eval()


def project_checkpoint(cfg, path, seed=0, **extra):
    vit = randomized(ViT(cfg), seed)
    torch.save(dict(model=vit.state_dict(), model_args=cfg.to_dict(), config={}, **extra), path)
    return vit


def normalized(images, cfg):
    """timm's models take normalized images; model.py's ViT normalizes inside"""
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (images - mean) / std


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_into_timm_and_computes_the_same(case, tmp_path):
    options, expected_arch = CASES[case]
    cfg = ViTConfig.from_name("nano/4", **options)
    src, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pth")
    vit = project_checkpoint(cfg, src)
    arch, kwargs, _ = export_timm(src, out)
    assert arch == expected_arch
    saved = torch.load(out, weights_only=True)
    assert saved["arch"] == arch and saved["timm_kwargs"] == kwargs
    # as a user loads it: timm's own load_checkpoint (strict)
    ref = timm.create_model(arch, pretrained=False, checkpoint_path=out, **kwargs).eval()
    missing, unexpected = ref.load_state_dict(saved["state_dict"], strict=False)
    assert missing == [] and unexpected == []
    x = normalized(IMAGES, cfg)
    with torch.no_grad():
        assert max_diff(vit.forward_features(IMAGES), ref.forward_features(x)) <= 1e-5
        ours, theirs = vit(IMAGES), ref(x)  # logits, or all tokens for a model without head
        assert ours.shape == theirs.shape and max_diff(ours, theirs) <= 1e-5


def test_quick_gelu_vit_without_pre_norm_exports_to_timms_quick_gelu(tmp_path):
    """A QuickGELU ViT without CLIP's pre-norm goes to timm's vision_transformer with
    act_layer='quick_gelu': timm's own QuickGELU computes our logits and features (exact GELU
    would not: checked on the same weights)"""
    cfg = ViTConfig.from_name("nano/4", act="quick_gelu", num_classes=5, global_pool="cls")
    src, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pth")
    vit = project_checkpoint(cfg, src, seed=5)
    arch, kwargs, _ = export_timm(src, out)
    ref = timm.create_model(arch, pretrained=False, checkpoint_path=out, **kwargs).eval()
    gelu = timm.create_model(arch, pretrained=False, checkpoint_path=out,
                             **dict(kwargs, act_layer="gelu")).eval()
    x = normalized(IMAGES, cfg)
    with torch.no_grad():
        assert max_diff(vit.forward_features(IMAGES), ref.forward_features(x)) <= 1e-5
        assert max_diff(vit(IMAGES), ref(x)) <= 1e-5
        assert max_diff(vit(IMAGES), gelu(x)) > 1e-4


@pytest.mark.parametrize("case", ["md_student", "finetuned_avg", "deit", "clip"])
def test_round_trip_ours_timm_ours_is_bit_identical(case, tmp_path):
    cfg = ViTConfig.from_name("nano/4", **CASES[case][0])
    classes = [f"class {i}" for i in range(cfg.num_classes)]
    vit = project_checkpoint(cfg, tmp_path / "ckpt.pt", seed=1, classes=classes)
    export_timm(str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pth"))
    back, info = load_model(str(tmp_path / "out.pth"))
    assert back.config == cfg and info["classes"] == (classes or None)
    original, returned = vit.state_dict(), back.state_dict()
    assert list(returned) == list(original)  # the mask token included
    assert all(torch.equal(returned[k], original[k]) for k in original)
    # and on to a project checkpoint again
    main(["export", "--format=mdlab", str(tmp_path / "out.pth"), str(tmp_path / "back.pt")])
    again = torch.load(tmp_path / "back.pt", weights_only=True)
    assert again["model_args"] == cfg.to_dict()
    assert all(torch.equal(again["model"][k], original[k]) for k in original)


@pytest.mark.parametrize("preset, case", [("tiny/4", "deit"), ("nano/4", "deit"), ("tiny/4", "beit_abs_pos")])
def test_export_resaved_by_timm_loads_with_its_heads(preset, case, tmp_path, capsys):
    """export, loaded by timm as the printed call does, saved again as timm's bare state dict: the
    file no longer says the heads (tiny/4: 96 wide, 3 heads; nano/4: 48 wide, 2), which come from
    KNOWN_HEADS, not embed_dim / 64"""
    cfg = ViTConfig.from_name(preset, **CASES[case][0])
    vit = project_checkpoint(cfg, tmp_path / "ckpt.pt", seed=2)
    export_timm(str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pth"))
    d = torch.load(tmp_path / "out.pth", weights_only=True)
    tm = timm.create_model(d["arch"], checkpoint_path=str(tmp_path / "out.pth"), **d["timm_kwargs"]).eval()
    torch.save(tm.state_dict(), tmp_path / "bare.pth")
    back, _ = load_model(str(tmp_path / "bare.pth"))
    assert back.config.num_heads == cfg.num_heads and capsys.readouterr().err == ""
    with torch.no_grad():
        assert max_diff(back(IMAGES), vit(IMAGES)) <= 1e-5
        assert max_diff(back(IMAGES), tm(normalized(IMAGES, cfg))) <= 1e-5


def test_relative_position_index_is_timms():
    from timm.models.beit import gen_relative_position_index
    for grid in (2, 4, 7):
        theirs = gen_relative_position_index((grid, grid))
        assert torch.equal(RelativePositionBias(grid, 1).index, theirs)


def timm_beit(seed, **kwargs):
    return randomized(timm.create_model(BEIT, pretrained=False, **TINY, **kwargs), seed)


@pytest.mark.parametrize("wrapper", ["plain", "module"])
def test_timms_beit_v2_file_loads_exactly(wrapper, tmp_path):
    """timm's BEiT v2 weights are fine-tuned ones: per-layer tables, mean pooling into fc_norm
    (no final norm), a head; the hub stores a plain state dict, BEiT v2's own fine-tuned files
    {"module": ...} (timm's beit checkpoint_filter_fn unwraps both)"""
    ref = timm_beit(2, num_classes=5)
    sd = ref.state_dict()
    torch.save(sd if wrapper == "plain" else {"module": sd}, tmp_path / "beitv2.pth")
    vit, info = load_model(str(tmp_path / "beitv2.pth"))
    cfg = vit.config
    assert info["kind"] == "beit"
    assert (cfg.rel_pos, cfg.global_pool, cfg.num_heads) == ("layer", "avg", 2)
    x = normalized(IMAGES, cfg)
    with torch.no_grad():
        assert max_diff(vit(IMAGES), ref(x)) <= 1e-5
        tokens = load_teacher(str(tmp_path / "beitv2.pth"))(IMAGES)  # as --teacher= takes it
        assert max_diff(tokens, ref.forward_features(x)) <= 1e-5
    # and back: the same keys and values timm wrote
    arch, kwargs, _ = export_timm(str(tmp_path / "beitv2.pth"), str(tmp_path / "again.pth"))
    again = torch.load(tmp_path / "again.pth", weights_only=True)["state_dict"]
    assert arch == "beitv2_base_patch16_224" and sorted(again) == sorted(sd)
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    timm.create_model(arch, pretrained=False, checkpoint_path=str(tmp_path / "again.pth"), **kwargs)


def test_unilm_beit_v2_pretraining_file_loads_exactly(tmp_path):
    """microsoft/unilm beit2's pretraining checkpoint: {"model": ...} with a shared table, the
    mask token, the relative position index buffer and pretraining heads beside the encoder"""
    ref = timm_beit(3, num_classes=0, global_pool="", use_rel_pos_bias=False,
                    use_shared_rel_pos_bias=True)
    g = torch.Generator().manual_seed(4)
    sd = dict(ref.state_dict())
    sd["mask_token"] = torch.randn(1, 1, 48, generator=g)
    sd["rel_pos_bias.relative_position_index"] = ref.rel_pos_bias.relative_position_index
    sd["lm_head.weight"] = torch.randn(16, 48, generator=g)
    sd["lm_head.bias"] = torch.randn(16, generator=g)
    sd["cls_pt_layers.0.mlp.fc1.weight"] = torch.randn(192, 48, generator=g)
    torch.save({"model": sd, "epoch": 299}, tmp_path / "beitv2_pt.pth")
    vit, _ = load_model(str(tmp_path / "beitv2_pt.pth"))
    cfg = vit.config
    assert (cfg.rel_pos, cfg.abs_pos, cfg.qkv_bias, cfg.num_heads) == ("shared", False, "qv", 2)
    assert torch.equal(vit.mask_token, sd["mask_token"])
    with torch.no_grad():
        expected = ref.forward_features(normalized(IMAGES, cfg))
        assert max_diff(vit.forward_features(IMAGES), expected) <= 1e-5


@pytest.mark.parametrize("options, option", [
    (dict(FINETUNED, global_pool="mean"), "global_pool='mean'"),  # the final norm and fc_norm
    (dict(rel_pos="layer"), "qkv_bias='all'"),  # a k bias beside relative position bias
    (dict(MD_STUDENT, act="quick_gelu"), "act='quick_gelu'"),
    (dict(patch_bias=False), "patch_bias=False"),  # CLIP's bias-free patches without its ln_pre
])
def test_model_without_timm_equivalent_is_one_line_naming_the_option(options, option, tmp_path):
    project_checkpoint(ViTConfig.from_name("nano/4", **options), tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        main(["export", "--format=timm", str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pth")])
    message = str(e.value)
    assert message.startswith("error: ") and "has no timm equivalent" in message
    assert option in message
    assert "\n" not in message and not (tmp_path / "out.pth").exists()


def test_unknown_format_is_one_line(tmp_path):
    project_checkpoint(ViTConfig.from_name("nano/4"), tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        main(["export", "--format=onnx", str(tmp_path / "ckpt.pt"), str(tmp_path / "out.onnx")])
    assert str(e.value) == "error: unknown --format 'onnx': choose mdlab or timm"
    assert not (tmp_path / "out.onnx").exists()


def test_format_given_after_a_space(tmp_path):
    """--format timm as --format=timm; --format with nothing after it is one line"""
    project_checkpoint(ViTConfig.from_name("nano/4"), tmp_path / "ckpt.pt")
    main(["export", "--format", "timm", str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pth")])
    assert torch.load(tmp_path / "out.pth", weights_only=True)["arch"] == VIT
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "ckpt.pt"), str(tmp_path / "again.pth"), "--format"])
    assert str(e.value).startswith("error: option '--format' needs a value; usage: python teacher.py export")
    assert not (tmp_path / "again.pth").exists()


def test_export_takes_a_teacher_name(tmp_path):
    """`teacher.py export embedded DST`: a name, as everywhere a model is taken (before: "checkpoint
    'embedded' not found", also for --act=foo); the shipped teacher's entries are kept as they are"""
    from teacher import EMBEDDED_TEACHER
    main(["export", "embedded", str(tmp_path / "t.pt")])
    shipped = torch.load(EMBEDDED_TEACHER, weights_only=True)
    exported = torch.load(tmp_path / "t.pt", weights_only=True)
    assert set(exported) == {k for k in shipped if k in ("model", "model_args", "vqkd_args", "config", "classes")}
    for k, v in shipped["model"].items():
        assert torch.equal(exported["model"][k], v), k
    with pytest.raises(SystemExit) as e:
        main(["export", "--act=foo", "embedded", str(tmp_path / "u.pt")])
    assert str(e.value) == "error: unknown activation 'foo' for a CLIP-layout file: choose quick_gelu or gelu"
    with pytest.raises(SystemExit) as e:
        main(["export", "embedded", EMBEDDED_TEACHER])
    assert str(e.value).startswith(f"error: '{EMBEDDED_TEACHER}' is the file being exported")


@pytest.mark.parametrize("argv, message", [
    ([], "error: no command given: the command is export; usage: python teacher.py export"),
    (["exprt", "a", "b"], "error: 'exprt' is no command: the command is export; usage: python teacher.py export"),
    (["export", "embedded"], "error: export takes two paths, SRC and DST; got 1; usage: python teacher.py export"),
])
def test_usage_errors_are_error_lines(argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert str(e.value).startswith(message)


def test_command_line_prints_a_create_model_call_that_loads(tmp_path):
    cfg = ViTConfig.from_name("nano/4", **MD_STUDENT)
    vit = project_checkpoint(cfg, tmp_path / "ckpt.pt")
    out = str(tmp_path / "md.pth")
    cmd = [sys.executable, os.path.join(ROOT, "teacher.py"), "export", "--format=timm",
           str(tmp_path / "ckpt.pt"), out]
    result = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    call = next(line.strip() for line in result.stdout.splitlines() if "timm.create_model(" in line)
    ref = eval(call, {"timm": timm}).eval()  # the printed command, as printed
    with torch.no_grad():
        expected = ref.forward_features(normalized(IMAGES, cfg))
        assert max_diff(vit.forward_features(IMAGES), expected) <= 1e-5


@pytest.mark.slow
def test_finetune_init_from_timms_beit_file(tiny_data, tmp_path):
    """--init= takes timm's layout; with lr 0 the run's weights are the file's, converted exactly"""
    sd = timm_beit(5, num_classes=1000).state_dict()
    torch.save(sd, tmp_path / "beitv2.pth")
    cmd = [sys.executable, os.path.join(ROOT, "finetune.py"), f"--data_dir={tiny_data}",
           f"--init={tmp_path / 'beitv2.pth'}", "--img_size=32", "--lr=0", "--stop_iter=1",
           "--epochs=2", "--warmup_epochs=1",
           "--total_batch_size=8", "--micro_batch_size=8", "--num_workers=0", "--device=cpu",
           "--dtype=float32", "--compile=False", f"--out_dir={tmp_path / 'ft'}"]
    result = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    tuned = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert tuned["model_args"]["global_pool"] == "avg"
    for k in ("blocks.1.attn.qkv.weight", "blocks.1.attn.q_bias", "blocks.0.gamma_2",
              "patch_embed.proj.bias"):
        assert torch.equal(tuned["model"][k], sd[k]), k
    table = "blocks.1.attn.relative_position_bias_table"
    assert torch.equal(tuned["model"][table.replace(".attn.", ".attn.rel_pos.")], sd[table])
