"""softxent's public PyTorch ops: drop-in for ``torch.nn.functional``, fused, with a few extras.

Each op checks its arguments (ValueError / TypeError naming the argument, expected vs got), then hands
the work to a backend: ``impl="torch"`` (torch ops, any device; the CPU backend), ``impl="triton"`` (Triton
kernels for the per-row pass of each loss) or ``impl="auto"``, which picks Triton for CUDA tensors
where it is installed and the torch ops otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor

from softxent import _compile
from softxent import _validate as check
from softxent.ops import autograd, backends, chunks, eager, rows, slices, spec

__all__ = [
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_binary_cross_entropy",
    "linear_cross_entropy",
]


def _compiled(op: str, tensors: dict[str, Tensor | None], **config) -> Tensor | tuple[Tensor, Tensor]:
    """``op`` as one custom-op call (the path under torch.compile; see :mod:`softxent._compile`)."""
    return _compile.call(op, tensors, **config)


def _class_target_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    return input_shape[:1] + input_shape[2:] if len(input_shape) >= 2 else ()


def _check_target(target: Tensor, input_shape: tuple[int, ...], ignore_index: int) -> bool:
    """Checks the target against the input (shapes and dtypes; the values of class indices are checked
    where the loss runs); True when it holds class probabilities."""
    if target.dtype.is_floating_point:
        if tuple(target.shape) != input_shape:
            raise ValueError(
                f"target: expected class probabilities of the input's shape {input_shape} (or integer class "
                f"indices of shape {_class_target_shape(input_shape)}), got shape {tuple(target.shape)}"
            )
        check.check_no_ignore_index(ignore_index)
        return True
    check.check_class_target(target, _class_target_shape(input_shape), input_shape)
    return False


def _check_class_weight_grad(weight: Tensor | None, probabilities: bool) -> None:
    """As in torch, class weights may require grad with probability targets only."""
    if weight is not None and not probabilities:
        check.check_no_grad("weight", weight, " for class-index targets")


def _check_inplace(input: Tensor) -> None:
    """``inplace_backward`` writes the gradient over the logits: refused where torch refuses an in-place op
    (a leaf that requires grad, or a view of one) and under torch.func transforms and forward-mode AD,
    whose tensors it cannot overwrite."""
    active = autograd.transforms()
    if active or autograd.forward_mode_active():
        where = f"torch.func transforms ({', '.join(active)})" if active else "forward-mode AD"
        raise ValueError(
            f"inplace_backward: not supported under {where}, which need the logits after the call; "
            "pass inplace_backward=False"
        )
    if not input.requires_grad:
        return
    base = input._base if input._is_view() else None
    if input.is_leaf or (base is not None and base.is_leaf and base.requires_grad):
        what = "a leaf tensor" if input.is_leaf else "a view of a leaf tensor"
        raise ValueError(
            f"inplace_backward: expected logits computed by the graph (the gradient overwrites them), got "
            f"{what} that requires grad, which torch refuses to modify in place; pass "
            "inplace_backward=False"
        )


def _cross_entropy_forward(
    tensors: Sequence[Tensor | None],
    needs: tuple[bool, ...],
    *,
    loss_spec: spec.SoftmaxLoss,
    reduction: str,
    backend: backends.Backend,
    grad_into_input: bool,
) -> autograd.Forward:
    input, target, weight = tensors
    if not target.is_floating_point():
        check.check_class_values(target, input.shape[1], loss_spec.ignore_index)
    loss, lse, grad_input, grad_target = rows.cross_entropy_forward(
        input,
        target,
        replace(loss_spec, weight=weight),
        reduction,
        backend=backend,
        need_input_grad=needs[0],
        need_target_grad=needs[1],
        grad_into_input=grad_into_input,
    )
    return autograd.Forward(loss, lse, grads=(grad_input, grad_target, None))


def _infinite_weights(weight: Tensor | None) -> bool:
    """Whether CPU class weights hold an infinite (or nan) entry: such calls take the eager composition,
    whose values are torch's (:func:`softxent.ops.autograd.composed`). A host read, so CPU tensors only;
    skipped under torch.func transforms, whose tensors have no values to read."""
    if weight is None or weight.device.type != "cpu" or autograd.transforms():
        return False
    return not bool(torch.isfinite(weight).all())


def _eager_lse(
    input: Tensor, target: Tensor, weight: Tensor | None, *, loss_spec: spec.SoftmaxLoss
) -> Tensor:
    return eager.softmax_lse(input, loss_spec)


_OVERWRITTEN = (
    "softxent.cross_entropy: a differentiable backward (create_graph=True) needs the logits, which "
    "inplace_backward=True overwrote with their gradient; call it with inplace_backward=False"
)


def _cross_entropy_loss(
    reduction: str,
    *,
    loss_spec: spec.SoftmaxLoss,
    backend: backends.Backend,
    grad_into_input: bool,
    batched=None,
) -> autograd.Loss:
    """cross_entropy's :class:`softxent.ops.autograd.Loss` on (input, target, class weight)."""
    forward = partial(
        _cross_entropy_forward, loss_spec=loss_spec, reduction=reduction, backend=backend,
        grad_into_input=grad_into_input,
    )  # fmt: skip
    eager_loss = (
        _OVERWRITTEN
        if grad_into_input
        else partial(_eager_cross_entropy, loss_spec=loss_spec, reduction=reduction)
    )
    return autograd.Loss(
        forward, eager_loss, reduced=reduction != "none", class_dim=1, unfused=(2,), batched=batched
    )


def _eager_cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, *, loss_spec: spec.SoftmaxLoss, reduction: str
) -> Tensor:
    return eager.softmax_cross_entropy(input, target, replace(loss_spec, weight=weight), reduction)


def _fold_batch(
    batch_size: int,
    in_dims: Sequence[int | None],
    needs: tuple[bool, ...],
    tensors: Sequence[Tensor | None],
    *,
    make_loss,
    reduction: str,
    denominators,
    into_rows: bool,
) -> tuple | None:
    """A row loss over a vmap batch in one call (:attr:`softxent.ops.autograd.Loss.batched`): the batch's
    input and target (batch first) folded into rows (``into_rows``: (B, N, ...) -> (B·N, ...), a softmax
    loss's rows; else kept as an extra leading dimension, an elementwise loss's), the loss taken per
    position by ``make_loss("none")``, then reduced per sample as the loss's reduction says, "mean" dividing
    each sample by its own ``denominators(target (B, ...)) -> (denominator, anything counts)``. None
    (a call per sample) where the loss's weights are batched or differentiated."""
    if any(dim is not None for dim in in_dims[2:]) or any(needs[2:]):
        return None
    input, target = (
        autograd.batch_first(t, dim, batch_size) for t, dim in zip(tensors[:2], in_dims[:2], strict=True)
    )
    if into_rows:
        folded = (input.reshape(-1, *input.shape[2:]), target.reshape(-1, *target.shape[2:]))
    else:
        folded = (input, target)
    loss, lse, *grads = autograd.apply_all(make_loss("none"), needs, *folded, *tensors[2:])

    def unfold(t: Tensor | None) -> Tensor | None:
        return (
            None
            if t is None
            else t.reshape(batch_size, *t.shape[1:])
            if not into_rows
            else t.reshape(batch_size, -1, *t.shape[1:])
        )

    loss, lse, grads = unfold(loss), unfold(lse), [unfold(g) for g in grads]
    if reduction != "none":
        total = loss.reshape(batch_size, -1).sum(1)
        if reduction == "mean":
            denominator, anything_counts = denominators(target)
            loss = total / denominator
            scale = torch.where(anything_counts, 1.0 / denominator, torch.zeros_like(denominator))
            grads = [
                None if g is None else g * scale.view(-1, *(1,) * (g.dim() - 1)).to(g.dtype) for g in grads
            ]
        else:
            loss = total
    return (loss, lse, *grads)


def _softmax_denominators(
    target: Tensor, *, ignore_index: int, weight: Tensor | None, num_classes: int, ct: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Each sample's "mean" denominator (:func:`softxent.ops.spec.mean_denominator`) for targets (B, ...)."""
    batch_size = target.shape[0]
    if target.is_floating_point():
        positions = target[0].numel() // num_classes if num_classes and batch_size else 0
        denominator = torch.full((batch_size,), float(positions), dtype=ct, device=target.device)
        return denominator, denominator > 0
    counted = (target != ignore_index).reshape(batch_size, -1)
    if weight is None:
        count = counted.sum(1)
        return count.to(ct), count > 0
    safe = torch.where(counted, target.reshape(batch_size, -1), 0)
    return torch.where(counted, weight[safe].to(ct), 0.0).sum(1), counted.any(1)


def _element_denominators(target: Tensor, *, ct: torch.dtype) -> tuple[Tensor, Tensor]:
    """Each sample's "mean" denominator of an elementwise loss (its element count), targets (B, ...)."""
    count = target[0].numel() if target.shape[0] else 0
    denominator = torch.full((target.shape[0],), float(count), dtype=ct, device=target.device)
    return denominator, denominator > 0


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Softmax cross-entropy on logits, fused: the forward pass also produces the gradient ŷ − y.

    Computes ``torch.nn.functional.cross_entropy(input, target, weight, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)`` with the same arguments, results and
    gradients. For a position with logits z, class weight w, smoothing ε and target y:

    .. math::
        ℓ = -\sum_c q_c \log ŷ_c + z_{loss}·lse², \quad ŷ = \mathrm{softmax}(z), \quad
        q_c = (1-ε) w_y 1[c=y] + \tfrac{ε}{C} w_c, \quad
        \frac{∂ℓ}{∂z} = (\textstyle\sum_c q_c + 2 z_{loss} lse)\,ŷ - q

    which is ŷ − y in the plain case. "mean" divides by Σ w_y over non-ignored positions (the number of
    positions for probability targets), as torch does; all-ignored or empty batches give nan.

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; float32, float16, bfloat16 or float64.
            The math runs in float32 (float64 for float64 input).
        target: class indices (int64, uint8 or int32) of the input's shape without the class dimension,
            or class probabilities (floating) of the input's shape.
        weight: ``(C,)`` class weights (any values, as in torch; differentiable with probability targets).
        size_average, reduce: deprecated, as in torch.
        ignore_index: class-index targets equal to it count for nothing (an int; must be negative with
            probability targets, as in torch).
        reduction: "mean", "sum" or "none".
        label_smoothing: ε in [0, 1].
        z_loss: adds z_loss·lse² per counted position (PaLM's auxiliary loss), not class-weighted.
        softcap: if given, logits become softcap·tanh(z/softcap) first (Gemma 2).
        return_lse: also return the log-sum-exp per position (float32, not differentiable).
        inplace_backward: when the input's gradient is needed, write it over the input's own storage
            (the logits are gone after the call; no second buffer of their size, as Liger's loss does).
            The input's version counter is bumped, so an op that saved the logits for its own backward
            raises torch's "modified by an inplace operation" error instead of using the gradient. Under
            torch.compile the gradient gets its own buffer. Refused (ValueError) for a leaf tensor that
            requires grad or a view of one, as torch refuses in-place ops on them, and under torch.func.
        impl: "auto" or "torch".

    Returns:
        The loss in float32 (float64 for float64 input): a scalar, or the batch shape for "none";
        with ``return_lse``, a tuple (loss, lse).

    On the CPU it holds one buffer the size of the input (the gradient) beyond small per-block temporaries.

    Example:
        >>> import torch, softxent
        >>> logits = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
        >>> loss = softxent.cross_entropy(logits, torch.tensor([0]))
        >>> round(loss.item(), 4)
        0.2413
        >>> loss.backward()
        >>> logits.grad  # ŷ − y
        tensor([[-0.2144,  0.1753,  0.0391]])
    """
    if torch.compiler.is_compiling():
        return _compiled(
            "cross_entropy", dict(input=input, target=target, weight=weight),
            reduction=check.check_reduction_legacy(size_average, reduce, reduction),
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            return_lse=return_lse, impl=impl,
        )  # fmt: skip
    check.check_float_tensor("input", input)
    check.check_tensor("target", target)
    reduction = check.check_reduction_legacy(size_average, reduce, reduction)
    label_smoothing = check.check_label_smoothing(label_smoothing)
    ignore_index = check.check_ignore_index(ignore_index)
    return_lse = check.check_bool("return_lse", return_lse)
    inplace_backward = check.check_bool("inplace_backward", inplace_backward)
    backend = backends.select(impl, input.device)
    if input.dim() == 0:
        raise ValueError("input: expected logits of shape (C,), (N, C) or (N, C, d1, ..., dk), got shape ()")
    check.check_same_device("target", target, input.device)
    input_shape = tuple(input.shape)
    num_classes = input_shape[1] if input.dim() >= 2 else input_shape[0]
    probabilities = _check_target(target, input_shape, ignore_index)
    target = target if probabilities else target.long()
    ct = spec.compute_dtype(input.dtype)
    loss_spec = spec.softmax_loss(
        weight, num_classes, input.device, ct, ignore_index, label_smoothing, z_loss, softcap
    )
    class_weight = loss_spec.weight
    _check_class_weight_grad(class_weight, probabilities)
    if inplace_backward:
        _check_inplace(input)
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    needs = autograd.needs_grad(input, *((target, class_weight) if probabilities else (None, None)))
    grad_into_input = inplace_backward and needs[0]
    if grad_into_input:
        if _overlaps(input):
            raise ValueError(
                "inplace_backward: expected logits whose elements each have their own memory to write the "
                f"gradient into, got a view that shares memory between elements (shape {tuple(input.shape)}, "
                f"strides {input.stride()}, e.g. from expand()); pass a contiguous tensor or "
                "inplace_backward=False"
            )
        torch.autograd.graph.increment_version(input)
    bare = replace(loss_spec, weight=None)
    if _infinite_weights(class_weight) and not grad_into_input:
        eager_loss = partial(_eager_cross_entropy, loss_spec=bare, reduction=reduction)
        loss_fn = autograd.composed(eager_loss, reduction != "none", partial(_eager_lse, loss_spec=bare))
    else:
        rows_loss = partial(
            _cross_entropy_loss, loss_spec=bare, backend=backend, grad_into_input=grad_into_input
        )
        denominators = partial(
            _softmax_denominators,
            ignore_index=ignore_index,
            weight=class_weight,
            num_classes=num_classes,
            ct=ct,
        )
        batched = partial(
            _fold_batch, make_loss=rows_loss, reduction=reduction, denominators=denominators,
            into_rows=True,
        )  # fmt: skip
        loss_fn = rows_loss(reduction, batched=batched)
    loss, lse = autograd.apply(loss_fn, needs, input, target, class_weight)
    if unbatched:
        lse = lse.squeeze(0)
        if reduction == "none":
            loss = loss.squeeze(0)
    return (loss, lse) if return_lse else loss


def _overlaps(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: with the dimensions of more than one element in
    order of stride, each stride must pass the whole extent of the smaller ones (stride 0, as expand()
    makes, never does). Exotic interleaved layouts that do not overlap count as overlapping."""
    dims = sorted((stride, size) for stride, size in zip(t.stride(), t.shape, strict=True) if size > 1)
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def _check_linear(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, class_dims: int
) -> tuple[int, tuple[int, ...]]:
    """Shapes and dtypes of a linear head; returns (C, out_features)."""
    check.check_float_tensor("input", input)
    check.check_float_tensor("linear_weight", linear_weight)
    if input.dim() not in (1, 2):
        raise ValueError(
            f"input: expected shape (N, in_features) or (in_features,), got {tuple(input.shape)}"
        )
    if linear_weight.dim() < 2 or (class_dims == 0 and linear_weight.dim() != 2):
        expected = (
            "(C, in_features)" if class_dims == 0 else "(C, in_features) or (C, d1, ..., dk, in_features)"
        )
        raise ValueError(f"linear_weight: expected shape {expected}, got {tuple(linear_weight.shape)}")
    if linear_weight.shape[-1] != input.shape[-1]:
        raise ValueError(
            f"linear_weight: expected last dimension in_features={input.shape[-1]} (the input's), "
            f"got shape {tuple(linear_weight.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"linear_weight: expected dtype {input.dtype} (the input's), got {linear_weight.dtype}"
        )
    check.check_same_device("linear_weight", linear_weight, input.device)
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None:
        check.check_float_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (num_classes, *out_features):
            raise ValueError(
                f"linear_bias: expected shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}"
            )
        if linear_bias.dtype != input.dtype:
            raise TypeError(
                f"linear_bias: expected dtype {input.dtype} (the input's), got {linear_bias.dtype}"
            )
        check.check_same_device("linear_bias", linear_bias, input.device)
    if out_features and input.dim() == 1:
        raise ValueError(
            f"input: a K-dimensional loss (linear_weight of shape {tuple(linear_weight.shape)}) "
            f"expects batched input (N, {input.shape[-1]}), got shape {tuple(input.shape)}"
        )
    return num_classes, out_features


def _auto_memory(backend: backends.Backend, input: Tensor, num_classes: int) -> str:
    """``memory="auto"``'s choice for this call (:meth:`softxent.ops.policy.Policy.linear_memory`)."""
    rows = input.shape[0] if input.dim() == 2 else 1
    return backend.policy.linear_memory(rows, input.shape[-1], num_classes, input.dtype, input.device)


def _apply_head(
    loss_fn: autograd.Loss,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weights: tuple[Tensor | None, ...],
    *,
    differentiable_target: bool,
    differentiable_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """A linear head's (loss, lse or None) on (x, W, b, target, *weights), unbatched input (D,) taken as
    one row."""
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    needs = autograd.needs_grad(
        input, linear_weight, linear_bias, target if differentiable_target else None,
        *(weights if differentiable_weights else (None,) * len(weights)),
    )  # fmt: skip
    loss, lse = autograd.apply(loss_fn, needs, input, linear_weight, linear_bias, target, *weights)
    if unbatched:
        loss = loss if loss_fn.reduced else loss.squeeze(0)
        lse = None if lse is None else lse.squeeze(0)
    return loss, lse


def _softmax_head(
    target: Tensor, weights: Sequence[Tensor | None], *, check_target, head: chunks.SoftmaxHead
) -> chunks.SoftmaxHead:
    check_target(target)
    return replace(head, spec=replace(head.spec, weight=weights[0]))


def _eager_linear_cross_entropy(
    x: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    *, loss_spec: spec.SoftmaxLoss, reduction: str,
) -> Tensor:  # fmt: skip
    return eager.linear_softmax_cross_entropy(
        x, linear_weight, linear_bias, target, replace(loss_spec, weight=weight), reduction
    )


def _no_check(target: Tensor) -> None:
    return None


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: object | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    memory: str = "speed",
    return_lse: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Cross-entropy of a linear head without materializing the (N, C) logits.

    Computes ``cross_entropy(input @ linear_weight.T + linear_bias, target, weight, ...)`` — torch 2.13's
    ``F.linear_cross_entropy`` — in chunks of rows: each chunk's logits are formed by one matmul, turned
    into ∂L/∂z = ŷ − y (scaled) in place, and used at once for dX = G·W and dW += Gᵀ·X, db += Σ G.
    That is 6·N·D·C FLOPs in all with no recompute, so backward only scales dX, dW and db. Rows whose
    targets are all ignored are dropped before the matmul. For reduction="none" the forward computes the
    loss only and backward recomputes (8·N·D·C FLOPs), since per-row incoming gradients reach dW.

    ``memory="lean"`` bounds the extra memory independently of C: the classes are cut into vocabulary
    slices; the forward pass keeps only per-row running statistics (online log-sum-exp) and backward forms
    each slice's logits again, writing dW one slice at a time (8·N·D·C FLOPs in all, 2·N·D·C for the loss
    alone). Extra memory: one (N, S) slice of logits, an (N, D) float32 dX accumulator and O(N) numbers.
    See :mod:`softxent.ops.slices`.

    Args:
        input: ``(N, D)`` or ``(D,)``.
        linear_weight: ``(C, D)``, or ``(C, d1, ..., dk, D)`` for a K-dimensional loss (as in torch).
        target: class indices ``(N,)`` / ``(N, d1, ..., dk)`` or probabilities of the logits' shape.
        linear_bias: ``(C,)`` / ``(C, d1, ..., dk)`` or None.
        weight, reduction, label_smoothing, z_loss, softcap: as in :func:`cross_entropy`.
        ignore_index: as torch: None means -100 for class indices; must be None for probabilities.
        options: accepted for compatibility with torch's signature and ignored (softxent always chunks).
        chunk_size: rows per chunk (default: about 16M logits, at least 256 rows; on the GPU path 512 MiB
            of logits); with ``memory="lean"``, classes per vocabulary slice (default: 64 MiB of logits).
        memory: "speed" (the default: 6·N·D·C FLOPs, one chunk of rows × C logits) or "lean" (extra
            memory independent of C, one recompute). "lean" takes a (C, D) weight (no K-dimensional loss).
            "auto": "speed" where its chunk and float32 dW buffer fit in 80% of the memory the GPU has
            left (free, plus what torch's allocator holds unused), else "lean"; "speed" on a CPU and for a
            K-dimensional loss (:meth:`softxent.ops.policy.Policy.linear_memory`).
        return_lse: also return the log-sum-exp of every position's logits (after the softcap; float32,
            not differentiable), of the loss's "none" shape, as :func:`cross_entropy` does.
        impl: "auto", "torch" or "triton" (as in :func:`cross_entropy`).

    Returns:
        The loss in float32 (float64 for float64 input); with ``return_lse``, a tuple (loss, lse). dW is
        accumulated in float32 for low-precision inputs.

    Example:
        >>> import torch, softxent
        >>> x, W = torch.randn(6, 4), torch.randn(10, 4)
        >>> y = torch.tensor([1, 2, 3, -100, 5, 9])
        >>> fused = softxent.linear_cross_entropy(x, W, y)
        >>> torch.allclose(fused, torch.nn.functional.cross_entropy(x @ W.T, y))
        True
    """
    if torch.compiler.is_compiling():
        return _compiled(
            "linear_cross_entropy",
            dict(input=input, linear_weight=linear_weight, linear_bias=linear_bias, target=target,
                 weight=weight),
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, chunk_size=chunk_size, memory=memory, return_lse=return_lse, impl=impl,
        )  # fmt: skip
    num_classes, out_features = _check_linear(input, linear_weight, linear_bias, class_dims=1)
    return_lse = check.check_bool("return_lse", return_lse)
    check.check_tensor("target", target)
    check.check_same_device("target", target, input.device)
    reduction = check.check_reduction(reduction)
    label_smoothing = check.check_label_smoothing(label_smoothing)
    chunk_size = check.check_chunk_size(chunk_size)
    memory = check.check_memory(memory)
    if memory == "lean" and out_features:
        raise ValueError(
            f"memory: 'lean' takes a (C, in_features) linear_weight (no K-dimensional loss), "
            f"got shape {tuple(linear_weight.shape)}"
        )
    backend = backends.select(impl, input.device)
    if memory == "auto":
        memory = "speed" if out_features else _auto_memory(backend, input, num_classes)
    logits_shape = (*input.shape[:-1], num_classes, *out_features)
    probabilities = tuple(target.shape) == logits_shape and target.dtype.is_floating_point
    if probabilities and ignore_index is not None:
        raise ValueError(
            f"ignore_index: expected None when target holds class probabilities, got {ignore_index}"
        )
    ignore_index = check.check_ignore_index(-100 if ignore_index is None else ignore_index)
    _check_target(target, logits_shape, ignore_index)
    target = target if probabilities else target.long()
    ct = spec.compute_dtype(input.dtype)
    loss_spec = spec.softmax_loss(
        weight, num_classes, input.device, ct, ignore_index, label_smoothing, z_loss, softcap
    )
    class_weight = loss_spec.weight
    _check_class_weight_grad(class_weight, probabilities)
    bare = replace(loss_spec, weight=None)
    differentiable = partial(_eager_linear_cross_entropy, loss_spec=bare, reduction=reduction)
    check_target = (
        _no_check
        if probabilities
        else partial(check.check_class_values, num_classes=num_classes, ignore_index=ignore_index)
    )
    if _infinite_weights(class_weight):
        lse = partial(_eager_linear_lse, loss_spec=bare) if return_lse else None
        loss_fn = autograd.composed(differentiable, reduction != "none", lse)
    elif memory == "lean":
        lean_head = slices.LeanSoftmaxHead(
            bare, reduction, num_classes, chunk_size, backend.slice_stats, backend.slice_grad, backend.policy
        )
        loss_fn = autograd.lean_softmax_head(lean_head, differentiable, check_target, with_lse=return_lse)
    else:
        head = chunks.SoftmaxHead(
            bare, reduction, num_classes, out_features, chunk_size, backend.softmax_block, backend.policy,
            with_lse=return_lse,
        )  # fmt: skip
        make_head = partial(_softmax_head, check_target=check_target, head=head)
        loss_fn = autograd.linear_head(
            make_head, reduction, differentiable, unfused=(4,), with_lse=return_lse
        )
    loss, lse = _apply_head(
        loss_fn, input, linear_weight, linear_bias, target, (class_weight,),
        differentiable_target=probabilities, differentiable_weights=probabilities,
    )  # fmt: skip
    return (loss, lse) if return_lse else loss


def _eager_linear_lse(
    x: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    *, loss_spec: spec.SoftmaxLoss,
) -> Tensor:  # fmt: skip
    return eager.softmax_lse(eager.linear_logits(x, linear_weight, linear_bias), loss_spec)


def _check_bce_weights(
    weight: Tensor | None, pos_weight: Tensor | None, shape: tuple[int, ...], device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    for name, value in (("weight", weight), ("pos_weight", pos_weight)):
        if value is None:
            continue
        check.check_float_tensor(name, value)
        check.check_same_device(name, value, device)
        try:
            broadcast = torch.broadcast_shapes(tuple(value.shape), shape)
        except RuntimeError:
            broadcast = None
        if broadcast != shape:
            what = "the input's shape" if name == "weight" else "the last (class) dimension of the input"
            raise ValueError(
                f"{name}: expected a shape that broadcasts to {what} {shape}, got {tuple(value.shape)}"
            )
        check.check_no_grad(name, value)
    return weight, pos_weight


def _bce_forward(
    tensors: Sequence[Tensor | None], needs: tuple[bool, ...], *, reduction: str, backend: backends.Backend
) -> autograd.Forward:
    input, target, weight, pos_weight = tensors
    loss, _, grad_input, grad_target = rows.sigmoid_bce_forward(
        input,
        target,
        spec.SigmoidLoss(weight, pos_weight),
        reduction,
        backend=backend,
        need_input_grad=needs[0],
        need_target_grad=needs[1],
    )
    return autograd.Forward(loss, grads=(grad_input, grad_target, None, None))


def _bce_loss(reduction: str, *, backend: backends.Backend, batched=None) -> autograd.Loss:
    """binary_cross_entropy_with_logits' :class:`softxent.ops.autograd.Loss` on (input, target, weight,
    pos_weight)."""
    return autograd.Loss(
        partial(_bce_forward, reduction=reduction, backend=backend),
        partial(_eager_bce, reduction=reduction),
        reduced=reduction != "none",
        batched=batched,
    )


def _eager_bce(
    input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None, *, reduction: str
) -> Tensor:
    return eager.sigmoid_binary_cross_entropy(input, target, spec.SigmoidLoss(weight, pos_weight), reduction)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
    *,
    impl: str = "auto",
) -> Tensor:
    r"""Sigmoid binary cross-entropy on logits, fused: the forward also produces σ(z) − y.

    Computes ``torch.nn.functional.binary_cross_entropy_with_logits`` with the same arguments. With
    L = 1 + (p − 1)·y (p = pos_weight, broadcast along the last dimension):

    .. math::
        ℓ = w\,[(1-y)\,z + L\,\log(1 + e^{-z})], \qquad \frac{∂ℓ}{∂z} = w\,(L\,σ(z) - p\,y)

    which is σ(z) − y without weights.

    Args:
        input: logits of any shape; target: probabilities in [0, 1] of the same shape.
        weight: broadcastable to the input; pos_weight: broadcastable to its last dimension.
        reduction: "mean" (over all elements), "sum" or "none".

    Example:
        >>> import torch, softxent
        >>> z = torch.tensor([[1.0, -2.0]], requires_grad=True)
        >>> y = torch.tensor([[1.0, 0.0]])
        >>> softxent.binary_cross_entropy_with_logits(z, y, reduction="sum").backward()
        >>> z.grad  # σ(z) − y
        tensor([[-0.2689,  0.1192]])
    """
    if torch.compiler.is_compiling():
        return _compiled(
            "binary_cross_entropy_with_logits",
            dict(input=input, target=target, weight=weight, pos_weight=pos_weight),
            reduction=check.check_reduction_legacy(size_average, reduce, reduction), impl=impl,
        )  # fmt: skip
    check.check_float_tensor("input", input)
    check.check_float_tensor("target", target)
    check.check_same_device("target", target, input.device)
    reduction = check.check_reduction_legacy(size_average, reduce, reduction)
    backend = backends.select(impl, input.device)
    shape = tuple(input.shape)
    if tuple(target.shape) != shape:
        raise ValueError(f"target: expected the input's shape {shape}, got {tuple(target.shape)}")
    weight, pos_weight = _check_bce_weights(weight, pos_weight, shape, input.device)
    elementwise_loss = partial(_bce_loss, backend=backend)
    denominators = partial(_element_denominators, ct=spec.compute_dtype(input.dtype))
    batched = partial(
        _fold_batch, make_loss=elementwise_loss, reduction=reduction, denominators=denominators,
        into_rows=False,
    )  # fmt: skip
    loss_fn = elementwise_loss(reduction, batched=batched)
    needs = autograd.needs_grad(input, target, None, None)
    return autograd.apply(loss_fn, needs, input, target, weight, pos_weight)[0]


def _sigmoid_head(
    target: Tensor, weights: Sequence[Tensor | None], *, head: chunks.SigmoidHead | slices.LeanSigmoidHead
) -> chunks.SigmoidHead | slices.LeanSigmoidHead:
    return replace(head, spec=spec.SigmoidLoss(*weights))


def _eager_linear_bce(
    x: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    pos_weight: Tensor | None, *, reduction: str,
) -> Tensor:  # fmt: skip
    return eager.linear_sigmoid_binary_cross_entropy(
        x, linear_weight, linear_bias, target, spec.SigmoidLoss(weight, pos_weight), reduction
    )


def linear_binary_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    memory: str = "speed",
    impl: str = "auto",
) -> Tensor:
    r"""Multi-label sigmoid BCE of a linear head without materializing the (N, C) logits.

    Computes ``binary_cross_entropy_with_logits(input @ linear_weight.T + linear_bias, target, weight,
    pos_weight=pos_weight, reduction=reduction)`` in chunks of rows, with dX, dW and db formed chunk by
    chunk in the forward pass (6·N·D·C FLOPs, backward is a scale), as :func:`linear_cross_entropy` does.
    With ``memory="lean"`` the chunks are vocabulary slices of all N rows instead (one pass, still
    6·N·D·C FLOPs: each class's loss needs only its own logit): dW is written slice by slice, never summed
    across chunks, and the extra memory is one (N, S) slice plus an (N, D) float32 dX accumulator,
    independent of C (see :class:`softxent.ops.slices.LeanSigmoidHead`).

    Args:
        input: ``(N, D)`` or ``(D,)``; linear_weight: ``(C, D)``; target: ``(N, C)`` (or ``(C,)``) in [0, 1].
        linear_bias: ``(C,)`` or None. weight: broadcastable to ``(N, C)``; pos_weight: to ``(C,)``.
        chunk_size: rows per chunk; with ``memory="lean"``, classes per slice (default: 64 MiB of logits).
        memory: "speed" (the default: chunks of rows × C logits, dW summed over them in float32 for
            low-precision inputs), "lean" (vocabulary slices) or "auto" (as in :func:`linear_cross_entropy`).

    Example:
        >>> import torch, softxent
        >>> x, W = torch.randn(5, 3), torch.randn(4, 3)
        >>> y = torch.randint(0, 2, (5, 4)).float()
        >>> fused = softxent.linear_binary_cross_entropy(x, W, y)
        >>> torch.allclose(fused, torch.nn.functional.binary_cross_entropy_with_logits(x @ W.T, y))
        True
    """
    if torch.compiler.is_compiling():
        return _compiled(
            "linear_binary_cross_entropy",
            dict(input=input, linear_weight=linear_weight, linear_bias=linear_bias, target=target,
                 weight=weight, pos_weight=pos_weight),
            reduction=reduction, chunk_size=chunk_size, memory=memory, impl=impl,
        )  # fmt: skip
    num_classes, _ = _check_linear(input, linear_weight, linear_bias, class_dims=0)
    check.check_float_tensor("target", target)
    check.check_same_device("target", target, input.device)
    reduction = check.check_reduction(reduction)
    chunk_size = check.check_chunk_size(chunk_size)
    memory = check.check_memory(memory)
    backend = backends.select(impl, input.device)
    if memory == "auto":
        memory = _auto_memory(backend, input, num_classes)
    logits_shape = (*input.shape[:-1], num_classes)
    if tuple(target.shape) != logits_shape:
        raise ValueError(f"target: expected the logits' shape {logits_shape}, got {tuple(target.shape)}")
    weight, pos_weight = _check_bce_weights(weight, pos_weight, logits_shape, input.device)
    if weight is not None and input.dim() == 1:
        weight = weight.unsqueeze(0) if weight.dim() == 1 else weight
    no_weights = spec.SigmoidLoss(None, None)
    if memory == "lean":
        head = slices.LeanSigmoidHead(
            no_weights, reduction, num_classes, chunk_size, backend.sigmoid_block, backend.policy
        )
    else:
        head = chunks.SigmoidHead(no_weights, reduction, chunk_size, backend.sigmoid_block, backend.policy)
    loss_fn = autograd.linear_head(
        partial(_sigmoid_head, head=head), reduction, partial(_eager_linear_bce, reduction=reduction)
    )
    return _apply_head(
        loss_fn, input, linear_weight, linear_bias, target, (weight, pos_weight),
        differentiable_target=True, differentiable_weights=False,
    )[0]  # fmt: skip


_compile.register(
    binary_cross_entropy_with_logits, cross_entropy, linear_binary_cross_entropy, linear_cross_entropy
)
