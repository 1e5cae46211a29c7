"""Beyond one backward: torch.func (grad, vmap, vmap(grad) per-sample gradients, jacrev, jvp, jacfwd,
hessian), retained graphs (gradcheck, jacobian, backward twice) and forward-mode AD, every op and memory
mode, each against the same transform of torch's own losses in float64.

Every case runs the real op (no part of softxent replaced); the torch side composes torch.nn.functional."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import softxent
from helpers import assert_close, to_numpy

REDUCTIONS = ["mean", "sum", "none"]


def _torch_cross_entropy(z, target, *, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction):
    """torch's cross-entropy with PaLM's z-loss and Gemma's softcap, as softxent defines them, composed of
    torch.nn.functional (logits (N, C), class indices or probabilities)."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    per_row = F.cross_entropy(z, target, weight=weight, label_smoothing=label_smoothing, reduction="none")
    probabilities = target.is_floating_point()
    counted = torch.ones_like(per_row, dtype=torch.bool) if probabilities else target != -100
    if z_loss:
        per_row = per_row + torch.where(counted, z_loss * torch.logsumexp(z, 1) ** 2, 0.0)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if probabilities or weight is None:
        return per_row.sum() / counted.sum()
    return per_row.sum() / torch.where(counted, weight[torch.where(counted, target, 0)], 0.0).sum()


@dataclass
class Case:
    """A loss of differentiable ``params`` and per-batch ``data``: ``ours`` with softxent, ``theirs``
    with torch. ``draw(generator)`` gives fresh (params, data)."""

    ours: Callable[..., torch.Tensor]
    theirs: Callable[..., torch.Tensor]
    draw: Callable[[torch.Generator], tuple[tuple, tuple]]


def _f64(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _class_target(generator, rows, classes):
    target = torch.randint(0, classes, (rows,), generator=generator)
    target[1] = -100
    return target


ROWS, CLASSES, FEATURES = 5, 7, 4
WEIGHT = torch.linspace(0.5, 2.0, CLASSES, dtype=torch.float64)


def _cases(reduction: str, impl: str) -> dict[str, Case]:
    def logits_draw(probabilities):
        def draw(g):
            if probabilities:
                target = torch.softmax(_f64(g, ROWS, CLASSES), 1)
            else:
                target = _class_target(g, ROWS, CLASSES)
            return (_f64(g, ROWS, CLASSES),), (target,)

        return draw

    def head_draw(probabilities, sigmoid=False):
        def draw(g):
            if sigmoid:
                target = (torch.rand(ROWS, CLASSES, generator=g, dtype=torch.float64) > 0.5).double()
            elif probabilities:
                target = torch.softmax(_f64(g, ROWS, CLASSES), 1)
            else:
                target = _class_target(g, ROWS, CLASSES)
            params = (_f64(g, ROWS, FEATURES), _f64(g, CLASSES, FEATURES, scale=0.5), _f64(g, CLASSES))
            return params, (target,)

        return draw

    options = dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)

    def linear_ours(memory, **kwargs):
        def ours(x, w, b, target):
            return softxent.linear_cross_entropy(
                x, w, target, linear_bias=b, reduction=reduction, memory=memory, chunk_size=3, impl=impl,
                **kwargs,
            )  # fmt: skip

        return ours

    def linear_theirs(**kwargs):
        def theirs(x, w, b, target):
            return _torch_cross_entropy(F.linear(x, w, b), target, reduction=reduction, **kwargs)

        return theirs

    def bce_linear_ours(memory):
        def ours(x, w, b, target):
            return softxent.linear_binary_cross_entropy(
                x, w, target, linear_bias=b, reduction=reduction, memory=memory, chunk_size=3, impl=impl
            )

        return ours

    def bce_linear_theirs(x, w, b, target):
        return F.binary_cross_entropy_with_logits(F.linear(x, w, b), target, reduction=reduction)

    cases = {
        "cross_entropy": Case(
            lambda z, t: softxent.cross_entropy(
                z, t, weight=WEIGHT, reduction=reduction, impl=impl, **options
            ),
            lambda z, t: _torch_cross_entropy(z, t, weight=WEIGHT, reduction=reduction, **options),
            logits_draw(False),
        ),
        "cross_entropy_probabilities": Case(
            lambda z, t: softxent.cross_entropy(z, t, reduction=reduction, impl=impl, **options),
            lambda z, t: _torch_cross_entropy(z, t, reduction=reduction, **options),
            logits_draw(True),
        ),
        "binary_cross_entropy_with_logits": Case(
            lambda z, t: softxent.binary_cross_entropy_with_logits(
                z, t, pos_weight=WEIGHT, reduction=reduction, impl=impl
            ),
            lambda z, t: F.binary_cross_entropy_with_logits(z, t, pos_weight=WEIGHT, reduction=reduction),
            lambda g: (
                (_f64(g, ROWS, CLASSES),),
                (torch.rand(ROWS, CLASSES, generator=g, dtype=torch.float64),),
            ),
        ),
        "linear_cross_entropy": Case(
            linear_ours("speed", weight=WEIGHT, **options),
            linear_theirs(weight=WEIGHT, **options),
            head_draw(False),
        ),
        "linear_cross_entropy_probabilities": Case(
            linear_ours("speed", label_smoothing=0.1), linear_theirs(label_smoothing=0.1), head_draw(True)
        ),
        "linear_cross_entropy_lean": Case(
            linear_ours("lean", weight=WEIGHT, **options),
            linear_theirs(weight=WEIGHT, **options),
            head_draw(False),
        ),
        "linear_binary_cross_entropy": Case(
            bce_linear_ours("speed"), bce_linear_theirs, head_draw(False, True)
        ),
        "linear_binary_cross_entropy_lean": Case(
            bce_linear_ours("lean"), bce_linear_theirs, head_draw(False, True)
        ),
    }
    return cases


CASE_NAMES = sorted(_cases("mean", "torch"))


def _scalar(fn: Callable[..., torch.Tensor], upstream: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    """fn reduced to a scalar: itself for "mean"/"sum", Σ upstream·loss for "none"."""
    if upstream is None:
        return fn
    return lambda *args: (fn(*args) * upstream).sum()


def _close(mine, theirs, what, tol=1e-10):
    if isinstance(theirs, tuple | list):
        assert len(mine) == len(theirs), what
        for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            _close(a, b, f"{what}[{index}]", tol)
        return
    assert_close(mine, to_numpy(theirs), tol, what)


def _upstream(reduction, generator, shape):
    return None if reduction != "none" else torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5


def _in(dtype: torch.dtype, spec: Case) -> Case:
    """``spec`` with softxent's side on ``dtype`` inputs and torch's on the same values in float64 (the
    float32 cases run the Triton kernels, which take float64 inputs to the torch ops)."""
    if dtype == torch.float64:
        return spec

    def rounded(*args):
        return tuple(a.to(dtype).double() if a.is_floating_point() else a for a in args)

    def draw(generator):
        params, data = spec.draw(generator)
        return rounded(*params), rounded(*data)

    def ours(*args):
        return spec.ours(*(a.to(dtype) if a.is_floating_point() else a for a in args)).double()

    return Case(ours, spec.theirs, draw)


TOLERANCES = {torch.float64: 1e-10, torch.float32: 3e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_grad_vmap_jacrev_jvp(case, reduction, dtype, impl, rng):
    spec = _in(dtype, _cases(reduction, impl)[case])
    tol = TOLERANCES[dtype]
    params, data = spec.draw(rng)
    argnums = tuple(range(len(params)))
    loss_shape = spec.theirs(*params, *data).shape
    upstream = _upstream(reduction, rng, loss_shape)
    ours, theirs = _scalar(spec.ours, upstream), _scalar(spec.theirs, upstream)

    _close(grad(ours, argnums)(*params, *data), grad(theirs, argnums)(*params, *data), "grad", tol)
    _close(
        jacrev(spec.ours, argnums)(*params, *data),
        jacrev(spec.theirs, argnums)(*params, *data),
        "jacrev",
        tol,
    )
    tangents = tuple(torch.randn(p.shape, generator=rng, dtype=torch.float64) for p in params)

    def primal_ours(*p):
        return spec.ours(*p, *data)

    def primal_theirs(*p):
        return spec.theirs(*p, *data)

    mine = jvp(primal_ours, params, tangents)
    expected = jvp(primal_theirs, params, tangents)
    _close(mine, expected, "jvp (primal, tangent)", tol)
    _close(
        jacfwd(spec.ours, argnums)(*params, *data),
        jacfwd(spec.theirs, argnums)(*params, *data),
        "jacfwd",
        tol,
    )
    _, vjp_ours = vjp(primal_ours, *params)
    _, vjp_theirs = vjp(primal_theirs, *params)
    cotangent = torch.ones(loss_shape, dtype=torch.float64) if upstream is None else upstream
    _close(vjp_ours(cotangent), vjp_theirs(cotangent), "vjp", tol)

    # vmap over a batch of three independent calls, every tensor batched; torch's own losses are not
    # vmappable in every case (class weights with batched targets), so the reference is one call a sample
    draws = [spec.draw(rng) for _ in range(3)]
    batched = [torch.stack(parts) for parts in zip(*(p + d for p, d in draws), strict=True)]
    expected = torch.stack([spec.theirs(*p, *d) for p, d in draws])
    _close(vmap(spec.ours)(*batched), expected, "vmap", tol)
    # and with the parameters shared (None in in_dims), the data batched
    in_dims = (None,) * len(params) + (0,) * len(data)
    shared = (*params, *batched[len(params) :])
    expected = torch.stack([spec.theirs(*params, *d) for _, d in draws])
    _close(vmap(spec.ours, in_dims)(*shared), expected, "vmap, shared params", tol)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_per_sample_gradients(case, impl, rng):
    """vmap(grad(loss of one sample)): the gradient of each sample's loss (Opacus-style DP training,
    influence functions), the parameters shared and one row per sample."""
    spec = _cases("mean", impl)[case]
    params, data = spec.draw(rng)
    logits_op = len(params) == 1

    def one_sample(op):
        def loss(*args):
            *p, sample = args
            if logits_op:
                return op(p[0].unsqueeze(0), sample.unsqueeze(0))
            x, w, b = p
            return op(x.unsqueeze(0), w, b, sample.unsqueeze(0))

        return loss

    rows = data[0].shape[0]
    keep = data[0] != -100 if not data[0].is_floating_point() else torch.ones(rows, dtype=torch.bool)
    target = data[0][keep]  # an all-ignored sample has a nan mean loss, as in torch
    if logits_op:
        args, in_dims, argnums = (params[0][keep], target), (0, 0), 0
    else:
        x, w, b = params
        args, in_dims, argnums = (x[keep], w, b, target), (0, None, None, 0), (0, 1, 2)
    mine = vmap(grad(one_sample(spec.ours), argnums), in_dims)(*args)
    expected = vmap(grad(one_sample(spec.theirs), argnums), in_dims)(*args)
    _close(mine, expected, "per-sample gradients")


def test_per_sample_gradients_of_a_model_with_functional_call(impl, rng):
    """The user's way: a module's parameters through torch.func.functional_call, per-sample gradients by
    vmap(grad(...)), the loss softxent's, against the same with torch's loss."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).double()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x = torch.randn(9, 6, generator=rng, dtype=torch.float64)
    y = torch.randint(0, 5, (9,), generator=rng)

    def per_sample(loss_fn):
        def loss(params, sample, label):
            logits = functional_call(model, params, (sample.unsqueeze(0),))
            return loss_fn(logits, label.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    mine = per_sample(lambda z, t: softxent.cross_entropy(z, t, label_smoothing=0.1, impl=impl))
    expected = per_sample(lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1))
    for name in params:
        _close(mine[name], expected[name], name)


@pytest.mark.parametrize("case", ["cross_entropy", "linear_cross_entropy", "linear_cross_entropy_lean"])
def test_second_order_transforms(case, impl, rng):
    """hessian (forward over reverse), reverse over reverse, grad of grad and jvp of grad: each needs the
    gradient itself differentiated, which softxent's backward then computes with a graph."""
    spec = _cases("mean", impl)[case]
    params, data = spec.draw(rng)
    first = params[0]

    def ours(p):
        return spec.ours(p, *params[1:], *data)

    def theirs(p):
        return spec.theirs(p, *params[1:], *data)

    _close(hessian(ours)(first), hessian(theirs)(first), "hessian")
    _close(jacrev(jacrev(ours))(first), jacrev(jacrev(theirs))(first), "jacrev(jacrev)")
    _close(
        grad(lambda p: grad(ours)(p).pow(2).sum())(first),
        grad(lambda p: grad(theirs)(p).pow(2).sum())(first),
        "grad(grad)",
    )
    direction = torch.randn(first.shape, generator=rng, dtype=torch.float64)
    _close(jvp(grad(ours), (first,), (direction,)), jvp(grad(theirs), (first,), (direction,)), "jvp(grad)")
    # plain autograd over torch.func.grad
    leaf = first.clone().requires_grad_()
    mine = torch.autograd.grad(grad(ours)(leaf).pow(2).sum(), leaf)
    reference = first.clone().requires_grad_()
    expected = torch.autograd.grad(grad(theirs)(reference).pow(2).sum(), reference)
    _close(mine, expected, "autograd over torch.func.grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_retained_graph_gradcheck_and_jacobian(case, reduction, impl, rng):
    """gradcheck and torch.autograd.functional.jacobian backpropagate through one graph many times
    (retain_graph=True): each backward finds the saved gradient as forward left it."""
    spec = _cases(reduction, impl)[case]
    params, data = spec.draw(rng)
    leaves = tuple(p.clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(lambda *p: spec.ours(*p, *data), leaves)
    mine = torch.autograd.functional.jacobian(lambda *p: spec.ours(*p, *data), params)
    expected = torch.autograd.functional.jacobian(lambda *p: spec.theirs(*p, *data), params)
    _close(mine, expected, "jacobian")
    # backward twice through a retained graph, with different incoming gradients
    loss = spec.ours(*leaves, *data)
    upstream = torch.rand(loss.shape, generator=rng, dtype=torch.float64) + 0.5
    first = torch.autograd.grad(loss, leaves, 2 * upstream, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, upstream)
    reference = tuple(p.clone().requires_grad_() for p in params)
    expected = torch.autograd.grad(spec.theirs(*reference, *data), reference, upstream)
    _close(first, tuple(2 * e for e in expected), "first backward")
    _close(second, expected, "second backward")


@pytest.mark.parametrize("case", CASE_NAMES)
def test_forward_mode_ad_with_dual_tensors(case, impl, rng):
    spec = _cases("none", impl)[case]
    params, data = spec.draw(rng)
    tangents = tuple(torch.randn(p.shape, generator=rng, dtype=torch.float64) for p in params)
    with fwAD.dual_level():
        duals = tuple(fwAD.make_dual(p, t) for p, t in zip(params, tangents, strict=True))
        mine = fwAD.unpack_dual(spec.ours(*duals, *data)).tangent
    expected = jvp(lambda *p: spec.theirs(*p, *data), params, tangents)[1]
    _close(mine, expected, "tangent")


def test_in_place_scaling_only_where_the_graph_is_freed(rng):
    """Backward scales the gradient forward saved in place (no second buffer of the logits' size) exactly
    when autograd frees the graph after it; with retain_graph=True it makes a new tensor and leaves the
    saved one as it was. The saved gradient: the tensor of the logits' shape the loss's node holds beside
    the logits themselves."""
    logits = torch.randn(6, 11, generator=rng, requires_grad=True)
    hidden = logits * 1.0
    target = torch.randint(0, 11, (6,), generator=rng)

    def saved_gradient(loss):
        (saved,) = [
            t
            for t in loss.grad_fn.saved_tensors
            if t is not None and t.shape == logits.shape and t.data_ptr() != hidden.data_ptr()
        ]
        return saved

    loss = softxent.cross_entropy(hidden, target, impl="torch")
    saved = saved_gradient(loss)
    before = saved.clone()
    grad_hidden = torch.autograd.grad(3.0 * loss, hidden, retain_graph=True)[0]
    assert grad_hidden.data_ptr() != saved.data_ptr()
    assert torch.equal(saved, before)
    grad_again = torch.autograd.grad(3.0 * loss, hidden)[0]  # the graph is freed: scaled where it lies
    assert grad_again.data_ptr() == saved.data_ptr()
    torch.testing.assert_close(grad_again, grad_hidden)


@pytest.mark.parametrize("kind", ["index", "probabilities"])
def test_vmap_over_class_weights_and_other_batch_dimensions(kind, impl, rng):
    """Batched class weights (one set per sample: the loss then runs once per sample) and a batch
    dimension that is not the first (in_dims=1), for the folded row loss and the per-sample one."""
    batch = 3
    logits = torch.randn(ROWS, batch, CLASSES, generator=rng, dtype=torch.float64)  # batch on dim 1
    if kind == "index":
        target = torch.randint(0, CLASSES, (batch, ROWS), generator=rng)
    else:
        target = torch.softmax(torch.randn(batch, ROWS, CLASSES, generator=rng, dtype=torch.float64), -1)
    weights = torch.rand(batch, CLASSES, generator=rng, dtype=torch.float64) + 0.5

    def ours(z, t, w):
        return softxent.cross_entropy(z, t, weight=w, label_smoothing=0.1, impl=impl)

    def theirs(z, t, w):
        return F.cross_entropy(z, t, weight=w, label_smoothing=0.1)

    mine = vmap(ours, in_dims=(1, 0, 0))(logits, target, weights)
    expected = torch.stack([theirs(logits[:, b], target[b], weights[b]) for b in range(batch)])
    _close(mine, expected, "batched weights")
    mine = vmap(grad(ours), in_dims=(1, 0, None))(logits, target, WEIGHT)
    expected = torch.stack([torch.func.grad(theirs)(logits[:, b], target[b], WEIGHT) for b in range(batch)])
    _close(mine, expected, "grad, batch on dim 1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton kernels on a GPU)")
@pytest.mark.parametrize("case", CASE_NAMES)
def test_transforms_and_compile_on_cuda_with_the_triton_kernels(case):
    """The same transforms on CUDA tensors in float32 (the Triton kernels compiled for the GPU), and the op
    compiled with dynamic=True over two batch sizes, against torch's losses in float64."""
    spec = _in(torch.float32, _cases("mean", "triton")[case])
    generator = torch.Generator().manual_seed(0)

    def on_cuda(tensors):
        return tuple(t.cuda() for t in tensors)

    params, data = (on_cuda(part) for part in spec.draw(generator))
    argnums = tuple(range(len(params)))
    tol = TOLERANCES[torch.float32]
    _close(grad(spec.ours, argnums)(*params, *data), grad(spec.theirs, argnums)(*params, *data), "grad", tol)
    tangents = tuple(torch.ones_like(p) for p in params)
    _close(
        jvp(lambda *p: spec.ours(*p, *data), params, tangents),
        jvp(lambda *p: spec.theirs(*p, *data), params, tangents),
        "jvp",
        tol,
    )
    draws = [tuple(on_cuda(p) + on_cuda(d)) for p, d in (spec.draw(generator) for _ in range(3))]
    batched = [torch.stack(parts) for parts in zip(*draws, strict=True)]
    _close(vmap(spec.ours)(*batched), torch.stack([spec.theirs(*d) for d in draws]), "vmap", tol)
    # aot_eager traces as inductor does (dynamo, then AOT autograd) without inductor's minutes of codegen,
    # which the GPU run's time box has no room for
    compiled = torch.compile(spec.ours, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (ROWS, ROWS + 4):
        generator_rows = torch.Generator().manual_seed(rows)
        params, data = (on_cuda(part) for part in spec.draw(generator_rows))
        params = tuple(torch.cat([p, p[:4]]) if p.shape[0] == ROWS and rows > ROWS else p for p in params)
        data = tuple(torch.cat([d, d[:4]]) if rows > ROWS else d for d in data)
        _close(compiled(*params, *data), spec.theirs(*params, *data), f"compiled, {rows} rows", tol)
