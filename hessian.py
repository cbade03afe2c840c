"""
Curvature of a classifier's loss at its weights, without ever forming the Hessian: used by
analyze.py (--metric hessian, landscape) and finetune.py (--hessian_every).

Definitions (PyHessian's, see ../shared/REFERENCE.md section 4): the loss is the mean
cross-entropy over a set of batches, batch-size weighted; Hv by double backward; top-k
eigenvalues by power iteration with Gram-Schmidt deflation against the eigenvectors already
found, until the relative change is below tol; trace by Hutchinson, E[v^T H v] over Rademacher
v. Parameters that are frozen or get no gradient are simply not directions (no crash).
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def cross_entropy(model, inputs, targets):
    return F.cross_entropy(model(inputs), targets)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def dot(xs, ys):
    return sum((x * y).sum() for x, y in zip(xs, ys))


def normalized(vs):
    norm = torch.sqrt(dot(vs, vs))
    return [v / norm for v in vs]


def hessian_vector_product(model, batches, vector, loss_fn=cross_entropy):
    """H v of the batch-size-weighted mean loss over batches [(inputs, targets)]"""
    params = trainable(model)
    total = sum(len(t) for _, t in batches)
    out = [torch.zeros_like(p) for p in params]
    for inputs, targets in batches:
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no second derivative
            loss = loss_fn(model, inputs, targets)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [(g, v) for g, v in zip(grads, vector) if g is not None]
        product = sum((g * v).sum() for g, v in used)
        if not torch.is_tensor(product) or not product.requires_grad:
            continue  # no parameter influences this loss through a second derivative
        hv = torch.autograd.grad(product, params, allow_unused=True)
        for o, h in zip(out, hv):
            if h is not None:
                o.add_(h.detach(), alpha=len(targets) / total)
    return out


def top_eigenvalues(model, batches, k=2, max_iter=100, tol=1e-3, seed=0, loss_fn=cross_entropy):
    """the k eigenvalues of largest magnitude, largest first, and their unit eigenvectors"""
    params = trainable(model)
    g = torch.Generator(device="cpu").manual_seed(seed)
    values, vectors = [], []
    for _ in range(k):
        v = normalized([torch.randn(p.shape, generator=g).to(p) for p in params])
        value = None
        for _ in range(max_iter):
            for u in vectors:  # deflation: stay orthogonal to the eigenvectors found
                v = [a - dot(v, u) * b for a, b in zip(v, u)]
            v = normalized(v)
            hv = hessian_vector_product(model, batches, v, loss_fn)
            new = dot(hv, v).item()  # Rayleigh quotient
            v = normalized(hv)
            converged = value is not None and abs(new - value) <= tol * (abs(value) + 1e-6)
            value = new
            if converged:
                break
        values.append(value)
        vectors.append(v)
    order = sorted(range(k), key=lambda i: -values[i])
    return [values[i] for i in order], [vectors[i] for i in order]


def hutchinson_trace(model, batches, samples=50, seed=0, loss_fn=cross_entropy):
    """trace estimate E[v^T H v], v Rademacher -> (mean, standard error of the mean)"""
    params = trainable(model)
    g = torch.Generator(device="cpu").manual_seed(seed)
    estimates = []
    for _ in range(samples):
        v = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in params]
        estimates.append(dot(hessian_vector_product(model, batches, v, loss_fn), v).item())
    t = torch.tensor(estimates, dtype=torch.float64)
    return t.mean().item(), (t.std().item() / len(estimates) ** 0.5 if len(estimates) > 1 else float("nan"))


@torch.no_grad()
def mean_loss(model, batches, loss_fn=cross_entropy):
    total = sum(len(t) for _, t in batches)
    return sum(loss_fn(model, x, t).item() * len(t) / total for x, t in batches)


@torch.no_grad()
def loss_landscape(model, batches, directions, span=0.5, steps=21, loss_fn=cross_entropy):
    """loss at theta + a d1 + b d2 on a steps x steps grid of a, b in [-span, span] -> (coords, grid[a][b])"""
    params = trainable(model)
    theta = [p.detach().clone() for p in params]
    coords = torch.linspace(-span, span, steps).tolist()
    grid = []
    try:
        for a in coords:
            row = []
            for b in coords:
                for p, t, d1, d2 in zip(params, theta, *directions):
                    p.copy_(t + a * d1 + b * d2)
                row.append(mean_loss(model, batches, loss_fn))
            grid.append(row)
    finally:
        for p, t in zip(params, theta):
            p.copy_(t)
    return coords, grid
