"""Precision-aware assertions shared by the op tests."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def max_error(actual: torch.Tensor | np.ndarray, expected: np.ndarray) -> float:
    """Largest |actual − expected| / (1 + |expected|): absolute near zero, relative for large values."""
    a = actual if isinstance(actual, np.ndarray) else to_numpy(actual)
    e = np.asarray(expected, dtype=np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - e) / (1.0 + np.abs(e))))


def assert_close(actual: torch.Tensor | np.ndarray, expected: np.ndarray, tol: float, what: str = "") -> None:
    """|actual − expected| <= tol·(1 + |expected|) elementwise; on failure show the worst elements."""
    a = actual if isinstance(actual, np.ndarray) else to_numpy(actual)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    both_nan = np.isnan(a) & np.isnan(e)
    same_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
    ok_special = both_nan | same_inf
    err = np.where(ok_special, 0.0, np.abs(a - e) / (1.0 + np.abs(e)))
    err = np.where(np.isnan(err), np.inf, err)
    if err.size and err.max() > tol:
        worst = np.argsort(err, axis=None)[-5:][::-1]
        rows = [
            f"  at {np.unravel_index(i, err.shape)}: got {a.flat[i]!r}, expected {e.flat[i]!r}" for i in worst
        ]
        raise AssertionError(f"{what}: max scaled error {err.max():.3e} > {tol:.1e}\n" + "\n".join(rows))


def assert_no_worse(
    ours: torch.Tensor, torchs: torch.Tensor, expected: np.ndarray, slack: float, what: str = ""
) -> None:
    """Precision-aware: our error against float64 is at most plain torch's at the same dtype plus slack."""
    ours_err, torch_err = max_error(ours, expected), max_error(torchs, expected)
    assert ours_err <= torch_err + slack, (
        f"{what}: softxent's error {ours_err:.3e} exceeds torch's {torch_err:.3e} + {slack:.1e}"
    )


def fresh_seed(bits: int = 63) -> int:
    """A fresh random seed below 2**bits each run, or SOFTXENT_TEST_SEED's value (to replay a failure: every
    test prints the seed it drew, which pytest shows for a failing test)."""
    replay = os.environ.get("SOFTXENT_TEST_SEED")
    return int(replay) if replay else int(np.random.SeedSequence().entropy % (2**bits))


def gradient_slack(dtype: torch.dtype) -> float:
    """Slack of :func:`assert_no_worse` for a linear head's max-normalized gradients at ``dtype``.

    Where softxent keeps G in float32 (the torch backend), each gradient is the correctly rounded value of
    the exact gradient of the low-precision logits; eager rounds G to the input dtype first, and at the
    worst element that extra rounding sometimes cancels part of the logits' own rounding error, so eager can
    win by up to about an ulp (bfloat16, seed 386 of a 2000-seed sweep: dW 7.3e-3 vs eager's 5.2e-3). Allow
    the dtype's unit roundoff for bfloat16 (2^-8), 2e-3 otherwise (float16's is 2^-11).
    """
    return 2.0**-8 if dtype == torch.bfloat16 else 2e-3


def interpreter_sized(shape: tuple[int, ...], impl: str) -> tuple[int, ...]:
    """``shape`` with its trailing (d1, ..., dk) dimensions cut to 67 when the Triton kernels run in the
    interpreter (one Python-emulated program per row: thousands of rows take minutes); unchanged else."""
    if impl != "triton" or os.environ.get("TRITON_INTERPRET") != "1":
        return shape
    return (*shape[:2], *(min(size, 67) for size in shape[2:]))


def eager_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    ignore_index: int | None = None,
    **kwargs: object,
) -> torch.Tensor:
    """torch's ``F.linear_cross_entropy`` (torch 2.13), or where torch lacks it (the GPU machines run 2.11)
    the composition it stands for: ``F.cross_entropy`` of ``F.linear``'s logits, shaped (..., C, d1, ...)."""
    if hasattr(F, "linear_cross_entropy"):
        return F.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, ignore_index=ignore_index, **kwargs
        )
    flat_bias = None if linear_bias is None else linear_bias.reshape(-1)
    logits = F.linear(input, linear_weight.reshape(-1, linear_weight.shape[-1]), flat_bias)
    logits = logits.reshape(*input.shape[:-1], *linear_weight.shape[:-1])
    ignore_index = -100 if ignore_index is None else ignore_index
    return F.cross_entropy(logits, target, ignore_index=ignore_index, **kwargs)


def logit_rounding_slack(
    logits: np.ndarray, grad_logits: np.ndarray, dtype: torch.dtype, loss: float
) -> float:
    """Slack of :func:`assert_no_worse` for a loss computed from logits rounded to ``dtype`` independently of
    the logits eager torch rounds (a GPU's matmul library picks different kernels, with different rounding,
    for a vocabulary slice's GEMM and for the whole head's).

    Each logit z_i carries a rounding error δ_i, uniform within half an ulp of ``dtype`` at |z_i|, so the
    loss's error Σ_i (∂L/∂z_i)·δ_i has standard deviation σ = sqrt(Σ_i (∂L/∂z_i)²·ulp_i² / 12)
    (``grad_logits``: the float64 ∂L/∂z). Either computation's error stays within 5σ but for about one draw
    in a million; the slack is that, scaled as :func:`max_error` scales (by 1 + |loss|).
    """
    mantissa_bits = torch.finfo(dtype).nmant
    magnitude = np.maximum(np.abs(logits), torch.finfo(dtype).tiny)
    ulp = np.exp2(np.floor(np.log2(magnitude)) - mantissa_bits)
    sigma = float(np.sqrt(np.sum((grad_logits * ulp) ** 2) / 12.0))
    return 5.0 * sigma / (1.0 + abs(loss))
