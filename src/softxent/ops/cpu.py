"""The ``impl="torch"`` backend: fused softmax cross-entropy and sigmoid binary cross-entropy in torch ops.

It runs wherever torch runs and is the CPU backend. Every op produces its gradient in the forward pass
(the loss and ŷ − y come out of the same pass over the logits), so backward only scales what forward left.

Math, per position with logits z ∈ R^C (after the optional softcap z ← s·tanh(z/s)):

    lse = log Σ_c exp(z_c),   ŷ = exp(z − lse)
    q_c = (1 − ε)·w_y·1[c = y] + (ε/C)·w_c        (class index y; q = 0 for an ignored position)
    q_c = w_c·((1 − ε)·t_c + ε/C)                  (probability target t)
    ℓ = −Σ_c q_c·(z_c − lse) + z_loss·lse²
    ∂ℓ/∂z = (Σ_c q_c + 2·z_loss·lse)·ŷ − q         (= ŷ − y for a one-hot target, no weights)

and for the sigmoid head, with L = 1 + (p − 1)·y:

    ℓ = w·[(1 − y)·z + L·softplus(−z)],   ∂ℓ/∂z = w·(L·σ(z) − p·y)   (= σ(z) − y without weights)

Work is done in blocks of rows so that every temporary stays small and in cache: the only buffers of the
full (N, C) size are the gradient itself (cross_entropy on given logits) or none at all (the linear heads,
which form one chunk of logits at a time and never the whole (N, C) matrix).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Elements per block of the row kernels: about 4 MiB of float32, so a block and its temporaries stay in the
# shared L3 cache while the kernel makes its handful of passes over it (measured best on a 2-core EPYC).
BLOCK_ELEMENTS = 1 << 20
# Logits per chunk of the linear heads (64 MiB in float32): large enough that the three matmuls per chunk run
# at the machine's matmul rate (the dW update has the chunk's rows as its inner dimension).
LINEAR_CHUNK_ELEMENTS = 1 << 24
MIN_LINEAR_CHUNK_ROWS = 256
# The GPU path (G in the input dtype): chunks of up to 512 MiB of logits, so that dW accumulates over few
# chunks (one input-dtype rounding each) and its update, whose inner dimension is the chunk's rows, runs at
# the matmul rate. To be tuned on a GPU.
GPU_LINEAR_CHUNK_BYTES = 1 << 29


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class SoftmaxLoss:
    """What the softmax cross-entropy computes beyond the plain loss (all already validated).

    weight: (C,) class weights in the compute dtype, or None.
    """

    weight: Tensor | None
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None


@dataclass(frozen=True)
class SigmoidLoss:
    """Elementwise weight (broadcastable to the logits) and pos_weight (broadcastable to the last dim)."""

    weight: Tensor | None
    pos_weight: Tensor | None


def _as_scale(grad_scale: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(grad_scale, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------------------------------------
# Row kernels: one block of positions, class dimension last.
# ----------------------------------------------------------------------------------------------------------


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
) -> Tensor:
    """Elementwise sigmoid binary cross-entropy of one block, with its gradient.

    logits, target: (..., C); ``spec.weight`` broadcasts to the block, ``spec.pos_weight`` to (C,).
    Returns the elementwise loss in the compute dtype; writes grad_scale·∂ℓ/∂z into ``grad_out`` and
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
    return loss


def sigmoid_bce_rows(
    logits: Tensor,
    target: Tensor,
    spec: SigmoidLoss,
    *,
    grad_scale: Tensor | None,
    grad_out: Tensor | None,
    target_grad_out: Tensor | None,
    block_fn: Callable[..., Tensor] | None = None,
    row_sums: bool = False,
) -> Tensor:
    """:func:`sigmoid_bce_block` over a linear head's (B, C) block of logits, in blocks of about
    BLOCK_ELEMENTS logits so that the torch ops' temporaries stay small and in cache; ``block_fn`` (a Triton
    kernel, whose temporaries live in registers) takes the whole block in one launch.

    ``spec.weight``: None or (B, C) (an expanded view is fine); ``spec.pos_weight``: None or (C,);
    ``grad_scale``: None, 0-d or (B, C). Returns the (B, C) losses in the compute dtype, or with
    ``row_sums`` each row's sum (B,) (no (B, C) loss kept).
    """
    rows, columns = logits.shape

    def run(first: int, last: int) -> Tensor:
        scale = grad_scale[first:last] if isinstance(grad_scale, Tensor) and grad_scale.dim() else grad_scale
        loss = (block_fn or sigmoid_bce_block)(
            logits[first:last],
            target[first:last],
            SigmoidLoss(None if spec.weight is None else spec.weight[first:last], spec.pos_weight),
            grad_scale=scale,
            grad_out=None if grad_out is None else grad_out[first:last],
            target_grad_out=None if target_grad_out is None else target_grad_out[first:last],
        )
        return loss.sum(-1) if row_sums else loss

    one_launch = block_fn is not None and block_fn is not sigmoid_bce_block
    blocks = [(0, rows)] if one_launch else _blocks(rows, columns, BLOCK_ELEMENTS)
    if len(blocks) == 1:
        return run(*blocks[0])
    out = torch.empty(
        (rows,) if row_sums else (rows, columns), dtype=compute_dtype(logits.dtype), device=logits.device
    )
    for first, last in blocks:
        out[first:last] = run(first, last)
    return out


# ----------------------------------------------------------------------------------------------------------
# cross_entropy on given logits
# ----------------------------------------------------------------------------------------------------------


def _class_last(t: Tensor) -> Tensor:
    """(N, C, d1, ..., dk) -> (N, d1, ..., dk, C) as a view."""
    return t.movedim(1, -1) if t.dim() > 2 else t


def _mean_denominator(
    target: Tensor, spec: SoftmaxLoss, num_classes: int, ct: torch.dtype
) -> tuple[Tensor, Tensor | bool]:
    """torch's weighted-mean denominator and whether any position counts.

    Class indices: Σ_{non-ignored} w_y (their number without weights). Probabilities: the number of
    positions. Returns a 0-d tensor in the compute dtype and a flag that is False when nothing counts
    (a 0-d bool tensor where it depends on the target's values: no host read, so no GPU sync).
    """
    if target.is_floating_point():
        positions = target.numel() // num_classes if num_classes else 0
        return torch.tensor(float(positions), dtype=ct, device=target.device), positions > 0
    counted = target != spec.ignore_index
    if spec.weight is None:
        count = counted.sum()
        return count.to(ct), count > 0
    safe = torch.where(counted, target, 0)
    return torch.where(counted, spec.weight[safe].to(ct), 0.0).sum(), counted.any()


def _reduction_scale(
    reduction: str, denominator: Tensor, anything_counts: Tensor | bool, ct: torch.dtype
) -> Tensor:
    """The factor that turns the gradient of Σℓ into the gradient of the reduced loss.

    torch gives zero gradients when every target is ignored (and a nan loss for "mean"), so the scale
    is 0 then rather than 1/0 (chosen on the device: no host read).
    """
    if reduction != "mean":
        return torch.ones((), dtype=ct)
    scale = 1.0 / denominator.to(ct)
    return torch.where(torch.as_tensor(anything_counts, device=scale.device), scale, torch.zeros_like(scale))


def _blocks(count: int, per_item: int, budget: int) -> list[tuple[int, int]]:
    step = max(1, budget // max(per_item, 1))
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def cross_entropy_forward(
    input: Tensor,
    target: Tensor,
    spec: SoftmaxLoss,
    reduction: str,
    *,
    need_input_grad: bool,
    need_target_grad: bool,
    block_fn: Callable[..., tuple[Tensor, Tensor]] | None = None,
    grad_into_input: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Loss, lse, and the gradients of the reduced loss (for an incoming gradient of 1).

    ``block_fn`` computes one block of rows (:func:`softmax_xent_block`'s contract; the default is it).
    ``grad_into_input``: the input's gradient overwrites the input itself (no second buffer of its size).

    input: (N, C) or (N, C, d1, ..., dk); target: (N, d1, ..., dk) indices or input-shaped probabilities.
    Returns loss (a scalar, or (N, d1, ..., dk) for "none"), lse (N, d1, ..., dk), grad_input (input's
    shape, dtype and layout) and grad_target, the latter two None when not asked for.
    """
    ct = compute_dtype(input.dtype)
    num_classes = input.shape[1]
    batch_shape = (input.shape[0], *input.shape[2:])
    logits = _class_last(input)
    probabilities = target.is_floating_point()
    target_view = _class_last(target) if probabilities else target
    loss = torch.empty(batch_shape, dtype=ct, device=input.device)
    lse = torch.empty(batch_shape, dtype=ct, device=input.device)
    grad_input = (input if grad_into_input else torch.empty_like(input)) if need_input_grad else None
    grad_target = torch.empty_like(target) if need_target_grad else None
    grad_view = _class_last(grad_input) if grad_input is not None else None
    target_grad_view = _class_last(grad_target) if grad_target is not None else None

    denominator, anything_counts = _mean_denominator(target, spec, num_classes, ct)
    want_grad = need_input_grad or need_target_grad
    scale = (
        _reduction_scale(reduction, denominator, anything_counts, ct).to(input.device) if want_grad else None
    )
    per_sample = max(1, logits[0].numel()) if input.shape[0] else 1
    for start, stop in _blocks(input.shape[0], per_sample, BLOCK_ELEMENTS):
        loss[start:stop], lse[start:stop] = (block_fn or softmax_xent_block)(
            logits[start:stop],
            target_view[start:stop],
            spec,
            grad_scale=scale,
            grad_out=grad_view[start:stop] if grad_view is not None else None,
            target_grad_out=target_grad_view[start:stop] if target_grad_view is not None else None,
        )
    return _reduce(loss, reduction, denominator), lse, grad_input, grad_target


def _reduce(loss: Tensor, reduction: str, denominator: Tensor) -> Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / denominator.to(total)


def _scale_(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    """Scale a gradient made for an incoming gradient of 1 by the real one, in place (no new buffer)."""
    if grad is None:
        return None
    if grad_output.dim() == 0:
        if grad_output.device.type == "cpu" and float(grad_output) == 1.0:
            return grad
        return grad.mul_(grad_output.to(grad.dtype))
    return grad.mul_(grad_output.to(grad.dtype))


def sigmoid_bce_forward(
    input: Tensor,
    target: Tensor,
    spec: SigmoidLoss,
    reduction: str,
    *,
    need_input_grad: bool,
    need_target_grad: bool,
    block_fn: Callable[..., Tensor] | None = None,
) -> tuple[Tensor, None, Tensor | None, Tensor | None]:
    """Elementwise sigmoid BCE with its gradient, in blocks along the first dimension.

    ``block_fn`` computes one block (:func:`sigmoid_bce_block`'s contract; the default is it).

    input, target: any shape (the same); weight broadcasts to it, pos_weight to its last dimension.
    Returns (loss, None, grad_input, grad_target) in the layout of :func:`cross_entropy_forward`.
    """
    ct = compute_dtype(input.dtype)
    squeeze = input.dim() == 0
    logits = input.unsqueeze(0) if squeeze else input
    targets = target.reshape(logits.shape)
    weight = None if spec.weight is None else spec.weight.expand(logits.shape)
    grad_input = torch.empty_like(logits) if need_input_grad else None
    grad_target = torch.empty_like(targets) if need_target_grad else None
    count = logits.numel()
    scale = None
    if need_input_grad or need_target_grad:
        scale = _reduction_scale(reduction, torch.tensor(float(count)), count > 0, ct).to(input.device)
    per_row = max(1, logits[0].numel()) if logits.shape[0] else 1
    elementwise = torch.empty(logits.shape, dtype=ct, device=input.device) if reduction == "none" else None
    total = torch.zeros((), dtype=ct, device=input.device)
    for start, stop in _blocks(logits.shape[0], per_row, BLOCK_ELEMENTS):
        block_spec = SigmoidLoss(None if weight is None else weight[start:stop], spec.pos_weight)
        loss = (block_fn or sigmoid_bce_block)(
            logits[start:stop],
            targets[start:stop],
            block_spec,
            grad_scale=scale,
            grad_out=None if grad_input is None else grad_input[start:stop],
            target_grad_out=None if grad_target is None else grad_target[start:stop],
        )
        if elementwise is not None:
            elementwise[start:stop] = loss
        else:
            total += loss.sum()
    if elementwise is not None:
        result = elementwise.squeeze(0) if squeeze else elementwise
    else:
        result = total if reduction == "sum" else total / count
    if squeeze:
        grad_input = None if grad_input is None else grad_input.squeeze(0)
        grad_target = None if grad_target is None else grad_target.squeeze(0)
    return result, None, grad_input, grad_target


class FusedLossFunction(torch.autograd.Function):
    """Autograd for a loss on given logits whose forward already produced the gradient.

    ``compute(need_input_grad, need_target_grad)`` returns (loss, lse or None, grad_input, grad_target)
    for an incoming gradient of 1; backward scales them in place. ``class_dim`` is where a "none"
    loss lacks the input's class dimension (None when the loss is elementwise). Because backward reuses
    the stored buffers, a second backward through the same graph (retain_graph=True) raises torch's
    "modified by an inplace operation" error instead of returning a wrong gradient.
    """

    @staticmethod
    def forward(ctx, input, target, compute, needs, class_dim):  # type: ignore[override]
        loss, lse, grad_input, grad_target = compute(*needs)
        ctx.class_dim = class_dim
        ctx.save_for_backward(grad_input, grad_target)
        if lse is None:
            return loss
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, *_grad_lse):  # type: ignore[override]
        grad_input, grad_target = ctx.saved_tensors
        if ctx.class_dim is not None and grad_loss.dim() > 0:
            grad_loss = grad_loss.unsqueeze(ctx.class_dim)
        return _scale_(grad_input, grad_loss), _scale_(grad_target, grad_loss), None, None, None


# ----------------------------------------------------------------------------------------------------------
# Linear heads: logits = x @ W.T + b, formed one chunk of rows at a time
# ----------------------------------------------------------------------------------------------------------

BlockFn = Callable[[Tensor, int, int, Tensor | None, Tensor | None, Tensor | None], Tensor]


def default_chunk_rows(num_logit_columns: int, grad_element_bytes: int | None = None) -> int:
    """Rows per chunk: LINEAR_CHUNK_ELEMENTS logits (CPU), or GPU_LINEAR_CHUNK_BYTES of logits when the
    gradient is kept in the input dtype (``grad_element_bytes`` given), in multiples of
    MIN_LINEAR_CHUNK_ROWS rows and at least that many."""
    columns = max(num_logit_columns, 1)
    if grad_element_bytes is None:
        return max(MIN_LINEAR_CHUNK_ROWS, LINEAR_CHUNK_ELEMENTS // columns)
    rows = GPU_LINEAR_CHUNK_BYTES // (columns * grad_element_bytes)
    return max(MIN_LINEAR_CHUNK_ROWS, rows // MIN_LINEAR_CHUNK_ROWS * MIN_LINEAR_CHUNK_ROWS)


# Rows of the output per input-dtype product in accumulate_matmul's fallback: bounds its temporary.
ACCUMULATE_BLOCK_ROWS = 8192


@functools.cache
def _addmm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` accumulates low-precision products
    into a float32 ``acc`` in place on this device (cuBLAS does, with float32 C and beta = 1). Checked once
    per device and dtype on a small problem against the plain float32 product."""
    if device.type != "cuda":
        return False
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(64, 48, generator=generator, device=device).to(dtype)
    b = torch.randn(48, 80, generator=generator, device=device).to(dtype)
    acc = torch.randn(64, 80, generator=generator, device=device)
    expected = acc + a.float() @ b.float()
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.allclose(acc, expected, rtol=1e-3, atol=1e-3))


def accumulate_matmul(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a·b for bf16/fp16 ``a`` (M, K), ``b`` (K, P) into a float32 ``acc`` (M, P).

    On CUDA one addmm with a float32 output: the input-dtype product on the matrix units, accumulated in
    float32 into ``acc`` with no input-dtype rounding at all, so repeated calls sum like one big matmul.
    Where torch has no such addmm (the CPU), the same numbers come from float32 copies of the operands,
    ACCUMULATE_BLOCK_ROWS rows of ``acc`` at a time (rounding each product to the input dtype before the
    sum instead would add an error that grows when the partial sums cancel).
    """
    if _addmm_out_dtype_works(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        return
    b_wide = b.to(acc.dtype)
    for start in range(0, acc.shape[0], ACCUMULATE_BLOCK_ROWS):
        stop = min(start + ACCUMULATE_BLOCK_ROWS, acc.shape[0])
        acc[start:stop].addmm_(a[start:stop].to(acc.dtype), b_wide)


def linear_head_pass(
    x: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    block: BlockFn,
    *,
    loss_shape: tuple[int, ...],
    grad_scale: Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    target_grad_like: Tensor | None,
    chunk_rows: int | None,
    grad_in_input_dtype: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """One pass over the rows of x in chunks: logits, loss and (if grad_scale is given) the gradients.

    x: (N, D); linear_weight: (R, D); linear_bias: (R,) or None.
    ``block(logits, start, stop, grad_scale, grad_out, target_grad_out)`` turns the (B, R) logits of rows
    start:stop into their losses (B, ...), writing grad_scale·∂ℓ/∂logits into grad_out (which may alias
    logits). ``grad_scale`` is a 0-d tensor or has the loss's shape (rows first).

    FLOPs: 2·N·D·R for the logits, plus 2·N·D·R each for dX and dW when asked: 6·N·D·R, no recompute.
    Memory: one (B, R) chunk of logits (plus a float32 copy for low-precision inputs), dW in the compute
    dtype and dX; never the (N, R) logits.

    ``grad_in_input_dtype`` (the GPU path, for bf16/fp16 inputs): the block writes G in the input dtype over
    the chunk's logits (no float32 copy) and dX, dW come from input-dtype matmuls (float32 accumulation
    inside each, as eager autograd does). With one chunk dW is written in the input dtype; with several it
    is summed over chunks in float32 (:func:`accumulate_matmul`): an (R, D) float32 buffer, where summing
    in the input dtype would add one rounding per chunk (measured: 2.3× eager's dW error over five chunks).
    Returns (loss with ``loss_shape``, dX, dW, db, d_target), the gradients None when not asked for.
    """
    n_rows = x.shape[0]
    ct = compute_dtype(x.dtype)
    device = x.device
    num_columns = linear_weight.shape[0]
    in_place = x.dtype == ct or grad_in_input_dtype
    default_rows = default_chunk_rows(num_columns, x.element_size() if grad_in_input_dtype else None)
    rows = max(1, min(chunk_rows or default_rows, n_rows))
    want_grad = grad_scale is not None
    logits_buffer = torch.empty(rows, num_columns, dtype=x.dtype, device=device)
    grad_buffer = None
    if want_grad:
        grad_buffer = logits_buffer if in_place else torch.empty(rows, num_columns, dtype=ct, device=device)
    loss = torch.empty(loss_shape, dtype=ct, device=device)
    grad_x = torch.empty_like(x) if want_grad and need_dx else None
    # one chunk: dW = Gᵀ·X is a single matmul, written in the input dtype (eager's rounding); several
    # chunks: summed in the compute dtype so that no rounding accumulates across chunks
    dw_dtype = x.dtype if grad_in_input_dtype and rows >= n_rows else ct
    grad_weight = (
        torch.zeros(linear_weight.shape, dtype=dw_dtype, device=device) if want_grad and need_dw else None
    )
    grad_bias = torch.zeros(num_columns, dtype=ct, device=device) if want_grad and need_db else None
    grad_target = torch.empty_like(target_grad_like) if want_grad and target_grad_like is not None else None
    weight_t = linear_weight.t()
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        x_chunk = x[start:stop]
        logits = logits_buffer[: stop - start]
        if linear_bias is not None:
            torch.addmm(linear_bias, x_chunk, weight_t, out=logits)
        else:
            torch.mm(x_chunk, weight_t, out=logits)
        grad = grad_buffer[: stop - start] if grad_buffer is not None else None
        chunk_scale = None
        if grad_scale is not None:
            chunk_scale = grad_scale if grad_scale.dim() == 0 else grad_scale[start:stop]
        loss[start:stop] = block(
            logits,
            start,
            stop,
            chunk_scale,
            grad,
            grad_target[start:stop] if grad_target is not None else None,
        )
        if grad is None:
            continue
        # dX = G·W and dW += Gᵀ·X for this chunk: G = grad_scale·(ŷ − y), the logits' gradient
        if grad_x is not None:
            torch.mm(
                grad if grad.dtype == x.dtype else grad.to(x.dtype), linear_weight, out=grad_x[start:stop]
            )
        if grad_weight is not None:
            if grad.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad.t(), x_chunk.to(grad.dtype))  # no copy when the dtypes agree
            else:
                accumulate_matmul(grad_weight, grad.t(), x_chunk)
        if grad_bias is not None:
            grad_bias += grad.sum(0, dtype=ct)
    return loss, grad_x, grad_weight, grad_bias, grad_target


@dataclass(frozen=True)
class SoftmaxHead:
    """Softmax cross-entropy over ``num_classes`` for each of the ``out_features`` positions of a row.

    The linear weight is (C·d1·…·dk, D) so a row's logits reshape to (C, d1, ..., dk), as in torch's
    linear_cross_entropy. Rows whose every position is ignored are dropped before the matmul.
    """

    spec: SoftmaxLoss
    reduction: str
    num_classes: int
    out_features: tuple[int, ...]
    chunk_rows: int | None
    # one block of rows' loss and gradient (softmax_xent_block's contract); the Triton kernel on GPUs
    block_fn: Callable[..., tuple[Tensor, Tensor]] | None = None
    # linear_head_pass's GPU path: G in the input dtype, input-dtype matmuls
    grad_in_input_dtype: bool = False

    def _view(self, rows: Tensor) -> Tensor:
        return _class_last(rows.view(rows.shape[0], self.num_classes, *self.out_features))

    def _kept_rows(self, target: Tensor) -> Tensor | None:
        """Indices of rows with at least one counted position, or None when every row counts."""
        if target.is_floating_point():
            return None
        counted = (
            (target != self.spec.ignore_index).reshape(target.shape[0], math.prod(self.out_features)).any(1)
        )
        if counted.device.type != "cpu":
            return None  # selecting rows needs their count on the host (a GPU sync); compute them all
        return None if bool(counted.all()) else counted.nonzero().squeeze(1)

    def run(self, x, linear_weight, linear_bias, target, *, grad_scale, needs):
        need_dx, need_dw, need_db, need_target_grad = needs
        kept = self._kept_rows(target)
        x_kept, target_kept = (x, target) if kept is None else (x[kept], target[kept])
        scale_kept = (
            grad_scale if grad_scale is None or grad_scale.dim() == 0 or kept is None else grad_scale[kept]
        )
        probabilities = target.is_floating_point()

        def block(logits, start, stop, scale, grad_out, target_grad_out):
            rows_target = target_kept[start:stop]
            loss, _ = (self.block_fn or softmax_xent_block)(
                self._view(logits),
                self._view(rows_target) if probabilities else rows_target,
                self.spec,
                grad_scale=scale,
                grad_out=None if grad_out is None else self._view(grad_out),
                target_grad_out=None if target_grad_out is None else self._view(target_grad_out),
            )
            return loss

        loss, grad_x, grad_weight, grad_bias, grad_target = linear_head_pass(
            x_kept,
            linear_weight.reshape(-1, linear_weight.shape[-1]),
            None if linear_bias is None else linear_bias.reshape(-1),
            block,
            loss_shape=(x_kept.shape[0], *self.out_features),
            grad_scale=scale_kept,
            need_dx=need_dx,
            need_dw=need_dw,
            need_db=need_db,
            target_grad_like=target_kept if need_target_grad else None,
            chunk_rows=self.chunk_rows,
            grad_in_input_dtype=self.grad_in_input_dtype,
        )
        if grad_weight is not None:
            grad_weight = grad_weight.view(linear_weight.shape)
        if grad_bias is not None:
            grad_bias = grad_bias.view(linear_bias.shape)
        if kept is not None:
            loss = loss.new_zeros((x.shape[0], *self.out_features)).index_copy_(0, kept, loss)
            if grad_x is not None:
                grad_x = grad_x.new_zeros(x.shape).index_copy_(0, kept, grad_x)
        return loss, grad_x, grad_weight, grad_bias, grad_target

    def denominator(self, target: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor | bool]:
        return _mean_denominator(target, self.spec, self.num_classes, ct)


@dataclass(frozen=True)
class SigmoidHead:
    """One sigmoid and binary cross-entropy per logit; target and loss are (N, C)."""

    spec: SigmoidLoss
    reduction: str
    chunk_rows: int | None
    # one block's loss and gradient (sigmoid_bce_block's contract); the Triton kernel on GPUs
    block_fn: Callable[..., Tensor] | None = None
    # linear_head_pass's GPU path: G in the input dtype, input-dtype matmuls
    grad_in_input_dtype: bool = False

    def run(self, x, linear_weight, linear_bias, target, *, grad_scale, needs):
        """The head protocol of :class:`LinearHeadFunction`; the loss is (N, C) for "none", else each
        row's sum (N,) (no (N, C) buffer when only the total is wanted)."""
        need_dx, need_dw, need_db, need_target_grad = needs
        weight = None if self.spec.weight is None else self.spec.weight.expand(target.shape)
        per_element = self.reduction == "none"

        def block(logits, start, stop, scale, grad_out, target_grad_out):
            return sigmoid_bce_rows(
                logits,
                target[start:stop],
                SigmoidLoss(None if weight is None else weight[start:stop], self.spec.pos_weight),
                grad_scale=scale,
                grad_out=grad_out,
                target_grad_out=target_grad_out,
                block_fn=self.block_fn,
                row_sums=not per_element,
            )

        return linear_head_pass(
            x,
            linear_weight,
            linear_bias,
            block,
            loss_shape=tuple(target.shape) if per_element else tuple(target.shape[:1]),
            grad_scale=grad_scale,
            need_dx=need_dx,
            need_dw=need_dw,
            need_db=need_db,
            target_grad_like=target if need_target_grad else None,
            chunk_rows=self.chunk_rows,
            grad_in_input_dtype=self.grad_in_input_dtype,
        )

    def denominator(self, target: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor | bool]:
        """The "mean" reduction averages over every element."""
        return torch.tensor(float(target.numel()), dtype=ct, device=target.device), target.numel() > 0


Head = SoftmaxHead | SigmoidHead


def linear_head_loss(
    head: Head, x: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor
) -> Tensor:
    """The reduced loss alone, for when no gradient is wanted: 2·N·D·C FLOPs."""
    denominator, _ = head.denominator(target, compute_dtype(x.dtype))
    loss = head.run(x, linear_weight, linear_bias, target, grad_scale=None, needs=(False,) * 4)[0]
    return _reduce(loss, head.reduction, denominator)


class LinearHeadFunction(torch.autograd.Function):
    """Autograd for a chunked linear head (softmax or sigmoid), fused the same way as cross_entropy.

    For "mean" and "sum" the forward pass computes dX, dW and db along with the loss and backward only
    scales them in place. For "none" the incoming gradient differs per position, and dW = Σ_i x_iᵀ·g_i·G_i
    cannot be assembled from per-row pieces without keeping the (N, C) gradient, so the forward computes the
    loss only and backward recomputes the logits chunk by chunk with the incoming gradient folded in
    (8·N·D·C FLOPs in all).
    """

    @staticmethod
    def forward(ctx, x, linear_weight, linear_bias, target, head, needs):  # type: ignore[override]
        ct = compute_dtype(x.dtype)
        denominator, anything_counts = head.denominator(target, ct)
        scale = None
        if any(needs) and head.reduction != "none":
            scale = _reduction_scale(head.reduction, denominator, anything_counts, ct).to(x.device)
        loss, grad_x, grad_weight, grad_bias, grad_target = head.run(
            x, linear_weight, linear_bias, target, grad_scale=scale, needs=needs
        )
        ctx.head = head
        ctx.needs = needs
        ctx.dtypes = (x.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        if head.reduction == "none" and any(needs):
            ctx.save_for_backward(x, linear_weight, linear_bias, target)
        else:
            ctx.save_for_backward(*_cast_grads(ctx.dtypes, grad_x, grad_weight, grad_bias), grad_target)
        return _reduce(loss, head.reduction, denominator)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        head = ctx.head
        if head.reduction == "none":
            x, linear_weight, linear_bias, target = ctx.saved_tensors
            _, grad_x, grad_weight, grad_bias, grad_target = head.run(
                x,
                linear_weight,
                linear_bias,
                target,
                grad_scale=grad_loss.to(compute_dtype(x.dtype)),
                needs=ctx.needs,
            )
            grad_x, grad_weight, grad_bias = _cast_grads(ctx.dtypes, grad_x, grad_weight, grad_bias)
        else:
            grad_x, grad_weight, grad_bias, grad_target = (
                _scale_(grad, grad_loss) for grad in ctx.saved_tensors
            )
        return grad_x, grad_weight, grad_bias, grad_target, None, None


def _cast_grads(dtypes: tuple[torch.dtype | None, ...], *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients come out in the compute dtype (dW accumulates in float32); autograd wants the inputs'."""
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes, strict=True))
