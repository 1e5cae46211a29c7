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

``op`` names the function (the public ops register themselves with :func:`register`, so this module does
not import them), t0, ..., t5 are its tensor arguments in a fixed order (``TENSOR_ARGS``, None past its
last; separate arguments because autograd does not look into lists of optional tensors). The other
arguments are typed arguments of the custom ops (``OPTIONS``, every op's the same list, each op reading
its own), never formatted into a name or a string at trace time: Dynamo passes an ``ignore_index`` it made
dynamic as a SymInt, and a new ``label_smoothing`` recompiles as it does for torch's own losses.
Gradients that are not asked for come back as empty placeholders (custom ops return tensors only).
"""

from __future__ import annotations

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
}


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
}
DEFAULTS: dict[str, object] = dict(
    reduction="mean", ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False,
    chunk_size=None, memory="speed", impl="auto",
)  # fmt: skip


# The eager ops by name, filled by :func:`register` when softxent.functional is imported.
EAGER_OPS: dict[str, Callable[..., Tensor | tuple[Tensor, Tensor]]] = {}


def register(*ops: Callable[..., Tensor | tuple[Tensor, Tensor]]) -> None:
    """Make ``ops`` callable by name from the custom ops (each must be in ``TENSOR_ARGS``)."""
    for op in ops:
        if op.__name__ not in TENSOR_ARGS:
            raise ValueError(f"op: expected one of {sorted(TENSOR_ARGS)}, got {op.__name__!r}")
        EAGER_OPS[op.__name__] = op


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
    with torch.enable_grad():
        result = EAGER_OPS[op](**dict(zip(names, leaves, strict=True)), **options)
    loss, lse = result if isinstance(result, tuple) else (result, None)
    grads = [_placeholder(loss) for _ in needs]
    if want_grads and any(needs):
        wanted = [leaf for leaf, need in zip(leaves, needs, strict=True) if need]
        upstream = None if grad_loss is None else grad_loss.reshape(loss.shape)
        found = iter(torch.autograd.grad(loss, wanted, upstream))
        grads = [
            next(found).reshape(t.shape) if need else grads[i]
            for i, (t, need) in enumerate(zip(tensors, needs, strict=True))
        ]
    loss = loss.detach().reshape(_loss_shape(op, tensors, options["reduction"]))
    if lse is not None:
        lse = lse.detach().reshape(_loss_shape(op, tensors, "none"))
    return loss, lse, grads


ARITY = 6  # the most tensor arguments of any op
Optional = Tensor | None


@torch.library.custom_op("softxent::loss_lse_and_grads", mutates_args=())
def loss_lse_and_grads(
    op: str, t0: Tensor, t1: Optional, t2: Optional, t3: Optional, t4: Optional, t5: Optional,
    needs: list[bool], reduction: str, ignore_index: int | None, label_smoothing: float, z_loss: float,
    softcap: float | None, return_lse: bool, chunk_size: int | None, memory: str, impl: str,
) -> list[Tensor]:  # fmt: skip
    tensors = [t0, t1, t2, t3, t4, t5][: len(TENSOR_ARGS[op])]
    options = _options(
        op, (reduction, ignore_index, label_smoothing, z_loss, softcap, return_lse, chunk_size, memory, impl)
    )
    loss, lse, grads = _run(op, tensors, needs, options, want_grads=reduction != "none")
    return [loss, _placeholder(loss) if lse is None else lse, *grads]


@torch.library.custom_op("softxent::loss_backward", mutates_args=())
def loss_backward(
    op: str, t0: Tensor, t1: Optional, t2: Optional, t3: Optional, t4: Optional, t5: Optional,
    needs: list[bool], reduction: str, ignore_index: int | None, label_smoothing: float, z_loss: float,
    softcap: float | None, return_lse: bool, chunk_size: int | None, memory: str, impl: str,
    grad_loss: Tensor,
) -> list[Tensor]:  # fmt: skip
    tensors = [t0, t1, t2, t3, t4, t5][: len(TENSOR_ARGS[op])]
    options = _options(
        op, (reduction, ignore_index, label_smoothing, z_loss, softcap, return_lse, chunk_size, memory, impl)
    )
    return _run(op, tensors, needs, options, want_grads=True, grad_loss=grad_loss)[2]


def _loss_shape(op: str, tensors: Sequence[Tensor | None], reduction: str) -> tuple[int, ...]:
    if reduction != "none":
        return ()
    named = dict(zip(TENSOR_ARGS[op], tensors, strict=True))
    input = named["input"]
    if op == "cross_entropy":
        return tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.dim() >= 2 else ()
    if op == "linear_cross_entropy":
        return tuple(input.shape[:-1]) + tuple(named["linear_weight"].shape[1:-1])
    if op == "linear_binary_cross_entropy":
        return tuple(named["target"].shape)
    return tuple(input.shape)


def _grad_like(tensor: Tensor | None, need: bool, loss: Tensor) -> Tensor:
    return torch.empty_like(tensor) if need and tensor is not None else loss.new_empty(0)


@loss_lse_and_grads.register_fake
def _(op, t0, t1, t2, t3, t4, t5, needs, reduction, *options):
    tensors = [t0, t1, t2, t3, t4, t5][: len(TENSOR_ARGS[op])]
    return_lse = dict(zip(OPTION_NAMES[1:], options, strict=True))["return_lse"]
    dtype = torch.float64 if t0.dtype == torch.float64 else torch.float32
    loss = t0.new_empty(_loss_shape(op, tensors, reduction), dtype=dtype)
    lse = t0.new_empty(_loss_shape(op, tensors, "none"), dtype=dtype) if return_lse else None
    fused = reduction != "none" and any(needs)
    grads = (_grad_like(t, need and fused, loss) for t, need in zip(tensors, needs, strict=True))
    return [loss, loss.new_empty(0) if lse is None else lse, *grads]


@loss_backward.register_fake
def _(op, t0, t1, t2, t3, t4, t5, needs, *options_and_grad):
    tensors = [t0, t1, t2, t3, t4, t5][: len(TENSOR_ARGS[op])]
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
    if name in ("label_smoothing", "z_loss", "softcap") and not isinstance(value, float):
        return float(value)
    return value


def call(op: str, tensors: dict[str, Tensor | None], **options) -> Tensor | tuple[Tensor, Tensor]:
    """``op`` through the custom ops: the path the public functions take under torch.compile; the loss, or
    (loss, lse) when ``options`` has ``return_lse=True``. ``options`` are the op's keyword arguments."""
    ordered = [tensors.get(name) for name in TENSOR_ARGS[op]]
    grad_enabled = torch.is_grad_enabled()
    # class weights are differentiable with probability targets (the eager op refuses the rest)
    needs = [grad_enabled and t is not None and t.requires_grad and t.is_floating_point() for t in ordered]
    padded = ordered + [None] * (ARITY - len(ordered))
    values = [_as_option(name, options.get(name, DEFAULTS[name])) for name in OPTION_NAMES]
    outputs = loss_lse_and_grads(op, *padded, needs, *values)
    return (outputs[0], outputs[1]) if options.get("return_lse") else outputs[0]
