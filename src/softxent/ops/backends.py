"""The backends an ``impl`` argument selects, each a set of per-block functions with one contract, and the
policy they run under.

``impl="torch"``: :mod:`softxent.ops.torch_blocks` (torch ops, any device; the CPU backend).
``impl="triton"``: :mod:`softxent.ops.triton` (Triton kernels: on CUDA tensors, or on any in Triton's
interpreter, ``TRITON_INTERPRET=1``). ``impl="auto"``: Triton for CUDA tensors where triton is installed,
else the torch ops.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from softxent import _validate as check
from softxent.ops import distillation, log_probs, torch_blocks
from softxent.ops import policy as policies


@dataclass(frozen=True)
class Backend:
    """One backend's functions and the policy its drivers follow on one device.

    softmax_block / sigmoid_block: a block of rows' loss and gradient (the contracts of
    :func:`softxent.ops.torch_blocks.softmax_xent_block`, :func:`~.torch_blocks.sigmoid_bce_block`);
    slice_stats / slice_grad: a vocabulary slice's statistics and gradient (the lean and vocabulary-parallel
    heads; :func:`softxent.ops.torch_blocks.slice_stats` / :func:`~softxent.ops.torch_blocks.slice_grad`);
    log_prob_stats / log_prob_grad: a block's per-token statistics and their gradient
    (:func:`softxent.ops.log_probs.stats_block` / :func:`~softxent.ops.log_probs.grad_block`);
    divergence_block: a block's distillation divergence (:func:`softxent.ops.distillation.divergence_block`).
    """

    name: str
    policy: policies.Policy
    softmax_block: Callable[..., object]
    sigmoid_block: Callable[..., object]
    slice_stats: Callable[..., None]
    slice_grad: Callable[..., None]
    log_prob_stats: Callable[..., object]
    log_prob_grad: Callable[..., None]
    divergence_block: Callable[..., object]


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports here (the kernels themselves are imported on first use, after the
    interpreter check: Triton decides at import time whether its kernels run in the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _triton_functions() -> tuple[Callable[..., object], ...]:
    """The Triton kernels' launchers."""
    from softxent.ops.triton import bce, cross_entropy, log_probs, slices

    return (
        cross_entropy.softmax_xent_block, bce.sigmoid_bce_block, slices.slice_stats, slices.slice_grad,
        log_probs.stats_block, log_probs.grad_block, log_probs.divergence_block,
    )  # fmt: skip


def backend_name(impl: str, device: torch.device) -> str:
    """ "triton" when ``impl`` asks for it, or under "auto" for CUDA tensors where triton is installed; else
    "torch". Raises ValueError for impl="triton" without triton, or on CPU tensors outside the interpreter."""
    check.check_impl(impl)
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl: 'triton' needs the triton package (pip install 'softxent[triton]')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "impl: 'triton' runs on CUDA tensors (or on any in Triton's interpreter, "
                f"TRITON_INTERPRET=1), got tensors on {device}"
            )
        return "triton"
    if impl == "auto" and device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def select(impl: str, device: torch.device) -> Backend:
    """The backend ``impl`` selects for tensors on ``device``, with that device's policy."""
    name = backend_name(impl, device)
    policy = policies.for_device(device, name)
    functions = _triton_functions() if name == "triton" else _TORCH_FUNCTIONS
    return Backend(name, policy, *functions)


_TORCH_FUNCTIONS = (
    torch_blocks.softmax_xent_block,
    torch_blocks.sigmoid_bce_block,
    torch_blocks.slice_stats,
    torch_blocks.slice_grad,
    log_probs.stats_block,
    log_probs.grad_block,
    distillation.divergence_block,
)
