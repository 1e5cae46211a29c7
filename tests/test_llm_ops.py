"""The LLM ops beyond the SFT loss (softxent.llm): per-token log-probs and entropy, distillation, on logits
and through linear heads, against the float64 oracle (softxent.reference) and torch's eager recipes, with
every combination of incoming gradients, ignored positions, temperature, scale, softcap, (B, S, D) inputs,
frozen heads, second derivatives, torch.func transforms, low precision and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, jacfwd, jacrev, vmap

import softxent
from helpers import assert_close, assert_no_worse, fresh_seed, to_numpy
from softxent import reference

TRANSFORMS = [
    dict(),
    dict(temperature=0.7, logit_scale=1.3),
    dict(temperature=1.4, logit_scale=0.8, softcap=3.0),
]


def _head(rng, shape, features, vocab, dtype=torch.float64, ignored=0.2, bias=True, scale=1.0):
    x = (torch.randn(*shape, features, generator=rng, dtype=dtype) * scale).requires_grad_()
    weight = (
        torch.randn(vocab, features, generator=rng, dtype=dtype) / features**0.5 * scale
    ).requires_grad_()
    b = torch.randn(vocab, generator=rng, dtype=dtype).requires_grad_() if bias else None
    target = torch.randint(0, vocab, shape, generator=rng)
    target[torch.rand(shape, generator=rng) < ignored] = -100
    return x, weight, b, target


def _logits(x, weight, b):
    logits = to_numpy(x) @ to_numpy(weight).T
    return logits if b is None else logits + to_numpy(b)


def _weights(rng, shape, which):
    g = torch.randn(shape, generator=rng, dtype=torch.float64)
    h = torch.randn(shape, generator=rng, dtype=torch.float64)
    return {"both": (g, h), "log_probs": (g, None), "entropy": (None, h)}[which]


def _loss(out, g, h):
    total = 0.0
    if g is not None:
        total = total + (out.log_probs * g).sum()
    if h is not None:
        total = total + (out.entropy * h).sum()
    return total


@pytest.mark.parametrize("options", TRANSFORMS)
@pytest.mark.parametrize("which", ["both", "log_probs", "entropy"])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_linear_log_probs_match_the_oracle(options, which, frozen, memory, impl, rng):
    """Values and gradients of every input for each combination of incoming gradients, on (B, S, D) input
    with ignored positions, in chunks of rows (speed) or vocabulary slices (lean) that do not divide them."""
    x, weight, b, target = _head(rng, (3, 41), 16, 97)
    if frozen:
        weight, b = weight.detach(), b.detach()
    out = softxent.linear_log_probs(
        x, weight, target, linear_bias=b, chunk_size=13, memory=memory, impl=impl, **options
    )
    logits = _logits(x, weight, b)
    expected = reference.log_probs(logits, to_numpy(target), **options)
    for name, got, want in zip(out._fields, out, expected, strict=True):
        assert got.shape == target.shape, name
        assert_close(got, want, 1e-10, name)
    assert out.is_top1.dtype == torch.bool
    g, h = _weights(rng, target.shape, which)
    inputs = (x,) if frozen else (x, weight, b)
    grads = torch.autograd.grad(_loss(out, g, h), inputs)
    grad_logits = reference.log_probs_grad(
        logits,
        to_numpy(target),
        None if g is None else to_numpy(g),
        None if h is None else to_numpy(h),
        **options,
    )
    assert_close(grads[0], grad_logits @ to_numpy(weight), 1e-10, "dX")
    if not frozen:
        rows = grad_logits.reshape(-1, weight.shape[0])
        assert_close(grads[1], rows.T @ to_numpy(x).reshape(-1, x.shape[-1]), 1e-10, "dW")
        assert_close(grads[2], rows.sum(0), 1e-10, "db")


@pytest.mark.parametrize("options", TRANSFORMS)
def test_log_probs_on_logits_match_the_oracle(options, impl, rng):
    logits = torch.randn(4, 7, 53, generator=rng, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 53, (4, 7), generator=rng)
    target[0, :3] = -100
    out = softxent.log_probs(logits, target, impl=impl, **options)
    expected = reference.log_probs(to_numpy(logits), to_numpy(target), **options)
    for name, got, want in zip(out._fields, out, expected, strict=True):
        assert_close(got, want, 1e-10, name)
    g, h = _weights(rng, target.shape, "both")
    (grad_logits,) = torch.autograd.grad(_loss(out, g, h), logits)
    assert_close(
        grad_logits,
        reference.log_probs_grad(to_numpy(logits), to_numpy(target), to_numpy(g), to_numpy(h), **options),
        1e-10,
        "grad",
    )


@given(
    rows=st.integers(1, 40),
    vocab=st.integers(1, 70),
    temperature=st.floats(0.2, 3.0),
    softcap=st.none() | st.floats(0.5, 30.0),
    magnitude=st.sampled_from([1.0, 30.0]),
)
def test_log_probs_fresh_inputs(rows, vocab, temperature, softcap, magnitude):
    generator = torch.Generator().manual_seed(fresh_seed())
    x, weight, b, target = _head(generator, (rows,), 8, vocab, scale=magnitude**0.5)
    options = dict(temperature=temperature, softcap=softcap)
    out = softxent.linear_log_probs(x, weight, target, linear_bias=b, chunk_size=7, **options)
    logits = _logits(x, weight, b)
    expected = reference.log_probs(logits, to_numpy(target), **options)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(getattr(out, name), getattr(expected, name), 1e-9, name)
    g, h = _weights(generator, target.shape, "both")
    dx, dw = torch.autograd.grad(_loss(out, g, h), (x, weight))
    grad_logits = reference.log_probs_grad(logits, to_numpy(target), to_numpy(g), to_numpy(h), **options)
    assert_close(dx, grad_logits @ to_numpy(weight), 1e-9, "dX")
    assert_close(dw, grad_logits.T @ to_numpy(x), 1e-9, "dW")


def test_log_probs_extreme_logits_masks_and_all_ignored(impl):
    """±1e4 logits, −inf masked classes (ŷ = 0 adds nothing to H) and a batch with every position ignored
    (zeros, zero gradients)."""
    logits = torch.tensor(
        [
            [1e4, -1e4, 0.0, 1e4 - 1.0],
            [0.0, float("-inf"), 2.0, float("-inf")],
            [-1e4, -1e4 + 3.0, -1e4, -1e4],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    target = torch.tensor([3, 2, 1])
    out = softxent.log_probs(logits, target, impl=impl)
    expected = reference.log_probs(to_numpy(logits), to_numpy(target))
    for name, got, want in zip(out._fields, out, expected, strict=True):
        assert_close(got, want, 1e-12, name)
    (grad_logits,) = torch.autograd.grad((out.log_probs + out.entropy).sum(), logits)
    want = reference.log_probs_grad(to_numpy(logits), to_numpy(target), np.ones(3), np.ones(3))
    assert_close(grad_logits, want, 1e-12, "grad")
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    ignored = torch.full((5,), -100)
    for memory in ("speed", "lean"):
        none = softxent.linear_log_probs(x, weight, ignored, memory=memory, impl=impl)
        assert all(bool((t == 0).all()) for t in none), memory
        dx, dw = torch.autograd.grad((none.log_probs + none.entropy).sum(), (x, weight))
        assert bool((dx == 0).all()), memory
        assert bool((dw == 0).all()), memory


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_low_precision_log_probs_no_worse_than_eager(dtype, memory, impl, rng):
    x, weight, _b, target = _head(rng, (67,), 64, 301, dtype=torch.float32, bias=False)
    x_low, w_low = x.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
    g, h = _weights(rng, target.shape, "both")
    chunk = 32 if memory == "speed" else 100  # rows a chunk, or classes a slice
    out = softxent.linear_log_probs(x_low, w_low, target, chunk_size=chunk, memory=memory, impl=impl)
    mine = torch.autograd.grad(_loss(out, g.float(), h.float()), (x_low, w_low))
    log_p = F.linear(x_low, w_low).float().log_softmax(-1)
    counted = target != -100
    eager_lp = torch.where(counted, log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    eager_h = torch.where(counted, -(log_p.exp() * log_p).sum(-1), 0.0)
    theirs = torch.autograd.grad((eager_lp * g.float()).sum() + (eager_h * h.float()).sum(), (x_low, w_low))
    x64, w64 = to_numpy(x_low), to_numpy(w_low)
    expected = reference.log_probs(x64 @ w64.T, to_numpy(target))
    assert_no_worse(out.log_probs, eager_lp, expected.log_probs, 1e-3, "log_probs")
    assert_no_worse(out.entropy, eager_h, expected.entropy, 1e-3, "entropy")
    grad_logits = reference.log_probs_grad(x64 @ w64.T, to_numpy(target), to_numpy(g), to_numpy(h))
    for name, ours, torchs, want in zip(
        ("dX", "dW"), mine, theirs, (grad_logits @ w64, grad_logits.T @ x64), strict=True
    ):
        scale = np.abs(want).max()
        assert_no_worse(ours / scale, torchs / scale, want / scale, 2.0**-8, name)


def test_frozen_head_forms_dx_in_the_forward_pass(rng):
    """Under a frozen head the gradient through log ŷ_y is a scale of the dX the forward pass formed: the
    backward runs no vocabulary-sized matmul (counted with torch's dispatch: no mm/addmm in backward)."""
    x, weight, _, target = _head(rng, (33,), 8, 50, bias=False)
    out = softxent.linear_log_probs(x, weight.detach(), target, chunk_size=8)
    loss = out.log_probs.sum() + 0 * out.entropy.detach().sum()
    with torch.profiler.profile() as profile:
        loss.backward()
    names = {event.name for event in profile.events()}
    assert not names & {"aten::mm", "aten::addmm"}, names
    expected = reference.log_probs_grad(
        _logits(x, weight.detach(), None), to_numpy(target), np.ones(33), None
    )
    assert_close(x.grad, expected @ to_numpy(weight), 1e-10, "dX")


def test_log_probs_second_derivatives_and_transforms(rng):
    x, weight, _, target = _head(rng, (6,), 5, 9, bias=False)

    for memory in ("speed", "lean"):

        def both(x, weight, memory=memory):
            out = softxent.linear_log_probs(
                x, weight, target, softcap=2.0, temperature=0.8, chunk_size=4, memory=memory
            )
            return out.log_probs, out.entropy

        assert gradcheck(both, (x, weight))
        assert gradgradcheck(both, (x, weight))
    logits = torch.randn(6, 9, generator=rng, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda z: softxent.log_probs(z, target).entropy, (logits,), check_forward_ad=True)
    plain = logits.detach()
    assert torch.allclose(
        jacfwd(lambda z: softxent.log_probs(z, target).entropy)(plain),
        jacrev(lambda z: softxent.log_probs(z, target).entropy)(plain),
    )
    # per-sample gradients: the batch folded into the rows (one call) equals a loop
    xs = torch.randn(3, 6, 5, generator=rng, dtype=torch.float64)
    ys = torch.randint(0, 9, (3, 6), generator=rng)
    w = weight.detach()
    per_sample = vmap(grad(lambda x, y: softxent.linear_log_probs(x, w, y).log_probs.sum()))(xs, ys)
    for sample in range(3):
        xi = xs[sample].clone().requires_grad_()
        (want,) = torch.autograd.grad(softxent.linear_log_probs(xi, w, ys[sample]).log_probs.sum(), xi)
        torch.testing.assert_close(per_sample[sample], want)
    # batched weights: one call per sample
    ws = torch.randn(2, 9, 5, generator=rng, dtype=torch.float64)
    values = vmap(lambda w: softxent.linear_log_probs(x.detach(), w, target).entropy)(ws)
    for sample in range(2):
        torch.testing.assert_close(
            values[sample], softxent.linear_log_probs(x.detach(), ws[sample], target).entropy
        )


def test_log_probs_retained_graph_runs_backward_twice(rng):
    x, weight, b, target = _head(rng, (10,), 4, 12)
    out = softxent.linear_log_probs(x, weight, target, linear_bias=b)
    loss = out.log_probs.sum() + out.entropy.sum()
    first = torch.autograd.grad(loss, (x, weight, b), retain_graph=True)
    second = torch.autograd.grad(loss, (x, weight, b))
    for a, c in zip(first, second, strict=True):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_log_probs_under_torch_compile(memory, rng):
    """One graph (fullgraph=True: the ops are custom ops, no graph break): an RL loss with an entropy bonus
    on (B, S, D) input, the top-1 hit logged; an entropy only logged (detached); values and gradients equal
    the eager op's."""
    x, weight, b, target = _head(rng, (2, 9), 8, 31, dtype=torch.float32)

    def rl_loss(x, weight, b, target):
        out = softxent.linear_log_probs(x, weight, target, linear_bias=b, temperature=0.9, memory=memory)
        return -(out.log_probs.sum() + 0.01 * out.entropy.sum()), out.is_top1.float().mean()

    def logged_entropy(logits, target):
        out = softxent.log_probs(logits, target, softcap=5.0)
        return out.log_probs.sum(), out.entropy.detach().mean()

    for fn, args in ((rl_loss, (x, weight, b, target)), (logged_entropy, (x @ weight.T, target))):
        compiled = torch.compile(fn, fullgraph=True)
        loss, logged = compiled(*args)
        differentiable = [a for a in args if a.requires_grad]
        grads = torch.autograd.grad(loss, differentiable)
        eager, eager_logged = fn(*args)
        want = torch.autograd.grad(eager, differentiable)
        torch.testing.assert_close(loss, eager)
        torch.testing.assert_close(logged, eager_logged)
        for a, c in zip(grads, want, strict=True):
            torch.testing.assert_close(a, c)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distillation_under_torch_compile(reduction, rng):
    """Both distillation ops in one graph each, the teacher without gradient (its weight requires grad, as
    a teacher model's parameters do, and gets none)."""
    xs, ws, _, target = _head(rng, (3, 7), 8, 29, dtype=torch.float32)
    xt = torch.randn(3, 7, 6, generator=rng)
    wt = torch.randn(29, 6, generator=rng, requires_grad=True)

    def kd(xs, ws, xt, wt, target):
        fused = softxent.linear_distillation_loss(
            xs,
            ws,
            xt,
            wt,
            divergence="jsd",
            beta=0.3,
            target=target,
            reduction=reduction,
            teacher_softcap=4.0,
        )
        on_logits = softxent.distillation_loss(
            xs @ ws.T, (xt @ wt.T).detach(), divergence="reverse_kl", target=target, reduction=reduction
        )
        return (fused + on_logits).sum()

    compiled = torch.compile(kd, fullgraph=True)
    loss = compiled(xs, ws, xt, wt, target)
    grads = torch.autograd.grad(loss, (xs, ws))
    eager = kd(xs, ws, xt, wt, target)
    want = torch.autograd.grad(eager, (xs, ws))
    torch.testing.assert_close(loss, eager)
    for a, c in zip(grads, want, strict=True):
        torch.testing.assert_close(a, c)


# ----------------------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------------------

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_distillation_matches_the_oracle(divergence, beta, reduction, impl, rng):
    """Student and teacher of different hidden sizes, each with its own scale and softcap, ignored
    positions, (B, S, D) inputs; the teacher gets no gradient."""
    xs, ws, bs, target = _head(rng, (2, 23), 8, 57)
    xt = torch.randn(2, 23, 12, generator=rng, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(57, 12, generator=rng, dtype=torch.float64, requires_grad=True)
    options = dict(
        divergence=divergence, beta=beta, temperature=0.8, reduction=reduction, student_logit_scale=1.2,
        student_softcap=4.0, teacher_softcap=3.0, target=target,
    )  # fmt: skip
    loss = softxent.linear_distillation_loss(
        xs, ws, xt, wt, student_bias=bs, chunk_size=7, impl=impl, **options
    )
    student, teacher = _logits(xs, ws, bs), _logits(xt, wt, None)
    ref_options = {**options, "target": to_numpy(target)}
    assert_close(
        loss, np.asarray(reference.distillation_loss(student, teacher, **ref_options)), 1e-10, "loss"
    )
    upstream = torch.randn(loss.shape, generator=rng, dtype=torch.float64)
    dx, dw, db = torch.autograd.grad(loss, (xs, ws, bs), upstream)
    grad_logits = reference.distillation_loss_grad(student, teacher, **ref_options)
    grad_logits = grad_logits * (to_numpy(upstream)[..., None] if reduction == "none" else upstream.item())
    assert_close(dx, grad_logits @ to_numpy(ws), 1e-10, "dX")
    rows = grad_logits.reshape(-1, 57)
    assert_close(dw, rows.T @ to_numpy(xs).reshape(-1, 8), 1e-10, "dW")
    assert_close(db, rows.sum(0), 1e-10, "db")
    assert xt.grad is None
    assert wt.grad is None
    on_logits = softxent.distillation_loss(
        torch.tensor(student, requires_grad=True), torch.tensor(teacher), impl=impl, **options
    )
    assert_close(on_logits, to_numpy(loss), 1e-12, "on logits")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_distillation_second_derivatives_and_forward_mode(divergence, rng):
    xs = torch.randn(5, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(9, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    xt, wt = (
        torch.randn(5, 3, generator=rng, dtype=torch.float64),
        torch.randn(9, 3, generator=rng, dtype=torch.float64),
    )
    for reduction in ("mean", "none"):

        def loss(a, b, reduction=reduction):
            return softxent.linear_distillation_loss(
                a, b, xt, wt, divergence=divergence, reduction=reduction, chunk_size=2
            )

        assert gradcheck(loss, (xs, ws), check_forward_ad=True)
        assert gradgradcheck(loss, (xs, ws))


def test_distillation_matches_eager_kl_and_low_precision(rng):
    student = torch.randn(64, 300, generator=rng)
    teacher = torch.randn(64, 300, generator=rng)
    for dtype in (torch.bfloat16, torch.float16):
        s = student.to(dtype).requires_grad_()
        ours = softxent.distillation_loss(s, teacher.to(dtype), temperature=2.0)
        (g_ours,) = torch.autograd.grad(ours, s)
        s2 = student.to(dtype).requires_grad_()
        eager = F.kl_div(
            (s2.float() / 2).log_softmax(-1),
            (teacher.to(dtype).float() / 2).log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
        (g_eager,) = torch.autograd.grad(eager, s2)
        z_s, z_t = to_numpy(s), to_numpy(teacher.to(dtype))
        expected = reference.distillation_loss_grad(z_s, z_t, temperature=2.0)
        assert_no_worse(
            ours, eager, np.asarray(reference.distillation_loss(z_s, z_t, temperature=2.0)), 1e-4, "loss"
        )
        scale = np.abs(expected).max()
        assert_no_worse(g_ours / scale, g_eager / scale, expected / scale, 2.0**-8, "grad")


def test_distillation_all_ignored_gives_torch_nan_and_zero_gradient(rng):
    xs = torch.randn(4, 3, generator=rng, requires_grad=True)
    ws = torch.randn(7, 3, generator=rng, requires_grad=True)
    xt, wt = torch.randn(4, 5, generator=rng), torch.randn(7, 5, generator=rng)
    loss = softxent.linear_distillation_loss(xs, ws, xt, wt, target=torch.full((4,), -100))
    assert torch.isnan(loss)
    loss.backward()
    assert bool((xs.grad == 0).all())
    assert bool((ws.grad == 0).all())


# ----------------------------------------------------------------------------------------------------------
# linear_cross_entropy(return_lse=True)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["speed", "lean"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_returns_lse(memory, reduction, impl, rng):
    x, weight, b, target = _head(rng, (37,), 6, 29)
    loss, lse = softxent.linear_cross_entropy(
        x, weight, target, linear_bias=b, reduction=reduction, memory=memory, softcap=5.0, chunk_size=8,
        return_lse=True, impl=impl,
    )  # fmt: skip
    logits = torch.tensor(_logits(x, weight, b))
    want_loss, want_lse = softxent.cross_entropy(
        logits, target, reduction=reduction, softcap=5.0, return_lse=True
    )
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(lse, want_lse)
    assert not lse.requires_grad
    alone = softxent.linear_cross_entropy(x[0], weight, target[0].clamp(min=0), return_lse=True, impl=impl)
    assert alone[1].shape == ()


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    x, w, y = torch.randn(4, 3), torch.randn(10, 3), torch.randint(0, 10, (4,))
    xt, wt = torch.randn(4, 5), torch.randn(10, 5)
    cases = [
        (
            lambda: softxent.linear_log_probs(x, w, y, temperature=0.0),
            ValueError,
            r"temperature: expected a finite float > 0, got 0.0",
        ),
        (
            lambda: softxent.linear_log_probs(x, w, y, temperature="1"),
            TypeError,
            r"temperature: expected a float",
        ),
        (
            lambda: softxent.linear_log_probs(x, w, y, softcap=-1.0),
            ValueError,
            r"softcap: expected None or a finite float > 0",
        ),
        (
            lambda: softxent.linear_log_probs(x, w, y, logit_scale=float("inf")),
            ValueError,
            r"logit_scale: expected a finite float",
        ),
        (
            lambda: softxent.linear_log_probs(x, w, y[:3]),
            ValueError,
            r"target: expected class indices of shape \(4,\)",
        ),
        (lambda: softxent.linear_log_probs(x, w, y.float()), TypeError, r"target: expected class indices"),
        (
            lambda: softxent.linear_log_probs(x, torch.randn(10, 4), y),
            ValueError,
            r"linear_weight: expected shape \(V, 3\)",
        ),
        (
            lambda: softxent.linear_log_probs(x, w.double(), y),
            TypeError,
            r"linear_weight: expected dtype torch.float32",
        ),
        (
            lambda: softxent.linear_log_probs(x, w, torch.full((4,), 10)),
            ValueError,
            r"target: expected class indices in \[0, 10\)",
        ),
        (
            lambda: softxent.log_probs(torch.randn(4, 10), y, ignore_index=1.5),
            TypeError,
            r"ignore_index: expected an int",
        ),
        (
            lambda: softxent.linear_distillation_loss(x, w, xt, torch.randn(11, 5)),
            ValueError,
            r"teacher_weight: expected the student's vocabulary of 10 classes",
        ),
        (
            lambda: softxent.linear_distillation_loss(x, w, xt, wt, beta=1.5, divergence="jsd"),
            ValueError,
            r"beta: expected a float in \[0, 1\], got 1.5",
        ),
        (
            lambda: softxent.linear_distillation_loss(x, w, xt, wt, divergence="kl"),
            ValueError,
            r"divergence: expected one of",
        ),
        (
            lambda: softxent.linear_distillation_loss(x, w, xt, wt, temperature=-1.0),
            ValueError,
            r"temperature: expected a finite float > 0",
        ),
        (
            lambda: softxent.linear_distillation_loss(x, w, xt[:3], wt),
            ValueError,
            r"teacher_input: expected the student input's leading shape \(4,\)",
        ),
        (
            lambda: softxent.linear_distillation_loss(x, w, xt, wt, teacher_softcap=0.0),
            ValueError,
            r"teacher_softcap: expected None or a finite float > 0",
        ),
        (
            lambda: softxent.distillation_loss(torch.randn(4, 10), torch.randn(4, 11)),
            ValueError,
            r"teacher_logits: expected the student's shape \(4, 10\)",
        ),
        (
            lambda: softxent.distillation_loss(torch.randn(4, 10), torch.randn(4, 10), target=torch.zeros(4)),
            TypeError,
            r"target: expected None or integer labels",
        ),
        (
            lambda: softxent.linear_distillation_loss(x, w, x, w, memory="lean"),
            ValueError,
            r"memory: expected 'speed' or 'auto' for linear_distillation_loss",
        ),
        (
            lambda: softxent.linear_log_probs(x, w, y, memory="light"),
            ValueError,
            r"memory: expected 'speed', 'lean' or 'auto', got 'light'",
        ),
        (
            lambda: softxent.linear_cross_entropy(x, w, y, return_lse=1),
            TypeError,
            r"return_lse: expected a bool",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_public_surface():
    for name in (
        "LogProbs",
        "log_probs",
        "linear_log_probs",
        "distillation_loss",
        "linear_distillation_loss",
    ):
        assert name in dir(softxent)
        assert name in softxent.__all__
    assert list(softxent.LogProbs._fields) == [
        "log_probs",
        "entropy",
        "is_top1",
        "log_sum_sq_probs",
        "mean_logits",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llm_ops_on_cuda(dtype):
    """The ops on CUDA tensors (impl="auto": the GPU policy's chunks) against the float64 oracle: float32
    within 1e-5, bfloat16 no worse than eager bfloat16 plus its rounding."""
    generator = torch.Generator().manual_seed(fresh_seed())
    x, weight, _, target = _head(generator, (4, 300), 256, 32000, dtype=torch.float32, bias=False)
    xc = x.detach().to("cuda", dtype).requires_grad_()
    wc = weight.detach().to("cuda", dtype).requires_grad_()
    yc = target.cuda()
    out = softxent.linear_log_probs(xc, wc, yc, temperature=0.9, softcap=30.0)
    (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
    x64, w64 = to_numpy(xc), to_numpy(wc)
    expected = reference.log_probs(x64 @ w64.T, to_numpy(yc), temperature=0.9, softcap=30.0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out.log_probs, expected.log_probs, tol, "log_probs")
    assert_close(out.entropy, expected.entropy, tol, "entropy")
    shape = yc.shape
    grad_logits = reference.log_probs_grad(
        x64 @ w64.T, to_numpy(yc), np.ones(shape), np.full(shape, 0.1), temperature=0.9, softcap=30.0
    )
    want = grad_logits @ w64
    assert_close(
        xc.grad.double().cpu().numpy() / np.abs(want).max(), want / np.abs(want).max(), tol * 10, "dX"
    )
    teacher = torch.randn(4, 300, 128, device="cuda", dtype=dtype)
    teacher_w = torch.randn(32000, 128, device="cuda", dtype=dtype) / 128**0.5
    loss = softxent.linear_distillation_loss(xc, wc, teacher, teacher_w, divergence="jsd", target=yc)
    want_loss = reference.distillation_loss(
        x64 @ w64.T, to_numpy(teacher) @ to_numpy(teacher_w).T, divergence="jsd", target=to_numpy(yc)
    )
    assert_close(loss, np.asarray(want_loss), tol, "jsd")
