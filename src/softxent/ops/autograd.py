r"""The autograd Function every softxent loss runs through, and how it composes with torch's transforms.

A :class:`Loss` computes its loss and, where it can, the gradients of that loss for an incoming gradient of
1, in one forward pass (the row drivers, the speed-mode heads for "mean" and "sum"); the others (a linear
head's "none", the lean softmax head) keep what their backward recomputes from. :class:`LossFunction`
drives every loss the same way. Its backward picks, in order:

1. **A differentiable backward** where a derivative of the gradient is wanted: ``create_graph=True``, or
   torch.func nesting (grad of grad, jvp of grad, hessian, autograd over ``torch.func.grad``). The loss's
   eager composition (:mod:`softxent.ops.eager`) is differentiated by ``torch.func.vjp``, which gives a
   gradient with a graph at every level. A loss without one (``inplace_backward=True`` overwrote the
   logits; the vocabulary-parallel ops) raises a RuntimeError that says why.
2. **The fused gradients**, scaled by the incoming gradient: in place where autograd frees the graph after
   this backward (``retain_graph=False``, as torch's current graph task reports it) and no torch.func
   transform wraps the tensors, so no second buffer of the gradient's size is made; out of place otherwise,
   so that a retained graph (gradcheck, ``torch.autograd.functional.jacobian``, ``backward(retain_graph=
   True)`` twice) runs its backward again with the same saved gradient.
3. **The loss's own backward** (a recompute with the incoming gradient folded in), through
   :class:`RecomputeFunction` so that vmap (jacrev's batch of cotangents) can loop over it.

Forward mode (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``): the loss's tangent is
Σ_k ⟨∂L/∂t_k, ṫ_k⟩ over the tensor arguments t_k, from the fused gradients (per position for "none");
a reduced loss without them gets them from one recompute for an incoming gradient of 1; a "none" linear
head's tangent comes from its eager composition (which forms the logits).

vmap: a row loss on given logits folds the batch into its rows (one fused call, the batch's reductions
taken per sample: ``vmap(grad(...))`` per-sample gradients cost one call); every other loss, or batched
class weights, runs once per sample of the batch (each call a fused op) and the results are stacked. Both
hold for every ``in_dims`` and every transform stacked on top (``jacrev`` too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch._C._functorch import (
    TransformType,
    _unwrap_for_grad,
    get_unwrapped,
    is_functorch_wrapped_tensor,
    maybe_current_level,
    unwrap_if_dead,
)
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from softxent.ops.chunks import LinearHead
from softxent.ops.slices import LeanSoftmaxHead
from softxent.ops.spec import Targets, compute_dtype, mean_denominator, reduce, reduction_scale

Grads = tuple[Tensor | None, ...]
# The loss as a differentiable composition of its tensor arguments, or why there is none.
Eager = Callable[..., Tensor] | str


@dataclass(frozen=True)
class Forward:
    """What a loss's forward pass leaves: the loss, the per-position lse (returned by ``return_lse``, not
    differentiable) or None, the tensors its backward recomputes from (``state``) and, where it made them,
    the gradient of the loss for an incoming gradient of 1 with respect to each tensor argument (None in
    place of one not asked for; ``grads=None``: made by :attr:`Loss.backward` instead)."""

    loss: Tensor
    lse: Tensor | None = None
    state: tuple[Tensor | None, ...] = ()
    grads: Grads | None = None


@dataclass(frozen=True)
class Loss:
    """One call's loss, as :class:`LossFunction` drives it. Holds configuration only: every tensor the
    loss depends on is an argument of ``forward`` (so vmap sees it), never captured.

    forward(tensors, needs) -> :class:`Forward`: ``needs[k]`` says whether the gradient with respect to
        ``tensors[k]`` is wanted.
    eager(*tensors) -> the loss as a composition of differentiable torch ops (for a differentiable
        backward and forward-mode fallbacks), or a string saying why there is none.
    backward(tensors, state, grad_loss, needs) -> the gradients for an incoming ``grad_loss``, for a
        forward that leaves ``grads=None`` (None: the eager composition's vjp).
    reduced: the loss is a scalar ("mean", "sum"); else it has one value per position.
    class_dim: where a per-position loss lacks the fused gradients' class dimension (None: the gradients
        have the loss's shape, as an elementwise loss's do).
    state_size: ``len(Forward.state)``.
    unfused: the tensor arguments whose gradient only the eager composition gives (class weights with
        probability targets); where one is wanted, forward computes the loss alone and backward is the
        eager composition's vjp.
    forward_mode: None, or why forward-mode AD is not available.
    batched(batch_size, in_dims, needs, tensors) -> the outputs of one call over a vmap batch, (loss, lse,
        *state, *grads) with the batch first, computed at once (a row loss folds the batch into its rows);
        or None where it cannot, and vmap then calls the loss once per sample.
    """

    forward: Callable[[Sequence[Tensor | None], tuple[bool, ...]], Forward]
    eager: Eager
    reduced: bool
    backward: Callable[..., Grads] | None = None
    class_dim: int | None = None
    state_size: int = 0
    unfused: tuple[int, ...] = ()
    forward_mode: str | None = None
    batched: Callable[..., tuple | None] | None = None


def apply(loss: Loss, needs: tuple[bool, ...], *tensors: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(loss, lse or None) of ``loss`` on ``tensors``, differentiable with respect to those in ``needs``."""
    outputs = apply_all(loss, needs, *tensors)
    return outputs[0], outputs[1]


def apply_all(loss: Loss, needs: tuple[bool, ...], *tensors: Tensor | None) -> tuple:
    """Every output of :class:`LossFunction` on ``tensors``: (loss, lse, *state, *grads)."""
    return LossFunction.apply(loss, tuple(needs), *tensors)


# ----------------------------------------------------------------------------------------------------------
# Where the call runs: autograd modes and torch.func transforms
# ----------------------------------------------------------------------------------------------------------


def transforms() -> list[str]:
    """The torch.func transforms active around this call, outermost first ("grad", "vmap", "jvp",
    "functionalize"); empty outside them."""
    return [str(interpreter.key()).rsplit(".", 1)[-1].lower() for interpreter in _interpreters()]


def _interpreters() -> list:
    return retrieve_all_functorch_interpreters()


def _under_jvp() -> bool:
    return any(interpreter.key() == TransformType.Jvp for interpreter in _interpreters())


def forward_mode_active() -> bool:
    """Whether tangents may flow forward through the call (torch.func.jvp / jacfwd, or a dual level of
    ``torch.autograd.forward_ad``)."""
    return _under_jvp() or torch.autograd.forward_ad._current_level >= 0


def needs_grad(*tensors: Tensor | None) -> tuple[bool, ...]:
    """For each tensor, whether the loss's derivative with respect to it is wanted: by autograd (grad mode
    on and ``requires_grad``) or by forward mode (any floating tensor under torch.func.jvp, one with a
    tangent under ``torch.autograd.forward_ad``). None entries: never."""
    enabled = torch.is_grad_enabled()
    under_jvp = _under_jvp()
    dual = not under_jvp and torch.autograd.forward_ad._current_level >= 0

    def wanted(t: Tensor | None) -> bool:
        if t is None or not t.is_floating_point():
            return False
        if enabled and t.requires_grad:
            return True
        return under_jvp or (dual and torch.autograd.forward_ad.unpack_dual(t).tangent is not None)

    return tuple(wanted(t) for t in tensors)


def _base(t: Tensor) -> Tensor:
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def _graph_wanted(level: int | None, inputs: Sequence[Tensor | None], *, backward: bool) -> bool:
    """Whether the derivative a backward (or jvp) of the Function applied at torch.func ``level`` computes
    will itself be differentiated, so that it must be computed with a graph.

    Outside torch.func, grad mode inside backward means ``create_graph=True``; a jvp rule's tangent is
    differentiated where autograd tracks an input. torch.func.grad differentiates with grad mode on whether
    or not anything differentiates its result: that is wanted where a grad or jvp transform is active other
    than the one at ``level``, or where plain autograd tracks the tensors beneath every level."""
    if not torch.is_grad_enabled():
        return False
    interpreters = _interpreters()
    if backward and not interpreters:
        return True
    differentiating = (TransformType.Grad, TransformType.Jvp)
    if any(i.key() in differentiating and i.level() != level for i in interpreters):
        return True
    return any(t is not None and _base(t).requires_grad for t in inputs)


def _frees_graph() -> bool:
    """Whether autograd frees this graph after the running backward (``retain_graph=False``) and no
    torch.func transform wraps the tensors: then nothing can read the saved gradients again, and backward
    may scale them in place."""
    keeps_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keeps_graph is not None and not keeps_graph() and not _interpreters()


# ----------------------------------------------------------------------------------------------------------
# The Functions
# ----------------------------------------------------------------------------------------------------------


def _split(loss: Loss, saved: Sequence[Tensor | None], count: int):
    """(inputs, state, grads) from what :class:`LossFunction` saved for ``count`` tensor arguments."""
    return saved[:count], saved[count : count + loss.state_size], saved[count + loss.state_size :]


def _per_sample(
    info, in_dims: Sequence[int | None], call: Callable[..., tuple], args: Sequence[object]
) -> tuple[tuple, tuple]:
    """A vmap rule: ``call`` on each sample of the batched ``args`` (``in_dims``), results stacked on 0."""
    batched = list(zip(args, in_dims, strict=True))
    results = [
        call(*(arg if dim is None else arg.select(dim, index) for arg, dim in batched))
        for index in range(info.batch_size)
    ]
    outputs = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*results, strict=True))
    return outputs, tuple(None if output is None else 0 for output in outputs)


class LossFunction(torch.autograd.Function):
    """``LossFunction.apply(loss, needs, *tensors)`` -> (loss, lse, *state, *grads): the autograd Function
    of every softxent loss (the module docstring says how backward, forward mode and vmap work). Only the
    loss is differentiable; the other outputs are what backward and jvp read."""

    @staticmethod
    def forward(loss: Loss, needs: tuple[bool, ...], *tensors: Tensor | None):  # type: ignore[override]
        eager_only = any(needs[index] for index in loss.unfused)
        result = loss.forward(tensors, (False,) * len(needs) if eager_only else needs)
        grads = result.grads if result.grads is not None and not eager_only else (None,) * len(tensors)
        return (result.loss, result.lse, *result.state, *grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        loss, needs, *tensors = inputs
        ctx.loss, ctx.needs, ctx.count = loss, needs, len(tensors)
        ctx.level = maybe_current_level()
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        # the other outputs get no gradient: let autograd pass None for them rather than zeros of the
        # fused gradients' size
        ctx.set_materialize_grads(False)
        # the inputs are kept by reference for a differentiable backward (parameters and activations that
        # the graph holds anyway); the fused gradients and the state for the first-order one
        kept = tensors if callable(loss.eager) or loss.backward is not None else [None] * len(tensors)
        ctx.fused = _covers(output[2 + loss.state_size :], needs)
        ctx.save_for_backward(*kept, *output[2:])
        ctx.save_for_forward(*kept, *output[2:])

    @staticmethod
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        loss, needs = ctx.loss, ctx.needs
        if grad_loss is None:  # no gradient reaches the loss (grads are not materialized as zeros)
            return (None,) * (2 + ctx.count)
        inputs, state, grads = _split(loss, ctx.saved_tensors, ctx.count)
        if _graph_wanted(ctx.level, inputs, backward=True):
            result = differentiable_grads(loss, inputs, needs, grad_loss)
        elif ctx.fused:
            in_place = _frees_graph()
            result = [
                _scale(grad, grad_loss, loss.class_dim, in_place) if need else None
                for grad, need in zip(grads, needs, strict=True)
            ]
        else:
            result = RecomputeFunction.apply(loss, needs, ctx.count, grad_loss, *inputs, *state)
        return None, None, *result

    @staticmethod
    def jvp(ctx, _loss, _needs, *tangents):
        loss = ctx.loss
        if loss.forward_mode is not None:
            raise RuntimeError(loss.forward_mode)
        inputs, state, grads = _split(loss, ctx.saved_tensors, ctx.count)
        # functorch passes zeros for tensors without a tangent: those the loss is not differentiable in
        # (class weights with class-index targets; ``needs`` says which) are left out
        tangents = tuple(t if need else None for t, need in zip(tangents, ctx.needs, strict=True))
        moving = tuple(t is not None for t in tangents)
        if _graph_wanted(ctx.level, inputs, backward=False):
            grads = (None,) * ctx.count  # a tangent with a graph: the eager composition's jvp
        elif not _covers(grads, moving) and loss.reduced:
            # the gradients' values, without this level's tangents: a Function call one level down (the
            # kernels take plain tensors; vmap levels beneath take RecomputeFunction's rule)
            values = [_without_level(t, ctx.level) for t in (*inputs, *state)]
            ones = torch.ones((), dtype=compute_dtype(inputs[0].dtype), device=inputs[0].device)
            grads = RecomputeFunction.apply(loss, moving, ctx.count, ones, *values)
        if _covers(grads, moving) and any(moving):
            pairs = zip(grads, tangents, strict=True)
            tangent = sum(_contract(g, t, loss) for g, t in pairs if t is not None)
        else:
            tangent = _eager_jvp(loss, inputs, tangents)
        return (tangent, None, *([None] * (loss.state_size + ctx.count)))

    @staticmethod
    def vmap(info, in_dims, loss, needs, *tensors):
        if loss.batched is not None:
            outputs = loss.batched(info.batch_size, in_dims[2:], needs, tensors)
            if outputs is not None:
                return outputs, tuple(None if output is None else 0 for output in outputs)

        def call(*sample: Tensor | None) -> tuple:
            return LossFunction.apply(loss, needs, *sample)

        return _per_sample(info, in_dims[2:], call, tensors)


class RecomputeFunction(torch.autograd.Function):
    """``RecomputeFunction.apply(loss, needs, count, grad_loss, *inputs, *state)``: the gradients of a loss
    whose forward left none, from its :attr:`Loss.backward` (a recompute). A Function of its own so that
    vmap can batch it (one recompute per sample of the cotangents); it is never differentiated (a
    differentiable backward takes the eager composition instead)."""

    @staticmethod
    def forward(loss: Loss, needs, count: int, grad_loss: Tensor, *saved: Tensor | None):  # type: ignore[override]
        return tuple(recompute(loss, saved[:count], saved[count:], grad_loss, needs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):  # type: ignore[override]
        raise RuntimeError("softxent: a recomputed gradient is not differentiable; use create_graph=True")

    @staticmethod
    def vmap(info, in_dims, loss, needs, count, grad_loss, *saved):
        def call(grad_loss, *saved):
            return RecomputeFunction.apply(loss, needs, count, grad_loss, *saved)

        return _per_sample(info, in_dims[3:], call, (grad_loss, *saved))


def recompute(
    loss: Loss, inputs: Sequence[Tensor | None], state: Sequence[Tensor | None], grad_loss: Tensor, needs
) -> Grads:
    """The gradients for ``grad_loss`` without fused ones: the loss's backward, or its eager composition's
    vjp (no loss backward; or a gradient only that composition gives)."""
    if loss.backward is None or any(needs[index] for index in loss.unfused):
        grads = differentiable_grads(loss, inputs, needs, grad_loss)
        return tuple(None if g is None else g.detach() for g in grads)
    return tuple(loss.backward(inputs, state, grad_loss, needs))


def _covers(grads: Sequence[Tensor | None], wanted: Sequence[bool]) -> bool:
    return all(g is not None for g, want in zip(grads, wanted, strict=True) if want)


def _scale(grad: Tensor, grad_loss: Tensor, class_dim: int | None, in_place: bool) -> Tensor:
    """A fused gradient (made for an incoming gradient of 1) times the real one, broadcast over the class
    dimension of a per-position loss; in place when nothing reads the saved gradient again."""
    if grad_loss.dim() and class_dim is not None:
        grad_loss = grad_loss.unsqueeze(class_dim)
    if in_place:
        if grad_loss.dim() == 0 and grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
            return grad
        return grad.mul_(grad_loss.to(grad.dtype))
    return grad * grad_loss.to(grad.dtype)


def _contract(grad: Tensor, tangent: Tensor, loss: Loss) -> Tensor:
    """⟨∂L/∂t, ṫ⟩ in the loss's dtype: summed whole for a reduced loss, per position otherwise."""
    dtype = compute_dtype(grad.dtype)
    product = grad.to(dtype) * tangent.to(dtype)
    if loss.reduced:
        return product.sum()
    return product if loss.class_dim is None else product.sum(loss.class_dim)


def _without_level(t: Tensor | None, level: int | None) -> Tensor | None:
    """``t`` with the wrapper of torch.func ``level`` (a jvp's dual) taken off, if it has one."""
    if t is None or level is None:
        return t
    return _unwrap_for_grad(t, level)


def _live(inputs: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The inputs with the wrappers of torch.func levels that have exited taken off (jacrev calls its
    backward after its own level is gone)."""
    return [None if t is None else unwrap_if_dead(t) for t in inputs]


def _eager(loss: Loss) -> Callable[..., Tensor]:
    if isinstance(loss.eager, str):
        raise RuntimeError(loss.eager)
    return loss.eager


def _eager_in(loss: Loss, inputs: Sequence[Tensor | None], chosen: Sequence[int]):
    """The eager composition as a function of the inputs at ``chosen`` (the others held), and those inputs'
    values (:func:`_live`)."""
    eager = _eager(loss)
    live = _live(inputs)

    def of_chosen(*values: Tensor) -> Tensor:
        args = list(live)
        for index, value in zip(chosen, values, strict=True):
            args[index] = value
        return eager(*args)

    return of_chosen, tuple(live[index] for index in chosen)


def differentiable_grads(
    loss: Loss, inputs: Sequence[Tensor | None], needs: Sequence[bool], grad_loss: Tensor
) -> list[Tensor | None]:
    """grad_loss·∂loss/∂input for each input in ``needs``, differentiable at every level (a backward under
    create_graph=True or inside nested torch.func transforms): the eager composition's vjp."""
    of_wanted, values = _eager_in(loss, inputs, [index for index, need in enumerate(needs) if need])
    with torch.enable_grad():
        _, vjp = torch.func.vjp(of_wanted, *values)
        found = iter(vjp(grad_loss))
    return [next(found) if need else None for need in needs]


def _eager_jvp(loss: Loss, inputs: Sequence[Tensor | None], tangents: Sequence[Tensor | None]) -> Tensor:
    """The eager composition's tangent J·ṫ, as the vjp of its (linear) vjp: reverse mode only, so that it
    runs inside a dual level of ``torch.autograd.forward_ad`` too (which cannot nest)."""
    moving = [index for index, t in enumerate(tangents) if t is not None]
    of_moving, values = _eager_in(loss, inputs, moving)
    with torch.enable_grad():
        output, vjp = torch.func.vjp(of_moving, *values)
        _, vjp_of_vjp = torch.func.vjp(vjp, torch.zeros_like(output))
        (tangent,) = vjp_of_vjp(tuple(tangents[index] for index in moving))
    return tangent


def composed(eager: Callable[..., Tensor], reduced: bool, lse: Callable[..., Tensor] | None = None) -> Loss:
    """The loss computed by its eager composition alone (torch's own ops, so every value is torch's), for
    inputs whose values the fused paths' algebra does not reproduce (class weights with infinite entries:
    (Σq)·log Σexp − Σq·(z − m) is inf − inf where torch's Σ q·(−log ŷ) is inf). ``lse(*tensors)``: the
    per-position log-sum-exp, where the op returns it."""

    def forward(tensors: Sequence[Tensor | None], needs: tuple[bool, ...]) -> Forward:
        with torch.no_grad():
            return Forward(eager(*tensors), None if lse is None else lse(*tensors))

    return Loss(forward, eager, reduced=reduced)


# ----------------------------------------------------------------------------------------------------------
# The linear heads as Losses: tensors (x, W, b, target, *weights)
# ----------------------------------------------------------------------------------------------------------


def cast_grads(like: Sequence[Tensor | None], grads: Sequence[Tensor | None]) -> Grads:
    """Gradients come out in the compute dtype (dW accumulates in float32); autograd wants the inputs'."""
    return tuple(None if g is None or t is None else g.to(t.dtype) for g, t in zip(grads, like, strict=True))


def linear_head(
    make_head: Callable[[Tensor, Sequence[Tensor | None]], LinearHead],
    reduction: str,
    eager: Eager,
    unfused: tuple[int, ...] = (),
    forward_mode: str | None = None,
    with_lse: bool = False,
) -> Loss:
    """A chunked linear head (:class:`softxent.ops.chunks.LinearHead`) on tensors (x, W, b, target,
    *weights), ``make_head(target, weights)`` building the head for a call's target and loss weights (and
    checking the target's values).

    For "mean" and "sum" the forward pass makes dX, dW, db (and the target's gradient) with the loss, 6·N·D·C
    FLOPs, and backward scales them. For "none" the incoming gradient differs per position, and dW =
    Σ_i x_iᵀ·g_i·G_i cannot be assembled from per-row pieces without keeping the (N, C) gradient, so the
    forward computes the loss only and backward recomputes the logits chunk by chunk with the incoming
    gradient folded in (8·N·D·C FLOPs in all).
    """

    def forward(tensors: Sequence[Tensor | None], needs: tuple[bool, ...]) -> Forward:
        x, weight, bias, target, *weights = tensors
        head = make_head(target, weights)
        ct = compute_dtype(x.dtype)
        denominator, anything_counts = head.denominator(target, ct)
        if reduction == "none" or not any(needs):
            loss = head.run(x, weight, bias, target, grad_scale=None, needs=(False,) * 4)[0]
            loss, lse = loss.unbind(-1) if with_lse else (loss, None)
            return Forward(reduce(loss, reduction, denominator), lse)
        scale = reduction_scale(reduction, denominator, anything_counts, ct).to(x.device)
        loss, *grads = head.run(x, weight, bias, target, grad_scale=scale, needs=tuple(needs[:4]))
        loss, lse = loss.unbind(-1) if with_lse else (loss, None)
        grads = cast_grads(tensors[:4], grads)
        return Forward(reduce(loss, reduction, denominator), lse, grads=(*grads, *(None for _ in weights)))

    def backward(tensors, state, grad_loss, needs) -> Grads:
        x, weight, bias, target, *weights = tensors
        head = make_head(target, weights)
        ct = compute_dtype(x.dtype)
        scale = grad_loss.to(ct)
        if reduction != "none":
            denominator, anything_counts = head.denominator(target, ct)
            scale = scale * reduction_scale(reduction, denominator, anything_counts, ct).to(x.device)
        grads = head.run(x, weight, bias, target, grad_scale=scale, needs=tuple(needs[:4]))[1:]
        return (*cast_grads(tensors[:4], grads), *(None for _ in weights))

    return Loss(
        forward, eager, reduced=reduction != "none", backward=backward, unfused=unfused,
        forward_mode=forward_mode,
    )  # fmt: skip


def lean_softmax_head(
    head: LeanSoftmaxHead, eager: Eager, check_target: Callable[[Tensor], None], with_lse: bool = False
) -> Loss:
    """:class:`softxent.ops.slices.LeanSoftmaxHead` on tensors (x, W, b, target, weight): the forward pass
    keeps only per-row (m, log Σexp, coeff), O(N), and backward recomputes each slice's logits with the
    incoming gradient folded into the scale. ``with_lse``: the forward also gives each row's lse."""

    def prepared(target: Tensor, weight: Tensor | None, ct: torch.dtype) -> tuple[LeanSoftmaxHead, Targets]:
        lean = replace(head, spec=replace(head.spec, weight=weight))
        return lean, Targets.prepare(target, lean.spec, head.num_classes, ct)

    def forward(tensors: Sequence[Tensor | None], needs: tuple[bool, ...]) -> Forward:
        x, weight, bias, target, class_weight = tensors
        check_target(target)
        ct = compute_dtype(x.dtype)
        lean, targets = prepared(target, class_weight, ct)
        loss, coeff, m, log_sum_exp = lean.forward_stats(x, weight, bias, targets)
        denominator, _ = mean_denominator(target, lean.spec, head.num_classes, ct)
        lse = m + log_sum_exp if with_lse else None
        return Forward(reduce(loss, head.reduction, denominator), lse, state=(m, log_sum_exp, coeff))

    def backward(tensors, state, grad_loss, needs) -> Grads:
        x, weight, bias, target, class_weight = tensors
        m, log_sum_exp, coeff = state
        ct = compute_dtype(x.dtype)
        lean, targets = prepared(target, class_weight, ct)
        denominator, anything_counts = mean_denominator(target, lean.spec, head.num_classes, ct)
        scale = reduction_scale(head.reduction, denominator, anything_counts, ct).to(x.device)
        scale = (grad_loss.to(ct) * scale).expand_as(m)
        grads = lean.backward_pass(x, weight, bias, targets, m, log_sum_exp, coeff, scale, tuple(needs[:4]))
        return (*cast_grads(tensors[:4], grads), None)

    return Loss(
        forward, eager, reduced=head.reduction != "none", backward=backward, state_size=3, unfused=(4,)
    )


# ----------------------------------------------------------------------------------------------------------
# Per-token statistics: several outputs, two of them differentiable (softxent.ops.log_probs)
# ----------------------------------------------------------------------------------------------------------


def _bound(eager: Callable[..., object], inputs: Sequence[Tensor | None], chosen: Sequence[int]):
    """``eager`` as a function of the inputs at ``chosen`` (the others held at their :func:`_live`
    values), and those inputs' values."""
    live = _live(inputs)

    def of_chosen(*values: Tensor):
        args = list(live)
        for index, value in zip(chosen, values, strict=True):
            args[index] = value
        return eager(*args)

    return of_chosen, tuple(live[index] for index in chosen)


def _outputs_vjp(eager, inputs, needs, cotangents) -> list[Tensor | None]:
    """Σ_k ⟨cotangent_k, ∂output_k/∂input⟩ for each input in ``needs``, through the eager composition
    (differentiable at every level); a None cotangent counts as 0."""
    of_wanted, values = _bound(eager, inputs, [index for index, need in enumerate(needs) if need])
    with torch.enable_grad():
        outputs, vjp = torch.func.vjp(of_wanted, *values)
        found = iter(
            vjp(
                tuple(
                    torch.zeros_like(out) if cot is None else cot.to(out.dtype)
                    for out, cot in zip(outputs, cotangents, strict=True)
                )
            )
        )
    return [next(found) if need else None for need in needs]


def _outputs_jvp(eager, inputs, tangents) -> tuple[Tensor, ...]:
    """The eager composition's output tangents J·ṫ, as the vjp of its (linear) vjp (:func:`_eager_jvp`)."""
    moving = [index for index, t in enumerate(tangents) if t is not None]
    of_moving, values = _bound(eager, inputs, moving)
    with torch.enable_grad():
        outputs, vjp = torch.func.vjp(of_moving, *values)
        _, vjp_of_vjp = torch.func.vjp(vjp, tuple(torch.zeros_like(out) for out in outputs))
        (output_tangents,) = vjp_of_vjp(tuple(tangents[index] for index in moving))
    return output_tangents


class TokenStatsFunction(torch.autograd.Function):
    """``TokenStatsFunction.apply(op, needs, *tensors)`` -> (log_probs, entropy, is_top1,
    log_sum_sq_probs, mean_logits, stats, *state), each (N,) but stats (N, k) and the state: the Function
    of :mod:`softxent.ops.log_probs`'s ops (``op``: :class:`~softxent.ops.log_probs.LogitsLogProbs` or
    :class:`~softxent.ops.log_probs.LinearLogProbs`). log_probs and entropy are differentiable, in any
    combination: an output no gradient reaches costs backward nothing.

    Backward is the op's recompute with both incoming gradients folded in (through
    :class:`TokenStatsGrads`, so vmap batches it), or the eager composition's vjp where the gradient will be
    differentiated (``create_graph=True``, nested torch.func). Nothing saved is modified, so a retained graph
    runs backward again. Forward mode: the eager composition's tangent. vmap: where only the rows (the
    logits or x, and the target) are batched, the batch is folded into the rows (one call); else one call
    per sample."""

    @staticmethod
    def forward(op, needs: tuple[bool, ...], *tensors: Tensor | None):  # type: ignore[override]
        stats, state = op.forward(tensors, needs)
        outputs = [stats[:, column].clone() for column in range(5)]
        outputs[2] = outputs[2] != 0
        return (*outputs, stats, *state)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, needs, *tensors = inputs
        ctx.op, ctx.needs, ctx.count, ctx.outputs = op, needs, len(tensors), len(output)
        ctx.level = maybe_current_level()
        ctx.mark_non_differentiable(*(t for t in output[2:] if t is not None))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, *output[5:])
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):  # type: ignore[override]
        count = ctx.count
        if grad_log_probs is None and grad_entropy is None:
            return (None,) * (2 + count)
        saved = ctx.saved_tensors
        tensors, stats, state = saved[:count], saved[count], saved[count + 1 :]
        if _graph_wanted(ctx.level, tensors, backward=True):
            grads = _outputs_vjp(ctx.op.eager, tensors, ctx.needs, (grad_log_probs, grad_entropy))
        else:
            grads = TokenStatsGrads.apply(
                ctx.op, ctx.needs, count, grad_log_probs, grad_entropy, *tensors, stats, *state
            )
        return None, None, *grads

    @staticmethod
    def jvp(ctx, _op, _needs, *tangents):
        tensors = ctx.saved_tensors[: ctx.count]
        moving = tuple(t if need else None for t, need in zip(tangents, ctx.needs, strict=True))
        if any(t is not None for t in moving):
            log_probs, entropy = _outputs_jvp(ctx.op.eager, tensors, moving)
        else:
            log_probs = entropy = None
        return (log_probs, entropy, *([None] * (ctx.outputs - 2)))

    @staticmethod
    def vmap(info, in_dims, op, needs, *tensors):
        dims = in_dims[2:]
        rows = op.row_args
        if all(dim is None for index, dim in enumerate(dims) if index not in rows):
            batch = info.batch_size
            folded = list(tensors)
            for index in rows:
                t = batch_first(tensors[index], dims[index], batch)
                folded[index] = t.reshape(-1, *t.shape[2:])
            outputs = TokenStatsFunction.apply(op, needs, *folded)
            outputs = tuple(None if t is None else t.reshape(batch, -1, *t.shape[1:]) for t in outputs)
            return outputs, tuple(None if t is None else 0 for t in outputs)

        def call(*sample: Tensor | None) -> tuple:
            return TokenStatsFunction.apply(op, needs, *sample)

        return _per_sample(info, dims, call, tensors)


def batch_first(t: Tensor, dim: int | None, batch_size: int) -> Tensor:
    """A vmap argument with its batch dimension first (``dim`` None: expanded to ``batch_size``)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(batch_size, *t.shape)


class TokenStatsGrads(torch.autograd.Function):
    """``TokenStatsGrads.apply(op, needs, count, grad_log_probs, grad_entropy, *tensors, stats, *state)``:
    the gradients of :class:`TokenStatsFunction` from its op's recompute; a Function so that vmap can batch
    it (a call per sample); never differentiated (a differentiable backward takes the eager composition)."""

    @staticmethod
    def forward(op, needs, count: int, grad_log_probs, grad_entropy, *saved):  # type: ignore[override]
        tensors, stats, state = saved[:count], saved[count], saved[count + 1 :]
        grads = op.backward(tensors, stats, state, grad_log_probs, grad_entropy, needs)
        grads = tuple(grad if need else None for grad, need in zip(grads, needs, strict=False))
        return cast_grads(tensors[: len(grads)], grads) + (None,) * (count - len(grads))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):  # type: ignore[override]
        raise RuntimeError("softxent: a recomputed gradient is not differentiable; use create_graph=True")

    @staticmethod
    def vmap(info, in_dims, op, needs, count, grad_log_probs, grad_entropy, *saved):
        def call(grad_log_probs, grad_entropy, *saved):
            return TokenStatsGrads.apply(op, needs, count, grad_log_probs, grad_entropy, *saved)

        return _per_sample(info, in_dims[3:], call, (grad_log_probs, grad_entropy, *saved))
