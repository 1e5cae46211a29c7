"""The torch-op backend (``impl="torch"``, the CPU backend): the per-block math of each loss in torch ops.

Each function computes one block of rows, handed to it by a driver (:mod:`softxent.ops.rows`,
:mod:`softxent.ops.chunks`, :mod:`softxent.ops.slices`), and produces the gradient in the same pass as the
loss; the math is :mod:`softxent.ops.spec`'s. They run on any device; the Triton kernels in
:mod:`softxent.ops.triton` keep the same contracts. Blocks are sized by the driver's policy so that every
temporary stays small (in cache on a CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from softxent.ops import policy
from softxent.ops.spec import RowStats, SigmoidLoss, SoftmaxLoss, Targets, compute_dtype, mass_shift


def _row_blocks(logits: Tensor) -> list[tuple[int, int]]:
    """The blocks of rows of an (N, S) slice of logits under the torch policy of their device."""
    return policy.for_device(logits.device, "torch").row_blocks(logits.shape[0], logits.shape[1])


def _as_scale(grad_scale: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(grad_scale, dtype=like.dtype, device=like.device)


def softmax_xent_block(
    logits: Tensor,
    target: Tensor,
    spec: SoftmaxLoss,
    *,
    grad_scale: Tensor | float | None = None,
    grad_out: Tensor | None = None,
    target_grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss, lse and (optionally) the scaled gradient of one block of positions.

    logits: (..., C) in any float dtype and any strides; target: (...) class indices or (..., C)
    probabilities. Returns (loss, lse), both (...) in the compute dtype. When ``grad_scale`` is given,
    writes grad_scale·∂ℓ/∂z into ``grad_out`` ((..., C), may alias ``logits``); when ``target_grad_out`` is
    given (probability targets), writes grad_scale·∂ℓ/∂t = −grad_scale·(1 − ε)·w·log ŷ into it.
    ``grad_scale`` is a scalar or broadcasts to (...).

    Memory traffic: reads the block once from memory, writes the gradient once; the other passes
    (max, exp, sum, scale) run over the block while it is in cache.
    """
    ct = compute_dtype(logits.dtype)
    num_classes = logits.shape[-1]
    if num_classes == 0:  # an empty sum, as torch's per-position loss; the lse of nothing is −inf
        batch = logits.shape[:-1]
        return torch.zeros(batch, dtype=ct, device=logits.device), torch.full(
            batch, float("-inf"), dtype=ct, device=logits.device
        )
    eps = spec.label_smoothing
    weight = spec.weight
    z = logits if logits.dtype == ct else logits.to(ct)
    tanh = None
    if spec.softcap is not None:
        tanh = torch.tanh(z / spec.softcap)
        z = tanh * spec.softcap

    if grad_scale is not None and grad_out is not None and grad_out.dtype == ct:
        work = grad_out
    else:
        work = torch.empty_like(z)
    row_max = z.amax(dim=-1, keepdim=True)
    torch.sub(z, row_max, out=work)  # work = z − max: every later term is shift-free
    row_max = row_max.squeeze(-1)

    probabilities = target.is_floating_point()
    shifted_target_grad = work.clone() if target_grad_out is not None else None
    if probabilities:
        q = target.to(ct) * (1.0 - eps) + eps / num_classes
        if weight is not None:
            q.mul_(weight)
        # Σ_c q_c·(z_c − max), by a batched dot product (no (..., C) temporary)
        shifted_dot = torch.linalg.vecdot(q, work)
        q_sum = q.sum(-1)
        counted = None
    else:
        counted = target != spec.ignore_index
        safe_target = torch.where(counted, target, 0).unsqueeze(-1)
        target_weight = weight[safe_target.squeeze(-1)] if weight is not None else torch.ones((), dtype=ct)
        hard = torch.where(counted, (1.0 - eps) * target_weight, 0.0)  # (1 − ε)·w_y
        shifted_dot = torch.where(counted, hard * work.gather(-1, safe_target).squeeze(-1), 0.0)
        q_sum = hard
        if eps > 0:
            smooth_dot = work @ weight if weight is not None else work.sum(-1)
            weight_sum = weight.sum() if weight is not None else torch.tensor(float(num_classes), dtype=ct)
            shifted_dot = shifted_dot + torch.where(counted, (eps / num_classes) * smooth_dot, 0.0)
            q_sum = q_sum + torch.where(counted, (eps / num_classes) * weight_sum, 0.0)

    work.exp_()
    sum_exp = work.sum(-1)
    log_sum_exp = sum_exp.log()
    lse = row_max + log_sum_exp
    # −Σ q_c·log ŷ_c = Σ q_c·(lse − z_c) = q_sum·log Σexp − Σ q_c·(z_c − max)
    loss = q_sum * log_sum_exp - shifted_dot
    if spec.z_loss > 0:
        z_term = spec.z_loss * lse * lse
        loss = loss + (z_term if counted is None else torch.where(counted, z_term, 0.0))
    if counted is not None:
        loss = torch.where(counted, loss, 0.0)

    if grad_scale is not None:
        scale = _as_scale(grad_scale, loss)
        coeff = q_sum
        if spec.z_loss > 0:
            z_coeff = 2.0 * spec.z_loss * lse
            coeff = coeff + (z_coeff if counted is None else torch.where(counted, z_coeff, 0.0))
        # work holds exp(z − max); dividing by Σexp turns it into ŷ
        work.mul_((coeff * scale / sum_exp).unsqueeze(-1))
        if probabilities:
            work.sub_(q.mul_(scale.unsqueeze(-1)))
        else:
            if eps > 0:
                smooth_scale = torch.where(counted, scale, 0.0).unsqueeze(-1) * (eps / num_classes)
                if weight is not None:
                    work.addcmul_(smooth_scale, weight, value=-1.0)
                else:
                    work.sub_(smooth_scale)
            work.scatter_add_(-1, safe_target, (-hard * scale).unsqueeze(-1).expand_as(safe_target))
        if tanh is not None:
            work.mul_(tanh.mul_(tanh).neg_().add_(1.0))  # d(s·tanh(z/s))/dz = 1 − tanh²
        if grad_out is not None and grad_out is not work:
            grad_out.copy_(work)

    if shifted_target_grad is not None and target_grad_out is not None:
        # ∂ℓ/∂t_c = −(1 − ε)·w_c·log ŷ_c, log ŷ = (z − max) − log Σexp
        shifted_target_grad.sub_(log_sum_exp.unsqueeze(-1)).mul_(
            (-(1.0 - eps) * _as_scale(1.0 if grad_scale is None else grad_scale, loss)).unsqueeze(-1)
        )
        if weight is not None:
            shifted_target_grad.mul_(weight)
        target_grad_out.copy_(shifted_target_grad)
    return loss, lse


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
    """Elementwise sigmoid binary cross-entropy of one block, with its gradient.

    logits, target: (..., C); ``spec.weight`` broadcasts to the block, ``spec.pos_weight`` to (C,).
    Returns the elementwise loss (..., C) in the compute dtype, or with ``row_sums`` its sums over the last
    dimension (...); writes grad_scale·∂ℓ/∂z into ``grad_out`` and
    grad_scale·∂ℓ/∂y = grad_scale·w·(−z + (p − 1)·softplus(−z)) into ``target_grad_out`` when given.
    """
    ct = compute_dtype(logits.dtype)
    z = logits.to(ct)
    y = target.to(ct)
    exp_neg_abs = torch.exp(-z.abs())
    log1p_exp = torch.log1p(exp_neg_abs)
    softplus_neg = log1p_exp + torch.clamp_min(-z, 0.0)  # softplus(−z), stable
    # (1 − y)·z + L·softplus(−z), with the max(−z, 0) part folded in so the tails do not cancel:
    # L·log1p(e^{−|z|}) + (−p·y·z where z < 0, else (1 − y)·z)
    if spec.pos_weight is not None:
        pos_weight = spec.pos_weight.to(ct)
        log_weight = (pos_weight - 1.0) * y + 1.0  # L = 1 + (p − 1)·y
        loss = log_weight * log1p_exp + torch.where(z < 0, -pos_weight * y * z, (1.0 - y) * z)
    else:
        log_weight = None
        loss = log1p_exp + torch.where(z < 0, -y * z, (1.0 - y) * z)
    weight = spec.weight.to(ct) if spec.weight is not None else None
    if weight is not None:
        loss = loss * weight

    # the target's gradient first: grad_out may alias the logits
    if target_grad_out is not None:
        scale = _as_scale(1.0 if grad_scale is None else grad_scale, loss)
        pos = spec.pos_weight.to(ct) - 1.0 if spec.pos_weight is not None else 0.0
        target_grad = softplus_neg.mul_(pos).sub_(z)
        if weight is not None:
            target_grad.mul_(weight)
        target_grad_out.copy_(target_grad.mul_(scale))
    if grad_scale is not None and grad_out is not None:
        scale = _as_scale(grad_scale, loss)
        grad = torch.sigmoid(z)
        if log_weight is not None:
            grad.mul_(log_weight).sub_(spec.pos_weight.to(ct) * y)  # L·σ(z) − p·y
        else:
            grad.sub_(y)  # σ(z) − y
        if weight is not None:
            grad.mul_(weight)
        grad_out.copy_(grad.mul_(scale))
    return loss.sum(-1) if row_sums else loss


def _capped(logits: Tensor, spec: SoftmaxLoss, ct: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The slice's logits in the compute dtype after the softcap, and tanh(z/cap) (None without one)."""
    z = logits.to(ct)
    if spec.softcap is None:
        return z, None
    tanh = torch.tanh(z / spec.softcap)
    return tanh * spec.softcap, tanh


def _slice_mass(targets: Targets, spec: SoftmaxLoss, start: int, stop: int, num_classes: int, ct) -> Tensor:
    """q on columns start:stop without the true class's hard term: (N, S), or (1, S) for class targets
    (then rows that do not count are masked by the caller)."""
    eps = spec.label_smoothing
    weight = None if spec.weight is None else spec.weight[start:stop].to(ct)
    if targets.probabilities:
        q = targets.columns(start, stop).to(ct) * (1.0 - eps) + eps / num_classes
    else:
        q = torch.full((1, stop - start), eps / num_classes, dtype=ct, device=targets.target.device)
    return q * weight if weight is not None else q


def slice_stats(
    logits: Tensor, start: int, targets: Targets, spec: SoftmaxLoss, num_classes: int, stats: RowStats
) -> None:
    """Fold the logits of classes start:start + S, (N, S), into the running ``stats`` (in place).

    Works through blocks of rows (the torch policy's of the logits' device), so that its temporaries stay
    small."""
    for first, last in _row_blocks(logits):
        _slice_stats_rows(
            logits[first:last], start, targets.rows(first, last), spec, num_classes, stats.rows(first, last)
        )


def _slice_stats_rows(
    logits: Tensor, start: int, targets: Targets, spec: SoftmaxLoss, num_classes: int, stats: RowStats
) -> None:
    ct = stats.m.dtype
    stop = start + logits.shape[1]
    z, _ = _capped(logits, spec, ct)
    m_new = torch.maximum(stats.m, z.amax(1))
    # rescale the sums to the new max; −inf − (−inf) never enters an op (no lane holds a nan)
    rise = torch.where(m_new == stats.m, 0.0, m_new - stats.m)
    stats.sum_exp.mul_(torch.exp(-rise))
    stats.q_dot.sub_(mass_shift(stats.q_sum, rise))
    # z − m with m made finite (0 where the row has no finite logit yet): exp gives 0 for a −inf logit
    # and no lane ever holds −inf − (−inf)
    shifted = z - torch.where(m_new == float("-inf"), 0.0, m_new).unsqueeze(1)
    stats.sum_exp.add_(shifted.exp().sum(1))
    if not targets.probabilities and spec.weight is None and spec.label_smoothing > 0:
        # q = ε/C on every column of a counted row: Σq·(z − m) = ε/C·Σ(z − m), which is −inf when the
        # slice holds a −inf logit, as the general form below gives; rows that do not count add nothing
        share = spec.label_smoothing / num_classes
        stats.q_dot.add_(torch.where(targets.counted, shifted.sum(1) * share, 0.0))
        stats.q_sum.add_(targets.counted.to(ct) * (share * (stop - start)))
    elif targets.probabilities or spec.label_smoothing > 0:  # else q = 0 off the true class
        q = _slice_mass(targets, spec, start, stop, num_classes, ct)
        if not targets.probabilities:
            q = torch.where(targets.counted.unsqueeze(1), q, 0.0)
        # a −inf logit with target mass makes the loss +inf; without mass it adds nothing
        masked = torch.where(q > 0.0, float("-inf"), 0.0)
        mass_dot = torch.where(shifted == 0.0, 0.0, q * shifted)  # the max adds 0, even for w = inf
        stats.q_dot.add_(torch.where(z == float("-inf"), masked, mass_dot).sum(1))
        stats.q_sum.add_(q.sum(1).expand_as(stats.q_sum))
    stats.m.copy_(m_new)
    if not targets.probabilities:
        y = targets.target
        in_slice = targets.counted & (y >= start) & (y < stop)
        local = (y - start).clamp(0, z.shape[1] - 1).unsqueeze(1)
        stats.z_y.copy_(torch.where(in_slice, z.gather(1, local).squeeze(1), stats.z_y))


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
    """Write scale·∂ℓ/∂z for classes start:start + S into ``grad_out`` ((N, S), may alias ``logits``) and,
    for probability targets, scale·∂ℓ/∂t into ``target_grad_out``.

    ∂ℓ/∂z_c = coeff·ŷ_c − q_c (− hard at the true class), times 1 − tanh²(z/cap) under a softcap, with
    ŷ = exp((z − m) − log Σexp) and coeff = Σq + 2λ·lse; ∂ℓ/∂t_c = −(1 − ε)·w_c·(z_c − lse), with m and
    log Σexp from :func:`softmax_shift`. ``scale`` is (N,), already
    0 for rows that do not count. Works through blocks of rows, as :func:`slice_stats` does.
    """
    for first, last in _row_blocks(logits):
        _slice_grad_rows(
            logits[first:last], start, targets.rows(first, last), spec, num_classes,
            m[first:last], log_sum_exp[first:last], coeff[first:last], scale[first:last],
            None if grad_out is None else grad_out[first:last],
            None if target_grad_out is None else target_grad_out[first:last],
        )  # fmt: skip


def _slice_grad_rows(
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
    ct = m.dtype
    stop = start + logits.shape[1]
    z, tanh = _capped(logits, spec, ct)
    row_scale = scale.unsqueeze(1)
    log_p = (z - m.unsqueeze(1)).sub_(log_sum_exp.unsqueeze(1))  # log ŷ; −inf for a −inf logit
    if target_grad_out is not None:
        weight = 1.0 if spec.weight is None else spec.weight[start:stop].to(ct)
        target_grad_out.copy_(log_p * weight * (-(1.0 - spec.label_smoothing)) * row_scale)
    if grad_out is None:
        return
    grad = log_p.exp_().mul_(coeff.unsqueeze(1))
    if targets.probabilities or spec.label_smoothing > 0:  # else q = 0 off the true class
        grad.sub_(_slice_mass(targets, spec, start, stop, num_classes, ct))
    if not targets.probabilities:
        y = targets.target
        in_slice = targets.counted & (y >= start) & (y < stop)
        local = (y - start).clamp(0, z.shape[1] - 1).unsqueeze(1)
        grad.scatter_add_(1, local, torch.where(in_slice, -targets.hard, 0.0).unsqueeze(1))
    grad.mul_(row_scale)
    if tanh is not None:
        grad.mul_(tanh.mul_(tanh).neg_().add_(1.0))
    grad_out.copy_(grad)
