r"""The minibatch SGD solver, apart from the models it trains (as scikit-learn keeps ``_plain_sgd`` apart
from ``SGDClassifier``): the learning-rate schedule, the step (torch's SGD with momentum), one epoch over
the data (data-parallel too), scikit-learn's stopping rule, and the state that carries over from one epoch
to the next and that a :class:`~softxent.estimators.Checkpoint` holds.

The solver knows nothing of the model's head: the estimator hands :meth:`SGD.run_epoch` a
:data:`BatchGradient`, which returns Σ_{i ∈ B} s_i·ℓ_i over a batch B and adds its gradient, divided by
a given denominator, to the parameters' ``.grad`` (by autograd or in closed form, as the model sees
fit), and s̄, the mean row weight over the training data; each step follows the gradient of

.. math::
    \frac{1}{|B|\,\bar s} \sum_{i \in B} s_i\,ℓ_i

plus the weight decay α·W of the L2 penalty α/2·‖W‖² on the weight matrices (parameters named
``*.weight``; biases, ``*.bias``, are not penalized).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softxent.distributed._data_parallel import ReplicaGroup, sum_gradients
from softxent.estimators._data import Data

LEARNING_RATES = ("constant", "invscaling", "cosine")

BatchGradient = Callable[[dict[str, Tensor], Tensor, Tensor, Tensor | None, float], Tensor]
"""``batch_gradient(params, X, target, sample_weight, denominator)``: Σ_i s_i·ℓ_i over the batch's rows
as a 0-d tensor (no graph), having added its gradient divided by ``denominator`` to each parameter's
``.grad``."""


@dataclasses.dataclass(frozen=True)
class EpochMark:
    """The step count, parameters and momentum buffers at the start of an epoch (:meth:`SGDState.mark`)."""

    t: int
    params: dict[str, Tensor]
    momentum_buffers: dict[str, Tensor]


@dataclasses.dataclass
class SGDState:
    """What SGD carries from one step and one epoch to the next: the step count ``t``, the momentum
    buffers, the seed of the shuffling, and the stopping rule's counters and best weights (early
    stopping). A checkpoint holds all of it (:meth:`checkpoint_tensors`, :meth:`checkpoint_info`)."""

    seed: int
    t: int = 0
    momentum_buffers: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    best_loss: float = math.inf
    best_score: float = -math.inf
    no_improvement: int = 0
    best: dict[str, Tensor] | None = None
    done: bool = False

    def move_to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Put the momentum buffers on the device and in the dtype of this call's data."""
        self.momentum_buffers = {k: v.to(device, dtype) for k, v in self.momentum_buffers.items()}

    def mark(self, params: Mapping[str, Tensor]) -> EpochMark:
        """Copies of what an epoch changes (the parameters, the momentum buffers, the step count), to
        :meth:`rewind` to when the epoch is cut short."""
        with torch.no_grad():
            return EpochMark(
                self.t,
                {k: v.detach().clone() for k, v in params.items()},
                {k: v.clone() for k, v in self.momentum_buffers.items()},
            )

    def rewind(self, params: Mapping[str, Tensor], mark: EpochMark) -> None:
        """Put ``params`` (in place) and this state back as they were at ``mark``."""
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(mark.params[name])
                param.grad = None
        self.t = mark.t
        self.momentum_buffers = mark.momentum_buffers

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """``momentum/<name>`` for each buffer, ``best/<name>`` for each best weight, on the CPU."""
        tensors = {f"momentum/{k}": v.detach().cpu().clone() for k, v in self.momentum_buffers.items()}
        if self.best is not None:
            tensors.update({f"best/{k}": v.detach().cpu().clone() for k, v in self.best.items()})
        return tensors

    def checkpoint_info(self) -> dict[str, Any]:
        """The rest of the state in JSON form (an infinite best as None)."""
        return {
            "t": int(self.t),
            "seed": int(self.seed),
            "best_loss": _finite_or_none(self.best_loss),
            "best_score": _finite_or_none(self.best_score),
            "no_improvement": int(self.no_improvement),
            "done": bool(self.done),
        }

    def restore(
        self, info: Mapping[str, Any], tensors: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        """Continue from a checkpoint's ``info`` and (checked) ``tensors``; the seed stays this state's."""
        self.t = int(info["t"])
        self.momentum_buffers = {
            k.removeprefix("momentum/"): v.to(device, dtype)
            for k, v in tensors.items()
            if k.startswith("momentum/")
        }
        best = {
            k.removeprefix("best/"): v.to(device, dtype) for k, v in tensors.items() if k.startswith("best/")
        }
        self.best_loss = math.inf if info["best_loss"] is None else info["best_loss"]
        self.best_score = -math.inf if info["best_score"] is None else info["best_score"]
        self.no_improvement = int(info["no_improvement"])
        self.best = best or None
        self.done = bool(info["done"])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the rows in epoch ``epoch``: a permutation of range(n) drawn from (``seed``, ``epoch``)
    alone, so a resumed fit and every data-parallel rank draw the same one.

    torch's randperm on the CPU, seeded through NumPy's SeedSequence: 0.6-0.9 ms for 150k rows against
    1.4 ms for NumPy's Generator.permutation (about 3% of an SGD epoch of the 150k x 200, 20-class
    benchmark).
    """
    (key,) = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)
    generator = torch.Generator().manual_seed(int(key))
    dtype = torch.int32 if n < 2**31 else torch.int64  # int32 is the faster draw (0.55 against 0.7 ms)
    return torch.randperm(n, generator=generator, dtype=dtype).numpy()


def checkpoint_tensor_shapes(
    shapes: Mapping[str, tuple[int, ...]], names: object
) -> dict[str, tuple[int, ...]]:
    """The tensors of a checkpoint whose parameters have ``shapes``: ``param/<name>`` for each, and
    ``momentum/<name>`` and ``best/<name>`` for each or for none (as ``names``, the stored ones, have)."""
    expected = {f"param/{name}": shape for name, shape in shapes.items()}
    for group in ("momentum", "best"):
        if any(str(name).startswith(f"{group}/") for name in names):
            expected.update({f"{group}/{name}": shape for name, shape in shapes.items()})
    return expected


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclasses.dataclass(frozen=True)
class SGD:
    """The solver's settings: the estimator's parameters of the same names, as given (see
    :class:`~softxent.estimators.SoftmaxClassifier`)."""

    learning_rate: str
    eta0: float
    power_t: float
    momentum: float
    nesterov: bool
    alpha: float
    batch_size: int | str
    shuffle: bool
    tol: float | None
    n_iter_no_change: int

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SGD:
        """The settings among an estimator's ``get_params()``."""
        return cls(**{field.name: params[field.name] for field in dataclasses.fields(cls)})

    def learning_rate_at(self, step: int, progress: float) -> float:
        """η at optimizer step ``step`` (0-based); ``progress`` is the planned training done, in [0, 1].

        constant: η₀; invscaling: η₀ / (step + 1)^power_t; cosine: η₀·(1 + cos(π·progress))/2.
        """
        if self.learning_rate == "constant":
            return float(self.eta0)
        if self.learning_rate == "invscaling":
            return float(self.eta0) / (step + 1) ** float(self.power_t)
        return float(self.eta0) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def batch_rows(self, n_samples: int) -> int:
        """Rows per step: ``batch_size``, or for "auto" n/32 clipped to [128, 4096] (at least 32 steps an
        epoch on large data, batches big enough to keep the matmuls efficient), never more than n."""
        if self.batch_size == "auto":
            return min(n_samples, max(128, min(4096, n_samples // 32)))
        return min(int(self.batch_size), n_samples)

    def step(self, params: dict[str, Tensor], state: SGDState, lr: float) -> None:
        """One step of SGD with momentum μ (torch.optim.SGD's update, in its order of operations, so the
        numbers are torch's bit for bit) and weight decay α on the weight matrices only, from the gradients
        in ``params``' ``.grad`` (cleared after); the momentum buffers live in ``state``:

            g ← ∇ + α·w (weights only),  v ← g (first step) or μ·v + g,  d ← g + μ·v (Nesterov) or v,
            w ← w − η·d.

        Written out rather than calling torch.optim.sgd.sgd: its per-call dispatch (device and foreach
        checks, list handling) and torch.no_grad's context took 66 µs of a 1.3 ms step inside an epoch on
        the 2-core CPU, these few in-place calls on detached views about 30 µs. The class torch.optim.SGD
        would also import torch._dynamo, 2 s of start-up for every fit in a fresh process.
        """
        momentum, alpha = float(self.momentum), float(self.alpha)
        buffers = state.momentum_buffers
        for name, param in params.items():
            grad, param.grad = param.grad, None
            weight = param.detach()  # updated in place, outside autograd (no_grad's context costs more)
            if alpha and name.endswith(".weight"):
                grad.add_(weight, alpha=alpha)
            if momentum:
                buffer = buffers.get(name)
                if buffer is None:
                    buffer = buffers[name] = torch.clone(grad).detach()
                else:
                    buffer.mul_(momentum).add_(grad)
                grad = grad.add(buffer, alpha=momentum) if self.nesterov else buffer
            weight.add_(grad, alpha=-lr)

    def run_epoch(
        self,
        state: SGDState,
        data: Data,
        params: dict[str, Tensor],
        batch_gradient: BatchGradient,
        weight_mean: float,
        epoch: int,
        planned_epochs: int,
        replicas: ReplicaGroup,
    ) -> tuple[float, float]:
        """One pass over ``data`` (epoch ``epoch``, 0-based, of ``planned_epochs``, which the cosine
        schedule spans), updating ``params`` in place and ``state``; returns the epoch's mean weighted data
        loss Σ_i s_i·ℓ_i / (n·s̄) (one host read) and the learning rate of its last step.

        Each step's gradient is that of Σ_{i ∈ B} s_i·ℓ_i / (|B|·s̄) over the batch B, s̄ =
        ``weight_mean``. Data-parallel (P = ``replicas.size`` > 1), every rank draws the same batches, takes
        the gradient over its own share B_r of each (still divided by the whole |B|·s̄) and one all-reduce
        sums the P gradients and loss sums: every rank gets the one-process gradient of B and takes the
        same step. A rank whose share is empty (|B| < P) contributes zeros.
        """
        n = data.n
        batch_size = self.batch_rows(n)
        order = epoch_order(state.seed, epoch, n) if self.shuffle else None
        starts = range(0, n, batch_size)
        shares = [replicas.share(start, min(start + batch_size, n)) for start in starts]
        total = torch.zeros((), dtype=data.dtype, device=data.device)
        for index, (start, batch) in enumerate(zip(starts, data.batches(order, shares), strict=True)):
            stop = min(start + batch_size, n)
            lr = self.learning_rate_at(state.t, (epoch + index / len(starts)) / planned_epochs)
            if batch is not None:
                X, target, sample_weight = batch
                denominator = (stop - start) * weight_mean
                loss_sum = batch_gradient(params, X, target, sample_weight, denominator)
            else:
                loss_sum = torch.zeros((), dtype=data.dtype, device=data.device)
            if replicas.size > 1:
                (loss_sum,) = sum_gradients(params.values(), loss_sum, group=replicas.group)
            self.step(params, state, lr)
            total += loss_sum
            state.t += 1
        return float(total) / (n * weight_mean), lr

    def update_stopping(
        self, state: SGDState, loss: float, score: float | None, params: Mapping[str, Tensor]
    ) -> bool:
        """scikit-learn's rule after an epoch with objective ``loss`` (and validation ``score``, with early
        stopping, whose best ``params`` it keeps): stop after n_iter_no_change epochs without the
        validation score rising by more than tol (early_stopping) or the training loss falling by more
        than tol. Returns (and sets) ``state.done``."""
        if score is not None:
            if self.tol is not None and score < state.best_score + self.tol:
                state.no_improvement += 1
            else:
                state.no_improvement = 0
            if score > state.best_score:
                state.best_score = score
                state.best = {k: v.detach().clone() for k, v in params.items()}
        else:
            if self.tol is not None and loss > state.best_loss - self.tol:
                state.no_improvement += 1
            else:
                state.no_improvement = 0
            state.best_loss = min(state.best_loss, loss)
        state.done = self.tol is not None and state.no_improvement >= self.n_iter_no_change
        return state.done
