"""What model and checkpoint files hold, apart from reading and writing them (``_files``): the format tags,
the :class:`Checkpoint` record, the estimators' parameters in JSON form and the check of stored tensors.
The estimators use these too (``checkpoint()``, ``fit(resume=...)``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

MODEL_FORMAT = "softxent-model/1"
CHECKPOINT_FORMAT = "softxent-checkpoint/1"


@dataclasses.dataclass
class Checkpoint:
    """The complete training state of a fit after one epoch: enough to continue it exactly.

    ``tensors`` holds the parameters, the momentum buffers and (with early stopping) the best parameters
    so far, on the CPU; ``info`` the JSON-serializable rest: estimator class and parameters, epoch,
    optimizer step, seed, stopping counters, loss curve. Get one from ``estimator.checkpoint()`` inside a
    ``fit`` callback; continue with ``estimator.fit(X, y, resume=checkpoint)`` on the same data.
    """

    tensors: dict[str, Tensor]
    info: dict[str, Any]


def params_to_json(params: dict[str, Any]) -> dict[str, Any]:
    """get_params() in JSON form (tuples as lists, dicts as [key, value] pairs, arrays as lists)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            value = {"__pairs__": [[_plain(k), _plain(v)] for k, v in value.items()]}
        elif isinstance(value, np.random.RandomState):
            value = None
        elif isinstance(value, torch.device):
            value = str(value)
        else:
            value = _plain(value)
        out[key] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def params_from_json(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and "__pairs__" in value:
            value = {k: v for k, v in value["__pairs__"]}
        elif key == "hidden_layer_sizes" and isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def check_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Check that ``tensors`` holds exactly the names of ``expected``, each with its shape, all of one dtype
    (float32 or float64) and all finite; a ValueError names the first offending tensor, expected vs got."""
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"tensor {name!r}: expected one of shape {shape}, got none")
    for name in tensors:
        if name not in expected:
            raise ValueError(f"tensor {name!r}: expected only the tensors {list(expected)}, got this one too")
    first = next(iter(expected))
    dtype = tensors[first].dtype
    for name, shape in expected.items():
        tensor = tensors[name]
        if tensor.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"tensor {name!r}: expected dtype torch.float32 or torch.float64, got {tensor.dtype}"
            )
        if tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r}: expected dtype {dtype} (as {first!r}), got {tensor.dtype}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: expected shape {shape}, got {tuple(tensor.shape)}")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"tensor {name!r}: expected finite values, got {bad} inf or nan")
