"""The ``softxent`` command line: train, predict with and evaluate softmax / sigmoid classifiers.

    softxent train [DATA] [--target COLUMN | --multilabel COL1,COL2,...] [options]
    softxent predict MODEL DATA [--out FILE]
    softxent evaluate MODEL DATA [--target COLUMN]

``train`` without DATA fits scikit-learn's bundled digits; with ``--nproc N``, or run by torchrun, it trains
data-parallel on torch.distributed (:mod:`softxent.distributed._data_parallel`). Bad input (a missing or
unreadable file, an unknown column, a non-numeric or missing feature value, a single class, a model trained
on other features, a corrupted model file) prints one ``softxent: error: ...`` line on stderr and exits with
status 2; every file is written to a temporary file and renamed into place, so no output is ever half
written.

This module parses arguments, orchestrates and prints; the readers live in ``softxent._data`` and the
models in ``softxent.estimators``.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

import softxent
from softxent._data import (
    Dataset,
    InputError,
    fingerprint,
    fit_standardizer,
    load_digits_dataset,
    read_dataset,
    standardize,
)
from softxent._files import atomic_path
from softxent.distributed._data_parallel import (
    RankZeroError,
    default_backend,
    init_from_torchrun,
    launch,
    rank_and_world_size,
    run_on_rank_zero,
    torchrun_environment,
)
from softxent.estimators import (
    SigmoidClassifier,
    SoftmaxClassifier,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)

PROG = "softxent"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOSS_CURVE_FILE = "loss_curve.png"
CONFUSION_FILE = "confusion_matrix.png"
# Per-class rows of the report, and panels of the multi-label confusion figure, are shown up to this many.
MAX_LISTED_CLASSES = 20
# Options that decide the training result: a checkpoint resumes only a run with the same values.
RESUME_OPTIONS = (
    "target",
    "multilabel",
    "test_size",
    "standardize",
    "epochs",
    "lr",
    "batch_size",
    "hidden",
    "alpha",
    "seed",
)
_ESTIMATOR = SoftmaxClassifier().get_params()  # the training options default to the estimator's own
DEFAULTS = {
    "test_size": 0.25,
    "epochs": _ESTIMATOR["max_iter"],
    "lr": _ESTIMATOR["eta0"],
    "batch_size": _ESTIMATOR["batch_size"],
    "hidden": "",
    "alpha": _ESTIMATOR["alpha"],
    "device": "auto",
    "seed": 0,
    "out": "softxent-model",
    "checkpoint_every": 0,
    "nproc": 1,
}


# --- argument parsing ----------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _batch_size(text: str) -> int | str:
    """argparse type: "auto" or an int >= 1."""
    return "auto" if text == "auto" else _positive_int(text)


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    """argparse type: a float strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _hidden_sizes(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated layer widths ("128,64"); "" is no hidden layer.

    >>> _hidden_sizes("128, 64"), _hidden_sizes("")
    ((128, 64), ())
    """
    if not text.strip():
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 128,64, got {text!r}"
        ) from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected widths >= 1, got {text!r}")
    return sizes


def _column_list(text: str) -> list[str]:
    """argparse type: comma-separated column names."""
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated column names, got {text!r}")
    return names


TRAIN_DESCRIPTION = """\
Train a softmax classifier (or, with --multilabel, a multi-label sigmoid
classifier) by minibatch SGD.

DATA is one of
  - a CSV (.csv), TSV (.tsv, .tab) or Parquet (.parquet, .pq) table with a
    header: the --target column holds the class labels, every other column is
    a numeric feature;
  - an NPZ (.npz) with arrays X (samples x features) and y (or the array
    named by --target), and optionally a string array feature_names;
  - a LibSVM/SVMlight file (.svm, .libsvm, .svmlight); feature indices are
    used as written, so a 1-based file has an empty column x0.
CSV, TSV and LibSVM files may be .gz or .bz2 compressed. Without DATA, the
model is trained on scikit-learn's bundled digits (8x8 images, 10 classes).

A stratified --test-size split is held out (a random one for --multilabel).
The progress bar shows each epoch's training loss and the accuracy on that
split (subset accuracy for --multilabel). At the end, a table of accuracy,
log-loss, macro-F1 and per-class recall on the split is printed (for
--multilabel: subset accuracy, log-loss, micro/macro-F1 and per-label F1;
per-class rows up to 20 classes), and --out DIR gets:
  model.safetensors       the weights, with JSON metadata: feature and class
                          names, the standardization, the options, the task
                          and the softxent version
  loss_curve.png          training loss and held-out accuracy per epoch
  confusion_matrix.png    the confusion matrix on the held-out split; for
                          --multilabel one 2x2 panel per label, skipped with
                          a note beyond 20 labels
  checkpoint.safetensors  only with --checkpoint-every, while training; it is
                          removed once the model is written

With --nproc N (N > 1), training runs data-parallel on N local processes
(Gloo on the CPU; NCCL on CUDA, one GPU per process): every process reads
DATA and trains on its share of every minibatch, one all-reduce per step sums
the gradients, and the model equals a one-process run's within float
rounding. Run by torchrun instead (torchrun --nproc-per-node N [--nnodes M
--node-rank K --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m softxent.cli
train ...), each worker joins torchrun's process group; leave --nproc at 1
there. Either way rank 0 alone prints and writes the files.
"""

PREDICT_DESCRIPTION = """\
Predict with a model written by `softxent train`. Writes a CSV with a
`prediction` column (the predicted class) and one `proba_<class>` column per
class; for a multi-label model, `pred_<label>` (0/1) and `proba_<label>` per
label. The model's standardization is applied. DATA is read as by `train` (any
of its formats); it must have the model's feature columns, in any order, and
may have the target column(s), which are ignored.
"""

EVALUATE_DESCRIPTION = """\
Evaluate a model written by `softxent train` on labelled DATA (any format that
`train` reads): prints the same table as `train` (accuracy, log-loss,
macro-F1, per-class recall; or the multi-label metrics).
"""

EPILOG = """\
Bad input (a missing or unreadable file, an unknown column, a non-numeric or
missing value, a single class, a model trained on other features) prints one
`softxent: error: ...` line and exits with status 2.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``softxent`` and its three commands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, apply and evaluate softxent's softmax / sigmoid classifiers.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {softxent.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a classifier", description=TRAIN_DESCRIPTION, formatter_class=formatter
    )
    train.add_argument(
        "data", nargs="?", metavar="DATA", help="training data (default: scikit-learn's digits)"
    )
    target = train.add_mutually_exclusive_group()
    target.add_argument(
        "--target",
        metavar="COLUMN",
        help="the label column of a CSV/TSV/Parquet table, or the label array of an NPZ "
        "(default: none for tables, so it is required there; y for NPZ; LibSVM files carry their labels)",
    )
    target.add_argument(
        "--multilabel",
        metavar="COL1,COL2,...",
        type=_column_list,
        help="train a multi-label sigmoid classifier on these binary (0/1) columns of a CSV/TSV/Parquet "
        "table (or 1-D arrays of an NPZ) instead of a softmax classifier on --target (default: off)",
    )
    train.add_argument(
        "--test-size",
        type=_fraction,
        default=DEFAULTS["test_size"],
        metavar="FRACTION",
        help="fraction of the rows held out for validation and the final table (default: %(default)s)",
    )
    train.add_argument(
        "--no-standardize",
        dest="standardize",
        action="store_false",
        help="do not standardize the features; by default each feature is scaled to zero mean and unit "
        "variance on the training split (sparse LibSVM data: unit variance only) and the scaler is stored "
        "with the model",
    )
    train.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULTS["epochs"],
        help="most passes over the training split (the estimator's max_iter); training stops earlier once "
        f"the training loss has improved by less than {_ESTIMATOR['tol']} for "
        f"{_ESTIMATOR['n_iter_no_change']} epochs (default: %(default)s)",
    )
    train.add_argument(
        "--lr",
        type=_positive_float,
        default=DEFAULTS["lr"],
        help="initial SGD learning rate eta0, decayed by a cosine schedule (default: %(default)s)",
    )
    train.add_argument(
        "--batch-size",
        type=_batch_size,
        default=DEFAULTS["batch_size"],
        help="rows per SGD step, or auto: 1/32 of the training rows, clipped to [128, 4096] "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--hidden",
        type=_hidden_sizes,
        default=DEFAULTS["hidden"],
        metavar="SIZES",
        help="comma-separated widths of ReLU hidden layers, e.g. 128,64 "
        "(default: none, the linear model z = Wx + b)",
    )
    train.add_argument(
        "--alpha",
        type=_non_negative_float,
        default=DEFAULTS["alpha"],
        help="L2 penalty on the weights (default: %(default)s)",
    )
    train.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=DEFAULTS["device"],
        help="where to train; auto picks cuda when available (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS["seed"],
        help="seed of the test split, the initial weights and the shuffling (default: %(default)s)",
    )
    train.add_argument(
        "--out",
        default=DEFAULTS["out"],
        metavar="DIR",
        help="directory for the model, the plots and the checkpoint (default: %(default)s)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=DEFAULTS["checkpoint_every"],
        metavar="N",
        help="write DIR/checkpoint.safetensors (atomically) every N epochs; 0 is never; with --resume, "
        "0 keeps the interrupted run's interval (default: %(default)s)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run from DIR/checkpoint.safetensors; needs the same DATA and options, "
        "and ends with the same model as an uninterrupted run (default: off)",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=DEFAULTS["nproc"],
        metavar="N",
        help="train data-parallel on N local processes (Gloo on the CPU, NCCL with CUDA: one GPU each); "
        "under torchrun leave it at 1, the processes are torchrun's (default: %(default)s)",
    )
    train.set_defaults(handler=run_train)

    predict = commands.add_parser(
        "predict",
        help="predict with a trained model",
        description=PREDICT_DESCRIPTION,
        formatter_class=formatter,
    )
    predict.add_argument(
        "model", metavar="MODEL", help=f"a model file, or the --out directory of train (holding {MODEL_FILE})"
    )
    predict.add_argument("data", metavar="DATA", help="the rows to predict")
    predict.add_argument("--out", metavar="FILE", help="CSV file to write (default: the standard output)")
    predict.set_defaults(handler=run_predict)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a trained model",
        description=EVALUATE_DESCRIPTION,
        formatter_class=formatter,
    )
    evaluate.add_argument(
        "model", metavar="MODEL", help=f"a model file, or the --out directory of train (holding {MODEL_FILE})"
    )
    evaluate.add_argument("data", metavar="DATA", help="labelled rows")
    evaluate.add_argument(
        "--target",
        metavar="COLUMN",
        help="the label column (default: the one the model was trained on); multi-label models use their "
        "label columns",
    )
    evaluate.set_defaults(handler=run_evaluate)
    return parser


# --- the model and its metadata --------------------------------------------------------------------------


@dataclass
class Model:
    """A fitted estimator with what the command line stored beside it."""

    estimator: SoftmaxClassifier | SigmoidClassifier
    multilabel: bool
    feature_names: list[str] | None
    targets: list[str] | None
    label_names: list[str]
    mean: np.ndarray | None
    scale: np.ndarray | None

    def prepare(self, X: np.ndarray | sp.csr_matrix) -> Any:
        """Apply the stored standardization (if any) to raw features; a DataFrame for an estimator that
        was fitted on one (a model saved from Python), so that scikit-learn sees its feature names."""
        import pandas as pd

        X = X if self.mean is None else standardize(X, self.mean, self.scale)
        if hasattr(self.estimator, "feature_names_in_") and not sp.issparse(X):
            return pd.DataFrame(X, columns=self.feature_names)
        return X

    def metadata(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The JSON metadata written with the model."""
        scaler = None if self.mean is None else {"mean": self.mean.tolist(), "scale": self.scale.tolist()}
        return {
            "task": "multilabel" if self.multilabel else "multiclass",
            "feature_names": self.feature_names,
            "targets": self.targets,
            "label_names": self.label_names,
            "scaler": scaler,
            **extra,
        }


def _model_path(path: str) -> Path:
    """MODEL as given, or the model file inside a train --out directory."""
    model = Path(path)
    if model.is_dir():
        model = model / MODEL_FILE
    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    return model


def open_model(path: str) -> Model:
    """Load a model file (or a train --out directory) with its metadata.

    A model saved from Python (``softxent.estimators.save_model`` without the command line's metadata)
    works too: its features are checked by count (or by ``feature_names_in_``) and it has no scaler.
    """
    try:
        estimator, metadata = load_model(_model_path(path))
    except (ValueError, OSError) as error:
        raise InputError(str(error).splitlines()[0]) from None
    metadata = metadata if isinstance(metadata, dict) else {}
    try:
        task = metadata.get("task")
        if task is None:
            task = "multilabel" if getattr(estimator, "target_type_", None) == "multilabel-indicator" else ""
        names = metadata.get("feature_names")
        if names is None and hasattr(estimator, "feature_names_in_"):
            names = [str(name) for name in estimator.feature_names_in_]
        scaler = metadata.get("scaler")
        mean = None if scaler is None else np.asarray(scaler["mean"], dtype=np.float64)
        scale = None if scaler is None else np.asarray(scaler["scale"], dtype=np.float64)
        n_features = estimator.n_features_in_
        if (names is not None and len(names) != n_features) or (
            scaler is not None and not mean.shape == scale.shape == (n_features,)
        ):
            raise ValueError(f"feature names or scaler do not match the model's {n_features} features")
        model = Model(
            estimator=estimator,
            multilabel=task == "multilabel",
            feature_names=None if names is None else [str(name) for name in names],
            targets=metadata.get("targets"),
            label_names=metadata.get("label_names") or [str(label) for label in estimator.classes_],
            mean=mean,
            scale=scale,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path}: the model's command-line metadata is invalid ({error})") from None
    return model


def _read_for_model(model: Model, data: str, targets: list[str] | None, require_targets: bool) -> Dataset:
    """Read DATA with the model's features; generic feature names when the model has none stored."""
    names = model.feature_names or [f"x{i}" for i in range(model.estimator.n_features_in_)]
    return read_dataset(
        data, targets, multilabel=model.multilabel, require_targets=require_targets, feature_names=names
    )


# --- reports -------------------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows under a header, text left-aligned and numbers right-aligned; floats with 4 decimals.

    >>> print(format_table(["metric", "value"], [["accuracy", 0.97], ["log-loss", 0.1]]))
    metric     value
    accuracy  0.9700
    log-loss  0.1000
    """
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(header))]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = []
    for row in [list(header), *cells]:
        parts = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def report(model: Model, X: np.ndarray | sp.csr_matrix, y: np.ndarray, what: str) -> str:
    """The metrics table of the model on (standardized) X against y."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score

    estimator = model.estimator
    proba = estimator.predict_proba(X)
    predicted = estimator.predict(X)
    lines = [f"{what}: {X.shape[0]} samples"]
    if model.multilabel:
        clipped = np.clip(proba, 1e-15, 1 - 1e-15)
        bce = float(-np.mean(y * np.log(clipped) + (1 - y) * np.log1p(-clipped)))
        rows = [
            ["subset accuracy", float(accuracy_score(y, predicted))],
            ["log-loss (mean per label)", bce],
            ["micro-F1", float(f1_score(y, predicted, average="micro", zero_division=0))],
            ["macro-F1", float(f1_score(y, predicted, average="macro", zero_division=0))],
        ]
        lines.append(format_table(["metric", "value"], rows))
        per_label = f1_score(y, predicted, average=None, zero_division=0)
        label_rows = [
            [name, float(score), int(y[:, i].sum())]
            for i, (name, score) in enumerate(zip(model.label_names, per_label, strict=True))
        ]
        lines.append(_limited(["label", "F1", "positives"], label_rows, "labels"))
        return "\n\n".join(lines)
    classes = estimator.classes_
    rows = [
        ["accuracy", float(accuracy_score(y, predicted))],
        ["log-loss", float(log_loss(y, proba, labels=classes))],
        ["macro-F1", float(f1_score(y, predicted, labels=classes, average="macro", zero_division=0))],
    ]
    lines.append(format_table(["metric", "value"], rows))
    recall = recall_score(y, predicted, labels=classes, average=None, zero_division=0)
    support = [int(np.sum(y == label)) for label in classes]
    class_rows = [[name, float(r), s] for name, r, s in zip(model.label_names, recall, support, strict=True)]
    lines.append(_limited(["class", "recall", "support"], class_rows, "classes"))
    return "\n\n".join(lines)


def _limited(header: list[str], rows: list[list[object]], what: str) -> str:
    """A per-class table, or a note when there are more than MAX_LISTED_CLASSES rows."""
    if len(rows) > MAX_LISTED_CLASSES:
        return f"(per-{header[0]} table omitted: {len(rows)} {what}, more than {MAX_LISTED_CLASSES})"
    return format_table(header, rows)


def _check_known_classes(model: Model, y: np.ndarray, source: str) -> None:
    """Raise if y has classes the model was not trained on."""
    if model.multilabel:
        return
    unknown = np.setdiff1d(np.unique(y.astype(str)), np.asarray(model.estimator.classes_).astype(str))
    if unknown.size:
        shown = ", ".join(repr(v) for v in unknown[:8].tolist())
        raise InputError(f"{source}: the target has classes the model was not trained on: {shown}")


# --- plots ---------------------------------------------------------------------------------------------


def plot_loss_curve(
    path: Path, loss: Sequence[float], val_accuracy: Sequence[float], accuracy_name: str
) -> None:
    """Training loss per epoch (and held-out accuracy on a second axis), as a PNG written atomically."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axis = figure.add_subplot()
    epochs = np.arange(1, len(loss) + 1)
    axis.plot(epochs, loss, color="tab:blue", marker="." if len(loss) < 50 else None)
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss", color="tab:blue")
    if len(val_accuracy) == len(loss) and len(loss):
        twin = axis.twinx()
        twin.plot(epochs, val_accuracy, color="tab:orange", marker="." if len(loss) < 50 else None)
        twin.set_ylabel(f"held-out {accuracy_name}", color="tab:orange")
    axis.set_title("softxent train")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


def plot_confusion(path: Path, model: Model, y: np.ndarray, predicted: np.ndarray) -> str | None:
    """The confusion matrix as a PNG written atomically; returns a note instead when it is skipped."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, multilabel_confusion_matrix

    if model.multilabel:
        n_labels = len(model.label_names)
        if n_labels > MAX_LISTED_CLASSES:
            return f"confusion matrix skipped: {n_labels} labels > {MAX_LISTED_CLASSES}"
        columns = min(n_labels, 4)
        rows = math.ceil(n_labels / columns)
        figure = Figure(figsize=(2.6 * columns, 2.6 * rows), layout="constrained")
        matrices = multilabel_confusion_matrix(y, predicted)
        for index, (name, matrix) in enumerate(zip(model.label_names, matrices, strict=True)):
            axis = figure.add_subplot(rows, columns, index + 1)
            ConfusionMatrixDisplay(matrix, display_labels=["0", "1"]).plot(ax=axis, colorbar=False)
            axis.set_title(name)
    else:
        n_classes = len(model.label_names)
        size = min(4.0 + 0.35 * n_classes, 24.0)
        figure = Figure(figsize=(size, size), layout="constrained")
        axis = figure.add_subplot()
        matrix = confusion_matrix(y, predicted, labels=model.estimator.classes_)
        ConfusionMatrixDisplay(matrix, display_labels=model.label_names).plot(
            ax=axis,
            colorbar=False,
            include_values=n_classes <= MAX_LISTED_CLASSES,
            xticks_rotation="horizontal" if max(map(len, model.label_names)) <= 3 else "vertical",
        )
        axis.set_title("confusion matrix (held-out split)")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return None


# --- commands ------------------------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The training options as JSON values."""
    return {
        "data": args.data,
        "target": args.target,
        "multilabel": args.multilabel,
        "test_size": args.test_size,
        "standardize": args.standardize,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "hidden": list(args.hidden),
        "alpha": args.alpha,
        "device": args.device,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
    }


def _read_training_data(args: argparse.Namespace) -> Dataset:
    """DATA (or the digits) with its target, checked to be trainable."""
    if args.data is None:
        if args.target is not None or args.multilabel is not None:
            raise InputError("--target and --multilabel need DATA (the digits bring their own target)")
        return load_digits_dataset()
    targets = args.multilabel if args.multilabel is not None else [args.target] if args.target else None
    dataset = read_dataset(args.data, targets, multilabel=args.multilabel is not None)
    if args.multilabel is None:
        classes = np.unique(dataset.y.astype(str))
        if len(classes) < 2:
            where = f"target column {args.target!r}" if args.target else "the target"
            raise InputError(
                f"{dataset.source}: {where} has a single class ({str(classes[0])!r}); need at least 2"
            )
    return dataset


def _split(args: argparse.Namespace, dataset: Dataset) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """The held-out split: stratified by class, random for multi-label targets."""
    from sklearn.model_selection import train_test_split

    stratify = None if args.multilabel is not None else dataset.y
    try:
        X_train, X_test, y_train, y_test = train_test_split(
            dataset.X, dataset.y, test_size=args.test_size, random_state=args.seed, stratify=stratify
        )
    except ValueError as error:
        raise InputError(
            f"{dataset.source}: cannot hold out a {'stratified ' if stratify is not None else ''}"
            f"--test-size {args.test_size} split: {error}"
        ) from None
    return X_train, X_test, y_train, y_test


def _resume_state(
    args: argparse.Namespace, checkpoint_path: Path, data_hash: str
) -> tuple[Any, dict[str, Any]]:
    """The checkpoint to resume from and its metadata, checked against this run's data and options."""
    if not checkpoint_path.is_file():
        raise InputError(
            f"--resume: no checkpoint at {checkpoint_path}; run without --resume to start afresh"
        )
    try:
        checkpoint, metadata = load_checkpoint(checkpoint_path)
    except (ValueError, OSError) as error:
        raise InputError(f"--resume: {str(error).splitlines()[0]}") from None
    metadata = metadata or {}
    stored = metadata.get("options", {})
    current = _options(args)
    for name in RESUME_OPTIONS:
        if stored.get(name) != current[name]:
            flag = "--" + name.replace("_", "-")
            raise InputError(
                f"--resume: the checkpoint was written with {flag} {stored.get(name)!r}, this run has "
                f"{current[name]!r}; use the same options or run without --resume"
            )
    if metadata.get("data_sha256") != data_hash:
        raise InputError("--resume: the checkpoint was written for other training data; run without --resume")
    return checkpoint, metadata


def _build_estimator(args: argparse.Namespace) -> SoftmaxClassifier | SigmoidClassifier:
    """The estimator the train options describe (the other parameters keep the estimator's defaults)."""
    kind = SigmoidClassifier if args.multilabel is not None else SoftmaxClassifier
    return kind(
        hidden_layer_sizes=args.hidden,
        alpha=args.alpha,
        eta0=args.lr,
        batch_size=args.batch_size,
        max_iter=args.epochs,
        device=args.device,
        random_state=args.seed,
    )


def _training_device(args: argparse.Namespace) -> str:
    """The device --device names: "cuda" for cuda, and for auto where CUDA is available; else "cpu"."""
    return "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"


def run_train(args: argparse.Namespace) -> int:
    """``softxent train``: in this process, on --nproc local processes, or as one rank of torchrun's
    process group."""
    if args.nproc < 1:
        raise InputError(f"--nproc: expected an integer >= 1, got {args.nproc}")
    try:
        environment = torchrun_environment()
    except ValueError as error:
        raise InputError(str(error)) from None
    backend = default_backend(_training_device(args))
    if args.nproc > 1:
        if environment is not None:
            raise InputError(
                f"--nproc: expected 1 under torchrun (RANK={environment.rank}, "
                f"WORLD_SIZE={environment.world_size} are set), got {args.nproc}; let torchrun start the "
                "processes (--nproc-per-node)"
            )
        if backend == "nccl" and torch.cuda.device_count() < args.nproc:
            raise InputError(
                f"--nproc: expected at most {torch.cuda.device_count()} processes with CUDA (NCCL runs one "
                f"per GPU), got {args.nproc}; use fewer processes or --device cpu"
            )
        statuses = launch(_train_on_rank, args.nproc, (args,), backend=backend)
        return next((status for status in statuses if status), 0)
    try:
        joined = init_from_torchrun(backend)
    except (ValueError, RuntimeError) as error:  # torch's DistNetworkError, DistStoreError, ...
        raise InputError(f"torchrun environment: cannot join the process group: {error}") from None
    if not joined:
        return _train(args)
    try:
        return _exit_status(_train, args)
    finally:
        dist.destroy_process_group()


def _train_on_rank(args: argparse.Namespace) -> int:
    """One process of ``softxent train --nproc N`` (started by :func:`launch`, in the process group)."""
    return _exit_status(_train, args)


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")


def _train(args: argparse.Namespace) -> int:
    """Train and write the outputs, alone or as one rank of a data-parallel run.

    Data-parallel, every rank reads DATA, splits and standardizes it the same way and fits (the estimator
    takes this rank's share of every minibatch and all-reduces the gradients); rank 0 alone checks --out,
    reads a --resume checkpoint (and shares it), prints, evaluates and writes files, the other ranks
    waiting for it (:func:`run_on_rank_zero`), so a failure there ends every rank.
    """
    from sklearn.metrics import accuracy_score
    from tqdm import tqdm

    rank, world_size = rank_and_world_size()
    lead = rank == 0
    out = Path(args.out)
    run_on_rank_zero(_check_out_dir, out)
    dataset = _read_training_data(args)
    X_train, X_test, y_train, y_test = _split(args, dataset)
    mean = scale = None
    if args.standardize:
        mean, scale = fit_standardizer(X_train)
        X_train, X_test = standardize(X_train, mean, scale), standardize(X_test, mean, scale)
    data_hash = fingerprint(X_train, y_train)
    multilabel = args.multilabel is not None
    estimator = _build_estimator(args)
    checkpoint_path = out / CHECKPOINT_FILE
    resume, history, checkpoint_every = None, [], args.checkpoint_every
    if args.resume:
        resume, stored = run_on_rank_zero(_resume_state, args, checkpoint_path, data_hash, share_result=True)
        history = list(stored.get("val_accuracy", []))
        checkpoint_every = checkpoint_every or int(stored.get("options", {}).get("checkpoint_every") or 0)

    accuracy_name = "subset accuracy" if multilabel else "accuracy"
    outputs = f"{y_train.shape[1]} labels" if multilabel else f"{len(np.unique(y_train.astype(str)))} classes"
    if lead:
        print(
            f"training {type(estimator).__name__} on {dataset.source}: {X_train.shape[0]} training and "
            f"{X_test.shape[0]} held-out samples, {X_train.shape[1]} features, {outputs}"
            + (f"; data-parallel on {world_size} processes" if world_size > 1 else "")
            + (f"; resuming after epoch {resume.info['epoch']}" if resume is not None else "")
        )
    options = _options(args)
    progress: list[Any] = []

    def write_checkpoint(fitted: SoftmaxClassifier | SigmoidClassifier) -> None:
        metadata = {"options": options, "data_sha256": data_hash, "val_accuracy": history}
        out.mkdir(parents=True, exist_ok=True)  # made when first needed: a failed fit leaves nothing
        save_checkpoint(fitted.checkpoint(), checkpoint_path, metadata=metadata)

    def on_epoch(fitted: SoftmaxClassifier | SigmoidClassifier, info: dict[str, Any]) -> bool:
        """Advance the progress bar, record the held-out accuracy (rank 0), write a checkpoint when due."""
        if lead:
            if not progress:  # created at the first epoch, so that a fit that fails at once prints no bar
                progress.append(
                    tqdm(
                        total=info["max_iter"],
                        initial=info["epoch"] - 1,
                        desc="train",
                        unit="epoch",
                        file=sys.stderr,
                    )
                )
            accuracy = float(accuracy_score(y_test, fitted.predict(X_test)))
            history.append(accuracy)
            progress[0].set_postfix(loss=f"{info['loss']:.4f}", val_acc=f"{accuracy:.4f}", refresh=False)
            progress[0].update(1)
        if checkpoint_every and info["epoch"] % checkpoint_every == 0:
            run_on_rank_zero(write_checkpoint, fitted)
        return False

    try:
        estimator.fit(X_train, y_train, callback=on_epoch, resume=resume)
    except ValueError as error:
        raise InputError(str(error).splitlines()[0]) from None
    except KeyboardInterrupt:
        if progress:
            progress[0].close()
        if not checkpoint_path.is_file():
            raise
        if lead:
            print(
                f"{PROG}: interrupted; {checkpoint_path} holds the last checkpoint: "
                "run the same command with --resume to continue",
                file=sys.stderr,
            )
        return 130
    finally:
        if progress:
            progress[0].total = progress[0].n  # the stopping rule may end training before --epochs
            progress[0].close()

    def write_outputs() -> None:
        """The model, the plots and the report (rank 0)."""
        label_names = list(args.multilabel) if multilabel else [str(label) for label in estimator.classes_]
        model = Model(
            estimator=estimator,
            multilabel=multilabel,
            feature_names=dataset.feature_names,
            targets=dataset.targets,
            label_names=label_names,
            mean=mean,
            scale=scale,
        )
        out.mkdir(parents=True, exist_ok=True)
        extra = {"data": dataset.source, "options": options, "processes": world_size}
        save_model(estimator, out / MODEL_FILE, metadata=model.metadata(extra))
        written = [out / MODEL_FILE]
        plot_loss_curve(out / LOSS_CURVE_FILE, estimator.loss_curve_, history, accuracy_name)
        written.append(out / LOSS_CURVE_FILE)
        note = plot_confusion(out / CONFUSION_FILE, model, y_test, estimator.predict(X_test))
        if note is None:
            written.append(out / CONFUSION_FILE)
        checkpoint_path.unlink(missing_ok=True)  # the model supersedes it

        print()
        print(report(model, X_test, y_test, "held-out split"))
        print()
        if note is not None:
            print(note)
        print("wrote " + "\n      ".join(str(path) for path in written))

    run_on_rank_zero(write_outputs)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``softxent predict``."""
    import pandas as pd

    model = open_model(args.model)
    dataset = _read_for_model(model, args.data, model.targets, require_targets=False)
    X = model.prepare(dataset.X)
    proba = model.estimator.predict_proba(X)
    predicted = model.estimator.predict(X)
    if model.multilabel:
        columns = {f"pred_{name}": predicted[:, i] for i, name in enumerate(model.label_names)}
    else:
        columns = {"prediction": predicted}
    columns.update({f"proba_{name}": proba[:, i] for i, name in enumerate(model.label_names)})
    frame = pd.DataFrame(columns)
    if args.out is None:
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False, float_format="%.6g")
        sys.stdout.write(buffer.getvalue())
        return 0
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: no such directory {out.parent}")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory")
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    print(f"wrote {out} ({len(frame)} rows)", file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``softxent evaluate``."""
    model = open_model(args.model)
    targets = model.targets
    if args.target is not None:
        if model.multilabel:
            raise InputError(
                f"--target does not apply to a multi-label model; it is evaluated on its label columns "
                f"{', '.join(model.label_names)}"
            )
        targets = [args.target]
    dataset = _read_for_model(model, args.data, targets, require_targets=True)
    _check_known_classes(model, dataset.y, dataset.source)
    print(report(model, model.prepare(dataset.X), dataset.y, dataset.source))
    return 0


def _exit_status(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``command(args)``'s exit status: bad input, or an output that cannot be written (a full disk, a
    read-only directory), prints one ``softxent: error:`` line and gives 2. In a data-parallel run only
    rank 0 prints; the other ranks learn of its failures as a RankZeroError."""
    try:
        return command(args)
    except RankZeroError:
        return 2
    except (InputError, OSError) as error:
        if rank_and_world_size()[0] == 0:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank_and_world_size()[0] == 0:
            print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Run the ``softxent`` command line; returns the exit status (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return _exit_status(args.handler, args)


if __name__ == "__main__":
    raise SystemExit(main())
