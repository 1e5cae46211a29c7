"""softxent.ops.weighted: the softmax linear head with a weight per row (class-index targets), against the
float64 reference, where the same loss is the probability target q_i = s_i·((1 − ε)·onehot(y_i) + ε/C)
under class weights w; on both backends, in float32 and float64, and to second order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import assert_close, interpreter_sized, to_numpy
from softxent import reference
from softxent.ops.weighted import row_weighted_linear_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("weighted", "smoothing"), [(False, 0.0), (True, 0.0), (True, 0.2)])
def test_the_loss_and_gradients_are_the_references(impl, rng, dtype, weighted, smoothing):
    n, d, c = interpreter_sized((83, 17, 129), impl)
    x = torch.randn(n, d, generator=rng, dtype=torch.float64)
    w = torch.randn(c, d, generator=rng, dtype=torch.float64) * 0.5
    b = torch.randn(c, generator=rng, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=rng)
    s = torch.rand(n, generator=rng, dtype=torch.float64) * 3
    s[::7] = 0.0  # rows that weigh nothing
    class_weight = torch.rand(c, generator=rng, dtype=torch.float64) + 0.5 if weighted else None
    q = s[:, None].numpy() * ((1 - smoothing) * np.eye(c)[y.numpy()] + smoothing / c)
    loss, dX, dW, db = reference.linear_cross_entropy(
        x.numpy(), w.numpy(), q, b.numpy(),
        weight=None if class_weight is None else class_weight.numpy(), reduction="sum",
    )  # fmt: skip
    xs, ws, bs = (t.to(dtype).requires_grad_() for t in (x, w, b))
    got = row_weighted_linear_cross_entropy(
        xs, ws, bs, y, s.to(dtype),
        class_weight=None if class_weight is None else class_weight.to(dtype), label_smoothing=smoothing,
        impl=impl,
    )  # fmt: skip
    got.backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert_close(got, np.asarray(loss), tol * max(1.0, abs(float(loss))), "loss")
    for name, grad, expected in (("dX", xs.grad, dX), ("dW", ws.grad, dW), ("db", bs.grad, db)):
        assert_close(grad, expected, tol * max(1.0, float(np.abs(expected).max())), name)


def test_without_gradients_it_is_the_weighted_sum(rng):
    x, w = torch.randn(40, 6, generator=rng), torch.randn(9, 6, generator=rng)
    y, s = torch.randint(0, 9, (40,), generator=rng), torch.rand(40, generator=rng)
    per_row = torch.nn.functional.cross_entropy(x @ w.T, y, reduction="none")
    torch.testing.assert_close(row_weighted_linear_cross_entropy(x, w, None, y, s), (per_row * s).sum())


def test_second_derivatives(rng):
    x = torch.randn(7, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    y, s = torch.randint(0, 5, (7,), generator=rng), torch.rand(7, generator=rng, dtype=torch.float64)

    def loss(x, w):
        return row_weighted_linear_cross_entropy(x, w, None, y, s, label_smoothing=0.1)

    assert torch.autograd.gradgradcheck(loss, (x, w))
    assert to_numpy(loss(x, w)).shape == ()
