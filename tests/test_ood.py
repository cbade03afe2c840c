"""analyze.py --metric ood and shape_bias as model-vs-human computes them, on its real files.

tests/fixtures/model-vs-human (verbatim from bethgelab/model-vs-human, MIT): the human CSVs of two
of the 17 datasets, torchvision ResNet-50's trials written by the benchmark's own evaluation code,
and in expected.json the numbers the benchmark's code gives for those trials."""
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from analyze import (IMAGENET_16, OOD_CONDITIONS, OOD_DATASETS, OOD_EXCLUDED, condition_key,
                     human_trials, ood_scores, ood_summary, short_image_name)
from data import DataError

from tests import forkserver

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
    return forkserver.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


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


def stub_checkpoint(path, size=16, outputs=1000):
    """an ImageNet-1k project checkpoint that decides the category drawn by draw(): one size x size
    patch, one block whose zero weights add nothing; embedding k sums block k, so after the norms it
    is largest at the drawn k; the head maps it onto category k's ImageNet classes (outputs=16: onto
    output k, no class names)"""
    from model import ViT, ViTConfig
    cfg = ViTConfig(img_size=size, patch_size=size, embed_dim=16, depth=1, num_heads=1,
                    num_classes=outputs)
    model = ViT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1)
        model.fc_norm.weight.fill_(1)
        for k, category in enumerate(CATEGORIES):
            model.patch_embed.proj.weight[(k, slice(None), *block(category, size))] = 1
            model.head.weight[IMAGENET_16[category] if outputs == 1000 else k, k] = 10.0
    torch.save(dict(model=model.state_dict(), model_args=cfg.to_dict(), config={}), path)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stub") / "stub.pt")
    stub_checkpoint(path)
    return path


def draw_session(datasets, dataset):
    """datasets/<name>/dnn/session-1/<each file ResNet-50 saw>, drawn as ResNet-50's decision"""
    session = datasets / dataset / "dnn" / "session-1"
    for r in read_csv(resnet50_csv(dataset)):
        draw(r["object_response"], str(session / r["imagename"]))
    return session


def draw_cue_conflict(datasets):
    """cue-conflict/<shape>/<shape>N-<texture>N.png decided as shape, shape, texture; one agrees"""
    for i, shape in enumerate(CATEGORIES):
        texture = CATEGORIES[(i + 1) % 16]
        folder = datasets / "cue-conflict" / shape
        for n, decided in enumerate((shape, shape, texture)):
            draw(decided, str(folder / f"{shape}{n + 1}-{texture}{n + 1}.png"))
        draw(shape, str(folder / f"{shape}9-{shape}8.png"))


@pytest.fixture(scope="module")
def colour_release(tmp_path_factory):
    """datasets/colour/ as the benchmark ships it, drawn once for the tests that copy it"""
    datasets = tmp_path_factory.mktemp("release") / "datasets"
    draw_session(datasets, "colour")
    return datasets


def test_ood_and_shape_bias_from_the_command_line_on_the_real_layout(stub, tmp_path):
    datasets, raw = tmp_path / "datasets", tmp_path / "raw-data"
    for dataset in DATASETS:
        draw_session(datasets, dataset)
        # raw-data/<name>/: the humans, and a model's CSV next to them as the benchmark ships it
        shutil.copytree(os.path.join(FIXTURE, "raw-data", dataset), raw / dataset)
        shutil.copy(resnet50_csv(dataset), raw / dataset)
    draw_cue_conflict(datasets)

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


def test_a_human_folder_without_the_datasets_found(stub, tmp_path):
    """--human that holds no <dataset>/*.csv of the datasets found: one line before any model work
    (before: exit 0, and no error consistency without a word); of some of them: a warning names
    the others, and the ones with humans get their kappa"""
    datasets, raw = tmp_path / "datasets", tmp_path / "raw-data"
    draw_cue_conflict(datasets)
    for category in CATEGORIES[:2]:
        draw(category, str(datasets / "edge" / category / f"{category}1.png"))
    # not found in datasets
    shutil.copytree(os.path.join(FIXTURE, "raw-data", "colour"), raw / "colour")
    args = ["--metric=ood", stub, f"--data={datasets}", f"--human={raw}",
            f"--out={tmp_path / 'out'}"]
    r = run_analyze(args)
    assert r.returncode == 1 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.strip() == (f"error: --human={raw} holds no human trials of the datasets found "
                                "(edge/*.csv, cue-conflict/*.csv are not there): give "
                                "model-vs-human's raw-data/ folder (<dataset>/*.csv)")
    assert not (tmp_path / "out").exists()
    # a subject wrong on the images named 1 and 3 of each shape, where the stub is wrong on 3 only
    # (draw_cue_conflict): right 2 of 4 and 3 of 4, agreeing on 3 of 4 -> kappa
    # (3/4 - 1/2) / (1 - 1/2)
    rows = []
    for i, shape in enumerate(CATEGORIES):
        texture = CATEGORIES[(i + 1) % 16]
        names = [f"{shape}{n}-{texture}{n}.png" for n in (1, 2, 3)] + [f"{shape}9-{shape}8.png"]
        for name, right in zip(names, (False, True, False, True)):
            rows.append(["subject-01", f"{len(rows):04d}_cc_s01_0_{shape}_{name}", "0", shape,
                         shape if right else texture])
    (raw / "cue-conflict").mkdir()
    with open(raw / "cue-conflict" / "cue-conflict_subject-01_session_1.csv", "w", newline="") as f:
        csv.writer(f).writerows([["subj", "imagename", "condition", "category", "object_response"],
                                 *rows])
    r = run_analyze(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.strip() == (f"warning: --human={raw} holds no human trials of edge: no error "
                                "consistency for them")
    result = json.load(open(tmp_path / "out" / "ood.json"))["models"]["stub"]
    assert (result["datasets_with_humans"] == 1
            and "error_consistency" not in result["datasets"]["edge"])
    assert result["datasets"]["cue-conflict"]["error_consistency"] == pytest.approx(0.5)


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
    # no datasets folder, then one without the benchmark's datasets: named before the model is loaded
    # (an official teacher would be a download), with model-vs-human's folder as the advice
    r = run_analyze(["--metric=ood", stub, f"--data={datasets}", f"--out={tmp_path}"])
    assert r.returncode != 0 and r.stdout == "" and r.stderr.strip().count("\n") == 0, r.stdout + r.stderr
    assert r.stderr.strip() == (f"error: --data={datasets} is not a folder: give model-vs-human's datasets/ folder "
                                "(edge/, silhouette/, cue-conflict/ ... the 17 OOD datasets)")
    datasets.mkdir()
    r = run_analyze(["--metric=ood", stub, f"--data={datasets}", f"--out={tmp_path}"])
    assert r.returncode != 0 and r.stdout == "", r.stdout
    assert r.stderr.strip() == (f"error: none of the 17 OOD datasets (edge/, silhouette/, cue-conflict/ ...) is under "
                                f"'{datasets}': give model-vs-human's datasets/ folder with --data")
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


def test_an_unreadable_image_leaves_out_its_human_trials(stub, colour_release, tmp_path):
    """a zero-byte image (a copy cut short) is skipped, and the humans' trials on it are left out
    and counted, said once; an image that is not in the folder at all still stops"""
    datasets, raw = tmp_path / "datasets", tmp_path / "raw-data"
    shutil.copytree(colour_release, datasets)
    shutil.copytree(os.path.join(FIXTURE, "raw-data", "colour"), raw / "colour")
    rows = read_csv(resnet50_csv("colour"))
    session = datasets / "colour" / "dnn" / "session-1"
    (session / rows[0]["imagename"]).write_bytes(b"")  # condition cr: out of both scores anyway
    args = ["--metric=ood", stub, f"--data={datasets}", f"--human={raw}", "--batch_size=256",
            f"--out={tmp_path}"]
    r = run_analyze(args)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith(f"warning: skipping unreadable image {session / rows[0]['imagename']}")
    assert lines[1] == "warning: colour: 4 human trials show the 1 unreadable image(s) above and are left out"
    got = json.load(open(tmp_path / "ood.json"))["models"]["stub"]["datasets"]["colour"]
    assert (got["images"], got["unreadable_images"], got["subjects"]) == (1279, 1, 4)
    assert (got["human_trials_matched"], got["human_trials_unreadable"]) == (4 * 1279, 4)
    expected = EXPECTED["colour"]
    assert got["error_consistency"] == pytest.approx(expected["error_consistency"], abs=1e-9)
    assert got["accuracy"] == pytest.approx(expected["accuracy_benchmark_conditions"], abs=1e-9)
    hits = [x["object_response"] == x["category"] for x in rows[1:]]
    assert got["accuracy_all_trials"] == pytest.approx(np.mean(hits), abs=1e-12)

    os.remove(session / rows[1]["imagename"])
    r = run_analyze(args)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert "1 of the 1280 trials of subject-01 show images that are not in" in r.stderr


# the header of an AppleDouble file, which macOS writes as ._NAME beside NAME on other file systems
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x00"


def test_hidden_files_and_folders_are_not_data(stub, colour_release, tmp_path):
    """macOS's ._NAME files and Jupyter's .ipynb_checkpoints/ beside a copy of the release are no
    image, session, category or shape class, for ood and shape_bias"""
    datasets = tmp_path / "datasets"
    shutil.copytree(colour_release, datasets)
    draw_cue_conflict(datasets)
    first = read_csv(resnet50_csv("colour"))[0]["imagename"]
    (datasets / "colour" / "dnn" / "session-1" / f"._{first}").write_bytes(APPLEDOUBLE)
    checkpoint = first.replace(".png", "-checkpoint.png")
    draw("oven", str(datasets / "colour" / "dnn" / ".ipynb_checkpoints" / checkpoint))
    cue = datasets / "cue-conflict"
    (cue / "cat" / "._cat1-chair1.png").write_bytes(APPLEDOUBLE)
    draw("cat", str(cue / ".ipynb_checkpoints" / "cat1-chair1-checkpoint.png"))
    draw("cat", str(cue / "cat" / ".ipynb_checkpoints" / "cat1-chair1-checkpoint.png"))
    r = run_analyze(["--metric=ood", stub, f"--data={datasets}", "--batch_size=256",
                     f"--out={tmp_path}"])
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-2000:]
    found = json.load(open(tmp_path / "ood.json"))["models"]["stub"]["datasets"]
    accuracy = EXPECTED["colour"]["accuracy_all_trials"]
    assert found["colour"]["images"] == 1280
    assert found["colour"]["accuracy_all_trials"] == pytest.approx(accuracy, abs=1e-9)
    assert found["cue-conflict"]["images"] == 64
    assert found["cue-conflict"]["accuracy"] == pytest.approx(0.75)
    r = run_analyze(["--metric=shape_bias", stub, f"--data={datasets}", f"--out={tmp_path}"])
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-2000:]
    sb = json.load(open(tmp_path / "shape_bias.json"))["models"]["stub"]
    assert (sb["images"], sb["excluded_agreeing"], len(sb["per_class"])) == (48, 16, 16)
    assert sb["shape_bias"] == pytest.approx(2 / 3)


def test_a_16_way_classifier_without_class_names(tmp_path):
    """a classifier fine-tuned on the 16 category folders whose checkpoint names no classes: its
    outputs are the 16 in finetune.py's order (sorted), decided as the ImageNet stub's"""
    checkpoint = str(tmp_path / "sixteen.pt")
    stub_checkpoint(checkpoint, outputs=16)
    datasets = tmp_path / "datasets"
    draw_cue_conflict(datasets)
    r = run_analyze(["--metric=shape_bias", checkpoint, f"--data={datasets}", f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    sb = json.load(open(tmp_path / "shape_bias.json"))["models"]["sixteen"]
    assert (sb["images"], sb["excluded_agreeing"]) == (48, 16)
    assert sb["shape_bias"] == pytest.approx(2 / 3)
    r = run_analyze(["--metric=ood", checkpoint, f"--data={datasets}", f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    cue = json.load(open(tmp_path / "ood.json"))["models"]["sixteen"]["datasets"]["cue-conflict"]
    assert cue["images"] == 64 and cue["accuracy"] == pytest.approx(0.75)


def test_human_csvs_with_a_byte_order_mark_or_in_latin_1(tmp_path):
    """a CSV saved with a UTF-8 byte order mark (Excel's 'CSV UTF-8') reads as without it, as
    pandas.read_csv reads it for the benchmark; one in Latin-1 stops with one line naming it"""
    original = os.path.join(FIXTURE, "raw-data", "colour")
    folder = tmp_path / "colour"
    shutil.copytree(original, folder)
    path = folder / "colour_subject-01_session_1.csv"
    text = path.read_text(encoding="utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert human_trials(str(folder)) == {s: (str(folder / os.path.basename(p)), t)
                                         for s, (p, t) in human_trials(original).items()}
    path.write_bytes(text.replace("Session", "Séssion").encode("latin-1"))
    with pytest.raises(DataError) as error:
        human_trials(str(folder))
    assert str(error.value) == (f"{path} is not UTF-8 text (byte 0xe9): save it as UTF-8, the "
                                "encoding model-vs-human's pandas.read_csv reads")


def test_a_cut_or_damaged_human_csv_is_one_line(tmp_path):
    """model-vs-human's own CSV cut inside a row (a copy that stopped), a folder named *.csv and
    a field over the csv module's size limit (a binary file named .csv): one line that names the
    file, each, before any score (before: a TypeError or AttributeError from the None that csv
    gives a missing field, IsADirectoryError, _csv.Error)"""
    folder = tmp_path / "colour"
    shutil.copytree(os.path.join(FIXTURE, "raw-data", "colour"), folder)
    path = folder / "colour_subject-01_session_1.csv"
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    cut = "".join(lines[:11]) + lines[11][: len(lines[11]) // 3]  # 10 trials, then a third of one
    path.write_text(cut, encoding="utf-8")
    with pytest.raises(DataError) as error:
        human_trials(str(folder))
    fields = len(next(csv.reader([lines[0]])))
    assert str(error.value) == (f"{path}, line 12: a row with fewer fields than the header's {fields}: "
                                "the file is cut or damaged")

    path.write_text(text, encoding="utf-8")
    (folder / "notes.csv").mkdir()
    with pytest.raises(DataError, match=r"notes.csv cannot be read: Is a directory$"):
        human_trials(str(folder))

    (folder / "notes.csv").rmdir()
    (folder / "notes.csv").write_text(lines[0] + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes.csv, after line 1: not a CSV of trials \(field larger than"):
        human_trials(str(folder))


def test_ood_summary_is_the_mean_over_datasets():
    """the benchmark's aggregates are plain means over the datasets (plot.py,
    get_mean_over_datasets), by hand: accuracies 0.5, 0.7, 0.9 -> 0.7; error consistencies 0.1,
    0.2, 0.6 -> 0.3 (their median would be 0.2); a dataset without humans adds no kappa"""
    datasets = {"colour": dict(accuracy=0.5, error_consistency=0.1),
                "contrast": dict(accuracy=0.7, error_consistency=0.2),
                "edge": dict(accuracy=0.9, error_consistency=0.6),
                "sketch": dict(accuracy=None)}
    summary = ood_summary(datasets)
    assert summary["mean_accuracy"] == pytest.approx(0.7, abs=1e-12)
    assert summary["mean_error_consistency"] == pytest.approx(0.3, abs=1e-12)
    assert summary["datasets_found"] == 4 and summary["datasets_with_humans"] == 3


# ----------------------------------------------------------------------------------------
# model-vs-human's conditions, exclusions and CSV columns, against its own code

# modelvshuman/datasets/experiments.py: data_conditions of the 12 parametric datasets, in order
MVH_DATA_CONDITIONS = {
    "colour": ["cr", "bw"],
    "contrast": ["c100", "c50", "c30", "c15", "c10", "c05", "c03", "c01"],
    "high-pass": ["inf", "3.0", "1.5", "1.0", "0.7", "0.55", "0.45", "0.4"],
    "low-pass": ["0", "1", "3", "5", "7", "10", "15", "40"],
    "phase-scrambling": ["0", "30", "60", "90", "120", "150", "180"],
    "power-equalisation": ["0", "pow"],
    "false-colour": ["True", "False"],
    "rotation": ["0", "90", "180", "270"],
    "eidolonI": ["1-10-10", "2-10-10", "4-10-10", "8-10-10", "16-10-10", "32-10-10",
                 "64-10-10", "128-10-10"],
    "eidolonII": ["1-3-10", "2-3-10", "4-3-10", "8-3-10", "16-3-10", "32-3-10", "64-3-10",
                  "128-3-10"],
    "eidolonIII": ["1-0-10", "2-0-10", "4-0-10", "8-0-10", "16-0-10", "32-0-10", "64-0-10",
                   "128-0-10"],
    "uniform-noise": ["0.0", "0.03", "0.05", "0.1", "0.2", "0.35", "0.6", "0.9"],
}
# modelvshuman/plotting/plot.py: EXCLUDE_CONDITIONS
MVH_EXCLUDE_CONDITIONS = {
    "colour": ["cr"], "contrast": ["c100", "c03", "c01"],
    "high-pass": ["inf", "0.55", "0.45", "0.4"], "low-pass": ["0", "15", "40"],
    "phase-scrambling": ["0", "150", "180"], "power-equalisation": ["0"],
    "false-colour": ["True"], "rotation": ["0"],
    "eidolonI": ["1-10-10", "64-10-10", "128-10-10"],
    "eidolonII": ["1-3-10", "32-3-10", "64-3-10", "128-3-10"],
    "eidolonIII": ["1-0-10", "16-0-10", "32-0-10", "64-0-10", "128-0-10"],
    "uniform-noise": ["0.0", "0.6", "0.9"],
}


def test_conditions_and_exclusions_are_model_vs_humans():
    """experiments.py's data_conditions and plot.py's EXCLUDE_CONDITIONS, reproduced from
    model-vs-human; each excluded condition is one of its dataset's (plot.py's own assert)"""
    assert {d: c for d, (_, c) in OOD_CONDITIONS.items()} == MVH_DATA_CONDITIONS
    assert OOD_EXCLUDED == MVH_EXCLUDE_CONDITIONS
    for dataset, excluded in OOD_EXCLUDED.items():
        assert set(excluded) < set(OOD_CONDITIONS[dataset][1]), dataset
    assert set(OOD_CONDITIONS) < set(OOD_DATASETS) and len(OOD_DATASETS) == 17


def test_numeric_conditions_are_excluded_as_pandas_reads_them():
    """uniform-noise by hand: plot.py leaves out 0.0, 0.6, 0.9, compared as pandas reads numbers
    ('0' = '0.0'). The model is right on 4/4 trials at 0.0, 2/4 at 0.1, 0/4 at 0.6 and at 0.9:
    accuracy 2/4, 6/16 over all trials. The human is right on 4/4, 3/4 (the model's 2 and one
    more), 0/4, 0/4: at 0.1 p1 = 1/2, p2 = 3/4, c_obs = 3/4, c_exp = 1/2, kappa = 1/2; the
    others (kappa 1 each) are out"""
    right = {"0.0": [1, 1, 1, 1], "0.1": [1, 1, 0, 0], "0.6": [0, 0, 0, 0], "0.9": [0, 0, 0, 0]}
    human = {"0": [1, 1, 1, 1], "0.10": [1, 1, 1, 0], "0.6": [0, 0, 0, 0], "0.90": [0, 0, 0, 0]}
    model_trials, human_rows = [], []
    for (condition, hits), (written, human_hits) in zip(right.items(), human.items()):
        for k, (hit, human_hit) in enumerate(zip(hits, human_hits)):
            image = f"n02123045_{len(model_trials)}.png"
            name = f"{len(model_trials):04d}_nse_dnn_{condition}_cat_00_{image}"
            model_trials.append((name, condition, "cat", "cat" if hit else "dog"))
            human_rows.append((f"{len(human_rows):04d}_nse_s01_{written}_cat_00_{image}",
                               written, "cat", "cat" if human_hit else "dog"))
    humans = {"subject-01": ("uniform-noise_subject-01_session_1.csv", human_rows)}
    r = ood_scores("uniform-noise", model_trials, humans)
    assert r["accuracy"] == pytest.approx(2 / 4, abs=1e-12)
    assert r["accuracy_all_trials"] == pytest.approx(6 / 16, abs=1e-12)
    assert r["error_consistency"] == pytest.approx(1 / 2, abs=1e-12)
    assert r["excluded_conditions"] == ["0.0", "0.6", "0.9"]


def test_conditions_are_named_and_ordered_as_experiments_py():
    """trials in any order, with conditions written as a human CSV has them ('3' for high-pass's
    '3.0'), are reported per condition in experiments.py's order and under its names; accuracy per
    condition by hand: condition i of 8 has i + 1 trials, the first of them right"""
    for dataset, written in (("low-pass", ["0", "1", "3", "5", "7", "10", "15", "40"]),
                             ("high-pass", ["inf", "3", "1.5", "1", "0.7", "0.55", "0.45", ".4"])):
        trials = []
        for i, condition in enumerate(written):  # condition i in the benchmark's order
            for k in range(i + 1):
                trials.append((f"{len(trials):04d}_x_dnn_{condition}_cat_00_n0_{k}-{i}.png",
                               condition, "cat", "cat" if k == 0 else "dog"))
        r = ood_scores(dataset, trials[::-1])
        expected = {c: 1 / (i + 1) for i, c in enumerate(MVH_DATA_CONDITIONS[dataset])}
        assert list(r["accuracy_per_condition"]) == list(expected)
        assert r["accuracy_per_condition"] == pytest.approx(expected, abs=1e-12)


def test_human_csv_column_names_in_any_case(tmp_path):
    """model-vs-human lowers every column name as it reads a CSV (plotting_helper.py,
    read_all_csv_files_from_directory): a header 'Subj,ImageName,...' reads as the lower-case
    one; the trials are those written here by hand"""
    rows = [("subject-01", "0001_cl_s01_bw_cat_40_n02123045_1.png", "bw", "cat", "dog"),
            ("subject-01", "0002_cl_s01_cr_oven_40_n04111531_2.png", "cr", "oven", "oven")]
    folder = tmp_path / "colour"
    folder.mkdir()
    path = folder / "colour_subject-01_session_1.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Subj", "ImageName", "Condition", "Category", "Object_Response"])
        writer.writerows(rows)
    assert human_trials(str(folder)) == {"subject-01": (str(path), [r[1:] for r in rows])}


def test_a_subjects_sessions_are_one_observer(tmp_path):
    """model-vs-human concatenates every CSV of a dataset folder and selects a subject by its subj
    column (plotting_helper.py, read_all_csv_files_from_directory; analyses.py): a subject's two
    session files give all its trials, here written by hand, the first file's first"""
    folder = tmp_path / "sketch"
    folder.mkdir()
    header = ["subj", "imagename", "condition", "category", "object_response"]
    sessions = [[("0001_ske_s01_0_dog_00_dog-1-sketch-1.png", "0", "dog", "dog"),
                 ("0002_ske_s01_0_cat_00_cat-2-sketch-3.png", "0", "cat", "bear")],
                [("0001_ske_s01_0_car_00_car-5-sketch-2.png", "0", "car", "car")]]
    for n, rows in enumerate(sessions, 1):
        with open(folder / f"sketch_subject-01_session_{n}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *[("subject-01", *r) for r in rows]])
    first = str(folder / "sketch_subject-01_session_1.csv")
    assert human_trials(str(folder)) == {"subject-01": (first, sessions[0] + sessions[1])}
    # get_short_imagename keeps the field before the last only for an ImageNet synset ('n0...')
    assert short_image_name("0001_sty_s01_0_cat_00_night_cat1-dog2.png") == "cat1-dog2.png"
