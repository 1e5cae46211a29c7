"""linear_cross_entropy(memory="lean"): the vocabulary-sliced head against the reference, the default mode
and eager torch, on both backends (the Triton slice kernels run in the interpreter without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import softxent
from helpers import (
    assert_close,
    assert_no_worse,
    eager_linear_cross_entropy,
    gradient_slack,
    logit_rounding_slack,
    to_numpy,
)
from softxent import reference
from softxent.ops import backends, slices
from softxent.ops.spec import SoftmaxLoss, Targets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(n, d, c, rng, dtype=torch.float64, bias=True, ignore_every=4, spread=1.0):
    x = torch.randn(n, d, generator=rng, dtype=torch.float64)
    w = torch.randn(c, d, generator=rng, dtype=torch.float64) * (spread / d**0.5)
    b = torch.randn(c, generator=rng, dtype=torch.float64) if bias else None
    target = torch.randint(0, c, (n,), generator=rng)
    if ignore_every:
        target[::ignore_every] = -100
    params = [t.to(DEVICE, dtype).requires_grad_() for t in (x, w, *([b] if bias else []))]
    return (*params, *([] if bias else [None])), target.to(DEVICE)


def _grads(loss, params, upstream_seed=None):
    upstream = torch.ones_like(loss)
    if upstream_seed is not None:
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed))
        upstream = upstream.to(loss)
    return torch.autograd.grad(loss, [p for p in params if p is not None], upstream)


def _reference(x, w, b, target, **kwargs):
    weight = kwargs.pop("weight", None)
    return reference.linear_cross_entropy(
        to_numpy(x), to_numpy(w), target.cpu().numpy(), None if b is None else to_numpy(b),
        weight=None if weight is None else to_numpy(weight), **kwargs,
    )  # fmt: skip


@given(
    n=st.integers(1, 40),
    d=st.integers(1, 40),
    c=st.integers(2, 300),
    seed=st.integers(0, 2**32 - 1),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.2]),
    z_loss=st.sampled_from([0.0, 0.01]),
    softcap=st.sampled_from([None, 5.0]),
    weighted=st.booleans(),
    bias=st.booleans(),
    slice_columns=st.sampled_from([None, 1, 7, 64]),
)
def test_lean_matches_reference_float64(
    n, d, c, seed, reduction, label_smoothing, z_loss, softcap, weighted, bias, slice_columns
):
    rng = torch.Generator().manual_seed(seed)
    (x, w, b), target = _problem(n, d, c, rng, bias=bias, ignore_every=3)
    weight = (torch.rand(c, generator=rng, dtype=torch.float64) + 0.1).to(DEVICE) if weighted else None
    kwargs = dict(
        weight=weight, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap
    )
    ours = softxent.linear_cross_entropy(
        x, w, target, linear_bias=b, memory="lean", chunk_size=slice_columns, impl="torch", **kwargs
    )
    loss, *ref_grads = _reference(x, w, b, target, **kwargs)
    assert_close(ours, np.asarray(loss), 1e-10, "loss")
    grads = _grads(ours, [x, w, b])
    for name, mine, expected in zip(["dX", "dW", "db"], grads, ref_grads, strict=False):
        assert_close(mine, expected, 1e-10, name)


@given(
    n=st.integers(1, 30),
    d=st.integers(1, 20),
    c=st.integers(1, 200),
    seed=st.integers(0, 2**32 - 1),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    weighted=st.sampled_from([None, "element", "row"]),
    pos_weighted=st.booleans(),
    bias=st.booleans(),
    slice_columns=st.sampled_from([None, 1, 7, 64]),
)
def test_lean_binary_cross_entropy_matches_reference_float64(
    n, d, c, seed, reduction, weighted, pos_weighted, bias, slice_columns
):
    """linear_binary_cross_entropy(memory="lean"): vocabulary slices of all rows, against the reference."""
    rng = torch.Generator().manual_seed(seed)
    (x, w, b), _ = _problem(n, d, c, rng, bias=bias, ignore_every=0, spread=4.0)
    target = torch.rand(n, c, generator=rng, dtype=torch.float64)
    weight_shape = {None: None, "element": (n, c), "row": (n, 1)}[weighted]
    weight = None if weight_shape is None else torch.rand(weight_shape, generator=rng, dtype=torch.float64)
    pos_weight = torch.rand(c, generator=rng, dtype=torch.float64) * 3 if pos_weighted else None
    ours = softxent.linear_binary_cross_entropy(
        x, w, target.to(DEVICE), linear_bias=b, reduction=reduction, memory="lean", chunk_size=slice_columns,
        impl="torch", weight=None if weight is None else weight.to(DEVICE),
        pos_weight=None if pos_weight is None else pos_weight.to(DEVICE),
    )  # fmt: skip
    logits = to_numpy(x) @ to_numpy(w).T + (0.0 if b is None else to_numpy(b))
    arrays = dict(
        weight=None if weight is None else weight.numpy(),
        pos_weight=None if pos_weight is None else pos_weight.numpy(),
        reduction=reduction,
    )
    expected = reference.sigmoid_binary_cross_entropy(logits, target.numpy(), **arrays)
    grad_logits = reference.sigmoid_binary_cross_entropy_grad(logits, target.numpy(), **arrays)
    assert_close(ours, np.asarray(expected), 1e-10, "loss")
    refs = [grad_logits @ to_numpy(w), grad_logits.T @ to_numpy(x), grad_logits.sum(0)]
    for name, mine, ref in zip(["dX", "dW", "db"], _grads(ours, [x, w, b]), refs, strict=False):
        assert_close(mine, ref, 1e-10, name)


FEATURES = [
    dict(),
    dict(label_smoothing=0.1),
    dict(weighted=True, label_smoothing=0.2),
    dict(z_loss=0.01, softcap=4.0),
    dict(weighted=True, label_smoothing=0.1, z_loss=0.02, softcap=3.0, reduction="sum"),
    dict(reduction="none"),
]


@pytest.mark.parametrize(
    "features", FEATURES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain"
)
def test_lean_float32_matches_reference_and_default_mode(features, impl, rng):
    """N=37, D=65, C=1031 in slices of 300 columns (the last one partial), float32 against float64."""
    features = dict(features)
    (x, w, b), target = _problem(37, 65, 1031, rng, dtype=torch.float32, spread=3.0)
    weight = None
    if features.pop("weighted", False):
        weight = (torch.rand(1031, generator=rng) + 0.1).to(DEVICE)
    kwargs = dict(weight=weight, **features)
    lean = softxent.linear_cross_entropy(
        x, w, target, linear_bias=b, memory="lean", chunk_size=300, impl=impl, **kwargs
    )
    speed = softxent.linear_cross_entropy(x, w, target, linear_bias=b, impl=impl, **kwargs)
    loss, *ref_grads = _reference(x, w, b, target, **kwargs)
    assert_close(lean, np.asarray(loss), 2e-6, "loss")
    assert_close(lean, to_numpy(speed), 2e-6, "loss vs the default mode")
    # "none": a random upstream gradient (the reference's gradients are for an upstream of ones)
    seed = 7 if features.get("reduction") == "none" else None
    for name, mine, default, expected in zip(
        ["dX", "dW", "db"], _grads(lean, [x, w, b], seed), _grads(speed, [x, w, b], seed), ref_grads,
        strict=True,
    ):  # fmt: skip
        size = float(default.abs().max())
        assert_close(mine.double() / size, to_numpy(default) / size, 2e-6, f"{name} vs the default mode")
        if seed is None:
            assert_close(mine.double() / size, expected / size, 2e-6, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lean_low_precision_no_worse_than_eager(dtype, impl, rng):
    (x, w, b), target = _problem(101, 96, 600, rng, dtype=dtype, spread=3.0)
    ours = softxent.linear_cross_entropy(
        x, w, target, linear_bias=b, memory="lean", chunk_size=256, impl=impl
    )
    eager = F.cross_entropy(F.linear(x, w, b).float(), target)
    loss, *ref_grads = _reference(x, w, b, target)
    assert ours.dtype == torch.float32
    slack = 1e-6
    if DEVICE == "cuda":
        # cuBLAS rounds a slice's logits apart from eager's whole-head GEMM: allow 5σ of one rounding
        logits = to_numpy(x) @ to_numpy(w).T + to_numpy(b)
        grad_logits = reference.cross_entropy_grad(logits, target.cpu().numpy())
        slack += logit_rounding_slack(logits, grad_logits, dtype, float(loss))
    assert_no_worse(ours, eager, np.asarray(loss), slack, "loss")
    slack = gradient_slack(dtype)  # eager's extra rounding of G sometimes lands closer (helpers.py)
    for name, mine, theirs, expected in zip(
        ["dX", "dW", "db"], _grads(ours, [x, w, b]), _grads(eager, [x, w, b]), ref_grads, strict=True
    ):
        assert mine.dtype == dtype
        size = float(np.abs(expected).max())
        assert_no_worse(mine.double() / size, theirs.double() / size, expected / size, slack, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lean_probability_targets_and_their_gradient(dtype, impl, rng):
    (x, w, b), _ = _problem(19, 23, 531, rng, dtype=dtype)
    target = torch.softmax(torch.randn(19, 531, generator=rng, dtype=torch.float64), 1).to(DEVICE, dtype)
    target.requires_grad_()
    kwargs = dict(
        linear_bias=b, label_smoothing=0.1, weight=(torch.rand(531, generator=rng) + 0.5).to(DEVICE, dtype)
    )
    ours = softxent.linear_cross_entropy(x, w, target, memory="lean", chunk_size=200, impl=impl, **kwargs)
    theirs = eager_linear_cross_entropy(x, w, target, **kwargs)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(ours, to_numpy(theirs), tol, "loss")
    for name, mine, ref in zip(
        ["dX", "dW", "db", "dtarget"], _grads(ours, [x, w, b, target]), _grads(theirs, [x, w, b, target]),
        strict=True,
    ):  # fmt: skip
        size = float(ref.abs().max())
        assert_close(mine.double() / size, to_numpy(ref) / size, 10 * tol, name)


def test_lean_extreme_logits_and_masked_classes(impl, rng):
    """Logits of ±1e4 and −inf bias entries (masked classes) spread over several slices."""
    (x, w, b), target = _problem(23, 16, 700, rng, dtype=torch.float32)
    with torch.no_grad():
        w.mul_(2e4)
        b.zero_()
        b[::3] = float("-inf")
        # Move targets off the masked classes (multiples of 3): up one, or down one from the last
        # class (699) so the target stays inside [0, 700).
        on_masked = (target >= 0) & (target % 3 == 0)
        target[on_masked] += torch.where(target[on_masked] == 699, -1, 1)
    lean = softxent.linear_cross_entropy(
        x, w, target, linear_bias=b, memory="lean", chunk_size=128, impl=impl
    )
    speed = softxent.linear_cross_entropy(x, w, target, linear_bias=b, impl="torch")
    assert torch.isfinite(lean)
    assert_close(lean, to_numpy(speed), 1e-6, "loss")
    lean_grads = _grads(lean, [x, w, b])
    for name, mine, default in zip(["dX", "dW", "db"], lean_grads, _grads(speed, [x, w, b]), strict=True):
        assert torch.isfinite(mine).all(), name
        size = float(default.abs().max())
        assert_close(mine.double() / size, to_numpy(default) / size, 1e-5, name)
    masked_grad = lean_grads[2][::3]
    assert torch.equal(masked_grad, torch.zeros_like(masked_grad))


@pytest.mark.parametrize("weighted", [False, True])
def test_lean_label_smoothing_extreme_logits_and_masks(weighted, impl, rng):
    """Label smoothing spreads target mass over every class: ±1e4 logits agree with the default mode, and
    a −inf logit (a masked class) makes a counted row's loss +inf, as in torch, and adds 0 elsewhere."""
    (x, w, b), target = _problem(23, 16, 700, rng, dtype=torch.float32)
    weight = (torch.rand(700, generator=rng) + 0.5).to(DEVICE) if weighted else None
    kwargs = dict(weight=weight, label_smoothing=0.1, reduction="none")
    with torch.no_grad():
        w.mul_(2e4)
    lean = softxent.linear_cross_entropy(
        x, w, target, linear_bias=b, memory="lean", chunk_size=128, impl=impl, **kwargs
    )
    speed = softxent.linear_cross_entropy(x, w, target, linear_bias=b, impl="torch", **kwargs)
    assert_close(lean, to_numpy(speed), 1e-6, "loss")
    for name, mine, default in zip(
        ["dX", "dW", "db"], _grads(lean, [x, w, b]), _grads(speed, [x, w, b]), strict=True
    ):
        size = float(default.abs().max())
        assert_close(mine.double() / size, to_numpy(default) / size, 1e-5, name)
    with torch.no_grad():
        b[::3] = float("-inf")
    masked = softxent.linear_cross_entropy(
        x, w, target, linear_bias=b, memory="lean", chunk_size=128, impl=impl, **kwargs
    )
    expected = F.cross_entropy(F.linear(x, w, b), target, **kwargs)
    counted = target != -100
    assert torch.isposinf(masked[counted]).all()
    assert torch.isposinf(expected[counted]).all()
    assert torch.equal(masked[~counted], torch.zeros_like(masked[~counted]))


def test_lean_all_ignored_unbatched_empty_and_no_grad(impl, rng):
    (x, w, b), _ = _problem(6, 4, 9, rng, dtype=torch.float32)
    all_ignored = torch.full((6,), -100, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        kwargs = dict(linear_bias=b, reduction=reduction)
        ours = softxent.linear_cross_entropy(x, w, all_ignored, memory="lean", impl=impl, **kwargs)
        theirs = eager_linear_cross_entropy(x, w, all_ignored, **kwargs)
        assert_close(ours, to_numpy(theirs), 0.0, f"all ignored, {reduction}")
        for mine, ref in zip(_grads(ours, [x, w, b]), _grads(theirs, [x, w, b]), strict=True):
            assert torch.equal(mine, ref)
    target = torch.tensor(3, device=DEVICE)
    single = softxent.linear_cross_entropy(
        x[0], w, target, linear_bias=b, reduction="none", memory="lean", impl=impl
    )
    assert single.shape == ()
    expected = eager_linear_cross_entropy(x[0], w, target, linear_bias=b, reduction="none")
    assert_close(single, to_numpy(expected), 1e-6, "unbatched")
    empty = softxent.linear_cross_entropy(
        x[:0], w, torch.zeros(0, dtype=torch.long, device=DEVICE), memory="lean", impl=impl
    )
    assert torch.isnan(empty)
    full_target = torch.randint(0, 9, (6,), generator=rng).to(DEVICE)
    with torch.no_grad():
        plain = softxent.linear_cross_entropy(x, w, full_target, linear_bias=b, memory="lean", impl=impl)
    assert not plain.requires_grad
    expected = eager_linear_cross_entropy(x, w, full_target, linear_bias=b)
    assert_close(plain, to_numpy(expected), 1e-6, "no_grad")


def test_lean_strided_target(impl, rng):
    (x, w, b), target = _problem(29, 17, 300, rng, dtype=torch.float32)
    strided = torch.stack([target, target], dim=1)[:, 0]  # stride 2
    lean = softxent.linear_cross_entropy(
        x, w, strided, linear_bias=b, memory="lean", chunk_size=128, impl=impl
    )
    expected = eager_linear_cross_entropy(x, w, target, linear_bias=b)
    assert_close(lean, to_numpy(expected), 1e-6, "loss")


def test_lean_is_deterministic(impl, rng):
    (x, w, b), target = _problem(29, 17, 300, rng, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        loss = softxent.linear_cross_entropy(
            x, w, target, linear_bias=b, memory="lean", chunk_size=128, impl=impl
        )
        runs.append((loss, *_grads(loss, [x, w, b])))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_lean_gradcheck_float64(rng):
    (x, w, b), target = _problem(7, 5, 13, rng)

    def loss(x_, w_, b_):
        return softxent.linear_cross_entropy(
            x_, w_, target, linear_bias=b_, label_smoothing=0.1, z_loss=0.01, softcap=4.0,
            memory="lean", chunk_size=4, impl="torch",
        )  # fmt: skip

    assert torch.autograd.gradcheck(loss, (x, w, b))


def test_lean_argument_errors(rng):
    (x, w, _), target = _problem(4, 3, 5, rng, bias=False)
    with pytest.raises(ValueError, match=r"memory: expected 'speed', 'lean' or 'auto', got 'small'"):
        softxent.linear_cross_entropy(x, w, target, memory="small")
    with pytest.raises(ValueError, match=r"memory: 'lean' takes a \(C, in_features\) linear_weight"):
        softxent.linear_cross_entropy(x, w.detach().reshape(5, 1, 3), target.reshape(4, 1), memory="lean")


def test_memory_auto_runs_speed_where_it_fits_else_lean(monkeypatch, rng):
    """memory="auto": the speed mode where its chunk and float32 dW buffer fit in 80% of the memory left,
    the lean mode otherwise; the speed mode on a CPU (no memory to run short of) and for a K-dimensional
    loss (no lean mode there)."""
    from softxent.ops import policy, slices

    gpu = policy.policy(policy.H200, "triton")
    # 8192×4096×128256 bf16: weight-sized chunks of 4096 rows (1 GiB of logits, the bf16 weight's bytes)
    # and a float32 (C, D) dW buffer
    speed = gpu.speed_mode_bytes(8192, 4096, 128256, torch.bfloat16)
    assert speed == 4096 * 128256 * 2 + 128256 * 4096 * 4
    assert gpu.speed_mode_bytes(2048, 4096, 128256, torch.bfloat16) == 2048 * 128256 * 2  # one chunk
    cuda = torch.device("cuda")
    monkeypatch.setattr(policy, "available_bytes", lambda device: int(speed / 0.8) + 1)
    assert gpu.linear_memory(8192, 4096, 128256, torch.bfloat16, cuda) == "speed"
    monkeypatch.setattr(policy, "available_bytes", lambda device: int(speed / 0.8) - 2**20)
    assert gpu.linear_memory(8192, 4096, 128256, torch.bfloat16, cuda) == "lean"

    (x, w, b), target = _problem(37, 65, 1031, rng, dtype=torch.float32)
    lean_calls = []
    forward_stats = slices.LeanSoftmaxHead.forward_stats
    monkeypatch.setattr(
        slices.LeanSoftmaxHead,
        "forward_stats",
        lambda self, *args: lean_calls.append(1) or forward_stats(self, *args),
    )
    expected = eager_linear_cross_entropy(x, w, target, linear_bias=b)
    # here the speed mode needs one 37×1031 float32 chunk (149 KiB): 64 KiB left is too little
    for left, mode in ((None, "speed"), (1 << 40, "speed"), (1 << 16, "lean")):
        monkeypatch.setattr(policy, "available_bytes", lambda device, left=left: left)
        lean_calls.clear()
        loss = softxent.linear_cross_entropy(x, w, target, linear_bias=b, memory="auto", impl="torch")
        assert bool(lean_calls) == (mode == "lean"), left
        assert_close(loss, to_numpy(expected), 1e-6, f"loss, {mode}")
    # a K-dimensional loss has no lean mode: "auto" is "speed" whatever is left
    k_dim = softxent.linear_cross_entropy(
        x, w.reshape(1031, 1, 65), target.reshape(37, 1), memory="auto", impl="torch"
    )
    assert_close(k_dim, to_numpy(eager_linear_cross_entropy(x, w, target)), 1e-6, "K-dimensional")


@pytest.mark.parametrize("kind", ["index", "probabilities"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_an_infinite_class_weight_gives_torchs_loss_over_slices(kind, smoothing, impl, rng):
    """The online statistics over slices of 4 classes keep torch's values where a class weight is inf
    (rescaling a sum that holds inf by a rise of 0, and the row's largest logit, add exactly 0). The head
    is driven directly: the functional op takes the eager composition for such weights on CPU tensors."""
    x = torch.randn(9, 4, generator=rng, device="cpu").to(DEVICE)
    w = torch.randn(11, 4, generator=rng, device="cpu").to(DEVICE)
    weight = torch.ones(11, device=DEVICE)
    weight[1] = float("inf")
    if kind == "index":
        target = torch.randint(0, 11, (9,), generator=rng).to(DEVICE)
    else:
        target = torch.softmax(torch.randn(9, 11, generator=rng), 1).to(DEVICE)
    spec = SoftmaxLoss(weight, -100, smoothing, 0.0, None)
    backend = backends.select(impl, x.device)
    head = slices.LeanSoftmaxHead(
        spec, "none", 11, 4, backend.slice_stats, backend.slice_grad, backend.policy
    )
    loss = head.forward_stats(x, w, None, Targets.prepare(target, spec, 11, torch.float32))[0]
    expected = F.cross_entropy(x @ w.T, target, weight=weight, label_smoothing=smoothing, reduction="none")
    torch.testing.assert_close(loss, expected, equal_nan=True, atol=1e-5, rtol=1e-5)
