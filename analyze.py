"""
Every attention and representation metric of the paper, one function each, for any model:

    python analyze.py --metric NAME CKPT [CKPT ...] [--data=DIR] [--n_images=N] [--out=DIR]

NAME: attn_map, attn_distance, attn_entropy, nmi, fourier, svd, or all of these (one forward
pass per batch collects what they all need); for classifiers: hessian, landscape, shape_bias,
ood; and sharpness (the curves logged by finetune.py --hessian_every; give the JSON logs).
curves: the training curves of runs side by side; give each run's out_dir/log.jsonl.
`--metric report RUN_ROOT` writes RUN_ROOT/report.md (and .html) over a run of
experiments/paper.sh: every figure, the headline numbers, and the paper's claims tested.
CKPT: clip | dino | deit | embedded | an official file | a project checkpoint; several are
compared side by side. Writes out/NAME.json (the numbers; models[label]["per_layer"] is the
headline number per block, first block first) and out/NAME.png (the figure; needs matplotlib).

Definitions, formulas and sources: docs/metrics.md. Attention metrics read the patch-to-patch
attention: CLS dropped, each patch query's softmax taken over the patch logits.
"""
import signal
SIGINT_AT_START = signal.getsignal(signal.SIGINT)  # put back after the imports
if SIGINT_AT_START is signal.default_int_handler:  # Ctrl-C while torch loads ends it, without a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import contextlib
import csv
import io
import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from common import (RUN_CHECKPOINTS, option_error, print_help, pyplot, save_figure, stopped_early,
                    write_atomic)
from data import (IMAGE_EXTENSIONS, DataError, EvalTransform, ImageFolder, collate, load_image,
                  resolve_data_dir)
from hessian import HessianOperator, curvature, keep_freed_memory, lanczos, loss_landscape, mean_loss
from model import ViTConfig
from teacher import NAMES, OFFICIAL, CheckpointError, load_model
signal.signal(signal.SIGINT, SIGINT_AT_START)  # as it was: from here Ctrl-C raises KeyboardInterrupt

REPRESENTATION = ("attn_map", "attn_distance", "attn_entropy", "nmi", "fourier", "svd")
CLASSIFIER = ("hessian", "landscape", "shape_bias", "ood")
METRICS = REPRESENTATION + CLASSIFIER + ("sharpness", "curves", "report")
DEFAULTS = dict(
    metric="",          # one of METRICS, or all (= every representation metric)
    data="embedded",    # ImageFolder root or 'embedded'; for ood: the folder of the 17 datasets
    split="",           # sub-folder of data; default val/ (cue_conflict/ for shape_bias)
                        # when present
    n_images=64,        # fixed, seeded subset of the split
    batch_size=16,      # images per forward
    out="out/analysis",  # where NAME.json and NAME.png go
    labels="",          # comma-separated legend labels, one per CKPT (default: file or
                        # teacher names; the folder's name for a run's ckpt.pt, and
                        # where two files share a name)
    layer=-1,           # attn_map: block whose attention is shown (-1 = last)
    queries="",         # attn_map: comma-separated query patch indices (default: 3 spread
                        # over the grid)
    map_images=2,       # attn_map: images shown per model
    seed=0,             # which images form the subset
    device="auto",      # auto | cpu | cuda
    fourier_at="blocks",  # fourier: "blocks" (embedding, after each block; paper Fig. 3b) or "half"
                        # (also after each attention residual, as how-do-vits-work plots it)
    top_k=2,            # hessian: eigenvalues of largest magnitude, by Lanczos
    lanczos_steps=100,  # hessian, landscape: at most this many Lanczos steps (= products)
    tol=1e-3,           # hessian: stop when every residual ||H y - lambda y|| <= tol |lambda|
    trace_products=50,  # hessian: products the trace rests on: the Lanczos basis (shared with the
                        # eigenvalues) + Rademacher samples on its complement for the rest
    trace_tol=0.0,      # hessian: > 0 stops the samples once standard error <= trace_tol |trace|
    keep_graphs=0,      # hessian, landscape: 1 keeps every batch's gradient graph between
                        # products (faster; the memory of n_images / batch_size graphs; one
                        # batch's graph is always kept)
    span=0.5,           # landscape: a, b in [-span, span] along the top-2 eigenvectors (unit norm)
    steps=21,           # landscape: grid points per axis
    human="",           # ood: model-vs-human raw-data folder (<dataset>/*.csv) for error
                        # consistency
)


# ----------------------------------------------------------------------------------------
# metrics on tensors: each takes attention maps (B, H, N+1, N+1) with CLS first, or tokens

def patch_log_attention(logits):
    """log of the patch-to-patch attention, CLS dropped: log a[q, k] = log_softmax_k(z[q, k]) over
    the patch keys, z the logits of a patch query (B, H, N+1, N+1), CLS first -> (B, H, N, N);
    exp of it is the attention. The same numbers as dropping the CLS row and column of the
    attention and renormalizing each row (cl-vs-mim), without the cancellation of renormalizing
    probabilities that are nearly all on CLS; the entropy takes the log exactly from here."""
    return logits[..., 1:, 1:].float().log_softmax(-1)


def patch_distances(grid, patch_size):
    """D[i, j] = patch_size * ||grid(i) - grid(j)||_2 in pixels: (N, N)"""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], -1).float()
    return patch_size * torch.cdist(coords, coords)


def attention_distance(a, grid, patch_size, distances=None):
    """average attention distance: per query sum_k a[q,k] D[q,k], mean over queries
    -> (B, H) pixels (one product of the flattened maps with the flattened D)"""
    D = patch_distances(grid, patch_size) if distances is None else distances
    return a.flatten(-2) @ D.to(a).flatten() / a.shape[-1]


def attention_entropy(a, log_a=None):
    """-sum_k a[q,k] log a[q,k] (nats), mean over queries -> (B, H). log_a: log a where it is
    known exactly (collect: the log-softmax of the logits), else log of a floored at 1e-30
    (0 log 0 = 0)"""
    log_a = torch.log(a.clamp_min(1e-30)) if log_a is None else log_a
    return -torch.linalg.vecdot(a.flatten(-2), log_a.flatten(-2)) / a.shape[-1]


def attention_nmi(a, entropy=None):
    """NMI between queries and keys with p(q) = 1/N: p(k) = mean_q a[q,k],
    I = sum_{q,k} p(q) a[q,k] log(a[q,k] / p(k)), NMI = I / sqrt(H(q) H(k)), H(q) = log N
    -> (B, H). Computed as I = H(k) - attention_entropy(a) (the same sum, rearranged); entropy:
    that attention entropy when already computed."""
    N = a.shape[-1]
    p_k = a.mean(-2)  # (B, H, N)
    h_k = -torch.linalg.vecdot(p_k, torch.log(p_k.clamp_min(1e-30)))
    mutual = (h_k - (attention_entropy(a) if entropy is None else entropy)).clamp_min(0)
    return mutual / torch.sqrt(math.log(N) * h_k).clamp_min(1e-12)


def diagonal_dft(grid, device=None):
    """(N, 2K) matrix W, K = G - G//2: tokens (N,) @ W = the real and imaginary parts of the 2-D
    DFT of the G x G map at the diagonal frequencies (k, k), k = 0..K-1:
    F(k, k) = sum_{y,x} f(y, x) exp(-2 pi i k (y + x) / G)"""
    K = grid - grid // 2
    n = torch.arange(grid * grid, dtype=torch.float64)
    k = torch.arange(K, dtype=torch.float64)
    phase = 2 * math.pi / grid * (n // grid + n % grid)[:, None] * k  # (N, K): k (y + x) 2 pi / G
    return torch.cat([phase.cos(), -phase.sin()], dim=1).to(device)


def relative_log_amplitude(tokens, grid, dft=None):
    """Fourier (how-do-vits-work): tokens (B, N, C) without CLS as (C, G, G) maps;
    log(|fft2| + 1e-6), DC centered, mean over channels; the diagonal from DC outward minus the
    DC value -> (B, G - G//2). Entry k is frequency k/G cycles per patch on both axes; the last
    is the highest (~pi). Only the diagonal is used, so only it is computed: one product with
    the DFT matrix at the diagonal frequencies, in float64 (the same numbers as fft2)."""
    W = diagonal_dft(grid, tokens.device) if dft is None else dft
    K = W.shape[1] // 2
    z = W.T @ tokens.double()  # (B, 2K, C): real and imaginary parts per channel
    spectrum = torch.hypot(z[:, :K], z[:, K:]).add(1e-6).log().mean(-1)  # (B, K)
    return spectrum - spectrum[:, :1]


def relative_log_singular_values(x):
    """x (..., M, C) samples: singular values of the covariance, log, minus the log of the
    largest -> (..., C) on the host (at most M-1 are nonzero; zeros are floored at 1e-12 of the
    largest, so their value is about -27.6). The covariance is symmetric PSD, so its singular
    values are its eigenvalues, and its nonzero ones are those of the smaller Gram matrix x x^T
    when M < C (the same numbers, much cheaper)."""
    x = x.double() - x.double().mean(-2, keepdim=True)
    M, C = x.shape[-2:]
    gram = x @ x.transpose(-1, -2) if M < C else x.transpose(-1, -2) @ x
    # the eigenvalues on the host: cuSOLVER, as torch 2.11-2.14 calls it for n > 32, solves a
    # batch one matrix after another (1.5 ms per 196 x 196 on an H200, 1.6 ms on one host core),
    # and collect runs the host's cores side by side
    s = torch.linalg.eigvalsh(gram.cpu() / max(M - 1, 1)).flip(-1).clamp_min(0)  # descending
    if M < C:
        s = torch.cat([s, s.new_zeros(*s.shape[:-1], C - M)], dim=-1)
    top = s[..., :1].clamp_min(1e-300)
    return torch.log(torch.maximum(s, top * 1e-12)) - torch.log(top)


def token_singular_spectrum(tokens):
    """token level: per image, the relative log singular values of its patch-token covariance
    -> (B, C); the svd headline per layer is the mean of the first min(N-1, C) (the nonzero ones):
    higher = fuller"""
    return relative_log_singular_values(tokens)


# ----------------------------------------------------------------------------------------
# decisions: shape bias, accuracy and error consistency

# ImageNet-1k indices of the 16 entry-level categories (bethgelab/model-vs-human,
# helper/human_categories.py; 207 classes in all)
IMAGENET_16 = {
    "airplane": [404], "bear": [294, 295, 296, 297], "bicycle": [444, 671],
    "bird": [8, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 22, 23, 24, 80, 81, 82, 83, 87, 88, 89,
             90, 91, 92, 93, 94, 95, 96, 98, 99, 100, 127, 128, 129, 130, 131, 132, 133, 135, 136,
             137, 138, 139, 140, 141, 142, 143, 144, 145],
    "boat": [472, 554, 625, 814, 914], "bottle": [440, 720, 737, 898, 899, 901, 907],
    "car": [436, 511, 817],
    "cat": [281, 282, 283, 284, 285, 286], "chair": [423, 559, 765, 857], "clock": [409, 530, 892],
    "dog": [152, 153, 154, 155, 156, 157, 158, 159, 160, 161, 162, 163, 164, 165, 166, 167, 168,
            169, 170, 171, 172, 173, 174, 175, 176, 177, 178, 179, 180, 181, 182, 183, 184, 185,
            186, 187, 188, 189, 190, 191, 193, 194, 195, 196, 197, 198, 199, 200, 201, 202, 203,
            205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217, 218, 219, 220, 221,
            222, 223, 224, 225, 226, 228, 229, 230, 231, 232, 233, 234, 235, 236, 237, 238, 239,
            240, 241, 243, 244, 245, 246, 247, 248, 249, 250, 252, 253, 254, 255, 256, 257, 259,
            261, 262, 263, 265, 266, 267, 268],
    "elephant": [385, 386], "keyboard": [508, 878], "knife": [499], "oven": [766],
    "truck": [555, 569, 656, 675, 717, 734, 864, 867],
}
OOD_DATASETS = ("edge", "silhouette", "cue-conflict", "colour", "contrast", "high-pass",
                "low-pass", "phase-scrambling", "power-equalisation", "false-colour", "rotation",
                "eidolonI", "eidolonII", "eidolonIII",
                "uniform-noise", "sketch", "stylized")
# the conditions of the 12 parametric datasets in plot order, and the name of that axis
# (bethgelab/model-vs-human, modelvshuman/datasets/experiments.py); the other 5 have none
OOD_CONDITIONS = {
    "colour": ("colour", ["cr", "bw"]),
    "contrast": ("contrast (%)", ["c100", "c50", "c30", "c15", "c10", "c05", "c03", "c01"]),
    "high-pass": ("filter std", ["inf", "3.0", "1.5", "1.0", "0.7", "0.55", "0.45", "0.4"]),
    "low-pass": ("filter std", ["0", "1", "3", "5", "7", "10", "15", "40"]),
    "phase-scrambling": ("phase noise width (deg)", ["0", "30", "60", "90", "120", "150", "180"]),
    "power-equalisation": ("power spectrum", ["0", "pow"]),
    "false-colour": ("colour", ["True", "False"]),
    "rotation": ("rotation angle (deg)", ["0", "90", "180", "270"]),
    "eidolonI": ("reach", [f"{2 ** k}-10-10" for k in range(8)]),
    "eidolonII": ("reach", [f"{2 ** k}-3-10" for k in range(8)]),
    "eidolonIII": ("reach", [f"{2 ** k}-0-10" for k in range(8)]),
    "uniform-noise": ("noise width", ["0.0", "0.03", "0.05", "0.1", "0.2", "0.35", "0.6", "0.9"]),
}
# conditions left out of every aggregate of the benchmark: the undistorted control, and those
# where humans score below 0.2 (modelvshuman/plotting/plot.py, EXCLUDE_CONDITIONS)
OOD_EXCLUDED = {
    "colour": ["cr"], "contrast": ["c100", "c03", "c01"],
    "high-pass": ["inf", "0.55", "0.45", "0.4"],
    "low-pass": ["0", "15", "40"], "phase-scrambling": ["0", "150", "180"],
    "power-equalisation": ["0"], "false-colour": ["True"], "rotation": ["0"],
    "eidolonI": ["1-10-10", "64-10-10", "128-10-10"],
    "eidolonII": ["1-3-10", "32-3-10", "64-3-10", "128-3-10"],
    "eidolonIII": ["1-0-10", "16-0-10", "32-0-10", "64-0-10", "128-0-10"],
    "uniform-noise": ["0.0", "0.6", "0.9"],
}
UNORDERED = ("colour", "power-equalisation", "false-colour")  # no axis to draw a curve along
TRIAL_COLUMNS = ("imagename", "condition", "category", "object_response")  # + subj


def category_decisions(logits, categories, model_classes=None):
    """the chosen category per image among `categories`: for an ImageNet-1k classifier the
    category whose ImageNet classes have the highest mean probability (model-vs-human); for other
    label sets, the highest logit among the model's classes with those names (a model without
    class names and one output per category: output i is categories[i]) -> (B,) indices"""
    if logits.shape[-1] == 1000 and set(categories) <= set(IMAGENET_16):
        probs = logits.float().softmax(-1)
        scores = torch.stack([probs[:, IMAGENET_16[c]].mean(-1) for c in categories], -1)
    else:
        if not model_classes and logits.shape[-1] == len(categories):
            model_classes = list(categories)
        missing = [c for c in categories if model_classes is None or c not in model_classes]
        if missing:
            raise ValueError(f"the model's classes {model_classes} lack the categories {missing}")
        scores = logits[:, [model_classes.index(c) for c in categories]]
    return scores.argmax(-1)


def decision_categories(labels, n_outputs, model_classes=None):
    """the categories a model chooses among: model-vs-human's 16 when the data's labels are among
    them and the model is an ImageNet-1k classifier or has all 16 (the benchmark ranks all 16:
    modelvshuman/datasets/decision_mappings.py, ImageNetProbabilitiesTo16ClassesMapping);
    otherwise every class named in the model's checkpoint, the data's labels among them, so that
    a subset of the data does not narrow the choice (a decision for a third class is neither
    shape nor texture). A model without class names has them in the data's order, as
    finetune.py's ImageFolder numbers the sorted class folders: output i is the i-th of the 16
    for a 16-way model, else of the data's sorted labels, of which it needs one output each"""
    sixteen = set(IMAGENET_16)
    decides_16 = n_outputs == 1000 or sixteen <= set(model_classes or ()) or (
        not model_classes and n_outputs == len(sixteen))
    if set(labels) <= sixteen and decides_16:
        return sorted(sixteen)
    if not model_classes:
        categories = sorted(set(labels))
        if n_outputs != len(categories):
            raise ValueError(f"the model names no classes and has {n_outputs} outputs, but the data has "
                             f"{len(categories)} categories {categories}: give a checkpoint that names "
                             "its classes (finetune.py saves them)")
        return categories
    missing = sorted(set(labels) - set(model_classes))
    if missing:
        raise ValueError(f"the model's classes {model_classes} lack the data's categories {missing}")
    return list(model_classes)


def shape_bias(decisions, shapes, textures):
    """over images whose shape and texture classes differ: shape hits / (shape hits + texture hits),
    overall and per shape class (None where a class has no hit of either kind)"""
    hits = {}
    for d, s, t in zip(decisions, shapes, textures):
        if s != t:
            h = hits.setdefault(s, [0, 0])
            h[0] += d == s
            h[1] += d == t
    total_shape, total_texture = sum(h[0] for h in hits.values()), sum(h[1] for h in hits.values())
    overall = total_shape / (total_shape + total_texture) if total_shape + total_texture else None
    per_class = {c: (h[0] / (h[0] + h[1]) if h[0] + h[1] else None)
                 for c, h in sorted(hits.items())}
    return overall, per_class


def error_consistency(correct_a, correct_b):
    """Cohen's kappa of two observers' trial-wise correctness: c_obs = fraction of trials both right
    or both wrong, c_exp = p1 p2 + (1 - p1)(1 - p2), kappa = (c_obs - c_exp) / (1 - c_exp), and 1
    where c_obs = 1 (modelvshuman/plotting/analyses.py, ErrorConsistency; c_exp = 1 only then)"""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    p1, p2 = a.mean(), b.mean()
    c_obs = (a == b).mean()
    c_exp = p1 * p2 + (1 - p1) * (1 - p2)
    return 1.0 if c_obs == 1 else float((c_obs - c_exp) / (1 - c_exp))


def cue_conflict_labels(path):
    """shape class = the folder; texture class = the file name after the last '_' or '-', digits
    dropped: 'cat/cat3-elephant1.png' (texture-vs-shape) or 'star/star0007_circle.png' (embedded)"""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(path)), re.sub(r"\d+$", "", re.split(r"[_-]", stem)[-1])


def short_image_name(name):
    """an image's identity across observers (modelvshuman/helper/plotting_helper.py,
    get_short_imagename): the last '_' field of the file name, or the last two when the one before
    is an ImageNet synset ('n0...'). The fields before it are the trial's number, the experiment,
    the observer, the condition and the category, so a human's and a model's trial on one image
    share it: '0001_cl_s01_cr_oven_40_n04111531_14126.png' (subject-01) and
    '0001_cl_dnn_cr_oven_40_n04111531_14126.png' (a model) -> 'n04111531_14126.png'; a name
    without '_' ('airplane1-bicycle2.png', cue-conflict) is itself"""
    fields = os.path.basename(name).split("_")
    if len(fields) > 1 and fields[-2].startswith("n0"):
        return "_".join(fields[-2:])
    return fields[-1]


def condition_key(condition):
    """a condition as the benchmark compares it: pandas reads a column of numbers as numbers, so
    '3' (a human CSV) and '3.0' (experiments.py) are one high-pass condition"""
    try:
        value = float(condition)
    except ValueError:
        return condition
    return "nan" if math.isnan(value) else value


def hidden(name):
    """a file or folder name that starts with '.': macOS's '._' AppleDouble files and .DS_Store, a
    notebook's .ipynb_checkpoints/, which are not data"""
    return name.startswith(".")


def ood_images(folder):
    """one model-vs-human dataset folder -> [(path, condition, category)], in either layout of its
    release (modelvshuman/datasets/base.py, Dataset.contains_sessions; datasets/info_mappings.py):
    dnn/session-N/<trial>_<experiment>_dnn_<condition>_<category>_<image>.png for 14 datasets
    (InfoMappingWithSessions), <category>/<image>.png for cue-conflict, edge and silhouette
    (ImageNetInfoMapping, condition 'NaN'); hidden entries are skipped"""
    images = []
    sessions = os.path.join(folder, "dnn")
    if os.path.isdir(sessions):
        for session in sorted(os.listdir(sessions)):
            d = os.path.join(sessions, session)
            for f in sorted(os.listdir(d)) if os.path.isdir(d) and not hidden(session) else []:
                if hidden(f) or not f.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                fields = f.split("_")
                if len(fields) < 6:
                    raise DataError(f"'{os.path.join(d, f)}' is not named <trial>_<experiment>_dnn_"
                                    "<condition>_<category>_<image>, as model-vs-human names the "
                                    "images of a session folder")
                images.append((os.path.join(d, f), fields[3], fields[4]))
    else:
        for category in sorted(os.listdir(folder)):
            d = os.path.join(folder, category)
            files = sorted(os.listdir(d)) if os.path.isdir(d) and not hidden(category) else []
            images += [(os.path.join(d, f), "NaN", category) for f in files
                       if not hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise DataError(f"no images in '{folder}': a model-vs-human dataset folder holds "
                        "dnn/session-1/*.png or <category>/*.png")
    return images


def human_trials(folder):
    """the human observers' trials in a model-vs-human raw-data folder (<dataset>/*.csv) ->
    {subject: (its first CSV, [(imagename, condition, category, response)])}. Column names are read
    in any case (modelvshuman/helper/plotting_helper.py, read_all_csv_files_from_directory lowers
    them); only subjects named 'subject-...' are humans, as the benchmark's own evaluation writes
    its models' CSVs into the same folders (modelvshuman/plotting/plot.py,
    get_human_and_CNN_subjects). Text is UTF-8, a byte order mark skipped, as pandas.read_csv reads
    it (plotting_helper.py, read_data)"""
    subjects = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".csv"):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM is no part of a name
                reader = csv.DictReader(f)
                columns = {c.strip().lower(): c for c in reader.fieldnames or []}
                missing = [c for c in ("subj",) + TRIAL_COLUMNS if c not in columns]
                if missing:
                    raise DataError(f"{path} lacks the column(s) {', '.join(missing)}: "
                                    "model-vs-human's raw-data CSVs have subj, "
                                    f"{', '.join(TRIAL_COLUMNS)}")
                for row in reader:
                    values = [row[columns[c]] for c in ("subj",) + TRIAL_COLUMNS]
                    if None in values:  # fewer fields than the header (an unclosed quote ends so too)
                        raise DataError(f"{path}, line {reader.line_num}: a row with fewer fields than "
                                        f"the header's {len(reader.fieldnames)}: the file is cut or damaged")
                    subject, trial = values[0], tuple(values[1:])
                    if subject.startswith("subject-"):
                        subjects.setdefault(subject, (path, []))[1].append(trial)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x}): save it as "
                            "UTF-8, the encoding model-vs-human's pandas.read_csv reads") from None
        except csv.Error as e:  # a field over csv's size limit, a NUL byte: not a CSV of trials
            raise DataError(f"{path}, after line {reader.line_num}: not a CSV of trials ({e})") from None
        except OSError as e:  # a folder named *.csv, no permission
            raise DataError(f"{path} cannot be read: {e.strerror}") from None
    return subjects


def ood_scores(name, model_trials, humans=None, images_at="the model's trials", unreadable=()):
    """the benchmark's numbers for one dataset from trials (imagename, condition, category,
    response) of the model and of each human subject, matched by short image name within a
    condition (modelvshuman/plotting/analyses.py, ErrorConsistency.analysis: per condition, sorted
    by image_id). accuracy = fraction of trials with response == category over the benchmark's
    conditions (the excluded ones dropped: plotting/plot.py, get_mean_over_datasets), also per
    condition and over all trials. error_consistency: per subject, kappa per benchmark condition,
    mean over conditions; then the mean over subjects (plot.py, get_raw_benchmark_df and
    format_benchmark_df). cue-conflict, edge, silhouette, sketch, stylized: one condition.
    unreadable: (imagename, condition) of the dataset's images that could not be read; the humans'
    trials on them are left out and counted (human_trials_unreadable), not taken for images missing
    from the release."""
    parametric = name in OOD_CONDITIONS
    excluded = {condition_key(c) for c in OOD_EXCLUDED.get(name, [])}

    def key(image, condition):
        return condition_key(condition) if parametric else None, short_image_name(image)

    correct, per_condition = {}, {}
    for image, condition, category, response in model_trials:
        k = key(image, condition)
        if k in correct:
            where = f" in condition '{condition}'" if parametric else ""
            raise DataError(f"two images of {name} are both '{k[1]}'{where}: trials are matched to "
                            "the humans' by that name")
        correct[k] = response == category
        per_condition.setdefault(k[0], []).append(correct[k])
    kept = [c for (condition, _), c in correct.items() if condition not in excluded]
    result = dict(accuracy=float(np.mean(kept)) if kept else None,
                  accuracy_all_trials=float(np.mean(list(correct.values()))), images=len(correct),
                  unreadable_images=len(unreadable))
    if parametric:  # in the benchmark's order, named as experiments.py names them
        conditions = OOD_CONDITIONS[name][1]
        rank = {condition_key(c): i for i, c in enumerate(conditions)}
        order = sorted(per_condition, key=lambda c: rank.get(c, len(rank)))
        names = [conditions[rank[c]] if c in rank else str(c) for c in order]
        accuracies = [float(np.mean(per_condition[c])) for c in order]
        result["accuracy_per_condition"] = dict(zip(names, accuracies))
        result["excluded_conditions"] = OOD_EXCLUDED[name]
    if humans is None:
        return result
    skipped = {key(image, condition) for image, condition in unreadable}
    per_subject, matched = {}, 0
    for subject, (path, all_trials) in sorted(humans.items()):
        trials = [t for t in all_trials if key(t[0], t[1]) not in skipped]
        matched += len(trials)
        missing = [t for t in trials if key(t[0], t[1]) not in correct]
        if missing:
            image, condition = missing[0][:2]
            raise DataError(f"{path}: {len(missing)} of the {len(all_trials)} trials of {subject} show "
                            f"images that are not in {images_at} (first: '{image}', condition "
                            f"'{condition}', short name '{short_image_name(image)}'): give the "
                            "dataset folder of the same model-vs-human release")
        pairs = {}  # condition -> (model correct, human correct) per trial
        for image, condition, category, response in trials:
            k = key(image, condition)
            if k[0] not in excluded:
                model_correct, human_correct = pairs.setdefault(k[0], ([], []))
                model_correct.append(correct[k])
                human_correct.append(response == category)
        if pairs:
            kappas = [error_consistency(m, h) for m, h in pairs.values()]
            per_subject[subject] = float(np.mean(kappas))
    values = list(per_subject.values())
    result.update(error_consistency=float(np.mean(values)) if values else None,
                  error_consistency_per_subject=per_subject, subjects=len(values),
                  human_trials_matched=matched,
                  human_trials_unreadable=sum(len(t) for _, t in humans.values()) - matched)
    return result


def ood_summary(datasets):
    """the benchmark's two aggregates: OOD accuracy and error consistency, each the mean over the
    datasets of their values (modelvshuman/plotting/plot.py, get_mean_over_datasets and
    format_benchmark_df); datasets_found says how many of the 17 went in"""
    accuracies = [r["accuracy"] for r in datasets.values() if r["accuracy"] is not None]
    kappas = [r["error_consistency"] for r in datasets.values()
              if r.get("error_consistency") is not None]
    return dict(datasets=datasets, mean_accuracy=float(np.mean(accuracies)) if accuracies else None,
                datasets_found=len(datasets),
                mean_error_consistency=float(np.mean(kappas)) if kappas else None,
                datasets_with_humans=len(kappas))


# ----------------------------------------------------------------------------------------
# one pass over the images, accumulating every metric per layer

# collect's spectra workers, kept for the process (see there): every core but the one that drives
# the forward, at least one. Several run one thread each: a worker with torch's default starts an
# OpenMP team of all cores beside this thread's (2 cores: eigvalsh of 196 x 196 took 20 ms
# instead of 2, and slowed this thread's next ops as well). A single worker (2 cores) keeps the
# default: on tiny/4 it is the critical path and uses both cores while this thread waits
# (--metric all 1.9x-2.2x the plain forwards; 2.4x-2.5x with the worker on one thread).
HOST_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SPECTRA_WORKERS = max(1, HOST_CORES - 1)
ONE_THREAD_EACH = torch.set_num_threads if SPECTRA_WORKERS > 1 else None  # initializer of each worker
SPECTRA_POOL = ThreadPoolExecutor(SPECTRA_WORKERS, initializer=ONE_THREAD_EACH, initargs=(1,))


@torch.no_grad()
def collect(model, loader, device, want, map_request=None, fourier_at="blocks"):
    """Sums over images of every per-image metric, per layer, from one forward per batch that
    keeps the attention logits (explicit attention path) and the states analysis reads.
    Fourier points: 0 = embeddings, 2l = after block l, 2l - 1 = after block l's attention
    residual (read only with fourier_at="half"). Sums stay on the device until the end.
    The svd metric's float64 eigenvalues, one small eigenproblem per image and layer, solved on
    the host, run on SPECTRA_POOL while the forward goes on (torch releases the GIL in its ops):
    one task per layer and batch, as many at once as there are workers. The workers live as long
    as the process (a new thread per call measured slower than none on tiny/4: 3.1x the plain
    forwards against 2.4x). On a GPU this takes the solves off cuSOLVER, which torch has solve
    them one after another (H200, 16 cores, one batch of 64 images: B/16's 768 matrices take
    1151 ms there and 243 ms on 16 host threads; tiny/4's 384 take 125 ms and 5.7 ms; measured
    by tools/eigen_probe.py). The other metrics are parallel tensor ops and stay on this thread."""
    cfg = model.config
    sums, count, pooled, maps = {}, 0, [], []
    distances = patch_distances(cfg.grid, cfg.patch_size).to(device)
    dft = diagonal_dft(cfg.grid, device)
    attention = want & {"attn_distance", "attn_entropy", "nmi"}
    spectra = []  # (key, the spectra (B, C) being computed on SPECTRA_POOL)

    def add(key, value):  # value: (B, ...) per image -> running sum
        sums[key] = sums.get(key, 0) + value.double().sum(0)

    def add_spectra(keep):  # the spectra from the workers, all but the `keep` last
        while len(spectra) > keep:
            key, future = spectra.pop(0)
            add(key, future.result())

    def states(point, x):  # the metrics of the token states x (B, N+1, D) at a Fourier point
        tokens = x[:, 1:]
        if "fourier" in want and (point % 2 == 0 or fourier_at == "half"):
            add(("fourier", point), relative_log_amplitude(tokens, cfg.grid, dft))
        if "svd" in want and point > 0 and point % 2 == 0:
            spectrum = SPECTRA_POOL.submit(token_singular_spectrum, tokens)
            spectra.append((("svd_token", point // 2), spectrum))
            pooled[-1].append(tokens.mean(1).float())  # (B, C)

    for images, _, _, _ in tqdm(loader, desc="  batches", leave=False, disable=None):
        if images is None:
            continue
        images = images.to(device)
        count += len(images)
        pooled.append([])
        x = model.embed(images)  # the layers of ViT.forward_all, read as they are computed
        bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        states(0, x)
        for layer, block in enumerate(model.blocks):
            mid, logits = block.attention_residual(x, bias, return_attn="logits")
            x = block.mlp_residual(mid)
            states(2 * layer + 1, mid)
            states(2 * layer + 2, x)
            show = map_request is not None and layer == map_request["layer"]
            if not attention and not show:
                continue
            log_a = patch_log_attention(logits)  # (B, H, N, N)
            a = log_a.exp()
            if "attn_distance" in want:
                distance = attention_distance(a, cfg.grid, cfg.patch_size, distances)
                add(("attn_distance", layer), distance)
            if want & {"attn_entropy", "nmi"}:
                entropy = attention_entropy(a, log_a)  # shared by both
            if "attn_entropy" in want:
                add(("attn_entropy", layer), entropy)
            if "nmi" in want:
                add(("nmi", layer), attention_nmi(a, entropy))
            if show and sum(len(m[0]) for m in maps) < map_request["images"]:  # the images kept
                maps.append((images.cpu(), a[:, :, map_request["queries"]].mean(1).cpu()))
        add_spectra(keep=cfg.depth)  # all but this batch's: at most two batches are held
    add_spectra(keep=0)
    if count == 0:
        raise DataError("no image of the chosen subset could be read")
    stats = {k: (v / count).cpu() for k, v in sums.items()}
    stats["count"] = count
    if "svd" in want:
        stats["pooled"] = torch.cat([torch.stack(p) for p in pooled], dim=1).cpu()  # (L, images, C)
    if maps:
        shown = map_request["images"]
        images, attention = torch.cat([m[0] for m in maps]), torch.cat([m[1] for m in maps])
        stats["maps"] = (images[:shown], attention[:shown])
    return stats


def summarize(metric, stats, cfg, fourier_at="blocks"):
    """per-model JSON entry of a metric from the collected stats"""
    depth = cfg.depth
    if metric in ("attn_distance", "attn_entropy", "nmi"):
        per_head = [stats[(metric, l)].tolist() for l in range(depth)]
        return dict(per_layer=[float(np.mean(h)) for h in per_head], per_head=per_head)
    if metric == "fourier":
        points = range(2 * depth + 1) if fourier_at == "half" else range(0, 2 * depth + 1, 2)
        spectra = [stats[("fourier", p)].tolist() for p in points]
        names = ["embedding"] + [f"block {(p + 1) // 2}" + (" attention" if p % 2 else "")
                                 for p in points if p]
        return dict(per_layer=[stats[("fourier", 2 * l)][-1].item() for l in range(1, depth + 1)],
                    embedding=spectra[0][-1], spectrum=spectra, points=names,
                    depth=[p / 2 for p in points],
                    frequencies_pi=[2 * k / cfg.grid for k in range(len(spectra[0]))])
    if metric == "svd":
        n = stats["count"]
        token = [stats[("svd_token", l)].tolist() for l in range(1, depth + 1)]
        image = [relative_log_singular_values(stats["pooled"][l]).tolist() for l in range(depth)]
        # covariance ranks: <= tokens - 1 per image, <= images - 1 across images; the rest are zeros
        token_usable = min(cfg.num_patches - 1, cfg.embed_dim)
        image_usable = min(n - 1, cfg.embed_dim)
        return dict(per_layer=[float(np.mean(t[:token_usable])) for t in token],
                    token_spectrum=token, image_spectrum=image, token_usable=token_usable,
                    image_usable=image_usable,
                    token_average=np.mean(token, 0).tolist(),
                    image_average=np.mean(image, 0).tolist())
    raise ValueError(metric)


# ----------------------------------------------------------------------------------------
# figures (matplotlib is optional: without it only the JSON is written)

def no_figure(path):
    """without matplotlib: an older figure at path goes, so that no figure shows other results than
    the JSON beside it (the report would caption it with the new models) -> False"""
    older = os.path.isfile(path)
    if older:
        os.remove(path)
    print("(no figure: pip install matplotlib to get the PNG; the JSON is written"
          + (f"; the older {path} is removed" if older else "") + ")")
    return False


def plot(metric, results, path, maps=None):
    plt = pyplot()
    if plt is None:
        return no_figure(path)
    labels = list(results)
    if metric in CLASSIFIER + ("sharpness",):
        fig = plot_classifier(plt, metric, results)
        fig.tight_layout()
        save_figure(fig, path, 110)
        plt.close(fig)
        return True
    if metric in ("attn_distance", "nmi", "fourier"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, label in enumerate(labels):
            r = results[label]
            layers = np.arange(1, len(r["per_layer"]) + 1)
            if metric == "attn_distance":  # Fig. 3a: every head as a dot, the head mean as a line
                heads = np.array(r["per_head"])
                ax.scatter(np.repeat(layers, heads.shape[1]), heads.flatten(), s=8, alpha=0.35,
                           color=f"C{i}")
            if metric == "fourier":  # embedding at depth 0; half-block points at l - 0.5
                highest = [s[-1] for s in r["spectrum"]]
                ax.plot(r["depth"], highest, marker="o", color=f"C{i}", label=label)
                continue
            ax.plot(layers, r["per_layer"], marker="o", color=f"C{i}", label=label)
        first = results[labels[0]]
        halves = metric == "fourier" and any(p.endswith("attention") for p in first["points"])
        for l in range(1, len(first["per_layer"]) + 1) if halves else ():  # how-do-vits-work: attention shaded
            ax.axvspan(l - 1, l - 0.5, color="tab:gray", alpha=0.15, lw=0)
        ylabel = {"attn_distance": "attention distance (pixels)",
                  "nmi": "normalized mutual information",
                  "fourier": "Δ log amplitude at the highest frequency"}[metric]
        xlabel = "depth (blocks; shaded: attention halves)" if halves else "depth (blocks)"
        xlabel = xlabel if metric == "fourier" else "block"
        title = {"attn_distance": "Average attention distance (Fig. 3a)",
                 "nmi": "NMI of queries and keys (Fig. 6a)",
                 "fourier": "Relative log amplitude (Fig. 3b)"}[metric]
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    elif metric == "attn_entropy":  # Fig. 10: the distribution over heads, per layer
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            heads = np.array(results[label]["per_head"])
            pos = np.arange(1, heads.shape[0] + 1) + (i - (len(labels) - 1) / 2) * width
            parts = ax.boxplot(heads.T, positions=pos, widths=width * 0.9, patch_artist=True,
                               showfliers=False)
            for box in parts["boxes"]:
                box.set(facecolor=f"C{i}", alpha=0.5)
            ax.plot([], [], color=f"C{i}", label=label, lw=6, alpha=0.5)
        blocks = range(1, max(len(r["per_head"]) for r in results.values()) + 1)
        ax.set_xticks(list(blocks), labels=[str(l) for l in blocks])
        ax.set(xlabel="block", ylabel="attention entropy (nats) over heads",
               title="Attention entropy per head (Fig. 10)")
    elif metric == "svd":  # Figs. 4, 5: spectra per layer, lighter = deeper
        fig, axes = plt.subplots(2, len(labels), figsize=(4 * len(labels) + 1, 7), squeeze=False,
                                 constrained_layout=True)
        depth = max(len(r["token_spectrum"]) for r in results.values())
        for i, label in enumerate(labels):
            r = results[label]
            for row, key in enumerate(("token_spectrum", "image_spectrum")):
                ax = axes[row, i]
                spectra = r[key]
                shown = r["image_usable"] if key == "image_spectrum" else r["token_usable"]
                for l, s in enumerate(spectra):
                    ax.plot(s[:shown], color=plt.cm.viridis(l / max(depth - 1, 1)), lw=1)
                level = "token" if row == 0 else "image"
                ax.set(title=f"{label}: {level} level", xlabel="singular value index",
                       ylabel="Δ log singular value")
        depth_colours = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(1, depth))
        fig.colorbar(depth_colours, ax=axes, label="block")
    elif metric == "attn_map":  # Fig. 2: query patch boxed, its attention overlaid
        rows = [(label, img, att) for label in labels for img, att in zip(*maps[label])]
        columns = max(len(results[label]["queries"]) for label in labels)
        figsize = (2.2 * (columns + 1), 2.2 * len(rows))
        fig, axes = plt.subplots(len(rows), columns + 1, figsize=figsize, squeeze=False)
        for r, (label, img, att) in enumerate(rows):
            queries, block = results[label]["queries"], results[label]["layer"] + 1
            first_row = r == 0 or rows[r - 1][0] != label  # each model's first row is titled
            grid = int(round(att.shape[-1] ** 0.5))
            H, W = img.shape[-2:]
            axes[r, 0].imshow(img.permute(1, 2, 0).numpy())
            axes[r, 0].set_ylabel(label, fontsize=8)
            for c, q in enumerate(queries):
                ax = axes[r, c + 1]
                heat = att[c].reshape(1, 1, grid, grid)
                heat = torch.nn.functional.interpolate(heat, size=(H, W), mode="nearest")
                heat = heat[0, 0].numpy()
                ax.imshow(img.permute(1, 2, 0).numpy())
                ax.imshow(heat, cmap="inferno", alpha=0.6)
                y, x = divmod(q, grid)
                corner = (x * W / grid - 0.5, y * H / grid - 0.5)
                box = plt.Rectangle(corner, W / grid, H / grid, fill=False, ec="red", lw=1.5)
                ax.add_patch(box)
                ax.set_title(f"block {block}, query {q}" if first_row else "", fontsize=8)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
            for ax in axes[r, len(queries) + 1:]:
                ax.axis("off")
        fig.suptitle("Attention of the query patch (red box)")
    if metric != "attn_map" and metric != "svd":
        ax.legend()
        ax.grid(alpha=0.3)
    if metric != "svd":
        fig.tight_layout()
    save_figure(fig, path, 110)
    plt.close(fig)
    return True


def plot_classifier(plt, metric, results):
    labels = list(results)
    if metric == "ood":
        return plot_ood(plt, results)
    if metric == "landscape":  # Fig. 7a/b: contours of the loss around the weights
        fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), squeeze=False)
        for ax, label in zip(axes[0], labels):
            r = results[label]
            c = ax.contourf(r["coords"], r["coords"], np.array(r["loss"]).T, levels=20,
                            cmap="viridis")
            fig.colorbar(c, ax=ax, label="loss")
            ax.plot(0, 0, "r+")
            ax.set(title=label, xlabel="along eigenvector 1", ylabel="along eigenvector 2")
        return fig
    fig, ax = plt.subplots(figsize=(7, 4))
    if metric == "sharpness":  # Fig. 7c/f: top eigenvalue and trace during fine-tuning
        twin = ax.twinx()
        for i, label in enumerate(labels):
            log = results[label]
            its = [e["iter"] for e in log]
            ax.plot(its, [e["eigenvalue"] for e in log], color=f"C{i}", marker="o",
                    label=f"{label}: top eigenvalue")
            # one point: a marker
            twin.plot(its, [e["trace"] for e in log], color=f"C{i}", ls="--", marker="x",
                      label=f"{label}: trace")
        ax.set(xlabel="iteration", ylabel="top Hessian eigenvalue (sharpness)",
               title="Sharpness during fine-tuning (Fig. 7c, 7f)")
        twin.set_ylabel("Hessian trace (dashed, x)")
        handles, names = (sum(pair, []) for pair in zip(ax.get_legend_handles_labels(),
                                                        twin.get_legend_handles_labels()))
        ax.legend(handles, names, fontsize=8)  # both axes' lines
    elif metric == "hessian":
        k = len(results[labels[0]]["eigenvalues"])
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            r = results[label]
            ax.bar(np.arange(k + 1) + i * width, r["eigenvalues"] + [r["trace"]], width,
                   yerr=[0] * k + [r["trace_stderr"]], label=label)
        ticks = np.arange(k + 1) + width * (len(labels) - 1) / 2
        ax.set_xticks(ticks, labels=[f"λ{j + 1}" for j in range(k)] + ["trace"])
        ax.set(ylabel="value", title="Hessian top eigenvalues and trace")
    else:  # shape_bias, Fig. 8a / 11: shape bias per class and overall
        classes = sorted({c for r in results.values() for c in r["per_class"]})
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            r = results[label]
            values = [r["per_class"].get(c) for c in classes] + [r["shape_bias"]]
            xs = np.arange(len(classes) + 1) + i * width
            ax.bar(xs, [v or 0 for v in values], width, label=label)
            # no shape or texture decision: no value, not a bias of 0
            for x, value in zip(xs, values):
                if value is None:
                    ax.text(x, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=7,
                            color="gray")
        ticks = np.arange(len(classes) + 1) + width * (len(labels) - 1) / 2
        ax.set_xticks(ticks, labels=classes + ["overall"], rotation=45)
        ax.set(ylim=(0, 1), ylabel="shape bias (fraction of shape decisions)",
               title="Shape vs texture decisions on cue-conflict images")
    if ax.get_legend() is None:  # (sharpness made its own)
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_ood(plt, results):
    """Fig. 12 as model-vs-human draws it: error consistency against OOD accuracy, one point per
    model (modelvshuman/plotting/plot.py, plot_scatterplot; 0 = the consistency of independent
    observers), then the accuracy per condition of each dataset with an ordered condition axis"""
    labels = list(results)
    found = [d for d in OOD_DATASETS if any(d in r["datasets"] for r in results.values())]
    curves = [d for d in found if d in OOD_CONDITIONS and d not in UNORDERED]
    cols = min(4, 1 + len(curves))
    rows = math.ceil((1 + len(curves)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.3 * rows), squeeze=False)
    axes = axes.flatten()
    ax = axes[0]
    if any(r.get("mean_error_consistency") is not None for r in results.values()):
        for i, label in enumerate(labels):
            r = results[label]
            if r.get("mean_error_consistency") is not None:
                ax.scatter(r["mean_accuracy"], r["mean_error_consistency"], color=f"C{i}",
                           label=label)
        ax.axhline(0, color="gray", ls="--", lw=0.8)
        ax.set(xlabel="OOD accuracy", ylabel="error consistency (kappa)",
               title="Error consistency vs OOD accuracy")
    else:  # no human data: the accuracy per dataset
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            accuracies = [results[label]["datasets"].get(n, {}).get("accuracy") or 0 for n in found]
            ax.bar(np.arange(len(found)) + i * width, accuracies, width, color=f"C{i}", label=label)
        ticks = np.arange(len(found)) + width * (len(labels) - 1) / 2
        ax.set_xticks(ticks, labels=found, rotation=60, ha="right", fontsize=7)
        ax.set(ylim=(0, 1), ylabel="accuracy", title="OOD accuracy per dataset")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for ax, name in zip(axes[1:], curves):
        axis_name, conditions = OOD_CONDITIONS[name]
        for i, label in enumerate(labels):
            per = results[label]["datasets"].get(name, {}).get("accuracy_per_condition", {})
            xs = [j for j, c in enumerate(conditions) if c in per]
            ax.plot(xs, [per[conditions[j]] for j in xs], marker="o", ms=3, color=f"C{i}")
        ax.axhline(1 / 16, color="gray", ls=":", lw=0.8)  # chance among 16 categories
        ax.set_xticks(range(len(conditions)), labels=conditions, rotation=45, fontsize=7)
        ax.set(ylim=(0, 1), title=name, xlabel=axis_name, ylabel="accuracy")
        ax.grid(alpha=0.3)
    for ax in axes[1 + len(curves):]:
        ax.axis("off")
    return fig


# ----------------------------------------------------------------------------------------
# command line

def parse_args(argv):
    """--key=value options (defaults above) and positional model arguments; one clear line on
    error"""
    if "--help" in argv or "-h" in argv:  # the docstring, then the options as DEFAULTS writes them
        source = open(__file__).read()
        block = source[source.index("DEFAULTS = dict(\n"):].split("\n)\n")[0]
        print_help(__doc__.strip() + "\n\noptions (--key=value):\n" + block.split("\n", 1)[1])
    opts, models = dict(DEFAULTS), []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if key not in opts:
                known = ", ".join("--" + k for k in opts)
                raise SystemExit(f"error: unknown option '--{key}': options are {known}")
            if not eq:  # --key value
                value = next(args, None)
                if value is None:
                    raise SystemExit(f"error: option '--{key}' needs a value")
            try:
                opts[key] = type(DEFAULTS[key])(value)
            except ValueError:
                kind = type(DEFAULTS[key]).__name__
                raise SystemExit(f"error: --{key}={value}: '{key}' must be {kind}") from None
            if isinstance(opts[key], float) and not math.isfinite(opts[key]):
                raise SystemExit(f"error: --{key}={value}: '{key}' must be a finite number")
            # the shell leaves ~ after --key=
            if isinstance(opts[key], str) and opts[key].startswith("~"):
                opts[key] = os.path.expanduser(opts[key])
        else:
            models.append(arg)
    if not opts["metric"]:
        raise SystemExit(f"error: give --metric=NAME (one of {', '.join(METRICS)} or all): "
                         "python analyze.py --metric NAME CKPT [CKPT ...]")
    if opts["metric"] not in METRICS + ("all",):
        raise SystemExit(f"error: unknown metric '{opts['metric']}': "
                         f"choose one of {', '.join(METRICS)} or all")
    if not models:
        raise SystemExit("error: no model given: python analyze.py --metric NAME CKPT [CKPT ...]")
    if opts["fourier_at"] not in ("blocks", "half"):
        raise SystemExit(f"error: --fourier_at={opts['fourier_at']}: choose blocks or half")
    queries = [q.strip() for q in opts["queries"].split(",")] if opts["queries"] else []
    if not all(q.isdigit() for q in queries):
        raise SystemExit(f"error: --queries={opts['queries']}: give comma-separated patch indices, "
                         f"e.g. --queries=0,98,195")
    at_least_one = ("n_images", "batch_size", "map_images", "top_k", "lanczos_steps", "trace_products")
    checks = [(opts[name] >= 1, f"--{name}={opts[name]} must be >= 1") for name in at_least_one]
    checks += [(opts["steps"] >= 2, f"--steps={opts['steps']} must be >= 2 (grid points per axis)"),
               (opts["span"] > 0, f"--span={opts['span']} must be > 0"),
               (opts["tol"] >= 0 and opts["trace_tol"] >= 0, "--tol and --trace_tol must be >= 0"),
               (opts["top_k"] <= opts["lanczos_steps"], f"--top_k={opts['top_k']} needs --lanczos_steps >= "
                                                        f"{opts['top_k']}: each Lanczos step adds one eigenvalue")]
    problem = option_error(opts, checks)
    if problem:
        raise SystemExit(f"error: {problem}")
    return opts, models


def ood_folders(opts):
    """the model-vs-human datasets under --data: [(name, folder)]; none, or a --human that is not a
    folder, is one line"""
    root = resolve_data_dir("embedded") if opts["data"] == "embedded" else opts["data"]
    some = ", ".join(f"{d}/" for d in OOD_DATASETS[:3])
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data={root} is not a folder: give model-vs-human's datasets/ folder "
                         f"({some} ... the 17 OOD datasets)")
    found = [d for d in OOD_DATASETS if os.path.isdir(os.path.join(root, d))]
    if not found:
        raise SystemExit(f"error: none of the 17 OOD datasets ({some} ...) is under '{root}': give "
                         f"model-vs-human's datasets/ folder with --data")
    if opts["human"] and not os.path.isdir(opts["human"]):
        raise SystemExit(f"error: --human={opts['human']} is not a folder: give model-vs-human's "
                         "raw-data/ (<dataset>/*.csv)")
    return [(name, os.path.join(root, name)) for name in found]


def check_humans(opts, datasets):
    """--human before any work: some of the datasets [(name, folder)] have human trials under it
    (<name>/*.csv), else one line; those without are named in a warning (no error consistency)"""
    def has_trials(name):
        folder = os.path.join(opts["human"], name)
        return os.path.isdir(folder) and any(f.endswith(".csv") for f in os.listdir(folder))
    without = [name for name, _ in datasets if not has_trials(name)]
    if len(without) == len(datasets):
        raise DataError(f"--human={opts['human']} holds no human trials of the datasets found "
                        f"({', '.join(f'{name}/*.csv' for name in without)} are not there): give "
                        "model-vs-human's raw-data/ folder (<dataset>/*.csv)")
    if without:
        print(f"warning: --human={opts['human']} holds no human trials of {', '.join(without)}: "
              "no error consistency for them", file=sys.stderr)


def image_folder(opts, default_split):
    """the ImageFolder to read: data/split when --split is given (an error where it is not
    there), else data/default_split if present, else data itself"""
    root = resolve_data_dir(opts["data"])
    split = opts["split"] or default_split
    if os.path.isdir(os.path.join(root, split)):
        return ImageFolder(os.path.join(root, split), None)
    if opts["split"]:
        raise DataError(f"no folder '{opts['split']}' under '{root}'")
    return ImageFolder(root, None)


def subset_of(dataset, opts):
    """the images analysed: opts["n_images"] indices of the dataset in an order seeded by
    opts["seed"], the same for every model and metric"""
    order = np.random.default_rng(opts["seed"]).permutation(len(dataset))
    return order[:opts["n_images"]].tolist()


def label_outputs(metric, cfg, classes, dataset):
    """data label -> the output of a classifier with config cfg, for metric (hessian, landscape).
    classes: the class names of its outputs, where its checkpoint has them; the data's class
    folders must be those names, in any order: each image's label is the output of its folder's
    name"""
    if cfg.num_classes == 0 or (cfg.num_classes != len(dataset.classes) and not classes):
        raise ValueError(f"{metric} needs a classifier for the data's {len(dataset.classes)} "
                         f"classes; this model has {cfg.num_classes or 'no'} outputs: fine-tune it "
                         "first")
    if not classes:
        return torch.arange(len(dataset.classes))
    if sorted(classes) != dataset.classes:  # named outputs (a count that differs included)
        only_model = sorted(set(classes) - set(dataset.classes))
        only_data = sorted(set(dataset.classes) - set(classes))
        raise ValueError(f"the model's classes are not the class folders under '{dataset.root}': "
                         f"{only_model} only in the model, {only_data} only in the data: give the data "
                         "the model was fine-tuned on")
    return torch.tensor([list(classes).index(c) for c in dataset.classes])


def labelled_batches(model, dataset, subset, opts, device, classes=None):
    """the subset as a list of (images, labels) on the device, for the loss of a classifier (labels:
    label_outputs)"""
    output = label_outputs(opts["metric"], model.config, classes, dataset)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, subset),
                                         batch_size=opts["batch_size"], collate_fn=collate)
    batches = [(x.to(device), output[y].to(device)) for x, y, _, _ in loader if x is not None]
    if not batches:
        raise DataError(f"no image of the {len(subset)} chosen under '{dataset.root}' could be read")
    return batches


@torch.no_grad()
def predict_files(model, paths, transform, device, batch_size):
    """logits for image files (unreadable ones skipped with their path) -> (kept paths, logits)"""
    kept, logits = [], []
    for i in tqdm(range(0, len(paths), batch_size), desc="  batches", leave=False, disable=None):
        images = []
        for path in paths[i:i + batch_size]:
            try:
                images.append(transform(load_image(path)))
                kept.append(path)
            except Exception as e:
                print(f"warning: skipping unreadable image {path} ({type(e).__name__})",
                      file=sys.stderr)
        if images:
            logits.append(model(torch.stack(images).to(device)).float().cpu())
    return kept, torch.cat(logits) if logits else torch.zeros(0, 0)


def cue_conflict_folder(opts):
    """model-vs-human's datasets folder holds cue-conflict/, the embedded data cue_conflict/"""
    has_mvh = os.path.isdir(os.path.join(resolve_data_dir(opts["data"]), "cue-conflict"))
    return image_folder(opts, "cue-conflict" if has_mvh else "cue_conflict")


def check_head(metric, cfg):
    """shape_bias, ood: decisions need class scores"""
    if cfg.num_classes == 0:
        raise ValueError(f"{metric} needs a classifier; this model has no classification head: "
                         "fine-tune it first, or give an ImageNet-1k classifier (deit)")


def check_classifiers(metric, models, opts):
    """before the first model's work: each model, (label, argument, config, class names), can give
    a classifier metric, or one error line that names it. hessian, landscape: the data's classes
    are its outputs (label_outputs); shape_bias, ood: it has a head and can decide among the
    categories of every image the metric reads (decision_categories)"""
    if metric in ("hessian", "landscape"):
        dataset = image_folder(opts, "val")
    elif metric == "shape_bias":
        paths = [p for p, _ in cue_conflict_folder(opts).samples]
        label_sets = [[label for p in paths for label in cue_conflict_labels(p)]]
    else:
        label_sets = [[c for _, _, c in ood_images(folder)] for _, folder in ood_folders(opts)]
    for label, model_arg, cfg, classes in models:
        try:
            if metric in ("hessian", "landscape"):
                label_outputs(metric, cfg, classes, dataset)
            else:
                check_head(metric, cfg)
                for labels in label_sets:
                    decision_categories(labels, cfg.num_classes, classes)
        except ValueError as e:  # which one of the models
            raise SystemExit(f"error: {label} ('{model_arg}'): {e}") from None


def classifier_metric(metric, model, info, opts, device):
    """one model's entry for hessian, landscape, shape_bias or ood"""
    cfg = model.config
    if metric in ("hessian", "landscape"):
        dataset = image_folder(opts, "val")
        dataset.transform = EvalTransform(cfg.img_size)
        batches = labelled_batches(model, dataset, subset_of(dataset, opts), opts, device,
                                   info.get("classes"))
        if metric == "landscape":  # the axes: the top-2 eigenvectors by magnitude
            hessian = HessianOperator(model, batches, keep_graphs=bool(opts["keep_graphs"]))
            with tqdm(total=opts["lanczos_steps"], desc="  Lanczos steps", leave=False,
                      disable=None) as bar:
                eig = lanczos(hessian, 2, opts["tol"], opts["lanczos_steps"], opts["seed"], bar)
            directions = [hessian.unflat(v) for v in eig["vectors"]]
            with tqdm(total=opts["steps"] ** 2, desc="  grid points", leave=False,
                      disable=None) as bar:
                coords, grid = loss_landscape(model, batches, directions, opts["span"],
                                              opts["steps"], progress=bar)
            return dict(eigenvalues=eig["values"], eigenvalue_order="largest magnitude first",
                        coords=coords, loss=grid, center_loss=mean_loss(model, batches),
                        images=sum(len(t) for _, t in batches))
        # Lanczos steps, then trace samples: the total is the most there can be until Lanczos
        # stops (curvature sets it then)
        most = max(opts["trace_products"], opts["lanczos_steps"] + 2)
        with tqdm(total=most, desc="  Lanczos steps + trace samples", leave=False,
                  disable=None) as bar:
            r = curvature(model, batches, opts["top_k"], opts["tol"], opts["lanczos_steps"],
                          opts["trace_products"], opts["trace_tol"], opts["seed"],
                          bool(opts["keep_graphs"]), progress=bar)
        return dict(eigenvalues=r["eigenvalues"], eigenvalue_order="largest magnitude first",
                    trace=r["trace"], trace_stderr=r["trace_stderr"],
                    trace_samples=r["trace_samples"],
                    trace_products=r["lanczos_steps"] + r["trace_samples"],
                    lanczos_steps=r["lanczos_steps"], converged=r["converged"],
                    hessian_vector_products=r["products"], quadratic_forms=r["forms"],
                    gradient_passes=r["passes"],
                    loss=mean_loss(model, batches), images=sum(len(t) for _, t in batches))
    check_head(metric, cfg)  # (an official teacher's; a file's was checked before any work)
    # the benchmark's stimuli at the model's size are seen whole, as model-vs-human feeds its 224 px
    # images (datasets/base.py: no resize at image_size 224); other sizes are resized and cropped
    transform = EvalTransform(cfg.img_size, keep_exact_size=True)
    if metric == "shape_bias":
        dataset = cue_conflict_folder(opts)
        paths = [p for p, _ in dataset.samples]  # hidden entries are no samples (data.image_files)
        kept, logits = predict_files(model, paths, transform, device, opts["batch_size"])
        if not kept:
            raise DataError(f"no readable cue-conflict image under '{dataset.root}'")
        shapes, textures = zip(*[cue_conflict_labels(p) for p in kept])
        listed = [label for p in paths for label in cue_conflict_labels(p)]  # read or not
        categories = decision_categories(listed, logits.shape[-1], info.get("classes"))
        chosen = category_decisions(logits, categories, info.get("classes")).tolist()
        decisions = [categories[i] for i in chosen]
        overall, per_class = shape_bias(decisions, shapes, textures)
        conflicting = sum(s != t for s, t in zip(shapes, textures))
        return dict(shape_bias=overall, per_class=per_class, images=conflicting,
                    excluded_agreeing=len(kept) - conflicting)
    # ood: the benchmark's accuracy and error consistency on each model-vs-human dataset found
    entry = {}
    for name, folder in ood_folders(opts):
        images = ood_images(folder)
        kept, logits = predict_files(model, [p for p, _, _ in images], transform, device,
                                     opts["batch_size"])
        if not kept:
            raise DataError(f"no readable image in '{folder}'")
        labels = {p: (condition, category) for p, condition, category in images}
        listed = [category for _, _, category in images]  # read or not
        categories = decision_categories(listed, logits.shape[-1], info.get("classes"))
        chosen = category_decisions(logits, categories, info.get("classes")).tolist()
        trials = [(os.path.basename(p), *labels[p], categories[i]) for p, i in zip(kept, chosen)]
        read = set(kept)
        unreadable = [(os.path.basename(p), condition) for p, condition, _ in images if p not in read]
        human_dir = os.path.join(opts["human"], name) if opts["human"] else ""
        humans = human_trials(human_dir) if os.path.isdir(human_dir) else None
        entry[name] = ood_scores(name, trials, humans, f"'{folder}'", unreadable)
        if entry[name].get("human_trials_unreadable"):
            print(f"warning: {name}: {entry[name]['human_trials_unreadable']} human trials show the "
                  f"{len(unreadable)} unreadable image(s) above and are left out", file=sys.stderr)
    return ood_summary(entry)


def check_out_dir(out):
    """before any work: --out is a folder that can be made or written in; it is made only with the
    first result (make_out_dir), so that a command refused later leaves no empty folder"""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        if not os.path.isdir(existing):
            reason = "File exists"
        elif os.statvfs(existing).f_flag & os.ST_RDONLY:
            reason = "Read-only file system"
        else:
            reason = "Permission denied"
        raise SystemExit(f"error: --out={out} cannot be a directory ({reason}): "
                         f"give a directory for NAME.json and NAME.png")


def make_out_dir(out):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # made since check_out_dir: a file on the way, no permission
        raise SystemExit(f"error: --out={out} cannot be a directory ({e.strerror}): "
                         f"give a directory for NAME.json and NAME.png") from None


def main(argv):
    opts, models = parse_args(argv)
    keep_freed_memory()  # activation-sized temporaries reuse their pages (see hessian.py)
    if opts["metric"] == "report":  # a run of experiments/paper.sh -> RUN_ROOT/report.md
        return report(models)
    metric = opts["metric"]
    metrics = list(REPRESENTATION) if metric == "all" else [metric]
    written = {os.path.realpath(os.path.join(opts["out"], f"{m}.{kind}")) for m in metrics for kind in ("json", "png")}
    overwritten = [path for path in models if os.path.realpath(path) in written]
    if overwritten:  # e.g. finetune.py's OUT/sharpness.json, with --out=OUT: the input would be lost
        raise SystemExit(f"error: --out={opts['out']} would write {metric} results over the input "
                         f"{overwritten[0]}: choose another --out")
    check_out_dir(opts["out"])
    folders = [path for path in sorted(written) if os.path.isdir(path)]
    if folders:  # found before the work, not when the first JSON of a pair is written
        raise SystemExit(f"error: --out={opts['out']}: {folders[0]} is a folder, where {metric} "
                         "writes a file: move it or choose another --out")
    if metric == "curves":  # the log.jsonl of training runs, not models
        return curves(models, opts["labels"], opts["out"])
    labels = opts["labels"].split(",") if opts["labels"] else default_labels(models)
    if not labels_fit(labels, len(models)):
        given = f"got '{opts['labels']}'" if opts["labels"] else f"the default ones are {labels}"
        raise SystemExit(f"error: --labels needs {len(models)} distinct comma-separated names: "
                         f"{given}")
    # shape_bias and ood read every image of the benchmark's folders, as model-vs-human does: no subset
    # (and ood reads no --split: its folders are the benchmark's)
    unused = dict(shape_bias=("n_images", "seed"), ood=("n_images", "split", "seed")).get(metric, ())
    unused += ("labels", "out")
    settings = {k: v for k, v in opts.items() if k not in unused}
    settings |= dict(models=dict(zip(labels, models)))
    if metric == "sharpness":  # the curves logged by finetune.py --hessian_every
        try:
            results = {label: read_sharpness(path) for label, path in zip(labels, models)}
        except (OSError, ValueError) as e:
            raise SystemExit("error: sharpness takes the JSON logs of finetune.py "
                             f"--hessian_every: {e}")
        return write(metric, results, settings, opts["out"])
    for model_arg in models:  # all of them before the first model's work
        if model_arg not in OFFICIAL and model_arg != "embedded" and not os.path.exists(model_arg):
            raise SystemExit(f"error: no model '{model_arg}': not a file, and not one of {NAMES}")
    # a file that is no model stops the run before the first model's work (and before --out is made)
    # (so each file is read twice; a folder is refused as everywhere)
    files = []  # (label, argument, config, class names) of the models that are files
    for model_arg, label in zip(models, labels):
        # read when its turn comes (a download); the official teachers are B/16
        if model_arg in OFFICIAL:
            cfg = ViTConfig.from_name("B/16")
        else:
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # its warnings are said when it is used
                    model, info = load_model(model_arg)
            except (CheckpointError, ValueError) as e:
                raise SystemExit(f"error: {e}")
            cfg = model.config
            files.append((label, model_arg, cfg, info["classes"]))
            # its weights are read again when its turn comes: one model in memory at a time
            del model
        # --layer / --queries out of a later model's range: nothing done yet
        if "attn_map" in metrics:
            attention_request(opts, cfg, label)
    if "svd" in metrics and opts["n_images"] < 2:
        raise SystemExit("error: the image-level spectrum needs at least 2 images "
                         f"(n_images={opts['n_images']}); "
                         "a full spectrum needs more images than channels")
    device = opts["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    try:  # the data before the first model (an official one is a download)
        if metric == "ood":
            datasets = ood_folders(opts)
            if opts["human"]:
                check_humans(opts, datasets)
        else:
            resolve_data_dir(opts["data"])
        if metric in CLASSIFIER:  # a later model that cannot give it
            check_classifiers(metric, files, opts)
    except (DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")

    results, maps = {m: {} for m in metrics}, {}
    try:
        for model_arg, label in zip(models, labels):
            model, info = load_model(model_arg)  # NaN/inf weights are refused there
            model.to(device)
            cfg = model.config
            print(f"{label}: {info['source']}, {cfg.depth} blocks, {cfg.img_size} px")
            if metric in CLASSIFIER:
                results[metric][label] = classifier_metric(metric, model, info, opts, device)
                continue
            dataset = image_folder(opts, "val")
            dataset.transform = EvalTransform(cfg.img_size)
            subset = torch.utils.data.Subset(dataset, subset_of(dataset, opts))
            loader = torch.utils.data.DataLoader(subset, batch_size=opts["batch_size"],
                                                 collate_fn=collate)
            request = attention_request(opts, cfg, label) if "attn_map" in metrics else None
            stats = collect(model, loader, device, set(metrics), request, opts["fourier_at"])
            if "svd" in metrics and stats["count"] < 2:
                raise SystemExit(f"error: the image-level spectrum needs at least 2 images; only "
                                 f"{stats['count']} of the {len(subset)} chosen could be read")
            for m in metrics:  # images: how many of the subset were read
                if m == "attn_map":  # layer from 0, as --layer; images: those whose maps are shown
                    maps[label] = stats["maps"]
                    shown = stats["maps"][1]  # (images, queries, patches)
                    results[m][label] = dict(layer=request["layer"], queries=request["queries"],
                                             attention=shown.tolist(), images=len(shown))
                else:
                    results[m][label] = summarize(m, stats, cfg, opts["fourier_at"]) | dict(images=stats["count"])
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for m in metrics:
        write(m, results[m], settings, opts["out"], maps)


def labels_fit(labels, count):
    """--labels names each of the `count` inputs: as many names, distinct, none blank"""
    return len(labels) == count and len(set(labels)) == count and all(l.strip() for l in labels)


def attention_request(opts, cfg, label):
    """what attn_map draws of one model: its --layer (negative from the end) and the query
    patches"""
    if not -cfg.depth <= opts["layer"] < cfg.depth:
        raise SystemExit(f"error: --layer={opts['layer']}: {label} has {cfg.depth} blocks: "
                         f"give 0..{cfg.depth - 1} (-1 = the last)")
    g = cfg.grid
    if opts["queries"]:
        queries = [int(q) for q in opts["queries"].split(",")]
    else:  # 3 spread over the grid
        queries = [g // 4 * g + g // 4, (g // 2) * g + g // 2, (3 * g // 4) * g + g // 4]
    if any(not 0 <= q < cfg.num_patches for q in queries):
        raise SystemExit(f"error: --queries={opts['queries']}: {label} has patch indices "
                         f"0..{cfg.num_patches - 1}")
    return dict(layer=opts["layer"] % cfg.depth, queries=queries, images=opts["map_images"])


# the names the training scripts give their files in out_dir: a run is known by its folder
RUN_FILE_NAMES = (*(os.path.splitext(name)[0] for name in RUN_CHECKPOINTS), "log", "sharpness")


def default_labels(models):
    """a checkpoint file's name without its extension, a teacher's name as given; the folder's
    name for a run's own file (out/md_embedded/ckpt.pt: md_embedded), and for all files where two
    have the same name (out/md/a.pt, out/ft/a.pt)"""
    names = [os.path.splitext(os.path.basename(m))[0] if os.path.isfile(m) else m for m in models]
    folders = [os.path.basename(os.path.dirname(os.path.abspath(m))) if os.path.isfile(m) else m
               for m in models]
    if len(set(names)) < len(names) and len(set(folders)) == len(folders):
        return folders
    return [folder if name in RUN_FILE_NAMES else name for name, folder in zip(names, folders)]


def read_sharpness(path):
    """finetune.py's sharpness.json: a list of {iter, eigenvalue, trace, trace_stderr}"""
    log = json.load(open(path))
    fields = {"iter", "eigenvalue", "trace"}
    if not isinstance(log, list) or not all(isinstance(e, dict) and fields <= e.keys() for e in log):
        raise ValueError(f"'{path}' is not a list of records with {', '.join(sorted(fields))}")
    if not log:
        raise ValueError(f"'{path}' has no record: its run has not reached --hessian_every yet")
    for e in log:  # a record edited by hand: one line, not a figure of strings
        number = all(isinstance(e[k], (int, float)) and not isinstance(e[k], bool) for k in fields)
        if not number or not isinstance(e["iter"], int):
            raise ValueError(f"'{path}' has a record whose iter, eigenvalue or trace is not a number: {e}")
    return log


def strict_json(obj):
    """obj as JSON text without the NaN and Infinity tokens that JSON has not (Python writes them,
    strict parsers refuse them): a non-finite number is written as null, no value"""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return [finite(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(finite(obj), allow_nan=False)


def write(metric, results, settings, out, maps=None):
    json_path, png_path = os.path.join(out, f"{metric}.json"), os.path.join(out, f"{metric}.png")
    make_out_dir(out)
    write_atomic(json_path, strict_json(dict(metric=metric, settings=settings, models=results)))
    drawn = plot(metric, results, png_path, maps)
    print(f"{metric}: {json_path}" + (f", {png_path}" if drawn else ""))
    for label, r in results.items():
        if "per_layer" in r:
            print(f"  {label:>20}: per block " + " ".join(f"{v:.3g}" for v in r["per_layer"]))
        elif metric == "hessian":
            values = ", ".join(f"{v:.4g}" for v in r["eigenvalues"])
            print(f"  {label:>20}: eigenvalues {values} (largest magnitude first), trace "
                  f"{r['trace']:.4g} +- {r['trace_stderr']:.2g}; {r['hessian_vector_products']} "
                  f"Hessian-vector products, {r['quadratic_forms']} quadratic forms, "
                  f"{r['gradient_passes']:.3g} gradient passes")
            if not r["converged"]:
                print(f"  {'':>20}  not converged to --tol in --lanczos_steps: raise --lanczos_steps")
        elif metric == "shape_bias":  # None: no decision was the shape or the texture
            print(f"  {label:>20}: shape bias {formatted(r['shape_bias'], '.3f')} over {r['images']} "
                  "cue-conflict images")
        elif metric == "ood":  # None: no dataset with a condition that counts
            print(f"  {label:>20}: mean accuracy {formatted(r['mean_accuracy'], '.3f')} over "
                  f"{len(r['datasets'])} datasets")


def formatted(value, spec):  # None (no value) as n/a
    return "n/a" if value is None else format(value, spec)


# ----------------------------------------------------------------------------------------
# training curves: the out_dir/log.jsonl that train_md.py, finetune.py and train_vqkd.py write

CURVE_PANELS = (("loss", "train loss (last micro-batch)"), ("lr", "learning rate"),
                ("val_loss", "val loss"), ("val_top1", "val top-1 (%)"),
                ("codebook_usage", "codebook usage (fraction of codes)"))


def read_log(path):
    """The records of a log.jsonl as common.append_jsonl writes them: one JSON object per line,
    each with 'iter'. A last line cut short (the run was killed while writing it) is left out and
    said once."""
    if os.path.isdir(path):
        log = os.path.join(path, "log.jsonl")
        hint = f"give {log}" if os.path.isfile(log) else "give the out_dir/log.jsonl of a run"
        raise SystemExit(f"error: log '{path}' is a folder: {hint}")
    if not os.path.isfile(path):
        raise SystemExit(f"error: log '{path}' not found: give the out_dir/log.jsonl of a run")
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            # cut short: the last line, after a record or begun as one
            cut_short = number == len(lines) and (records or line.lstrip().startswith("{"))
            if not cut_short:
                raise SystemExit(f"error: {path}, line {number} is not JSON: give the log.jsonl "
                                 f"of train_md.py, finetune.py or train_vqkd.py") from None
            print(f"warning: {path}: the last line is cut short (the run stopped while writing "
                  f"it); read the {len(records)} records before it")
            break
        iteration = record.get("iter") if isinstance(record, dict) else None
        if not isinstance(iteration, int) or isinstance(iteration, bool):
            raise SystemExit(f"error: {path}, line {number} is not a training record "
                             "(no iteration number 'iter'): give the log.jsonl of a run")
        records.append(record)
    if not records:
        raise SystemExit(f"error: {path} holds no records yet: a run writes one per log line")
    return records


def curves(paths, labels, out):
    """series[field] = (iterations, values) of the records that hold that number field, in file
    order: every field of every run, to curves.json; the main ones drawn side by side"""
    if labels:
        labels = labels.split(",")
    else:  # each log's run folder
        labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if not labels_fit(labels, len(paths)):
        raise SystemExit(f"error: --labels needs {len(paths)} distinct comma-separated names, "
                         f"got {','.join(labels)!r}")
    results = {}
    for label, path in zip(labels, paths):
        series = {}
        for record in read_log(path):
            for field, value in record.items():
                is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if field == "iter" or not is_number:
                    continue
                iters, values = series.setdefault(field, ([], []))
                iters.append(record["iter"])
                values.append(value)
        if not series:
            raise SystemExit(f"error: {path} holds no numbers beside 'iter': "
                             "give the log.jsonl of a run")
        results[label] = {field: dict(iter=i, value=v) for field, (i, v) in series.items()}
    json_path, png_path = os.path.join(out, "curves.json"), os.path.join(out, "curves.png")
    settings = dict(models=dict(zip(labels, paths)))
    make_out_dir(out)
    write_atomic(json_path, strict_json(dict(metric="curves", settings=settings, models=results)))
    drawn = plot_curves(results, png_path)
    print(f"curves: {json_path}" + (f", {png_path}" if drawn else ""))
    for label, r in results.items():
        last_iter = max(max(s["iter"]) for s in r.values())
        last = [f"{field} {r[field]['value'][-1]:.4g}" for field in ("loss", "val_loss", "val_top1")
                if field in r]
        print(f"  {label:>20}: to iteration {last_iter}; last " + ", ".join(last))


def plot_curves(results, path):
    """one panel per CURVE_PANELS field that some run logged, every run in it; False without
    matplotlib"""
    plt = pyplot()
    if plt is None:
        return no_figure(path)
    panels = [(f, title) for f, title in CURVE_PANELS if any(f in r for r in results.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (field, title) in zip(axes[0], panels):
        for i, (label, r) in enumerate(results.items()):
            if field in r:
                few = field.startswith("val_") or len(r[field]["iter"]) < 2  # a single point needs a marker
                marker = "o" if few else None  # evaluations are few: marked
                ax.plot(r[field]["iter"], r[field]["value"], color=f"C{i}", marker=marker,
                        label=label)
        ax.set(xlabel="iteration", title=title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, 110)
    plt.close(fig)
    return True
# report: one page over a run of experiments/paper.sh that tests the paper's claims
#
# The report reads every analyze.py JSON under RUN_ROOT (merged per metric, by label), the
# result.json of every fine-tuning run, and the pipeline's step records (RUN_ROOT/steps/*.done,
# one line "SECONDS<tab>COMMAND"). Labels name the roles, as experiments/paper.sh writes them:
# a teacher T (clip, dino, deit, embedded), its MD student md_T, the directly fine-tuned teacher
# ft_T, the fine-tuned MD student ft_md_T, the classifier trained from scratch ft_scratch.

FIGURE_OF = dict(attn_map="Fig. 2", attn_distance="Fig. 3a", attn_entropy="Fig. 10",
                 nmi="Fig. 6a", fourier="Fig. 3b", svd="Figs. 4, 5, 6b, 6c", hessian="Fig. 7",
                 landscape="Fig. 7a/b", sharpness="Fig. 7c/f", shape_bias="Figs. 8a, 11",
                 ood="Fig. 12")


def third(values, last=True):
    """mean over the last (or first) third of the blocks, at least one block: the 'high' ('low')
    layers of every rule below"""
    if not values:
        raise ValueError("no blocks in per_layer")
    k = max(1, round(len(values) / 3))
    return float(np.mean(values[-k:] if last else values[:k]))


def head_spread(per_head):
    """spread of a per-head metric: standard deviation over heads, per block -> [block]"""
    return [float(np.std(heads)) for heads in per_head]


def top_eigenvalue(entry):
    """the Hessian eigenvalue of largest magnitude, whatever order the list is in"""
    return max(entry["eigenvalues"], key=abs)


def read_run(root):
    """-> metrics {metric: {label: entry}} from analyze.py's JSON files under root, figures
    [(metric, png path relative to root, settings, labels)], fine-tuning results {run: result},
    step records [(step, seconds, command)]"""
    metrics, figures, finetunes, steps = {}, [], {}, []
    source = {}  # (metric, label) -> the file its entry is from
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.endswith(".done"):  # experiments/paper.sh: SECONDS<tab>COMMAND
                try:
                    seconds, _, command = open(path).read().strip().partition("\t")
                except (OSError, ValueError) as e:  # ValueError: not UTF-8 (edited, damaged)
                    print(f"warning: skipping unreadable {path} ({e})", file=sys.stderr)
                    continue
                if seconds.isdigit():
                    steps.append((os.path.getmtime(path), name[:-5], int(seconds), command))
            if not name.endswith(".json"):
                continue
            try:
                data = json.load(open(path))
            except (OSError, ValueError) as e:
                print(f"warning: skipping unreadable {path} ({e})", file=sys.stderr)
                continue
            if not isinstance(data, dict):
                continue  # finetune.py's sharpness.json is a list (--metric sharpness draws it)
            if name == "result.json" and "top1" in data:  # finetune.py
                scores = [data.get(k) for k in ("top1", "top5", "best_top1")]
                # (max_iters: newer files)
                iterations = [data.get("iter_num"), data.get("max_iters", 0)]
                if (all(isinstance(v, (int, float)) for v in scores)
                        and all(isinstance(v, int) for v in iterations)
                        and isinstance(data.get("config"), dict)):
                    finetunes[os.path.relpath(folder, root)] = data
                else:
                    print(f"warning: skipping {path}: its top1, top5, best_top1, iter_num, "
                          "max_iters or config is not finetune.py's", file=sys.stderr)
            elif {"metric", "models"} <= set(data):  # analyze.py
                models = data["models"]
                # an entry is a dict; sharpness keeps each model's finetune.py log, a list
                kind = list if data["metric"] == "sharpness" else dict
                if not (isinstance(models, dict)
                        and all(isinstance(e, kind) for e in models.values())):
                    print(f"warning: skipping {path}: "
                          f"its models are not analyze.py's {{label: entry}}",
                          file=sys.stderr)
                    continue
                for label in models:  # one label in two files: the later one read is used
                    earlier = source.get((data["metric"], label))
                    if earlier:
                        print(f"warning: {label} has {data['metric']} results in {earlier} and "
                              f"{path}: the report uses the later one read, {path}",
                              file=sys.stderr)
                    source[(data["metric"], label)] = path
                metrics.setdefault(data["metric"], {}).update(models)
                png = path[:-len(".json")] + ".png"
                if os.path.exists(png):
                    figures.append((data["metric"], os.path.relpath(png, root),
                                    data.get("settings", {}), data["models"]))
    return metrics, figures, finetunes, [s[1:] for s in sorted(steps)]  # in the order they ended


def student_vs_teacher(metrics, metric, t, summary, lower, unit=""):
    """summary(entry) of the teacher t and its MD student md_t; the claim holds when the
    student's is lower (lower=True) or higher -> (numbers, holds) or the reason it is untested"""
    entries = metrics.get(metric, {})
    if t not in entries or "md_" + t not in entries:
        return f"no {metric} results for {t} and md_{t} under the run"
    a, b = summary(entries[t]), summary(entries["md_" + t])
    return f"teacher {t} {a:.3g}{unit}, MD student md_{t} {b:.3g}{unit}", b < a if lower else b > a


def svd_change(entry):
    """token-level svd headline: mean over the last third of the blocks minus the first third"""
    return third(entry["per_layer"]) - third(entry["per_layer"], last=False)


def flatter(metrics, finetunes, t):
    """|λ1| and |trace| of the Hessian: ft_md_t against ft_t. The traces are estimates: a difference
    of their magnitudes within 2 combined standard errors, 2 sqrt(se_md^2 + se_direct^2), decides
    nothing, so the claim is then untested unless λ1 alone already refutes it"""
    entries = metrics.get("hessian", {})
    if "ft_" + t not in entries or "ft_md_" + t not in entries:
        return f"no hessian results for ft_{t} and ft_md_{t} under the run"
    direct, md = entries["ft_" + t], entries["ft_md_" + t]
    numbers = "; ".join(f"{label}: λ1 {top_eigenvalue(e):.4g}, trace {e['trace']:.4g} ± "
                        f"{e.get('trace_stderr', float('nan')):.2g}"
                        for label, e in (("ft_" + t, direct), ("ft_md_" + t, md)))
    lower_eigenvalue = abs(top_eigenvalue(md)) < abs(top_eigenvalue(direct))
    trace_gap = abs(direct["trace"]) - abs(md["trace"])
    trace_error = 2 * math.hypot(*[float(e.get("trace_stderr") or 0.0) for e in (direct, md)])
    if lower_eigenvalue and abs(trace_gap) <= trace_error:
        return (f"{numbers}: the traces differ by {abs(trace_gap):.2g}, within 2 standard errors "
                f"({trace_error:.2g}); more trace products (analyze.py --trace_products) would decide")
    return numbers, lower_eigenvalue and trace_gap > 0


def less_texture(metrics, finetunes, t):
    """shape bias = shape / (shape + texture decisions): ft_md_t against ft_t"""
    entries = metrics.get("shape_bias", {})
    if "ft_" + t not in entries or "ft_md_" + t not in entries:
        return f"no shape_bias results for ft_{t} and ft_md_{t} under the run"
    direct, md = entries["ft_" + t]["shape_bias"], entries["ft_md_" + t]["shape_bias"]
    if direct is None or md is None:
        return "a model made no shape or texture decision on the cue-conflict images"
    before = entries.get(t, {}).get("shape_bias")
    numbers = (f"teacher {t} {before:.3f} before fine-tuning, " if before is not None else "")
    numbers += f"ft_{t} {direct:.3f}, ft_md_{t} {md:.3f}"
    return numbers, md > direct


def better_baseline(metrics, finetunes, t):
    """val top-1 of result.json: ft_t (the teacher fine-tuned directly with the recipe's lowered lr)
    against ft_t_fd_lr (the same at FD's higher lr, as FD fine-tuned CLIP to 82.9%)"""
    lowered, fd = "ft_" + t, f"ft_{t}_fd_lr"
    if lowered not in finetunes or fd not in finetunes:
        return f"no result.json in {lowered} and {fd}"
    direct, high = finetunes[lowered], finetunes[fd]
    numbers = (f"{lowered} (lr {direct['config']['lr']:.3g}) {direct['top1']:.2f}%{stopped_early(direct)}, "
               f"{fd} (lr {high['config']['lr']:.3g}) {high['top1']:.2f}%{stopped_early(high)}")
    if t != "clip":
        numbers += f" (stand-in: {t} for CLIP)"
    if stopped_early(direct) or stopped_early(high):  # as finetune.py --summarize's figures
        return f"{numbers}: a run stopped before the end of its schedule is not judged"
    return numbers, direct["top1"] > high["top1"]


# (title, the paper's claim, its rule here, test(metrics, finetunes, teacher))
CLAIMS = [
    ("attention distance", "MD lowers the attention distance of high layers relative to the "
     "teacher (Fig. 3a)", "head-mean attention distance in pixels, mean over the last third of "
     "the blocks; holds if the MD student's is lower than its teacher's",
     lambda m, f, t: student_vs_teacher(m, "attn_distance", t, lambda e: third(e["per_layer"]),
                                        lower=True, unit=" px")),
    ("head diversity", "MD diversifies the attention heads (Fig. 10)", "spread of the attention "
     "entropy over the heads (standard deviation over heads per block), mean over the last third "
     "of the blocks; holds if the MD student's is higher",
     lambda m, f, t: student_vs_teacher(m, "attn_entropy", t,
                                        lambda e: third(head_spread(e["per_head"])), lower=False)),
    ("NMI", "MD raises the normalized mutual information of queries and keys (Fig. 6a)",
     "head-mean NMI, mean over the last third of the blocks; holds if the MD student's is higher",
     lambda m, f, t: student_vs_teacher(m, "nmi", t, lambda e: third(e["per_layer"]), lower=False)),
    ("Fourier", "MD shifts the Fourier response of high layers toward low frequencies (Fig. 3b)",
     "Δ log amplitude at the highest frequency, mean over the last third of the blocks; holds if "
     "the MD student's is lower (a stronger low-frequency preference)",
     lambda m, f, t: student_vs_teacher(m, "fourier", t, lambda e: third(e["per_layer"]),
                                        lower=True)),
    ("token spectrum", "MD keeps the token spectra of high layers from collapsing (Figs. 4, 6b)",
     "token-level svd headline (mean relative log singular value), mean over the last third of "
     "the blocks minus the mean over the first third; holds if this change with depth is higher "
     "for the MD student (a folding spectrum falls with depth)",
     lambda m, f, t: student_vs_teacher(m, "svd", t, svd_change, lower=False)),
    ("flatness", "fine-tuning from the MD student lands at a flatter point (Fig. 7)",
     "top Hessian eigenvalue λ1 (largest magnitude) and Hutchinson trace of the val loss after "
     "fine-tuning; holds if both are smaller in magnitude for the fine-tuned MD student than for "
     "the teacher fine-tuned directly (the traces by more than 2 combined standard errors)", flatter),
    ("shape bias", "MD mitigates the texture bias that fine-tuning brings (Figs. 8a, 11)",
     "shape bias on the cue-conflict images after fine-tuning; holds if the fine-tuned MD "
     "student's is higher than the directly fine-tuned teacher's", less_texture),
    ("better baseline", "CLIP fine-tuned directly at a lowered learning rate reaches 84.8% top-1, "
     "against 82.9% at the higher learning rate of feature distillation (FD) (Sec. 4, Fig. 8b)",
     "val top-1 at the end of fine-tuning; holds if the teacher fine-tuned with the recipe's lr "
     "(ft_T) beats the same fine-tune at FD's higher lr (ft_T_fd_lr); tested on CLIP, or on the "
     "first teacher standing in for it; runs stopped before the end of their schedule "
     "(--stop_iter) are not judged", better_baseline),
]


def run_labels(metrics, finetunes):
    """the labels of the analysed models and the fine-tuning runs, in order of appearance"""
    return list(dict.fromkeys([l for entries in metrics.values() for l in entries] + list(finetunes)))


def students_of(metrics, finetunes):
    """[(label, T)] of every label md_T or ft_md_T among the analysed models and the fine-tuning
    runs, in order of appearance"""
    labels = run_labels(metrics, finetunes)
    return [(l, l[len(prefix):]) for l in labels for prefix in ("md_", "ft_md_")
            if l.startswith(prefix) and len(l) > len(prefix)]


def teachers_of(metrics, finetunes):
    """the teachers T of the run, in order of appearance: every T of an MD student md_T or of its
    fine-tune ft_md_T where T is a teacher of experiments/paper.sh (clip, dino, deit, embedded) or
    the label of a model of the run (T or ft_T); a claim whose other model is missing is then
    counted as not tested, not dropped. md_student (--labels=teacher,md_student) names none."""
    labels = set(run_labels(metrics, finetunes))
    known = set(OFFICIAL) | {"embedded"} | labels
    known |= {l[len("ft_"):] for l in labels if l.startswith("ft_")}
    return list(dict.fromkeys(t for _, t in students_of(metrics, finetunes) if t in known))


def unnamed_students(metrics, finetunes):
    """one line on the labels md_X or ft_md_X whose X is no teacher ('' if none)"""
    teachers = teachers_of(metrics, finetunes)
    unnamed = list(dict.fromkeys(l for l, t in students_of(metrics, finetunes)
                                 if t not in teachers))
    if not unnamed:
        return ""
    return (f"the labels {', '.join(unnamed)} name no teacher and are left out of the claims: "
            f"the claims compare a teacher T ({NAMES}, or a model labelled T) "
            "with its MD student md_T, and ft_T with ft_md_T (e.g. --labels=embedded,md_embedded)")


# what a field of another type or an empty list raises in a rule
UNREADABLE = (TypeError, ValueError)


def claim_verdicts(metrics, finetunes, teachers):
    """-> [(title, claim, rule, [(teacher, numbers, verdict)])]; verdict: holds | does not hold |
    not tested"""
    stand_in = ["clip"] if "clip" in teachers else teachers[:1]
    out = []
    for title, claim, rule, test in CLAIMS:
        rows = []
        for t in teachers:
            if title == "better baseline" and t not in stand_in:
                continue
            try:
                result = test(metrics, finetunes, t)
            except KeyError as e:  # a results file without the expected field
                result = f"the results lack {e}"
            except UNREADABLE as e:  # a field of another type (an edited file), an empty list
                result = f"the results cannot be read ({type(e).__name__}: {e})"
            if isinstance(result, str):
                rows.append((t, result, "not tested"))
            else:
                rows.append((t, result[0], "holds" if result[1] else "does not hold"))
        out.append((title, claim, rule, rows))
    return out


def headline_table(metrics, finetunes):
    """one row per model: the numbers the claims use, high layers = the last third of the blocks"""
    columns = [
        ("attention distance (px)", "attn_distance", lambda e: third(e["per_layer"])),
        ("attention entropy", "attn_entropy", lambda e: third(e["per_layer"])),
        ("entropy spread over heads", "attn_entropy", lambda e: third(head_spread(e["per_head"]))),
        ("NMI", "nmi", lambda e: third(e["per_layer"])),
        ("Δ log amplitude at π", "fourier", lambda e: third(e["per_layer"])),
        ("token svd", "svd", lambda e: third(e["per_layer"])),
        ("token svd change with depth", "svd", svd_change),
        ("Hessian λ1", "hessian", top_eigenvalue),
        ("Hessian trace", "hessian", lambda e: e["trace"]),
        ("shape bias", "shape_bias", lambda e: e["shape_bias"]),
        ("OOD mean accuracy", "ood", lambda e: e["mean_accuracy"]),
    ]
    labels = list(dict.fromkeys([l for m in metrics.values() for l in m] + list(finetunes)))
    teachers = teachers_of(metrics, finetunes)
    pairs = [(t, "md_" + t) for t in teachers] + [("ft_md_" + t, "ft_" + t) for t in teachers]
    roles = [label for pair in pairs for label in pair] + ["ft_scratch"]
    labels.sort(key=lambda l: roles.index(l) if l in roles else len(roles))  # stable: others last
    rows = []
    for label in labels:
        row = [label]
        for _, metric, value in columns:
            try:
                row.append(f"{value(metrics[metric][label]):.4g}")
            # not measured for this model, or a field it cannot read
            except (KeyError, *UNREADABLE):
                row.append("")
        top1 = finetunes.get(label, {}).get("top1")
        row.append(f"{top1:.2f}%" if top1 is not None else "")
        if any(row[1:]):
            rows.append(row)
    return ["model"] + [c[0] for c in columns] + ["fine-tuned top-1"], rows


def number_or_text(value, spec):
    """a number formatted by spec; anything else (a file edited by hand) as its text"""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return format(value, spec) if is_number else str(value)


def report_blocks(root, metrics, figures, finetunes, steps):
    """the report as blocks (kind, content); kinds: h1, h2, h3, p, ul, table, img, pre"""
    teachers = teachers_of(metrics, finetunes)
    depth = next((len(e["per_layer"]) for e in metrics.get("attn_distance", {}).values()
                  if isinstance(e.get("per_layer"), list)), None)  # (a file edited by hand)
    high = f"blocks {depth - max(1, round(depth / 3)) + 1}-{depth} of {depth}" if depth else "n/a"
    intro = (f"Run folder `{root}`. Teachers: {', '.join(teachers) or 'none found'}. High "
             f"layers = the last third of the blocks ({high}). One run, one seed, no error bars: "
             "each verdict is a direction in this run, not a significance test.")
    if "embedded" in teachers:
        intro += (" The embedded teacher and its students are 0.7M-parameter models on 32 px "
                  "toy images: this run demonstrates the tools, it does not test the paper.")
    doc = [("h1", f"mdlab report: {os.path.basename(os.path.abspath(root))}"), ("p", intro)]
    verdicts = claim_verdicts(metrics, finetunes, teachers)
    total = [v for _, _, _, rows in verdicts for _, _, v in rows]
    doc.append(("h2", "The paper's claims in this run"))
    counts = {v: total.count(v) for v in ("holds", "does not hold", "not tested")}
    if teachers:
        doc.append(("p", f"{counts['holds']} of {len(total)} tests hold, {counts['does not hold']} "
                         f"do not, {counts['not tested']} not tested."))
    else:
        doc.append(("p", "No claim tested: the claims compare a teacher T with its MD student md_T "
                         "(or their fine-tunes ft_T and ft_md_T), and no model here is labelled "
                         "md_T or ft_md_T (analyze.py --labels, finetune.py --out_dir)."))
    unnamed = unnamed_students(metrics, finetunes)
    if unnamed:
        doc.append(("p", unnamed[0].upper() + unnamed[1:] + "."))
    summary = [[title] + [next((v for s, _, v in rows if s == t), "") for t in teachers]
               for title, _, _, rows in verdicts]
    doc.append(("table", (["claim"] + teachers, summary)))
    for title, claim, rule, rows in verdicts:
        doc.append(("h3", f"{title}: {claim}"))
        doc.append(("p", f"Rule: {rule}."))
        doc.append(("ul", [f"{t}: {numbers}: **{verdict}**" for t, numbers, verdict in rows]))
    header, rows = headline_table(metrics, finetunes)
    doc.append(("h2", "Headline numbers per model"))
    doc.append(("p", "Per-block metrics: mean over the last third of the blocks. Hessian: at the "
                     "end of fine-tuning, on the val loss. Empty: not measured for that model."))
    doc.append(("table", (header, rows)))
    doc.append(("h2", "Fine-tuning top-1 per init"))
    ft_rows = [[run, str(r["config"].get("init", "")),
                number_or_text(r["config"].get("lr", float("nan")), ".3g"),
                str(r["config"].get("epochs", "")) + stopped_early(r), f"{r['top1']:.2f}%", f"{r['top5']:.2f}%",
                f"{r['best_top1']:.2f}%"] for run, r in sorted(finetunes.items())]
    doc.append(("table", (["run", "init", "lr", "epochs", "val top-1", "top-5", "best top-1"],
                          ft_rows)))
    doc.append(("h2", "Figures"))
    order = {m: i for i, m in enumerate(METRICS)}
    for group, finetuned in (("Teachers and MD students", False), ("Fine-tuned models", True)):
        shown = [f for f in figures if any(l.startswith("ft_") for l in f[3]) == finetuned]
        if shown:
            doc.append(("h3", group))
        for metric, png, settings, models in sorted(shown, key=lambda f: order.get(f[0], 99)):
            caption = f"{metric} ({FIGURE_OF.get(metric, 'figure')}): {', '.join(models)}"
            doc.append(("img", (png, caption + images_of(metric, settings, models))))
    if steps:
        doc.append(("h2", "How this run was made"))
        step_rows = [[name, f"{seconds / 60:.1f} min", f"`{command}`"]
                     for name, seconds, command in steps]
        minutes = sum(s for _, s, _ in steps) / 60
        doc.append(("p", f"{len(steps)} step(s), {minutes:.1f} minutes in all (the time of each "
                         "step, its stopped tries included; a rerun skips finished steps)."))
        doc.append(("table", (["step", "time", "command"], step_rows)))
    for name in sorted(f for f in os.listdir(root) if f.endswith(".sh")):  # paper.sh's copy
        scale = name[:-len(".sh")]
        doc.append(("p", f"Made by `experiments/paper.sh {scale}`, with these settings (a copy of "
                         f"experiments/scales/{scale}.sh when the run began):"))
        doc.append(("pre", open(os.path.join(root, name)).read().strip()))
    return doc


def images_of(metric, settings, models):
    """a figure caption's images: the images each model's entry says were read (shape_bias: the
    cue-conflict images decided on), the data's n_images in a file written before entries said it;
    sharpness (finetune.py's fixed val batch), ood (the datasets' own) and curves none"""
    if metric in ("sharpness", "ood", "curves"):
        return ""
    counts = sorted({entry.get("images", settings.get("n_images")) for entry in models.values()} - {None})
    kind = " cue-conflict" if metric == "shape_bias" else ""
    return f", {' or '.join(map(str, counts))}{kind} images of {settings.get('data')}" if counts else ""


def to_markdown(doc):
    lines = []
    for kind, content in doc:
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + content, ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in content] + [""]
        elif kind == "table":
            header, rows = content
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "img":
            alt = content[1].split(" ")[0]
            lines += [f"![{alt}]({content[0]})", "", f"*{content[1]}*", ""]
        elif kind == "pre":
            lines += ["```", content, "```", ""]
    return "\n".join(lines)


def to_html(doc):
    import html

    def inline(text):  # **bold** and `code`, after escaping
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    parts = ["<!doctype html><meta charset='utf-8'><title>mdlab report</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:auto}td,th{border:1px solid"
             " #ccc;padding:2px 6px}table{border-collapse:collapse}img{max-width:100%}</style>"]
    for kind, content in doc:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{inline(content)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{inline(content)}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in content) + "</ul>")
        elif kind == "table":
            header, rows = content
            head = "".join(f"<th>{inline(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>"
                           for row in rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            src, alt = html.escape(content[0]), html.escape(content[1].split(" ")[0])
            parts.append(f"<figure><img src='{src}' alt='{alt}'>"
                         f"<figcaption>{inline(content[1])}</figcaption></figure>")
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(content)}</pre>")
    return "\n".join(parts) + "\n"


def report(args):
    """analyze.py --metric report RUN_ROOT: RUN_ROOT/report.md and report.html"""
    if len(args) != 1 or not os.path.isdir(args[0]):
        raise SystemExit("error: --metric report takes one run folder (experiments/paper.sh's "
                         f"out/paper_SCALE), got '{' '.join(args)}'")
    root = args[0]
    metrics, figures, finetunes, steps = read_run(root)
    if not metrics and not finetunes:
        raise SystemExit(f"error: no analyze.py or finetune.py results under '{root}': run "
                         "experiments/paper.sh SCALE first")
    doc = report_blocks(root, metrics, figures, finetunes, steps)
    for name, text in (("report.md", to_markdown(doc)), ("report.html", to_html(doc))):
        write_atomic(os.path.join(root, name), text)
    print(f"report: {os.path.join(root, 'report.md')} and report.html")
    teachers = teachers_of(metrics, finetunes)
    unnamed = unnamed_students(metrics, finetunes)
    if unnamed:
        print(f"warning: {unnamed}", file=sys.stderr)
    if not teachers:
        print("  no claim tested: no model is labelled md_T or ft_md_T (see report.md)")
    for title, _, _, rows in claim_verdicts(metrics, finetunes, teachers):
        for t, _, verdict in rows:
            print(f"  {title:>18} ({t}): {verdict}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C: one line; every file is written atomically, so none is cut
        print("stopped by Ctrl-C: the JSON and figures written before are kept", file=sys.stderr)
        raise SystemExit(130)  # 128 + SIGINT
