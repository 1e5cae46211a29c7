"""The ``softxent`` command line: train, predict with and evaluate softmax / sigmoid classifiers.

    softxent train [DATA] [--target COLUMN | --multilabel COL1,COL2,...] [options]
    softxent predict MODEL DATA [--out FILE]
    softxent evaluate MODEL DATA [--target COLUMN]

``train`` without DATA fits scikit-learn's bundled digits; with ``--nproc N``, or run by torchrun, it trains
data-parallel on torch.distributed (:mod:`softxent.distributed._data_parallel`). Bad input (a bad option, a
missing or unreadable file, an unknown column, a non-numeric or missing feature value, a single class, a
model trained on other features, a corrupted model file, a fit that diverged) prints one
``softxent: error: ...`` line on stderr and exits with status 2; every file is written to a temporary file
and renamed into place, so no output is ever half written.

This module parses arguments, orchestrates and prints; the readers live in ``softxent._data`` and the
models in ``softxent.estimators``. Those, torch and the ``train`` extra's libraries are imported when a
command runs, not at import, so that ``softxent --help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from softxent import __version__

if TYPE_CHECKING:
    import numpy as np
    import scipy.sparse as sp

    from softxent._data import Dataset
    from softxent.estimators import SigmoidClassifier, SoftmaxClassifier

    Estimator = SoftmaxClassifier | SigmoidClassifier

PROG = "softxent"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOSS_CURVE_FILE = "loss_curve.png"
CONFUSION_FILE = "confusion_matrix.png"
# Per-class rows of the report, and panels of the multi-label confusion figure, are shown up to this many.
MAX_LISTED_CLASSES = 20
# The modules of the `train` extra that the commands import, and the distributions that provide them.
TRAIN_EXTRA = {
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "pandas": "pandas",
    "matplotlib": "matplotlib",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "pyarrow": "pyarrow",
}
# Sparse rows are predicted in chunks of at most this many bytes once densified (the estimators densify
# 65536 rows at a time: at 2^20 features that would be 550 GB).
PREDICT_CHUNK_BYTES = 2**27
# safetensors refuses a header over 100 MB; the feature names and the scaler are most of the model's, and
# are checked against this before training (the estimator's parameters and loss curve take the rest).
MODEL_HEADER_BUDGET = 99_000_000
# SoftmaxClassifier's / SigmoidClassifier's defaults, written out so that --help needs neither torch nor
# scikit-learn; tests/test_cli_reliability.py checks them against the estimators' get_params().
ESTIMATOR_DEFAULTS: dict[str, Any] = {
    "solver": "auto",
    "max_iter": None,
    "eta0": 0.1,
    "learning_rate": "cosine",
    "power_t": 0.25,
    "momentum": 0.9,
    "nesterov": True,
    "batch_size": "auto",
    "alpha": 1e-4,
    "tol": "auto",
    "n_iter_no_change": 5,
    "early_stopping": False,
    "validation_fraction": 0.1,
    "shuffle": True,
    "class_weight": None,
    "label_smoothing": 0.0,
    "pos_weight": None,
    "device": "auto",
}
# What max_iter=None and tol="auto" mean for each solver (the estimators' MAX_ITER and TOL), for --help; the
# same test checks them.
SOLVER_DEFAULTS = {"sgd": {"max_iter": 20, "tol": 1e-3}, "lbfgs": {"max_iter": 500, "tol": 1e-4}}
# The estimators' parameters that their warnings and errors name, as the train options that set them: a
# command-line user is told to raise --epochs, not max_iter.
OPTION_OF_PARAMETER = {"max_iter": "--epochs", "eta0": "--lr", "alpha": "--alpha", "tol": "--tol"}
DEFAULTS = {
    "test_size": 0.25,
    "solver": ESTIMATOR_DEFAULTS["solver"],
    "epochs": ESTIMATOR_DEFAULTS["max_iter"],
    "lr": ESTIMATOR_DEFAULTS["eta0"],
    "lr_schedule": ESTIMATOR_DEFAULTS["learning_rate"],
    "power_t": ESTIMATOR_DEFAULTS["power_t"],
    "momentum": ESTIMATOR_DEFAULTS["momentum"],
    "batch_size": ESTIMATOR_DEFAULTS["batch_size"],
    "hidden": "",
    "alpha": ESTIMATOR_DEFAULTS["alpha"],
    "tol": ESTIMATOR_DEFAULTS["tol"],
    "n_iter_no_change": ESTIMATOR_DEFAULTS["n_iter_no_change"],
    "validation_fraction": ESTIMATOR_DEFAULTS["validation_fraction"],
    "label_smoothing": ESTIMATOR_DEFAULTS["label_smoothing"],
    "device": ESTIMATOR_DEFAULTS["device"],
    "seed": 0,
    "out": "softxent-model",
    "checkpoint_every": 0,
    "nproc": 1,
}
# numpy.random.RandomState's seeds, which scikit-learn's random_state takes.
MAX_SEED = 2**32 - 1
# Options that decide the training result: a checkpoint resumes only a run with the same values.
RESUME_OPTIONS = (
    "target",
    "multilabel",
    "test_size",
    "standardize",
    "solver",
    "epochs",
    "lr",
    "lr_schedule",
    "power_t",
    "momentum",
    "nesterov",
    "batch_size",
    "hidden",
    "alpha",
    "tol",
    "n_iter_no_change",
    "early_stopping",
    "validation_fraction",
    "shuffle",
    "class_weight",
    "label_smoothing",
    "pos_weight",
    "seed",
)


# --- argument parsing ----------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, ``softxent: error: MESSAGE``, and exit status 2 (no
    usage block before it); the subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")  # "argument --epochs: ..." -> "--epochs: ..."
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int >= low (and <= high).

    >>> _integer(1)("3"), _integer(0, 9)("9")
    (3, 9)
    """
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _real(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float >= low (> low with ``low_open``) and < high.

    >>> _real(0, 1, low_open=True)("0.25"), _real(0)("0")
    (0.25, 0.0)
    """
    expected = f"a number {'>' if low_open else '>='} {low}" + (f" and < {high}" if high < math.inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value < high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _integer(1)
_non_negative_float = _real(0)
_fraction = _real(0, 1, low_open=True)
_unit_fraction = _real(0, 1)


def _batch_size(text: str) -> int | str:
    """argparse type: "auto" or an int >= 1."""
    return "auto" if text == "auto" else _positive_int(text)


def _tol(text: str) -> float | str | None:
    """argparse type: a number >= 0, "auto" (the solver's default) or "none" (no tolerance).

    >>> _tol("1e-4"), _tol("auto"), _tol("none")
    (0.0001, 'auto', None)
    """
    if text.lower() in ("auto", "none"):
        return "auto" if text.lower() == "auto" else None
    try:
        return _non_negative_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, auto or none, got {text!r}") from None


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


def _weights(text: str) -> str | dict[str, float]:
    """argparse type of --class-weight and --pos-weight: "balanced", or NAME=WEIGHT pairs (weights >= 0).

    >>> _weights("balanced"), _weights("ant=2, bee=0.5")
    ('balanced', {'ant': 2.0, 'bee': 0.5})
    """
    if text.strip() == "balanced":
        return "balanced"
    weights: dict[str, float] = {}
    for pair in text.split(","):
        name, equals, number = pair.strip().rpartition("=")
        name = name.strip()
        try:
            weight = float(number)
        except ValueError:
            weight = math.nan
        if not (equals and name and math.isfinite(weight) and weight >= 0) or name in weights:
            raise argparse.ArgumentTypeError(
                f"expected balanced or distinct NAME=WEIGHT pairs with weights >= 0, such as ant=2,bee=0.5; "
                f"got {text!r}"
            )
        weights[name] = weight
    return weights


TRAIN_DESCRIPTION = """\
Train a softmax classifier (or, with --multilabel, a multi-label sigmoid
classifier): by default the linear model by full-batch L-BFGS to the optimum,
a network with --hidden layers by minibatch SGD.

DATA is one of
  - a CSV (.csv), TSV (.tsv, .tab) or Parquet (.parquet, .pq) table with a
    header of distinct names: the --target column holds the class labels,
    every other column is a numeric feature (numbers or booleans; dates and
    categories must be converted to numbers first);
  - an NPZ (.npz) with arrays X (samples x features) and y (or the array
    named by --target), and optionally an array feature_names of distinct
    names, one per column of X;
  - a LibSVM/SVMlight file (.svm, .libsvm, .svmlight); feature indices are
    used as written, so a 1-based file has an empty column x0.
CSV, TSV and LibSVM files may be .gz or .bz2 compressed. At most 1048576
(2^20) features. Without DATA, the model is trained on scikit-learn's bundled
digits (8x8 images, 10 classes).

A stratified --test-size split is held out (a random one for --multilabel
with several labels). The progress bar shows the training loss and the
accuracy on that split (subset accuracy for --multilabel) after each L-BFGS
iteration or SGD epoch.

--solver auto (the default) takes lbfgs for the linear model and sgd for
--hidden layers, --early-stopping, --checkpoint-every and --resume, which are
SGD's (--solver lbfgs refuses the last three).
  lbfgs  full-batch L-BFGS on the whole penalized training loss, as
         scikit-learn's LogisticRegression: stops once no component of the
         loss's gradient exceeds --tol (auto: 1e-4), once an iteration lowers
         the loss by less than 64 machine epsilons (relative), or after
         --epochs iterations (default 500). It ignores SGD's options: --lr,
         --lr-schedule, --power-t, --momentum, --no-nesterov, --batch-size,
         --no-shuffle, --n-iter-no-change.
  sgd    minibatch SGD with momentum and a learning-rate schedule: stops
         after --epochs epochs (default 20), or earlier by the --tol rule:
         once for --n-iter-no-change epochs the training loss has not fallen
         by more than --tol (auto: 1e-3). With --early-stopping,
         --validation-fraction of the training rows (not of the held-out
         split) is set aside instead, the rule watches the accuracy on it,
         and the model keeps the weights of its best epoch, not the last.

At the end, a table of accuracy, log-loss, macro-F1 and per-class recall
on the held-out split is printed (for --multilabel: subset accuracy,
log-loss, micro/macro-F1 and per-label F1; per-class rows up to 20 classes),
and --out DIR gets:
  model.safetensors       the weights, with JSON metadata: feature and class
                          names, the standardization, the options, the task
                          and the softxent version
  loss_curve.png          training loss and held-out accuracy per epoch
                          (sgd) or iteration (lbfgs)
  confusion_matrix.png    the confusion matrix on the held-out split; for
                          --multilabel one 2x2 panel per label, skipped with
                          a note beyond 20 labels
  checkpoint.safetensors  only with --checkpoint-every (sgd), while training;
                          it is removed once the model is written
--out is checked before training; a fit that fails (for instance because the
loss diverged: lower --lr, or keep the features standardized) writes no model.

With --nproc N (N > 1), training runs data-parallel on N local processes
(Gloo on the CPU; NCCL on CUDA, one GPU per process): every process reads
DATA and computes the gradient on its share of every SGD minibatch (for
L-BFGS, of the whole training split), one all-reduce sums the shares, and the
model equals a one-process run's within float rounding. Run by torchrun
instead (torchrun --nproc-per-node N [--nnodes M --node-rank K --rdzv-backend
c10d --rdzv-endpoint HOST:PORT] -m softxent.cli train ...), each worker joins
torchrun's process group; leave --nproc at 1 there. Either way rank 0 alone
prints and writes the files.
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
Bad input (a bad option, a missing or unreadable file, an unknown column, a
non-numeric or missing value, a single class, a model trained on other
features, a fit that diverged) prints one `softxent: error: ...` line and
exits with status 2. The commands need the `train` extra:
pip install 'softxent[train]'.
"""


def build_parser() -> ArgumentParser:
    """The argument parser of ``softxent`` and its three commands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(
        prog=PROG,
        description="Train, apply and evaluate softxent's softmax / sigmoid classifiers.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
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
        "table (or 1-D arrays of an NPZ) instead of a softmax classifier on --target; one column is a "
        "binary problem with one sigmoid (default: off)",
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
    sgd, lbfgs = SOLVER_DEFAULTS["sgd"], SOLVER_DEFAULTS["lbfgs"]
    train.add_argument(
        "--solver",
        choices=["auto", "sgd", "lbfgs"],
        default=DEFAULTS["solver"],
        help="auto: lbfgs for the linear model, sgd with --hidden, --early-stopping, --checkpoint-every or "
        "--resume (early stopping and checkpoints are SGD's; lbfgs refuses them); lbfgs: full-batch "
        "L-BFGS to the optimum, as scikit-learn's LogisticRegression, ignoring SGD's options --lr, "
        "--lr-schedule, --power-t, --momentum, --no-nesterov, --batch-size, --no-shuffle and "
        "--n-iter-no-change; sgd: minibatch SGD (default: %(default)s)",
    )
    train.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULTS["epochs"],
        help="most epochs (sgd) or iterations (lbfgs), the estimator's max_iter; the --tol rule may stop "
        f"training earlier (default: {sgd['max_iter']} epochs or {lbfgs['max_iter']} iterations)",
    )
    train.add_argument(
        "--lr",
        type=_real(0, low_open=True),
        default=DEFAULTS["lr"],
        help="initial SGD learning rate eta0, scheduled by --lr-schedule (default: %(default)s)",
    )
    train.add_argument(
        "--lr-schedule",
        choices=["constant", "invscaling", "cosine"],
        default=DEFAULTS["lr_schedule"],
        help="the learning rate over training (the estimator's learning_rate): constant is --lr; "
        "invscaling is --lr / (t + 1)^--power-t at step t; cosine decays --lr to 0 over --epochs "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--power-t",
        type=_non_negative_float,
        default=DEFAULTS["power_t"],
        metavar="POWER",
        help="exponent of --lr-schedule invscaling (default: %(default)s)",
    )
    train.add_argument(
        "--momentum",
        type=_unit_fraction,
        default=DEFAULTS["momentum"],
        help="SGD momentum, in [0, 1); 0 is plain SGD (default: %(default)s)",
    )
    train.add_argument(
        "--no-nesterov",
        dest="nesterov",
        action="store_false",
        help="heavy-ball momentum instead of Nesterov's (default: Nesterov momentum, unless --momentum 0)",
    )
    train.add_argument(
        "--batch-size",
        type=_batch_size,
        default=DEFAULTS["batch_size"],
        help="rows per SGD step, or auto: 1/32 of the training rows, clipped to [128, 4096] "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        help="take the rows in file order every epoch (default: reshuffle them every epoch)",
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
        "--tol",
        type=_tol,
        default=DEFAULTS["tol"],
        help="a number >= 0, auto or none. lbfgs stops once no component of the loss's gradient exceeds "
        "TOL; none: only when an iteration no longer lowers the loss (by 64 machine epsilons, relative). "
        "sgd stops once for --n-iter-no-change epochs the training loss has not fallen by more than TOL "
        "(with --early-stopping: the validation accuracy has not risen by more than TOL); none: after "
        f"--epochs epochs (default: auto, {lbfgs['tol']:g} for lbfgs and {sgd['tol']:g} for sgd)",
    )
    train.add_argument(
        "--n-iter-no-change",
        type=_positive_int,
        default=DEFAULTS["n_iter_no_change"],
        metavar="N",
        help="SGD epochs without improvement that stop training, see --tol (default: %(default)s)",
    )
    train.add_argument(
        "--early-stopping",
        action="store_true",
        help="set --validation-fraction of the training split aside, stop by the --tol rule on its "
        "accuracy and keep the weights of the best epoch rather than the last; trains by sgd "
        "(default: off)",
    )
    train.add_argument(
        "--validation-fraction",
        type=_fraction,
        default=DEFAULTS["validation_fraction"],
        metavar="FRACTION",
        help="fraction of the training split that --early-stopping sets aside (default: %(default)s)",
    )
    train.add_argument(
        "--class-weight",
        type=_weights,
        metavar="balanced|CLASS=W,...",
        help="weights of the classes in the loss: balanced (n_samples / (n_classes * count)) or "
        "CLASS=WEIGHT pairs, e.g. ant=2,bee=0.5, unlisted classes 1 (default: none, all 1; not with "
        "--multilabel)",
    )
    train.add_argument(
        "--label-smoothing",
        type=_unit_fraction,
        default=DEFAULTS["label_smoothing"],
        metavar="EPSILON",
        help="mix the one-hot targets with the uniform distribution: (1 - EPSILON) y + EPSILON / K, in "
        "[0, 1) (default: %(default)s; not with --multilabel)",
    )
    train.add_argument(
        "--pos-weight",
        type=_weights,
        metavar="balanced|LABEL=W,...",
        help="with --multilabel, weights of the positive (1) term of each label's loss: balanced "
        "(negatives / positives per label) or LABEL=WEIGHT pairs, unlisted labels 1 (default: none, all 1)",
    )
    train.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=DEFAULTS["device"],
        help="where to train; auto picks cuda when available (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=_integer(0, MAX_SEED),
        default=DEFAULTS["seed"],
        help=f"seed of the test split, the initial weights and the shuffling, 0 to {MAX_SEED} "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--out",
        default=DEFAULTS["out"],
        metavar="DIR",
        help="directory for the model, the plots and the checkpoint, created if needed; checked to be "
        "writable before training (default: %(default)s)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=_integer(0),
        default=DEFAULTS["checkpoint_every"],
        metavar="N",
        help="write DIR/checkpoint.safetensors (atomically) every N epochs; 0 is never; with --resume, "
        "0 keeps the interrupted run's interval; N > 0 trains by sgd (default: %(default)s)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run from DIR/checkpoint.safetensors; needs the same DATA and options, "
        "and ends with the same model as an uninterrupted run; trains by sgd (default: off)",
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

    estimator: Estimator
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
        import scipy.sparse as sp

        from softxent._data import standardize

        X = X if self.mean is None else standardize(X, self.mean, self.scale)
        if hasattr(self.estimator, "feature_names_in_") and not sp.issparse(X):
            return pd.DataFrame(X, columns=self.feature_names)
        return X

    def predict(self, X: Any) -> np.ndarray:
        """Predicted classes ``(n,)``; for a multi-label model the ``(n, L)`` 0/1 matrix."""
        return predict_labels(self.estimator, X, self.multilabel)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n, K)``; for a multi-label model P(label = 1), ``(n, L)``. Raises
        InputError where they are not finite (logits that overflow), rather than report NaN."""
        import numpy as np

        from softxent._data import InputError

        proba = predict_proba(self.estimator, X, self.multilabel)
        bad = np.flatnonzero(~np.isfinite(proba).all(axis=1))
        if bad.size:
            raise InputError(
                f"the model's probabilities are not finite for {bad.size} of {proba.shape[0]} rows (the "
                f"first is row {bad[0] + 1}): its logits overflow, for features far outside the training "
                "data's range"
            )
        return proba

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


def _single_sigmoid(estimator: Estimator, multilabel: bool) -> bool:
    """Whether a multi-label model is one label fitted as a binary SigmoidClassifier (one sigmoid)."""
    return multilabel and getattr(estimator, "target_type_", None) == "binary"


def _by_chunks(function: Callable[[Any], np.ndarray], X: Any) -> np.ndarray:
    """``function(X)`` on row chunks of a sparse X, so that no densified chunk exceeds
    PREDICT_CHUNK_BYTES."""
    import numpy as np
    import scipy.sparse as sp

    rows = max(1, PREDICT_CHUNK_BYTES // (8 * max(1, X.shape[1])))
    if not sp.issparse(X) or X.shape[0] <= rows:
        return function(X)
    return np.concatenate([function(X[start : start + rows]) for start in range(0, X.shape[0], rows)])


def predict_labels(estimator: Estimator, X: Any, multilabel: bool) -> np.ndarray:
    """``estimator.predict(X)``; for a multi-label model always the ``(n, L)`` 0/1 matrix, one label too."""
    import numpy as np

    predicted = _by_chunks(estimator.predict, X)
    if _single_sigmoid(estimator, multilabel):
        return (predicted == estimator.classes_[-1]).astype(np.int64)[:, None]
    return predicted


def predict_proba(estimator: Estimator, X: Any, multilabel: bool) -> np.ndarray:
    """``estimator.predict_proba(X)``; for a multi-label model always P(label = 1), ``(n, L)``."""
    proba = _by_chunks(estimator.predict_proba, X)
    return proba[:, -1:] if _single_sigmoid(estimator, multilabel) else proba


def _model_path(path: str) -> Path:
    """MODEL as given, or the model file inside a train --out directory."""
    from softxent._data import InputError

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
    import numpy as np

    from softxent import estimators
    from softxent._data import InputError, first_line

    try:
        estimator, metadata = estimators.load_model(_model_path(path))
    except (ValueError, OSError) as error:
        raise InputError(first_line(error)) from None
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
        if scaler is not None and not (
            np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()
        ):
            raise ValueError("the scaler's mean must be finite and its scale finite and > 0")
        multilabel = task == "multilabel"
        label_names = [str(name) for name in metadata.get("label_names") or estimator.classes_.tolist()]
        outputs = 1 if _single_sigmoid(estimator, multilabel) else len(estimator.classes_)
        if len(label_names) != outputs:
            raise ValueError(f"{len(label_names)} label names for the model's {outputs} outputs")
        model = Model(
            estimator=estimator,
            multilabel=multilabel,
            feature_names=None if names is None else [str(name) for name in names],
            targets=metadata.get("targets"),
            label_names=label_names,
            mean=mean,
            scale=scale,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path}: the model's command-line metadata is invalid ({error})") from None
    return model


def _read_for_model(model: Model, data: str, targets: list[str] | None, require_targets: bool) -> Dataset:
    """Read DATA with the model's features; generic feature names when the model has none stored."""
    from softxent._data import read_dataset

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


def label_confusion(y: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per label the 2x2 confusion matrix [[tn, fp], [fn, tp]] of 0/1 matrices ``(n, L)``: ``(L, 2, 2)``,
    scikit-learn's multilabel_confusion_matrix, which takes one column for a binary target instead.

    >>> import numpy as np
    >>> label_confusion(np.array([[1, 0], [1, 1], [0, 0]]), np.array([[1, 1], [0, 1], [0, 0]])).tolist()
    [[[1, 0], [1, 1]], [[1, 1], [0, 1]]]
    """
    import numpy as np

    truth, guess = y.astype(bool), predicted.astype(bool)
    tn, fp = (~truth & ~guess).sum(axis=0), (~truth & guess).sum(axis=0)
    fn, tp = (truth & ~guess).sum(axis=0), (truth & guess).sum(axis=0)
    return np.stack([np.stack([tn, fp], axis=-1), np.stack([fn, tp], axis=-1)], axis=1)


def multilabel_f1(confusion: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(per-label F1, micro-F1, macro-F1) from :func:`label_confusion`'s matrices; F1 = 2tp / (2tp + fp +
    fn), 0 where a label has no positive in truth or prediction (scikit-learn's zero_division=0).

    >>> import numpy as np
    >>> per_label, micro, macro = multilabel_f1(np.array([[[1, 0], [1, 1]], [[1, 1], [0, 1]]]))
    >>> per_label.round(4).tolist(), round(micro, 4), round(macro, 4)
    ([0.6667, 0.6667], 0.6667, 0.6667)
    """
    import numpy as np

    tp, fp, fn = confusion[:, 1, 1], confusion[:, 0, 1], confusion[:, 1, 0]
    denominator = 2 * tp + fp + fn
    per_label = np.divide(2.0 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)
    total = 2 * tp.sum() + fp.sum() + fn.sum()
    micro = float(2 * tp.sum() / total) if total else 0.0
    return per_label, micro, float(per_label.mean())


def report(model: Model, X: np.ndarray | sp.csr_matrix, y: np.ndarray, what: str) -> str:
    """The metrics table of the model on (standardized) X against y."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score

    proba = model.predict_proba(X)
    predicted = model.predict(X)
    lines = [f"{what}: {X.shape[0]} samples"]
    if model.multilabel:
        clipped = np.clip(proba, 1e-15, 1 - 1e-15)
        bce = float(-np.mean(y * np.log(clipped) + (1 - y) * np.log1p(-clipped)))
        per_label, micro, macro = multilabel_f1(label_confusion(y, predicted))
        rows = [
            ["subset accuracy", float(accuracy_score(y, predicted))],
            ["log-loss (mean per label)", bce],
            ["micro-F1", micro],
            ["macro-F1", macro],
        ]
        lines.append(format_table(["metric", "value"], rows))
        label_rows = [
            [name, float(score), int(y[:, i].sum())]
            for i, (name, score) in enumerate(zip(model.label_names, per_label, strict=True))
        ]
        lines.append(_limited(["label", "F1", "positives"], label_rows, "labels"))
        return "\n\n".join(lines)
    classes = model.estimator.classes_
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
    import numpy as np

    from softxent._data import InputError

    if model.multilabel:
        return
    unknown = np.setdiff1d(np.unique(y.astype(str)), np.asarray(model.estimator.classes_).astype(str))
    if unknown.size:
        shown = ", ".join(repr(v) for v in unknown[:8].tolist())
        raise InputError(f"{source}: the target has classes the model was not trained on: {shown}")


# --- plots ---------------------------------------------------------------------------------------------


def plot_loss_curve(
    path: Path, loss: Sequence[float], val_accuracy: Sequence[float], accuracy_name: str, step: str
) -> None:
    """Training loss per step (an SGD epoch or an L-BFGS iteration, as ``step`` names it on the x axis),
    and held-out accuracy on a second axis, as a PNG written atomically."""
    import numpy as np
    from matplotlib.figure import Figure

    from softxent._files import atomic_path

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axis = figure.add_subplot()
    steps = np.arange(1, len(loss) + 1)
    axis.plot(steps, loss, color="tab:blue", marker="." if len(loss) < 50 else None)
    axis.set_xlabel(step)
    axis.set_ylabel("training loss", color="tab:blue")
    if len(val_accuracy) == len(loss) and len(loss):
        twin = axis.twinx()
        twin.plot(steps, val_accuracy, color="tab:orange", marker="." if len(loss) < 50 else None)
        twin.set_ylabel(f"held-out {accuracy_name}", color="tab:orange")
    axis.set_title("softxent train")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


def plot_confusion(path: Path, model: Model, y: np.ndarray, predicted: np.ndarray) -> str | None:
    """The confusion matrix as a PNG written atomically; returns a note instead when it is skipped."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    from softxent._files import atomic_path

    if model.multilabel:
        n_labels = len(model.label_names)
        if n_labels > MAX_LISTED_CLASSES:
            return f"confusion matrix skipped: {n_labels} labels > {MAX_LISTED_CLASSES}"
        columns = min(n_labels, 4)
        rows = math.ceil(n_labels / columns)
        figure = Figure(figsize=(2.6 * columns, 2.6 * rows), layout="constrained")
        matrices = label_confusion(y, predicted)
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
        "solver": args.solver,
        "epochs": args.epochs,
        "lr": args.lr,
        "lr_schedule": args.lr_schedule,
        "power_t": args.power_t,
        "momentum": args.momentum,
        "nesterov": args.nesterov,
        "batch_size": args.batch_size,
        "hidden": list(args.hidden),
        "alpha": args.alpha,
        "tol": args.tol,
        "n_iter_no_change": args.n_iter_no_change,
        "early_stopping": args.early_stopping,
        "validation_fraction": args.validation_fraction,
        "shuffle": args.shuffle,
        "class_weight": args.class_weight,
        "label_smoothing": args.label_smoothing,
        "pos_weight": args.pos_weight,
        "device": args.device,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
    }


def _check_option_combinations(args: argparse.Namespace) -> None:
    """Options that apply to one kind of model only: --class-weight and --label-smoothing to the softmax
    classifier, --pos-weight to the multi-label sigmoid classifier; and those that apply to SGD only:
    checkpoints, --resume and --early-stopping are refused with --solver lbfgs."""
    from softxent._data import InputError

    sgd_only = (
        ("--checkpoint-every", args.checkpoint_every > 0, "a checkpoint holds SGD's state between epochs"),
        ("--resume", args.resume, "it continues an SGD run from its checkpoint"),
        ("--early-stopping", args.early_stopping, "it scores held-out rows after each SGD epoch"),
    )
    for option, given, reason in sgd_only:
        if given and args.solver == "lbfgs":
            raise InputError(
                f"{option}: does not apply to --solver lbfgs ({reason}); use --solver sgd or auto"
            )
    if args.multilabel is not None:
        if args.class_weight is not None:
            raise InputError("--class-weight: does not apply to --multilabel; use --pos-weight")
        if args.label_smoothing:
            raise InputError("--label-smoothing: does not apply to --multilabel (a sigmoid per label)")
    elif args.pos_weight is not None:
        raise InputError("--pos-weight: applies to --multilabel only; use --class-weight")


def _read_training_data(args: argparse.Namespace) -> Dataset:
    """DATA (or the digits) with its target, checked to be trainable."""
    import numpy as np

    from softxent._data import InputError, load_digits_dataset, read_dataset

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
    elif dataset.y.shape[1] == 1 and len(np.unique(dataset.y)) < 2:
        raise InputError(
            f"{dataset.source}: label column {args.multilabel[0]!r} holds only {int(dataset.y[0, 0])}s; a "
            "single --multilabel column is a binary problem and needs both 0 and 1"
        )
    return dataset


def _split(args: argparse.Namespace, dataset: Dataset) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """The held-out split: stratified by class (or by the label, for one --multilabel column), random for
    several labels."""
    from sklearn.model_selection import train_test_split

    from softxent._data import InputError

    stratify = dataset.y
    if args.multilabel is not None:
        stratify = dataset.y[:, 0] if dataset.y.shape[1] == 1 else None
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
    from softxent import estimators
    from softxent._data import InputError, first_line

    if not checkpoint_path.is_file():
        raise InputError(
            f"--resume: no checkpoint at {checkpoint_path}; run without --resume to start afresh"
        )
    try:
        checkpoint, metadata = estimators.load_checkpoint(checkpoint_path)
    except (ValueError, OSError) as error:
        raise InputError(f"--resume: {first_line(error)}") from None
    metadata = metadata or {}
    stored = metadata.get("options", {})
    current = _options(args)
    defaults = _options(build_parser().parse_args(["train"]))  # for options newer than the checkpoint
    for name in RESUME_OPTIONS:
        written = stored.get(name, defaults[name])
        if written != current[name]:
            flag = "--" + name.replace("_", "-")
            raise InputError(
                f"--resume: the checkpoint was written with {flag} {written!r}, this run has "
                f"{current[name]!r}; use the same options or run without --resume"
            )
    if metadata.get("data_sha256") != data_hash:
        raise InputError("--resume: the checkpoint was written for other training data; run without --resume")
    return checkpoint, metadata


def _loss_weights(args: argparse.Namespace, y: np.ndarray) -> Any:
    """--class-weight as the estimator's class_weight ({class label: weight}), or --pos-weight as its
    pos_weight (one weight per label), from the names given on the command line."""
    import numpy as np

    from softxent._data import InputError

    option, given = (
        ("--pos-weight", args.pos_weight) if args.multilabel else ("--class-weight", args.class_weight)
    )
    if given is None or given == "balanced":
        return given
    known = list(args.multilabel) if args.multilabel else [label.item() for label in np.unique(y)]
    by_name = {str(name): name for name in known}
    unknown = [name for name in given if name not in by_name]
    if unknown:
        what, plural = ("label column", "label columns") if args.multilabel else ("class", "classes")
        listed = ", ".join(repr(str(name)) for name in known[:8]) + (", ..." if len(known) > 8 else "")
        raise InputError(f"{option}: no {what} {unknown[0]!r}; the {plural} are {listed}")
    if args.multilabel:
        return np.array([given.get(name, 1.0) for name in args.multilabel])
    return {by_name[name]: weight for name, weight in given.items()}


def _solver(args: argparse.Namespace) -> str:
    """The solver train fits with: --solver, or for auto the estimators' rule (lbfgs for the linear model
    without --early-stopping, else sgd), and sgd too where checkpoints are written or resumed, since they
    hold SGD's state. Decided here rather than left to the estimator's auto, so that the summary line, the
    progress bar and the plot name the solver before the fit starts (tests/test_cli.py checks the rule
    against the estimators').

    >>> parser = build_parser()
    >>> [_solver(parser.parse_args(["train", *argv])) for argv in ([], ["--hidden", "8"], ["--resume"])]
    ['lbfgs', 'sgd', 'sgd']
    """
    if args.solver != "auto":
        return args.solver
    sgd_only = args.hidden or args.early_stopping or args.checkpoint_every > 0 or args.resume
    return "sgd" if sgd_only else "lbfgs"


def _build_estimator(args: argparse.Namespace, loss_weights: Any) -> Estimator:
    """The estimator the train options describe (warm_start and verbose keep the estimator's defaults),
    with the solver :func:`_solver` decides."""
    from softxent.estimators import SigmoidClassifier, SoftmaxClassifier

    common = {
        "hidden_layer_sizes": args.hidden,
        "solver": _solver(args),
        "alpha": args.alpha,
        "learning_rate": args.lr_schedule,
        "eta0": args.lr,
        "power_t": args.power_t,
        "momentum": args.momentum,
        "nesterov": args.nesterov and args.momentum > 0,  # torch's SGD: Nesterov needs momentum
        "batch_size": args.batch_size,
        "max_iter": args.epochs,
        "tol": args.tol,
        "n_iter_no_change": args.n_iter_no_change,
        "early_stopping": args.early_stopping,
        "validation_fraction": args.validation_fraction,
        "shuffle": args.shuffle,
        "device": args.device,
        "random_state": args.seed,
    }
    if args.multilabel is not None:
        return SigmoidClassifier(**common, pos_weight=loss_weights)
    return SoftmaxClassifier(**common, class_weight=loss_weights, label_smoothing=args.label_smoothing)


def _training_device(args: argparse.Namespace) -> str:
    """The device --device names: "cuda" for cuda, and for auto where CUDA is available; else "cpu"."""
    import torch

    return "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"


def run_train(args: argparse.Namespace) -> int:
    """``softxent train``: in this process, on --nproc local processes, or as one rank of torchrun's
    process group."""
    import torch
    import torch.distributed as dist

    from softxent._data import InputError
    from softxent.distributed._data_parallel import (
        default_backend,
        init_from_torchrun,
        launch,
        torchrun_environment,
    )

    if args.nproc < 1:
        raise InputError(f"--nproc: expected an integer >= 1, got {args.nproc}")
    _check_option_combinations(args)
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


def _check_writable(directory: Path, what: str) -> None:
    """Raise unless files can be created in ``directory``, or (if it does not exist yet) in its nearest
    existing parent, where it would be made: tried with a temporary file that leaves no name behind, so
    that a read-only file system fails here too, not only a missing permission."""
    import tempfile

    from softxent._data import InputError

    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(f"{what}: cannot write in {existing}: {error.strerror or error}") from None


def _check_out_dir(out: Path) -> None:
    """--out of train: a directory (or a path where one can be made) that files can be written in."""
    from softxent._data import InputError

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    _check_writable(out, f"--out {out}")


def _check_standardized(names: Sequence[str], mean: np.ndarray, scale: np.ndarray, *parts: Any) -> None:
    """Raise, naming the first such feature, if standardizing overflowed: a mean or variance beyond
    float64's range (values near 1e308), or a value divided by a tiny scale."""
    import numpy as np
    import scipy.sparse as sp

    from softxent._data import InputError

    bad = ~(np.isfinite(mean) & np.isfinite(scale))
    for X in parts:
        if sp.issparse(X):
            bad[X.indices[~np.isfinite(X.data)]] = True
        else:
            bad |= ~np.isfinite(X).all(axis=0)
    if bad.any():
        raise InputError(
            f"feature {names[int(np.flatnonzero(bad)[0])]!r} cannot be standardized: its values overflow "
            "float64 in the mean, the variance or the scaling; rescale it, or train with --no-standardize"
        )


def _in_option_terms(message: str) -> str:
    """An estimator's message with the parameters it names (OPTION_OF_PARAMETER) as train's options; a
    quoted word (a label or feature named 'alpha') stays as it is."""
    import re

    names = "|".join(OPTION_OF_PARAMETER)
    return re.sub(rf"(?<![\w'\"])({names})(?![\w'\"])", lambda name: OPTION_OF_PARAMETER[name[1]], message)


def _passed_on(caught: list[warnings.WarningMessage]) -> str | None:
    """Warn again the warnings recorded during a fit, in option terms, except the estimator's
    DivergenceWarning, whose message is returned instead (None when there is none)."""
    from softxent.estimators import DivergenceWarning

    diverged = None
    for warning in caught:
        message = _in_option_terms(str(warning.message))
        if issubclass(warning.category, DivergenceWarning):
            diverged = diverged or message
        else:
            warnings.warn_explicit(message, warning.category, warning.filename, warning.lineno)
    return diverged


def _refuse_divergence(diverged: str | None) -> None:
    """A fit that diverged (its last epoch's loss far above its best, the estimator warns) gives no model:
    the command line has no use for the weights of a run that climbed away from its best."""
    from softxent._data import InputError

    if diverged is not None:
        raise InputError(diverged.strip().splitlines()[0])


def _check_finite_weights(estimator: Estimator) -> None:
    """Raise if a fit ended with infinite or NaN weights (a loss that diverged without being caught)."""
    import numpy as np

    from softxent._data import InputError

    weights = [estimator.coef_, estimator.intercept_, *estimator.hidden_coefs_, *estimator.hidden_intercepts_]
    if not all(np.isfinite(weight).all() for weight in weights):
        lower_lr = "lower --lr, or " if estimator.solver_ == "sgd" else ""
        raise InputError(
            f"training diverged: the weights are not finite; {lower_lr}keep the features standardized "
            "(without --no-standardize)"
        )


def _check_model_header(model: Model) -> None:
    """Raise before training if the model's metadata would not fit in a safetensors header (100 MB): its
    size is measured as it will be stored, JSON inside a JSON string."""
    import json

    from softxent._data import InputError

    size = len(json.dumps(json.dumps(model.metadata({}))))
    if size > MODEL_HEADER_BUDGET:
        raise InputError(
            f"the model's metadata (the names and scaler of {len(model.feature_names or ())} features) "
            f"would take {size / 1e6:.0f} MB, more than the {MODEL_HEADER_BUDGET / 1e6:.0f} MB a model "
            "file's header holds; use fewer features or shorter feature names"
        )


def _train(args: argparse.Namespace) -> int:
    """Train and write the outputs, alone or as one rank of a data-parallel run.

    Data-parallel, every rank reads DATA, splits and standardizes it the same way and fits (the estimator
    takes this rank's share of every minibatch and all-reduces the gradients); rank 0 alone checks --out,
    reads a --resume checkpoint (and shares it), prints, evaluates and writes files, the other ranks
    waiting for it (:func:`run_on_rank_zero`), so a failure there ends every rank.
    """
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score
    from tqdm import tqdm

    from softxent import estimators
    from softxent._data import InputError, fingerprint, first_line, fit_standardizer, standardize
    from softxent.distributed._data_parallel import rank_and_world_size, run_on_rank_zero

    rank, world_size = rank_and_world_size()
    lead = rank == 0
    out = Path(args.out)
    out_existed = out.exists()
    run_on_rank_zero(_check_out_dir, out)
    dataset = _read_training_data(args)
    multilabel = args.multilabel is not None
    X_train, X_test, y_train, y_test = _split(args, dataset)
    mean = scale = None
    if args.standardize:
        mean, scale = fit_standardizer(X_train)
        X_train, X_test = standardize(X_train, mean, scale), standardize(X_test, mean, scale)
        _check_standardized(dataset.feature_names, mean, scale, X_train, X_test)
    data_hash = fingerprint(X_train, y_train)
    estimator = _build_estimator(args, _loss_weights(args, y_train))
    solver = estimator.solver
    step = "iteration" if solver == "lbfgs" else "epoch"
    model = Model(
        estimator=estimator,
        multilabel=multilabel,
        feature_names=dataset.feature_names,
        targets=dataset.targets,
        label_names=list(args.multilabel) if multilabel else [],  # the classes' names once fitted
        mean=mean,
        scale=scale,
    )
    _check_model_header(model)
    # One --multilabel column is fitted as a binary target: SigmoidClassifier's one sigmoid for class 1.
    fit_target = y_train[:, 0] if multilabel and y_train.shape[1] == 1 else y_train
    checkpoint_path = out / CHECKPOINT_FILE
    resume, history, checkpoint_every = None, [], args.checkpoint_every
    if args.resume:
        resume, stored = run_on_rank_zero(_resume_state, args, checkpoint_path, data_hash, share_result=True)
        history = list(stored.get("val_accuracy", []))
        checkpoint_every = checkpoint_every or int(stored.get("options", {}).get("checkpoint_every") or 0)

    accuracy_name = "subset accuracy" if multilabel else "accuracy"
    if multilabel:
        outputs = f"{y_train.shape[1]} label" + ("s" if y_train.shape[1] > 1 else "")
    else:
        outputs = f"{len(np.unique(y_train.astype(str)))} classes"
    if lead:
        print(
            f"training {type(estimator).__name__} ({solver}) on {dataset.source}: {X_train.shape[0]} "
            f"training and {X_test.shape[0]} held-out samples, {X_train.shape[1]} features, {outputs}"
            + (f"; data-parallel on {world_size} processes" if world_size > 1 else "")
            + (f"; resuming after epoch {resume.info['epoch']}" if resume is not None else "")
        )
    options = _options(args)
    progress: list[Any] = []
    checkpoints_written: list[Path] = []

    def write_checkpoint(fitted: Estimator) -> None:
        metadata = {"options": options, "data_sha256": data_hash, "val_accuracy": history}
        out.mkdir(parents=True, exist_ok=True)  # made when first needed: a failed fit leaves nothing
        estimators.save_checkpoint(fitted.checkpoint(), checkpoint_path, metadata=metadata)
        checkpoints_written[:] = [checkpoint_path]

    def on_step(fitted: Estimator, info: dict[str, Any]) -> bool:
        """After an SGD epoch or an L-BFGS iteration: advance the progress bar, record the held-out accuracy
        (rank 0), write a checkpoint when due."""
        if lead:
            if not progress:  # created at the first step, so that a fit that fails at once prints no bar
                progress.append(
                    tqdm(
                        total=info["max_iter"],
                        initial=info["epoch"] - 1,
                        desc="train",
                        unit=step,
                        file=sys.stderr,
                    )
                )
            held_out = float(accuracy_score(y_test, predict_labels(fitted, X_test, multilabel)))
            history.append(held_out)
            progress[0].set_postfix(loss=f"{info['loss']:.4g}", val_acc=f"{held_out:.4f}", refresh=False)
            progress[0].update(1)
        if checkpoint_every and info["epoch"] % checkpoint_every == 0:
            run_on_rank_zero(write_checkpoint, fitted)
        return False

    def discard_checkpoints() -> None:
        """After a failed fit (rank 0): its checkpoints cannot help, --resume would repeat the same steps;
        --out goes too if this run made it and nothing else is in it."""
        if lead:
            for path in checkpoints_written:
                path.unlink(missing_ok=True)
            if not out_existed and out.is_dir() and not any(out.iterdir()):
                out.rmdir()

    fitted = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)  # never hidden as already shown
            estimator.fit(X_train, fit_target, callback=on_step, resume=resume)
        run_on_rank_zero(_refuse_divergence, _passed_on(caught))  # warned on rank 0 only
        _check_finite_weights(estimator)
        model.predict_proba(X_test)  # raises where they are not finite: no model, and no bar left
        fitted = True
    except ValueError as error:  # bad data or options, or a loss that diverged
        discard_checkpoints()
        raise InputError(_in_option_terms(first_line(error))) from None
    except KeyboardInterrupt:
        if progress:
            progress[0].close()
        if not (checkpoint_every and checkpoint_path.is_file()):  # a stale one cannot continue this run
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
            progress[0].leave = fitted  # after a failure, the error line alone
            progress[0].close()

    def write_outputs() -> None:
        """The model, the plots and the report (rank 0)."""
        if not multilabel:
            model.label_names = [str(label) for label in estimator.classes_.tolist()]
        table = report(model, X_test, y_test, "held-out split")
        out.mkdir(parents=True, exist_ok=True)
        extra = {"data": dataset.source, "options": options, "processes": world_size}
        estimators.save_model(estimator, out / MODEL_FILE, metadata=model.metadata(extra))
        written = [out / MODEL_FILE]
        x_label = "L-BFGS iteration" if solver == "lbfgs" else "epoch"
        plot_loss_curve(out / LOSS_CURVE_FILE, estimator.loss_curve_, history, accuracy_name, x_label)
        written.append(out / LOSS_CURVE_FILE)
        note = plot_confusion(out / CONFUSION_FILE, model, y_test, model.predict(X_test))
        if note is None:
            written.append(out / CONFUSION_FILE)
        checkpoint_path.unlink(missing_ok=True)  # the model supersedes it

        if args.early_stopping and estimator.validation_scores_:
            best = int(np.argmax(estimator.validation_scores_))
            print(
                f"early stopping: kept epoch {best + 1} of {estimator.n_iter_} (validation {accuracy_name} "
                f"{estimator.validation_scores_[best]:.4f} on {args.validation_fraction:g} of the training "
                "split)"
            )
        print()
        print(table)
        print()
        if note is not None:
            print(note)
        print("wrote " + "\n      ".join(str(path) for path in written))

    run_on_rank_zero(write_outputs)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``softxent predict``."""
    import pandas as pd

    from softxent._data import InputError
    from softxent._files import atomic_path

    out = None if args.out is None else Path(args.out)
    if out is not None:
        if out.is_dir():
            raise InputError(f"--out {out}: is a directory")
        if not out.parent.is_dir():
            raise InputError(f"--out {out}: no such directory {out.parent}")
        _check_writable(out.parent, f"--out {out}")
    model = open_model(args.model)
    dataset = _read_for_model(model, args.data, model.targets, require_targets=False)
    X = model.prepare(dataset.X)
    proba = model.predict_proba(X)
    predicted = model.predict(X)
    if model.multilabel:
        columns = {f"pred_{name}": predicted[:, i] for i, name in enumerate(model.label_names)}
    else:
        columns = {"prediction": predicted}
    columns.update({f"proba_{name}": proba[:, i] for i, name in enumerate(model.label_names)})
    frame = pd.DataFrame(columns)
    if out is None:
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False, float_format="%.6g")
        sys.stdout.write(buffer.getvalue())
        return 0
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    print(f"wrote {out} ({len(frame)} rows)", file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``softxent evaluate``."""
    from softxent._data import InputError

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


def _missing_train_extra() -> list[str]:
    """The distributions of the `train` extra that are not installed (found without importing them;
    pyarrow is needed for Parquet files only, and checked when one is read)."""
    from importlib.util import find_spec

    return [dist for module, dist in TRAIN_EXTRA.items() if module != "pyarrow" and find_spec(module) is None]


def _extra_message(command: str, missing: Sequence[str]) -> str:
    return (
        f"{PROG} {command} needs the 'train' extra, which is not installed (missing: {', '.join(missing)}); "
        "install it with: pip install 'softxent[train]'"
    )


def _describe(error: Exception) -> str:
    """An error as its one-line message: an OSError as "PATH: reason" rather than "[Errno 13] ..."."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _exit_status(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``command(args)``'s exit status: bad input, or an output that cannot be written (a full disk, a
    read-only directory), prints one ``softxent: error:`` line and gives 2. In a data-parallel run only
    rank 0 prints; the other ranks learn of its failures as a RankZeroError.

    Warnings (scikit-learn's ConvergenceWarning, ...) are printed as ``softxent: warning:`` lines after a
    command that succeeds, and dropped after one that fails, whose error line says what matters.
    """
    from softxent._data import InputError
    from softxent.distributed._data_parallel import RankZeroError, rank_and_world_size

    with warnings.catch_warnings(record=True) as caught:
        try:
            status = command(args)
        except RankZeroError:
            return 2
        except (InputError, OSError) as error:
            if rank_and_world_size()[0] == 0:
                print(f"{PROG}: error: {_describe(error)}", file=sys.stderr)
            return 2
        except ModuleNotFoundError as error:
            module = (error.name or "").partition(".")[0]
            if module not in TRAIN_EXTRA:
                raise
            if rank_and_world_size()[0] == 0:
                print(
                    f"{PROG}: error: {_extra_message(args.command, [TRAIN_EXTRA[module]])}", file=sys.stderr
                )
            return 2
        except KeyboardInterrupt:
            if rank_and_world_size()[0] == 0:
                print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
    if status == 0 and rank_and_world_size()[0] == 0:
        for message in dict.fromkeys(str(warning.message).strip().splitlines()[0] for warning in caught):
            print(f"{PROG}: warning: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run the ``softxent`` command line; returns the exit status (2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a bad option's one-line error
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    missing = _missing_train_extra()
    if missing:
        print(f"{PROG}: error: {_extra_message(args.command, missing)}", file=sys.stderr)
        return 2
    return _exit_status(args.handler, args)


if __name__ == "__main__":
    raise SystemExit(main())
