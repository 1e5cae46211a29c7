r"""The ``memory="lean"`` softmax linear head: vocabulary slices, extra memory independent of C, exact.

``linear_cross_entropy(x, W, y, memory="lean")`` computes the same loss and gradients as the default mode
without keeping any (rows × C) block of logits. The classes are cut into slices of S columns
(W_v = W[v : v + S]) and the logits z_v = x·W_vᵀ + b_v of all N rows are formed one slice at a time:

* forward (2·N·D·C FLOPs): each slice updates per-row running statistics with the online softmax of
  Milakov & Gimelshein (arXiv 1805.02867): the max m, Σ exp(z − m), and the target-weighted Σq and
  Σq·(z − m), kept relative to the running max so that ±1e4 logits do not cancel; the true class's logit
  z_y is picked up by the slice that holds it. Then lse = m + log Σexp and
  ℓ = (Σq)·log Σexp − Σq·(z − m) + λ·lse², exactly as :func:`softxent.ops.cpu.softmax_xent_block`.
* backward (6·N·D·C FLOPs): each slice's logits are formed again and turned into
  G_v = s·[(Σq + 2λ·lse)·exp(z_v − lse) − q_v] in place (the exp as exp((z_v − m) − log Σexp), see
  :func:`softmax_shift`); then dW_v = G_vᵀ·x in one matmul over all N rows (no accumulation of dW
  across chunks, so its rounding is eager autograd's), db_v = Σ_rows G_v and
  dX += G_v·W_v into a float32 accumulator.

Memory beyond inputs and gradients: one (N, S) slice of logits (plus a float32 copy where the backend keeps
the gradient in float32), the (N, D) float32 dX accumulator for low-precision inputs, and O(N) statistics.
FLOPs: 8·N·D·C for forward and backward together (one recompute), 2·N·D·C for the loss alone.

The per-slice work is a pair of functions (:func:`slice_stats`, :func:`slice_grad` here in torch ops; the
Triton kernels in :mod:`softxent.ops.triton.lean` keep the same contracts).

The sigmoid head's lean mode (:class:`LeanSigmoidHead`, ``linear_binary_cross_entropy(..., memory="lean")``)
walks the same slices in one pass: each class's loss needs only its own logit, so there are no statistics
to gather first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from softxent.ops.cpu import (
    BLOCK_ELEMENTS,
    SigmoidLoss,
    SoftmaxLoss,
    _blocks,
    _mean_denominator,
    _reduce,
    _reduction_scale,
    accumulate_matmul,
    compute_dtype,
    sigmoid_bce_rows,
)

# Logits per vocabulary slice, in bytes of the slice buffer: 64 MiB, so the slice is small next to the
# gradients while its matmuls (inner dimensions D, S and N) stay large.
SLICE_BYTES = 1 << 26
MIN_SLICE_COLUMNS = 128


@dataclass
class RowStats:
    """Running per-row statistics of the forward pass, each (N,) in the compute dtype.

    m: running max of the logits seen so far; sum_exp: Σ exp(z − m); q_sum: Σ q; q_dot: Σ q·(z − m);
    z_y: the true class's (softcapped) logit, once its slice has been seen (class-index targets).
    """

    m: Tensor
    sum_exp: Tensor
    q_sum: Tensor
    q_dot: Tensor
    z_y: Tensor

    def rows(self, start: int, stop: int) -> RowStats:
        """Views of rows start:stop (updating them updates these statistics)."""
        return RowStats(*(t[start:stop] for t in (self.m, self.sum_exp, self.q_sum, self.q_dot, self.z_y)))

    @classmethod
    def empty(cls, rows: int, dtype: torch.dtype, device: torch.device) -> RowStats:
        zeros = [torch.zeros(rows, dtype=dtype, device=device) for _ in range(4)]
        return cls(torch.full((rows,), float("-inf"), dtype=dtype, device=device), *zeros)


@dataclass(frozen=True)
class Targets:
    """The target of every row, prepared once: class indices (with the hard term) or probabilities.

    target: (N,) int64 indices or (N, C') probabilities; counted: (N,) bool, rows that count (class targets:
    not ignored and in [0, C)); hard: (N,) (1 − ε)·w_y for counted rows, else 0 (None for probabilities);
    out_of_range: (N,) bool, class targets outside [0, C) (GPU targets are not range-checked on the host);
    first_column: the class of the probabilities' column 0 (a vocabulary shard's offset; else 0, C' = C).
    """

    target: Tensor
    counted: Tensor
    hard: Tensor | None
    out_of_range: Tensor | None
    first_column: int = 0

    @property
    def probabilities(self) -> bool:
        return self.hard is None

    def rows(self, start: int, stop: int) -> Targets:
        def part(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[start:stop]

        return Targets(
            self.target[start:stop],
            self.counted[start:stop],
            part(self.hard),
            part(self.out_of_range),
            self.first_column,
        )

    def columns(self, start: int, stop: int) -> Tensor:
        """The probabilities of classes start:stop, (N, stop − start)."""
        return self.target[:, start - self.first_column : stop - self.first_column]

    @classmethod
    def prepare(
        cls, target: Tensor, spec: SoftmaxLoss, num_classes: int, ct: torch.dtype, first_column: int = 0
    ) -> Targets:
        if target.is_floating_point():
            counted = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
            return cls(target, counted, None, None, first_column)
        not_ignored = target != spec.ignore_index
        out_of_range = not_ignored & ((target < 0) | (target >= num_classes))
        counted = not_ignored & ~out_of_range
        safe = torch.where(counted, target, 0)
        target_weight = spec.weight[safe] if spec.weight is not None else torch.ones((), dtype=ct)
        hard = torch.where(counted, (1.0 - spec.label_smoothing) * target_weight.to(ct), 0.0)
        return cls(target, counted, hard, out_of_range)


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

    Works through blocks of rows of about BLOCK_ELEMENTS logits, so that its temporaries stay in cache."""
    for first, last in _blocks(logits.shape[0], logits.shape[1], BLOCK_ELEMENTS):
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
    stats.q_dot.sub_(stats.q_sum * torch.where(stats.q_sum == 0.0, 0.0, rise))
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
        stats.q_dot.add_(torch.where(z == float("-inf"), masked, q * shifted).sum(1))
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
    for first, last in _blocks(logits.shape[0], logits.shape[1], BLOCK_ELEMENTS):
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


SliceStatsFn = Callable[[Tensor, int, Targets, SoftmaxLoss, int, RowStats], None]
SliceGradFn = Callable[..., None]


def softmax_shift(stats: RowStats) -> tuple[Tensor, Tensor]:
    """(m, log Σexp) per row, for ŷ = exp((z − m) − log Σexp) in the gradient pass.

    The two are kept apart rather than summed into lse = m + log Σexp: lse rounds to an ulp of its size
    (1e-3 for logits near 1e4 in float32), an error exp would carry into every ŷ, while z − m is exact
    there and log Σexp is small. Both are 0 for a row with no finite logit (ŷ = exp(−inf) = 0 there).
    """
    m = torch.where(stats.m == float("-inf"), 0.0, stats.m)
    log_sum_exp = stats.sum_exp.log()
    return m, torch.where(log_sum_exp == float("-inf"), 0.0, log_sum_exp)


def finish(stats: RowStats, targets: Targets, spec: SoftmaxLoss) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, coeff) from the statistics of every slice: O(N) work.

    loss = (Σq)·log Σexp − Σq·(z − m) + λ·lse² (0 for ignored rows, nan for class targets outside [0, C)),
    coeff = Σq + 2λ·lse, the factor of ŷ in ∂ℓ/∂z.
    """
    log_sum_exp = stats.sum_exp.log()
    lse = stats.m + log_sum_exp
    q_sum, q_dot = stats.q_sum, stats.q_dot
    if targets.hard is not None:
        hard = targets.hard
        q_dot = q_dot + hard * torch.where(hard == 0.0, 0.0, stats.z_y - stats.m)
        q_sum = q_sum + hard
    loss = q_sum * log_sum_exp - q_dot
    coeff = q_sum
    if spec.z_loss > 0:
        loss = loss + spec.z_loss * lse * lse
        coeff = coeff + 2.0 * spec.z_loss * lse
    loss = torch.where(targets.counted, loss, 0.0)
    if targets.out_of_range is not None:
        loss = torch.where(targets.out_of_range, float("nan"), loss)
    return loss, lse, coeff


def vocabulary_slices(x: Tensor, num_classes: int, slice_columns: int | None, grad_in_input_dtype: bool):
    """(start, stop, logits buffer view (N, stop − start)) for each slice of the classes, with one reused
    (N, S) buffer: S = ``slice_columns``, or by default SLICE_BYTES of logits (and of their float32 copy
    where the gradient is kept in the compute dtype), in multiples of MIN_SLICE_COLUMNS."""
    rows = x.shape[0]
    ct = compute_dtype(x.dtype)
    element_bytes = x.element_size()
    if not grad_in_input_dtype and x.dtype != ct:
        element_bytes += torch.finfo(ct).bits // 8
    if slice_columns is None:
        columns = SLICE_BYTES // max(rows * element_bytes, 1)
        slice_columns = max(MIN_SLICE_COLUMNS, columns // MIN_SLICE_COLUMNS * MIN_SLICE_COLUMNS)
    columns = max(1, min(slice_columns, num_classes))
    buffer = torch.empty(rows, columns, dtype=x.dtype, device=x.device)
    for start in range(0, num_classes, columns):
        stop = min(start + columns, num_classes)
        yield start, stop, buffer[:, : stop - start]


def slice_logits(
    x: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int, out: Tensor
) -> Tensor:
    """z_v = x·W[start:stop]ᵀ + b[start:stop] into ``out`` (N, stop − start)."""
    if bias is not None:
        return torch.addmm(bias[start:stop], x, weight[start:stop].t(), out=out)
    return torch.mm(x, weight[start:stop].t(), out=out)


def _slice_backward(
    grad: Tensor,
    x: Tensor,
    w_slice: Tensor,
    start: int,
    grad_x: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
) -> None:
    """A slice's share of the linear head's gradients from its G_v (N, S): dW_v = G_vᵀ·x (one matmul over
    all rows, written whole), db_v = Σ_rows G_v, and dX += G_v·W_v summed over the slices in the compute
    dtype (float32 for low-precision inputs). ``x`` in G's dtype; dW/db are written at rows start:."""
    stop = start + grad.shape[1]
    if grad_weight is not None:
        torch.mm(grad.t(), x, out=grad_weight[start:stop])
    if grad_bias is not None:
        grad_bias[start:stop] = grad.sum(0, dtype=grad_bias.dtype)
    if grad_x is None:
        return
    if grad.dtype == grad_x.dtype:
        grad_x.addmm_(grad, w_slice if w_slice.dtype == grad_x.dtype else w_slice.to(grad_x.dtype))
    else:
        accumulate_matmul(grad_x, grad, w_slice)  # input-dtype product, float32 sum over slices


@dataclass(frozen=True)
class LeanSoftmaxHead:
    """The vocabulary-sliced softmax head over a (C, D) weight (see the module docstring).

    ``slice_columns``: classes per slice (None: SLICE_BYTES of logits). ``stats_fn`` / ``grad_fn``: the
    per-slice functions (torch's :func:`slice_stats` / :func:`slice_grad` or the Triton kernels).
    ``grad_in_input_dtype``: G is written in the input dtype over the slice's logits and the matmuls run
    in the input dtype (the GPU path); otherwise G is kept in the compute dtype (the CPU path).
    """

    spec: SoftmaxLoss
    reduction: str
    num_classes: int
    slice_columns: int | None
    stats_fn: SliceStatsFn = slice_stats
    grad_fn: SliceGradFn = slice_grad
    grad_in_input_dtype: bool = False

    def forward_stats(self, x, weight, bias, targets: Targets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-row (loss, coeff, m, log Σexp) (see :func:`finish`, :func:`softmax_shift`): one pass over
        the slices, 2·N·D·C FLOPs."""
        ct = compute_dtype(x.dtype)
        stats = RowStats.empty(x.shape[0], ct, x.device)
        if x.shape[0]:
            for start, stop, logits in vocabulary_slices(
                x, self.num_classes, self.slice_columns, self.grad_in_input_dtype
            ):
                self.stats_fn(
                    slice_logits(x, weight, bias, start, stop, logits),
                    start, targets, self.spec, self.num_classes, stats,
                )  # fmt: skip
        loss, _, coeff = finish(stats, targets, self.spec)
        return (loss, coeff, *softmax_shift(stats))

    def backward_pass(self, x, weight, bias, targets: Targets, m, log_sum_exp, coeff, scale, needs):
        """(dX, dW, db, d_target) for per-row gradient scales ``scale`` (N,): 6·N·D·C FLOPs.

        dW_v and db_v are written whole for each slice; dX accumulates over slices in float32 (the compute
        dtype). Returns the gradients in the compute dtype (dW, dX in the input dtype on the GPU path).
        """
        need_dx, need_dw, need_db, need_target_grad = needs
        ct = compute_dtype(x.dtype)
        low = self.grad_in_input_dtype
        grad_x = torch.zeros(x.shape, dtype=ct, device=x.device) if need_dx else None
        grad_weight = (
            torch.empty(weight.shape, dtype=x.dtype if low else ct, device=x.device) if need_dw else None
        )
        grad_bias = torch.empty(self.num_classes, dtype=ct, device=x.device) if need_db else None
        grad_target = torch.empty_like(targets.target) if need_target_grad else None
        scale = torch.where(targets.counted, scale, 0.0)
        x_ct = x if x.dtype == ct or low else x.to(ct)
        if not x.shape[0]:
            if grad_weight is not None:
                grad_weight.zero_()
            if grad_bias is not None:
                grad_bias.zero_()
            return grad_x, grad_weight, grad_bias, grad_target
        for start, stop, logits in vocabulary_slices(
            x, self.num_classes, self.slice_columns, self.grad_in_input_dtype
        ):
            slice_logits(x, weight, bias, start, stop, logits)
            grad = logits if low or x.dtype == ct else torch.empty(logits.shape, dtype=ct, device=x.device)
            self.grad_fn(
                logits, start, targets, self.spec, self.num_classes, m, log_sum_exp, coeff, scale,
                grad if (need_dx or need_dw or need_db) else None,
                grad_target[:, start:stop] if grad_target is not None else None,
            )  # fmt: skip
            _slice_backward(grad, x_ct, weight[start:stop], start, grad_x, grad_weight, grad_bias)
        return grad_x, grad_weight, grad_bias, grad_target


class LeanLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd for :class:`LeanSoftmaxHead`: the forward pass keeps only per-row lse and coeff (O(N)),
    and backward recomputes each slice's logits with the incoming gradient folded into the scale."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, head, needs):  # type: ignore[override]
        ct = compute_dtype(x.dtype)
        targets = Targets.prepare(target, head.spec, head.num_classes, ct)
        loss, coeff, m, log_sum_exp = head.forward_stats(x, weight, bias, targets)
        denominator, anything_counts = _mean_denominator(target, head.spec, head.num_classes, ct)
        ctx.head, ctx.needs, ctx.targets = head, needs, targets
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, target.dtype)
        ctx.reduction_scale = _reduction_scale(head.reduction, denominator, anything_counts, ct).to(x.device)
        ctx.save_for_backward(x, weight, bias, m, log_sum_exp, coeff)
        return _reduce(loss, head.reduction, denominator)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        x, weight, bias, m, log_sum_exp, coeff = ctx.saved_tensors
        head, targets = ctx.head, ctx.targets
        scale = (grad_loss.to(m.dtype) * ctx.reduction_scale).expand_as(m)
        grads = head.backward_pass(x, weight, bias, targets, m, log_sum_exp, coeff, scale, ctx.needs)
        grad_x, grad_weight, grad_bias, grad_target = (
            None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)
        )
        return grad_x, grad_weight, grad_bias, grad_target, None, None


def lean_linear_cross_entropy(
    head: LeanSoftmaxHead, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, needs
) -> Tensor:
    """The lean head's reduced loss, through autograd when any of ``needs`` is set (else the loss alone)."""
    if any(needs):
        return LeanLinearCrossEntropyFunction.apply(x, weight, bias, target, head, needs)
    ct = compute_dtype(x.dtype)
    targets = Targets.prepare(target, head.spec, head.num_classes, ct)
    loss = head.forward_stats(x, weight, bias, targets)[0]
    denominator, _ = _mean_denominator(target, head.spec, head.num_classes, ct)
    return _reduce(loss, head.reduction, denominator)


@dataclass(frozen=True)
class LeanSigmoidHead:
    """``linear_binary_cross_entropy(memory="lean")``: the sigmoid head over vocabulary slices of all rows.

    Each class's loss depends on its own logit only, so one pass suffices (no statistics, no recompute).
    Per slice of S classes: z_v = x·W_vᵀ + b_v for all N rows, then in place G_v = s·∂ℓ/∂z_v =
    s·w·(L·σ(z_v) − p·y) (:func:`softxent.ops.cpu.sigmoid_bce_block`'s contract, or its Triton kernel),
    dW_v = G_vᵀ·x in one matmul over all N rows (nothing summed across chunks, so its rounding is eager
    autograd's), db_v = Σ_rows G_v, dX += G_v·W_v in the compute dtype. 6·N·D·C FLOPs, as the default mode.

    Memory beyond inputs and gradients: one (N, S) slice of logits (plus a float32 copy where the gradient is
    kept in float32) and the (N, D) float32 dX accumulator for low-precision inputs, independent of C;
    "mean" and "sum" add up the loss slice by slice, "none" returns the (N, C) loss. The head protocol of
    :class:`softxent.ops.cpu.LinearHeadFunction` (``run``, ``denominator``, ``reduction``).
    """

    spec: SigmoidLoss
    reduction: str
    num_classes: int
    slice_columns: int | None
    block_fn: Callable[..., Tensor] | None = None  # a Triton kernel; None: the torch ops (sigmoid_bce_rows)
    grad_in_input_dtype: bool = False

    def denominator(self, target: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor | bool]:
        """The "mean" reduction averages over every element."""
        return torch.tensor(float(target.numel()), dtype=ct, device=target.device), target.numel() > 0

    def run(self, x, linear_weight, linear_bias, target, *, grad_scale, needs):
        """(loss, dX, dW, db, d_target) for x (N, D), W (C, D), target (N, C); ``grad_scale`` None (loss
        only), 0-d or (N, C). The loss is (N, C) for "none", else each row's sum (N,)."""
        need_dx, need_dw, need_db, need_target_grad = needs
        ct = compute_dtype(x.dtype)
        low = self.grad_in_input_dtype
        rows, device = x.shape[0], x.device
        want_grad = grad_scale is not None
        per_element = self.reduction == "none"
        loss = torch.empty(target.shape, dtype=ct, device=device) if per_element else None
        row_sums = None if per_element else torch.zeros(rows, dtype=ct, device=device)
        grad_x = torch.zeros(x.shape, dtype=ct, device=device) if want_grad and need_dx else None
        grad_weight = None
        if want_grad and need_dw:
            grad_weight = torch.empty(linear_weight.shape, dtype=x.dtype if low else ct, device=device)
        grad_bias = torch.empty(self.num_classes, dtype=ct, device=device) if want_grad and need_db else None
        grad_target = torch.empty_like(target) if want_grad and need_target_grad else None
        need_grad = want_grad and (need_dx or need_dw or need_db)
        weight = None if self.spec.weight is None else self.spec.weight.expand(target.shape)
        pos_weight = None if self.spec.pos_weight is None else self.spec.pos_weight.expand(self.num_classes)
        x_ct = x if x.dtype == ct or low else x.to(ct)
        for start, stop, logits in vocabulary_slices(x, self.num_classes, self.slice_columns, low):
            slice_logits(x, linear_weight, linear_bias, start, stop, logits)
            grad = None
            if need_grad:
                grad = logits if low or x.dtype == ct else torch.empty(logits.shape, dtype=ct, device=device)
            scale = grad_scale
            if isinstance(grad_scale, Tensor) and grad_scale.dim():
                scale = grad_scale[:, start:stop]
            part = sigmoid_bce_rows(
                logits,
                target[:, start:stop],
                SigmoidLoss(
                    None if weight is None else weight[:, start:stop],
                    None if pos_weight is None else pos_weight[start:stop],
                ),
                grad_scale=scale,
                grad_out=grad,
                target_grad_out=None if grad_target is None else grad_target[:, start:stop],
                block_fn=self.block_fn,
                row_sums=not per_element,
            )
            if loss is not None:
                loss[:, start:stop] = part
            else:
                row_sums += part
            if grad is not None:
                _slice_backward(grad, x_ct, linear_weight[start:stop], start, grad_x, grad_weight, grad_bias)
        return loss if per_element else row_sums, grad_x, grad_weight, grad_bias, grad_target
