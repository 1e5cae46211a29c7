"""Classifier benchmark: SoftmaxClassifier against scikit-learn's LogisticRegression and SGDClassifier.

Data (both split 75/25, stratified, random_state=0; features standardized on the training part):
  digits      sklearn.datasets.load_digits (1797 × 64, 10 classes)
  synthetic   make_classification(n_samples=200_000, n_features=200, n_informative=120, n_redundant=20,
              n_classes=20, n_clusters_per_class=1, random_state=0), float32

Models, all with random_state=0 where they take one:
  softxent      SoftmaxClassifier() with its defaults (minibatch SGD, true multinomial)
  softxent-mlp  SoftmaxClassifier(hidden_layer_sizes=(100,)) (one ReLU layer; not a linear model)
  lr            LogisticRegression(max_iter=1000) (lbfgs, multinomial)
  sgd           SGDClassifier(loss="log_loss") (one-vs-rest)

Each (data, model) pair runs in a fresh process. Fit time is the median of --repeats fits after one
warm-up fit on 1000 rows (lazy imports and thread pools are not timed, for any model); SGDClassifier on the
synthetic data runs once (about a minute a fit). Memory is the peak RSS during the fits (VmHWM, reset once the
data is made) above the RSS at that point. The floor printed for softxent is what its epochs cost at the
matmul rate of this machine: epochs · 4·N·D·K FLOPs (the logits and ∂L/∂W of every row; the fused head
does no other matmul) over the rate of one (batch, D)×(D, K) matmul measured in the same process.

    python benchmarks/bench_classifier.py              # everything, prints a Markdown table
    python benchmarks/bench_classifier.py --case synthetic:softxent --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from bench_cpu import _reset_peak_rss, _status_mib
from softxent import SoftmaxClassifier

DATASETS = ("digits", "synthetic")
MODELS = ("softxent", "softxent-mlp", "lr", "sgd")


def load(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_test, y_train, y_test), standardized with the training part's mean and scale."""
    if dataset == "digits":
        X, y = load_digits(return_X_y=True)
    else:
        X, y = make_classification(
            n_samples=200_000, n_features=200, n_informative=120, n_redundant=20, n_classes=20,
            n_clusters_per_class=1, random_state=0,
        )  # fmt: skip
        X = X.astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    scaler = StandardScaler().fit(X_train)
    dtype = X.dtype
    return scaler.transform(X_train).astype(dtype), scaler.transform(X_test).astype(dtype), y_train, y_test


def make_model(model: str) -> object:
    if model == "softxent":
        return SoftmaxClassifier(random_state=0)
    if model == "softxent-mlp":
        return SoftmaxClassifier(hidden_layer_sizes=(100,), random_state=0)
    if model == "lr":
        return LogisticRegression(max_iter=1000)
    return SGDClassifier(loss="log_loss", random_state=0)


def matmul_rate(rows: int, features: int, classes: int, dtype: torch.dtype) -> float:
    """FLOP/s of one (rows, D)×(D, K) matmul, the shape of a training step's logits."""
    a, b = torch.randn(rows, features, dtype=dtype), torch.randn(features, classes, dtype=dtype)
    a @ b
    count = max(1, int(2e9 / (2 * rows * features * classes)))
    start = time.perf_counter()
    for _ in range(count):
        a @ b
    return 2 * rows * features * classes * count / (time.perf_counter() - start)


def run_case(dataset: str, model: str, repeats: int) -> dict[str, object]:
    X_train, X_test, y_train, y_test = load(dataset)
    warnings.simplefilter("ignore", ConvergenceWarning)
    make_model(model).fit(X_train[:1000], y_train[:1000])  # warm-up
    if dataset == "synthetic" and model == "sgd":
        repeats = 1
    _reset_peak_rss()
    base = _status_mib("VmRSS")
    times = []
    for _ in range(repeats):
        estimator = make_model(model)
        start = time.perf_counter()
        estimator.fit(X_train, y_train)
        times.append(time.perf_counter() - start)
    result: dict[str, object] = {
        "dataset": dataset,
        "model": model,
        "fit_s": statistics.median(times),
        "accuracy": float(estimator.score(X_test, y_test)),
        "peak_mib": _status_mib("VmHWM") - base,
        "n_iter": int(np.max(estimator.n_iter_)),
    }
    if model == "softxent":
        n, d = X_train.shape
        k = len(estimator.classes_)
        batch = estimator._batch_size(n)
        dtype = torch.float32 if X_train.dtype == np.float32 else torch.float64
        flops = estimator.n_iter_ * 4 * n * d * k
        result["floor_s"] = flops / matmul_rate(batch, d, k, dtype)
    return result


def _in_fresh_process(dataset: str, model: str, repeats: int) -> dict[str, object]:
    command = [sys.executable, __file__, "--case", f"{dataset}:{model}", "--repeats", str(repeats), "--json"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _table(results: list[dict[str, object]]) -> list[str]:
    lines = [
        "| data | model | fit s | × LR's time | SGDClassifier's time ÷ this | test accuracy | − LR's "
        "| epochs / iterations | floor s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in DATASETS:
        rows = {r["model"]: r for r in results if r["dataset"] == dataset}
        lr, sgd = rows["lr"], rows["sgd"]
        for model in MODELS:
            r = rows[model]
            floor = f"{r['floor_s']:.3f}" if "floor_s" in r else ""
            lines.append(
                f"| {dataset} | {model} | {r['fit_s']:.3f} | {r['fit_s'] / lr['fit_s']:.2f}× "
                f"| {sgd['fit_s'] / r['fit_s']:.1f}× | {r['accuracy']:.4f} "
                f"| {r['accuracy'] - lr['accuracy']:+.4f} "
                f"| {r['n_iter']} | {floor} | {r['peak_mib']:.0f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", help="one DATASET:MODEL, in this process (default: every case, each fresh)")
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per case; the median is reported")
    parser.add_argument("--json", action="store_true", help="print the case's result as JSON (with --case)")
    args = parser.parse_args()
    if args.case:
        dataset, model = args.case.split(":")
        result = run_case(dataset, model, args.repeats)
        print(json.dumps(result) if args.json else result)
        return
    results = []
    for dataset in DATASETS:
        for model in MODELS:
            results.append(_in_fresh_process(dataset, model, args.repeats))
            print(f"  {dataset}:{model} {results[-1]['fit_s']:.3f} s", file=sys.stderr, flush=True)
    import sklearn

    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print("\n".join(_table(results)))


if __name__ == "__main__":
    main()
