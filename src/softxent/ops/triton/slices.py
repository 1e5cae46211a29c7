r"""Triton kernels for the vocabulary slices of the lean and vocabulary-parallel heads
(:mod:`softxent.ops.slices`, :mod:`softxent.distributed`).

The contracts are :func:`softxent.ops.torch_blocks.slice_stats` and
:func:`~softxent.ops.torch_blocks.slice_grad`, so the drivers run either; float64 input goes to those torch
versions. The math is :mod:`.rowmath`'s.

* ``_slice_stats_kernel``, tiles of whole slice rows (:func:`softxent.ops.policy.row_launch`): folds the
  slice's S logits of each row into its running max m, Σ exp(z − m), Σq and Σq·(z − m) (online softmax,
  arXiv 1805.02867); the slice that holds a row's true class stores its logit z_y (fp32). Memory traffic:
  one read of the slice, O(1) per row for the statistics.
* ``_slice_grad_kernel``, tiles of rows × columns (:func:`softxent.ops.policy.tile_launch`): writes
  s·[coeff·ŷ − q] (minus s·(1 − ε)·w_y at the true class), times 1 − tanh² under a softcap, over the slice's
  logits in place. Memory traffic: one read and one write of the slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from softxent.ops import policy as policies
from softxent.ops import torch_blocks
from softxent.ops.spec import RowStats, SoftmaxLoss, Targets
from softxent.ops.triton.launches import launch
from softxent.ops.triton.layout import copy_back, out_rows
from softxent.ops.triton.rowmath import grad_block, row_targets, stats_pass, true_logit


@triton.jit
def _slice_stats_kernel(
    logits_ptr, logits_stride, n_rows, width, start, num_classes, target_ptr, target_stride, weight_ptr,
    m_ptr, sum_exp_ptr, q_sum_ptr, q_dot_ptr, z_y_ptr, ignore_index, eps, softcap,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_MASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    row_offsets = rows * logits_stride
    # probability targets: target_ptr points at the slice's first class; class weights at class 0
    y, counted, _, _ = row_targets(
        target_ptr, rows, row_mask, weight_ptr, num_classes, ignore_index, eps, ROWS, PROBS, HAS_WEIGHT
    )
    y_local = y - start
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    sum_exp = tl.load(sum_exp_ptr + rows, mask=row_mask, other=0.0)
    q_sum = tl.load(q_sum_ptr + rows, mask=row_mask, other=0.0)
    q_dot = tl.load(q_dot_ptr + rows, mask=row_mask, other=0.0)
    m, sum_exp, q_sum, q_dot = stats_pass(
        logits_ptr, row_offsets, row_mask, target_ptr, rows * target_stride, weight_ptr + start, counted,
        0, width, eps, eps / num_classes, softcap, m, sum_exp, q_sum, q_dot,
        PROBS, HAS_WEIGHT, HAS_MASS, HAS_SOFTCAP, BLOCK, "evict_first",
    )  # fmt: skip
    tl.store(m_ptr + rows, m, mask=row_mask)
    tl.store(sum_exp_ptr + rows, sum_exp, mask=row_mask)
    tl.store(q_sum_ptr + rows, q_sum, mask=row_mask)
    tl.store(q_dot_ptr + rows, q_dot, mask=row_mask)
    if not PROBS:
        # the true class's logit, read in fp32 by the slice that holds it
        inside = counted & (y_local >= 0) & (y_local < width)
        z_y = true_logit(logits_ptr, row_offsets, y_local, inside, softcap, HAS_SOFTCAP)
        tl.store(z_y_ptr + rows, z_y, mask=row_mask & inside)


@triton.jit
def _slice_grad_kernel(
    logits_ptr, logits_stride, n_rows, width, start, num_classes, target_ptr, target_stride, weight_ptr,
    m_ptr, log_sum_exp_ptr, coeff_ptr, scale_ptr, grad_ptr, grad_stride, tgrad_ptr, tgrad_stride,
    ignore_index, eps, softcap,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_MASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    row_mask = rows < n_rows
    col_mask = cols < width
    mask = row_mask[:, None] & col_mask[None, :]
    y, counted, _, hard = row_targets(
        target_ptr, rows, row_mask, weight_ptr, num_classes, ignore_index, eps, BLOCK_ROWS, PROBS, HAS_WEIGHT
    )
    scale = tl.where(counted, tl.load(scale_ptr + rows, mask=row_mask, other=0.0), 0.0)
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    log_sum_exp = tl.load(log_sum_exp_ptr + rows, mask=row_mask, other=0.0)
    coeff = tl.load(coeff_ptr + rows, mask=row_mask, other=0.0)
    raw = tl.load(logits_ptr + rows[:, None] * logits_stride + cols[None, :], mask=mask, other=float("-inf"))
    grad_block(
        raw, cols, col_mask, mask, counted, y - start, hard, m, log_sum_exp, coeff, scale,
        target_ptr, rows * target_stride, weight_ptr + start, eps, eps / num_classes, softcap,
        grad_ptr, rows * grad_stride, tgrad_ptr, rows * tgrad_stride,
        PROBS, HAS_WEIGHT, HAS_MASS, HAS_SOFTCAP, WRITE_GRAD, WRITE_TGRAD,
    )  # fmt: skip


def _common(logits: Tensor, start: int, targets: Targets, spec: SoftmaxLoss):
    """Arguments shared by both launches: the target (class indices, or the slice's probabilities) and its
    row stride, the class weights (fp32, all C of them), and the compile-time flags."""
    target = targets.target
    probabilities = targets.probabilities
    if probabilities:
        target = targets.columns(start, start + logits.shape[1])
        target = target if target.stride(-1) == 1 else target.contiguous()
    else:
        target = target.contiguous()  # the kernels index class targets by row
    weight = spec.weight
    if weight is not None and (weight.dtype != torch.float32 or weight.device != logits.device):
        weight = weight.to(device=logits.device, dtype=torch.float32)
    flags = dict(
        PROBS=probabilities,
        HAS_WEIGHT=weight is not None,
        HAS_MASS=probabilities or spec.label_smoothing > 0,
        HAS_SOFTCAP=spec.softcap is not None,
    )
    return target, target.stride(0) if probabilities else 0, weight, flags


def slice_stats(
    logits: Tensor, start: int, targets: Targets, spec: SoftmaxLoss, num_classes: int, stats: RowStats
) -> None:
    """:func:`softxent.ops.torch_blocks.slice_stats` in one launch (fp32 statistics)."""
    if logits.dtype == torch.float64:
        return torch_blocks.slice_stats(logits, start, targets, spec, num_classes, stats)
    rows, width = logits.shape
    if not rows or not width:
        return None
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    target, target_stride, weight, flags = _common(logits, start, targets, spec)
    shape = policies.row_launch(rows, width, policies.hardware(logits.device))
    launch(
        _slice_stats_kernel, (triton.cdiv(rows, shape.rows_per_program),),
        logits, logits.stride(0), rows, width, start, num_classes, target, target_stride,
        weight if weight is not None else stats.m,
        stats.m, stats.sum_exp, stats.q_sum, stats.q_dot, stats.z_y,
        spec.ignore_index, float(spec.label_smoothing), float(spec.softcap or 1.0),
        ROWS=shape.rows_per_program, BLOCK=shape.block, **flags, num_warps=shape.num_warps,
    )  # fmt: skip
    return None


def slice_grad(
    logits: Tensor,
    start: int,
    targets: Targets,
    spec: SoftmaxLoss,
    num_classes: int,
    m: Tensor,
    log_sum_exp: Tensor,
    coeff: Tensor,
    scale: Tensor,
    grad_out: Tensor | None,
    target_grad_out: Tensor | None,
) -> None:
    """:func:`softxent.ops.torch_blocks.slice_grad` in one launch; ``grad_out`` may alias ``logits``."""
    if logits.dtype == torch.float64:
        return torch_blocks.slice_grad(
            logits, start, targets, spec, num_classes, m, log_sum_exp, coeff, scale, grad_out, target_grad_out
        )
    rows, width = logits.shape
    if not rows or not width or (grad_out is None and target_grad_out is None):
        return None
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    target, target_stride, weight, flags = _common(logits, start, targets, spec)
    grad = out_rows(grad_out, width) if grad_out is not None else None
    tgrad = out_rows(target_grad_out, width) if target_grad_out is not None else None
    tile = policies.tile_launch(rows, width)
    launch(
        _slice_grad_kernel, (triton.cdiv(rows, tile.block_rows), triton.cdiv(width, tile.block_columns)),
        logits, logits.stride(0), rows, width, start, num_classes, target, target_stride,
        weight if weight is not None else m, m, log_sum_exp, coeff, scale.to(torch.float32),
        grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
        tgrad if tgrad is not None else logits, tgrad.stride(0) if tgrad is not None else 0,
        spec.ignore_index, float(spec.label_smoothing), float(spec.softcap or 1.0),
        BLOCK_ROWS=tile.block_rows, BLOCK_COLUMNS=tile.block_columns, **flags,
        WRITE_GRAD=grad is not None, WRITE_TGRAD=tgrad is not None, num_warps=tile.num_warps,
    )  # fmt: skip
    copy_back(grad_out, grad)
    copy_back(target_grad_out, tgrad)
    return None
