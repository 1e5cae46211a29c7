"""Property-based fuzz of the command line's data readers: malformed CSV, TSV, NPZ and LibSVM files (random
bytes, truncated or corrupted, compressed or not, bad numbers, ragged rows, NaN and infinity, repeated
names, huge feature indices, empty files) never raise anything but the project's one-line InputError from
``read_dataset``, and ``softxent train`` / ``predict`` on them ends with status 0, or with status 2, one
``softxent: error:`` line on stderr and no file written.

The files are drawn as structured text with random damage rather than as raw bytes alone, so that most
examples get past the first parse and reach the checks of values, names and shapes. Example counts keep
the module under a minute on a 2-core machine.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from softxent._data import MAX_FEATURES, InputError, read_dataset
from softxent.cli import main

READER_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLI_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

NUMBER = st.one_of(
    st.integers(-5, 5).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e999", "-1e999", "1e308", "99999999999999999999999", "0x10", "1,5", " 2 "]),
)
FIELD = st.one_of(
    NUMBER,
    NUMBER,
    st.sampled_from(
        ["", "nan", "NA", "inf", "-inf", "abc", "True", "false", '"1"', '"a,b"', '"', "2024-01-01"]
    ),
    st.text(max_size=4),
)
# Hypothesis favours the ends of integer ranges; these draw a rare event with a fixed frequency instead.
RARELY = st.sampled_from([True] + [False] * 9)
SOMETIMES = st.sampled_from([True] + [False] * 2)
ROWS = st.one_of(st.integers(0, 3), st.integers(8, 30), st.integers(8, 30))
FINITE = st.floats(allow_nan=False, allow_infinity=False)
NAME = st.sampled_from(["t", "t", "a", "b", "c", "", "t.1", "Unnamed: 0", " t", "é"])


@st.composite
def damaged(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as bytes, perhaps truncated, with bytes flipped, or replaced by random bytes."""
    data = text.encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "flip", "random"]))
    if damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + draw(st.binary(min_size=1, max_size=4)) + data[position + 1 :]
    elif damage == "random":
        data = draw(st.binary(max_size=200))
    return data


@st.composite
def compressed(draw: st.DrawFn, data: bytes) -> tuple[bytes, str]:
    """(file content, compression suffix): maybe gzip or bzip2, maybe with a damaged compressed stream."""
    suffix = draw(st.sampled_from(["", "", "", ".gz", ".bz2"]))
    if suffix:
        data = (gzip.compress if suffix == ".gz" else bz2.compress)(data)
        damage = draw(st.sampled_from(["none", "none", "truncate", "corrupt"]))
        if damage == "truncate":
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif damage == "corrupt" and len(data) > 20:
            position = draw(st.integers(10, len(data) - 10))
            data = data[:position] + bytes(range(8)) + data[position + 8 :]
    return data, suffix


def _spoil(draw: st.DrawFn, fields: list[str]) -> list[str]:
    """A few fields of a well-formed row replaced by junk, dropped or added (often none)."""
    for _ in range(draw(st.integers(1, 2)) if draw(SOMETIMES) else 0):
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "add" or not fields:
            fields = [*fields, draw(FIELD)]
        elif action == "drop":
            fields = fields[:-1]
        else:
            fields[draw(st.integers(0, len(fields) - 1))] = draw(FIELD)
    return fields


@st.composite
def table_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(file name, content) of a CSV or TSV file: either junk (a header of maybe repeated names, ragged
    rows of numbers and text) or a well-formed table of features a, b and target t with a few spoiled
    fields."""
    kind = draw(st.sampled_from(["csv", "tsv"]))
    sep = "," if kind == "csv" else "\t"
    if draw(SOMETIMES):
        header = draw(st.lists(NAME, min_size=1, max_size=5))
        width = len(header)
        rows = draw(st.lists(st.lists(FIELD, min_size=max(0, width - 1), max_size=width + 1), max_size=12))
    else:
        header = _spoil(draw, ["a", "b", "t"])
        n_rows = draw(ROWS)
        numbers = draw(st.lists(st.floats(-10, 10), min_size=2 * n_rows, max_size=2 * n_rows))
        rows = [
            _spoil(draw, [f"{numbers[2 * i]:.3f}", f"{numbers[2 * i + 1]:.3f}", str(i % 3)])
            for i in range(n_rows)
        ]
    rows = [row for row in rows if sep not in "".join(row)]
    text = "\n".join(sep.join(row) for row in [header, *rows]) + draw(st.sampled_from(["", "\n", "\r\n"]))
    data, suffix = draw(compressed(draw(damaged(text))))
    return f"data.{kind}{suffix}", data


@st.composite
def libsvm_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(file name, content) of a LibSVM file: labels, index:value pairs (indices up to far beyond
    MAX_FEATURES, negative, unsorted), qid fields and comments, among mostly well-formed lines."""
    index = st.one_of(
        st.integers(0, 6),
        st.integers(0, 6),
        st.integers(-2, 2),
        st.sampled_from([MAX_FEATURES - 1, MAX_FEATURES, 10**7, 10**9, 10**12, 2**63]),
    )
    pair = st.builds(lambda i, v: f"{i}:{v}", index, NUMBER)
    junk = st.builds(
        lambda label, pairs, extra: " ".join([label, *pairs, *extra]),
        st.one_of(st.sampled_from(["0", "1", "2", "-1", "1.5", "nan", "inf"]), FIELD),
        st.lists(pair, max_size=4),
        st.lists(st.sampled_from(["qid:1", "# comment", ":", "x"]), max_size=1),
    )
    good = st.builds(
        lambda label, values: " ".join([str(label), *(f"{i + 1}:{v:.3f}" for i, v in enumerate(values))]),
        st.integers(0, 2),
        st.lists(st.floats(-10, 10), min_size=1, max_size=3),
    )
    lines = [draw(good) for _ in range(draw(ROWS))]
    if draw(SOMETIMES):
        lines.insert(draw(st.integers(0, len(lines))), draw(junk))
    data, suffix = draw(compressed(draw(damaged("\n".join(lines) + "\n"))))
    return f"data.libsvm{suffix}", data


def _array(draw: st.DrawFn, rows: int, columns: int | None) -> np.ndarray:
    """An array of ``rows`` (x ``columns``) of a drawn dtype, mostly float features or int labels, with a
    NaN or an infinity among the floats now and then."""
    shape = (rows,) if columns is None else (rows, columns)
    usual = "float" if columns is not None else "int"
    kind = draw(st.sampled_from([usual] * 6 + ["float", "int", "bool", "str", "complex", "datetime"]))
    size = int(np.prod(shape))
    if kind == "float":
        values = np.asarray(draw(st.lists(st.floats(-1e3, 1e3), min_size=size, max_size=size)))
        if size and draw(RARELY):
            values[draw(st.integers(0, size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e308]))
        return values.astype(np.float64).reshape(shape)
    integers = np.asarray(draw(st.lists(st.integers(0, 2), min_size=size, max_size=size)), dtype=np.int64)
    integers = integers.reshape(shape)
    return {
        "int": integers,
        "bool": integers.astype(bool),
        "str": integers.astype(str),
        "complex": integers + 1j,
        "datetime": integers.astype("datetime64[D]"),
    }[kind]


@st.composite
def npz_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(file name, content) of an NPZ: X and y of drawn dtypes and shapes (mismatched, 1-D, empty),
    feature_names of the wrong length or with repeats, or a damaged archive."""
    rows = draw(ROWS)
    columns = draw(st.integers(0, 4))
    arrays: dict[str, np.ndarray] = {}
    if not draw(RARELY):
        arrays["X"] = _array(draw, rows, None if draw(RARELY) else columns)
    if not draw(RARELY):
        arrays["y"] = _array(draw, rows + 1 if draw(RARELY) else rows, None)
    if draw(SOMETIMES):
        names = draw(st.lists(NAME, min_size=max(0, columns - 1), max_size=columns + 1))
        arrays["feature_names"] = np.asarray(names if draw(st.booleans()) else [n.encode() for n in names])
    if draw(RARELY):
        arrays["y"] = np.asarray([{"pickled": 1}] * rows, dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    text = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "random"]))
    if damage == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif damage == "random":
        text = draw(st.binary(max_size=100))
    return "data.npz", text


def _check_dataset(dataset: object) -> None:
    """What every reader promises of what it returns."""
    X, y, names = dataset.X, dataset.y, dataset.feature_names
    assert X.dtype == np.float64
    assert X.shape[0] >= 1
    assert 1 <= X.shape[1] <= MAX_FEATURES
    assert np.isfinite(X.data if sp.issparse(X) else X).all()
    assert len(names) == X.shape[1]
    if dataset.named:
        assert len(set(names)) == len(names)
    assert y is None or y.shape[0] == X.shape[0]


def _read(name: str, content: bytes, targets: list[str] | None, multilabel: bool = False) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_bytes(content)
        try:
            dataset = read_dataset(path, targets, multilabel=multilabel)
        except InputError as error:
            message = str(error)
            assert message, "an empty message"
            assert "\n" not in message, message
            assert "np.int64(" not in message, message
            return
        _check_dataset(dataset)


@READER_SETTINGS
@given(table_files(), st.sampled_from([["t"], ["t", "a"]]))
def test_table_reader(file: tuple[str, bytes], targets: list[str]) -> None:
    _read(*file, targets, multilabel=len(targets) > 1)


@READER_SETTINGS
@given(libsvm_files())
def test_libsvm_reader(file: tuple[str, bytes]) -> None:
    _read(*file, None)


@READER_SETTINGS
@given(npz_files())
def test_npz_reader(file: tuple[str, bytes]) -> None:
    _read(*file, None)


def _cli(argv: list[str]) -> tuple[int, str]:
    """main(argv) in-process -> (status, stderr as a terminal shows it: an erased progress bar is gone)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    lines = stderr.getvalue().splitlines(keepends=True)
    return status, "".join(line.rsplit("\r", 1)[-1] for line in lines)


def _assert_clean_outcome(status: int, stderr: str, directory: Path, before: set[Path]) -> None:
    assert status in (0, 2), (status, stderr)
    assert "Traceback" not in stderr
    if status == 2:
        assert stderr.startswith("softxent: error: "), stderr
        assert stderr.count("\n") == 1, stderr
        assert set(directory.rglob("*")) == before, "a failed command left files behind"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model on features a, b with target t, for predicting on fuzzed files."""
    root = tmp_path_factory.mktemp("fuzz-model")
    data = root / "train.csv"
    rng = np.random.default_rng(0)
    rows = [f"{rng.normal():.4f},{rng.normal():.4f},{i % 2}" for i in range(40)]
    data.write_text("a,b,t\n" + "\n".join(rows) + "\n")
    assert main(["train", str(data), "--target", "t", "--epochs", "1", "--out", str(root / "model")]) == 0
    return root / "model"


@CLI_SETTINGS
@given(file=st.one_of(table_files(), libsvm_files(), npz_files()))
def test_train_and_predict_on_malformed_files(file: tuple[str, bytes], model: Path) -> None:
    name, content = file
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / name).write_bytes(content)
        before = set(root.rglob("*"))
        target = ["--target", "t"] if name.startswith(("data.csv", "data.tsv")) else []
        out = root / "out"
        argv = [
            "train",
            str(root / name),
            *target,
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--test-size",
            "0.5",
        ]
        status, stderr = _cli([*argv, "--out", str(out)])
        _assert_clean_outcome(status, stderr, root, before)
        event(f"train exit status {status}")

        before = set(root.rglob("*"))
        status, stderr = _cli(
            ["predict", str(model), str(root / name), "--out", str(root / "predictions.csv")]
        )
        _assert_clean_outcome(status, stderr, root, before)
        event(f"predict exit status {status}")


@CLI_SETTINGS
@given(
    values=st.lists(st.tuples(FINITE, FINITE), min_size=8, max_size=30),
    options=st.lists(
        st.sampled_from(
            [
                ["--no-standardize"],
                ["--hidden", "3"],
                ["--lr", "1e6"],
                ["--early-stopping"],
                ["--solver", "sgd"],
            ]
        ),
        max_size=2,
    ),
)
def test_train_on_extreme_values(values: list[tuple[float, float]], options: list[list[str]]) -> None:
    """Well-formed tables of any finite values (1e308, subnormals, ±max) reach standardization and the
    fit, by L-BFGS (the linear model's default) or SGD (--solver sgd, --hidden, --early-stopping): training
    ends with a model, or with one line (a diverged fit, a split too small) and no model."""
    rows = [f"{a!r},{b!r},{i % 2}" for i, (a, b) in enumerate(values)]
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        data = root / "data.csv"
        data.write_text("a,b,t\n" + "\n".join(rows) + "\n")
        before = set(root.rglob("*"))
        argv = [
            "train",
            str(data),
            "--target",
            "t",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(root / "out"),
        ]
        status, stderr = _cli([*argv, *(option for pair in options for option in pair)])
        _assert_clean_outcome(status, stderr, root, before)
        event(f"train exit status {status}")
        if status == 0:
            assert (root / "out" / "model.safetensors").is_file()


def test_strategies_reach_past_the_parsers() -> None:
    """A guard on the fuzz itself: well-formed draws exist, so the checks after parsing are exercised."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "data.csv.gz"
        path.write_bytes(gzip.compress(b"a,t\n1,0\n2,1\n"))
        assert read_dataset(path, ["t"]).X.shape == (2, 1)
        archive = Path(directory) / "data.npz"
        np.savez(archive, X=np.ones((2, 2)), y=np.array([0, 1]))
        assert zipfile.is_zipfile(archive)
        assert read_dataset(archive, None).X.shape == (2, 2)
