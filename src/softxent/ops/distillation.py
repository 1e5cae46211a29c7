r"""Distillation: a divergence between a teacher's and a student's next-token distributions, on logits or
through both models' linear heads without forming either model's (N, V) logits.

With p_s = softmax(z_s), p_t = softmax(z_t) (each z its model's :class:`~softxent.ops.log_probs.Transform`
of its logits, both at one temperature), per position:

.. math::
    \mathrm{forward\_kl} = KL(p_t ‖ p_s), \quad ∂/∂z_s = p_s - p_t

    \mathrm{reverse\_kl} = KL(p_s ‖ p_t), \quad ∂/∂z_s = p_s ⊙ (\log p_s - \log p_t - KL)

    \mathrm{jsd} = β·KL(p_t ‖ m) + (1 - β)·KL(p_s ‖ m), \quad m = β p_t + (1 - β) p_s, \quad
    ∂/∂z_s = (1 - β)\,p_s ⊙ (\log p_s - \log m - KL(p_s ‖ m))

(the softmax Jacobian applied to ∂D/∂p_s; :func:`softxent.reference.distillation_loss_grad`), times
dz_s/dl. jsd at β = 0 is forward_kl and at β = 1 reverse_kl, as TRL's GKD takes them. The teacher gets no
gradient.

A chunk of rows holds every class of its rows, so both normalizers are known before the mixture: every
divergence is one pass over the chunk. Through the heads that is the student's and the teacher's logits
(2·N·D_s·V + 2·N·D_t·V FLOPs) and, for a reduced loss, dX and dW in the same pass (4·N·D_s·V): the
gradient is made in the forward pass as :mod:`softxent.ops.chunks`' heads make it, and backward scales it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from softxent.ops import chunks
from softxent.ops.log_probs import Transform
from softxent.ops.spec import compute_dtype

if TYPE_CHECKING:  # the backends module imports these blocks
    from softxent.ops.backends import Backend

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class Divergence:
    """Which divergence (``kind`` in DIVERGENCES, ``beta`` for "jsd") between the distributions of the
    ``student`` and ``teacher`` transforms (their temperatures equal); ``ignore_index`` marks positions
    left out (with a target)."""

    kind: str
    beta: float
    student: Transform
    teacher: Transform
    ignore_index: int

    @property
    def form(self) -> str:
        """The divergence actually computed: jsd at β = 0 and 1 is forward_kl and reverse_kl."""
        if self.kind == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        return self.kind


def _log_softmax(z: Tensor) -> Tensor:
    """(z − m) − log Σ e^{z − m} over the last dimension (in place on ``z``, which the caller owns)."""
    z = z.sub_(z.amax(-1, keepdim=True))
    return z.sub_(z.exp().sum(-1, keepdim=True).log_())


def _owned(z: Tensor, logits: Tensor) -> Tensor:
    return z.clone() if z is logits else z


def _plogq(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p·(log p − log q) per row, 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def divergence_block(
    student: Tensor,
    teacher: Tensor,
    divergence: Divergence,
    counted: Tensor | None,
    *,
    grad_scale: Tensor | None = None,
    grad_out: Tensor | None = None,
) -> Tensor:
    """The per-row divergence (B,) of one block of student and teacher logits (B, V) in the compute dtype,
    0 where ``counted`` (B,) is False; with ``grad_scale`` (0-d or (B,)), writes grad_scale·∂D/∂l_s into
    ``grad_out`` (B, V) (may alias ``student``)."""
    ct = compute_dtype(student.dtype)
    z_s, slope = divergence.student.apply(student, ct)
    log_ps = _log_softmax(_owned(z_s, student))
    log_pt = _log_softmax(_owned(divergence.teacher.apply(teacher, ct)[0], teacher))
    form, beta = divergence.form, divergence.beta
    if form == "forward_kl":
        loss = _plogq(log_pt, log_ps)
    elif form == "reverse_kl":
        loss = _plogq(log_ps, log_pt)
    else:
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        student_term = _plogq(log_ps, log_m)
        loss = beta * _plogq(log_pt, log_m) + (1.0 - beta) * student_term
    if counted is not None:
        loss = torch.where(counted, loss, 0.0)
    if grad_scale is None:
        return loss
    probs = log_ps.exp()
    if form == "forward_kl":
        grad = probs.sub_(log_pt.exp_())
    elif form == "reverse_kl":
        gap = log_ps.sub_(log_pt).sub_(loss.unsqueeze(-1))
        grad = torch.where(probs > 0, probs * gap, 0.0)
    else:
        gap = log_ps.sub_(log_m).sub_(student_term.unsqueeze(-1))
        grad = torch.where(probs > 0, probs * gap, 0.0).mul_(1.0 - beta)
    scale = grad_scale.to(ct)
    if counted is not None:
        scale = torch.where(counted, scale, 0.0)
    grad.mul_(scale.unsqueeze(-1) if scale.dim() else scale)
    if not (isinstance(slope, float) and slope == 1.0):
        grad.mul_(slope)
    grad_out.copy_(grad)
    return loss


def _counted(target: Tensor | None, ignore_index: int) -> Tensor | None:
    return None if target is None else target != ignore_index


def divergence_rows(
    student: Tensor,
    teacher: Tensor,
    target: Tensor | None,
    divergence: Divergence,
    backend: Backend,
    *,
    grad_scale: Tensor | None = None,
    grad_out: Tensor | None = None,
) -> Tensor:
    """The backend's divergence block (:func:`divergence_block`'s contract) over the row blocks of its
    policy: (N, V) logits, ``grad_scale`` 0-d or (N,)."""
    rows, columns = student.shape
    loss = torch.empty(rows, dtype=compute_dtype(student.dtype), device=student.device)
    counted = _counted(target, divergence.ignore_index)
    for start, stop in backend.policy.row_blocks(rows, columns):
        scale = grad_scale if grad_scale is None or grad_scale.dim() == 0 else grad_scale[start:stop]
        loss[start:stop] = backend.divergence_block(
            student[start:stop], teacher[start:stop], divergence,
            None if counted is None else counted[start:stop], grad_scale=scale,
            grad_out=None if grad_out is None else grad_out[start:stop],
        )  # fmt: skip
    return loss


def eager_divergence(
    student: Tensor, teacher: Tensor, target: Tensor | None, divergence: Divergence
) -> Tensor:
    """The per-position divergence of (N, V) logits in differentiable torch ops (0 where not counted)."""
    ct = compute_dtype(student.dtype)
    log_ps = torch.log_softmax(divergence.student.eager(student.to(ct)), -1)
    log_pt = torch.log_softmax(divergence.teacher.eager(teacher.detach().to(ct)), -1)

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)

    form, beta = divergence.form, divergence.beta
    if form == "forward_kl":
        loss = kl(log_pt, log_ps)
    elif form == "reverse_kl":
        loss = kl(log_ps, log_pt)
    else:
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        loss = beta * kl(log_pt, log_m) + (1.0 - beta) * kl(log_ps, log_m)
    counted = _counted(target, divergence.ignore_index)
    return loss if counted is None else torch.where(counted, loss, 0.0)


def denominator(
    target: Tensor | None, rows: int, ignore_index: int, ct, device
) -> tuple[Tensor, Tensor | bool]:
    """ "mean"'s denominator: the positions that count, and whether any does."""
    if target is None:
        return torch.tensor(float(rows), dtype=ct, device=device), rows > 0
    count = (target != ignore_index).sum()
    return count.to(ct), count > 0


@dataclass(frozen=True)
class DistillationHead:
    """The divergence through both models' linear heads, one chunk of rows at a time (the head protocol
    of :func:`softxent.ops.autograd.linear_head` on the student's (x, W, b, target), the teacher's
    ``teacher_input`` (N, D_t), ``teacher_weight`` (V, D_t), ``teacher_bias`` given here). Each chunk's
    teacher logits go to a second buffer of the chunk's size. Rows whose target is ignored are dropped
    before the matmuls (CPU tensors)."""

    divergence: Divergence
    reduction: str
    chunk_rows: int | None
    backend: Backend
    teacher_input: Tensor | None = None
    teacher_weight: Tensor | None = None
    teacher_bias: Tensor | None = None

    def _kept(self, target: Tensor | None) -> Tensor | None:
        if target is None or target.device.type != "cpu":
            return None
        counted = target != self.divergence.ignore_index
        return None if bool(counted.all()) else counted.nonzero().squeeze(1)

    def run(self, x, linear_weight, linear_bias, target, *, grad_scale, needs):
        need_dx, need_dw, need_db, _ = needs
        kept = self._kept(target)
        teacher_x = self.teacher_input
        if kept is not None:
            x, teacher_x, target = x[kept], teacher_x[kept], target[kept]
            if grad_scale is not None and grad_scale.dim():
                grad_scale = grad_scale[kept]
        buffers: list[Tensor] = []

        def block(logits, start, stop, scale, grad_out, _):
            if not buffers:
                buffers.append(
                    torch.empty(logits.shape[0], logits.shape[1], dtype=teacher_x.dtype, device=x.device)
                )
            teacher = buffers[0][: stop - start]
            bias = self.teacher_bias
            if bias is not None:
                torch.addmm(bias, teacher_x[start:stop], self.teacher_weight.t(), out=teacher)
            else:
                torch.mm(teacher_x[start:stop], self.teacher_weight.t(), out=teacher)
            block_target = None if target is None else target[start:stop]
            return divergence_rows(
                logits, teacher, block_target, self.divergence, self.backend, grad_scale=scale,
                grad_out=grad_out,
            )  # fmt: skip

        loss, grad_x, grad_weight, grad_bias, _ = chunks.linear_head_pass(
            x, linear_weight, linear_bias, block, loss_shape=(x.shape[0],), grad_scale=grad_scale,
            need_dx=need_dx, need_dw=need_dw, need_db=need_db, target_grad_like=None,
            chunk_rows=self.chunk_rows, policy=self.backend.policy,
        )  # fmt: skip
        if kept is not None:
            rows = self.teacher_input.shape[0]
            loss = loss.new_zeros(rows).index_copy_(0, kept, loss)
            if grad_x is not None:
                grad_x = grad_x.new_zeros(rows, grad_x.shape[1]).index_copy_(0, kept, grad_x)
        return loss, grad_x, grad_weight, grad_bias, None

    def denominator(self, target: Tensor | None, ct) -> tuple[Tensor, Tensor | bool]:
        return denominator(
            target, self.teacher_input.shape[0], self.divergence.ignore_index, ct, self.teacher_input.device
        )


def eager_linear_divergence(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor | None,
    teacher_x: Tensor, teacher_weight: Tensor, teacher_bias: Tensor | None, divergence: Divergence,
) -> Tensor:  # fmt: skip
    """The per-position divergence through both heads in differentiable torch ops (the logits formed)."""
    ct = compute_dtype(x.dtype)
    student = F.linear(x.to(ct), weight.to(ct), None if bias is None else bias.to(ct))
    teacher = F.linear(
        teacher_x.to(ct), teacher_weight.to(ct), None if teacher_bias is None else teacher_bias.to(ct)
    )
    return eager_divergence(student, teacher, target, divergence)
