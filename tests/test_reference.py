"""The float64 oracle against torch.nn.functional, central finite differences, the chain rule, and the
properties a softmax cross-entropy must have. Inputs are fresh random draws (hypothesis picks the seeds),
never zeros, with awkward class counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close, fresh_seed
from softxent import reference as ref

REDUCTIONS = ("mean", "sum", "none")
LAYOUTS = ("C", "NC", "NCdd")

seeds = st.integers(0, 2**32 - 1)
reductions = st.sampled_from(REDUCTIONS)
layouts = st.sampled_from(LAYOUTS)
class_counts = st.sampled_from([7, 13, 1023])
small_class_counts = st.sampled_from([2, 7, 13])
ignore_indices = st.sampled_from([-100, -1, 2])
label_smoothings = st.one_of(st.just(0.0), st.floats(0.01, 1.0))
ignore_fractions = st.sampled_from([0.0, 0.3])


# Tolerances for helpers.assert_close, which checks |actual − expected| <= tol·(1 + |expected|).
EXACT_TOL = 1e-10  # two float64 evaluations of the same formula in a different order
DIFFERENCES_TOL = 1e-6  # central differences with h = 1e-6: truncation ~h², rounding ~1e-16/h


@pytest.fixture
def np_rng() -> np.random.Generator:
    """A NumPy generator with a fresh seed each run, printed so that a failure can be replayed."""
    seed = fresh_seed(128)
    print(f"numpy generator seed: {seed}")  # shown by pytest when the test fails; SOFTXENT_TEST_SEED replays
    return np.random.default_rng(seed)


def logits_shape_for(rng: np.random.Generator, layout: str, num_classes: int) -> tuple[int, ...]:
    """(C,), (N, C) or (N, C, d1, d2) with small random N, d1, d2."""
    if layout == "C":
        return (num_classes,)
    batch = int(rng.integers(1, 6))
    if layout == "NC":
        return (batch, num_classes)
    d1, d2 = (int(d) for d in rng.integers(1, 4, size=2))
    return (batch, num_classes, d1, d2)


def batch_shape_of(logits_shape: tuple[int, ...]) -> tuple[int, ...]:
    return logits_shape[:1] + logits_shape[2:] if len(logits_shape) >= 2 else ()


def random_logits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.normal(loc=rng.uniform(-2.0, 2.0), scale=rng.uniform(0.5, 4.0), size=shape)


def class_targets(
    rng: np.random.Generator,
    logits_shape: tuple[int, ...],
    ignore_index: int,
    ignore_fraction: float,
    *,
    keep_one: bool = False,
) -> np.ndarray:
    """Integer classes of the batch shape; a fraction set to ignore_index (keep_one: never the first)."""
    num_classes = logits_shape[1] if len(logits_shape) >= 2 else logits_shape[0]
    batch_shape = batch_shape_of(logits_shape)
    target = rng.integers(0, num_classes, size=batch_shape)
    ignored = np.asarray(rng.random(size=batch_shape) < ignore_fraction)  # an array even when 0-d
    if keep_one:
        ignored.reshape(-1)[0] = False
        if target.reshape(-1)[0] == ignore_index:
            target.reshape(-1)[0] = (ignore_index + 1) % num_classes
    return np.where(ignored, ignore_index, target)


def probability_targets(rng: np.random.Generator, logits_shape: tuple[int, ...]) -> np.ndarray:
    """Random distributions over the class axis, in the logits' layout."""
    num_classes = logits_shape[1] if len(logits_shape) >= 2 else logits_shape[0]
    probs = rng.dirichlet(np.full(num_classes, 0.5), size=batch_shape_of(logits_shape))
    return np.moveaxis(probs, -1, 1) if probs.ndim >= 2 else probs


def random_targets(
    rng: np.random.Generator,
    logits_shape: tuple[int, ...],
    kind: str,
    ignore_index: int,
    ignore_fraction: float,
) -> np.ndarray:
    if kind == "probs":
        return probability_targets(rng, logits_shape)
    return class_targets(rng, logits_shape, ignore_index, ignore_fraction, keep_one=True)


def random_class_weight(rng: np.random.Generator, num_classes: int, weighted: bool) -> np.ndarray | None:
    return rng.uniform(0.1, 3.0, size=num_classes) if weighted else None


def torch_cross_entropy(
    logits: np.ndarray, target: np.ndarray, weight: np.ndarray | None, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """torch's loss and, through autograd, the gradient of its sum w.r.t. the logits, in float64."""
    logits_t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    weight_t = None if weight is None else torch.from_numpy(weight)
    loss = F.cross_entropy(logits_t, torch.from_numpy(np.asarray(target)), weight=weight_t, **kwargs)
    loss.sum().backward()
    return loss.detach().numpy(), logits_t.grad.numpy()


def central_differences(
    loss: Callable[[np.ndarray], float], point: np.ndarray, h: float | np.ndarray = 1e-6
) -> np.ndarray:
    """(loss(x + h_i·e_i) − loss(x − h_i·e_i)) / 2h_i for every coordinate i; h is one step for all
    coordinates or one per coordinate."""
    steps = np.broadcast_to(h, point.shape)
    grad = np.empty_like(point)
    for index in np.ndindex(point.shape):
        step = np.zeros_like(point)
        step[index] = steps[index]
        grad[index] = (loss(point + step) - loss(point - step)) / (2.0 * steps[index])
    return grad


def summed(value: float | np.ndarray) -> float:
    """The scalar whose gradient the reference returns: the loss itself, or Σℓ for reduction="none"."""
    return float(np.sum(value))


# 1. Agreement with torch.nn.functional in float64.


@given(
    seed=seeds,
    layout=layouts,
    num_classes=class_counts,
    reduction=reductions,
    weighted=st.booleans(),
    ignore_index=ignore_indices,
    ignore_fraction=ignore_fractions,
    label_smoothing=label_smoothings,
)
def test_cross_entropy_with_class_indices_matches_torch(
    seed: int,
    layout: str,
    num_classes: int,
    reduction: str,
    weighted: bool,
    ignore_index: int,
    ignore_fraction: float,
    label_smoothing: float,
) -> None:
    rng = np.random.default_rng(seed)
    shape = logits_shape_for(rng, layout, num_classes)
    logits = random_logits(rng, shape)
    target = class_targets(rng, shape, ignore_index, ignore_fraction)
    options = {
        "weight": random_class_weight(rng, num_classes, weighted),
        "ignore_index": ignore_index,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
    }
    expected_loss, expected_grad = torch_cross_entropy(logits, target, **options)
    loss = ref.cross_entropy(logits, target, **options)
    assert np.shape(loss) == (batch_shape_of(shape) if reduction == "none" else ())
    assert_close(np.asarray(loss), expected_loss, EXACT_TOL, "loss")
    assert_close(ref.cross_entropy_grad(logits, target, **options), expected_grad, EXACT_TOL, "grad")


@given(
    seed=seeds,
    layout=layouts,
    num_classes=class_counts,
    reduction=reductions,
    weighted=st.booleans(),
    label_smoothing=label_smoothings,
)
def test_cross_entropy_with_probabilities_matches_torch(
    seed: int, layout: str, num_classes: int, reduction: str, weighted: bool, label_smoothing: float
) -> None:
    rng = np.random.default_rng(seed)
    shape = logits_shape_for(rng, layout, num_classes)
    logits = random_logits(rng, shape)
    target = probability_targets(rng, shape)
    options = {
        "weight": random_class_weight(rng, num_classes, weighted),
        "reduction": reduction,
        "label_smoothing": label_smoothing,
    }
    expected_loss, expected_grad = torch_cross_entropy(logits, target, **options)
    assert_close(np.asarray(ref.cross_entropy(logits, target, **options)), expected_loss, EXACT_TOL, "loss")
    assert_close(ref.cross_entropy_grad(logits, target, **options), expected_grad, EXACT_TOL, "grad")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_every_target_ignored_gives_nan_mean_zero_sum_and_zero_gradient_like_torch(
    np_rng: np.random.Generator, weighted: bool, label_smoothing: float
) -> None:
    logits = random_logits(np_rng, (5, 13))
    target = np.full(5, -100)
    weight = random_class_weight(np_rng, 13, weighted)
    for reduction in REDUCTIONS:
        options = {"weight": weight, "reduction": reduction, "label_smoothing": label_smoothing}
        expected_loss, expected_grad = torch_cross_entropy(logits, target, **options)
        loss = ref.cross_entropy(logits, target, **options)
        grad = ref.cross_entropy_grad(logits, target, **options)
        assert_close(np.asarray(loss), expected_loss, EXACT_TOL, "loss")
        assert_close(grad, expected_grad, EXACT_TOL, "grad")
        assert np.all(grad == 0.0)
        if reduction == "mean":
            assert np.isnan(loss)
        else:
            assert np.all(np.asarray(loss) == 0.0)


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_empty_batch_mean_is_nan_like_torch(kind: str) -> None:
    logits = np.empty((0, 7))
    target = np.empty((0, 7)) if kind == "probs" else np.empty(0, dtype=np.int64)
    expected_loss, _ = torch_cross_entropy(logits, target, None)
    assert np.isnan(expected_loss)
    assert np.isnan(ref.cross_entropy(logits, target))
    assert ref.cross_entropy(logits, target, reduction="sum") == 0.0
    assert ref.cross_entropy_grad(logits, target).shape == (0, 7)


def test_ignore_index_that_is_a_class_ignores_that_class_like_torch(np_rng: np.random.Generator) -> None:
    logits = random_logits(np_rng, (40, 7))
    target = np_rng.integers(0, 7, size=40)
    target[:3] = 3
    expected_loss, expected_grad = torch_cross_entropy(logits, target, None, ignore_index=3)
    assert_close(
        np.asarray(ref.cross_entropy(logits, target, ignore_index=3)), expected_loss, EXACT_TOL, "loss"
    )
    grad = ref.cross_entropy_grad(logits, target, ignore_index=3)
    assert_close(grad, expected_grad, EXACT_TOL, "grad")
    assert np.all(grad[target == 3] == 0.0)


@given(
    seed=seeds,
    shape=st.sampled_from([(7,), (5, 13), (3, 7, 4)]),
    reduction=reductions,
    weight_kind=st.sampled_from(["none", "last", "full"]),
    with_pos_weight=st.booleans(),
    hard_labels=st.booleans(),
)
def test_sigmoid_binary_cross_entropy_matches_torch(
    seed: int,
    shape: tuple[int, ...],
    reduction: str,
    weight_kind: str,
    with_pos_weight: bool,
    hard_labels: bool,
) -> None:
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, shape)
    target = (rng.random(shape) < 0.5).astype(np.float64) if hard_labels else rng.random(shape)
    weight = {"none": None, "last": rng.uniform(0.1, 3.0, shape[-1:]), "full": rng.uniform(0.1, 3.0, shape)}
    options = {
        "weight": weight[weight_kind],
        "pos_weight": rng.uniform(0.1, 5.0, shape[-1:]) if with_pos_weight else None,
        "reduction": reduction,
    }
    logits_t = torch.tensor(logits, requires_grad=True)
    torch_options = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    expected = F.binary_cross_entropy_with_logits(logits_t, torch.from_numpy(target), **torch_options)
    expected.sum().backward()
    loss = ref.sigmoid_binary_cross_entropy(logits, target, **options)
    assert_close(np.asarray(loss), expected.detach().numpy(), EXACT_TOL, "loss")
    grad = ref.sigmoid_binary_cross_entropy_grad(logits, target, **options)
    assert_close(grad, logits_t.grad.numpy(), EXACT_TOL, "grad")


def test_sigmoid_binary_cross_entropy_of_nothing_has_nan_mean_like_torch() -> None:
    expected = F.binary_cross_entropy_with_logits(torch.empty(0, dtype=torch.float64), torch.empty(0))
    assert np.isnan(expected.item())
    assert np.isnan(ref.sigmoid_binary_cross_entropy(np.empty(0), np.empty(0)))


@settings(max_examples=30)
@given(seed=seeds, num_classes=class_counts, with_bias=st.booleans(), reduction=reductions)
def test_linear_cross_entropy_matches_torch(
    seed: int, num_classes: int, with_bias: bool, reduction: str
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(11, 17))
    W = rng.normal(scale=0.3, size=(num_classes, 17))
    bias = rng.normal(size=num_classes) if with_bias else None
    target = class_targets(rng, (11, num_classes), -100, 0.3)
    x_t, W_t = torch.tensor(x, requires_grad=True), torch.tensor(W, requires_grad=True)
    bias_t = None if bias is None else torch.tensor(bias, requires_grad=True)
    expected = F.cross_entropy(F.linear(x_t, W_t, bias_t), torch.from_numpy(target), reduction=reduction)
    expected.sum().backward()
    loss, dX, dW, db = ref.linear_cross_entropy(x, W, target, bias, reduction=reduction)
    assert_close(np.asarray(loss), expected.detach().numpy(), EXACT_TOL, "loss")
    assert_close(dX, x_t.grad.numpy(), EXACT_TOL, "dX")
    assert_close(dW, W_t.grad.numpy(), EXACT_TOL, "dW")
    if bias_t is None:
        assert db is None
    else:
        assert_close(db, bias_t.grad.numpy(), EXACT_TOL, "db")


# 2. Every gradient against central finite differences.


@settings(max_examples=40)
@given(
    seed=seeds,
    layout=layouts,
    num_classes=small_class_counts,
    kind=st.sampled_from(["index", "probs"]),
    reduction=reductions,
    weighted=st.booleans(),
    label_smoothing=label_smoothings,
    z_loss=st.sampled_from([0.0, 1e-4, 0.3]),
    softcap=st.sampled_from([None, 1.5, 30.0]),
)
def test_cross_entropy_grad_matches_finite_differences(
    seed: int,
    layout: str,
    num_classes: int,
    kind: str,
    reduction: str,
    weighted: bool,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> None:
    rng = np.random.default_rng(seed)
    shape = logits_shape_for(rng, layout, num_classes)
    logits = random_logits(rng, shape)
    target = random_targets(rng, shape, kind, ignore_index=-100, ignore_fraction=0.3)
    options = {
        "weight": random_class_weight(rng, num_classes, weighted),
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
    }
    numeric = central_differences(lambda z: summed(ref.cross_entropy(z, target, **options)), logits)
    assert_close(ref.cross_entropy_grad(logits, target, **options), numeric, DIFFERENCES_TOL, "grad")


@settings(max_examples=25)
@given(
    seed=seeds,
    batched=st.booleans(),
    with_bias=st.booleans(),
    reduction=reductions,
    weighted=st.booleans(),
    label_smoothing=label_smoothings,
    z_loss=st.sampled_from([0.0, 0.1]),
    softcap=st.sampled_from([None, 2.0]),
)
def test_linear_cross_entropy_grads_match_finite_differences(
    seed: int,
    batched: bool,
    with_bias: bool,
    reduction: str,
    weighted: bool,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> None:
    rng = np.random.default_rng(seed)
    num_classes, dim = 7, 5
    x = rng.normal(size=(4, dim) if batched else (dim,))
    W = rng.normal(size=(num_classes, dim))
    bias = rng.normal(size=num_classes) if with_bias else None
    target = class_targets(rng, (4, num_classes) if batched else (num_classes,), -100, 0.3, keep_one=True)
    options = {
        "weight": random_class_weight(rng, num_classes, weighted),
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
    }
    loss, dX, dW, db = ref.linear_cross_entropy(x, W, target, bias, **options)
    logits = x @ W.T if bias is None else x @ W.T + bias
    assert_close(
        np.asarray(loss), np.asarray(ref.cross_entropy(logits, target, **options)), EXACT_TOL, "loss"
    )

    def loss_at(x_: np.ndarray, W_: np.ndarray, bias_: np.ndarray | None) -> float:
        return summed(ref.linear_cross_entropy(x_, W_, target, bias_, **options)[0])

    assert_close(dX, central_differences(lambda x_: loss_at(x_, W, bias), x), DIFFERENCES_TOL, "dX")
    assert_close(dW, central_differences(lambda W_: loss_at(x, W_, bias), W), DIFFERENCES_TOL, "dW")
    if bias is None:
        assert db is None
    else:
        assert_close(db, central_differences(lambda b_: loss_at(x, W, b_), bias), DIFFERENCES_TOL, "db")


@settings(max_examples=40)
@given(
    seed=seeds,
    shape=st.sampled_from([(7,), (3, 5), (2, 3, 4)]),
    reduction=reductions,
    weighted=st.booleans(),
    with_pos_weight=st.booleans(),
)
def test_sigmoid_binary_cross_entropy_grad_matches_finite_differences(
    seed: int, shape: tuple[int, ...], reduction: str, weighted: bool, with_pos_weight: bool
) -> None:
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, shape)
    target = rng.random(shape)
    options = {
        "weight": rng.uniform(0.1, 3.0, shape) if weighted else None,
        "pos_weight": rng.uniform(0.1, 5.0, shape[-1:]) if with_pos_weight else None,
        "reduction": reduction,
    }
    numeric = central_differences(
        lambda z: summed(ref.sigmoid_binary_cross_entropy(z, target, **options)), logits
    )
    grad = ref.sigmoid_binary_cross_entropy_grad(logits, target, **options)
    assert_close(grad, numeric, DIFFERENCES_TOL, "grad")


def free_probability_loss(
    probs: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    reduction: str,
    label_smoothing: float,
    ignore_index: int = -100,
) -> float | np.ndarray:
    """L(ŷ) = −Σ q·log ŷ for (N, C) probabilities taken as free variables, written from the definition
    of q: w·[(1 − ε)·onehot(y) + ε/C] (zero where ignored), or w·[(1 − ε)·t + ε/C]."""
    num_classes = probs.shape[1]
    class_weight = np.ones(num_classes) if weight is None else weight
    if target.ndim == 2:
        q = class_weight * ((1 - label_smoothing) * target + label_smoothing / num_classes)
        denominator = len(target)
    else:
        counted = target != ignore_index
        one_hot = np.eye(num_classes)[np.where(counted, target, 0)]
        q = (
            class_weight
            * ((1 - label_smoothing) * one_hot + label_smoothing / num_classes)
            * counted[:, None]
        )
        denominator = np.sum(class_weight[target[counted]])
    losses = -np.sum(q * np.log(probs), axis=1)
    return {"none": losses, "sum": np.sum(losses), "mean": np.sum(losses) / denominator}[reduction]


@settings(max_examples=40)
@given(
    seed=seeds,
    num_classes=small_class_counts,
    kind=st.sampled_from(["index", "probs"]),
    reduction=reductions,
    weighted=st.booleans(),
    label_smoothing=label_smoothings,
)
def test_cross_entropy_grad_probs_matches_finite_differences_in_free_probabilities(
    seed: int, num_classes: int, kind: str, reduction: str, weighted: bool, label_smoothing: float
) -> None:
    rng = np.random.default_rng(seed)
    # Unit-scale logits keep every ŷ away from 0, where the differences would be all rounding error.
    logits = rng.normal(size=(4, num_classes))
    probs = ref.softmax(logits)
    target = random_targets(rng, logits.shape, kind, ignore_index=-100, ignore_fraction=0.3)
    options = {
        "weight": random_class_weight(rng, num_classes, weighted),
        "reduction": reduction,
        "label_smoothing": label_smoothing,
    }
    # On the simplex the free-variable loss is the cross-entropy itself.
    assert_close(
        np.asarray(free_probability_loss(probs, target, **options)),
        np.asarray(ref.cross_entropy(logits, target, **options)),
        EXACT_TOL,
        "loss on the simplex",
    )
    # A step relative to each probability keeps it inside (0, 1) and the rounding error small.
    numeric = central_differences(
        lambda p: summed(free_probability_loss(p, target, **options)), probs, h=1e-5 * probs
    )
    analytic = ref.cross_entropy_grad_probs(probs, target, **options)
    assert_close(analytic, numeric, DIFFERENCES_TOL, "grad w.r.t. probabilities")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_grad_probs_matches_torch_nll_loss_of_free_probabilities(
    np_rng: np.random.Generator, layout: str, reduction: str
) -> None:
    shape = logits_shape_for(np_rng, layout, 13)
    class_axis = 1 if len(shape) >= 2 else 0
    probs = ref.softmax(random_logits(np_rng, shape), axis=class_axis)
    target = class_targets(np_rng, shape, -100, 0.3, keep_one=True)
    weight = np_rng.uniform(0.1, 3.0, 13)
    probs_t = torch.tensor(probs, requires_grad=True)
    expected = F.nll_loss(
        torch.log(probs_t), torch.from_numpy(target), weight=torch.from_numpy(weight), reduction=reduction
    )
    expected.sum().backward()
    grad = ref.cross_entropy_grad_probs(probs, target, weight, reduction=reduction)
    assert_close(grad, probs_t.grad.numpy(), EXACT_TOL, "grad w.r.t. probabilities")


# 3. The chain rule through the softmax Jacobian.


@given(
    seed=seeds,
    layout=layouts,
    num_classes=st.sampled_from([2, 7, 13, 131]),
    kind=st.sampled_from(["index", "probs"]),
    reduction=reductions,
    weighted=st.booleans(),
    label_smoothing=label_smoothings,
)
def test_softmax_jacobian_carries_probability_gradient_to_logit_gradient(
    seed: int,
    layout: str,
    num_classes: int,
    kind: str,
    reduction: str,
    weighted: bool,
    label_smoothing: float,
) -> None:
    rng = np.random.default_rng(seed)
    shape = logits_shape_for(rng, layout, num_classes)
    class_axis = 1 if len(shape) >= 2 else 0
    logits = random_logits(rng, shape)
    target = random_targets(rng, shape, kind, ignore_index=-100, ignore_fraction=0.3)
    options = {
        "weight": random_class_weight(rng, num_classes, weighted),
        "reduction": reduction,
        "label_smoothing": label_smoothing,
    }
    grad_probs = ref.cross_entropy_grad_probs(ref.softmax(logits, axis=class_axis), target, **options)
    jacobian = ref.softmax_jacobian(np.moveaxis(logits, class_axis, -1))
    chained = np.einsum("...jk,...j->...k", jacobian, np.moveaxis(grad_probs, class_axis, -1))
    expected = ref.cross_entropy_grad(logits, target, **options)
    assert_close(np.moveaxis(chained, -1, class_axis), expected, EXACT_TOL, "Jᵀ·∂L/∂ŷ")


@given(seed=seeds, num_classes=st.sampled_from([1, 2, 7, 13, 131]))
def test_softmax_jacobian_is_symmetric_with_zero_row_sums_and_matches_finite_differences(
    seed: int, num_classes: int
) -> None:
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, (3, num_classes))
    jacobian = ref.softmax_jacobian(logits)
    probs = ref.softmax(logits)
    assert jacobian.shape == (3, num_classes, num_classes)
    np.testing.assert_array_equal(jacobian, np.swapaxes(jacobian, -1, -2))
    assert_close(jacobian.sum(axis=-1), np.zeros((3, num_classes)), 1e-13, "row sums")
    assert_close(np.diagonal(jacobian, axis1=-2, axis2=-1), probs * (1 - probs), 1e-15, "diagonal")
    # Row k of the differences is ∂ŷ/∂z_k, that is column k of the Jacobian.
    h = 1e-6
    steps = h * np.eye(num_classes)
    numeric = (ref.softmax(logits[0] + steps) - ref.softmax(logits[0] - steps)) / (2 * h)
    assert_close(jacobian[0], numeric.T, DIFFERENCES_TOL, "jacobian")


# 4. Properties.


@given(
    seed=seeds,
    layout=layouts,
    num_classes=class_counts,
    kind=st.sampled_from(["index", "probs"]),
    weighted=st.booleans(),
    label_smoothing=label_smoothings,
)
def test_loss_and_gradient_are_invariant_to_a_per_position_shift(
    seed: int, layout: str, num_classes: int, kind: str, weighted: bool, label_smoothing: float
) -> None:
    rng = np.random.default_rng(seed)
    shape = logits_shape_for(rng, layout, num_classes)
    class_axis = 1 if len(shape) >= 2 else 0
    logits = random_logits(rng, shape)
    shift = np.expand_dims(rng.uniform(-50.0, 50.0, size=batch_shape_of(shape)), class_axis)
    target = random_targets(rng, shape, kind, ignore_index=-100, ignore_fraction=0.3)
    options = {
        "weight": random_class_weight(rng, num_classes, weighted),
        "reduction": "none",
        "label_smoothing": label_smoothing,
    }
    loss = ref.cross_entropy(logits, target, **options)
    assert_close(ref.cross_entropy(logits + shift, target, **options), loss, EXACT_TOL, "loss")
    grad = ref.cross_entropy_grad(logits, target, **options)
    assert_close(ref.cross_entropy_grad(logits + shift, target, **options), grad, EXACT_TOL, "grad")


@given(
    seed=seeds,
    num_classes=class_counts,
    kind=st.sampled_from(["index", "probs"]),
    reduction=reductions,
    weighted=st.booleans(),
    label_smoothing=label_smoothings,
    z_loss=st.sampled_from([0.0, 0.3]),
)
def test_gradient_rows_sum_to_the_z_loss_term(
    seed: int,
    num_classes: int,
    kind: str,
    reduction: str,
    weighted: bool,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """Σ_k [(Σq + 2·z_loss·lse)·ŷ_k − q_k] = 2·z_loss·lse: zero without z-loss, with or without weights."""
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, (6, num_classes))
    target = random_targets(rng, logits.shape, kind, ignore_index=-100, ignore_fraction=0.3)
    options = {
        "weight": random_class_weight(rng, num_classes, weighted),
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
    }
    grad = ref.cross_entropy_grad(logits, target, **options)
    counted = np.ones(6, dtype=bool) if kind == "probs" else target != -100
    class_weight = options["weight"] if weighted else np.ones(num_classes)
    denominator = 6 if kind == "probs" else np.sum(class_weight[target[counted]])
    scale = 1 / denominator if reduction == "mean" else 1.0
    expected = 2 * z_loss * ref.logsumexp(logits) * counted * scale
    assert_close(grad.sum(axis=1), expected, 1e-14, "row sums")


@given(seed=seeds, num_classes=st.sampled_from([1, 7, 13, 1023]), scale=st.sampled_from([1.0, 30.0, 1e4]))
def test_softmax_rows_are_distributions_and_log_softmax_is_their_log(
    seed: int, num_classes: int, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(3, num_classes, 2))
    probs = ref.softmax(logits, axis=1)
    assert np.all(probs >= 0.0)
    assert_close(probs.sum(axis=1), np.ones((3, 2)), 1e-13, "row sums")
    log_probs = ref.log_softmax(logits, axis=1)
    assert np.all(np.isfinite(log_probs))
    np.testing.assert_array_equal(np.exp(log_probs), probs)
    expected = torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()
    assert_close(log_probs, expected, EXACT_TOL, "log_softmax")


@given(seed=seeds, num_classes=class_counts)
def test_logsumexp_matches_the_naive_formula_and_torch(seed: int, num_classes: int) -> None:
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, (4, num_classes))
    assert_close(ref.logsumexp(logits), np.log(np.sum(np.exp(logits), axis=-1)), EXACT_TOL, "lse")
    expected = torch.logsumexp(torch.from_numpy(logits), dim=0).numpy()
    assert_close(ref.logsumexp(logits, axis=0), expected, EXACT_TOL, "lse over axis 0")
    huge = logits + 1e5  # exp overflows without the shift
    assert_close(ref.logsumexp(huge), ref.logsumexp(logits) + 1e5, 1e-15, "lse of huge logits")


def test_logsumexp_of_infinities() -> None:
    logits = np.array([[-np.inf, -np.inf, -np.inf], [-np.inf, 0.0, -np.inf], [1.0, np.inf, 2.0]])
    np.testing.assert_array_equal(ref.logsumexp(logits), [-np.inf, 0.0, np.inf])


@given(
    seed=seeds,
    num_classes=class_counts,
    kind=st.sampled_from(["index", "probs"]),
    z_loss=st.sampled_from([0.0, 1e-4]),
    softcap=st.sampled_from([None, 30.0]),
)
def test_logits_of_magnitude_1e4_give_finite_loss_and_gradient(
    seed: int, num_classes: int, kind: str, z_loss: float, softcap: float | None
) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.choice([-1e4, 1e4], size=(5, num_classes)) + rng.normal(size=(5, num_classes))
    target = random_targets(rng, logits.shape, kind, ignore_index=-100, ignore_fraction=0.0)
    options = {"label_smoothing": 0.1, "z_loss": z_loss, "softcap": softcap}
    loss = ref.cross_entropy(logits, target, **options)
    grad = ref.cross_entropy_grad(logits, target, **options)
    assert np.isfinite(loss)
    assert np.all(np.isfinite(grad))
    if z_loss == 0.0 and softcap is None:
        expected_loss, expected_grad = torch_cross_entropy(logits, target, None, label_smoothing=0.1)
        assert_close(np.asarray(loss), expected_loss, EXACT_TOL, "loss")
        assert_close(grad, expected_grad, EXACT_TOL, "grad")


@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_minus_infinity_non_target_logit_costs_nothing_and_gets_zero_gradient(
    np_rng: np.random.Generator, z_loss: float
) -> None:
    logits = random_logits(np_rng, (4, 7))
    logits[:, 3] = -np.inf
    target = np.array([0, 1, 2, 6])
    loss = ref.cross_entropy(logits, target, reduction="none", z_loss=z_loss)
    grad = ref.cross_entropy_grad(logits, target, z_loss=z_loss)
    assert np.all(np.isfinite(loss))
    assert np.all(np.isfinite(grad))
    assert np.all(grad[:, 3] == 0.0)
    kept = np.delete(logits, 3, axis=1)
    kept_target = np.array([0, 1, 2, 5])
    without = ref.cross_entropy(kept, kept_target, reduction="none", z_loss=z_loss)
    assert_close(loss, without, EXACT_TOL, "loss without the class")
    if z_loss == 0.0:
        expected_loss, expected_grad = torch_cross_entropy(logits, target, None, reduction="none")
        assert_close(loss, expected_loss, EXACT_TOL, "loss")
        assert_close(grad, expected_grad / 4, EXACT_TOL, "grad")


def test_minus_infinity_target_logit_gives_infinite_loss(np_rng: np.random.Generator) -> None:
    logits = random_logits(np_rng, (3, 13))
    logits[1, 5] = -np.inf
    target = np.array([0, 5, 12])
    loss = ref.cross_entropy(logits, target, reduction="none")
    assert loss[1] == np.inf
    assert np.all(np.isfinite(loss[[0, 2]]))
    assert ref.cross_entropy(logits, target) == np.inf


# Rows at the edges of float64: logits of 1e200 (lse² overflows), ±1e4, −inf masks, a row of only −inf
EXTREME_LOGITS = np.array(
    [
        [1e200, 0.0, -3.0],
        [0.0, 1e200, 5.0],
        [-1e200, -1e200, 0.0],
        [1e4, -1e4, 0.0],
        [-np.inf, 2.0, 1.0],
        [-np.inf, -np.inf, -np.inf],
    ]
)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("target", [np.array([1, 1, 0, 1, 0, 2]), np.array([1, -100, 0, 1, -100, 2])])
def test_oracle_gives_torchs_values_at_the_extremes(
    target: np.ndarray, label_smoothing: float, reduction: str
) -> None:
    """Finite logits whose lse exceeds 1.3e154 give torch's finite loss (z_loss·lse² is not 0·inf), and a row
    of only −inf logits torch's nan: the oracle is at least as robust as torch."""
    options = {"reduction": reduction, "label_smoothing": label_smoothing}
    loss = ref.cross_entropy(EXTREME_LOGITS, target, z_loss=0.0, **options)
    grad = ref.cross_entropy_grad(EXTREME_LOGITS, target, z_loss=0.0, **options)
    logits = torch.tensor(EXTREME_LOGITS, requires_grad=True)
    expected = F.cross_entropy(logits, torch.tensor(target), **options)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    counted = target != -100
    if reduction == "none":  # torch's smoothing term reaches an ignored −inf row's loss (inf, not 0)
        assert_close(np.asarray(loss)[counted], expected.detach().numpy()[counted], EXACT_TOL, "loss")
    elif counted.all():
        assert_close(np.asarray(loss), expected.detach().numpy(), EXACT_TOL, "loss")
    # ignored rows: the oracle's gradient is exactly 0 (torch's is nan on the −inf row)
    assert_close(grad[counted], expected_grad.numpy()[counted], EXACT_TOL, "grad")
    assert np.all(grad[~counted] == 0.0)


def test_z_loss_of_an_overflowing_lse_is_infinite_not_nan() -> None:
    loss = ref.cross_entropy(EXTREME_LOGITS[:1], np.array([1]), z_loss=1e-4, reduction="none")
    assert loss[0] == np.inf
    grad = ref.cross_entropy_grad(EXTREME_LOGITS[:1], np.array([1]), z_loss=1e-4)
    assert not np.isnan(grad).any()


@given(seed=seeds, shape=st.sampled_from([(7,), (5, 13), (3, 1023)]))
def test_sigmoid_binary_cross_entropy_grad_is_sigmoid_minus_target_and_stable(
    seed: int, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.choice([-1e4, 1e4], size=shape) * rng.random(shape)
    target = rng.random(shape)
    grad = ref.sigmoid_binary_cross_entropy_grad(logits, target, reduction="sum")
    assert_close(grad, torch.sigmoid(torch.from_numpy(logits)).numpy() - target, EXACT_TOL, "σ(z) − y")
    loss = ref.sigmoid_binary_cross_entropy(logits, target, reduction="none")
    assert np.all(np.isfinite(loss))
    assert np.all(loss >= -1e-12 * np.abs(logits))  # ℓ >= 0 up to rounding, for y in [0, 1]


def test_return_types_follow_the_reduction(np_rng: np.random.Generator) -> None:
    logits = random_logits(np_rng, (7,))
    target = np.asarray(3)
    assert isinstance(ref.cross_entropy(logits, target), float)
    assert isinstance(ref.cross_entropy(logits, target, reduction="sum"), float)
    unreduced = ref.cross_entropy(logits, target, reduction="none")
    assert isinstance(unreduced, np.ndarray)
    assert unreduced.shape == ()
    assert ref.cross_entropy_grad(logits, target).shape == (7,)


# 5. Error messages.

CROSS_ENTROPY_FUNCTIONS = [ref.cross_entropy, ref.cross_entropy_grad, ref.cross_entropy_grad_probs]


@pytest.mark.parametrize("function", CROSS_ENTROPY_FUNCTIONS)
def test_unknown_reduction_is_rejected(function: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match=r"reduction: expected 'mean', 'sum' or 'none', got 'avg'"):
        function(np.ones((2, 3)), np.array([0, 1]), reduction="avg")


@pytest.mark.parametrize(
    "function", [ref.sigmoid_binary_cross_entropy, ref.sigmoid_binary_cross_entropy_grad]
)
def test_unknown_reduction_is_rejected_for_binary_cross_entropy(function: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match=r"reduction: expected 'mean', 'sum' or 'none', got 'max'"):
        function(np.ones(3), np.ones(3), reduction="max")


def test_unknown_reduction_is_rejected_for_linear_cross_entropy() -> None:
    with pytest.raises(ValueError, match=r"reduction: expected .* got 'total'"):
        ref.linear_cross_entropy(np.ones((2, 4)), np.ones((3, 4)), np.array([0, 1]), reduction="total")


@pytest.mark.parametrize("function", CROSS_ENTROPY_FUNCTIONS)
@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5, float("nan")])
def test_label_smoothing_outside_unit_interval_is_rejected(
    function: Callable[..., Any], label_smoothing: float
) -> None:
    with pytest.raises(ValueError, match=r"label_smoothing: expected a float in \[0, 1\], got"):
        function(np.ones((2, 3)), np.array([0, 1]), label_smoothing=label_smoothing)


@pytest.mark.parametrize("function", [ref.cross_entropy, ref.cross_entropy_grad])
@pytest.mark.parametrize("softcap", [0.0, -1.0])
def test_non_positive_softcap_is_rejected(function: Callable[..., Any], softcap: float) -> None:
    with pytest.raises(ValueError, match=rf"softcap: expected None or a float > 0, got {softcap}"):
        function(np.ones((2, 3)), np.array([0, 1]), softcap=softcap)


@pytest.mark.parametrize(
    "target",
    [np.array([0, 1, 2]), np.zeros((2, 4)), np.array([0.0, 1.0]), np.zeros((2, 3), dtype=np.int64)],
    ids=["indices-too-long", "probs-wrong-shape", "float-indices", "integer-probs"],
)
def test_target_of_the_wrong_shape_or_kind_is_rejected(target: np.ndarray) -> None:
    with pytest.raises(
        ValueError,
        match=r"target: expected integer class indices of shape \(2,\) or floating probabilities of "
        r"shape \(2, 3\), got",
    ):
        ref.cross_entropy(np.ones((2, 3)), target)


@pytest.mark.parametrize("bad_class", [3, -1])
def test_class_index_out_of_range_is_rejected(bad_class: int) -> None:
    with pytest.raises(ValueError, match=rf"target: expected class indices in \[0, 3\) .* got {bad_class}"):
        ref.cross_entropy_grad(np.ones((2, 3)), np.array([0, bad_class]))


def test_weight_of_the_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\) \(one per class\), got \(4,\)"):
        ref.cross_entropy(np.ones((2, 3)), np.array([0, 1]), weight=np.ones(4))


def test_linear_weight_of_the_wrong_shape_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"W: expected shape \(C, 4\) to match x of shape \(2, 4\), got \(3, 5\)"
    ):
        ref.linear_cross_entropy(np.ones((2, 4)), np.ones((3, 5)), np.array([0, 1]))


def test_binary_target_of_the_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"target: expected the logits' shape \(2, 3\), got \(3,\)"):
        ref.sigmoid_binary_cross_entropy_grad(np.ones((2, 3)), np.ones(3))
