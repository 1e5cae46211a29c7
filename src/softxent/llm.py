r"""What LLM training takes from the output layer beyond the SFT loss: per-token log-probabilities and
entropy (RL: GRPO, RLOO, PPO; preference: DPO, KTO, ORPO) and a divergence from a teacher (distillation),
on logits or through the LM head without forming its (N, V) logits.

Each op checks its arguments (ValueError / TypeError naming the argument), then runs as the heads of
:mod:`softxent.functional` do: chunks of rows of logits, a backward that forms them again where the
incoming gradient is per token, and the eager composition for second derivatives.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import replace
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from softxent import _compile
from softxent import _validate as check
from softxent.ops import autograd, backends, distillation
from softxent.ops import log_probs as token_ops
from softxent.ops.spec import compute_dtype, reduce, reduction_scale

__all__ = ["LogProbs", "distillation_loss", "linear_distillation_loss", "linear_log_probs", "log_probs"]


class LogProbs(NamedTuple):
    """Per-token statistics of softmax(z), each of the target's shape; 0 (False) at ignored positions.

    log_probs: log ŷ_y (differentiable); entropy: H = −Σ_c ŷ_c log ŷ_c (differentiable); is_top1: whether
    y is the first argmax of z (bool); log_sum_sq_probs: log Σ_c ŷ_c²; mean_logits: (1/V) Σ_c z_c (the
    transformed logits). The last three have no gradient. Float fields are float32 (float64 for float64
    inputs).
    """

    log_probs: Tensor
    entropy: Tensor
    is_top1: Tensor
    log_sum_sq_probs: Tensor
    mean_logits: Tensor


def _transform(temperature: object, logit_scale: object, softcap: object) -> token_ops.Transform:
    return token_ops.Transform(
        logit_scale=check.check_logit_scale("logit_scale", logit_scale),
        softcap=check.check_softcap(softcap),
        temperature=check.check_temperature(temperature),
    )


def _check_token_target(
    target: object, shape: tuple[int, ...], num_classes: int, ignore_index: int, device
) -> Tensor:
    """Class indices of ``shape`` (the input's without its last dimension); their values are checked where
    the op runs (CPU tensors)."""
    target = check.check_tensor("target", target)
    if target.dtype not in check.CLASS_INDEX_DTYPES:
        raise TypeError(
            f"target: expected class indices (int64, int32 or uint8) of shape {shape}, got {target.dtype}"
        )
    if tuple(target.shape) != shape:
        raise ValueError(
            f"target: expected class indices of shape {shape} (the input's without its last dimension), "
            f"got shape {tuple(target.shape)}"
        )
    check.check_same_device("target", target, device)
    return target.long()


def _check_head(
    names: tuple[str, str, str], input: object, weight: object, bias: object, num_classes: int | None = None
) -> int:
    """A linear head's (..., D) input, (V, D) weight and (V,) bias or None, of one dtype and device; V."""
    input_name, weight_name, bias_name = names
    input = check.check_float_tensor(input_name, input)
    weight = check.check_float_tensor(weight_name, weight)
    if input.dim() == 0:
        raise ValueError(f"{input_name}: expected shape (..., in_features), got shape ()")
    features = input.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != features:
        raise ValueError(
            f"{weight_name}: expected shape (V, {features}) (in_features the last dimension of "
            f"{input_name}), got {tuple(weight.shape)}"
        )
    if num_classes is not None and weight.shape[0] != num_classes:
        raise ValueError(
            f"{weight_name}: expected the student's vocabulary of {num_classes} classes, got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype != input.dtype:
        raise TypeError(f"{weight_name}: expected dtype {input.dtype} ({input_name}'s), got {weight.dtype}")
    check.check_same_device(weight_name, weight, input.device)
    if bias is not None:
        bias = check.check_float_tensor(bias_name, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name}: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise TypeError(f"{bias_name}: expected dtype {input.dtype} ({input_name}'s), got {bias.dtype}")
        check.check_same_device(bias_name, bias, input.device)
    return weight.shape[0]


def _check_row_memory(op: str, memory: object) -> str:
    """``memory``: "speed" or "auto" (both run chunks of rows); the vocabulary-sliced "lean" mode of
    :func:`softxent.linear_cross_entropy` is not available for ``op``."""
    memory = check.check_memory(memory)
    if memory == "lean":
        raise ValueError(
            f"memory: expected 'speed' or 'auto' for {op} (chunks of rows; it has no vocabulary-sliced "
            "lean mode), got 'lean'"
        )
    return memory


def _reshaped(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t`` reshaped, or ``t`` itself where it has that shape already: under torch.compile the ops run in
    a custom op, below autograd, where even a no-op view would cut a tensor off its graph."""
    if tuple(t.shape) == tuple(shape) or (
        len(shape) == t.dim() and shape[0] == -1 and t.shape[1:] == shape[1:]
    ):
        return t
    return t.reshape(shape)


def _rows(t: Tensor) -> Tensor:
    """(..., C) as (N, C) for the custom-op call (traced by Dynamo, so recorded by autograd)."""
    return t.reshape(-1, t.shape[-1]) if t.dim() > 2 else t


def _flat_target(target: object, lead: tuple[int, ...]) -> object:
    """A target of the input's leading shape as (N,); anything else as given, for the op's own check."""
    if isinstance(target, Tensor) and target.dim() > 1 and tuple(target.shape) == lead:
        return target.reshape(-1)
    return target


def _token_outputs(op, needs: tuple[bool, ...], tensors: tuple[Tensor | None, ...], shape) -> LogProbs:
    outputs = autograd.TokenStatsFunction.apply(op, needs, *tensors)
    return LogProbs(*(_reshaped(t, shape) for t in outputs[:5]))


def log_probs(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> LogProbs:
    r"""Per-token log ŷ_y and entropy of softmax(z) (with the top-1 hit, log Σŷ² and the mean logit), for
    z = softcap·tanh(logit_scale·logits / softcap) / temperature.

    Computes, without the (..., V) log-softmax of the eager recipe:

    .. math::
        \log ŷ_y = z_y - \mathrm{lse}(z), \qquad H = -Σ_c ŷ_c \log ŷ_c, \qquad
        \frac{∂ \log ŷ_y}{∂z} = e_y - ŷ, \qquad \frac{∂H}{∂z} = -ŷ ⊙ (\log ŷ + H)

    log_probs and entropy are differentiable in any combination; an output no gradient reaches (an entropy
    that is only logged) costs backward nothing. The oracle is :func:`softxent.reference.log_probs`.

    Args:
        logits: ``(..., V)``, float32, float16, bfloat16 or float64 (the math runs in float32, float64 for
            float64).
        target: class indices ``(...)`` (int64, int32 or uint8) in [0, V) or ``ignore_index``.
        temperature: T > 0, the sampling temperature the logits are divided by.
        logit_scale: s, a factor applied first (models with a logit multiplier).
        softcap: None, or c > 0: z = c·tanh(s·l / c) / T (Gemma 2).
        ignore_index: positions with this target give 0 and no gradient.
        impl: "auto" (Triton for CUDA tensors where triton is installed, else torch ops), "torch" or
            "triton" (CUDA tensors, or any in Triton's interpreter, TRITON_INTERPRET=1).

    Returns:
        :class:`LogProbs`, each field of the target's shape.

    Example:
        >>> import torch, softxent
        >>> logits = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
        >>> out = softxent.log_probs(logits, torch.tensor([0]))
        >>> round(out.log_probs.item(), 4), round(out.entropy.item(), 4)
        (-0.2413, 0.6216)
        >>> out.log_probs.sum().backward()
        >>> logits.grad  # e_y − ŷ
        tensor([[ 0.2144, -0.1753, -0.0391]])
    """
    if torch.compiler.is_compiling():
        lead = tuple(logits.shape[:-1])
        outputs = _compile.token_call(
            "log_probs", dict(logits=_rows(logits), target=_flat_target(target, lead)),
            temperature=temperature, logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
            impl=impl,
        )  # fmt: skip
        return LogProbs(*(t.reshape(lead) for t in outputs))
    check.check_float_tensor("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits: expected shape (..., V), got shape ()")
    transform = _transform(temperature, logit_scale, softcap)
    ignore_index = check.check_ignore_index(ignore_index)
    backend = backends.select(impl, logits.device)
    shape = tuple(logits.shape[:-1])
    num_classes = logits.shape[-1]
    target = _check_token_target(target, shape, num_classes, ignore_index, logits.device)
    op = token_ops.LogitsLogProbs(transform, ignore_index, backend)
    rows = (_reshaped(logits, (-1, num_classes)), _reshaped(target, (-1,)))
    return _token_outputs(op, autograd.needs_grad(rows[0], None), rows, shape)


def linear_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    memory: str = "auto",
    impl: str = "auto",
) -> LogProbs:
    r""":func:`log_probs` of the logits ``input @ linear_weight.T + linear_bias``, never formed whole.

    Computes ``log_probs(F.linear(input, linear_weight, linear_bias), target, ...)``: chunks of rows of
    logits are formed, reduced to per-row statistics and dropped; backward forms them again with the
    incoming per-token gradients g (of log ŷ_y) and h (of H) folded in, G = [g·(e_y − ŷ) − h·ŷ ⊙
    (log ŷ + H)]·dz/dl, then dX = G·W, dW = Gᵀ·X, db = Σ G: 8·N·D·V FLOPs in all. Rows whose target is
    ignored are dropped before the matmul (CPU tensors).

    A frozen head (``linear_weight`` and ``linear_bias`` without ``requires_grad``, as under LoRA) forms
    dX of log ŷ_y in the forward pass, and backward scales it by g: 4·N·D·V FLOPs, two vocabulary-sized
    matmuls. An entropy gradient on top of that costs one recompute (4·N·D·V more).

    Args:
        input: ``(..., D)`` hidden states, e.g. ``(B, S, D)``.
        linear_weight: ``(V, D)``; linear_bias: ``(V,)`` or None; both of the input's dtype.
        target: ``(...)`` (the input's shape without D) class indices or ``ignore_index``.
        temperature, logit_scale, softcap, ignore_index, impl: as in :func:`log_probs`.
        chunk_size: rows per chunk (default: the policy's, about 16M logits on a CPU); with
            ``memory="lean"``, classes per slice (default: 64 MiB of logits).
        memory: "speed" (chunks of rows: extra memory one chunk of logits plus dW's float32 sum for
            low-precision inputs), "lean" (vocabulary slices of all rows: one (N, S) slice of logits, O(N)
            statistics and dX's float32 sum for low-precision inputs, independent of V; 8·N·D·V FLOPs, 6
            for a frozen head), or "auto" (speed where its memory fits on the device, else lean; speed on a
            CPU).

    Returns:
        :class:`LogProbs`, each field of the target's shape.

    Example:
        >>> import torch, softxent
        >>> x, W = torch.randn(2, 5, 8), torch.randn(11, 8)
        >>> y = torch.randint(0, 11, (2, 5))
        >>> out = softxent.linear_log_probs(x, W, y, temperature=0.7)
        >>> eager = torch.log_softmax(x @ W.T / 0.7, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        >>> torch.allclose(out.log_probs, eager, atol=1e-5)
        True
    """
    if torch.compiler.is_compiling():
        lead = tuple(input.shape[:-1])
        tensors = dict(
            input=_rows(input), linear_weight=linear_weight, linear_bias=linear_bias,
            target=_flat_target(target, lead),
        )  # fmt: skip
        outputs = _compile.token_call(
            "linear_log_probs", tensors, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
            ignore_index=ignore_index, chunk_size=chunk_size, memory=memory, impl=impl,
        )  # fmt: skip
        return LogProbs(*(t.reshape(lead) for t in outputs))
    num_classes = _check_head(("input", "linear_weight", "linear_bias"), input, linear_weight, linear_bias)
    transform = _transform(temperature, logit_scale, softcap)
    ignore_index = check.check_ignore_index(ignore_index)
    chunk_size = check.check_chunk_size(chunk_size)
    memory = check.check_memory(memory)
    backend = backends.select(impl, input.device)
    shape = tuple(input.shape[:-1])
    target = _check_token_target(target, shape, num_classes, ignore_index, input.device)
    if memory == "auto":
        rows = math.prod(shape)
        memory = backend.policy.linear_memory(rows, input.shape[-1], num_classes, input.dtype, input.device)
    head = token_ops.LeanLinearLogProbs if memory == "lean" else token_ops.LinearLogProbs
    op = head(transform, ignore_index, chunk_size, backend)
    rows = (_reshaped(input, (-1, input.shape[-1])), linear_weight, linear_bias, _reshaped(target, (-1,)))
    return _token_outputs(op, autograd.needs_grad(*rows[:3], None), rows, shape)


# ----------------------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------------------


def _divergence(
    divergence: object,
    beta: object,
    temperature: object,
    ignore_index: object,
    student: tuple,
    teacher: tuple,
) -> distillation.Divergence:
    if divergence not in distillation.DIVERGENCES:
        raise ValueError(f"divergence: expected one of {distillation.DIVERGENCES}, got {divergence!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta: expected a float in [0, 1], got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a float in [0, 1], got {beta}")
    temperature = check.check_temperature(temperature)

    def transform(prefix: str, scale: object, softcap: object) -> token_ops.Transform:
        return token_ops.Transform(
            logit_scale=check.check_logit_scale(f"{prefix}_logit_scale", scale),
            softcap=check.check_softcap(softcap, f"{prefix}_softcap"),
            temperature=temperature,
        )

    return distillation.Divergence(
        divergence, float(beta), transform("student", *student), transform("teacher", *teacher),
        check.check_ignore_index(ignore_index),
    )  # fmt: skip


def _check_positions(target: object, shape: tuple[int, ...], device) -> Tensor | None:
    """None, or integer labels of ``shape`` that mark the positions left out (their values are not classes
    here: only equality with ignore_index counts)."""
    if target is None:
        return None
    target = check.check_tensor("target", target)
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target: expected None or integer labels of shape {shape}, got {target.dtype}")
    if tuple(target.shape) != shape:
        raise ValueError(f"target: expected None or labels of shape {shape}, got shape {tuple(target.shape)}")
    check.check_same_device("target", target, device)
    return target.reshape(-1).long()


def _reduced(per_position, divergence: distillation.Divergence, reduction: str, *tensors):
    target = tensors[2] if len(tensors) == 3 else tensors[3]
    rows = tensors[0].shape[0]
    ct = compute_dtype(tensors[0].dtype)
    den, _ = distillation.denominator(target, rows, divergence.ignore_index, ct, tensors[0].device)
    return reduce(per_position(*tensors, divergence), reduction, den)


def _logits_forward(tensors, needs, *, divergence, reduction, backend) -> autograd.Forward:
    student, teacher, target = tensors
    ct = compute_dtype(student.dtype)
    den, anything = distillation.denominator(
        target, student.shape[0], divergence.ignore_index, ct, student.device
    )
    if not needs[0]:
        loss = distillation.divergence_rows(student, teacher, target, divergence, backend)
        return autograd.Forward(reduce(loss, reduction, den))
    scale = reduction_scale(reduction, den, anything, ct).to(student.device)
    grad = student.new_empty(student.shape)
    loss = distillation.divergence_rows(
        student, teacher, target, divergence, backend, grad_scale=scale, grad_out=grad
    )
    return autograd.Forward(reduce(loss, reduction, den), grads=(grad, None, None))


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""A divergence between the teacher's and the student's next-token distributions, fused: the forward
    pass also makes the student's gradient.

    With p = softmax(z / T) of each model's logits (after its own logit scale s and softcap c:
    z = c·tanh(s·l / c)), per position:

    .. math::
        \mathrm{forward\_kl} = KL(p_t ‖ p_s), \quad \mathrm{reverse\_kl} = KL(p_s ‖ p_t), \quad
        \mathrm{jsd} = β\,KL(p_t ‖ m) + (1 - β)\,KL(p_s ‖ m), \quad m = β p_t + (1 - β) p_s

    (TRL's GKD convention: jsd at β = 0 is forward_kl, at β = 1 reverse_kl; no T² factor). The teacher gets
    no gradient. Positions whose ``target`` equals ``ignore_index`` are left out: "mean" averages over the
    others (nan if none count), "none" gives 0 there. The oracle is
    :func:`softxent.reference.distillation_loss`.

    Args:
        student_logits, teacher_logits: ``(..., V)`` each, of one shape (the teacher may have another
            float dtype).
        divergence: "forward_kl", "reverse_kl" or "jsd"; beta: β in [0, 1] (jsd only).
        temperature: T > 0, shared by both models.
        target: None (every position counts) or integer labels ``(...)`` marking ignored positions.
        reduction: "mean", "sum" or "none".
        student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap: each model's own.
        impl: "auto" (Triton for CUDA tensors where triton is installed, else torch ops), "torch" or
            "triton" (CUDA tensors, or any in Triton's interpreter, TRITON_INTERPRET=1).

    Returns:
        float32 (float64 for float64 students): a scalar, or ``(...)`` for "none".

    Example:
        >>> import torch, softxent
        >>> student = torch.randn(4, 10, requires_grad=True)
        >>> teacher = torch.randn(4, 10)
        >>> loss = softxent.distillation_loss(student, teacher)
        >>> eager = torch.nn.functional.kl_div(
        ...     student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        >>> torch.allclose(loss, eager)
        True
    """
    if torch.compiler.is_compiling():
        lead = tuple(student_logits.shape[:-1])
        tensors = dict(
            student_logits=_rows(student_logits), teacher_logits=_rows(teacher_logits),
            target=_flat_target(target, lead),
        )  # fmt: skip
        loss = _compile.call(
            "distillation_loss", tensors, divergence=divergence, beta=beta, temperature=temperature,
            ignore_index=ignore_index, reduction=reduction, student_logit_scale=student_logit_scale,
            student_softcap=student_softcap, teacher_logit_scale=teacher_logit_scale,
            teacher_softcap=teacher_softcap, impl=impl,
        )  # fmt: skip
        return loss.reshape(lead) if reduction == "none" else loss
    check.check_float_tensor("student_logits", student_logits)
    check.check_float_tensor("teacher_logits", teacher_logits)
    if student_logits.dim() == 0:
        raise ValueError("student_logits: expected shape (..., V), got shape ()")
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(
            f"teacher_logits: expected the student's shape {tuple(student_logits.shape)} (one vocabulary), "
            f"got {tuple(teacher_logits.shape)}"
        )
    check.check_same_device("teacher_logits", teacher_logits, student_logits.device)
    spec = _divergence(
        divergence, beta, temperature, ignore_index,
        (student_logit_scale, student_softcap), (teacher_logit_scale, teacher_softcap),
    )  # fmt: skip
    reduction = check.check_reduction(reduction)
    backend = backends.select(impl, student_logits.device)
    shape = tuple(student_logits.shape[:-1])
    target = _check_positions(target, shape, student_logits.device)
    vocabulary = student_logits.shape[-1]
    rows = (_reshaped(student_logits, (-1, vocabulary)), teacher_logits.reshape(-1, vocabulary), target)
    loss_fn = autograd.Loss(
        partial(_logits_forward, divergence=spec, reduction=reduction, backend=backend),
        partial(_reduced, distillation.eager_divergence, spec, reduction),
        reduced=reduction != "none",
        class_dim=1,
    )
    loss, _ = autograd.apply(loss_fn, autograd.needs_grad(rows[0], None, None), *rows)
    return _reshaped(loss, shape) if reduction == "none" else loss


def _distillation_head(
    target, weights, *, head: distillation.DistillationHead
) -> distillation.DistillationHead:
    teacher_input, teacher_weight, teacher_bias = weights
    return replace(
        head, teacher_input=teacher_input, teacher_weight=teacher_weight, teacher_bias=teacher_bias
    )


def _eager_linear(x, weight, bias, target, teacher_x, teacher_weight, teacher_bias, divergence):
    return distillation.eager_linear_divergence(
        x, weight, bias, target, teacher_x, teacher_weight, teacher_bias, divergence
    )


def linear_distillation_loss(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    memory: str = "auto",
    impl: str = "auto",
) -> Tensor:
    r""":func:`distillation_loss` of ``student_input @ student_weight.T + student_bias`` against
    ``teacher_input @ teacher_weight.T + teacher_bias``, neither model's logits formed whole.

    One chunk of rows at a time: both models' logits of the chunk (the teacher's in a second buffer of
    the chunk's size), the divergence and, for "mean" and "sum", the student's logit gradient G, used at
    once for dX = G·W_s, dW_s += Gᵀ·X, db_s += Σ G (2·N·V·(D_s + D_t) + 4·N·V·D_s FLOPs; backward scales
    them). "none" computes the loss only and backward forms both models' logits again. Rows whose target is
    ignored are dropped before the matmuls (CPU tensors). The teacher gets no gradient, and its hidden size
    D_t may differ from the student's.

    Args:
        student_input: ``(..., D_s)``; student_weight: ``(V, D_s)``; student_bias: ``(V,)`` or None.
        teacher_input: ``(..., D_t)`` (the student input's leading shape); teacher_weight: ``(V, D_t)``
            (the student's vocabulary); teacher_bias: ``(V,)`` or None; the teacher's dtype may differ.
        target: None or integer labels of the leading shape; positions equal to ``ignore_index`` are left
            out.
        chunk_size: rows per chunk (default: the policy's).
        memory: "speed" or "auto" (chunks of rows).
        the rest: as in :func:`distillation_loss`.

    Example:
        >>> import torch, softxent
        >>> xs, Ws = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8)
        >>> xt, Wt = torch.randn(6, 12), torch.randn(20, 12)
        >>> loss = softxent.linear_distillation_loss(xs, Ws, xt, Wt, divergence="jsd", beta=0.5)
        >>> eager = softxent.distillation_loss(xs @ Ws.T, xt @ Wt.T, divergence="jsd", beta=0.5)
        >>> torch.allclose(loss, eager)
        True
    """
    if torch.compiler.is_compiling():
        lead = tuple(student_input.shape[:-1])
        tensors = dict(
            student_input=_rows(student_input), student_weight=student_weight, student_bias=student_bias,
            teacher_input=_rows(teacher_input), teacher_weight=teacher_weight, teacher_bias=teacher_bias,
            target=_flat_target(target, lead),
        )  # fmt: skip
        loss = _compile.call(
            "linear_distillation_loss", tensors, divergence=divergence, beta=beta, temperature=temperature,
            ignore_index=ignore_index, reduction=reduction, student_logit_scale=student_logit_scale,
            student_softcap=student_softcap, teacher_logit_scale=teacher_logit_scale,
            teacher_softcap=teacher_softcap, chunk_size=chunk_size, memory=memory, impl=impl,
        )  # fmt: skip
        return loss.reshape(lead) if reduction == "none" else loss
    num_classes = _check_head(
        ("student_input", "student_weight", "student_bias"), student_input, student_weight, student_bias
    )
    _check_head(
        ("teacher_input", "teacher_weight", "teacher_bias"),
        teacher_input,
        teacher_weight,
        teacher_bias,
        num_classes,
    )
    if tuple(teacher_input.shape[:-1]) != tuple(student_input.shape[:-1]):
        raise ValueError(
            f"teacher_input: expected the student input's leading shape {tuple(student_input.shape[:-1])}, "
            f"got shape {tuple(teacher_input.shape)}"
        )
    check.check_same_device("teacher_input", teacher_input, student_input.device)
    spec = _divergence(
        divergence, beta, temperature, ignore_index,
        (student_logit_scale, student_softcap), (teacher_logit_scale, teacher_softcap),
    )  # fmt: skip
    reduction = check.check_reduction(reduction)
    chunk_size = check.check_chunk_size(chunk_size)
    _check_row_memory("linear_distillation_loss", memory)
    backend = backends.select(impl, student_input.device)
    shape = tuple(student_input.shape[:-1])
    target = _check_positions(target, shape, student_input.device)
    head = distillation.DistillationHead(spec, reduction, chunk_size, backend)
    loss_fn = autograd.linear_head(
        partial(_distillation_head, head=head), reduction, partial(_reduced, _eager_linear, spec, reduction)
    )
    tensors = (
        _reshaped(student_input, (-1, student_input.shape[-1])), student_weight, student_bias, target,
        teacher_input.reshape(-1, teacher_input.shape[-1]).detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
    )  # fmt: skip
    needs = autograd.needs_grad(*tensors[:3], None, None, None, None)
    loss, _ = autograd.apply(loss_fn, needs, *tensors)
    return _reshaped(loss, shape) if reduction == "none" else loss


_compile.register(distillation_loss, linear_distillation_loss)
_compile.register_token_ops(log_probs, linear_log_probs)
