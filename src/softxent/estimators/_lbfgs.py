r"""The full-batch solver: L-BFGS with a strong-Wolfe line search, on the whole training objective.

For the linear model the objective

.. math::
    f(W, b) = \frac{1}{S} \sum_i s_i\,ℓ_i + \frac{α}{2} \|W\|^2, \qquad S = \sum_i s_i,

is convex, so L-BFGS reaches its minimum, as scikit-learn's ``LogisticRegression(solver="lbfgs")`` does
(the same objective with α = 1 / (C·S)). This module knows nothing of softmax or sigmoid: it minimizes a
function of a dict of tensors through SciPy's L-BFGS-B (the code scikit-learn's lbfgs solver runs, with
the same options), which hands a float64 vector to :func:`minimize`'s ``value_and_grad`` and gets the
value and gradient back; the tensors stay on their device in their dtype, and only the parameters and
their gradient cross to the host, once per evaluation. SciPy's L-BFGS-B measured better than
``torch.optim.LBFGS(line_search_fn="strong_wolfe")`` on scikit-learn's bundled data sets: the same
iterations as LogisticRegression and coefficients within 2e-6 of it, where torch's took up to 3× the
iterations (digits: 406 against 139) and stopped 1e-5 away (benchmarks/RESULTS.md, issue 16).

Stopping is scikit-learn's: the largest component of the gradient at most ``tol`` (``gtol``), or the
objective's relative decrease in an iteration at most 64 machine epsilons, or ``max_iter`` iterations
(then the result says it did not converge, and the estimator warns).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import scipy.optimize
import threadpoolctl
import torch
from torch import Tensor

# scikit-learn's LogisticRegression passes these to L-BFGS-B: line-search steps an iteration and the
# relative-decrease tolerance (64 float64 epsilons).
MAX_LINE_SEARCH = 50
RELATIVE_DECREASE = 64 * np.finfo(np.float64).eps


@functools.cache
def _threadpools() -> threadpoolctl.ThreadpoolController:
    """The process's thread pools, found once (a scan of the loaded libraries: 3 ms a fit otherwise)."""
    return threadpoolctl.ThreadpoolController()


@dataclasses.dataclass(frozen=True)
class Result:
    """How a minimization ended. n_iter: iterations; n_evaluations: objective evaluations (each a pass
    over the data); converged: a tolerance stopped it (not max_iter, not a failed line search);
    stopped: ``on_iteration`` stopped it; message: SciPy's reason; loss: the objective at the parameters
    returned."""

    n_iter: int
    n_evaluations: int
    converged: bool
    stopped: bool
    message: str
    loss: float


def minimize(
    value_and_grad: Callable[[], float],
    params: dict[str, Tensor],
    *,
    max_iter: int,
    tol: float,
    on_iteration: Callable[[int, float], bool] | None = None,
) -> Result:
    """Minimize ``value_and_grad`` over ``params`` in place with L-BFGS-B; the parameters end at the best
    point found.

    Args:
        value_and_grad: evaluates the objective at the current ``params`` and sets each one's ``.grad``
            to its gradient; returns the objective as a float.
        params: the tensors to optimize (any device, float32 or float64), updated in place.
        max_iter: iterations at most. tol: stop when max |∂f/∂θ| <= tol.
        on_iteration: called as ``on_iteration(iteration, loss)`` after each iteration (1-based);
            returning True stops there.
    """
    names = list(params)
    sizes = [params[name].numel() for name in names]
    bounds = np.cumsum([0, *sizes])
    evaluations = 0

    def assign(theta: np.ndarray) -> None:
        with torch.no_grad():
            for name, start, stop in zip(names, bounds[:-1], bounds[1:], strict=True):
                tensor = params[name]
                tensor.copy_(torch.from_numpy(theta[start:stop]).view(tensor.shape))

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal evaluations
        evaluations += 1
        assign(theta)
        for tensor in params.values():
            tensor.grad = None
        value = value_and_grad()
        grads = [params[name].grad for name in names]
        flat = torch.cat([g.detach().reshape(-1).to(torch.float64) for g in grads]).cpu().numpy()
        return value, flat

    iteration = 0
    stopped = False

    def callback(intermediate_result: scipy.optimize.OptimizeResult) -> None:  # SciPy reads the name
        nonlocal iteration, stopped
        iteration += 1
        if on_iteration is not None and on_iteration(iteration, float(intermediate_result.fun)):
            stopped = True
            raise StopIteration

    theta0 = torch.cat([params[name].detach().reshape(-1).to(torch.float64) for name in names]).cpu().numpy()
    # L-BFGS-B's vector updates run on SciPy's OpenBLAS, whose idle threads spin between calls and take
    # the cores from torch's matmuls: 17x slower fits of iris on 2 cores (0.26 s against 0.015 s).
    with _threadpools().limit(limits=1, user_api="blas"):
        result = scipy.optimize.minimize(
            fun,
            theta0,
            jac=True,
            method="L-BFGS-B",
            callback=callback,
            options={
                "maxiter": max_iter,
                "maxls": MAX_LINE_SEARCH,
                "gtol": tol,
                "ftol": RELATIVE_DECREASE,
            },
        )
    assign(result.x)
    for tensor in params.values():
        tensor.grad = None
    return Result(
        n_iter=int(result.nit),
        n_evaluations=evaluations,
        converged=bool(result.success),
        stopped=stopped,
        message=str(result.message),
        loss=float(result.fun),
    )
