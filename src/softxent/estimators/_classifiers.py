"""The two estimators: :class:`SoftmaxClassifier` (one softmax over the classes) and
:class:`SigmoidClassifier` (one sigmoid per label). Each says how its targets are encoded, which weights
its loss carries and how its head's loss and gradient are computed; the rest is :class:`BaseClassifier`'s."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

from softxent.estimators._base import BaseClassifier
from softxent.estimators._checks import balanced_weights, check_labels, check_number, classes_for, shown
from softxent.ops.weighted import linear_binary_cross_entropy_with_grads, linear_cross_entropy_with_grads


class SoftmaxClassifier(BaseClassifier):
    r"""Multinomial softmax regression (or a ReLU network with a softmax head), fitted by full-batch L-BFGS
    to the optimum or trained by minibatch SGD.

    The model is z = W·h(x) + b with h the identity (``hidden_layer_sizes=()``) or a ReLU MLP, ŷ =
    softmax(z), and the loss the cross-entropy −Σ_c q_c log ŷ_c against the target distribution q (one-hot
    for class labels, optionally smoothed: q = (1 − ε)·y + ε/K, and multiplied by the class weight w_c and
    the sample weight s). Its gradient, ∂ℓ/∂z = (Σ_c q_c)·ŷ − q = ŷ − y for plain labels, and ∂ℓ/∂W =
    (ŷ − y)hᵀ are written down in closed form
    (:func:`softxent.ops.weighted.linear_cross_entropy_with_grads`).

    The objective is the weighted mean loss plus the penalty, (1/S)·Σ_i s_i·ℓ_i + α/2·‖W‖² (S = Σ_i s_i).
    ``LogisticRegression(C=C)`` minimizes the same for three or more classes with α = 1/(C·S); for two
    classes, whose coef_ here keeps both rows, with α = 2/(C·S) (the optimum has w₀ = −w₁, so z₁ − z₀ is
    LogisticRegression's decision function and coef_[1] − coef_[0] its coef_).

    Args:
        hidden_layer_sizes: widths of the ReLU hidden layers; ``()`` is the linear model.
        solver: "lbfgs" (full batch: L-BFGS with a strong-Wolfe line search on the whole objective,
            SciPy's L-BFGS-B as in LogisticRegression; the optimum of the linear model), "sgd"
            (minibatches, momentum and a learning-rate schedule; the only solver of partial_fit,
            early_stopping and resume) or "auto": "lbfgs" for a fit of the linear model (a convex
            objective) without early_stopping or resume, else "sgd". ``solver_`` says which a fit used.
        alpha: L2 penalty α/2·‖W‖² on every weight matrix (not on biases).
        learning_rate: "constant" (η = eta0), "invscaling" (η = eta0 / (t + 1)^power_t, t the step) or
            "cosine" (η = eta0·(1 + cos(π·p))/2, p the fraction of the max_iter epochs done).
        eta0: the initial learning rate. power_t: exponent of "invscaling".
        momentum, nesterov: heavy-ball or Nesterov momentum (torch.optim.SGD's).
        batch_size: rows per SGD step; "auto" is n_samples/32 clipped to [128, 4096] (at most
            n_samples).
        max_iter: SGD epochs (passes over the data) or L-BFGS iterations; None: 20 epochs, 500 iterations.
        tol: L-BFGS stops once every component of the objective's gradient is at most tol in magnitude
            (LogisticRegression's tol) or the objective's relative decrease in an iteration is below 64
            machine epsilons. SGD (with n_iter_no_change) stops when for n_iter_no_change epochs the
            training loss has not fallen by more than tol (or, with early_stopping, the validation
            accuracy has not risen by more than tol). "auto": 1e-4 for L-BFGS, 1e-3 for SGD. None:
            always run max_iter epochs (SGD) or stop only on the relative decrease (L-BFGS). Reaching
            max_iter first raises a ConvergenceWarning, except under SGD's "cosine", whose schedule is
            planned to end there.
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
        warm_start: start fit from the current coefficients (SGD's schedule restarts).
        verbose: print one line per epoch (SGD) or iteration (L-BFGS).

    learning_rate, eta0, power_t, momentum, nesterov, batch_size, shuffle, n_iter_no_change and
    validation_fraction are SGD's; L-BFGS ignores them.

    Targets: ``y`` is 1-D class labels, or an ``(n_samples, n_classes)`` matrix of probabilities (soft
    labels; rows sum to 1; classes_ is then 0..K−1 unless partial_fit's ``classes`` says otherwise).

    Divergence: a loss or weight that becomes inf or nan raises ValueError (the usual cause: unscaled
    features, or too large an eta0), and a fit whose last epoch ends far above its best raises a
    ConvergenceWarning (see :meth:`fit`). A fit or partial_fit call that raises leaves the estimator as it
    was before the call.

    Attributes:
        classes_: ``(n_classes,)``. coef_: ``(n_classes, n_features)`` (or the last hidden width).
        intercept_: ``(n_classes,)``. hidden_coefs_, hidden_intercepts_: the hidden layers, torch layout
        ``(out, in)``. solver_: "sgd" or "lbfgs", the solver of the last fit. n_iter_: epochs or
        iterations run. t_: SGD steps taken (0 after an L-BFGS fit). loss_curve_: the training objective
        after each epoch or iteration. validation_scores_: with early_stopping. n_features_in_,
        feature_names_in_.

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
        solver: str = "auto",
        alpha: float = 1e-4,
        learning_rate: str = "cosine",
        eta0: float = 0.1,
        power_t: float = 0.25,
        momentum: float = 0.9,
        nesterov: bool = True,
        batch_size: int | str = "auto",
        max_iter: int | None = None,
        tol: float | str | None = "auto",
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
        self.solver = solver
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
        check_number("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        cw = self.class_weight
        if not (cw is None or (isinstance(cw, str) and cw == "balanced") or isinstance(cw, dict)):
            raise ValueError(
                f"class_weight: expected None, 'balanced' or a dict {{class: weight}}, got {shown(cw)}"
            )
        weights = cw.items() if isinstance(cw, dict) else ()
        for label, value in weights:
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"class_weight: expected a number >= 0 for each class, got {shown(value)} "
                    f"for class {shown(label)}"
                )
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"class_weight: expected a finite weight >= 0 for each class, got {shown(value)} "
                    f"for class {shown(label)}"
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
        labels = check_labels(y_array)
        self.classes_ = classes_for(labels, classes, known, partial=partial)
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
                        f"class_weight: label {shown(label)} is not in classes {self.classes_.tolist()}"
                    )
                weights[where[0]] = value
            return torch.from_numpy(weights)
        counts = np.bincount(target, minlength=n_classes) if target.ndim == 1 else target.sum(axis=0)
        return torch.from_numpy(balanced_weights(self._running_counts(counts).astype(np.float64)))

    def _row_weights(self, target: np.ndarray, sample_weight: np.ndarray | None) -> np.ndarray | None:
        if self._loss_weight is None:
            return sample_weight
        class_weight = self._loss_weight.numpy()
        smooth = self.label_smoothing * class_weight.mean()
        hard = class_weight[target] if target.ndim == 1 else target @ class_weight
        row = (1.0 - self.label_smoothing) * hard + smooth
        return row if sample_weight is None else row * sample_weight

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
        """In closed form (:func:`softxent.ops.weighted.linear_cross_entropy_with_grads`): torch's weighted,
        smoothed cross-entropy on class indices or probabilities, times s_i per row, with no (B, K)
        target matrix for class indices."""
        return linear_cross_entropy_with_grads(
            h, weight, bias, target, sw, class_weight=self._loss_weight,
            label_smoothing=self.label_smoothing, grad_scale=grad_scale, need_dx=need_dh,
        )  # fmt: skip

    def _validation_labels(self, target: np.ndarray) -> np.ndarray:
        return self.classes_[target if target.ndim == 1 else target.argmax(axis=1)]

    def _strictly_right(self, logits: Tensor, target: Tensor) -> bool:
        if target.dtype != torch.int64 or self.label_smoothing:
            return False
        index = target[:, None]
        true = logits.gather(1, index)[:, 0]
        others = logits.scatter(1, index, float("-inf")).amax(dim=1)
        return bool((true > others).all())

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


class SigmoidClassifier(BaseClassifier):
    r"""One sigmoid and one binary cross-entropy per label (multi-label), fitted by full-batch L-BFGS or
    trained by minibatch SGD.

    The model is z = W·h(x) + b (h the identity or a ReLU MLP), P(label j) = σ(z_j), and the loss
    Σ_j w·[p_j·y_j·(−log σ(z_j)) + (1 − y_j)·(−log(1 − σ(z_j)))] (p: pos_weight, w: sample weight), whose
    gradient σ(z) − y (without weights) is written down in closed form
    (:func:`softxent.ops.weighted.linear_binary_cross_entropy_with_grads`).

    Targets: an ``(n_samples, n_labels)`` indicator matrix (values in [0, 1]; classes_ is 0..L−1; predict
    returns the 0/1 matrix σ(z) > 1/2), or 1-D class labels: binary (one sigmoid for classes_[1]) or
    multiclass (one-vs-rest sigmoids; predict takes the largest, predict_proba normalizes them to sum to 1,
    as scikit-learn's one-vs-rest classifiers do).

    Args:
        pos_weight: None, an array ``(n_outputs,)`` multiplying the positive term of each label, or
            "balanced" (n_negative / n_positive per label). With partial_fit, "balanced" uses the running
            counts of all the data seen so far (this call included); pass an array computed from the whole
            data to fix it from the start.
        The other parameters are :class:`SoftmaxClassifier`'s (no class_weight, no label_smoothing). For a
        binary target (one sigmoid) the objective is ``LogisticRegression(C=C)``'s with α = 1/(C·S).

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
        solver: str = "auto",
        alpha: float = 1e-4,
        learning_rate: str = "cosine",
        eta0: float = 0.1,
        power_t: float = 0.25,
        momentum: float = 0.9,
        nesterov: bool = True,
        batch_size: int | str = "auto",
        max_iter: int | None = None,
        tol: float | str | None = "auto",
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
        self.solver = solver
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
        labels = check_labels(y_array)
        self.classes_ = classes_for(labels, classes, known, partial=partial)
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
                    f"pos_weight: expected None, 'balanced' or an array, got {shown(self.pos_weight)}"
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
        """In closed form (:func:`softxent.ops.weighted.linear_binary_cross_entropy_with_grads`): torch's
        binary cross-entropy with pos_weight, times s_i per row."""
        return linear_binary_cross_entropy_with_grads(
            h, weight, bias, target, sw, pos_weight=self._loss_weight, grad_scale=grad_scale, need_dx=need_dh
        )

    def _strictly_right(self, logits: Tensor, target: Tensor) -> bool:
        hard = bool(((target == 0) | (target == 1)).all())
        return hard and bool(((logits > 0) == (target == 1)).all())

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
