r"""What each loss computes, independent of device and backend: the loss specs, target preparation, the
online-softmax row statistics, "mean"'s denominator and the reductions.

Softmax cross-entropy, per position with logits z ∈ R^C (after the optional softcap z ← s·tanh(z/s)):

.. math::
    \mathrm{lse} = \log Σ_c e^{z_c}, \quad ŷ = e^{z - \mathrm{lse}}, \quad
    ℓ = -Σ_c q_c (z_c - \mathrm{lse}) + λ\,\mathrm{lse}^2, \quad
    \frac{∂ℓ}{∂z} = (Σ_c q_c + 2λ\,\mathrm{lse})\,ŷ - q

with q_c = (1 − ε)·w_y·1[c = y] + (ε/C)·w_c for a class index y (q = 0 for an ignored position) and
q_c = w_c·((1 − ε)·t_c + ε/C) for probabilities t; that is ŷ − y for a one-hot target without weights.
Sigmoid binary cross-entropy, with L = 1 + (p − 1)·y:

.. math::
    ℓ = w\,[(1 - y)\,z + L\,\mathrm{softplus}(-z)], \quad \frac{∂ℓ}{∂z} = w\,(L\,σ(z) - p\,y)

which is σ(z) − y without weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from softxent import _validate as check


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class SoftmaxLoss:
    """What the softmax cross-entropy computes beyond the plain loss (all already validated).

    weight: (C,) class weights in the compute dtype, or None.
    """

    weight: Tensor | None
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None


@dataclass(frozen=True)
class SigmoidLoss:
    """Elementwise weight (broadcastable to the logits) and pos_weight (broadcastable to the last dim)."""

    weight: Tensor | None
    pos_weight: Tensor | None


def softmax_loss(
    weight: Tensor | None,
    num_classes: int,
    device: torch.device,
    ct: torch.dtype,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> SoftmaxLoss:
    """The :class:`SoftmaxLoss` of a call's arguments: checks the class weights, z_loss and softcap
    (ignore_index and label_smoothing come checked) and casts the weights to the compute dtype ``ct``."""
    class_weight = check.check_class_weight(weight, num_classes, device)
    return SoftmaxLoss(
        weight=None if class_weight is None else class_weight.to(ct),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=check.check_z_loss(z_loss),
        softcap=check.check_softcap(softcap),
    )


def class_last(t: Tensor) -> Tensor:
    """(N, C, d1, ..., dk) -> (N, d1, ..., dk, C) as a view."""
    return t.movedim(1, -1) if t.dim() > 2 else t


# ----------------------------------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------------------------------


def mean_denominator(
    target: Tensor, spec: SoftmaxLoss, num_classes: int, ct: torch.dtype
) -> tuple[Tensor, Tensor | bool]:
    """torch's weighted-mean denominator and whether any position counts.

    Class indices: Σ_{non-ignored} w_y (their number without weights). Probabilities: the number of
    positions. Returns a 0-d tensor in the compute dtype and a flag that is False when nothing counts
    (a 0-d bool tensor where it depends on the target's values: no host read, so no GPU sync).
    """
    if target.is_floating_point():
        positions = target.numel() // num_classes if num_classes else 0
        return torch.tensor(float(positions), dtype=ct, device=target.device), positions > 0
    counted = target != spec.ignore_index
    if spec.weight is None:
        count = counted.sum()
        return count.to(ct), count > 0
    safe = torch.where(counted, target, 0)
    return torch.where(counted, spec.weight[safe].to(ct), 0.0).sum(), counted.any()


def reduction_scale(
    reduction: str, denominator: Tensor, anything_counts: Tensor | bool, ct: torch.dtype
) -> Tensor:
    """The factor that turns the gradient of Σℓ into the gradient of the reduced loss.

    torch gives zero gradients when every target is ignored (and a nan loss for "mean"), so the scale
    is 0 then rather than 1/0 (chosen on the device: no host read).
    """
    if reduction != "mean":
        return torch.ones((), dtype=ct)
    scale = 1.0 / denominator.to(ct)
    return torch.where(torch.as_tensor(anything_counts, device=scale.device), scale, torch.zeros_like(scale))


def reduce(loss: Tensor, reduction: str, denominator: Tensor) -> Tensor:
    """The per-position ``loss`` reduced as ``reduction`` says ("mean" divides by ``denominator``)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / denominator.to(total)


# ----------------------------------------------------------------------------------------------------------
# Targets and online-softmax statistics (the vocabulary-sliced and vocabulary-parallel heads)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """The target of every row, prepared once: class indices (with the hard term) or probabilities.

    target: (N,) int64 indices or (N, C') probabilities; counted: (N,) bool, rows that count (class targets:
    not ignored and in [0, C)); hard: (N,) (1 − ε)·w_y for counted rows, else 0 (None for probabilities);
    out_of_range: (N,) bool, class targets outside [0, C) (GPU targets are not range-checked on the host);
    first_column: the class of the probabilities' column 0 (a vocabulary shard's offset; else 0, C' = C).
    """

    target: Tensor
    counted: Tensor
    hard: Tensor | None
    out_of_range: Tensor | None
    first_column: int = 0

    @property
    def probabilities(self) -> bool:
        return self.hard is None

    def rows(self, start: int, stop: int) -> Targets:
        def part(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[start:stop]

        return Targets(
            self.target[start:stop],
            self.counted[start:stop],
            part(self.hard),
            part(self.out_of_range),
            self.first_column,
        )

    def columns(self, start: int, stop: int) -> Tensor:
        """The probabilities of classes start:stop, (N, stop − start)."""
        return self.target[:, start - self.first_column : stop - self.first_column]

    @classmethod
    def prepare(
        cls, target: Tensor, spec: SoftmaxLoss, num_classes: int, ct: torch.dtype, first_column: int = 0
    ) -> Targets:
        if target.is_floating_point():
            counted = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
            return cls(target, counted, None, None, first_column)
        not_ignored = target != spec.ignore_index
        out_of_range = not_ignored & ((target < 0) | (target >= num_classes))
        counted = not_ignored & ~out_of_range
        safe = torch.where(counted, target, 0)
        target_weight = spec.weight[safe] if spec.weight is not None else torch.ones((), dtype=ct)
        hard = torch.where(counted, (1.0 - spec.label_smoothing) * target_weight.to(ct), 0.0)
        return cls(target, counted, hard, out_of_range)


@dataclass
class RowStats:
    """Running per-row statistics of an online softmax, each (N,) in the compute dtype.

    m: running max of the logits seen so far; sum_exp: Σ exp(z − m); q_sum: Σ q; q_dot: Σ q·(z − m);
    z_y: the true class's (softcapped) logit, once its slice has been seen (class-index targets).
    """

    m: Tensor
    sum_exp: Tensor
    q_sum: Tensor
    q_dot: Tensor
    z_y: Tensor

    def rows(self, start: int, stop: int) -> RowStats:
        """Views of rows start:stop (updating them updates these statistics)."""
        return RowStats(*(t[start:stop] for t in (self.m, self.sum_exp, self.q_sum, self.q_dot, self.z_y)))

    @classmethod
    def empty(cls, rows: int, dtype: torch.dtype, device: torch.device) -> RowStats:
        zeros = [torch.zeros(rows, dtype=dtype, device=device) for _ in range(4)]
        return cls(torch.full((rows,), float("-inf"), dtype=dtype, device=device), *zeros)


def mass_shift(q_sum: Tensor, rise: Tensor) -> Tensor:
    """Σq·(m_new − m_old) when a row's running max rises by ``rise``: 0 where either is 0 (an infinite class
    weight makes Σq inf, and inf·0 would be nan where torch's loss is inf)."""
    return torch.where((q_sum == 0.0) | (rise == 0.0), 0.0, q_sum * rise)


def softmax_shift(stats: RowStats) -> tuple[Tensor, Tensor]:
    """(m, log Σexp) per row, for ŷ = exp((z − m) − log Σexp) in the gradient pass.

    The two are kept apart rather than summed into lse = m + log Σexp: lse rounds to an ulp of its size
    (1e-3 for logits near 1e4 in float32), an error exp would carry into every ŷ, while z − m is exact
    there and log Σexp is small. A row with no finite logit has no distribution: m is 0 there and log Σexp
    nan, so its ŷ and gradient are nan, as torch's are.
    """
    m = torch.where(stats.m == float("-inf"), 0.0, stats.m)
    log_sum_exp = stats.sum_exp.log()
    return m, torch.where(log_sum_exp == float("-inf"), float("nan"), log_sum_exp)


def finish(stats: RowStats, targets: Targets, spec: SoftmaxLoss) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, coeff) from the statistics of every slice: O(N) work.

    loss = (Σq)·log Σexp − Σq·(z − m) + λ·lse² (0 for ignored rows, nan for class targets outside [0, C)),
    the true class's term kept whole as (1 − ε)·w_y·(log Σexp − (z_y − m)) (torch's w_y·(−log ŷ_y), inf for
    an infinite w_y); coeff = Σq + 2λ·lse, the factor of ŷ in ∂ℓ/∂z.
    """
    log_sum_exp = stats.sum_exp.log()
    lse = stats.m + log_sum_exp
    q_sum = stats.q_sum
    loss = q_sum * log_sum_exp - stats.q_dot
    if targets.hard is not None:
        hard = targets.hard
        loss = loss + torch.where(hard == 0.0, 0.0, hard * (log_sum_exp - (stats.z_y - stats.m)))
        q_sum = q_sum + hard
    coeff = q_sum
    if spec.z_loss > 0:
        loss = loss + spec.z_loss * lse * lse
        coeff = coeff + 2.0 * spec.z_loss * lse
    loss = torch.where(targets.counted, loss, 0.0)
    if targets.out_of_range is not None:
        loss = torch.where(targets.out_of_range, float("nan"), loss)
    return loss, lse, coeff
