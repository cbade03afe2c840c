"""analyze.py part 2: shape bias, error consistency, the 16-category mapping, Hessian and
landscape CLI."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from analyze import (IMAGENET_16, category_decisions, cue_conflict_labels, decision_categories,
                     error_consistency, shape_bias)

from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shape_bias_closed_forms():
    shapes = ["cat", "cat", "dog", "dog", "car"]
    textures = ["dog", "car", "cat", "dog", "cat"]  # the 4th agrees and must be excluded
    assert shape_bias(shapes, shapes, textures)[0] == 1.0
    assert shape_bias(textures, shapes, textures)[0] == 0.0
    decisions = ["cat", "car", "dog", "cat", "boat"]  # shape, texture, shape, (excluded), neither
    overall, per_class = shape_bias(decisions, shapes, textures)
    assert overall == pytest.approx(2 / 3)
    assert per_class == {"car": None, "cat": 0.5, "dog": 1.0}


def test_cue_conflict_file_names():
    assert cue_conflict_labels("stimuli/cat/cat3-elephant1.png") == ("cat", "elephant")
    assert cue_conflict_labels("cue_conflict/star/star0007_circle.png") == ("star", "circle")


def test_error_consistency_hand_computed():
    a, b = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # p1 = p2 = 0.6, c_obs = 3/5, c_exp = 0.36 + 0.16 = 0.52, kappa = 0.08 / 0.48
    assert error_consistency(a, b) == pytest.approx(1 / 6)
    assert error_consistency(a, a) == pytest.approx(1.0)
    assert error_consistency([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    # c_exp = 1 (both always right): model-vs-human's ErrorConsistency gives 1 where c_obs = 1
    assert error_consistency([1, 1, 1], [1, 1, 1]) == 1.0


def test_sixteen_category_mapping_sizes():
    sizes = {c: len(v) for c, v in IMAGENET_16.items()}
    assert len(sizes) == 16 and sum(sizes.values()) == 207
    assert sizes["knife"] == sizes["airplane"] == sizes["oven"] == 1
    assert sizes["truck"] == 8 and sizes["bear"] == 4
    flat = [i for v in IMAGENET_16.values() for i in v]
    assert len(set(flat)) == 207 and all(0 <= i < 1000 for i in flat)


def test_imagenet_decisions_average_probability_over_a_category():
    logits = torch.full((2, 1000), -10.0)
    logits[0, IMAGENET_16["knife"][0]] = 5.0  # one knife class, very likely
    logits[1, IMAGENET_16["dog"]] = 3.0  # all 117 dog classes likely, none above knife's ...
    logits[1, IMAGENET_16["knife"][0]] = 4.0  # ... but knife has only 1 index: the mean decides
    cats = sorted(IMAGENET_16)
    d = category_decisions(logits, cats).tolist()
    assert cats[d[0]] == "knife"
    probs = logits[1].softmax(-1)
    assert probs[IMAGENET_16["knife"]].mean() > probs[IMAGENET_16["dog"]].mean()
    assert cats[d[1]] == "knife"


def test_decision_categories_are_the_benchmarks_16_when_the_model_has_them():
    sixteen = sorted(IMAGENET_16)
    assert decision_categories(["cat", "dog"], 1000) == sixteen  # the benchmark ranks all 16
    assert decision_categories(["cat", "dog"], 20, sixteen + ["other"]) == sixteen
    assert decision_categories(["cat", "dog"], 16) == sixteen  # 16 outputs, no names: the 16 in order


def test_a_model_without_class_names_has_them_in_the_datas_order():
    """finetune.py's ImageFolder numbers the sorted class folders: output i is the i-th label"""
    assert decision_categories(["star", "circle", "star"], 2) == ["circle", "star"]
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert category_decisions(logits, ["circle", "star"]).tolist() == [1, 0]
    # an ImageNet-1k classifier decides among the 16 only; any other count cannot be mapped
    with pytest.raises(ValueError, match=r"names no classes and has 1000 outputs, but the data has 2"):
        decision_categories(["star", "circle"], 1000)
    with pytest.raises(ValueError, match=r"names no classes and has 3 outputs"):
        decision_categories(["star", "circle"], 3)


def test_other_classifiers_decide_among_all_their_classes():
    """not only among the labels of the images at hand: a model that always answers 'square' on
    circle/star cue conflicts chooses neither shape nor texture, so it has no shape bias (deciding
    between the two labels present would give it 0.5)"""
    classes = ["circle", "square", "star"]
    assert decision_categories(["star", "circle", "star"], 3, classes) == classes
    shapes, textures = ["circle", "star", "circle", "star"], ["star", "circle", "star", "circle"]
    logits = torch.tensor([[0.0, 5.0, 1.0], [1.0, 5.0, 0.0], [0.5, 2.0, 0.0], [0.0, 3.0, 2.9]])
    categories = decision_categories(shapes + textures, 3, classes)
    decisions = [categories[i] for i in category_decisions(logits, categories, classes)]
    assert decisions == ["square"] * 4
    assert shape_bias(decisions, shapes, textures) == (None, {"circle": None, "star": None})
    with pytest.raises(ValueError, match="lack the data's categories"):
        decision_categories(["circle", "heart"], 3, classes)


def run_analyze(args):
    cmd = [sys.executable, os.path.join(ROOT, "analyze.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_shape_bias_and_hessian_from_the_command_line(tiny_data, tiny_teacher, tmp_path):
    r = run_analyze(["--metric=shape_bias", tiny_teacher, f"--data={tiny_data}", "--n_images=8",
                     f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    written = json.load(open(tmp_path / "shape_bias.json"))
    # every cue-conflict image, as model-vs-human: the settings name no subset (before: n_images 8 and 30 images)
    assert not {"n_images", "seed"} & set(written["settings"]) and "split" in written["settings"]
    sb = written["models"]["teacher"]
    # 6 x 6 pairs, one image each; 6 agree
    assert sb["images"] == 30 and sb["excluded_agreeing"] == 6
    assert sb["shape_bias"] is None or 0 <= sb["shape_bias"] <= 1
    assert os.path.getsize(tmp_path / "shape_bias.png") > 5000
    r = run_analyze(["--metric=landscape", tiny_teacher, f"--data={tiny_data}", "--n_images=12",
                     "--steps=5", "--span=0.2", "--lanczos_steps=10", f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    land = json.load(open(tmp_path / "landscape.json"))["models"]["teacher"]
    # the grid center is the model's loss
    assert land["loss"][2][2] == pytest.approx(land["center_loss"], abs=1e-5)
    assert os.path.getsize(tmp_path / "landscape.png") > 5000


def test_hessian_runs_on_vit_b_at_224_for_one_batch(tiny_data, tmp_path):
    from model import ViT, ViTConfig
    cfg = ViTConfig.from_name("B/16", num_classes=6, global_pool="cls")
    path = tmp_path / "vitb.pt"
    torch.save(dict(model=ViT(cfg).state_dict(), model_args=cfg.to_dict(), config={}), path)
    r = run_analyze(["--metric=hessian", str(path), f"--data={tiny_data}", "--n_images=2",
                     "--batch_size=2", "--top_k=1", "--lanczos_steps=2", "--trace_products=4",
                     f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    h = json.load(open(tmp_path / "hessian.json"))["models"]["vitb"]
    assert len(h["eigenvalues"]) == 1 and np.isfinite(h["trace"]) and h["images"] == 2
    assert ("not converged to --tol" in r.stdout) == (not h["converged"])  # said where it is read, not only in JSON


def test_sharpness_logged_during_finetuning_and_plotted(tiny_data, tiny_teacher, tmp_path):
    cmd = [sys.executable, "finetune.py", f"--data_dir={tiny_data}", f"--init={tiny_teacher}",
           "--img_size=32", "--epochs=1", "--total_batch_size=16", "--micro_batch_size=8",
           "--num_workers=0", "--device=cpu", "--dtype=float32", "--compile=False",
           "--stop_iter=4", "--hessian_every=2", "--hessian_samples=5", "--freeze_blocks=2",
           f"--out_dir={tmp_path / 'ft'}"]
    r = forkserver.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # 144 train images, batches of 16: an epoch is 9 iterations, of which --stop_iter ran 4
    assert "stopped at iteration 4 of 9 (--stop_iter): top-1" in r.stdout
    assert "warning: --warmup_epochs=10 >= --epochs=1: the lr only rises, to 10% of --lr" in r.stdout  # 9 of 90
    result = json.load(open(tmp_path / "ft" / "result.json"))
    assert (result["iter_num"], result["max_iters"]) == (4, 9)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "result.json").write_text('{"top1": 1.0, "top5"')  # a run killed mid-write
    summary = forkserver.run([sys.executable, "finetune.py", f"--summarize={tmp_path}"], capture_output=True,
                             text=True, cwd=ROOT, timeout=600)
    assert "(stopped at iteration 4 of 9)" in summary.stdout, summary.stdout + summary.stderr
    assert f"warning: skipping {tmp_path / 'cut' / 'result.json'}: not a result.json" in summary.stderr
    log = json.load(open(tmp_path / "ft" / "sharpness.json"))
    assert [e["iter"] for e in log] == [2, 4]
    assert all(np.isfinite(e["eigenvalue"]) and np.isfinite(e["trace"]) for e in log)
    # the trace on the Lanczos basis (at most 20 steps) and 5 samples (before: 10 products in all,
    # so 2 samples after 8 or more Lanczos steps)
    assert all(e["trace_samples"] == 5 and e["lanczos_steps"] <= 20 for e in log)
    # the Hessian over all the weights, the two frozen blocks and patch projection too, as analyze.py's
    # of the checkpoint (before: over the trained ones only, another number for the same model)
    from model import ViT, ViTConfig
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    every_weight = sum(p.numel() for p in ViT(ViTConfig.from_dict(ckpt["model_args"])).parameters())
    assert all(e["parameters"] == every_weight for e in log)
    r = run_analyze(["--metric=sharpness", str(tmp_path / "ft" / "sharpness.json"),
                     "--labels=run", f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.getsize(tmp_path / "sharpness.png") > 5000


def test_hessian_needs_a_classifier_for_the_data(tiny_data, tmp_path):
    from model import ViT, ViTConfig
    cfg = ViTConfig.from_name("nano/4", num_classes=10)
    path = tmp_path / "ten.pt"
    torch.save(dict(model=ViT(cfg).state_dict(), model_args=cfg.to_dict(), config={}), path)
    r = run_analyze(["--metric=hessian", str(path), f"--data={tiny_data}", f"--out={tmp_path}"])
    assert r.returncode != 0
    assert r.stderr.strip() == (f"error: ten ('{path}'): hessian needs a classifier for the data's "
                                "6 classes; this model has 10 outputs: fine-tune it first")


def save_variant(path, checkpoint, classes, order=None):
    """the checkpoint with other class names (None: none), its head's outputs taken in `order`"""
    obj = torch.load(checkpoint, weights_only=True)
    if order is not None:
        for key in ("head.weight", "head.bias"):
            obj["model"][key] = obj["model"][key][order]
    if classes is None:
        del obj["classes"]
    else:
        obj["classes"] = classes
    torch.save(obj, path)
    return str(path)


def test_hessian_and_landscape_label_the_data_by_the_checkpoints_class_names(tiny_data, tiny_teacher,
                                                                              tmp_path):
    """the same classifier with its outputs in another order (and the names in that order) has the
    same loss: each folder's images are labelled with the output of that name; other names stop"""
    from data.embedded import CLASSES
    classes = sorted(CLASSES)
    shuffled = save_variant(tmp_path / "shuffled.pt", tiny_teacher, classes[::-1], order=list(range(6))[::-1])
    for metric, loss, extra in (("hessian", "loss", ["--top_k=1", "--trace_products=4"]),
                                ("landscape", "center_loss", ["--steps=2"])):
        r = run_analyze([f"--metric={metric}", tiny_teacher, shuffled, "--labels=sorted,shuffled",
                         f"--data={tiny_data}", "--n_images=12", "--lanczos_steps=2", *extra,
                         f"--out={tmp_path}"])
        assert r.returncode == 0, r.stderr[-2000:]
        models = json.load(open(tmp_path / f"{metric}.json"))["models"]
        assert models["shuffled"][loss] == pytest.approx(models["sorted"][loss], rel=1e-6)
        assert models["shuffled"]["images"] == 12
    renamed = save_variant(tmp_path / "renamed.pt", tiny_teacher, ["disc" if c == "circle" else c for c in classes])
    r = run_analyze(["--metric=hessian", renamed, f"--data={tiny_data}", f"--out={tmp_path}"])
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"error: renamed ('{renamed}'): the model's classes are not the "
                               f"class folders under '{os.path.join(tiny_data, 'val')}': ['disc'] "
                               "only in the model, ['circle'] only in the data: give the data the "
                               "model was fine-tuned on")
    # data with 3 of the classifier's 6 classes (before: 'this model has 6 outputs: fine-tune it first')
    import shutil
    for c in classes[:3]:
        shutil.copytree(os.path.join(tiny_data, "val", c), tmp_path / "three" / "val" / c)
    r = run_analyze(["--metric=hessian", tiny_teacher, f"--data={tmp_path / 'three'}", f"--out={tmp_path}"])
    assert r.returncode != 0 and r.stderr.strip() == (
        f"error: teacher ('{tiny_teacher}'): the model's classes are not the class folders under "
        f"'{tmp_path / 'three' / 'val'}': "
        f"{classes[3:]} only in the model, [] only in the data: give the data the model was fine-tuned on")


def test_shape_bias_of_a_classifier_without_class_names(tiny_data, tiny_teacher, tmp_path):
    """a checkpoint that names no classes has finetune.py's order, the sorted class folders: the
    same decisions as the same model with its names"""
    nameless = save_variant(tmp_path / "nameless.pt", tiny_teacher, None)
    r = run_analyze(["--metric=shape_bias", tiny_teacher, nameless, "--labels=named,nameless",
                     f"--data={tiny_data}", f"--out={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    models = json.load(open(tmp_path / "shape_bias.json"))["models"]
    assert models["nameless"] == models["named"] and models["named"]["images"] == 30


def test_shape_bias_figure_marks_a_class_without_decisions():
    """a class where no decision was the shape or the texture has no shape bias (None): its bar says
    n/a
    (before: drawn as a bias of 0, like a class whose every decision was the texture)"""
    from analyze import plot_classifier
    from common import pyplot
    plt = pyplot()
    if plt is None:
        pytest.skip("matplotlib not installed (pip install -r requirements-dev.txt)")
    results = {"model": dict(shape_bias=0.25,
                             per_class={"airplane": None, "bicycle": 0.0, "cat": 0.5})}
    fig = plot_classifier(plt, "shape_bias", results)
    ax = fig.axes[0]
    marked = [text.get_position()[0] for text in ax.texts if text.get_text() == "n/a"]
    assert marked == [0.0]  # airplane's bar (x 0), not bicycle's (x 1)
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == [0.0, 0.0, 0.5, 0.25]
    plt.close(fig)


def test_sharpness_figure_shows_a_one_point_trace_and_names_it():
    """one logged point per run (a short fine-tune): the trace is a marker, not an invisible dashed
    segment, and
    the legend lists the trace beside the top eigenvalue (before: the eigenvalues only)"""
    from analyze import plot_classifier
    from common import pyplot
    plt = pyplot()
    if plt is None:
        pytest.skip("matplotlib not installed (pip install -r requirements-dev.txt)")
    results = {"ft_md": [dict(iter=2, eigenvalue=5.0, trace=40.0)]}
    fig = plot_classifier(plt, "sharpness", results)
    ax, twin = fig.axes
    (trace_line,) = twin.get_lines()
    assert trace_line.get_marker() == "x" and list(trace_line.get_ydata()) == [40.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ft_md: top eigenvalue",
                                                                    "ft_md: trace"]
    plt.close(fig)


def test_imagenet_decisions_average_probabilities_not_logits():
    """model-vs-human's 16-class mapping averages the softmax probabilities of a category's
    ImageNet classes, by hand: every logit -10 but bear's 4 classes [10, -10, -10, -10] and
    knife's one class 4. Mean probability: bear (e^10 + 3 e^-10) / 4 / Z ~ 5507 / Z against
    knife e^4 / Z ~ 55 / Z: bear. The mean logit would give knife (4 against (10 - 30) / 4 = -5)"""
    logits = torch.full((1, 1000), -10.0)
    logits[0, IMAGENET_16["bear"][0]] = 10.0
    logits[0, IMAGENET_16["knife"][0]] = 4.0
    cats = sorted(IMAGENET_16)
    assert (math.exp(10) + 3 * math.exp(-10)) / 4 > math.exp(4)  # the hand computation
    assert cats[category_decisions(logits, cats).item()] == "bear"


def test_landscape_axes_are_the_top_eigenvectors(tiny_data, tiny_teacher, tmp_path, monkeypatch):
    """--metric landscape spans the grid along the top-2 Hessian eigenvectors (unit norm): along a
    unit eigenvector v, (L(h v) + L(-h v) - 2 L(0)) / h^2 = lambda + O(h) (a Taylor expansion),
    so each axis's second difference at h = 0.01 is its eigenvalue within 2% (a Krylov or random
    direction's curvature is far smaller here: the top two are about -26 and -25)"""
    import analyze
    monkeypatch.setattr(analyze, "pyplot", lambda: None)  # the numbers only: no figure
    analyze.main(["--metric=landscape", tiny_teacher, f"--data={tiny_data}", "--n_images=8",
                  "--lanczos_steps=25", "--span=0.01", "--steps=3", "--device=cpu",
                  f"--out={tmp_path}"])
    (entry,) = json.load(open(tmp_path / "landscape.json"))["models"].values()
    grid, h = entry["loss"], entry["coords"][2]
    assert entry["coords"] == pytest.approx([-0.01, 0.0, 0.01])
    along_a = (grid[2][1] + grid[0][1] - 2 * grid[1][1]) / h ** 2
    along_b = (grid[1][2] + grid[1][0] - 2 * grid[1][1]) / h ** 2
    assert along_a == pytest.approx(entry["eigenvalues"][0], rel=2e-2)
    assert along_b == pytest.approx(entry["eigenvalues"][1], rel=2e-2)
    assert grid[1][1] == pytest.approx(entry["center_loss"], rel=1e-6)


def test_progress_bars_count_the_products_and_the_grid_points():
    """the bars of --metric hessian and landscape (before: minutes with nothing shown): the
    Lanczos steps and trace samples, counted apart on the operator as products and quadratic
    forms, and the grid's steps x steps points"""
    import io

    from tqdm import tqdm

    from hessian import curvature, loss_landscape
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    shown = io.StringIO()
    bar = tqdm(total=100, file=shown)  # curvature sets the total once Lanczos has stopped
    r = curvature(model, batches, k=2, max_iter=6, trace_products=15, progress=bar)
    steps, samples = r["lanczos_steps"], r["trace_samples"]
    assert steps >= 2 and samples >= 2 and steps + samples == 15
    assert bar.n == bar.total == r["products"] + r["forms"] == steps + samples
    bar.close()
    assert "15/15" in shown.getvalue()
    shown = io.StringIO()
    bar = tqdm(total=4 * 4, file=shown)
    coords, grid = loss_landscape(model, batches, r["vectors"], span=0.1, steps=4, progress=bar)
    assert bar.n == 4 * 4 == len(coords) * len(grid[0])
    bar.close()
    assert "16/16" in shown.getvalue()


# modelvshuman/helper/human_categories.py, HumanCategories: the WordNet IDs of each category
MVH_WNIDS = dict(
    knife="n03041632", keyboard="n03085013 n04505470", elephant="n02504013 n02504458",
    bicycle="n02835271 n03792782", airplane="n02690373 n03955296 n13861050 n13941806",
    clock="n02708093 n03196217 n04548280", oven="n03259401 n04111414 n04111531",
    chair="n02791124 n03376595 n04099969 n00605023 n04429376",
    bear="n02132136 n02133161 n02134084 n02134418",
    boat="n02951358 n03344393 n03662601 n04273569 n04612373 n04612504",
    cat="n02122878 n02123045 n02123159 n02126465 n02123394 n02123597 n02124075 n02125311",
    bottle="n02823428 n03937543 n03983396 n04557648 n04560804 n04579145 n04591713",
    truck="n03345487 n03417042 n03770679 n03796401 n00319176 n01016201 n03930630 n03930777 "
          "n05061003 n06547832 n10432053 n03977966 n04461696 n04467665",
    car="n02814533 n03100240 n03100346 n13419325 n04285008",
    bird="n01321123 n01514859 n01792640 n07646067 n01530575 n01531178 n01532829 n01534433 "
         "n01537544 n01558993 n01562265 n01560419 n01582220 n10281276 n01592084 n01601694 "
         "n01614925 n01616318 n01622779 n01795545 n01796340 n01797886 n01798484 n01817953 "
         "n01818515 n01819313 n01820546 n01824575 n01828970 n01829413 n01833805 n01843065 "
         "n01843383 n01855032 n01855672 n07646821 n01860187 n02002556 n02002724 n02006656 "
         "n02007558 n02009229 n02009912 n02011460 n02013706 n02017213 n02018207 n02018795 "
         "n02025239 n02027492 n02028035 n02033041 n02037110 n02051845 n02056570",
    dog="n02085782 n02085936 n02086079 n02086240 n02086646 n02086910 n02087046 n02087394 "
        "n02088094 n02088238 n02088364 n02088466 n02088632 n02089078 n02089867 n02089973 "
        "n02090379 n02090622 n02090721 n02091032 n02091134 n02091244 n02091467 n02091635 "
        "n02091831 n02092002 n02092339 n02093256 n02093428 n02093647 n02093754 n02093859 "
        "n02093991 n02094114 n02094258 n02094433 n02095314 n02095570 n02095889 n02096051 "
        "n02096294 n02096437 n02096585 n02097047 n02097130 n02097209 n02097298 n02097474 "
        "n02097658 n02098105 n02098286 n02099267 n02099429 n02099601 n02099712 n02099849 "
        "n02100236 n02100583 n02100735 n02100877 n02101006 n02101388 n02101556 n02102040 "
        "n02102177 n02102318 n02102480 n02102973 n02104029 n02104365 n02105056 n02105162 "
        "n02105251 n02105505 n02105641 n02105855 n02106030 n02106166 n02106382 n02106550 "
        "n02106662 n02107142 n02107312 n02107574 n02107683 n02107908 n02108000 n02108422 "
        "n02108551 n02108915 n02109047 n02109525 n02109961 n02110063 n02110185 n02110627 "
        "n02110806 n02110958 n02111129 n02111277 n08825211 n02111500 n02112018 n02112350 "
        "n02112706 n02113023 n02113624 n02113712 n02113799 n02113978",
)


def test_sixteen_categories_are_their_wordnet_ids_among_imagenets_classes():
    """model-vs-human's compute_imagenet_indices_for_category: category c has the ImageNet-1k
    indices whose WordNet ID is one of c's (human_categories.py), the IDs from timm's list"""
    info = pytest.importorskip("timm.data").ImageNetInfo()
    wnids = [info.index_to_label_name(i) for i in range(1000)]
    assert len(set(wnids)) == 1000
    for category, ids in MVH_WNIDS.items():
        expected = [i for i, wnid in enumerate(wnids) if wnid in ids.split()]
        assert sorted(IMAGENET_16[category]) == expected, category
    assert set(IMAGENET_16) == set(MVH_WNIDS)


def test_the_16_decide_only_data_whose_labels_are_all_among_them():
    """model-vs-human's 16 categories (human_categories.py) hold no 'star': data labelled 'cat' and
    'star' cannot be decided among them; a 1000-way model without class names stops"""
    assert "star" not in MVH_WNIDS and "cat" in MVH_WNIDS
    with pytest.raises(ValueError, match=r"no classes and has 1000 outputs, but the data has 2"):
        decision_categories(["cat", "star"], 1000)
