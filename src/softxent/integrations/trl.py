r"""TRL's trainers on softxent's LLM ops: per-token log-probs and entropy, and distillation divergences, from
the LM head without its logits.

TRL 1.16 gives its SFT, DPO, KTO, GRPO and RLOO trainers a fused LM head (``trl.trainer.utils.
add_fused_lm_head``) that calls the kernel named ``trl.trainer.utils._ChunkedLogProbFunction``, and its
``DistillationTrainer`` calls ``trl.trainer.distillation_trainer.ChunkedDivergenceFunction``; both are
looked up when called. :func:`enable` points those names at adapters of :func:`softxent.linear_log_probs`
and :func:`softxent.linear_distillation_loss` (same arguments, same outputs), so every trainer built before
or after it computes its policy's and reference model's per-token outputs with softxent; :func:`disable`
puts TRL's own back. Per token, with z = c·tanh(s·(W h + b)/c)/T (scale s, softcap c, temperature T):

.. math::
    \log p(y) = z_y - \mathrm{lse}(z), \quad H = -Σ_v p_v \log p_v, \quad \log Σ_v p_v^2, \quad
    \frac{1}{V}Σ_v z_v, \quad [y = \arg\max z]

and for distillation TRL's per-token divergence (β = 0: KL(p_t ‖ p_s), β = 1: KL(p_s ‖ p_t), between:
the generalized JSD with m = β·p_t + (1 − β)·p_s) and the student's entropy (no gradient).

Only the scored positions are computed on every device: TRL projects every position (padding and prompt
too) where Triton is not available, and :func:`enable` has it keep only the labelled ones there as well.

The names patched are private to TRL, so :func:`enable` accepts the TRL versions in ``SUPPORTED_TRL`` and
refuses others, saying which are supported. Importing this module does not import TRL.

Example:
    >>> import softxent.integrations.trl as sx_trl
    >>> sx_trl.SUPPORTED_TRL
    ('1.16',)
    >>> sx_trl.enable()  # doctest: +SKIP
    >>> # then build and train GRPOTrainer, DPOTrainer, DistillationTrainer, ... as usual
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from softxent.functional import linear_cross_entropy
from softxent.llm import linear_distillation_loss, linear_log_probs

__all__ = ["SUPPORTED_TRL", "DivergenceFunction", "LogProbFunction", "disable", "enable", "enabled"]

# TRL minor versions whose private kernel hooks (names and signatures) this module knows
SUPPORTED_TRL: tuple[str, ...] = ("1.16",)
_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# (module, attribute) -> TRL's own object, while enabled
_ORIGINALS: dict[tuple[str, str], object] = {}
# id(head weight) -> (the weight, ε): SFT trainers whose label smoothing the fused head computes
_SMOOTHED: dict[int, tuple[weakref.ref[Tensor], float]] = {}


def _smooth_labels(weight: Tensor, epsilon: float) -> None:
    """Have the fused head compute label-smoothed log-likelihoods for the LM head ``weight`` (an SFT
    trainer's: see :func:`softxent.integrations.transformers.enable`): "log_probs" is then
    −[(1 − ε)·(−log p_y) + ε·mean_j(−log p_j)], TRL's LabelSmoother's per-token loss negated, so the SFT
    loss −Σ log_probs / n is the label-smoothed cross-entropy without the logits. ``epsilon`` 0 removes
    it."""
    _SMOOTHED.pop(id(weight), None)
    if epsilon:
        key = id(weight)
        _SMOOTHED[key] = (weakref.ref(weight, lambda _: _SMOOTHED.pop(key, None)), float(epsilon))


def _smoothing(weight: Tensor) -> float:
    entry = _SMOOTHED.get(id(weight))
    return entry[1] if entry is not None and entry[0]() is weight else 0.0


class LogProbFunction:
    """Stands in for TRL's ``ChunkedLogProbFunction``: ``apply(hidden (N, D), weight (V, D), bias (V,) or
    None, targets (N,), temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` returns
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each (N,) or None where ``outputs`` does
    not name it (log_probs always). ``chunk_size`` (TRL's vocabulary tile) is not used: softxent's policy
    chunks the rows."""

    @staticmethod
    def apply(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: Sequence[str] = ("log_probs",),
    ) -> tuple[Tensor | None, ...]:
        unknown = set(outputs) - set(_OUTPUTS)
        if unknown:
            raise ValueError(f"outputs: expected names among {_OUTPUTS}, got {sorted(unknown)}")
        epsilon = _smoothing(weight)
        compute = hidden.dtype
        if torch.is_autocast_enabled(hidden.device.type):
            compute = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(compute), weight.to(compute)
        bias = None if bias is None else bias.to(compute)
        softcap = None if final_logit_softcapping is None else float(final_logit_softcapping)
        with torch.autocast(hidden.device.type, enabled=False):
            if epsilon:
                values = _smoothed(
                    hidden, weight, bias, targets, float(temperature), softcap, logit_scale, epsilon
                )
            else:
                out = linear_log_probs(
                    hidden, weight, targets, linear_bias=bias, temperature=float(temperature),
                    logit_scale=float(logit_scale), softcap=softcap,
                )  # fmt: skip
                values = tuple(getattr(out, name) for name in _OUTPUTS)
        return tuple(
            value if name == "log_probs" or name in outputs else None
            for name, value in zip(_OUTPUTS, values, strict=True)
        )


def _smoothed(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    epsilon: float,
) -> tuple[Tensor | None, ...]:
    """:meth:`LogProbFunction.apply` for a label-smoothed SFT head: every output, "log_probs" the negated
    smoothed loss (differentiable), the others from a forward-only pass."""
    if temperature != 1.0:
        raise ValueError(
            f"temperature: label smoothing in the fused head expects temperature 1.0 (SFT's), got "
            f"{temperature}"
        )
    scaled = hidden if logit_scale == 1.0 else hidden * logit_scale
    scaled_bias = bias if bias is None or logit_scale == 1.0 else bias * logit_scale
    loss = linear_cross_entropy(
        scaled, weight, targets, linear_bias=scaled_bias, reduction="none", label_smoothing=epsilon,
        softcap=softcap,
    )  # fmt: skip
    with torch.no_grad():
        out = linear_log_probs(
            hidden.detach(), weight.detach(), targets, linear_bias=None if bias is None else bias.detach(),
            logit_scale=logit_scale, softcap=softcap,
        )  # fmt: skip
    return (-loss, out.entropy, out.log_sum_sq_probs, out.mean_logits, out.is_top1)


class DivergenceFunction:
    """Stands in for TRL's ``ChunkedDivergenceFunction``: ``apply(student_hidden (N, D_s), student_weight,
    student_bias, teacher_hidden (N, D_t), teacher_weight, teacher_bias, beta, temperature=1.0,
    student_logit_scale=1.0, student_final_logit_softcapping=None, teacher_logit_scale=1.0,
    teacher_final_logit_softcapping=None)`` returns (per-token divergence (N,), the student's entropy (N,),
    without gradient). The entropy costs one more pass over the student's head (no backward)."""

    @staticmethod
    def apply(
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        beta: float,
        temperature: float = 1.0,
        student_logit_scale: float = 1.0,
        student_final_logit_softcapping: float | None = None,
        teacher_logit_scale: float = 1.0,
        teacher_final_logit_softcapping: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        beta = float(beta)
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
        per_token = linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, divergence=divergence, beta=beta,
            temperature=float(temperature), reduction="none", student_logit_scale=float(student_logit_scale),
            student_softcap=student_final_logit_softcapping, teacher_logit_scale=float(teacher_logit_scale),
            teacher_softcap=teacher_final_logit_softcapping,
        )  # fmt: skip
        with torch.no_grad():
            entropy = linear_log_probs(
                student_hidden.detach(), student_weight.detach(),
                torch.zeros(student_hidden.shape[0], dtype=torch.long, device=student_hidden.device),
                linear_bias=None if student_bias is None else student_bias.detach(),
                temperature=float(temperature), logit_scale=float(student_logit_scale),
                softcap=student_final_logit_softcapping,
            ).entropy  # fmt: skip
        return per_token, entropy


def _compact(device: torch.device) -> bool:
    """TRL's "project only the labelled positions" switch, on for every device."""
    return True


# (module, attribute, replacement): what enable() points where
_PATCHES = (
    ("trl.trainer.utils", "_ChunkedLogProbFunction", LogProbFunction),
    ("trl.trainer.utils", "_use_triton", _compact),
    ("trl.trainer.distillation_trainer", "ChunkedDivergenceFunction", DivergenceFunction),
    ("trl.trainer.distillation_trainer", "_use_triton", _compact),
)


def _check_version() -> None:
    try:
        trl = importlib.import_module("trl")
    except ImportError as error:
        raise ImportError("softxent.integrations.trl needs TRL (pip install 'trl==1.16.*')") from error
    version = str(getattr(trl, "__version__", "unknown"))
    minor = ".".join(version.split(".")[:2])
    if minor not in SUPPORTED_TRL:
        supported = ", ".join(v + ".x" for v in SUPPORTED_TRL)
        raise RuntimeError(
            f"trl: expected one of the versions {supported} (softxent replaces TRL's private fused-head "
            f"kernels, whose names and signatures change between releases), got {version}"
        )


def enable() -> None:
    """Route TRL's fused LM head and distillation loss through softxent, process-wide, for trainers built
    before or after the call. Raises RuntimeError for a TRL version outside ``SUPPORTED_TRL`` (ImportError
    without TRL). Calling it again does nothing."""
    _check_version()
    for module_name, attribute, replacement in _PATCHES:
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):
            raise RuntimeError(
                f"trl: {module_name}.{attribute} not found: this TRL does not have the hook softxent replaces"
            )
        key = (module_name, attribute)
        if key not in _ORIGINALS:
            _ORIGINALS[key] = getattr(module, attribute)
        setattr(module, attribute, replacement)


def disable() -> None:
    """Put TRL's own kernels back (nothing to do when not enabled)."""
    for (module_name, attribute), original in list(_ORIGINALS.items()):
        setattr(importlib.import_module(module_name), attribute, original)
        del _ORIGINALS[(module_name, attribute)]


def enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return bool(_ORIGINALS)
