"""
Curvature of a classifier's loss at its weights, without ever forming the Hessian: used by
analyze.py (--metric hessian, landscape) and finetune.py (--hessian_every).

The quantities are PyHessian's (amirgholami/PyHessian, pyhessian/hessian.py): the loss is the
mean cross-entropy over a set of batches, batch-size weighted, model in eval mode; the top-k
eigenvalues are those of largest magnitude, reported by magnitude (PyHessian's order); the
trace is E[v^T H v] over Rademacher v. The algorithms are cheaper than PyHessian's:

- eigenvalues: Lanczos with full reorthogonalization (one Krylov run gives all k) instead of
  power iteration with deflation (kept here as `power_iteration`, the reference for bench.py);
  it stops when the error bound of every wanted Ritz value is <= tol |theta| (see `lanczos`),
  where power iteration stops when its estimate changes by less than that.
- trace: Hutchinson on the complement of the Lanczos Krylov basis Q. tr H = tr(Q^T H Q) +
  tr(P H P) with P = I - Q Q^T; the first term is the sum of the Lanczos diagonal (exact, no
  extra product), the second is estimated from Rademacher v projected by P. The big outlier
  eigenvalues, which make plain Hutchinson noisy, live in Q, so the standard error is smaller.
- Hessian-vector products: double backward. Each batch's gradient graph (one forward + one
  backward with create_graph) is built once per call and every vector of the call is one more
  backward through it; graphs may also be kept between calls (`keep_graphs`). The graph's exact
  GELUs keep their first and second derivatives (`CachedGELU`), which every product reuses.

Vectors are flat: one tensor over the concatenated trainable parameters. Parameters that are
frozen are not directions; parameters that get no gradient are directions of zero curvature
(every vector made here is zero on them). Costs are counted on the operator: `products`
(Hessian-vector products over all the images) and `passes` (gradient graphs built, in units of
one forward+backward over all the images).
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


def cross_entropy(model, inputs, targets):
    return F.cross_entropy(model(inputs), targets)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def normal_pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


class GELU(torch.autograd.Function):
    """exact GELU, x Phi(x), whose backward keeps its derivative Phi(x) + x phi(x) once computed:
    every Hessian-vector product runs this backward again (it is on the path from the weights to
    the gradient), and torch's own recomputes erf and exp there each time"""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        if not hasattr(ctx, "slope"):
            with torch.no_grad():
                ctx.slope = 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * normal_pdf(x)
        return GELUGrad.apply(grad, x, ctx.slope)


class GELUGrad(torch.autograd.Function):
    """grad * GELU'(x), differentiable in grad and x: grad GELU''(x), GELU''(x) = phi(x) (2 - x^2),
    is computed at the first Hessian-vector product and kept (grad is a tensor of the graph too);
    slope = GELU'(x) is a constant of the graph (its dependence on x is what GELU'' carries)"""

    @staticmethod
    def forward(ctx, grad, x, slope):
        ctx.save_for_backward(grad, x, slope)
        return grad * slope

    @staticmethod
    def backward(ctx, grad_grad):
        grad, x, slope = ctx.saved_tensors
        if not hasattr(ctx, "grad_curve"):
            ctx.grad_curve = grad * normal_pdf(x) * (2 - x * x)
        return grad_grad * slope, grad_grad * ctx.grad_curve, None


class CachedGELU(TorchFunctionMode):
    """inside: F.gelu (exact, as nn.GELU calls it) goes through `GELU`. A Hessian-vector product
    then costs 0.88x (embedded tiny/4 teacher, 64 images) and 0.91x (ViT-B/16, batch 4) of one
    through torch's GELU, measured interleaved on 2 CPU cores"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.gelu and len(args) == 1 and kwargs.get("approximate", "none") == "none":
            return GELU.apply(args[0])
        return func(*args, **kwargs)


class HessianOperator:
    """v -> H v for the batch-size-weighted mean loss over batches [(inputs, targets)], on flat
    vectors; the weights must not change while it is in use (it keeps gradient graphs).

    Double backward, kept after measuring it against forward-over-reverse (torch.func.jvp of
    torch.func.grad; bench.py prints both, and tests/test_hessian.py checks both against an
    explicit Hessian): both are exact, double backward was the faster one, and it lets one
    gradient graph serve many vectors. The second derivative goes through the math attention
    kernel (softmax(q k^T) v written out, SDPBackend.MATH) because the fused kernels (flash,
    memory-efficient, the CPU flash kernel) have no derivative of their backward: they cannot
    give an exact Hessian-vector product (forward-over-reverse through them fails outright).
    LayerNorm goes through F.layer_norm, whose double backward is exact (the explicit Hessian
    of the test uses a hand-written LayerNorm); exact GELU through `GELU` (see `CachedGELU`)."""

    def __init__(self, model, batches, loss_fn=cross_entropy, keep_graphs=False):
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        self.keep_graphs = keep_graphs
        self.params = trainable(model)
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.size = sum(self.sizes)
        self.total = sum(len(t) for _, t in batches)
        self.products, self.passes = 0, 0.0
        self.graphs = [None] * len(batches)
        self.last = None  # (batch index, graph): the latest graph is always kept for the next call
        self.mask = None  # 1 where the parameter gets a gradient, set by the first graph

    def graph(self, i):
        """batch i's gradient with its graph: [(gradient, parameter index)] for the parameters
        whose gradient depends on the parameters (the others have no second derivative)"""
        if self.graphs[i] is not None:
            return self.graphs[i]
        if self.last is not None and self.last[0] == i:
            return self.last[1]
        inputs, targets = self.batches[i]
        with sdpa_kernel(SDPBackend.MATH), CachedGELU():  # fused attention: no second derivative
            loss = self.loss_fn(self.model, inputs, targets)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.passes += len(targets) / self.total
        if self.mask is None:
            pieces = [torch.full((n,), float(g is not None)) for g, n in zip(grads, self.sizes)]
            self.mask = torch.cat(pieces).to(self.params[0])
        graph = [(g, j) for j, g in enumerate(grads) if g is not None and g.requires_grad]
        if self.keep_graphs:
            self.graphs[i] = graph
        self.last = (i, graph)
        return graph

    def __call__(self, vectors):
        """vectors (m, P) -> H vectors (m, P); each batch's graph serves all m vectors"""
        vectors = vectors.reshape(-1, self.size)
        out = torch.zeros_like(vectors)
        for i, (_, targets) in enumerate(self.batches):
            graph = self.graph(i)
            if not graph:
                continue  # no parameter influences this loss through a second derivative
            grads, index = [g for g, _ in graph], [j for _, j in graph]
            for v, o in zip(vectors, out):
                pieces, sums = self.unflat(v), o.split(self.sizes)
                hv = torch.autograd.grad(grads, [self.params[j] for j in index],
                                         [pieces[j] for j in index], retain_graph=True,
                                         allow_unused=True)
                for h, j in zip(hv, index):
                    if h is not None:
                        sums[j].add_(h.reshape(-1), alpha=len(targets) / self.total)
        self.products += len(vectors)
        return out

    def flat(self, tensors):
        """per-parameter tensors -> one flat vector"""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflat(self, vector):
        """flat vector -> per-parameter tensors (views)"""
        return [t.view(s) for t, s in zip(vector.split(self.sizes), self.shapes)]

    def random(self, generator, kind="normal", count=1):
        """count random vectors (count, P), normal or Rademacher, zero on parameters without a
        gradient; drawn on the CPU, so a seed gives the same vectors on every device"""
        if self.mask is None:
            self.graph(0)  # finds which parameters get a gradient (the graph serves the next call)
        if kind == "normal":
            v = torch.randn(count, self.size, generator=generator)
        else:
            bits = torch.randint(0, 2, (count, self.size), generator=generator, dtype=torch.int8)
            v = bits.float().mul_(2).sub_(1)
        return v.to(self.mask).mul_(self.mask)


def orthogonalize(w, basis):
    """w minus its components along the orthonormal basis vectors, twice (one pass loses
    orthogonality to round-off when w is nearly in their span)"""
    for _ in range(2):
        for q in basis:
            w = w - (q @ w) * q
    return w


def lanczos(hessian, k=2, tol=1e-3, max_iter=100, seed=0):
    """the k eigenvalues of largest magnitude and their unit eigenvectors, from one Krylov run:
    q_{j+1} beta_j = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}, alpha_j = q_j^T H q_j, with every
    new q orthogonalized against all the previous ones (full reorthogonalization). A Ritz pair
    (theta, y = Q s) of the tridiagonal T = tridiag(beta, alpha, beta) has the residual
    r = ||H y - theta y|| = beta_m |s_m|, and an eigenvalue of H lies within min(r, r^2 / gap)
    of theta, gap = the distance to the rest of the spectrum (Parlett, The Symmetric Eigenvalue
    Problem, 11.7; estimated here by the distance to the other Ritz values). The run stops when
    this bound is <= tol |theta| for all k, after max_iter products, or when the Krylov space is
    invariant (beta = 0: the Ritz values are then exact eigenvalues).
    -> dict(values (by magnitude, largest first), vectors (k, P), basis [q_1..q_m], steps,
    residuals, converged, basis_trace = sum of alpha = tr(Q^T H Q), history: the values after
    every step)"""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = hessian.random(g)[0]
    q = q / q.norm()
    basis, alphas, betas, history = [], [], [], []
    for _ in range(max_iter):
        basis.append(q)
        w = hessian(q)[0]
        alphas.append((q @ w).item())
        w = orthogonalize(w, basis)
        beta = w.norm().item()
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        order = theta.abs().argsort(descending=True)[:k]
        residuals = (beta * S[-1, order].abs()).tolist()
        values = theta[order].tolist()
        history.append(values)
        gaps = [(theta - v).abs().sort().values[1].item() if len(theta) > 1 else math.inf
                for v in values]
        bounds = [min(r, r * r / gap) if gap > 0 else r for r, gap in zip(residuals, gaps)]
        invariant = beta <= 1e-7 * max(abs(v) for v in values)
        converged = len(values) == k and all(b <= tol * abs(v) for b, v in zip(bounds, values))
        if converged or invariant or len(basis) == min(max_iter, hessian.size):
            break
        betas.append(beta)
        q = w / beta
    Q = torch.stack(basis)  # (m, P)
    ritz = S[:, order].T.to(Q) @ Q  # (k, P)
    vectors = ritz / ritz.norm(dim=1, keepdim=True)
    return dict(values=values, vectors=vectors, basis=basis, steps=len(basis),
                residuals=residuals, converged=converged or invariant,
                basis_trace=math.fsum(alphas), history=history)


def power_iteration(hessian, k=2, tol=1e-3, max_iter=100, seed=0):
    """PyHessian's algorithm, for comparison: for each of k eigenvalues, v <- H v / ||H v||
    orthogonal to the eigenvectors already found, until the Rayleigh quotient changes by at most
    tol relative -> (values in the order found, vectors (k, P), histories: the Rayleigh quotient
    after every product, one list per eigenvalue)"""
    g = torch.Generator(device="cpu").manual_seed(seed)
    values, vectors, histories = [], [], []
    for _ in range(k):
        v = hessian.random(g)[0]
        history = []
        for _ in range(max_iter):
            v = orthogonalize(v, vectors)
            v = v / v.norm()
            hv = hessian(v)[0]
            history.append((hv @ v).item())  # Rayleigh quotient
            v = hv / hv.norm()
            previous = history[-2] if len(history) > 1 else None
            if previous is not None and abs(history[-1] - previous) <= tol * (abs(previous) + 1e-6):
                break
        v = orthogonalize(v, vectors)
        values.append(history[-1])
        vectors.append(v / v.norm())
        histories.append(history)
    return values, torch.stack(vectors), histories


def hutchinson(hessian, samples=50, seed=0, basis=(), basis_trace=0.0, tol=0.0, chunk=None):
    """tr H = tr(Q^T H Q) + E[r^T H r], r = v - Q Q^T v, v Rademacher (plain Hutchinson when the
    orthonormal basis Q is empty); basis_trace = tr(Q^T H Q) (Lanczos: the sum of its alphas).
    -> (estimate, standard error of the mean over the samples, samples used). With tol > 0 the
    samples go in chunks and stop once the standard error is <= tol |estimate| (PyHessian
    stops on the relative change of the running mean instead, which a lucky pair can end).
    Vectors go `chunk` at a time through each batch's graph (default: 10 with tol, else as many
    as fit in 1 GiB of float32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    chunk = chunk or (10 if tol > 0 else max(1, 2 ** 28 // hessian.size))
    Q = torch.stack(list(basis)) if len(basis) else None  # (m, P)
    estimates = []
    while len(estimates) < samples:
        v = hessian.random(g, "rademacher", min(chunk, samples - len(estimates)))
        if Q is not None:  # r = v - Q Q^T v (the basis is orthonormal)
            v -= (v @ Q.T) @ Q
        estimates += (hessian(v) * v).sum(1).tolist()
        t = torch.tensor(estimates, dtype=torch.float64)
        stderr = t.std().item() / math.sqrt(len(t)) if len(t) > 1 else float("nan")
        mean = basis_trace + t.mean().item()
        if tol > 0 and stderr <= tol * abs(mean):
            break
    return mean, stderr, len(estimates)


def curvature(model, batches, k=2, tol=1e-3, max_iter=100, trace_products=50, trace_tol=0.0,
              seed=0, keep_graphs=False, loss_fn=cross_entropy):
    """top-k eigenvalues by Lanczos, then the trace by Hutchinson deflated with the same Krylov
    basis. trace_products counts every product the trace rests on: the m Lanczos steps (shared
    with the eigenvalues, no extra cost) and trace_products - m Rademacher samples (at least 2),
    so that plain and deflated Hutchinson compare at the same number of products.
    -> dict(eigenvalues, vectors (per-parameter tensors, one list per eigenvalue), trace,
    trace_stderr, trace_samples, lanczos_steps, converged, residuals ||H y - lambda y||, products,
    passes)"""
    hessian = HessianOperator(model, batches, loss_fn, keep_graphs)
    eig = lanczos(hessian, k, tol, max_iter, seed)
    samples = max(trace_products - eig["steps"], 2)
    trace, stderr, used = hutchinson(hessian, samples, seed + 1, eig["basis"], eig["basis_trace"],
                                     trace_tol)
    return dict(eigenvalues=eig["values"], vectors=[hessian.unflat(v) for v in eig["vectors"]],
                trace=trace, trace_stderr=stderr, trace_samples=used, lanczos_steps=eig["steps"],
                converged=eig["converged"], residuals=eig["residuals"], products=hessian.products,
                passes=hessian.passes)


@torch.no_grad()
def mean_loss(model, batches, loss_fn=cross_entropy):
    total = sum(len(t) for _, t in batches)
    return sum(loss_fn(model, x, t).item() * len(t) / total for x, t in batches)


@torch.no_grad()
def loss_landscape(model, batches, directions, span=0.5, steps=21, loss_fn=cross_entropy):
    """loss at theta + a d1 + b d2 on a steps x steps grid of a, b in [-span, span]
    -> (coords, grid[a][b])"""
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
