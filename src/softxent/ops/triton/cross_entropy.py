r"""Triton kernel for the fused softmax cross-entropy of a block of rows: loss, lse and ŷ − y in one launch.

The contract is :func:`softxent.ops.cpu.softmax_xent_block`'s, so the torch backend's drivers (reductions,
blocks of rows, the autograd Function) run it unchanged.

One program per row. Pass 1 reads the row once, block by block, with the online softmax of Milakov &
Gimelshein (arXiv 1805.02867): a running max m and Σ exp(z − m), rescaled when m grows; beside them the
target-weighted sums Σ q_c and Σ q_c·(z_c − m), kept relative to the running max so that logits of ±1e4
do not cancel in fp32. The true class's term (1 − ε)·w_y·(z_y − m) is read directly in fp32. Then

.. math::
    ℓ = (Σ_c q_c)\,\log Σ_c e^{z_c - m} - Σ_c q_c (z_c - m) + λ\,\mathrm{lse}^2

with q the target distribution (smoothed, times the class weights). Pass 2 reads the row again and writes

.. math::
    \frac{∂ℓ}{∂z_c} = s\,[(Σ q + 2λ\,\mathrm{lse})\,ŷ_c - q_c]

(s: the reduction's scale), times 1 − tanh²(z/cap) under a softcap. Memory traffic: two reads of the
logits and one write of the gradient per row; the gradient may overwrite the logits in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from softxent.ops import cpu
from softxent.ops.triton._layout import copy_back, out_rows, rows

# Columns per block of a row: a power of two; rows narrower than this use the next power of two above C.
MAX_BLOCK = 4096


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}): no overflow for any x
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _to_output(value, ptr):
    """fp32 ``value`` in the element type of ``ptr``, rounded to nearest-even.

    The GPU rounds a store to bf16 to nearest-even; Triton's interpreter truncates instead (its bf16 is
    emulated through the bits), which doubles the rounding error the CPU tests would see. Rounding the
    bits here gives the same bf16 values on both: add half an ulp (0x7FFF, plus 1 when the kept last
    bit is odd, for ties to even) and drop the low 16 bits; nan stays nan."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value != value, value.to(tl.bfloat16), rounded)
    else:
        return value.to(ptr.dtype.element_ty)


@triton.jit
def _load_logits(row_ptr, cols, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """The row's logits at ``cols`` in fp32 (−inf where masked), softcapped: z = cap·tanh(z/cap)."""
    z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_SOFTCAP:
        z = tl.where(mask, softcap * _tanh(z / softcap), float("-inf"))
    return z


@triton.jit
def _target_mass(target_row_ptr, weight_ptr, cols, mask, eps, smooth,
                 PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr):  # fmt: skip
    """q_c for these columns, without the true class's hard term: ((1 − ε)·t_c + ε/C)·w_c for
    probability targets, (ε/C)·w_c for class indices; 0 where masked."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if PROBS:
        t = tl.load(target_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        q = (t * (1.0 - eps) + smooth) * w
    else:
        q = smooth * w
    return tl.where(mask, q, 0.0), w


@triton.jit
def _online_update(m, sum_exp, q_sum, q_dot, z, q):
    """Fold one block of a row's logits z (−inf where masked) and target mass q into the running
    (m, Σexp(z − m), Σq, Σq·(z − m)), rescaling the sums when the max m grows (arXiv 1805.02867)."""
    m_new = tl.maximum(m, tl.max(z, 0))
    same = m_new == m  # also when both are −inf: nothing to rescale
    # (the tl.where inside each op keeps −inf − (−inf) out of it, so no lane ever holds a nan)
    rise = tl.where(same, 0.0, m_new - m)
    sum_exp = sum_exp * tl.exp(-rise)
    q_dot = q_dot - q_sum * tl.where(q_sum == 0.0, 0.0, rise)
    is_neg_inf = z == float("-inf")
    shifted = tl.where(is_neg_inf, 0.0, z - m_new)
    sum_exp += tl.sum(tl.where(is_neg_inf, 0.0, tl.exp(shifted)), 0)
    # a −inf logit with target mass makes the loss +inf; without mass it adds nothing
    q_dot += tl.sum(tl.where(is_neg_inf, tl.where(q > 0.0, float("-inf"), 0.0), q * shifted), 0)
    q_sum += tl.sum(q, 0)
    return m_new, sum_exp, q_sum, q_dot


@triton.jit
def _softmax_xent_rows_kernel(
    logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, scale_ptr, loss_ptr, lse_ptr,
    grad_ptr, grad_stride, tgrad_ptr, tgrad_stride,
    num_classes, ignore_index, eps, z_loss, softcap,
    PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    target_row = target_ptr + row * target_stride
    smooth = eps / num_classes

    # the true class (class-index targets): its hard term (1 − ε)·w_y, read once in fp32
    counted = True
    out_of_range = False
    y = 0
    hard = 0.0
    if not PROBS:
        y = tl.load(target_row)
        counted = y != ignore_index
        # GPU targets are not range-checked on the host (that would be a sync): a class outside [0, C)
        # gives a nan loss and reads nothing out of bounds
        out_of_range = counted & ((y < 0) | (y >= num_classes))
        counted = counted & ~out_of_range
        y = tl.where(counted, y, 0)
        hard = 1.0 - eps
        if HAS_WEIGHT:
            hard = hard * tl.load(weight_ptr + y).to(tl.float32)
        hard = tl.where(counted, hard, 0.0)

    # pass 1: online max / Σexp, and Σq, Σq·(z − m) relative to the running max m
    m = tl.full([], float("-inf"), tl.float32)
    sum_exp = tl.zeros([], tl.float32)
    q_sum = tl.zeros([], tl.float32)
    q_dot = tl.zeros([], tl.float32)
    for start in range(0, num_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_classes
        z = _load_logits(logits_row, cols, mask, softcap, HAS_SOFTCAP)
        q, _ = _target_mass(target_row, weight_ptr, cols, mask, eps, smooth, PROBS, HAS_WEIGHT)
        m, sum_exp, q_sum, q_dot = _online_update(m, sum_exp, q_sum, q_dot, z, q)

    log_sum_exp = tl.log(sum_exp)
    lse = m + log_sum_exp
    if not PROBS:
        z_y = tl.max(
            _load_logits(logits_row, y + tl.arange(0, 1), tl.arange(0, 1) < 1, softcap, HAS_SOFTCAP), 0
        )
        q_dot += hard * tl.where(hard == 0.0, 0.0, z_y - m)
        q_sum += hard
    loss = q_sum * log_sum_exp - q_dot
    lse_if_z_loss = tl.where(z_loss == 0.0, 0.0, lse)
    z_coeff = 2.0 * z_loss * lse_if_z_loss
    loss += z_loss * lse_if_z_loss * lse_if_z_loss
    tl.store(loss_ptr + row, tl.where(counted, loss, tl.where(out_of_range, float("nan"), 0.0)))
    tl.store(lse_ptr + row, lse)

    # pass 2: ∂ℓ/∂z = s·[(Σq + 2λ·lse)·ŷ − q] (·(1 − tanh²) under a softcap); ∂ℓ/∂t = −s·(1 − ε)·w·log ŷ
    if WRITE_GRAD or WRITE_TGRAD:
        scale = tl.where(counted, tl.load(scale_ptr + row).to(tl.float32), 0.0)
        coeff = q_sum + z_coeff
        for start in range(0, num_classes, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < num_classes
            raw = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                tanh = _tanh(raw / softcap)
                z = tl.where(mask, softcap * tanh, float("-inf"))
            else:
                z = raw
            q, w = _target_mass(target_row, weight_ptr, cols, mask, eps, smooth, PROBS, HAS_WEIGHT)
            if WRITE_TGRAD:
                tgrad = -(1.0 - eps) * w * tl.where(mask, z - lse, 0.0) * scale
                tl.store(tgrad_ptr + row * tgrad_stride + cols, _to_output(tgrad, tgrad_ptr), mask=mask)
            if WRITE_GRAD:
                is_neg_inf = z == float("-inf")
                p = tl.where(is_neg_inf, 0.0, tl.exp(tl.where(is_neg_inf, 0.0, z - m)) / sum_exp)
                grad = coeff * p - q
                if not PROBS:
                    grad = grad - tl.where(cols == y, hard, 0.0)
                grad = grad * scale
                if HAS_SOFTCAP:
                    grad = grad * (1.0 - tanh * tanh)
                tl.store(grad_ptr + row * grad_stride + cols, _to_output(grad, grad_ptr), mask=mask)


def softmax_xent_block(
    logits: Tensor,
    target: Tensor,
    spec: cpu.SoftmaxLoss,
    *,
    grad_scale: Tensor | float | None = None,
    grad_out: Tensor | None = None,
    target_grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`softxent.ops.cpu.softmax_xent_block` in one Triton launch (fp32 math; float64 input goes to
    the torch version, whose math is float64).

    logits: (..., C); target: (...) class indices or (..., C) probabilities; returns (loss, lse), (...)
    in fp32. ``grad_out`` may alias ``logits`` (the gradient then overwrites them in place).
    """
    if logits.dtype == torch.float64:
        return cpu.softmax_xent_block(
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
    scale = None
    if grad_scale is not None:
        scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=device)
        scale = scale.expand(batch_shape).reshape(-1).contiguous()
    grad = out_rows(grad_out, num_classes) if write_grad else None
    tgrad = out_rows(target_grad_out, num_classes) if write_tgrad else None
    weight = (
        spec.weight.to(device=device, dtype=torch.float32).contiguous() if spec.weight is not None else None
    )
    if count and num_classes:
        block = min(MAX_BLOCK, triton.next_power_of_2(num_classes))
        _softmax_xent_rows_kernel[(count,)](
            z, z.stride(0), t, t.stride(0), weight if weight is not None else loss,
            scale if scale is not None else loss, loss, lse,
            grad if grad is not None else z, grad.stride(0) if grad is not None else 0,
            tgrad if tgrad is not None else z, tgrad.stride(0) if tgrad is not None else 0,
            num_classes, spec.ignore_index, float(spec.label_smoothing), float(spec.z_loss),
            float(spec.softcap or 1.0),
            PROBS=probabilities, HAS_WEIGHT=weight is not None, HAS_SOFTCAP=spec.softcap is not None,
            WRITE_GRAD=write_grad, WRITE_TGRAD=write_tgrad, BLOCK=block,
        )  # fmt: skip
    copy_back(grad_out, grad)
    copy_back(target_grad_out, tgrad)
    return loss.view(batch_shape), lse.view(batch_shape)
