"""softxent.cross_entropy against torch.nn.functional.cross_entropy and the float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softxent
from helpers import assert_close, assert_no_worse, interpreter_sized, to_numpy
from softxent import reference

LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def _class_targets(shape: tuple[int, ...], num_classes: int, rng: torch.Generator, ignore_every: int = 0):
    target = torch.randint(0, num_classes, shape, generator=rng)
    if ignore_every and target.numel():
        target.view(-1)[::ignore_every] = -100
    return target


def _probability_targets(shape: tuple[int, ...], rng: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    class_dim = 1 if len(shape) > 1 else 0
    return torch.softmax(torch.randn(shape, generator=rng, dtype=torch.float64) * 2, dim=class_dim).to(dtype)


def _loss_and_grads(fn, x: torch.Tensor, target: torch.Tensor, random_upstream: bool = True, **kwargs):
    """The loss and the gradients for a random incoming gradient (the same one for every fn), or for ones."""
    x = x.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_(target.dtype.is_floating_point)
    loss = fn(x, t, **kwargs)
    loss = loss[0] if isinstance(loss, tuple) else loss
    upstream = torch.ones(loss.shape, dtype=loss.dtype)
    if random_upstream:
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0), dtype=loss.dtype)
    inputs = (x, t) if t.requires_grad else (x,)
    grads = torch.autograd.grad(loss, inputs, upstream)
    return loss.detach(), grads


SHAPES = [(7, 13), (1269, 1023), (3, 423, 1023), (2, 11, 4, 5), (13,)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("label_smoothing", "weighted"), [(0.0, False), (0.0, True), (0.3, False), (0.3, True)]
)
def test_class_targets_equal_torch_float64(shape, reduction, label_smoothing, weighted, impl, rng):
    num_classes = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(shape, generator=rng, dtype=torch.float64) * 3
    target = _class_targets(shape[:1] + shape[2:] if len(shape) > 1 else (), num_classes, rng, ignore_every=5)
    weight = torch.rand(num_classes, generator=rng, dtype=torch.float64) + 0.1 if weighted else None
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    ours, (ours_grad,) = _loss_and_grads(softxent.cross_entropy, x, target, impl=impl, **kwargs)
    theirs, (their_grad,) = _loss_and_grads(F.cross_entropy, x, target, **kwargs)
    assert ours.dtype == torch.float64
    assert_close(ours, to_numpy(theirs), 1e-12, "loss")
    assert_close(ours_grad, to_numpy(their_grad), 1e-12, "grad")


@pytest.mark.parametrize("shape", [(9, 17), (3, 7, 4, 5), (31,)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_probability_targets_equal_torch_float64(shape, reduction, label_smoothing, impl, rng):
    num_classes = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(shape, generator=rng, dtype=torch.float64) * 3
    target = _probability_targets(shape, rng)
    weight = torch.rand(num_classes, generator=rng, dtype=torch.float64) + 0.1
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    ours, ours_grads = _loss_and_grads(softxent.cross_entropy, x, target, impl=impl, **kwargs)
    theirs, their_grads = _loss_and_grads(F.cross_entropy, x, target, **kwargs)
    assert_close(ours, to_numpy(theirs), 1e-12, "loss")
    assert_close(ours_grads[0], to_numpy(their_grads[0]), 1e-12, "grad wrt input")
    assert_close(ours_grads[1], to_numpy(their_grads[1]), 1e-12, "grad wrt target probabilities")


@given(
    n=st.integers(1, 40),
    num_classes=st.integers(2, 300),
    seed=st.integers(0, 2**32 - 1),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    weighted=st.booleans(),
    z_loss=st.sampled_from([0.0, 1e-4, 0.1]),
    softcap=st.sampled_from([None, 0.5, 30.0]),
    scale=st.sampled_from([1.0, 10.0, 100.0]),
    probabilities=st.booleans(),
)
def test_matches_reference_with_every_feature(
    n, num_classes, seed, reduction, label_smoothing, weighted, z_loss, softcap, scale, probabilities
):
    rng = torch.Generator().manual_seed(seed)
    x = torch.randn(n, num_classes, generator=rng, dtype=torch.float64) * scale
    if probabilities:
        target = _probability_targets((n, num_classes), rng)
    else:
        target = _class_targets((n,), num_classes, rng, ignore_every=3)
    weight = torch.rand(num_classes, generator=rng, dtype=torch.float64) + 0.05 if weighted else None
    kwargs = dict(
        weight=None if weight is None else weight.numpy(),
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    expected = reference.cross_entropy(x.numpy(), target.numpy(), **kwargs)
    expected_grad = reference.cross_entropy_grad(x.numpy(), target.numpy(), **kwargs)
    for impl in ("auto", "torch"):
        xg = x.clone().requires_grad_()
        loss = softxent.cross_entropy(
            xg,
            target,
            weight,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            impl=impl,
        )
        loss.backward(torch.ones_like(loss))
        assert_close(loss, np.asarray(expected), 1e-10, "loss")
        assert_close(xg.grad, expected_grad, 1e-10, "grad")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(64, 1031), (3, 423, 1023)], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_low_precision_no_worse_than_torch(dtype, shape, label_smoothing, impl, rng):
    shape = interpreter_sized(shape, impl)
    num_classes = shape[1]
    x = (torch.randn(shape, generator=rng) * 4).to(dtype)
    target = _class_targets(shape[:1] + shape[2:], num_classes, rng, ignore_every=7)
    x64 = x.to(torch.float64)
    kwargs = dict(reduction="mean", label_smoothing=label_smoothing)
    expected = reference.cross_entropy(x64.numpy(), target.numpy(), **kwargs)
    expected_grad = reference.cross_entropy_grad(x64.numpy(), target.numpy(), **kwargs)
    ours, (ours_grad,) = _loss_and_grads(softxent.cross_entropy, x, target, False, impl=impl, **kwargs)
    theirs, (their_grad,) = _loss_and_grads(F.cross_entropy, x, target, False, **kwargs)
    assert ours.dtype == torch.float32
    assert ours_grad.dtype == dtype
    assert_no_worse(ours, theirs, np.asarray(expected), 1e-6, "loss")
    # gradients are O(1/N): compare their error scaled to the gradient's size
    size = float(np.abs(expected_grad).max())
    assert_no_worse(ours_grad.double() / size, their_grad.double() / size, expected_grad / size, 1e-3, "grad")


def test_gradcheck_float64(impl, rng):
    x = torch.randn(5, 7, generator=rng, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 6, 2])
    weight = torch.rand(7, generator=rng, dtype=torch.float64) + 0.1
    probabilities = _probability_targets((5, 7), rng).requires_grad_()

    def class_loss(z):
        return softxent.cross_entropy(
            z, target, weight, label_smoothing=0.2, z_loss=0.01, softcap=3.0, impl=impl
        )

    def probability_loss(z, p):
        return softxent.cross_entropy(z, p, weight, reduction="sum", label_smoothing=0.1, impl=impl)

    # Scalar losses: backward scales the stored gradient in place unless the incoming gradient is 1, so a
    # graph is backpropagated through more than once (as gradcheck does) only with an incoming gradient of 1.
    assert torch.autograd.gradcheck(class_loss, (x,))
    assert torch.autograd.gradcheck(probability_loss, (x, probabilities))


def test_extreme_logits_stay_finite(impl):
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, 1e4]], requires_grad=True)
    target = torch.tensor([1, 2, 0])
    loss = softxent.cross_entropy(x, target, reduction="none", impl=impl)
    loss.sum().backward()
    expected = reference.cross_entropy(to_numpy(x), target.numpy(), reduction="none")
    assert_close(loss, expected, 1e-6, "loss")
    assert_close(
        x.grad, reference.cross_entropy_grad(to_numpy(x), target.numpy(), reduction="none"), 1e-6, "grad"
    )
    assert torch.isfinite(x.grad).all()


def test_minus_inf_mask_gives_zero_gradient_and_infinite_target_gives_inf(impl, rng):
    x = torch.randn(4, 9, generator=rng)
    x[:, 5:] = -math.inf  # masked classes
    x.requires_grad_()
    target = torch.tensor([0, 1, 2, 4])
    loss = softxent.cross_entropy(x, target, impl=impl)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(x.grad[:, 5:], torch.zeros(4, 4))
    assert_close(loss, np.asarray(F.cross_entropy(x.detach(), target).item()), 1e-6, "masked loss")

    masked_target = softxent.cross_entropy(
        x.detach(), torch.tensor([0, 1, 2, 7]), reduction="none", impl=impl
    )
    assert masked_target[3] == math.inf
    assert torch.isfinite(masked_target[:3]).all()


def test_nan_logits_propagate(impl, rng):
    x = torch.randn(3, 5, generator=rng)
    x[1, 2] = math.nan
    x.requires_grad_()
    loss = softxent.cross_entropy(x, torch.tensor([0, 1, 2]), reduction="none", impl=impl)
    assert torch.isnan(loss[1])
    assert torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[1]).all()
    assert torch.isfinite(x.grad[[0, 2]]).all()
    assert torch.isnan(softxent.cross_entropy(x.detach(), torch.tensor([0, 1, 2]), impl=impl))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_ignored_and_empty_batches_match_torch(reduction, label_smoothing, impl, rng):
    for x, target in [
        (torch.randn(4, 6, generator=rng), torch.full((4,), -100)),
        (torch.randn(0, 6), torch.zeros(0, dtype=torch.long)),
        (torch.randn(0, 6, 3), torch.zeros(0, 3, dtype=torch.long)),
    ]:
        kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
        ours, (ours_grad,) = _loss_and_grads(softxent.cross_entropy, x, target, impl=impl, **kwargs)
        theirs, (their_grad,) = _loss_and_grads(F.cross_entropy, x, target, **kwargs)
        assert_close(ours, to_numpy(theirs), 0.0, f"loss of {tuple(x.shape)}")
        assert torch.equal(ours_grad, their_grad)


@given(
    n=st.integers(1, 20),
    num_classes=st.integers(2, 100),
    seed=st.integers(0, 2**32 - 1),
    shift=st.floats(-1e3, 1e3),
    label_smoothing=st.sampled_from([0.0, 0.3]),
)
def test_shift_invariance_and_gradient_rows_sum_to_zero(n, num_classes, seed, shift, label_smoothing):
    rng = torch.Generator().manual_seed(seed)
    x = torch.randn(n, num_classes, generator=rng, dtype=torch.float64).requires_grad_()
    target = torch.randint(0, num_classes, (n,), generator=rng)
    loss = softxent.cross_entropy(x, target, reduction="none", label_smoothing=label_smoothing)
    loss.sum().backward()
    shifted = softxent.cross_entropy(
        x.detach() + shift, target, reduction="none", label_smoothing=label_smoothing
    )
    assert_close(shifted, to_numpy(loss), 1e-9, "shifted loss")
    assert_close(x.grad.sum(1), np.zeros(n), 1e-12, "gradient row sums")


def test_return_lse_is_logsumexp_and_detached(impl, rng):
    x = torch.randn(6, 4, 11, generator=rng, requires_grad=True)
    target = _class_targets((6, 11), 4, rng)
    loss, lse = softxent.cross_entropy(x, target, return_lse=True, softcap=2.0, impl=impl)
    capped = 2.0 * torch.tanh(x.detach().double() / 2.0)
    assert_close(lse, to_numpy(torch.logsumexp(capped, dim=1)), 1e-6, "lse")
    assert lse.shape == (6, 11)
    assert not lse.requires_grad
    assert loss.requires_grad


def test_z_loss_adds_z_times_lse_squared(impl, rng):
    x = torch.randn(8, 10, generator=rng, dtype=torch.float64) * 3
    target = _class_targets((8,), 10, rng, ignore_every=3)
    plain = softxent.cross_entropy(x, target, reduction="none", impl=impl)
    with_z, lse = softxent.cross_entropy(x, target, reduction="none", z_loss=0.5, return_lse=True, impl=impl)
    counted = target != -100
    assert_close(with_z, to_numpy(plain + 0.5 * lse**2 * counted), 1e-12, "z-loss")


def test_softcap_is_tanh_capping(impl, rng):
    x = torch.randn(8, 10, generator=rng, dtype=torch.float64) * 50
    target = _class_targets((8,), 10, rng)
    capped = softxent.cross_entropy(x, target, softcap=30.0, impl=impl)
    assert_close(capped, to_numpy(F.cross_entropy(30.0 * torch.tanh(x / 30.0), target)), 1e-12, "softcap")


def test_unbatched_input(impl, rng):
    x = torch.randn(10, generator=rng, dtype=torch.float64, requires_grad=True)
    for target in (torch.tensor(3), _probability_targets((10,), rng)):
        for reduction in ("mean", "none"):
            ours, grads = _loss_and_grads(softxent.cross_entropy, x, target, reduction=reduction, impl=impl)
            theirs, their_grads = _loss_and_grads(F.cross_entropy, x, target, reduction=reduction)
            assert ours.shape == theirs.shape == ()
            assert_close(ours, to_numpy(theirs), 1e-12, "loss")
            assert_close(grads[0], to_numpy(their_grads[0]), 1e-12, "grad")


def test_no_grad_builds_no_graph_and_a_retained_graph_runs_backward_again(impl, rng):
    x = torch.randn(4, 6, generator=rng, requires_grad=True)
    target = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        assert not softxent.cross_entropy(x, target, impl=impl).requires_grad
    loss = softxent.cross_entropy(x, target, impl=impl)
    expected = torch.autograd.grad(F.cross_entropy(x, target), x)[0]
    (loss * 2).backward(retain_graph=True)
    assert_close(x.grad, to_numpy(2 * expected), 1e-6, "scaled grad")
    (loss * 3).backward()  # the saved gradient was not scaled in place by the first backward
    assert_close(x.grad, to_numpy(5 * expected), 1e-6, "second backward")


def test_target_dtype_and_integer_kinds(impl, rng):
    x = torch.randn(5, 6, generator=rng)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        target = torch.tensor([0, 1, 2, 3, 5], dtype=dtype)
        assert_close(
            softxent.cross_entropy(x, target, impl=impl),
            to_numpy(F.cross_entropy(x, target.long())),
            1e-6,
            str(dtype),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_writes_the_gradient_over_the_logits(dtype, reduction, impl, rng):
    x = torch.randn(13, 27, generator=rng, dtype=torch.float64).to(dtype)
    w = torch.randn(301, 27, generator=rng, dtype=torch.float64).to(dtype).requires_grad_()
    target = _class_targets((13,), 301, rng, ignore_every=4)
    upstream = torch.rand(13, generator=rng, dtype=torch.float64)
    kwargs = dict(reduction=reduction, label_smoothing=0.1, softcap=6.0, impl=impl)

    def weighted(loss):
        return (loss * upstream.to(loss.dtype)).sum() if reduction == "none" else 2.5 * loss

    logits = x @ w.T
    address = logits.data_ptr()
    loss = softxent.cross_entropy(logits, target, inplace_backward=True, **kwargs)
    (grad_w,) = torch.autograd.grad(weighted(loss), [w])
    expected_logits = x @ w.T
    expected = softxent.cross_entropy(expected_logits, target, **kwargs)
    (expected_grad_w,) = torch.autograd.grad(weighted(expected), [w])
    assert_close(loss, to_numpy(expected), 0.0, "loss")
    assert_close(grad_w, to_numpy(expected_grad_w), 0.0, "dW")
    assert logits.data_ptr() == address
    assert not torch.equal(logits, expected_logits)  # the logits were overwritten by their gradient


def test_inplace_backward_refuses_logits_another_op_saved(impl, rng):
    w = torch.randn(9, 5, generator=rng, requires_grad=True)
    logits = torch.randn(4, 5, generator=rng) @ w.T
    squares = logits.pow(2)  # saves the logits for its backward
    loss = softxent.cross_entropy(logits, torch.tensor([1, 2, 3, 4]), inplace_backward=True, impl=impl)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + squares.sum()).backward()
    with pytest.raises(TypeError, match="inplace_backward: expected a bool, got str"):
        softxent.cross_entropy(logits, torch.tensor([1, 2, 3, 4]), inplace_backward="yes")
