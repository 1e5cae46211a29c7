r"""The softmax linear head's loss with a weight per row: what the estimators train on with sample weights.

torch's cross-entropy weighs rows only through their class (``weight[y_i]``); a weight per sample needs
``reduction="none"`` and a weighted sum, whose backward must recompute the logits (8·N·D·C FLOPs, not 6),
or probability targets q = s_i·onehot(y_i), an (N, C) matrix built for every batch. Here the row weights
ride in the head instead (:attr:`softxent.ops.chunks.SoftmaxHead.row_weight`): each row's gradient is
scaled by its s_i where it is made, in the forward pass, so the estimators keep class-index targets and
the fused head's 6·N·D·C FLOPs:

.. math::
    L = \sum_i s_i\,ℓ_i, \qquad \frac{∂L}{∂z_i} = s_i\,(ŷ_i - q_i)

with ℓ_i :func:`softxent.linear_cross_entropy`'s per-row loss (class weights and label smoothing as there).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from softxent.ops import autograd, backends, chunks, eager, spec


def row_weighted_linear_cross_entropy(
    x: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    row_weight: Tensor,
    *,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    impl: str = "auto",
) -> Tensor:
    """Σ_i s_i·ℓ_i for x ``(N, D)``, linear_weight ``(C, D)``, linear_bias ``(C,)`` or None, target ``(N,)``
    class indices in [0, C) (no ignore_index), row_weight ``(N,)`` (s_i >= 0), class_weight ``(C,)``.

    The gradient is made in the forward pass, as for :func:`softxent.linear_cross_entropy`; a
    differentiable backward (``create_graph=True``) recomputes the weighted sum with torch's ops.
    Arguments are not checked: callers pass validated tensors (the estimators do). ``impl``: as in
    :func:`softxent.linear_cross_entropy`.
    """
    num_classes = linear_weight.shape[0]
    backend = backends.select(impl, x.device)
    ct = spec.compute_dtype(x.dtype)
    loss_spec = spec.softmax_loss(class_weight, num_classes, x.device, ct, -100, label_smoothing, 0.0, None)
    head = chunks.SoftmaxHead(
        loss_spec, "sum", num_classes, (), None, backend.softmax_block, backend.policy, row_weight
    )
    per_row = partial(eager.linear_softmax_cross_entropy, spec=loss_spec, reduction="none")

    def differentiable(x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
        return (per_row(x, weight, bias, target) * row_weight.to(ct)).sum()

    enabled = torch.is_grad_enabled()
    needs = (*(enabled and t is not None and t.requires_grad for t in (x, linear_weight, linear_bias)), False)
    if any(needs):
        return autograd.LinearHeadFunction.apply(
            x, linear_weight, linear_bias, target, head, needs, differentiable
        )
    return autograd.linear_head_loss(head, x, linear_weight, linear_bias, target)
