"""The command line's reliability issue, one test (or a few) per item: silent data mistakes (A), one
multi-label column (B), corrupt compressed files (C), huge LibSVM indices (D), argparse's errors (E),
messages in the right place (F), a fit that diverges (G), start-up without the `train` extra and the
packaging (H), and the estimator's options on the command line (I).

Every failure is pinned as the exit status 2, exactly one ``softxent: error: ...`` line on stderr, and no
file left behind. Commands run in-process through ``softxent.cli.main`` except where start-up itself is
under test; data are tiny and epochs few, for a 2-core machine.
"""

from __future__ import annotations

import bz2
import gzip
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification

import softxent.cli
from softxent._files import atomic_path
from softxent.cli import ESTIMATOR_DEFAULTS, SOLVER_DEFAULTS, main
from softxent.estimators import SigmoidClassifier, SoftmaxClassifier, load_model, save_model
from softxent.estimators._base import MAX_ITER, TOL

FAST = ["--epochs", "3", "--batch-size", "16"]
ROOT = Path(__file__).resolve().parents[1]


def make_frame(n_samples: int = 120, seed: int = 0) -> pd.DataFrame:
    """Features f0..f4 and a 3-class string label column "label"."""
    X, y = make_classification(
        n_samples=n_samples,
        n_features=5,
        n_informative=3,
        n_redundant=0,
        n_classes=3,
        n_clusters_per_class=1,
        class_sep=2.0,
        random_state=seed,
    )
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(5)])
    return frame.assign(label=np.array(["ant", "bee", "cat"])[y])


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) -> (exit status, stdout, stderr)."""
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def shown(stderr: str) -> str:
    """What a terminal shows of stderr: a progress bar erased with carriage returns leaves nothing."""
    return "".join(line.rsplit("\r", 1)[-1] for line in stderr.splitlines(keepends=True))


def assert_one_error_line(status: int, stderr: str, message: str) -> None:
    """Exit status 2 and exactly one ``softxent: error:`` line holding ``message``, no traceback."""
    visible = shown(stderr)
    assert status == 2, stderr
    assert visible.count("\n") == 1, repr(stderr)
    assert visible.endswith("\n"), repr(stderr)
    assert visible.startswith("softxent: error: "), repr(stderr)
    assert message in visible, visible
    assert "Traceback" not in stderr
    assert "np." not in visible, visible


def files_under(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def fails_cleanly(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, str]:
    """Run a command that must fail: one error line, and no file added under tmp_path."""
    before = files_under(tmp_path)
    status, stdout, stderr = run(argv, capsys)
    assert_one_error_line(status, stderr, message)
    assert files_under(tmp_path) == before, "files were left behind"
    return stdout, stderr


# --- A: silent data mistakes -------------------------------------------------------------------------------


def test_parquet_datetime_feature_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.parquet"
    frame = make_frame().assign(when=pd.date_range("2024-01-01", periods=120, freq="h"))
    frame.assign(wait=pd.to_timedelta(np.arange(120), unit="s")).to_parquet(data)
    argv = ["train", str(data), "--target", "label", "--out", str(tmp_path / "out"), *FAST]
    fails_cleanly(argv, "feature column 'when' holds datetime64", tmp_path, capsys)

    frame.drop(columns="when").assign(kind=pd.Categorical(["a", "b"] * 60)).to_parquet(data)
    fails_cleanly(argv, "feature column 'kind' holds category values, not numbers", tmp_path, capsys)


@pytest.mark.parametrize(
    ("header", "repeated"),
    [("f0,f1,f0,f3,f4,label", "'f0'"), ("f0,f1,f2,f3,label,label", "'label'")],
    ids=["feature", "target"],
)
def test_duplicate_csv_header_is_refused(
    header: str, repeated: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.csv"
    rows = make_frame().to_csv(index=False, header=False)
    data.write_text(header + "\n" + rows)
    argv = ["train", str(data), "--target", "label", "--out", str(tmp_path / "out"), *FAST]
    fails_cleanly(argv, f"duplicate column names {repeated}", tmp_path, capsys)


def test_rows_longer_than_the_header_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pandas would silently make the surplus first field a row index, shifting every column."""
    data = tmp_path / "data.csv"
    data.write_text("a,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    argv = ["train", str(data), "--target", "label", "--out", str(tmp_path / "out"), *FAST]
    fails_cleanly(argv, "the data rows have more fields than the names of the header", tmp_path, capsys)


def test_npz_feature_names_of_the_wrong_length_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.npz"
    frame = make_frame()
    X, y = frame.drop(columns="label").to_numpy(), frame["label"].to_numpy(dtype=str)
    np.savez(data, X=X, y=y, feature_names=["a", "b"])
    argv = ["train", str(data), "--out", str(tmp_path / "out"), *FAST]
    fails_cleanly(
        argv, "feature_names has shape (2,), expected (5,): one name per column of X", tmp_path, capsys
    )


def test_npz_duplicate_feature_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused for training; at predict time matched by position when they are the model's own names in
    its order, refused (one line, not numpy's broadcast error) when they must be matched by name."""
    frame = make_frame()
    X, y = frame.drop(columns="label").to_numpy(), frame["label"].to_numpy(dtype=str)
    repeated = ["a", "b", "a", "c", "d"]
    data = tmp_path / "repeated.npz"
    np.savez(data, X=X, y=y, feature_names=repeated)
    fails_cleanly(
        ["train", str(data), "--out", str(tmp_path / "out"), *FAST],
        "feature_names repeats 'a'; feature names must differ",
        tmp_path,
        capsys,
    )

    # A model with distinct names: a file with repeated names cannot be matched to it.
    distinct = tmp_path / "distinct.npz"
    np.savez(distinct, X=X, y=y, feature_names=["a", "b", "e", "c", "d"])
    status, _, stderr = run(["train", str(distinct), "--out", str(tmp_path / "model"), *FAST], capsys)
    assert status == 0, stderr
    fails_cleanly(
        ["predict", str(tmp_path / "model"), str(data)], "feature_names repeats 'a'", tmp_path, capsys
    )

    # A model whose names repeat (saved from Python, or by an earlier softxent): positional match only.
    estimator = SoftmaxClassifier(solver="sgd", max_iter=2, random_state=0).fit(X, y)
    metadata = {"task": "multiclass", "feature_names": repeated, "targets": ["y"], "label_names": None}
    save_model(estimator, tmp_path / "old.safetensors", metadata=metadata)
    status, stdout, stderr = run(["predict", str(tmp_path / "old.safetensors"), str(data)], capsys)
    assert status == 0, stderr
    predictions = pd.read_csv(pd.io.common.StringIO(stdout))
    assert (predictions["prediction"].to_numpy() == estimator.predict(X)).all()
    reordered = tmp_path / "reordered.npz"
    np.savez(reordered, X=X[:, ::-1], y=y, feature_names=repeated[::-1])
    fails_cleanly(
        ["predict", str(tmp_path / "old.safetensors"), str(reordered)],
        "feature_names repeats 'a'",
        tmp_path,
        capsys,
    )


# --- B: one --multilabel column ----------------------------------------------------------------------------


def test_one_multilabel_column_trains_predicts_and_evaluates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = make_frame()
    data = tmp_path / "data.csv"
    frame.drop(columns="label").assign(t1=(frame["label"] == "cat").astype(int)).to_csv(data, index=False)
    out = tmp_path / "model"
    status, stdout, stderr = run(["train", str(data), "--multilabel", "t1", "--out", str(out), *FAST], capsys)
    assert status == 0, stderr
    assert "5 features, 1 label\n" in stdout
    for metric in ("subset accuracy", "micro-F1", "label      F1  positives"):
        assert metric in stdout
    assert files_under(out) == ["confusion_matrix.png", "loss_curve.png", "model.safetensors"]
    estimator, metadata = load_model(out / "model.safetensors")
    assert isinstance(estimator, SigmoidClassifier)
    assert estimator.coef_.shape == (1, 5)  # one sigmoid
    assert metadata["task"] == "multilabel"
    assert metadata["label_names"] == ["t1"]

    status, stdout, stderr = run(["predict", str(out), str(data)], capsys)
    assert status == 0, stderr
    predictions = pd.read_csv(pd.io.common.StringIO(stdout))
    assert list(predictions.columns) == ["pred_t1", "proba_t1"]
    assert set(predictions["pred_t1"]) <= {0, 1}
    assert ((predictions["proba_t1"] > 0.5) == (predictions["pred_t1"] == 1)).all()
    status, stdout, stderr = run(["evaluate", str(out), str(data)], capsys)
    assert status == 0, stderr
    assert "subset accuracy" in stdout

    frame.drop(columns="label").assign(t1=0).to_csv(data, index=False)
    fails_cleanly(
        ["train", str(data), "--multilabel", "t1", "--out", str(tmp_path / "constant"), *FAST],
        "label column 't1' holds only 0s; a single --multilabel column is a binary problem",
        tmp_path,
        capsys,
    )


# --- C: corrupt compressed files ---------------------------------------------------------------------------


def _corrupt(compressed: bytes) -> bytes:
    """The compressed bytes with a stretch of the body overwritten: the header still reads."""
    body = bytearray(compressed)
    middle = len(body) // 2
    body[middle : middle + 16] = bytes(range(16))
    return bytes(body)


@pytest.mark.parametrize("suffix", [".csv.gz", ".libsvm.gz", ".csv.bz2", ".libsvm.bz2"])
def test_corrupt_compressed_file_is_one_line(
    suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    if ".csv" in suffix:
        text = "a,b,label\n" + "".join(
            f"{rng.random():.6f},{rng.random():.6f},{i % 2}\n" for i in range(4000)
        )
    else:
        text = "".join(f"{i % 2} 1:{rng.random():.6f} 2:{rng.random():.6f}\n" for i in range(4000))
    compress = gzip.compress if suffix.endswith(".gz") else bz2.compress
    data = tmp_path / f"data{suffix}"
    data.write_bytes(_corrupt(compress(text.encode())))
    target = ["--target", "label"] if ".csv" in suffix else []
    kind = "CSV" if ".csv" in suffix else "LibSVM"
    fails_cleanly(
        ["train", str(data), *target, "--out", str(tmp_path / "out"), *FAST],
        f"data{suffix}: cannot read as {kind}:",
        tmp_path,
        capsys,
    )


# --- D: huge LibSVM feature indices ------------------------------------------------------------------------


@pytest.mark.parametrize("index", [10**7, 10**9])
def test_huge_libsvm_index_is_refused_before_training(
    index: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.libsvm"
    data.write_text("".join(f"{i % 2} 1:{i}.5 2:1\n" for i in range(30)) + f"1 {index}:1\n")
    stdout, _ = fails_cleanly(
        ["train", str(data), "--out", str(tmp_path / "out"), *FAST],
        f"its largest feature index, {index}, makes {index + 1} feature columns, more than the 1048576",
        tmp_path,
        capsys,
    )
    assert stdout == ""  # refused while reading, before any training


def test_model_header_too_large_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.csv"
    make_frame().to_csv(data, index=False)
    monkeypatch.setattr(softxent.cli, "MODEL_HEADER_BUDGET", 100)
    stdout, _ = fails_cleanly(
        ["train", str(data), "--target", "label", "--out", str(tmp_path / "out"), *FAST],
        "the model's metadata (the names and scaler of 5 features) would take",
        tmp_path,
        capsys,
    )
    assert stdout == ""


# --- E: argparse's errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--test-size", "2"], "--test-size: expected a number > 0 and < 1, got '2'"),
        (["train", "--epochs", "0"], "--epochs: expected an integer >= 1, got '0'"),
        (
            ["train", "--hidden", "abc"],
            "--hidden: expected comma-separated integers such as 128,64, got 'abc'",
        ),
        (["train", "--seed", "-1"], "--seed: expected an integer from 0 to 4294967295, got '-1'"),
        (["train", "--lr", "nan"], "--lr: expected a number > 0, got 'nan'"),
        (["train", "--momentum", "1"], "--momentum: expected a number >= 0 and < 1, got '1'"),
        (["train", "--tol", "-1"], "--tol: expected a number >= 0, auto or none, got '-1'"),
        (["train", "--solver", "newton"], "--solver: invalid choice: 'newton'"),
        (["train", "--class-weight", "ant"], "--class-weight: expected balanced or distinct NAME=WEIGHT"),
        (["train", "--device", "gpu"], "--device: invalid choice: 'gpu'"),
        (["train", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["predict", "model"], "the following arguments are required: DATA"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_option_is_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stdout, _ = fails_cleanly(argv, message, tmp_path, capsys)
    assert stdout == ""


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    status, stdout, _ = run(["--version"], capsys)
    assert status == 0
    assert stdout.startswith("softxent ")
    status, stdout, _ = run(["train", "--help"], capsys)
    assert status == 0
    assert "--early-stopping" in stdout


# --- F: messages in the right place ------------------------------------------------------------------------


def test_out_that_cannot_be_written_is_reported_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.csv"
    make_frame().to_csv(data, index=False)
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    argv = ["train", str(data), "--target", "label", *FAST, "--out"]
    stdout, _ = fails_cleanly(
        [*argv, str(blocker / "model")], f"{blocker} is not a directory", tmp_path, capsys
    )
    assert stdout == ""

    # A directory without write permission (tested by creating a file there, which root may do anyway).
    def refuse(*args: object, dir: str, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", os.path.join(dir, "tmpabc"))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    locked = tmp_path / "locked"
    locked.mkdir()
    stdout, stderr = fails_cleanly(
        [*argv, str(locked / "model")],
        f"--out {locked / 'model'}: cannot write in {locked}: Permission denied",
        tmp_path,
        capsys,
    )
    assert stdout == ""
    assert "tmp" not in stderr.replace(str(tmp_path), "")


def test_atomic_path_errors_name_the_target(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "out.csv"
    with pytest.raises(FileNotFoundError) as raised, atomic_path(target):
        pass
    assert raised.value.filename == str(target)
    assert not (tmp_path / "missing").exists()


def test_messages_show_plain_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = make_frame().drop(columns="label")
    data = tmp_path / "data.csv"
    frame.assign(t1=2, t2=1).to_csv(data, index=False)
    fails_cleanly(
        ["train", str(data), "--multilabel", "t1,t2", "--out", str(tmp_path / "out"), *FAST],
        "label column 't1' must hold 0 or 1, got 2 at row 1",
        tmp_path,
        capsys,
    )


# --- G: a fit that fails -----------------------------------------------------------------------------------


def test_diverged_fit_writes_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.csv"
    make_frame().to_csv(data, index=False)
    argv = ["train", str(data), "--target", "label", "--lr", "1e6", "--out", str(tmp_path / "out"), *FAST]
    _, stderr = fails_cleanly([*argv, "--checkpoint-every", "1"], "diverged", tmp_path, capsys)
    assert "a smaller --lr (now 1000000.0)" in stderr  # the option, not the estimator's eta0


def test_failed_fit_removes_its_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ValueError from fit after some epochs (and checkpoints): one line, and nothing left in --out."""
    data = tmp_path / "data.csv"
    make_frame().to_csv(data, index=False)
    real_fit = SoftmaxClassifier.fit

    def fit_then_diverge(self: SoftmaxClassifier, X: object, y: object, **kwargs: object) -> None:
        real_fit(self, X, y, **{**kwargs, "callback": None})
        kwargs["callback"](self, {"epoch": 1, "max_iter": 3, "loss": 1.0})
        kwargs["callback"](self, {"epoch": 2, "max_iter": 3, "loss": float("nan")})
        raise ValueError("SoftmaxClassifier: training diverged at epoch 2: the loss is nan\nsecond line")

    monkeypatch.setattr(SoftmaxClassifier, "fit", fit_then_diverge)
    argv = [
        "train",
        str(data),
        "--target",
        "label",
        "--out",
        str(tmp_path / "out"),
        "--checkpoint-every",
        "1",
    ]
    _, stderr = fails_cleanly(
        [*argv, *FAST], "SoftmaxClassifier: training diverged at epoch 2: the loss is nan", tmp_path, capsys
    )
    assert "second line" not in stderr
    assert "train:" in stderr  # the progress bar ran, and was erased

    existing = tmp_path / "existing"
    existing.mkdir()
    argv[argv.index(str(tmp_path / "out"))] = str(existing)
    fails_cleanly([*argv, *FAST], "diverged", tmp_path, capsys)
    assert existing.is_dir()  # a directory the run did not make stays


# --- H: start-up and packaging -----------------------------------------------------------------------------

# Python code that makes the `train` extra's modules unimportable, as in an install without it.
WITHOUT_TRAIN_EXTRA = (
    "import sys\nfor name in ('sklearn', 'scipy', 'pandas', 'matplotlib'):\n    sys.modules[name] = None\n"
)


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_commands_without_the_train_extra_say_what_to_install() -> None:
    result = python(WITHOUT_TRAIN_EXTRA + "from softxent.cli import main\nraise SystemExit(main(['train']))")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "softxent: error: softxent train needs the 'train' extra, which is not installed "
        "(missing: scikit-learn, scipy, pandas, matplotlib); install it with: pip install 'softxent[train]'"
    ), result.stderr


def test_star_import_without_the_train_extra() -> None:
    code = WITHOUT_TRAIN_EXTRA + (
        "import softxent\n"
        "from softxent import *\n"
        "assert 'SoftmaxClassifier' not in softxent.__all__, softxent.__all__\n"
        "assert cross_entropy is softxent.functional.cross_entropy\n"
        "try:\n"
        "    softxent.SoftmaxClassifier\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error)\n"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert "softxent.SoftmaxClassifier needs the 'train' extra" in result.stdout
    assert "pip install 'softxent[train]'" in result.stdout


def test_star_import_with_the_train_extra() -> None:
    result = python(
        "import softxent\nfrom softxent import *\nprint(SoftmaxClassifier.__name__, softxent.__all__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SoftmaxClassifier [")


def test_help_and_version_import_no_heavy_module() -> None:
    """--help and --version answer without torch, scikit-learn or pandas (3.5 s of imports before)."""
    heavy = ("torch", "sklearn", "pandas", "scipy", "numpy", "matplotlib")
    code = (
        "import contextlib, io, sys\n"
        "from softxent.cli import main\n"
        "for argv in (['--help'], ['--version'], ['train', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main(argv) == 0\n"
        f"print(sorted(set(sys.modules) & set({heavy!r})))\n"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_python_dash_m_softxent() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "softxent", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"softxent {softxent.__version__}"
    result = subprocess.run(
        [sys.executable, "-m", "softxent", "train", "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("softxent: error: --epochs:")


def test_package_ships_license_and_py_typed() -> None:
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n")
    assert (ROOT / "src" / "softxent" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license-files = ["LICENSE"]' in pyproject
    assert 'softxent = ["py.typed"]' in pyproject


# --- I: the estimator's options ----------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [SoftmaxClassifier(), SigmoidClassifier()], ids=type)
def test_option_defaults_are_the_estimators(estimator: SoftmaxClassifier | SigmoidClassifier) -> None:
    params = estimator.get_params()
    for name, default in ESTIMATOR_DEFAULTS.items():
        if name in params:
            assert params[name] == default, name
    # what max_iter=None and tol="auto" stand for, which --help states
    assert {solver: defaults["max_iter"] for solver, defaults in SOLVER_DEFAULTS.items()} == MAX_ITER
    assert {solver: defaults["tol"] for solver, defaults in SOLVER_DEFAULTS.items()} == TOL


def test_training_options_reach_the_estimator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.csv"
    make_frame(n_samples=200).to_csv(data, index=False)
    out = tmp_path / "model"
    options = [
        "--lr-schedule",
        "invscaling",
        "--power-t",
        "0.5",
        "--momentum",
        "0",
        "--tol",
        "none",
        "--early-stopping",
        "--validation-fraction",
        "0.2",
        "--n-iter-no-change",
        "2",
        "--class-weight",
        "ant=2,cat=0.5",
        "--label-smoothing",
        "0.1",
        "--no-shuffle",
    ]
    status, stdout, stderr = run(
        ["train", str(data), "--target", "label", "--out", str(out), *options, *FAST], capsys
    )
    assert status == 0, stderr
    assert "early stopping: kept epoch" in stdout
    estimator, metadata = load_model(out / "model.safetensors")
    params = estimator.get_params()
    expected = {
        "solver": "sgd",  # auto's choice with --early-stopping
        "learning_rate": "invscaling",
        "power_t": 0.5,
        "momentum": 0.0,
        "nesterov": False,  # Nesterov needs momentum
        "tol": None,
        "early_stopping": True,
        "validation_fraction": 0.2,
        "n_iter_no_change": 2,
        "class_weight": {"ant": 2.0, "cat": 0.5},
        "label_smoothing": 0.1,
        "shuffle": False,
    }
    assert {name: params[name] for name in expected} == expected
    assert metadata["options"]["class_weight"] == {"ant": 2.0, "cat": 0.5}


def test_pos_weight_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = make_frame()
    data = tmp_path / "data.csv"
    labels = {"big": frame["f0"] > 0, "cat": frame["label"] == "cat"}
    frame.drop(columns="label").assign(**{k: v.astype(int) for k, v in labels.items()}).to_csv(
        data, index=False
    )
    out = tmp_path / "model"
    argv = [
        "train",
        str(data),
        "--multilabel",
        "big,cat",
        "--pos-weight",
        "cat=3",
        "--solver",
        "sgd",
        "--lr-schedule",
        "constant",
    ]
    status, _, stderr = run([*argv, "--out", str(out), *FAST], capsys)
    assert status == 0, stderr
    assert list(load_model(out / "model.safetensors")[0].pos_weight) == [1.0, 3.0]
    # max_iter reached under a constant rate: scikit-learn's ConvergenceWarning as one line, naming the
    # option that sets it
    assert "softxent: warning: SigmoidClassifier: --epochs=3 epochs reached" in stderr
    assert "consider raising --epochs" in stderr
    assert "max_iter" not in stderr
    assert "warnings.warn" not in stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--target", "label", "--class-weight", "dog=2"],
            "--class-weight: no class 'dog'; the classes are 'ant'",
        ),
        (["--target", "label", "--pos-weight", "balanced"], "--pos-weight: applies to --multilabel only"),
        (
            ["--multilabel", "f0", "--class-weight", "balanced"],
            "--class-weight: does not apply to --multilabel",
        ),
        (
            ["--multilabel", "f0", "--label-smoothing", "0.1"],
            "--label-smoothing: does not apply to --multilabel",
        ),
        (["--multilabel", "t1", "--pos-weight", "t9=2"], "--pos-weight: no label column 't9'"),
        (
            ["--target", "label", "--solver", "lbfgs", "--checkpoint-every", "1"],
            "--checkpoint-every: does not apply to --solver lbfgs (a checkpoint holds SGD's state",
        ),
        (
            ["--target", "label", "--solver", "lbfgs", "--resume"],
            "--resume: does not apply to --solver lbfgs (it continues an SGD run",
        ),
        (
            ["--target", "label", "--solver", "lbfgs", "--early-stopping"],
            "--early-stopping: does not apply to --solver lbfgs",
        ),
    ],
)
def test_option_mistakes_are_one_line(
    options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.csv"
    frame = make_frame()
    frame = frame.assign(t1=(frame["label"] == "cat").astype(int))
    (frame.drop(columns="label") if "--multilabel" in options else frame).to_csv(data, index=False)
    fails_cleanly(
        ["train", str(data), *options, "--out", str(tmp_path / "out"), *FAST], message, tmp_path, capsys
    )


@pytest.mark.parametrize("bad_scale", [0.0, float("nan"), float("inf")])
def test_model_whose_scaler_is_not_finite_and_positive_is_refused(
    bad_scale: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line's feature scaler lives in the model file's metadata: a zero or non-finite scale (a
    hand-edited or damaged file) is one error line, not nan predictions."""
    data = tmp_path / "data.csv"
    make_frame().to_csv(data, index=False)
    out = tmp_path / "model"
    status, _, stderr = run(["train", str(data), "--target", "label", "--out", str(out), *FAST], capsys)
    assert status == 0, stderr
    estimator, metadata = load_model(out / "model.safetensors")
    metadata["scaler"]["scale"][2] = bad_scale
    save_model(estimator, out / "model.safetensors", metadata)
    fails_cleanly(
        ["predict", str(out), str(data)],
        "the scaler's mean must be finite and its scale finite and > 0",
        tmp_path,
        capsys,
    )
