r"""Triton kernels for the ``memory="lean"`` linear head's vocabulary slices (:mod:`softxent.ops.lean`).

The contracts are :func:`softxent.ops.lean.slice_stats` and :func:`softxent.ops.lean.slice_grad`, so the
lean driver runs them unchanged; float64 input goes to those torch versions.

* ``_slice_stats_kernel``, one program per row: reads the row's S logits of the slice once and folds them
  into the running max m, Σ exp(z − m), Σq and Σq·(z − m) with the online softmax (arXiv 1805.02867),
  rescaling the sums when m grows; the slice that holds the true class stores its logit z_y (fp32).
  Memory traffic: one read of the slice, O(1) per row for the statistics.
* ``_slice_grad_kernel``, one program per (row, block of columns): writes
  s·[coeff·exp(z − lse) − q] (minus s·(1 − ε)·w_y at the true class), times 1 − tanh² under a softcap,
  over the slice's logits in place. Memory traffic: one read and one write of the slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from softxent.ops import lean
from softxent.ops.cpu import SoftmaxLoss
from softxent.ops.triton._layout import copy_back, out_rows
from softxent.ops.triton.cross_entropy import (
    _load_logits,
    _online_update,
    _tanh,
    _target_mass,
    _to_output,
)

STATS_BLOCK = 4096
GRAD_BLOCK = 1024


@triton.jit
def _row_target(target_ptr, row, start, num_classes, ignore_index, PROBS: tl.constexpr):
    """(counted, y − start) for a class-index target row; (True, −1) for probabilities."""
    counted = True
    y_local = -1
    if not PROBS:
        y = tl.load(target_ptr + row)
        counted = (y != ignore_index) & (y >= 0) & (y < num_classes)
        y_local = tl.where(counted, y - start, -1)
    return counted, y_local


@triton.jit
def _slice_stats_kernel(
    logits_ptr, logits_stride, width, start, num_classes, target_ptr, target_stride, weight_ptr,
    m_ptr, sum_exp_ptr, q_sum_ptr, q_dot_ptr, z_y_ptr, ignore_index, eps, softcap,
    PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    # probability targets: target_ptr and weight_ptr point at the slice's first class
    target_row = target_ptr + row * target_stride
    counted, y_local = _row_target(target_ptr, row, start, num_classes, ignore_index, PROBS)
    smooth = eps / num_classes

    m = tl.load(m_ptr + row)
    sum_exp = tl.load(sum_exp_ptr + row)
    q_sum = tl.load(q_sum_ptr + row)
    q_dot = tl.load(q_dot_ptr + row)
    for block_start in range(0, width, BLOCK):
        cols = block_start + tl.arange(0, BLOCK)
        mask = cols < width
        z = _load_logits(logits_row, cols, mask, softcap, HAS_SOFTCAP)
        q, _ = _target_mass(target_row, weight_ptr, cols, mask, eps, smooth, PROBS, HAS_WEIGHT)
        q = tl.where(counted, q, 0.0)
        m, sum_exp, q_sum, q_dot = _online_update(m, sum_exp, q_sum, q_dot, z, q)
    tl.store(m_ptr + row, m)
    tl.store(sum_exp_ptr + row, sum_exp)
    tl.store(q_sum_ptr + row, q_sum)
    tl.store(q_dot_ptr + row, q_dot)
    if not PROBS:
        # the true class's logit, read in fp32 by the slice that holds it
        in_slice = counted & (y_local >= 0) & (y_local < width)
        one = tl.arange(0, 1)
        inside = tl.minimum(tl.maximum(y_local, 0), width - 1) + one  # a valid column in every case
        z_y = _load_logits(logits_row, inside, one < 1, softcap, HAS_SOFTCAP)
        kept = tl.load(z_y_ptr + row + one)
        tl.store(z_y_ptr + row + one, tl.where(in_slice, z_y, kept))


@triton.jit
def _slice_grad_kernel(
    logits_ptr, logits_stride, width, start, num_classes, target_ptr, target_stride, weight_ptr,
    hard_ptr, m_ptr, log_sum_exp_ptr, coeff_ptr, scale_ptr, grad_ptr, grad_stride, tgrad_ptr, tgrad_stride,
    ignore_index, eps, softcap,
    PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    logits_row = logits_ptr + row * logits_stride
    target_row = target_ptr + row * target_stride
    counted, y_local = _row_target(target_ptr, row, start, num_classes, ignore_index, PROBS)
    scale = tl.where(counted, tl.load(scale_ptr + row), 0.0)
    m = tl.load(m_ptr + row)
    log_sum_exp = tl.load(log_sum_exp_ptr + row)
    coeff = tl.load(coeff_ptr + row)

    raw = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_SOFTCAP:
        tanh = _tanh(raw / softcap)
        z = tl.where(mask, softcap * tanh, float("-inf"))
    else:
        z = raw
    q, w = _target_mass(target_row, weight_ptr, cols, mask, eps, eps / num_classes, PROBS, HAS_WEIGHT)
    # log ŷ = (z − m) − log Σexp, m and log Σexp finite (softmax_shift): −inf for a −inf logit, and no
    # rounding of lse = m + log Σexp to an ulp of its size
    log_p = (z - m) - log_sum_exp
    if WRITE_TGRAD:
        tgrad = -(1.0 - eps) * w * tl.where(mask, log_p, 0.0) * scale
        tl.store(tgrad_ptr + row * tgrad_stride + cols, _to_output(tgrad, tgrad_ptr), mask=mask)
    if WRITE_GRAD:
        grad = coeff * tl.exp(log_p) - q
        if not PROBS:
            grad = grad - tl.where(cols == y_local, tl.load(hard_ptr + row), 0.0)
        grad = grad * scale
        if HAS_SOFTCAP:
            grad = grad * (1.0 - tanh * tanh)
        tl.store(grad_ptr + row * grad_stride + cols, _to_output(grad, grad_ptr), mask=mask)


def _common(logits: Tensor, start: int, targets: lean.Targets, spec: SoftmaxLoss):
    """Kernel arguments shared by both launches: the target (class indices, or the slice's probabilities)
    and its row stride, the slice's class weights."""
    target = targets.target
    probabilities = targets.probabilities
    if probabilities:
        target = targets.columns(start, start + logits.shape[1])
        target = target if target.stride(-1) == 1 else target.contiguous()
    target_stride = target.stride(0) if probabilities else 0
    weight = None
    if spec.weight is not None:
        weight = spec.weight.to(device=logits.device, dtype=torch.float32)[start:].contiguous()
    return target, target_stride, weight


def slice_stats(
    logits: Tensor, start: int, targets: lean.Targets, spec: SoftmaxLoss, num_classes: int,
    stats: lean.RowStats,
) -> None:  # fmt: skip
    """:func:`softxent.ops.lean.slice_stats` in one launch (fp32 statistics)."""
    if logits.dtype == torch.float64:
        return lean.slice_stats(logits, start, targets, spec, num_classes, stats)
    rows, width = logits.shape
    if not rows or not width:
        return None
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    target, target_stride, weight = _common(logits, start, targets, spec)
    _slice_stats_kernel[(rows,)](
        logits, logits.stride(0), width, start, num_classes, target, target_stride,
        weight if weight is not None else stats.m,
        stats.m, stats.sum_exp, stats.q_sum, stats.q_dot, stats.z_y,
        spec.ignore_index, float(spec.label_smoothing), float(spec.softcap or 1.0),
        PROBS=targets.probabilities, HAS_WEIGHT=weight is not None, HAS_SOFTCAP=spec.softcap is not None,
        BLOCK=min(STATS_BLOCK, triton.next_power_of_2(width)),
    )  # fmt: skip
    return None


def slice_grad(
    logits: Tensor,
    start: int,
    targets: lean.Targets,
    spec: SoftmaxLoss,
    num_classes: int,
    m: Tensor,
    log_sum_exp: Tensor,
    coeff: Tensor,
    scale: Tensor,
    grad_out: Tensor | None,
    target_grad_out: Tensor | None,
) -> None:
    """:func:`softxent.ops.lean.slice_grad` in one launch; ``grad_out`` may alias ``logits``."""
    if logits.dtype == torch.float64:
        return lean.slice_grad(
            logits, start, targets, spec, num_classes, m, log_sum_exp, coeff, scale, grad_out, target_grad_out
        )
    rows, width = logits.shape
    if not rows or not width or (grad_out is None and target_grad_out is None):
        return None
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    target, target_stride, weight = _common(logits, start, targets, spec)
    grad = out_rows(grad_out, width) if grad_out is not None else None
    tgrad = out_rows(target_grad_out, width) if target_grad_out is not None else None
    hard = targets.hard.to(torch.float32) if targets.hard is not None else m
    block = min(GRAD_BLOCK, triton.next_power_of_2(width))
    _slice_grad_kernel[(rows, triton.cdiv(width, block))](
        logits, logits.stride(0), width, start, num_classes, target, target_stride,
        weight if weight is not None else m, hard, m, log_sum_exp, coeff,
        scale.to(torch.float32).contiguous(),
        grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
        tgrad if tgrad is not None else logits, tgrad.stride(0) if tgrad is not None else 0,
        spec.ignore_index, float(spec.label_smoothing), float(spec.softcap or 1.0),
        PROBS=targets.probabilities, HAS_WEIGHT=weight is not None, HAS_SOFTCAP=spec.softcap is not None,
        WRITE_GRAD=grad is not None, WRITE_TGRAD=tgrad is not None, BLOCK=block,
    )  # fmt: skip
    copy_back(grad_out, grad)
    copy_back(target_grad_out, tgrad)
    return None
