"""The Triton softmax cross-entropy kernel against the torch backend's block function, one feature at a
time, at small odd shapes. Without a GPU the kernel runs in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); tests marked gpu need a CUDA device."""

from __future__ import annotations

import itertools

import pytest
import torch

from softxent.ops import policy, torch_blocks
from softxent.ops.spec import SoftmaxLoss

triton_ops = pytest.importorskip(
    "softxent.ops.triton.cross_entropy", reason="the triton package is not installed"
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _case(rng, rows, num_classes, *, probabilities, weighted, dtype=torch.float32, scale=3.0):
    logits = (torch.randn(rows, num_classes, generator=rng, dtype=torch.float64) * scale).to(dtype)
    if probabilities:
        target = torch.softmax(torch.randn(rows, num_classes, generator=rng), dim=1)
    else:
        target = torch.randint(0, num_classes, (rows,), generator=rng)
        target[::5] = -100
    weight = torch.rand(num_classes, generator=rng) + 0.1 if weighted else None
    return logits.to(DEVICE), target.to(DEVICE), None if weight is None else weight.to(DEVICE)


def _both(logits, target, spec, scale, *, target_grad=False):
    """(loss, lse, grad[, target grad]) from the torch block and from the Triton block."""
    results = []
    for block in (torch_blocks.softmax_xent_block, triton_ops.softmax_xent_block):
        grad = torch.empty_like(logits)
        tgrad = torch.empty_like(target) if target_grad else None
        loss, lse = block(logits, target, spec, grad_scale=scale, grad_out=grad, target_grad_out=tgrad)
        results.append((loss, lse, grad, tgrad))
    return results


def _close(ours, theirs, what, atol=2e-6, rtol=2e-5):
    torch.testing.assert_close(ours.float(), theirs.float(), atol=atol, rtol=rtol, equal_nan=True, msg=what)


FEATURES = list(
    itertools.product(
        [False, True],  # probabilities
        [False, True],  # class weights
        [0.0, 0.15],  # label smoothing
        [0.0, 1e-3],  # z_loss
        [None, 7.0],  # softcap
    )
)


@pytest.mark.parametrize(("probabilities", "weighted", "smoothing", "z_loss", "softcap"), FEATURES)
def test_kernel_equals_the_torch_block(probabilities, weighted, smoothing, z_loss, softcap, rng):
    logits, target, weight = _case(rng, 37, 1031, probabilities=probabilities, weighted=weighted)
    spec = SoftmaxLoss(weight, -100, smoothing, z_loss, softcap)
    scale = torch.rand(37, generator=rng).to(DEVICE) + 0.5  # per-row scale, as reduction="none" gives
    (loss, lse, grad, tgrad), (loss_t, lse_t, grad_t, tgrad_t) = _both(
        logits, target, spec, scale, target_grad=probabilities
    )
    _close(loss_t, loss, "loss")
    _close(lse_t, lse, "lse")
    _close(grad_t, grad, "grad", atol=1e-7)
    if probabilities:
        _close(tgrad_t, tgrad, "target grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_compute_in_float32(dtype, rng):
    logits, target, _ = _case(rng, 29, 517, probabilities=False, weighted=False, dtype=dtype)
    spec = SoftmaxLoss(None, -100, 0.1, 0.0, None)
    (loss, lse, grad, _), (loss_t, lse_t, grad_t, _) = _both(logits, target, spec, 1.0 / 29)
    assert loss_t.dtype == lse_t.dtype == torch.float32
    assert grad_t.dtype == dtype
    _close(loss_t, loss, "loss")
    _close(lse_t, lse, "lse")
    _close(grad_t, grad, "grad", atol=1e-3, rtol=1e-2)  # one rounding of the gradient to dtype
    # that rounding is to nearest-even, as a GPU store and torch's .to(dtype) do (Triton's interpreter
    # truncates to bf16 unless the kernel rounds): the float32 gradient rounded by torch agrees with the
    # kernel's but for the rare value whose float32 digits differ across a rounding boundary
    wide = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    torch_blocks.softmax_xent_block(logits, target, spec, grad_scale=1.0 / 29, grad_out=wide)
    differs = (grad_t != wide.to(dtype)).float().mean().item()
    assert differs < 0.01, f"{differs:.1%} of the gradient's {dtype} values are not the float32 ones rounded"


def test_extremes_masks_and_wide_rows(rng):
    """±1e4 logits, −inf masks, an all-ignored row, and rows wider than one block (several blocks)."""
    num_classes = policy.STREAM_BLOCK * 2 + 37
    logits, target, _ = _case(rng, 9, num_classes, probabilities=False, weighted=False, scale=1e4)
    logits[:, ::11] = float("-inf")
    # no target on a masked column (multiples of 11) but row 4's: move those one column left (0 to 1)
    target = torch.where((target % 11 == 0) & (target >= 0), (target - 1).clamp_min(1), target)
    target[3] = -100
    target[4] = 22  # a −inf target logit: loss +inf
    spec = SoftmaxLoss(None, -100, 0.0, 0.0, None)
    (loss, lse, grad, _), (loss_t, lse_t, grad_t, _) = _both(logits, target, spec, 1.0)
    assert torch.isinf(loss_t[4])
    assert loss_t[3] == 0
    assert torch.all(grad_t[3] == 0)
    masked = grad_t[:, ::11].clone()
    masked[4, 2] = 0  # column 22, row 4's −inf target: ŷ − 1 = −1 there, as in torch
    assert torch.all(masked == 0)
    assert grad_t[4, 22] == -1
    _close(loss_t, loss, "loss", rtol=1e-6)
    _close(lse_t, lse, "lse", rtol=1e-6)
    _close(grad_t, grad, "grad", atol=1e-7)


def test_gradient_in_place_and_strided_inputs(rng):
    """grad_out may be the logits themselves; non-contiguous logits and outputs work."""
    logits, target, _ = _case(rng, 37, 211, probabilities=False, weighted=False)
    spec = SoftmaxLoss(None, -100, 0.05, 0.0, None)
    expected_loss, _ = torch_blocks.softmax_xent_block(logits, target, spec)
    expected_grad = torch.empty_like(logits)
    torch_blocks.softmax_xent_block(logits, target, spec, grad_scale=0.5, grad_out=expected_grad)
    in_place = logits.clone()
    loss, _ = triton_ops.softmax_xent_block(in_place, target, spec, grad_scale=0.5, grad_out=in_place)
    _close(loss, expected_loss, "loss")
    _close(in_place, expected_grad, "in-place grad", atol=1e-7)
    wide = torch.zeros(211, 37 * 2, device=DEVICE)
    strided = wide[:, ::2].T  # (37, 211) with strides (2, 74)
    strided.copy_(logits)
    out = torch.zeros(211, 37, device=DEVICE).T
    strided_target = torch.stack([target, target], dim=1)[:, 0]  # stride 2
    loss, _ = triton_ops.softmax_xent_block(strided, strided_target, spec, grad_scale=0.5, grad_out=out)
    _close(loss, expected_loss, "loss of strided inputs")
    _close(out, expected_grad, "strided grad", atol=1e-7)


def test_out_of_range_target_gives_nan_without_reading_out_of_bounds(rng):
    """GPU targets are not range-checked on the host: the kernel marks such rows nan (and zero gradient)."""
    logits, target, _ = _case(rng, 7, 13, probabilities=False, weighted=False)
    target[2], target[5] = 13, -7
    spec = SoftmaxLoss(None, -100, 0.0, 0.0, None)
    grad = torch.empty_like(logits)
    loss, _ = triton_ops.softmax_xent_block(logits, target, spec, grad_scale=1.0, grad_out=grad)
    assert torch.isnan(loss[2])
    assert torch.isnan(loss[5])
    assert torch.all(grad[2] == 0)
    valid = [0, 1, 3, 4, 6]
    expected, _ = torch_blocks.softmax_xent_block(logits[valid], target[valid], spec)
    _close(loss[valid], expected, "valid rows")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: run-to-run determinism is a property of the GPU")
def test_deterministic_on_the_gpu(rng):
    logits, target, weight = _case(rng, 4099, 32003, probabilities=False, weighted=True)
    spec = SoftmaxLoss(weight, -100, 0.1, 1e-4, None)
    runs = [_both(logits, target, spec, 1.0 / 4099)[1] for _ in range(3)]
    for run in runs[1:]:
        for first, again in zip(runs[0][:3], run[:3], strict=True):
            assert torch.equal(first, again)


@pytest.mark.skipif(CUDA, reason="checks the message for CPU tensors outside the interpreter")
def test_triton_on_cpu_tensors_outside_the_interpreter_is_an_error(monkeypatch):
    import softxent

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"impl: 'triton' runs on CUDA tensors .* got tensors on cpu"):
        softxent.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), impl="triton")
    with pytest.raises(ValueError, match=r"impl: 'triton' runs on CUDA tensors .* got tensors on cpu"):
        softxent.binary_cross_entropy_with_logits(torch.randn(3, 5), torch.rand(3, 5), impl="triton")


@pytest.mark.parametrize("probabilities", [False, True], ids=["index", "probabilities"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(
    ("rows", "num_classes"),
    [(13, 7), (3, policy.ROW_IN_REGISTERS + 37)],  # one pass in registers; a few wide rows, split
    ids=["narrow", "wide"],
)
def test_an_infinite_class_weight_gives_torchs_loss_and_gradient(
    rows, num_classes, probabilities, smoothing, rng
):
    """torch computes Σ_c w_c·q_c·(−log ŷ_c): inf where an infinite weight meets target mass, nan where
    its gradient meets one. The kernel keeps the true class's term whole and adds exactly 0 for the row's
    largest logit, so that no inf·0 turns such a loss nan (the functional ops on CPU tensors take the
    eager composition for these weights, so the kernels are called here directly). One difference is
    left: an ignored row's gradient is 0, where torch's smoothing term makes it inf·0 = nan."""
    logits, target, _ = _case(rng, rows, num_classes, probabilities=probabilities, weighted=False)
    weight = torch.ones(num_classes, device=DEVICE)
    weight[1] = float("inf")
    logits[0, 1] = logits[0].max() + 1.0  # the infinite-weight class holds row 0's largest logit
    if not probabilities:
        target[0], target[1] = 1, 1
    spec = SoftmaxLoss(weight, -100, smoothing, 0.0, None)
    grad = torch.empty_like(logits)
    loss, _ = triton_ops.softmax_xent_block(logits, target, spec, grad_scale=1.0, grad_out=grad)
    reference = logits.detach().clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(
        reference, target, weight=weight, label_smoothing=smoothing, reduction="none"
    )
    expected.sum().backward()
    assert torch.isinf(loss[0])
    _close(loss, expected.detach(), "loss")
    counted = torch.ones(rows, dtype=torch.bool) if probabilities else target != -100
    _close(grad[counted], reference.grad[counted], "grad")
    assert torch.all(grad[~counted] == 0)
