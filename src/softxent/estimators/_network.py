"""The model's parameters as plain functions of a name -> tensor dict: their shapes, their initialization,
the ReLU hidden layers' forward, the L2 penalty, and their numpy form (the estimators' coef_, intercept_,
hidden_coefs_, hidden_intercepts_).

The names, in layer order: ``hidden.k.weight`` (out, in) and ``hidden.k.bias`` (out,) for each hidden
layer k, then ``head.weight`` (n_outputs, last width) and ``head.bias`` (n_outputs,). The head itself (its
loss and gradient, the logits) is the estimators'.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


def parameter_shapes(n_features: int, sizes: Sequence[int], n_outputs: int) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter, in layer order: ``hidden.k.weight`` (out, in), ``hidden.k.bias``
    (out,), then ``head.weight`` (n_outputs, last width) and ``head.bias`` (n_outputs,)."""
    widths = [int(width) for width in (n_features, *sizes, n_outputs)]
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        name = f"hidden.{layer}" if layer < len(widths) - 2 else "head"
        shapes[f"{name}.weight"] = (fan_out, fan_in)
        shapes[f"{name}.bias"] = (fan_out,)
    return shapes


def init_parameters(sizes: tuple[int, ...], n_features: int, n_outputs: int, seed: int) -> dict[str, Tensor]:
    """Glorot-uniform hidden layers (and head, for a network); a zero head for the linear model, whose
    loss is convex so the start does not matter. float64, drawn on the CPU so that the device does not
    change the start."""
    generator = torch.Generator().manual_seed(seed)
    shapes = parameter_shapes(n_features, sizes, n_outputs)
    params: dict[str, Tensor] = {}
    for name, (fan_out, fan_in) in ((name, shape) for name, shape in shapes.items() if len(shape) == 2):
        layer = name.removesuffix(".weight")
        bound = math.sqrt(6.0 / (fan_in + fan_out)) if sizes else 0.0
        weight = torch.empty(fan_out, fan_in, dtype=torch.float64)
        weight.uniform_(-bound, bound, generator=generator)
        params[name] = weight
        params[f"{layer}.bias"] = torch.empty(fan_out, dtype=torch.float64).uniform_(
            -bound, bound, generator=generator
        )
    return params


def hidden(params: Mapping[str, Tensor], X: Tensor) -> Tensor:
    """h(x): the ReLU hidden layers applied to X ``(n, n_features)``; X itself for the linear model."""
    h = X
    layer = 0
    while f"hidden.{layer}.weight" in params:
        h = torch.relu(
            torch.nn.functional.linear(h, params[f"hidden.{layer}.weight"], params[f"hidden.{layer}.bias"])
        )
        layer += 1
    return h


def penalty(params: Mapping[str, Tensor], alpha: float) -> float:
    """α/2 · Σ ‖W‖² over the weight matrices; 0 without reading them when α = 0 (0 · inf would be nan
    and blame the loss for weights that overflowed)."""
    if not alpha:
        return 0.0
    with torch.no_grad():
        squares = sum(float(p.square().sum()) for name, p in params.items() if name.endswith(".weight"))
    return 0.5 * float(alpha) * squares


def to_arrays(
    params: Mapping[str, Tensor],
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Numpy copies of the parameters: (coef, intercept, hidden coefs, hidden intercepts), the head's
    weight and bias and the hidden layers' weights and biases in layer order (torch layout (out, in))."""
    numpy = {name: value.detach().cpu().numpy().copy() for name, value in params.items()}
    layers = sum(name.endswith(".weight") for name in numpy) - 1
    return (
        numpy["head.weight"],
        numpy["head.bias"],
        [numpy[f"hidden.{k}.weight"] for k in range(layers)],
        [numpy[f"hidden.{k}.bias"] for k in range(layers)],
    )


def from_arrays(
    coef: np.ndarray,
    intercept: np.ndarray,
    hidden_coefs: Sequence[np.ndarray],
    hidden_intercepts: Sequence[np.ndarray],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """The inverse of :func:`to_arrays`: the parameters on ``device`` in ``dtype`` (sharing memory with the
    arrays where device and dtype allow), the head first."""
    params = {"head.weight": coef, "head.bias": intercept}
    for layer, (weight, bias) in enumerate(zip(hidden_coefs, hidden_intercepts, strict=True)):
        params[f"hidden.{layer}.weight"] = weight
        params[f"hidden.{layer}.bias"] = bias
    return {name: torch.as_tensor(value).to(device, dtype) for name, value in params.items()}
