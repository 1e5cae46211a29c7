r"""Triton kernel for the fused sigmoid binary cross-entropy of a block: loss and σ(z) − y in one launch.

The contract is :func:`softxent.ops.torch_blocks.sigmoid_bce_block`'s, so the drivers run either.

A 2-D grid of tiles (rows × columns, :func:`softxent.ops.policy.tile_launch`: whole narrow rows a tile).
With L = 1 + (p − 1)·y (p: pos_weight, w: weight, s: the reduction's scale), each element is read once and

.. math::
    ℓ = w\,[(1-y)\,z + L\,\mathrm{softplus}(-z)], \quad
    \frac{∂ℓ}{∂z} = s\,w\,(L\,σ(z) - p\,y), \quad
    \frac{∂ℓ}{∂y} = s\,w\,(-z + (p - 1)\,\mathrm{softplus}(-z))

in fp32, with softplus(−z) = log1p(e^{−|z|}) + max(−z, 0) and σ from e^{−|z|}, stable for any z; the
loss is evaluated as L·log1p(e^{−|z|}) + (z < 0 ? −p·y·z : (1 − y)·z), which does not cancel in the
tails. With ``row_sums`` a tile writes each row's sum over its columns instead of the elementwise loss
(no (N, C) float32 loss for "mean" and "sum"). Memory traffic: one read of logits and targets (and
weights), one write of each gradient: the floor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from softxent.ops import policy as policies
from softxent.ops import torch_blocks
from softxent.ops.spec import SigmoidLoss
from softxent.ops.triton.launches import launch
from softxent.ops.triton.layout import copy_back, out_rows, rows
from softxent.ops.triton.rowmath import to_output


@triton.jit
def _log1p(e):
    """log(1 + e) for e in [0, 1] to a few ulps relative, also where 1 + e rounds e away: with u = fl(1 + e),
    log(u)·e/(u − 1) (u − 1 is exact), and e itself where u = 1 (Goldberg's trick)."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _sigmoid_bce_kernel(
    logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, weight_stride, weight_col_stride,
    pos_weight_ptr, pos_weight_stride, scale_ptr, scale_stride, scale_col_stride,
    loss_ptr, loss_stride, grad_ptr, grad_stride, tgrad_ptr, tgrad_stride, n_rows, n_columns,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr,
    WRITE_TGRAD: tl.constexpr, ROW_SUMS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column_block = tl.program_id(1)
    cols = column_block * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_columns)[None, :]
    z = tl.load(logits_ptr + rows[:, None] * logits_stride + cols[None, :], mask=mask, other=0.0)
    z = z.to(tl.float32)
    y = tl.load(target_ptr + rows[:, None] * target_stride + cols[None, :], mask=mask, other=0.0)
    y = y.to(tl.float32)
    e = tl.exp(-tl.abs(z))
    log1p_e = _log1p(e)
    if HAS_POS_WEIGHT:
        p = tl.load(pos_weight_ptr + cols * pos_weight_stride, mask=cols < n_columns, other=1.0)
        p = p.to(tl.float32)[None, :]
    else:
        p = tl.full([1, BLOCK_COLUMNS], 1.0, tl.float32)
    log_weight = 1.0 + (p - 1.0) * y  # L
    # (1 − y)·z + L·softplus(−z) with the max(−z, 0) part folded in: no cancellation in the tails
    loss = log_weight * log1p_e + tl.where(z < 0, -p * y * z, (1.0 - y) * z)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + rows[:, None] * weight_stride + cols[None, :] * weight_col_stride, mask=mask,
                    other=0.0)  # fmt: skip
        w = w.to(tl.float32)
    else:
        w = tl.full([1, BLOCK_COLUMNS], 1.0, tl.float32)
    loss = loss * w
    if ROW_SUMS:
        partial = tl.sum(tl.where(mask, loss, 0.0), 1)
        tl.store(loss_ptr + rows * loss_stride + column_block, partial, mask=row_mask)
    else:
        tl.store(loss_ptr + rows[:, None] * loss_stride + cols[None, :], loss, mask=mask)
    if WRITE_GRAD or WRITE_TGRAD:
        scale_at = scale_ptr + rows[:, None] * scale_stride + cols[None, :] * scale_col_stride
        scale = tl.load(scale_at, mask=mask, other=0.0)
        scale = scale.to(tl.float32) * w
        if WRITE_TGRAD:
            tgrad = (-z + (p - 1.0) * (log1p_e + tl.maximum(-z, 0.0))) * scale
            tl.store(tgrad_ptr + rows[:, None] * tgrad_stride + cols[None, :], to_output(tgrad, tgrad_ptr),
                     mask=mask, cache_modifier=".cs")  # fmt: skip
        if WRITE_GRAD:
            sigmoid = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            grad = (log_weight * sigmoid - p * y) * scale
            tl.store(grad_ptr + rows[:, None] * grad_stride + cols[None, :], to_output(grad, grad_ptr),
                     mask=mask, cache_modifier=".cs")  # fmt: skip


def sigmoid_bce_block(
    logits: Tensor,
    target: Tensor,
    spec: SigmoidLoss,
    *,
    grad_scale: Tensor | float | None = None,
    grad_out: Tensor | None = None,
    target_grad_out: Tensor | None = None,
    row_sums: bool = False,
) -> Tensor:
    """:func:`softxent.ops.torch_blocks.sigmoid_bce_block` in one Triton launch (fp32 math; float64 input
    goes to the torch version). Returns the elementwise loss, logits-shaped, in fp32, or with ``row_sums``
    its sums over the last dimension (...)."""
    if logits.dtype == torch.float64:
        return torch_blocks.sigmoid_bce_block(
            logits, target, spec, grad_scale=grad_scale, grad_out=grad_out, target_grad_out=target_grad_out,
            row_sums=row_sums,
        )  # fmt: skip
    shape = logits.shape
    columns = shape[-1] if logits.dim() else 1
    z = rows(logits, columns)
    y = rows(target, columns)
    count = z.shape[0]
    device = logits.device
    tile = policies.tile_launch(count, columns, policies.SIGMOID_ELEMENTS_PER_THREAD)
    column_blocks = triton.cdiv(columns, tile.block_columns)
    loss_columns = column_blocks if row_sums else columns
    loss = torch.empty(count, loss_columns, dtype=torch.float32, device=device)
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
        launch(
            _sigmoid_bce_kernel, (triton.cdiv(count, tile.block_rows), column_blocks),
            z, z.stride(0), y, y.stride(0),
            weight if weight is not None else loss,
            weight.stride(0) if weight is not None else 0, weight.stride(1) if weight is not None else 0,
            pos_weight if pos_weight is not None else loss,
            pos_weight.stride(0) if pos_weight is not None else 0,
            scale if scale is not None else loss,
            scale.stride(0) if scale is not None else 0, scale.stride(1) if scale is not None else 0,
            loss, loss.stride(0),
            grad if grad is not None else loss, grad.stride(0) if grad is not None else 0,
            tgrad if tgrad is not None else loss, tgrad.stride(0) if tgrad is not None else 0, count, columns,
            HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
            WRITE_GRAD=write_grad, WRITE_TGRAD=write_tgrad, ROW_SUMS=row_sums,
            BLOCK_ROWS=tile.block_rows, BLOCK_COLUMNS=tile.block_columns, num_warps=tile.num_warps,
        )  # fmt: skip
    elif row_sums:
        loss.zero_()
    copy_back(grad_out, grad)
    copy_back(target_grad_out, tgrad)
    if row_sums:
        sums = loss[:, 0] if column_blocks == 1 else loss.sum(1)
        return sums.reshape(shape[:-1] if logits.dim() else ())
    return loss.view(shape)
