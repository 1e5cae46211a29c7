"""The LLM-ops benchmark's cases run at its --smoke shape, each provider's loss equal to softxent's, so
the table cannot rot or compare different losses unnoticed (no timing is asserted: performance lives in
benchmarks)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_llm", ROOT / "benchmarks" / "bench_llm.py")
bench_llm = importlib.util.module_from_spec(spec)
sys.modules["bench_llm"] = bench_llm
spec.loader.exec_module(bench_llm)


@pytest.mark.parametrize("family", sorted(bench_llm.FAMILIES))
def test_every_provider_computes_the_same_step(family):
    """Each provider's step runs, and its gradients equal softxent's (the same loss is measured)."""
    grads = {}
    for provider in bench_llm.FAMILIES[family]:
        if provider == "trl" and importlib.util.find_spec("trl") is None:
            continue
        step, params = bench_llm.make_step(family, provider, bench_llm.SMOKE_SHAPE, with_params=True)
        step()
        grads[provider] = [p.grad.clone() for p in params]
    for provider, found in grads.items():
        for mine, theirs in zip(found, grads["softxent"], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=f"{family}:{provider}")


def test_run_case_reports_time_and_memory():
    result = bench_llm.run_case("ce:softxent", 1, bench_llm.SMOKE_SHAPE)
    assert result["seconds"] > 0
    assert result["peak_mib"] >= 0


@pytest.mark.parametrize("provider", ["eager", "softxent"])
def test_dw_error_is_measured_against_float64(provider):
    """The GPU table's dW error column, run here on the CPU: bf16 steps are within a few bf16 ulps of the
    float64 step on the same inputs, and the float64 step itself has no error."""
    error = bench_llm.dw_error("jsd", provider, bench_llm.SMOKE_SHAPE, device="cpu", rows=16)
    assert 0.0 < error < 0.05
    step, params = bench_llm.make_step("jsd", "eager", bench_llm.SMOKE_SHAPE, True, rows=16, exact=True)
    step()
    assert params[1].grad.dtype == torch.float64
