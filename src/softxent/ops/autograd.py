"""The autograd Functions: every loss produces its gradient in the forward pass, so backward scales it.

* :class:`FusedLossFunction`: losses on given logits (the row drivers' output);
* :class:`LinearHeadFunction`: any chunked linear head (the protocol of :mod:`softxent.ops.chunks`);
* :class:`LeanLinearCrossEntropyFunction`: the vocabulary-sliced softmax head, whose forward keeps O(N)
  statistics and whose backward recomputes each slice.

A backward asked to be differentiable (``create_graph=True``: second derivatives) cannot scale a gradient
that no graph produced; each Function then recomputes the loss with its ``eager`` composition
(:mod:`softxent.ops.eager`) and differentiates that, or, where that is impossible (the logits were
overwritten by ``inplace_backward``; the vocabulary-parallel ops), raises a RuntimeError saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from softxent.ops.chunks import LinearHead
from softxent.ops.slices import LeanSoftmaxHead
from softxent.ops.spec import Targets, compute_dtype, mean_denominator, reduce, reduction_scale

# The loss as a differentiable composition of the Function's tensor inputs, or why there is none.
Eager = Callable[..., Tensor] | str


def differentiable_grads(
    eager: Eager, inputs: Sequence[Tensor | None], needs: Sequence[bool], grad_loss: Tensor
) -> list[Tensor | None]:
    """grad_loss·∂loss/∂input for each input in ``needs``, with a graph (a backward under create_graph=True):
    the loss recomputed by ``eager`` from the Function's saved inputs and differentiated by torch."""
    if isinstance(eager, str):
        raise RuntimeError(eager)
    with torch.enable_grad():
        loss = eager(*inputs)
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    found = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True, allow_unused=True))
    return [next(found) if need else None for need in needs]


def scale_(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    """Scale a gradient made for an incoming gradient of 1 by the real one, in place (no new buffer)."""
    if grad is None:
        return None
    if grad_output.dim() == 0:
        if grad_output.device.type == "cpu" and float(grad_output) == 1.0:
            return grad
        return grad.mul_(grad_output.to(grad.dtype))
    return grad.mul_(grad_output.to(grad.dtype))


class FusedLossFunction(torch.autograd.Function):
    """Autograd for a loss on given logits whose forward already produced the gradient.

    ``compute(need_input_grad, need_target_grad)`` returns (loss, lse or None, grad_input, grad_target)
    for an incoming gradient of 1; backward scales them in place. ``class_dim`` is where a "none"
    loss lacks the input's class dimension (None when the loss is elementwise). Because backward reuses
    the stored buffers, a second backward through the same graph (retain_graph=True) raises torch's
    "modified by an inplace operation" error instead of returning a wrong gradient. ``eager(input,
    target)``: the loss for a differentiable backward (the input is kept for it), or why there is none.
    """

    @staticmethod
    def forward(ctx, input, target, compute, needs, class_dim, eager):  # type: ignore[override]
        loss, lse, grad_input, grad_target = compute(*needs)
        ctx.class_dim, ctx.needs, ctx.eager = class_dim, needs, eager
        kept = (input, target) if callable(eager) else (None, None)
        ctx.save_for_backward(grad_input, grad_target, *kept)
        if lse is None:
            return loss
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, *_grad_lse):  # type: ignore[override]
        grad_input, grad_target, input, target = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = differentiable_grads(ctx.eager, (input, target), ctx.needs, grad_loss)
            return (*grads, None, None, None, None)
        if ctx.class_dim is not None and grad_loss.dim() > 0:
            grad_loss = grad_loss.unsqueeze(ctx.class_dim)
        return scale_(grad_input, grad_loss), scale_(grad_target, grad_loss), None, None, None, None


def linear_head_loss(
    head: LinearHead, x: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor
) -> Tensor:
    """The reduced loss alone, for when no gradient is wanted: 2·N·D·C FLOPs."""
    denominator, _ = head.denominator(target, compute_dtype(x.dtype))
    loss = head.run(x, linear_weight, linear_bias, target, grad_scale=None, needs=(False,) * 4)[0]
    return reduce(loss, head.reduction, denominator)


class LinearHeadFunction(torch.autograd.Function):
    """Autograd for a chunked linear head (softmax or sigmoid), fused the same way as cross_entropy.

    For "mean" and "sum" the forward pass computes dX, dW and db along with the loss and backward only
    scales them in place. For "none" the incoming gradient differs per position, and dW = Σ_i x_iᵀ·g_i·G_i
    cannot be assembled from per-row pieces without keeping the (N, C) gradient, so the forward computes the
    loss only and backward recomputes the logits chunk by chunk with the incoming gradient folded in
    (8·N·D·C FLOPs in all). ``eager(x, W, b, target)``: the loss for a differentiable backward.
    """

    @staticmethod
    def forward(ctx, x, linear_weight, linear_bias, target, head, needs, eager):  # type: ignore[override]
        ct = compute_dtype(x.dtype)
        denominator, anything_counts = head.denominator(target, ct)
        scale = None
        if any(needs) and head.reduction != "none":
            scale = reduction_scale(head.reduction, denominator, anything_counts, ct).to(x.device)
        loss, grad_x, grad_weight, grad_bias, grad_target = head.run(
            x, linear_weight, linear_bias, target, grad_scale=scale, needs=needs
        )
        ctx.head, ctx.needs, ctx.eager = head, needs, eager
        ctx.dtypes = (x.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        # the inputs are kept by reference (they are parameters and activations the graph holds anyway)
        grads = cast_grads(ctx.dtypes, grad_x, grad_weight, grad_bias)
        ctx.save_for_backward(x, linear_weight, linear_bias, target, *grads, grad_target)
        return reduce(loss, head.reduction, denominator)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        head = ctx.head
        x, linear_weight, linear_bias, target, *fused = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = differentiable_grads(
                ctx.eager, (x, linear_weight, linear_bias, target), ctx.needs, grad_loss
            )
            return (*grads, None, None, None)
        if head.reduction == "none":
            _, grad_x, grad_weight, grad_bias, grad_target = head.run(
                x,
                linear_weight,
                linear_bias,
                target,
                grad_scale=grad_loss.to(compute_dtype(x.dtype)),
                needs=ctx.needs,
            )
            grad_x, grad_weight, grad_bias = cast_grads(ctx.dtypes, grad_x, grad_weight, grad_bias)
        else:
            grad_x, grad_weight, grad_bias, grad_target = (scale_(grad, grad_loss) for grad in fused)
        return grad_x, grad_weight, grad_bias, grad_target, None, None, None


def cast_grads(dtypes: tuple[torch.dtype | None, ...], *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients come out in the compute dtype (dW accumulates in float32); autograd wants the inputs'."""
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes, strict=True))


class LeanLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd for :class:`LeanSoftmaxHead`: the forward pass keeps only per-row lse and coeff (O(N)),
    and backward recomputes each slice's logits with the incoming gradient folded into the scale.
    ``eager(x, W, b, target)``: the loss for a differentiable backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, head, needs, eager):  # type: ignore[override]
        ct = compute_dtype(x.dtype)
        targets = Targets.prepare(target, head.spec, head.num_classes, ct)
        loss, coeff, m, log_sum_exp = head.forward_stats(x, weight, bias, targets)
        denominator, anything_counts = mean_denominator(target, head.spec, head.num_classes, ct)
        ctx.head, ctx.needs, ctx.targets, ctx.eager = head, needs, targets, eager
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, target.dtype)
        ctx.reduction_scale = reduction_scale(head.reduction, denominator, anything_counts, ct).to(x.device)
        ctx.save_for_backward(x, weight, bias, m, log_sum_exp, coeff)
        return reduce(loss, head.reduction, denominator)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        x, weight, bias, m, log_sum_exp, coeff = ctx.saved_tensors
        head, targets = ctx.head, ctx.targets
        if torch.is_grad_enabled():
            inputs = (x, weight, bias, targets.target)
            return (*differentiable_grads(ctx.eager, inputs, ctx.needs, grad_loss), None, None, None)
        scale = (grad_loss.to(m.dtype) * ctx.reduction_scale).expand_as(m)
        grads = head.backward_pass(x, weight, bias, targets, m, log_sum_exp, coeff, scale, ctx.needs)
        grad_x, grad_weight, grad_bias, grad_target = (
            None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)
        )
        return grad_x, grad_weight, grad_bias, grad_target, None, None, None


def lean_linear_cross_entropy(
    head: LeanSoftmaxHead,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    needs: tuple[bool, ...],
    eager: Eager,
) -> Tensor:
    """The lean head's reduced loss, through autograd when any of ``needs`` is set (else the loss alone)."""
    if any(needs):
        return LeanLinearCrossEntropyFunction.apply(x, weight, bias, target, head, needs, eager)
    ct = compute_dtype(x.dtype)
    targets = Targets.prepare(target, head.spec, head.num_classes, ct)
    loss = head.forward_stats(x, weight, bias, targets)[0]
    denominator, _ = mean_denominator(target, head.spec, head.num_classes, ct)
    return reduce(loss, head.reduction, denominator)
