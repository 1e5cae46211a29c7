r"""Hugging Face ``transformers`` causal LMs trained with softxent's fused linear head.

A patched ``*ForCausalLM`` computes its training loss with :func:`softxent.linear_cross_entropy` on the hidden
states that enter ``lm_head``, so the ``(batch, seq, vocab)`` logits are never materialized. The loss is
transformers' own ``ForCausalLMLoss`` on ``lm_head(h)`` (after the model's final-logit softcap, if any):

.. math::
    z_t = W h_t + b, \qquad (z_t \leftarrow s·\tanh(z_t / s) \text{ for Gemma 2/3}), \qquad
    \mathcal{L} = \frac{1}{n} \sum_{t:\, y'_t \ne -100} -\log \mathrm{softmax}(z_t)_{y'_t}

where ``y'`` are the labels shifted left by one and padded with -100 at the end of each row (or the
``shift_labels`` passed in), and n is ``num_items_in_batch`` when given (Trainer's gradient accumulation)
or else the number of counted positions. Shapes: ``h: (batch, seq, D)`` (after ``logits_to_keep``),
``W: (vocab, D)``, ``b: (vocab,)`` or none, ``labels: (batch, seq)``.

What a patched model returns: with ``labels``, the model's usual output class with ``loss`` set and
**``logits=None``** (``past_key_values``, ``hidden_states``, ``attentions`` as unpatched); without
``labels`` (inference, ``generate``) it runs the unpatched forward and returns the logits as usual. Metrics
that need logits under labels (Trainer's ``compute_metrics``, ``compute_loss_func``) therefore need an
unpatched model; Trainer's evaluation loss works as is.

Supported model types (``config.model_type``): see :data:`SUPPORTED_MODEL_TYPES`. For these families the
forward is ``lm_head(slice(base_model(...)))``, optionally softcapped, into ``ForCausalLMLoss``; families
that rescale the logits (Cohere, Granite) or add auxiliary losses (mixture-of-experts) are refused.

Importing this module does not import transformers; :func:`apply` and :func:`patch_causal_lm` do.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from softxent.functional import linear_cross_entropy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["SUPPORTED_MODEL_TYPES", "CausalLMPatch", "apply", "patch_causal_lm", "revert"]


class _Family(NamedTuple):
    """A supported model family: its causal-LM class (by name) and the config attribute holding the softcap
    its forward applies to the logits between lm_head and the loss (None: the loss takes lm_head's output)."""

    causal_lm: str
    softcap_attribute: str | None = None


# config.model_type -> family. Each causal LM's forward is lm_head(slice(base_model(...))), optionally
# softcapped, into ForCausalLMLoss (transformers 5.x); a family is added here with its test.
_FAMILIES: dict[str, _Family] = {
    "gemma": _Family("GemmaForCausalLM"),
    "gemma2": _Family("Gemma2ForCausalLM", "final_logit_softcapping"),
    "gemma3_text": _Family("Gemma3ForCausalLM", "final_logit_softcapping"),
    "gpt2": _Family("GPT2LMHeadModel"),
    "llama": _Family("LlamaForCausalLM"),
    "mistral": _Family("MistralForCausalLM"),
    "olmo2": _Family("Olmo2ForCausalLM"),
    "phi3": _Family("Phi3ForCausalLM"),
    "qwen2": _Family("Qwen2ForCausalLM"),
    "qwen3": _Family("Qwen3ForCausalLM"),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))
"""The ``config.model_type`` values whose causal LMs can be patched."""

_IMPLS = ("auto", "torch", "triton")
_MEMORY_MODES = ("speed", "lean", "auto")


@dataclass(frozen=True)
class _Options:
    """What a patched forward forwards to :func:`softxent.linear_cross_entropy`."""

    impl: str
    memory: str
    chunk_size: int | None

    def __post_init__(self) -> None:
        if self.impl not in _IMPLS:
            raise ValueError(f"impl: expected one of {_IMPLS}, got {self.impl!r}")
        if self.memory not in _MEMORY_MODES:
            raise ValueError(f"memory: expected one of {_MEMORY_MODES}, got {self.memory!r}")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size: expected None or a positive int, got {self.chunk_size!r}")


def _family(model_class: type, argument: str) -> _Family:
    """The family of a ``PreTrainedModel`` subclass, which must be (a subclass of) the family's causal LM and
    take ``labels`` and ``**kwargs`` (where transformers passes the loss keyword arguments)."""
    model_type = getattr(model_class.config_class, "model_type", None)
    name = model_class.__name__
    if model_type not in _FAMILIES:
        raise ValueError(
            f"{argument}: expected a causal LM whose config.model_type is one of {SUPPORTED_MODEL_TYPES}, "
            f"got {name} with model_type {model_type!r}"
        )
    family = _FAMILIES[model_type]
    if family.causal_lm not in {cls.__name__ for cls in model_class.__mro__}:
        raise TypeError(
            f"{argument}: expected {family.causal_lm} (or a subclass) for model_type {model_type!r}, "
            f"got {name}"
        )
    parameters = inspect.signature(model_class.forward).parameters
    if "labels" not in parameters or all(p.kind is not p.VAR_KEYWORD for p in parameters.values()):
        raise TypeError(
            f"{argument}: expected a forward(..., labels=None, ..., **kwargs), got {name} with "
            f"forward{inspect.signature(model_class.forward)}"
        )
    return family


def _check_model(model: object) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"model: expected a transformers PreTrainedModel causal LM (e.g. LlamaForCausalLM), "
            f"got {type(model).__name__}"
        )
    _family(type(model), "model")
    _output_head(model)


def _output_head(model: PreTrainedModel) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"model: expected an output embedding (lm_head) that is a torch.nn.Linear, got "
            f"{type(head).__name__} in {type(model).__name__}"
        )
    return head


def _check_loss_function(model: PreTrainedModel) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    loss_function = model.loss_function
    if loss_function is not ForCausalLMLoss:
        raise ValueError(
            "model.loss_function: softxent computes transformers' ForCausalLMLoss; expected that, got "
            f"{getattr(loss_function, '__qualname__', loss_function)!r} (revert the patch for a custom loss)"
        )


@contextlib.contextmanager
def _head_inputs(head: torch.nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, ``head`` records its input and returns an empty ``(..., 0)`` view of it instead of
    the logits, so a forward runs unchanged up to the head (and applies its logit ops to an empty tensor)."""
    captured: list[Tensor] = []
    previous = head.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's device hooks)

    def capture(hidden: Tensor) -> Tensor:
        captured.append(hidden)
        return hidden[..., :0]

    head.forward = capture
    try:
        yield captured
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def _causal_lm_loss(
    hidden: Tensor,
    head: torch.nn.Linear,
    labels: Tensor,
    shift_labels: Tensor | None,
    num_items_in_batch: Tensor | int | None,
    ignore_index: int,
    softcap: float | None,
    options: _Options,
) -> Tensor:
    """transformers' ``ForCausalLMLoss(head(hidden), labels, ...)`` without the logits.

    ``hidden: (..., D)`` as it enters the head; ``labels`` / ``shift_labels`` of ``hidden``'s leading shape.
    Returns the float32 loss (a scalar): summed and divided by ``num_items_in_batch`` when that is given,
    else the mean over non-ignored positions (nan when all are ignored, as in torch).
    """
    weight, bias = head.weight, head.bias
    if shift_labels is None:
        # Position t predicts token t + 1; the last position of each row has nothing to predict.
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.to(weight.device).reshape(-1, hidden.shape[-1])
    target = shift_labels.to(weight.device).reshape(-1)
    device_type = weight.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # lm_head would run in the autocast dtype; softxent runs its matmuls in one dtype, outside autocast.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        loss = linear_cross_entropy(
            hidden,
            weight,
            target,
            linear_bias=bias,
            reduction="mean" if num_items_in_batch is None else "sum",
            ignore_index=ignore_index,
            softcap=softcap,
            chunk_size=options.chunk_size,
            memory=options.memory,
            impl=options.impl,
        )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _arguments(bound: inspect.BoundArguments, name: str) -> dict[str, Any]:
    """The dict that holds ``name`` in ``bound``: the arguments for a named parameter, else ``**kwargs``."""
    parameters = bound.signature.parameters
    if name in parameters:
        return bound.arguments
    var_keyword = next(p.name for p in parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD)
    return bound.arguments.setdefault(var_keyword, {})


def _get_argument(bound: inspect.BoundArguments, name: str, default: object = None) -> Any:
    return _arguments(bound, name).get(name, default)


def _set_argument(bound: inspect.BoundArguments, name: str, value: object) -> Any:
    """Sets a named or ``**kwargs`` argument of ``bound``; returns what it was (None where absent)."""
    arguments = _arguments(bound, name)
    previous = arguments.get(name)
    arguments[name] = value
    return previous


def _fused_forward(
    model: PreTrainedModel,
    forward: Callable[..., Any],
    options: _Options,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``forward(*args, **kwargs)`` (the unpatched, bound forward) with the loss computed by softxent.

    With ``labels`` it runs ``forward`` with ``labels=None`` and ``return_dict=True`` while the head only
    records its input, computes the loss from that input, and returns the output with ``loss`` set and
    ``logits=None`` (a tuple without the logits when ``return_dict`` is false). Without ``labels`` it is
    ``forward(*args, **kwargs)``.
    """
    bound = inspect.signature(forward).bind(*args, **kwargs)
    labels = _set_argument(bound, "labels", None)
    if labels is None:
        return forward(*args, **kwargs)
    _check_loss_function(model)
    head = _output_head(model)
    return_dict = _set_argument(bound, "return_dict", True)
    with _head_inputs(head) as captured:
        outputs = forward(*bound.args, **bound.kwargs)
    if len(captured) != 1:
        raise RuntimeError(
            f"{type(model).__name__}.forward: expected lm_head to be called once, it was called "
            f"{len(captured)} times; this model cannot be patched"
        )
    softcap_attribute = _FAMILIES[type(model).config_class.model_type].softcap_attribute
    loss = _causal_lm_loss(
        captured[0],
        head,
        labels,
        shift_labels=_get_argument(bound, "shift_labels"),
        num_items_in_batch=_get_argument(bound, "num_items_in_batch"),
        ignore_index=_get_argument(bound, "ignore_index", -100),
        softcap=None if softcap_attribute is None else getattr(model.config, softcap_attribute),
        options=options,
    )
    fields = {name: value for name, value in outputs.items() if name not in ("loss", "logits")}
    result = type(outputs)(loss=loss, **fields)
    wants_tuple = not (model.config.return_dict if return_dict is None else return_dict)
    return result.to_tuple() if wants_tuple else result


class _PatchedForward:
    """The forward :func:`apply` installs on one model instance (an instance attribute, so the class and
    other instances are untouched). ``previous`` is an instance-level forward that was there before."""

    def __init__(
        self, model: PreTrainedModel, options: _Options, previous: Callable[..., Any] | None
    ) -> None:
        self.model = model
        self.options = options
        self.previous = previous

    def _unpatched(self) -> Callable[..., Any]:
        return self.previous if self.previous is not None else type(self.model).forward.__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:  # what Trainer inspects to pass num_items_in_batch
        return inspect.signature(self._unpatched())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _fused_forward(self.model, self._unpatched(), self.options, args, kwargs)


def apply(
    model: PreTrainedModel, *, impl: str = "auto", memory: str = "speed", chunk_size: int | None = None
) -> PreTrainedModel:
    """Patches one causal LM instance so that its loss is computed by the fused linear head.

    With ``labels`` the model computes transformers' causal-LM loss (label shift, ignore index -100,
    ``num_items_in_batch``, ``shift_labels``, ``logits_to_keep``, Gemma 2/3's final-logit softcap) with
    :func:`softxent.linear_cross_entropy` on the hidden states that enter ``lm_head`` and returns
    ``logits=None``; without ``labels`` it returns the logits as before. Applying again replaces the
    options; :func:`revert` undoes it. The patch is an instance attribute: ``torch.nn.DataParallel``
    replicas copy it and would run this instance, so use :func:`patch_causal_lm` with DataParallel.

    Args:
        model: a ``*ForCausalLM`` of a family in :data:`SUPPORTED_MODEL_TYPES`, with an ``nn.Linear`` lm_head.
        impl, memory, chunk_size: forwarded to :func:`softxent.linear_cross_entropy`.

    Returns:
        ``model`` itself, patched.

    Example:
        >>> import torch, transformers
        >>> from softxent.integrations import transformers as sx
        >>> config = transformers.LlamaConfig(vocab_size=101, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> model = sx.apply(transformers.LlamaForCausalLM(config))
        >>> ids = torch.randint(0, 101, (2, 7))
        >>> out = model(input_ids=ids, labels=ids)
        >>> out.logits is None, out.loss.shape
        (True, torch.Size([]))
        >>> model(input_ids=ids).logits.shape
        torch.Size([2, 7, 101])
    """
    _check_model(model)
    options = _Options(impl, memory, chunk_size)
    current = model.__dict__.get("forward")
    previous = current.previous if isinstance(current, _PatchedForward) else current
    model.forward = _PatchedForward(model, options, previous)
    return model


def revert(model: PreTrainedModel) -> PreTrainedModel:
    """Undoes :func:`apply` on ``model`` (restoring an instance-level forward it had before); returns it."""
    current = model.__dict__.get("forward")
    if not isinstance(current, _PatchedForward):
        raise ValueError(
            f"model: expected a model patched by apply(), got an unpatched {type(model).__name__}"
        )
    if current.previous is None:
        del model.forward
    else:
        model.forward = current.previous
    return model


class CausalLMPatch:
    """A class-level patch made by :func:`patch_causal_lm`: ``remove()`` undoes it, and used as a context
    manager it is removed on exit."""

    def __init__(self, model_class: type, options: _Options) -> None:
        self.model_class = model_class
        self._own = model_class.__dict__.get("forward")  # None when forward is inherited
        inherited = model_class.forward

        @functools.wraps(inherited)
        def forward(model: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
            return _fused_forward(model, inherited.__get__(model), options, args, kwargs)

        self._patched = forward
        model_class.forward = forward

    def remove(self) -> None:
        """Restores the class's forward (a no-op when already removed)."""
        if self._patched is None:
            return
        if self.model_class.__dict__.get("forward") is not self._patched:
            raise RuntimeError(
                f"{self.model_class.__name__}.forward was replaced after softxent patched it; "
                "remove patches in the reverse order they were made"
            )
        if self._own is None:
            del self.model_class.forward
        else:
            self.model_class.forward = self._own
        self._patched = None

    def __enter__(self) -> CausalLMPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def patch_causal_lm(
    model_class: type, *, impl: str = "auto", memory: str = "speed", chunk_size: int | None = None
) -> CausalLMPatch:
    """Patches a ``*ForCausalLM`` class: every instance, existing or later loaded with ``from_pretrained``,
    computes its loss with the fused linear head (as :func:`apply` does for one instance).

    Args:
        model_class: e.g. ``transformers.LlamaForCausalLM``; its config's model_type must be in
            :data:`SUPPORTED_MODEL_TYPES`.
        impl, memory, chunk_size: forwarded to :func:`softxent.linear_cross_entropy`.

    Returns:
        A :class:`CausalLMPatch`: call ``remove()``, or use it in a ``with`` block, to undo the patch.
    """
    from transformers import PreTrainedModel

    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise TypeError(
            f"model_class: expected a subclass of transformers.PreTrainedModel (e.g. LlamaForCausalLM), "
            f"got {model_class!r}"
        )
    _family(model_class, "model_class")
    return CausalLMPatch(model_class, _Options(impl, memory, chunk_size))
