"""Every way torch offers to get the svd metric's eigenvalues on a GPU machine, and a batched
solver of our own (symmetric_eigenvalues), timed on one batch of 64 images' token covariances
(tiny/4: 384 of 64 x 64; ViT-B/16: 768 of 196 x 196), float64, against host LAPACK as the
reference. The numbers behind analyze.SPECTRA_POOL (README, "Analysis on the GPU"). One CUDA GPU;
about 2 minutes on an H200:

    PYTHONPATH=. python tools/eigen_probe.py
"""
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from analyze import HOST_CORES as CORES
from bench import compare
from model import ViT, ViTConfig

ONE_THREAD = ThreadPoolExecutor(CORES, initializer=torch.set_num_threads, initargs=(1,))
DEFAULT_THREADS = ThreadPoolExecutor(CORES)  # each worker left at torch's default thread count


def tridiagonalize(a):
    """a (B, n, n) symmetric -> the diagonal (B, n) and off-diagonal (B, n - 1) of a tridiagonal
    matrix with a's eigenvalues: Householder reflections H = I - s v v^T, s = 2 / |v|^2, one per
    column, all B matrices at once (H a H = a - v w^T - w v^T, p = s a v, w = p - (s v.p / 2) v,
    on the trailing block only: the rows and columns before it are already reduced)."""
    a = a.clone()
    n = a.shape[-1]
    for k in range(n - 2):
        x = a[:, k + 1:, k]  # (B, m): column k below the diagonal, reflected onto alpha e_1
        norm = x.norm(dim=-1)
        alpha = torch.where(x[:, 0] < 0, norm, -norm)  # the sign that keeps v = x - alpha e_1 from cancelling
        v = x.clone()
        v[:, 0] -= alpha
        v_squared = 2 * norm * (norm + x[:, 0].abs())  # |v|^2
        s = torch.where(v_squared > 0, 2 / v_squared, 0)  # x = 0: nothing to reflect, H = I
        trailing = a[:, k + 1:, k + 1:]  # (B, m, m), a view: updated in place
        p = s[:, None] * torch.bmm(trailing, v[:, :, None])[:, :, 0]  # (B, m)
        w = p - (0.5 * s * (v * p).sum(-1))[:, None] * v
        trailing.baddbmm_(torch.stack([v, w], -1), torch.stack([w, v], 1), alpha=-1)
        a[:, k + 1, k] = alpha  # the rest of column k is now zero; it is not read again
    return a.diagonal(dim1=-2, dim2=-1), a.diagonal(-1, dim1=-2, dim2=-1)


def tridiagonal_eigenvalues(d, e, points=3):
    """Eigenvalues, ascending, of symmetric tridiagonal matrices (diagonal d (B, n), off-diagonal
    e (B, n - 1)), all B n of them at once, by multisection: each eigenvalue k keeps an interval
    [lo, hi] with count(lo) <= k < count(hi), where count(x) = the number of eigenvalues below x =
    the number of negative q_i in the Sturm recurrence q_1 = d_1 - x,
    q_i = d_i - x - e_(i-1)^2 / q_(i-1) (Kahan: exact for a matrix within a few ulps of this one);
    each round counts at `points` points inside and keeps the one part of points + 1 that holds
    the eigenvalue, until the interval is as narrow as float64 resolves (absolute error about
    eps |a|, as LAPACK's). With e^2 floored at the smallest float, q = 0 gives e^2 / 0 = inf and
    the count goes on correctly in IEEE arithmetic (0 / 0 never happens)."""
    B, n = d.shape
    tiny, eps = torch.finfo(d.dtype).tiny, torch.finfo(d.dtype).eps
    e_squared = (e * e).clamp_min(tiny)
    radius = torch.nn.functional.pad(e.abs(), (1, 0)) + torch.nn.functional.pad(e.abs(), (0, 1))
    lo, hi = (d - radius).amin(-1), (d + radius).amax(-1)  # (B,): every eigenvalue is in [lo, hi] (Gershgorin)
    margin = 4 * n * eps * torch.maximum(lo.abs(), hi.abs()) + tiny
    lo = (lo - margin)[:, None].repeat(1, n)  # (B, n): eigenvalue k's interval
    hi = (hi + margin)[:, None].repeat(1, n)
    k = torch.arange(n, device=d.device)[:, None]  # (n, 1)
    fractions = torch.arange(1, points + 1, device=d.device, dtype=d.dtype) / (points + 1)  # (P,)
    d_first = d.T[:, :, None, None]  # (n, B, 1, 1): the recurrence steps over the first axis
    e_first = e_squared.T[:, :, None, None]
    for _ in range(math.ceil(54 / math.log2(points + 1))):  # the width shrinks from 2|a| to eps |a|
        width = (hi - lo) / (points + 1)
        q = d_first - (lo[..., None] + width[..., None] * (points + 1) * fractions)  # (n, B, n, P)
        for i in range(1, n):
            q[i].addcdiv_(e_first[i - 1], q[i - 1], value=-1)  # in place: one kernel per step
        below = (q < 0).sum(0)  # (B, n, P): eigenvalues below each point
        lo = lo + (below <= k).sum(-1) * width  # the points at or below eigenvalue k
        hi = lo + width
    return (lo + hi) / 2


def symmetric_eigenvalues(a):
    """a (B, n, n) symmetric, float64 -> its eigenvalues (B, n), ascending, on a's device, every
    matrix at once: tridiagonalize, then tridiagonal_eigenvalues. Written for the GPU, where
    torch's batched eigvalsh solves matrices over 32 x 32 one after another. In eager torch it is
    launch-bound: about 22,000 kernels per call whatever the batch (H100: 186 ms for B/16's 768
    matrices, 96 ms of it on the GPU), so analyze.collect does not use it (README)."""
    return tridiagonal_eigenvalues(*tridiagonalize(a))


def probe(size, M, C, depth, B=64):
    count = depth * B
    torch.manual_seed(0)
    decay = torch.arange(1, C + 1, device="cuda", dtype=torch.float64) ** -1.0  # a decaying spectrum
    tokens = (torch.randn(count, M, C, device="cuda", dtype=torch.float64) * decay).float()

    def centred():
        x = tokens.double()
        return x - x.mean(-2, keepdim=True)  # (count, M, C)

    def gram():
        x = centred()
        return x @ x.transpose(-1, -2) / (M - 1)  # (count, M, M)

    reference = torch.linalg.eigvalsh(gram().cpu()).flip(-1)  # descending

    def on_pool(pool):
        return lambda: torch.cat(list(pool.map(torch.linalg.eigvalsh, gram().cpu().chunk(CORES))))

    def svd_driver(driver):  # singular values of the tall (C, M) centred tokens, squared
        return lambda: torch.linalg.svdvals(centred().transpose(-1, -2), driver=driver) ** 2 / (M - 1)

    ways = {  # name: (way, timed rounds; one for the slow single-core ones)
        "eigvalsh on the GPU (what torch does: cuSOLVER, one matrix after another)":
            (lambda: torch.linalg.eigvalsh(gram()).flip(-1), 3),
        "the same in float32": (lambda: torch.linalg.eigvalsh(gram().float()).flip(-1).double(), 3),
        "svdvals, driver gesvda (batched)": (svd_driver("gesvda"), 3),
        "svdvals, driver gesvdj": (svd_driver("gesvdj"), 3),
        "svdvals, driver gesvd": (svd_driver("gesvd"), 3),
        f"host LAPACK on {CORES} threads of one thread each": (on_pool(ONE_THREAD), 3),
        f"host LAPACK on {CORES} threads of torch's default each": (on_pool(DEFAULT_THREADS), 3),
        "symmetric_eigenvalues on the GPU (above: all at once)": (lambda: symmetric_eigenvalues(gram()), 3),
        "host LAPACK, torch's batched call": (lambda: torch.linalg.eigvalsh(gram().cpu()), 1),
        "host LAPACK on one thread":
            (lambda: ONE_THREAD.submit(torch.linalg.eigvalsh, gram().cpu()).result(), 1)}
    print(f"\n{size}: {count} covariances {M} x {M} (tokens {M} x {C}), one batch of {B} images")
    top = reference[:, :1]
    for name, (way, rounds) in ways.items():
        try:
            seconds = compare([way], rounds)[0]  # bench.py's: a warm-up run, then the fastest
            values = way().cpu()
        except RuntimeError as e:  # a driver that fails on these matrices is a result too
            print(f"  {name}: failed: {str(e).splitlines()[0][:150]}")
            continue
        values = values.sort(-1, descending=True).values
        error = ((values - reference).abs() / top).max().item()
        print(f"  {name}: {1000 * seconds:.1f} ms ({1000 * seconds / count:.3f} ms per matrix; "
              f"largest error {error:.0e} of the largest eigenvalue)")
    model = ViT(ViTConfig.from_name(size, num_classes=10)).cuda().eval()
    images = torch.rand(B, 3, model.config.img_size, model.config.img_size, device="cuda")
    with torch.no_grad():
        seconds = compare([lambda: model(images)], rounds=5)[0]
    print(f"  for scale: the plain fp32 forward of {size} on {B} images {1000 * seconds:.1f} ms")


if __name__ == "__main__":
    if sys.argv[1:] or not torch.cuda.is_available():
        raise SystemExit("error: usage: PYTHONPATH=. python tools/eigen_probe.py (no arguments) on a "
                         "machine with a CUDA GPU")
    print("torch", torch.__version__, "on", torch.cuda.get_device_name(), "with", CORES, "host cores")
    probe("tiny/4", 64, 96, 6)
    probe("B/16", 196, 768, 12)
