"""Data readers and file helpers for the ``softxent`` command line.

Every reader returns a :class:`Dataset`: a float64 feature matrix (dense, or CSR for LibSVM files), the
target if the file has it, and the feature names. Anything the command line cannot use raises
:class:`InputError`, whose message is the one line shown to the user: it names the file and, for a bad
value, the column and the row.

Formats, chosen by the file's extension:

- CSV (``.csv``) and TSV (``.tsv``, ``.tab``), optionally ``.gz`` or ``.bz2`` compressed: a header row of
  distinct names; the target column(s) are named by the caller, every other column is a numeric feature
  (numbers or booleans; a date, time or categorical column is refused, not converted).
- Parquet (``.parquet``, ``.pq``): the same, by column name.
- NPZ (``.npz``): array ``X`` (n, D) and a target array, ``y`` unless the caller names another; an
  optional array ``feature_names`` of D distinct names.
- LibSVM / SVMlight (``.svm``, ``.libsvm``, ``.svmlight``, optionally compressed): the label is the first
  field of each line; feature indices are used as written (``x0``, ``x1``, ...), so a 1-based file has an
  empty column ``x0``.

Every format has at most :data:`MAX_FEATURES` feature columns: the model's weights and every minibatch are
dense in the features, so one LibSVM line with a huge index would otherwise cost gigabytes per row.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
import zlib
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
# The most feature columns a data set may have: 2^20, scikit-learn's HashingVectorizer default. A row of
# that many float64 features, and each class's weights, take 8 MB; the model file's JSON header (feature
# names and scaler, 100 MB at most in safetensors) takes about 50 MB.
MAX_FEATURES = 2**20


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


def _plain(value: object) -> object:
    """A NumPy scalar as the Python value it holds, so that messages show ``2``, not ``np.int64(2)``.

    >>> repr(_plain(np.int64(2))), repr(_plain(np.str_("a"))), repr(_plain("b"))
    ('2', "'a'", "'b'")
    """
    return value.item() if isinstance(value, np.generic) else value


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_width(source: str, n_features: int, libsvm: bool = False) -> None:
    """Raise for more than MAX_FEATURES feature columns, saying what the width would cost.

    >>> _check_width("a.svm", 10**7 + 1, libsvm=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    softxent._data.InputError: a.svm: its largest feature index, 10000000, makes 10000001 feature columns, ...
    """
    if n_features <= MAX_FEATURES:
        return
    width = (
        f"its largest feature index, {n_features - 1}, makes {n_features} feature columns"
        if libsvm
        else f"{n_features} feature columns"
    )
    raise InputError(
        f"{source}: {width}, more than the {MAX_FEATURES} (2^20) softxent supports: each dense row and each "
        f"class's weights would take {_size(8 * n_features)} (float64); renumber the features or hash "
        "them into fewer columns"
    )


def _size(n_bytes: int) -> str:
    """A byte count for a message.

    >>> _size(80_000_008), _size(8_000_000_008)
    ('80.0 MB', '8.0 GB')
    """
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def _duplicates(names: Sequence[str]) -> list[str]:
    """The names that occur more than once, in order of first occurrence.

    >>> _duplicates(["a", "b", "a", "c", "b", "a"])
    ['a', 'b']
    """
    seen: set[str] = set()
    repeated: dict[str, None] = {}
    for name in names:
        if name in seen:
            repeated[name] = None
        seen.add(name)
    return list(repeated)


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
    """A CSV, TSV or Parquet file as a DataFrame with distinct string column names."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, zlib.error)
    try:
        if kind == "parquet":
            try:
                import pyarrow
            except ImportError:
                raise InputError(
                    f"{source}: reading Parquet needs pyarrow: pip install 'softxent[train]'"
                ) from None
            errors = (*errors, pyarrow.ArrowException)
            frame = pd.read_parquet(file, engine="pyarrow")
            names = [str(column) for column in frame.columns]
        else:
            sep = "\t" if kind == "tsv" else ","
            with warnings.catch_warnings():
                # index_col=False: rows longer than the header are not taken as a row index (which would
                # shift every column); pandas then warns that it drops their surplus fields.
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(file, sep=sep, low_memory=False, index_col=False)
            # pandas renames a repeated header name ("a", "a" -> "a", "a.1"): read the header as written
            header = pd.read_csv(file, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False)
            names = header.iloc[0].tolist()
    except pd.errors.EmptyDataError:
        raise InputError(f"{source}: empty file (expected a header row and data rows)") from None
    except pd.errors.ParserWarning:
        raise InputError(
            f"{source}: the data rows have more fields than the names of the header (line 1); every row "
            "needs one value per column"
        ) from None
    except errors as error:
        detail = first_line(error)
        if isinstance(error, zlib.error):
            detail = f"corrupt compressed data ({detail})"
        raise InputError(f"{source}: cannot read as {kind.upper()}: {detail}") from None
    duplicated = _duplicates(names)
    if duplicated:
        raise InputError(f"{source}: duplicate column names {_listed(duplicated)}; column names must differ")
    frame.columns = [str(column) for column in frame.columns]
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
    _check_width(source, features.shape[1])
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
    if columns == list(expected):
        return features
    repeated = _duplicates(list(expected))
    if repeated:
        raise InputError(
            f"{source}: the model's feature names repeat {_listed(repeated)}, so its features can be matched "
            "only in the model's order; give the columns exactly the model's names in its order"
        )
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
    """A column as float64; a value that is not a number raises naming the column and the row.

    Numbers and booleans are taken as they are and text is parsed as numbers; a column of another type
    (dates, times, durations, categories, complex numbers) is refused rather than converted, since its
    numeric encoding (nanoseconds since 1970, category codes) is seldom the feature meant.
    """
    dtype = column.dtype
    types = pd.api.types
    if types.is_bool_dtype(dtype) or (types.is_numeric_dtype(dtype) and not types.is_complex_dtype(dtype)):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    if not (types.is_object_dtype(dtype) or isinstance(dtype, pd.StringDtype)):
        raise InputError(
            f"{source}: {what} holds {dtype} values, not numbers; convert it to numbers in the file "
            "(a date to, say, a Unix time or a day of the week; categories to one 0/1 column each) or drop it"
        )
    numbers = pd.to_numeric(column, errors="coerce")
    bad = np.flatnonzero(numbers.isna().to_numpy() & column.notna().to_numpy())
    if bad.size:
        row = int(bad[0])
        raise InputError(f"{source}: {what} is not numeric: {_plain(column.iloc[row])!r} at {locate(row)}")
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
    labels = column.to_numpy()
    if labels.dtype.kind in "fc":
        infinite = np.flatnonzero(~np.isfinite(labels))
        if infinite.size:
            row = int(infinite[0])
            raise InputError(
                f"{source}: target column {name!r} has an infinite value ({labels[row]}) at {locate(row)}"
            )
    return _integral(labels)


def _integral(labels: np.ndarray) -> np.ndarray:
    """Float labels that are all whole numbers (of at most 2^53, exact in float64) as int64 (LibSVM and
    NaN-free float columns).

    >>> _integral(np.array([1.0, 2.0])), _integral(np.array([1.0, 1e300]))
    (array([1, 2]), array([1.e+000, 1.e+300]))
    """
    if labels.dtype.kind == "f" and np.all(np.abs(labels) <= 2.0**53) and np.all(np.mod(labels, 1) == 0):
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
            f"{source}: label column {name!r} must hold 0 or 1, got {_plain(column.iloc[row])!r} at "
            f"{locate(row)}"
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
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        detail = first_line(error)
        if "allow_pickle" in detail:
            detail = (
                "it holds an array of Python objects, not loaded (unpickling can run code); save text "
                "as a string array, e.g. array.astype(str)"
            )
        raise InputError(f"{source}: cannot read as NPZ: {detail}") from None
    if "X" not in arrays:
        raise InputError(f"{source}: no array 'X' (arrays are {_listed(sorted(arrays))})")
    X = arrays["X"]
    if X.ndim != 2 or X.dtype.kind not in "biuf":
        raise InputError(f"{source}: X must be a 2-D numeric array, got shape {X.shape} of {X.dtype}")
    _check_width(source, X.shape[1])
    X = X.astype(np.float64)
    names = _npz_feature_names(arrays.get("feature_names"), X.shape[1], source, checked=feature_names)
    named = names is not None
    names = names if named else [f"x{i}" for i in range(X.shape[1])]
    locate = _row_locator(header_lines=None)
    if feature_names is not None:
        if named:
            if names != list(feature_names):
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
        if values.dtype.kind == "S":  # bytes: labels as text, as the feature names are read
            values = np.array([value.decode("utf-8", "replace") for value in values.tolist()])
        if values.dtype.kind not in "biufU":
            raise InputError(
                f"{source}: target array {name!r} must hold numbers or strings, got {values.dtype} values"
            )
        series = pd.Series(values)
        if multilabel:
            columns.append(_binary_column(series, source, name, locate))
        else:
            columns.append(_label_column(series, source, name, locate))
    y = np.column_stack(columns) if multilabel else columns[0]
    return Dataset(X, y, names, wanted, named, source)


def _npz_feature_names(
    names_array: np.ndarray | None, n_features: int, source: str, checked: Sequence[str] | None
) -> list[str] | None:
    """The NPZ's ``feature_names`` as strings (None without the array): one per column of X, distinct.

    Repeated names are refused for training (``checked`` None); for a model's features (``checked``) they
    pass when they are exactly the model's names in its order, the one match that needs no names.
    """
    if names_array is None:
        return None
    if names_array.shape != (n_features,):
        raise InputError(
            f"{source}: feature_names has shape {names_array.shape}, expected ({n_features},): one name "
            "per column of X"
        )
    names = [
        name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        for name in names_array.tolist()
    ]
    repeated = _duplicates(names)
    if repeated and (checked is None or names != list(checked)):
        raise InputError(f"{source}: feature_names repeats {_listed(repeated)}; feature names must differ")
    return names


def _read_libsvm(file: Path, source: str, multilabel: bool, feature_names: Sequence[str] | None) -> Dataset:
    """A LibSVM / SVMlight file as CSR features (indices as written) and its label field."""
    from sklearn.datasets import load_svmlight_file

    if multilabel:
        raise InputError(f"{source}: --multilabel needs a CSV, TSV, Parquet or NPZ file, not LibSVM")
    n_features = None if feature_names is None else len(feature_names)
    try:
        X, y = load_svmlight_file(str(file), n_features=n_features, dtype=np.float64, zero_based=True)
    except (ValueError, OSError, EOFError, OverflowError, zlib.error) as error:
        message = first_line(error)
        if n_features is not None and "n_features" in message:
            raise InputError(
                f"{source}: has feature indices beyond the model's {n_features} features ({message})"
            ) from None
        if isinstance(error, zlib.error):
            message = f"corrupt compressed data ({message})"
        raise InputError(f"{source}: cannot read as LibSVM: {message}") from None
    _check_width(source, X.shape[1], libsvm=True)
    X = sp.csr_matrix(X)
    names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(X.shape[1])]
    bad = np.flatnonzero(~np.isfinite(X.data))
    if bad.size:
        row = int(np.searchsorted(X.indptr, bad[0], side="right") - 1)
        raise InputError(
            f"{source}: feature {names[X.indices[bad[0]]]!r} has a non-finite value "
            f"({X.data[bad[0]]}) at line {row + 1}"
        )
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise InputError(
            f"{source}: the label at line {int(bad[0]) + 1} is not a finite number ({y[bad[0]]})"
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
