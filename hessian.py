"""
Curvature of a classifier's loss at its weights, without ever forming the Hessian: used by
analyze.py (--metric hessian, landscape) and finetune.py (--hessian_every).

The quantities are PyHessian's (amirgholami/PyHessian, pyhessian/hessian.py): the loss is the
mean cross-entropy over a set of batches, batch-size weighted, model in eval mode; the top-k
eigenvalues are those of largest magnitude, reported by magnitude (PyHessian's order); the
trace is E[v^T H v] over Rademacher v. The algorithms are cheaper than PyHessian's:

- eigenvalues: Lanczos with full reorthogonalization (one Krylov run gives all k) instead of
  power iteration with deflation (kept here as `power_iteration`, the reference for bench.py);
  it stops when the residual of every wanted Ritz pair is <= tol |theta| (an eigenvalue lies
  that close, see `lanczos`), where power iteration stops when its estimate changes by less.
- trace: Hutchinson on the complement of the Lanczos Krylov basis Q. tr H = tr(Q^T H Q) +
  tr(P H P) with P = I - Q Q^T; the first term is the sum of the Lanczos diagonal (exact, no
  extra product), the second is estimated from Rademacher v projected by P. The big outlier
  eigenvalues, which make plain Hutchinson noisy, live in Q, so the standard error is smaller.
- Hessian-vector products: double backward. Each batch's gradient graph (one forward + one
  backward with create_graph) is built once per call and every vector of the call is one more
  backward through it; graphs may also be kept between calls (`keep_graphs`). The graph's exact
  GELUs keep their first and second derivatives (`CachedGELU`), which every product reuses.
- the trace's samples r^T H r need no H r: second-order forward mode (Taylor mode, `Jet`) runs
  the model and loss once per vector on x(t) = x0 + t x1 + t^2 x2 along the weights w + t r and
  reads r^T H r = 2 L2 off the loss. A linear layer then costs 4 matrix products (a product
  through the gradient graph: 6), the forward's own values are recorded once per batch (`Tape`),
  and the elementwise work is a forward's, not a double backward's. Models with an op that has
  no rule fall back to r . (H r) (`HessianOperator.quadratic`).

Vectors are flat: one tensor over the concatenated trainable parameters. Parameters that are
frozen are not directions; parameters that get no gradient are directions of zero curvature
(every vector made here is zero on them). Costs are counted on the operator: `products`
(Hessian-vector products over all the images), `forms` (quadratic forms by Taylor mode) and
`passes` (gradient graphs built, in units of one forward+backward over all the images).
"""
import ctypes
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map


def cross_entropy(model, inputs, targets):
    return F.cross_entropy(model(inputs), targets)


def trainable(model):
    """{name: parameter} of the parameters that require a gradient, in the model's order"""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def normal_pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def gelu_slope(x):
    """GELU'(x) = Phi(x) + x phi(x) (exact GELU, x Phi(x))"""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * normal_pdf(x)


def gelu_curve(x):
    """GELU''(x) = phi(x) (2 - x^2)"""
    return normal_pdf(x) * (2 - x * x)


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
                ctx.slope = gelu_slope(x)
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
            ctx.grad_curve = grad * gelu_curve(x)
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


def keep_freed_memory():
    """glibc gives freed blocks of more than 128 KiB back to the OS at once (up to 32 MiB after it
    adapts), and the next block of that size faults its pages in again. Taylor mode makes many
    activation-sized temporaries: on the embedded teacher a quadratic form took 435 ms with
    glibc's defaults and 333 ms with these thresholds raised to 1 GiB (a Hessian-vector product
    527 vs 552 ms, a forward+backward 271 vs 283 ms; two runs of one script). Freed memory then
    stays in the process for reuse (its resident size stays at its peak). Nothing off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


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
        keep_freed_memory()
        named = trainable(model)
        self.names, self.params = list(named), list(named.values())
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.size = sum(self.sizes)
        self.total = sum(len(t) for _, t in batches)
        self.products, self.passes, self.forms = 0, 0.0, 0
        self.taylor, self.why_not_taylor = True, None  # r^T H r by Taylor mode (see quadratic)
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

    def quadratic(self, vectors):
        """vectors (m, P) -> r^T H r for each row r (m,): by second-order forward mode (Taylor
        mode, see `Jet`) where every op of the model and loss has a rule, else as r . (H r).
        One pass of the model per vector and batch gives L''(w + t r) at t = 0 exactly, with 4
        matrix products per linear layer (a Hessian-vector product needs 6, and the trace needs
        only these numbers); the pass over a batch's first vector records the values of the
        forward on a `Tape` and the others replay them."""
        vectors = vectors.reshape(-1, self.size)
        if self.taylor:
            try:
                forms = self.taylor_forms(vectors)
                self.forms += len(vectors)
                return forms
            except NotImplementedError as error:  # an op without a rule: products do it
                self.taylor, self.why_not_taylor = False, str(error)
        return (self(vectors) * vectors).sum(1)

    def taylor_forms(self, vectors):
        module = WithLoss(self.model, self.loss_fn)
        out = torch.zeros(len(vectors), dtype=torch.float64)
        previous = Jet.tape
        try:
            for inputs, targets in self.batches:
                Jet.tape = Tape()
                for i, r in enumerate(vectors):
                    jets = {"model." + name: Jet(p.detach(), t)
                            for name, p, t in zip(self.names, self.params, self.unflat(r))}
                    with torch.no_grad():
                        loss = torch.func.functional_call(module, jets, (inputs, targets))
                    Jet.tape.replay()
                    second = parts(loss)[2]
                    if second is not None:  # L(t) = L0 + t L1 + t^2 L2: r^T H r = 2 L2
                        out[i] += 2 * second.double().item() * len(targets) / self.total
        finally:
            Jet.tape = previous
        return out.to(vectors)

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


# ----------------------------------------------------------------------------------------
# quadratic forms r^T H r by second-order forward mode (Taylor mode)

class Tape:
    """the values of one forward, recorded by the first jet pass over a batch and replayed by the
    next ones: every vector's pass runs the same ops on the same weights, so only its derivative
    parts are new work"""

    def __init__(self):
        self.values, self.at, self.recording = [], 0, True

    def __call__(self, compute):
        if self.recording:
            self.values.append(compute())
            return self.values[-1]
        self.at += 1
        return self.values[self.at - 1]

    def replay(self):
        self.recording, self.at = False, 0


def parts(x):
    """(value, first, second) of a jet; a plain tensor or a number is a constant (None: zero)"""
    return (x.value, x.first, x.second) if isinstance(x, Jet) else (x, None, None)


def with_added(total, term):
    """total + term, in place when total is a tensor this rule made (None: zero)"""
    if term is None:
        return total
    return term if total is None else total.add_(term)


def linear_rule(x, w, b=None):
    """y = x w^T + b is bilinear in (x, w): y1 = x1 w0^T + x0 w1^T + b1,
    y2 = x2 w0^T + x1 w1^T + x0 w2^T (w2 = 0: weights move on a line); 4 matrix products per
    vector where a Hessian-vector product needs 6"""
    (x0, x1, x2), (w0, w1, w2), (b0, b1, _) = parts(x), parts(w), parts(b)
    y0 = Jet.tape(lambda: F.linear(x0, w0, b0))

    def products(pairs, bias=None):
        pairs = [(s, t) for s, t in pairs if s is not None and t is not None]
        if not pairs:
            return None if bias is None else bias.expand_as(y0).clone()
        out = F.linear(*pairs[0], bias)
        flat = out.view(-1, out.shape[-1])
        for s, t in pairs[1:]:
            flat.addmm_(s.reshape(-1, s.shape[-1]), t.T)
        return out

    return Jet.of(y0, products([(x1, w0), (x0, w1)], b1), products([(x2, w0), (x1, w1), (x0, w2)]))


def bilinear(f, a, b):
    """f bilinear in a and b (products of tensors): z1 = f(a1, b0) + f(a0, b1),
    z2 = f(a2, b0) + f(a1, b1) + f(a0, b2)"""
    (a0, a1, a2), (b0, b1, b2) = parts(a), parts(b)
    z0 = Jet.tape(lambda: f(a0, b0))

    def terms(pairs):
        out = None
        for s, t in pairs:
            if s is None or t is None:
                continue
            if out is not None and f is torch.mul:
                out.addcmul_(s, t)  # the product without a temporary
            else:
                out = with_added(out, f(s, t))
        return out

    return Jet.of(z0, terms([(a1, b0), (a0, b1)]), terms([(a2, b0), (a1, b1), (a0, b2)]))


def conv2d_rule(x, w, b=None, *options, **named):
    z = bilinear(lambda s, t: F.conv2d(s, t, None, *options, **named), x, w)
    return z if b is None else add_rule(z, b[:, None, None])


def add_rule(a, b, alpha=1):
    """affine: the parts add, a constant only moves the value"""
    (a0, a1, a2), (b0, b1, b2) = parts(a), parts(b)
    z0 = Jet.tape(lambda: torch.add(a0, b0, alpha=alpha))

    def combined(s, t):
        if t is None:
            return s
        return t * alpha if s is None else torch.add(s, t, alpha=alpha)

    return Jet.of(z0, combined(a1, b1), combined(a2, b2))


def cat_rule(tensors, dim=0):
    values = [parts(t)[0] for t in tensors]
    z0 = Jet.tape(lambda: torch.cat(values, dim))
    out = [z0]
    for order in (1, 2):
        pieces = [parts(t)[order] for t in tensors]
        if all(p is None for p in pieces):
            out.append(None)
        else:
            out.append(torch.cat([torch.zeros_like(v) if p is None else p
                                  for p, v in zip(pieces, values)], dim))
    return Jet.of(*out)


def elementwise(x, value_slope_curve):
    """z = phi(x) elementwise: z1 = phi'(x0) x1, z2 = phi'(x0) x2 + phi''(x0) x1^2 / 2"""
    x0, x1, x2 = parts(x)
    z0, slope, half_curve = Jet.tape(lambda: value_slope_curve(x0))
    z1 = None if x1 is None else slope * x1
    z2 = None if x1 is None else (half_curve * x1).mul_(x1)
    if x2 is not None:
        z2 = slope * x2 if z2 is None else z2.addcmul_(slope, x2)
    return Jet.of(z0, z1, z2)


def gelu_rule(x, approximate="none"):
    if approximate != "none":
        raise NotImplementedError("no second-order rule for the tanh GELU")

    def value_slope_curve(x0):
        return F.gelu(x0), gelu_slope(x0), 0.5 * gelu_curve(x0)

    return elementwise(x, value_slope_curve)


def sigmoid_rule(x):
    def value_slope_curve(x0):  # s' = s (1 - s); s'' / 2 = s' (1 - 2 s) / 2
        s = torch.sigmoid(x0)
        slope = s * (1 - s)
        return s, slope, slope * (0.5 - s)

    return elementwise(x, value_slope_curve)


def softmax_rule(x, dim, dtype=None):
    """p = softmax(x): p1 = p c1, c1 = x1 - <p, x1>; p2 = p (e - <p, e>), e = x2 + c1^2 / 2
    (<., .> sums over dim)"""
    if dtype is not None:
        raise NotImplementedError("no second-order rule for softmax with a dtype")
    x0, x1, x2 = parts(x)
    p = Jet.tape(lambda: x0.softmax(dim).movedim(dim, -1))
    x1, x2 = [None if t is None else t.movedim(dim, -1) for t in (x1, x2)]

    def weighted(t):  # <p, t> by one matrix-vector product per row: (..., 1)
        return (p.unsqueeze(-2) @ t.unsqueeze(-1)).squeeze(-1)

    c1 = None if x1 is None else x1 - weighted(x1)
    p1 = None if c1 is None else p * c1
    if c1 is None:
        e = x2
    else:
        e = (0.5 * c1).mul_(c1) if x2 is None else torch.addcmul(x2, c1, c1, value=0.5)
    p2 = None if e is None else (e - weighted(e)).mul_(p)
    return Jet.of(*[None if t is None else t.movedim(-1, dim) for t in (p, p1, p2)])


def layer_norm_rule(x, shape, weight=None, bias=None, eps=1e-5):
    """h = c s, c = x - mean x, s = (mean c^2 + eps)^-1/2. With u_k = (x_k - mean x_k) s and
    m = mean(h0 u1): h1 = u1 - h0 m, h2 = u2 - u1 m + h0 (3 m^2 / 2 - mean(u1^2) / 2 - mean(h0 u2))
    (the Taylor coefficients of c(t) s(t), s(t) = s (1 + d(t))^-1/2, d = s^2 (v(t) - v))"""
    dims = tuple(range(-len(shape), 0))
    x0, x1, x2 = parts(x)

    def mean(t):
        return t.mean(dims, keepdim=True)

    def normalized(x0):
        centered = x0 - mean(x0)
        s = torch.rsqrt(mean(centered * centered) + eps)
        return centered * s, s

    h0, s = Jet.tape(lambda: normalized(x0))
    u1 = None if x1 is None else (x1 - mean(x1)).mul_(s)
    u2 = None if x2 is None else (x2 - mean(x2)).mul_(s)
    h1 = h2 = None
    if u1 is not None:
        m = mean(h0 * u1)
        h1 = torch.addcmul(u1, h0, m, value=-1)
        sigma2 = 1.5 * m * m - 0.5 * mean(u1 * u1)
        h2 = torch.addcmul(u1 * -m, h0, sigma2)
    if u2 is not None:
        sigma2 = -mean(h0 * u2)
        h2 = with_added(h2, torch.addcmul(u2, h0, sigma2))
    h = Jet.of(h0, h1, h2)
    if weight is not None:
        h = bilinear(torch.mul, h, weight)
    return h if bias is None else add_rule(h, bias)


def cross_entropy_rule(logits, targets, weight=None, size_average=None, ignore_index=-100,
                       reduce=None, reduction="mean", label_smoothing=0.0):
    """L = mean_b (logsumexp z_b - z_b[y_b]): L1 = mean(<p, z1> - z1[y]),
    L2 = mean(<p, z2> - z2[y] + (<p, z1^2> - <p, z1>^2) / 2)"""
    if (weight is not None or reduction != "mean" or label_smoothing or targets.is_floating_point()
            or logits.dim() != 2
            or size_average is not None or reduce is not None or (targets == ignore_index).any()):
        raise NotImplementedError("no second-order rule for this cross_entropy")
    z0, z1, z2 = parts(logits)
    loss, p = Jet.tape(lambda: (F.cross_entropy(z0, targets), z0.softmax(-1)))

    def linear_part(t):
        return ((p * t).sum(-1) - t.gather(-1, targets[:, None])[:, 0]).mean()

    L1 = None if z1 is None else linear_part(z1)
    L2 = None if z2 is None else linear_part(z2)
    if z1 is not None:
        average = (p * z1).sum(-1)
        L2 = with_added(L2, 0.5 * ((p * z1 * z1).sum(-1) - average * average).mean())
    return Jet.of(loss, L1, L2)


def attention_rule(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """y = softmax(S) v, S = q k^T scale + mask, written out: S and y are bilinear (S1 = q1 k0^T +
    q0 k1^T, ...), the softmax has its rule. Each part goes to (batch, N, d) once and the products
    accumulate in place (torch.matmul would copy the strided q, k, v parts for every product)"""
    boolean_mask = attn_mask is not None and attn_mask.dtype == torch.bool
    if dropout_p or is_causal or enable_gqa or boolean_mask:
        raise NotImplementedError("no second-order rule for attention with dropout or a bool mask")
    (q0, q1, q2), (k0, k1, k2), (v0, v1, v2), (m0, m1, m2) = map(parts, (q, k, v, attn_mask))
    *lead, N, d = q0.shape
    scale = d ** -0.5 if scale is None else scale

    def flat(t):  # (..., N, d) -> (batch, N, d), one copy of a strided view
        return None if t is None else t.reshape(-1, *t.shape[-2:])

    def products(pairs, alpha=1.0, transposed=False):  # sum of alpha a b (b^T) over the pairs
        out = None
        for a, b in pairs:
            if a is None or b is None:
                continue
            b = b.transpose(1, 2) if transposed else b
            out = torch.bmm(a, b).mul_(alpha) if out is None else out.baddbmm_(a, b, alpha=alpha)
        return out

    def logits():
        S = products([(q0, k0)], scale, True).view(*lead, N, N)
        return S if m0 is None else S + m0

    q0, k0, v0 = Jet.tape(lambda: (flat(q0), flat(k0), flat(v0)))
    q1, q2, k1, k2, v1, v2 = map(flat, (q1, q2, k1, k2, v1, v2))
    S0 = Jet.tape(logits)
    S1 = products([(q1, k0), (q0, k1)], scale, True)
    S2 = products([(q2, k0), (q1, k1), (q0, k2)], scale, True)
    S1, S2 = [None if t is None else t.view(*lead, N, N) for t in (S1, S2)]
    S1, S2 = with_added(S1, m1), with_added(S2, m2)
    p0, p1, p2 = [flat(t) for t in parts(softmax_rule(Jet.of(S0, S1, S2), -1))]
    y0 = Jet.tape(lambda: torch.bmm(p0, v0))
    y1 = products([(p1, v0), (p0, v1)])
    y2 = products([(p2, v0), (p1, v1), (p0, v2)])
    return Jet.of(*[None if t is None else t.view(*lead, N, t.shape[-1]) for t in (y0, y1, y2)])


def divide_rule(a, b):
    if isinstance(b, Jet):
        raise NotImplementedError("no second-order rule for a division by a jet")
    return Jet.of(*[None if t is None else t / b for t in parts(a)])


RULES = {F.linear: linear_rule, F.conv2d: conv2d_rule, F.gelu: gelu_rule,
         F.layer_norm: layer_norm_rule,
         F.cross_entropy: cross_entropy_rule, F.scaled_dot_product_attention: attention_rule,
         torch.cat: cat_rule, torch.Tensor.__truediv__: divide_rule, torch.Tensor.div: divide_rule,
         torch.Tensor.__rsub__: lambda a, b: add_rule(b, a, alpha=-1),
         torch.Tensor.__rmatmul__: lambda a, b: bilinear(torch.matmul, b, a),
         torch.Tensor.__iter__: lambda a: iter(a.unbind(0))}
for f in (torch.sigmoid, torch.Tensor.sigmoid):
    RULES[f] = sigmoid_rule
for f in (torch.softmax, torch.Tensor.softmax):
    RULES[f] = softmax_rule
for f in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__):
    RULES[f] = lambda a, b: bilinear(torch.mul, a, b)
for f in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm):
    RULES[f] = lambda a, b: bilinear(torch.matmul, a, b)
for f in (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__):
    RULES[f] = add_rule
for f in (torch.sub, torch.Tensor.sub, torch.Tensor.__sub__):
    RULES[f] = lambda a, b, alpha=1: add_rule(a, b, -alpha)
# linear in their one tensor argument: each part goes through them as it is
STRUCTURAL = {"view", "reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze",
              "expand", "contiguous", "__getitem__", "unbind", "split", "chunk", "float", "double",
              "to", "clone", "mean", "sum", "neg", "__neg__", "narrow", "select", "movedim", "t",
              "__get__", "type_as"}
# their result does not move with the weights
CONSTANT = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones",
            "new_empty", "new_full", "detach"}


class Jet(torch.Tensor):
    """x(t) = x0 + t x1 + t^2 x2 + ..., a tensor on the line of weights w + t r, to second order:
    the tensor itself is its value x0, `first` and `second` are the Taylor coefficients x1 and
    x2 = x''(0) / 2 (None: zero). Torch functions of jets go through RULES and STRUCTURAL; others
    raise NotImplementedError. Values computed by the rules go through `Jet.tape`."""

    tape = staticmethod(lambda compute: compute())  # replaced by a Tape while quadratic() runs

    @staticmethod
    def __new__(cls, value, first=None, second=None):
        jet = torch.Tensor._make_subclass(cls, value)
        jet.value = value
        jet.first, jet.second = [t if t is None or t.shape == value.shape  # as big as the value
                                 else t.expand_as(value).contiguous() for t in (first, second)]
        return jet

    @classmethod
    def of(cls, value, first, second):
        return value if first is None and second is None else cls(value, first, second)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RULES:
            return RULES[func](*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__setitem__":  # x[i] = y returns None: the parts written would be lost
            raise NotImplementedError("no second-order rule for an in-place write x[i] = y")
        with torch._C.DisableTorchFunctionSubclass():
            values = tree_map(lambda a: a.value if isinstance(a, Jet) else a, (args, kwargs))
            z0 = Jet.tape(lambda: func(*values[0], **values[1]))
            results = z0 if isinstance(z0, (tuple, list)) else [z0]
            # an op with values and indices (max, sort) moves with the weights: it needs a rule
            moves = any(torch.is_tensor(r) and r.is_floating_point() for r in results)
            if name in CONSTANT or not moves:  # shapes, sizes, indices, constants
                return z0
            jets = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Jet)]
            if name not in STRUCTURAL or len(jets) != 1:
                raise NotImplementedError(f"no second-order rule for {name or func}")
            out = [z0]
            for part in (jets[0].first, jets[0].second):
                swapped = tree_map(lambda a: part if a is jets[0] else a, (args, kwargs))
                out.append(None if part is None else func(*swapped[0], **swapped[1]))
        if torch.is_tensor(z0):
            return Jet.of(*out)
        firsts, seconds = [[None] * len(z0) if o is None else o for o in out[1:]]
        return type(z0)(Jet.of(*p) for p in zip(z0, firsts, seconds))


class WithLoss(torch.nn.Module):
    """model and loss as one module, so that torch.func.functional_call swaps the model's weights
    for jets while loss_fn runs"""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, inputs, targets):
        return self.loss_fn(self.model, inputs, targets)


def orthogonalize(w, basis):
    """w minus its components along the orthonormal basis vectors, twice (one pass loses
    orthogonality to round-off when w is nearly in their span)"""
    for _ in range(2):
        for q in basis:
            w = w - (q @ w) * q
    return w


def lanczos(hessian, k=2, tol=1e-3, max_iter=100, seed=0, progress=None):
    """the k eigenvalues of largest magnitude and their unit eigenvectors, from one Krylov run:
    q_{j+1} beta_j = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}, alpha_j = q_j^T H q_j, with every
    new q orthogonalized against all the previous ones (full reorthogonalization). A Ritz pair
    (theta, y = Q s) of the tridiagonal T = tridiag(beta, alpha, beta) has the residual
    r = ||H y - theta y|| = beta_m |s_m|, and an eigenvalue of H lies within r of theta (H
    symmetric, y a unit vector). The run stops when r <= tol |theta| for all k (ARPACK's rule),
    after max_iter products, or when the Krylov space is invariant (beta = 0: the Ritz values
    are then exact eigenvalues). The sharper r^2 / gap bound is not used: it needs the gap to the
    rest of the spectrum, and the other Ritz values misjudge it while a close pair is unresolved
    (top eigenvalues 10 and 9.8: it stopped on 9.82 for 33 of 40 random starts at tol 1e-3).
    -> dict(values (by magnitude, largest first), vectors (k, P), basis [q_1..q_m], steps,
    residuals, converged, basis_trace = sum of alpha = tr(Q^T H Q), history: the values after
    every step). progress: a tqdm bar (or None), advanced by one per step"""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = hessian.random(g)[0]
    q = q / q.norm()
    basis, alphas, betas, history = [], [], [], []
    for _ in range(max_iter):
        basis.append(q)
        w = hessian(q)[0]
        if progress is not None:
            progress.update(1)
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
        invariant = beta <= 1e-7 * max(abs(v) for v in values)
        converged = len(values) == k and all(r <= tol * abs(v) for r, v in zip(residuals, values))
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


def hutchinson(hessian, samples=50, seed=0, basis=(), basis_trace=0.0, tol=0.0, chunk=None,
               progress=None):
    """tr H = tr(Q^T H Q) + E[r^T H r], r = v - Q Q^T v, v Rademacher (plain Hutchinson when the
    orthonormal basis Q is empty); basis_trace = tr(Q^T H Q) (Lanczos: the sum of its alphas).
    The samples r^T H r are quadratic forms (`HessianOperator.quadratic`: Taylor mode).
    -> (estimate, standard error of the mean over the samples, samples used). With tol > 0 the
    samples go in chunks and stop once the standard error is <= tol |estimate| (PyHessian
    stops on the relative change of the running mean instead, which a lucky pair can end).
    Vectors go `chunk` at a time through each batch's graph (default: 10 with tol, else as many
    as fit in 1 GiB of float32). progress: a tqdm bar (or None), advanced by one per sample."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    chunk = chunk or (10 if tol > 0 else max(1, 2 ** 28 // hessian.size))
    Q = torch.stack(list(basis)) if len(basis) else None  # (m, P)
    estimates = []
    while len(estimates) < samples:
        v = hessian.random(g, "rademacher", min(chunk, samples - len(estimates)))
        if Q is not None:  # r = v - Q Q^T v (the basis is orthonormal)
            v -= (v @ Q.T) @ Q
        estimates += hessian.quadratic(v).tolist()
        if progress is not None:
            progress.update(len(v))
        t = torch.tensor(estimates, dtype=torch.float64)
        stderr = t.std().item() / math.sqrt(len(t)) if len(t) > 1 else float("nan")
        mean = basis_trace + t.mean().item()
        if tol > 0 and stderr <= tol * abs(mean):
            break
    return mean, stderr, len(estimates)


def curvature(model, batches, k=2, tol=1e-3, max_iter=100, trace_products=50, trace_tol=0.0,
              seed=0, keep_graphs=False, loss_fn=cross_entropy, trace_samples=None,
              progress=None):
    """top-k eigenvalues by Lanczos, then the trace by Hutchinson deflated with the same Krylov
    basis. trace_products counts every product the trace rests on: the m Lanczos steps (shared
    with the eigenvalues, no extra cost) and trace_products - m Rademacher samples (at least 2,
    each a quadratic form r^T H r, which costs less than a product), so that plain and deflated
    Hutchinson compare at the same number of products; trace_samples, if given, is the number
    of samples instead.
    -> dict(eigenvalues, vectors (per-parameter tensors, one list per eigenvalue), trace,
    trace_stderr, trace_samples, lanczos_steps, converged, residuals ||H y - lambda y||, products
    (Hessian-vector products), forms (quadratic forms by Taylor mode; 0 where the model has an
    op without a rule: the samples were products then), passes). progress: a tqdm bar (or None)
    that counts the Lanczos steps and the trace samples; its total is set to their number once
    the Lanczos run has stopped"""
    hessian = HessianOperator(model, batches, loss_fn, keep_graphs)
    eig = lanczos(hessian, k, tol, max_iter, seed, progress)
    samples = trace_samples or max(trace_products - eig["steps"], 2)
    if progress is not None:
        progress.total = eig["steps"] + samples
        progress.refresh()
    # the trace's own draws; a generator takes seeds below 2**64, and any seed may be given
    trace, stderr, used = hutchinson(hessian, samples, (seed + 1) % 2 ** 64, eig["basis"],
                                     eig["basis_trace"], trace_tol, progress=progress)
    return dict(eigenvalues=eig["values"], vectors=[hessian.unflat(v) for v in eig["vectors"]],
                trace=trace, trace_stderr=stderr, trace_samples=used, lanczos_steps=eig["steps"],
                converged=eig["converged"], residuals=eig["residuals"], products=hessian.products,
                forms=hessian.forms, passes=hessian.passes)


@torch.no_grad()
def mean_loss(model, batches, loss_fn=cross_entropy):
    total = sum(len(t) for _, t in batches)
    return sum(loss_fn(model, x, t).item() * len(t) / total for x, t in batches)


@torch.no_grad()
def loss_landscape(model, batches, directions, span=0.5, steps=21, loss_fn=cross_entropy,
                   progress=None):
    """loss at theta + a d1 + b d2 on a steps x steps grid of a, b in [-span, span]
    -> (coords, grid[a][b]); progress: a tqdm bar (or None), advanced by one per grid point"""
    params = list(trainable(model).values())
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
                if progress is not None:
                    progress.update(1)
            grid.append(row)
    finally:
        for p, t in zip(params, theta):
            p.copy_(t)
    return coords, grid
