"""The speed-mode linear-head drivers: logits = x·Wᵀ + b formed one chunk of rows at a time, never the
whole (N, C) matrix, with the gradient made in the same pass (6·N·D·C FLOPs, no recompute).

A head (:class:`SoftmaxHead`, :class:`SigmoidHead`; the lean heads of :mod:`softxent.ops.slices` and the
vocabulary-parallel head keep the same protocol) has ``run(x, W, b, target, *, grad_scale, needs)`` and
``denominator(target, ct)``; :func:`softxent.ops.autograd.linear_head` drives it. The chunk size and
the gradient's dtype come from the backend's :class:`~softxent.ops.policy.Policy`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from softxent.ops.policy import Policy, addmm_accumulates_in_float32
from softxent.ops.rows import sigmoid_bce_rows
from softxent.ops.spec import SigmoidLoss, SoftmaxLoss, class_last, compute_dtype, mean_denominator

ACCUMULATE_BLOCK_ROWS = 8192


class SideStream:
    """A float32 accumulation on a second CUDA stream (:attr:`Policy.side_stream`), beside the next block's
    work: the speed mode's dW += Gₖᵀ·Xₖ beside chunk k+1's logits matmul, row kernel and dX; the lean mode's
    dX += G_v·W_v beside slice v+1's logits and kernels. The blocks' logits alternate between two slots.

    An accumulation waits for the main stream's work so far (G is written: :meth:`submit`); the main
    stream's next work on a slot waits for that slot's last accumulation (:meth:`claim`), and the sum is
    read only after every accumulation (:meth:`join`). Tensors the side stream reads were allocated on the
    main stream: the slots and the sums live until after :meth:`join`, and anything else it reads is
    passed as ``keep`` and held until its slot is claimed, so the caching allocator cannot hand that memory
    out while it is read. Without CUDA (the interpreter) :meth:`submit` runs the work at once; tests defer
    it to the latest moment this protocol allows, which a wrong slot or a missing wait would expose.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.done: dict[int, tuple[torch.cuda.Event, tuple[Tensor, ...]]] = {}

    def submit(self, slot: int, work: Callable[[], None], keep: tuple[Tensor, ...] = ()) -> None:
        """Run ``work`` (reading ``slot``'s G) on the side stream, after the main stream's work so far."""
        if self.side is None:
            work()
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            work()
        event = torch.cuda.Event()
        event.record(self.side)
        self.done[slot] = (event, keep)

    def claim(self, slot: int) -> None:
        """Make the main stream wait until ``slot``'s last accumulation has read its G."""
        event, _ = self.done.pop(slot, (None, ()))
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def join(self) -> None:
        """Make the main stream wait for every accumulation."""
        if self.side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.done.clear()


def accumulate_matmul(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a·b: ``a`` (M, K), ``b`` (K, P), ``acc`` (M, P); a chunk's dW += Gᵀ·X or a slice's dX += G·W.

    Where ``a`` has acc's dtype, one addmm (``b`` converted where it differs: the torch path's float32 G
    against bf16 x). For bf16/fp16 ``a``, ``b`` into a float32 ``acc``, on CUDA one addmm with a float32
    output: the input-dtype product on the matrix units, accumulated in float32 into ``acc`` with no
    input-dtype rounding at all, so repeated calls sum like one big matmul. Where torch has no such addmm
    (the CPU), the same numbers come from float32 copies of the operands, ACCUMULATE_BLOCK_ROWS rows of
    ``acc`` at a time (rounding each product to the input dtype before the sum instead would add an error
    that grows when the partial sums cancel).
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b.to(acc.dtype))  # no copy when the dtypes agree
        return
    if addmm_accumulates_in_float32(acc.device, a.dtype):
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
    block: Callable[[Tensor, int, int, Tensor | None, Tensor | None, Tensor | None], Tensor],
    *,
    loss_shape: tuple[int, ...],
    grad_scale: Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    target_grad_like: Tensor | None,
    chunk_rows: int | None,
    policy: Policy,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """One pass over the rows of x in chunks: logits, loss and (if grad_scale is given) the gradients.

    x: (N, D); linear_weight: (R, D); linear_bias: (R,) or None.
    ``block(logits, start, stop, grad_scale, grad_out, target_grad_out)`` turns the (B, R) logits of rows
    start:stop into their losses (B, ...), writing grad_scale·∂ℓ/∂logits into grad_out (which may alias
    logits). ``grad_scale`` is a 0-d tensor or has the loss's shape (rows first).

    FLOPs: 2·N·D·R for the logits, plus 2·N·D·R each for dX and dW when asked: 6·N·D·R, no recompute.
    Memory: one (B, R) chunk of logits (plus a float32 copy for low-precision inputs), dW in the compute
    dtype and dX; never the (N, R) logits. With ``policy.weight_sized_chunks`` and dW asked for, a chunk
    takes at least the bytes of the input-dtype weight: no more than dW's own input-dtype copy at the end.

    ``policy.grad_in_input_dtype`` (the Triton path, for bf16/fp16 inputs): the block writes G in the input
    dtype over
    the chunk's logits (no float32 copy) and dX, dW come from input-dtype matmuls (float32 accumulation
    inside each, as eager autograd does). With one chunk dW is written in the input dtype; with several it
    is summed over chunks in float32 (:func:`accumulate_matmul`): an (R, D) float32 buffer, where summing
    in the input dtype would add one rounding per chunk (measured: 2.3× eager's dW error over five chunks).

    ``policy.side_stream`` (several chunks, dW asked for): chunks alternate between two slots, and each
    chunk's dW accumulation runs on a second CUDA stream (:class:`SideStream`); the same numbers, in the
    same order of accumulation.
    Returns (loss with ``loss_shape``, dX, dW, db, d_target), the gradients None when not asked for.
    """
    n_rows = x.shape[0]
    ct = compute_dtype(x.dtype)
    device = x.device
    num_columns = linear_weight.shape[0]
    grad_in_input_dtype = policy.grad_in_input_dtype
    in_place = x.dtype == ct or grad_in_input_dtype
    want_grad = grad_scale is not None
    features = x.shape[1] if want_grad and need_dw else None  # weight-sized chunks only where dW is summed
    rows = max(1, min(chunk_rows or policy.chunk_rows(num_columns, x.element_size(), features), n_rows))
    # with side_stream, chunk k's dW accumulation runs beside chunk k+1's work, so the chunks alternate
    # between two buffers
    side = SideStream(device) if policy.side_stream and want_grad and need_dw and rows < n_rows else None
    buffers = 2 if side is not None else 1
    logits_buffers = [torch.empty(rows, num_columns, dtype=x.dtype, device=device) for _ in range(buffers)]
    grad_buffers: list[Tensor | None] = [None] * buffers
    if want_grad:
        grad_buffers = [
            logits if in_place else torch.empty(rows, num_columns, dtype=ct, device=device)
            for logits in logits_buffers
        ]
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
    for chunk, start in enumerate(range(0, n_rows, rows)):
        stop = min(start + rows, n_rows)
        slot = chunk % buffers
        if side is not None:
            side.claim(slot)  # the slot's previous dW accumulation has read its G
        x_chunk = x[start:stop]
        logits = logits_buffers[slot][: stop - start]
        if linear_bias is not None:
            torch.addmm(linear_bias, x_chunk, weight_t, out=logits)
        else:
            torch.mm(x_chunk, weight_t, out=logits)
        grad_buffer = grad_buffers[slot]
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
        # dW += Gᵀ·X and dX = G·W for this chunk: G = grad_scale·(ŷ − y), the logits' gradient. dW first, so
        # that on a side stream it waits for the row kernel only
        if grad_weight is not None:
            if side is None:
                accumulate_matmul(grad_weight, grad.t(), x_chunk)
            else:
                side.submit(slot, functools.partial(accumulate_matmul, grad_weight, grad.t(), x_chunk))
        if grad_x is not None:
            torch.mm(
                grad if grad.dtype == x.dtype else grad.to(x.dtype), linear_weight, out=grad_x[start:stop]
            )
        if grad_bias is not None:
            grad_bias += grad.sum(0, dtype=ct)
    if side is not None:
        side.join()
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
    # one block of rows' loss and gradient (torch_blocks.softmax_xent_block's contract)
    block_fn: Callable[..., tuple[Tensor, Tensor]]
    policy: Policy
    # also give each position's lse: the loss comes back as (..., 2), [loss, lse], and no row is dropped
    with_lse: bool = False

    def _view(self, rows: Tensor) -> Tensor:
        return class_last(rows.view(rows.shape[0], self.num_classes, *self.out_features))

    def _kept_rows(self, target: Tensor) -> Tensor | None:
        """Indices of rows with at least one counted position, or None when every row counts."""
        if target.is_floating_point() or self.with_lse:
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
            loss, lse = self.block_fn(
                self._view(logits),
                self._view(rows_target) if probabilities else rows_target,
                self.spec,
                grad_scale=scale,
                grad_out=None if grad_out is None else self._view(grad_out),
                target_grad_out=None if target_grad_out is None else self._view(target_grad_out),
            )
            return torch.stack((loss, lse), -1) if self.with_lse else loss

        loss, grad_x, grad_weight, grad_bias, grad_target = linear_head_pass(
            x_kept,
            linear_weight.reshape(math.prod(linear_weight.shape[:-1]), linear_weight.shape[-1]),
            None if linear_bias is None else linear_bias.reshape(-1),
            block,
            loss_shape=(x_kept.shape[0], *self.out_features, *((2,) if self.with_lse else ())),
            grad_scale=scale_kept,
            need_dx=need_dx,
            need_dw=need_dw,
            need_db=need_db,
            target_grad_like=target_kept if need_target_grad else None,
            chunk_rows=self.chunk_rows,
            policy=self.policy,
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
        return mean_denominator(target, self.spec, self.num_classes, ct)


@dataclass(frozen=True)
class SigmoidHead:
    """One sigmoid and binary cross-entropy per logit; target and loss are (N, C)."""

    spec: SigmoidLoss
    reduction: str
    chunk_rows: int | None
    # one block's loss and gradient (torch_blocks.sigmoid_bce_block's contract)
    block_fn: Callable[..., Tensor]
    policy: Policy

    def run(self, x, linear_weight, linear_bias, target, *, grad_scale, needs):
        """The head protocol (:class:`LinearHead`); the loss is (N, C) for "none", else each
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
                policy=self.policy,
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
            policy=self.policy,
        )

    def denominator(self, target: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor | bool]:
        """The "mean" reduction averages over every element."""
        return torch.tensor(float(target.numel()), dtype=ct, device=target.device), target.numel() > 0


class LinearHead(Protocol):
    """What :func:`softxent.ops.autograd.linear_head` drives: ``run`` gives (loss, dX, dW, db,
    d_target) for a gradient scale (None: the loss alone), ``denominator`` "mean"'s denominator."""

    reduction: str

    def run(
        self,
        x: Tensor,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        target: Tensor,
        *,
        grad_scale: Tensor | None,
        needs: tuple[bool, ...],
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]: ...

    def denominator(self, target: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor | bool]: ...
