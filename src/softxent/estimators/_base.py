r"""scikit-learn classifiers trained by minibatch SGD on softxent's fused losses.

:class:`SoftmaxClassifier` is true multinomial softmax regression: one linear map z = Wx + b to all
classes at once, ŷ = softmax(z), trained on the cross-entropy with the gradient

.. math::
    \frac{∂ℓ}{∂W} = (ŷ - y)\,x^\top, \qquad \frac{∂ℓ}{∂b} = ŷ - y,

which :func:`softxent.linear_cross_entropy` produces in its forward pass. scikit-learn's ``SGDClassifier``
offers only one-vs-rest for several classes. :class:`SigmoidClassifier` puts one sigmoid and one binary
cross-entropy on each label (multi-label problems, gradient σ(z) − y) on
:func:`softxent.linear_binary_cross_entropy`. With ``hidden_layer_sizes`` both become a small ReLU network
under the same loss.

Both minimize, over minibatches B of the training set,

.. math::
    \frac{1}{|B|\,\bar s} \sum_{i \in B} s_i\,ℓ_i + \frac{α}{2} \sum_{\text{weights}} \|W\|^2

(s_i: sample weight times class weight, s̄ their mean over the training set, so that the objective is the
weighted mean and the step size does not depend on the scale of the weights; biases are not penalized)
with SGD and momentum, a learning-rate schedule and scikit-learn's stopping rules.

``fit`` and ``partial_fit`` train data-parallel when torch.distributed is initialized (under torchrun, or
in processes started by :func:`softxent.distributed.launch`) or when given a ``process_group``: every rank
passes the whole data, trains on its share of every minibatch, and one all-reduce per step sums the
gradients, so all ranks end with the same model as one process with the same batch size (within float
rounding); see :mod:`softxent.distributed._data_parallel`.

``save_model``/``load_model`` write and read a fitted estimator as one safetensors file with JSON metadata
in its header; ``Checkpoint``, ``save_checkpoint`` and ``load_checkpoint`` let a long fit resume after an
interruption.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import math
import numbers
import os
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning, DataConversionWarning
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data
from torch import Tensor
from torch.optim.sgd import sgd

from softxent._files import atomic_path
from softxent.distributed._data_parallel import ReplicaGroup, all_reduce_sum, sum_gradients
from softxent.functional import linear_binary_cross_entropy, linear_cross_entropy

__all__ = [
    "Checkpoint",
    "DivergenceWarning",
    "SigmoidClassifier",
    "SoftmaxClassifier",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "save_model",
]

LEARNING_RATES = ("constant", "invscaling", "cosine")
# Rows per chunk when predicting, so that a large X never becomes one large dense tensor.
PREDICT_CHUNK_ROWS = 65536
# A fit has diverged (ConvergenceWarning) when its last epoch's loss is over DIVERGENCE_RISE times the best
# epoch's and DIVERGENCE_CHANCE times the loss of all-zero logits (see _SGDClassifier._warn_if_diverged).
DIVERGENCE_RISE = 2.0
DIVERGENCE_CHANCE = 10.0
MODEL_FORMAT = "softxent-model/1"
CHECKPOINT_FORMAT = "softxent-checkpoint/1"

EpochCallback = Callable[["_SGDClassifier", dict[str, Any]], bool | None]


class DivergenceWarning(ConvergenceWarning):
    """Training diverged without overflowing: the last epoch's loss is far above the run's best (see
    ``fit``). A ConvergenceWarning, so filters for scikit-learn's warning catch it too."""


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


@dataclasses.dataclass
class _Data:
    """Training rows on the device: X dense (n, D) or scipy CSR; target (n,) int64 class indices or
    (n, K) floats; optional sample weights (n,)."""

    X: Tensor | sp.csr_matrix
    target: Tensor
    sample_weight: Tensor | None
    device: torch.device
    dtype: torch.dtype
    _buffer: Tensor | None = None

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def batch(self, rows: np.ndarray | slice) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rows of X (dense, on the device), of the target and of the sample weights.

        Shuffled rows of a dense X are gathered into one reused buffer: a fresh tensor per step costs
        its page faults again every time (4× slower on CPU). The buffer is free again by the next
        step, since the step's backward has run by then.
        """
        if isinstance(rows, slice):
            X = self.X[rows] if isinstance(self.X, Tensor) else self._densify(self.X[rows])
            weight = None if self.sample_weight is None else self.sample_weight[rows]
            return X, self.target[rows], weight
        index = torch.from_numpy(rows).to(self.device)
        if isinstance(self.X, Tensor):
            if self._buffer is None or self._buffer.shape[0] < len(rows):
                self._buffer = self.X.new_empty(len(rows), self.X.shape[1])
            X = torch.index_select(self.X, 0, index, out=self._buffer[: len(rows)])
        else:
            X = self._densify(self.X[rows])
        weight = None if self.sample_weight is None else self.sample_weight.index_select(0, index)
        return X, self.target.index_select(0, index), weight

    def _densify(self, rows: sp.csr_matrix) -> Tensor:
        return torch.from_numpy(rows.toarray()).to(self.device, self.dtype)


def _to_tensor(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A numpy array as a tensor on ``device``, sharing memory where it can (copying a read-only buffer)."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    tensor = torch.from_numpy(array)
    return tensor.to(device=device, dtype=dtype or tensor.dtype)


def _shown(value: object) -> str:
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


def _resolve_device(device: object) -> torch.device:
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device: expected 'cpu', 'cuda', 'auto' or a torch.device, got {_shown(device)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device: expected 'cpu', 'cuda', 'auto' or a torch.device, got {_shown(device)}"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {_shown(device)} was asked for, but torch finds no CUDA device here")
    return resolved


def _check_number(
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
        raise TypeError(f"{name}: expected {what} {bound}, got {_shown(value)}")
    if not (low < value if low_open else low <= value) or not value < high or math.isnan(value):
        raise ValueError(f"{name}: expected {what} {bound}, got {_shown(value)}")


def _check_sample_weight(sample_weight: object, n_samples: int) -> np.ndarray | None:
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


def _unchanged_on_error(method: Callable[..., _SGDClassifier]) -> Callable[..., _SGDClassifier]:
    """Make ``fit``/``partial_fit`` all or nothing: when the call raises an Exception (invalid input,
    divergence, a callback's exception), the estimator's fitted and private attributes are put back as
    they were before it (unfitted if it was), as deep copies taken on entry, since training updates
    tensors and arrays in place. A KeyboardInterrupt is not an Exception: it leaves the weights of the
    last completed epoch, as scikit-learn's MLPClassifier does."""

    @functools.wraps(method)
    def call(self: _SGDClassifier, *args: Any, **kwargs: Any) -> _SGDClassifier:
        params = set(self._get_param_names())
        saved = {name: copy.deepcopy(value) for name, value in vars(self).items() if name not in params}
        try:
            return method(self, *args, **kwargs)
        except Exception:
            for name in [name for name in vars(self) if name not in params]:
                delattr(self, name)
            vars(self).update(saved)
            raise

    return call


def _as_sizes(hidden_layer_sizes: object) -> object:
    """hidden_layer_sizes with one int as a one-layer tuple (anything else as given, for the checks)."""
    if isinstance(hidden_layer_sizes, numbers.Integral) and not isinstance(hidden_layer_sizes, bool):
        return (hidden_layer_sizes,)
    return hidden_layer_sizes


def _parameter_shapes(n_features: int, sizes: Sequence[int], n_outputs: int) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter, in layer order: ``hidden.k.weight`` (out, in), ``hidden.k.bias``
    (out,), then ``head.weight`` (n_outputs, last width) and ``head.bias`` (n_outputs,)."""
    widths = [int(width) for width in (n_features, *sizes, n_outputs)]
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        name = f"hidden.{layer}" if layer < len(widths) - 2 else "head"
        shapes[f"{name}.weight"] = (fan_out, fan_in)
        shapes[f"{name}.bias"] = (fan_out,)
    return shapes


def _with_training_state(shapes: Mapping[str, tuple[int, ...]], names: object) -> dict[str, tuple[int, ...]]:
    """The tensors of a checkpoint whose parameters have ``shapes``: ``param/<name>`` for each, and
    ``momentum/<name>`` and ``best/<name>`` for each or for none (as ``names``, the stored ones, have)."""
    expected = {f"param/{name}": shape for name, shape in shapes.items()}
    for group in ("momentum", "best"):
        if any(str(name).startswith(f"{group}/") for name in names):
            expected.update({f"{group}/{name}": shape for name, shape in shapes.items()})
    return expected


def _check_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
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


class _SGDClassifier(ClassifierMixin, BaseEstimator):
    """Shared SGD machinery; the subclasses say how targets are encoded and which loss the head uses."""

    _estimator_name: ClassVar[str]

    # --- parameter checks --------------------------------------------------------------------------

    def _check_params(self) -> tuple[tuple[int, ...], torch.device]:
        """Validate the constructor's parameters (scikit-learn convention: in fit, not in __init__)."""
        sizes = _as_sizes(self.hidden_layer_sizes)
        if not isinstance(sizes, Sequence) or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in sizes
        ):
            raise ValueError(
                "hidden_layer_sizes: expected a tuple of positive ints (() for the linear model), "
                f"got {_shown(sizes)}"
            )
        _check_number("alpha", self.alpha, low=0.0)
        if self.learning_rate not in LEARNING_RATES:
            raise ValueError(
                f"learning_rate: expected one of {LEARNING_RATES}, got {_shown(self.learning_rate)}"
            )
        _check_number("eta0", self.eta0, low=0.0, low_open=True)
        _check_number("power_t", self.power_t, low=0.0)
        _check_number("momentum", self.momentum, low=0.0, high=1.0)
        if not isinstance(self.nesterov, bool | np.bool_):
            raise TypeError(f"nesterov: expected a bool, got {_shown(self.nesterov)}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0")
        if self.batch_size != "auto":
            _check_number("batch_size", self.batch_size, low=1, integer=True)
        _check_number("max_iter", self.max_iter, low=1, integer=True)
        if self.tol is not None:
            _check_number("tol", self.tol, low=-math.inf)
        _check_number("n_iter_no_change", self.n_iter_no_change, low=1, integer=True)
        _check_number("validation_fraction", self.validation_fraction, low=0.0, high=1.0, low_open=True)
        _check_number("verbose", self.verbose, low=0, integer=True)
        return tuple(int(s) for s in sizes), _resolve_device(self.device)

    # --- subclass hooks ------------------------------------------------------------------------------

    def _encode_target(
        self, y: object, classes: object, first_call: bool, partial: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sets classes_ (and the subclass's target attributes); returns (target, stratify): target (n,)
        int64 class indices or (n, K) float64; stratify (n,) labels for the validation split."""
        raise NotImplementedError

    def _target_weights(self, target: np.ndarray, sample_weight: np.ndarray | None) -> Tensor | None:
        """Per-output loss weights (class weights / pos_weight) as a tensor, from the training targets."""
        raise NotImplementedError

    def _head_loss(
        self, h: Tensor, weight: Tensor, bias: Tensor, target: Tensor, sw: Tensor | None
    ) -> Tensor:
        """Σ_i s_i·ℓ_i over the batch (reduction "sum") through softxent's fused linear head."""
        raise NotImplementedError

    def _running_counts(self, counts: np.ndarray) -> np.ndarray:
        """The label counts behind "balanced" weights: this data's, plus those of the earlier
        partial_fit calls (fit starts afresh)."""
        if self._partial and self._counts is not None:
            counts = counts + self._counts
        self._counts = counts
        return counts

    def _row_weights(self, target: np.ndarray, sample_weight: np.ndarray | None) -> np.ndarray | None:
        """s_i, the weight each row's loss carries (None: all 1)."""
        return sample_weight

    def _mean_row_weight(self, target: np.ndarray, sample_weight: np.ndarray | None) -> float:
        """The mean s̄ of the row weights over the data of this fit (or partial_fit call). Each step
        divides its weighted loss sum by |B|·s̄: the objective is the weighted mean, as in torch, so the
        step size does not grow with the scale of the weights (a class weight of 1000 would otherwise
        make SGD diverge), while the relative weights are kept exactly."""
        weights = self._row_weights(target, sample_weight)
        if weights is None:
            return 1.0
        mean = float(np.mean(weights))
        if not mean > 0:
            raise ValueError(
                "sample_weight: expected at least one sample with a positive weight (after class weights), "
                "got all zero"
            )
        return mean

    def _n_outputs(self) -> int:
        raise NotImplementedError

    def _chance_loss(self, target: np.ndarray, sample_weight: np.ndarray | None) -> float:
        """The training objective's data term at all-zero logits (a yardstick of divergence). Called
        after _target_weights, with self._loss_weight still on the CPU."""
        raise NotImplementedError

    def _divergence_advice(self) -> str:
        return (
            "the features may need scaling (e.g. sklearn.preprocessing.StandardScaler) or a smaller eta0 "
            f"(now {_shown(self.eta0)})"
        )

    def _check_finite(self, loss: float, params: dict[str, Tensor], epoch: int) -> None:
        """Raise ValueError when the loss of ``epoch`` (1-based) or a parameter is inf or nan."""
        prefix = f"{type(self).__name__}: training diverged at epoch {epoch}"
        advice = f"{self._divergence_advice()}; the estimator is left as it was before this call"
        if not math.isfinite(loss):
            raise ValueError(f"{prefix}: the loss became {loss}; {advice}")
        with torch.no_grad():
            finite = bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all())
        if not finite:
            raise ValueError(f"{prefix}: the weights became inf or nan; {advice}")

    def _warn_if_diverged(self) -> None:
        """Warn (ConvergenceWarning) when the last epoch, whose weights the estimator keeps, ended far above
        the run's best: its loss_curve_ value over DIVERGENCE_RISE times min(loss_curve_) and
        DIVERGENCE_CHANCE times the loss of all-zero logits.

        The rule judges the model handed back, not the path to it: on unscaled features SGD's epoch
        losses jump by several times and then settle (raw breast-cancer or digits features end at their
        best epoch), while a fit that diverged ends, by the stopping rule or max_iter, on a loss several
        times its best (unscaled wine: 3.5 to 16 times over 25 seeds). The floor of 10 times log K
        (softmax) keeps the small losses of a well-fitted model from counting as a rise. A warning, not an
        error: the weights are finite and scikit-learn's own checks fit features of mean 100 to random
        labels and expect a model back.
        """
        loss, best = self.loss_curve_[-1], min(self.loss_curve_)
        if loss > max(DIVERGENCE_RISE * best, DIVERGENCE_CHANCE * self._chance):
            warnings.warn(
                f"{type(self).__name__}: training diverged: the loss of the last epoch ({self.n_iter_}) is "
                f"{loss:.4g}, over {DIVERGENCE_RISE:g} times the best epoch's {best:.4g} (epoch "
                f"{self.loss_curve_.index(best) + 1}) and {DIVERGENCE_CHANCE:g} times {self._chance:.4g}, "
                f"the loss of all-zero logits; {self._divergence_advice()}",
                DivergenceWarning,
                stacklevel=4,
            )

    # --- the model ---------------------------------------------------------------------------------

    def _init_parameters(self, sizes: tuple[int, ...], n_features: int, seed: int) -> dict[str, Tensor]:
        """Glorot-uniform hidden layers (and head, for a network); a zero head for the linear model, whose
        loss is convex so the start does not matter. Drawn on the CPU so that the device does not change
        the start."""
        generator = torch.Generator().manual_seed(seed)
        shapes = _parameter_shapes(n_features, sizes, self._n_outputs())
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

    @staticmethod
    def _hidden(params: dict[str, Tensor], X: Tensor) -> Tensor:
        h = X
        layer = 0
        while f"hidden.{layer}.weight" in params:
            h = torch.relu(
                torch.nn.functional.linear(
                    h, params[f"hidden.{layer}.weight"], params[f"hidden.{layer}.bias"]
                )
            )
            layer += 1
        return h

    def _fitted_parameters(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        params = {"head.weight": self.coef_, "head.bias": self.intercept_}
        for layer, (weight, bias) in enumerate(zip(self.hidden_coefs_, self.hidden_intercepts_, strict=True)):
            params[f"hidden.{layer}.weight"] = weight
            params[f"hidden.{layer}.bias"] = bias
        return {name: torch.as_tensor(value).to(device, dtype) for name, value in params.items()}

    def _export(self, params: dict[str, Tensor]) -> None:
        """Copy the training tensors into the public numpy attributes (coef_, intercept_, hidden_*)."""
        numpy = {name: value.detach().cpu().numpy().copy() for name, value in params.items()}
        self.coef_ = numpy["head.weight"]
        self.intercept_ = numpy["head.bias"]
        layers = sum(name.endswith(".weight") for name in numpy) - 1
        self.hidden_coefs_ = [numpy[f"hidden.{k}.weight"] for k in range(layers)]
        self.hidden_intercepts_ = [numpy[f"hidden.{k}.bias"] for k in range(layers)]

    # --- data --------------------------------------------------------------------------------------

    def _validate_X(self, X: object, reset: bool) -> np.ndarray | sp.csr_matrix:
        return validate_data(self, X, reset=reset, accept_sparse="csr", dtype=[np.float64, np.float32])

    def _decision(self, X: object) -> Tensor:
        """Logits (n, K) of X under the fitted parameters, on the CPU, computed in chunks of rows."""
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        device = _resolve_device(self.device)
        dtype = torch.float64 if self.coef_.dtype == np.float64 else torch.float32
        params = self._fitted_parameters(device, dtype)
        out = []
        with torch.no_grad():
            for start in range(0, X.shape[0], PREDICT_CHUNK_ROWS):
                rows = X[start : start + PREDICT_CHUNK_ROWS]
                rows = rows.toarray() if sp.issparse(rows) else rows
                h = self._hidden(params, _to_tensor(np.asarray(rows), device, dtype))
                out.append(torch.nn.functional.linear(h, params["head.weight"], params["head.bias"]).cpu())
        return torch.cat(out) if out else torch.empty(0, self._n_outputs(), dtype=dtype)

    # --- training ----------------------------------------------------------------------------------

    def _learning_rate(self, step: int, progress: float) -> float:
        """η at optimizer step ``step`` (0-based); ``progress`` is the planned training done, in [0, 1].

        constant: η₀; invscaling: η₀ / (step + 1)^power_t; cosine: η₀·(1 + cos(π·progress))/2.
        """
        if self.learning_rate == "constant":
            return float(self.eta0)
        if self.learning_rate == "invscaling":
            return float(self.eta0) / (step + 1) ** float(self.power_t)
        return float(self.eta0) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def _sgd_step(self, params: dict[str, Tensor], lr: float) -> None:
        """One step of torch's SGD (torch.optim.sgd.sgd, the functional form of torch.optim.SGD) with
        weight decay α on the weight matrices only; the momentum buffers live in ``self._momentum``.

        The functional form, not the class: constructing torch.optim.SGD imports torch._dynamo, 2 s of
        start-up for every fit in a fresh process.
        """
        with torch.no_grad():
            for suffix, decay in ((".weight", float(self.alpha)), (".bias", 0.0)):
                names = [name for name in params if name.endswith(suffix)]
                buffers = [self._momentum.get(name) for name in names]
                sgd(
                    [params[name] for name in names],
                    [params[name].grad for name in names],
                    buffers,
                    weight_decay=decay,
                    momentum=float(self.momentum),
                    lr=lr,
                    dampening=0.0,
                    nesterov=bool(self.nesterov),
                    maximize=False,
                )
                for name, buffer in zip(names, buffers, strict=True):
                    params[name].grad = None
                    if buffer is not None:
                        self._momentum[name] = buffer

    def _run_epoch(
        self,
        data: _Data,
        params: dict[str, Tensor],
        epoch: int,
        planned_epochs: int,
        replicas: ReplicaGroup,
    ) -> float:
        """One pass over ``data``; returns the epoch's mean weighted data loss (one host read).

        Each step's gradient is that of Σ_{i ∈ B} s_i·ℓ_i / (|B|·s̄) over the batch B. Data-parallel (P =
        ``replicas.size`` > 1), every rank draws the same batches, takes the gradient over its own share
        B_r of each (still divided by the whole |B|·s̄) and one all-reduce sums the P gradients and loss
        sums: every rank gets the one-process gradient of B and takes the same step. A rank whose share
        is empty (|B| < P) contributes zeros.
        """
        n = data.n
        batch_size = self._batch_size(n)
        order = np.random.default_rng([self._seed, epoch]).permutation(n) if self.shuffle else None
        starts = range(0, n, batch_size)
        total = torch.zeros((), dtype=data.dtype, device=data.device)
        for index, start in enumerate(starts):
            stop = min(start + batch_size, n)
            low, high = replicas.share(start, stop)
            lr = self._learning_rate(self.t_, (epoch + index / len(starts)) / planned_epochs)
            if high > low:
                X, target, sample_weight = data.batch(slice(low, high) if order is None else order[low:high])
                h = self._hidden(params, X)
                loss_sum = self._head_loss(
                    h, params["head.weight"], params["head.bias"], target, sample_weight
                )
                (loss_sum / ((stop - start) * self._weight_mean)).backward()
                loss_sum = loss_sum.detach()
            else:
                loss_sum = torch.zeros((), dtype=data.dtype, device=data.device)
            if replicas.size > 1:
                (loss_sum,) = sum_gradients(params.values(), loss_sum, group=replicas.group)
            self._sgd_step(params, lr)
            total += loss_sum
            self.t_ += 1
        self._last_lr = lr
        return float(total) / (n * self._weight_mean)

    def _batch_size(self, n_samples: int) -> int:
        """Rows per step: ``batch_size``, or for "auto" n/32 clipped to [128, 4096] (at least 32 steps an
        epoch on large data, batches big enough to keep the matmuls efficient), never more than n."""
        if self.batch_size == "auto":
            return min(n_samples, max(128, min(4096, n_samples // 32)))
        return min(int(self.batch_size), n_samples)

    def _penalty(self, params: dict[str, Tensor]) -> float:
        """α/2 · Σ ‖W‖² over the weight matrices; 0 without reading them when α = 0 (0 · inf would be nan
        and blame the loss for weights that overflowed)."""
        if not self.alpha:
            return 0.0
        with torch.no_grad():
            squares = sum(float(p.square().sum()) for name, p in params.items() if name.endswith(".weight"))
        return 0.5 * float(self.alpha) * squares

    def _prepare(
        self, X: object, y: object, sample_weight: object, *, classes: object, reset: bool, partial: bool
    ) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray | None]:
        if y is None:
            raise ValueError(f"y: {type(self).__name__} requires y to be passed, but the target y is None")
        X = self._validate_X(X, reset=reset)
        self._partial = partial
        if reset or not hasattr(self, "_counts"):  # a new fit, or the first partial_fit after load_model
            self._counts = None
        target, stratify = self._encode_target(y, classes, first_call=reset, partial=partial)
        if target.shape[0] != X.shape[0]:
            raise ValueError(f"y: expected {X.shape[0]} rows (one per sample of X), got {target.shape[0]}")
        return X, target, stratify, _check_sample_weight(sample_weight, X.shape[0])

    def _to_data(
        self,
        X: np.ndarray | sp.csr_matrix,
        target: np.ndarray,
        sample_weight: np.ndarray | None,
        device: torch.device,
    ) -> _Data:
        dtype = torch.float32 if X.dtype == np.float32 else torch.float64
        tensor_X = X if sp.issparse(X) else _to_tensor(X, device)
        tensor_target = _to_tensor(target, device, torch.int64 if target.ndim == 1 else dtype)
        weight = None if sample_weight is None else _to_tensor(sample_weight, device, dtype)
        return _Data(tensor_X, tensor_target, weight, device, dtype)

    @_unchanged_on_error
    def fit(
        self,
        X: object,
        y: object,
        sample_weight: object = None,
        *,
        callback: EpochCallback | None = None,
        resume: Checkpoint | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> _SGDClassifier:
        """Train by minibatch SGD for up to ``max_iter`` epochs.

        Args:
            X: ``(n_samples, n_features)`` array, DataFrame or scipy.sparse matrix.
            y: see the class docstring for the accepted target kinds.
            sample_weight: ``(n_samples,)`` non-negative weights s_i multiplying each sample's loss.
            callback: called as ``callback(self, info)`` after every epoch, with ``info`` a dict of
                "epoch" (1-based), "max_iter", "loss" (the epoch's mean training objective),
                "validation_score" (with early stopping, else None) and "learning_rate". Within it the
                estimator predicts with the current weights and ``self.checkpoint()`` captures the
                training state. Returning True stops training after that epoch.
            resume: a :class:`Checkpoint` of an earlier fit of this estimator on the same data and
                parameters; training continues after its epoch and ends exactly where the uninterrupted
                fit would have.
            process_group: train data-parallel over the ranks of this torch.distributed group. None:
                over the default group when torch.distributed is initialized (under torchrun), else in
                this process alone; a group of one rank (``torch.distributed.new_group([rank])``) fits
                each rank on its own. Every rank calls ``fit`` with the whole data and the same
                parameters (checked) and gets the same fitted model; the seed is rank 0's; ``callback``
                runs on every rank, and training stops when it returns True on any rank. With NCCL, train
                on CUDA (``device="cuda"``, the rank's current GPU).

        Returns:
            self.

        Raises:
            ValueError: on invalid parameters or data, and when the loss or a weight becomes inf or nan
                (checked after every epoch; training stops there), naming the epoch and the likely cause
                (unscaled features, too large an eta0), as scikit-learn's SGDClassifier does on an
                overflow. A call that raises (an exception from ``callback`` too) leaves the estimator
                as it was before it (unfitted if it was), so no fitted model is ever left with
                non-finite weights; a KeyboardInterrupt keeps the weights of the last completed epoch.

        Warns:
            ConvergenceWarning: when training diverged without overflowing: the last epoch's loss_curve_
                value is over DIVERGENCE_RISE = 2 times the best epoch's and DIVERGENCE_CHANCE = 10 times
                the loss of all-zero logits (log K for softmax), a loss that climbed until the stopping
                rule or max_iter ended the fit (not checked with early_stopping, whose validation scores
                judge the fit and whose best-scoring weights are kept). Also when max_iter is reached
                before the stopping rule fired (see ``tol``).
        """
        sizes, device = self._check_params()
        replicas = ReplicaGroup.resolve(process_group, device)
        warm = bool(self.warm_start) and hasattr(self, "coef_") and resume is None
        X, target, stratify, sample_weight = self._prepare(
            X, y, sample_weight, classes=None, reset=not warm, partial=False
        )
        self._seed = replicas.broadcast_int(
            int(resume.info["seed"])
            if resume is not None
            else int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        )
        if replicas.size > 1:
            summary = self._data_summary(X, target, sample_weight)
            resumed = -1 if resume is None else int(resume.info["epoch"])
            replicas.check_same(
                {**summary, "warm_start": int(warm), "resume_epoch": resumed}, "X, y, sample_weight"
            )
        self._loss_weight = self._target_weights(target, sample_weight)
        self._weight_mean = self._mean_row_weight(target, sample_weight)
        self._chance = self._chance_loss(target, sample_weight)
        validation = None
        if self.early_stopping:
            X, target, sample_weight, validation = self._split_validation(X, target, stratify, sample_weight)
        data = self._to_data(X, target, sample_weight, device)
        self._loss_weight = None if self._loss_weight is None else self._loss_weight.to(device, data.dtype)

        widths = [w.shape[0] for w in self.hidden_coefs_] if warm else None
        if warm and widths == list(sizes) and self.coef_.shape[0] == self._n_outputs():
            params = self._fitted_parameters(device, data.dtype)
        else:
            params = {
                k: v.to(device, data.dtype)
                for k, v in self._init_parameters(sizes, X.shape[1], self._seed).items()
            }
        for p in params.values():
            p.requires_grad_(True)
        momentum: dict[str, Tensor] = {}
        self.t_ = 0
        self.n_iter_ = 0
        self.loss_curve_ = []
        self.validation_scores_ = [] if self.early_stopping else None
        self._stop = {"best_loss": math.inf, "best_score": -math.inf, "no_improvement": 0, "best": None}
        if resume is not None:
            momentum = self._restore(resume, params, X.shape[1])
        self._params, self._momentum = params, momentum
        converged = self._stop.get("done", False)
        start = time.perf_counter()
        for epoch in range(self.n_iter_, int(self.max_iter)):
            if converged:
                break
            loss = self._run_epoch(data, params, epoch, int(self.max_iter), replicas) + self._penalty(params)
            self._check_finite(loss, params, epoch + 1)
            self.n_iter_ = epoch + 1
            self.loss_curve_.append(loss)
            self._export(params)
            score = None
            if validation is not None:
                score = self._validation_score(*validation, replicas)
                self.validation_scores_.append(score)
            converged = self._update_stopping(loss, score)
            if self.verbose and replicas.rank == 0:
                extra = "" if score is None else f", validation score {score:.4f}"
                print(
                    f"-- Epoch {self.n_iter_}: loss {loss:.6f}{extra}, lr {self._last_lr:.3g}, "
                    f"{time.perf_counter() - start:.2f} s"
                )
            info = {
                "epoch": self.n_iter_,
                "max_iter": int(self.max_iter),
                "loss": loss,
                "validation_score": score,
                "learning_rate": self._last_lr,
            }
            stop_requested = callback is not None and bool(callback(self, info))
            if replicas.any(stop_requested):
                break
        else:
            if (
                not converged
                and self.tol is not None
                and self.learning_rate != "cosine"
                and replicas.rank == 0
            ):
                warnings.warn(
                    f"{type(self).__name__}: max_iter={self.max_iter} epochs reached before the stopping "
                    "rule fired; consider raising max_iter",
                    ConvergenceWarning,
                    stacklevel=3,
                )
        if not self.early_stopping and replicas.rank == 0:
            self._warn_if_diverged()
        elif self._stop["best"] is not None:
            self._export(self._stop["best"])
        return self

    def _split_validation(
        self, X: Any, target: np.ndarray, stratify: np.ndarray, sample_weight: np.ndarray | None
    ) -> tuple[Any, np.ndarray, np.ndarray | None, tuple]:
        """Hold out ``validation_fraction`` of the rows (stratified where every class has two rows)."""
        n = X.shape[0]
        n_valid = math.ceil(n * float(self.validation_fraction))
        if n_valid < 1 or n - n_valid < 1:
            raise ValueError(
                f"validation_fraction: {self.validation_fraction} of {n} samples leaves an empty training "
                "or validation set; use more samples or early_stopping=False"
            )
        _, counts = np.unique(stratify, return_counts=True)
        strat = stratify if counts.min() >= 2 and n_valid >= len(counts) else None
        rows = np.arange(n)
        train, valid = train_test_split(
            rows, test_size=float(self.validation_fraction), stratify=strat, random_state=self._seed
        )
        sw = None if sample_weight is None else sample_weight[train]
        valid_sw = None if sample_weight is None else sample_weight[valid]
        return X[train], target[train], sw, (X[valid], self._validation_labels(target[valid]), valid_sw)

    def _validation_labels(self, target: np.ndarray) -> np.ndarray:
        """The held-out targets in the form ``score`` compares predictions with."""
        raise NotImplementedError

    def _validation_score(
        self, X: Any, y: np.ndarray, sample_weight: np.ndarray | None, replicas: ReplicaGroup
    ) -> float:
        """Accuracy on the held-out rows, Σ_i w_i·[ŷ_i = y_i] / Σ_i w_i; data-parallel, each rank scores
        its share of the rows and one all-reduce sums the two numbers, so every rank gets the same
        score."""
        if replicas.size == 1:
            return float(accuracy_score(y, self.predict(X), sample_weight=sample_weight))
        low, high = replicas.share(0, X.shape[0])
        weight = np.ones(X.shape[0]) if sample_weight is None else sample_weight
        correct = 0.0
        if high > low:
            correct = float(
                accuracy_score(
                    y[low:high], self.predict(X[low:high]), normalize=False, sample_weight=weight[low:high]
                )
            )
        share = torch.tensor([correct, float(weight[low:high].sum())], dtype=torch.float64)
        correct, total = all_reduce_sum([share.to(replicas.device)], group=replicas.group)[0].tolist()
        return correct / total

    def _data_summary(self, X: Any, target: np.ndarray, sample_weight: np.ndarray | None) -> dict[str, int]:
        """Integers that differ when two ranks pass different data: shapes and CRC-32 checksums of the
        classes, the encoded targets and the sample weights (X itself is not read: it may be large)."""
        return {
            "n_samples": int(X.shape[0]),
            "n_features": int(X.shape[1]),
            "classes": zlib.crc32(repr(self.classes_.tolist()).encode()),
            "y": zlib.crc32(np.ascontiguousarray(target).tobytes()),
            "sample_weight": -1 if sample_weight is None else zlib.crc32(sample_weight.tobytes()),
        }

    def _update_stopping(self, loss: float, score: float | None) -> bool:
        """scikit-learn's rule: stop after n_iter_no_change epochs without the validation score rising by
        more than tol (early_stopping) or the training loss falling by more than tol."""
        stop = self._stop
        if score is not None:
            if self.tol is not None and score < stop["best_score"] + self.tol:
                stop["no_improvement"] += 1
            else:
                stop["no_improvement"] = 0
            if score > stop["best_score"]:
                stop["best_score"] = score
                stop["best"] = {k: v.detach().clone() for k, v in self._params.items()}
        else:
            if self.tol is not None and loss > stop["best_loss"] - self.tol:
                stop["no_improvement"] += 1
            else:
                stop["no_improvement"] = 0
            stop["best_loss"] = min(stop["best_loss"], loss)
        stop["done"] = self.tol is not None and stop["no_improvement"] >= self.n_iter_no_change
        return stop["done"]

    @_unchanged_on_error
    def partial_fit(
        self,
        X: object,
        y: object,
        classes: object = None,
        sample_weight: object = None,
        *,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> _SGDClassifier:
        """One epoch over (X, y), continuing the parameters, momentum and schedule of earlier calls.

        ``classes`` (all the labels the stream will contain) is required on the first call with class
        labels. The step counter ``t_`` carries over, so partial_fit over consecutive chunks whose sizes
        are multiples of ``batch_size`` (shuffle=False) equals one epoch of ``fit`` under the constant and
        invscaling schedules. Under "cosine" each call counts as one of ``max_iter`` epochs; after
        ``max_iter`` calls the rate is 0. No stopping rule is applied. See the subclasses for
        class_weight / pos_weight "balanced" with partial_fit. ``process_group`` is :meth:`fit`'s: every
        rank passes the same chunk and takes its share of every minibatch of it.

        ``classes`` on a later call must be the classes of the first (ValueError otherwise, as in
        scikit-learn). Divergence raises ValueError or warns as in :meth:`fit`, this call's epoch being
        the last (its loss compared with the best of ``loss_curve_``, all calls so far), and a call that
        raises leaves the estimator as it was before it.
        """
        sizes, device = self._check_params()
        replicas = ReplicaGroup.resolve(process_group, device)
        first = not hasattr(self, "coef_")
        if not first and classes is not None:
            self._check_same_classes(classes)
        X, target, _, sample_weight = self._prepare(
            X, y, sample_weight, classes=classes, reset=first, partial=True
        )
        if first:
            self.t_ = 0
            self.n_iter_ = 0
            self.loss_curve_ = []
            self.validation_scores_ = None
        if first or not hasattr(self, "_seed"):  # a first call, or the first after load_model
            seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
            self._seed = replicas.broadcast_int(seed)
            self._stop = {"best_loss": math.inf, "best_score": -math.inf, "no_improvement": 0, "best": None}
            self._momentum = {}
        if replicas.size > 1:
            summary = self._data_summary(X, target, sample_weight)
            replicas.check_same({**summary, "t": int(self.t_)}, "X, y, sample_weight")
        self._loss_weight = self._target_weights(target, sample_weight)
        self._weight_mean = self._mean_row_weight(target, sample_weight)
        self._chance = self._chance_loss(target, sample_weight)
        data = self._to_data(X, target, sample_weight, device)
        self._loss_weight = None if self._loss_weight is None else self._loss_weight.to(device, data.dtype)
        if first:
            params = {
                k: v.to(device, data.dtype)
                for k, v in self._init_parameters(sizes, X.shape[1], self._seed).items()
            }
        else:
            params = getattr(self, "_params", None) or self._fitted_parameters(device, data.dtype)
        params = {k: v.detach().to(device, data.dtype).requires_grad_(True) for k, v in params.items()}
        self._momentum = {k: v.to(device, data.dtype) for k, v in self._momentum.items()}
        loss = self._run_epoch(data, params, self.n_iter_, int(self.max_iter), replicas)
        loss += self._penalty(params)
        self._check_finite(loss, params, self.n_iter_ + 1)
        self._params = params
        self.n_iter_ += 1
        self.loss_curve_.append(loss)
        self._export(params)
        if replicas.rank == 0:
            self._warn_if_diverged()
        return self

    def _check_same_classes(self, classes: object) -> None:
        """scikit-learn's rule: ``classes`` on a later partial_fit call must name the classes of the first
        (as a set: the order does not matter)."""
        given = np.unique(np.asarray(classes)).tolist()
        if given != np.unique(self.classes_).tolist():
            raise ValueError(
                f"classes: {given} is not the same as on the last call to partial_fit, "
                f"was: {self.classes_.tolist()}"
            )

    # --- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """The training state after the last completed epoch of the running (or finished) fit."""
        if not hasattr(self, "_params"):
            raise ValueError(f"{type(self).__name__}.checkpoint: no fit has run on this estimator yet")
        tensors = {f"param/{k}": v.detach().cpu().clone() for k, v in self._params.items()}
        tensors.update({f"momentum/{k}": v.detach().cpu().clone() for k, v in self._momentum.items()})
        if self._stop.get("best") is not None:
            tensors.update({f"best/{k}": v.detach().cpu().clone() for k, v in self._stop["best"].items()})
        info = {
            "format": CHECKPOINT_FORMAT,
            "estimator": type(self).__name__,
            "params": _params_to_json(self.get_params()),
            "n_features": int(self.n_features_in_),
            "classes": self.classes_.tolist(),
            "epoch": int(self.n_iter_),
            "t": int(self.t_),
            "seed": int(self._seed),
            "loss_curve": list(self.loss_curve_),
            "validation_scores": self.validation_scores_,
            "best_loss": _finite_or_none(self._stop["best_loss"]),
            "best_score": _finite_or_none(self._stop["best_score"]),
            "no_improvement": int(self._stop["no_improvement"]),
            "done": bool(self._stop.get("done", False)),
        }
        return Checkpoint(tensors, info)

    def _restore(self, resume: Checkpoint, params: dict[str, Tensor], n_features: int) -> dict[str, Tensor]:
        info = resume.info
        if info.get("format") != CHECKPOINT_FORMAT or info.get("estimator") != type(self).__name__:
            raise ValueError(
                f"resume: expected a {type(self).__name__} checkpoint, got {info.get('estimator')!r}"
            )
        ours = {k: v for k, v in _params_to_json(self.get_params()).items() if k not in ("verbose", "device")}
        theirs = {k: v for k, v in info["params"].items() if k not in ("verbose", "device")}
        if ours != theirs:
            differ = sorted(k for k in ours if ours[k] != theirs.get(k))
            raise ValueError(f"resume: the checkpoint was made with other parameters ({', '.join(differ)})")
        if info["n_features"] != n_features or info["classes"] != self.classes_.tolist():
            raise ValueError("resume: the checkpoint was made on data with other features or classes")
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        try:
            _check_tensors(resume.tensors, _with_training_state(shapes, resume.tensors))
        except ValueError as error:
            raise ValueError(f"resume: {error}") from None
        for name, p in params.items():
            with torch.no_grad():
                p.copy_(resume.tensors[f"param/{name}"])
        device, dtype = next(iter(params.values())).device, next(iter(params.values())).dtype
        momentum = {
            k.removeprefix("momentum/"): v.to(device, dtype)
            for k, v in resume.tensors.items()
            if k.startswith("momentum/")
        }
        best = {
            k.removeprefix("best/"): v.to(device, dtype)
            for k, v in resume.tensors.items()
            if k.startswith("best/")
        }
        self.n_iter_ = int(info["epoch"])
        self.t_ = int(info["t"])
        self.loss_curve_ = list(info["loss_curve"])
        self.validation_scores_ = info["validation_scores"]
        self._stop = {
            "best_loss": math.inf if info["best_loss"] is None else info["best_loss"],
            "best_score": -math.inf if info["best_score"] is None else info["best_score"],
            "no_improvement": int(info["no_improvement"]),
            "best": best or None,
            "done": bool(info["done"]),
        }
        self._export(params)
        return momentum

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _params_to_json(params: dict[str, Any]) -> dict[str, Any]:
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


def _params_from_json(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and "__pairs__" in value:
            value = {k: v for k, v in value["__pairs__"]}
        elif key == "hidden_layer_sizes" and isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def _check_labels(y: object) -> np.ndarray:
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


def _classes_for(y: np.ndarray, classes: object, known: np.ndarray | None, *, partial: bool) -> np.ndarray:
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
        raise ValueError(f"y: expected at least 2 classes, got 1 class ({_shown(found[0])})")
    unseen = np.setdiff1d(np.unique(y), found)
    if unseen.size:
        raise ValueError(f"y: labels {unseen[:5].tolist()} are not in classes {found.tolist()}")
    return found


def _balanced(counts: np.ndarray) -> np.ndarray:
    """scikit-learn's "balanced" weights n / (K·n_c); a class with no samples yet gets 1."""
    total = counts.sum()
    return np.where(counts > 0, total / (len(counts) * np.maximum(counts, 1e-300)), 1.0)


class SoftmaxClassifier(_SGDClassifier):
    r"""Multinomial softmax regression (or a ReLU network with a softmax head) trained by minibatch SGD.

    The model is z = W·h(x) + b with h the identity (``hidden_layer_sizes=()``) or a ReLU MLP, ŷ =
    softmax(z), and the loss the cross-entropy −Σ_c q_c log ŷ_c against the target distribution q (one-hot
    for class labels, optionally smoothed: q = (1 − ε)·y + ε/K, and multiplied by the class weight w_c and
    the sample weight s). Its gradient, ∂ℓ/∂z = (Σ_c q_c)·ŷ − q = ŷ − y for plain labels, comes out of the
    forward pass of :func:`softxent.linear_cross_entropy`; ∂ℓ/∂W = (ŷ − y)hᵀ.

    Args:
        hidden_layer_sizes: widths of the ReLU hidden layers; ``()`` is the linear model.
        alpha: L2 penalty α/2·‖W‖² on every weight matrix (not on biases).
        learning_rate: "constant" (η = eta0), "invscaling" (η = eta0 / (t + 1)^power_t, t the step) or
            "cosine" (η = eta0·(1 + cos(π·p))/2, p the fraction of the max_iter epochs done).
        eta0: the initial learning rate. power_t: exponent of "invscaling".
        momentum, nesterov: heavy-ball or Nesterov momentum (torch.optim.SGD's).
        batch_size: rows per SGD step; "auto" is n_samples/32 clipped to [128, 4096] (at most
            n_samples).
        max_iter: epochs (passes over the data).
        tol, n_iter_no_change: stop when for n_iter_no_change epochs the training loss has not fallen by
            more than tol (or, with early_stopping, the validation accuracy has not risen by more than
            tol). None: always run max_iter epochs. Reaching max_iter first raises a ConvergenceWarning,
            except under "cosine", whose schedule is planned to end there.
        early_stopping, validation_fraction: hold out that fraction (stratified), score it after every
            epoch, stop by the rule above and keep the best epoch's weights.
        shuffle: reshuffle the rows every epoch.
        class_weight: None, a dict {class: weight} (finite weights >= 0 for labels among the classes;
            classes left out weigh 1) or "balanced" (n_samples / (n_classes·count)). With partial_fit,
            "balanced" uses the running class counts of all the data seen so far (this call included),
            so the weights settle as the stream goes on; to use the counts of the whole data from the
            start, pass ``compute_class_weight("balanced", classes=classes, y=y_all)`` as a dict.
        label_smoothing: ε in [0, 1).
        device: "cpu", "cuda", "auto" (CUDA when available) or a torch device string.
        random_state: seeds the shuffling, the validation split and the network's initialization; the same
            int gives bit-identical coefficients on the CPU.
        warm_start: start fit from the current coefficients (the schedule restarts).
        verbose: print one line per epoch.

    Targets: ``y`` is 1-D class labels, or an ``(n_samples, n_classes)`` matrix of probabilities (soft
    labels; rows sum to 1; classes_ is then 0..K−1 unless partial_fit's ``classes`` says otherwise).

    Divergence: a loss or weight that becomes inf or nan raises ValueError (the usual cause: unscaled
    features, or too large an eta0), and a fit whose last epoch ends far above its best raises a
    ConvergenceWarning (see :meth:`fit`). A fit or partial_fit call that raises leaves the estimator as it
    was before the call.

    Attributes:
        classes_: ``(n_classes,)``. coef_: ``(n_classes, n_features)`` (or the last hidden width).
        intercept_: ``(n_classes,)``. hidden_coefs_, hidden_intercepts_: the hidden layers, torch layout
        ``(out, in)``. n_iter_: epochs run. t_: SGD steps taken. loss_curve_: the training objective per
        epoch. validation_scores_: with early_stopping. n_features_in_, feature_names_in_.

    For two classes the model keeps both rows of coef_ (softmax over two logits); decision_function returns
    z₁ − z₀, the log-odds of classes_[1], as scikit-learn's binary classifiers do.

    Example:
        >>> from sklearn.datasets import load_iris
        >>> X, y = load_iris(return_X_y=True)
        >>> clf = SoftmaxClassifier(random_state=0).fit(X, y)
        >>> clf.coef_.shape, clf.predict_proba(X[:2]).sum(axis=1).round(6).tolist()
        ((3, 4), [1.0, 1.0])
        >>> bool(clf.score(X, y) > 0.9)
        True
    """

    def __init__(
        self,
        *,
        hidden_layer_sizes: tuple[int, ...] = (),
        alpha: float = 1e-4,
        learning_rate: str = "cosine",
        eta0: float = 0.1,
        power_t: float = 0.25,
        momentum: float = 0.9,
        nesterov: bool = True,
        batch_size: int | str = "auto",
        max_iter: int = 20,
        tol: float | None = 1e-3,
        n_iter_no_change: int = 5,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        shuffle: bool = True,
        class_weight: dict | str | None = None,
        label_smoothing: float = 0.0,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        warm_start: bool = False,
        verbose: int = 0,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.eta0 = eta0
        self.power_t = power_t
        self.momentum = momentum
        self.nesterov = nesterov
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.shuffle = shuffle
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.device = device
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose

    def _check_params(self) -> tuple[tuple[int, ...], torch.device]:
        _check_number("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        cw = self.class_weight
        if not (cw is None or (isinstance(cw, str) and cw == "balanced") or isinstance(cw, dict)):
            raise ValueError(
                f"class_weight: expected None, 'balanced' or a dict {{class: weight}}, got {_shown(cw)}"
            )
        weights = cw.items() if isinstance(cw, dict) else ()
        for label, value in weights:
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"class_weight: expected a number >= 0 for each class, got {_shown(value)} "
                    f"for class {_shown(label)}"
                )
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"class_weight: expected a finite weight >= 0 for each class, got {_shown(value)} "
                    f"for class {_shown(label)}"
                )
        return super()._check_params()

    def _n_outputs(self) -> int:
        return len(self.classes_)

    def _chance_loss(self, target: np.ndarray, sample_weight: np.ndarray | None) -> float:
        """log K: at all-zero logits every row's cross-entropy is log K times the sum of its weighted
        target, and the objective divides by the mean of those sums."""
        return math.log(len(self.classes_))

    def _encode_target(
        self, y: object, classes: object, first_call: bool, partial: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        known = None if first_call else self.classes_
        y_array = np.asarray(y) if not hasattr(y, "to_numpy") else y.to_numpy()
        if y_array.ndim == 2 and y_array.shape[1] > 1:
            probabilities = np.asarray(y_array, dtype=np.float64)
            if not np.isfinite(probabilities).all() or (probabilities < 0).any():
                raise ValueError(
                    "y: expected probabilities >= 0 in a soft-label matrix, got negative or non-finite values"
                )
            sums = probabilities.sum(axis=1)
            if not np.allclose(sums, 1.0, atol=1e-4):
                bad = int(np.argmax(np.abs(sums - 1.0)))
                raise ValueError(
                    f"y: expected soft-label rows that sum to 1, row {bad} sums to {sums[bad]:.6g}"
                )
            n_classes = probabilities.shape[1]
            found = (
                known
                if known is not None
                else (np.arange(n_classes) if classes is None else np.asarray(classes))
            )
            if len(found) != n_classes:
                raise ValueError(f"y: expected {len(found)} columns (one per class), got {n_classes}")
            self.classes_ = found
            return probabilities, probabilities.argmax(axis=1)
        labels = _check_labels(y_array)
        self.classes_ = _classes_for(labels, classes, known, partial=partial)
        return np.searchsorted(self.classes_, labels).astype(np.int64), labels

    def _target_weights(self, target: np.ndarray, sample_weight: np.ndarray | None) -> Tensor | None:
        n_classes = len(self.classes_)
        if self.class_weight is None:
            return None
        if isinstance(self.class_weight, dict):
            weights = np.ones(n_classes)
            for label, value in self.class_weight.items():
                where = np.flatnonzero(self.classes_ == label)
                if where.size == 0:
                    raise ValueError(
                        f"class_weight: label {_shown(label)} is not in classes {self.classes_.tolist()}"
                    )
                weights[where[0]] = value
            return torch.from_numpy(weights)
        counts = np.bincount(target, minlength=n_classes) if target.ndim == 1 else target.sum(axis=0)
        return torch.from_numpy(_balanced(self._running_counts(counts).astype(np.float64)))

    def _row_weights(self, target: np.ndarray, sample_weight: np.ndarray | None) -> np.ndarray | None:
        if self._loss_weight is None:
            return sample_weight
        class_weight = self._loss_weight.numpy()
        smooth = self.label_smoothing * class_weight.mean()
        hard = class_weight[target] if target.ndim == 1 else target @ class_weight
        row = (1.0 - self.label_smoothing) * hard + smooth
        return row if sample_weight is None else row * sample_weight

    def _head_loss(
        self, h: Tensor, weight: Tensor, bias: Tensor, target: Tensor, sw: Tensor | None
    ) -> Tensor:
        n_classes = weight.shape[0]
        # q: the target distribution, smoothed, times the class and sample weights (Σ_c q_c = the row's
        # weight, and the fused head's gradient (Σ_c q_c)·ŷ − q carries it).
        if target.dtype == torch.int64:
            q = torch.nn.functional.one_hot(target, n_classes).to(h.dtype)
        else:
            q = target
        if self.label_smoothing:
            q = q * (1.0 - self.label_smoothing) + self.label_smoothing / n_classes
        if self._loss_weight is not None:
            q = q * self._loss_weight
        if sw is not None:
            q = q * sw[:, None]
        return linear_cross_entropy(h, weight, q, linear_bias=bias, reduction="sum")

    def _validation_labels(self, target: np.ndarray) -> np.ndarray:
        return self.classes_[target if target.ndim == 1 else target.argmax(axis=1)]

    def decision_function(self, X: object) -> np.ndarray:
        """Logits z = W·h(x) + b, ``(n_samples, n_classes)``; for two classes z₁ − z₀, ``(n_samples,)``."""
        logits = self._decision(X).numpy()
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_log_proba(self, X: object) -> np.ndarray:
        """log softmax(z), ``(n_samples, n_classes)``, in float64."""
        return torch.log_softmax(self._decision(X).double(), dim=1).numpy()

    def predict_proba(self, X: object) -> np.ndarray:
        """softmax(z), ``(n_samples, n_classes)``; rows sum to 1."""
        return torch.softmax(self._decision(X).double(), dim=1).numpy()

    def predict(self, X: object) -> np.ndarray:
        """The most probable class, ``(n_samples,)``."""
        best = self._decision(X).argmax(dim=1).numpy()
        return self.classes_[best]


class SigmoidClassifier(_SGDClassifier):
    r"""One sigmoid and one binary cross-entropy per label (multi-label), trained by minibatch SGD.

    The model is z = W·h(x) + b (h the identity or a ReLU MLP), P(label j) = σ(z_j), and the loss
    Σ_j w·[p_j·y_j·(−log σ(z_j)) + (1 − y_j)·(−log(1 − σ(z_j)))] (p: pos_weight, w: sample weight), whose
    gradient σ(z) − y (without weights) comes from :func:`softxent.linear_binary_cross_entropy`'s forward.

    Targets: an ``(n_samples, n_labels)`` indicator matrix (values in [0, 1]; classes_ is 0..L−1; predict
    returns the 0/1 matrix σ(z) > 1/2), or 1-D class labels: binary (one sigmoid for classes_[1]) or
    multiclass (one-vs-rest sigmoids; predict takes the largest, predict_proba normalizes them to sum to 1,
    as scikit-learn's one-vs-rest classifiers do).

    Args:
        pos_weight: None, an array ``(n_outputs,)`` multiplying the positive term of each label, or
            "balanced" (n_negative / n_positive per label). With partial_fit, "balanced" uses the running
            counts of all the data seen so far (this call included); pass an array computed from the whole
            data to fix it from the start.
        The other parameters are :class:`SoftmaxClassifier`'s (no class_weight, no label_smoothing).

    Attributes:
        As :class:`SoftmaxClassifier`, with coef_ ``(n_outputs, n_features)`` and target_type_ ("binary",
        "multiclass" or "multilabel-indicator").

    Example:
        >>> from sklearn.datasets import make_multilabel_classification
        >>> X, Y = make_multilabel_classification(n_samples=300, n_classes=4, random_state=0)
        >>> clf = SigmoidClassifier(random_state=0).fit(X, Y)
        >>> clf.predict(X[:2]).shape, clf.predict_proba(X[:2]).shape
        ((2, 4), (2, 4))
    """

    def __init__(
        self,
        *,
        hidden_layer_sizes: tuple[int, ...] = (),
        alpha: float = 1e-4,
        learning_rate: str = "cosine",
        eta0: float = 0.1,
        power_t: float = 0.25,
        momentum: float = 0.9,
        nesterov: bool = True,
        batch_size: int | str = "auto",
        max_iter: int = 20,
        tol: float | None = 1e-3,
        n_iter_no_change: int = 5,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        shuffle: bool = True,
        pos_weight: object = None,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        warm_start: bool = False,
        verbose: int = 0,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.eta0 = eta0
        self.power_t = power_t
        self.momentum = momentum
        self.nesterov = nesterov
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.shuffle = shuffle
        self.pos_weight = pos_weight
        self.device = device
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose

    def _n_outputs(self) -> int:
        return 1 if self.target_type_ == "binary" else len(self.classes_)

    def _chance_loss(self, target: np.ndarray, sample_weight: np.ndarray | None) -> float:
        """At all-zero logits (σ = 1/2) row i costs log 2 · Σ_j (p_j·y_ij + 1 − y_ij); the objective is
        the sample-weighted mean of that."""
        pos_weight = 1.0 if self._loss_weight is None else self._loss_weight.numpy()
        per_row = math.log(2.0) * (target * pos_weight + (1.0 - target)).sum(axis=1)
        return float(np.average(per_row, weights=sample_weight))

    def _encode_target(
        self, y: object, classes: object, first_call: bool, partial: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        known = None if first_call else self.classes_
        y_array = np.asarray(y) if not hasattr(y, "to_numpy") else y.to_numpy()
        if y_array.ndim == 2 and y_array.shape[1] > 1:
            indicator = np.asarray(y_array, dtype=np.float64)
            if not np.isfinite(indicator).all() or (indicator < 0).any() or (indicator > 1).any():
                raise ValueError("y: expected a label indicator matrix with values in [0, 1]")
            if known is not None and (
                self.target_type_ != "multilabel-indicator" or len(known) != indicator.shape[1]
            ):
                raise ValueError(
                    f"y: expected the {len(known)} labels of the earlier fit, got {indicator.shape[1]}"
                )
            self.target_type_ = "multilabel-indicator"
            self.classes_ = np.arange(indicator.shape[1]) if known is None else known
            return indicator, indicator.argmax(axis=1)
        labels = _check_labels(y_array)
        self.classes_ = _classes_for(labels, classes, known, partial=partial)
        self.target_type_ = "binary" if len(self.classes_) == 2 else "multiclass"
        index = np.searchsorted(self.classes_, labels)
        if self.target_type_ == "binary":
            return (index == 1).astype(np.float64)[:, None], labels
        return np.eye(len(self.classes_))[index], labels

    def _target_weights(self, target: np.ndarray, sample_weight: np.ndarray | None) -> Tensor | None:
        if self.pos_weight is None:
            return None
        if isinstance(self.pos_weight, str):
            if self.pos_weight != "balanced":
                raise ValueError(
                    f"pos_weight: expected None, 'balanced' or an array, got {_shown(self.pos_weight)}"
                )
            counts = np.stack([target.sum(axis=0), (1.0 - target).sum(axis=0)])
            positives, negatives = self._running_counts(counts)
            return torch.from_numpy(np.where(positives > 0, negatives / np.maximum(positives, 1e-300), 1.0))
        weights = np.asarray(self.pos_weight, dtype=np.float64)
        if weights.shape != (target.shape[1],) or not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(
                f"pos_weight: expected {target.shape[1]} finite values >= 0 (one per output), "
                f"got shape {weights.shape}"
            )
        return torch.from_numpy(weights)

    def _head_loss(
        self, h: Tensor, weight: Tensor, bias: Tensor, target: Tensor, sw: Tensor | None
    ) -> Tensor:
        return linear_binary_cross_entropy(
            h,
            weight,
            target,
            linear_bias=bias,
            weight=None if sw is None else sw[:, None],
            pos_weight=self._loss_weight,
            reduction="sum",
        )

    def _validation_labels(self, target: np.ndarray) -> np.ndarray:
        if self.target_type_ == "multilabel-indicator":
            return (target >= 0.5).astype(np.int64)
        if self.target_type_ == "binary":
            return self.classes_[(target[:, 0] >= 0.5).astype(np.int64)]
        return self.classes_[target.argmax(axis=1)]

    def decision_function(self, X: object) -> np.ndarray:
        """Logits z, ``(n_samples, n_outputs)``; ``(n_samples,)`` for a binary target."""
        logits = self._decision(X).numpy()
        return logits[:, 0] if self.target_type_ == "binary" else logits

    def predict_log_proba(self, X: object) -> np.ndarray:
        """log of :meth:`predict_proba`, computed stably from the logits (float64)."""
        logits = self._decision(X).double()
        log_sigmoid = torch.nn.functional.logsigmoid
        if self.target_type_ == "binary":
            return torch.cat([log_sigmoid(-logits), log_sigmoid(logits)], dim=1).numpy()
        if self.target_type_ == "multiclass":
            log_p = log_sigmoid(logits)
            return (log_p - torch.logsumexp(log_p, dim=1, keepdim=True)).numpy()
        return log_sigmoid(logits).numpy()

    def predict_proba(self, X: object) -> np.ndarray:
        """σ(z) per label ``(n_samples, n_labels)``; ``(n_samples, 2)`` for binary; normalized one-vs-rest
        ``(n_samples, n_classes)`` for multiclass."""
        return np.exp(self.predict_log_proba(X))

    def predict(self, X: object) -> np.ndarray:
        """0/1 indicator matrix (multi-label) or class labels ``(n_samples,)``."""
        logits = self._decision(X)
        if self.target_type_ == "multilabel-indicator":
            return (logits > 0).numpy().astype(np.int64)
        if self.target_type_ == "binary":
            return self.classes_[(logits[:, 0] > 0).numpy().astype(np.int64)]
        return self.classes_[logits.argmax(dim=1).numpy()]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        tags.target_tags.multi_output = True
        return tags


# --- files ---------------------------------------------------------------------------------------------

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
    estimator: _SGDClassifier, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> None:
    """Write a fitted estimator to one safetensors file (weights) with JSON metadata in its header
    (class, parameters, classes, feature names, loss curve, softxent version and your ``metadata``)."""
    from importlib.metadata import version

    check_is_fitted(estimator)
    dtype = torch.float64 if estimator.coef_.dtype == np.float64 else torch.float32
    fitted = {
        "classes": estimator.classes_.tolist(),
        "n_features_in": int(estimator.n_features_in_),
        "feature_names_in": getattr(estimator, "feature_names_in_", np.array([])).tolist() or None,
        "n_iter": int(estimator.n_iter_),
        "t": int(estimator.t_),
        "loss_curve": list(estimator.loss_curve_),
        "validation_scores": estimator.validation_scores_,
        "target_type": getattr(estimator, "target_type_", None),
    }
    header = {
        "format": MODEL_FORMAT,
        "softxent_version": version("softxent"),
        "estimator": type(estimator).__name__,
        "params": _params_to_json(estimator.get_params()),
        "fitted": fitted,
        "metadata": metadata,
    }
    _atomic_save(estimator._fitted_parameters(torch.device("cpu"), dtype), path, header)


def load_model(path: str | os.PathLike) -> tuple[_SGDClassifier, dict[str, Any] | None]:
    """Read a file written by :func:`save_model`: returns (fitted estimator, your metadata)."""
    tensors, header = _read(path, "model")
    try:
        if header["format"] != MODEL_FORMAT:
            raise ValueError(f"format {header['format']!r}")
        estimator = _ESTIMATORS[header["estimator"]](**_params_from_json(header["params"]))
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
        _check_fitted_header(estimator)
        sizes = _as_sizes(estimator.hidden_layer_sizes)
        _check_tensors(tensors, _parameter_shapes(estimator.n_features_in_, sizes, estimator._n_outputs()))
        estimator._export(tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{os.fspath(path)}: not a valid softxent model file ({error})") from None
    return estimator, header["metadata"]


def _check_fitted_header(estimator: _SGDClassifier) -> None:
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
    target_type = getattr(estimator, "target_type_", None)
    if isinstance(estimator, SigmoidClassifier) and target_type not in kinds:
        raise ValueError(f"target_type: expected one of {kinds}, got {_shown(target_type)}")


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
        _check_tensors(tensors, _checkpoint_shapes(info, tensors))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{os.fspath(path)}: not a valid softxent checkpoint file ({error})") from None
    return Checkpoint(tensors, info), header["metadata"]


def _checkpoint_shapes(info: dict[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint with this ``info`` must hold, with their shapes. The outputs are the
    classes, except that a SigmoidClassifier with two classes has one (a binary target) or two (a
    two-label indicator matrix), which the info does not record: the stored head tells which."""
    if info.get("estimator") not in _ESTIMATORS:
        raise ValueError(
            f"estimator: expected one of {sorted(_ESTIMATORS)}, got {_shown(info.get('estimator'))}"
        )
    n_outputs = len(info["classes"])
    head = tensors.get("param/head.bias")
    binary = head is not None and tuple(head.shape) == (1,)
    if info["estimator"] == "SigmoidClassifier" and n_outputs == 2 and binary:
        n_outputs = 1
    sizes = _as_sizes(_params_from_json(info["params"])["hidden_layer_sizes"])
    shapes = _parameter_shapes(int(info["n_features"]), sizes, n_outputs)
    return _with_training_state(shapes, tensors)
