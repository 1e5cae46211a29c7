"""SoftmaxClassifier / SigmoidClassifier when things go wrong: divergence (an error on overflow, a warning on
a loss that climbed, the estimator left as it was), invalid class weights, a changed ``classes=`` in
partial_fit, model and checkpoint files whose tensors disagree with their metadata, and messages free of
NumPy reprs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.datasets import load_wine, make_blobs, make_multilabel_classification
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from softxent.estimators import (
    Checkpoint,
    DivergenceWarning,
    SigmoidClassifier,
    SoftmaxClassifier,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)

ESTIMATORS = [SoftmaxClassifier, SigmoidClassifier]
SCALING_ADVICE = (
    r"the features may need scaling \(e\.g\. sklearn\.preprocessing\.StandardScaler\) or a smaller eta0"
)


@pytest.fixture
def blobs(rng):
    """An odd-sized 5-class problem, 13 standardized features, drawn afresh each run."""
    seed = int(torch.randint(0, 1 << 31, (), generator=rng))
    X, y = make_blobs(n_samples=211, centers=5, n_features=13, cluster_std=3.0, random_state=seed)
    return StandardScaler().fit_transform(X), y


@pytest.fixture(scope="module")
def wine():
    return load_wine(return_X_y=True)


def _state(clf) -> dict:
    """The fitted state that a failed call must leave alone."""
    return {
        "coef_": clf.coef_.copy(),
        "intercept_": clf.intercept_.copy(),
        "n_iter_": clf.n_iter_,
        "t_": clf.t_,
        "loss_curve_": list(clf.loss_curve_),
        "momentum": {k: v.clone() for k, v in getattr(clf, "_momentum", {}).items()},
    }


def _assert_same_state(before: dict, after: dict) -> None:
    np.testing.assert_array_equal(after["coef_"], before["coef_"])
    np.testing.assert_array_equal(after["intercept_"], before["intercept_"])
    assert (after["n_iter_"], after["t_"], after["loss_curve_"]) == (
        before["n_iter_"],
        before["t_"],
        before["loss_curve_"],
    )
    assert after["momentum"].keys() == before["momentum"].keys()
    for name, buffer in before["momentum"].items():
        assert torch.equal(after["momentum"][name], buffer), name


# --- 1. divergence ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("estimator", "chance"),
    [(SoftmaxClassifier, r"1\.099"), (SigmoidClassifier, r"2\.079")],  # log 3; 3 sigmoids at 1/2: 3 log 2
)
def test_a_loss_that_climbed_warns_that_training_diverged(wine, estimator, chance):
    """Unscaled wine: the loss climbs from the first epoch's and the stopping rule ends the fit on a loss
    several times that; scikit-learn's checks need a model back, so a warning says so."""
    X, y = wine
    with pytest.warns(
        DivergenceWarning,  # a ConvergenceWarning, as scikit-learn filters expect
        match=r"training diverged: the loss of the last epoch \(\d+\) is [\d.e+]+, over 2 times the best "
        rf"epoch's [\d.e+]+ \(epoch \d+\) and 10 times {chance}, the loss of all-zero logits; "
        + SCALING_ADVICE,
    ):
        clf = estimator(solver="sgd", random_state=0).fit(X, y)
    assert np.isfinite(clf.coef_).all()
    assert clf.loss_curve_[-1] > 2 * min(clf.loss_curve_)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_scaled_features_do_not_warn(wine, estimator):
    X, y = wine
    X = StandardScaler().fit_transform(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = estimator(random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.95


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_overflow_raises_and_leaves_the_estimator_unfitted(wine, estimator):
    X, y = wine
    clf = estimator(solver="sgd", random_state=0)
    with pytest.raises(
        ValueError,
        match=rf"{estimator.__name__}: training diverged at epoch 1: the loss became (nan|inf); "
        + SCALING_ADVICE
        + r" \(now 0\.1\); the estimator is left as it was before this call",
    ):
        clf.fit(X * 1e200, y)
    with pytest.raises(NotFittedError):
        check_is_fitted(clf)
    assert not hasattr(clf, "loss_curve_")
    assert not hasattr(clf, "classes_")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_lbfgs_overflow_raises_and_leaves_the_estimator_unfitted(wine, estimator):
    X, y = wine
    clf = estimator(random_state=0)
    with pytest.raises(
        ValueError,
        match=rf"{estimator.__name__}: training diverged at iteration \d+: the loss became (nan|inf); the "
        r"features may need scaling \(e\.g\. sklearn\.preprocessing\.StandardScaler\); the estimator is "
        r"left as it was before this call",
    ):
        clf.fit(X * 1e200, y)
    assert not hasattr(clf, "coef_")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_weights_that_overflow_raise_though_the_loss_is_finite(blobs, estimator):
    """One batch, one step of η = 1e308: the loss (taken before the step) is finite, the weights are not."""
    X, y = blobs
    clf = estimator(solver="sgd", eta0=1e308, max_iter=1, alpha=0.0)
    with pytest.raises(
        ValueError,
        match=r"training diverged at epoch 1: the weights became inf or nan; "
        + SCALING_ADVICE
        + r" \(now 1e\+308\); the estimator is left as it was before this call",
    ):
        clf.fit(X[:100] * 100.0, y[:100])
    assert not hasattr(clf, "coef_")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_failed_refit_keeps_the_previous_fit(blobs, estimator):
    X, y = blobs
    clf = estimator(random_state=0, max_iter=3, hidden_layer_sizes=(6,), warm_start=True).fit(X, y)
    before = _state(clf)
    predicted = clf.predict_proba(X)
    with pytest.raises(ValueError, match="training diverged at epoch 1: the loss became"):
        clf.fit(X * 1e200, y)  # a warm start: training updates the fitted tensors in place
    _assert_same_state(before, _state(clf))
    np.testing.assert_array_equal(clf.predict_proba(X), predicted)


def test_a_callback_exception_rolls_back_but_an_interrupt_keeps_the_last_epoch(blobs):
    X, y = blobs

    def stop_at_two(exception):
        def callback(est, info):
            if info["epoch"] == 2:
                raise exception

        return callback

    clf = SoftmaxClassifier(random_state=0)
    with pytest.raises(RuntimeError, match="stop"):
        clf.fit(X, y, callback=stop_at_two(RuntimeError("stop")))
    assert not hasattr(clf, "coef_")
    with pytest.raises(KeyboardInterrupt):
        clf.fit(X, y, callback=stop_at_two(KeyboardInterrupt()))
    assert clf.n_iter_ == 2
    assert len(clf.loss_curve_) == 2


def _interrupt_at(monkeypatch, estimator, call: int) -> None:
    """Make the ``call``-th batch gradient (1-based) of ``estimator`` raise KeyboardInterrupt (Ctrl-C)."""
    original = estimator._batch_gradient
    count = 0

    def interrupted(self, *args):
        nonlocal count
        count += 1
        if count == call:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(estimator, "_batch_gradient", interrupted)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_an_interrupt_mid_epoch_rewinds_to_the_last_epoch_and_a_resume_ends_as_uninterrupted(
    blobs, monkeypatch, estimator
):
    """Ctrl-C in the middle of epoch 3: the weights, the momentum and t_ go back to the end of epoch 2
    (what coef_ and n_iter_ say), so checkpoint() then resume ends on the uninterrupted fit's weights."""
    X, y = blobs
    params = dict(solver="sgd", batch_size=16, max_iter=4, tol=None, random_state=0, hidden_layer_sizes=(7,))
    steps = -(-len(y) // 16)
    uninterrupted = estimator(**params).fit(X, y)
    clf = estimator(**params)
    _interrupt_at(monkeypatch, estimator, 2 * steps + 5)
    with pytest.raises(KeyboardInterrupt):
        clf.fit(X, y)
    monkeypatch.undo()
    assert (clf.n_iter_, clf.t_, len(clf.loss_curve_)) == (2, 2 * steps, 2)
    checkpoint = clf.checkpoint()
    np.testing.assert_array_equal(checkpoint.tensors["param/head.weight"].numpy(), clf.coef_)
    resumed = estimator(**params).fit(X, y, resume=checkpoint)
    np.testing.assert_array_equal(resumed.coef_, uninterrupted.coef_)
    np.testing.assert_array_equal(resumed.hidden_coefs_[0], uninterrupted.hidden_coefs_[0])
    assert resumed.t_ == uninterrupted.t_


def test_an_interrupted_lbfgs_fit_keeps_its_last_iterate(blobs, monkeypatch):
    """Ctrl-C during an L-BFGS line search: the parameters a later partial_fit would continue are the last
    iterate's, which coef_ holds, not the trial point being evaluated."""
    X, y = blobs
    clf = SoftmaxClassifier(solver="lbfgs", random_state=0)
    _interrupt_at(monkeypatch, SoftmaxClassifier, 6)
    with pytest.raises(KeyboardInterrupt):
        clf.fit(X, y)
    assert clf.n_iter_ >= 1
    np.testing.assert_array_equal(clf._params["head.weight"].detach().numpy(), clf.coef_)
    np.testing.assert_array_equal(clf._params["head.bias"].detach().numpy(), clf.intercept_)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_partial_fit_overflow_raises_and_changes_nothing(blobs, estimator):
    """A failed partial_fit call leaves weights, momentum, step counter and loss curve as they were: the
    stream continues exactly as if the call had not been made."""
    X, y = blobs
    params = dict(random_state=0, hidden_layer_sizes=(7,), learning_rate="constant", batch_size=32)
    classes = np.arange(5)
    clean = estimator(**params).partial_fit(X[:100], y[:100], classes=classes)
    clean.partial_fit(X[100:], y[100:])
    clf = estimator(**params).partial_fit(X[:100], y[:100], classes=classes)
    before = _state(clf)
    with pytest.raises(ValueError, match=r"training diverged at epoch 2: the loss became (nan|inf); "):
        clf.partial_fit(X[100:] * 1e200, y[100:])
    _assert_same_state(before, _state(clf))
    clf.partial_fit(X[100:], y[100:])
    np.testing.assert_array_equal(clf.coef_, clean.coef_)
    np.testing.assert_array_equal(clf.hidden_coefs_[0], clean.hidden_coefs_[0])
    assert clf.loss_curve_ == clean.loss_curve_


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_partial_fit_warns_when_a_call_ends_far_above_the_best(wine, estimator):
    """Two calls on standardized wine, then one on the raw features: that call's loss is far above."""
    X, y = wine
    scaled = StandardScaler().fit_transform(X)
    clf = estimator(random_state=0).partial_fit(scaled, y, classes=np.unique(y))
    clf.partial_fit(scaled, y)
    with pytest.warns(
        DivergenceWarning, match=r"training diverged: the loss of the last epoch \(3\) is .* \(epoch 2\)"
    ):
        clf.partial_fit(X, y)
    assert np.isfinite(clf.coef_).all()


# --- 2. class weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["fit", "partial_fit"])
@pytest.mark.parametrize(
    ("class_weight", "error", "match"),
    [
        (
            {0: -1},
            ValueError,
            r"class_weight: expected a finite weight >= 0 for each class, got -1 for class 0",
        ),
        ({0: np.nan}, ValueError, r"class_weight: expected a finite weight >= 0 for each class, got nan"),
        ({3: np.inf}, ValueError, r"class_weight: expected a finite weight >= 0 .*, got inf for class 3"),
        ({0: "2"}, TypeError, r"class_weight: expected a number >= 0 for each class, got '2' for class 0"),
        ({0: True}, TypeError, r"class_weight: expected a number >= 0 for each class, got True"),
        ({9: 1.0}, ValueError, r"class_weight: label 9 is not in classes \[0, 1, 2, 3, 4\]"),
        (
            np.array([1.0, 2.0]),
            ValueError,
            r"class_weight: expected None, 'balanced' or a dict .*got \[1\.0, ",
        ),
        (
            "even",
            ValueError,
            r"class_weight: expected None, 'balanced' or a dict \{class: weight\}, got 'even'",
        ),
    ],
)
def test_invalid_class_weight_raises_with_the_name(blobs, call, class_weight, error, match):
    X, y = blobs
    clf = SoftmaxClassifier(class_weight=class_weight)
    kwargs = {"classes": np.arange(5)} if call == "partial_fit" else {}
    with pytest.raises(error, match=match):
        getattr(clf, call)(X, y, **kwargs)
    assert not hasattr(clf, "coef_")


def test_a_zero_class_weight_drops_the_class_rows(blobs):
    """Weight 0 for a class (NumPy keys and values too) gives the fit of sample weights 0 on its rows."""
    X, y = blobs
    params = dict(random_state=0, max_iter=3)
    weighted = SoftmaxClassifier(class_weight={np.int64(2): 0.0, 4: np.float64(1.5)}, **params).fit(X, y)
    rows = np.select([y == 2, y == 4], [0.0, 1.5], 1.0)
    dropped = SoftmaxClassifier(**params).fit(X, y, sample_weight=rows)
    np.testing.assert_allclose(weighted.coef_, dropped.coef_, rtol=1e-9, atol=1e-12)


# --- 3. classes in later partial_fit calls --------------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_partial_fit_rejects_changed_classes(blobs, estimator, tmp_path):
    X, y = blobs
    clf = estimator(random_state=0).partial_fit(X, y, classes=np.arange(5))
    before = _state(clf)
    with pytest.raises(
        ValueError,
        match=r"classes: \[0, 1, 2\] is not the same as on the last call to partial_fit, "
        r"was: \[0, 1, 2, 3, 4\]",
    ):
        clf.partial_fit(X[y < 3], y[y < 3], classes=np.arange(3))
    with pytest.raises(ValueError, match=r"classes: \[0, 1, 2, 3, 4, 5\] is not the same"):
        clf.partial_fit(X, y, classes=np.arange(6))
    _assert_same_state(before, _state(clf))
    clf.partial_fit(X, y, classes=[4, 3, 2, 1, 0, 0])  # the same set, in any order
    assert clf.n_iter_ == 2
    save_model(clf, tmp_path / "model.safetensors")
    loaded, _ = load_model(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"classes: \['a', 'b'\] is not the same as on the last call"):
        loaded.partial_fit(X, y, classes=np.array(["a", "b"]))


# --- 4. model and checkpoint files whose tensors disagree with their metadata ----------------------------


def _tamper(path: Path, change) -> None:
    """Re-save a safetensors file after ``change(tensors, header)`` edits its tensors or softxent header."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    header = json.loads(metadata["softxent"])
    change(tensors, header)
    save_file(tensors, str(path), metadata={**metadata, "softxent": json.dumps(header)})


def _set(name: str, value):
    return lambda tensors, header: tensors.__setitem__(name, value(tensors[name]))


def _drop(name: str):
    return lambda tensors, header: tensors.pop(name)


def _set_nan(name: str):
    def change(tensors, header):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[1] = float("nan")

    return change


def _set_header(section: str, key: str, value):
    return lambda tensors, header: header[section].__setitem__(key, value)


def _add_tensor(tensors, header):
    tensors["extra"] = torch.zeros(2, dtype=torch.float64)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A network fitted on 13 features and 5 classes: hidden.0 (6, 13), head (5, 6)."""
    X, y = make_blobs(n_samples=150, centers=5, n_features=13, random_state=0)
    clf = SoftmaxClassifier(random_state=0, hidden_layer_sizes=(6,), max_iter=2).fit(X, y)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(clf, path)
    return path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            _set("head.weight", lambda t: t.T.contiguous()),
            r"tensor 'head.weight': expected shape \(5, 6\), got \(6, 5\)",
        ),
        (
            _set("head.bias", lambda t: t[:4].clone()),
            r"tensor 'head.bias': expected shape \(5,\), got \(4,\)",
        ),
        (_set_nan("hidden.0.weight"), r"tensor 'hidden.0.weight': expected finite values, got 1 inf or nan"),
        (
            _set("head.bias", lambda t: t.float()),
            r"tensor 'head.bias': expected dtype torch.float64 \(as 'hidden.0.weight'\), got torch.float32",
        ),
        (
            _set("head.bias", lambda t: t.half()),
            r"tensor 'head.bias': expected dtype torch.float32 or torch.float64, got torch.float16",
        ),
        (_drop("hidden.0.bias"), r"tensor 'hidden.0.bias': expected one of shape \(6,\), got none"),
        (_add_tensor, r"tensor 'extra': expected only the tensors \['hidden.0.weight', 'hidden.0.bias', "),
        (
            _set_header("fitted", "n_features_in", 12),
            r"tensor 'hidden.0.weight': expected shape \(6, 12\), got \(6, 13\)",
        ),
        (
            _set_header("fitted", "classes", [0, 1, 2]),
            r"tensor 'head.weight': expected shape \(3, 6\), got \(5, 6\)",
        ),
        (
            _set_header("params", "hidden_layer_sizes", [6, 6]),
            r"tensor 'hidden.1.weight': expected one of shape \(6, 6\), got none",
        ),
    ],
)
def test_tampered_model_file_raises_naming_the_file_and_tensor(saved_model, tmp_path, change, match):
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(saved_model.read_bytes())
    _tamper(path, change)
    with pytest.raises(
        ValueError, match=rf"tampered\.safetensors: not a valid softxent model file \({match}"
    ):
        load_model(path)


def test_model_file_with_feature_names_of_another_count(saved_model, tmp_path):
    path = tmp_path / "names.safetensors"
    path.write_bytes(saved_model.read_bytes())
    _tamper(path, _set_header("fitted", "feature_names_in", ["a"]))
    with pytest.raises(ValueError, match=r"feature_names_in: expected 13 names \(one per feature\), got 1"):
        load_model(path)


def test_sigmoid_model_files_load_for_every_target_kind(tmp_path):
    """The head has one row for a binary target and one per label otherwise (two labels included)."""
    X, Y = make_multilabel_classification(n_samples=80, n_features=6, n_classes=2, random_state=0)
    for name, target, rows in [("binary", Y[:, 0], 1), ("labels", Y, 2)]:
        clf = SigmoidClassifier(random_state=0, max_iter=2, hidden_layer_sizes=4).fit(X, target)
        save_model(clf, tmp_path / f"{name}.safetensors")
        loaded, _ = load_model(tmp_path / f"{name}.safetensors")
        assert loaded.coef_.shape == (rows, 4)
        np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))
        save_checkpoint(clf.checkpoint(), tmp_path / f"{name}.ckpt")
        checkpoint, _ = load_checkpoint(tmp_path / f"{name}.ckpt")
        assert checkpoint.tensors["param/head.weight"].shape == (rows, 4)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a network with early stopping (param/, momentum/ and best/ tensors): hidden.0
    (6, 13), head (5, 6)."""
    X, y = make_blobs(n_samples=150, centers=5, n_features=13, random_state=0)
    clf = SoftmaxClassifier(random_state=0, hidden_layer_sizes=(6,), max_iter=2, early_stopping=True)
    clf.fit(X, y)
    path = tmp_path_factory.mktemp("checkpoint") / "ckpt.safetensors"
    save_checkpoint(clf.checkpoint(), path)
    return path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            _set("momentum/head.weight", lambda t: t[:, :3].clone()),
            r"tensor 'momentum/head.weight': expected shape \(5, 6\), got \(5, 3\)",
        ),
        (
            _set("param/hidden.0.weight", lambda t: t.reshape(13, 6).clone()),
            r"tensor 'param/hidden.0.weight': expected shape \(6, 13\), got \(13, 6\)",
        ),
        (_drop("momentum/head.bias"), r"tensor 'momentum/head.bias': expected one of shape \(5,\), got none"),
        (_set_nan("best/head.bias"), r"tensor 'best/head.bias': expected finite values, got 1 inf or nan"),
        (
            _set("param/head.weight", lambda t: t * float("inf")),
            r"tensor 'param/head.weight': expected finite values, got 30 inf or nan",
        ),
        (
            _set_header("checkpoint", "n_features", 12),
            r"tensor 'param/hidden.0.weight': expected shape \(6, 12\), got \(6, 13\)",
        ),
        (
            _set_header("checkpoint", "estimator", "Other"),
            r"estimator: expected one of \['SigmoidClassifier', 'SoftmaxClassifier'\], got 'Other'",
        ),
    ],
)
def test_tampered_checkpoint_file_raises_naming_the_file_and_tensor(
    saved_checkpoint, tmp_path, change, match
):
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(saved_checkpoint.read_bytes())
    _tamper(path, change)
    with pytest.raises(
        ValueError, match=rf"tampered\.safetensors: not a valid softxent checkpoint file \({match}"
    ):
        load_checkpoint(path)


def test_resume_checks_the_checkpoint_tensors(saved_checkpoint):
    """An in-memory Checkpoint does not pass load_checkpoint's checks: resuming makes its own, before any
    tensor reaches the optimizer, and leaves the estimator unfitted."""
    X, y = make_blobs(n_samples=150, centers=5, n_features=13, random_state=0)
    checkpoint, _ = load_checkpoint(saved_checkpoint)
    params = dict(random_state=0, hidden_layer_sizes=(6,), max_iter=2, early_stopping=True)
    SoftmaxClassifier(**params).fit(X, y, resume=checkpoint)  # the untouched checkpoint resumes
    shrunk = checkpoint.tensors["momentum/head.weight"][:, :3]
    cases = [
        ("momentum/head.weight", shrunk, r"expected shape \(5, 6\), got \(5, 3\)"),
        (
            "param/head.bias",
            torch.full((5,), float("nan"), dtype=torch.float64),
            r"expected finite values, got 5",
        ),
    ]
    for name, tensor, match in cases:
        tampered = Checkpoint({**checkpoint.tensors, name: tensor}, checkpoint.info)
        clf = SoftmaxClassifier(**params)
        with pytest.raises(ValueError, match=rf"resume: tensor '{name}': {match}"):
            clf.fit(X, y, resume=tampered)
        assert not hasattr(clf, "coef_")


def test_an_int_hidden_layer_sizes_survives_the_model_file(blobs, tmp_path):
    X, y = blobs
    clf = SoftmaxClassifier(random_state=0, hidden_layer_sizes=5, max_iter=2).fit(X, y)
    save_model(clf, tmp_path / "m.safetensors")
    loaded, _ = load_model(tmp_path / "m.safetensors")
    assert loaded.hidden_layer_sizes == 5
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


# --- 5. messages show plain Python values, not NumPy reprs -----------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (dict(alpha=np.float64(-1.0)), r"alpha: expected a number >= 0.0, got -1.0$"),
        (dict(max_iter=np.int64(0)), r"max_iter: expected an int >= 1, got 0$"),
        (dict(hidden_layer_sizes=(np.int64(4), np.int64(0))), r"positive ints .*got \(4, 0\)$"),
        (dict(learning_rate=np.str_("optimal")), r"learning_rate: expected one of .*, got 'optimal'$"),
        (dict(class_weight={np.int64(9): 1.0}), r"class_weight: label 9 is not in classes"),
        (dict(class_weight={np.int64(1): np.float64(-2.0)}), r"got -2.0 for class 1$"),
        (dict(device=np.str_("tpu")), r"device: expected .*, got 'tpu'$"),
    ],
)
def test_messages_show_plain_values(blobs, params, match):
    X, y = blobs
    with pytest.raises(ValueError, match=match) as error:
        SoftmaxClassifier(**params).fit(X, y)
    assert "np." not in str(error.value)


def test_one_class_message_shows_a_plain_label(blobs):
    X, _ = blobs
    with pytest.raises(ValueError, match=r"got 1 class \(3\)$") as error:
        SoftmaxClassifier().fit(X, np.full(len(X), np.int64(3)))
    assert "np." not in str(error.value)


def test_partial_fit_refuses_a_changed_architecture(blobs):
    """set_params between partial_fit calls must not leave the new hidden_layer_sizes unused."""
    X, y = blobs
    clf = SoftmaxClassifier(hidden_layer_sizes=(4,)).partial_fit(X, y, classes=np.arange(5))
    before = _state(clf)
    with pytest.raises(ValueError, match=r"hidden_layer_sizes: .* hidden layers \(4,\), got \(7, 3\)"):
        clf.set_params(hidden_layer_sizes=(7, 3)).partial_fit(X, y)
    _assert_same_state(before, _state(clf))
    clf.set_params(hidden_layer_sizes=(4,)).partial_fit(X, y)
