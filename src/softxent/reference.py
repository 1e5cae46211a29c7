r"""The float64 NumPy oracle for softmax cross-entropy: every fast path in softxent is checked against it.

These functions favour reading like the derivation over speed. They are vectorized (no loops over rows),
compute everything in float64, and match ``torch.nn.functional.cross_entropy`` and
``binary_cross_entropy_with_logits`` exactly, plus two extras that torch lacks: ``z_loss`` (PaLM,
arXiv 2204.02311) and ``softcap`` (Gemma 2, arXiv 2408.00118).

Notation, per position (one row of C logits once the class axis is moved last):

    z          logits, replaced by s·tanh(z/s) when a softcap s is given
    lse        = log Σ_c exp z_c
    ŷ          = softmax(z) = exp(z − lse)
    q          the effective target: class weights and label smoothing folded in (see ``cross_entropy``)
    ℓ          = −Σ_c q_c·log ŷ_c + z_loss·lse²
    ∂ℓ/∂z      = (Σ_c q_c + 2·z_loss·lse)·ŷ − q          (= ŷ − y in the plain case)

Layout follows torch: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``, the class axis is 1 when
ndim >= 2 and 0 otherwise; the batch shape is the logits' shape without the class axis.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "DIVERGENCES",
    "LogProbs",
    "cross_entropy",
    "cross_entropy_grad",
    "cross_entropy_grad_probs",
    "distillation_loss",
    "distillation_loss_grad",
    "linear_cross_entropy",
    "log_probs",
    "log_probs_grad",
    "log_softmax",
    "logsumexp",
    "sigmoid_binary_cross_entropy",
    "sigmoid_binary_cross_entropy_grad",
    "softmax",
    "softmax_jacobian",
    "transformed_logits",
]

Reduction = Literal["mean", "sum", "none"]


def _as_float64(values: ArrayLike) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing!r}")


def _check_softcap(softcap: float | None) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: expected None or a float > 0, got {softcap!r}")


def _finite_max(z: np.ndarray, axis: int) -> np.ndarray:
    """max along ``axis`` (kept), 0 where that is ±inf, so that z − max never computes −inf − (−inf)."""
    z_max = np.max(z, axis=axis, keepdims=True)
    return np.where(np.isfinite(z_max), z_max, 0.0)


def logsumexp(z: ArrayLike, axis: int = -1) -> np.ndarray:
    r"""log Σ_k exp z_k along ``axis``, shifted by the maximum so that exp never overflows.

    lse(z) = m + log Σ_k exp(z_k − m),   m = max_k z_k

    Shapes: ``z`` of any shape -> the same shape without ``axis``. A slice that is all −inf gives −inf
    (its m is replaced by 0 so that no −inf − (−inf) = nan appears); a +inf entry gives +inf.

    >>> print(f"{logsumexp([1000.0, 1000.0]) - 1000.0:.4f}")  # log 2; the naive exp(1000) overflows
    0.6931
    >>> print(logsumexp([[0.0, 0.0, 0.0, 0.0], [-np.inf, -np.inf, -np.inf, -np.inf]]).round(4))
    [1.3863   -inf]
    """
    z = _as_float64(z)
    shift = _finite_max(z, axis)
    with np.errstate(divide="ignore"):  # log 0 = −inf for an all −inf slice is the intended answer
        lse = np.log(np.sum(np.exp(z - shift), axis=axis, keepdims=True)) + shift
    return np.squeeze(lse, axis=axis)


def log_softmax(z: ArrayLike, axis: int = -1) -> np.ndarray:
    r"""log ŷ_k = z_k − lse(z), the log-probabilities of the softmax along ``axis``.

    Evaluated as (z_k − m) − log Σ_j exp(z_j − m) with m = max_j z_j: subtracting m first is exact for
    the logits near the maximum, whereas z_k − lse(z) would lose lse's rounding error (about 1e-12 for
    logits of 1e4) in every entry.

    Shapes: ``z`` of any shape -> the same shape. A −inf logit gives log ŷ = −inf, not nan; a slice of
    only −inf logits has no distribution and gives nan, as in torch.

    >>> print(log_softmax([1.0, 2.0, 3.0]).round(4))
    [-2.4076 -1.4076 -0.4076]
    """
    z = _as_float64(z)
    shifted = z - _finite_max(z, axis)
    with np.errstate(invalid="ignore"):  # −inf − (−inf) for an all −inf slice: nan is the answer
        return shifted - np.expand_dims(logsumexp(shifted, axis=axis), axis)


def softmax(z: ArrayLike, axis: int = -1) -> np.ndarray:
    r"""ŷ_k = exp z_k / Σ_j exp z_j = exp(z_k − lse(z)) along ``axis``; entries are >= 0 and sum to 1.

    Shapes: ``z`` of any shape -> the same shape.

    >>> print(softmax([[1.0, 2.0, 3.0], [1000.0, 1000.0, -np.inf]]).round(4))
    [[0.09   0.2447 0.6652]
     [0.5    0.5    0.    ]]
    """
    return np.exp(log_softmax(z, axis=axis))


def softmax_jacobian(z: ArrayLike) -> np.ndarray:
    r"""The Jacobian of the softmax over the last axis: J_jk = ∂ŷ_j/∂z_k = ŷ_j·(δ_jk − ŷ_k).

    In matrix form J = diag(ŷ) − ŷ·ŷᵀ: symmetric, and every row (and column) sums to 0, because the
    probabilities sum to one whatever z is (Σ_j ∂ŷ_j/∂z_k = ∂1/∂z_k = 0). The chain rule through it
    turns a gradient w.r.t. the probabilities into one w.r.t. the logits: ∂L/∂z = Jᵀ·∂L/∂ŷ.

    Shapes: ``z`` (..., C) -> (..., C, C).

    >>> print(softmax_jacobian([0.0, 0.0]))
    [[ 0.25 -0.25]
     [-0.25  0.25]]
    """
    probs = softmax(z)
    identity = np.eye(probs.shape[-1])
    return probs[..., :, None] * (identity - probs[..., None, :])


class _Targets(NamedTuple):
    """The target side of the loss, in the class-last layout."""

    q: np.ndarray  # (..., C): the effective target distribution, weights and smoothing folded in
    counted: np.ndarray  # (...): positions that enter the loss (False where target == ignore_index)
    denominator: float  # what reduction="mean" divides the summed loss by


def _class_last(values: ArrayLike) -> np.ndarray:
    """Moves the class axis (1 when ndim >= 2, else 0) last: (N, C, d1, ..., dk) -> (N, d1, ..., dk, C)."""
    values = _as_float64(values)
    return np.moveaxis(values, 1, -1) if values.ndim >= 2 else values


def _class_back(values: np.ndarray) -> np.ndarray:
    """The inverse of ``_class_last``."""
    return np.moveaxis(values, -1, 1) if values.ndim >= 2 else values


def _effective_target(
    logits_shape: tuple[int, ...],
    target: ArrayLike,
    weight: ArrayLike | None,
    ignore_index: int,
    label_smoothing: float,
) -> _Targets:
    """q = w · [(1 − ε)·t + ε/C] in the class-last layout, t the one-hot target or the probabilities.

    ``logits_shape`` is in torch's layout (class axis 1, or 0 when unbatched).

    Class indices y: t = onehot(y), which gives q_c = (1 − ε)·w_y·1[c=y] + (ε/C)·w_c, and q = 0 where
    y == ignore_index; the mean divides by Σ_{counted} w_y. Probabilities: every position counts and
    the mean divides by the number of positions (torch's convention for both).
    """
    if not logits_shape:
        raise ValueError("logits: expected shape (C,), (N, C) or (N, C, d1, ..., dk), got ()")
    class_axis = 1 if len(logits_shape) >= 2 else 0
    num_classes = logits_shape[class_axis]
    batch_shape = logits_shape[:class_axis] + logits_shape[class_axis + 1 :]
    class_weight = np.ones(num_classes) if weight is None else _as_float64(weight)
    if class_weight.shape != (num_classes,):
        raise ValueError(f"weight: expected shape ({num_classes},) (one per class), got {class_weight.shape}")
    target = np.asarray(target)
    if np.issubdtype(target.dtype, np.floating) and target.shape == logits_shape:
        smoothed = (1.0 - label_smoothing) * _class_last(target) + label_smoothing / num_classes
        counted = np.ones(smoothed.shape[:-1], dtype=bool)
        return _Targets(q=class_weight * smoothed, counted=counted, denominator=float(counted.size))
    if not (np.issubdtype(target.dtype, np.integer) and target.shape == batch_shape):
        raise ValueError(
            f"target: expected integer class indices of shape {batch_shape} or floating probabilities of "
            f"shape {logits_shape}, got {target.dtype} of shape {target.shape}"
        )
    counted = target != ignore_index
    out_of_range = counted & ((target < 0) | (target >= num_classes))
    if out_of_range.any():
        raise ValueError(
            f"target: expected class indices in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got {target[out_of_range].flat[0]}"
        )
    classes = np.where(counted, target, 0)
    one_hot = classes[..., None] == np.arange(num_classes)
    smoothed = (1.0 - label_smoothing) * one_hot + label_smoothing / num_classes
    q = class_weight * smoothed * counted[..., None]
    denominator = float(np.sum(class_weight[classes] * counted))
    return _Targets(q=q, counted=counted, denominator=denominator)


def _softcapped(z: np.ndarray, softcap: float | None) -> np.ndarray:
    return z if softcap is None else softcap * np.tanh(z / softcap)


def _z_loss_term(capped: np.ndarray, z_loss: float, of_lse) -> np.ndarray | float:
    """z_loss·of_lse(lse) per position, and exactly 0 without a z-loss: logits whose lse² overflows
    (|lse| > 1.3e154) or is infinite would otherwise make it 0·inf = nan where torch's loss is finite."""
    if z_loss == 0:
        return 0.0
    with np.errstate(over="ignore"):  # an infinite z-loss for an lse beyond 1.3e154 is the answer
        return z_loss * of_lse(logsumexp(capped))


def _reduce_grad(grad: np.ndarray, counted: np.ndarray, reduction: str, denominator: float) -> np.ndarray:
    """Divides by the mean's denominator at counted positions and sets the others to exactly 0, as torch
    does even when every target is ignored (nan loss, zero gradient)."""
    if reduction == "mean":
        with np.errstate(divide="ignore", invalid="ignore"):  # counted positions whose weights are all 0
            grad = grad / denominator
    return np.where(counted[..., None], grad, 0.0)


def _reduce(losses: np.ndarray, reduction: str, denominator: float) -> float | np.ndarray:
    if reduction == "none":
        return losses
    total = np.sum(losses)
    if reduction == "sum":
        return float(total)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(total) / denominator)


def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> float | np.ndarray:
    r"""Softmax cross-entropy with torch's semantics, plus z-loss and logit soft-capping.

    Per position, with ŷ = softmax(z) over the classes and lse = log Σ_c exp z_c:

        ℓ = −Σ_c q_c·log ŷ_c + z_loss·lse²

    where the effective target q folds in the class weights w (all ones when None) and the label
    smoothing ε, C being the number of classes:

    - class indices y:  q_c = (1 − ε)·w_y·1[c = y] + (ε/C)·w_c;  q = 0 and ℓ = 0 where y == ignore_index
    - probabilities t:  q_c = w_c·t'_c,  t' = (1 − ε)·t + ε/C;  ignore_index does not apply

    The z-loss term is added at every counted position (not ignored) and is not multiplied by the class
    weight. With a ``softcap`` s, z is first replaced by s·tanh(z/s) (and lse is that of the capped z).
    Positions with q_c = 0 read nothing of log ŷ_c, so a −inf logit there costs 0, not 0·∞ = nan.

    Reductions: "none" gives ℓ with the batch shape; "sum" gives Σℓ; "mean" gives Σℓ / Σ_{counted} w_y
    for class indices (torch's weighted mean) and Σℓ / (number of positions) for probabilities. A mean
    over nothing (every target ignored, or an empty batch) is 0/0 = nan, as in torch.

    Shapes: logits (C,), (N, C) or (N, C, d1, ..., dk); target: integer class indices of the logits'
    shape without the class axis ((), (N,) or (N, d1, ..., dk)), or floating probabilities of exactly
    the logits' shape; weight (C,). Returns a float, or an array of the batch shape for "none".

    >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    >>> print(f"{cross_entropy(logits, np.array([0, 2])):.4f}")
    0.1755
    >>> print(cross_entropy(logits, np.array([0, -100]), reduction="none").round(4))
    [0.2413 0.    ]
    >>> print(f"{cross_entropy(logits, softmax(logits)):.4f}")  # the entropy of the prediction itself
    0.5134
    """
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    _check_softcap(softcap)
    logits = _as_float64(logits)
    targets = _effective_target(logits.shape, target, weight, ignore_index, label_smoothing)
    z = _class_last(logits)
    capped = _softcapped(z, softcap)
    log_probs = log_softmax(capped)
    xent = -np.sum(targets.q * np.where(targets.q == 0, 0.0, log_probs), axis=-1)
    losses = np.where(targets.counted, xent + _z_loss_term(capped, z_loss, lambda lse: lse * lse), 0.0)
    return _reduce(losses, reduction, targets.denominator)


def cross_entropy_grad(
    logits: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> np.ndarray:
    r"""∂L/∂logits for ``cross_entropy`` with the same arguments.

    With ∂ log ŷ_c/∂z_k = δ_ck − ŷ_k and ∂lse/∂z_k = ŷ_k, per position:

        ∂ℓ/∂z_k = −Σ_c q_c·(δ_ck − ŷ_k) + 2·z_loss·lse·ŷ_k = (Σ_c q_c + 2·z_loss·lse)·ŷ_k − q_k

    In the plain case (no weight, ε = 0, no z-loss, no softcap) q = onehot(y) and Σ_c q_c = 1, so this
    is the familiar ŷ − y. Ignored positions get exactly 0. The result is then multiplied by the
    reduction's scale: 1/denominator for "mean" (see ``cross_entropy``), 1 for "sum"; for "none" each
    position gets the gradient of its own ℓ (that is, of Σℓ). With a softcap s the chain rule through
    s·tanh(z/s) multiplies by 1 − tanh²(z/s).

    Shapes: as ``cross_entropy``; returns an array of the logits' shape.

    >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    >>> grad = cross_entropy_grad(logits, np.array([0, 2]), reduction="sum")
    >>> print(grad.round(4))
    [[-0.2144  0.1753  0.0391]
     [ 0.0493  0.0545 -0.1038]]
    >>> print(np.allclose(grad, softmax(logits) - np.eye(3)[[0, 2]]))  # ŷ − y
    True
    """
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    _check_softcap(softcap)
    logits = _as_float64(logits)
    targets = _effective_target(logits.shape, target, weight, ignore_index, label_smoothing)
    z = _class_last(logits)
    capped = _softcapped(z, softcap)
    probs = softmax(capped)
    prob_coefficient = np.sum(targets.q, axis=-1) + _z_loss_term(capped, z_loss, lambda lse: 2.0 * lse)
    grad = prob_coefficient[..., None] * probs - targets.q
    grad = _reduce_grad(grad, targets.counted, reduction, targets.denominator)
    if softcap is not None:
        grad = grad * (1.0 - np.tanh(z / softcap) ** 2)
    return _class_back(grad)


def cross_entropy_grad_probs(
    probs: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> np.ndarray:
    r"""∂L/∂ŷ for the cross-entropy as a function of the probabilities ŷ, treated as free variables.

    As a function of free ŷ the loss is L(ŷ) = −Σ_c q_c·log ŷ_c (q as in ``cross_entropy``), so

        ∂L/∂ŷ_c = −q_c / ŷ_c       (times the reduction's scale; 0 wherever q_c = 0)

    In the plain case q = onehot(y) and this is −1[c = y]/ŷ_y: every entry but the target's is zero.
    That is right even though the probabilities sum to one: L(ŷ) = −log ŷ_y reads only ŷ_y, and the
    sum-to-one constraint is not part of this function but of the softmax that produced ŷ. Its Jacobian
    J = diag(ŷ) − ŷ·ŷᵀ (``softmax_jacobian``) is what spreads the gradient to every logit:

        Jᵀ·∂L/∂ŷ = −Σ_c q_c·(δ_ck − ŷ_k) = (Σ_c q_c)·ŷ − q,   which is ŷ − y in the plain case

    and equals ``cross_entropy_grad`` (without z_loss and softcap, which act on the logits).

    Shapes: probs has the logits' layout ((C,), (N, C) or (N, C, d1, ..., dk)), e.g. softmax(logits)
    over the class axis; target and weight as in ``cross_entropy``. Returns an array of probs' shape.

    >>> probs = np.array([[0.5, 0.25, 0.25]])
    >>> print(cross_entropy_grad_probs(probs, np.array([0])))
    [[-2.  0.  0.]]
    """
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    probs = _as_float64(probs)
    targets = _effective_target(probs.shape, target, weight, ignore_index, label_smoothing)
    probs = _class_last(probs)
    with np.errstate(divide="ignore"):  # q_c > 0 with ŷ_c = 0 is an infinite loss: −inf is right
        grad = np.divide(-targets.q, probs, out=np.zeros_like(probs), where=targets.q != 0)
    return _class_back(_reduce_grad(grad, targets.counted, reduction, targets.denominator))


def linear_cross_entropy(
    x: ArrayLike,
    W: ArrayLike,
    target: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> tuple[float | np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    r"""The cross-entropy of a linear head, logits = x·Wᵀ + b, with its gradients for x, W and b.

    With G = ∂L/∂logits (``cross_entropy_grad``) and logits_nc = Σ_d x_nd·W_cd + b_c:

        dX = G·W,    dW = Gᵀ·x,    db = Σ_n G_n

    For reduction "none" the gradients are those of Σℓ. Arguments after ``bias`` are those of
    ``cross_entropy``.

    Shapes: x (N, D) or (D,), W (C, D), bias (C,) or None, target (N,) or () class indices (or (N, C)
    / (C,) probabilities). Returns (loss, dX of x's shape, dW (C, D), db (C,) or None when bias is None).

    >>> x = np.array([[1.0, 2.0], [0.5, -1.0], [0.0, 1.0]])
    >>> W = np.array([[0.1, 0.2], [-0.3, 0.4], [0.5, -0.6]])
    >>> loss, dX, dW, db = linear_cross_entropy(x, W, np.array([0, 1, 2]), bias=np.zeros(3))
    >>> print(f"{loss:.4f}", dX.shape, dW.shape, db.shape)
    1.4983 (3, 2) (3, 2) (3,)
    """
    x = _as_float64(x)
    W = _as_float64(W)
    if W.ndim != 2 or W.shape[1] != x.shape[-1]:
        raise ValueError(f"W: expected shape (C, {x.shape[-1]}) to match x of shape {x.shape}, got {W.shape}")
    logits = x @ W.T if bias is None else x @ W.T + _as_float64(bias)
    options = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
    }
    loss = cross_entropy(logits, target, **options)
    grad_logits = cross_entropy_grad(logits, target, **options)
    rows_grad = grad_logits.reshape(-1, W.shape[0])
    rows_x = x.reshape(-1, W.shape[1])
    grad_bias = None if bias is None else rows_grad.sum(axis=0)
    return loss, grad_logits @ W, rows_grad.T @ rows_x, grad_bias


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) = 1/(1 + e^−z), evaluated through e^−|z| <= 1 so that nothing overflows."""
    decay = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + decay), decay / (1.0 + decay))


def _binary_terms(
    logits: ArrayLike, target: ArrayLike, weight: ArrayLike | None, pos_weight: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(z, y, w, p, L = 1 + (p − 1)·y), all broadcast to the logits' shape."""
    z = _as_float64(logits)
    y = _as_float64(target)
    if y.shape != z.shape:
        raise ValueError(f"target: expected the logits' shape {z.shape}, got {y.shape}")
    w = np.broadcast_to(1.0 if weight is None else _as_float64(weight), z.shape)
    p = np.broadcast_to(1.0 if pos_weight is None else _as_float64(pos_weight), z.shape)
    return z, y, w, p, 1.0 + (p - 1.0) * y


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> float | np.ndarray:
    r"""Binary cross-entropy on logits: torch's ``binary_cross_entropy_with_logits``.

    Per element, with σ the sigmoid, p the positive-class weight and w the element weight:

        ℓ = −w·[p·y·log σ(z) + (1 − y)·log(1 − σ(z))]
          = w·[(1 − y)·z + L·softplus(−z)],   L = 1 + (p − 1)·y

    using log σ(z) = −softplus(−z) and log(1 − σ(z)) = −z − softplus(−z). With softplus(−z) =
    max(−z, 0) + log1p(exp(−|z|)) the max part folds into the linear term, (1 − y)·z + L·max(−z, 0) =
    −p·y·z for z < 0 and (1 − y)·z otherwise, so that nothing cancels in the tails (z = −30, y = 0 gives
    log1p(e⁻³⁰) to full precision, where z + softplus(−z) would lose two digits).

    Reductions: "none" gives ℓ with the logits' shape, "sum" Σℓ, "mean" the mean over all elements
    (nan when there are none).

    Shapes: logits and target of any one shape; weight broadcastable to it; pos_weight broadcast along
    the last axis (e.g. (C,) for logits (N, C)).

    >>> print(f"{sigmoid_binary_cross_entropy([0.0, 800.0], [1.0, 0.0], reduction='sum'):.4f}")
    800.6931
    """
    _check_reduction(reduction)
    z, y, w, p, positive_scale = _binary_terms(logits, target, weight, pos_weight)
    linear = np.where(z < 0, -p * y * z, (1.0 - y) * z)
    losses = w * (positive_scale * np.log1p(np.exp(-np.abs(z))) + linear)
    return _reduce(losses, reduction, float(losses.size))


def sigmoid_binary_cross_entropy_grad(
    logits: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> np.ndarray:
    r"""∂L/∂logits for ``sigmoid_binary_cross_entropy`` with the same arguments.

    From ℓ = w·[(1 − y)·z + L·softplus(−z)] and d softplus(−z)/dz = −σ(−z) = σ(z) − 1:

        ∂ℓ/∂z = w·[(1 − y) + L·(σ(z) − 1)] = w·(L·σ(z) − p·y)

    which is σ(z) − y without weights (p = 1, L = 1). Multiplied by 1/(number of elements) for "mean";
    for "none" each element gets the gradient of its own ℓ.

    Shapes: as ``sigmoid_binary_cross_entropy``; returns an array of the logits' shape.

    >>> print(sigmoid_binary_cross_entropy_grad([0.0, 2.0], [1.0, 1.0], reduction="sum").round(4))
    [-0.5    -0.1192]
    """
    _check_reduction(reduction)
    z, y, w, p, positive_scale = _binary_terms(logits, target, weight, pos_weight)
    grad = w * (positive_scale * _sigmoid(z) - p * y)
    return grad / z.size if reduction == "mean" else grad


# ----------------------------------------------------------------------------------------------------------
# Per-token statistics of the output layer (RL, preference training) and distillation
# ----------------------------------------------------------------------------------------------------------


class LogProbs(NamedTuple):
    """Per-position statistics of softmax(z) for a class-index target y (each of the target's shape)."""

    log_probs: np.ndarray  # log ŷ_y
    entropy: np.ndarray  # H = −Σ_c ŷ_c log ŷ_c
    is_top1: np.ndarray  # y is the first argmax of z (bool)
    log_sum_sq_probs: np.ndarray  # log Σ_c ŷ_c²
    mean_logits: np.ndarray  # (1/C) Σ_c z_c


def _check_temperature(temperature: float) -> None:
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")


def transformed_logits(
    logits: ArrayLike, *, logit_scale: float = 1.0, softcap: float | None = None, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    r"""z = c·tanh(s·l / c) / T (scale s, then softcap c, then temperature T; without a softcap
    z = s·l / T) and its elementwise derivative dz/dl = (s / T)·(1 − tanh²(s·l / c)).

    Shapes: ``logits`` of any shape -> (z, dz/dl) of the same shape.

    >>> z, slope = transformed_logits([2.0], logit_scale=0.5, temperature=2.0)
    >>> print(z, slope)
    [0.5] [0.25]
    """
    _check_softcap(softcap)
    _check_temperature(temperature)
    scaled = _as_float64(logits) * logit_scale
    if softcap is None:
        return scaled / temperature, np.full(scaled.shape, logit_scale / temperature)
    tanh = np.tanh(scaled / softcap)
    return softcap * tanh / temperature, (logit_scale / temperature) * (1.0 - tanh**2)


def _entropy_terms(log_p: np.ndarray) -> np.ndarray:
    """ŷ·log ŷ with 0·log 0 = 0."""
    with np.errstate(invalid="ignore"):
        return np.where(np.exp(log_p) > 0, np.exp(log_p) * log_p, 0.0)


def log_probs(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> LogProbs:
    r"""Per-token log-probability, entropy, top-1 hit, log Σŷ² and mean logit of softmax(z), z the
    :func:`transformed_logits` of ``logits``:

        log ŷ_y = z_y − lse(z),   H = −Σ_c ŷ_c log ŷ_c,   log Σ_c ŷ_c² = lse(2z) − 2·lse(z)

    Every field is 0 (False) where the target equals ``ignore_index``.

    Shapes: ``logits`` (..., C), ``target`` (...) class indices in [0, C) or ``ignore_index``.

    >>> out = log_probs(np.log([[0.5, 0.25, 0.25]]), np.array([0]))
    >>> print(out.log_probs.round(4), out.entropy.round(4), out.is_top1)
    [-0.6931] [1.0397] [ True]
    """
    z, _ = transformed_logits(logits, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    target = np.asarray(target).astype(np.int64)
    counted = target != ignore_index
    safe = np.where(counted, target, 0)
    log_p = log_softmax(z)
    picked = np.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    entropy = -np.sum(_entropy_terms(log_p), axis=-1)
    sum_sq = logsumexp(2.0 * log_p)
    return LogProbs(
        np.where(counted, picked, 0.0),
        np.where(counted, entropy, 0.0),
        counted & (np.argmax(z, axis=-1) == safe),
        np.where(counted, sum_sq, 0.0),
        np.where(counted, z.mean(axis=-1), 0.0),
    )


def log_probs_grad(
    logits: ArrayLike,
    target: ArrayLike,
    grad_log_probs: ArrayLike | None,
    grad_entropy: ArrayLike | None,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> np.ndarray:
    r"""∂L/∂logits for L = Σ g·log ŷ_y + Σ h·H (``grad_log_probs`` g, ``grad_entropy`` h, of the target's
    shape; None for 0), through the softmax Jacobian J = diag(ŷ) − ŷŷᵀ (:func:`softmax_jacobian`):

        ∂ log ŷ_y/∂z = Jᵀ·(e_y / ŷ_y) = e_y − ŷ
        ∂H/∂z = Jᵀ·(−(log ŷ + 1)) = −ŷ ⊙ (log ŷ + H)

    then times dz/dl (:func:`transformed_logits`). Ignored positions get 0.

    >>> grad = log_probs_grad(np.zeros((1, 2)), np.array([0]), np.ones(1), None)
    >>> print(grad)
    [[ 0.5 -0.5]]
    """
    z, slope = transformed_logits(logits, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    target = np.asarray(target).astype(np.int64)
    counted = target != ignore_index
    safe = np.where(counted, target, 0)
    log_p = log_softmax(z)
    jacobian = softmax_jacobian(z)
    # ∂L/∂ŷ, then ∂L/∂z = Jᵀ·∂L/∂ŷ
    grad_probs = np.zeros(z.shape)
    if grad_log_probs is not None:
        g = np.where(counted, _as_float64(grad_log_probs), 0.0)
        one_hot = np.eye(z.shape[-1])[safe]
        with np.errstate(divide="ignore", invalid="ignore"):
            grad_probs += np.where(one_hot > 0, g[..., None] / np.exp(log_p), 0.0)
    if grad_entropy is not None:
        h = np.where(counted, _as_float64(grad_entropy), 0.0)
        with np.errstate(invalid="ignore"):
            grad_probs += h[..., None] * -(np.where(np.isfinite(log_p), log_p, 0.0) + 1.0)
    grad_z = np.einsum("...jk,...j->...k", jacobian, grad_probs)
    return grad_z * slope


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) = Σ p·(log p − log q) over the last axis, 0·log 0 = 0."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def _divergence_terms(log_ps: np.ndarray, log_pt: np.ndarray, divergence: str, beta: float) -> np.ndarray:
    """Per-position divergence (see :func:`distillation_loss`) of log-probabilities (..., C)."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(log_pt, log_ps)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(log_ps, log_pt)
    log_m = np.logaddexp(np.log(beta) + log_pt, np.log1p(-beta) + log_ps)
    return beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)


def _distillation_setup(
    student_logits, teacher_logits, divergence, beta, temperature, target, ignore_index, student, teacher
):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a float in [0, 1], got {beta!r}")
    z_s, slope = transformed_logits(student_logits, temperature=temperature, **student)
    z_t, _ = transformed_logits(teacher_logits, temperature=temperature, **teacher)
    counted = np.ones(z_s.shape[:-1], dtype=bool) if target is None else np.asarray(target) != ignore_index
    return log_softmax(z_s), log_softmax(z_t), slope, counted


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> float | np.ndarray:
    r"""A divergence between the teacher's and the student's next-token distributions, p_t = softmax(z_t)
    and p_s = softmax(z_s) of the :func:`transformed_logits` (each model with its own scale and softcap,
    both at ``temperature``; no T² factor):

        forward_kl = KL(p_t ‖ p_s),   reverse_kl = KL(p_s ‖ p_t),
        jsd = β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m),   m = β·p_t + (1 − β)·p_s

    jsd at β = 0 is forward_kl and at β = 1 reverse_kl (the limits TRL's GKD takes there). Positions whose
    ``target`` equals ``ignore_index`` are left out: "mean" averages over the others (nan if none), "none"
    gives 0 there.

    Shapes: logits (..., C) each; target None or (...). Returns a float, or (...) for "none".

    >>> print(round(distillation_loss(np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]])), 4))
    0.1308
    """
    _check_reduction(reduction)
    log_ps, log_pt, _, counted = _distillation_setup(
        student_logits, teacher_logits, divergence, beta, temperature, target, ignore_index,
        dict(logit_scale=student_logit_scale, softcap=student_softcap),
        dict(logit_scale=teacher_logit_scale, softcap=teacher_softcap),
    )  # fmt: skip
    losses = np.where(counted, _divergence_terms(log_ps, log_pt, divergence, beta), 0.0)
    return _reduce(losses, reduction, float(counted.sum()))


def distillation_loss_grad(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> np.ndarray:
    r"""∂L/∂student_logits of :func:`distillation_loss` (the teacher gets none): with D the divergence as
    a function of p_s, ∂D/∂z_s = Jᵀ·∂D/∂p_s (J = diag(p_s) − p_s p_sᵀ), where

        forward_kl: ∂D/∂p_s = −p_t / p_s            ->  ∂D/∂z_s = p_s − p_t
        reverse_kl: ∂D/∂p_s = log p_s − log p_t + 1  ->  ∂D/∂z_s = p_s ⊙ (log p_s − log p_t − D)
        jsd:        ∂D/∂p_s = (1 − β)·(log p_s − log m)

    then times dz_s/dl (:func:`transformed_logits`). For "none" it is the gradient of the sum.

    >>> grad = distillation_loss_grad(np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]]))
    >>> print(grad.round(4))
    [[ 0.25 -0.25]]
    """
    _check_reduction(reduction)
    log_ps, log_pt, slope, counted = _distillation_setup(
        student_logits, teacher_logits, divergence, beta, temperature, target, ignore_index,
        dict(logit_scale=student_logit_scale, softcap=student_softcap),
        dict(logit_scale=teacher_logit_scale, softcap=teacher_softcap),
    )  # fmt: skip
    p_s, p_t = np.exp(log_ps), np.exp(log_pt)
    with np.errstate(divide="ignore", invalid="ignore"):
        if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
            grad_probs = np.where(p_s > 0, -p_t / p_s, 0.0)
        elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
            grad_probs = np.where(p_s > 0, log_ps - log_pt + 1.0, 0.0)
        else:
            log_m = np.logaddexp(np.log(beta) + log_pt, np.log1p(-beta) + log_ps)
            grad_probs = np.where(p_s > 0, (1.0 - beta) * (log_ps - log_m), 0.0)
    grad_z = np.einsum(
        "...jk,...j->...k", softmax_jacobian(np.where(np.isfinite(log_ps), log_ps, -np.inf)), grad_probs
    )
    grad_z = np.where(counted[..., None], grad_z, 0.0) * slope
    if reduction == "mean":
        grad_z = grad_z / counted.sum()
    return grad_z
