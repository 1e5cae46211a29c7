"""softxent is drop-in for torch: torch's own OpInfo and ModuleInfo databases (the samples torch tests its
losses with) give the same values and gradients through softxent, and what torch refuses softxent refuses
with its own ValueError / TypeError. Plus the conventions those samples do not reach (numpy integers,
the deprecated reduction spelling, negative and infinite weights).

The databases live in torch.testing._internal, which needs ``expecttest`` (the dev extra installs it)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softxent
from helpers import eager_linear_cross_entropy

pytest.importorskip("expecttest", reason="torch's OpInfo and ModuleInfo databases import expecttest")

from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

OURS = {
    "nn.functional.cross_entropy": softxent.cross_entropy,
    "nn.functional.linear_cross_entropy": softxent.linear_cross_entropy,
    "nn.functional.binary_cross_entropy_with_logits": softxent.binary_cross_entropy_with_logits,
}
OPS = [op for op in op_db if op.name in OURS]
OP_IDS = [f"{op.name.rsplit('.', 1)[-1]}-{op.variant_test_name or 'default'}" for op in OPS]
MODULES = {
    "nn.CrossEntropyLoss": softxent.nn.CrossEntropyLoss,
    "nn.LinearCrossEntropyLoss": softxent.nn.LinearCrossEntropyLoss,
    "nn.BCEWithLogitsLoss": softxent.nn.BCEWithLogitsLoss,
}
MODULE_INFOS = [info for info in module_db if info.name in MODULES]
# (value and gradient tolerance) by dtype: float64 is exact up to summation order; float32 carries the
# rounding of two float32 computations of the same loss
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-5}


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a sample's input, args or kwargs (nested in lists and tuples too)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _outcome(call):
    """(result, None) or (None, the exception) of ``call()``, warnings silenced (torch's deprecations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return call(), None
        except Exception as error:  # torch's refusals are RuntimeError, ValueError, IndexError, ...
            return None, error


def _assert_same(ours, theirs, differentiable, dtype, what):
    """Values equal (nan where torch's are nan) and every gradient of Σ u·loss equal, u fixed per call."""
    tol = TOLERANCES[dtype]
    theirs_value = theirs.detach().to(ours.dtype)
    torch.testing.assert_close(ours.detach(), theirs_value, rtol=tol, atol=tol, equal_nan=True, msg=what)
    if not differentiable or not theirs.requires_grad:
        return
    upstream = torch.linspace(0.5, 1.5, max(theirs.numel(), 1), dtype=torch.float64).reshape(theirs.shape)
    mine = torch.autograd.grad((ours * upstream.to(ours.dtype)).sum(), differentiable, allow_unused=True)
    expected = torch.autograd.grad(
        (theirs * upstream.to(theirs.dtype)).sum(), differentiable, allow_unused=True
    )
    for index, (a, b) in enumerate(zip(mine, expected, strict=True)):
        if b is None:
            assert a is None or not a.any(), f"{what}: gradient {index} where torch has none"
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=f"{what}: gradient {index}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_opinfo_samples_give_torchs_values_gradients_and_refusals(op, dtype, impl):
    ours_fn = OURS[op.name]
    agreements = 0
    for index, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
        what = f"{op.name} sample {index}: {sample.summary() if hasattr(sample, 'summary') else sample}"
        theirs, their_error = _outcome(lambda s=sample: op.op(s.input, *s.args, **s.kwargs))
        kwargs = sample.kwargs | {"impl": impl}
        ours, our_error = _outcome(lambda s=sample, k=kwargs: ours_fn(s.input, *s.args, **k))
        if their_error is not None:
            assert isinstance(our_error, ValueError | TypeError), (
                f"{what}: torch refuses ({their_error!r}), softxent gives {our_error!r} / {ours!r}"
            )
            continue
        assert our_error is None, f"{what}: torch computes {theirs!r}, softxent raises {our_error!r}"
        differentiable = [t for t in _tensors((sample.input, sample.args, sample.kwargs)) if t.requires_grad]
        _assert_same(ours, theirs, differentiable, dtype, what)
        agreements += 1
    assert agreements > 0


@pytest.mark.parametrize(
    "op", [op for op in OPS if op.error_inputs_func], ids=lambda op: op.variant_test_name
)
def test_opinfo_error_inputs_are_refused(op):
    for error_input in op.error_inputs("cpu"):
        sample = error_input.sample_input
        with pytest.raises((ValueError, TypeError)):
            OURS[op.name](sample.input, *sample.args, **sample.kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda info: info.name)
def test_moduleinfo_inputs_give_torchs_values_and_gradients(info, dtype):
    ours_cls = MODULES[info.name]
    inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)
    for index, module_input in enumerate(inputs):
        what = f"{info.name} input {index}"
        constructor, forward = module_input.constructor_input, module_input.forward_input
        torch.manual_seed(index)
        theirs_module, their_error = _outcome(lambda c=constructor: info.module_cls(*c.args, **c.kwargs))
        ours_module, our_error = _outcome(lambda c=constructor: ours_cls(*c.args, **c.kwargs))
        if their_error is not None:
            assert isinstance(our_error, ValueError | TypeError), (
                f"{what}: torch refuses, softxent {our_error!r}"
            )
            continue
        assert our_error is None, f"{what}: softxent's constructor raises {our_error!r}"
        ours_module.load_state_dict(theirs_module.state_dict())
        theirs, their_error = _outcome(lambda f=forward, m=theirs_module: m(*f.args, **f.kwargs))
        ours, our_error = _outcome(lambda f=forward, m=ours_module: m(*f.args, **f.kwargs))
        if their_error is not None:
            assert isinstance(our_error, ValueError | TypeError), (
                f"{what}: torch refuses, softxent {our_error!r}"
            )
            continue
        assert our_error is None, f"{what}: torch computes, softxent raises {our_error!r}"
        differentiable = [t for t in _tensors((forward.args, forward.kwargs)) if t.requires_grad]
        _assert_same(ours, theirs, differentiable, dtype, what)
        for (name, mine), theirs_parameter in zip(
            ours_module.named_parameters(), theirs_module.parameters(), strict=True
        ):
            assert mine.shape == theirs_parameter.shape, f"{what}: parameter {name}"


@pytest.mark.parametrize(
    "info", [i for i in MODULE_INFOS if i.module_error_inputs_func], ids=lambda i: i.name
)
def test_moduleinfo_error_inputs_are_refused(info):
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                           training=True)  # fmt: skip
    for error_input in errors:
        module_input = error_input.module_error_input
        constructor, forward = module_input.constructor_input, module_input.forward_input
        cls = MODULES[info.name]
        if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises((ValueError, TypeError)):
                cls(*constructor.args, **constructor.kwargs)
            continue
        # torch checks some options only in forward; softxent checks them in __init__, earlier
        module, error = _outcome(lambda c=constructor, k=cls: k(*c.args, **c.kwargs))
        if error is None:
            module, error = _outcome(lambda f=forward, m=module: m(*f.args, **f.kwargs))
        assert isinstance(error, ValueError | TypeError), f"{info.name}: {error_input.error_regex}: {error!r}"


# ----------------------------------------------------------------------------------------------------------
# What the databases do not reach
# ----------------------------------------------------------------------------------------------------------


def test_numpy_integers_and_the_deprecated_reduction_spelling_are_taken_as_torch_takes_them(impl):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 1])
    expected = F.cross_entropy(logits, target, ignore_index=1)
    for ignore_index in (np.int64(1), np.int32(1), torch.tensor(1)):
        got = softxent.cross_entropy(logits, target, ignore_index=ignore_index, impl=impl)
        torch.testing.assert_close(got, expected)
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        got = softxent.cross_entropy(logits, target, reduction="elementwise_mean", impl=impl)
    torch.testing.assert_close(got, F.cross_entropy(logits, target))
    hidden, weight = torch.randn(6, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        got = softxent.linear_cross_entropy(hidden, weight, target, reduction="elementwise_mean", impl=impl)
    torch.testing.assert_close(got, eager_linear_cross_entropy(hidden, weight, target))
    smoothing = np.float32(0.25)
    torch.testing.assert_close(
        softxent.cross_entropy(logits, target, label_smoothing=smoothing, impl=impl),
        F.cross_entropy(logits, target, label_smoothing=float(smoothing)),
    )


@pytest.mark.parametrize(
    "weight",
    [[1.0, -1.0, 2.0, 0.5, 1.0], [1.0, math.inf, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
    ids=["negative", "infinite", "zero"],
)
@pytest.mark.parametrize("kind", ["index", "probabilities"])
def test_any_class_weights_give_torchs_result(weight, kind, impl):
    """torch takes negative, infinite and all-zero class weights and computes with them; so does
    softxent (for the linear head too), nan and inf where torch's are."""
    class_weight = torch.tensor(weight, dtype=torch.float64)
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 0, 3, 1]) if kind == "index" else torch.softmax(torch.randn(4, 5), 1).double()
    for reduction in ("mean", "sum", "none"):
        ours = softxent.cross_entropy(logits, target, weight=class_weight, reduction=reduction, impl=impl)
        theirs = F.cross_entropy(logits, target, weight=class_weight, reduction=reduction)
        _assert_same(ours, theirs, [logits], torch.float64, f"cross_entropy {reduction}")
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for memory in ("speed", "lean"):
        ours = softxent.linear_cross_entropy(x, w, target, weight=class_weight, memory=memory, impl=impl)
        theirs = eager_linear_cross_entropy(x, w, target, weight=class_weight)
        _assert_same(ours, theirs, [x, w], torch.float64, f"linear_cross_entropy {memory}")


def test_negative_and_infinite_bce_weights_give_torchs_result(impl):
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.rand(4, 3, dtype=torch.float64)
    for weight, pos_weight in [
        (torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, 2.0, 1.0])),
        (torch.tensor([1.0, math.inf, 0.5]), torch.tensor([1.0, 1.0, math.inf])),
    ]:
        weight, pos_weight = weight.double(), pos_weight.double()
        ours = softxent.binary_cross_entropy_with_logits(
            logits, target, weight, pos_weight=pos_weight, impl=impl
        )
        theirs = F.binary_cross_entropy_with_logits(logits, target, weight, pos_weight=pos_weight)
        _assert_same(ours, theirs, [logits], torch.float64, "bce")


def test_class_weights_get_a_gradient_with_probability_targets_as_in_torch(impl):
    """torch differentiates its probability-target cross-entropy in the class weights too (it refuses that
    for class indices, and so does softxent)."""
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    probabilities = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    weight = torch.rand(5, dtype=torch.float64).add(0.5).requires_grad_()
    ours = softxent.cross_entropy(logits, probabilities, weight=weight, label_smoothing=0.1, impl=impl)
    theirs = F.cross_entropy(logits, probabilities, weight=weight, label_smoothing=0.1)
    _assert_same(ours, theirs, [logits, weight], torch.float64, "probabilities, weight with grad")
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ours = softxent.linear_cross_entropy(x, w, probabilities, weight=weight, impl=impl)
    theirs = eager_linear_cross_entropy(x, w, probabilities, weight=weight)
    _assert_same(ours, theirs, [x, w, weight], torch.float64, "linear, weight with grad")
    with pytest.raises(ValueError, match="weight: expected a tensor that does not require grad"):
        softxent.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), weight=weight, impl=impl)


def test_the_top_level_namespace_is_the_public_api():
    """dir(softxent) lists the public names only: no imports or helpers of the package's __init__."""
    import softxent

    assert dir(softxent) == sorted(softxent.__all__)
    for leaked in ("PackageNotFoundError", "find_spec", "import_module", "version"):
        assert leaked not in dir(softxent)
        assert not hasattr(softxent, leaked), leaked
