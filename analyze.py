"""
Every attention and representation metric of the paper, one function each, for any model:

    python analyze.py --metric NAME CKPT [CKPT ...] [--data=DIR] [--n_images=N] [--out=DIR]

NAME: attn_map, attn_distance, attn_entropy, nmi, fourier, svd, or all (one forward pass
per batch collects what every metric needs). CKPT: clip | dino | deit | embedded | an official
file | a project checkpoint; several are compared side by side. Writes out/NAME.json (the
numbers; models[label]["per_layer"] is the headline number per block, first block first) and
out/NAME.png (the figure; needs matplotlib).

Definitions follow ../shared/REFERENCE.md section 4. Attention metrics drop the CLS row and
column and renormalize each query's row to sum to 1.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from data import DataError, EvalTransform, ImageFolder, collate, resolve_data_dir
from teacher import CheckpointError, load_model

METRICS = ("attn_map", "attn_distance", "attn_entropy", "nmi", "fourier", "svd")
DEFAULTS = dict(
    metric="",          # one of METRICS or all
    data="embedded",    # ImageFolder root (its val/ split is used if present) or 'embedded'
    split="val",        # sub-folder of data to read
    n_images=64,        # fixed, seeded subset of the split
    batch_size=16,      # images per forward
    out="out/analysis",  # where NAME.json and NAME.png go
    labels="",          # comma-separated legend labels, one per CKPT (default: file or teacher names)
    layer=-1,           # attn_map: block whose attention is shown (-1 = last)
    queries="",         # attn_map: comma-separated query patch indices (default: 3 spread over the grid)
    map_images=2,       # attn_map: images shown per model
    seed=0,             # which images form the subset
    device="auto",      # auto | cpu | cuda
)


# ----------------------------------------------------------------------------------------
# metrics on tensors: each takes attention maps (B, H, N+1, N+1) with CLS first, or tokens

def patch_attention(attn):
    """drop the CLS row and column, renormalize each query row: (B, H, N+1, N+1) -> (B, H, N, N)"""
    a = attn[..., 1:, 1:].float()
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def patch_distances(grid, patch_size):
    """D[i, j] = patch_size * ||grid(i) - grid(j)||_2 in pixels: (N, N)"""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], -1).float()
    return patch_size * torch.cdist(coords, coords)


def attention_distance(attn, grid, patch_size):
    """average attention distance: per query sum_k a[q,k] D[q,k], mean over queries -> (B, H) pixels"""
    a = patch_attention(attn)
    return (a * patch_distances(grid, patch_size).to(a.device)).sum(-1).mean(-1)


def attention_entropy(attn):
    """-sum_k a[q,k] log a[q,k] (nats), mean over queries -> (B, H)"""
    a = patch_attention(attn)
    return -(a * torch.log(a.clamp_min(1e-30))).sum(-1).mean(-1)


def attention_nmi(attn):
    """NMI between queries and keys with p(q) = 1/N: p(k) = mean_q a[q,k],
    I = sum_{q,k} p(q) a[q,k] log(a[q,k] / p(k)), NMI = I / sqrt(H(q) H(k)), H(q) = log N -> (B, H)"""
    a = patch_attention(attn)
    N = a.shape[-1]
    p_k = a.mean(-2)  # (B, H, N)
    mutual = (a * (torch.log(a.clamp_min(1e-30)) - torch.log(p_k.clamp_min(1e-30))[..., None, :])).sum((-2, -1)) / N
    h_k = -(p_k * torch.log(p_k.clamp_min(1e-30))).sum(-1)
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
    """x (M, C) samples: singular values of the covariance, log, minus the log of the largest -> (C,)
    (at most M-1 are nonzero; zeros are floored at 1e-12 of the largest, so their value is about -27.6)"""
    x = x.double() - x.double().mean(0)
    cov = x.T @ x / max(x.shape[0] - 1, 1)
    s = torch.linalg.svdvals(cov)
    return torch.log(s.clamp_min(s[0] * 1e-12 + 1e-300)) - torch.log(s[0].clamp_min(1e-300))


def token_singular_spectrum(tokens):
    """token level: per image, the relative log singular values of its patch-token covariance -> (B, C);
    the svd headline per layer is the mean of the first min(N-1, C) (the nonzero ones): higher = fuller"""
    return torch.stack([relative_log_singular_values(t) for t in tokens])


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
            if want & {"attn_distance"}:
                add(("attn_distance", layer), attention_distance(attn, cfg.grid, cfg.patch_size))
            if want & {"attn_entropy"}:
                add(("attn_entropy", layer), attention_entropy(attn))
            if want & {"nmi"}:
                add(("nmi", layer), attention_nmi(attn))
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

def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot(metric, results, path, maps=None, settings=None):
    plt = pyplot()
    if plt is None:
        print("(no figure: pip install matplotlib to get the PNG; the JSON is written)")
        return False
    labels = list(results)
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


# ----------------------------------------------------------------------------------------
# command line

def parse_args(argv):
    """--key=value options (defaults above) and positional model arguments; one clear line on error"""
    opts, models = dict(DEFAULTS), []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if key not in opts or not eq:
                raise SystemExit(f"error: unknown option '{arg}': use --key=value with key in {', '.join(opts)}")
            try:
                opts[key] = type(DEFAULTS[key])(value)
            except ValueError:
                raise SystemExit(f"error: {arg}: '{key}' must be {type(DEFAULTS[key]).__name__}") from None
        else:
            models.append(arg)
    if opts["metric"] not in METRICS + ("all",):
        raise SystemExit(f"error: unknown metric '{opts['metric']}': choose one of {', '.join(METRICS)} or all")
    if not models:
        raise SystemExit("error: no model given: python analyze.py --metric NAME CKPT [CKPT ...]")
    return opts, models


def main(argv):
    opts, models = parse_args(argv)
    metrics = list(METRICS) if opts["metric"] == "all" else [opts["metric"]]
    if "svd" in metrics and opts["n_images"] < 2:
        raise SystemExit(f"error: the image-level spectrum needs at least 2 images (n_images={opts['n_images']}); "
                         "a full spectrum needs more images than channels")
    labels = opts["labels"].split(",") if opts["labels"] else [os.path.splitext(os.path.basename(m))[0] if os.path.exists(m) else m for m in models]
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise SystemExit(f"error: --labels needs {len(models)} distinct comma-separated names, got '{opts['labels']}'")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if opts["device"] == "auto" else opts["device"]
    try:
        root = resolve_data_dir(opts["data"])
        folder = os.path.join(root, opts["split"]) if os.path.isdir(os.path.join(root, opts["split"])) else root
        dataset = ImageFolder(folder, None)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    subset = np.random.default_rng(opts["seed"]).permutation(len(dataset))[:opts["n_images"]].tolist()
    os.makedirs(opts["out"], exist_ok=True)
    results = {m: {} for m in metrics}
    maps = {}
    for model_arg, label in zip(models, labels):
        try:
            model, info = load_model(model_arg)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
        model.to(device)
        cfg = model.config
        dataset.transform = EvalTransform(cfg.img_size)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, subset), batch_size=opts["batch_size"], collate_fn=collate)
        request = None
        if "attn_map" in metrics:
            layer = opts["layer"] if opts["layer"] >= 0 else cfg.depth - 1 + opts["layer"] + 1
            g = cfg.grid
            queries = [int(q) for q in opts["queries"].split(",")] if opts["queries"] else [g // 4 * g + g // 4, (g // 2) * g + g // 2, (3 * g // 4) * g + g // 4]
            if not (0 <= layer < cfg.depth) or any(not 0 <= q < cfg.num_patches for q in queries):
                raise SystemExit(f"error: layer must be in 0..{cfg.depth - 1} and queries in 0..{cfg.num_patches - 1} for {label}")
            request = dict(layer=layer, queries=queries, images=opts["map_images"])
        print(f"{label}: {info['source'] if 'source' in info else model_arg}, {cfg.depth} blocks, {cfg.img_size} px, {len(subset)} images")
        stats = collect(model, loader, device, set(metrics), request)
        for m in metrics:
            if m == "attn_map":
                maps[label] = stats["maps"]
                results[m][label] = dict(layer=request["layer"], queries=request["queries"],
                                         attention=stats["maps"][1].tolist())
            else:
                results[m][label] = summarize(m, stats, cfg)
    for m in metrics:
        settings = {k: opts[k] for k in ("data", "split", "n_images", "seed")} | dict(models=dict(zip(labels, models)))
        if m == "attn_map":
            settings |= dict(queries=results[m][labels[0]]["queries"], layer_shown=results[m][labels[0]]["layer"] + 1)
        json_path, png_path = os.path.join(opts["out"], f"{m}.json"), os.path.join(opts["out"], f"{m}.png")
        with open(json_path, "w") as f:
            json.dump(dict(metric=m, settings=settings, models=results[m]), f)
        drawn = plot(m, results[m], png_path, maps, settings)
        print(f"{m}: {json_path}" + (f", {png_path}" if drawn else ""))
        if m != "attn_map":
            for label in labels:
                print(f"  {label:>20}: per block " + " ".join(f"{v:.3g}" for v in results[m][label]["per_layer"]))


if __name__ == "__main__":
    main(sys.argv[1:])
