"""The loss modules behave like torch's: same results, buffers and state dicts."""

from __future__ import annotations

import pytest
import torch

import softxent
from helpers import assert_close, to_numpy

# torch 2.13 added nn.LinearCrossEntropyLoss (the GPU machines run 2.11)
needs_torch_linear_cross_entropy = pytest.mark.skipif(
    not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch < 2.13 has no nn.LinearCrossEntropyLoss"
)


def test_cross_entropy_loss_module_equals_torch(impl, rng):
    weight = torch.rand(11, generator=rng) + 0.1
    ours = softxent.nn.CrossEntropyLoss(weight, ignore_index=3, label_smoothing=0.05, impl=impl)
    theirs = torch.nn.CrossEntropyLoss(weight, ignore_index=3, label_smoothing=0.05)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight"}
    x = torch.randn(10, 11, generator=rng)
    target = torch.randint(0, 11, (10,), generator=rng)
    assert_close(ours(x, target), to_numpy(theirs(x, target)), 1e-6, "loss")
    with pytest.warns(UserWarning, match="deprecated"):
        assert softxent.nn.CrossEntropyLoss(size_average=False).reduction == "sum"


def test_cross_entropy_loss_module_inplace_backward(impl, rng):
    """inplace_backward=True: the module's gradient is torch's and it is written over the logits."""
    logits = torch.randn(12, 37, generator=rng)
    target = torch.randint(0, 37, (12,), generator=rng)
    expected = torch.func.grad(lambda z: torch.nn.functional.cross_entropy(z, target))(logits)
    leaf = logits.clone().requires_grad_()
    z = leaf * 1.0  # a non-leaf whose storage the loss may overwrite
    criterion = softxent.nn.CrossEntropyLoss(inplace_backward=True, impl=impl)
    assert "inplace_backward=True" in repr(criterion)
    criterion(z, target).backward()
    assert_close(leaf.grad, to_numpy(expected), 1e-6, "dlogits")
    assert_close(z.detach(), to_numpy(expected), 1e-6, "logits' storage")
    with pytest.raises(TypeError, match="inplace_backward: expected a bool, got int"):
        softxent.nn.CrossEntropyLoss(inplace_backward=1)


@needs_torch_linear_cross_entropy
def test_linear_cross_entropy_loss_loads_torch_state_dict(impl, rng):
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(16, 50, out_features=(2,), bias=True, label_smoothing=0.1)
    ours = softxent.nn.LinearCrossEntropyLoss(
        16, 50, out_features=(2,), bias=True, label_smoothing=0.1, chunk_size=5, impl=impl
    )
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(12, 16, generator=rng, requires_grad=True)
    target = torch.randint(0, 50, (12, 2), generator=rng)
    mine, ref = ours(x, target), theirs(x, target)
    assert_close(mine, to_numpy(ref), 1e-6, "loss")
    mine.backward()
    ref.backward()
    assert_close(ours.linear.weight.grad, to_numpy(theirs.linear.weight.grad), 1e-5, "dW")
    assert_close(ours.linear.bias.grad, to_numpy(theirs.linear.bias.grad), 1e-5, "db")
    assert "chunk" not in repr(ours)
    assert "num_classes=50" in repr(ours)


@needs_torch_linear_cross_entropy
def test_linear_cross_entropy_loss_lean_memory(impl, rng):
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(16, 300, bias=True, label_smoothing=0.1)
    ours = softxent.nn.LinearCrossEntropyLoss(
        16, 300, bias=True, label_smoothing=0.1, memory="lean", chunk_size=128, impl=impl
    )
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(12, 16, generator=rng)
    target = torch.randint(0, 300, (12,), generator=rng)
    mine, ref = ours(x, target), theirs(x, target)
    assert_close(mine, to_numpy(ref), 1e-6, "loss")
    mine.backward()
    ref.backward()
    assert_close(ours.linear.weight.grad, to_numpy(theirs.linear.weight.grad), 1e-5, "dW")
    assert "memory='lean'" in repr(ours)
    with pytest.raises(ValueError, match="memory: 'lean' takes no K-dimensional loss"):
        softxent.nn.LinearCrossEntropyLoss(16, 300, out_features=(2,), memory="lean")


def test_bce_with_logits_loss_module_equals_torch(impl, rng):
    pos_weight = torch.rand(6, generator=rng) * 2
    ours = softxent.nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="sum", impl=impl)
    theirs = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="sum")
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x, y = torch.randn(4, 6, generator=rng), torch.rand(4, 6, generator=rng)
    assert_close(ours(x, y), to_numpy(theirs(x, y)), 1e-6, "loss")
