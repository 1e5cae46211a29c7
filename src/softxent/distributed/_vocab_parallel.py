r"""Vocabulary-parallel softmax cross-entropy: each rank holds a contiguous slice of the classes.

Rank r of a group of P ranks holds the logits (or the linear head's weight rows) of classes
[o_r, o_r + C_r), with Σ_r C_r = C; shards may be uneven (C not divisible by P; an empty shard is allowed).
Every rank holds the same rows and either the same class-index targets (global indices in [0, C)) or
its own classes' columns of probability targets (soft labels, e.g. a teacher's distribution).

The loss of a row needs its log-sum-exp over all C classes and, for class y, its true logit. Each rank
folds its own columns into the online-softmax statistics of :mod:`softxent.ops.slices` (the same per-slice
functions, torch ops or Triton kernels, that the lean head runs over vocabulary slices): the max m_r,
Σ exp(z − m_r), Σq, Σq·(z − m_r) and z_y where it holds y. Two all-reduces combine them (O(N) numbers,
never O(N·C)):

.. math::
    M = \max_r m_r, \qquad
    Σ e^{z - M} = Σ_r e^{m_r - M} Σ_{c ∈ r} e^{z_c - m_r}, \qquad
    Σ q (z - M) = Σ_r \big[Σ_{c ∈ r} q_c (z_c - m_r) + (Σ_{c ∈ r} q_c)(m_r - M)\big]

(a max, then one sum of the four stacked (N,) statistics). From there every rank has the same loss,
lse = M + log Σ e^{z − M} and coeff = Σq + 2λ·lse, and writes the gradient of its own columns,
∂ℓ/∂z_c = coeff·ŷ_c − q_c, with no further communication. The linear head adds one all-reduce of the
partial dX = Σ_{c ∈ r} G_c W_c (N×D, summed in float32).

Arguments are checked collectively: each rank checks its own first, without raising, then one all-gather
of a few integers per rank (a status flag, rows, features, classes, the targets' kind, min, max and a
checksum of class-index targets, the class weights' length) runs before any work. A rank whose own
arguments failed raises its error and every other rank a ValueError naming that rank and its message;
ranks that disagree (different rows or targets, say) all raise the same ValueError. No rank is left
waiting in a collective. That gather reads its result on the host (one synchronization per call on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from softxent import _validate as check
from softxent.ops import autograd, backends, chunks
from softxent.ops.spec import (
    RowStats,
    SoftmaxLoss,
    Targets,
    compute_dtype,
    finish,
    mass_shift,
    mean_denominator,
    reduce,
    reduction_scale,
    softmax_loss,
    softmax_shift,
)

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

T = TypeVar("T")

_NO_DOUBLE_BACKWARD = (
    "softxent.distributed: the vocabulary-parallel losses have no differentiable backward "
    "(create_graph=True); their second derivatives would need the other ranks' logits"
)
_NO_FORWARD_MODE = (
    "softxent.distributed: the vocabulary-parallel losses have no forward-mode derivative (torch.func.jvp, "
    "jacfwd): a tangent would need the other ranks' classes; use reverse mode (backward, torch.func.grad)"
)
_NO_TARGET_MIN = torch.iinfo(torch.int64).max
_NO_TARGET_MAX = torch.iinfo(torch.int64).min


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's classes sit: [offset, offset + classes) of total_classes; max_classes is the
    widest shard (chunk sizes come from it so that every rank runs the same number of collectives)."""

    offset: int
    classes: int
    total_classes: int
    max_classes: int


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group: expected an initialized torch.distributed process group (call "
            "torch.distributed.init_process_group first), got none initialized"
        )
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    return group


def _collective_device(group: dist.ProcessGroup, device: torch.device | None) -> torch.device:
    """NCCL communicates CUDA tensors; Gloo CPU ones (and CUDA ones, through a copy): use the data's
    device for NCCL (the current CUDA device when the call gave none) and the CPU otherwise."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return device if device is not None else torch.device("cuda", torch.cuda.current_device())


def _target_range(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """min and max of the counted targets (sentinels when none counts), as 0-d int64 tensors."""
    if target.numel() == 0:
        return torch.tensor(_NO_TARGET_MIN), torch.tensor(_NO_TARGET_MAX)
    counted = target != ignore_index
    low = torch.where(counted, target, _NO_TARGET_MIN).min()
    high = torch.where(counted, target, _NO_TARGET_MAX).max()
    return low, high


_HASH_PRIME = 2**31 - 1


def _target_hash(target: Tensor) -> Tensor:
    """A position-dependent checksum of class-index targets, 0-d int64: Σ_i ((t_i + 1)·a_i mod p) with a_i
    a pseudo-random multiplier of position i and p = 2³¹ − 1. Every term is below 2³¹, so the sum of up
    to 2³² positions cannot overflow; two target tensors that differ anywhere almost surely differ here
    (swapping two rows changes it too)."""
    positions = torch.arange(target.numel(), dtype=torch.int64, device=target.device)
    multipliers = (positions * 2654435761 + 97) % _HASH_PRIME + 1
    return (((target.reshape(-1) + 1) % _HASH_PRIME) * multipliers % _HASH_PRIME).sum()


@dataclass(frozen=True)
class LocalFacts:
    """What this rank's arguments say, for the collective check: its rows, in_features (0 for given
    logits) and classes, and its targets (class indices or probabilities of its own classes)."""

    rows: int
    features: int
    classes: int
    target: Tensor
    ignore_index: int
    weight: Tensor | None

    def encoded(self) -> Tensor:
        """(ok, rows, features, classes, target min, target max, target hash, class-weight length, kind)."""
        probabilities = self.target.is_floating_point()
        if probabilities:
            low, high, digest = torch.tensor(_NO_TARGET_MIN), torch.tensor(_NO_TARGET_MAX), torch.tensor(0)
        else:
            low, high = _target_range(self.target, self.ignore_index)
            digest = _target_hash(self.target)
        numbers = [1, self.rows, self.features, self.classes]
        return torch.stack(
            [
                *(torch.tensor(n) for n in numbers),
                low.cpu(),
                high.cpu(),
                digest.cpu(),
                torch.tensor(-1 if self.weight is None else self.weight.numel()),
                torch.tensor(int(probabilities)),
            ]
        )


_FACT_COUNT = 9


def checked_locally(check: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """``check()`` and None, or None and the ValueError / TypeError it raised: a rank's argument error is
    raised only after every rank has heard of it in :func:`shard_layout`'s collective."""
    try:
        return check(), None
    except (ValueError, TypeError) as error:
        return None, error


def shard_layout(
    group: dist.ProcessGroup,
    facts: LocalFacts | None,
    error: Exception | None,
    *,
    shard_name: str,
    device: torch.device | None,
) -> ShardLayout:
    """Gather every rank's :class:`LocalFacts`, or the news that its own arguments failed a check
    (``error``), check them together and return this rank's layout.

    Every rank raises: a rank whose arguments failed raises its own error, the others a ValueError naming
    that rank and its message (one all-gather of the messages, only then); where the ranks disagree
    (rows, in_features, target kind, class weights, class-index targets, compared by range and checksum)
    each raises the same ValueError. None of them is left waiting in a collective."""
    device = _collective_device(group, device)
    local = torch.zeros(_FACT_COUNT, dtype=torch.int64) if facts is None else facts.encoded()
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(local.to(device)) for _ in range(world)]
    dist.all_gather(gathered, local.to(device), group=group)
    table = torch.stack(gathered).cpu().tolist()
    oks = [row[0] for row in table]
    if not all(oks):
        messages: list[str | None] = [None] * world
        dist.all_gather_object(messages, None if error is None else str(error), group=group)
        if error is not None:
            raise error
        failed = "; ".join(f"rank {rank}: {message}" for rank, message in enumerate(messages) if message)
        raise ValueError(f"{shard_name}: another rank's arguments failed a check ({failed})")
    rank = dist.get_rank(group)
    per_rank = list(zip(*table, strict=True))
    _, row_counts, feature_counts, class_counts, lows, highs, digests, weight_lengths, kinds = per_rank
    ignore_index = facts.ignore_index
    if len(set(row_counts)) != 1:
        raise ValueError(
            f"{shard_name}: expected the same rows (positions) on every rank, got {list(row_counts)} "
            "across the ranks"
        )
    if len(set(feature_counts)) != 1:
        raise ValueError(
            f"{shard_name}: expected the same in_features on every rank, got {list(feature_counts)} "
            "across the ranks"
        )
    if len(set(kinds)) != 1:
        raise ValueError(
            "target: expected the same kind of target on every rank (class indices or probabilities), got "
            f"{['probabilities' if kind else 'class indices' for kind in kinds]} across the ranks"
        )
    total = sum(class_counts)
    if total == 0:
        raise ValueError(f"{shard_name}: expected at least one class across the ranks, got shards of 0")
    if len(set(lows)) != 1 or len(set(highs)) != 1 or len(set(digests)) != 1:
        differ = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
        raise ValueError(
            "target: expected the same class-index targets on every rank, got different ones across the "
            f"ranks (ranks {differ} differ from rank 0)"
        )
    if lows[0] != _NO_TARGET_MIN and (lows[0] < 0 or highs[0] >= total):
        bad = lows[0] if lows[0] < 0 else highs[0]
        raise ValueError(
            f"target: expected class indices in [0, {total}) (the classes of all {world} shards, "
            f"{list(class_counts)}) or ignore_index={ignore_index}, got {bad}, outside every shard"
        )
    if len(set(weight_lengths)) != 1 or weight_lengths[0] not in (-1, total):
        raise ValueError(
            f"weight: expected the whole vocabulary's class weights, shape ({total},), on every rank, got "
            f"{['None' if n == -1 else (n,) for n in weight_lengths]} across the ranks"
        )
    return ShardLayout(
        offset=sum(class_counts[:rank]), classes=facts.classes, total_classes=total,
        max_classes=max(class_counts),
    )  # fmt: skip


def _all_reduce_stats(stats: RowStats, group: dist.ProcessGroup) -> None:
    """Combine every rank's statistics in place: all-reduce max of m, then one all-reduce sum of the
    other four, each first rescaled from its rank's max to the global one."""
    device = _collective_device(group, stats.m.device)
    local_max = stats.m
    global_max = local_max.to(device, copy=True)
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    global_max = global_max.to(local_max.device)
    # m_r − M ≤ 0; a rank with no finite logit in a row (m_r = −inf) contributes nothing to Σexp
    rise = torch.where(local_max == global_max, 0.0, global_max - local_max)
    packed = torch.stack(
        [
            stats.sum_exp * torch.exp(-rise),
            stats.q_dot - mass_shift(stats.q_sum, rise),
            stats.q_sum,
            stats.z_y,  # 0 on every rank but the one that holds the row's class
        ]
    ).to(device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    packed = packed.to(local_max.device)
    stats.m.copy_(global_max)
    stats.sum_exp.copy_(packed[0])
    stats.q_dot.copy_(packed[1])
    stats.q_sum.copy_(packed[2])
    stats.z_y.copy_(packed[3])


def vocab_parallel_block(
    logits: Tensor,
    target: Tensor,
    spec: SoftmaxLoss,
    *,
    layout: ShardLayout,
    group: dist.ProcessGroup,
    stats_fn,
    grad_fn,
    grad_scale: Tensor | float | None = None,
    grad_out: Tensor | None = None,
    target_grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`softxent.ops.torch_blocks.softmax_xent_block`'s contract for rows of this rank's shard.

    logits: (R, C_r); target: (R,) global class indices or (R, C_r) probabilities of this rank's classes;
    ``spec.weight``: the whole vocabulary's (C,). Returns (loss, lse), (R,), the same on every rank; writes
    grad_scale·∂ℓ/∂z of this rank's columns into ``grad_out`` (R, C_r) and grad_scale·∂ℓ/∂t into
    ``target_grad_out`` (R, C_r, probabilities) when given. Two all-reduces of O(R) numbers; every rank
    must call it with the same rows.
    """
    ct = compute_dtype(logits.dtype)
    rows = logits.shape[0]
    targets = Targets.prepare(target, spec, layout.total_classes, ct, first_column=layout.offset)
    stats = RowStats.empty(rows, ct, logits.device)
    if logits.shape[1]:
        stats_fn(logits, layout.offset, targets, spec, layout.total_classes, stats)
    _all_reduce_stats(stats, group)
    loss, lse, coeff = finish(stats, targets, spec)
    if grad_scale is not None and (grad_out is not None or target_grad_out is not None):
        scale = torch.as_tensor(grad_scale, dtype=ct, device=logits.device).expand(rows)
        scale = torch.where(targets.counted, scale, 0.0)
        if logits.shape[1]:
            m, log_sum_exp = softmax_shift(stats)
            grad_fn(
                logits, layout.offset, targets, spec, layout.total_classes, m, log_sum_exp, coeff, scale,
                grad_out, target_grad_out,
            )  # fmt: skip
    return loss, lse


class _Options(NamedTuple):
    reduction: str
    label_smoothing: float
    ignore_index: int
    z_loss: float
    softcap: float | None


def _check_options(reduction, label_smoothing, ignore_index, z_loss, softcap, weight, device) -> _Options:
    """The loss options every rank checks before the collective check (a class weight's length is
    checked there, against every shard's classes)."""
    if weight is not None:
        check.check_float_tensor("weight", weight)
        if weight.dim() != 1:
            raise ValueError(
                "weight: expected the class weights, a 1-D tensor of shape (C,) over the whole vocabulary, "
                f"got shape {tuple(weight.shape)}"
                + (" (the linear head's weight is linear_weight)" if weight.dim() == 2 else "")
            )
        check.check_same_device("weight", weight, device)
        check.check_no_grad("weight", weight)
    return _Options(
        check.check_reduction(reduction),
        check.check_label_smoothing(label_smoothing),
        check.check_ignore_index(ignore_index),
        check.check_z_loss(z_loss),
        check.check_softcap(softcap),
    )


def _check_target(target: Tensor, shard_shape: tuple[int, ...], ignore_index: int) -> Tensor:
    """Class indices of shape ``shard_shape[:-1]`` (returned as int64), or floating probabilities of this
    rank's classes, of ``shard_shape`` (with a negative ``ignore_index``, as in torch)."""
    check.check_tensor("target", target)
    batch_shape = shard_shape[:-1]
    if not target.is_floating_point() and target.dtype not in check.CLASS_INDEX_DTYPES:
        raise TypeError(
            f"target: expected integer class indices (int64, int32 or uint8) of shape {batch_shape} or "
            f"floating probabilities of this rank's classes, shape {shard_shape}, got {target.dtype}"
        )
    if target.is_floating_point():
        if tuple(target.shape) != shard_shape:
            raise ValueError(
                f"target: expected probabilities of this rank's classes, shape {shard_shape}, got shape "
                f"{tuple(target.shape)}"
            )
        check.check_no_ignore_index(ignore_index)
        return target
    if tuple(target.shape) != batch_shape:
        raise ValueError(
            f"target: expected class indices of shape {batch_shape}, got shape {tuple(target.shape)}"
        )
    return target.long()


def _mean_denominator(
    target: Tensor, rows: int, spec: SoftmaxLoss, layout: ShardLayout, ct: torch.dtype
) -> tuple[Tensor, Tensor | bool]:
    """ "mean"'s denominator: the number of rows for probabilities (whatever this shard's width), else
    :func:`softxent.ops.spec.mean_denominator` of the class indices."""
    if target.is_floating_point():
        return torch.tensor(float(rows), dtype=ct, device=target.device), rows > 0
    return mean_denominator(target, spec, layout.total_classes, ct)


def _spec_options(options: _Options) -> tuple[int, float, float, float | None]:
    """:func:`softxent.ops.spec.softmax_loss`'s (ignore_index, label_smoothing, z_loss, softcap)."""
    return options.ignore_index, options.label_smoothing, options.z_loss, options.softcap


class _LogitsCall(NamedTuple):
    options: _Options
    target: Tensor
    backend: backends.Backend
    batch_shape: tuple[int, ...]
    probabilities: bool
    facts: LocalFacts


def _check_logits_call(
    logits_shard, target, weight, impl, reduction, label_smoothing, ignore_index, z_loss, softcap
) -> _LogitsCall:
    """:func:`vocab_parallel_cross_entropy`'s checks of this rank's arguments alone."""
    check.check_float_tensor("logits_shard", logits_shard)
    if logits_shard.dim() == 0:
        raise ValueError("logits_shard: expected shape (..., C_r) with the classes last, got shape ()")
    options = _check_options(
        reduction, label_smoothing, ignore_index, z_loss, softcap, weight, logits_shard.device
    )
    target = _check_target(target, tuple(logits_shard.shape), options.ignore_index)
    check.check_same_device("target", target, logits_shard.device)
    backend = backends.select(impl, logits_shard.device)
    batch_shape = tuple(logits_shard.shape[:-1])
    rows, classes = math.prod(batch_shape), logits_shard.shape[-1]
    probabilities = target.is_floating_point()
    flat_target = target.reshape(rows, classes) if probabilities else target.reshape(-1)
    facts = LocalFacts(rows, 0, classes, flat_target, options.ignore_index, weight)
    return _LogitsCall(options, target, backend, batch_shape, probabilities, facts)


def _check_like_input(name: str, tensor: Tensor, input: Tensor) -> None:
    """``tensor`` has the input's dtype and device."""
    if tensor.dtype != input.dtype:
        raise TypeError(f"{name}: expected {input.dtype} like the input, got {tensor.dtype}")
    check.check_same_device(name, tensor, input.device)


class _LinearCall(NamedTuple):
    options: _Options
    x: Tensor
    flat_target: Tensor
    chunk_size: int | None
    backend: backends.Backend
    probabilities: bool
    facts: LocalFacts


def _check_linear_call(
    input, linear_weight, linear_bias, target, weight, impl, chunk_size, reduction, label_smoothing,
    ignore_index, z_loss, softcap,
) -> _LinearCall:  # fmt: skip
    """:func:`vocab_parallel_linear_cross_entropy`'s checks of this rank's arguments alone."""
    check.check_float_tensor("input", input)
    check.check_float_tensor("linear_weight", linear_weight)
    if input.dim() == 0:
        raise ValueError("input: expected shape (..., in_features), got shape ()")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"linear_weight: expected shape (C_r, {input.shape[-1]}) (this rank's classes × the input's "
            f"in_features), got {tuple(linear_weight.shape)}"
        )
    _check_like_input("linear_weight", linear_weight, input)
    if linear_bias is not None:
        check.check_float_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (linear_weight.shape[0],):
            raise ValueError(
                f"linear_bias: expected shape ({linear_weight.shape[0]},) (one per class of the shard), got "
                f"{tuple(linear_bias.shape)}"
            )
        _check_like_input("linear_bias", linear_bias, input)
    if ignore_index is None:  # as softxent.linear_cross_entropy (torch's): -100 for class indices
        ignore_index = -100
    elif isinstance(target, Tensor) and target.is_floating_point():
        raise ValueError(
            f"ignore_index: expected None when target holds class probabilities, got {ignore_index}"
        )
    options = _check_options(reduction, label_smoothing, ignore_index, z_loss, softcap, weight, input.device)
    chunk_size = check.check_chunk_size(chunk_size)
    target = _check_target(target, (*input.shape[:-1], linear_weight.shape[0]), options.ignore_index)
    check.check_same_device("target", target, input.device)
    backend = backends.select(impl, input.device)
    x = input.reshape(-1, input.shape[-1])
    probabilities = target.is_floating_point()
    flat_target = target.reshape(x.shape[0], -1) if probabilities else target.reshape(-1)
    facts = LocalFacts(
        x.shape[0], x.shape[1], linear_weight.shape[0], flat_target, options.ignore_index, weight
    )
    return _LinearCall(options, x, flat_target, chunk_size, backend, probabilities, facts)


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""Softmax cross-entropy over logits whose classes are split across the ranks of ``group``.

    On every rank, the result equals ``softxent.cross_entropy(logits, target, weight, ...)`` on the
    gathered ``logits = torch.cat([shard of rank 0, shard of rank 1, ...], dim=-1)`` (classes last here),
    and ``logits_shard.grad`` is that loss's gradient restricted to this rank's columns:

    .. math::
        ℓ = (Σ_c q_c)\,\mathrm{lse} - Σ_c q_c z_c + λ\,\mathrm{lse}^2, \quad
        \frac{∂ℓ}{∂z_c} = (Σ q + 2λ\,\mathrm{lse})\,ŷ_c - q_c \quad (c \text{ in this rank's shard})

    with q_c = (1 − ε)·w_y·1[c = y] + (ε/C)·w_c for class indices, q_c = w_c·((1 − ε)·t_c + ε/C) for
    probabilities t, and lse over all C classes (see the module docstring for how the ranks combine it: an
    all-reduce max and an all-reduce sum of O(N) numbers).

    Args:
        logits_shard: ``(..., C_r)``, classes last: this rank's contiguous slice of the classes (rank 0
            holds the first C_0, and so on; shards may differ in size); float32, float16, bfloat16 or
            float64 (math in float32, float64 for float64).
        target: ``(...)`` global class indices in [0, C) or ``ignore_index``, the same on every rank; or
            ``(..., C_r)`` floating class probabilities, this rank's columns of the (..., C) targets
            (differentiable, as in torch).
        group: the process group the classes are split over (None: the default group).
        weight: ``(C,)`` class weights of the whole vocabulary, the same on every rank.
        ignore_index, reduction, label_smoothing, z_loss, softcap, impl: as in
            :func:`softxent.cross_entropy` ("mean" divides by Σ w_y over counted positions, or by the
            number of positions for probabilities).

    Returns:
        The loss (float32; float64 for float64 input), the same on every rank: a scalar, or ``(...)`` for
        "none". Every rank must call it together (it runs collectives), with the same rows and targets.

    Example (each of P processes, after ``torch.distributed.init_process_group``)::

        rank, world = dist.get_rank(), dist.get_world_size()
        bounds = [round(i * C / world) for i in range(world + 1)]
        loss = vocab_parallel_cross_entropy(logits[:, bounds[rank]:bounds[rank + 1]], target)
    """
    group = _group(group)
    call, error = checked_locally(
        partial(_check_logits_call, logits_shard, target, weight, impl, reduction, label_smoothing,
                ignore_index, z_loss, softcap)
    )  # fmt: skip
    device = logits_shard.device if isinstance(logits_shard, Tensor) else None
    facts = None if call is None else call.facts
    layout = shard_layout(group, facts, error, shard_name="logits_shard", device=device)
    options, target, backend, batch_shape, probabilities, _ = call
    reduction = options.reduction
    ct = compute_dtype(logits_shard.dtype)
    spec = softmax_loss(weight, layout.total_classes, logits_shard.device, ct, *_spec_options(options))
    block = partial(
        vocab_parallel_block,
        layout=layout,
        group=group,
        stats_fn=backend.slice_stats,
        grad_fn=backend.slice_grad,
    )

    def forward(tensors, needs) -> autograd.Forward:
        shard, target, class_weight = tensors
        logits = shard.reshape(math.prod(batch_shape), shard.shape[-1])
        flat_target = target.reshape(logits.shape) if probabilities else target.reshape(-1)
        call_spec = replace(spec, weight=class_weight)
        denominator, anything_counts = _mean_denominator(flat_target, logits.shape[0], call_spec, layout, ct)
        need_input_grad, need_target_grad = needs[0], needs[1]
        grad = torch.empty_like(shard) if need_input_grad else None
        target_grad = torch.empty_like(target) if need_target_grad else None
        scale = None
        if need_input_grad or need_target_grad:
            scale = reduction_scale(reduction, denominator, anything_counts, ct).to(logits.device)
        loss, _ = block(
            logits, flat_target, call_spec, grad_scale=scale,
            grad_out=None if grad is None else grad.view(logits.shape),
            target_grad_out=None if target_grad is None else target_grad.view(logits.shape),
        )  # fmt: skip
        loss = reduce(loss.view(batch_shape), reduction, denominator)
        return autograd.Forward(loss, grads=(grad, target_grad, None))

    loss_fn = autograd.Loss(
        forward, _NO_DOUBLE_BACKWARD, reduced=reduction != "none", class_dim=-1, forward_mode=_NO_FORWARD_MODE
    )
    needs = autograd.needs_grad(logits_shard, target if probabilities else None, None)
    return autograd.apply(loss_fn, needs, logits_shard, target, spec.weight)[0]


@dataclass(frozen=True)
class VocabParallelHead:
    """A :class:`softxent.ops.chunks.SoftmaxHead` over this rank's weight rows whose dX is summed over the
    ranks (the head protocol, :class:`softxent.ops.chunks.LinearHead`)."""

    inner: chunks.SoftmaxHead
    group: dist.ProcessGroup
    layout: ShardLayout

    @property
    def reduction(self) -> str:
        return self.inner.reduction

    def denominator(self, target: Tensor, ct: torch.dtype) -> tuple[Tensor, Tensor | bool]:
        return _mean_denominator(target, target.shape[0], self.inner.spec, self.layout, ct)

    def run(self, x, linear_weight, linear_bias, target, *, grad_scale, needs):
        loss, grad_x, grad_weight, grad_bias, grad_target = self.inner.run(
            x, linear_weight, linear_bias, target, grad_scale=grad_scale, needs=needs
        )
        if grad_x is not None:
            # the partial dX = Σ_{c ∈ shard} G_c·W_c of every rank, summed in float32
            device = _collective_device(self.group, grad_x.device)
            total = grad_x.to(device=device, dtype=torch.promote_types(grad_x.dtype, torch.float32))
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
            grad_x = total.to(device=grad_x.device, dtype=grad_x.dtype)
        return loss, grad_x, grad_weight, grad_bias, grad_target


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    weight: Tensor | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""The linear head's softmax cross-entropy with the head's rows (classes) split across the ranks.

    On every rank, the result equals ``softxent.linear_cross_entropy(input, W, target,
    linear_bias=b, weight=weight, ...)`` with ``W = torch.cat([linear_weight of every rank])`` and b
    likewise; ``linear_weight.grad`` / ``linear_bias.grad`` are this rank's rows of dW = Gᵀx and db = Σ G,
    and ``input.grad`` is the whole dX = G·W, summed over the ranks (an all-reduce of N×D numbers, in
    float32). Each rank forms its logits z_r = x·W_rᵀ + b_r a chunk of rows at a time (never the N×C_r
    block), combines the rows' statistics with the other ranks per chunk (O(chunk) numbers), and turns
    its logits into G_r = coeff·ŷ_r − q_r in place: 6·N·D·C_r FLOPs per rank.

    Args:
        input: ``(..., D)``, the same on every rank (e.g. the hidden states of a tensor-parallel model).
        linear_weight: ``(C_r, D)``: this rank's contiguous rows of the (C, D) weight (rank 0 the first
            C_0, and so on; shards may differ in size).
        target: ``(...)`` global class indices in [0, C) or ``ignore_index``, the same on every rank; or
            ``(..., C_r)`` floating class probabilities, this rank's columns of the (..., C) targets.
        linear_bias: ``(C_r,)`` or None.
        group: the process group the classes are split over (None: the default group).
        weight: ``(C,)`` class weights of the whole vocabulary (not the linear weight), on every rank.
        ignore_index, reduction, label_smoothing, z_loss, softcap, impl: as in
            :func:`softxent.linear_cross_entropy`.
        chunk_size: rows per chunk (default: from the widest shard, so every rank runs the same chunks).

    Returns:
        The loss (float32; float64 for float64 input), the same on every rank: a scalar, or ``(...)``
        for "none". Every rank must call it together, with the same rows and targets.
    """
    group = _group(group)
    call, error = checked_locally(
        partial(_check_linear_call, input, linear_weight, linear_bias, target, weight, impl, chunk_size,
                reduction, label_smoothing, ignore_index, z_loss, softcap)
    )  # fmt: skip
    device = input.device if isinstance(input, Tensor) else None
    facts = None if call is None else call.facts
    layout = shard_layout(group, facts, error, shard_name="linear_weight", device=device)
    options, x, flat_target, chunk_size, backend, probabilities, _ = call
    reduction = options.reduction
    ct = compute_dtype(input.dtype)
    spec = softmax_loss(weight, layout.total_classes, input.device, ct, *_spec_options(options))
    if chunk_size is None:
        chunk_size = backend.policy.chunk_rows(layout.max_classes, input.element_size())
    block = partial(
        vocab_parallel_block,
        layout=layout,
        group=group,
        stats_fn=backend.slice_stats,
        grad_fn=backend.slice_grad,
    )
    head = VocabParallelHead(
        chunks.SoftmaxHead(
            replace(spec, weight=None), reduction, layout.classes, (), chunk_size, block, backend.policy
        ),
        group,
        layout,
    )

    def make_head(target: Tensor, weights) -> VocabParallelHead:
        return replace(head, inner=replace(head.inner, spec=replace(spec, weight=weights[0])))

    loss_fn = autograd.linear_head(make_head, reduction, _NO_DOUBLE_BACKWARD, forward_mode=_NO_FORWARD_MODE)
    needs = autograd.needs_grad(x, linear_weight, linear_bias, flat_target if probabilities else None, None)
    loss, _ = autograd.apply(loss_fn, needs, x, linear_weight, linear_bias, flat_target, spec.weight)
    return loss.view(input.shape[:-1]) if reduction == "none" else loss
