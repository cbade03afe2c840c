"""tools/eigen_probe.py's batched eigensolver (Householder tridiagonalization, then Sturm
multisection), measured there against torch's and the host's: its eigenvalues against spectra known
in closed form, on the CPU (tests/test_cuda.py checks it on a GPU against LAPACK)."""
import math

import torch

from tools.eigen_probe import symmetric_eigenvalues, tridiagonal_eigenvalues


def test_symmetric_eigenvalues_of_known_spectra():
    """the GPU's batched eigensolver (Householder, then Sturm multisection) against spectra known
    in closed form, to float64's resolution of the largest eigenvalue"""
    n = 50  # the second-difference matrix tridiag(-1, 2, -1): 2 - 2 cos(k pi / (n + 1))
    k = torch.arange(1, n + 1, dtype=torch.float64)
    expected = 2 - 2 * torch.cos(k * math.pi / (n + 1))  # ascending
    ones = torch.ones(n - 1, dtype=torch.float64)
    second_difference = (2 * torch.eye(n, dtype=torch.float64) - torch.diag(ones, 1) - torch.diag(ones, -1))[None]
    assert torch.allclose(symmetric_eigenvalues(second_difference)[0], expected, rtol=0, atol=1e-14)
    d, e = torch.full((1, n), 2.0, dtype=torch.float64), torch.full((1, n - 1), -1.0, dtype=torch.float64)
    assert torch.allclose(tridiagonal_eigenvalues(d, e)[0], expected, rtol=0, atol=1e-14)
    # Q diag(values) Q^T: repeated, zero and negative eigenvalues, three matrices in one batch
    values = torch.tensor([[-3.0, 0, 0, 1, 1, 1, 2.5, 1e-9, 7, 7, 0.5, 100],
                           [0.0] * 12, [5.0] * 6 + [-5.0] * 6], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    matrices = q @ torch.diag_embed(values) @ q.transpose(-1, -2)
    got = symmetric_eigenvalues(matrices)
    scale = values.abs().amax(-1, keepdim=True).clamp_min(1)
    assert ((got - values.sort(-1).values).abs() / scale).max() < 1e-13
    # a centred token matrix with known singular values: its Gram's eigenvalues are their squares
    u, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    singular = torch.cat([torch.logspace(0, -5, 39, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    gram = u @ torch.diag(singular**2) @ u.T
    assert torch.allclose(symmetric_eigenvalues(gram[None])[0], (singular**2).sort().values, rtol=0, atol=1e-15)
    for size in (1, 2):  # no reflection to make
        a = torch.tensor([[4.0, 1.0], [1.0, 4.0]], dtype=torch.float64)[:size, :size][None]
        assert torch.allclose(symmetric_eigenvalues(a)[0], torch.tensor([3.0, 5.0] if size == 2 else [4.0],
                                                                        dtype=torch.float64), rtol=0, atol=1e-14)
