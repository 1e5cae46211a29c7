r"""The ``memory="lean"`` softmax linear head: vocabulary slices, extra memory independent of C, exact.

``linear_cross_entropy(x, W, y, memory="lean")`` computes the same loss and gradients as the default mode
without keeping any (rows × C) block of logits. The classes are cut into slices of S columns
(W_v = W[v : v + S]) and the logits z_v = x·W_vᵀ + b_v of all N rows are formed one slice at a time:

* forward (2·N·D·C FLOPs): each slice updates per-row running statistics with the online softmax of
  Milakov & Gimelshein (arXiv 1805.02867): the max m, Σ exp(z − m), and the target-weighted Σq and
  Σq·(z − m), kept relative to the running max so that ±1e4 logits do not cancel; the true class's logit
  z_y is picked up by the slice that holds it. Then lse = m + log Σexp and
  ℓ = (Σq)·log Σexp − Σq·(z − m) + λ·lse², exactly as
  :func:`softxent.ops.torch_blocks.softmax_xent_block`.
* backward (6·N·D·C FLOPs): each slice's logits are formed again and turned into
  G_v = s·[(Σq + 2λ·lse)·exp(z_v − lse) − q_v] in place (the exp as exp((z_v − m) − log Σexp), see
  :func:`softxent.ops.spec.softmax_shift`); then dW_v = G_vᵀ·x in one matmul over all N rows (no accumulation
  of dW
  across chunks, so its rounding is eager autograd's), db_v = Σ_rows G_v and
  dX += G_v·W_v into a float32 accumulator.

Memory beyond inputs and gradients: one (N, S) slice of logits (plus a float32 copy where the backend keeps
the gradient in float32), the (N, D) float32 dX accumulator for low-precision inputs, and O(N) statistics.
Where that accumulator is kept, the policy's ``dx_sized_slices`` lets the gradient pass's slice take as many
bytes as x itself (dX's input-dtype copy needs that much at the end anyway), so the float32 sum is read and
written over fewer slices.
FLOPs: 8·N·D·C for forward and backward together (one recompute), 2·N·D·C for the loss alone.

The per-slice work is a pair of functions, the backend's ``slice_stats`` and ``slice_grad``
(:func:`softxent.ops.torch_blocks.slice_stats`, :func:`softxent.ops.torch_blocks.slice_grad` in torch ops; the
Triton kernels in :mod:`softxent.ops.triton.slices` keep the same contracts). The slice width comes from the
backend's :class:`~softxent.ops.policy.Policy`.

The sigmoid head's lean mode (:class:`LeanSigmoidHead`, ``linear_binary_cross_entropy(..., memory="lean")``)
walks the same slices in one pass: each class's loss needs only its own logit, so there are no statistics
to gather first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from softxent.ops import chunks
from softxent.ops.policy import Policy
from softxent.ops.rows import sigmoid_bce_rows
from softxent.ops.spec import (
    RowStats,
    SigmoidLoss,
    SoftmaxLoss,
    Targets,
    compute_dtype,
    finish,
    softmax_shift,
)


def vocabulary_slices(
    x: Tensor,
    num_classes: int,
    slice_columns: int | None,
    policy: Policy,
    summing_dx: bool = False,
    side: chunks.SideStream | None = None,
):
    """(slot, start, stop, logits buffer view (N, stop − start)) for each slice of the classes, with one
    reused (N, S) buffer, or with ``side`` two taken in turn (each allocated on first use; a slot is yielded
    once its last accumulation on ``side`` has read it, and ``side`` is joined after the last slice):
    S = ``slice_columns``, or by default :meth:`Policy.slice_columns` (``summing_dx``: dX is summed over
    the slices)."""
    rows = x.shape[0]
    if slice_columns is None:
        slice_columns = policy.slice_columns(rows, x.dtype, x.shape[1] if summing_dx else None)
    columns = max(1, min(slice_columns, num_classes))
    slots = 1 if side is None else 2
    buffers: list[Tensor] = []
    for index, start in enumerate(range(0, num_classes, columns)):
        stop = min(start + columns, num_classes)
        slot = index % slots
        if slot == len(buffers):
            buffers.append(torch.empty(rows, columns, dtype=x.dtype, device=x.device))
        if side is not None:
            side.claim(slot)
        yield slot, start, stop, buffers[slot][:, : stop - start]
    if side is not None:
        side.join()


def slice_logits(
    x: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int, out: Tensor
) -> Tensor:
    """z_v = x·W[start:stop]ᵀ + b[start:stop] into ``out`` (N, stop − start)."""
    if bias is not None:
        return torch.addmm(bias[start:stop], x, weight[start:stop].t(), out=out)
    return torch.mm(x, weight[start:stop].t(), out=out)


def slice_backward(
    grad: Tensor,
    x: Tensor,
    w_slice: Tensor,
    start: int,
    grad_x: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
    side: chunks.SideStream | None = None,
    slot: int = 0,
) -> None:
    """A slice's share of the linear head's gradients from its G_v (N, S): dW_v = G_vᵀ·x (one matmul over
    all rows, written whole), db_v = Σ_rows G_v, and dX += G_v·W_v summed over the slices in the compute
    dtype (float32 for low-precision inputs), on ``side``'s stream where given. ``x`` in G's dtype; dW/db
    are written at rows start:."""
    stop = start + grad.shape[1]
    if grad_weight is not None:
        torch.mm(grad.t(), x, out=grad_weight[start:stop])
    if grad_bias is not None:
        grad_bias[start:stop] = grad.sum(0, dtype=grad_bias.dtype)
    if grad_x is None:
        return
    if side is None:
        chunks.accumulate_matmul(grad_x, grad, w_slice)
    else:
        side.submit(slot, functools.partial(chunks.accumulate_matmul, grad_x, grad, w_slice), keep=(grad,))


@dataclass(frozen=True)
class LeanSoftmaxHead:
    """The vocabulary-sliced softmax head over a (C, D) weight (see the module docstring).

    ``slice_columns``: classes per slice (None: the policy's). ``stats_fn`` / ``grad_fn``: the backend's
    per-slice functions. Where ``policy.grad_in_input_dtype``, G is written in the input dtype over the
    slice's logits and the matmuls run in the input dtype (the Triton path); otherwise G is kept in the
    compute dtype (the torch path).
    """

    spec: SoftmaxLoss
    reduction: str
    num_classes: int
    slice_columns: int | None
    stats_fn: Callable[..., None]
    grad_fn: Callable[..., None]
    policy: Policy

    def forward_stats(self, x, weight, bias, targets: Targets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-row (loss, coeff, m, log Σexp) (:func:`~softxent.ops.spec.finish`,
        :func:`~softxent.ops.spec.softmax_shift`): one pass over the slices, 2·N·D·C FLOPs."""
        ct = compute_dtype(x.dtype)
        stats = RowStats.empty(x.shape[0], ct, x.device)
        if x.shape[0]:
            for _, start, stop, logits in vocabulary_slices(
                x, self.num_classes, self.slice_columns, self.policy
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
        low = self.policy.grad_in_input_dtype
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
        # with side_stream, slice v's dX accumulation runs beside slice v+1's work (two slots)
        side = chunks.SideStream(x.device) if self.policy.side_stream and need_dx else None
        slices = vocabulary_slices(x, self.num_classes, self.slice_columns, self.policy, need_dx, side)
        for slot, start, stop, logits in slices:
            slice_logits(x, weight, bias, start, stop, logits)
            grad = logits if low or x.dtype == ct else torch.empty(logits.shape, dtype=ct, device=x.device)
            self.grad_fn(
                logits, start, targets, self.spec, self.num_classes, m, log_sum_exp, coeff, scale,
                grad if (need_dx or need_dw or need_db) else None,
                grad_target[:, start:stop] if grad_target is not None else None,
            )  # fmt: skip
            slice_backward(grad, x_ct, weight[start:stop], start, grad_x, grad_weight, grad_bias, side, slot)
        return grad_x, grad_weight, grad_bias, grad_target


@dataclass(frozen=True)
class LeanSigmoidHead:
    """``linear_binary_cross_entropy(memory="lean")``: the sigmoid head over vocabulary slices of all rows.

    Each class's loss depends on its own logit only, so one pass suffices (no statistics, no recompute).
    Per slice of S classes: z_v = x·W_vᵀ + b_v for all N rows, then in place G_v = s·∂ℓ/∂z_v =
    s·w·(L·σ(z_v) − p·y) (the backend's ``sigmoid_block``),
    dW_v = G_vᵀ·x in one matmul over all N rows (nothing summed across chunks, so its rounding is eager
    autograd's), db_v = Σ_rows G_v, dX += G_v·W_v in the compute dtype. 6·N·D·C FLOPs, as the default mode.

    Memory beyond inputs and gradients: one (N, S) slice of logits (plus a float32 copy where the gradient is
    kept in float32) and the (N, D) float32 dX accumulator for low-precision inputs, independent of C;
    "mean" and "sum" add up the loss slice by slice, "none" returns the (N, C) loss. The head protocol of
    :func:`softxent.ops.autograd.linear_head` (``run``, ``denominator``, ``reduction``).
    """

    spec: SigmoidLoss
    reduction: str
    num_classes: int
    slice_columns: int | None
    block_fn: Callable[..., Tensor]  # the backend's sigmoid_block
    policy: Policy

    def denominator(self, target: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor | bool]:
        """The "mean" reduction averages over every element."""
        return torch.tensor(float(target.numel()), dtype=ct, device=target.device), target.numel() > 0

    def run(self, x, linear_weight, linear_bias, target, *, grad_scale, needs):
        """(loss, dX, dW, db, d_target) for x (N, D), W (C, D), target (N, C); ``grad_scale`` None (loss
        only), 0-d or (N, C). The loss is (N, C) for "none", else each row's sum (N,)."""
        need_dx, need_dw, need_db, need_target_grad = needs
        ct = compute_dtype(x.dtype)
        low = self.policy.grad_in_input_dtype
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
        summing_dx = grad_x is not None
        side = chunks.SideStream(device) if self.policy.side_stream and summing_dx else None
        slices = vocabulary_slices(x, self.num_classes, self.slice_columns, self.policy, summing_dx, side)
        for slot, start, stop, logits in slices:
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
                policy=self.policy,
                row_sums=not per_element,
            )
            if loss is not None:
                loss[:, start:stop] = part
            else:
                row_sums += part
            if grad is not None:
                slice_backward(
                    grad, x_ct, linear_weight[start:stop], start, grad_x, grad_weight, grad_bias, side, slot
                )
        return loss if per_element else row_sums, grad_x, grad_weight, grad_bias, grad_target
