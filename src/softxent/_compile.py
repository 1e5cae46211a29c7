"""softxent's losses as torch custom ops, so that ``torch.compile`` treats each as one opaque call.

The fused ops run Python loops over chunks, launch Triton kernels and read a few values on the host while
validating, none of which Dynamo should trace. Under ``torch.compile`` (``torch.compiler.is_compiling()``)
the public functions in :mod:`softxent.functional` therefore call two custom ops instead:

* ``softxent::loss_lse_and_grads(op, t0, ..., t5, needs, <options>)`` runs the eager op and returns
  [loss, lse, ∂loss/∂tensor for each tensor asked for in ``needs``] (lse, not differentiable, only for
  cross_entropy and linear_cross_entropy with ``return_lse=True``); for "mean" and "sum" the gradients
  come out of the fused forward, so backward only scales them by the incoming gradient;
* ``softxent::loss_backward(op, t0, ..., t5, needs, <options>, grad_loss)`` gives the gradients for a
  per-position incoming gradient (reduction="none"), recomputing as the eager op's backward does.

The per-token statistics (:func:`softxent.log_probs`, :func:`softxent.linear_log_probs`) have five outputs,
two differentiable, whose incoming gradients are known only in backward: ``softxent::token_stats`` gives
the outputs, ``softxent::token_stats_backward`` the gradients for the incoming ones (None for an output no
gradient reached), recomputing the forward and running the eager backward (2·N·D·V FLOPs more than eager
autograd's 8 through a linear head). Distillation (:func:`softxent.distillation_loss`,
:func:`softxent.linear_distillation_loss`) takes the loss ops, its teacher tensors never differentiated.

``op`` names the function (the public ops register themselves with :func:`register`, so this module does
not import them), t0, ..., t6 are its tensor arguments in a fixed order (``TENSOR_ARGS``, None past its
last; separate arguments because autograd does not look into lists of optional tensors). The other
arguments are typed arguments of the custom ops (``OPTIONS``, every op's the same list, each op reading
its own), never formatted into a name or a string at trace time: Dynamo passes an ``ignore_index`` it made
dynamic as a SymInt, and a new ``label_smoothing`` recompiles as it does for torch's own losses.
Gradients that are not asked for come back as empty placeholders (custom ops return tensors only).
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# The tensor arguments of each op, in the order the custom ops take them; differentiable ones first.
TENSOR_ARGS = {
    "cross_entropy": ("input", "target", "weight"),
    "linear_cross_entropy": ("input", "linear_weight", "linear_bias", "target", "weight"),
    "binary_cross_entropy_with_logits": ("input", "target", "weight", "pos_weight"),
    "linear_binary_cross_entropy": (
        "input",
        "linear_weight",
        "linear_bias",
        "target",
        "weight",
        "pos_weight",
    ),
    "distillation_loss": ("student_logits", "teacher_logits", "target"),
    "linear_distillation_loss": (
        "student_input",
        "student_weight",
        "student_bias",
        "teacher_input",
        "teacher_weight",
        "teacher_bias",
        "target",
    ),
}
# Tensors an op never differentiates, whatever their requires_grad (the teacher of distillation).
NO_GRADIENT = frozenset({"teacher_logits", "teacher_input", "teacher_weight", "teacher_bias"})


DISTILLATION_OPTIONS = (
    "divergence", "beta", "temperature", "ignore_index", "reduction", "student_logit_scale",
    "student_softcap", "teacher_logit_scale", "teacher_softcap", "impl",
)  # fmt: skip
# The non-tensor arguments each op takes (the custom ops take the union, ``DEFAULTS`` where an op has none).
OPTIONS = {
    "cross_entropy": (
        "reduction",
        "ignore_index",
        "label_smoothing",
        "z_loss",
        "softcap",
        "return_lse",
        "impl",
    ),
    "linear_cross_entropy": (
        "reduction",
        "ignore_index",
        "label_smoothing",
        "z_loss",
        "softcap",
        "chunk_size",
        "memory",
        "return_lse",
        "impl",
    ),
    "binary_cross_entropy_with_logits": ("reduction", "impl"),
    "linear_binary_cross_entropy": ("reduction", "chunk_size", "memory", "impl"),
    "distillation_loss": DISTILLATION_OPTIONS,
    "linear_distillation_loss": (*DISTILLATION_OPTIONS, "chunk_size", "memory"),
}
DEFAULTS: dict[str, object] = dict(
    reduction="mean", ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False,
    chunk_size=None, memory="speed", impl="auto", divergence="forward_kl", beta=0.5, temperature=1.0,
    student_logit_scale=1.0, student_softcap=None, teacher_logit_scale=1.0, teacher_softcap=None,
)  # fmt: skip


# The eager ops by name, filled by :func:`register` when softxent.functional is imported.
EAGER_OPS: dict[str, Callable[..., Tensor | tuple[Tensor, Tensor]]] = {}


def register(*ops: Callable[..., Tensor | tuple[Tensor, Tensor]]) -> None:
    """Make ``ops`` callable by name from the custom ops (each must be in ``TENSOR_ARGS``)."""
    for op in ops:
        if op.__name__ not in TENSOR_ARGS:
            raise ValueError(f"op: expected one of {sorted(TENSOR_ARGS)}, got {op.__name__!r}")
        EAGER_OPS[op.__name__] = op


def _own(t: Tensor) -> Tensor:
    """``t`` detached, copied where it is a view (a custom op may not return one)."""
    t = t.detach()
    return t.clone() if t._is_view() else t


def _placeholder(like: Tensor) -> Tensor:
    return like.new_empty(0)


OPTION_NAMES = tuple(DEFAULTS)  # the order the custom ops take them in


def _options(op: str, values: Sequence[object]) -> dict[str, object]:
    """The keyword arguments of ``op`` among the custom op's options (in ``OPTION_NAMES`` order)."""
    given = dict(zip(OPTION_NAMES, values, strict=True))
    return {name: given[name] for name in OPTIONS[op]}


def _run(
    op: str,
    tensors: Sequence[Tensor | None],
    needs: Sequence[bool],
    options: dict[str, object],
    *,
    want_grads: bool,
    grad_loss: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """The eager op on detached leaves: (loss, lse or None, [grad_loss·∂loss/∂tensor where ``needs``, else
    a placeholder]), the gradients only when ``want_grads``.

    Custom ops run below autograd, where view ops are not recorded: the unbatching view the public ops take
    before their autograd.Function would cut the leaves off the graph. So an unbatched call ((C,) logits,
    (D,) features) runs here with a leading dimension of 1 on input and target, and the results are shaped
    back.
    """
    names = TENSOR_ARGS[op]
    unbatched = op != "binary_cross_entropy_with_logits" and tensors[0].dim() == 1
    batched = [
        t.unsqueeze(0) if unbatched and name in ("input", "target") else t
        for name, t in zip(names, tensors, strict=True)
    ]
    leaves = [
        None if t is None else t.detach().requires_grad_(need) for t, need in zip(batched, needs, strict=True)
    ]
    if op not in EAGER_OPS:  # registered on import of their modules, which may not have happened yet
        importlib.import_module("softxent.functional")
        importlib.import_module("softxent.llm")
    with torch.enable_grad():
        result = EAGER_OPS[op](**dict(zip(names, leaves, strict=True)), **options)
    loss, lse = result if isinstance(result, tuple) else (result, None)
    grads = [_placeholder(loss) for _ in needs]
    if want_grads and any(needs):
        wanted = [leaf for leaf, need in zip(leaves, needs, strict=True) if need]
        upstream = None if grad_loss is None else grad_loss.reshape(loss.shape)
        found = iter(torch.autograd.grad(loss, wanted, upstream))
        grads = [
            _own(next(found).reshape(t.shape)) if need else grads[i]
            for i, (t, need) in enumerate(zip(tensors, needs, strict=True))
        ]
    # a custom op's outputs must not be views (of the eager op's tensors, or of each other): a compiled
    # graph returning one hands Trainer a view it then scales in place ("Output 0 of CompiledFunction is a
    # view and is being modified inplace"), so each is its own tensor
    loss = _own(loss.reshape(_loss_shape(op, tensors, options["reduction"])))
    if lse is not None:
        lse = _own(lse.reshape(_loss_shape(op, tensors, "none")))
    return loss, lse, grads


ARITY = 7  # the most tensor arguments of any op
Optional = Tensor | None


@torch.library.custom_op("softxent::loss_lse_and_grads", mutates_args=())
def loss_lse_and_grads(
    op: str, t0: Tensor, t1: Optional, t2: Optional, t3: Optional, t4: Optional, t5: Optional,
    t6: Optional, needs: list[bool], reduction: str, ignore_index: int | None, label_smoothing: float,
    z_loss: float, softcap: float | None, return_lse: bool, chunk_size: int | None, memory: str, impl: str,
    divergence: str, beta: float, temperature: float, student_logit_scale: float,
    student_softcap: float | None, teacher_logit_scale: float, teacher_softcap: float | None,
) -> list[Tensor]:  # fmt: skip
    tensors = [t0, t1, t2, t3, t4, t5, t6][: len(TENSOR_ARGS[op])]
    options = _options(op, (
        reduction, ignore_index, label_smoothing, z_loss, softcap, return_lse, chunk_size, memory, impl,
        divergence, beta, temperature, student_logit_scale, student_softcap, teacher_logit_scale,
        teacher_softcap,
    ))  # fmt: skip
    loss, lse, grads = _run(op, tensors, needs, options, want_grads=reduction != "none")
    return [loss, _placeholder(loss) if lse is None else lse, *grads]


@torch.library.custom_op("softxent::loss_backward", mutates_args=())
def loss_backward(
    op: str, t0: Tensor, t1: Optional, t2: Optional, t3: Optional, t4: Optional, t5: Optional,
    t6: Optional, needs: list[bool], reduction: str, ignore_index: int | None, label_smoothing: float,
    z_loss: float, softcap: float | None, return_lse: bool, chunk_size: int | None, memory: str, impl: str,
    divergence: str, beta: float, temperature: float, student_logit_scale: float,
    student_softcap: float | None, teacher_logit_scale: float, teacher_softcap: float | None,
    grad_loss: Tensor,
) -> list[Tensor]:  # fmt: skip
    tensors = [t0, t1, t2, t3, t4, t5, t6][: len(TENSOR_ARGS[op])]
    options = _options(op, (
        reduction, ignore_index, label_smoothing, z_loss, softcap, return_lse, chunk_size, memory, impl,
        divergence, beta, temperature, student_logit_scale, student_softcap, teacher_logit_scale,
        teacher_softcap,
    ))  # fmt: skip
    return _run(op, tensors, needs, options, want_grads=True, grad_loss=grad_loss)[2]


def _loss_shape(op: str, tensors: Sequence[Tensor | None], reduction: str) -> tuple[int, ...]:
    if reduction != "none":
        return ()
    named = dict(zip(TENSOR_ARGS[op], tensors, strict=True))
    input = named.get("input")
    if op == "cross_entropy":
        return tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.dim() >= 2 else ()
    if op == "linear_cross_entropy":
        return tuple(input.shape[:-1]) + tuple(named["linear_weight"].shape[1:-1])
    if op == "linear_binary_cross_entropy":
        return tuple(named["target"].shape)
    if op == "distillation_loss":
        return tuple(named["student_logits"].shape[:-1])
    if op == "linear_distillation_loss":
        return tuple(named["student_input"].shape[:-1])
    return tuple(input.shape)


def _grad_like(tensor: Tensor | None, need: bool, loss: Tensor) -> Tensor:
    return torch.empty_like(tensor) if need and tensor is not None else loss.new_empty(0)


@loss_lse_and_grads.register_fake
def _(op, t0, t1, t2, t3, t4, t5, t6, needs, reduction, *options):
    tensors = [t0, t1, t2, t3, t4, t5, t6][: len(TENSOR_ARGS[op])]
    return_lse = dict(zip(OPTION_NAMES[1:], options, strict=True))["return_lse"]
    dtype = torch.float64 if t0.dtype == torch.float64 else torch.float32
    loss = t0.new_empty(_loss_shape(op, tensors, reduction), dtype=dtype)
    lse = t0.new_empty(_loss_shape(op, tensors, "none"), dtype=dtype) if return_lse else None
    fused = reduction != "none" and any(needs)
    grads = (_grad_like(t, need and fused, loss) for t, need in zip(tensors, needs, strict=True))
    return [loss, loss.new_empty(0) if lse is None else lse, *grads]


@loss_backward.register_fake
def _(op, t0, t1, t2, t3, t4, t5, t6, needs, *options_and_grad):
    tensors = [t0, t1, t2, t3, t4, t5, t6][: len(TENSOR_ARGS[op])]
    grad_loss = options_and_grad[-1]
    return [_grad_like(t, need, grad_loss) for t, need in zip(tensors, needs, strict=True)]


def _setup_context(ctx, inputs, output):
    op, *tensors = inputs[: 1 + ARITY]
    needs, *options = inputs[1 + ARITY :]
    ctx.op, ctx.needs, ctx.options = op, needs, options
    ctx.fused = options[0] != "none"
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*(output[2:] if ctx.fused else tensors))


def _backward(ctx, grad_outputs):
    grad_loss = grad_outputs[0]
    saved = ctx.saved_tensors
    if ctx.fused:
        grads = [
            g * grad_loss.to(g.dtype) if need else None for g, need in zip(saved, ctx.needs, strict=True)
        ]
    else:
        computed = loss_backward(ctx.op, *saved, ctx.needs, *ctx.options, grad_loss)
        grads = [g if need else None for g, need in zip(computed, ctx.needs, strict=True)]
    grads += [None] * (ARITY - len(grads))
    return None, *grads, *([None] * (1 + len(OPTION_NAMES)))


torch.library.register_autograd("softxent::loss_lse_and_grads", _backward, setup_context=_setup_context)


def _as_option(name: str, value: object) -> object:
    """An option as the custom op's schema takes it: a SymInt or SymFloat that Dynamo made dynamic as it
    is, what torch takes for an int or a float (a NumPy scalar) converted; the eager op checks the rest."""
    if value is None or isinstance(value, str | bool | torch.SymInt | torch.SymFloat):
        return value
    if name in ("ignore_index", "chunk_size") and not isinstance(value, int):
        return operator.index(value)
    floats = ("label_smoothing", "z_loss", "softcap", "beta", "temperature", "logit_scale",
              "student_logit_scale", "student_softcap", "teacher_logit_scale", "teacher_softcap")  # fmt: skip
    if name in floats and not isinstance(value, float):
        return float(value)
    return value


def call(op: str, tensors: dict[str, Tensor | None], **options) -> Tensor | tuple[Tensor, Tensor]:
    """``op`` through the custom ops: the path the public functions take under torch.compile; the loss, or
    (loss, lse) when ``options`` has ``return_lse=True``. ``options`` are the op's keyword arguments."""
    ordered = [tensors.get(name) for name in TENSOR_ARGS[op]]
    grad_enabled = torch.is_grad_enabled()
    # class weights are differentiable with probability targets (the eager op refuses the rest)
    needs = [
        grad_enabled
        and t is not None
        and t.requires_grad
        and t.is_floating_point()
        and name not in NO_GRADIENT
        for name, t in zip(TENSOR_ARGS[op], ordered, strict=True)
    ]
    padded = ordered + [None] * (ARITY - len(ordered))
    values = [_as_option(name, options.get(name, DEFAULTS[name])) for name in OPTION_NAMES]
    outputs = loss_lse_and_grads(op, *padded, needs, *values)
    return (outputs[0], outputs[1]) if options.get("return_lse") else outputs[0]


# ----------------------------------------------------------------------------------------------------------
# The per-token statistics (softxent.log_probs, softxent.linear_log_probs): five outputs, two differentiable
# ----------------------------------------------------------------------------------------------------------

# The tensor arguments, in the order the custom ops take them (t0, t1, t2, t3; None past the last).
TOKEN_ARGS = {
    "log_probs": ("logits", "target"),
    "linear_log_probs": ("input", "linear_weight", "linear_bias", "target"),
}
TOKEN_OPTIONS = ("temperature", "logit_scale", "softcap", "ignore_index", "chunk_size", "memory", "impl")
TOKEN_DEFAULTS: dict[str, object] = dict(
    temperature=1.0, logit_scale=1.0, softcap=None, ignore_index=-100, chunk_size=None, memory="auto",
    impl="auto",
)  # fmt: skip
TOKEN_OPS: dict[str, Callable[..., Sequence[Tensor]]] = {}


def register_token_ops(*ops: Callable[..., Sequence[Tensor]]) -> None:
    """Make the per-token ops callable by name from their custom ops."""
    for op in ops:
        if op.__name__ not in TOKEN_ARGS:
            raise ValueError(f"op: expected one of {sorted(TOKEN_ARGS)}, got {op.__name__!r}")
        TOKEN_OPS[op.__name__] = op


def _token_op(op: str) -> Callable[..., Sequence[Tensor]]:
    """The registered per-token op (softxent.llm registers them on import; the custom ops may be called
    before anything imported it, e.g. by torch.library.opcheck)."""
    if op not in TOKEN_OPS:
        importlib.import_module("softxent.llm")
    return TOKEN_OPS[op]


def _token_kwargs(op: str, tensors: Sequence[Tensor | None], values: Sequence[object]) -> dict[str, object]:
    options = dict(zip(TOKEN_OPTIONS, values, strict=True))
    if op == "log_probs":
        del options["chunk_size"], options["memory"]
    return {**dict(zip(TOKEN_ARGS[op], tensors, strict=False)), **options}


@torch.library.custom_op("softxent::token_stats", mutates_args=())
def token_stats(
    op: str, t0: Tensor, t1: Tensor, t2: Optional, t3: Optional, temperature: float, logit_scale: float,
    softcap: float | None, ignore_index: int, chunk_size: int | None, memory: str, impl: str,
) -> list[Tensor]:  # fmt: skip
    tensors = [t0, t1, t2, t3][: len(TOKEN_ARGS[op])]
    values = (temperature, logit_scale, softcap, ignore_index, chunk_size, memory, impl)
    with torch.no_grad():
        outputs = _token_op(op)(**_token_kwargs(op, tensors, values))
    return [_own(t) for t in outputs]  # the five are columns of one statistics tensor


@token_stats.register_fake
def _(op, t0, t1, t2, t3, *options):
    target = t1 if op == "log_probs" else t3
    dtype = torch.float64 if t0.dtype == torch.float64 else torch.float32
    values = [target.new_empty(target.shape, dtype=dtype) for _ in range(5)]
    values[2] = target.new_empty(target.shape, dtype=torch.bool)
    return values


@torch.library.custom_op("softxent::token_stats_backward", mutates_args=())
def token_stats_backward(
    op: str, t0: Tensor, t1: Tensor, t2: Optional, t3: Optional, needs: list[bool], temperature: float,
    logit_scale: float, softcap: float | None, ignore_index: int, chunk_size: int | None, memory: str,
    impl: str, grad_log_probs: Optional, grad_entropy: Optional,
) -> list[Tensor]:  # fmt: skip
    """∂(Σ g·log ŷ_y + Σ h·H)/∂tensor for each tensor in ``needs``: the eager op again on detached leaves
    (its forward, then its backward: 2·N·D·V FLOPs more than eager autograd's 8 through a linear head)."""
    names = TOKEN_ARGS[op]
    tensors = [t0, t1, t2, t3][: len(names)]
    leaves = [
        None if t is None else t.detach().requires_grad_(need)
        for t, need in zip(tensors, needs, strict=False)
    ]
    values = (temperature, logit_scale, softcap, ignore_index, chunk_size, memory, impl)
    grads = [_placeholder(t0) for _ in tensors]
    wanted = [leaf for leaf, need in zip(leaves, needs, strict=False) if need]
    if not wanted or (grad_log_probs is None and grad_entropy is None):
        return grads
    with torch.enable_grad():
        out = _token_op(op)(**_token_kwargs(op, leaves, values))
        # below autograd only the op's own Function is recorded: no arithmetic on its outputs, the incoming
        # gradients go in as grad_outputs
        pairs = [
            (t, g) for t, g in zip(out[:2], (grad_log_probs, grad_entropy), strict=True) if g is not None
        ]
        outputs, upstream = zip(*pairs, strict=True)
        upstream = [g.to(t.dtype) for t, g in pairs]
        found = iter(torch.autograd.grad(outputs, wanted, upstream, allow_unused=True))
    for i, need in enumerate(needs[: len(tensors)]):
        if need:
            grad = next(found)
            grads[i] = torch.zeros_like(tensors[i]) if grad is None else grad
    return grads


@token_stats_backward.register_fake
def _(op, t0, t1, t2, t3, needs, *rest):
    tensors = [t0, t1, t2, t3][: len(TOKEN_ARGS[op])]
    return [
        torch.empty_like(t) if need and t is not None else t0.new_empty(0)
        for t, need in zip(tensors, needs, strict=False)
    ]


def _token_setup_context(ctx, inputs, output):
    op, *tensors = inputs[:5]
    ctx.op, ctx.options = op, inputs[5:]
    ctx.needs = [t is not None and t.requires_grad and t.is_floating_point() for t in tensors]
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors)


def _token_backward(ctx, grad_outputs):
    grad_log_probs, grad_entropy = grad_outputs[0], grad_outputs[1]
    saved = ctx.saved_tensors
    grads = token_stats_backward(ctx.op, *saved, ctx.needs, *ctx.options, grad_log_probs, grad_entropy)
    grads = [g if need else None for g, need in zip(grads, ctx.needs, strict=False)]
    grads += [None] * (4 - len(grads))
    return None, *grads, *([None] * len(TOKEN_OPTIONS))


torch.library.register_autograd("softxent::token_stats", _token_backward, setup_context=_token_setup_context)


def token_call(op: str, tensors: dict[str, Tensor | None], **options) -> list[Tensor]:
    """``op`` (log_probs or linear_log_probs) through the custom ops, the path under torch.compile: its five
    outputs. ``options`` are the op's keyword arguments."""
    ordered = [tensors.get(name) for name in TOKEN_ARGS[op]]
    ordered += [None] * (4 - len(ordered))
    values = [_as_option(name, options.get(name, TOKEN_DEFAULTS[name])) for name in TOKEN_OPTIONS]
    return token_stats(op, *ordered, *values)
