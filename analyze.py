"""
Every attention and representation metric of the paper, one function each, for any model:

    python analyze.py --metric NAME CKPT [CKPT ...] [--data=DIR] [--n_images=N] [--out=DIR]

NAME: attn_map, attn_distance, attn_entropy, nmi, fourier, svd, or all of these (one forward
pass per batch collects what they all need); for classifiers: hessian, landscape, shape_bias,
ood; and sharpness (the curves logged by finetune.py --hessian_every; give the JSON logs).
CKPT: clip | dino | deit | embedded | an official file | a project checkpoint; several are
compared side by side. Writes out/NAME.json (the numbers; models[label]["per_layer"] is the
headline number per block, first block first) and out/NAME.png (the figure; needs matplotlib).

Definitions follow ../shared/REFERENCE.md section 4. Attention metrics drop the CLS row and
column and renormalize each query's row to sum to 1.
"""
import csv
import json
import math
import os
import re
import sys

import numpy as np
import torch
from tqdm import tqdm

from common import pyplot
from data import IMAGE_EXTENSIONS, DataError, EvalTransform, ImageFolder, collate, load_image, resolve_data_dir
from hessian import hutchinson_trace, loss_landscape, mean_loss, top_eigenvalues
from teacher import CheckpointError, load_model

REPRESENTATION = ("attn_map", "attn_distance", "attn_entropy", "nmi", "fourier", "svd")
CLASSIFIER = ("hessian", "landscape", "shape_bias", "ood")
METRICS = REPRESENTATION + CLASSIFIER + ("sharpness",)
DEFAULTS = dict(
    metric="",          # one of METRICS, or all (= every representation metric)
    data="embedded",    # ImageFolder root or 'embedded'; for ood: the folder of the 17 datasets
    split="",           # sub-folder of data; default val/ (cue_conflict/ for shape_bias) when present
    n_images=64,        # fixed, seeded subset of the split
    batch_size=16,      # images per forward
    out="out/analysis",  # where NAME.json and NAME.png go
    labels="",          # comma-separated legend labels, one per CKPT (default: file or teacher names)
    layer=-1,           # attn_map: block whose attention is shown (-1 = last)
    queries="",         # attn_map: comma-separated query patch indices (default: 3 spread over the grid)
    map_images=2,       # attn_map: images shown per model
    seed=0,             # which images form the subset
    device="auto",      # auto | cpu | cuda
    top_k=2,            # hessian: eigenvalues by power iteration
    power_iters=100,    # hessian: at most this many iterations per eigenvalue
    tol=1e-3,           # hessian: stop when the eigenvalue changes by less than this (relative)
    trace_samples=50,   # hessian: Hutchinson samples
    span=0.5,           # landscape: a, b in [-span, span] along the top-2 eigenvectors (unit norm)
    steps=21,           # landscape: grid points per axis
    human="",           # ood: model-vs-human raw-data folder (<dataset>/*.csv) for error consistency
)


# ----------------------------------------------------------------------------------------
# metrics on tensors: each takes attention maps (B, H, N+1, N+1) with CLS first, or tokens

def patch_attention(attn):
    """drop the CLS row and column, renormalize each query row: (B, H, N+1, N+1) -> (B, H, N, N).
    The attention metrics below take these patch-to-patch maps."""
    a = attn[..., 1:, 1:].float()
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def patch_distances(grid, patch_size):
    """D[i, j] = patch_size * ||grid(i) - grid(j)||_2 in pixels: (N, N)"""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], -1).float()
    return patch_size * torch.cdist(coords, coords)


def attention_distance(a, grid, patch_size):
    """average attention distance: per query sum_k a[q,k] D[q,k], mean over queries -> (B, H) pixels"""
    return (a * patch_distances(grid, patch_size).to(a.device)).sum(-1).mean(-1)


def row_entropy(a):
    """-sum_k a[q,k] log a[q,k] for every query row (nats) -> (B, H, N)"""
    return -(a * torch.log(a.clamp_min(1e-30))).sum(-1)


def attention_entropy(a, rows=None):
    """-sum_k a[q,k] log a[q,k] (nats), mean over queries -> (B, H)"""
    return (row_entropy(a) if rows is None else rows).mean(-1)


def attention_nmi(a, rows=None):
    """NMI between queries and keys with p(q) = 1/N: p(k) = mean_q a[q,k],
    I = sum_{q,k} p(q) a[q,k] log(a[q,k] / p(k)), NMI = I / sqrt(H(q) H(k)), H(q) = log N -> (B, H).
    Computed as I = H(k) - mean_q H(a[q,:]) (the same sum, rearranged), reusing the row entropies."""
    N = a.shape[-1]
    p_k = a.mean(-2)  # (B, H, N)
    h_k = -(p_k * torch.log(p_k.clamp_min(1e-30))).sum(-1)
    mutual = (h_k - attention_entropy(a, rows)).clamp_min(0)
    return mutual / torch.sqrt(math.log(N) * h_k).clamp_min(1e-12)


def relative_log_amplitude(tokens, grid):
    """Fourier: tokens (B, N, C) without CLS as (C, G, G) maps; log(|fft2| + 1e-6), DC centered,
    mean over channels; the diagonal from DC outward minus the DC value -> (B, G//2 + (G odd)).
    Entry k is frequency k/G cycles per patch on both axes; the last is the highest (~pi)."""
    B, N, C = tokens.shape
    maps = tokens.float().transpose(1, 2).reshape(B, C, grid, grid)
    spectrum = torch.fft.fftshift(torch.fft.fft2(maps), dim=(-2, -1)).abs().add(1e-6).log().mean(1)  # (B, G, G)
    center = grid // 2
    diag = torch.diagonal(spectrum, dim1=-2, dim2=-1)[:, center:]  # (B, K) from DC outward
    return diag - diag[:, :1]


def relative_log_singular_values(x):
    """x (..., M, C) samples: singular values of the covariance, log, minus the log of the largest -> (..., C)
    (at most M-1 are nonzero; zeros are floored at 1e-12 of the largest, so their value is about -27.6).
    The covariance is symmetric PSD, so its singular values are its eigenvalues, and its nonzero ones
    are those of the smaller Gram matrix x x^T when M < C (the same numbers, much cheaper)."""
    x = x.double() - x.double().mean(-2, keepdim=True)
    M, C = x.shape[-2:]
    gram = x @ x.transpose(-1, -2) if M < C else x.transpose(-1, -2) @ x
    s = torch.linalg.eigvalsh(gram / max(M - 1, 1)).flip(-1).clamp_min(0)  # descending
    if M < C:
        s = torch.cat([s, s.new_zeros(*s.shape[:-1], C - M)], dim=-1)
    top = s[..., :1].clamp_min(1e-300)
    return torch.log(torch.maximum(s, top * 1e-12)) - torch.log(top)


def token_singular_spectrum(tokens):
    """token level: per image, the relative log singular values of its patch-token covariance -> (B, C);
    the svd headline per layer is the mean of the first min(N-1, C) (the nonzero ones): higher = fuller"""
    return relative_log_singular_values(tokens)


# ----------------------------------------------------------------------------------------
# decisions: shape bias, accuracy and error consistency

# ImageNet-1k indices of the 16 entry-level categories (bethgelab/model-vs-human,
# helper/human_categories.py; 207 classes in all)
IMAGENET_16 = {
    "airplane": [404], "bear": [294, 295, 296, 297], "bicycle": [444, 671],
    "bird": [8, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 22, 23, 24, 80, 81, 82, 83, 87, 88, 89, 90, 91, 92, 93, 94, 95,
             96, 98, 99, 100, 127, 128, 129, 130, 131, 132, 133, 135, 136, 137, 138, 139, 140, 141, 142, 143, 144, 145],
    "boat": [472, 554, 625, 814, 914], "bottle": [440, 720, 737, 898, 899, 901, 907], "car": [436, 511, 817],
    "cat": [281, 282, 283, 284, 285, 286], "chair": [423, 559, 765, 857], "clock": [409, 530, 892],
    "dog": [152, 153, 154, 155, 156, 157, 158, 159, 160, 161, 162, 163, 164, 165, 166, 167, 168, 169, 170, 171, 172, 173,
            174, 175, 176, 177, 178, 179, 180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 190, 191, 193, 194, 195, 196,
            197, 198, 199, 200, 201, 202, 203, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217, 218, 219,
            220, 221, 222, 223, 224, 225, 226, 228, 229, 230, 231, 232, 233, 234, 235, 236, 237, 238, 239, 240, 241, 243,
            244, 245, 246, 247, 248, 249, 250, 252, 253, 254, 255, 256, 257, 259, 261, 262, 263, 265, 266, 267, 268],
    "elephant": [385, 386], "keyboard": [508, 878], "knife": [499], "oven": [766],
    "truck": [555, 569, 656, 675, 717, 734, 864, 867],
}
OOD_DATASETS = ("edge", "silhouette", "cue-conflict", "colour", "contrast", "high-pass", "low-pass", "phase-scrambling",
                "power-equalisation", "false-colour", "rotation", "eidolonI", "eidolonII", "eidolonIII",
                "uniform-noise", "sketch", "stylized")


def category_decisions(logits, categories, model_classes=None):
    """the chosen category per image among `categories`: for an ImageNet-1k classifier the
    category whose ImageNet classes have the highest mean probability (model-vs-human); for other
    label sets, the highest logit among the model's classes with those names -> (B,) indices"""
    if logits.shape[-1] == 1000 and set(categories) <= set(IMAGENET_16):
        probs = logits.float().softmax(-1)
        scores = torch.stack([probs[:, IMAGENET_16[c]].mean(-1) for c in categories], -1)
    else:
        missing = [c for c in categories if model_classes is None or c not in model_classes]
        if missing:
            raise ValueError(f"the model's classes {model_classes} lack the categories {missing}")
        scores = logits[:, [model_classes.index(c) for c in categories]]
    return scores.argmax(-1)


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
    return overall, {c: (h[0] / (h[0] + h[1]) if h[0] + h[1] else None) for c, h in sorted(hits.items())}


def error_consistency(correct_a, correct_b):
    """Cohen's kappa of two observers' trial-wise correctness: c_obs = fraction of trials both right
    or both wrong, c_exp = p1 p2 + (1 - p1)(1 - p2), kappa = (c_obs - c_exp) / (1 - c_exp)"""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    p1, p2 = a.mean(), b.mean()
    c_obs = (a == b).mean()
    c_exp = p1 * p2 + (1 - p1) * (1 - p2)
    return float((c_obs - c_exp) / (1 - c_exp)) if c_exp < 1 else float("nan")


def cue_conflict_labels(path):
    """shape class = the folder; texture class = the file name after the last '_' or '-', digits
    dropped: 'cat/cat3-elephant1.png' (texture-vs-shape) or 'star/star0007_circle.png' (embedded)"""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(path)), re.sub(r"\d+$", "", re.split(r"[_-]", stem)[-1])


def ood_image_category(path):
    """model-vs-human file names: <a>_<b>_<c>_<condition>_<category>_<name>; otherwise the folder"""
    parts = os.path.basename(path).split("_")
    return parts[4] if len(parts) >= 6 else os.path.basename(os.path.dirname(path))


# ----------------------------------------------------------------------------------------
# one pass over the images, accumulating every metric per layer

@torch.no_grad()
def collect(model, loader, device, want, map_request=None):
    """Sums over images of every per-image metric, per layer: one forward_all per batch."""
    cfg = model.config
    sums, count, pooled, maps = {}, 0, [], []

    def add(key, value):  # value: (B, ...) per image -> running sum
        sums[key] = sums.get(key, 0) + value.sum(0).double().cpu()

    for images, _, _, _ in tqdm(loader, desc="  batches", leave=False, disable=None):
        if images is None:
            continue
        images = images.to(device)
        out = model.forward_all(images)
        count += len(images)
        for layer, attn in enumerate(out["attn"]):
            if want & {"attn_distance", "attn_entropy", "nmi"}:
                a = patch_attention(attn)
            if want & {"attn_entropy", "nmi"}:
                rows = row_entropy(a)  # shared by both
            if "attn_distance" in want:
                add(("attn_distance", layer), attention_distance(a, cfg.grid, cfg.patch_size))
            if "attn_entropy" in want:
                add(("attn_entropy", layer), attention_entropy(a, rows))
            if "nmi" in want:
                add(("nmi", layer), attention_nmi(a, rows))
        for layer, hidden in enumerate(out["hidden"]):  # 0 = embeddings, l = after block l
            tokens = hidden[:, 1:]
            if "fourier" in want:
                add(("fourier", layer), relative_log_amplitude(tokens, cfg.grid))
            if "svd" in want and layer > 0:
                add(("svd_token", layer), token_singular_spectrum(tokens))
        if "svd" in want:
            pooled.append(torch.stack([h[:, 1:].mean(1).float().cpu() for h in out["hidden"][1:]]))  # (L, B, C)
        if map_request is not None and len(maps) * loader.batch_size < map_request["images"]:
            layer = map_request["layer"]
            maps.append((images.cpu(), patch_attention(out["attn"][layer])[:, :, map_request["queries"]].mean(1).cpu()))
    stats = {k: v / count for k, v in sums.items()}
    stats["count"] = count
    if pooled:
        stats["pooled"] = torch.cat(pooled, dim=1)  # (L, images, C)
    if maps:
        stats["maps"] = (torch.cat([m[0] for m in maps])[:map_request["images"]], torch.cat([m[1] for m in maps])[:map_request["images"]])
    return stats


def summarize(metric, stats, cfg):
    """per-model JSON entry of a metric from the collected stats"""
    depth = cfg.depth
    if metric in ("attn_distance", "attn_entropy", "nmi"):
        per_head = [stats[(metric, l)].tolist() for l in range(depth)]
        return dict(per_layer=[float(np.mean(h)) for h in per_head], per_head=per_head)
    if metric == "fourier":
        spectra = [stats[("fourier", l)].tolist() for l in range(depth + 1)]
        return dict(per_layer=[s[-1] for s in spectra[1:]], embedding=spectra[0][-1], spectrum=spectra,
                    frequencies_pi=[2 * k / cfg.grid for k in range(len(spectra[0]))])
    if metric == "svd":
        n = stats["count"]
        token = [stats[("svd_token", l)].tolist() for l in range(1, depth + 1)]
        image = [relative_log_singular_values(stats["pooled"][l]).tolist() for l in range(depth)]
        # covariance ranks: <= tokens - 1 per image, <= images - 1 across images; the rest are zeros
        token_usable, image_usable = min(cfg.num_patches - 1, cfg.embed_dim), min(n - 1, cfg.embed_dim)
        return dict(per_layer=[float(np.mean(t[:token_usable])) for t in token], token_spectrum=token, image_spectrum=image,
                    token_usable=token_usable, image_usable=image_usable,
                    token_average=np.mean(token, 0).tolist(), image_average=np.mean(image, 0).tolist())
    raise ValueError(metric)


# ----------------------------------------------------------------------------------------
# figures (matplotlib is optional: without it only the JSON is written)

def plot(metric, results, path, maps=None, settings=None):
    plt = pyplot()
    if plt is None:
        print("(no figure: pip install matplotlib to get the PNG; the JSON is written)")
        return False
    labels = list(results)
    if metric in CLASSIFIER + ("sharpness",):
        fig = plot_classifier(plt, metric, results)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True
    if metric in ("attn_distance", "nmi", "fourier"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, label in enumerate(labels):
            r = results[label]
            layers = np.arange(1, len(r["per_layer"]) + 1)
            if metric == "attn_distance":  # Fig. 3a: every head as a dot, the head mean as a line
                heads = np.array(r["per_head"])
                ax.scatter(np.repeat(layers, heads.shape[1]), heads.flatten(), s=8, alpha=0.35, color=f"C{i}")
            ax.plot(layers, r["per_layer"], marker="o", color=f"C{i}", label=label)
        ylabel = {"attn_distance": "attention distance (pixels)", "nmi": "normalized mutual information",
                  "fourier": "Δ log amplitude at the highest frequency"}[metric]
        ax.set(xlabel="block", ylabel=ylabel, title={"attn_distance": "Average attention distance (Fig. 3a)",
               "nmi": "NMI of queries and keys (Fig. 6a)", "fourier": "Relative log amplitude (Fig. 3b)"}[metric])
    elif metric == "attn_entropy":  # Fig. 10: the distribution over heads, per layer
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            heads = np.array(results[label]["per_head"])
            pos = np.arange(1, heads.shape[0] + 1) + (i - (len(labels) - 1) / 2) * width
            parts = ax.boxplot(heads.T, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
            for box in parts["boxes"]:
                box.set(facecolor=f"C{i}", alpha=0.5)
            ax.plot([], [], color=f"C{i}", label=label, lw=6, alpha=0.5)
        ax.set_xticks(np.arange(1, heads.shape[0] + 1), labels=[str(l) for l in range(1, heads.shape[0] + 1)])
        ax.set(xlabel="block", ylabel="attention entropy (nats) over heads", title="Attention entropy per head (Fig. 10)")
    elif metric == "svd":  # Figs. 4, 5: spectra per layer, lighter = deeper
        fig, axes = plt.subplots(2, len(labels), figsize=(4 * len(labels) + 1, 7), squeeze=False, constrained_layout=True)
        for i, label in enumerate(labels):
            r = results[label]
            for row, key in enumerate(("token_spectrum", "image_spectrum")):
                ax = axes[row, i]
                spectra = r[key]
                shown = r["image_usable"] if key == "image_spectrum" else r["token_usable"]
                for l, s in enumerate(spectra):
                    ax.plot(s[:shown], color=plt.cm.viridis(l / max(len(spectra) - 1, 1)), lw=1)
                ax.set(title=f"{label}: {'token' if row == 0 else 'image'} level", xlabel="singular value index",
                       ylabel="Δ log singular value")
        fig.colorbar(plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(1, len(spectra))), ax=axes, label="block")
    elif metric == "attn_map":  # Fig. 2: query patch boxed, its attention overlaid
        rows = [(label, img, att) for label in labels for img, att in zip(*maps[label])]
        queries = settings["queries"]
        fig, axes = plt.subplots(len(rows), len(queries) + 1, figsize=(2.2 * (len(queries) + 1), 2.2 * len(rows)), squeeze=False)
        for r, (label, img, att) in enumerate(rows):
            grid = int(round(att.shape[-1] ** 0.5))
            H, W = img.shape[-2:]
            axes[r, 0].imshow(img.permute(1, 2, 0).numpy())
            axes[r, 0].set_ylabel(label, fontsize=8)
            for c, q in enumerate(queries):
                ax = axes[r, c + 1]
                heat = att[c].reshape(1, 1, grid, grid)
                heat = torch.nn.functional.interpolate(heat, size=(H, W), mode="nearest")[0, 0].numpy()
                ax.imshow(img.permute(1, 2, 0).numpy())
                ax.imshow(heat, cmap="inferno", alpha=0.6)
                y, x = divmod(q, grid)
                ax.add_patch(plt.Rectangle((x * W / grid - 0.5, y * H / grid - 0.5), W / grid, H / grid, fill=False, ec="red", lw=1.5))
                ax.set_title(f"query {q}" if r == 0 else "", fontsize=8)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle(f"Attention of the query patch (red box), block {settings['layer_shown']}")
    if metric != "attn_map" and metric != "svd":
        ax.legend()
        ax.grid(alpha=0.3)
    if metric != "svd":
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_classifier(plt, metric, results):
    labels = list(results)
    if metric == "landscape":  # Fig. 7a/b: contours of the loss around the weights
        fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), squeeze=False)
        for ax, label in zip(axes[0], labels):
            r = results[label]
            c = ax.contourf(r["coords"], r["coords"], np.array(r["loss"]).T, levels=20, cmap="viridis")
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
            ax.plot(its, [e["eigenvalue"] for e in log], color=f"C{i}", marker="o", label=f"{label}: top eigenvalue")
            twin.plot(its, [e["trace"] for e in log], color=f"C{i}", ls="--", label=f"{label}: trace")
        ax.set(xlabel="iteration", ylabel="top Hessian eigenvalue (sharpness)", title="Sharpness during fine-tuning (Fig. 7c, 7f)")
        twin.set_ylabel("Hessian trace (dashed)")
    elif metric == "hessian":
        k = len(results[labels[0]]["eigenvalues"])
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            r = results[label]
            ax.bar(np.arange(k + 1) + i * width, r["eigenvalues"] + [r["trace"]], width, yerr=[0] * k + [r["trace_stderr"]], label=label)
        ax.set_xticks(np.arange(k + 1) + width * (len(labels) - 1) / 2, labels=[f"λ{j + 1}" for j in range(k)] + ["trace"])
        ax.set(ylabel="value", title="Hessian top eigenvalues and trace")
    elif metric == "shape_bias":  # Fig. 8a / 11: shape bias per class and overall
        classes = sorted({c for r in results.values() for c in r["per_class"]})
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            r = results[label]
            ax.bar(np.arange(len(classes) + 1) + i * width, [r["per_class"].get(c) or 0 for c in classes] + [r["shape_bias"] or 0], width, label=label)
        ax.set_xticks(np.arange(len(classes) + 1) + width * (len(labels) - 1) / 2, labels=classes + ["overall"], rotation=45)
        ax.set(ylim=(0, 1), ylabel="shape bias (fraction of shape decisions)", title="Shape vs texture decisions on cue-conflict images")
    else:  # ood: accuracy per dataset
        names = sorted({d for r in results.values() for d in r["datasets"]})
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ax.bar(np.arange(len(names)) + i * width, [results[label]["datasets"].get(n, {}).get("accuracy", 0) for n in names], width, label=label)
        ax.set_xticks(np.arange(len(names)) + width * (len(labels) - 1) / 2, labels=names, rotation=60, ha="right")
        ax.set(ylim=(0, 1), ylabel="accuracy", title="Out-of-distribution accuracy (Fig. 12a)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------
# command line

def parse_args(argv):
    """--key=value options (defaults above) and positional model arguments; one clear line on error"""
    opts, models = dict(DEFAULTS), []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if key not in opts:
                raise SystemExit(f"error: unknown option '--{key}': options are {', '.join('--' + k for k in opts)}")
            if not eq:  # --key value
                value = next(args, None)
                if value is None:
                    raise SystemExit(f"error: option '--{key}' needs a value")
            try:
                opts[key] = type(DEFAULTS[key])(value)
            except ValueError:
                raise SystemExit(f"error: --{key}={value}: '{key}' must be {type(DEFAULTS[key]).__name__}") from None
        else:
            models.append(arg)
    if opts["metric"] not in METRICS + ("all",):
        raise SystemExit(f"error: unknown metric '{opts['metric']}': choose one of {', '.join(METRICS)} or all")
    if not models:
        raise SystemExit("error: no model given: python analyze.py --metric NAME CKPT [CKPT ...]")
    return opts, models


def image_folder(opts, default_split):
    """the ImageFolder to read: data/split, data/default_split if present, else data itself"""
    root = resolve_data_dir(opts["data"])
    for split in (opts["split"], default_split):
        if split and os.path.isdir(os.path.join(root, split)):
            return ImageFolder(os.path.join(root, split), None)
    if opts["split"]:
        raise DataError(f"no folder '{opts['split']}' under '{root}'")
    return ImageFolder(root, None)


def labelled_batches(model, dataset, subset, opts, device):
    """the subset as a list of (images, labels) on the device, for the loss of a classifier"""
    if model.head is None or model.config.num_classes != len(dataset.classes):
        raise SystemExit(f"error: the Hessian needs a classifier for the data's {len(dataset.classes)} classes; "
                         f"this model has {model.config.num_classes or 'no'} outputs: fine-tune it first")
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, subset), batch_size=opts["batch_size"], collate_fn=collate)
    return [(x.to(device), y.to(device)) for x, y, _, _ in loader if x is not None]


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
                print(f"warning: skipping unreadable image {path} ({type(e).__name__})", file=sys.stderr)
        if images:
            logits.append(model(torch.stack(images).to(device)).float().cpu())
    return kept, torch.cat(logits) if logits else torch.zeros(0, 0)


def human_trials(folder):
    """model-vs-human raw data: CSVs with columns subj, object_response, category, imagename ->
    {subject: {image key: correct}}; the image key drops the observer field (3rd) of the name"""
    trials = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".csv"):
            with open(os.path.join(folder, name)) as f:
                for row in csv.DictReader(f):
                    if not {"subj", "object_response", "category", "imagename"} <= set(row):
                        raise SystemExit(f"error: {name} lacks the columns subj, object_response, category, imagename")
                    trials.setdefault(row["subj"], {})[image_key(row["imagename"])] = row["object_response"] == row["category"]
    return trials


def image_key(name):
    parts = os.path.basename(name).split("_")
    return "_".join(parts[:2] + parts[3:]) if len(parts) >= 6 else os.path.basename(name)


def classifier_metric(metric, model, info, opts, device, subset_of):
    """one model's entry for hessian, landscape, shape_bias or ood"""
    cfg = model.config
    transform = EvalTransform(cfg.img_size)
    if metric in ("hessian", "landscape"):
        dataset = image_folder(opts, "val")
        dataset.transform = transform
        batches = labelled_batches(model, dataset, subset_of(dataset), opts, device)
        values, vectors = top_eigenvalues(model, batches, opts["top_k"] if metric == "hessian" else 2, opts["power_iters"], opts["tol"], opts["seed"])
        if metric == "landscape":
            coords, grid = loss_landscape(model, batches, vectors[:2], opts["span"], opts["steps"])
            return dict(eigenvalues=values, coords=coords, loss=grid, center_loss=mean_loss(model, batches))
        trace, stderr = hutchinson_trace(model, batches, opts["trace_samples"], opts["seed"])
        return dict(eigenvalues=values, trace=trace, trace_stderr=stderr, loss=mean_loss(model, batches), images=sum(len(t) for _, t in batches))
    if metric == "shape_bias":
        dataset = image_folder(opts, "cue_conflict")
        paths = [p for p, _ in dataset.samples]
        kept, logits = predict_files(model, paths, transform, device, opts["batch_size"])
        shapes, textures = zip(*[cue_conflict_labels(p) for p in kept])
        categories = sorted(set(shapes) | set(textures))
        decisions = [categories[i] for i in category_decisions(logits, categories, info.get("classes")).tolist()]
        overall, per_class = shape_bias(decisions, shapes, textures)
        conflicting = sum(s != t for s, t in zip(shapes, textures))
        return dict(shape_bias=overall, per_class=per_class, images=conflicting, excluded_agreeing=len(kept) - conflicting)
    # ood: accuracy on every model-vs-human dataset found under data, and kappa against humans
    root = resolve_data_dir(opts["data"])
    found = [d for d in OOD_DATASETS if os.path.isdir(os.path.join(root, d))]
    if not found:
        raise SystemExit(f"error: none of the 17 OOD datasets ({', '.join(OOD_DATASETS[:3])}, ...) is under '{root}'")
    entry = {}
    for name in found:
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, name)) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
        kept, logits = predict_files(model, paths, transform, device, opts["batch_size"])
        truth = [ood_image_category(p) for p in kept]
        categories = sorted(set(truth) | (set(IMAGENET_16) if logits.shape[-1] == 1000 else set()))
        decisions = [categories[i] for i in category_decisions(logits, categories, info.get("classes")).tolist()]
        correct = {image_key(p): d == t for p, d, t in zip(kept, decisions, truth)}
        result = dict(accuracy=float(np.mean(list(correct.values()))), images=len(kept))
        human_dir = os.path.join(opts["human"], name) if opts["human"] else ""
        if human_dir and os.path.isdir(human_dir):
            kappas = []
            for subject, trials in human_trials(human_dir).items():
                shared = sorted(set(trials) & set(correct))
                if shared:
                    kappas.append(error_consistency([correct[k] for k in shared], [trials[k] for k in shared]))
            result["error_consistency"] = float(np.nanmean(kappas)) if kappas else None
            result["subjects"] = len(kappas)
        entry[name] = result
    return dict(datasets=entry, mean_accuracy=float(np.mean([r["accuracy"] for r in entry.values()])))


def main(argv):
    opts, models = parse_args(argv)
    metric = opts["metric"]
    metrics = list(REPRESENTATION) if metric == "all" else [metric]
    labels = opts["labels"].split(",") if opts["labels"] else [os.path.splitext(os.path.basename(m))[0] if os.path.exists(m) else m for m in models]
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise SystemExit(f"error: --labels needs {len(models)} distinct comma-separated names, got '{opts['labels']}'")
    try:
        os.makedirs(opts["out"], exist_ok=True)
    except OSError as e:  # a file of that name, a file on the way, no permission
        raise SystemExit(f"error: --out={opts['out']} cannot be a directory ({e.strerror}): "
                         f"give a directory for NAME.json and NAME.png") from None
    settings = {k: v for k, v in opts.items() if k not in ("labels", "out")} | dict(models=dict(zip(labels, models)))
    if metric == "sharpness":  # the curves logged by finetune.py --hessian_every
        try:
            results = {label: json.load(open(path)) for label, path in zip(labels, models)}
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: sharpness takes the JSON logs of finetune.py --hessian_every: {e}")
        return write(metric, results, settings, opts["out"])
    if "svd" in metrics and opts["n_images"] < 2:
        raise SystemExit(f"error: the image-level spectrum needs at least 2 images (n_images={opts['n_images']}); "
                         "a full spectrum needs more images than channels")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if opts["device"] == "auto" else opts["device"]

    def subset_of(dataset):  # a fixed, seeded subset of n_images
        return np.random.default_rng(opts["seed"]).permutation(len(dataset))[:opts["n_images"]].tolist()

    results, maps = {m: {} for m in metrics}, {}
    try:
        for model_arg, label in zip(models, labels):
            model, info = load_model(model_arg)
            bad = [k for k, t in model.state_dict().items()
                   if t.is_floating_point() and not t.isfinite().all()]
            if bad:
                raise SystemExit(f"error: {model_arg} has non-finite (NaN/inf) weights, first in "
                                 f"{bad[0]}: analyze a checkpoint saved before training diverged")
            model.to(device)
            cfg = model.config
            print(f"{label}: {info['source']}, {cfg.depth} blocks, {cfg.img_size} px")
            if metric in CLASSIFIER:
                results[metric][label] = classifier_metric(metric, model, info, opts, device, subset_of)
                continue
            dataset = image_folder(opts, "val")
            dataset.transform = EvalTransform(cfg.img_size)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, subset_of(dataset)), batch_size=opts["batch_size"], collate_fn=collate)
            request = None
            if "attn_map" in metrics:
                layer = opts["layer"] % cfg.depth
                g = cfg.grid
                queries = [int(q) for q in opts["queries"].split(",")] if opts["queries"] else [g // 4 * g + g // 4, (g // 2) * g + g // 2, (3 * g // 4) * g + g // 4]
                if any(not 0 <= q < cfg.num_patches for q in queries):
                    raise SystemExit(f"error: queries must be patch indices in 0..{cfg.num_patches - 1} for {label}")
                request = dict(layer=layer, queries=queries, images=opts["map_images"])
            stats = collect(model, loader, device, set(metrics), request)
            for m in metrics:
                if m == "attn_map":
                    maps[label] = stats["maps"]
                    results[m][label] = dict(layer=request["layer"], queries=request["queries"], attention=stats["maps"][1].tolist())
                else:
                    results[m][label] = summarize(m, stats, cfg)
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for m in metrics:
        extra = dict(queries=results[m][labels[0]]["queries"], layer_shown=results[m][labels[0]]["layer"] + 1) if m == "attn_map" else {}
        write(m, results[m], settings | extra, opts["out"], maps)


def write(metric, results, settings, out, maps=None):
    json_path, png_path = os.path.join(out, f"{metric}.json"), os.path.join(out, f"{metric}.png")
    with open(json_path, "w") as f:
        json.dump(dict(metric=metric, settings=settings, models=results), f)
    drawn = plot(metric, results, png_path, maps, settings)
    print(f"{metric}: {json_path}" + (f", {png_path}" if drawn else ""))
    for label, r in results.items():
        if "per_layer" in r:
            print(f"  {label:>20}: per block " + " ".join(f"{v:.3g}" for v in r["per_layer"]))
        elif metric == "hessian":
            print(f"  {label:>20}: eigenvalues {', '.join(f'{v:.4g}' for v in r['eigenvalues'])}, trace {r['trace']:.4g} +- {r['trace_stderr']:.2g}")
        elif metric == "shape_bias":
            print(f"  {label:>20}: shape bias {r['shape_bias']:.3f} over {r['images']} cue-conflict images")
        elif metric == "ood":
            print(f"  {label:>20}: mean accuracy {r['mean_accuracy']:.3f} over {len(r['datasets'])} datasets")


if __name__ == "__main__":
    main(sys.argv[1:])
