r"""Hugging Face ``transformers`` causal LMs trained with softxent's fused linear head.

A patched ``*ForCausalLM`` (or multimodal ``*ForConditionalGeneration``) computes its training loss with
:func:`softxent.linear_cross_entropy` on the hidden states that enter ``lm_head``, so the
``(batch, seq, vocab)`` logits are never materialized. The loss is transformers' own ``ForCausalLMLoss`` on
the logits the model's forward would have passed it, including what the forward does to them between
``lm_head`` and the loss (Gemma 2/3's final-logit softcap, Granite's and Cohere's logit scaling):

.. math::
    z_t = s\,(W h_t + b), \qquad (z_t \leftarrow c·\tanh(z_t / c)), \qquad
    \mathcal{L} = \frac{1}{n} \sum_{t:\, y'_t \ne -100} -\log \mathrm{softmax}(z_t)_{y'_t}

where ``y'`` are the labels shifted left by one and padded with -100 at the end of each row (or the
``shift_labels`` passed in), and n is ``num_items_in_batch`` when given (Trainer's gradient accumulation)
or else the number of counted positions. Anything the forward adds to that loss afterwards (the router's
auxiliary loss of a mixture of experts) is added as it always is. Shapes: ``h: (batch, seq, D)`` (after
``logits_to_keep``), ``W: (vocab, D)``, ``b: (vocab,)`` or none, ``labels: (batch, seq)``.

How: the output embedding's class is swapped for a subclass (same parameters, same state dict) that, while a
fused step runs, records its input and returns logits for an empty sequence; ``model.loss_function`` is
replaced by one that computes the loss above from the recorded input. Which models qualify is decided by
reading the forward's source: it must call ``self.lm_head`` once, pass the result (after any of the
transformations above, which are read off too) to ``self.loss_function``, and nothing else may touch the
logits in between; a model whose forward cannot be proven equal is refused, with the reason.

When it fuses: with ``labels``, in training mode with gradients enabled (``model.train()``), the forward
returns the model's usual output with ``loss`` set and ``logits=None``. Otherwise (evaluation, inference,
``generate``, Trainer's ``predict``), the model runs unchanged and returns its logits, so ``compute_metrics``
works; ``fuse="always"`` fuses evaluation too (less memory, ``logits=None``). Under ``torch.compile`` the
fused loss is softxent's custom op and the forward compiles whole where the model's does.

Importing this module does not import transformers; :func:`apply`, :func:`patch_causal_lm` and
:func:`enable` do.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import inspect
import operator
import os
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from softxent import _validate
from softxent.functional import cross_entropy, linear_cross_entropy

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Trainer

__all__ = ["SUPPORTED_MODEL_TYPES", "CausalLMPatch", "apply", "enable", "patch_causal_lm", "revert"]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "cohere",
    "falcon_h1",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gpt2",
    "granite",
    "llama",
    "mistral",
    "mixtral",
    "olmo2",
    "opt",
    "phi3",
    "qwen2",
    "qwen2_5_vl",
    "qwen2_moe",
    "qwen2_vl",
    "qwen3",
    "qwen3_moe",
)
"""The ``config.model_type`` values tested against their unpatched models. Other causal LMs are patched when
their forward's source proves the fused loss equal to theirs (see the module docstring), else refused."""

_IMPLS = ("auto", "torch", "triton")
_MEMORY_MODES = ("speed", "lean", "auto")
_FUSE = ("training", "always")


@dataclass(frozen=True)
class _Options:
    """What a patched model forwards to :func:`softxent.linear_cross_entropy`, and when it fuses."""

    impl: str
    memory: str
    chunk_size: int | None
    fuse: str
    label_smoothing: float = 0.0
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_smoothing", _validate.check_label_smoothing(self.label_smoothing))
        object.__setattr__(self, "z_loss", _validate.check_z_loss(self.z_loss))
        if self.impl not in _IMPLS:
            raise ValueError(f"impl: expected one of {_IMPLS}, got {self.impl!r}")
        if self.memory not in _MEMORY_MODES:
            raise ValueError(f"memory: expected one of {_MEMORY_MODES}, got {self.memory!r}")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size: expected None or a positive int, got {self.chunk_size!r}")
        if self.fuse not in _FUSE:
            raise ValueError(f"fuse: expected one of {_FUSE}, got {self.fuse!r}")


# ------------------------------------------------------------------------------------------------------
# Reading the forward: what happens to the logits between the head and the loss
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What a causal LM's forward does to ``head(h)`` before ``self.loss_function``: multiplications and
    divisions by attributes of the model (``scales``: ("mul" | "div", dotted path from the model)), then at
    most one softcap ``c·tanh(z / c)`` with c an attribute (``softcap``; skipped where it is None)."""

    head: str
    scales: tuple[tuple[str, str], ...] = ()
    softcap: str | None = None

    def scale(self, model: torch.nn.Module) -> float:
        value = 1.0
        for op, path in self.scales:
            factor = float(operator.attrgetter(path)(model))
            value = value * factor if op == "mul" else value / factor
        return value

    def cap(self, model: torch.nn.Module) -> float | None:
        return None if self.softcap is None else operator.attrgetter(self.softcap)(model)


class _Refused(Exception):
    """The forward cannot be proven to pass the head's output to the loss as the plan describes."""


def _self_path(node: ast.AST) -> str | None:
    """ "a.b" for the expression ``self.a.b``, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self" and parts:
        return ".".join(reversed(parts))
    return None


def _mentions(node: ast.AST, name: str) -> bool:
    return any(isinstance(child, ast.Name) and child.id == name for child in ast.walk(node))


def _rebinding(statement: ast.stmt, name: str) -> ast.expr | None:
    """The value of ``name = value``, else None."""
    if (
        isinstance(statement, ast.Assign)
        and len(statement.targets) == 1
        and isinstance(statement.targets[0], ast.Name)
        and statement.targets[0].id == name
    ):
        return statement.value
    return None


def _scale_of(value: ast.expr, name: str) -> tuple[str, str] | None:
    """("mul" | "div", path) for ``name * self.path`` / ``name / self.path`` (or ``self.path * name``)."""
    if not isinstance(value, ast.BinOp) or not isinstance(value.op, ast.Mult | ast.Div):
        return None
    op = "mul" if isinstance(value.op, ast.Mult) else "div"
    left_is_name = isinstance(value.left, ast.Name) and value.left.id == name
    other = value.right if left_is_name else value.left if op == "mul" else None
    if not left_is_name and not (isinstance(value.right, ast.Name) and value.right.id == name):
        return None
    path = None if other is None else _self_path(other)
    return None if path is None else (op, path)


def _softcap_of(statement: ast.stmt, name: str) -> str | None:
    """The path c of ``if self.c is not None: name = name / self.c; name = torch.tanh(name); name = name *
    self.c`` (the transformers softcap idiom), else None."""
    if not (isinstance(statement, ast.If) and not statement.orelse and len(statement.body) == 3):
        return None
    test = statement.test
    if not (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.IsNot)
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value is None
    ):
        return None
    cap = _self_path(test.left)
    first, second, third = (_rebinding(s, name) for s in statement.body)
    if cap is None or first is None or second is None or third is None:
        return None
    tanh = (
        isinstance(second, ast.Call)
        and ast.unparse(second.func) in ("torch.tanh", "tanh")
        and len(second.args) == 1
        and isinstance(second.args[0], ast.Name)
        and second.args[0].id == name
    )
    if _scale_of(first, name) == ("div", cap) and tanh and _scale_of(third, name) == ("mul", cap):
        return cap
    return None


def _loss_call(statement: ast.stmt, name: str) -> bool:
    """Whether ``statement`` is ``loss = self.loss_function(name, ...)`` (or with ``logits=name``), alone or
    as the body of ``if labels is not None:``, and mentions ``name`` nowhere else."""
    if isinstance(statement, ast.If) and len(statement.body) == 1 and not statement.orelse:
        if ast.unparse(statement.test) != "labels is not None":
            return False
        statement = statement.body[0]
    if not (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call)):
        return False
    call = statement.value
    if _self_path(call.func) != "loss_function":
        return False
    passed = [arg for arg in call.args[:1]] + [kw.value for kw in call.keywords if kw.arg == "logits"]
    others = [*call.args[1:], *(kw.value for kw in call.keywords if kw.arg != "logits")]
    return (
        len(passed) == 1
        and isinstance(passed[0], ast.Name)
        and passed[0].id == name
        and not any(_mentions(other, name) for other in others)
    )


def _head_output(value: ast.expr, call: ast.Call) -> list[tuple[str, str]] | None:
    """The scales of ``value`` when it is the head's ``call`` made contiguous (``.contiguous()``: the same
    values) and multiplied or divided by attributes of the model (FalconH1's
    ``self.model.lm_head_multiplier``), in any nesting; None for anything else."""
    if value is call:
        return []
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "contiguous"
        and not value.args
        and not value.keywords
    ):
        return _head_output(value.func.value, call)
    if isinstance(value, ast.BinOp) and isinstance(value.op, ast.Mult | ast.Div):
        op = "mul" if isinstance(value.op, ast.Mult) else "div"
        right = _self_path(value.right)
        if right is not None:
            inner = _head_output(value.left, call)
            return None if inner is None else [*inner, (op, right)]
        left = _self_path(value.left)
        if left is not None and op == "mul":
            inner = _head_output(value.right, call)
            return None if inner is None else [*inner, ("mul", left)]
    return None


@functools.cache
def _read_plan(forward: Callable[..., Any], head: str) -> _Plan:
    """The :class:`_Plan` of ``forward`` (a causal LM's, unbound) for its output embedding ``self.<head>``;
    raises :class:`_Refused` saying what it could not prove."""
    try:
        source = textwrap.dedent(inspect.getsource(forward))
    except (OSError, TypeError) as error:
        raise _Refused(f"its source cannot be read ({error})") from None
    function = next(node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef))
    body = function.body
    calls = [
        node for node in ast.walk(function) if isinstance(node, ast.Call) and _self_path(node.func) == head
    ]
    if len(calls) != 1:
        raise _Refused(f"it calls self.{head} {len(calls)} times, not once")
    start = next(
        i for i, statement in enumerate(body) if any(node is calls[0] for node in ast.walk(statement))
    )
    statement = body[start]
    line = ast.unparse(statement).splitlines()[0]
    if not (
        isinstance(statement, ast.Assign)
        and len(statement.targets) == 1
        and isinstance(statement.targets[0], ast.Name)
    ):
        raise _Refused(f"self.{head}(...) is not assigned to one name in the forward's own body: `{line}`")
    first = _head_output(statement.value, calls[0])
    if first is None:
        raise _Refused(f"it does `{line}`, which is not self.{head}(...) scaled by attributes of the model")
    name = statement.targets[0].id
    scales: list[tuple[str, str]] = first
    softcap = None
    for statement in body[start + 1 :]:
        if _loss_call(statement, name):
            return _Plan(head, tuple(scales), softcap)
        value = _rebinding(statement, name)
        scale = None if value is None else _scale_of(value, name)
        cap = _softcap_of(statement, name)
        if scale is not None and softcap is None:
            scales.append(scale)
        elif cap is not None and softcap is None:
            softcap = cap
        elif _mentions(statement, name):
            line = ast.unparse(statement).splitlines()[0]
            raise _Refused(f"between self.{head} and self.loss_function it does `{line}`")
    raise _Refused(f"it does not pass the output of self.{head} to self.loss_function")


# ------------------------------------------------------------------------------------------------------
# The patched head and loss
# ------------------------------------------------------------------------------------------------------


class _State:
    """Per patched model: whether the head records its input (a fused step is running) and what it
    recorded; ``calls`` counts the head's calls in the step (exactly one is expected)."""

    def __init__(self) -> None:
        self.active = False
        self.hidden: Tensor | None = None
        self.calls = 0


_CAPTURING: dict[type, type] = {}


def _capturing_class(head_class: type) -> type:
    """``head_class`` with a forward that, while its model's fused step runs, records its input and returns
    the logits of an empty sequence (``input[..., :0, :]``), else computes the logits as always."""
    if head_class in _CAPTURING:
        return _CAPTURING[head_class]

    def forward(self: torch.nn.Module, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        state = self._softxent_state
        if state.active:
            state.hidden = input
            state.calls += 1
            input = input[..., :0, :]
        return super(capturing, self).forward(input, *args, **kwargs)

    def __reduce_ex__(self: torch.nn.Module, protocol: int) -> tuple[Any, ...]:
        # made at run time, the class has no importable name: pickle (torch.save of a whole model) rebuilds
        # it from the head's own class instead
        return _unpickle_capturing, (head_class,), self.__getstate__()

    capturing = type(
        f"SoftxentCapturing{head_class.__name__}",
        (head_class,),
        {"forward": forward, "__reduce_ex__": __reduce_ex__},
    )
    _CAPTURING[head_class] = capturing
    return capturing


def _unpickle_capturing(head_class: type) -> torch.nn.Module:
    """An empty capturing head of ``head_class`` for pickle to restore its state into."""
    capturing = _capturing_class(head_class)
    return capturing.__new__(capturing)


def _lora_parts(
    head: torch.nn.Module, training: bool | None = None
) -> list[tuple[Tensor, Tensor, float, Tensor | None]] | None:
    """(A, B, scaling, B's bias) of each active LoRA adapter of a PEFT ``lora.Linear`` head (None for a
    plain Linear). Raises ValueError for what the merged weight W + s·B·A cannot reproduce: DoRA, and LoRA
    dropout when training (``head.training`` unless ``training`` is given)."""
    if not hasattr(head, "base_layer") or not hasattr(head, "lora_A"):
        return None
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return []
    parts = []
    for adapter in head.active_adapters:
        if adapter not in head.lora_A:
            continue
        dropout = head.lora_dropout[adapter]
        if (
            (head.training if training is None else training)
            and isinstance(dropout, torch.nn.Dropout)
            and (dropout.p > 0)
        ):
            raise ValueError(
                f"model: the LoRA adapter {adapter!r} on lm_head has lora_dropout={dropout.p}: the fused "
                "head uses the merged weight W + s·B·A, which dropout on the LoRA branch alone does not "
                "equal; use lora_dropout=0 for lm_head, or leave lm_head out of target_modules"
            )
        if head.use_dora.get(adapter, False):
            raise ValueError(
                f"model: the LoRA adapter {adapter!r} on lm_head uses DoRA, whose output is not "
                "x·(W + s·B·A)ᵀ; leave lm_head out of target_modules"
            )
        lora_b = head.lora_B[adapter]
        parts.append((head.lora_A[adapter].weight, lora_b.weight, float(head.scaling[adapter]), lora_b.bias))
    return parts


def _head_weights(head: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """The head's (weight (V, D), bias (V,) or None): a LoRA head's merged W + s·B·A, differentiable in A
    and B (a (V, D) product, never the (tokens, V) logits)."""
    parts = _lora_parts(head)
    if parts is None:
        return head.weight, head.bias
    base = head.base_layer
    weight, bias = base.weight, base.bias
    for lora_a, lora_b, scaling, lora_bias in parts:
        weight = weight + scaling * (lora_b.to(weight.dtype) @ lora_a.to(weight.dtype))
        if lora_bias is not None:
            bias = scaling * lora_bias if bias is None else bias + scaling * lora_bias
    return weight, bias


class _FusedLoss:
    """The ``loss_function`` of a patched model: transformers' ``ForCausalLMLoss`` when the model runs
    unfused (``original``), else the same loss from the head's recorded input by the fused linear head."""

    def __init__(
        self,
        model: PreTrainedModel,
        plan: _Plan,
        options: _Options,
        original: Callable[..., Tensor],
        previous: Callable[..., Tensor] | None,
    ) -> None:
        self.model = model
        self.plan = plan
        self.options = options
        self.original = original  # the loss it computes unfused: ForCausalLMLoss
        self.previous = previous  # an instance-level loss_function before the patch (restored by revert)

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        head = getattr(self.model, self.plan.head)
        state = head.__dict__.get("_softxent_state")
        if not isinstance(state, _State) or not state.active:
            if self.options.label_smoothing or self.options.z_loss:
                return _logits_loss(
                    logits, labels, shift_labels, num_items_in_batch, ignore_index, self.options
                )
            return self.original(
                logits, labels, vocab_size, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                shift_labels=shift_labels, **kwargs,
            )  # fmt: skip
        if state.calls != 1 or state.hidden is None:
            raise RuntimeError(
                f"{type(self.model).__name__}: expected lm_head to be called once before the loss, it was "
                f"called {state.calls} times; this model cannot be patched"
            )
        return _causal_lm_loss(
            state.hidden,
            head,
            labels,
            shift_labels,
            num_items_in_batch,
            ignore_index,
            self.plan.scale(self.model),
            self.plan.cap(self.model),
            self.options,
        )


def _per_item(loss: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
    """A summed loss divided by ``num_items_in_batch`` (Trainer's count, on any device); else as it is."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _logits_loss(
    logits: Tensor,
    labels: Tensor,
    shift_labels: Tensor | None,
    num_items_in_batch: Tensor | int | None,
    ignore_index: int,
    options: _Options,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` on the logits (float32, labels shifted, summed over
    ``num_items_in_batch`` when given, else the mean) with the options' label smoothing and z-loss: the
    loss a patched model computes unfused, equal to its fused loss."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.float().reshape(-1, logits.shape[-1])
    loss = cross_entropy(
        logits,
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum",
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
    )
    return _per_item(loss, num_items_in_batch)


def _causal_lm_loss(
    hidden: Tensor,
    head: torch.nn.Module,
    labels: Tensor,
    shift_labels: Tensor | None,
    num_items_in_batch: Tensor | int | None,
    ignore_index: int,
    scale: float,
    softcap: float | None,
    options: _Options,
) -> Tensor:
    """transformers' ``ForCausalLMLoss(softcap(scale·head(hidden)), labels, ...)`` without the logits.

    ``hidden: (..., D)`` as it enters the head; ``labels`` / ``shift_labels`` of ``hidden``'s leading shape.
    Returns the float32 loss (a scalar): summed and divided by ``num_items_in_batch`` when that is given,
    else the mean over non-ignored positions (nan when all are ignored, as in torch). The scale is folded
    into the hidden states and the bias: scale·(Wh + b) = W(scale·h) + scale·b.
    """
    weight, bias = _head_weights(head)
    if shift_labels is None:
        # Position t predicts token t + 1; the last position of each row has nothing to predict.
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.to(weight.device).reshape(-1, hidden.shape[-1])
    target = shift_labels.to(weight.device).reshape(-1)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    device_type = weight.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # lm_head would run in the autocast dtype; softxent runs its matmuls in one dtype, outside autocast.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    else:
        hidden = hidden.to(weight.dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        loss = linear_cross_entropy(
            hidden,
            weight,
            target,
            linear_bias=bias,
            reduction="mean" if num_items_in_batch is None else "sum",
            ignore_index=ignore_index,
            label_smoothing=options.label_smoothing,
            z_loss=options.z_loss,
            softcap=softcap,
            chunk_size=options.chunk_size,
            memory=options.memory,
            impl=options.impl,
        )
    return _per_item(loss, num_items_in_batch)


# ------------------------------------------------------------------------------------------------------
# Installing on a model, and the patched forward
# ------------------------------------------------------------------------------------------------------


def _causal_lm(model: object, argument: str) -> PreTrainedModel:
    """The causal LM to patch: ``model`` itself, or the base model of a PEFT ``PeftModel``."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) and hasattr(model, "get_base_model"):
        model = model.get_base_model()  # a PeftModel: patch the transformers model it wraps
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"{argument}: expected a transformers PreTrainedModel causal LM (e.g. LlamaForCausalLM) or a "
            f"PEFT model of one, got {type(model).__name__}"
        )
    return model


def _head_name(model: PreTrainedModel) -> str:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(
            f"model: expected a causal LM with an output embedding (lm_head), got {type(model).__name__}"
        )
    name = next((name for name, module in model.named_children() if module is head), None)
    if name is None:
        raise ValueError(
            f"model: expected the output embedding to be a direct submodule of {type(model).__name__}, got "
            "one nested deeper"
        )
    weight = getattr(head, "weight", None) if not hasattr(head, "base_layer") else head.base_layer.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"model: expected an output embedding with a (vocab, hidden) weight (a torch.nn.Linear or a PEFT "
            f"LoRA Linear), got {type(head).__name__}"
        )
    return name


def _plan(model_class: type, head: str, argument: str) -> _Plan:
    parameters = inspect.signature(model_class.forward).parameters
    if "labels" not in parameters or all(p.kind is not p.VAR_KEYWORD for p in parameters.values()):
        raise TypeError(
            f"{argument}: expected a forward(..., labels=None, ..., **kwargs), got {model_class.__name__} "
            f"with forward{inspect.signature(model_class.forward)}"
        )
    try:
        return _read_plan(model_class.forward, head)
    except _Refused as reason:
        raise ValueError(
            f"{argument}: cannot prove that the fused loss equals {model_class.__name__}'s: {reason}; "
            f"patchable forwards compute `logits = self.{head}(...)`, at most scale or softcap it, and pass "
            "it to self.loss_function"
        ) from None


def _check_loss_function(model: PreTrainedModel, loss_function: object) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    if loss_function is not ForCausalLMLoss:
        raise ValueError(
            "model.loss_function: softxent computes transformers' ForCausalLMLoss; expected that, got "
            f"{getattr(loss_function, '__qualname__', loss_function)!r} (revert the patch for a custom loss)"
        )


def _install(model: PreTrainedModel, options: _Options) -> None:
    """Swap the head's class for its capturing subclass and the loss function for :class:`_FusedLoss`
    (again with new options when already installed)."""
    head_name = _head_name(model)
    plan = _plan(type(model), head_name, "model")
    head = getattr(model, head_name)
    _lora_parts(head, training=True)  # refuse now what a training step could not fuse
    current = model.__dict__.get("_loss_function")
    original = current.original if isinstance(current, _FusedLoss) else model.loss_function
    _check_loss_function(model, original)
    if not isinstance(head.__dict__.get("_softxent_state"), _State):
        head.__class__ = _capturing_class(type(head))
        head._softxent_state = _State()
    previous = current.previous if isinstance(current, _FusedLoss) else current
    model.loss_function = _FusedLoss(model, plan, options, original, previous)


def _uninstall(model: PreTrainedModel) -> None:
    current = model.__dict__.get("_loss_function")
    if not isinstance(current, _FusedLoss):
        return
    for module in model.modules():  # the head, or a capturing head an adapter was wrapped around since
        if isinstance(module.__dict__.get("_softxent_state"), _State):
            module.__class__ = type(module).__mro__[1]
            del module._softxent_state
    if current.previous is None:
        del model._loss_function
    else:
        model.loss_function = current.previous


def _fusing(model: PreTrainedModel, labels: object) -> bool:
    loss_function = model.__dict__.get("_loss_function")
    if labels is None or not isinstance(loss_function, _FusedLoss):
        return False
    return loss_function.options.fuse == "always" or (model.training and torch.is_grad_enabled())


def _fused_forward(
    model: PreTrainedModel, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``forward(*args, **kwargs)`` (the unpatched, bound forward), with the head recording its input and the
    loss fused when :func:`_fusing` says so; then ``logits`` is None in the output (left out of a tuple)."""
    labels = kwargs.get("labels")
    if labels is None and args:
        names = list(inspect.signature(forward).parameters)
        labels = args[names.index("labels")] if names.index("labels") < len(args) else None
    if not _fusing(model, labels):
        return forward(*args, **kwargs)
    fused = model.__dict__["_loss_function"]
    if model.loss_function is not fused:
        _check_loss_function(model, model.loss_function)
    head = getattr(model, fused.plan.head)
    state = head.__dict__.get("_softxent_state")  # not getattr: PEFT's LoRA layers defer to base_layer
    if not isinstance(state, _State):
        raise ValueError(
            f"model: {fused.plan.head} was replaced after softxent patched the model (it is now a "
            f"{type(head).__name__}, e.g. an adapter added to it); call apply() again"
        )
    return_dict = kwargs.pop("return_dict", None)
    state.active, state.hidden, state.calls = True, None, 0
    try:
        outputs = forward(*args, return_dict=True, **kwargs)
    finally:
        state.active, state.hidden = False, None
    fields = {name: value for name, value in outputs.items() if name not in ("loss", "logits")}
    result = type(outputs)(loss=outputs.loss, **fields)
    wants_tuple = not (model.config.return_dict if return_dict is None else return_dict)
    return result.to_tuple() if wants_tuple else result


class _PatchedForward:
    """The forward :func:`apply` installs on one model instance (an instance attribute, so the class and
    other instances are untouched). ``previous`` is an instance-level forward that was there before."""

    def __init__(self, model: PreTrainedModel, previous: Callable[..., Any] | None) -> None:
        self.model = model
        self.previous = previous

    def _unpatched(self) -> Callable[..., Any]:
        return self.previous if self.previous is not None else type(self.model).forward.__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:  # what Trainer inspects to pass num_items_in_batch
        return inspect.signature(self._unpatched())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _fused_forward(self.model, self._unpatched(), args, kwargs)


def _route_trl() -> None:
    """Route TRL's fused head through softxent where TRL is installed (see :func:`apply`)."""
    if importlib.util.find_spec("trl") is None:
        return
    from softxent.integrations import trl as trl_integration

    try:
        trl_integration.enable()
    except (ImportError, RuntimeError) as error:
        warnings.warn(
            f"softxent cannot route TRL's fused LM head ({error}): a TRL trainer given this model computes "
            "its loss with TRL's own head",
            stacklevel=3,
        )


def apply(
    model: PreTrainedModel,
    *,
    impl: str = "auto",
    memory: str = "speed",
    chunk_size: int | None = None,
    fuse: str = "training",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> PreTrainedModel:
    """Patches one causal LM instance so that its training loss is computed by the fused linear head.

    With ``labels`` in training mode, the model computes transformers' causal-LM loss (label shift, ignore
    index -100, ``num_items_in_batch``, ``shift_labels``, ``logits_to_keep``, the forward's final-logit
    softcap or scaling, auxiliary router losses added as the model adds them) with
    :func:`softxent.linear_cross_entropy` on the hidden states that enter ``lm_head``, and returns
    ``logits=None``; otherwise it runs as before. Applying again replaces the options; :func:`revert`
    undoes it. The patch is an instance attribute: ``torch.nn.DataParallel`` replicas would run this
    instance, so train on several GPUs with DistributedDataParallel (torchrun, accelerate).

    Args:
        model: a causal LM (``*ForCausalLM``, or a multimodal ``*ForConditionalGeneration``) whose forward
            passes ``lm_head``'s output to ``self.loss_function`` (see the module docstring), or a PEFT
            ``PeftModel`` of one (its base model is patched; a LoRA ``lm_head`` is fused through its merged
            weight W + s·B·A, refused with LoRA dropout or DoRA).
        impl, memory, chunk_size: forwarded to :func:`softxent.linear_cross_entropy`.
        fuse: "training" (fuse with labels in training mode with gradients enabled: evaluation returns the
            logits, for metrics) or "always" (also in evaluation: less memory, ``logits=None``).
        label_smoothing, z_loss: loss options of :func:`softxent.linear_cross_entropy` (ε in [0, 1]: the
            loss is (1 − ε)·(−log p_y) + ε·mean_c(−log p_c), transformers' LabelSmoother's; z_loss ≥ 0 adds
            z_loss·lse² per counted position). The unfused loss (evaluation) includes them too.

    Raises:
        TypeError / ValueError: a model that is not a causal LM, a forward that cannot be proven equal (the
            reason names the statement found), a LoRA ``lm_head`` with dropout or DoRA, a bad option.

    When TRL is installed, this also routes TRL's fused LM head through softxent
    (:func:`softxent.integrations.trl.enable`, process-wide), since a TRL trainer given this model computes
    its loss there and not in the model's forward; TRL trainers take their loss options from their own
    config (:func:`enable` turns SFT's ``label_smoothing_factor`` into a fused loss). A TRL version softxent
    does not support gets a warning saying so.

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
        >>> model.eval()(input_ids=ids, labels=ids).logits.shape  # evaluation keeps the logits
        torch.Size([2, 7, 101])
    """
    causal_lm = _causal_lm(model, "model")
    options = _Options(impl, memory, chunk_size, fuse, label_smoothing, z_loss)
    _install(causal_lm, options)
    _route_trl()
    current = causal_lm.__dict__.get("forward")
    if not isinstance(current, _PatchedForward) and not _class_patched(type(causal_lm)):
        causal_lm.forward = _PatchedForward(causal_lm, current)
    return model


def revert(model: PreTrainedModel) -> PreTrainedModel:
    """Undoes :func:`apply` on ``model`` (restoring an instance-level forward it had before); returns it."""
    causal_lm = _causal_lm(model, "model")
    if not isinstance(causal_lm.__dict__.get("_loss_function"), _FusedLoss):
        raise ValueError(
            f"model: expected a model patched by apply(), got an unpatched {type(causal_lm).__name__}"
        )
    _uninstall(causal_lm)
    current = causal_lm.__dict__.get("forward")
    if isinstance(current, _PatchedForward):
        if current.previous is None:
            del causal_lm.forward
        else:
            causal_lm.forward = current.previous
    return model


def enable(trainer: Trainer, **options: Any) -> Trainer:
    """Patches ``trainer.model`` (a causal LM, or a PEFT model of one) with :func:`apply`, for a
    ``transformers.Trainer``; returns the trainer. Call it before ``train()``.

    ``options`` are :func:`apply`'s. The trainer's label smoothing (``label_smoothing_factor``, which
    makes Trainer compute the loss from the full logits) moves into the fused loss: the same loss
    (transformers' LabelSmoother's), in training and evaluation, without the logits.

    A TRL trainer whose model carries TRL's fused LM head (SFT, DPO, KTO, GRPO, RLOO: the model's forward
    takes ``fused_lm_head=True``) computes its loss there, so this routes TRL's head through softxent
    instead (:func:`softxent.integrations.trl.enable`, process-wide). TRL's trainers take their loss
    options from their config, so ``options`` are refused there (ValueError); SFTTrainer's
    ``label_smoothing_factor`` (for which TRL forms the full logits) is computed by the fused head.

    Example::

        trainer = softxent.integrations.transformers.enable(Trainer(model=model, args=args, ...))
        trainer.train()
    """
    model = getattr(trainer, "model", None)
    if model is None:
        raise TypeError(
            f"trainer: expected a transformers Trainer with a model, got {type(trainer).__name__}"
        )
    causal_lm = _causal_lm(model, "trainer.model")
    forward = causal_lm.__dict__.get("forward")
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    smoother = getattr(trainer, "label_smoother", None)
    epsilon = float(getattr(smoother, "epsilon", 0.0)) if smoother is not None else 0.0
    if code is not None and f"{os.sep}trl{os.sep}" in code.co_filename:
        if options:
            raise ValueError(
                f"options: TRL's {type(trainer).__name__} computes its loss with its own fused LM head and "
                f"takes its loss options from its config; expected no loss options, got {sorted(options)}"
            )
        from softxent.integrations import trl as trl_integration  # imports TRL: only for TRL trainers

        trl_integration.enable()
        is_sft = any(  # TRL's SFTTrainer or a subclass of it
            cls.__name__ == "SFTTrainer" and cls.__module__.startswith("trl.")
            for cls in type(trainer).__mro__
        )
        if epsilon and is_sft and getattr(trainer.args, "loss_type", "nll") == "nll":
            head = causal_lm.get_output_embeddings()
            trl_integration._smooth_labels(getattr(head, "base_layer", head).weight, epsilon)
            trainer.label_smoother = None  # SFTTrainer then takes its fused branch: −Σ log_probs / n
        return trainer
    if epsilon:
        if options.get("label_smoothing", epsilon) != epsilon:
            raise ValueError(
                f"label_smoothing: the trainer's label_smoothing_factor is {epsilon}; expected the same or "
                f"none, got {options['label_smoothing']}"
            )
        if getattr(smoother, "ignore_index", -100) != -100:
            raise ValueError(
                f"trainer.label_smoother: expected ignore_index -100 (ForCausalLMLoss's), got "
                f"{smoother.ignore_index}"
            )
        options = {**options, "label_smoothing": epsilon}
    apply(model, **options)
    if epsilon:
        trainer.label_smoother = None  # the model computes the smoothed loss from the labels, fused
    return trainer


_PATCHED_CLASSES: dict[type, CausalLMPatch] = {}


def _class_patched(model_class: type) -> bool:
    return any(issubclass(model_class, patched) for patched in _PATCHED_CLASSES)


class CausalLMPatch:
    """A class-level patch made by :func:`patch_causal_lm`: ``remove()`` undoes it, and used as a context
    manager it is removed on exit."""

    def __init__(self, model_class: type, options: _Options) -> None:
        self.model_class = model_class
        self.options = options
        self._own = model_class.__dict__.get("forward")  # None when forward is inherited
        inherited = model_class.forward

        @functools.wraps(inherited)
        def forward(model: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(model.__dict__.get("_loss_function"), _FusedLoss):
                _install_outside_graph(model, options)
            return _fused_forward(model, inherited.__get__(model), args, kwargs)

        self._patched = forward
        model_class.forward = forward
        _PATCHED_CLASSES[model_class] = self

    def remove(self) -> None:
        """Restores the class's forward (a no-op when already removed); instances keep their swapped head
        until :func:`revert` (they then compute their loss unfused, as before)."""
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
        _PATCHED_CLASSES.pop(self.model_class, None)

    def __enter__(self) -> CausalLMPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


@torch.compiler.disable
def _install_outside_graph(model: PreTrainedModel, options: _Options) -> None:
    """:func:`_install` for an instance first called under a class patch (outside any compiled graph)."""
    _install(model, options)


def patch_causal_lm(
    model_class: type,
    *,
    impl: str = "auto",
    memory: str = "speed",
    chunk_size: int | None = None,
    fuse: str = "training",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> CausalLMPatch:
    """Patches a causal-LM class: every instance, existing or later loaded with ``from_pretrained``,
    computes its training loss with the fused linear head (as :func:`apply` does for one instance).

    Args:
        model_class: e.g. ``transformers.LlamaForCausalLM`` (see :func:`apply` for what qualifies).
        impl, memory, chunk_size, fuse, label_smoothing, z_loss: as in :func:`apply`.

    Returns:
        A :class:`CausalLMPatch`: call ``remove()``, or use it in a ``with`` block, to undo the patch.
    """
    from transformers import PreTrainedModel

    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise TypeError(
            f"model_class: expected a subclass of transformers.PreTrainedModel (e.g. LlamaForCausalLM), "
            f"got {model_class!r}"
        )
    options = _Options(impl, memory, chunk_size, fuse, label_smoothing, z_loss)
    _plan(model_class, "lm_head", "model_class")  # each instance is checked again with its own head's name
    return CausalLMPatch(model_class, options)
