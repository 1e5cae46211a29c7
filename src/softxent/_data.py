"""Data readers and file helpers for the ``softxent`` command line.

Every reader returns a :class:`Dataset`: a float64 feature matrix (dense, or CSR for LibSVM files), the
target if the file has it, and the feature names. Anything the command line cannot use raises
:class:`InputError`, whose message is the one line shown to the user: it names the file and, for a bad
value, the column and the row.

Formats, chosen by the file's extension:

- CSV (``.csv``) and TSV (``.tsv``, ``.tab``), optionally ``.gz`` or ``.bz2`` compressed: a header row; the
  target column(s) are named by the caller, every other column is a numeric feature.
- Parquet (``.parquet``, ``.pq``): the same, by column name.
- NPZ (``.npz``): array ``X`` (n, D) and a target array, ``y`` unless the caller names another; an
  optional string array ``feature_names``.
- LibSVM / SVMlight (``.svm``, ``.libsvm``, ``.svmlight``, optionally compressed): the label is the first
  field of each line; feature indices are used as written (``x0``, ``x1``, ...), so a 1-based file has an
  empty column ``x0``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
OTHER_FORMATS = {".npz": "npz", ".svm": "libsvm", ".libsvm": "libsvm", ".svmlight": "libsvm"}
COMPRESSIONS = (".gz", ".bz2")
# Formats that may be compressed (pandas and load_svmlight_file decompress these themselves).
COMPRESSIBLE = ("csv", "tsv", "libsvm")
DIGITS = "digits"
# How many names an error message lists before it says "..."
LISTED_NAMES = 8


class InputError(ValueError):
    """Input the command line cannot use; the message is the single line shown to the user."""


@dataclass
class Dataset:
    """Features and (if present) target read from one source.

    Attributes:
        X: ``(n_samples, n_features)`` float64, dense or scipy CSR.
        y: ``(n_samples,)`` class labels, ``(n_samples, n_labels)`` int64 0/1 indicators (multi-label),
            or None when the source has no target.
        feature_names: one name per column of X.
        targets: the names of the target columns (or NPZ arrays) y was read from; None for LibSVM.
        named: whether the names come from the source (columns of a table, ``feature_names`` in an NPZ)
            rather than being generic (``x0``, ``x1``, ...).
        source: the file path, or ``"digits"``, for messages.
    """

    X: np.ndarray | sp.csr_matrix
    y: np.ndarray | None
    feature_names: list[str]
    targets: list[str] | None
    named: bool
    source: str


def _listed(names: Sequence[object]) -> str:
    """A short comma-separated listing of names for an error message."""
    shown = ", ".join(repr(str(name)) for name in names[:LISTED_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > LISTED_NAMES else "")


def data_format(path: str | os.PathLike) -> str:
    """The format of ``path`` from its extension: "csv", "tsv", "parquet", "npz" or "libsvm".

    >>> data_format("train.csv.gz"), data_format("a.parquet"), data_format("b.svmlight")
    ('csv', 'parquet', 'libsvm')
    """
    suffixes = [s.lower() for s in Path(path).suffixes]
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSIONS
    if compressed:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    kind = TABLE_FORMATS.get(suffix) or OTHER_FORMATS.get(suffix)
    if kind is None or (compressed and kind not in COMPRESSIBLE):
        known = ", ".join([*TABLE_FORMATS, *OTHER_FORMATS])
        shown = "".join(Path(path).suffixes) or "no extension"
        raise InputError(
            f"{path}: unknown data format ({shown}); expected one of {known} "
            f"(CSV, TSV and LibSVM may end in .gz or .bz2)"
        )
    return kind


def load_digits_dataset() -> Dataset:
    """scikit-learn's bundled 8x8 digits: 1797 images, 64 pixel features (0-16), classes 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return Dataset(
        X=digits.data.astype(np.float64),
        y=digits.target,
        feature_names=list(digits.feature_names),
        targets=["target"],
        named=True,
        source=DIGITS,
    )


def read_dataset(
    path: str | os.PathLike,
    targets: Sequence[str] | None,
    *,
    multilabel: bool = False,
    require_targets: bool = True,
    feature_names: Sequence[str] | None = None,
) -> Dataset:
    """Read features and target from a data file.

    Args:
        path: the file; its extension picks the format (see the module docstring).
        targets: the target column (one name) or the label columns (``multilabel``); None for the
            format's default (NPZ: ``y``; LibSVM: the label field; CSV, TSV and Parquet have none).
        multilabel: read ``targets`` as binary 0/1 label columns into an ``(n, L)`` indicator matrix.
        require_targets: raise if a target is missing; otherwise targets present in the file are dropped
            from the features and y is None.
        feature_names: the features a model expects: a named source must have exactly these columns
            (besides the targets), taken in this order; any source must have this many.

    Returns:
        The :class:`Dataset`.

    Raises:
        InputError: the file is missing or unreadable, its format unknown, a target or feature column is
            missing or unexpected, a feature is non-numeric, NaN or infinite, or a label is not 0/1.
    """
    kind = data_format(path)
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: no such file" if not file.exists() else f"{path}: not a regular file")
    source = str(path)
    if kind == "libsvm":
        dataset = _read_libsvm(file, source, multilabel, feature_names)
    elif kind == "npz":
        dataset = _read_npz(file, source, targets, multilabel, require_targets, feature_names)
    else:
        frame = _read_frame(file, source, kind)
        locate = _row_locator(header_lines=None if kind == "parquet" else 1)
        dataset = _from_frame(frame, source, targets, multilabel, require_targets, feature_names, locate)
    if dataset.X.shape[0] == 0:
        raise InputError(f"{source}: no data rows")
    if dataset.X.shape[1] == 0:
        raise InputError(f"{source}: no feature columns")
    return dataset


def _row_locator(header_lines: int | None) -> Callable[[int], str]:
    """Describe the 0-based data row ``i`` as "row i+1" (and its line of a text file after the header)."""

    def locate(row: int) -> str:
        if header_lines is None:
            return f"row {row + 1}"
        return f"row {row + 1} (line {row + 1 + header_lines})"

    return locate


def _read_frame(file: Path, source: str, kind: str) -> pd.DataFrame:
    """A CSV, TSV or Parquet file as a DataFrame with string column names."""
    try:
        if kind == "parquet":
            frame = pd.read_parquet(file)
        else:
            frame = pd.read_csv(file, sep="\t" if kind == "tsv" else ",", low_memory=False)
    except pd.errors.EmptyDataError:
        raise InputError(f"{source}: empty file (expected a header row and data rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError, EOFError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{source}: cannot read as {kind.upper()}: {first_line}") from None
    frame.columns = [str(column) for column in frame.columns]
    duplicated = frame.columns[frame.columns.duplicated()].unique().tolist()
    if duplicated:
        raise InputError(f"{source}: duplicate column names {_listed(duplicated)}")
    return frame


def _from_frame(
    frame: pd.DataFrame,
    source: str,
    targets: Sequence[str] | None,
    multilabel: bool,
    require_targets: bool,
    feature_names: Sequence[str] | None,
    locate: Callable[[int], str],
) -> Dataset:
    """Split a table into numeric features and the target columns, checking every value."""
    targets = list(targets or [])
    if not targets and require_targets:
        raise InputError(
            f"{source}: name the target column with --target; columns are {_listed(frame.columns.tolist())}"
        )
    missing = [name for name in targets if name not in frame.columns]
    if missing and require_targets:
        what = "label column" if multilabel else "target column"
        raise InputError(
            f"{source}: no {what} {_listed(missing)}; columns are {_listed(frame.columns.tolist())}"
        )
    present = [name for name in targets if name in frame.columns]
    features = frame.drop(columns=present)
    if feature_names is not None:
        features = _align_columns(features, source, feature_names)
    X = np.empty(features.shape, dtype=np.float64)
    for index, column in enumerate(features.columns):
        X[:, index] = _numeric_column(features[column], source, f"feature column {column!r}", locate)
    _check_finite(X, source, features.columns.tolist(), locate)
    y = None
    if present and not missing:
        if multilabel:
            y = np.column_stack([_binary_column(frame[name], source, name, locate) for name in targets])
        else:
            y = _label_column(frame[targets[0]], source, targets[0], locate)
    return Dataset(X, y, features.columns.tolist(), targets, named=True, source=source)


def _align_columns(features: pd.DataFrame, source: str, expected: Sequence[str]) -> pd.DataFrame:
    """The expected feature columns in the expected order, or an InputError saying how the sets differ."""
    columns = features.columns.tolist()
    missing = [name for name in expected if name not in set(columns)]
    unexpected = [name for name in columns if name not in set(expected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listed(unexpected)}")
        raise InputError(
            f"{source}: its features differ from the model's ({'; '.join(parts)}); "
            f"the model was trained on {len(expected)} features"
        )
    return features[list(expected)]


def _numeric_column(column: pd.Series, source: str, what: str, locate: Callable[[int], str]) -> np.ndarray:
    """A column as float64; a value that is not a number raises naming the column and the row."""
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    numbers = pd.to_numeric(column, errors="coerce")
    bad = np.flatnonzero(numbers.isna().to_numpy() & column.notna().to_numpy())
    if bad.size:
        row = int(bad[0])
        raise InputError(f"{source}: {what} is not numeric: {column.iloc[row]!r} at {locate(row)}")
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan)


def _check_finite(X: np.ndarray, source: str, names: Sequence[str], locate: Callable[[int], str]) -> None:
    """Raise for the first NaN or infinite value of X in row order, naming its column and row."""
    bad = ~np.isfinite(X)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        col = int(np.flatnonzero(bad[row])[0])
        kind = "a missing value (NaN)" if np.isnan(X[row, col]) else f"an infinite value ({X[row, col]})"
        raise InputError(f"{source}: feature column {names[col]!r} has {kind} at {locate(row)}")


def _label_column(column: pd.Series, source: str, name: str, locate: Callable[[int], str]) -> np.ndarray:
    """Class labels of a target column; integral floats become ints (``1.0`` -> ``1``)."""
    missing = np.flatnonzero(column.isna().to_numpy())
    if missing.size:
        raise InputError(f"{source}: target column {name!r} has a missing value at {locate(int(missing[0]))}")
    return _integral(column.to_numpy())


def _integral(labels: np.ndarray) -> np.ndarray:
    """Float labels that are all whole numbers as int64 (LibSVM and NaN-free float columns)."""
    if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
        return labels.astype(np.int64)
    if labels.dtype.kind == "O":
        return labels.astype(str)
    return labels


def _binary_column(column: pd.Series, source: str, name: str, locate: Callable[[int], str]) -> np.ndarray:
    """A 0/1 label column as int64 (booleans count as 0/1)."""
    values = _numeric_column(column, source, f"label column {name!r}", locate)
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
        row = int(bad[0])
        raise InputError(
            f"{source}: label column {name!r} must hold 0 or 1, got {column.iloc[row]!r} at {locate(row)}"
        )
    return values.astype(np.int64)


def _read_npz(
    file: Path,
    source: str,
    targets: Sequence[str] | None,
    multilabel: bool,
    require_targets: bool,
    feature_names: Sequence[str] | None,
) -> Dataset:
    """An NPZ with ``X`` (n, D), target arrays (default ``y``) and optionally ``feature_names``."""
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{source}: cannot read as NPZ: {error}") from None
    if "X" not in arrays:
        raise InputError(f"{source}: no array 'X' (arrays are {_listed(sorted(arrays))})")
    X = arrays["X"]
    if X.ndim != 2 or X.dtype.kind not in "biuf":
        raise InputError(f"{source}: X must be a 2-D numeric array, got shape {X.shape} of {X.dtype}")
    X = X.astype(np.float64)
    names_array = arrays.get("feature_names")
    named = names_array is not None and names_array.shape == (X.shape[1],)
    names = [str(n) for n in names_array] if named else [f"x{i}" for i in range(X.shape[1])]
    locate = _row_locator(header_lines=None)
    if feature_names is not None:
        if named:
            frame = pd.DataFrame(X, columns=names)
            X = _align_columns(frame, source, feature_names).to_numpy()
        elif X.shape[1] != len(feature_names):
            raise InputError(
                f"{source}: X has {X.shape[1]} features, the model was trained on {len(feature_names)}"
            )
        names = list(feature_names)
    _check_finite(X, source, names, locate)
    wanted = list(targets) if targets else ["y"]
    missing = [name for name in wanted if name not in arrays]
    if missing:
        if require_targets:
            raise InputError(
                f"{source}: no target array {_listed(missing)} (arrays are {_listed(sorted(arrays))})"
            )
        return Dataset(X, None, names, wanted, named, source)
    columns = []
    for name in wanted:
        values = arrays[name]
        if values.shape != (X.shape[0],):
            raise InputError(
                f"{source}: target array {name!r} must have shape ({X.shape[0]},), got {values.shape}"
            )
        series = pd.Series(values)
        if multilabel:
            columns.append(_binary_column(series, source, name, locate))
        else:
            columns.append(_label_column(series, source, name, locate))
    y = np.column_stack(columns) if multilabel else columns[0]
    return Dataset(X, y, names, wanted, named, source)


def _read_libsvm(file: Path, source: str, multilabel: bool, feature_names: Sequence[str] | None) -> Dataset:
    """A LibSVM / SVMlight file as CSR features (indices as written) and its label field."""
    from sklearn.datasets import load_svmlight_file

    if multilabel:
        raise InputError(f"{source}: --multilabel needs a CSV, TSV, Parquet or NPZ file, not LibSVM")
    n_features = None if feature_names is None else len(feature_names)
    try:
        X, y = load_svmlight_file(str(file), n_features=n_features, dtype=np.float64, zero_based=True)
    except (ValueError, OSError, EOFError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if n_features is not None and "n_features" in message:
            raise InputError(
                f"{source}: has feature indices beyond the model's {n_features} features ({message})"
            ) from None
        raise InputError(f"{source}: cannot read as LibSVM: {message}") from None
    X = sp.csr_matrix(X)
    names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(X.shape[1])]
    bad = np.flatnonzero(~np.isfinite(X.data))
    if bad.size:
        row = int(np.searchsorted(X.indptr, bad[0], side="right") - 1)
        raise InputError(
            f"{source}: feature {names[X.indices[bad[0]]]!r} has a non-finite value "
            f"({X.data[bad[0]]}) at line {row + 1}"
        )
    return Dataset(X, _integral(y), names, None, named=False, source=source)


def fit_standardizer(X: np.ndarray | sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (mean, scale) of scikit-learn's StandardScaler; sparse X is scaled only (mean 0)."""
    from sklearn.preprocessing import StandardScaler

    sparse = sp.issparse(X)
    scaler = StandardScaler(with_mean=not sparse).fit(X)
    mean = np.zeros(X.shape[1]) if scaler.mean_ is None or sparse else scaler.mean_
    return np.asarray(mean, dtype=np.float64), np.asarray(scaler.scale_, dtype=np.float64)


def standardize(
    X: np.ndarray | sp.csr_matrix, mean: np.ndarray, scale: np.ndarray
) -> np.ndarray | sp.csr_matrix:
    """(X − mean) / scale; sparse X stays sparse when the mean is 0 (else it is made dense).

    >>> standardize(np.array([[1.0, 4.0], [3.0, 8.0]]), np.array([2.0, 6.0]), np.array([1.0, 2.0]))
    array([[-1., -1.],
           [ 1.,  1.]])
    """
    if sp.issparse(X):
        if not np.any(mean):
            return sp.csr_matrix(X @ sp.diags(1.0 / scale))
        X = X.toarray()
    return (X - mean) / scale


def fingerprint(*arrays: np.ndarray | sp.spmatrix) -> str:
    """A SHA-256 of the arrays' shapes, dtypes and contents (to tell whether a resume sees the same data)."""
    digest = hashlib.sha256()
    for array in arrays:
        parts = [array.data, array.indices, array.indptr] if sp.issparse(array) else [array]
        for part in parts:
            part = np.ascontiguousarray(part)
            if part.dtype.kind in "OU":
                part = np.asarray([str(v) for v in part.ravel()], dtype=object).astype(str)
            digest.update(f"{part.shape}{part.dtype}".encode())
            digest.update(part.tobytes())
    return digest.hexdigest()
