"""The ``softxent`` command line end to end: train, predict and evaluate on every data format, multi-label
training, resuming a killed run, every kind of bad input, and the help texts.

Most tests call ``softxent.cli.main(argv)`` in-process; the kill/resume test and one smoke test of the
installed console script use subprocesses. Data are small and epochs few, for a 2-core machine.
"""

from __future__ import annotations

import argparse
import bz2
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import dump_svmlight_file, make_classification

import softxent.cli
import softxent.estimators
from softxent.cli import build_parser, main
from softxent.estimators import Checkpoint, SoftmaxClassifier, load_checkpoint, load_model, save_model

FAST = ["--epochs", "3", "--batch-size", "16"]
CLASSES = np.array(["ant", "bee", "cat"])
N_FEATURES = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_frame(n_samples: int = 120, seed: int = 0) -> pd.DataFrame:
    """A 3-class problem with string labels in column "label" and features f0..f4."""
    X, y = make_classification(
        n_samples=n_samples,
        n_features=N_FEATURES,
        n_informative=3,
        n_redundant=0,
        n_classes=3,
        n_clusters_per_class=1,
        class_sep=2.0,
        random_state=seed,
    )
    frame = pd.DataFrame(X * 3 + 10, columns=[f"f{i}" for i in range(N_FEATURES)])
    frame.insert(2, "label", CLASSES[y])
    return frame


@pytest.fixture
def frame() -> pd.DataFrame:
    return make_frame()


@pytest.fixture
def csv(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the --out directory of a model trained on a CSV, that CSV), shared by the predict/evaluate tests."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "train.csv"
    make_frame().to_csv(data, index=False)
    assert main(["train", str(data), "--target", "label", "--out", str(root / "model"), *FAST]) == 0
    return root / "model", data


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) -> (exit status, stdout, stderr); argparse's SystemExit counts as a status."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_report(text: str, classes: list[str]) -> None:
    for metric in ("accuracy", "log-loss", "macro-F1", "recall", "support"):
        assert metric in text, text
    for name in classes:
        assert any(line.split()[:1] == [name] for line in text.splitlines()), f"no recall row for {name}"


# --- train, predict, evaluate --------------------------------------------------------------------------


def test_train_writes_model_plots_and_table(
    tmp_path: Path, csv: Path, frame: pd.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    status, stdout, stderr = run_cli(
        ["train", str(csv), "--target", "label", "--out", str(out), *FAST], capsys
    )
    assert status == 0, stderr
    assert_report(stdout, list(CLASSES))
    for name in ("model.safetensors", "loss_curve.png", "confusion_matrix.png"):
        assert str(out / name) in stdout
        assert (out / name).is_file()
    assert (out / "loss_curve.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "confusion_matrix.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png",
        "loss_curve.png",
        "model.safetensors",
    ]
    assert "val_acc" in stderr
    assert "loss" in stderr

    estimator, metadata = load_model(out / "model.safetensors")
    assert estimator.n_iter_ == 3
    assert estimator.coef_.shape == (3, N_FEATURES)
    assert metadata["task"] == "multiclass"
    assert metadata["feature_names"] == [f"f{i}" for i in range(N_FEATURES)]
    assert metadata["label_names"] == list(CLASSES)
    assert metadata["targets"] == ["label"]
    assert metadata["options"]["epochs"] == 3
    assert metadata["options"]["batch_size"] == 16
    # the scaler was fitted on the 75% training split: close to, not equal to, the full data's statistics
    features = frame.drop(columns="label").to_numpy()
    np.testing.assert_allclose(metadata["scaler"]["mean"], features.mean(0), rtol=0.1)
    np.testing.assert_allclose(metadata["scaler"]["scale"], features.std(0), rtol=0.2)


def test_predict_csv(trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, data = trained
    out = tmp_path / "predictions.csv"
    status, _, stderr = run_cli(["predict", str(model_dir), str(data), "--out", str(out)], capsys)
    assert status == 0, stderr
    predictions = pd.read_csv(out)
    assert list(predictions.columns) == ["prediction", *(f"proba_{c}" for c in CLASSES)]
    proba = predictions.filter(like="proba_").to_numpy()
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert (predictions["prediction"].to_numpy() == CLASSES[proba.argmax(1)]).all()
    truth = pd.read_csv(data)["label"]
    assert (predictions["prediction"] == truth).mean() > 0.8

    # Without the target column, with the features in another order, to stdout, naming the model file.
    unlabeled = tmp_path / "unlabeled.csv"
    pd.read_csv(data).drop(columns="label").iloc[:, ::-1].to_csv(unlabeled, index=False)
    status, stdout, stderr = run_cli(
        ["predict", str(model_dir / "model.safetensors"), str(unlabeled)], capsys
    )
    assert status == 0, stderr
    pd.testing.assert_frame_equal(pd.read_csv(pd.io.common.StringIO(stdout)), predictions)


def test_evaluate(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, data = trained
    status, stdout, stderr = run_cli(["evaluate", str(model_dir), str(data), "--target", "label"], capsys)
    assert status == 0, stderr
    assert_report(stdout, list(CLASSES))
    # --target defaults to the model's
    status, default_stdout, _ = run_cli(["evaluate", str(model_dir), str(data)], capsys)
    assert status == 0
    assert default_stdout == stdout


def write_tsv(path: Path, frame: pd.DataFrame) -> list[str]:
    frame.to_csv(path, sep="\t", index=False)
    return ["--target", "label"]


def write_parquet(path: Path, frame: pd.DataFrame) -> list[str]:
    frame.to_parquet(path)
    return ["--target", "label"]


def write_npz(path: Path, frame: pd.DataFrame) -> list[str]:
    features = frame.drop(columns="label")
    np.savez(path, X=features.to_numpy(), y=frame["label"].to_numpy().astype(str))
    return []


def write_libsvm(path: Path, frame: pd.DataFrame) -> list[str]:
    codes = np.searchsorted(CLASSES, frame["label"].to_numpy())
    dump_svmlight_file(frame.drop(columns="label").to_numpy(), codes, str(path), zero_based=False)
    return []


def write_csv_bz2(path: Path, frame: pd.DataFrame) -> list[str]:
    path.write_bytes(bz2.compress(frame.to_csv(index=False).encode()))
    return ["--target", "label"]


@pytest.mark.parametrize(
    ("name", "writer"),
    [
        ("data.tsv", write_tsv),
        ("data.parquet", write_parquet),
        ("data.npz", write_npz),
        ("data.libsvm", write_libsvm),
        ("data.csv.bz2", write_csv_bz2),
    ],
)
def test_formats(
    name: str,
    writer: Callable[[Path, pd.DataFrame], list[str]],
    tmp_path: Path,
    frame: pd.DataFrame,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / name
    target = writer(data, frame)
    out = tmp_path / "model"
    status, stdout, stderr = run_cli(["train", str(data), *target, "--out", str(out), *FAST], capsys)
    assert status == 0, stderr
    assert "accuracy" in stdout
    assert (out / "model.safetensors").is_file()
    status, stdout, stderr = run_cli(["predict", str(out), str(data)], capsys)
    assert status == 0, stderr
    predictions = pd.read_csv(pd.io.common.StringIO(stdout))
    assert len(predictions) == len(frame)
    assert "prediction" in predictions
    status, stdout, stderr = run_cli(["evaluate", str(out), str(data)], capsys)
    assert status == 0, stderr
    assert "macro-F1" in stdout


def record_plot_labels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The x-axis labels of the loss curves plotted from now on."""
    labels: list[str] = []
    real_plot = softxent.cli.plot_loss_curve

    def plot(*args: object) -> None:
        labels.append(str(args[-1]))
        real_plot(*args)

    monkeypatch.setattr(softxent.cli, "plot_loss_curve", plot)
    return labels


def test_digits_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default run fits the linear model by L-BFGS to the optimum: the accuracy of the estimator's own
    test on this split (0.964), where 20 SGD epochs reached 0.85 to 0.97 by seed."""
    out = tmp_path / "digits"
    labels = record_plot_labels(monkeypatch)
    status, stdout, stderr = run_cli(["train", "--out", str(out)], capsys)
    assert status == 0, stderr
    assert (
        "training SoftmaxClassifier (lbfgs) on digits: 1347 training and 450 held-out samples, 64 features, "
        "10 classes" in stdout
    )
    assert_report(stdout, [str(d) for d in range(10)])
    accuracy = float(next(line for line in stdout.splitlines() if line.startswith("accuracy")).split()[1])
    assert accuracy >= 0.96
    assert "?iteration/s" in stderr  # the progress bar counts L-BFGS iterations
    assert "epoch" not in stderr
    assert labels == ["L-BFGS iteration"]
    estimator, metadata = load_model(out / "model.safetensors")
    assert estimator.solver_ == "lbfgs"
    assert estimator.t_ == 0
    assert 1 < estimator.n_iter_ < 500  # converged before max_iter
    assert metadata["options"]["solver"] == "auto"
    assert metadata["options"]["epochs"] is None
    assert metadata["options"]["tol"] == "auto"


def test_solver_sgd(
    tmp_path: Path, csv: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    labels = record_plot_labels(monkeypatch)
    argv = ["train", str(csv), "--target", "label", "--solver", "sgd", "--tol", "none", "--out", str(out)]
    status, stdout, stderr = run_cli([*argv, *FAST], capsys)
    assert status == 0, stderr
    assert "training SoftmaxClassifier (sgd) on" in stdout
    assert "?epoch/s" in stderr
    assert "iteration" not in stderr
    assert labels == ["epoch"]
    estimator, metadata = load_model(out / "model.safetensors")
    assert estimator.solver_ == "sgd"
    assert estimator.n_iter_ == 3
    assert estimator.t_ == 3 * 6  # 90 training rows in batches of 16
    assert estimator.get_params()["tol"] is None
    assert metadata["options"]["solver"] == "sgd"


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize(
    "options", [[], ["--hidden", "4"], ["--early-stopping"], ["--hidden", "4", "--early-stopping"]]
)
def test_auto_solver_is_the_estimators(options: list[str], frame: pd.DataFrame) -> None:
    """Without checkpoints, --solver auto picks what the estimators' solver="auto" picks (the command line
    decides before the fit, to name the solver in its summary line, progress bar and plot)."""
    args = build_parser().parse_args(["train", *options])
    estimator = SoftmaxClassifier(
        hidden_layer_sizes=args.hidden, early_stopping=args.early_stopping, max_iter=1, random_state=0
    )
    estimator.fit(frame.drop(columns="label").to_numpy(), frame["label"])
    assert softxent.cli._solver(args) == estimator.solver_


def test_auto_solver_with_checkpoints_trains_by_sgd(
    tmp_path: Path, csv: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoints hold SGD's state: --checkpoint-every makes auto train by SGD (the linear model would take
    L-BFGS otherwise), and writes them."""
    written: list[tuple[int, str]] = []
    real_save = softxent.estimators.save_checkpoint

    def save(checkpoint: Checkpoint, path: Path, metadata: dict) -> None:
        written.append((checkpoint.info["epoch"], metadata["options"]["solver"]))
        real_save(checkpoint, path, metadata=metadata)
        assert load_checkpoint(path)[0].info["params"]["solver"] == "sgd"

    monkeypatch.setattr(softxent.estimators, "save_checkpoint", save)
    out = tmp_path / "model"
    argv = ["train", str(csv), "--target", "label", "--checkpoint-every", "2", "--out", str(out), *FAST]
    status, stdout, stderr = run_cli(argv, capsys)
    assert status == 0, stderr
    assert "training SoftmaxClassifier (sgd) on" in stdout
    assert written == [(2, "auto")]
    assert not (out / "checkpoint.safetensors").exists()  # removed once the model is written
    assert load_model(out / "model.safetensors")[0].solver_ == "sgd"


def test_multilabel(tmp_path: Path, frame: pd.DataFrame, capsys: pytest.CaptureFixture[str]) -> None:
    features = frame.drop(columns="label")
    labels = {"big": features["f0"] > 10, "odd": features["f1"] > 10, "cat": frame["label"] == "cat"}
    table = features.assign(**{name: column.astype(int) for name, column in labels.items()})
    data = tmp_path / "multi.csv"
    table.to_csv(data, index=False)
    out = tmp_path / "model"
    argv = ["train", str(data), "--multilabel", "big,odd,cat", "--out", str(out), *FAST]
    status, stdout, stderr = run_cli(argv, capsys)
    assert status == 0, stderr
    for metric in ("subset accuracy", "log-loss", "micro-F1", "macro-F1", "positives"):
        assert metric in stdout
    assert (out / "confusion_matrix.png").read_bytes().startswith(PNG_MAGIC)
    _, metadata = load_model(out / "model.safetensors")
    assert metadata["task"] == "multilabel"
    assert metadata["label_names"] == ["big", "odd", "cat"]

    status, stdout, stderr = run_cli(["predict", str(out), str(data)], capsys)
    assert status == 0, stderr
    predictions = pd.read_csv(pd.io.common.StringIO(stdout))
    expected = [f"pred_{n}" for n in labels] + [f"proba_{n}" for n in labels]
    assert list(predictions.columns) == expected
    assert set(np.unique(predictions.filter(like="pred_").to_numpy())) <= {0, 1}
    status, stdout, stderr = run_cli(["evaluate", str(out), str(data)], capsys)
    assert status == 0, stderr
    assert "subset accuracy" in stdout


def test_no_standardize_and_many_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(25), 8)
    table = pd.DataFrame(rng.normal(size=(200, 3)) + labels[:, None] / 10, columns=["a", "b", "c"])
    data = tmp_path / "many.csv"
    table.assign(y=labels).to_csv(data, index=False)
    out = tmp_path / "model"
    argv = ["train", str(data), "--target", "y", "--no-standardize", "--test-size", "0.5", "--out", str(out)]
    status, stdout, stderr = run_cli([*argv, *FAST], capsys)
    assert status == 0, stderr
    assert "(per-class table omitted: 25 classes, more than 20)" in stdout
    assert (out / "confusion_matrix.png").is_file()
    _, metadata = load_model(out / "model.safetensors")
    assert metadata["scaler"] is None
    assert metadata["label_names"] == [str(label) for label in range(25)]


def test_model_saved_from_python(
    tmp_path: Path, frame: pd.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model without the command line's metadata: features checked by count, no scaler."""
    X = frame.drop(columns="label").to_numpy()
    estimator = SoftmaxClassifier(solver="sgd", max_iter=2, random_state=0).fit(X, frame["label"])
    save_model(estimator, tmp_path / "plain.safetensors")
    data = tmp_path / "rows.npz"
    np.savez(data, X=X)
    status, stdout, stderr = run_cli(["predict", str(tmp_path / "plain.safetensors"), str(data)], capsys)
    assert status == 0, stderr
    predictions = pd.read_csv(pd.io.common.StringIO(stdout))
    assert (predictions["prediction"].to_numpy() == estimator.predict(X)).all()
    np.testing.assert_allclose(predictions.filter(like="proba_"), estimator.predict_proba(X), rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(
    tmp_path: Path, csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    argv = ["train", str(csv), "--target", "label", "--device", "cuda", "--out", str(out), *FAST]
    status, _, stderr = run_cli(argv, capsys)
    assert status == 2
    assert stderr.count("\n") == 1
    assert stderr.startswith("softxent: error: device")
    assert not out.exists()


# --- resume ----------------------------------------------------------------------------------------------


def test_resume_after_kill_matches_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.csv"
    make_frame(n_samples=200).to_csv(data, index=False)
    epochs = 80
    options = [
        "--target",
        "label",
        "--epochs",
        str(epochs),
        "--batch-size",
        "16",
        "--hidden",
        "6",
        "--seed",
        "3",
    ]
    killed = tmp_path / "killed"
    checkpoint = killed / "checkpoint.safetensors"
    argv = [sys.executable, "-m", "softxent.cli", "train", str(data), *options, "--out", str(killed)]
    process = subprocess.Popen(
        [*argv, "--checkpoint-every", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert process.poll() is None, "the run ended before it could be killed; raise its epochs"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (killed / "model.safetensors").exists()
    interrupted_at = load_checkpoint(checkpoint)[0].info["epoch"]
    assert 1 <= interrupted_at < epochs

    # --checkpoint-every is not repeated: the interrupted run's interval is kept.
    status, stdout, stderr = run_cli(["train", str(data), *options, "--out", str(killed), "--resume"], capsys)
    assert status == 0, stderr
    assert f"resuming after epoch {interrupted_at}" in stdout
    assert not checkpoint.exists()  # removed once the model is written

    status, _, stderr = run_cli(["train", str(data), *options, "--out", str(tmp_path / "whole")], capsys)
    assert status == 0, stderr
    resumed, _ = load_model(killed / "model.safetensors")
    whole, _ = load_model(tmp_path / "whole" / "model.safetensors")
    assert resumed.n_iter_ == whole.n_iter_ > interrupted_at  # the stopping rule may end it before epochs
    np.testing.assert_array_equal(resumed.coef_, whole.coef_)
    np.testing.assert_array_equal(resumed.intercept_, whole.intercept_)
    for mine, theirs in zip(resumed.hidden_coefs_, whole.hidden_coefs_, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert resumed.loss_curve_ == whole.loss_curve_


def test_resume_after_ctrl_c_checks_options_and_data(
    tmp_path: Path, csv: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    base = ["train", str(csv), "--target", "label", "--out", str(out), "--batch-size", "16", "--epochs", "4"]
    status, _, stderr = run_cli([*base, "--resume"], capsys)
    assert status == 2
    assert stderr.startswith("softxent: error: --resume: no checkpoint")
    assert not out.exists()

    real_save = softxent.estimators.save_checkpoint

    def save_then_interrupt(checkpoint: Checkpoint, path: Path, metadata: dict) -> None:
        real_save(checkpoint, path, metadata=metadata)
        if checkpoint.info["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(softxent.estimators, "save_checkpoint", save_then_interrupt)
    status, _, stderr = run_cli([*base, "--checkpoint-every", "1"], capsys)
    assert status == 130
    assert "softxent: interrupted;" in stderr
    assert "--resume" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors"]
    monkeypatch.undo()

    status, _, stderr = run_cli([*base, "--resume", "--lr", "0.2"], capsys)
    assert status == 2
    assert "written with --lr 0.1, this run has 0.2" in stderr
    # The checkpoint of --solver auto is SGD's, and so is a --resume under auto; --solver too must match.
    status, _, stderr = run_cli([*base, "--resume", "--solver", "sgd"], capsys)
    assert status == 2
    assert "written with --solver 'auto', this run has 'sgd'" in stderr
    other = tmp_path / "other.csv"
    make_frame(seed=1).to_csv(other, index=False)
    status, _, stderr = run_cli([*base[:1], str(other), *base[2:], "--resume"], capsys)
    assert status == 2
    assert "other training data" in stderr

    status, stdout, stderr = run_cli([*base, "--resume"], capsys)
    assert status == 0, stderr
    assert "training SoftmaxClassifier (sgd) on" in stdout
    assert "resuming after epoch 2" in stdout
    uninterrupted = [*base[:5], str(tmp_path / "whole"), *base[6:], "--checkpoint-every", "1"]
    status, _, stderr = run_cli(uninterrupted, capsys)
    assert status == 0, stderr
    resumed, _resumed_meta = load_model(out / "model.safetensors")
    whole, _ = load_model(tmp_path / "whole" / "model.safetensors")
    np.testing.assert_array_equal(resumed.coef_, whole.coef_)
    assert resumed.loss_curve_ == whole.loss_curve_
    assert not (out / "checkpoint.safetensors").exists()


def test_ctrl_c_without_checkpoints_offers_no_resume(
    tmp_path: Path, csv: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An L-BFGS run writes no checkpoint: interrupted, it does not point at a stale one in --out."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"left by an earlier SGD run")

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(softxent.cli, "predict_labels", interrupt)  # in the callback after an iteration
    status, _, stderr = run_cli(["train", str(csv), "--target", "label", "--out", str(out)], capsys)
    assert status == 130
    assert stderr.endswith("softxent: interrupted\n"), stderr
    assert "--resume" not in stderr


# --- bad input ---------------------------------------------------------------------------------------------


BadCase = Callable[[Path, Path, Path], tuple[list[str], str]]


def _table(tmp_path: Path, name: str, edit: Callable[[pd.DataFrame], pd.DataFrame] = lambda f: f) -> Path:
    path = tmp_path / name
    table = edit(make_frame())
    if name.endswith(".tsv"):
        table.to_csv(path, sep="\t", index=False)
    else:
        table.to_csv(path, index=False)
    return path


def _set(row: int, column: str, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table = table.astype({column: object})
        table.loc[row, column] = value
        return table

    return edit


def bad_train(argv_tail: list[str], table: Callable[[Path], Path] | None) -> BadCase:
    """A train run on a table made by ``table`` (or no DATA) with extra arguments."""

    def case(tmp_path: Path, model: Path, out: Path) -> tuple[list[str], str]:
        data = [str(table(tmp_path))] if table is not None else []
        return ["train", *data, *argv_tail, "--out", str(out), *FAST], "train"

    return case


def bad_predict(make: Callable[[Path, Path], tuple[str, str]], command: str = "predict") -> BadCase:
    """A predict (or evaluate) run with the MODEL and DATA paths made by ``make``."""

    def case(tmp_path: Path, model: Path, out: Path) -> tuple[list[str], str]:
        model_arg, data_arg = make(tmp_path, model)
        if command == "predict":
            return ["predict", model_arg, data_arg, "--out", str(out)], "predict"
        return ["evaluate", model_arg, data_arg], "evaluate"

    return case


def _features_without(column: str) -> Callable[[Path, Path], tuple[str, str]]:
    def make(tmp_path: Path, model: Path) -> tuple[str, str]:
        return str(model), str(_table(tmp_path, "other.csv", lambda f: f.drop(columns=column)))

    return make


def _npz_with(n_features: int) -> Callable[[Path, Path], tuple[str, str]]:
    def make(tmp_path: Path, model: Path) -> tuple[str, str]:
        path = tmp_path / "other.npz"
        np.savez(path, X=np.ones((4, n_features)))
        return str(model), str(path)

    return make


def _truncated_model(tmp_path: Path, model: Path) -> tuple[str, str]:
    broken = tmp_path / "broken.safetensors"  # the first 100 bytes: a truncated download
    broken.write_bytes((model / "model.safetensors").read_bytes()[:100])
    return str(broken), str(_table(tmp_path, "data.csv"))


def _garbage_model(tmp_path: Path, model: Path) -> tuple[str, str]:
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(os.urandom(300))
    return str(broken), str(_table(tmp_path, "data.csv"))


def _unknown_class(tmp_path: Path, model: Path) -> tuple[str, str]:
    return str(model), str(_table(tmp_path, "data.csv", _set(4, "label", "dog")))


def _npz_labels(labels: np.ndarray) -> Callable[[Path], Path]:
    """An NPZ of 40 rows of 3 features with ``labels`` as y (found by the CLI fuzz test: dates as labels
    trained, then failed in json when the model was saved)."""

    def make(tmp_path: Path) -> Path:
        path = tmp_path / "data.npz"
        np.savez(path, X=np.random.default_rng(0).normal(size=(40, 3)), y=labels)
        return path

    return make


def _write(name: str, content: str) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_text(content)
        return path

    return make


BAD_INPUTS: dict[str, tuple[BadCase, str]] = {
    "missing data file": (
        bad_train(["--target", "label"], lambda d: d / "nope.csv"),
        "nope.csv: no such file",
    ),
    "unknown extension": (
        bad_train(["--target", "label"], _write("data.xlsx", "a,b\n1,2\n")),
        "unknown data format",
    ),
    "no --target": (bad_train([], lambda d: _table(d, "data.csv")), "--target"),
    "unknown target": (
        bad_train(["--target", "species"], lambda d: _table(d, "data.csv")),
        "no target column 'species'",
    ),
    "non-numeric feature": (
        bad_train(["--target", "label"], lambda d: _table(d, "data.csv", _set(6, "f3", "abc"))),
        "feature column 'f3' is not numeric: 'abc' at row 7 (line 8)",
    ),
    "NaN feature": (
        bad_train(["--target", "label"], lambda d: _table(d, "data.tsv", _set(9, "f1", np.nan))),
        "feature column 'f1' has a missing value (NaN) at row 10 (line 11)",
    ),
    "infinite feature": (
        bad_train(["--target", "label"], lambda d: _table(d, "data.csv", _set(0, "f4", "inf"))),
        "feature column 'f4' has an infinite value (inf) at row 1 (line 2)",
    ),
    "missing label": (
        bad_train(["--target", "label"], lambda d: _table(d, "data.csv", _set(2, "label", np.nan))),
        "target column 'label' has a missing value at row 3",
    ),
    "single class": (
        bad_train(["--target", "label"], lambda d: _table(d, "data.csv", lambda f: f.assign(label="ant"))),
        "single class ('ant')",
    ),
    "too few rows to split": (
        bad_train(["--target", "label"], lambda d: _table(d, "data.csv", lambda f: f.head(5))),
        "cannot hold out a stratified --test-size 0.25 split",
    ),
    "multilabel not 0/1": (
        bad_train(
            ["--multilabel", "f0,f1"], lambda d: _table(d, "data.csv", lambda f: f.drop(columns="label"))
        ),
        "label column 'f0' must hold 0 or 1",
    ),
    "target without DATA": (bad_train(["--target", "label"], None), "need DATA"),
    "empty file": (bad_train(["--target", "label"], _write("data.csv", "")), "empty file"),
    "corrupt parquet": (
        bad_train(["--target", "label"], _write("data.parquet", "not parquet")),
        "cannot read",
    ),
    "corrupt npz": (bad_train([], _write("data.npz", "not a zip")), "cannot read as NPZ"),
    "npz dates as labels": (
        bad_train([], _npz_labels(np.arange(40).astype("M8[D]"))),
        "target array 'y' must hold numbers or strings, got datetime64[D] values",
    ),
    "npz complex labels": (
        bad_train([], _npz_labels((np.arange(40) % 2).astype(complex))),
        "target array 'y' must hold numbers or strings, got complex128 values",
    ),
    "missing model": (
        bad_predict(lambda d, m: (str(d / "none"), str(_table(d, "x.csv")))),
        "no such model file",
    ),
    "missing predict data": (
        bad_predict(lambda d, m: (str(m), str(d / "x.parquet"))),
        "x.parquet: no such file",
    ),
    "truncated model": (bad_predict(_truncated_model), "broken.safetensors"),
    "garbage model": (bad_predict(_garbage_model), "model.safetensors"),
    "feature missing": (
        bad_predict(_features_without("f2")),
        "features differ from the model's (missing 'f2')",
    ),
    "feature unexpected": (
        bad_predict(lambda d, m: (str(m), str(_table(d, "x.csv", lambda f: f.assign(extra=1.0))))),
        "unexpected 'extra'",
    ),
    "feature count": (bad_predict(_npz_with(N_FEATURES + 1)), "X has 6 features, the model was trained on 5"),
    "evaluate unknown class": (
        bad_predict(_unknown_class, "evaluate"),
        "classes the model was not trained on: 'dog'",
    ),
    "evaluate unknown target": (
        bad_predict(
            lambda d, m: (str(m), str(_table(d, "x.csv", lambda f: f.drop(columns="label")))), "evaluate"
        ),
        "no target column 'label'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(
    case: str, trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, message = BAD_INPUTS[case]
    out = tmp_path / "output"
    argv, command = make(tmp_path, trained[0], out)
    before = set(tmp_path.iterdir())
    status, stdout, stderr = run_cli(argv, capsys)
    assert status == 2, (stdout, stderr)
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("softxent: error: "), stderr
    assert message in stderr
    assert "Traceback" not in stderr + stdout
    assert not out.exists(), f"{command} left {out} behind"
    assert set(tmp_path.iterdir()) == before, "a temporary file was left behind"


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["train", "--epochs", "0"],
        ["train", "--hidden", "12,x"],
        ["train", "--test-size", "1.5"],
        [],
    ):
        status, _, stderr = run_cli(argv, capsys)
        assert status == 2
        assert "error:" in stderr
        assert "Traceback" not in stderr


def test_failed_predict_keeps_an_existing_output(trained: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    out.write_text("old\n")
    bad = _table(tmp_path, "bad.csv", _set(3, "f0", "x"))
    assert main(["predict", str(trained[0]), str(bad), "--out", str(out)]) == 2
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "predictions.csv"]


# --- help and the console script -------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["train", "predict", "evaluate"])
def test_help_explains_every_option_with_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, stdout, _ = run_cli([command, "--help"], capsys)
    assert status == 0
    for action in subcommands()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for flag in action.option_strings:
            assert flag in stdout, f"{command} --help does not mention {flag}"
        if action.option_strings:
            assert "default" in (action.help or ""), f"{command} {action.option_strings}: no default"
        else:
            assert action.metavar in stdout


def test_console_script(trained: tuple[Path, Path]) -> None:
    script = Path(sys.executable).with_name("softxent")
    assert script.is_file(), f"{script}: the console script is not installed (pip install -e .)"
    model_dir, data = trained
    result = subprocess.run(
        [str(script), "evaluate", str(model_dir), str(data)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "macro-F1" in result.stdout


def test_npz_byte_string_labels_train_as_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NPZ labels saved as bytes (numpy's S dtype) are read as text, as feature names are; before, the
    estimator refused them with scikit-learn's traceback."""
    data = _npz_labels(np.array([b"ant", b"bee"] * 20))(tmp_path)
    out = tmp_path / "model"
    status, _, stderr = run_cli(["train", str(data), "--out", str(out), "--epochs", "2"], capsys)
    assert status == 0, stderr
    estimator, _ = load_model(out / "model.safetensors")
    assert estimator.classes_.tolist() == ["ant", "bee"]


def test_save_model_refuses_classes_json_cannot_hold(tmp_path: Path) -> None:
    """The model file's header is JSON: classes_ that are dates (which fit accepts, as scikit-learn's
    estimators do) get a ValueError naming the way out, not json's TypeError, and no file."""
    rng = np.random.default_rng(0)
    dates = np.array(["2026-11-29", "2026-11-30"] * 20, dtype="M8[D]")
    estimator = SoftmaxClassifier(max_iter=2).fit(rng.normal(size=(40, 3)), dates)
    path = tmp_path / "model.safetensors"
    expected = r"estimator: expected classes_ of numbers, booleans or strings.*astype\(str\)"
    with pytest.raises(ValueError, match=expected):
        save_model(estimator, path)
    assert list(tmp_path.iterdir()) == []
