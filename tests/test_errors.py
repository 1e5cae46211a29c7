"""Bad input raises ValueError / TypeError naming the argument, with what was expected and what was given."""

from __future__ import annotations

import math

import pytest
import torch

import softxent

X = torch.randn(4, 5)
Y = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(input=[[1.0, 2.0]]), TypeError, r"input: expected a torch\.Tensor, got list"),
        (
            dict(input=torch.ones(4, 5, dtype=torch.int64)),
            TypeError,
            r"input: expected a float32.*got torch\.int64",
        ),
        (
            dict(input=torch.tensor(1.0)),
            ValueError,
            r"input: expected logits of shape \(C,\).*got shape \(\)",
        ),
        (
            dict(target=torch.tensor([0, 1, 2])),
            ValueError,
            r"target: expected class indices of shape \(4,\).*got shape \(3,\)",
        ),
        (
            dict(target=torch.tensor([0, 1, 7, 2])),
            ValueError,
            r"target: expected class indices in \[0, 5\) or ignore_index=-100, got 7",
        ),
        (
            dict(target=torch.tensor([0, -1, 2, 2])),
            ValueError,
            r"target: expected class indices in \[0, 5\).*got -1",
        ),
        (
            dict(target=torch.tensor([0.0, 1.0, 2.0, 3.0])),
            ValueError,
            r"target: expected class probabilities of the input's shape \(4, 5\).*got shape \(4,\)",
        ),
        (
            dict(target=torch.ones(4, 3)),
            ValueError,
            r"target: expected class probabilities of the input's shape \(4, 5\).*got shape \(4, 3\)",
        ),
        (
            dict(target=torch.ones(4, dtype=torch.bool)),
            TypeError,
            r"target: expected class indices \(int64, int32 or uint8\).*got torch\.bool",
        ),
        (
            dict(target=torch.ones(4, dtype=torch.int8)),
            TypeError,
            r"target: expected class indices \(int64, int32 or uint8\).*got torch\.int8",
        ),
        (
            dict(target=torch.ones(4, dtype=torch.int16)),
            TypeError,
            r"target: expected class indices \(int64, int32 or uint8\).*got torch\.int16",
        ),
        (
            dict(target=torch.softmax(X, 1), ignore_index=0),
            ValueError,
            r"ignore_index: expected a negative value \(the default -100\) with class-probability targets.*"
            r"got 0",
        ),
        (dict(return_lse=1), TypeError, r"return_lse: expected a bool, got int"),
        (dict(inplace_backward="yes"), TypeError, r"inplace_backward: expected a bool, got str"),
        (
            dict(weight=torch.ones(4)),
            ValueError,
            r"weight: expected shape \(5,\) \(one weight per class\), got \(4,\)",
        ),
        (
            dict(weight=torch.ones(5, requires_grad=True)),
            ValueError,
            r"weight: expected a tensor that does not require grad",
        ),
        (dict(reduction="avg"), ValueError, r"reduction: expected 'mean', 'sum' or 'none', got 'avg'"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing: expected a float in \[0, 1\], got 1\.5"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing: expected a float in \[0, 1\], got -0\.1"),
        (dict(softcap=0.0), ValueError, r"softcap: expected None or a finite float > 0, got 0\.0"),
        (dict(softcap=-3), ValueError, r"softcap: expected None or a finite float > 0, got -3"),
        (dict(z_loss=-1e-4), ValueError, r"z_loss: expected a finite float >= 0, got -0\.0001"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index: expected an int, got float"),
        (dict(impl="cuda"), ValueError, r"impl: expected one of \('auto', 'torch', 'triton'\), got 'cuda'"),
    ],
)
def test_cross_entropy_errors(kwargs, error, match):
    arguments = dict(input=X, target=Y) | kwargs
    with pytest.raises(error, match=match):
        softxent.cross_entropy(**arguments)


W = torch.randn(5, 8)
H = torch.randn(4, 8)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(input=torch.randn(2, 4, 8)),
            ValueError,
            r"input: expected shape \(N, in_features\) or \(in_features,\), got \(2, 4, 8\)",
        ),
        (
            dict(linear_weight=torch.randn(5, 7)),
            ValueError,
            r"linear_weight: expected last dimension in_features=8.*got shape \(5, 7\)",
        ),
        (
            dict(linear_weight=torch.randn(8)),
            ValueError,
            r"linear_weight: expected shape \(C, in_features\).*got \(8,\)",
        ),
        (
            dict(linear_weight=W.double()),
            TypeError,
            r"linear_weight: expected dtype torch\.float32 \(the input's\), got torch\.float64",
        ),
        (dict(linear_bias=torch.randn(4)), ValueError, r"linear_bias: expected shape \(5,\), got \(4,\)"),
        (dict(chunk_size=0), ValueError, r"chunk_size: expected None or a positive int, got 0"),
        (
            dict(target=torch.tensor([0, 1, 5, 2])),
            ValueError,
            r"target: expected class indices in \[0, 5\).*got 5",
        ),
        (
            dict(target=torch.softmax(torch.randn(4, 5), 1), ignore_index=-100),
            ValueError,
            r"ignore_index: expected None when target holds class probabilities, got -100",
        ),
        (dict(reduction="mean "), ValueError, r"reduction: expected 'mean', 'sum' or 'none', got 'mean '"),
    ],
)
def test_linear_cross_entropy_errors(kwargs, error, match):
    arguments = dict(input=H, linear_weight=W, target=Y) | kwargs
    with pytest.raises(error, match=match):
        softxent.linear_cross_entropy(**arguments)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(target=torch.rand(4, 4)),
            ValueError,
            r"target: expected the input's shape \(4, 5\), got \(4, 4\)",
        ),
        (
            dict(target=torch.ones(4, 5, dtype=torch.long)),
            TypeError,
            r"target: expected a float32.*got torch\.int64",
        ),
        (
            dict(pos_weight=torch.ones(4)),
            ValueError,
            r"pos_weight: expected a shape that broadcasts to the last \(class\) dimension",
        ),
        (
            dict(weight=torch.ones(5, requires_grad=True)),
            ValueError,
            r"weight: expected a tensor that does not require grad",
        ),
        (
            dict(pos_weight=torch.ones(5, requires_grad=True)),
            ValueError,
            r"pos_weight: expected a tensor that does not require grad",
        ),
        (
            dict(reduction="elementwise"),
            ValueError,
            r"reduction: expected 'mean', 'sum' or 'none', got 'elementwise'",
        ),
    ],
)
def test_binary_cross_entropy_errors(kwargs, error, match):
    arguments = dict(input=X, target=torch.rand(4, 5)) | kwargs
    with pytest.raises(error, match=match):
        softxent.binary_cross_entropy_with_logits(**arguments)


def test_linear_binary_cross_entropy_errors():
    with pytest.raises(ValueError, match=r"target: expected the logits' shape \(4, 5\), got \(4, 6\)"):
        softxent.linear_binary_cross_entropy(H, W, torch.rand(4, 6))
    with pytest.raises(
        ValueError, match=r"linear_weight: expected shape \(C, in_features\), got \(5, 2, 8\)"
    ):
        softxent.linear_binary_cross_entropy(H, torch.randn(5, 2, 8), torch.rand(4, 5))


def test_module_errors():
    with pytest.raises(ValueError, match=r"label_smoothing: expected a float in \[0, 1\], got 2"):
        softxent.nn.CrossEntropyLoss(label_smoothing=2)
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\)"):
        softxent.nn.LinearCrossEntropyLoss(4, 3, weight=torch.ones(2))
    with pytest.raises(TypeError, match=r"pos_weight: expected a float32"):
        softxent.nn.BCEWithLogitsLoss(pos_weight=torch.ones(2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------
# Edge cases that torch answers with a result: softxent gives the same result, on every backend
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_zero_features_give_torchs_loss(memory, impl):
    """D = 0: every logit is the bias (0 without one), so the loss is log C, as torch computes it."""
    x = torch.randn(4, 0, requires_grad=True)
    w = torch.randn(7, 0, requires_grad=True)
    target = torch.tensor([1, 2, 3, 4])
    loss = softxent.linear_cross_entropy(x, w, target, memory=memory, impl=impl)
    assert math.isclose(float(loss), math.log(7), rel_tol=1e-6)
    loss.backward()
    assert x.grad.shape == (4, 0)
    assert w.grad.shape == (7, 0)
    sigmoid = softxent.linear_binary_cross_entropy(x, w, torch.rand(4, 7), memory=memory, impl=impl)
    assert math.isclose(float(sigmoid), math.log(2), rel_tol=1e-6)


def test_zero_classes_with_probability_targets_give_torchs_result(impl):
    """C = 0 with probability targets: each position's loss is an empty sum (0), the mean is nan (torch
    divides by numel / C), and the gradient is empty."""
    logits = torch.randn(3, 0, requires_grad=True)
    target = torch.rand(3, 0)
    for reduction in ("mean", "sum", "none"):
        ours = softxent.cross_entropy(logits, target, reduction=reduction, impl=impl)
        theirs = torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
        torch.testing.assert_close(ours, theirs.detach(), equal_nan=True)
    _, lse = softxent.cross_entropy(logits, target, reduction="none", return_lse=True, impl=impl)
    assert torch.equal(lse, torch.full((3,), -math.inf))
    softxent.cross_entropy(logits, target, reduction="sum", impl=impl).backward()
    assert logits.grad.shape == (3, 0)


def test_inplace_backward_on_an_expanded_input_is_an_error(impl):
    """A stride-0 (expanded) view cannot hold a gradient that differs between its rows."""
    row = torch.randn(1, 5, requires_grad=True) * 1.0  # computed logits (a leaf is refused before)
    with pytest.raises(
        ValueError, match=r"inplace_backward: expected logits whose elements each have their own"
    ):
        softxent.cross_entropy(row.expand(4, 5), Y, inplace_backward=True, impl=impl)
    # a transposed or sliced view does not share memory between elements: it works
    base = torch.randn(6, 4)
    target = torch.tensor([0, 1, 2, 0])
    reference = base.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(reference.t()[:, ::2], target)
    expected.backward()
    base.requires_grad_()
    view = base.clone().t()[:, ::2]  # (4, 3), strides (1, 8)
    loss = softxent.cross_entropy(view, target, inplace_backward=True, impl=impl)
    torch.testing.assert_close(loss, expected.detach())
    loss.backward()
    torch.testing.assert_close(base.grad, reference.grad)


@pytest.mark.parametrize("classes", [5, 16390])  # 16390: a wide row, which the Triton kernel reads twice
@pytest.mark.parametrize("kind", ["index", "ignored", "probabilities"])
def test_a_row_of_only_minus_infinity_gives_torchs_nan(classes, kind, impl):
    """Such a row has no distribution: torch's ŷ, loss and gradient there are nan (ignored or not), and
    every backend's are too; the other rows are unaffected."""
    logits = torch.randn(3, classes)
    logits[1] = -math.inf
    logits[2, :2] = -math.inf
    if kind == "probabilities":
        target = torch.softmax(torch.randn(3, classes), 1)
    else:
        target = torch.tensor([0, -100 if kind == "ignored" else 3, 4])
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    loss = softxent.cross_entropy(ours, target, reduction="none", impl=impl)
    expected = torch.nn.functional.cross_entropy(theirs, target, reduction="none")
    torch.testing.assert_close(loss, expected.detach(), equal_nan=True)
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, equal_nan=True)
    assert ours.grad[1].isnan().all()


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_a_linear_head_whose_logits_are_all_minus_infinity_gives_torchs_nan(memory, impl):
    x = torch.tensor([[1.0], [2.0]], requires_grad=True)
    w = torch.full((3, 1), -math.inf, requires_grad=True)
    target = torch.tensor([2, 1])
    loss = softxent.linear_cross_entropy(x, w, target, reduction="sum", memory=memory, impl=impl)
    loss.backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(x_ref @ w_ref.T, target, reduction="sum")
    expected.backward()
    assert loss.isnan()
    assert expected.isnan()
    torch.testing.assert_close(x.grad, x_ref.grad, equal_nan=True)
    torch.testing.assert_close(w.grad, w_ref.grad, equal_nan=True)


def test_inplace_backward_refuses_what_torch_refuses_to_modify_in_place(impl):
    """A leaf that requires grad, or a view of one, would be overwritten by its own gradient: refused, as
    torch refuses any in-place op on them; so is a call under torch.func, which needs the logits after."""
    leaf = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(ValueError, match=r"inplace_backward: expected logits computed by the graph.*a leaf"):
        softxent.cross_entropy(leaf, Y, inplace_backward=True, impl=impl)
    with pytest.raises(
        ValueError, match=r"inplace_backward: .*got a view of a leaf tensor that requires grad"
    ):
        softxent.cross_entropy(leaf[:, :5], Y, inplace_backward=True, impl=impl)
    with pytest.raises(
        ValueError, match=r"inplace_backward: not supported under torch\.func transforms \(grad\)"
    ):
        torch.func.grad(lambda z: softxent.cross_entropy(z * 1.0, Y, inplace_backward=True, impl=impl))(leaf)
    with pytest.raises(
        ValueError, match=r"inplace_backward: not supported under torch\.func transforms \(vmap\)"
    ):
        torch.func.vmap(lambda z: softxent.cross_entropy(z, Y, inplace_backward=True, impl=impl))(
            torch.randn(2, 4, 5)
        )
    # a leaf that does not require grad is only read (no gradient is made), and computed logits work
    assert torch.isfinite(softxent.cross_entropy(leaf.detach(), Y, inplace_backward=True, impl=impl))
    computed = leaf * 2.0
    loss = softxent.cross_entropy(computed, Y, inplace_backward=True, impl=impl)
    loss.backward()
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(leaf * 2.0, Y), leaf)[0]
    torch.testing.assert_close(leaf.grad, expected)
