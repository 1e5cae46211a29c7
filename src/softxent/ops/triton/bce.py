r"""Triton kernel for the fused sigmoid binary cross-entropy of a block: loss and σ(z) − y in one launch.

The contract is :func:`softxent.ops.cpu.sigmoid_bce_block`'s, so the torch backend's drivers (reductions,
blocks of rows, the linear head, the autograd Functions) run it unchanged.

A 2-D grid over (rows, column blocks). With L = 1 + (p − 1)·y (p: pos_weight, w: weight, s: the
reduction's scale), each element is read once and

.. math::
    ℓ = w\,[(1-y)\,z + L\,\mathrm{softplus}(-z)], \quad
    \frac{∂ℓ}{∂z} = s\,w\,(L\,σ(z) - p\,y), \quad
    \frac{∂ℓ}{∂y} = s\,w\,(-z + (p - 1)\,\mathrm{softplus}(-z))

in fp32, with softplus(−z) = log1p(e^{−|z|}) + max(−z, 0) and σ from e^{−|z|}, stable for any z; the
loss is evaluated as L·log1p(e^{−|z|}) + (z < 0 ? −p·y·z : (1 − y)·z), which does not cancel in the
tails. Memory traffic: one read of logits and targets (and weights), one write of the loss and of each
gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from softxent.ops import cpu
from softxent.ops.triton._layout import copy_back, out_rows, rows
from softxent.ops.triton.cross_entropy import _to_output

# Columns per program: a power of two (smaller rows use the next power of two above their width).
MAX_BLOCK = 1024


@triton.jit
def _log1p_small(e):
    """log(1 + e) for e in [0, 1], accurate where 1 + e rounds away e (a series below 1e-4)."""
    return tl.where(e < 1e-4, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))


@triton.jit
def _sigmoid_bce_kernel(
    logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, weight_stride, weight_col_stride,
    pos_weight_ptr, pos_weight_stride, scale_ptr, scale_stride, scale_col_stride,
    loss_ptr, grad_ptr, grad_stride, tgrad_ptr, tgrad_stride, num_columns,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_columns
    z = tl.load(logits_ptr + row * logits_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(target_ptr + row * target_stride + cols, mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(-tl.abs(z))
    softplus_neg = _log1p_small(e) + tl.maximum(-z, 0.0)
    if HAS_POS_WEIGHT:
        p = tl.load(pos_weight_ptr + cols * pos_weight_stride, mask=mask, other=1.0).to(tl.float32)
    else:
        p = tl.full([BLOCK], 1.0, tl.float32)
    log_weight = 1.0 + (p - 1.0) * y  # L
    # (1 − y)·z + L·softplus(−z) with the max(−z, 0) part folded in: no cancellation in the tails
    loss = log_weight * _log1p_small(e) + tl.where(z < 0, -p * y * z, (1.0 - y) * z)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + row * weight_stride + cols * weight_col_stride, mask=mask, other=0.0)
        w = w.to(tl.float32)
    else:
        w = tl.full([BLOCK], 1.0, tl.float32)
    loss = loss * w
    tl.store(loss_ptr + row * num_columns + cols, loss, mask=mask)
    if WRITE_GRAD or WRITE_TGRAD:
        scale = tl.load(scale_ptr + row * scale_stride + cols * scale_col_stride, mask=mask, other=0.0)
        scale = scale.to(tl.float32) * w
        if WRITE_TGRAD:
            tgrad = (-z + (p - 1.0) * softplus_neg) * scale
            tl.store(tgrad_ptr + row * tgrad_stride + cols, _to_output(tgrad, tgrad_ptr), mask=mask)
        if WRITE_GRAD:
            sigmoid = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            grad = (log_weight * sigmoid - p * y) * scale
            tl.store(grad_ptr + row * grad_stride + cols, _to_output(grad, grad_ptr), mask=mask)


def sigmoid_bce_block(
    logits: Tensor,
    target: Tensor,
    spec: cpu.SigmoidLoss,
    *,
    grad_scale: Tensor | float | None = None,
    grad_out: Tensor | None = None,
    target_grad_out: Tensor | None = None,
) -> Tensor:
    """:func:`softxent.ops.cpu.sigmoid_bce_block` in one Triton launch (fp32 math; float64 input goes to
    the torch version). Returns the elementwise loss, logits-shaped, in fp32."""
    if logits.dtype == torch.float64:
        return cpu.sigmoid_bce_block(
            logits, target, spec, grad_scale=grad_scale, grad_out=grad_out, target_grad_out=target_grad_out
        )
    shape = logits.shape
    columns = shape[-1] if logits.dim() else 1
    z = rows(logits, columns)
    y = rows(target, columns)
    count = z.shape[0]
    device = logits.device
    loss = torch.empty(count, columns, dtype=torch.float32, device=device)
    weight = None if spec.weight is None else spec.weight.expand(shape).reshape(-1, columns)
    pos_weight = None
    if spec.pos_weight is not None:
        pos_weight = spec.pos_weight.to(device=device, dtype=torch.float32).expand(columns)
    write_grad = grad_scale is not None and grad_out is not None
    write_tgrad = grad_scale is not None and target_grad_out is not None
    scale = None
    if grad_scale is not None:
        scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=device).expand(shape)
        scale = scale.reshape(-1, columns)
    grad = out_rows(grad_out, columns) if write_grad else None
    tgrad = out_rows(target_grad_out, columns) if write_tgrad else None
    if count and columns:
        block = min(MAX_BLOCK, triton.next_power_of_2(columns))
        _sigmoid_bce_kernel[(count, triton.cdiv(columns, block))](
            z, z.stride(0), y, y.stride(0),
            weight if weight is not None else loss,
            weight.stride(0) if weight is not None else 0, weight.stride(1) if weight is not None else 0,
            pos_weight if pos_weight is not None else loss,
            pos_weight.stride(0) if pos_weight is not None else 0,
            scale if scale is not None else loss,
            scale.stride(0) if scale is not None else 0, scale.stride(1) if scale is not None else 0,
            loss, grad if grad is not None else loss, grad.stride(0) if grad is not None else 0,
            tgrad if tgrad is not None else loss, tgrad.stride(0) if tgrad is not None else 0, columns,
            HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
            WRITE_GRAD=write_grad, WRITE_TGRAD=write_tgrad, BLOCK=block,
        )  # fmt: skip
    copy_back(grad_out, grad)
    copy_back(target_grad_out, tgrad)
    return loss.view(shape)
