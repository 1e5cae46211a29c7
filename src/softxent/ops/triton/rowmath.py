r"""Triton helpers shared by the softmax kernels (:mod:`.cross_entropy` on given logits, :mod:`.slices` on
the lean head's vocabulary slices): the math of :mod:`softxent.ops.spec` on tiles of ROWS rows × BLOCK
columns, with per-row statistics as (ROWS,) vectors.

Online softmax (Milakov & Gimelshein, arXiv 1805.02867): a running max m and Σ exp(z − m), rescaled when m
grows; beside them the target-weighted Σq and Σq·(z − m), kept relative to the running max so that logits
of ±1e4 do not cancel in fp32. The gradient of a block is

.. math::
    \frac{∂ℓ}{∂z_c} = s\,[(Σ q + 2λ\,\mathrm{lse})\,ŷ_c - q_c], \qquad
    ŷ_c = e^{(z_c - m) - \log Σ e^{z - m}}

(times 1 − tanh²(z/cap) under a softcap), m and log Σexp kept apart (:func:`softxent.ops.spec.softmax_shift`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh(x) = sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}): no overflow for any x
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def to_output(value, ptr):
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
def capped(raw, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """Logits in fp32 after the softcap z = cap·tanh(z/cap), −inf where masked (−inf where loaded)."""
    z = raw.to(tl.float32)
    if HAS_SOFTCAP:
        z = tl.where(mask, softcap * tanh(z / softcap), float("-inf"))
    return z


@triton.jit
def row_targets(target_ptr, rows, row_mask, weight_ptr, num_classes, ignore_index, eps,
                ROWS: tl.constexpr, PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr):  # fmt: skip
    """Per row of the tile: (y, counted, out_of_range, hard = (1 − ε)·w_y) for class-index targets (y = 0
    where the row does not count); for probabilities (0, the row mask, False, 0).

    GPU targets are not range-checked on the host (that would be a sync): a class outside [0, C) does not
    count (the kernels mark its loss nan) and nothing is read out of bounds."""
    if PROBS:
        y = tl.zeros([ROWS], tl.int64)
        counted = row_mask
        out_of_range = tl.zeros([ROWS], tl.int1)
        hard = tl.zeros([ROWS], tl.float32)
    else:
        y = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
        not_ignored = y != ignore_index
        out_of_range = not_ignored & ((y < 0) | (y >= num_classes))
        counted = not_ignored & ~out_of_range
        y = tl.where(counted, y, 0)
        hard = tl.full([ROWS], 1.0, tl.float32) - eps
        if HAS_WEIGHT:
            hard = hard * tl.load(weight_ptr + y, mask=counted, other=0.0).to(tl.float32)
        hard = tl.where(counted, hard, 0.0)
    return y, counted, out_of_range, hard


@triton.jit
def true_logit(logits_ptr, row_offsets, y, inside, softcap, HAS_SOFTCAP: tl.constexpr):
    """z_y per row, fp32 and softcapped, where ``inside`` (the row's class is among these columns); else 0.
    Read before any gradient of the row is written: the gradient may overwrite the logits."""
    raw = tl.load(logits_ptr + row_offsets + y, mask=inside, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        raw = softcap * tanh(raw / softcap)
    return tl.where(inside, raw, 0.0)


@triton.jit
def target_mass(target_ptr, target_offsets, weight_ptr, cols, col_mask, mask, counted, eps, smooth,
                PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr):  # fmt: skip
    """q on a tile without the true class's hard term, and the class weights w (broadcast over rows):
    q = ((1 − ε)·t_c + ε/C)·w_c for probabilities, (ε/C)·w_c for class indices; 0 where masked or not
    counted. ``target_offsets`` are the rows' offsets into the probabilities."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        w = tl.where(col_mask, 1.0, 0.0)[None, :]
    if PROBS:
        t = tl.load(target_ptr + target_offsets[:, None] + cols[None, :], mask=mask, other=0.0)
        q = (t.to(tl.float32) * (1.0 - eps) + smooth) * w
    else:
        q = smooth * w
    return tl.where(mask & counted[:, None], q, 0.0), w


@triton.jit
def mass_shift(q_sum, rise):
    """Σq·(m_old − m_new) when the running max rises by ``rise``: 0 where either is 0 (an infinite class
    weight makes Σq inf, and inf·0 would be nan where torch's loss is inf)."""
    return tl.where((q_sum == 0.0) | (rise == 0.0), 0.0, q_sum * rise)


@triton.jit
def online_update(m, sum_exp, q_sum, q_dot, z, q, HAS_MASS: tl.constexpr):
    """Fold a tile of logits z (−inf where masked) and target mass q into the running per-row
    (m, Σexp(z − m), Σq, Σq·(z − m)), rescaling the sums when the max m grows. Without mass (class targets,
    no smoothing: q = 0 off the true class) the target sums are left alone."""
    m_new = tl.maximum(m, tl.max(z, 1))
    # a row with no finite logit yet has m_new = m = −inf: the nan of their difference is never selected
    rise = tl.where(m_new == m, 0.0, m_new - m)
    sum_exp = sum_exp * tl.exp(-rise)
    shifted = z - tl.where(m_new == float("-inf"), 0.0, m_new)[:, None]  # −inf for a −inf logit
    sum_exp += tl.sum(tl.exp(shifted), 1)
    if HAS_MASS:
        q_dot = q_dot - mass_shift(q_sum, rise)
        # a −inf logit with target mass makes the loss +inf; without mass it adds nothing; the max logit
        # adds exactly 0 (also with an infinite class weight)
        mass_dot = tl.where(shifted == 0.0, 0.0, q * shifted)
        q_dot += tl.sum(tl.where(z == float("-inf"), tl.where(q > 0.0, float("-inf"), 0.0), mass_dot), 1)
        q_sum += tl.sum(q, 1)
    return m_new, sum_exp, q_sum, q_dot


@triton.jit
def stats_pass(logits_ptr, row_offsets, row_mask, target_ptr, target_offsets, weight_ptr, counted, lo, hi,
               eps, smooth, softcap, m, sum_exp, q_sum, q_dot,
               PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MASS: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    """Fold columns [lo, hi) of the tile's rows into the running statistics, BLOCK columns at a time.

    The next block is loaded before the current one is reduced, so a load is in flight while the program
    computes. Memory traffic: one read of the columns (``EVICT="evict_last"`` asks L2 to keep them for a
    second pass)."""
    base = tl.arange(0, BLOCK)
    cols = lo + base
    raw_next = tl.load(logits_ptr + row_offsets[:, None] + cols[None, :],
                       mask=row_mask[:, None] & (cols < hi)[None, :], other=float("-inf"),
                       eviction_policy=EVICT)  # fmt: skip
    for start in range(lo, hi, BLOCK):
        cols = start + base
        col_mask = cols < hi
        mask = row_mask[:, None] & col_mask[None, :]
        raw = raw_next
        ahead = cols + BLOCK
        raw_next = tl.load(logits_ptr + row_offsets[:, None] + ahead[None, :],
                           mask=row_mask[:, None] & (ahead < hi)[None, :], other=float("-inf"),
                           eviction_policy=EVICT)  # fmt: skip
        z = capped(raw, mask, softcap, HAS_SOFTCAP)
        q = z
        if HAS_MASS:
            q, _ = target_mass(target_ptr, target_offsets, weight_ptr, cols, col_mask, mask, counted,
                               eps, smooth, PROBS, HAS_WEIGHT)  # fmt: skip
        m, sum_exp, q_sum, q_dot = online_update(m, sum_exp, q_sum, q_dot, z, q, HAS_MASS)
    return m, sum_exp, q_sum, q_dot


@triton.jit
def finish(m, sum_exp, q_sum, q_dot, hard, z_y, counted, out_of_range, z_loss, PROBS: tl.constexpr):
    """Per row: (loss, lse, coeff, m, log Σexp) from the statistics of the whole row, for the gradient's
    ŷ = exp((z − m) − log Σexp): m is 0 and log Σexp nan for a row with no finite logit (no distribution:
    its ŷ and gradient are nan, as torch's are).

    loss = Σq·log Σexp − Σq·(z − m) + λ·lse², the true class's term kept whole as (1 − ε)·w_y·(log Σexp −
    (z_y − m)) (torch's w_y·(−log ŷ_y), inf for an infinite w_y), 0 for a row that does not count, nan
    for a class outside [0, C); coeff = Σq + 2λ·lse."""
    log_sum_exp = tl.log(sum_exp)
    lse = m + log_sum_exp
    loss = q_sum * log_sum_exp - q_dot
    if not PROBS:
        loss += tl.where(hard == 0.0, 0.0, hard * (log_sum_exp - (z_y - m)))
        q_sum += hard
    lse_if_z_loss = tl.where(z_loss == 0.0, 0.0, lse)
    loss += z_loss * lse_if_z_loss * lse_if_z_loss
    coeff = q_sum + 2.0 * z_loss * lse_if_z_loss
    loss = tl.where(counted, loss, tl.where(out_of_range, float("nan"), 0.0))
    m_finite = tl.where(m == float("-inf"), 0.0, m)
    log_sum_exp_or_nan = tl.where(log_sum_exp == float("-inf"), float("nan"), log_sum_exp)
    return loss, lse, coeff, m_finite, log_sum_exp_or_nan


@triton.jit
def grad_block(raw, cols, col_mask, mask, counted, y, hard, m, log_sum_exp, coeff, scale,
               target_ptr, target_offsets, weight_ptr, eps, smooth, softcap,
               grad_ptr, grad_offsets, tgrad_ptr, tgrad_offsets,
               PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MASS: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr):  # fmt: skip
    """Write a tile's s·∂ℓ/∂z (and, for probabilities, s·∂ℓ/∂t = −s·(1 − ε)·w·log ŷ) from its raw logits.

    ``m``, ``log_sum_exp`` (nan for a row with no finite logit), ``coeff`` and ``scale`` (0 for rows that
    do not count) are per row; ``y`` and ``cols`` share a frame (class indices relative to the same first
    column). Stores are streaming (``.cs``): nothing reads the gradient back in this kernel."""
    x = raw.to(tl.float32)
    if HAS_SOFTCAP:
        tanh_x = tanh(x / softcap)
        z = tl.where(mask, softcap * tanh_x, float("-inf"))
    else:
        z = x
    log_p = (z - m[:, None]) - log_sum_exp[:, None]  # log ŷ: −inf for a −inf logit
    q = z
    w = z
    if HAS_MASS or WRITE_TGRAD:
        q, w = target_mass(target_ptr, target_offsets, weight_ptr, cols, col_mask, mask, counted, eps, smooth,
                           PROBS, HAS_WEIGHT)  # fmt: skip
    if WRITE_TGRAD:
        tgrad = -(1.0 - eps) * w * tl.where(mask, log_p, 0.0) * scale[:, None]
        tl.store(tgrad_ptr + tgrad_offsets[:, None] + cols[None, :], to_output(tgrad, tgrad_ptr), mask=mask,
                 cache_modifier=".cs")  # fmt: skip
    if WRITE_GRAD:
        grad = coeff[:, None] * tl.exp(log_p)
        if HAS_MASS:
            grad = grad - q
        if not PROBS:
            grad = grad - tl.where(cols[None, :] == y[:, None], hard[:, None], 0.0)
        grad = grad * scale[:, None]
        if HAS_SOFTCAP:
            grad = grad * (1.0 - tanh_x * tanh_x)
        tl.store(grad_ptr + grad_offsets[:, None] + cols[None, :], to_output(grad, grad_ptr), mask=mask,
                 cache_modifier=".cs")  # fmt: skip


@triton.jit
def grad_pass(logits_ptr, row_offsets, row_mask, counted, y, hard, m, log_sum_exp, coeff, scale, lo, hi,
              target_ptr, target_offsets, weight_ptr, eps, smooth, softcap,
              grad_ptr, grad_offsets, tgrad_ptr, tgrad_offsets,
              PROBS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MASS: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr,
              BLOCK: tl.constexpr):  # fmt: skip
    """:func:`grad_block` over columns [lo, hi), BLOCK at a time in reverse order, so that the first
    blocks this pass reads are the ones the statistics pass read last (the likeliest still in L2); the
    next block is loaded before the current one is written. Memory traffic: one read (from L2 where it
    held the row) and one write of each gradient."""
    base = tl.arange(0, BLOCK)
    blocks = tl.cdiv(hi - lo, BLOCK)
    cols = lo + (blocks - 1) * BLOCK + base
    raw_next = tl.load(logits_ptr + row_offsets[:, None] + cols[None, :],
                       mask=row_mask[:, None] & (cols < hi)[None, :], other=float("-inf"),
                       eviction_policy="evict_first")  # fmt: skip
    for block in range(0, blocks):
        cols = lo + (blocks - 1 - block) * BLOCK + base
        col_mask = cols < hi
        mask = row_mask[:, None] & col_mask[None, :]
        raw = raw_next
        behind = cols - BLOCK
        raw_next = tl.load(logits_ptr + row_offsets[:, None] + behind[None, :],
                           mask=row_mask[:, None] & (behind >= lo)[None, :], other=float("-inf"),
                           eviction_policy="evict_first")  # fmt: skip
        grad_block(raw, cols, col_mask, mask, counted, y, hard, m, log_sum_exp, coeff, scale,
                   target_ptr, target_offsets, weight_ptr, eps, smooth, softcap,
                   grad_ptr, grad_offsets, tgrad_ptr, tgrad_offsets,
                   PROBS, HAS_WEIGHT, HAS_MASS, HAS_SOFTCAP, WRITE_GRAD, WRITE_TGRAD)  # fmt: skip
