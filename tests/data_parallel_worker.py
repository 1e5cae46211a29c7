"""The fits of tests/test_data_parallel.py, run by the test process (one process) and by every rank of the
Gloo (or NCCL) groups that :func:`softxent.distributed.launch` starts.

Every case builds its data from a shared seed, so the ranks and the one-process run see the same rows; the
test compares what the ranks fitted with the one-process fit. ``rank_checks`` holds the checks that only
make sense inside a group (a seed drawn per rank, data that differ between ranks, a callback that stops on
rank 0 alone, run_on_rank_zero's failure path); its outcomes are returned, not asserted, so that every
rank runs the same collectives to the end.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from sklearn.exceptions import ConvergenceWarning

from softxent.distributed._data_parallel import (
    RankZeroError,
    all_reduce_sum,
    rank_and_world_size,
    run_on_rank_zero,
)
from softxent.estimators import SigmoidClassifier, SoftmaxClassifier
from softxent.estimators._base import BaseClassifier

State = dict[str, Any]


def state(estimator: BaseClassifier) -> State:
    """The fitted attributes a data-parallel fit must reproduce."""
    return {
        "coef_": estimator.coef_,
        "intercept_": estimator.intercept_,
        "hidden_coefs_": list(estimator.hidden_coefs_),
        "hidden_intercepts_": list(estimator.hidden_intercepts_),
        "loss_curve_": np.asarray(estimator.loss_curve_),
        "validation_scores_": estimator.validation_scores_,
        "n_iter_": estimator.n_iter_,
        "t_": estimator.t_,
        "classes_": estimator.classes_,
    }


def _blobs(rng: np.random.Generator, n: int, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.normal(0.0, 2.0, size=(k, d))
    y = rng.integers(0, k, size=n)
    return centers[y] + rng.normal(size=(n, d)), y


def softmax_weighted(seed: int, device: str, group: Any = None) -> State:
    """String labels, sample and balanced class weights; 203 rows in batches of 32 (the last has 11)."""
    rng = np.random.default_rng([seed, 1])
    X, y = _blobs(rng, 203, 6, 4)
    labels = np.array(["ant", "bee", "cat", "dog"])[y]
    weight = rng.uniform(0.2, 3.0, size=len(y))
    model = SoftmaxClassifier(
        solver="sgd",
        batch_size=32,
        max_iter=6,
        tol=None,
        class_weight="balanced",
        device=device,
        random_state=seed,
    )
    return state(model.fit(X, labels, sample_weight=weight, process_group=group))


def softmax_hidden_early_stopping(seed: int, device: str, group: Any = None) -> State:
    """A ReLU layer, label smoothing, sample weights and early stopping on a weighted validation split."""
    rng = np.random.default_rng([seed, 2])
    X, y = _blobs(rng, 161, 5, 3)
    model = SoftmaxClassifier(
        hidden_layer_sizes=(7,),
        label_smoothing=0.1,
        batch_size=20,
        max_iter=12,
        early_stopping=True,
        validation_fraction=0.25,
        n_iter_no_change=3,
        learning_rate="constant",
        eta0=0.05,
        device=device,
        random_state=seed,
    )
    weight = rng.uniform(0.5, 2.0, size=len(y))
    return state(model.fit(X, y, sample_weight=weight, process_group=group))


def softmax_sparse_tiny_batches(seed: int, device: str, group: Any = None) -> State:
    """Sparse CSR rows in order (shuffle=False) in batches of 2, the last of 1 row: with 3 ranks one
    share of every batch is empty. Heavy-ball momentum and the invscaling schedule."""
    rng = np.random.default_rng([seed, 3])
    X, y = _blobs(rng, 37, 8, 3)
    X = sp.csr_matrix(X * (rng.random(X.shape) < 0.4))
    model = SoftmaxClassifier(
        solver="sgd",
        batch_size=2,
        max_iter=3,
        tol=None,
        shuffle=False,
        learning_rate="invscaling",
        momentum=0.5,
        nesterov=False,
        device=device,
        random_state=seed,
    )
    return state(model.fit(X, y, process_group=group))


def softmax_soft_labels_float32(seed: int, device: str, group: Any = None) -> State:
    """float32 features and soft labels (probability rows), 120 rows in batches of 25."""
    rng = np.random.default_rng([seed, 4])
    X, y = _blobs(rng, 120, 6, 4)
    soft = rng.dirichlet(np.ones(4), size=len(y)) * 0.3 + 0.7 * np.eye(4)[y]
    model = SoftmaxClassifier(
        solver="sgd", batch_size=25, max_iter=5, tol=None, device=device, random_state=seed
    )
    return state(model.fit(X.astype(np.float32), soft, process_group=group))


def softmax_partial_fit(seed: int, device: str, group: Any = None) -> State:
    """partial_fit over chunks of 70, 45 and 31 rows in batches of 16, the constant schedule."""
    rng = np.random.default_rng([seed, 5])
    X, y = _blobs(rng, 146, 5, 3)
    model = SoftmaxClassifier(batch_size=16, learning_rate="constant", device=device, random_state=seed)
    for start, stop in ((0, 70), (70, 115), (115, 146)):
        model.partial_fit(X[start:stop], y[start:stop], classes=[0, 1, 2], process_group=group)
    return state(model)


def sigmoid_multilabel(seed: int, device: str, group: Any = None) -> State:
    """A multi-label indicator target with balanced pos_weight and sample weights, 157 rows in 25s."""
    rng = np.random.default_rng([seed, 6])
    X = rng.normal(size=(157, 6))
    Y = (X[:, :3] + 0.5 * rng.normal(size=(157, 3)) > 0.3).astype(np.int64)
    weight = rng.uniform(0.2, 2.0, size=157)
    model = SigmoidClassifier(
        solver="sgd",
        batch_size=25,
        max_iter=5,
        tol=None,
        pos_weight="balanced",
        device=device,
        random_state=seed,
    )
    return state(model.fit(X, Y, sample_weight=weight, process_group=group))


def sigmoid_binary_early_stopping(seed: int, device: str, group: Any = None) -> State:
    """Binary labels, a ReLU layer and early stopping, 99 rows in batches of 16."""
    rng = np.random.default_rng([seed, 7])
    X, y = _blobs(rng, 99, 4, 2)
    model = SigmoidClassifier(
        hidden_layer_sizes=(4,),
        batch_size=16,
        max_iter=10,
        early_stopping=True,
        validation_fraction=0.2,
        n_iter_no_change=2,
        device=device,
        random_state=seed,
    )
    return state(model.fit(X, y, process_group=group))


def softmax_lbfgs_weighted(seed: int, device: str, group: Any = None) -> State:
    """Full-batch L-BFGS: string labels, sample and balanced class weights, 12 iterations (each rank sums
    the objective over its share of the 203 rows, one all-reduce an evaluation)."""
    rng = np.random.default_rng([seed, 9])
    X, y = _blobs(rng, 203, 6, 4)
    labels = np.array(["ant", "bee", "cat", "dog"])[y]
    weight = rng.uniform(0.2, 3.0, size=len(y))
    model = SoftmaxClassifier(
        solver="lbfgs", max_iter=12, tol=None, class_weight="balanced", alpha=1e-2, device=device
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 12 iterations, by design
        return state(model.fit(X, labels, sample_weight=weight, process_group=group))


def sigmoid_lbfgs_sparse(seed: int, device: str, group: Any = None) -> State:
    """Full-batch L-BFGS on sparse CSR multi-label rows, 37 of them (ranks of 12 or 13), float32, 6
    iterations: still descending, where the ranks' differently grouped float32 sums stay a few ulps apart
    (worst 2.2e-7 relative over 64 seeds on 2 and 3 ranks). By 10 iterations the loss moves by 5e-5 an
    iteration, L-BFGS amplifies the rounding, and some seeds drift 4e-6 to 1.3e-5 apart: the float32 RTOL."""
    rng = np.random.default_rng([seed, 10])
    X = sp.csr_matrix((rng.normal(size=(37, 8)) * (rng.random((37, 8)) < 0.5)).astype(np.float32))
    Y = (X[:, :3].toarray() + 0.5 * rng.normal(size=(37, 3)) > 0.2).astype(np.int64)
    model = SigmoidClassifier(solver="lbfgs", max_iter=6, tol=None, alpha=1e-2, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return state(model.fit(X, Y, process_group=group))


CASES: dict[str, Callable[..., State]] = {
    fit.__name__: fit
    for fit in (
        softmax_weighted,
        softmax_hidden_early_stopping,
        softmax_sparse_tiny_batches,
        softmax_soft_labels_float32,
        softmax_partial_fit,
        sigmoid_multilabel,
        sigmoid_binary_early_stopping,
        softmax_lbfgs_weighted,
        sigmoid_lbfgs_sparse,
    )
}


def run_cases(seed: int, device: str = "cpu") -> dict[str, State]:
    """Every case, on the default group when one is initialized (else in this process alone)."""
    return {name: fit(seed, device) for name, fit in CASES.items()}


def _fails_on_rank_zero() -> None:
    raise OSError("disk full")


def rank_checks(seed: int, device: str = "cpu") -> dict[str, Any]:
    """The cases, then the checks that need a group; returns what each found on this rank."""
    rank, world_size = rank_and_world_size()
    found: dict[str, Any] = {"rank": rank, "world_size": world_size, "states": run_cases(seed, device)}

    rng = np.random.default_rng([seed, 8])
    X, y = _blobs(rng, 90, 4, 3)
    # random_state=None: each rank draws a seed, the fit uses rank 0's
    found["unseeded"] = state(
        SoftmaxClassifier(solver="sgd", batch_size=16, max_iter=2, device=device).fit(X, y)
    )
    # data that differ between the ranks: every rank raises, none waits
    try:
        SoftmaxClassifier(max_iter=1, device=device).fit(X[: 80 + rank], y[: 80 + rank])
        found["mismatch"] = None
    except ValueError as error:
        found["mismatch"] = str(error)
    # a callback that asks to stop on rank 0 only stops every rank after the same epoch
    model = SoftmaxClassifier(
        solver="sgd", batch_size=16, max_iter=6, tol=None, device=device, random_state=seed
    )
    model.fit(X, y, callback=lambda fitted, info: rank == 0 and info["epoch"] == 2)
    found["callback_epochs"] = model.n_iter_

    found["shared"] = run_on_rank_zero(lambda: {"from": rank_and_world_size()[0]}, share_result=True)
    found["unshared"] = run_on_rank_zero(lambda: "rank 0 only")
    try:
        run_on_rank_zero(_fails_on_rank_zero)
        found["failure"] = None
    except (OSError, RankZeroError) as error:
        found["failure"] = f"{type(error).__name__}: {error}"
    pieces = [
        torch.full((3,), float(rank), dtype=torch.float64, device=device),
        torch.tensor(10.0 * rank, dtype=torch.float64, device=device),
    ]
    found["sum"] = [t.tolist() for t in all_reduce_sum(pieces)]

    if world_size == 3:
        # an explicit group: ranks 0 and 1 fit together, rank 2 alone in a group of one
        pair, alone = dist.new_group([0, 1]), dist.new_group([2])
        found["subgroup"] = softmax_weighted(seed, device, pair if rank < 2 else alone)
    return found
