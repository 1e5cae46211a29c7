"""The classifier benchmark's modes run end to end on small data, and report what they say they report."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_classifier  # benchmarks/ is not a package: found through the path above


@pytest.fixture
def small_synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The synthetic data set at 6000 × 12, 5 classes (4500 training rows, 33 steps of 140 an epoch), so that
    a mode runs in about a second."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6000, 12)).astype(np.float32)
    y = (X[:, :5] + 0.5 * rng.standard_normal((6000, 5))).argmax(axis=1)
    monkeypatch.setattr(bench_classifier, "load", lambda dataset: (X[:4500], X[4500:], y[:4500], y[4500:]))


@pytest.mark.usefixtures("small_synthetic")
@pytest.mark.parametrize("model", ["softxent-sgd", "softxent-ovr"])
def test_epoch_mode_times_every_epoch_but_the_first(model: str) -> None:
    result = bench_classifier.epoch_case(model, 4)
    assert result["model"] == model
    assert result["epochs"] == 3  # the first epoch holds the fit's set-up and is left out
    assert 0 < result["epoch_min_s"] <= result["epoch_median_s"]
    # the floor is 4·N·D·K FLOPs of one epoch at a measured rate: positive, and far below a whole epoch's
    # time at 12 features (the step is all overhead there)
    assert 0 < result["floor_s"] < result["epoch_min_s"]
    header, _, row = bench_classifier._epoch_table([result])
    assert header.startswith("| model |")
    assert row.startswith(f"| {model} | 3 |")
    assert row.endswith("× |")


def test_a_case_reports_its_fit_and_floor() -> None:
    result = bench_classifier.run_case("iris", "softxent-sgd", 1)
    assert result["solver"] == "sgd"
    assert 0.5 < result["accuracy"] <= 1.0
    assert 0 < result["floor_s"] < result["fit_s"]
