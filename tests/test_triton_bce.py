"""The Triton sigmoid BCE kernel against the torch backend's block function at small odd shapes (in
Triton's interpreter without a GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from softxent import reference
from softxent.ops import cpu

triton_bce = pytest.importorskip("softxent.ops.triton.bce", reason="the triton package is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _both(logits, target, spec, scale):
    out = []
    for block in (cpu.sigmoid_bce_block, triton_bce.sigmoid_bce_block):
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
        logits, target, cpu.SigmoidLoss(weight, pos_weight), scale
    )
    torch.testing.assert_close(loss_t, loss, atol=2e-6, rtol=2e-5)
    # L·σ − p·y cancels where σ ≈ y ≈ 1: both fp32 paths are off by a few ulps of p (≤ 3) there
    torch.testing.assert_close(grad_t, grad, atol=1e-6, rtol=2e-5)
    torch.testing.assert_close(tgrad_t, tgrad, atol=2e-6, rtol=2e-5)


def test_tails_are_accurate(rng):
    """Large |z|: softplus(−z) ≈ e^{−z} must not round to 0 (a log1p, not log(1 + e))."""
    logits = torch.tensor([[30.0, 17.0, -17.0, -30.0, 0.0, 1e-3]], device=DEVICE)
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.5, 1.0]], device=DEVICE)
    loss = triton_bce.sigmoid_bce_block(logits, target, cpu.SigmoidLoss(None, None))
    expected = reference.sigmoid_binary_cross_entropy(
        logits.cpu().double(), target.cpu().double(), reduction="none"
    )
    torch.testing.assert_close(loss.cpu().double(), torch.from_numpy(expected), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(dtype, rng):
    logits = (torch.randn(29, 517, generator=rng) * 3).to(dtype).to(DEVICE)
    target = torch.rand(29, 517, generator=rng).to(DEVICE)
    (loss, grad, _), (loss_t, grad_t, _) = _both(logits, target, cpu.SigmoidLoss(None, None), 1.0 / 517)
    assert loss_t.dtype == torch.float32
    assert grad_t.dtype == dtype
    torch.testing.assert_close(loss_t, loss, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(grad_t, grad, atol=1e-5, rtol=1e-2)
