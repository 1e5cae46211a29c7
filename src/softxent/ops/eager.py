"""Each loss as a composition of differentiable torch ops: what a backward with ``create_graph=True``
recomputes, so that second derivatives (gradient penalties, meta-learning, ``gradgradcheck``) are exact.

The fused ops compute their first derivative in the forward pass with kernels that record no graph, so
their stored gradient cannot be differentiated again. When torch asks for a differentiable backward (grad
mode on inside backward, which is what ``create_graph=True`` means), the autograd Functions of
:mod:`softxent.ops.autograd` call these instead: the same loss, written with ``F.cross_entropy`` and
``F.binary_cross_entropy_with_logits`` on the compute dtype, whose derivatives torch knows to any order
(for the softmax, ∂²ℓ/∂z² = (Σq + 2λ·lse)·(diag ŷ − ŷŷᵀ) + 2λ·ŷŷᵀ). They materialize the logits of the
linear heads: a differentiable backward costs eager torch's memory, the first-order path keeps its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from softxent.ops.spec import SigmoidLoss, SoftmaxLoss, compute_dtype, mean_denominator, reduce


def softmax_cross_entropy(input: Tensor, target: Tensor, spec: SoftmaxLoss, reduction: str) -> Tensor:
    """input: (N, C) or (N, C, d1, ..., dk) logits; target: class indices (N, d1, ..., dk) or probabilities
    of the input's shape. The loss of :func:`softxent.cross_entropy` with ``spec``'s options."""
    ct = compute_dtype(input.dtype)
    z = input.to(ct)
    if spec.softcap is not None:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    probabilities = target.is_floating_point()
    per_position = F.cross_entropy(
        z,
        target.to(ct) if probabilities else target,
        weight=spec.weight,
        ignore_index=spec.ignore_index,
        reduction="none",
        label_smoothing=spec.label_smoothing,
    )
    if spec.z_loss > 0:
        lse = torch.logsumexp(z, dim=1)
        z_term = spec.z_loss * lse * lse
        per_position = per_position + (
            z_term if probabilities else torch.where(target != spec.ignore_index, z_term, 0.0)
        )
    denominator, _ = mean_denominator(target, spec, input.shape[1], ct)
    return reduce(per_position, reduction, denominator)


def softmax_lse(input: Tensor, spec: SoftmaxLoss) -> Tensor:
    """The per-position log-sum-exp of (N, C[, d1, ..., dk]) logits after the softcap (compute dtype)."""
    z = input.to(compute_dtype(input.dtype))
    if spec.softcap is not None:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    return torch.logsumexp(z, dim=1)


def sigmoid_binary_cross_entropy(input: Tensor, target: Tensor, spec: SigmoidLoss, reduction: str) -> Tensor:
    """The loss of :func:`softxent.binary_cross_entropy_with_logits` on ``input`` (any shape)."""
    ct = compute_dtype(input.dtype)
    return F.binary_cross_entropy_with_logits(
        input.to(ct),
        target.to(ct),
        weight=None if spec.weight is None else spec.weight.to(ct),
        pos_weight=None if spec.pos_weight is None else spec.pos_weight.to(ct),
        reduction=reduction,
    )


def linear_logits(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x·Wᵀ + b in the compute dtype for x (N, D) and W (C, d1, ..., dk, D): (N, C, d1, ..., dk)."""
    ct = compute_dtype(x.dtype)
    flat_weight = weight.reshape(-1, weight.shape[-1]).to(ct)
    flat_bias = None if bias is None else bias.reshape(-1).to(ct)
    return F.linear(x.to(ct), flat_weight, flat_bias).reshape(x.shape[0], *weight.shape[:-1])


def linear_softmax_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, spec: SoftmaxLoss, reduction: str
) -> Tensor:
    """The loss of :func:`softxent.linear_cross_entropy` for x (N, D), W (C, [d1, ..., dk,] D)."""
    return softmax_cross_entropy(linear_logits(x, weight, bias), target, spec, reduction)


def linear_sigmoid_binary_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, spec: SigmoidLoss, reduction: str
) -> Tensor:
    """The loss of :func:`softxent.linear_binary_cross_entropy` for x (N, D), W (C, D), target (N, C)."""
    return sigmoid_binary_cross_entropy(linear_logits(x, weight, bias), target, spec, reduction)
