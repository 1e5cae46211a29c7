"""The chunked linear heads against torch (F.linear_cross_entropy, F.linear + BCE) and the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softxent
from helpers import (
    assert_close,
    assert_no_worse,
    eager_linear_cross_entropy,
    gradient_slack,
    to_numpy,
)
from softxent import reference


def _grads(loss: torch.Tensor, params: list[torch.Tensor], random_upstream: bool = True):
    upstream = torch.ones_like(loss)
    if random_upstream:
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=loss.dtype)
    return torch.autograd.grad(loss, params, upstream)


def _problem(n, d, c, rng, dtype=torch.float64, out_features=(), bias=True, ignore_every=4):
    x = torch.randn(n, d, generator=rng, dtype=torch.float64).to(dtype).requires_grad_()
    w = (
        (torch.randn(c, *out_features, d, generator=rng, dtype=torch.float64) / d**0.5)
        .to(dtype)
        .requires_grad_()
    )
    b = (
        torch.randn(c, *out_features, generator=rng, dtype=torch.float64).to(dtype).requires_grad_()
        if bias
        else None
    )
    target = torch.randint(0, c, (n, *out_features), generator=rng)
    if ignore_every:
        target[::ignore_every] = -100
    return x, w, b, target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("out_features", [(), (3,)], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_torch_float64(reduction, out_features, chunk_size, bias, impl, rng):
    x, w, b, target = _problem(37, 65, 103, rng, out_features=out_features, bias=bias)
    weight = torch.rand(103, generator=rng, dtype=torch.float64) + 0.1
    kwargs = dict(linear_bias=b, weight=weight, reduction=reduction, label_smoothing=0.1)
    ours = softxent.linear_cross_entropy(x, w, target, chunk_size=chunk_size, impl=impl, **kwargs)
    theirs = eager_linear_cross_entropy(x, w, target, **kwargs)
    params = [x, w] + ([b] if bias else [])
    assert_close(ours, to_numpy(theirs), 1e-12, "loss")
    for name, g_ours, g_theirs in zip(
        ["dX", "dW", "db"], _grads(ours, params), _grads(theirs, params), strict=False
    ):
        assert_close(g_ours, to_numpy(g_theirs), 1e-11, name)


@given(
    n=st.integers(1, 40),
    d=st.integers(1, 70),
    c=st.integers(2, 200),
    seed=st.integers(0, 2**32 - 1),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.2]),
    z_loss=st.sampled_from([0.0, 0.01]),
    softcap=st.sampled_from([None, 5.0]),
    weighted=st.booleans(),
    chunk_size=st.sampled_from([None, 1, 5, 64]),
)
def test_linear_cross_entropy_matches_reference(
    n, d, c, seed, reduction, label_smoothing, z_loss, softcap, weighted, chunk_size
):
    rng = torch.Generator().manual_seed(seed)
    x, w, b, target = _problem(n, d, c, rng, ignore_every=3)
    weight = torch.rand(c, generator=rng, dtype=torch.float64) + 0.1 if weighted else None
    ours = softxent.linear_cross_entropy(
        x,
        w,
        target,
        linear_bias=b,
        weight=weight,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    dx, dw, db = _grads(ours, [x, w, b], random_upstream=False)
    loss, ref_dx, ref_dw, ref_db = reference.linear_cross_entropy(
        to_numpy(x),
        to_numpy(w),
        target.numpy(),
        to_numpy(b),
        weight=None if weight is None else weight.numpy(),
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    assert_close(ours, np.asarray(loss), 1e-10, "loss")
    assert_close(dx, ref_dx, 1e-10, "dX")
    assert_close(dw, ref_dw, 1e-10, "dW")
    assert_close(db, ref_db, 1e-10, "db")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_linear_low_precision_no_worse_than_eager(dtype, impl, rng):
    x, w, b, target = _problem(173, 96, 1031, rng, dtype=dtype)
    ours = softxent.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=64, impl=impl)
    eager = F.cross_entropy(F.linear(x, w, b).float(), target)
    ours_grads = _grads(ours, [x, w, b], random_upstream=False)
    eager_grads = _grads(eager, [x, w, b], random_upstream=False)
    loss, *ref_grads = reference.linear_cross_entropy(to_numpy(x), to_numpy(w), target.numpy(), to_numpy(b))
    assert ours.dtype == torch.float32
    assert_no_worse(ours, eager, np.asarray(loss), 1e-6, "loss")
    for name, mine, theirs, expected in zip(
        ["dX", "dW", "db"], ours_grads, eager_grads, ref_grads, strict=True
    ):
        assert mine.dtype == dtype
        size = float(np.abs(expected).max())
        assert_no_worse(
            mine.double() / size, theirs.double() / size, expected / size, gradient_slack(dtype), name
        )


def test_probability_targets_and_their_gradient(impl, rng):
    x, w, b, _ = _problem(19, 23, 31, rng)
    target = torch.softmax(torch.randn(19, 31, generator=rng, dtype=torch.float64), 1).requires_grad_()
    ours = softxent.linear_cross_entropy(
        x, w, target, linear_bias=b, label_smoothing=0.1, chunk_size=4, impl=impl
    )
    theirs = eager_linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1)
    assert_close(ours, to_numpy(theirs), 1e-12, "loss")
    for g_ours, g_theirs in zip(
        _grads(ours, [x, w, b, target]), _grads(theirs, [x, w, b, target]), strict=True
    ):
        assert_close(g_ours, to_numpy(g_theirs), 1e-11, "grad")


def test_gradcheck_float64(impl, rng):
    x, w, b, target = _problem(11, 5, 13, rng)
    probabilities = torch.softmax(torch.randn(11, 13, generator=rng, dtype=torch.float64), 1).requires_grad_()

    def class_loss(x_, w_, b_):
        return softxent.linear_cross_entropy(
            x_,
            w_,
            target,
            linear_bias=b_,
            label_smoothing=0.1,
            z_loss=0.01,
            softcap=4.0,
            chunk_size=3,
            impl=impl,
        )

    def probability_loss(x_, w_, p_):
        return softxent.linear_cross_entropy(x_, w_, p_, reduction="sum", chunk_size=4, impl=impl)

    def sigmoid_loss(x_, w_, b_, memory="speed"):
        return softxent.linear_binary_cross_entropy(
            x_,
            w_,
            probabilities.detach(),
            linear_bias=b_,
            pos_weight=torch.full((13,), 2.0, dtype=torch.float64),
            chunk_size=4,
            memory=memory,
            impl=impl,
        )

    assert torch.autograd.gradcheck(class_loss, (x, w, b))
    assert torch.autograd.gradcheck(probability_loss, (x, w, probabilities))
    assert torch.autograd.gradcheck(sigmoid_loss, (x, w, b))
    assert torch.autograd.gradcheck(lambda *args: sigmoid_loss(*args, memory="lean"), (x, w, b))


def test_only_needed_gradients_and_no_grad(impl, rng):
    x, w, b, target = _problem(16, 8, 21, rng)
    frozen_w = w.detach()
    loss = softxent.linear_cross_entropy(x, frozen_w, target, linear_bias=b, impl=impl)
    dx, db = torch.autograd.grad(loss, [x, b])
    expected = eager_linear_cross_entropy(x, frozen_w, target, linear_bias=b)
    for mine, theirs in zip((dx, db), torch.autograd.grad(expected, [x, b]), strict=True):
        assert_close(mine, to_numpy(theirs), 1e-12, "grad with frozen weight")
    with torch.no_grad():
        plain = softxent.linear_cross_entropy(x, w, target, linear_bias=b, impl=impl)
    assert not plain.requires_grad
    assert_close(plain, to_numpy(expected.detach()), 1e-12, "no_grad loss")


def test_all_ignored_unbatched_and_empty(impl, rng):
    x, w, b, _ = _problem(6, 4, 9, rng)
    all_ignored = torch.full((6,), -100)
    for reduction in ("mean", "sum", "none"):
        ours = softxent.linear_cross_entropy(x, w, all_ignored, linear_bias=b, reduction=reduction, impl=impl)
        theirs = eager_linear_cross_entropy(x, w, all_ignored, linear_bias=b, reduction=reduction)
        assert_close(ours, to_numpy(theirs), 0.0, f"all ignored, {reduction}")
        for mine, ref in zip(_grads(ours, [x, w, b]), _grads(theirs, [x, w, b]), strict=True):
            assert torch.equal(mine, ref)
    single = softxent.linear_cross_entropy(
        x[0], w, torch.tensor(3), linear_bias=b, reduction="none", impl=impl
    )
    assert single.shape == ()
    assert_close(
        single,
        to_numpy(eager_linear_cross_entropy(x[0], w, torch.tensor(3), linear_bias=b, reduction="none")),
        1e-12,
        "unbatched",
    )
    empty = softxent.linear_cross_entropy(x[:0], w, torch.zeros(0, dtype=torch.long), impl=impl)
    assert torch.isnan(empty)


@pytest.mark.parametrize("memory", ["speed", "lean"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_binary_cross_entropy_equals_torch(reduction, memory, impl, rng):
    x, w, b, _ = _problem(29, 17, 41, rng)
    target = torch.randint(0, 2, (29, 41), generator=rng).double().requires_grad_()
    weight = torch.rand(29, 1, generator=rng, dtype=torch.float64)
    pos_weight = torch.rand(41, generator=rng, dtype=torch.float64) * 3
    kwargs = dict(weight=weight, pos_weight=pos_weight, reduction=reduction)
    # speed: five chunks of 6 rows; lean: five slices of 9 classes
    chunk_size = 6 if memory == "speed" else 9
    ours = softxent.linear_binary_cross_entropy(
        x, w, target, linear_bias=b, chunk_size=chunk_size, memory=memory, impl=impl, **kwargs
    )
    theirs = F.binary_cross_entropy_with_logits(F.linear(x, w, b), target, **kwargs)
    assert_close(ours, to_numpy(theirs), 1e-12, "loss")
    params = [x, w, b, target]
    for name, mine, ref in zip(
        ["dX", "dW", "db", "dy"], _grads(ours, params), _grads(theirs, params), strict=True
    ):
        assert_close(mine, to_numpy(ref), 1e-11, name)


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_linear_binary_cross_entropy_matches_reference(memory, impl, rng):
    x, w, b, _ = _problem(33, 12, 7, rng)
    target = torch.rand(33, 7, generator=rng, dtype=torch.float64)
    pos_weight = torch.rand(7, generator=rng, dtype=torch.float64) + 0.5
    loss = softxent.linear_binary_cross_entropy(
        x, w, target, linear_bias=b, pos_weight=pos_weight, memory=memory, chunk_size=3, impl=impl
    )
    dx, dw, db = _grads(loss, [x, w, b], random_upstream=False)
    logits = to_numpy(x) @ to_numpy(w).T + to_numpy(b)
    expected = reference.sigmoid_binary_cross_entropy(logits, target.numpy(), pos_weight=pos_weight.numpy())
    grad_logits = reference.sigmoid_binary_cross_entropy_grad(
        logits, target.numpy(), pos_weight=pos_weight.numpy()
    )
    assert_close(loss, np.asarray(expected), 1e-12, "loss")
    assert_close(dx, grad_logits @ to_numpy(w), 1e-11, "dX")
    assert_close(dw, grad_logits.T @ to_numpy(x), 1e-11, "dW")
    assert_close(db, grad_logits.sum(0), 1e-11, "db")


def test_lean_linear_binary_cross_entropy_extremes_unbatched_empty_no_grad(impl, rng):
    """memory="lean" against the default mode: ±1e4 logits in several slices, an unbatched input, an
    empty batch, no gradient wanted, only some gradients wanted."""
    x, w, b, _ = _problem(23, 9, 300, rng)
    target = torch.rand(23, 300, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        w.mul_(2e4)
    for reduction in ("mean", "none"):
        kwargs = dict(
            linear_bias=b, pos_weight=torch.full((300,), 3.0, dtype=torch.float64), reduction=reduction
        )
        lean = softxent.linear_binary_cross_entropy(
            x, w, target, memory="lean", chunk_size=64, impl=impl, **kwargs
        )
        speed = softxent.linear_binary_cross_entropy(x, w, target, impl=impl, **kwargs)
        assert torch.isfinite(lean).all()
        assert_close(lean, to_numpy(speed), 1e-12, f"±1e4 loss, {reduction}")
        for name, mine, theirs in zip(
            ["dX", "dW", "db"], _grads(lean, [x, w, b]), _grads(speed, [x, w, b]), strict=True
        ):
            size = float(theirs.abs().max())
            assert_close(mine / size, to_numpy(theirs) / size, 1e-12, f"±1e4 {name}, {reduction}")
    single = softxent.linear_binary_cross_entropy(
        x[0], w, target[0], linear_bias=b, reduction="none", memory="lean", impl=impl
    )
    assert single.shape == (300,)
    assert_close(
        single,
        to_numpy(F.binary_cross_entropy_with_logits(F.linear(x[0], w, b), target[0], reduction="none")),
        1e-12,
        "unbatched",
    )
    empty = softxent.linear_binary_cross_entropy(x[:0], w, target[:0], memory="lean", impl=impl)
    assert torch.isnan(empty)
    frozen = w.detach()
    lean = softxent.linear_binary_cross_entropy(
        x, frozen, target, linear_bias=b, memory="lean", chunk_size=64, impl=impl
    )
    eager = F.binary_cross_entropy_with_logits(F.linear(x, frozen, b), target)
    for mine, theirs in zip(
        torch.autograd.grad(lean, [x, b]), torch.autograd.grad(eager, [x, b]), strict=True
    ):
        size = float(theirs.abs().max())
        assert_close(mine / size, to_numpy(theirs) / size, 1e-12, "frozen weight")
    with torch.no_grad():
        plain = softxent.linear_binary_cross_entropy(x, w, target, memory="lean", chunk_size=64, impl=impl)
    assert not plain.requires_grad
    assert_close(
        plain, to_numpy(F.binary_cross_entropy_with_logits(F.linear(x, w), target)), 1e-12, "no_grad"
    )
