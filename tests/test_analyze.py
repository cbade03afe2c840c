"""analyze.py: every metric on inputs whose answer is known in closed form, and the command
line."""
import json
import math
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from analyze import (attention_distance, attention_entropy, attention_nmi, patch_log_attention,
                     relative_log_amplitude, relative_log_singular_values,
                     token_singular_spectrum)

from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def patch_attention(logits):
    """the patch-to-patch attention a = exp(log a) of collect()"""
    return patch_log_attention(logits).exp()


def with_cls(a, cls_logit=0.7, seed=0):
    """(B, H, N, N) patch attention -> (B, H, N+1, N+1) logits whose patch-to-patch softmax is a,
    with a CLS row and column that the metrics must ignore (zeros of a get logit -1e4)"""
    B, H, N, _ = a.shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, N + 1, N + 1, generator=g)
    logits[..., 1:, 1:] = torch.where(a > 0, torch.log(a.clamp_min(1e-30)), torch.tensor(-1e4))
    logits[..., 1:, 0] = cls_logit
    return logits


def identity_attention(grid, heads=2):
    N = grid * grid
    return with_cls(torch.eye(N).expand(1, heads, N, N).clone())


def uniform_attention(grid, heads=2):
    N = grid * grid
    return with_cls(torch.full((1, heads, N, N), 1.0 / N))


def test_patch_attention_drops_cls_and_renormalizes():
    a = patch_attention(uniform_attention(3))
    assert a.shape == (1, 2, 9, 9) and torch.allclose(a, torch.full_like(a, 1 / 9))
    # the same numbers as dropping CLS from the softmax probabilities and renormalizing (cl-vs-mim)
    logits = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0)).double()
    probs = logits.softmax(-1)[..., 1:, 1:]
    renormalized = probs / probs.sum(-1, keepdim=True)
    assert torch.allclose(patch_attention(logits).double(), renormalized, atol=1e-6)


def test_patch_attention_without_the_cancellation_of_renormalizing():
    """queries that put almost everything on CLS: float32 probabilities of the patches are about
    1e-44 (denormals with a few significant bits), so renormalizing them loses the answer; the
    softmax over the patch logits keeps it (truth: the same softmax in float64)"""
    logits = torch.randn(1, 2, 17, 17, generator=torch.Generator().manual_seed(1))
    logits[..., 1:, 0] = 100.0  # CLS logit: exp(-100) ~ 4e-44 of the mass on each patch
    truth = logits[..., 1:, 1:].double().softmax(-1)
    probs = logits.softmax(-1)[..., 1:, 1:]
    renormalized = probs / probs.sum(-1, keepdim=True)
    assert ((renormalized.double() - truth).abs() / truth).max() > 1e-2  # the cancellation is real
    assert torch.allclose(patch_attention(logits).double(), truth, rtol=1e-5, atol=1e-7)


def test_attention_distance_closed_forms():
    grid, patch = 4, 16
    identity = attention_distance(patch_attention(identity_attention(grid)), grid, patch)
    assert torch.allclose(identity, torch.zeros(1, 2))
    # uniform: the mean Euclidean distance over all ordered pairs of grid cells (self included),
    # in pixels
    cells = [(y, x) for y in range(grid) for x in range(grid)]
    mean = sum(math.dist(p, q) for p in cells for q in cells) / len(cells) ** 2
    expected = torch.full((1, 2), patch * mean)
    uniform = attention_distance(patch_attention(uniform_attention(grid)), grid, patch)
    assert torch.allclose(uniform, expected, atol=1e-4)
    # all attention on the right-hand neighbour (wrapping rows at the edge): distance = 1 patch
    # for interior queries
    N = grid * grid
    a = torch.zeros(1, 1, N, N)
    for q in range(N):
        y, x = divmod(q, grid)
        a[0, 0, q, y * grid + (x + 1) % grid] = 1.0
    # grid-1 neighbours at 1, one wrap at grid-1 per row
    expected = patch * ((grid - 1) * 1 + 1 * (grid - 1)) / grid
    distance = attention_distance(patch_attention(with_cls(a)), grid, patch).item()
    assert distance == pytest.approx(expected, rel=1e-5)


def test_attention_entropy_closed_forms():
    identity = attention_entropy(patch_attention(identity_attention(4)))
    assert torch.allclose(identity, torch.zeros(1, 2), atol=1e-6)
    uniform = attention_entropy(patch_attention(uniform_attention(4)))
    assert torch.allclose(uniform, torch.full((1, 2), math.log(16)), atol=1e-5)
    # each query splits attention evenly over 2 keys: log 2
    N = 16
    a = torch.zeros(1, 1, N, N)
    for q in range(N):
        a[0, 0, q, q] = a[0, 0, q, (q + 1) % N] = 0.5
    entropy = attention_entropy(patch_attention(with_cls(a))).item()
    assert entropy == pytest.approx(math.log(2), rel=1e-5)


def test_nmi_closed_forms():
    identity = attention_nmi(patch_attention(identity_attention(4)))
    assert torch.allclose(identity, torch.ones(1, 2), atol=1e-5)
    uniform = attention_nmi(patch_attention(uniform_attention(4)))
    assert torch.allclose(uniform, torch.zeros(1, 2), atol=1e-6)
    # every query attends to key 0 only: p(k) is a point mass, H(k) = 0, I = 0 -> NMI 0
    # (guarded, not NaN)
    a = torch.zeros(1, 1, 16, 16)
    a[..., 0] = 1.0
    assert attention_nmi(patch_attention(with_cls(a))).item() == pytest.approx(0.0, abs=1e-6)
    # two blocks of 8 queries each spreading uniformly over their own 8 keys: I = log 2,
    # H(k) = log 16, H(q) = log 16
    a = torch.zeros(1, 1, 16, 16)
    a[0, 0, :8, :8] = 1 / 8
    a[0, 0, 8:, 8:] = 1 / 8
    nmi = attention_nmi(patch_attention(with_cls(a))).item()
    assert nmi == pytest.approx(math.log(2) / math.log(16), rel=1e-5)


def test_nmi_with_a_non_uniform_key_marginal():
    """NMI = I / sqrt(H(q) H(k)), H(q) = log N (the docstring and docs/metrics.md), on a case
    where H(k) < log N and I > 0, worked out by hand: 16 queries, 12 spread uniformly over keys
    0-7 and 4 over keys 8-15"""
    a = torch.zeros(1, 1, 16, 16)
    a[0, 0, :12, :8] = 1 / 8
    a[0, 0, 12:, 8:] = 1 / 8
    # p(k) = 12/16 * 1/8 = 3/32 on keys 0-7, 4/16 * 1/8 = 1/32 on keys 8-15:
    # H(k) = 8 (3/32) log(32/3) + 8 (1/32) log 32 = 3/4 log(32/3) + 1/4 log 32
    h_k = 0.75 * math.log(32 / 3) + 0.25 * math.log(32)
    # every row has entropy log 8: I = H(k) - log 8 = 3/4 log(4/3) + 1/4 log 4
    mutual = 0.75 * math.log(4 / 3) + 0.25 * math.log(4)
    assert h_k - math.log(8) == pytest.approx(mutual)
    nmi = attention_nmi(patch_attention(with_cls(a))).item()
    assert nmi == pytest.approx(mutual / math.sqrt(math.log(16) * h_k), rel=1e-5)

def test_fourier_single_cosine():
    """1 + cos(2 pi k (x + y) / G): DC amplitude G^2, peaks of G^2 / 2 at (k, k) -> entry k is
    log(1/2); the other diagonal entries are empty (round-off only, far below the peak)."""
    G, k, C = 14, 3, 4
    ys, xs = torch.meshgrid(torch.arange(G).float(), torch.arange(G).float(), indexing="ij")
    field = 1 + torch.cos(2 * math.pi * k * (xs + ys) / G)
    tokens = field.reshape(1, G * G, 1).repeat(2, 1, C).double()
    out = relative_log_amplitude(tokens, G)
    assert out.shape == (2, 7)  # DC and 6 frequencies up to 6/14 cycles per patch (0.86 pi)
    assert out[0, 0].item() == 0.0
    assert out[0, k].item() == pytest.approx(math.log(0.5), abs=1e-5)
    for j in range(7):
        if j not in (0, k):
            assert out[0, j].item() < -10


def notebook_fourier(tokens, grid):
    """how-do-vits-work fourier_analysis.ipynb, step by step: fft2 of the (C, G, G) maps,
    log(|.| + 1e-6), roll by G/2 on both axes, mean over channels, diagonal from the center,
    minus its first entry (per image here; the notebook averages images first, which is linear)"""
    B, N, C = tokens.shape
    maps = tokens.transpose(1, 2).reshape(B, C, grid, grid)
    f = torch.fft.fft2(maps).abs().add(1e-6).log()
    f = torch.roll(f, shifts=(grid // 2, grid // 2), dims=(2, 3)).mean(1)
    diag = torch.diagonal(f, dim1=-2, dim2=-1)[:, grid // 2:]
    return diag - diag[:, :1]


@pytest.mark.parametrize("grid", [8, 14, 7])
def test_fourier_matches_the_notebook(grid):
    tokens = torch.randn(3, grid * grid, 16, generator=torch.Generator().manual_seed(grid)).double()
    tokens = tokens.cumsum(1)  # some low-frequency structure, not just white noise
    ours, notebook = relative_log_amplitude(tokens, grid), notebook_fourier(tokens, grid)
    assert torch.allclose(ours, notebook, atol=1e-9)
    floats = tokens.float()  # float32 features, as the notebook gets them
    ours, notebook = relative_log_amplitude(floats, grid), notebook_fourier(floats, grid)
    assert torch.allclose(ours, notebook.double(), atol=1e-5)


def exact_covariance_samples(M, variances, seed=0):
    """M samples of dimension C whose sample covariance is exactly diag(variances)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, len(variances), generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    q, _ = torch.linalg.qr(x)  # orthonormal, zero-mean columns
    return q * torch.sqrt((M - 1) * torch.tensor(variances, dtype=torch.float64))


def test_singular_spectrum_of_known_covariance():
    variances = [4.0, 1.0, 0.25, 0.01]
    x = exact_covariance_samples(50, variances)
    expected = torch.log(torch.tensor(variances, dtype=torch.float64) / 4.0)
    assert torch.allclose(relative_log_singular_values(x), expected, atol=1e-8)
    # rotated samples: the same spectrum (it does not depend on the basis)
    generator = torch.Generator().manual_seed(1)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=generator))
    assert torch.allclose(relative_log_singular_values(x @ rotation), expected, atol=1e-8)
    # token level: per image, then averaged over images
    tokens = [exact_covariance_samples(30, variances, seed=s) for s in range(3)]
    tokens = torch.stack(tokens).float()
    assert torch.allclose(token_singular_spectrum(tokens), expected.expand(3, 4), atol=1e-4)
    # rank-deficient: 3 samples in 4 dimensions give at most 2 nonzero values; no -inf
    few = relative_log_singular_values(torch.randn(3, 4, dtype=torch.float64))
    assert torch.isfinite(few).all() and few[2:].max() < -20


def run_analyze(args):
    command = [sys.executable, os.path.join(ROOT, "analyze.py"), *args]
    return forkserver.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=600)


def test_all_metrics_from_the_command_line(tiny_data, tiny_teacher, tmp_path):
    other = tmp_path / "other.pt"
    obj = torch.load(tiny_teacher, weights_only=True)
    obj["model"] = {k: v * 1.5 for k, v in obj["model"].items()}
    torch.save(obj, other)
    out = tmp_path / "out"
    result = run_analyze(["--metric=all", tiny_teacher, str(other), f"--data={tiny_data}",
                          "--n_images=12", "--batch_size=5", f"--out={out}", "--labels=a,b"])
    assert result.returncode == 0, result.stderr[-2000:]
    for metric in ("attn_map", "attn_distance", "attn_entropy", "nmi", "fourier", "svd"):
        report = json.load(open(out / f"{metric}.json"))
        assert set(report["models"]) == {"a", "b"}
        assert os.path.getsize(out / f"{metric}.png") > 5000
        if metric != "attn_map":
            # nano/4: 2 blocks, first block first
            assert len(report["models"]["a"]["per_layer"]) == 2
    # 2 maps of the last block (from 0: 1) of 12 images read
    maps = json.load(open(out / "attn_map.json"))
    assert maps["models"]["a"]["images"] == len(maps["models"]["a"]["attention"]) == 2  # before: 12
    # before: 1 and 2
    assert maps["models"]["b"]["layer"] == 1 and "layer_shown" not in maps["settings"]
    entropy = json.load(open(out / "attn_entropy.json"))["models"]["a"]
    assert all(0 <= h <= math.log(64) + 1e-6 for layer in entropy["per_head"] for h in layer)
    svd = json.load(open(out / "svd.json"))["models"]["a"]
    assert svd["image_usable"] == 11 and len(svd["image_spectrum"]) == 2


def test_fourier_at_half_blocks_from_the_command_line(tiny_data, tiny_teacher, tmp_path):
    """--fourier_at=half: the embedding, then after each attention residual and each block
    (how-do-vits-work's points); the after-block points are those of the default run"""
    spectra = {}
    for at in ("blocks", "half"):
        result = run_analyze(["--metric=fourier", tiny_teacher, f"--data={tiny_data}",
                              "--n_images=6", "--batch_size=4", f"--fourier_at={at}",
                              f"--out={tmp_path / at}", "--labels=t"])
        assert result.returncode == 0, result.stderr[-2000:]
        spectra[at] = json.load(open(tmp_path / at / "fourier.json"))["models"]["t"]
    half, blocks = spectra["half"], spectra["blocks"]
    assert half["points"] == ["embedding", "block 1 attention", "block 1", "block 2 attention",
                              "block 2"]
    assert half["depth"] == [0, 0.5, 1, 1.5, 2] and blocks["depth"] == [0, 1, 2]
    after_blocks = torch.tensor(half["spectrum"][::2])
    assert torch.allclose(after_blocks, torch.tensor(blocks["spectrum"]), atol=1e-9)
    assert blocks["per_layer"] == [s[-1] for s in blocks["spectrum"][1:]]
    assert half["per_layer"] == pytest.approx(blocks["per_layer"])
    assert os.path.getsize(tmp_path / "half" / "fourier.png") > 5000


@pytest.mark.parametrize("workers", [None, 3])
def test_collect_matches_the_definitions_on_a_model(tiny_teacher, workers, monkeypatch):
    """collect()'s streamed sums against the metrics recomputed from ViT.forward_all's outputs,
    with the cl-vs-mim renormalization and the notebook's fft2 as the reference formulas; with
    the spectra pool of this machine, and with 3 workers solving layers side by side"""
    import analyze
    from analyze import collect, patch_distances
    from teacher import load_model
    if workers:
        pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
        monkeypatch.setattr(analyze, "SPECTRA_POOL", pool)
    model, _ = load_model(tiny_teacher)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loader = [(images[:4], None, None, None), (images[4:], None, None, None)]
    want = {"attn_distance", "attn_entropy", "nmi", "fourier", "svd"}
    threads = torch.get_num_threads()
    try:
        stats = collect(model, loader, "cpu", want, fourier_at="half")
        assert torch.get_num_threads() == threads  # the workers' one thread each is theirs alone
    finally:
        if workers:  # threads started later take the count of torch's last set_num_threads call
            pool.shutdown()
            torch.set_num_threads(threads)
    with torch.no_grad():
        out = model.forward_all(images)
    D = patch_distances(8, 4).double()
    for layer, attn in enumerate(out["attn"]):
        a = attn[..., 1:, 1:].double()
        a = a / a.sum(-1, keepdim=True)
        entropy = -(a * a.log()).sum(-1).mean(-1).mean(0)
        assert torch.allclose(stats[("attn_entropy", layer)], entropy, atol=1e-5)
        p_k = a.mean(-2, keepdim=True)  # the written-out sum of the NMI's definition
        mutual = (a * (a / p_k).log()).sum((-2, -1)) / 64
        h_k = -(p_k * p_k.log()).sum((-2, -1))
        nmi = (mutual / (math.log(64) * h_k).sqrt()).mean(0)
        assert torch.allclose(stats[("nmi", layer)], nmi, atol=1e-5)
        distance = (a * D).sum(-1).mean(-1).mean(0)
        assert torch.allclose(stats[("attn_distance", layer)], distance, atol=1e-4)
    for layer, hidden in enumerate(out["hidden"]):
        expected = notebook_fourier(hidden[:, 1:].double(), 8).mean(0)
        assert torch.allclose(stats[("fourier", 2 * layer)], expected, atol=1e-5)
        if layer > 0:  # the token covariance's singular values: those of the centred tokens, squared
            tokens = hidden[:, 1:].double()
            s = torch.linalg.svdvals(tokens - tokens.mean(1, keepdim=True)) ** 2 / 63  # (6, 64)
            relative = (s / s[:, :1]).log()[:, :63]  # the 63 nonzero ones
            assert torch.allclose(stats[("svd_token", layer)][:63], relative.mean(0), atol=1e-6)


def test_summaries_and_image_spectrum_match_the_definitions_on_a_model():
    """summarize() after collect() against the definitions recomputed from ViT.forward_all:
    per_layer of the attention metrics = the mean over heads; the image spectrum of block l =
    the relative log singular values of the covariance of the images' mean-pooled patch tokens;
    the svd per_layer = the mean over images of the first min(N - 1, C) entries of each image's
    token spectrum. 16 patches and 32 channels, so that min(N - 1, C) = 15 < N < C."""
    from analyze import collect, patch_distances, summarize
    from model import ViT, ViTConfig
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model = ViT(cfg).eval()
    with torch.no_grad():  # head 1 sharper than at init, head 0 (query rows 0-15) near uniform
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.3)[:16].mul_(0.1)
    g = torch.Generator().manual_seed(1)
    # a contrast per image, so that the images' pooled tokens spread
    images = torch.rand(5, 3, 16, 16, generator=g) * torch.rand(5, 1, 1, 1, generator=g) * 4
    loader = [(images[:3], None, None, None), (images[3:], None, None, None)]
    want = {"attn_distance", "attn_entropy", "nmi", "svd"}
    stats = collect(model, loader, "cpu", want)
    with torch.no_grad():
        out = model.forward_all(images)
    D = patch_distances(4, 4).double()
    for layer, attn in enumerate(out["attn"]):  # per head, mean over images and queries
        a = attn[..., 1:, 1:].double()
        a = a / a.sum(-1, keepdim=True)
        heads = {"attn_entropy": -(a * a.log()).sum(-1).mean((0, -1)),
                 "attn_distance": (a * D).sum(-1).mean((0, -1))}
        p_k = a.mean(-2, keepdim=True)
        mutual = (a * (a / p_k).log()).sum((-2, -1)) / 16  # sum_{q,k} p(q) a log(a / p(k))
        h_k = -(p_k * p_k.log()).sum((-2, -1))
        heads["nmi"] = (mutual / (math.log(16) * h_k).sqrt()).mean(0)
        for metric, per_head in heads.items():
            # the heads differ, so that the first head is not their mean
            assert per_head[0].item() != pytest.approx(per_head[1].item(), rel=1e-3)
            summary = summarize(metric, stats, cfg)
            assert summary["per_layer"][layer] == pytest.approx(per_head.mean().item(), rel=1e-5)
    svd = summarize("svd", stats, cfg)
    assert svd["token_usable"] == 15 and svd["image_usable"] == 4
    for layer, hidden in enumerate(out["hidden"][1:]):
        tokens = hidden[:, 1:].double()  # (5, 16, 32)
        # covariance eigenvalues = squared singular values of the centred samples / (M - 1);
        # relative log: log(s_i / s_1); only the first M - 1 are nonzero
        s = torch.linalg.svdvals(tokens - tokens.mean(1, keepdim=True)) ** 2 / 15  # (5, 16)
        token = (s / s[:, :1]).log()[:, :15]
        assert svd["per_layer"][layer] == pytest.approx(token.mean().item(), abs=1e-5)
        pooled = tokens.mean(1)  # (5, 32): one mean-pooled sample per image
        s = torch.linalg.svdvals(pooled - pooled.mean(0)) ** 2 / 4  # (5,), the last one zero
        image = torch.tensor(svd["image_spectrum"][layer][:4], dtype=torch.float64)
        assert torch.allclose(image, (s / s[0]).log()[:4], atol=1e-4)


def test_metric_runs_on_vit_b_at_224(tmp_path):
    from model import ViT, ViTConfig
    cfg = ViTConfig.from_name("B/16")
    path = tmp_path / "vitb.pt"
    torch.save(dict(model=ViT(cfg).state_dict(), model_args=cfg.to_dict(), config={}), path)
    result = run_analyze(["--metric=all", str(path), "--n_images=2", "--batch_size=2",
                          f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr[-2000:]
    for metric in ("attn_distance", "attn_entropy", "nmi", "fourier", "svd"):
        vitb = json.load(open(tmp_path / f"{metric}.json"))["models"]["vitb"]
        assert len(vitb["per_layer"]) == 12
    fourier = json.load(open(tmp_path / "fourier.json"))["models"]["vitb"]
    assert fourier["frequencies_pi"][-1] == pytest.approx(6 / 7)


@pytest.mark.parametrize("args, message", [
    (["--metric=entropy", "clip"],
     "error: unknown metric 'entropy': choose one of attn_map, attn_distance, attn_entropy, "
     "nmi, fourier, svd, hessian, landscape, shape_bias, ood, sharpness, curves, report or all"),
    (["--metric=svd", "{teacher}", "--n_images=1"],
     "error: the image-level spectrum needs at least 2 images (n_images=1)"),
    (["--metric=nmi", "/no/such.pt"], "error: no model '/no/such.pt': not a file, and not one of clip"),
    (["--metric=attn_map", "{teacher}", "--map_images=0"], "error: --map_images=0 must be >= 1"),
    (["--metric=landscape", "{teacher}", "--steps=1"], "error: --steps=1 must be >= 2"),
    (["--metric=hessian", "{teacher}", "--lanczos_steps=0"], "error: --lanczos_steps=0 must be >= 1"),
    (["--metric=hessian", "{teacher}", "--top_k=0"], "error: --top_k=0 must be >= 1"),
    (["--metric=hessian", "{teacher}", "--top_k=5", "--lanczos_steps=2"],
     "error: --top_k=5 needs --lanczos_steps >= 5: each Lanczos step adds one eigenvalue"),  # before: 2 of 5, exit 0
    (["--metric=nmi", "{teacher}", "--split=nosuch"], "error: no folder 'nosuch' under"),
    (["--metric=attn_map", "{teacher}", "--layer=10"], "error: --layer=10: teacher has 2 blocks: give 0..1"),
    (["--metric=nmi"], "error: no model given"),
    (["--metric=nmi", "{teacher}", "--n_imgs=3"],
     "error: unknown option '--n_imgs': options are --metric, --data"),
    (["--metric=fourier", "{teacher}", "--fourier_at=mid"],
     "error: --fourier_at=mid: choose blocks or half"),
    (["--metric=landscape", "{teacher}", "--span=inf", "--steps=2", "--lanczos_steps=2", "--n_images=2"],
     "error: --span=inf: 'span' must be a finite number"),
    (["--metric=hessian", "{teacher}", "--trace_tol=1e999", "--top_k=1", "--lanczos_steps=2",
      "--trace_products=3", "--n_images=2"], "error: --trace_tol=1e999: 'trace_tol' must be a finite number"),
    (["--metric=hessian", "{teacher}", "--tol=nan"], "error: --tol=nan: 'tol' must be a finite number"),
    (["--metric=attn_entropy", "{empty}"], "error: '{empty}' is empty: not a checkpoint"),
    (["--metric=nmi", "{folder}"], "error: '{folder}' is a folder, not a checkpoint file: give a file in it, like"),
    (["--metric=nmi", "{teacher}", "{teacher}"], "error: --labels needs 2 distinct comma-separated names"),
    (["--metric=nmi", "{teacher}", "--labels= "], "error: --labels needs 1 distinct comma-separated names"),
])
def test_bad_input(tiny_teacher, tiny_data, tmp_path, args, message):
    """one line, and no --out folder made (before: an empty one was left by the errors found after it was made,
    such as a first model that is no checkpoint or --labels that do not fit)"""
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    out = tmp_path / "out" / "analyze"
    names = dict(teacher=tiny_teacher, empty=empty, folder=tmp_path)
    result = run_analyze([a.format(**names) for a in args] + [f"--data={tiny_data}", f"--out={out}"])
    assert result.returncode != 0, result.stderr[-1000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(message.format(**names)), result.stderr[-1000:]
    assert not (tmp_path / "out").exists()


def test_a_folder_where_a_result_file_goes_stops_before_any_work(tiny_teacher, tiny_data, tmp_path):
    """out/fourier.png is a folder: one line before the first model's work (before: fourier.json was
    written,
    then the figure failed with 'free space there', which was not the cause)"""
    (tmp_path / "out" / "fourier.png").mkdir(parents=True)
    result = run_analyze(["--metric=fourier", tiny_teacher, f"--data={tiny_data}",
                          f"--out={tmp_path / 'out'}"])
    assert result.returncode != 0
    out = tmp_path / "out"
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --out={out}: {out}/fourier.png is a folder, where "
        "fourier writes a file: move it or choose another --out")
    assert "teacher:" not in result.stdout and os.listdir(tmp_path / "out") == ["fourier.png"]


def test_a_write_error_says_free_space_only_for_a_full_disk(tmp_path):
    from common import write_error
    with pytest.raises(OSError) as folder:
        open(tmp_path, "w")  # a real error: a folder of that name
    assert write_error(tmp_path, folder.value) == f"error: could not write {tmp_path} " \
                                                  "(Is a directory): write to " \
                                                  "another folder"


def test_a_bad_model_late_in_the_list_stops_before_the_first_ones_work(tiny_teacher, tiny_data):
    result = run_analyze(["--metric=nmi", tiny_teacher, "/no/such.pt", f"--data={tiny_data}"])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no model '/no/such.pt'")
    assert "teacher:" not in result.stdout  # the line each model's work starts with


@pytest.mark.parametrize("layer", [4, -3])
def test_a_layer_out_of_a_later_models_range_stops_before_any_work(tiny_teacher, tiny_data,
                                                                   tmp_path, layer):
    """embedded has 6 blocks, the second model (nano/4) 2: it is checked before the first one's work
    (before:
    the error came after the first model's forward passes, which were lost)"""
    result = run_analyze(["--metric=attn_map", "embedded", tiny_teacher, f"--layer={layer}",
                          f"--data={tiny_data}", f"--out={tmp_path / 'out'}"])
    assert result.returncode != 0
    message = f"error: --layer={layer}: teacher has 2 blocks: give 0..1 (-1 = the last)"
    assert result.stderr.strip().splitlines()[-1] == message, result.stderr[-1000:]
    assert "embedded:" not in result.stdout  # the line each model's work starts with
    assert not (tmp_path / "out").exists()


def test_images_that_cannot_be_read_stop_with_one_line(tiny_teacher, tiny_data, tmp_path):
    """every image of the 6 class folders is junk, then only one can be read"""
    from data.embedded import CLASSES
    for name in CLASSES:
        os.makedirs(tmp_path / "junk" / "val" / name)
        (tmp_path / "junk" / "val" / name / "0.jpg").write_bytes(b"not an image")
    for metric in ("attn_distance", "hessian"):
        result = run_analyze([f"--metric={metric}", tiny_teacher, f"--data={tmp_path / 'junk'}",
                              "--n_images=6", f"--out={tmp_path / 'out'}"])
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].startswith("error: no image of the"), result.stderr
        assert "Traceback" not in result.stderr
    first = sorted(os.listdir(os.path.join(tiny_data, "val", CLASSES[0])))[0]
    real = os.path.join(tiny_data, "val", CLASSES[0], first)
    shutil.copy(real, tmp_path / "junk" / "val" / CLASSES[0] / first)
    result = run_analyze(["--metric=svd", tiny_teacher, f"--data={tmp_path / 'junk'}", "--n_images=7",
                          f"--out={tmp_path / 'out'}"])
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the image-level spectrum needs at least 2 images; only 1 of the 7 chosen could be read")


def test_default_label_of_a_runs_own_file_is_its_folder(tmp_path):
    """real files: a run's ckpt.pt or sharpness.json is known by its folder (before: 'ckpt'),
    another file by its own name, a teacher by the name given"""
    from analyze import default_labels
    for path in ("md_embedded/ckpt.pt", "ft_md/sharpness.json", "models/vitb.pt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"")
    models = [str(tmp_path / "md_embedded" / "ckpt.pt"), "embedded", str(tmp_path / "models/vitb.pt")]
    assert default_labels(models) == ["md_embedded", "embedded", "vitb"]
    assert default_labels([str(tmp_path / "ft_md" / "sharpness.json")]) == ["ft_md"]


def test_default_labels_of_files_with_one_name_are_their_folders(tiny_teacher, tiny_data, tmp_path):
    """out/md/ckpt.pt and out/ft/ckpt.pt; finetune.py's sharpness.json of two runs (the README's
    command); a JSON that is not such a log; --out that is a file, for curves as well"""
    for run in ("md", "ft"):
        os.makedirs(tmp_path / run)
        shutil.copy(tiny_teacher, tmp_path / run / "ckpt.pt")
        log = [dict(iter=i, eigenvalue=10.0 + i, trace=100.0 - i, trace_stderr=1.0) for i in (0, 5)]
        (tmp_path / run / "sharpness.json").write_text(json.dumps(log))
    ckpts = [str(tmp_path / run / "ckpt.pt") for run in ("md", "ft")]
    result = run_analyze(["--metric=nmi", *ckpts, f"--data={tiny_data}", "--n_images=4",
                          f"--out={tmp_path / 'out'}"])
    assert result.returncode == 0, result.stderr[-1000:]
    assert list(json.load(open(tmp_path / "out" / "nmi.json"))["models"]) == ["md", "ft"]
    logs = [str(tmp_path / run / "sharpness.json") for run in ("md", "ft")]
    result = run_analyze(["--metric=sharpness", *logs, f"--out={tmp_path / 'out'}"])
    assert result.returncode == 0, result.stderr[-1000:]
    assert json.load(open(tmp_path / "out" / "sharpness.json"))["models"]["ft"][1]["eigenvalue"] == 15.0
    result = run_analyze(["--metric=sharpness", str(tmp_path / "out" / "nmi.json"), f"--out={tmp_path}"])
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: sharpness takes the JSON logs of finetune.py --hessian_every: "), result.stderr
    # logs edited by hand (before: exit 0 and a figure of them, or of nothing)
    edited = tmp_path / "edited.json"
    for log, says in (([], "has no record"),
                      ([dict(iter=1, eigenvalue="x", trace=3.0)], "is not a number"),
                      ([dict(iter="a", eigenvalue=1.0, trace=3.0)], "is not a number"),
                      ([dict(iter=1, eigenvalue=1.0, trace=True)], "is not a number")):
        edited.write_text(json.dumps(log))
        result = run_analyze(["--metric=sharpness", str(edited), f"--out={tmp_path / 'edits'}"])
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and says in last and last.startswith("error: sharpness takes"), result.stderr
        assert not (tmp_path / "edits" / "sharpness.json").exists()
    for metric in ("curves", "nmi"):
        result = run_analyze([f"--metric={metric}", logs[0], f"--out={logs[1]}"])
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: --out={logs[1]} cannot be"), \
            result.stderr


def test_summaries_without_a_value_print_n_a(tmp_path, capsys):
    """a shape bias where no decision was the shape or the texture; an OOD mean over no dataset"""
    import analyze
    shape = dict(shape_bias=None, per_class={"circle": None}, images=2, excluded_agreeing=0)
    analyze.write("shape_bias", {"m": shape}, {}, str(tmp_path))
    analyze.write("ood", {"m": analyze.ood_summary({})}, {}, str(tmp_path))
    printed = capsys.readouterr().out
    assert "shape bias n/a over 2" in printed and "mean accuracy n/a over 0 datasets" in printed
    assert json.load(open(tmp_path / "shape_bias.json"))["models"]["m"]["shape_bias"] is None


def test_without_matplotlib_an_older_figure_goes_with_the_new_json(tmp_path, monkeypatch, capsys):
    """a figure beside a JSON of the same name shows the JSON's results or is not there: without
    matplotlib an older figure is removed, and said so (before: it stayed, and the report captioned
    it with the new JSON's models)"""
    import analyze
    from common import append_jsonl
    monkeypatch.setattr(analyze, "pyplot", lambda: None)
    for name in ("nmi", "curves"):
        (tmp_path / f"{name}.png").write_bytes(b"a figure of other models")
    analyze.write("nmi", {"new": dict(per_layer=[0.1], per_head=[[0.1]])}, {}, str(tmp_path))
    append_jsonl(str(tmp_path / "run" / "log.jsonl"), dict(iter=1, loss=2.0))
    analyze.main(["--metric=curves", str(tmp_path / "run" / "log.jsonl"), f"--out={tmp_path}"])
    assert not (tmp_path / "nmi.png").exists() and not (tmp_path / "curves.png").exists()
    printed = capsys.readouterr().out
    for name in ("nmi", "curves"):
        assert f"; the older {tmp_path / name}.png is removed)" in printed
    analyze.main(["--metric", "report", str(tmp_path)])
    assert "![" not in open(tmp_path / "report.md").read()


def strict_json(path):
    """a JSON file read as strict JSON parsers read it: NaN, Infinity and -Infinity are no tokens"""
    def refuse(token):
        raise ValueError(f"{path} has {token}, which is not JSON")
    return json.loads(open(path).read(), parse_constant=refuse)


def test_written_json_is_strict_json(tmp_path):
    """a run that diverged logs a loss of NaN (common.append_jsonl, json.dumps's NaN token) and a
    sharpness log with an infinite trace: curves.json and sharpness.json hold null there"""
    from common import append_jsonl
    log = tmp_path / "run" / "log.jsonl"
    append_jsonl(str(log), dict(iter=0, loss=2.3, lr=1e-3))
    append_jsonl(str(log), dict(iter=10, loss=float("nan"), lr=1e-3))
    (tmp_path / "run" / "sharpness.json").write_text(json.dumps(
        [dict(iter=0, eigenvalue=3.0, trace=40.0, trace_stderr=1.0),
         dict(iter=10, eigenvalue=float("nan"), trace=float("inf"), trace_stderr=float("nan"))]))
    result = run_analyze(["--metric=curves", str(log), f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr[-1000:]
    assert strict_json(tmp_path / "curves.json")["models"]["run"]["loss"]["value"] == [2.3, None]
    result = run_analyze(["--metric=sharpness", str(tmp_path / "run" / "sharpness.json"), f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr[-1000:]
    last = strict_json(tmp_path / "sharpness.json")["models"]["run"][1]  # the run's folder
    assert last == dict(iter=10, eigenvalue=None, trace=None, trace_stderr=None)
    # --out the fine-tune's own folder: the figure's sharpness.json would replace the log it reads
    logged = (tmp_path / "run" / "sharpness.json").read_bytes()
    result = run_analyze(["--metric=sharpness", str(tmp_path / "run" / "sharpness.json"),
                          f"--out={tmp_path / 'run'}"])
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: --out={tmp_path / 'run'} would write sharpness results over the input "
        f"{tmp_path / 'run' / 'sharpness.json'}: choose another --out")
    assert (tmp_path / "run" / "sharpness.json").read_bytes() == logged


def test_representation_metrics_record_the_images_read(tiny_teacher, tiny_data, tmp_path):
    """--n_images=64 of a folder with 8 images: every entry says 8 were read; attn_map's numbers are
    the maps
    of the --map_images=2 shown"""
    for name in sorted(os.listdir(os.path.join(tiny_data, "val")))[:2]:
        folder = os.path.join(tiny_data, "val", name)
        os.makedirs(tmp_path / "few" / name)
        for f in sorted(os.listdir(folder))[:4]:
            shutil.copy(os.path.join(folder, f), tmp_path / "few" / name / f)
    result = run_analyze(["--metric=all", tiny_teacher, f"--data={tmp_path / 'few'}", "--n_images=64",
                          f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr[-1000:]
    for metric in ("attn_map", "attn_distance", "attn_entropy", "nmi", "fourier", "svd"):
        report = json.load(open(tmp_path / f"{metric}.json"))
        images = 2 if metric == "attn_map" else 8
        assert (report["settings"]["n_images"] == 64
                and report["models"]["teacher"]["images"] == images), metric


def test_attention_maps_show_the_images_asked_for_when_some_cannot_be_read(tiny_teacher, tiny_data,
                                                                           tmp_path):
    """--map_images=5 in batches of 2 of which some hold an unreadable image: 5 maps (before: the
    batches were counted at 2 images each, and fewer maps were shown)"""
    for name in sorted(os.listdir(os.path.join(tiny_data, "val")))[:2]:
        folder = os.path.join(tiny_data, "val", name)
        os.makedirs(tmp_path / "some" / name)
        for f in sorted(os.listdir(folder))[:3]:
            shutil.copy(os.path.join(folder, f), tmp_path / "some" / name / f)
        for i in range(2):
            (tmp_path / "some" / name / f"junk{i}.png").write_bytes(b"not an image")
    result = run_analyze(["--metric=attn_map", tiny_teacher, f"--data={tmp_path / 'some'}",
                          "--n_images=10", "--batch_size=2", "--map_images=5", f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr[-1000:]
    assert result.stderr.count("warning: skipping unreadable image") == 4
    shown = json.load(open(tmp_path / "attn_map.json"))["models"]["teacher"]
    assert shown["images"] == len(shown["attention"]) == 5


def test_hessian_runs_with_the_largest_seed(tiny_teacher, tiny_data, tmp_path):
    """--seed=2**64 - 1 passes the option check, and the Hessian takes it (before: 'error: Overflow
    when unpacking long long' after the Lanczos work)"""
    result = run_analyze(["--metric=hessian", tiny_teacher, f"--data={tiny_data}",
                          f"--seed={2 ** 64 - 1}", "--n_images=4", "--lanczos_steps=3",
                          "--trace_products=6", f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr[-1000:]
    entry = json.load(open(tmp_path / "hessian.json"))["models"]["teacher"]
    assert entry["images"] == 4 and entry["trace_products"] == 6 and math.isfinite(entry["trace"])


def test_options_take_the_value_after_a_space(tiny_data, tiny_teacher, tmp_path):
    result = run_analyze(["--metric", "nmi", tiny_teacher, "--data", tiny_data, "--n_images", "4",
                          "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-1000:]
    assert json.load(open(tmp_path / "nmi.json"))["settings"]["n_images"] == 4


def test_figures_draw_a_single_point_and_name_only_what_they_show(tmp_path, monkeypatch):
    """a curve of one logged record is drawn (a marker: a line of one point is invisible), and the
    Fourier figure's axis mentions shaded attention halves only when it has them"""
    plt = pytest.importorskip("matplotlib.pyplot")
    import analyze
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep each figure to look at it
    assert analyze.plot_curves({"run": {"loss": {"iter": [30], "value": [0.5]}}}, str(tmp_path / "c.png"))
    (line,) = kept[-1].axes[0].lines
    assert line.get_marker() == "o" and len(line.get_xdata()) == 1
    for points, shaded in ((["embedding", "block 1"], False),
                           (["embedding", "block 1 attention", "block 1"], True)):
        depth = [0, 1] if not shaded else [0, 0.5, 1]
        entry = dict(per_layer=[0.1], points=points, depth=depth, spectrum=[[0.0, -1.0]] * len(points))
        analyze.plot("fourier", {"m": entry}, str(tmp_path / "f.png"))
        ax = kept[-1].axes[0]
        assert ("shaded" in ax.get_xlabel()) == shaded and (len(ax.patches) > 0) == shaded


def test_help_prints_the_docstring_and_every_option_with_its_comment():
    """--help (before: "unknown option '--help'", exit 1) prints the usage and each option's line
    of DEFAULTS as the file writes it"""
    result = forkserver.run([sys.executable, "analyze.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    source = open(os.path.join(ROOT, "analyze.py")).read()
    assert result.stdout.startswith(source.split('"""')[1].strip().splitlines()[0])
    for name in ("metric", "n_images", "trace_products", "human"):
        (line,) = [x for x in source.splitlines() if x.startswith(f"    {name}=")]
        assert line in result.stdout.splitlines()


def test_a_bad_file_late_in_the_list_stops_before_any_work(tiny_teacher, tmp_path):
    """the second of two models is no checkpoint: the error comes before the first model's Hessian is
    computed (before: after it, and the finished work was thrown away)"""
    bad = tmp_path / "bad.pt"
    bad.write_text("hi\n")
    result = run_analyze(["--metric=hessian", tiny_teacher, str(bad), f"--out={tmp_path}", "--n_images=8"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: '{bad}' is not")
    assert "teacher:" not in result.stdout  # the line each model's work starts with
    assert not (tmp_path / "hessian.json").exists()


@pytest.mark.parametrize("metric", ["hessian", "landscape", "shape_bias"])
@pytest.mark.parametrize("later", ["no head", "other classes", "unnamed outputs"])
def test_a_later_model_that_cannot_give_the_metric_stops_before_any_work(tiny_teacher, tiny_data, tmp_path,
                                                                         metric, later):
    """the second of two models is no classifier of the data (no head; a head for other named
    classes; 4 outputs without names for 6 categories): one line before the first model's work
    (before: after it, which was then thrown away) that names the model and the metric (before:
    neither, and 'the Hessian' for landscape too)"""
    from model import ViT, ViTConfig
    cfg = ViTConfig.from_name("nano/4", num_classes=0 if later == "no head" else 4)
    obj = dict(model=ViT(cfg).state_dict(), model_args=cfg.to_dict())
    if later == "other classes":
        obj["classes"] = ["apple", "kiwi", "lime", "pear"]
    torch.save(obj, tmp_path / "second.pt")
    result = run_analyze([f"--metric={metric}", tiny_teacher, str(tmp_path / "second.pt"), f"--data={tiny_data}",
                          f"--out={tmp_path}", "--n_images=8", "--lanczos_steps=2", "--trace_products=2",
                          "--steps=2"])
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (last.startswith(f"error: second ('{tmp_path / 'second.pt'}'): ")
            and "Traceback" not in result.stderr), result.stderr[-2000:]
    if later == "no head" or (later == "unnamed outputs" and metric != "shape_bias"):
        assert f": {metric} needs a classifier" in last
    assert "teacher:" not in result.stdout  # the line each model's work starts with
    assert not (tmp_path / f"{metric}.json").exists()


def test_an_option_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    """--out=~/analysis: the shell leaves ~ after --key= as it is (before: a folder named '~')"""
    from analyze import parse_args
    monkeypatch.setenv("HOME", str(tmp_path))
    opts, models = parse_args(["--metric=svd", "--out=~/analysis", "--data", "~/data", "m.pt"])
    assert (opts["out"], opts["data"], models) == (str(tmp_path / "analysis"),
                                                   str(tmp_path / "data"), ["m.pt"])


def test_fourier_summary_takes_the_highest_frequency_after_each_block():
    """summarize('fourier') on hand-made stats: a 32 px, patch 4 model (grid 8: K = 4 diagonal
    frequencies, 0 to 3/8 cycles per patch = 0 to 0.75 pi), depth 2; point p's spectrum is
    [0, -1, -2, -10 - p]. The headline per block is the last entry (the highest frequency) of
    the spectrum after block l (point 2 l): -12 and -14; the embedding's is -10"""
    from analyze import summarize
    from model import ViTConfig
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=8, depth=2, num_heads=2)
    stats = {("fourier", p): torch.tensor([0.0, -1.0, -2.0, -10.0 - p]) for p in range(5)}
    s = summarize("fourier", stats, cfg)
    assert s["per_layer"] == [-12.0, -14.0] and s["embedding"] == -10.0
    assert s["frequencies_pi"] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert s["points"] == ["embedding", "block 1", "block 2"] and s["depth"] == [0, 1, 2]


def test_a_first_line_that_is_not_json_is_said_as_such(tmp_path):
    """a text file holding 'hi' (before: 'the last line is cut short ... read the 0 records', then
    'holds no records yet'); a cut-short last line is only one after a record or begun as one"""
    import analyze
    text = tmp_path / "notes.txt"
    text.write_text("hi\n")
    with pytest.raises(SystemExit) as e:
        analyze.main(["--metric=curves", str(text), f"--out={tmp_path / 'out'}"])
    assert str(e.value) == (f"error: {text}, line 1 is not JSON: give the log.jsonl of "
                            "train_md.py, finetune.py or train_vqkd.py")
    begun = tmp_path / "begun.jsonl"  # a run killed while writing its first record
    begun.write_text('{"iter": 1, "lo')
    with pytest.raises(SystemExit, match="holds no records yet"):
        analyze.main(["--metric=curves", str(begun), f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_a_run_folder_given_for_its_log_is_said_to_be_a_folder(tmp_path):
    """before: "log 'out/run' not found" for a folder that exists"""
    import analyze
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SystemExit) as e:
        analyze.main(["--metric=curves", str(run)])
    assert str(e.value) == (f"error: log '{run}' is a folder: give the out_dir/log.jsonl of a run")
    (run / "log.jsonl").write_text('{"iter": 1, "loss": 1.0}\n')
    with pytest.raises(SystemExit) as e:
        analyze.main(["--metric=curves", str(run)])
    assert str(e.value) == f"error: log '{run}' is a folder: give {run / 'log.jsonl'}"


def test_no_metric_asks_for_one():
    """before: "error: unknown metric ''" """
    import analyze
    with pytest.raises(SystemExit) as e:
        analyze.parse_args(["embedded"])
    assert str(e.value).startswith("error: give --metric=NAME (one of attn_map, attn_distance,")


def test_report_leaves_out_labels_that_name_no_teacher(tmp_path, capsys):
    """--labels=teacher,md_student and md_finetuned, the README's examples until stop 41 (before: teachers
    'student' and 'finetuned', every claim 'not tested'): no teacher, said once; md_T of a teacher analyze.py
    knows, or of one labelled T or ft_T in the run, still names T"""
    import analyze
    entry = dict(per_layer=[10.0, 8.0, 6.0], per_head=[[10.0]] * 3)
    figures = tmp_path / "out" / "figures"
    figures.mkdir(parents=True)
    models = dict(teacher=entry, md_student=entry)
    (figures / "attn_distance.json").write_text(
        json.dumps(dict(metric="attn_distance", settings={}, models=models)))
    hessian = dict(md_finetuned=dict(eigenvalues=[5.0], trace=9.0))
    (figures / "hessian.json").write_text(
        json.dumps(dict(metric="hessian", settings={}, models=hessian)))
    analyze.main(["--metric", "report", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "(student)" not in captured.out and "(finetuned)" not in captured.out
    assert "no claim tested" in captured.out
    assert captured.err.count("md_student, md_finetuned name no teacher") == 1
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Teachers: none found" in markdown and "md_finetuned name no teacher" in markdown
    metrics = dict(attn_distance=dict.fromkeys(["md_embedded", "x", "md_x", "md_y"], entry))
    assert analyze.teachers_of(metrics, {"ft_y": {}, "ft_md_z": {}}) == ["embedded", "x", "y"]


def test_the_readmes_analysis_labels_name_their_teachers():
    """every --labels= of the README's analysis commands (its section "Analysis: every metric of the paper")
    gives the report a teacher for each md_ label (before: teacher,md_student, left out with a warning)"""
    import analyze
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Analysis: every metric of the paper")[1].split("\n## ")[0]
    commands = [line for line in section.splitlines() if line.startswith("python analyze.py") and "--labels=" in line]
    assert len(commands) == 4
    for command in commands:
        labels = command.split("--labels=")[1].split()[0].split(",")
        metrics = dict(attn_distance=dict.fromkeys(labels, {}))
        assert analyze.unnamed_students(metrics, {}) == "", command
