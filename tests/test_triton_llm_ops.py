"""The Triton kernels of the LLM ops (per-token statistics, their gradient, distillation divergences)
against the torch backend's block functions on both launch paths (rows in registers, streaming blocks),
every transform and incoming-gradient combination, −inf masks, ±1e4 logits, ignored rows and in-place
gradients; then the public ops with impl="triton" against the float64 oracle in float32, and the launches
each call makes. Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import itertools

import pytest
import torch

import softxent
from helpers import assert_close, to_numpy
from softxent import reference
from softxent.ops import distillation, policy
from softxent.ops import log_probs as torch_token
from softxent.ops.log_probs import STATS, Transform

triton_token = pytest.importorskip(
    "softxent.ops.triton.log_probs", reason="the triton package is not installed"
)
launches = pytest.importorskip("softxent.ops.triton.launches", reason="the triton package is not installed")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (rows, columns) on each path: tiles of whole rows in registers (several rows a program), and rows wider
# than ROW_IN_REGISTERS streaming through blocks of STREAM_BLOCK columns (the last block partial)
PATHS = {"registers": (37, 423), "streaming": (5, 2 * policy.STREAM_BLOCK + 37)}
TRANSFORMS = {
    "plain": Transform(),
    "scaled": Transform(logit_scale=1.3, temperature=0.7),
    "softcap": Transform(logit_scale=0.9, softcap=4.0, temperature=1.5),
    "negative scale": Transform(logit_scale=-0.8),
}


def _logits(rng, rows, columns, scale=3.0, dtype=torch.float32):
    logits = torch.randn(rows, columns, generator=rng) * scale
    logits[:, 5::97] = float("-inf")  # masked classes
    return logits.to(DEVICE, dtype)


def _target(rng, rows, columns):
    target = torch.randint(0, columns, (rows,), generator=rng)
    target = torch.where(target % 97 == 5, target + 1, target)  # not a masked class
    target[0] = -100
    target[-1] = columns - 3  # in the last block
    return target.to(DEVICE)


def _close(ours, theirs, what, atol=2e-6, rtol=2e-5):
    torch.testing.assert_close(
        ours.float(), theirs.float(), atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("with_grad", [False, True])
def test_stats_block_equals_the_torch_block(path, transform, with_grad, rng):
    rows, columns = PATHS[path]
    logits, target = _logits(rng, rows, columns), _target(rng, rows, columns)
    if transform == "negative scale":
        logits = logits.nan_to_num(neginf=0.0)  # −inf·(−0.8) would be a +inf class
    spec = TRANSFORMS[transform]
    grads = [torch.full_like(logits, float("nan")) if with_grad else None for _ in range(2)]
    with launches.recorded() as records:
        ours = triton_token.stats_block(logits, target, spec, -100, grads[0])
    theirs = torch_token.stats_block(logits, target, spec, -100, grads[1])
    assert [r.kernel for r in records] == ["_log_prob_stats_kernel"]
    assert records[0].meta["SINGLE_PASS"] == (path == "registers")
    for k, name in enumerate(STATS):
        _close(ours[:, k], theirs[:, k], name)
    if with_grad:
        _close(grads[0], grads[1], "grad", atol=1e-7)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("which", ["both", "log_probs", "entropy"])
def test_grad_block_equals_the_torch_block(path, transform, which, rng):
    rows, columns = PATHS[path]
    logits, target = _logits(rng, rows, columns), _target(rng, rows, columns)
    if transform == "negative scale":
        logits = logits.nan_to_num(neginf=0.0)
    spec = TRANSFORMS[transform]
    stats = torch_token.stats_block(logits, target, spec, -100)
    row_stats = [stats[:, STATS.index(name)] for name in ("m", "log_sum_exp", "entropy")]  # stride 7
    g = torch.randn(rows, generator=rng).to(DEVICE) if which != "entropy" else None
    h = torch.randn(rows, generator=rng).to(DEVICE) if which != "log_probs" else None
    expected = torch.empty_like(logits)
    torch_token.grad_block(logits, target, spec, -100, *row_stats, g, h, expected)
    ours = torch.full_like(logits, float("nan"))
    with launches.recorded() as records:
        triton_token.grad_block(logits, target, spec, -100, *row_stats, g, h, ours)
    assert [r.kernel for r in records] == ["_log_prob_grad_kernel"]
    _close(ours, expected, "grad", atol=1e-7)
    assert (ours[0] == 0).all(), "an ignored row gets no gradient"
    in_place = logits.clone()  # the gradient may overwrite the logits
    triton_token.grad_block(in_place, target, spec, -100, *row_stats, g, h, in_place)
    _close(in_place, expected, "in-place grad", atol=1e-7)


def test_stats_of_extreme_logits_and_ties(rng):
    """±1e4 logits (fp32 lse rounds; the statistics stay relative to the row max), an all-ignored block,
    and a tie for the max (the first argmax, as torch's)."""
    logits = (torch.randn(9, 300, generator=rng) * 1e4).to(DEVICE)
    logits[2, 7] = logits[2, 11] = logits[2].max() + 1.0
    target = torch.randint(0, 300, (9,), generator=rng).to(DEVICE)
    target[2] = 11  # the second of two equal maxima: not the top-1
    ours = triton_token.stats_block(logits, target, Transform(), -100)
    theirs = torch_token.stats_block(logits, target, Transform(), -100)
    assert ours[2, STATS.index("is_top1")] == 0
    # the mean of logits of size 1e4 keeps float32's absolute rounding of them, whatever the order of the sum
    mean_atol = 2 * torch.finfo(torch.float32).eps * float(logits.abs().max())
    for k, name in enumerate(STATS):
        _close(
            ours[:, k],
            theirs[:, k],
            name,
            rtol=1e-5,
            **({"atol": mean_atol} if name == "mean_logits" else {}),
        )
    ignored = torch.full_like(target, -100)
    out = triton_token.stats_block(logits, ignored, Transform(), -100)
    assert (out[:, :5] == 0).all()


DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("kind", "beta"), DIVERGENCES)
@pytest.mark.parametrize("transforms", ["plain", "each its own"])
def test_divergence_block_equals_the_torch_block(path, kind, beta, transforms, rng):
    rows, columns = PATHS[path]
    student = _logits(rng, rows, columns, scale=2.0)  # both models mask the same classes
    teacher = _logits(rng, rows, columns, scale=2.5)
    if transforms == "plain":
        spec = distillation.Divergence(kind, beta, Transform(), Transform(), -100)
    else:
        # softcaps make the masked classes finite for both models
        spec = distillation.Divergence(kind, beta, Transform(1.2, 5.0, 0.8), Transform(0.7, 3.0, 0.8), -100)
    counted = torch.rand(rows, generator=rng).to(DEVICE) > 0.2
    counted[0] = False
    for scale in (torch.tensor(0.25, device=DEVICE), torch.rand(rows, generator=rng).to(DEVICE) + 0.5):
        expected = torch.empty_like(student)
        loss = distillation.divergence_block(
            student, teacher, spec, counted, grad_scale=scale, grad_out=expected
        )
        ours = torch.full_like(student, float("nan"))
        with launches.recorded() as records:
            mine = triton_token.divergence_block(
                student, teacher, spec, counted, grad_scale=scale, grad_out=ours
            )
        assert [r.kernel for r in records] == ["_divergence_kernel"]
        _close(mine, loss, "loss")
        # the row's divergence (the sum of V terms, in another order) enters every element of the gradient
        _close(ours, expected, "grad", atol=1e-6)
        assert (ours[0] == 0).all()
    forward_only = triton_token.divergence_block(student, teacher, spec, None)
    _close(forward_only, distillation.divergence_block(student, teacher, spec, None), "loss, every row")
    in_place = student.clone()
    triton_token.divergence_block(student, teacher, spec, counted, grad_scale=scale, grad_out=in_place)
    _close(in_place, expected, "in-place grad", atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The public ops with impl="triton", float32, against the float64 oracle
# ----------------------------------------------------------------------------------------------------------

OPTIONS = [dict(), dict(temperature=0.7, logit_scale=1.3, softcap=3.0)]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("frozen", [False, True])
def test_linear_log_probs_on_triton_match_the_oracle(options, frozen, rng):
    x = torch.randn(3, 11, 24, generator=rng).to(DEVICE).requires_grad_()
    weight = (torch.randn(423, 24, generator=rng) / 24**0.5).to(DEVICE).requires_grad_(not frozen)
    bias = torch.randn(423, generator=rng).to(DEVICE).requires_grad_(not frozen)
    target = torch.randint(0, 423, (3, 11), generator=rng)
    target[0, :4] = -100
    target = target.to(DEVICE)
    g, h = torch.randn(3, 11, generator=rng).to(DEVICE), torch.randn(3, 11, generator=rng).to(DEVICE)
    out = softxent.linear_log_probs(
        x, weight, target, linear_bias=bias, chunk_size=8, impl="triton", **options
    )
    logits = to_numpy(x).reshape(-1, 24) @ to_numpy(weight).T + to_numpy(bias)
    flat = to_numpy(target).reshape(-1)
    expected = reference.log_probs(logits, flat, ignore_index=-100, **options)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(getattr(out, name).reshape(-1), getattr(expected, name), 1e-5, name)
    inputs = [x] if frozen else [x, weight, bias]
    grads = torch.autograd.grad((out.log_probs * g).sum() + (out.entropy * h).sum(), inputs)
    grad_logits = reference.log_probs_grad(
        logits, flat, to_numpy(g).reshape(-1), to_numpy(h).reshape(-1), ignore_index=-100, **options
    )
    assert_close(grads[0].reshape(-1, 24), grad_logits @ to_numpy(weight), 1e-5, "dx")
    if not frozen:
        assert_close(grads[1], grad_logits.T @ to_numpy(x).reshape(-1, 24), 1e-5, "dW")
        assert_close(grads[2], grad_logits.sum(0), 1e-5, "db")


@pytest.mark.parametrize(("kind", "beta"), DIVERGENCES[:3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_distillation_on_triton_matches_the_oracle(kind, beta, reduction, rng):
    xs = torch.randn(29, 16, generator=rng).to(DEVICE).requires_grad_()
    ws = (torch.randn(300, 16, generator=rng) / 4).to(DEVICE).requires_grad_()
    xt = torch.randn(29, 12, generator=rng).to(DEVICE)
    wt = (torch.randn(300, 12, generator=rng) / 3).to(DEVICE)
    target = torch.randint(0, 300, (29,), generator=rng)
    target[::4] = -100
    target = target.to(DEVICE)
    options = dict(divergence=kind, beta=beta, temperature=0.9, target=target, reduction=reduction)
    loss = softxent.linear_distillation_loss(xs, ws, xt, wt, chunk_size=8, impl="triton", **options)
    student, teacher = to_numpy(xs) @ to_numpy(ws).T, to_numpy(xt) @ to_numpy(wt).T
    oracle = dict(options, target=to_numpy(target))
    expected = reference.distillation_loss(student, teacher, **oracle)
    assert_close(loss, expected, 1e-5, "loss")
    weights = torch.rand(loss.shape, generator=rng).to(DEVICE) if reduction == "none" else None
    total = (loss * weights).sum() if weights is not None else loss
    dx, dw = torch.autograd.grad(total, [xs, ws])
    grad_logits = reference.distillation_loss_grad(student, teacher, **oracle)
    if weights is not None:  # the oracle's "none" gradient is that of the sum
        grad_logits = grad_logits * to_numpy(weights)[:, None]
    assert_close(dx, grad_logits @ to_numpy(ws), 1e-5, "dx")
    assert_close(dw, grad_logits.T @ to_numpy(xs), 1e-5, "dW")


# ----------------------------------------------------------------------------------------------------------
# Launches per call (a GPU's policy simulated: one launch over all rows of a block or chunk)
# ----------------------------------------------------------------------------------------------------------


def _kernels(records):
    return [(r.kernel, r.meta.get("WRITE_GRAD", None)) for r in records]


@pytest.mark.parametrize("rows", [1, 300, 1000])
def test_log_probs_on_logits_is_one_launch_each_way(rows, rng):
    logits = (torch.randn(rows, 517, generator=rng) * 3).to(DEVICE).requires_grad_()
    target = torch.randint(0, 517, (rows,), generator=rng).to(DEVICE)
    with policy.simulated(policy.H200), launches.recorded() as forward:
        out = softxent.log_probs(logits, target, temperature=0.8, impl="triton")
    with policy.simulated(policy.H200), launches.recorded() as backward:
        (out.log_probs.sum() + out.entropy.sum()).backward()
    assert _kernels(forward) == [("_log_prob_stats_kernel", False)]
    assert [r.kernel for r in backward] == ["_log_prob_grad_kernel"]
    assert backward[0].meta["HAS_G"]
    assert backward[0].meta["HAS_H"]


def test_only_logged_entropy_costs_backward_nothing_more(rng):
    logits = (torch.randn(64, 517, generator=rng) * 3).to(DEVICE).requires_grad_()
    target = torch.randint(0, 517, (64,), generator=rng).to(DEVICE)
    out = softxent.log_probs(logits, target, impl="triton")
    with launches.recorded() as backward:
        out.log_probs.sum().backward()
    assert [(r.kernel, r.meta["HAS_G"], r.meta["HAS_H"]) for r in backward] == [
        ("_log_prob_grad_kernel", True, False)
    ]


@pytest.mark.parametrize("frozen", [False, True])
def test_linear_log_probs_is_one_launch_a_chunk(frozen, rng):
    """Trainable head: a statistics launch a chunk forward, a gradient launch a chunk backward. Frozen head:
    the forward's launches write dX's logits gradient too, and backward launches nothing."""
    rows, chunk = 600, 256  # chunks of 256, 256, 88 rows
    x = torch.randn(rows, 32, generator=rng).to(DEVICE).requires_grad_()
    weight = torch.randn(517, 32, generator=rng).to(DEVICE).requires_grad_(not frozen)
    target = torch.randint(0, 517, (rows,), generator=rng).to(DEVICE)
    with policy.simulated(policy.H200), launches.recorded() as forward:
        out = softxent.linear_log_probs(x, weight, target, chunk_size=chunk, impl="triton")
    with policy.simulated(policy.H200), launches.recorded() as backward:
        out.log_probs.sum().backward()
    assert _kernels(forward) == [("_log_prob_stats_kernel", frozen)] * 3
    assert [r.kernel for r in backward] == ([] if frozen else ["_log_prob_grad_kernel"] * 3)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_distillation_is_one_launch_a_chunk(kind, rng):
    xs = torch.randn(600, 32, generator=rng).to(DEVICE).requires_grad_()
    ws = torch.randn(517, 32, generator=rng).to(DEVICE).requires_grad_()
    xt, wt = torch.randn(600, 24, generator=rng).to(DEVICE), torch.randn(517, 24, generator=rng).to(DEVICE)
    with policy.simulated(policy.H200), launches.recorded() as records:
        loss = softxent.linear_distillation_loss(
            xs, ws, xt, wt, divergence=kind, chunk_size=256, impl="triton"
        )
        loss.backward()
    assert _kernels(records) == [("_divergence_kernel", True)] * 3
    logits = (xs @ ws.T).detach().requires_grad_()
    with policy.simulated(policy.H200), launches.recorded() as records:
        softxent.distillation_loss(logits, xt @ wt.T, divergence=kind, impl="triton").backward()
    assert _kernels(records) == [("_divergence_kernel", True)]


def test_bf16_triton_log_probs_no_worse_than_eager(rng):
    """bf16 logits: the kernels read bf16 and compute in fp32, as the torch blocks do."""
    from helpers import assert_no_worse

    logits64 = torch.randn(64, 1023, generator=rng, dtype=torch.float64) * 4
    target = torch.randint(0, 1023, (64,), generator=rng)
    low = logits64.to(torch.bfloat16).to(DEVICE)
    out = softxent.log_probs(low, target.to(DEVICE), impl="triton")
    eager = torch.log_softmax(low.float(), -1).gather(-1, target.to(DEVICE)[:, None]).squeeze(-1)
    expected = reference.log_probs(logits64.numpy(), target.numpy()).log_probs
    assert_no_worse(out.log_probs, eager, expected, 1e-6, "log_probs")


@pytest.mark.parametrize("values", list(itertools.product([1e4, -1e4], [0.5, 2.0])))
def test_triton_log_probs_at_plus_minus_1e4(values, rng):
    magnitude, temperature = values
    logits = torch.randn(17, 300, generator=rng, dtype=torch.float64) * magnitude
    target = torch.randint(0, 300, (17,), generator=rng)
    out = softxent.log_probs(
        logits.float().to(DEVICE), target.to(DEVICE), temperature=temperature, impl="triton"
    )
    expected = reference.log_probs(logits.float().double().numpy(), target.numpy(), temperature=temperature)
    assert_close(out.log_probs, expected.log_probs, 1e-5, "log_probs")
    assert_close(out.entropy, expected.entropy, 1e-5, "entropy")
