"""common.py's leaf helpers, each against an independent truth: a closed form, a hand-written value,
or the reference library's own result."""
import hashlib
import json
import os
import urllib.request

import pytest
import torch

import common
from common import (Meter, accumulation_steps, apply_overrides, derived_seed, parse_value,
                    read_safetensors, read_torchscript, refuse_changed_split, resume_checkpoint,
                    schedule_lengths)


def test_parse_value_gives_the_defaults_type():
    """hand-written: booleans as true/false/1/0 in any case, an int for a float default becomes a
    float, a string stays as typed, and a value of another type is refused"""
    assert [parse_value(s, False) for s in ("1", "True", "TRUE", "true")] == [True] * 4
    assert [parse_value(s, True) for s in ("0", "False", "false")] == [False] * 3
    value = parse_value("3", 0.5)
    assert value == 3.0 and type(value) is float
    assert parse_value("7", 1) == 7 and parse_value("1e-3", 0.5) == 0.001
    assert parse_value("~/x", "") == "~/x"
    for raw, default in (("yes", False), ("1.5", 1), ("'a'", 1.0)):
        with pytest.raises(ValueError):
            parse_value(raw, default)


def test_a_config_file_int_becomes_the_float_default_and_a_tilde_is_home(tmp_path):
    """hand-written: `lr = 1` in a config file gives the float 1.0; --out_dir=~/runs and --out_dir=~
    are os.path.expanduser's paths; a str setting given an int in a file is refused"""
    cfg = tmp_path / "c.py"
    cfg.write_text("lr = 1\n")
    config = dict(lr=0.5, out_dir="out", epochs=2)
    settings = apply_overrides(config, [str(cfg), "--out_dir=~/runs"])
    assert settings == dict(lr=1.0, out_dir=os.path.join(os.path.expanduser("~"), "runs"), epochs=2)
    assert type(settings["lr"]) is float
    assert apply_overrides(dict(out_dir="out"), ["--out_dir=~"])["out_dir"] == os.path.expanduser("~")
    cfg.write_text("out_dir = 3\n")
    with pytest.raises(SystemExit, match="'out_dir' must be str, got 3"):
        apply_overrides(dict(out_dir="out"), [str(cfg)])


def test_a_folder_given_as_config_file_is_named_as_a_folder(tmp_path):
    """a real folder where a config file is expected: said to be a folder, with a .py file of it
    as the example (before: 'not found', though the path exists)"""
    (tmp_path / "b.py").write_text("lr = 2.0\n")
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(SystemExit) as e:
        apply_overrides(dict(lr=1.0), [str(tmp_path)])
    assert str(e.value) == (f"error: config file '{tmp_path}' is a folder: give a file in it, like "
                            f"{tmp_path / 'b.py'} (options are --key=value)")


def test_resume_refuses_exactly_the_changed_settings_outside_may_change(tmp_path):
    """hand-written: a change of a setting in may_change, or of one the checkpoint does not hold, is
    allowed; a change of any other setting is refused and named old -> new"""
    path = str(tmp_path / "ckpt.pt")
    torch.save(dict(config=dict(lr=0.1, epochs=4, seed=0), iter_num=3, optimizer={}), path)
    ckpt = resume_checkpoint(path, dict(lr=0.1, epochs=4, seed=0, new=1, stop_iter=9), {"stop_iter"})
    assert ckpt["iter_num"] == 3
    resume_checkpoint(path, dict(lr=0.1, epochs=4, seed=1), {"seed"})
    with pytest.raises(SystemExit, match=r"settings that change the run: epochs 4 -> 5, seed 0 -> 1; "):
        resume_checkpoint(path, dict(lr=0.1, epochs=5, seed=1), {"lr"})


class Split:
    def __init__(self, n, classes):
        self.n, self.classes = n, classes

    def __len__(self):
        return self.n


@pytest.mark.parametrize("images", [9, 11])
def test_resume_refuses_a_train_split_with_fewer_or_more_images(images):
    """hand-written: 10 images at the start, 9 or 11 now: refused, both counts named; the same
    classes in another order are renamed labels"""
    ckpt = dict(train_split=dict(images=10, classes=["a", "b"]))
    refuse_changed_split(ckpt, Split(10, ["a", "b"]), "train")
    with pytest.raises(SystemExit, match=f"10 images -> {images} \\(the schedule would change\\)"):
        refuse_changed_split(ckpt, Split(images, ["a", "b"]), "train")
    with pytest.raises(SystemExit, match=r"class folders changed \(renamed: the labels would"):
        refuse_changed_split(ckpt, Split(10, ["b", "a"]), "train")


def test_download_checks_the_whole_sha256_not_just_its_start(tmp_path, monkeypatch):
    """hashlib's SHA-256 of the bytes: a full expected hash that shares its first 16 hex digits with
    the file's but differs later is refused (a prefix is a check only as long as it is given)"""
    monkeypatch.setattr(urllib.request, "urlopen", urllib.request.build_opener().open)  # file:// only
    payload = b"weights" * 100
    src = tmp_path / "w.pth"
    src.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    wrong = sha[:16] + ("0" if sha[16] != "0" else "1") + sha[17:]
    with pytest.raises(common.CheckpointError, match=f"expected {wrong}"):
        common.download(src.as_uri(), wrong, cache_dir=str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache" / "w.pth")
    path = common.download(src.as_uri(), sha, cache_dir=str(tmp_path / "cache"))
    assert open(path, "rb").read() == payload


def test_accumulation_steps_is_total_over_micro_times_world():
    """closed form: accum = total / (micro x world), and a total that is no multiple is refused"""
    assert accumulation_steps(512, 64, 1) == 8
    assert accumulation_steps(512, 64, 4) == 2
    assert accumulation_steps(96, 8, 3) == 4
    with pytest.raises(SystemExit, match="not divisible by micro_batch_size x world size = 64 x 3"):
        accumulation_steps(512, 64, 3)
    # the largest micro-batch m <= 128 with 128 % (2 m) == 0 is 64 (a config's batch on 2 processes)
    with pytest.raises(SystemExit, match=r"multiple of 256, or keep it with --micro_batch_size=64$"):
        accumulation_steps(128, 128, 2)
    # 512 = 2^9 is no multiple of 3 m for any m: no micro-batch keeps it
    with pytest.raises(SystemExit, match=r"choose a multiple of 192$"):
        accumulation_steps(512, 64, 3)


def test_meter_leaves_out_the_time_of_other_work():
    """an interval of 10 s of which 9.5 s went to an evaluation: 0.5 s over 5 iterations is 100
    ms/iter and 64 images / 0.5 s = 128 img/s (the calls between add milliseconds, not seconds)"""
    meter = Meter(flops_per_image=1.0, peak=None)
    meter.t0 -= 10.0
    meter.leave_out(9.5)
    _, numbers = meter.read(5, 64)
    assert 100 <= numbers["ms_per_iter"] < 150 and 85 < numbers["img_per_s"] <= 128


def test_schedule_lengths_closed_form_and_stop_iter_past_the_end():
    """closed form: 100 images per process, micro 8, accum 2: 100 // 16 = 6 steps per epoch, 3
    epochs = 18, 1 warmup epoch = 6; a stop_iter past the end stops at the end"""
    sampler = list(range(100))
    assert schedule_lengths(sampler, 8, 2, 3, 1, 0) == (6, 18, 6, 18)
    assert schedule_lengths(sampler, 8, 2, 3, 1, 5) == (6, 18, 6, 5)
    assert schedule_lengths(sampler, 8, 2, 3, 1, 100) == (6, 18, 6, 18)
    with pytest.raises(SystemExit, match="fewer than one optimizer step"):
        schedule_lengths(list(range(15)), 8, 2, 3, 1, 0)


def test_derived_seed_is_the_first_8_bytes_of_the_sha256_of_the_comma_joined_keys():
    """closed form from hashlib: sha256(b"1,23")[:8] little-endian; (1, 23) and (12, 3) differ"""
    expected = int.from_bytes(hashlib.sha256(b"1,23").digest()[:8], "little")
    assert derived_seed(1, 23) == expected
    assert derived_seed(12, 3) != derived_seed(1, 23)
    assert derived_seed(1, 2, 3) != derived_seed(12, 3) != derived_seed(123)


def test_meter_arithmetic_over_a_known_interval():
    """closed form: 4 iterations (10 -> 14) and 80 images in 2 s: 500 ms/iter, 40 img/s, and at
    2e9 FLOP per image on 2 devices of 1e12 FLOP/s, 40 * 2e9 / 2e12 = 4% MFU"""
    meter = Meter(flops_per_image=2e9, peak=1e12, iter_num=10, processes=2)
    meter.t0 -= 2.0
    _, numbers = meter.read(14, 80)
    assert numbers["ms_per_iter"] == pytest.approx(500, rel=1e-2)
    assert numbers["img_per_s"] == pytest.approx(40, rel=1e-2)
    assert numbers["mfu"] == pytest.approx(4.0, rel=1e-2)


def test_normalization_constants_are_the_published_ones():
    """hand-written: ImageNet's as torchvision's weights' transforms and timm's IMAGENET_DEFAULT_*
    give them; CLIP's as OpenAI's clip.py (_transform) gives them"""
    from model import IMAGENET_MEAN, IMAGENET_STD
    from teacher import CLIP_MEAN, CLIP_STD
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("shape, span", [([1], 8), ([0], 4)])
def test_safetensors_offsets_wider_than_the_tensor_are_refused(tmp_path, shape, span):
    """safetensors' own load_file refuses these files ("invalid shape, data type, or offset"): an F32
    tensor of shape [1] over 8 bytes, and an empty one over 4 bytes (before: read as an empty tensor)"""
    header = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, span]}}).encode()
    path = tmp_path / "wide.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(span))
    load_file = pytest.importorskip("safetensors.torch").load_file
    with pytest.raises(Exception, match="invalid shape, data type, or offset"):
        load_file(str(path))
    with pytest.raises(ValueError, match=r"a: data_offsets \[0, %d\] do not hold a F32 tensor" % span):
        read_safetensors(str(path))


class Views(torch.nn.Module):
    """buffers that are views into one storage at offsets 0, 3 and 5 (a slice of a slice)"""

    def __init__(self):
        super().__init__()
        whole = torch.arange(12.0)
        self.register_buffer("whole", whole)
        self.register_buffer("tail", whole[3:])
        self.register_buffer("grid", whole[5:11].view(2, 3))


def test_torchscript_views_at_an_offset_read_as_torch_jit_load_reads_them(tmp_path):
    """torch.jit.load's own state_dict of an archive whose tensors share one storage: the views
    start at their offsets (3 and 5), not at the storage's start"""
    path = str(tmp_path / "views.pt")
    torch.jit.save(torch.jit.script(Views()), path)
    truth = torch.jit.load(path).state_dict()
    assert truth["tail"][0] == 3 and truth["grid"][0, 0] == 5  # the reference itself
    ours = read_torchscript(path)
    assert list(ours) == list(truth)
    for k in truth:
        assert torch.equal(ours[k], truth[k]), k
