r"""Per-token statistics of the softmax output layer: log ŷ_y and the entropy with their gradients, plus the
top-1 hit, log Σŷ² and the mean logit (RL, preference training and their logging), on logits or through a
linear head whose (N, V) logits are never formed.

For logits l, z = c·tanh(s·l/c)/T (:class:`Transform`), ŷ = softmax(z) and a class-index target y:

.. math::
    \log ŷ_y = (z_y - m) - \log Σ_c e^{z_c - m}, \qquad H = \log Σ_c e^{z_c - m} - Σ_c ŷ_c (z_c - m),

    \frac{∂ \log ŷ_y}{∂z} = e_y - ŷ, \qquad \frac{∂H}{∂z} = -ŷ ⊙ (\log ŷ + H)

(both from the softmax Jacobian diag(ŷ) − ŷŷᵀ; see :func:`softxent.reference.log_probs_grad`), times
dz/dl = (s/T)·(1 − tanh²(s·l/c)). The incoming gradients g (of log ŷ_y) and h (of H) are per token and are
known only in backward, so the logits' gradient G = g·(e_y − ŷ) − h·ŷ ⊙ (log ŷ + H) cannot be formed in
the forward pass: the forward keeps per-row (m, log Σexp, H), O(N), and backward forms each chunk's logits
again. Through a linear head that is 2·N·D·V FLOPs forward and 6·N·D·V backward (logits, dX, dW).

A frozen head (only x needs a gradient, as under LoRA) instead forms dX of log ŷ_y in the forward pass,
(e_y − ŷ)·slope·W per chunk, and backward scales it by g: 4·N·D·V FLOPs in all, two vocabulary-sized
matmuls. An entropy gradient on top of that costs one recompute of the logits and their dX in backward.

The per-block math here is in torch ops (any device); :mod:`softxent.ops.triton.log_probs` has it as
Triton kernels. The ops run their backend's blocks, cutting rows as its policy says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from softxent import _validate as check
from softxent.ops import chunks
from softxent.ops.policy import Policy
from softxent.ops.slices import slice_backward, slice_logits, vocabulary_slices
from softxent.ops.spec import compute_dtype

if TYPE_CHECKING:  # the backends module imports these blocks
    from softxent.ops.backends import Backend

# The columns of the per-row statistics the forward pass produces; the first five are the op's outputs.
STATS = ("log_probs", "entropy", "is_top1", "log_sum_sq_probs", "mean_logits", "m", "log_sum_exp")
OUTPUTS = STATS[:5]


@dataclass(frozen=True)
class Transform:
    """z = softcap·tanh(logit_scale·l / softcap) / temperature (without a softcap,
    z = logit_scale·l / temperature): scale, then softcap, then temperature, as TRL applies them."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def apply(self, logits: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor | float]:
        """(z, dz/dl) in the compute dtype ``ct``; dz/dl is a float without a softcap. Never writes into
        ``logits``."""
        z = logits.to(ct)
        scale = self.logit_scale / self.temperature
        if self.softcap is None:
            return (z * scale if scale != 1.0 else z), scale
        tanh = torch.tanh(z * (self.logit_scale / self.softcap))
        slope = (1.0 - tanh * tanh).mul_(scale)
        return tanh.mul_(self.softcap / self.temperature), slope

    def eager(self, logits: Tensor) -> Tensor:
        """z as a differentiable composition (for second derivatives and forward mode)."""
        z = logits * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature


def _target_rows(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(counted (B,), safe (B, 1)): the rows whose target is not ignored, and the target, 0 where ignored."""
    counted = target != ignore_index
    return counted, torch.where(counted, target, 0).unsqueeze(-1)


def stats_block(
    logits: Tensor, target: Tensor, transform: Transform, ignore_index: int, grad_out: Tensor | None = None
) -> Tensor:
    """The statistics of one block of rows, (B, len(STATS)) in the compute dtype (``is_top1`` as 0/1);
    the five outputs are 0 for ignored rows. With ``grad_out`` (B, V), also writes ∂ log ŷ_y/∂l =
    (e_y − ŷ)·dz/dl there (0 for ignored rows; may alias ``logits``).

    Reads the block once; the other passes run over it while it is in cache.
    """
    ct = compute_dtype(logits.dtype)
    z, slope = transform.apply(logits, ct)
    counted, safe = _target_rows(target, ignore_index)
    row_max = z.amax(-1, keepdim=True)
    shifted = z - row_max
    exp = shifted.exp()
    sum_exp = exp.sum(-1)
    log_sum_exp = sum_exp.log()
    log_prob = shifted.gather(-1, safe).squeeze(-1) - log_sum_exp
    # H = log Σexp − Σ ŷ·(z − m); a −inf logit has ŷ = 0 and adds nothing
    entropy = log_sum_exp - torch.where(exp > 0, exp * shifted, 0.0).sum(-1) / sum_exp
    # log Σ ŷ² = log Σ e^{2(z − m)} − 2·log Σ e^{z − m}
    log_sum_sq = torch.linalg.vecdot(exp, exp).log() - 2.0 * log_sum_exp
    is_top1 = (z.argmax(-1) == safe.squeeze(-1)).to(ct)
    mean = z.mean(-1)
    outputs = [torch.where(counted, t, 0.0) for t in (log_prob, entropy, is_top1, log_sum_sq, mean)]
    if grad_out is not None:
        grad = exp.div_(sum_exp.unsqueeze(-1)).neg_()  # −ŷ
        grad.scatter_add_(-1, safe, torch.ones_like(safe, dtype=ct))
        grad.mul_(counted.unsqueeze(-1))
        if not (isinstance(slope, float) and slope == 1.0):
            grad.mul_(slope)
        grad_out.copy_(grad)
    return torch.stack([*outputs, row_max.squeeze(-1), log_sum_exp], dim=-1)


def grad_block(
    logits: Tensor,
    target: Tensor,
    transform: Transform,
    ignore_index: int,
    row_max: Tensor,
    log_sum_exp: Tensor,
    entropy: Tensor,
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
    grad_out: Tensor,
) -> None:
    """Write ∂L/∂l = [g·(e_y − ŷ) − h·ŷ ⊙ (log ŷ + H)]·dz/dl for one block into ``grad_out`` (B, V) (may
    alias ``logits``), g = ``grad_log_probs``, h = ``grad_entropy`` ((B,) or None for none), both masked to
    0 on ignored rows; ``row_max``, ``log_sum_exp``, ``entropy`` (B,) from :func:`stats_block`. ŷ is
    exp((z − m) − log Σexp), exact where lse itself would round (logits near ±1e4)."""
    ct = compute_dtype(logits.dtype)
    z, slope = transform.apply(logits, ct)
    counted, safe = _target_rows(target, ignore_index)
    log_p = z.sub_(row_max.unsqueeze(-1)) if z is not logits else z - row_max.unsqueeze(-1)
    log_p.sub_(log_sum_exp.unsqueeze(-1))
    probs = log_p.exp()
    if grad_entropy is not None:
        h = torch.where(counted, grad_entropy.to(ct), 0.0).unsqueeze(-1)
        grad = torch.where(probs > 0, probs * (log_p + entropy.unsqueeze(-1)), 0.0).mul_(-h)
        if grad_log_probs is not None:
            g = torch.where(counted, grad_log_probs.to(ct), 0.0).unsqueeze(-1)
            grad.sub_(probs.mul_(g))
    else:
        g = torch.where(counted, grad_log_probs.to(ct), 0.0).unsqueeze(-1)
        grad = probs.mul_(-g)
    if grad_log_probs is not None:
        grad.scatter_add_(-1, safe, g)
    if not (isinstance(slope, float) and slope == 1.0):
        grad.mul_(slope)
    grad_out.copy_(grad)


def _blocks(policy: Policy, rows: int, columns: int) -> list[tuple[int, int]]:
    return policy.row_blocks(rows, columns)


def _cut(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if t is None else t[start:stop]


# ----------------------------------------------------------------------------------------------------------
# On logits (N, V)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitsLogProbs:
    """The statistics of (N, V) logits, in the row blocks of the backend's policy (tensors (logits,
    target))."""

    transform: Transform
    ignore_index: int
    backend: Backend
    row_args: ClassVar[tuple[int, ...]] = (0, 1)  # the tensors with a row per position (vmap folds them)

    def forward(self, tensors: Sequence[Tensor | None], needs) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        logits, target = tensors
        check.check_class_values(target, logits.shape[1], self.ignore_index)
        stats = torch.empty(
            logits.shape[0], len(STATS), dtype=compute_dtype(logits.dtype), device=logits.device
        )
        for start, stop in _blocks(self.backend.policy, *logits.shape):
            stats[start:stop] = self.backend.log_prob_stats(
                logits[start:stop], target[start:stop], self.transform, self.ignore_index
            )
        return stats, ()

    def backward(self, tensors, stats: Tensor, state, grad_log_probs, grad_entropy, needs):
        logits, target = tensors
        grad = torch.empty_like(logits)
        for start, stop in _blocks(self.backend.policy, *logits.shape):
            self.backend.log_prob_grad(
                logits[start:stop], target[start:stop], self.transform, self.ignore_index,
                *(stats[start:stop, STATS.index(name)] for name in ("m", "log_sum_exp", "entropy")),
                _cut(grad_log_probs, start, stop), _cut(grad_entropy, start, stop), grad[start:stop],
            )  # fmt: skip
        return grad, None

    def eager(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return eager_log_probs(
            self.transform.eager(logits.to(compute_dtype(logits.dtype))), target, self.ignore_index
        )


# ----------------------------------------------------------------------------------------------------------
# Through a linear head: logits = x·Wᵀ + b in chunks of rows
# ----------------------------------------------------------------------------------------------------------


def frozen_head(needs: Sequence[bool]) -> bool:
    """Whether only x needs a gradient (W and b do not: a frozen head, as under LoRA)."""
    return needs[0] and not any(needs[1:3])


@dataclass(frozen=True)
class LinearLogProbs:
    """The statistics of x·Wᵀ + b (tensors (x (N, D), W (V, D), b (V,) or None, target (N,))), one chunk of
    rows of logits at a time (:func:`softxent.ops.chunks.linear_head_pass`). Rows whose target is ignored
    are dropped before the matmul (CPU tensors: the count is a host read).

    State: for a frozen head, dX of Σ log ŷ_y (N, D), formed in the forward pass; else nothing."""

    transform: Transform
    ignore_index: int
    chunk_rows: int | None
    backend: Backend
    row_args: ClassVar[tuple[int, ...]] = (0, 3)

    def _kept(self, target: Tensor) -> Tensor | None:
        return kept_rows(target, self.ignore_index)

    def _pass(self, x, weight, bias, block, columns: int, *, grad: bool, needs=(False, False, False)):
        return chunks.linear_head_pass(
            x, weight, bias, block, loss_shape=(x.shape[0], columns),
            grad_scale=torch.ones((), dtype=compute_dtype(x.dtype), device=x.device) if grad else None,
            need_dx=needs[0], need_dw=needs[1], need_db=needs[2], target_grad_like=None,
            chunk_rows=self.chunk_rows, policy=self.backend.policy,
        )  # fmt: skip

    def forward(self, tensors: Sequence[Tensor | None], needs) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        x, weight, bias, target = tensors
        check.check_class_values(target, weight.shape[0], self.ignore_index)
        ct = compute_dtype(x.dtype)
        kept = self._kept(target)
        rows_x, rows_target = (x, target) if kept is None else (x[kept], target[kept])
        frozen = frozen_head(needs)
        columns = weight.shape[0]

        def block(logits, start, stop, scale, grad_out, _):
            block_target = rows_target[start:stop]
            out = torch.empty(stop - start, len(STATS), dtype=ct, device=x.device)
            for first, last in _blocks(self.backend.policy, stop - start, columns):
                out[first:last] = self.backend.log_prob_stats(
                    logits[first:last], block_target[first:last], self.transform, self.ignore_index,
                    None if grad_out is None else grad_out[first:last],
                )  # fmt: skip
            return out

        stats, grad_x, *_ = self._pass(
            rows_x, weight, bias, block, len(STATS), grad=frozen, needs=(frozen, False, False)
        )
        if kept is not None:
            stats = stats.new_zeros(x.shape[0], len(STATS)).index_copy_(0, kept, stats)
            if grad_x is not None:
                grad_x = grad_x.new_zeros(x.shape).index_copy_(0, kept, grad_x)
        return stats, (grad_x,)

    def backward(self, tensors, stats: Tensor, state, grad_log_probs, grad_entropy, needs):
        x, weight, bias, target = tensors
        (log_prob_grad_x,) = state
        need_dx, need_dw, need_db = needs[:3]
        done = None
        if log_prob_grad_x is not None and grad_log_probs is not None:
            # the frozen head's forward formed dX of Σ log ŷ_y: scale it per row
            done = log_prob_grad_x * grad_log_probs.unsqueeze(-1).to(log_prob_grad_x.dtype)
            grad_log_probs = None
            if grad_entropy is None:
                return done, None, None
        kept = self._kept(target)
        pick = (lambda t: t) if kept is None else (lambda t: None if t is None else t[kept])
        rows_x, rows_target, rows_stats = pick(x), pick(target), pick(stats)
        rows_glp, rows_gh = pick(grad_log_probs), pick(grad_entropy)
        columns = weight.shape[0]

        def block(logits, start, stop, scale, grad_out, _):
            chunk_stats = rows_stats[start:stop]
            for first, last in _blocks(self.backend.policy, stop - start, columns):
                a, b = start + first, start + last
                self.backend.log_prob_grad(
                    logits[first:last], rows_target[a:b], self.transform, self.ignore_index,
                    *(chunk_stats[first:last, STATS.index(name)] for name in ("m", "log_sum_exp", "entropy")),
                    _cut(rows_glp, a, b), _cut(rows_gh, a, b), grad_out[first:last],
                )  # fmt: skip
            return logits.new_empty(stop - start, 0, dtype=rows_stats.dtype)

        _, grad_x, grad_weight, grad_bias, _ = self._pass(
            rows_x, weight, bias, block, 0, grad=True, needs=(need_dx, need_dw, need_db and bias is not None)
        )
        if kept is not None and grad_x is not None:
            grad_x = grad_x.new_zeros(x.shape).index_copy_(0, kept, grad_x)
        if done is not None:
            grad_x = done + grad_x.to(done.dtype)
        return grad_x, grad_weight, grad_bias

    def eager(self, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor]:
        return eager_linear_log_probs(self.transform, self.ignore_index, x, weight, bias, target)


def kept_rows(target: Tensor, ignore_index: int) -> Tensor | None:
    """The rows whose target counts, for CPU tensors where some do not (a host read); else None (all
    rows)."""
    if target.device.type != "cpu":
        return None
    counted = target != ignore_index
    return None if bool(counted.all()) else counted.nonzero().squeeze(1)


def eager_linear_log_probs(
    transform: Transform, ignore_index: int, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor
) -> tuple[Tensor, Tensor]:
    """(log ŷ_y, H) through the head in differentiable torch ops (the logits formed)."""
    ct = compute_dtype(x.dtype)
    logits = F.linear(x.to(ct), weight.to(ct), None if bias is None else bias.to(ct))
    return eager_log_probs(transform.eager(logits), target, ignore_index)


def eager_log_probs(z: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(log ŷ_y, H) of transformed logits z (N, V) in differentiable torch ops, 0 on ignored rows."""
    counted, safe = _target_rows(target, ignore_index)
    log_p = torch.log_softmax(z, dim=-1)
    log_prob = torch.where(counted, log_p.gather(-1, safe).squeeze(-1), 0.0)
    probs = log_p.exp()
    entropy = -torch.where(probs > 0, probs * log_p, 0.0).sum(-1)
    return log_prob, torch.where(counted, entropy, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Through a linear head in vocabulary slices (memory="lean")
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Running:
    """Per-row online statistics over the slices seen so far (the Triton statistics kernel's, in torch):
    m, S = Σe^{z−m}, A = Σe^{z−m}(z − m), Q = Σe^{2(z−m)}, Σz, the first argmax and its value, z_y."""

    m: Tensor
    s: Tensor
    a: Tensor
    q: Tensor
    total: Tensor
    best: Tensor
    best_index: Tensor
    z_y: Tensor

    @classmethod
    def empty(cls, rows: int, ct: torch.dtype, device) -> _Running:
        def full(value: float) -> Tensor:
            return torch.full((rows,), value, dtype=ct, device=device)

        index = torch.zeros(rows, dtype=torch.int64, device=device)
        return cls(
            full(-torch.inf), full(0.0), full(0.0), full(0.0), full(0.0), full(-torch.inf), index, full(0.0)
        )

    def fold(self, z: Tensor, start: int, rows: slice, target: Tensor, counted: Tensor) -> None:
        """Fold z (B, S), the columns start: of ``rows``, into those rows' statistics (rescaled as the max
        rises); ``target``, ``counted`` of those rows."""
        m, s, a, q = self.m[rows], self.s[rows], self.a[rows], self.q[rows]
        slice_max = z.amax(-1)
        m_new = torch.maximum(m, slice_max)
        rise = torch.where(m_new == m, 0.0, m_new - m)
        decay = torch.exp(-rise)
        a = torch.where((s == 0) | (rise == 0), a, a - rise * s) * decay
        s = s * decay
        q = q * decay * decay
        shifted = z - torch.where(m_new == -torch.inf, 0.0, m_new).unsqueeze(-1)
        e = shifted.exp()
        self.s[rows] = s + e.sum(-1)
        self.a[rows] = a + torch.where(e > 0, e * shifted, 0.0).sum(-1)
        self.q[rows] = q + torch.linalg.vecdot(e, e)
        self.m[rows] = m_new
        self.total[rows] += z.sum(-1)
        best = self.best[rows]
        take = slice_max > best
        self.best[rows] = torch.where(take, slice_max, best)
        self.best_index[rows] = torch.where(take, z.argmax(-1) + start, self.best_index[rows])
        local = target - start
        inside = counted & (local >= 0) & (local < z.shape[1])
        picked = z.gather(-1, torch.where(inside, local, 0).unsqueeze(-1)).squeeze(-1)
        self.z_y[rows] = torch.where(inside, picked, self.z_y[rows])

    def stats(self, target: Tensor, counted: Tensor, columns: int) -> Tensor:
        """The (N, len(STATS)) statistics of :func:`stats_block`."""
        log_sum_exp = self.s.log()
        outputs = (
            (self.z_y - self.m) - log_sum_exp,
            log_sum_exp - self.a / self.s,
            (self.best_index == target).to(self.m.dtype),
            self.q.log() - 2.0 * log_sum_exp,
            self.total / columns,
        )
        outputs = [torch.where(counted, t, 0.0) for t in outputs]
        return torch.stack([*outputs, self.m, log_sum_exp], dim=-1)


def slice_grad(
    logits: Tensor,
    start: int,
    transform: Transform,
    target: Tensor,
    stats: Tensor,
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
) -> Tensor:
    """A slice's G_v = [g·(e_y − ŷ) − h·ŷ ⊙ (log ŷ + H)]·dz/dl (N, S) in the compute dtype, from the rows'
    statistics (N, len(STATS)); g, h (N,) already 0 on rows that do not count."""
    ct = compute_dtype(logits.dtype)
    z, slope = transform.apply(logits, ct)
    m, log_sum_exp, entropy = (
        stats[:, STATS.index(name)].unsqueeze(-1) for name in ("m", "log_sum_exp", "entropy")
    )
    log_p = (z - m).sub_(log_sum_exp)
    probs = log_p.exp()
    if grad_entropy is not None:
        grad = torch.where(probs > 0, probs * (log_p + entropy), 0.0).mul_(-grad_entropy.unsqueeze(-1))
        if grad_log_probs is not None:
            grad.sub_(probs.mul_(grad_log_probs.unsqueeze(-1)))
    else:
        grad = probs.mul_(-grad_log_probs.unsqueeze(-1))
    if grad_log_probs is not None:
        local = target - start
        inside = (local >= 0) & (local < z.shape[1])
        grad.scatter_add_(
            -1,
            torch.where(inside, local, 0).unsqueeze(-1),
            torch.where(inside, grad_log_probs, 0.0).unsqueeze(-1),
        )
    if not (isinstance(slope, float) and slope == 1.0):
        grad.mul_(slope)
    return grad


@dataclass(frozen=True)
class LeanLinearLogProbs:
    """The statistics of x·Wᵀ + b in vocabulary slices of all rows (memory="lean"; tensors as
    :class:`LinearLogProbs`'): extra memory one (N, S) slice of logits and its temporaries, O(N) statistics
    and, for low-precision inputs, the (N, D) float32 dX sum, independent of V.

    Forward: each slice's logits fold into per-row online statistics (2·N·D·V FLOPs). Backward: each
    slice's logits again, G_v in the compute dtype, dW_v = G_vᵀ·x and db_v written whole, dX += G_v·W_v
    (6·N·D·V; a frozen head 4·N·D·V, as its forward cannot form dX before the last slice's normalizer).
    The slice math runs in torch ops on every backend. Rows whose target is ignored are dropped before the
    matmuls (CPU tensors)."""

    transform: Transform
    ignore_index: int
    slice_columns: int | None
    backend: Backend
    row_args: ClassVar[tuple[int, ...]] = (0, 3)

    def _kept(self, target: Tensor) -> Tensor | None:
        return kept_rows(target, self.ignore_index)

    def forward(self, tensors: Sequence[Tensor | None], needs) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        x, weight, bias, target = tensors
        check.check_class_values(target, weight.shape[0], self.ignore_index)
        ct = compute_dtype(x.dtype)
        kept = self._kept(target)
        rows_x, rows_target = (x, target) if kept is None else (x[kept], target[kept])
        columns = weight.shape[0]
        counted, _ = _target_rows(rows_target, self.ignore_index)
        running = _Running.empty(rows_x.shape[0], ct, x.device)
        if rows_x.shape[0]:
            for _, start, stop, logits in vocabulary_slices(
                rows_x, columns, self.slice_columns, self.backend.policy
            ):
                slice_logits(rows_x, weight, bias, start, stop, logits)
                # cache-sized blocks of the slice's rows bound the temporaries
                for first, last in _blocks(self.backend.policy, rows_x.shape[0], stop - start):
                    z, _ = self.transform.apply(logits[first:last], ct)
                    rows = slice(first, last)
                    running.fold(z, start, rows, rows_target[rows], counted[rows])
        stats = running.stats(rows_target, counted, columns)
        if kept is not None:
            stats = stats.new_zeros(x.shape[0], len(STATS)).index_copy_(0, kept, stats)
        return stats, ()

    def backward(self, tensors, stats: Tensor, state, grad_log_probs, grad_entropy, needs):
        x, weight, bias, target = tensors
        need_dx, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
        ct = compute_dtype(x.dtype)
        low = self.backend.policy.grad_in_input_dtype
        grad_x = torch.zeros(x.shape, dtype=ct, device=x.device) if need_dx else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=x.dtype if low else ct, device=x.device) if need_dw else None
        )
        grad_bias = torch.zeros(weight.shape[0], dtype=ct, device=x.device) if need_db else None
        kept = self._kept(target)
        pick = (lambda t: t) if kept is None else (lambda t: None if t is None else t[kept])
        rows_x, rows_target, rows_stats = pick(x), pick(target), pick(stats)
        counted, _ = _target_rows(rows_target, self.ignore_index)
        g, h = (
            None if t is None else torch.where(counted, pick(t).to(ct), 0.0)
            for t in (grad_log_probs, grad_entropy)
        )
        rows_grad_x = (
            grad_x if kept is None or grad_x is None else torch.zeros(rows_x.shape, dtype=ct, device=x.device)
        )
        x_ct = rows_x if rows_x.dtype == ct or low else rows_x.to(ct)
        if rows_x.shape[0]:
            for _, start, stop, logits in vocabulary_slices(
                rows_x, weight.shape[0], self.slice_columns, self.backend.policy, need_dx
            ):
                slice_logits(rows_x, weight, bias, start, stop, logits)
                # G_v over the slice's logits where it has their dtype, else into a compute-dtype buffer
                grad = (
                    logits if low or x.dtype == ct else torch.empty(logits.shape, dtype=ct, device=x.device)
                )
                for first, last in _blocks(self.backend.policy, rows_x.shape[0], stop - start):
                    rows = slice(first, last)
                    grad[rows] = slice_grad(
                        logits[rows], start, self.transform, rows_target[rows], rows_stats[rows],
                        None if g is None else g[rows], None if h is None else h[rows],
                    )  # fmt: skip
                slice_backward(grad, x_ct, weight[start:stop], start, rows_grad_x, grad_weight, grad_bias)
        if kept is not None and grad_x is not None:
            grad_x.index_copy_(0, kept, rows_grad_x)
        return grad_x, grad_weight, grad_bias

    def eager(self, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor]:
        return eager_linear_log_probs(self.transform, self.ignore_index, x, weight, bias, target)
