"""The estimators' argument and label checks (ValueError / TypeError saying expected vs got) and the small
helpers they share: values as shown in messages, the device, class sets and "balanced" weights."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.exceptions import DataConversionWarning
from sklearn.utils.multiclass import type_of_target


def shown(value: object) -> str:
    """``repr`` of ``value`` with NumPy scalars and arrays as plain Python values, for error messages
    (``2``, not ``np.int64(2)``; tuples stay tuples)."""
    return repr(_python(value))


def _python(value: object) -> object:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if type(value) in (tuple, list):
        return type(value)(_python(v) for v in value)
    if isinstance(value, dict):
        return {_python(k): _python(v) for k, v in value.items()}
    return value


def resolve_device(device: object) -> torch.device:
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device: expected 'cpu', 'cuda', 'auto' or a torch.device, got {shown(device)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device: expected 'cpu', 'cuda', 'auto' or a torch.device, got {shown(device)}"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {shown(device)} was asked for, but torch finds no CUDA device here")
    return resolved


def check_number(
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    kind = numbers.Integral if integer else numbers.Real
    what = "an int" if integer else "a number"
    bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high != math.inf else "")
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name}: expected {what} {bound}, got {shown(value)}")
    if not (low < value if low_open else low <= value) or not value < high or math.isnan(value):
        raise ValueError(f"{name}: expected {what} {bound}, got {shown(value)}")


def check_sample_weight(sample_weight: object, n_samples: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    weight = np.asarray(sample_weight, dtype=np.float64)
    if weight.ndim == 0:
        weight = np.full(n_samples, float(weight))
    if weight.shape != (n_samples,):
        raise ValueError(f"sample_weight: expected shape ({n_samples},), got {weight.shape}")
    if not np.isfinite(weight).all() or (weight < 0).any():
        raise ValueError("sample_weight: expected finite values >= 0, got a negative or non-finite value")
    return weight


def as_sizes(hidden_layer_sizes: object) -> object:
    """hidden_layer_sizes with one int as a one-layer tuple (anything else as given, for the checks)."""
    if isinstance(hidden_layer_sizes, numbers.Integral) and not isinstance(hidden_layer_sizes, bool):
        return (hidden_layer_sizes,)
    return hidden_layer_sizes


def check_labels(y: object) -> np.ndarray:
    """1-D class labels (a column vector is raveled with scikit-learn's DataConversionWarning)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        warnings.warn(
            "A column-vector y was passed when a 1d array was expected. Please change the shape of y to "
            "(n_samples,), for example using ravel().",
            DataConversionWarning,
            stacklevel=4,
        )
        y = y.ravel()
    kind = type_of_target(y, input_name="y")
    if kind not in ("binary", "multiclass"):
        raise ValueError(
            f"Unknown label type: {kind!r}. y: expected class labels (binary or multiclass), "
            f"got {kind} values"
        )
    return y


def classes_for(y: np.ndarray, classes: object, known: np.ndarray | None, *, partial: bool) -> np.ndarray:
    """The sorted class set: the known one (warm start, later partial_fit calls), ``classes``, or y's."""
    if known is not None:
        found = known
    elif classes is not None:
        found = np.unique(np.asarray(classes))
    elif partial:
        raise ValueError(
            "classes: expected the array of all class labels on the first call to partial_fit, got None"
        )
    else:
        found = np.unique(y)
    if len(found) < 2:
        raise ValueError(f"y: expected at least 2 classes, got 1 class ({shown(found[0])})")
    unseen = np.setdiff1d(np.unique(y), found)
    if unseen.size:
        raise ValueError(f"y: labels {unseen[:5].tolist()} are not in classes {found.tolist()}")
    return found


def balanced_weights(counts: np.ndarray) -> np.ndarray:
    """scikit-learn's "balanced" weights n / (K·n_c); a class with no samples yet gets 1."""
    total = counts.sum()
    return np.where(counts > 0, total / (len(counts) * np.maximum(counts, 1e-300)), 1.0)
