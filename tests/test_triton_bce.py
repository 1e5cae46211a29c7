"""The Triton sigmoid BCE kernel against the torch backend's block function at small odd shapes (in
Triton's interpreter without a GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from softxent import reference
from softxent.ops import torch_blocks
from softxent.ops.spec import SigmoidLoss

triton_bce = pytest.importorskip("softxent.ops.triton.bce", reason="the triton package is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _both(logits, target, spec, scale):
    out = []
    for block in (torch_blocks.sigmoid_bce_block, triton_bce.sigmoid_bce_block):
        grad, tgrad = torch.empty_like(logits), torch.empty_like(target)
        loss = block(logits, target, spec, grad_scale=scale, grad_out=grad, target_grad_out=tgrad)
        out.append((loss, grad, tgrad))
    return out


@pytest.mark.parametrize(
    ("weighted", "pos_weighted", "per_element_scale"), list(itertools.product([False, True], repeat=3))
)
def test_kernel_equals_the_torch_block(weighted, pos_weighted, per_element_scale, rng):
    rows, columns = 37, 1031
    logits = (torch.randn(rows, columns, generator=rng) * 4).to(DEVICE)
    target = torch.rand(rows, columns, generator=rng).to(DEVICE)
    # a row-broadcast weight, as a linear head's per-sample weights arrive (zero column stride)
    weight = (torch.rand(rows, 1, generator=rng) + 0.1).to(DEVICE).expand(rows, columns) if weighted else None
    pos_weight = (torch.rand(columns, generator=rng) * 3).to(DEVICE) if pos_weighted else None
    scale = (torch.rand(rows, columns, generator=rng) if per_element_scale else torch.tensor(0.37)).to(DEVICE)
    (loss, grad, tgrad), (loss_t, grad_t, tgrad_t) = _both(
        logits, target, SigmoidLoss(weight, pos_weight), scale
    )
    torch.testing.assert_close(loss_t, loss, atol=2e-6, rtol=2e-5)
    # L·σ − p·y cancels where σ ≈ y ≈ 1: both fp32 paths are off by a few ulps of p (≤ 3) there
    torch.testing.assert_close(grad_t, grad, atol=1e-6, rtol=2e-5)
    torch.testing.assert_close(tgrad_t, tgrad, atol=2e-6, rtol=2e-5)


def test_tails_are_accurate():
    """Large |z|: softplus(−z) ≈ e^{−z} must not round to 0 (a log1p, not log(1 + e)); moderate |z|:
    log(1 + e) must not lose e's digits to the rounding of 1 + e.

    The tolerance is fp32's exp on a GPU: exp(z) is computed as 2^(z·log2 e), whose rounded argument carries
    a relative error of |z|·2^-24 into the result, and the hardware's 2^x adds up to 2^-22.5; the log1p and
    the sum add a few ulps: rtol = (|z| + 8)·2^-24 per element (numpy's exp in the interpreter is closer)."""
    z = [30.0, 17.0, -17.0, -30.0, 0.0, 1e-3, 3.0, 5.0, 9.0, -5.0, -9.0, 0.5]
    y = [1.0, 1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    logits = torch.tensor([z], device=DEVICE)
    target = torch.tensor([y], device=DEVICE)
    loss = triton_bce.sigmoid_bce_block(logits, target, SigmoidLoss(None, None))
    expected = reference.sigmoid_binary_cross_entropy(
        logits.cpu().double(), target.cpu().double(), reduction="none"
    )
    relative = (loss.cpu().double() - torch.from_numpy(expected)).abs() / torch.from_numpy(expected).abs()
    tolerance = (logits.cpu().double().abs() + 8.0) * 2.0**-24
    assert torch.all(relative <= tolerance), f"relative errors {relative.tolist()} over {tolerance.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(dtype, rng):
    logits = (torch.randn(29, 517, generator=rng) * 3).to(dtype).to(DEVICE)
    target = torch.rand(29, 517, generator=rng).to(DEVICE)
    (loss, grad, _), (loss_t, grad_t, _) = _both(logits, target, SigmoidLoss(None, None), 1.0 / 517)
    assert loss_t.dtype == torch.float32
    assert grad_t.dtype == dtype
    torch.testing.assert_close(loss_t, loss, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(grad_t, grad, atol=1e-5, rtol=1e-2)
