"""Model and checkpoint files: one safetensors file each, the tensors with JSON metadata in its header
(:func:`save_model`, :func:`load_model`, :func:`save_checkpoint`, :func:`load_checkpoint`), written
atomically and checked on reading (format, estimator, shapes, dtypes, finite values)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from softxent._files import atomic_path
from softxent.estimators._base import BaseClassifier
from softxent.estimators._checks import as_sizes, shown
from softxent.estimators._classifiers import SigmoidClassifier, SoftmaxClassifier
from softxent.estimators._format import (
    CHECKPOINT_FORMAT,
    MODEL_FORMAT,
    Checkpoint,
    check_tensors,
    params_from_json,
    params_to_json,
)
from softxent.estimators._network import parameter_shapes
from softxent.estimators._sgd import checkpoint_tensor_shapes

_ESTIMATORS = {cls.__name__: cls for cls in (SoftmaxClassifier, SigmoidClassifier)}


def _atomic_save(tensors: dict[str, Tensor], path: str | os.PathLike, header: dict[str, Any]) -> None:
    """Write a safetensors file through a temporary file and a rename (a crash leaves the old file or the
    new one, never half of one)."""
    contiguous = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    # serialized here and written by us: safetensors' save_file makes its file 0600, whatever the umask
    data = save(contiguous, metadata={"softxent": json.dumps(header)})
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def _read(path: str | os.PathLike, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        return tensors, json.loads(header["softxent"])
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{path}: not a readable softxent {what} file ({type(error).__name__}: {error})"
        ) from None


def save_model(
    estimator: BaseClassifier, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> None:
    """Write a fitted estimator to one safetensors file (weights) with JSON metadata in its header
    (class, parameters, classes, feature names, loss curve, softxent version and your ``metadata``)."""
    from importlib.metadata import version

    check_is_fitted(estimator)
    classes = estimator.classes_.tolist()
    if not all(isinstance(label, (str, int, float)) for label in classes):  # the header is JSON
        kinds = sorted({type(label).__name__ for label in classes})
        raise ValueError(
            "estimator: expected classes_ of numbers, booleans or strings to save, got "
            f"{', '.join(kinds)} classes; fit on labels converted with y.astype(str)"
        )
    dtype = torch.float64 if estimator.coef_.dtype == np.float64 else torch.float32
    fitted = {
        "classes": classes,
        "n_features_in": int(estimator.n_features_in_),
        "feature_names_in": getattr(estimator, "feature_names_in_", np.array([])).tolist() or None,
        "n_iter": int(estimator.n_iter_),
        "t": int(estimator.t_),
        "loss_curve": list(estimator.loss_curve_),
        "validation_scores": estimator.validation_scores_,
        "target_type": getattr(estimator, "target_type_", None),
        "solver": getattr(estimator, "solver_", None),
    }
    header = {
        "format": MODEL_FORMAT,
        "softxent_version": version("softxent"),
        "estimator": type(estimator).__name__,
        "params": params_to_json(estimator.get_params()),
        "fitted": fitted,
        "metadata": metadata,
    }
    _atomic_save(estimator._fitted_parameters(torch.device("cpu"), dtype), path, header)


def load_model(path: str | os.PathLike) -> tuple[BaseClassifier, dict[str, Any] | None]:
    """Read a file written by :func:`save_model`: returns (fitted estimator, your metadata)."""
    tensors, header = _read(path, "model")
    try:
        if header["format"] != MODEL_FORMAT:
            raise ValueError(f"format {header['format']!r}")
        estimator = _ESTIMATORS[header["estimator"]](**params_from_json(header["params"]))
        fitted = header["fitted"]
        estimator.classes_ = np.asarray(fitted["classes"])
        estimator.n_features_in_ = int(fitted["n_features_in"])
        if fitted["feature_names_in"] is not None:
            estimator.feature_names_in_ = np.asarray(fitted["feature_names_in"], dtype=object)
        estimator.n_iter_ = int(fitted["n_iter"])
        estimator.t_ = int(fitted["t"])
        estimator.loss_curve_ = list(fitted["loss_curve"])
        estimator.validation_scores_ = fitted["validation_scores"]
        if fitted["target_type"] is not None:
            estimator.target_type_ = fitted["target_type"]
        if fitted.get("solver") is not None:  # files before the lbfgs solver have none
            estimator.solver_ = fitted["solver"]
        _check_fitted_header(estimator)
        sizes = as_sizes(estimator.hidden_layer_sizes)
        check_tensors(tensors, parameter_shapes(estimator.n_features_in_, sizes, estimator._n_outputs()))
        estimator._export(tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{os.fspath(path)}: not a valid softxent model file ({error})") from None
    return estimator, header["metadata"]


def _check_fitted_header(estimator: BaseClassifier) -> None:
    """The fitted attributes load_model read from a header, checked before the tensors are matched to them."""
    if len(estimator.classes_) < 2:
        raise ValueError(f"classes: expected at least 2, got {estimator.classes_.tolist()}")
    if estimator.n_features_in_ < 1:
        raise ValueError(f"n_features_in: expected an int >= 1, got {estimator.n_features_in_}")
    names = getattr(estimator, "feature_names_in_", None)
    if names is not None and len(names) != estimator.n_features_in_:
        raise ValueError(
            f"feature_names_in: expected {estimator.n_features_in_} names (one per feature), got {len(names)}"
        )
    kinds = ("binary", "multiclass", "multilabel-indicator")
    solver = getattr(estimator, "solver_", "sgd")
    if solver not in ("sgd", "lbfgs"):
        raise ValueError(f"solver: expected 'sgd' or 'lbfgs', got {shown(solver)}")
    target_type = getattr(estimator, "target_type_", None)
    if isinstance(estimator, SigmoidClassifier) and target_type not in kinds:
        raise ValueError(f"target_type: expected one of {kinds}, got {shown(target_type)}")


def save_checkpoint(
    checkpoint: Checkpoint, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> None:
    """Write a :class:`Checkpoint` (and your JSON-serializable ``metadata``) atomically to one file."""
    _atomic_save(checkpoint.tensors, path, {"checkpoint": checkpoint.info, "metadata": metadata})


def load_checkpoint(path: str | os.PathLike) -> tuple[Checkpoint, dict[str, Any] | None]:
    """Read a file written by :func:`save_checkpoint`: returns (checkpoint, your metadata)."""
    tensors, header = _read(path, "checkpoint")
    if (
        not isinstance(header.get("checkpoint"), dict)
        or header["checkpoint"].get("format") != CHECKPOINT_FORMAT
    ):
        raise ValueError(f"{os.fspath(path)}: not a softxent checkpoint file")
    info = header["checkpoint"]
    try:
        check_tensors(tensors, _checkpoint_shapes(info, tensors))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{os.fspath(path)}: not a valid softxent checkpoint file ({error})") from None
    return Checkpoint(tensors, info), header["metadata"]


def _checkpoint_shapes(info: dict[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint with this ``info`` must hold, with their shapes. The outputs are the
    classes, except that a SigmoidClassifier with two classes has one (a binary target) or two (a
    two-label indicator matrix), which the info does not record: the stored head tells which."""
    if info.get("estimator") not in _ESTIMATORS:
        raise ValueError(
            f"estimator: expected one of {sorted(_ESTIMATORS)}, got {shown(info.get('estimator'))}"
        )
    n_outputs = len(info["classes"])
    head = tensors.get("param/head.bias")
    binary = head is not None and tuple(head.shape) == (1,)
    if info["estimator"] == "SigmoidClassifier" and n_outputs == 2 and binary:
        n_outputs = 1
    sizes = as_sizes(params_from_json(info["params"])["hidden_layer_sizes"])
    shapes = parameter_shapes(int(info["n_features"]), sizes, n_outputs)
    return checkpoint_tensor_shapes(shapes, tensors)
