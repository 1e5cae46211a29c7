"""softxent.binary_cross_entropy_with_logits against torch and the float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softxent
from helpers import assert_close, assert_no_worse, to_numpy
from softxent import reference


def _grads(loss, params, random_upstream=True):
    upstream = torch.ones_like(loss)
    if random_upstream:
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(2), dtype=loss.dtype)
    return torch.autograd.grad(loss, params, upstream)


@pytest.mark.parametrize("shape", [(7, 13), (3, 423, 31), (5,), ()], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_torch_float64(shape, reduction, weighted, impl, rng):
    x = (torch.randn(shape, generator=rng, dtype=torch.float64) * 4).requires_grad_()
    y = torch.rand(shape, generator=rng, dtype=torch.float64).requires_grad_()
    last = shape[-1:] if shape else ()
    weight = torch.rand(shape, generator=rng, dtype=torch.float64) if weighted else None
    pos_weight = torch.rand(last, generator=rng, dtype=torch.float64) * 3 if weighted else None
    kwargs = dict(weight=weight, reduction=reduction, pos_weight=pos_weight)
    ours = softxent.binary_cross_entropy_with_logits(x, y, impl=impl, **kwargs)
    theirs = F.binary_cross_entropy_with_logits(x, y, **kwargs)
    assert_close(ours, to_numpy(theirs), 1e-12, "loss")
    for name, mine, ref in zip(["dx", "dy"], _grads(ours, [x, y]), _grads(theirs, [x, y]), strict=True):
        assert_close(mine, to_numpy(ref), 1e-12, name)


@given(
    n=st.integers(1, 30),
    c=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
)
def test_matches_reference(n, c, seed, reduction, scale):
    rng = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=rng, dtype=torch.float64) * scale).requires_grad_()
    y = torch.randint(0, 2, (n, c), generator=rng).double()
    weight = torch.rand(n, 1, generator=rng, dtype=torch.float64)
    pos_weight = torch.rand(c, generator=rng, dtype=torch.float64) * 2
    loss = softxent.binary_cross_entropy_with_logits(x, y, weight, reduction=reduction, pos_weight=pos_weight)
    (grad,) = _grads(loss, [x], random_upstream=False)
    args = (x.detach().numpy(), y.numpy(), weight.numpy(), pos_weight.numpy(), reduction)
    assert_close(loss, np.asarray(reference.sigmoid_binary_cross_entropy(*args)), 1e-12, "loss")
    assert_close(grad, reference.sigmoid_binary_cross_entropy_grad(*args), 1e-12, "grad")
    assert torch.isfinite(grad).all()


def test_gradient_is_sigmoid_minus_target(impl, rng):
    x = torch.randn(6, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (6, 5), generator=rng).double()
    softxent.binary_cross_entropy_with_logits(x, y, reduction="sum", impl=impl).backward()
    assert_close(x.grad, to_numpy(torch.sigmoid(x.detach()) - y), 1e-14, "σ(z) − y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_no_worse_than_torch(dtype, impl, rng):
    x = (torch.randn(64, 257, generator=rng) * 5).to(dtype)
    y = torch.randint(0, 2, (64, 257), generator=rng).to(dtype)
    expected = reference.sigmoid_binary_cross_entropy(to_numpy(x), to_numpy(y))
    expected_grad = reference.sigmoid_binary_cross_entropy_grad(to_numpy(x), to_numpy(y))
    results = []
    for fn in (softxent.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits):
        xg = x.clone().requires_grad_()
        loss = fn(xg, y)
        loss.backward()
        results.append((loss.detach(), xg.grad))
    (ours, ours_grad), (theirs, their_grad) = results
    assert ours.dtype == torch.float32
    assert ours_grad.dtype == dtype
    assert_no_worse(ours, theirs, np.asarray(expected), 1e-6, "loss")
    size = float(np.abs(expected_grad).max())
    assert_no_worse(ours_grad.double() / size, their_grad.double() / size, expected_grad / size, 1e-3, "grad")


def test_gradcheck_float64(impl, rng):
    x = torch.randn(4, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    y = torch.rand(4, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    pos_weight = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)

    def loss(x_, y_):
        return softxent.binary_cross_entropy_with_logits(x_, y_, pos_weight=pos_weight, impl=impl)

    assert torch.autograd.gradcheck(loss, (x, y))


def test_nan_propagates_and_extremes_are_finite(impl):
    x = torch.tensor([[1e4, -1e4, math.nan]], requires_grad=True)
    loss = softxent.binary_cross_entropy_with_logits(
        x, torch.tensor([[0.0, 1.0, 1.0]]), reduction="none", impl=impl
    )
    loss.sum().backward()
    assert_close(loss[0, :2], np.array([1e4, 1e4]), 1e-6, "saturated loss")
    assert torch.isnan(loss[0, 2])
    assert torch.isnan(x.grad[0, 2])
    assert torch.equal(x.grad[0, :2], torch.tensor([1.0, -1.0]))
