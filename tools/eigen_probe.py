"""Every way torch offers to get the svd metric's eigenvalues on a GPU machine, timed on one batch
of 64 images' token covariances (tiny/4: 384 of 64 x 64; ViT-B/16: 768 of 196 x 196), float64,
against host LAPACK as the reference. The numbers behind analyze.SPECTRA_POOL (README, "Analysis
on the GPU"). One CUDA GPU; about 2 minutes on an H200:

    PYTHONPATH=. python tools/eigen_probe.py
"""
from concurrent.futures import ThreadPoolExecutor

import torch

from analyze import HOST_CORES as CORES
from bench import compare
from model import ViT, ViTConfig

ONE_THREAD = ThreadPoolExecutor(CORES, initializer=torch.set_num_threads, initargs=(1,))
DEFAULT_THREADS = ThreadPoolExecutor(CORES)  # each worker left at torch's default thread count


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
    print("torch", torch.__version__, "on", torch.cuda.get_device_name(), "with", CORES, "host cores")
    probe("tiny/4", 64, 96, 6)
    probe("B/16", 196, 768, 12)
