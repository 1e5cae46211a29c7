"""Classifier benchmark: SoftmaxClassifier against scikit-learn's LogisticRegression and SGDClassifier.

Data (split 75/25, stratified, random_state=0; features standardized on the training part):
  iris, wine, breast_cancer, digits   scikit-learn's bundled data sets
  synthetic   make_classification(n_samples=200_000, n_features=200, n_informative=120, n_redundant=20,
              n_classes=20, n_clusters_per_class=1, random_state=0), float32

Models, all with random_state=0 where they take one:
  softxent      SoftmaxClassifier() with its defaults (solver="auto": full-batch L-BFGS for the linear model)
  softxent-sgd  SoftmaxClassifier(solver="sgd") (minibatch SGD, 20 epochs at most)
  softxent-mlp  SoftmaxClassifier(hidden_layer_sizes=(100,)) (one ReLU layer, SGD; not a linear model)
  softxent-ovr  SigmoidClassifier(solver="sgd") (one-vs-rest sigmoids, the multi-label model's step)
  lr            LogisticRegression(max_iter=1000) (lbfgs, multinomial)
  sgd           SGDClassifier(loss="log_loss") (one-vs-rest)

Each (data, model) pair runs in a fresh process. Fit time is the median of --repeats fits after one
warm-up fit on 1000 rows (lazy imports and thread pools are not timed, for any model); SGDClassifier on the
synthetic data runs once (about a minute a fit). Memory is the peak RSS during the fits (VmHWM, reset once the
data is made) above the RSS at that point. The floor printed for softxent's models is what their passes over
the data cost at the matmul rate of this machine: passes · 4·N·D·K FLOPs (the logits and ∂L/∂W of every
row; the fused head does no other matmul) over the rate of one (batch, D)×(D, K) matmul measured in the same
process; a pass is an SGD epoch or an L-BFGS iteration (at least one evaluation of the objective each, so
the floor of an L-BFGS fit is a lower bound).

The parity table (--parity) fits each bundled data set, standardized, whole, with
LogisticRegression(C=1, tol=1e-8) and SoftmaxClassifier(solver="lbfgs", tol=1e-8) at the matched penalty
(alpha = 1/(C·n); 2/(C·n) on a binary problem, where SoftmaxClassifier keeps both rows of coef_) and
prints the training log-loss's relative difference, the largest coefficient difference and both fit times
(median of 3 after a warm-up, in one process, every LogisticRegression fit first, its BLAS held to one
thread as softxent's L-BFGS-B holds its own).

    python benchmarks/bench_classifier.py              # everything, prints Markdown tables
    python benchmarks/bench_classifier.py --case synthetic:softxent --repeats 3
    python benchmarks/bench_classifier.py --parity
    python benchmarks/bench_classifier.py --scale 1000000    # GPU against 2 CPU threads, both solvers
    python benchmarks/bench_classifier.py --epochs 12        # SGD epoch times against their floor

--scale N makes the synthetic problem with N samples (float32, cached in $TMPDIR) and fits
SoftmaxClassifier with each solver on the CPU with 2 torch threads and on CUDA (where there is one), each in
a fresh process after a warm-up fit on 10000 rows, and prints the times and the CPU ÷ GPU ratio (issue 16's
target: at least 5× at 1M × 200 × 20).
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
import threadpoolctl
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from bench_cpu import _reset_peak_rss, _status_mib
from softxent import SigmoidClassifier, SoftmaxClassifier

BUNDLED = {"iris": load_iris, "wine": load_wine, "breast_cancer": load_breast_cancer, "digits": load_digits}
DATASETS = (*BUNDLED, "synthetic")
MODELS = ("softxent", "softxent-sgd", "softxent-mlp", "softxent-ovr", "lr", "sgd")


def load(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_test, y_train, y_test), standardized with the training part's mean and scale."""
    if dataset in BUNDLED:
        X, y = BUNDLED[dataset](return_X_y=True)
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
    if model == "softxent-sgd":
        return SoftmaxClassifier(solver="sgd", random_state=0)
    if model == "softxent-ovr":
        return SigmoidClassifier(solver="sgd", random_state=0)
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
        "solver": getattr(estimator, "solver_", "lbfgs" if model == "lr" else "sgd"),
    }
    if model.startswith("softxent"):
        n, d = X_train.shape
        k = len(estimator.classes_)
        batch = min(n, max(128, min(4096, n // 32))) if estimator.solver_ == "sgd" else n
        dtype = torch.float32 if X_train.dtype == np.float32 else torch.float64
        width = (estimator.hidden_layer_sizes or (d,))[-1]
        flops = estimator.n_iter_ * 4 * n * width * k
        result["floor_s"] = flops / matmul_rate(min(batch, 4096), width, k, dtype)
    return result


def epoch_case(model: str, epochs: int) -> dict[str, object]:
    """SGD epochs of ``model`` (softxent-sgd or softxent-ovr) on the synthetic training data, each timed
    (stamps from the fit's per-epoch callback; the first epoch, which holds the fit's set-up, left out),
    against the floor of one epoch: 4·N·D·K FLOPs at the best of 5 measurements of the step's
    (4096, D)×(D, K) matmul rate (issue 16's CPU target: at most 2×)."""
    X_train, _, y_train, _ = load("synthetic")
    warnings.simplefilter("ignore", ConvergenceWarning)
    make_model(model).fit(X_train[:1000], y_train[:1000])  # warm-up
    estimator = make_model(model).set_params(max_iter=epochs, tol=None)
    stamps = [time.perf_counter()]
    estimator.fit(X_train, y_train, callback=lambda *_: stamps.append(time.perf_counter()))
    seconds = np.diff(stamps)[1:]
    n, d = X_train.shape
    k = len(estimator.classes_)
    floor = 4 * n * d * k / max(matmul_rate(4096, d, k, torch.float32) for _ in range(5))
    return {
        "model": model,
        "epochs": len(seconds),
        "epoch_min_s": float(seconds.min()),
        "epoch_median_s": float(np.median(seconds)),
        "floor_s": floor,
    }


def _epoch_table(results: list[dict[str, object]]) -> list[str]:
    lines = [
        "| model | epochs timed | epoch s (min / median) | floor s | × floor (min / median) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        low, mid, floor = r["epoch_min_s"], r["epoch_median_s"], r["floor_s"]
        lines.append(
            f"| {r['model']} | {r['epochs']} | {low:.4f} / {mid:.4f} | {floor:.4f} | "
            f"{low / floor:.2f}× / {mid / floor:.2f}× |"
        )
    return lines


def _scaled(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The synthetic problem with n samples, split and standardized like load's, cached as .npz."""
    import os
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"softxent_bench_synthetic_{n}.npz")
    if not os.path.exists(path):
        X, y = make_classification(
            n_samples=n, n_features=200, n_informative=120, n_redundant=20, n_classes=20,
            n_clusters_per_class=1, random_state=0,
        )  # fmt: skip
        X_train, X_test, y_train, y_test = train_test_split(
            X.astype(np.float32), y, test_size=0.25, stratify=y, random_state=0
        )
        scaler = StandardScaler().fit(X_train)
        X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
        np.savez(path, X_train=X_train.astype(np.float32), X_test=X_test.astype(np.float32), y_train=y_train,
                 y_test=y_test)  # fmt: skip
    data = np.load(path)
    return data["X_train"], data["X_test"], data["y_train"], data["y_test"]


def scale_case(n: int, device: str, solver: str) -> dict[str, object]:
    """One fit of SoftmaxClassifier(solver=solver, device=device) on the n-sample synthetic problem (2 torch
    threads on the CPU), after a warm-up fit on 10000 rows."""
    X_train, X_test, y_train, y_test = _scaled(n)
    if device == "cpu":
        torch.set_num_threads(2)
    warnings.simplefilter("ignore", ConvergenceWarning)
    SoftmaxClassifier(solver=solver, device=device, random_state=0).fit(X_train[:10_000], y_train[:10_000])
    if device == "cuda":
        torch.cuda.synchronize()
    estimator = SoftmaxClassifier(solver=solver, device=device, random_state=0)
    start = time.perf_counter()
    estimator.fit(X_train, y_train)
    fit_s = time.perf_counter() - start
    return {
        "device": device,
        "solver": solver,
        "fit_s": fit_s,
        "n_iter": int(estimator.n_iter_),
        "accuracy": float(estimator.score(X_test, y_test)),
    }


def _scale_table(n: int, results: list[dict[str, object]]) -> list[str]:
    lines = [
        f"| {n} × 200 × 20 | solver | device | fit s | epochs / iterations | test accuracy | CPU ÷ this |",
        "|---|---|---|---|---|---|---|",
    ]
    cpu = {r["solver"]: r["fit_s"] for r in results if r["device"] == "cpu"}
    for r in results:
        lines.append(
            f"| | {r['solver']} | {r['device']} | {r['fit_s']:.3f} | {r['n_iter']} | {r['accuracy']:.4f} "
            f"| {cpu[r['solver']] / r['fit_s']:.1f}× |"
        )
    return lines


def parity(C: float = 1.0) -> list[dict[str, object]]:
    """LogisticRegression and SoftmaxClassifier(solver="lbfgs") at the matched penalty, on each whole
    standardized bundled data set: their training log-losses, coefficient distance and fit times. Every
    LogisticRegression fit runs before the first softxent fit: torch's idle OpenMP threads, once started,
    spin beside scikit-learn's and made LogisticRegression up to 100× slower in the same process."""
    data = {}
    for name, loader in BUNDLED.items():
        X, y = loader(return_X_y=True)
        data[name] = StandardScaler().fit_transform(X), y
    logistic = {name: LogisticRegression(C=C, tol=1e-8, max_iter=10_000) for name in BUNDLED}
    # its L-BFGS-B on SciPy's OpenBLAS, whose idle threads spin: 10× slower on digits on 2 cores unless held
    # to one thread, as softxent holds its own L-BFGS-B
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        lr_s = {name: _median_fit_s(logistic[name], *data[name]) for name in BUNDLED}
    results = []
    for name, (X, y) in data.items():
        binary = len(np.unique(y)) == 2
        lr = logistic[name]
        ours = SoftmaxClassifier(solver="lbfgs", alpha=(2.0 if binary else 1.0) / (C * len(y)), tol=1e-8)
        ours_s = _median_fit_s(ours, X, y)
        coef = ours.coef_[1:] - ours.coef_[:1] if binary else ours.coef_
        theirs_loss, our_loss = log_loss(y, lr.predict_proba(X)), log_loss(y, ours.predict_proba(X))
        results.append(
            {
                "dataset": name,
                "log_loss": our_loss,
                "relative": (our_loss - theirs_loss) / theirs_loss,
                "coef_distance": float(np.abs(coef - lr.coef_).max()),
                "fit_s": ours_s,
                "lr_fit_s": lr_s[name],
                "n_iter": int(ours.n_iter_),
                "lr_n_iter": int(np.max(lr.n_iter_)),
            }
        )
    return results


def _median_fit_s(estimator: object, X: np.ndarray, y: np.ndarray, repeats: int = 3) -> float:
    """The median time of ``repeats`` fits after a warm-up fit (the estimator ends fitted)."""
    estimator.fit(X, y)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        estimator.fit(X, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _parity_table(results: list[dict[str, object]]) -> list[str]:
    lines = [
        "| data | training log-loss | relative to LR's | max coef difference | fit s | LR's fit s "
        "| iterations (LR's) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['dataset']} | {r['log_loss']:.6f} | {r['relative']:+.1e} | {r['coef_distance']:.1e} "
            f"| {r['fit_s']:.3f} | {r['lr_fit_s']:.3f} | {r['n_iter']} ({r['lr_n_iter']}) |"
        )
    return lines


def _in_fresh_process(*arguments: str) -> object:
    command = [sys.executable, __file__, *arguments, "--json"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _table(results: list[dict[str, object]]) -> list[str]:
    lines = [
        "| data | model | solver | fit s | × LR's time | SGDClassifier's time ÷ this | test accuracy "
        "| − LR's | epochs / iterations | floor s | × floor | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in DATASETS:
        rows = {r["model"]: r for r in results if r["dataset"] == dataset}
        lr, sgd = rows["lr"], rows["sgd"]
        for model in MODELS:
            r = rows[model]
            floor = f"{r['floor_s']:.3f}" if "floor_s" in r else ""
            over = f"{r['fit_s'] / r['floor_s']:.1f}×" if "floor_s" in r else ""
            lines.append(
                f"| {dataset} | {model} | {r['solver']} "
                f"| {r['fit_s']:.3f} | {r['fit_s'] / lr['fit_s']:.2f}× "
                f"| {sgd['fit_s'] / r['fit_s']:.1f}× | {r['accuracy']:.4f} "
                f"| {r['accuracy'] - lr['accuracy']:+.4f} "
                f"| {r['n_iter']} | {floor} | {over} | {r['peak_mib']:.0f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", help="one DATASET:MODEL, in this process (default: every case, each fresh)")
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per case; the median is reported")
    parser.add_argument("--json", action="store_true", help="print the case's result as JSON (with --case)")
    parser.add_argument("--parity", action="store_true", help="only the table against LogisticRegression")
    parser.add_argument("--scale", type=int, metavar="N", help="only GPU against 2 CPU threads at N samples")
    parser.add_argument(
        "--epochs", type=int, metavar="E", help="only SGD epoch times against the floor, over E epochs"
    )
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # a --scale case's
    parser.add_argument("--solver", default="lbfgs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale and args.json:
        print(json.dumps(scale_case(args.scale, args.device, args.solver)))
        return
    if args.scale:
        devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
        results = [
            _in_fresh_process("--scale", str(args.scale), "--device", device, "--solver", solver)
            for solver in ("lbfgs", "sgd")
            for device in devices
        ]
        print("\n".join(_scale_table(args.scale, results)))
        return
    if args.epochs:
        results = [epoch_case(model, args.epochs) for model in ("softxent-sgd", "softxent-ovr")]
        print(json.dumps(results) if args.json else "\n".join(_epoch_table(results)))
        return
    if args.parity:
        results = parity()
        print(json.dumps(results) if args.json else "\n".join(_parity_table(results)))
        return
    if args.case:
        dataset, model = args.case.split(":")
        result = run_case(dataset, model, args.repeats)
        print(json.dumps(result) if args.json else result)
        return
    results = []
    for dataset in DATASETS:
        for model in MODELS:
            results.append(_in_fresh_process("--case", f"{dataset}:{model}", "--repeats", str(args.repeats)))
            print(f"  {dataset}:{model} {results[-1]['fit_s']:.3f} s", file=sys.stderr, flush=True)
    parity_results = _in_fresh_process("--parity")
    import sklearn

    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print("\n".join(_table(results)))
    print()
    print("\n".join(_parity_table(parity_results)))


if __name__ == "__main__":
    main()
