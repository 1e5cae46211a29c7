"""The estimators' shared base, :class:`BaseClassifier`: the scikit-learn API around a model and a solver.

It checks the parameters and the data, hands the subclasses the targets (their encoding, their weights,
their head's loss), predicts, scores the held-out rows of early stopping, judges divergence, and runs
``fit`` and ``partial_fit`` through one path, :meth:`BaseClassifier._train`: prepare the data, the
parameters (``_network``) and the solver's state (``_sgd``), then train with the solver: epochs of
minibatch SGD (``_sgd``) or full-batch L-BFGS (``_lbfgs``).
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data
from torch import Tensor

from softxent.distributed._data_parallel import ReplicaGroup, all_reduce_sum, sum_gradients
from softxent.estimators import _lbfgs
from softxent.estimators._checks import (
    as_sizes,
    check_number,
    check_sample_weight,
    resolve_device,
    shown,
)
from softxent.estimators._data import Data, to_tensor
from softxent.estimators._format import CHECKPOINT_FORMAT, Checkpoint, check_tensors, params_to_json
from softxent.estimators._network import from_arrays, hidden, init_parameters, penalty, to_arrays
from softxent.estimators._sgd import LEARNING_RATES, SGD, SGDState, checkpoint_tensor_shapes

# Rows per chunk when predicting, so that a large X never becomes one large dense tensor.
PREDICT_CHUNK_ROWS = 65536
# A fit has diverged (ConvergenceWarning) when its last epoch's loss is over DIVERGENCE_RISE times the best
# epoch's and DIVERGENCE_CHANCE times the loss of all-zero logits (see BaseClassifier._warn_if_diverged).
DIVERGENCE_RISE = 2.0
DIVERGENCE_CHANCE = 10.0
SOLVERS = ("auto", "sgd", "lbfgs")
# max_iter=None and tol="auto" by solver: SGD's epochs and its stopping rule's loss decrease; L-BFGS's
# iterations and its bound on the gradient's largest component (LogisticRegression's tol).
MAX_ITER = {"sgd": 20, "lbfgs": 500}
TOL = {"sgd": 1e-3, "lbfgs": 1e-4}
# The full-batch objective is summed over chunks of rows with at most this many values in their widest
# layer (the activations autograd keeps for one chunk's backward).
FULL_BATCH_ELEMENTS = 2**24

EpochCallback = Callable[["BaseClassifier", dict[str, Any]], bool | None]


class DivergenceWarning(ConvergenceWarning):
    """Training diverged without overflowing: the last epoch's loss is far above the run's best (see
    ``fit``). A ConvergenceWarning, so filters for scikit-learn's warning catch it too."""


def _unchanged_on_error(method: Callable[..., BaseClassifier]) -> Callable[..., BaseClassifier]:
    """Make ``fit``/``partial_fit`` all or nothing: when the call raises an Exception (invalid input,
    divergence, a callback's exception), the estimator's fitted and private attributes are put back as
    they were before it (unfitted if it was), as deep copies taken on entry, since training updates
    tensors and arrays in place. A KeyboardInterrupt is not an Exception: it leaves the weights of the
    last completed epoch, as scikit-learn's MLPClassifier does."""

    @functools.wraps(method)
    def call(self: BaseClassifier, *args: Any, **kwargs: Any) -> BaseClassifier:
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


class BaseClassifier(ClassifierMixin, BaseEstimator):
    """Shared estimator machinery; the subclasses say how targets are encoded and which loss the head uses.

    Training state between calls: ``_params`` (the parameters being trained, name -> tensor, see
    ``_network``) and ``_solver`` (the solver's :class:`~softxent.estimators._sgd.SGDState`).
    """

    # --- parameter checks --------------------------------------------------------------------------

    def _check_params(self) -> tuple[tuple[int, ...], torch.device]:
        """Validate the constructor's parameters (scikit-learn convention: in fit, not in __init__)."""
        sizes = as_sizes(self.hidden_layer_sizes)
        if not isinstance(sizes, Sequence) or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in sizes
        ):
            raise ValueError(
                "hidden_layer_sizes: expected a tuple of positive ints (() for the linear model), "
                f"got {shown(sizes)}"
            )
        check_number("alpha", self.alpha, low=0.0)
        if not isinstance(self.solver, str) or self.solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {SOLVERS}, got {shown(self.solver)}")
        if self.learning_rate not in LEARNING_RATES:
            raise ValueError(
                f"learning_rate: expected one of {LEARNING_RATES}, got {shown(self.learning_rate)}"
            )
        check_number("eta0", self.eta0, low=0.0, low_open=True)
        check_number("power_t", self.power_t, low=0.0)
        check_number("momentum", self.momentum, low=0.0, high=1.0)
        if not isinstance(self.nesterov, bool | np.bool_):
            raise TypeError(f"nesterov: expected a bool, got {shown(self.nesterov)}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0")
        if self.batch_size != "auto":
            check_number("batch_size", self.batch_size, low=1, integer=True)
        if self.max_iter is not None:
            check_number("max_iter", self.max_iter, low=1, integer=True)
        if self.tol is not None and not (isinstance(self.tol, str) and self.tol == "auto"):
            check_number("tol", self.tol, low=-math.inf)
        check_number("n_iter_no_change", self.n_iter_no_change, low=1, integer=True)
        check_number("validation_fraction", self.validation_fraction, low=0.0, high=1.0, low_open=True)
        check_number("verbose", self.verbose, low=0, integer=True)
        return tuple(int(s) for s in sizes), resolve_device(self.device)

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

    def _head_gradients(
        self,
        h: Tensor,
        weight: Tensor,
        bias: Tensor,
        target: Tensor,
        sw: Tensor | None,
        grad_scale: float,
        need_dh: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The head's Σ_i s_i·ℓ_i over a batch (0-d, no graph) and g·∂/∂W, g·∂/∂b and (when ``need_dh``)
        g·∂/∂h, g = ``grad_scale``, for the batch's last hidden features h ``(B, width)`` (the inputs for the
        linear model) and the head's ``weight`` ``(outputs, width)`` and ``bias`` (all without graphs)."""
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

    def _divergence_advice(self, solver: str = "sgd") -> str:
        scaling = "the features may need scaling (e.g. sklearn.preprocessing.StandardScaler)"
        return scaling if solver == "lbfgs" else f"{scaling} or a smaller eta0 (now {shown(self.eta0)})"

    def _check_finite(self, loss: float, params: dict[str, Tensor], epoch: int, solver: str = "sgd") -> None:
        """Raise ValueError when the loss of ``epoch`` (1-based; an iteration for lbfgs) or a parameter is
        inf or nan."""
        step = "iteration" if solver == "lbfgs" else "epoch"
        prefix = f"{type(self).__name__}: training diverged at {step} {epoch}"
        advice = f"{self._divergence_advice(solver)}; the estimator is left as it was before this call"
        if not math.isfinite(loss):
            raise ValueError(f"{prefix}: the loss became {loss}; {advice}")
        with torch.no_grad():
            finite = bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all())
        if not finite:
            raise ValueError(f"{prefix}: the weights became inf or nan; {advice}")

    def _warn_if_diverged(self, chance: float) -> None:
        """Warn (ConvergenceWarning) when the last epoch, whose weights the estimator keeps, ended far above
        the run's best: its loss_curve_ value over DIVERGENCE_RISE times min(loss_curve_) and
        DIVERGENCE_CHANCE times ``chance``, the loss of all-zero logits.

        The rule judges the model handed back, not the path to it: on unscaled features SGD's epoch
        losses jump by several times and then settle (raw breast-cancer or digits features end at their
        best epoch), while a fit that diverged ends, by the stopping rule or max_iter, on a loss several
        times its best (unscaled wine: 3.5 to 16 times over 25 seeds). The floor of 10 times log K
        (softmax) keeps the small losses of a well-fitted model from counting as a rise. A warning, not an
        error: the weights are finite and scikit-learn's own checks fit features of mean 100 to random
        labels and expect a model back.
        """
        loss, best = self.loss_curve_[-1], min(self.loss_curve_)
        if loss > max(DIVERGENCE_RISE * best, DIVERGENCE_CHANCE * chance):
            warnings.warn(
                f"{type(self).__name__}: training diverged: the loss of the last epoch ({self.n_iter_}) is "
                f"{loss:.4g}, over {DIVERGENCE_RISE:g} times the best epoch's {best:.4g} (epoch "
                f"{self.loss_curve_.index(best) + 1}) and {DIVERGENCE_CHANCE:g} times {chance:.4g}, "
                f"the loss of all-zero logits; {self._divergence_advice()}",
                DivergenceWarning,
                stacklevel=5,  # _train, fit or partial_fit, _unchanged_on_error, the caller
            )

    # --- the model ---------------------------------------------------------------------------------

    def _batch_gradient(
        self,
        params: dict[str, Tensor],
        X: Tensor,
        target: Tensor,
        sample_weight: Tensor | None,
        denominator: float,
    ) -> Tensor:
        """Σ_i s_i·ℓ_i over a batch (no graph), adding its gradient divided by ``denominator`` to every
        parameter's ``.grad`` (the solvers' BatchGradient): the head's gradients from the subclass's
        :meth:`_head_gradients` (in closed form), then autograd through the hidden layers from ∂L/∂h."""
        h = hidden(params, X)
        weight, bias = params["head.weight"], params["head.bias"]
        loss_sum, grad_weight, grad_bias, grad_h = self._head_gradients(
            h.detach(), weight.detach(), bias.detach(), target, sample_weight, 1.0 / denominator,
            h.requires_grad,
        )  # fmt: skip
        for param, grad in ((weight, grad_weight), (bias, grad_bias)):
            param.grad = grad if param.grad is None else param.grad.add_(grad)
        if grad_h is not None:
            h.backward(grad_h)
        return loss_sum

    def _fitted_parameters(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        return from_arrays(
            self.coef_, self.intercept_, self.hidden_coefs_, self.hidden_intercepts_, device, dtype
        )

    def _export(self, params: dict[str, Tensor]) -> None:
        """Copy the training tensors into the public numpy attributes (coef_, intercept_, hidden_*)."""
        self.coef_, self.intercept_, self.hidden_coefs_, self.hidden_intercepts_ = to_arrays(params)

    @property
    def _momentum(self) -> dict[str, Tensor]:
        """The momentum buffers of the last fit or partial_fit (the solver's state holds them; an
        AttributeError before any)."""
        return self._solver.momentum_buffers

    # --- data --------------------------------------------------------------------------------------

    def _validate_X(self, X: object, reset: bool) -> np.ndarray | sp.csr_matrix:
        return validate_data(self, X, reset=reset, accept_sparse="csr", dtype=[np.float64, np.float32])

    def _decision(self, X: object) -> Tensor:
        """Logits (n, K) of X under the fitted parameters, on the CPU, computed in chunks of rows."""
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        device = resolve_device(self.device)
        dtype = torch.float64 if self.coef_.dtype == np.float64 else torch.float32
        params = self._fitted_parameters(device, dtype)
        out = []
        with torch.no_grad():
            for start in range(0, X.shape[0], PREDICT_CHUNK_ROWS):
                rows = X[start : start + PREDICT_CHUNK_ROWS]
                rows = rows.toarray() if sp.issparse(rows) else rows
                h = hidden(params, to_tensor(np.asarray(rows), device, dtype))
                out.append(torch.nn.functional.linear(h, params["head.weight"], params["head.bias"]).cpu())
        return torch.cat(out) if out else torch.empty(0, self._n_outputs(), dtype=dtype)

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
        return X, target, stratify, check_sample_weight(sample_weight, X.shape[0])

    # --- training ----------------------------------------------------------------------------------

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
    ) -> BaseClassifier:
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
        self._train(
            X, y, sample_weight, partial=False, callback=callback, resume=resume, process_group=process_group
        )
        return self

    @_unchanged_on_error
    def partial_fit(
        self,
        X: object,
        y: object,
        classes: object = None,
        sample_weight: object = None,
        *,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> BaseClassifier:
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
        self._train(X, y, sample_weight, partial=True, classes=classes, process_group=process_group)
        return self

    def _train(
        self,
        X: object,
        y: object,
        sample_weight: object,
        *,
        partial: bool,
        classes: object = None,
        callback: EpochCallback | None = None,
        resume: Checkpoint | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        """fit's and partial_fit's one path: check the parameters and the data, prepare the data, the
        parameters and the solver's state, then train up to ``max_iter`` epochs under the stopping rule
        and ``callback`` (fit) or one epoch (partial_fit).

        A fit starts afresh: new curves, step count and solver state (from ``resume``'s, when given), and
        new parameters unless warm_start keeps the fitted ones. A later partial_fit call continues all of
        them; a first one, or the first after load_model, starts a new solver state at step ``t_``.
        """
        sizes, device = self._check_params()
        solver_name = self._solver_name(partial, resume)
        max_iter = MAX_ITER[solver_name] if self.max_iter is None else int(self.max_iter)
        tol = TOL[solver_name] if isinstance(self.tol, str) else self.tol
        replicas = ReplicaGroup.resolve(process_group, device)
        fitted = hasattr(self, "coef_")
        continuing = partial and fitted  # a later partial_fit call
        if continuing and classes is not None:
            self._check_same_classes(classes)
        warm = not partial and bool(self.warm_start) and fitted and resume is None
        X, target, stratify, sample_weight = self._prepare(
            X, y, sample_weight, classes=classes, reset=not (continuing or warm), partial=partial
        )
        early_stopping = bool(self.early_stopping) and not partial
        if not continuing:
            self.t_ = 0
            self.n_iter_ = 0
            self.loss_curve_ = []
            self.validation_scores_ = [] if early_stopping else None
        if continuing and hasattr(self, "_solver"):
            state = self._solver
        else:
            seed = (
                int(resume.info["seed"])
                if resume is not None
                else int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
            )
            state = SGDState(seed=replicas.broadcast_int(seed), t=self.t_)
        if replicas.size > 1:
            summary = self._data_summary(X, target, sample_weight)
            if partial:
                agreed = {"t": int(self.t_)}
            else:
                agreed = {
                    "warm_start": int(warm),
                    "resume_epoch": -1 if resume is None else int(resume.info["epoch"]),
                }
            replicas.check_same({**summary, **agreed}, "X, y, sample_weight")
        self._loss_weight = self._target_weights(target, sample_weight)
        weight_mean = self._mean_row_weight(target, sample_weight)
        chance = self._chance_loss(target, sample_weight)
        validation = None
        if early_stopping:
            X, target, sample_weight, validation = self._split_validation(
                X, target, stratify, sample_weight, state.seed
            )
        data = Data.on_device(X, target, sample_weight, device)
        self._loss_weight = None if self._loss_weight is None else self._loss_weight.to(device, data.dtype)
        params = self._start_parameters(
            sizes, X.shape[1], state.seed, device, data.dtype, continuing=continuing, warm=warm
        )
        state.move_to(device, data.dtype)
        if resume is not None:
            self._restore(resume, params, X.shape[1], state)
        self._solver = state
        if not partial:  # a partial_fit call's parameters count once its epoch is complete (below)
            self._params = params

        self.solver_ = solver_name
        if solver_name == "lbfgs":
            self._minimize(data, params, weight_mean, replicas, callback, max_iter, tol)
            return
        solver = SGD.from_params({**self.get_params(), "tol": tol})
        converged = state.done and not partial
        start = time.perf_counter()
        for epoch in range(self.n_iter_, self.n_iter_ + 1 if partial else max_iter):
            if converged:
                break
            mark = state.mark(params)
            try:
                loss, lr = solver.run_epoch(
                    state, data, params, self._batch_gradient, weight_mean, epoch, max_iter, replicas
                )
            except KeyboardInterrupt:
                # undo the cut epoch: the parameters, momentum and step count go back to the end of the
                # last completed epoch, which coef_, n_iter_ and checkpoint() describe, so that a resume
                # or a later partial_fit continues as the uninterrupted fit would
                state.rewind(params, mark)
                raise
            finally:
                self.t_ = state.t
            loss += penalty(params, self.alpha)
            self._check_finite(loss, params, epoch + 1)
            self._params = params
            self.n_iter_ = epoch + 1
            self.loss_curve_.append(loss)
            self._export(params)
            if partial:  # no stopping rule, no callback
                continue
            score = None
            if validation is not None:
                score = self._validation_score(*validation, replicas)
                self.validation_scores_.append(score)
            converged = solver.update_stopping(state, loss, score, params)
            if self.verbose and replicas.rank == 0:
                extra = "" if score is None else f", validation score {score:.4f}"
                print(
                    f"-- Epoch {self.n_iter_}: loss {loss:.6f}{extra}, lr {lr:.3g}, "
                    f"{time.perf_counter() - start:.2f} s"
                )
            info = {
                "epoch": self.n_iter_,
                "max_iter": max_iter,
                "loss": loss,
                "validation_score": score,
                "learning_rate": lr,
            }
            stop_requested = callback is not None and bool(callback(self, info))
            if replicas.any(stop_requested):
                break
        else:
            if (
                not (partial or converged)
                and tol is not None
                and self.learning_rate != "cosine"
                and replicas.rank == 0
            ):
                warnings.warn(
                    f"{type(self).__name__}: max_iter={max_iter} epochs reached before the stopping "
                    "rule fired; consider raising max_iter",
                    ConvergenceWarning,
                    stacklevel=4,  # fit, _unchanged_on_error, the caller
                )
        if not early_stopping and replicas.rank == 0:
            self._warn_if_diverged(chance)
        elif not partial and state.best is not None:
            self._export(state.best)

    def _solver_name(self, partial: bool, resume: Checkpoint | None) -> str:
        """The solver this call trains with: ``solver``, or for "auto" L-BFGS where it applies and the
        objective is convex (a fit of the linear model without early_stopping or resume), else SGD.
        Raises ValueError for solver="lbfgs" where only SGD applies."""
        refused = None
        if partial:
            refused = "partial_fit trains one SGD epoch a call"
        elif self.early_stopping:
            refused = "early_stopping scores held-out rows after each SGD epoch"
        elif resume is not None:
            refused = "resume continues an SGD fit from its checkpoint"
        if self.solver == "lbfgs" and refused:
            raise ValueError(f"solver: 'lbfgs' fits the whole data in one call; {refused}: use solver='sgd'")
        if self.solver != "auto":
            return self.solver
        linear = not as_sizes(self.hidden_layer_sizes)
        return "lbfgs" if linear and refused is None else "sgd"

    def _minimize(
        self,
        data: Data,
        params: dict[str, Tensor],
        weight_mean: float,
        replicas: ReplicaGroup,
        callback: EpochCallback | None,
        max_iter: int,
        tol: float | None,
    ) -> None:
        r"""Fit by full-batch L-BFGS (:mod:`~softxent.estimators._lbfgs`): minimize

        .. math::
            f = \frac{1}{S} \sum_i s_i\,ℓ_i + \frac{α}{2} \sum_{\text{weights}} \|W\|^2, \qquad
            S = n\,\bar s = \sum_i s_i,

        the objective SGD's steps follow in expectation, summed over chunks of rows (bounded memory)
        by :meth:`_batch_gradient`; data-parallel, each rank sums its share of the rows and one
        all-reduce an evaluation adds the shares, so every rank takes the same L-BFGS steps.
        ``loss_curve_`` gets f after each iteration, ``n_iter_`` the iterations, ``t_`` is 0 (no SGD
        steps). Warns ConvergenceWarning when max_iter or a failed line search ended it before ``tol``.
        """
        total_weight = data.n * weight_mean
        alpha = float(self.alpha)
        widest = max(max(p.shape) for p in params.values())
        low, high = replicas.share(0, data.n)
        chunk = max(1, FULL_BATCH_ELEMENTS // widest)
        # this rank's rows in chunks, as views (Data.batches in stored order)
        chunks = [(start, min(start + chunk, high)) for start in range(low, high, chunk)]

        def value_and_grad() -> float:
            total = torch.zeros((), dtype=data.dtype, device=data.device)
            for X, target, sample_weight in data.batches(None, chunks):
                total += self._batch_gradient(params, X, target, sample_weight, total_weight)
            if replicas.size > 1:
                (total,) = sum_gradients(params.values(), total, group=replicas.group)
            with torch.no_grad():
                for name, p in params.items():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    if alpha and name.endswith(".weight"):
                        p.grad.add_(p, alpha=alpha)
            return float(total) / total_weight + penalty(params, alpha)

        self.t_ = 0
        start = time.perf_counter()
        # the last iterate (first the start): the line search evaluates trial points in params, and a
        # KeyboardInterrupt puts params back here, where coef_ and n_iter_ are
        accepted = {name: p.detach().clone() for name, p in params.items()}

        def on_iteration(iteration: int, loss: float) -> bool:
            self._check_finite(loss, params, iteration, "lbfgs")
            self.n_iter_ = iteration
            self.loss_curve_.append(loss)
            self._export(params)
            with torch.no_grad():
                for name, p in params.items():
                    accepted[name].copy_(p)
            if self.verbose and replicas.rank == 0:
                print(f"-- Iteration {iteration}: loss {loss:.6f}, {time.perf_counter() - start:.2f} s")
            info = {
                "epoch": iteration,
                "max_iter": max_iter,
                "loss": loss,
                "validation_score": None,
                "learning_rate": None,
            }
            return replicas.any(callback is not None and bool(callback(self, info)))

        try:
            result = _lbfgs.minimize(
                value_and_grad,
                params,
                max_iter=max_iter,
                tol=0.0 if tol is None else max(float(tol), 0.0),
                on_iteration=on_iteration,
            )
        except KeyboardInterrupt:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(accepted[name])
                    p.grad = None
            raise
        self._check_finite(result.loss, params, result.n_iter + 1, "lbfgs")
        self.n_iter_ = result.n_iter
        self._params = params
        self._export(params)
        if alpha == 0 and "hidden.0.weight" not in params and self._separated(data, params, chunks, replicas):
            if replicas.rank == 0:
                warnings.warn(
                    f"{type(self).__name__}: with alpha=0 the loss has no minimum: the linear model "
                    "separates every training sample from the other classes, so the loss falls toward 0 as "
                    f"the weights grow without bound (max |coef_| is {float(np.abs(self.coef_).max()):.4g} "
                    f"after {result.n_iter} iterations); set alpha > 0 for a finite optimum",
                    ConvergenceWarning,
                    stacklevel=5,  # _minimize, _train, fit, _unchanged_on_error: the caller
                )
        elif not result.converged and not result.stopped and replicas.rank == 0:
            precision = (
                "; in float32 the objective's rounding can stop the line search early (fit float64 X "
                "for a tighter tol)"
                if data.dtype == torch.float32
                else ""
            )
            warnings.warn(
                f"{type(self).__name__}: lbfgs stopped before the gradient reached tol={tol} after "
                f"{result.n_iter} iterations ({result.message}); raise max_iter (now {max_iter}) or scale "
                f"the features (e.g. sklearn.preprocessing.StandardScaler){precision}",
                ConvergenceWarning,
                stacklevel=5,  # _minimize, _train, fit, _unchanged_on_error: the caller
            )

    def _separated(
        self, data: Data, params: dict[str, Tensor], chunks: list[tuple[int, int]], replicas: ReplicaGroup
    ) -> bool:
        """Whether the linear model ``params`` classifies every training row strictly right (this rank's
        ``chunks`` of rows, and every other rank's): then scaling its weights up lowers the unpenalized
        loss toward 0 without end."""
        wrong = False
        with torch.no_grad():
            for X, target, _ in data.batches(None, chunks):
                logits = torch.nn.functional.linear(X, params["head.weight"], params["head.bias"])
                if not self._strictly_right(logits, target):
                    wrong = True
                    break
        return not replicas.any(wrong)

    def _strictly_right(self, logits: Tensor, target: Tensor) -> bool:
        """Whether ``logits`` (B, K) put every row of ``target`` strictly on its side (hard targets only:
        False for soft ones, whose loss has a minimum)."""
        raise NotImplementedError

    def _start_parameters(
        self,
        sizes: tuple[int, ...],
        n_features: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        continuing: bool,
        warm: bool,
    ) -> dict[str, Tensor]:
        """The parameters training starts from, on ``device`` in ``dtype`` and requiring gradients: a later
        partial_fit call continues the last call's (the fitted ones after load_model); a warm fit starts
        from the fitted ones where the layers' widths and the outputs are unchanged; all else from
        :func:`~softxent.estimators._network.init_parameters`."""
        widths = [w.shape[0] for w in self.hidden_coefs_] if warm or continuing else None
        if continuing:
            if widths != list(sizes):
                raise ValueError(
                    "hidden_layer_sizes: partial_fit continues the network of the earlier calls, with "
                    f"hidden layers {tuple(widths)}, got {sizes}; call fit to train a new architecture"
                )
            params = getattr(self, "_params", None) or self._fitted_parameters(device, dtype)
        elif warm and widths == list(sizes) and self.coef_.shape[0] == self._n_outputs():
            params = self._fitted_parameters(device, dtype)
        else:
            params = init_parameters(sizes, n_features, self._n_outputs(), seed)
        return {k: v.detach().to(device, dtype).requires_grad_(True) for k, v in params.items()}

    def _split_validation(
        self,
        X: Any,
        target: np.ndarray,
        stratify: np.ndarray,
        sample_weight: np.ndarray | None,
        seed: int,
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
            rows, test_size=float(self.validation_fraction), stratify=strat, random_state=seed
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
        """The training state after the last completed epoch of the running (or finished) SGD fit."""
        if not hasattr(self, "_params"):
            raise ValueError(f"{type(self).__name__}.checkpoint: no fit has run on this estimator yet")
        if getattr(self, "solver_", "sgd") == "lbfgs":
            raise ValueError(
                f"{type(self).__name__}.checkpoint: the lbfgs solver has no resumable state (its fits are "
                "short and end at the optimum); checkpoints are for solver='sgd'"
            )
        tensors = {f"param/{k}": v.detach().cpu().clone() for k, v in self._params.items()}
        tensors.update(self._solver.checkpoint_tensors())
        info = {
            "format": CHECKPOINT_FORMAT,
            "estimator": type(self).__name__,
            "params": params_to_json(self.get_params()),
            "n_features": int(self.n_features_in_),
            "classes": self.classes_.tolist(),
            "epoch": int(self.n_iter_),
            "loss_curve": list(self.loss_curve_),
            "validation_scores": self.validation_scores_,
            **self._solver.checkpoint_info(),
        }
        return Checkpoint(tensors, info)

    def _restore(
        self, resume: Checkpoint, params: dict[str, Tensor], n_features: int, state: SGDState
    ) -> None:
        """Continue from ``resume``: check that it is this estimator's on this data, then load its
        parameters into ``params``, its solver state into ``state`` and its curves."""
        info = resume.info
        if info.get("format") != CHECKPOINT_FORMAT or info.get("estimator") != type(self).__name__:
            raise ValueError(
                f"resume: expected a {type(self).__name__} checkpoint, got {info.get('estimator')!r}"
            )
        ours = {k: v for k, v in params_to_json(self.get_params()).items() if k not in ("verbose", "device")}
        theirs = {k: v for k, v in info["params"].items() if k not in ("verbose", "device")}
        if ours != theirs:
            differ = sorted(k for k in ours if ours[k] != theirs.get(k))
            raise ValueError(f"resume: the checkpoint was made with other parameters ({', '.join(differ)})")
        if info["n_features"] != n_features or info["classes"] != self.classes_.tolist():
            raise ValueError("resume: the checkpoint was made on data with other features or classes")
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        try:
            check_tensors(resume.tensors, checkpoint_tensor_shapes(shapes, resume.tensors))
        except ValueError as error:
            raise ValueError(f"resume: {error}") from None
        for name, p in params.items():
            with torch.no_grad():
                p.copy_(resume.tensors[f"param/{name}"])
        first = next(iter(params.values()))
        self.n_iter_ = int(info["epoch"])
        state.restore(info, resume.tensors, first.device, first.dtype)
        self.t_ = state.t
        self.loss_curve_ = list(info["loss_curve"])
        self.validation_scores_ = info["validation_scores"]
        self._export(params)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags
