"""Second derivatives: a backward with create_graph=True gives gradients that are themselves differentiable
and right (gradgradcheck in float64, every op, both memory modes, every loss feature), and where that is
impossible the error says why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softxent
from helpers import eager_linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEATURES = [
    dict(),
    dict(label_smoothing=0.1, z_loss=0.01, softcap=3.0),
    dict(weighted=True, label_smoothing=0.2, reduction="sum"),
    dict(reduction="none", z_loss=0.02),
]


def _ids(features: dict) -> str:
    return ",".join(f"{name}={value}" for name, value in features.items()) or "plain"


def _float64(rng, *shape, requires_grad=True, scale=1.0):
    return (
        (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale)
        .to(DEVICE)
        .requires_grad_(requires_grad)
    )


def _options(features: dict, classes: int, rng) -> dict:
    options = dict(features)
    if options.pop("weighted", False):
        options["weight"] = (torch.rand(classes, generator=rng, dtype=torch.float64) + 0.5).to(DEVICE)
    return options


@pytest.mark.parametrize("features", FEATURES, ids=_ids)
def test_cross_entropy_second_derivatives(features, impl, rng):
    logits = _float64(rng, 5, 7, 2)  # a K-dimensional loss: (N, C, d1)
    target = torch.randint(0, 7, (5, 2), generator=rng).to(DEVICE)
    target[1, 0] = -100
    options = _options(features, 7, rng)
    assert torch.autograd.gradgradcheck(
        lambda z: softxent.cross_entropy(z, target, impl=impl, **options), (logits,)
    )
    probabilities = torch.softmax(_float64(rng, 5, 7, 2, requires_grad=False), 1).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda z, p: softxent.cross_entropy(z, p, impl=impl, **options), (logits, probabilities)
    )


def test_gradient_penalty_equals_torch(rng):
    """The issue's case: loss + ‖∂loss/∂z‖² backpropagated, against torch's cross-entropy."""
    logits = torch.randn(6, 9, generator=rng, dtype=torch.float64)
    target = torch.randint(0, 9, (6,), generator=rng)
    results = []
    for loss_fn in (softxent.cross_entropy, F.cross_entropy):
        z = logits.clone().requires_grad_()
        loss = loss_fn(z, target, label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, z, create_graph=True)
        assert grad.requires_grad
        (loss + grad.square().sum()).backward()
        results.append(z.grad)
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_cross_entropy_second_derivatives(reduction, impl, rng):
    logits = _float64(rng, 4, 6)
    target = torch.rand(4, 6, generator=rng, dtype=torch.float64).to(DEVICE).requires_grad_()
    weight = (torch.rand(4, 1, generator=rng, dtype=torch.float64) + 0.5).to(DEVICE)
    pos_weight = (torch.rand(6, generator=rng, dtype=torch.float64) * 2).to(DEVICE)

    def loss(z, y):
        return softxent.binary_cross_entropy_with_logits(
            z, y, weight, reduction=reduction, pos_weight=pos_weight, impl=impl
        )

    assert torch.autograd.gradgradcheck(loss, (logits, target))


@pytest.mark.parametrize("memory", ["speed", "lean"])
@pytest.mark.parametrize("features", FEATURES, ids=_ids)
def test_linear_cross_entropy_second_derivatives(memory, features, impl, rng):
    x, w, b = _float64(rng, 6, 4), _float64(rng, 9, 4), _float64(rng, 9)
    target = torch.randint(0, 9, (6,), generator=rng).to(DEVICE)
    target[2] = -100
    options = _options(features, 9, rng)

    def loss(x_, w_, b_):
        return softxent.linear_cross_entropy(
            x_, w_, target, linear_bias=b_, memory=memory, chunk_size=4, impl=impl, **options
        )

    assert torch.autograd.gradgradcheck(loss, (x, w, b))


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_linear_cross_entropy_probability_targets_second_derivatives(memory, impl, rng):
    x, w = _float64(rng, 5, 3), _float64(rng, 8, 3)
    target = torch.softmax(_float64(rng, 5, 8, requires_grad=False), 1).requires_grad_()

    def loss(x_, w_, t_):
        return softxent.linear_cross_entropy(x_, w_, t_, memory=memory, chunk_size=3, impl=impl)

    assert torch.autograd.gradgradcheck(loss, (x, w, target))


def test_linear_gradient_penalty_equals_eager(rng):
    x = torch.randn(6, 4, generator=rng, dtype=torch.float64)
    w = torch.randn(9, 4, generator=rng, dtype=torch.float64)
    target = torch.randint(0, 9, (6,), generator=rng)
    results = []
    for loss_fn in (softxent.linear_cross_entropy, eager_linear_cross_entropy):
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = loss_fn(x_, w_, target)
        grad_x, grad_w = torch.autograd.grad(loss, (x_, w_), create_graph=True)
        (loss + grad_x.square().sum() + grad_w.square().sum()).backward()
        results.append((x_.grad, w_.grad))
    for mine, theirs in zip(*results, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", ["speed", "lean"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_binary_cross_entropy_second_derivatives(memory, reduction, impl, rng):
    x, w, b = _float64(rng, 5, 3), _float64(rng, 7, 3), _float64(rng, 7)
    target = torch.rand(5, 7, generator=rng, dtype=torch.float64).to(DEVICE)
    pos_weight = (torch.rand(7, generator=rng, dtype=torch.float64) * 2).to(DEVICE)

    def loss(x_, w_, b_):
        return softxent.linear_binary_cross_entropy(
            x_, w_, target, linear_bias=b_, pos_weight=pos_weight, reduction=reduction, memory=memory,
            chunk_size=3, impl=impl,
        )  # fmt: skip

    assert torch.autograd.gradgradcheck(loss, (x, w, b))


def test_first_order_backward_keeps_its_fused_path(rng):
    """Without create_graph the gradient is the one the forward produced, scaled: not differentiable."""
    logits = torch.randn(4, 5, generator=rng, requires_grad=True)
    (grad,) = torch.autograd.grad(softxent.cross_entropy(logits, torch.tensor([0, 1, 2, 3])), logits)
    assert not grad.requires_grad


def test_inplace_backward_has_no_second_derivative(rng):
    logits = torch.randn(4, 5, generator=rng, requires_grad=True)
    loss = softxent.cross_entropy(logits * 1.0, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(
        RuntimeError, match=r"create_graph=True\) needs the logits, which inplace_backward=True"
    ):
        torch.autograd.grad(loss, logits, create_graph=True)
