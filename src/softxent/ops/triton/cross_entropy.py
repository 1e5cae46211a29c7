r"""Triton kernels for the fused softmax cross-entropy of a block of rows: loss, lse and ŷ − y together.

The contract is :func:`softxent.ops.torch_blocks.softmax_xent_block`'s, so the drivers run either. The math
is :mod:`.rowmath`'s (online softmax, arXiv 1805.02867); per row

.. math::
    ℓ = (Σ_c q_c)\,\log Σ_c e^{z_c - m} - Σ_c q_c (z_c - m) + λ\,\mathrm{lse}^2, \qquad
    \frac{∂ℓ}{∂z_c} = s\,[(Σ q + 2λ\,\mathrm{lse})\,ŷ_c - q_c]

with the true class's term (1 − ε)·w_y·(z_y − m) read in fp32. Three shapes of launch, chosen by
:func:`softxent.ops.policy.row_launch` from the row width and the GPU:

* rows of at most ROW_IN_REGISTERS columns: one program holds a tile of whole rows in registers. Memory
  traffic: one read of the logits, one write of the gradient (the floor).
* wider rows, enough of them to fill the GPU: one program a row, two passes: the statistics, then the
  gradient in reverse block order, so that its reads find the blocks read last still in L2 (the first
  pass's loads ask L2 to keep them, the second's and the gradient's stores to drop them). Memory traffic:
  one read and one write from DRAM, plus the share of the second read that misses L2.
* wide rows too few to fill the GPU: several programs a row; a statistics launch writes each program's
  partial (m, Σexp, Σq, Σq·(z − m)) and a second launch combines them per row (a few numbers) and writes
  the gradient of its columns. Memory traffic: two reads and one write.

Every launch covers all rows: a call makes one launch (two for split rows) whatever N. No atomics, no host
synchronization; the reductions run in a fixed order, so results are bit-identical run to run.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from softxent.ops import policy as policies
from softxent.ops import torch_blocks
from softxent.ops.spec import SoftmaxLoss
from softxent.ops.triton.launches import launch
from softxent.ops.triton.layout import copy_back, out_rows, rows
from softxent.ops.triton.rowmath import (
    capped,
    finish,
    grad_block,
    grad_pass,
    mass_shift,
    online_update,
    row_targets,
    stats_pass,
    target_mass,
    true_logit,
)


@triton.jit
def _softmax_xent_rows_kernel(
    logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, scale_ptr, scale_stride,
    loss_ptr, lse_ptr, grad_ptr, grad_stride, tgrad_ptr, tgrad_stride,
    n_rows, num_classes, ignore_index, eps, z_loss, softcap,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr, PROBS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_MASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr, EVICT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    row_offsets = rows * logits_stride
    target_offsets = rows * target_stride
    smooth = eps / num_classes
    y, counted, out_of_range, hard = row_targets(
        target_ptr, rows, row_mask, weight_ptr, num_classes, ignore_index, eps, ROWS, PROBS, HAS_WEIGHT
    )
    z_y = true_logit(logits_ptr, row_offsets, y, counted, softcap, HAS_SOFTCAP)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    sum_exp = tl.zeros([ROWS], tl.float32)
    q_sum = tl.zeros([ROWS], tl.float32)
    q_dot = tl.zeros([ROWS], tl.float32)
    if SINGLE_PASS:
        # the whole rows in registers: one read
        cols = tl.arange(0, BLOCK)
        col_mask = cols < num_classes
        mask = row_mask[:, None] & col_mask[None, :]
        raw = tl.load(logits_ptr + row_offsets[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        z = capped(raw, mask, softcap, HAS_SOFTCAP)
        q = z
        if HAS_MASS:
            q, _ = target_mass(target_ptr, target_offsets, weight_ptr, cols, col_mask, mask, counted,
                               eps, smooth, PROBS, HAS_WEIGHT)  # fmt: skip
        m, sum_exp, q_sum, q_dot = online_update(m, sum_exp, q_sum, q_dot, z, q, HAS_MASS)
    else:
        m, sum_exp, q_sum, q_dot = stats_pass(
            logits_ptr, row_offsets, row_mask, target_ptr, target_offsets, weight_ptr, counted,
            0, num_classes, eps, smooth, softcap, m, sum_exp, q_sum, q_dot,
            PROBS, HAS_WEIGHT, HAS_MASS, HAS_SOFTCAP, BLOCK, EVICT,
        )  # fmt: skip
    loss, lse, coeff, m, log_sum_exp = finish(
        m, sum_exp, q_sum, q_dot, hard, z_y, counted, out_of_range, z_loss, PROBS
    )
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if WRITE_GRAD or WRITE_TGRAD:
        scale = tl.load(scale_ptr + rows * scale_stride, mask=row_mask, other=0.0).to(tl.float32)
        scale = tl.where(counted, scale, 0.0)
        if SINGLE_PASS:
            grad_block(raw, cols, col_mask, mask, counted, y, hard, m, log_sum_exp, coeff, scale,
                       target_ptr, target_offsets, weight_ptr, eps, smooth, softcap,
                       grad_ptr, rows * grad_stride, tgrad_ptr, rows * tgrad_stride,
                       PROBS, HAS_WEIGHT, HAS_MASS, HAS_SOFTCAP, WRITE_GRAD, WRITE_TGRAD)  # fmt: skip
        else:
            grad_pass(logits_ptr, row_offsets, row_mask, counted, y, hard, m, log_sum_exp, coeff, scale,
                      0, num_classes, target_ptr, target_offsets, weight_ptr, eps, smooth, softcap,
                      grad_ptr, rows * grad_stride, tgrad_ptr, rows * tgrad_stride,
                      PROBS, HAS_WEIGHT, HAS_MASS, HAS_SOFTCAP, WRITE_GRAD, WRITE_TGRAD, BLOCK)  # fmt: skip


@triton.jit
def _softmax_xent_split_stats_kernel(
    logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, partials_ptr, z_y_ptr,
    n_rows, num_classes, split_columns, splits, ignore_index, eps, softcap,
    BLOCK: tl.constexpr, PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MASS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, EVICT: tl.constexpr,
):  # fmt: skip
    # program (row, split): the partial statistics of the row's columns [lo, hi)
    rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    split = tl.program_id(1)
    row_mask = rows < n_rows
    row_offsets = rows * logits_stride
    target_offsets = rows * target_stride
    y, counted, _, _ = row_targets(
        target_ptr, rows, row_mask, weight_ptr, num_classes, ignore_index, eps, 1, PROBS, HAS_WEIGHT
    )
    lo = split * split_columns
    hi = tl.minimum(lo + split_columns, num_classes)
    m, sum_exp, q_sum, q_dot = stats_pass(
        logits_ptr, row_offsets, row_mask, target_ptr, target_offsets, weight_ptr, counted, lo, hi,
        eps, eps / num_classes, softcap,
        tl.full([1], float("-inf"), tl.float32), tl.zeros([1], tl.float32), tl.zeros([1], tl.float32),
        tl.zeros([1], tl.float32), PROBS, HAS_WEIGHT, HAS_MASS, HAS_SOFTCAP, BLOCK, EVICT,
    )  # fmt: skip
    plane = n_rows * splits
    at = partials_ptr + rows * splits + split
    tl.store(at, m, mask=row_mask)
    tl.store(at + plane, sum_exp, mask=row_mask)
    tl.store(at + 2 * plane, q_sum, mask=row_mask)
    tl.store(at + 3 * plane, q_dot, mask=row_mask)
    # z_y before any gradient is written (the gradient may overwrite the logits)
    z_y = true_logit(logits_ptr, row_offsets, y, counted, softcap, HAS_SOFTCAP)
    tl.store(z_y_ptr + rows, z_y, mask=row_mask & (split + tl.zeros([1], tl.int32) == 0))


@triton.jit
def _softmax_xent_split_grad_kernel(
    logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, partials_ptr, z_y_ptr,
    scale_ptr, scale_stride, loss_ptr, lse_ptr, grad_ptr, grad_stride, tgrad_ptr, tgrad_stride,
    n_rows, num_classes, split_columns, splits, ignore_index, eps, z_loss, softcap,
    BLOCK: tl.constexpr, SPLITS: tl.constexpr, PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_MASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr,
):  # fmt: skip
    # program (row, split): combine the row's partials (M = max m_s, Σexp = Σ_s Σexp_s·e^{m_s − M},
    # Σq(z − M) = Σ_s [Σq(z − m_s)]_s + [Σq]_s·(m_s − M)), then write the gradient of columns [lo, hi)
    rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    split = tl.program_id(1)
    row_mask = rows < n_rows
    row_offsets = rows * logits_stride
    target_offsets = rows * target_stride
    parts = tl.arange(0, SPLITS)
    part_mask = row_mask[:, None] & (parts < splits)[None, :]
    plane = n_rows * splits
    at = partials_ptr + rows[:, None] * splits + parts[None, :]
    m_parts = tl.load(at, mask=part_mask, other=float("-inf"))
    sum_parts = tl.load(at + plane, mask=part_mask, other=0.0)
    q_sum_parts = tl.load(at + 2 * plane, mask=part_mask, other=0.0)
    q_dot_parts = tl.load(at + 3 * plane, mask=part_mask, other=0.0)
    m = tl.max(m_parts, 1)
    rise = tl.where(m_parts == m[:, None], 0.0, m[:, None] - m_parts)
    sum_exp = tl.sum(sum_parts * tl.exp(-rise), 1)
    q_sum = tl.sum(q_sum_parts, 1)
    q_dot = tl.sum(q_dot_parts - mass_shift(q_sum_parts, rise), 1)
    y, counted, out_of_range, hard = row_targets(
        target_ptr, rows, row_mask, weight_ptr, num_classes, ignore_index, eps, 1, PROBS, HAS_WEIGHT
    )
    z_y = tl.load(z_y_ptr + rows, mask=row_mask & counted, other=0.0)
    loss, lse, coeff, m, log_sum_exp = finish(
        m, sum_exp, q_sum, q_dot, hard, z_y, counted, out_of_range, z_loss, PROBS
    )
    first = row_mask & (split + tl.zeros([1], tl.int32) == 0)
    tl.store(loss_ptr + rows, loss, mask=first)
    tl.store(lse_ptr + rows, lse, mask=first)
    if WRITE_GRAD or WRITE_TGRAD:
        scale = tl.load(scale_ptr + rows * scale_stride, mask=row_mask, other=0.0).to(tl.float32)
        scale = tl.where(counted, scale, 0.0)
        lo = split * split_columns
        hi = tl.minimum(lo + split_columns, num_classes)
        grad_pass(logits_ptr, row_offsets, row_mask, counted, y, hard, m, log_sum_exp, coeff, scale,
                  lo, hi, target_ptr, target_offsets, weight_ptr, eps, eps / num_classes, softcap,
                  grad_ptr, rows * grad_stride, tgrad_ptr, rows * tgrad_stride,
                  PROBS, HAS_WEIGHT, HAS_MASS, HAS_SOFTCAP, WRITE_GRAD, WRITE_TGRAD, BLOCK)  # fmt: skip


def softmax_xent_block(
    logits: Tensor,
    target: Tensor,
    spec: SoftmaxLoss,
    *,
    grad_scale: Tensor | float | None = None,
    grad_out: Tensor | None = None,
    target_grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`softxent.ops.torch_blocks.softmax_xent_block` as one Triton launch (two for rows split over
    several programs), fp32 math; float64 input goes to the torch version, whose math is float64.

    logits: (..., C); target: (...) class indices or (..., C) probabilities; ``grad_scale``: a scalar or
    (...); returns (loss, lse), (...) in fp32. ``grad_out`` may alias ``logits`` (the gradient then
    overwrites them in place).
    """
    if logits.dtype == torch.float64:
        return torch_blocks.softmax_xent_block(
            logits, target, spec, grad_scale=grad_scale, grad_out=grad_out, target_grad_out=target_grad_out
        )
    num_classes = logits.shape[-1]
    batch_shape = logits.shape[:-1]
    z = rows(logits, num_classes)
    count = z.shape[0]
    probabilities = target.is_floating_point()
    t = rows(target, num_classes) if probabilities else target.reshape(-1).contiguous()
    device = logits.device
    loss = torch.empty(count, dtype=torch.float32, device=device)
    lse = torch.empty(count, dtype=torch.float32, device=device)
    write_grad = grad_scale is not None and grad_out is not None
    write_tgrad = grad_scale is not None and target_grad_out is not None
    scale = loss
    if grad_scale is not None:
        scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=device)
        if scale.dim():
            scale = scale.expand(batch_shape).reshape(-1)
    grad = out_rows(grad_out, num_classes) if write_grad else None
    tgrad = out_rows(target_grad_out, num_classes) if write_tgrad else None
    weight = spec.weight
    if weight is not None and (weight.dtype != torch.float32 or weight.device != device):
        weight = weight.to(device=device, dtype=torch.float32)
    if count and num_classes:
        shape = policies.row_launch(count, num_classes, policies.hardware(device))
        flags = dict(
            PROBS=probabilities,
            HAS_WEIGHT=weight is not None,
            HAS_MASS=probabilities or spec.label_smoothing > 0,
            HAS_SOFTCAP=spec.softcap is not None,
        )
        target_stride = t.stride(0) if probabilities else 0
        common = (z, z.stride(0), t, target_stride, weight if weight is not None else loss)
        options = (spec.ignore_index, float(spec.label_smoothing))
        outputs = (
            grad if grad is not None else z, grad.stride(0) if grad is not None else 0,
            tgrad if tgrad is not None else z, tgrad.stride(0) if tgrad is not None else 0,
        )  # fmt: skip
        scale_stride = scale.stride(0) if scale.dim() else 0
        softcap = float(spec.softcap or 1.0)
        # the first pass's loads ask L2 to keep the logits where a second pass reads them again
        evict = "evict_last" if write_grad or write_tgrad else "evict_first"
        if shape.splits == 1:
            launch(
                _softmax_xent_rows_kernel, (triton.cdiv(count, shape.rows_per_program),),
                *common, scale, scale_stride, loss, lse, *outputs,
                count, num_classes, *options, float(spec.z_loss), softcap,
                ROWS=shape.rows_per_program, BLOCK=shape.block, SINGLE_PASS=shape.single_pass, **flags,
                WRITE_GRAD=write_grad, WRITE_TGRAD=write_tgrad, EVICT=evict, num_warps=shape.num_warps,
            )  # fmt: skip
        else:
            split_columns = policies.split_bounds(num_classes, shape.splits, shape.block)
            splits = triton.cdiv(num_classes, split_columns)
            partials = torch.empty(4, count, splits, dtype=torch.float32, device=device)
            z_y = torch.empty(count, dtype=torch.float32, device=device)
            launch(
                _softmax_xent_split_stats_kernel, (count, splits),
                *common, partials, z_y, count, num_classes, split_columns, splits, *options, softcap,
                BLOCK=shape.block, **flags, EVICT=evict, num_warps=shape.num_warps,
            )  # fmt: skip
            launch(
                _softmax_xent_split_grad_kernel, (count, splits if write_grad or write_tgrad else 1),
                *common, partials, z_y, scale, scale_stride, loss, lse, *outputs,
                count, num_classes, split_columns, splits, *options, float(spec.z_loss), softcap,
                BLOCK=shape.block, SPLITS=triton.next_power_of_2(splits), **flags,
                WRITE_GRAD=write_grad, WRITE_TGRAD=write_tgrad, num_warps=shape.num_warps,
            )  # fmt: skip
    elif count:
        loss.zero_()  # no classes: an empty sum, as torch's per-position loss; the lse of nothing is −inf
        lse.fill_(-math.inf)
    copy_back(grad_out, grad)
    copy_back(target_grad_out, tgrad)
    return loss.view(batch_shape), lse.view(batch_shape)
