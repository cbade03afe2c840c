"""hessian.py against the full Hessian formed explicitly on a model small enough for it."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hessian import hutchinson_trace, loss_landscape, mean_loss, top_eigenvalues


class Tiny(nn.Module):
    """a small classifier with a frozen parameter and a parameter that gets no gradient"""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.unused = nn.Parameter(torch.randn(7))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) + self.frozen))


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g) * 2
    y = torch.randint(0, 3, (30,), generator=g)
    return [(x[:12], y[:12]), (x[12:], y[12:])]  # unequal batches: the weighting matters


def exact_hessian(model, batches):
    """the full Hessian of the mean loss over all 30 samples w.r.t. (fc1, fc2) weights, by autograd"""
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    flat0 = torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in names])

    def loss(flat):
        p = dict(zip(names, [t.view(s) for t, s in zip(flat.split(sizes), shapes)]))
        h = torch.tanh(x @ p["fc1.weight"].T + p["fc1.bias"] + model.frozen)
        return F.cross_entropy(h @ p["fc2.weight"].T + p["fc2.bias"], y)

    return torch.autograd.functional.hessian(loss, flat0)


def test_top_two_eigenvalues_match_the_exact_hessian():
    model = Tiny().eval()
    H = exact_hessian(model, data())
    eig = torch.linalg.eigvalsh(H)
    by_magnitude = eig[eig.abs().argsort(descending=True)][:2]
    expected = sorted(by_magnitude.tolist(), reverse=True)
    values, vectors = top_eigenvalues(model, data(), k=2, max_iter=1000, tol=1e-7)
    assert values == pytest.approx(expected, rel=0.01)
    # eigenvectors: unit norm, orthogonal, and H v = lambda v on the flattened parameters
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the order of the vectors' pieces
    pieces = [dict(zip(names, v)) for v in vectors]
    assert all(piece["unused"].abs().max() < 1e-6 for piece in pieces)
    flat = [torch.cat([piece[n].flatten() for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]) for piece in pieces]
    for v, lam in zip(flat, values):
        assert v.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(H @ v, lam * v, atol=0.02 * abs(lam))
    assert abs(torch.dot(flat[0], flat[1]).item()) < 1e-3


def test_hutchinson_trace_within_its_expected_error():
    model = Tiny().eval()
    H = exact_hessian(model, data())
    samples = 400
    mean, stderr = hutchinson_trace(model, data(), samples=samples)
    # Var(v^T H v) for Rademacher v is 2 * sum_{i != j} H_ij^2
    off = (H ** 2).sum() - (H.diagonal() ** 2).sum()
    expected_error = math.sqrt(2 * off.item() / samples)
    assert abs(mean - H.trace().item()) < 4 * expected_error
    assert stderr == pytest.approx(expected_error, rel=0.3)


def test_landscape_center_is_the_loss_and_quadratic_along_eigenvectors():
    model = Tiny().eval()
    batches = data()
    values, vectors = top_eigenvalues(model, batches, k=2, max_iter=500, tol=1e-7)
    coords, grid = loss_landscape(model, batches, vectors, span=0.01, steps=5)
    assert grid[2][2] == pytest.approx(mean_loss(model, batches), abs=1e-6)
    # small steps: L(a v1) + L(-a v1) - 2 L(0) = lambda_1 a^2 (the gradient term cancels)
    a = coords[4]
    second = (grid[4][2] + grid[0][2] - 2 * grid[2][2]) / a ** 2
    assert second == pytest.approx(values[0], rel=0.05)
    # the weights are restored afterwards
    assert mean_loss(model, batches) == pytest.approx(grid[2][2], abs=1e-7)


def test_frozen_and_unused_parameters_do_not_crash_and_stay_out():
    model = Tiny().eval()
    model.fc1.requires_grad_(False)
    values, vectors = top_eigenvalues(model, data(), k=1, max_iter=5)
    assert len(vectors[0]) == 3  # fc2.weight, fc2.bias, unused (zero curvature); no frozen ones
    assert vectors[0][0].shape == (7,) and vectors[0][0].abs().max() < 1e-6  # "unused": registered first, zero curvature
