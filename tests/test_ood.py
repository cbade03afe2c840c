"""analyze.py --metric ood and shape_bias as model-vs-human computes them, on its real files.

tests/fixtures/model-vs-human (verbatim from bethgelab/model-vs-human, MIT): the human CSVs of two
of the 17 datasets, torchvision ResNet-50's trials written by the benchmark's own evaluation code,
and in expected.json the numbers the benchmark's code gives for those trials."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from analyze import (IMAGENET_16, condition_key, human_trials, ood_scores, ood_summary,
                     short_image_name)
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "model-vs-human")
DATASETS = ("colour", "eidolonIII")
EXPECTED = json.load(open(os.path.join(FIXTURE, "expected.json")))
CATEGORIES = sorted(IMAGENET_16)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def resnet50_csv(dataset):
    return os.path.join(FIXTURE, "model-raw-data", dataset, f"{dataset}_resnet50_session-1.csv")


def human_rows(dataset):
    folder = os.path.join(FIXTURE, "raw-data", dataset)
    return [row for f in sorted(os.listdir(folder)) for row in read_csv(os.path.join(folder, f))]


def run_analyze(args):
    command = [sys.executable, os.path.join(ROOT, "analyze.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_short_image_name_and_condition_as_model_vs_human():
    # the two checks at the end of modelvshuman/helper/plotting_helper.py
    assert short_image_name("0000_cl_s01_bw_boat_40_n02951358_5952.JPEG") == "n02951358_5952.JPEG"
    assert short_image_name("airplane1-bicycle2.png") == "airplane1-bicycle2.png"
    # one image as subject-01 and a model saw it (the fixture's README), a sketch, an edge image
    human = "0001_cl_s01_cr_oven_40_n04111531_14126.png"
    dnn = "0001_cl_dnn_cr_oven_40_n04111531_14126.png"
    assert short_image_name(human) == short_image_name(dnn) == "n04111531_14126.png"
    sketch = "0002_ske_s01_0_dog_00_dog-4581-sketch-16.png"
    assert short_image_name(sketch) == "dog-4581-sketch-16.png"
    assert short_image_name("edge/bear/bear10.png") == "bear10.png"
    # pandas reads a human CSV's '3' as the 3.0 of experiments.py
    assert condition_key("3") == condition_key("3.0") and condition_key("0.0") == condition_key("0")
    assert condition_key("cr") == "cr" and condition_key("True") == "True"
    assert condition_key("NaN") == "nan"


def test_fixture_gives_model_vs_humans_numbers():
    """ResNet-50's recorded decisions in, the benchmark's error consistency and accuracies out"""
    results = {}
    for dataset in DATASETS:
        rows = read_csv(resnet50_csv(dataset))
        columns = ("imagename", "condition", "category", "object_response")
        trials = [tuple(r[c] for c in columns) for r in rows]
        humans = human_trials(os.path.join(FIXTURE, "raw-data", dataset))
        r = results[dataset] = ood_scores(dataset, trials, humans)
        expected = EXPECTED[dataset]
        assert r["error_consistency"] == pytest.approx(expected["error_consistency"], abs=1e-9)
        assert r["accuracy"] == pytest.approx(expected["accuracy_benchmark_conditions"], abs=1e-9)
        assert r["accuracy_all_trials"] == pytest.approx(expected["accuracy_all_trials"], abs=1e-9)
        assert r["excluded_conditions"] == expected["excluded_conditions"]
        assert r["subjects"] == 4
        assert r["human_trials_matched"] == len(human_rows(dataset)) == 4 * 1280
        for condition, accuracy in r["accuracy_per_condition"].items():  # counted from the CSV
            hits = [x["object_response"] == x["category"] for x in rows
                    if x["condition"] == condition]
            assert len(hits) > 0 and accuracy == pytest.approx(np.mean(hits), abs=1e-12)
    summary = ood_summary(results)
    kappas = [EXPECTED[d]["error_consistency"] for d in DATASETS]
    accuracies = [EXPECTED[d]["accuracy_benchmark_conditions"] for d in DATASETS]
    assert summary["mean_error_consistency"] == pytest.approx(np.mean(kappas), abs=1e-9)
    assert summary["mean_accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-9)
    eidolon = [f"{2 ** k}-0-10" for k in range(8)]
    assert list(results["eidolonIII"]["accuracy_per_condition"]) == eidolon


# ----------------------------------------------------------------------------------------
# the command line on the real folder layout, with a checkpoint that decides what is drawn

def block(category, size):
    """where category k of the 16 (sorted) is drawn as a white 4x4 block: in a 4x4 grid filling a
    16 px image; at any other size along the top edge, at x = 4k"""
    y, x = divmod(CATEGORIES.index(category), 4) if size == 16 else (0, CATEGORIES.index(category))
    return slice(4 * y, 4 * y + 4), slice(4 * x, 4 * x + 4)


def draw(category, path, size=16):
    """a size x size image showing `category` as its white 4x4 block on black"""
    img = np.zeros((size, size, 3), np.uint8)
    img[block(category, size)] = 255
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path)


def stub_checkpoint(path, size=16):
    """an ImageNet-1k project checkpoint that decides the category drawn by draw(): one size x size
    patch, no blocks; embedding k sums block k, so after the norms it is largest at the drawn k;
    the head maps it onto category k's ImageNet classes"""
    from model import ViT, ViTConfig
    cfg = ViTConfig(img_size=size, patch_size=size, embed_dim=16, depth=0, num_heads=1,
                    num_classes=1000)
    model = ViT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1)
        model.fc_norm.weight.fill_(1)
        for k, category in enumerate(CATEGORIES):
            model.patch_embed.proj.weight[(k, slice(None), *block(category, size))] = 1
            model.head.weight[IMAGENET_16[category], k] = 10.0
    torch.save(dict(model=model.state_dict(), model_args=cfg.to_dict(), config={}), path)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stub") / "stub.pt")
    stub_checkpoint(path)
    return path


def test_ood_and_shape_bias_from_the_command_line_on_the_real_layout(stub, tmp_path):
    datasets, raw = tmp_path / "datasets", tmp_path / "raw-data"
    for dataset in DATASETS:
        # datasets/<name>/dnn/session-1/<each file ResNet-50 saw>, drawn as ResNet-50's decision
        session = datasets / dataset / "dnn" / "session-1"
        for r in read_csv(resnet50_csv(dataset)):
            draw(r["object_response"], str(session / r["imagename"]))
        # raw-data/<name>/: the humans, and a model's CSV next to them as the benchmark ships it
        shutil.copytree(os.path.join(FIXTURE, "raw-data", dataset), raw / dataset)
        shutil.copy(resnet50_csv(dataset), raw / dataset)
    # cue-conflict/<shape>/<shape>N-<texture>N.png decided as shape, shape, texture; one agrees
    for i, shape in enumerate(CATEGORIES):
        texture = CATEGORIES[(i + 1) % 16]
        folder = datasets / "cue-conflict" / shape
        for n, decided in enumerate((shape, shape, texture)):
            draw(decided, str(folder / f"{shape}{n + 1}-{texture}{n + 1}.png"))
        draw(shape, str(folder / f"{shape}9-{shape}8.png"))

    r = run_analyze(["--metric=ood", stub, f"--data={datasets}", f"--human={raw}",
                     "--batch_size=256", f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.load(open(tmp_path / "ood.json"))["models"]["stub"]
    assert set(result["datasets"]) == {"colour", "eidolonIII", "cue-conflict"}
    for dataset in DATASETS:
        got, expected = result["datasets"][dataset], EXPECTED[dataset]
        assert got["images"] == 1280 and got["subjects"] == 4  # resnet50's CSV is no observer
        assert got["human_trials_matched"] == len(human_rows(dataset))
        assert got["error_consistency"] == pytest.approx(expected["error_consistency"], abs=1e-9)
        accuracy = expected["accuracy_benchmark_conditions"]
        assert got["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        accuracy = expected["accuracy_all_trials"]
        assert got["accuracy_all_trials"] == pytest.approx(accuracy, abs=1e-9)
    cue = result["datasets"]["cue-conflict"]  # category = the folder: 3 of 4 right per shape
    assert cue["images"] == 64 and cue["accuracy"] == pytest.approx(0.75)
    assert "error_consistency" not in cue  # no human folder for it
    accuracies = [EXPECTED[d]["accuracy_benchmark_conditions"] for d in DATASETS] + [0.75]
    kappas = [EXPECTED[d]["error_consistency"] for d in DATASETS]
    assert result["mean_accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-9)
    assert result["mean_error_consistency"] == pytest.approx(np.mean(kappas), abs=1e-9)
    assert result["datasets_found"] == 3 and result["datasets_with_humans"] == 2
    assert os.path.getsize(tmp_path / "ood.png") > 10000

    r = run_analyze(["--metric=shape_bias", stub, f"--data={datasets}", f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    sb = json.load(open(tmp_path / "shape_bias.json"))["models"]["stub"]
    assert sb["images"] == 48 and sb["excluded_agreeing"] == 16
    assert sb["shape_bias"] == pytest.approx(2 / 3) and len(sb["per_class"]) == 16
    assert all(v == pytest.approx(2 / 3) for v in sb["per_class"].values())


def test_benchmark_images_are_seen_whole(tmp_path):
    """model-vs-human feeds its 224 px images to the model unresized and uncropped (its
    PytorchLoader resizes only datasets whose image_size is not 224; none is): a stimulus at the
    model's size reaches the model whole. Here the drawn blocks lie on the top edge of a 64 px
    image, which the eval transform's resize-and-centre-crop would cut off; shape bias and OOD
    accuracy are then the same as on the 16 px stubs above."""
    checkpoint = str(tmp_path / "edge.pt")
    stub_checkpoint(checkpoint, size=64)
    datasets = tmp_path / "datasets"
    for i, shape in enumerate(CATEGORIES):
        texture = CATEGORIES[(i + 1) % 16]
        for n, decided in enumerate((shape, shape, texture)):
            draw(decided, str(datasets / "cue-conflict" / shape / f"{shape}{n + 1}-{texture}{n + 1}.png"), size=64)
    r = run_analyze(["--metric=shape_bias", checkpoint, f"--data={datasets}", f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.load(open(tmp_path / "shape_bias.json"))["models"]["edge"]
    assert result["images"] == 48 and result["shape_bias"] == pytest.approx(2 / 3)
    r = run_analyze(["--metric=ood", checkpoint, f"--data={datasets}", f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.load(open(tmp_path / "ood.json"))["models"]["edge"]
    assert result["datasets"]["cue-conflict"]["accuracy"] == pytest.approx(2 / 3)


def test_bad_input_is_one_line(stub, tmp_path):
    datasets, raw = tmp_path / "datasets", tmp_path / "raw-data"
    session = datasets / "colour" / "dnn" / "session-1"
    session.mkdir(parents=True)
    r = run_analyze(["--metric=ood", stub, f"--data={datasets}", f"--out={tmp_path}"])
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith(f"error: no images in '{datasets / 'colour'}'")

    # 3 of the 1280 images: the humans' other trials have no image to be compared with
    for row in read_csv(resnet50_csv("colour"))[:3]:
        draw(row["object_response"], str(session / row["imagename"]))
    shutil.copytree(os.path.join(FIXTURE, "raw-data", "colour"), raw / "colour")
    r = run_analyze(["--metric=ood", stub, f"--data={datasets}", f"--human={raw}",
                     "--batch_size=256", f"--out={tmp_path}"])
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    message = "1277 of the 1280 trials of subject-01 show images that are not in"
    assert f"colour_subject-01_session_1.csv: {message} '{datasets / 'colour'}'" in r.stderr

    # a human CSV without its imagename column
    path = raw / "colour" / "colour_subject-02_session_1.csv"
    table = read_csv(path)
    with open(path, "w", newline="") as f:
        columns = [c for c in table[0] if c != "imagename"]
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    with pytest.raises(DataError, match="subject-02_session_1.csv lacks the column.s. imagename"):
        human_trials(str(raw / "colour"))
