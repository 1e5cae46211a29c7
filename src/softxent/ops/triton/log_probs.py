r"""Triton kernels for the per-token statistics of the softmax output layer and for distillation
divergences, one block of rows at a time: the contracts of :func:`softxent.ops.log_probs.stats_block`,
:func:`~softxent.ops.log_probs.grad_block` and :func:`softxent.ops.distillation.divergence_block`, so the
drivers run either.

Each row's logits l are transformed as the torch blocks do, z = c·tanh(s·l/c)/T (z = s·l/T without a
softcap), dz/dl = (s/T)·(1 − tanh²(s·l/c)).

Statistics (one launch): online softmax (arXiv 1805.02867) with a running max m and, relative to it,

.. math::
    S = Σ_c e^{z_c - m}, \quad A = Σ_c e^{z_c - m}(z_c - m), \quad Q = Σ_c e^{2(z_c - m)}

rescaled when m rises by r (S ← S·e^{−r}, A ← (A − r·S)·e^{−r}, Q ← Q·e^{−2r}); then log ŷ_y = (z_y − m) −
log S, H = log S − A/S, log Σŷ² = log Q − 2·log S, the first argmax and Σz / V beside them. With a gradient
buffer (the frozen head's forward), the same launch writes (e_y − ŷ)·dz/dl.

Gradient (one launch, one read and one write of each logit):
G = [g·(e_y − ŷ) − h·ŷ ⊙ (log ŷ + H)]·dz/dl with ŷ = exp((z − m) − log S).

Divergence (one launch): both normalizers first, then the loss terms (for jsd through
log m = logaddexp(log β + log p_t, log(1 − β) + log p_s)), then the gradient, which needs the row's
divergence (reverse_kl) or KL(p_s ‖ m) (jsd); forward_kl's gradient p_s − p_t is written with the loss.

Launch shapes: rows of at most ROW_IN_REGISTERS columns are held in registers, a tile of whole rows a
program, read once (the memory floor: one read of the logits, one write of the gradient). Wider rows
stream through blocks of STREAM_BLOCK columns, one program a row, once per pass: two reads for the
statistics with a gradient, three for reverse_kl and jsd with a gradient. A row is not split over several
programs: the linear heads' chunks hold hundreds of rows and more, enough to fill the GPU. Every launch
covers all rows of its block; no atomics, no host synchronization.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from softxent.ops import log_probs as token_blocks
from softxent.ops import policy as policies
from softxent.ops.distillation import Divergence
from softxent.ops.distillation import divergence_block as torch_divergence_block
from softxent.ops.log_probs import STATS, Transform
from softxent.ops.triton.launches import launch
from softxent.ops.triton.layout import copy_back, out_rows, rows
from softxent.ops.triton.rowmath import tanh, to_output

FORMS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _transformed(raw, mask, inner, outer, slope_scale, HAS_SOFTCAP: tl.constexpr):
    """(z, dz/dl) of a tile of raw logits in fp32, z = −inf where masked."""
    x = raw.to(tl.float32)
    if HAS_SOFTCAP:
        t = tanh(x * inner)
        z = tl.where(mask, t * outer, float("-inf"))
        slope = (1.0 - t * t) * slope_scale
    else:
        z = tl.where(mask, x * inner, float("-inf"))
        slope = tl.zeros_like(z) + slope_scale
    return z, slope


@triton.jit
def _token_rows(target_ptr, rows, row_mask, num_classes, ignore_index):
    """(y, counted, out_of_range) per row; y = 0 where the row does not count. GPU targets are not checked
    on the host (a sync): a class outside [0, V) does not count, reads nothing and gives nan."""
    y = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    not_ignored = y != ignore_index
    out_of_range = not_ignored & ((y < 0) | (y >= num_classes))
    counted = not_ignored & ~out_of_range & row_mask
    return tl.where(counted, y, 0), counted, out_of_range


@triton.jit
def _online(m, s, a, q, z):
    """Fold a tile z (−inf where masked) into the running (m, S, A, Q) of the module docstring."""
    m_new = tl.maximum(m, tl.max(z, 1))
    # a row with no finite logit yet keeps m = −inf: the nan of m_new − m is never selected
    rise = tl.where(m_new == m, 0.0, m_new - m)
    decay = tl.exp(-rise)
    a = tl.where((s == 0.0) | (rise == 0.0), a, a - rise * s) * decay
    s = s * decay
    q = q * decay * decay
    shifted = z - tl.where(m_new == float("-inf"), 0.0, m_new)[:, None]
    e = tl.exp(shifted)
    s += tl.sum(e, 1)
    a += tl.sum(tl.where(e > 0.0, e * shifted, 0.0), 1)
    q += tl.sum(e * e, 1)
    return m_new, s, a, q


@triton.jit
def _first_max(z, cols, best, best_index, num_classes):
    """The running first argmax: a tile's maximum replaces the best only where strictly greater."""
    tile_max = tl.max(z, 1)
    index = tl.min(tl.where(z == tile_max[:, None], cols[None, :], num_classes), 1).to(tl.int64)
    take = tile_max > best
    return tl.where(take, tile_max, best), tl.where(take, index, best_index)


@triton.jit
def _log_prob_grad_tile(z, slope, cols, mask, y, counted, m, log_sum_exp, g, h, entropy,
                        HAS_G: tl.constexpr, HAS_H: tl.constexpr):  # fmt: skip
    """[g·(e_y − ŷ) − h·ŷ ⊙ (log ŷ + H)]·dz/dl on a tile (g, h 0 on rows that do not count)."""
    log_p = (z - m[:, None]) - log_sum_exp[:, None]
    p = tl.exp(log_p)
    grad = tl.zeros_like(z)
    if HAS_H:
        grad -= h[:, None] * tl.where(p > 0.0, p * (log_p + entropy[:, None]), 0.0)
    if HAS_G:
        grad += g[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
    return tl.where(mask & counted[:, None], grad * slope, 0.0)


@triton.jit
def _log_prob_stats_kernel(
    logits_ptr, logits_stride, target_ptr, stats_ptr, grad_ptr, grad_stride,
    n_rows, num_classes, ignore_index, inner, outer, slope_scale,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, COLUMNS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    offsets = rows * logits_stride
    y, counted, out_of_range = _token_rows(target_ptr, rows, row_mask, num_classes, ignore_index)
    raw_y = tl.load(logits_ptr + offsets + y, mask=counted, other=0.0)
    z_y, _slope_y = _transformed(raw_y[:, None], counted[:, None], inner, outer, slope_scale, HAS_SOFTCAP)
    z_y = tl.where(counted, tl.sum(z_y, 1), 0.0)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    a = tl.zeros([ROWS], tl.float32)
    q = tl.zeros([ROWS], tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    best = tl.full([ROWS], float("-inf"), tl.float32)
    best_index = tl.zeros([ROWS], tl.int64)
    base = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        # whole rows in registers: one read
        mask = row_mask[:, None] & (base < num_classes)[None, :]
        raw = tl.load(logits_ptr + offsets[:, None] + base[None, :], mask=mask, other=0.0)
        z, slope = _transformed(raw, mask, inner, outer, slope_scale, HAS_SOFTCAP)
        m, s, a, q = _online(m, s, a, q, z)
        total += tl.sum(tl.where(mask, z, 0.0), 1)
        best, best_index = _first_max(z, base, best, best_index, num_classes)
    else:
        for start in range(0, num_classes, BLOCK):
            cols = start + base
            mask = row_mask[:, None] & (cols < num_classes)[None, :]
            raw = tl.load(logits_ptr + offsets[:, None] + cols[None, :], mask=mask, other=0.0,
                          eviction_policy="evict_last")  # fmt: skip
            z, slope = _transformed(raw, mask, inner, outer, slope_scale, HAS_SOFTCAP)
            m, s, a, q = _online(m, s, a, q, z)
            total += tl.sum(tl.where(mask, z, 0.0), 1)
            best, best_index = _first_max(z, cols, best, best_index, num_classes)
    log_sum_exp = tl.log(s)
    bad = tl.where(out_of_range, float("nan"), 0.0)
    at = stats_ptr + rows * COLUMNS
    tl.store(at + 0, tl.where(counted, (z_y - m) - log_sum_exp, bad), mask=row_mask)
    tl.store(at + 1, tl.where(counted, log_sum_exp - a / s, bad), mask=row_mask)
    tl.store(at + 2, tl.where(counted, tl.where(best_index == y, 1.0, 0.0), bad), mask=row_mask)
    tl.store(at + 3, tl.where(counted, tl.log(q) - 2.0 * log_sum_exp, bad), mask=row_mask)
    tl.store(at + 4, tl.where(counted, total / num_classes, bad), mask=row_mask)
    tl.store(at + 5, m, mask=row_mask)
    tl.store(at + 6, log_sum_exp, mask=row_mask)
    if WRITE_GRAD:
        # ∂ log ŷ_y/∂l = (e_y − ŷ)·dz/dl, the frozen head's forward
        one = tl.where(counted, 1.0, 0.0)
        unused = tl.zeros([ROWS], tl.float32)
        if SINGLE_PASS:
            grad = _log_prob_grad_tile(z, slope, base, mask, y, counted, m, log_sum_exp, one, unused, unused,
                                       True, False)  # fmt: skip
            tl.store(grad_ptr + rows[:, None] * grad_stride + base[None, :], to_output(grad, grad_ptr),
                     mask=mask)  # fmt: skip
        else:
            for start in range(0, num_classes, BLOCK):
                cols = start + base
                mask = row_mask[:, None] & (cols < num_classes)[None, :]
                raw = tl.load(logits_ptr + offsets[:, None] + cols[None, :], mask=mask, other=0.0,
                              eviction_policy="evict_first")  # fmt: skip
                z, slope = _transformed(raw, mask, inner, outer, slope_scale, HAS_SOFTCAP)
                grad = _log_prob_grad_tile(z, slope, cols, mask, y, counted, m, log_sum_exp, one, unused,
                                           unused, True, False)  # fmt: skip
                tl.store(grad_ptr + rows[:, None] * grad_stride + cols[None, :], to_output(grad, grad_ptr),
                         mask=mask, cache_modifier=".cs")  # fmt: skip


@triton.jit
def _log_prob_grad_kernel(
    logits_ptr, logits_stride, target_ptr, m_ptr, lse_ptr, entropy_ptr, stats_stride,
    g_ptr, g_stride, h_ptr, h_stride, grad_ptr, grad_stride,
    n_rows, num_classes, ignore_index, inner, outer, slope_scale,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G: tl.constexpr,
    HAS_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    offsets = rows * logits_stride
    y, counted, _out_of_range = _token_rows(target_ptr, rows, row_mask, num_classes, ignore_index)
    m = tl.load(m_ptr + rows * stats_stride, mask=row_mask, other=0.0)
    log_sum_exp = tl.load(lse_ptr + rows * stats_stride, mask=row_mask, other=0.0)
    entropy = tl.load(entropy_ptr + rows * stats_stride, mask=row_mask, other=0.0)
    g = tl.zeros([ROWS], tl.float32)
    h = tl.zeros([ROWS], tl.float32)
    if HAS_G:
        g = tl.where(counted, tl.load(g_ptr + rows * g_stride, mask=counted, other=0.0).to(tl.float32), 0.0)
    if HAS_H:
        h = tl.where(counted, tl.load(h_ptr + rows * h_stride, mask=counted, other=0.0).to(tl.float32), 0.0)
    base = tl.arange(0, BLOCK)
    for start in range(0, num_classes, BLOCK):
        cols = start + base
        mask = row_mask[:, None] & (cols < num_classes)[None, :]
        raw = tl.load(logits_ptr + offsets[:, None] + cols[None, :], mask=mask, other=0.0,
                      eviction_policy="evict_first")  # fmt: skip
        z, slope = _transformed(raw, mask, inner, outer, slope_scale, HAS_SOFTCAP)
        grad = _log_prob_grad_tile(z, slope, cols, mask, y, counted, m, log_sum_exp, g, h, entropy,
                                   HAS_G, HAS_H)  # fmt: skip
        tl.store(grad_ptr + rows[:, None] * grad_stride + cols[None, :], to_output(grad, grad_ptr), mask=mask,
                 cache_modifier=".cs")  # fmt: skip


def _transform_args(transform: Transform) -> tuple[float, float, float, bool]:
    """(inner, outer, slope_scale, has_softcap): z = outer·tanh(inner·l), dz/dl = slope_scale·(1 − tanh²);
    without a softcap z = inner·l."""
    slope_scale = transform.logit_scale / transform.temperature
    if transform.softcap is None:
        return slope_scale, 1.0, slope_scale, False
    return (
        transform.logit_scale / transform.softcap,
        transform.softcap / transform.temperature,
        slope_scale,
        True,
    )


def _shape(count: int, columns: int, device: torch.device) -> policies.RowLaunch:
    """The row kernels' tiles: whole rows in registers where narrow, else one streaming program a row."""
    shape = policies.row_launch(count, columns, policies.hardware(device))
    if shape.single_pass:
        return shape
    return policies.RowLaunch(policies.STREAM_BLOCK, 1, policies.STREAM_WARPS, 1, False)


def stats_block(
    logits: Tensor, target: Tensor, transform: Transform, ignore_index: int, grad_out: Tensor | None = None
) -> Tensor:
    """:func:`softxent.ops.log_probs.stats_block` as one Triton launch, fp32 math (float64 logits go to the
    torch version). logits (B, V), target (B,); returns (B, len(STATS)) fp32; ``grad_out`` (B, V) may alias
    ``logits``."""
    if logits.dtype == torch.float64:
        return token_blocks.stats_block(logits, target, transform, ignore_index, grad_out)
    count, columns = logits.shape
    z = rows(logits, columns)
    stats = torch.empty(count, len(STATS), dtype=torch.float32, device=logits.device)
    grad = out_rows(grad_out, columns) if grad_out is not None else None
    if count and columns:
        shape = _shape(count, columns, logits.device)
        launch(
            _log_prob_stats_kernel, (triton.cdiv(count, shape.rows_per_program),),
            z, z.stride(0), target.contiguous(), stats, grad if grad is not None else z,
            grad.stride(0) if grad is not None else 0, count, columns, ignore_index,
            *_transform_args(transform)[:3],
            ROWS=shape.rows_per_program, BLOCK=shape.block, SINGLE_PASS=shape.single_pass,
            HAS_SOFTCAP=transform.softcap is not None, WRITE_GRAD=grad is not None, COLUMNS=len(STATS),
            num_warps=shape.num_warps,
        )  # fmt: skip
    elif count:
        # no classes: torch's empty reductions (−inf max, log Σexp of nothing)
        stats.copy_(token_blocks.stats_block(logits.float(), target, transform, ignore_index))
    copy_back(grad_out, grad)
    return stats


def grad_block(
    logits: Tensor,
    target: Tensor,
    transform: Transform,
    ignore_index: int,
    row_max: Tensor,
    log_sum_exp: Tensor,
    entropy: Tensor,
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
    grad_out: Tensor,
) -> None:
    """:func:`softxent.ops.log_probs.grad_block` as one Triton launch (float64 logits go to the torch
    version): ``row_max``, ``log_sum_exp``, ``entropy`` (B,) with one stride (columns of the stats)."""
    if logits.dtype == torch.float64:
        token_blocks.grad_block(
            logits, target, transform, ignore_index, row_max, log_sum_exp, entropy,
            grad_log_probs, grad_entropy, grad_out,
        )  # fmt: skip
        return
    count, columns = logits.shape
    if not (count and columns):
        return
    if not (row_max.stride(0) == log_sum_exp.stride(0) == entropy.stride(0)):
        row_max, log_sum_exp, entropy = (t.contiguous() for t in (row_max, log_sum_exp, entropy))
    z = rows(logits, columns)
    grad = out_rows(grad_out, columns)
    shape = _shape(count, columns, logits.device)
    g = grad_log_probs if grad_log_probs is not None else row_max
    h = grad_entropy if grad_entropy is not None else row_max
    launch(
        _log_prob_grad_kernel, (triton.cdiv(count, shape.rows_per_program),),
        z, z.stride(0), target.contiguous(), row_max, log_sum_exp, entropy, row_max.stride(0),
        g, g.stride(0), h, h.stride(0), grad, grad.stride(0), count, columns, ignore_index,
        *_transform_args(transform)[:3],
        ROWS=shape.rows_per_program, BLOCK=shape.block, HAS_SOFTCAP=transform.softcap is not None,
        HAS_G=grad_log_probs is not None, HAS_H=grad_entropy is not None, num_warps=shape.num_warps,
    )  # fmt: skip
    copy_back(grad_out, grad)


# ----------------------------------------------------------------------------------------------------------
# Distillation divergences
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _logaddexp(a, b):
    top = tl.maximum(a, b)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return tl.where(top == float("-inf"), float("-inf"), safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)))


@triton.jit
def _normalizer(m, s, z):
    """Fold a tile into the running (m, Σ e^{z − m})."""
    m_new = tl.maximum(m, tl.max(z, 1))
    rise = tl.where(m_new == m, 0.0, m_new - m)
    shifted = z - tl.where(m_new == float("-inf"), 0.0, m_new)[:, None]
    return m_new, s * tl.exp(-rise) + tl.sum(tl.exp(shifted), 1)


@triton.jit
def _plogq(log_p, log_q):
    """p·(log p − log q), 0·log 0 = 0."""
    p = tl.exp(log_p)
    return tl.where(p > 0.0, p * (log_p - log_q), 0.0)


@triton.jit
def _divergence_tiles(student_ptr, s_offsets, teacher_ptr, t_offsets, cols, mask,
                      s_inner, s_outer, s_slope, t_inner, t_outer, t_slope,
                      S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr):  # fmt: skip
    """(z_s, dz_s/dl, z_t) of a tile of both models' logits."""
    raw_s = tl.load(student_ptr + s_offsets[:, None] + cols[None, :], mask=mask, other=0.0)
    raw_t = tl.load(teacher_ptr + t_offsets[:, None] + cols[None, :], mask=mask, other=0.0)
    z_s, slope = _transformed(raw_s, mask, s_inner, s_outer, s_slope, S_SOFTCAP)
    z_t, _teacher_slope = _transformed(raw_t, mask, t_inner, t_outer, t_slope, T_SOFTCAP)
    return z_s, slope, z_t


@triton.jit
def _divergence_terms(z_s, z_t, m_s, lse_s, m_t, lse_t, log_beta, log_rest, FORM: tl.constexpr):
    """(log p_s, log p_t, log m, the tile's per-row loss terms (a, b)): forward_kl a = Σ p_t(log p_t −
    log p_s); reverse_kl a = Σ p_s(log p_s − log p_t); jsd a = Σ p_t(log p_t − log m), b = Σ p_s(log p_s −
    log m)."""
    log_ps = (z_s - m_s[:, None]) - lse_s[:, None]
    log_pt = (z_t - m_t[:, None]) - lse_t[:, None]
    log_m = log_ps
    b = tl.zeros_like(m_s)
    if FORM == 0:
        a = tl.sum(_plogq(log_pt, log_ps), 1)
    elif FORM == 1:
        a = tl.sum(_plogq(log_ps, log_pt), 1)
    else:
        log_m = _logaddexp(log_pt + log_beta, log_ps + log_rest)
        a = tl.sum(_plogq(log_pt, log_m), 1)
        b = tl.sum(_plogq(log_ps, log_m), 1)
    return log_ps, log_pt, log_m, a, b


@triton.jit
def _divergence_grad(log_ps, log_pt, log_m, row_term, scale, slope, rest, FORM: tl.constexpr):
    """scale·∂D/∂z_s·dz_s/dl on a tile; ``row_term`` is the row's KL (reverse_kl) or KL(p_s ‖ m) (jsd)."""
    p_s = tl.exp(log_ps)
    if FORM == 0:
        grad = p_s - tl.exp(log_pt)
    elif FORM == 1:
        grad = tl.where(p_s > 0.0, p_s * (log_ps - log_pt - row_term[:, None]), 0.0)
    else:
        grad = rest * tl.where(p_s > 0.0, p_s * (log_ps - log_m - row_term[:, None]), 0.0)
    return grad * slope * scale[:, None]


@triton.jit
def _divergence_kernel(
    student_ptr, student_stride, teacher_ptr, teacher_stride, counted_ptr, scale_ptr, scale_stride,
    loss_ptr, grad_ptr, grad_stride, n_rows, num_classes, beta, log_beta, log_rest,
    s_inner, s_outer, s_slope, t_inner, t_outer, t_slope,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr, FORM: tl.constexpr,
    S_SOFTCAP: tl.constexpr, T_SOFTCAP: tl.constexpr, HAS_COUNTED: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    s_offsets = rows * student_stride
    t_offsets = rows * teacher_stride
    counted = row_mask
    if HAS_COUNTED:
        counted = row_mask & (tl.load(counted_ptr + rows, mask=row_mask, other=0) != 0)
    scale = tl.zeros([ROWS], tl.float32)
    if WRITE_GRAD:
        scale = tl.load(scale_ptr + rows * scale_stride, mask=row_mask, other=0.0).to(tl.float32)
        scale = tl.where(counted, scale, 0.0)
    rest = 1.0 - beta
    m_s = tl.full([ROWS], float("-inf"), tl.float32)
    m_t = tl.full([ROWS], float("-inf"), tl.float32)
    sum_s = tl.zeros([ROWS], tl.float32)
    sum_t = tl.zeros([ROWS], tl.float32)
    base = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        # whole rows in registers: one read of each model's logits
        mask = row_mask[:, None] & (base < num_classes)[None, :]
        z_s, slope, z_t = _divergence_tiles(student_ptr, s_offsets, teacher_ptr, t_offsets, base, mask,
                                            s_inner, s_outer, s_slope, t_inner, t_outer, t_slope,
                                            S_SOFTCAP, T_SOFTCAP)  # fmt: skip
        m_s, sum_s = _normalizer(m_s, sum_s, z_s)
        m_t, sum_t = _normalizer(m_t, sum_t, z_t)
        lse_s = tl.log(sum_s)
        lse_t = tl.log(sum_t)
        log_ps, log_pt, log_m, a, b = _divergence_terms(z_s, z_t, m_s, lse_s, m_t, lse_t, log_beta, log_rest,
                                                        FORM)  # fmt: skip
    else:
        for start in range(0, num_classes, BLOCK):
            cols = start + base
            mask = row_mask[:, None] & (cols < num_classes)[None, :]
            z_s, slope, z_t = _divergence_tiles(student_ptr, s_offsets, teacher_ptr, t_offsets, cols, mask,
                                                s_inner, s_outer, s_slope, t_inner, t_outer, t_slope,
                                                S_SOFTCAP, T_SOFTCAP)  # fmt: skip
            m_s, sum_s = _normalizer(m_s, sum_s, z_s)
            m_t, sum_t = _normalizer(m_t, sum_t, z_t)
        lse_s = tl.log(sum_s)
        lse_t = tl.log(sum_t)
        a = tl.zeros([ROWS], tl.float32)
        b = tl.zeros([ROWS], tl.float32)
        for start in range(0, num_classes, BLOCK):
            cols = start + base
            mask = row_mask[:, None] & (cols < num_classes)[None, :]
            z_s, slope, z_t = _divergence_tiles(student_ptr, s_offsets, teacher_ptr, t_offsets, cols, mask,
                                                s_inner, s_outer, s_slope, t_inner, t_outer, t_slope,
                                                S_SOFTCAP, T_SOFTCAP)  # fmt: skip
            log_ps, log_pt, log_m, a_tile, b_tile = _divergence_terms(z_s, z_t, m_s, lse_s, m_t, lse_t,
                                                                      log_beta, log_rest, FORM)  # fmt: skip
            a += a_tile
            b += b_tile
            if WRITE_GRAD and FORM == 0:
                # forward_kl's gradient p_s − p_t needs no row total: written with the loss terms
                grad = _divergence_grad(log_ps, log_pt, log_m, a, scale, slope, rest, FORM)
                tl.store(grad_ptr + rows[:, None] * grad_stride + cols[None, :], to_output(grad, grad_ptr),
                         mask=mask, cache_modifier=".cs")  # fmt: skip
    if FORM == 2:
        loss = beta * a + rest * b
        row_term = b
    else:
        loss = a
        row_term = a
    tl.store(loss_ptr + rows, tl.where(counted, loss, 0.0), mask=row_mask)
    if WRITE_GRAD:
        if SINGLE_PASS:
            grad = _divergence_grad(log_ps, log_pt, log_m, row_term, scale, slope, rest, FORM)
            tl.store(grad_ptr + rows[:, None] * grad_stride + base[None, :], to_output(grad, grad_ptr),
                     mask=mask)  # fmt: skip
        elif FORM != 0:
            for start in range(0, num_classes, BLOCK):
                cols = start + base
                mask = row_mask[:, None] & (cols < num_classes)[None, :]
                z_s, slope, z_t = _divergence_tiles(student_ptr, s_offsets, teacher_ptr, t_offsets, cols,
                                                    mask, s_inner, s_outer, s_slope, t_inner, t_outer,
                                                    t_slope, S_SOFTCAP, T_SOFTCAP)  # fmt: skip
                log_ps = (z_s - m_s[:, None]) - lse_s[:, None]
                log_pt = (z_t - m_t[:, None]) - lse_t[:, None]
                log_m = log_ps
                if FORM == 2:
                    log_m = _logaddexp(log_pt + log_beta, log_ps + log_rest)
                grad = _divergence_grad(log_ps, log_pt, log_m, row_term, scale, slope, rest, FORM)
                tl.store(grad_ptr + rows[:, None] * grad_stride + cols[None, :], to_output(grad, grad_ptr),
                         mask=mask, cache_modifier=".cs")  # fmt: skip


def divergence_block(
    student: Tensor,
    teacher: Tensor,
    divergence: Divergence,
    counted: Tensor | None,
    *,
    grad_scale: Tensor | None = None,
    grad_out: Tensor | None = None,
) -> Tensor:
    """:func:`softxent.ops.distillation.divergence_block` as one Triton launch, fp32 math (float64 logits
    go to the torch version): student and teacher (B, V), ``counted`` (B,) bool or None, ``grad_scale``
    0-d or (B,); returns the per-row divergence (B,) fp32. ``grad_out`` may alias ``student``."""
    if student.dtype == torch.float64 or teacher.dtype == torch.float64:
        return torch_divergence_block(
            student, teacher, divergence, counted, grad_scale=grad_scale, grad_out=grad_out
        )
    count, columns = student.shape
    z_s = rows(student, columns)
    z_t = rows(teacher, columns)
    loss = torch.empty(count, dtype=torch.float32, device=student.device)
    write_grad = grad_scale is not None and grad_out is not None
    grad = out_rows(grad_out, columns) if write_grad else None
    if count and columns:
        scale = loss
        if write_grad:
            scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=student.device)
            scale = scale.expand(count) if scale.dim() == 0 else scale
        form, beta = divergence.form, float(divergence.beta)
        shape = _shape(count, columns, student.device)
        s_args = _transform_args(divergence.student)
        t_args = _transform_args(divergence.teacher)
        launch(
            _divergence_kernel, (triton.cdiv(count, shape.rows_per_program),),
            z_s, z_s.stride(0), z_t, z_t.stride(0), loss if counted is None else counted.view(torch.uint8),
            scale, scale.stride(0) if scale.dim() else 0, loss, grad if grad is not None else z_s,
            grad.stride(0) if grad is not None else 0, count, columns, beta,
            math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf,
            *s_args[:3], *t_args[:3],
            ROWS=shape.rows_per_program, BLOCK=shape.block, SINGLE_PASS=shape.single_pass, FORM=FORMS[form],
            S_SOFTCAP=s_args[3], T_SOFTCAP=t_args[3], HAS_COUNTED=counted is not None, WRITE_GRAD=write_grad,
            num_warps=shape.num_warps,
        )  # fmt: skip
    elif count:
        loss.copy_(torch_divergence_block(student.float(), teacher.float(), divergence, counted))
    copy_back(grad_out, grad)
    return loss
