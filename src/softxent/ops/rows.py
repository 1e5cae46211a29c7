"""The row drivers: the losses on given logits, in blocks of rows as the backend's policy cuts them.

Every op produces its gradient in the forward pass (the loss and ŷ − y come out of the same pass over the
logits), so backward only scales what forward left (:class:`softxent.ops.autograd.LossFunction`). The
torch backend on a CPU works in cache-sized blocks; the Triton backend takes all rows in one block, so a
call launches O(1) kernels whatever N. The only buffers of the full (N, C) size are the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from softxent.ops.policy import Policy
from softxent.ops.spec import (
    SigmoidLoss,
    SoftmaxLoss,
    class_last,
    compute_dtype,
    mean_denominator,
    reduce,
    reduction_scale,
)

if TYPE_CHECKING:  # the backends module imports the drivers
    from softxent.ops.backends import Backend


def over_blocks(
    blocks: list[tuple[int, int]],
    run: Callable[[int, int], tuple[Tensor, ...]],
    shapes: tuple[tuple[int, ...], ...],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, ...]:
    """The outputs of ``run(start, stop)`` over the blocks of rows, stitched along the first dimension into
    tensors of ``shapes``; a single block's outputs as they are (no copy: the Triton path's one launch)."""
    if len(blocks) == 1:
        return run(*blocks[0])
    outputs = tuple(torch.empty(shape, dtype=dtype, device=device) for shape in shapes)
    for start, stop in blocks:
        for output, part in zip(outputs, run(start, stop), strict=True):
            output[start:stop] = part
    return outputs


def cross_entropy_forward(
    input: Tensor,
    target: Tensor,
    spec: SoftmaxLoss,
    reduction: str,
    *,
    backend: Backend,
    need_input_grad: bool,
    need_target_grad: bool,
    grad_into_input: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Loss, lse, and the gradients of the reduced loss (for an incoming gradient of 1).

    ``grad_into_input``: the input's gradient overwrites the input itself (no second buffer of its size).

    input: (N, C) or (N, C, d1, ..., dk); target: (N, d1, ..., dk) indices or input-shaped probabilities.
    Returns loss (a scalar, or (N, d1, ..., dk) for "none"), lse (N, d1, ..., dk), grad_input (input's
    shape, dtype and layout) and grad_target, the latter two None when not asked for.
    """
    ct = compute_dtype(input.dtype)
    num_classes = input.shape[1]
    batch_shape = (input.shape[0], *input.shape[2:])
    logits = class_last(input)
    probabilities = target.is_floating_point()
    target_view = class_last(target) if probabilities else target
    grad_input = (input if grad_into_input else torch.empty_like(input)) if need_input_grad else None
    grad_target = torch.empty_like(target) if need_target_grad else None
    grad_view = class_last(grad_input) if grad_input is not None else None
    target_grad_view = class_last(grad_target) if grad_target is not None else None

    denominator, anything_counts = mean_denominator(target, spec, num_classes, ct)
    want_grad = need_input_grad or need_target_grad
    scale = None
    if want_grad:
        scale = reduction_scale(reduction, denominator, anything_counts, ct).to(input.device)
    per_sample = max(1, logits[0].numel()) if input.shape[0] else 1

    def run(start: int, stop: int) -> tuple[Tensor, Tensor]:
        return backend.softmax_block(
            logits[start:stop],
            target_view[start:stop],
            spec,
            grad_scale=scale,
            grad_out=grad_view[start:stop] if grad_view is not None else None,
            target_grad_out=target_grad_view[start:stop] if target_grad_view is not None else None,
        )

    blocks = backend.policy.row_blocks(input.shape[0], per_sample)
    loss, lse = over_blocks(blocks, run, (batch_shape, batch_shape), ct, input.device)
    return reduce(loss, reduction, denominator), lse, grad_input, grad_target


def sigmoid_bce_rows(
    logits: Tensor,
    target: Tensor,
    spec: SigmoidLoss,
    *,
    grad_scale: Tensor | None,
    grad_out: Tensor | None,
    target_grad_out: Tensor | None,
    block_fn: Callable[..., Tensor],
    policy: Policy,
    row_sums: bool = False,
) -> Tensor:
    """``block_fn`` (:func:`softxent.ops.torch_blocks.sigmoid_bce_block`'s contract) over the rows of
    (B, C) logits in the blocks ``policy`` cuts.

    ``spec.weight``: None or (B, C) (an expanded view is fine); ``spec.pos_weight``: None or (C,);
    ``grad_scale``: None, 0-d or (B, C). Returns the (B, C) losses in the compute dtype, or with
    ``row_sums`` each row's sum (B,) (no (B, C) loss kept).
    """
    rows, columns = logits.shape

    def run(first: int, last: int) -> tuple[Tensor]:
        scale = grad_scale[first:last] if isinstance(grad_scale, Tensor) and grad_scale.dim() else grad_scale
        loss = block_fn(
            logits[first:last],
            target[first:last],
            SigmoidLoss(None if spec.weight is None else spec.weight[first:last], spec.pos_weight),
            grad_scale=scale,
            grad_out=None if grad_out is None else grad_out[first:last],
            target_grad_out=None if target_grad_out is None else target_grad_out[first:last],
            row_sums=row_sums,
        )
        return (loss,)

    shape = (rows,) if row_sums else (rows, columns)
    (loss,) = over_blocks(
        policy.row_blocks(rows, columns), run, (shape,), compute_dtype(logits.dtype), logits.device
    )
    return loss


def sigmoid_bce_forward(
    input: Tensor,
    target: Tensor,
    spec: SigmoidLoss,
    reduction: str,
    *,
    backend: Backend,
    need_input_grad: bool,
    need_target_grad: bool,
) -> tuple[Tensor, None, Tensor | None, Tensor | None]:
    """Elementwise sigmoid BCE with its gradient, in blocks along the first dimension.

    input, target: any shape (the same); weight broadcasts to it, pos_weight to its last dimension.
    Returns (loss, None, grad_input, grad_target) in the layout of :func:`cross_entropy_forward`. For "mean"
    and "sum" the blocks return their rows' sums, so no elementwise loss is kept.
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
        scale = reduction_scale(reduction, torch.tensor(float(count)), count > 0, ct).to(input.device)
    per_row = max(1, logits[0].numel()) if logits.shape[0] else 1
    elementwise = reduction == "none"

    def run(start: int, stop: int) -> tuple[Tensor]:
        loss = backend.sigmoid_block(
            logits[start:stop],
            targets[start:stop],
            SigmoidLoss(None if weight is None else weight[start:stop], spec.pos_weight),
            grad_scale=scale,
            grad_out=None if grad_input is None else grad_input[start:stop],
            target_grad_out=None if grad_target is None else grad_target[start:stop],
            row_sums=not elementwise,
        )
        return (loss,)

    blocks = backend.policy.row_blocks(logits.shape[0], per_row)
    if elementwise:
        (result,) = over_blocks(blocks, run, (logits.shape,), ct, input.device)
        result = result.squeeze(0) if squeeze else result
    else:
        total = torch.zeros((), dtype=ct, device=input.device)
        for start, stop in blocks:
            total += run(start, stop)[0].sum()
        result = total if reduction == "sum" else total / count
    if squeeze:
        grad_input = None if grad_input is None else grad_input.squeeze(0)
        grad_target = None if grad_target is None else grad_target.squeeze(0)
    return result, None, grad_input, grad_target
