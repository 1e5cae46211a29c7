"""Shared argument checks: every failure is a ValueError or TypeError that names the argument and says
what was expected and what was given."""

from __future__ import annotations

import math
import numbers
import operator
import warnings

import torch
from torch.nn import _reduction as legacy_reduction

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")
MEMORY_MODES = ("speed", "lean", "auto")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value: object) -> torch.Tensor:
    tensor = check_tensor(name, value)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a float32, float16, bfloat16 or float64 tensor, got {tensor.dtype}"
        )
    return tensor


def check_reduction(reduction: object) -> str:
    """ "mean", "sum" or "none"; torch's deprecated "elementwise_mean" is "mean", with torch's warning."""
    if reduction == "elementwise_mean":
        if not torch.compiler.is_compiling():  # Dynamo does not trace warnings.warn; eager warns
            warnings.warn(
                "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
                stacklevel=3,
            )
        return "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_reduction_legacy(size_average: bool | None, reduce: bool | None, reduction: object) -> str:
    """torch's deprecated size_average/reduce pair, when given, decides the reduction (as in torch)."""
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction.legacy_get_string(size_average, reduce)
    return check_reduction(reduction)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_impl(impl: object) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return impl  # type: ignore[return-value]


def check_memory(memory: object) -> str:
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory: expected 'speed', 'lean' or 'auto', got {memory!r}")
    return memory  # type: ignore[return-value]


def check_label_smoothing(label_smoothing: object) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing: expected a float in [0, 1], got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing}")
    return float(label_smoothing)


def check_z_loss(z_loss: object) -> float:
    if isinstance(z_loss, bool) or not isinstance(z_loss, numbers.Real):
        raise TypeError(f"z_loss: expected a finite float >= 0, got {type(z_loss).__name__}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss: expected a finite float >= 0, got {z_loss}")
    return float(z_loss)


def check_softcap(softcap: object, name: str = "softcap") -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{name}: expected None or a finite float > 0, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{name}: expected None or a finite float > 0, got {softcap}")
    return float(softcap)


def check_temperature(temperature: object) -> float:
    """A sampling temperature: a finite real number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a float > 0, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature}")
    return float(temperature)


def check_logit_scale(name: str, logit_scale: object) -> float:
    """A factor the logits are multiplied by: a finite real number."""
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(logit_scale).__name__}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"{name}: expected a finite float, got {logit_scale}")
    return float(logit_scale)


def check_ignore_index(ignore_index: object) -> int:
    """An int, or what torch takes for one (a NumPy integer, a 0-d integer tensor); not a bool."""
    if not isinstance(ignore_index, bool):
        try:
            return operator.index(ignore_index)
        except TypeError:
            pass
    raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")


def check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected None or a positive int, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: expected None or a positive int, got {chunk_size}")
    return chunk_size


def check_no_grad(name: str, value: torch.Tensor, why: str = "") -> None:
    """``value`` must not require grad (torch refuses it where the loss is not differentiable in it)."""
    if value.requires_grad:
        raise ValueError(
            f"{name}: expected a tensor that does not require grad (the loss is not differentiable with "
            f"respect to {name}{why}), got one with requires_grad=True"
        )


def check_class_weight(weight: object, num_classes: int, device: torch.device) -> torch.Tensor | None:
    """``weight``: None or a (C,) floating tensor of per-class weights on ``device`` (any values: torch
    takes negative and infinite weights too)."""
    if weight is None:
        return None
    weight = check_float_tensor("weight", weight)
    if _shape(weight) != (num_classes,):
        raise ValueError(
            f"weight: expected shape ({num_classes},) (one weight per class), got {_shape(weight)}"
        )
    if weight.device != device:
        raise ValueError(f"weight: expected a tensor on {device}, got one on {weight.device}")
    return weight


# Class-index dtypes: torch's int64 and uint8, and int32 (which torch refuses; softxent takes it as int64).
CLASS_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


def check_class_target(
    target: torch.Tensor, expected_shape: tuple[int, ...], input_shape: tuple[int, ...]
) -> None:
    """Class-index targets: int64, int32 or uint8, of the input's shape minus the class dimension."""
    if target.dtype not in CLASS_INDEX_DTYPES:
        raise TypeError(
            f"target: expected class indices (int64, int32 or uint8) of shape {expected_shape} or floating "
            f"class probabilities of shape {input_shape}, got {target.dtype} of shape {_shape(target)}"
        )
    if _shape(target) != expected_shape:
        raise ValueError(
            f"target: expected class indices of shape {expected_shape} (the input's shape without the class "
            f"dimension) or probabilities of shape {input_shape}, got shape {_shape(target)}"
        )


def check_no_ignore_index(ignore_index: int) -> None:
    """Probability targets have no class index to ignore: as torch, a non-negative ignore_index is refused
    with them (the default -100, or any negative value, is not an index)."""
    if ignore_index >= 0:
        raise ValueError(
            "ignore_index: expected a negative value (the default -100) with class-probability targets, "
            f"which have no class index to ignore, got {ignore_index}"
        )


def check_class_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Class indices in [0, C) or equal to ignore_index: a host read, so checked on CPU tensors only."""
    if target.device.type == "cpu" and target.numel() > 0:
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(
                f"target: expected class indices in [0, {num_classes}) or ignore_index="
                f"{ignore_index}, got {value}"
            )


def check_same_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
