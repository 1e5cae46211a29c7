"""The per-rank body of tests/test_vocab_parallel.py, run in Gloo processes (torch.multiprocessing spawn).

Each rank builds the same full inputs from a shared seed, keeps its own slice of the classes, runs the
vocabulary-parallel op and compares the loss and its gradients with the single-device softxent op on the
gathered tensors (itself tested against the float64 reference elsewhere). A mismatch is recorded, not
raised at once, so that every rank runs the same collectives to the end; the failures are raised last.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

import softxent
from softxent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

FEATURES = [
    {},
    {"weight": True},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 8.0},
]
REDUCTIONS = ["mean", "sum", "none"]
# where this rank's tensors live: the CPU with Gloo, the rank's GPU with NCCL (set by run)
DEVICE = torch.device("cpu")


def on(t: Tensor) -> Tensor:
    """``t`` (made on the CPU from the shared generator) on this rank's device."""
    return t.to(DEVICE)


def bounds_for(num_classes: int, world: int, empty_shard: bool) -> list[int]:
    """Uneven shard bounds: rank r holds [bounds[r], bounds[r + 1]); optionally rank 1's shard is empty."""
    cuts = [0] + [round(num_classes * (r + 1) ** 1.3 / world**1.3) for r in range(world)]
    if empty_shard and world >= 3:
        cuts[2] = cuts[1]
    cuts[-1] = num_classes
    return cuts


class Checker:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failures: list[str] = []

    def close(self, what: str, actual: Tensor, expected: Tensor, rtol: float, atol: float) -> None:
        actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
        if actual.shape != expected.shape:
            self.failures.append(f"rank {self.rank} {what}: shape {actual.shape} != {expected.shape}")
            return
        finite = torch.isfinite(expected)
        if not torch.equal(finite, torch.isfinite(actual)) or not torch.equal(
            actual[~finite].nan_to_num(), expected[~finite].nan_to_num()
        ):
            self.failures.append(f"rank {self.rank} {what}: non-finite values differ")
            return
        diff = (actual[finite] - expected[finite]).abs()
        allowed = atol + rtol * expected[finite].abs()
        if diff.numel() and bool((diff > allowed).any()):
            worst = int((diff - allowed).argmax())
            self.failures.append(
                f"rank {self.rank} {what}: max diff {diff.max().item():.3g} (worst "
                f"{actual[finite][worst]:.6g} vs {expected[finite][worst]:.6g}, rtol {rtol}, atol {atol})"
            )

    def no_worse(self, what: str, actual: Tensor, baseline: Tensor, truth: Tensor, slack: float) -> None:
        """‖actual − truth‖ ≤ (1 + slack)·‖baseline − truth‖ + 1e-6·‖truth‖: low-precision results as
        close to the float64 truth as the single-device op's (their roundings differ, so not to each
        other)."""
        truth = truth.detach().double()
        scale = truth.norm().item()
        error = (actual.detach().double() - truth).norm().item()
        allowed = (1 + slack) * (baseline.detach().double() - truth).norm().item() + 1e-6 * scale
        if not error <= allowed:
            self.failures.append(f"rank {self.rank} {what}: error {error:.3g} > allowed {allowed:.3g}")

    def raises(
        self, what: str, match: str, call: Callable[[], object], error_type: type[Exception] = ValueError
    ) -> None:
        try:
            call()
        except error_type as error:
            if match not in str(error):
                self.failures.append(f"rank {self.rank} {what}: message {error!r} lacks {match!r}")
            return
        self.failures.append(f"rank {self.rank} {what}: no {error_type.__name__}")


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) between two fp32-math computations of the same loss, by input dtype. A bf16/fp16
    gradient is rounded to the input dtype twice (when formed, and when backward scales it by the
    incoming gradient), so two results may differ by two ulps of it (an ulp: 2^-7 relative for bf16,
    2^-10 for fp16)."""
    return {
        torch.float64: (1e-10, 1e-12),
        torch.float32: (2e-5, 1e-6),
        torch.bfloat16: (2**-6, 1e-5),
        torch.float16: (2**-9, 1e-6),
    }[dtype]


def make_logits(generator: torch.Generator, rows: int, classes: int, extreme: bool) -> Tensor:
    logits = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3
    if extreme:
        logits[::4] *= 3000  # ±1e4 logits
        mask = torch.rand(rows, classes, generator=generator) < 0.1
        logits[mask] = float("-inf")
    return logits


def make_target(generator: torch.Generator, logits: Tensor, all_ignored: bool) -> Tensor:
    rows, classes = logits.shape
    target = torch.randint(0, classes, (rows,), generator=generator)
    if all_ignored:
        return torch.full_like(target, -100)
    finite = torch.isfinite(logits.gather(1, target.unsqueeze(1))).squeeze(1)
    target = torch.where(finite, target, logits.argmax(1))  # the true class never −inf
    target[torch.rand(rows, generator=generator) < 0.2] = -100
    return target


def logits_cases(full: bool) -> list[tuple[torch.dtype, dict, str, bool]]:
    """(dtype, features, reduction, extreme): float32 with every feature and reduction, extreme logits
    (±1e4, −inf masks, an empty shard, an all-ignored batch) on every other one; float64 and bfloat16 with
    the plain and the all-features loss. Not ``full``: the all-features loss only (the Triton kernels,
    slow in the interpreter)."""
    features = FEATURES if full else FEATURES[-1:]
    cases = [
        (torch.float32, feature, reduction, (i + j) % 2 == 1)
        for i, feature in enumerate(features)
        for j, reduction in enumerate(REDUCTIONS)
    ]
    for dtype in (torch.float64, torch.bfloat16):
        cases += [(dtype, feature, reduction, False) for feature in features[:: len(features) - 1 or 1]
                  for reduction in REDUCTIONS]  # fmt: skip
    return cases


def linear_cases(full: bool) -> list[tuple[torch.dtype, dict, str, bool, int | None]]:
    """(dtype, features, reduction, bias, chunk_size): as :func:`logits_cases`, with and without a bias,
    in one chunk or in chunks of 8 rows (five chunks; an empty shard on the third rank)."""
    features = [*FEATURES[::2], FEATURES[-1]] if full else FEATURES[-1:]
    cases = [
        (torch.float32, feature, reduction, (i + j) % 2 == 0, 8 if (i + j) % 2 else None)
        for i, feature in enumerate(features)
        for j, reduction in enumerate(REDUCTIONS)
    ]
    for dtype in (torch.float64, torch.bfloat16):
        cases += [(dtype, features[-1], reduction, False, 8) for reduction in ("mean", "none")]
    return cases


def check_logits_cases(check: Checker, rank: int, world: int, seed: int, impl: str, full: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows, classes = 37, 1031
    for dtype, features, reduction, extreme in logits_cases(full):
        bounds = bounds_for(classes, world, empty_shard=extreme)
        logits = make_logits(generator, rows, classes, extreme)
        target = on(make_target(generator, logits, all_ignored=extreme and reduction == "sum"))
        logits = on(logits.to(dtype))
        weight = on(torch.rand(classes, generator=generator) + 0.5) if features.get("weight") else None
        options = {k: v for k, v in features.items() if k != "weight"}
        what = f"logits {dtype} {features} {reduction} extreme={extreme} bounds={bounds}"

        shard = logits[:, bounds[rank] : bounds[rank + 1]].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(
            shard, target, weight=weight, reduction=reduction, impl=impl, **options
        )
        upstream = on(torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5)
        (loss * upstream.to(loss.dtype)).sum().backward()

        whole = logits.clone().requires_grad_()
        expected = softxent.cross_entropy(whole, target, weight, reduction=reduction, impl=impl, **options)
        (expected * upstream.to(expected.dtype)).sum().backward()
        rtol, atol = tolerances(dtype)
        check.close(
            f"{what}: loss", loss, expected, max(rtol, 2e-5) if dtype != torch.float64 else rtol, atol
        )
        check.close(f"{what}: grad", shard.grad, whole.grad[:, bounds[rank] : bounds[rank + 1]], rtol, atol)

    # a batch shape (3, 5, C_r): classes last, loss (3, 5) for "none"
    bounds = bounds_for(classes, world, empty_shard=False)
    logits = on(torch.randn(3, 5, classes, generator=generator))
    target = on(torch.randint(0, classes, (3, 5), generator=generator))
    shard = logits[..., bounds[rank] : bounds[rank + 1]]
    loss = vocab_parallel_cross_entropy(shard, target, reduction="none", impl=impl)
    expected = softxent.cross_entropy(
        logits.reshape(15, classes), target.reshape(15), reduction="none", impl=impl
    )
    check.close("batch shape (3, 5): loss", loss, expected.view(3, 5), 2e-5, 1e-6)


def check_linear_cases(check: Checker, rank: int, world: int, seed: int, impl: str, full: bool) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    rows, features, classes = 37, 65, 1031
    for dtype, feature, reduction, bias, chunk_size in linear_cases(full):
        bounds = bounds_for(classes, world, empty_shard=chunk_size is not None)
        x = on(torch.randn(rows, features, generator=generator, dtype=torch.float64).to(dtype))
        w = on((torch.randn(classes, features, generator=generator, dtype=torch.float64) / 3).to(dtype))
        b = on(torch.randn(classes, generator=generator, dtype=torch.float64).to(dtype)) if bias else None
        target = torch.randint(0, classes, (rows,), generator=generator)
        target[torch.rand(rows, generator=generator) < 0.2] = -100
        target = on(target)
        weight = on(torch.rand(classes, generator=generator) + 0.5) if feature.get("weight") else None
        options = {k: v for k, v in feature.items() if k != "weight"}
        what = f"linear {dtype} {feature} {reduction} bias={bias} chunk={chunk_size} bounds={bounds}"
        mine = slice(bounds[rank], bounds[rank + 1])

        x_vp = x.clone().requires_grad_()
        w_vp = w[mine].clone().requires_grad_()
        b_vp = b[mine].clone().requires_grad_() if b is not None else None
        loss = vocab_parallel_linear_cross_entropy(
            x_vp, w_vp, target, linear_bias=b_vp, weight=weight, reduction=reduction,
            chunk_size=chunk_size, impl=impl, **options,
        )  # fmt: skip
        upstream = on(torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5)
        (loss * upstream.to(loss.dtype)).sum().backward()

        x_sd, w_sd = x.clone().requires_grad_(), w.clone().requires_grad_()
        b_sd = b.clone().requires_grad_() if b is not None else None
        expected = softxent.linear_cross_entropy(
            x_sd, w_sd, target, linear_bias=b_sd, weight=weight, reduction=reduction, impl=impl, **options
        )
        (expected * upstream.to(expected.dtype)).sum().backward()
        rtol, atol = tolerances(dtype)
        if dtype in (torch.float32, torch.float64):
            check.close(f"{what}: loss", loss, expected, rtol, atol)
            check.close(f"{what}: dX", x_vp.grad, x_sd.grad, rtol, atol)
            check.close(f"{what}: dW", w_vp.grad, w_sd.grad[mine], rtol, atol)
            if b is not None:
                check.close(f"{what}: db", b_vp.grad, b_sd.grad[mine], rtol, atol)
            continue
        # low precision: the logits are rounded to the input dtype by matmuls of other shapes than the
        # single-device op's, so compare both with the float64 truth
        x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
        truth = softxent.linear_cross_entropy(x64, w64, target, weight=weight, reduction=reduction, **options)
        (truth * upstream).sum().backward()
        check.no_worse(f"{what}: loss", loss, expected, truth, 0.5)
        check.no_worse(f"{what}: dX", x_vp.grad, x_sd.grad, x64.grad, 0.5)
        check.no_worse(f"{what}: dW", w_vp.grad, w_sd.grad[mine], w64.grad[mine], 0.5)

    # no gradient wanted: the loss alone (the same collectives, no backward)
    x = on(torch.randn(rows, features, generator=generator))
    w = on(torch.randn(classes, features, generator=generator))
    target = on(torch.randint(0, classes, (rows,), generator=generator))
    bounds = bounds_for(classes, world, empty_shard=False)
    with torch.no_grad():
        loss = vocab_parallel_linear_cross_entropy(x, w[bounds[rank] : bounds[rank + 1]], target, impl=impl)
    expected = softxent.linear_cross_entropy(x, w, target, impl=impl)
    check.close("linear no_grad: loss", loss, expected, 2e-5, 1e-6)


def check_probability_cases(check: Checker, rank: int, world: int, seed: int, impl: str, full: bool) -> None:
    """Probability targets (soft labels), each rank holding its classes' columns: the loss, the logits' (or
    dX, dW, db) and the targets' gradients against the single-device op on the gathered tensors; an empty
    shard on the third rank, ±1e4 logits in one case."""
    generator = torch.Generator().manual_seed(seed + 3)
    rows, features, classes = 23, 17, 517
    cases = [(f, r) for f in (FEATURES if full else FEATURES[-1:]) for r in REDUCTIONS[:: 1 if full else 2]]
    for i, (feature, reduction) in enumerate(cases):
        bounds = bounds_for(classes, world, empty_shard=i % 2 == 1)
        mine = slice(bounds[rank], bounds[rank + 1])
        dtype = torch.float64 if i % 4 == 3 else torch.float32
        logits = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3
        if i % 3 == 2:
            logits[::4] *= 3000  # ±1e4 logits
        probs = torch.softmax(torch.randn(rows, classes, generator=generator, dtype=torch.float64), 1)
        logits, probs = on(logits.to(dtype)), on(probs.to(dtype))
        weight = on(torch.rand(classes, generator=generator) + 0.5) if feature.get("weight") else None
        options = {k: v for k, v in feature.items() if k != "weight"}
        upstream = on(torch.rand(rows, generator=generator, dtype=torch.float64) + 0.5)
        rtol, atol = tolerances(dtype)
        what = f"probabilities {dtype} {feature} {reduction} bounds={bounds}"

        shard, target = logits[:, mine].clone().requires_grad_(), probs[:, mine].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(
            shard, target, weight=weight, reduction=reduction, impl=impl, **options
        )
        (loss * (upstream if reduction == "none" else 1.0)).sum().backward()
        whole, whole_target = logits.clone().requires_grad_(), probs.clone().requires_grad_()
        expected = softxent.cross_entropy(
            whole, whole_target, weight, reduction=reduction, impl=impl, **options
        )
        (expected * (upstream if reduction == "none" else 1.0)).sum().backward()
        check.close(f"{what}: loss", loss, expected, rtol, atol)
        check.close(f"{what}: grad", shard.grad, whole.grad[:, mine], rtol, atol)
        check.close(f"{what}: target grad", target.grad, whole_target.grad[:, mine], rtol, atol)

        x = on(torch.randn(rows, features, generator=generator, dtype=torch.float64).to(dtype))
        w = on((torch.randn(classes, features, generator=generator, dtype=torch.float64) / 3).to(dtype))
        b = on(torch.randn(classes, generator=generator, dtype=torch.float64).to(dtype))
        x_vp, w_vp, b_vp = (t.clone().requires_grad_() for t in (x, w[mine], b[mine]))
        target = probs[:, mine].clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(
            x_vp, w_vp, target, linear_bias=b_vp, weight=weight, reduction=reduction,
            chunk_size=8 if i % 2 else None, impl=impl, **options,
        )  # fmt: skip
        (loss * (upstream if reduction == "none" else 1.0)).sum().backward()
        x_sd, w_sd, b_sd, whole_target = (t.clone().requires_grad_() for t in (x, w, b, probs))
        expected = softxent.linear_cross_entropy(
            x_sd, w_sd, whole_target, linear_bias=b_sd, weight=weight, reduction=reduction, impl=impl,
            **options,
        )  # fmt: skip
        (expected * (upstream if reduction == "none" else 1.0)).sum().backward()
        check.close(f"linear {what}: loss", loss, expected, rtol, atol)
        check.close(f"linear {what}: dX", x_vp.grad, x_sd.grad, rtol, atol)
        check.close(f"linear {what}: dW", w_vp.grad, w_sd.grad[mine], rtol, atol)
        check.close(f"linear {what}: db", b_vp.grad, b_sd.grad[mine], rtol, atol)
        check.close(f"linear {what}: target grad", target.grad, whole_target.grad[:, mine], rtol, atol)


def check_errors(check: Checker, rank: int, world: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 2)
    classes = 50
    bounds = bounds_for(classes, world, empty_shard=False)
    logits = on(torch.randn(6, classes, generator=generator))
    target = on(torch.randint(0, classes, (6,), generator=generator))
    shard = logits[:, bounds[rank] : bounds[rank + 1]]
    # a target outside every shard (every rank passes the same one)
    bad = target.clone()
    bad[2] = classes
    check.raises(
        "target outside every shard", "outside every shard", lambda: vocab_parallel_cross_entropy(shard, bad)
    )
    # rows that differ between ranks: the last rank holds one row less
    rows = 5 if rank == world - 1 else 6
    check.raises(
        "mismatched rows",
        "expected the same rows",
        lambda: vocab_parallel_cross_entropy(shard[:rows], target[:rows]),
    )
    # class weights that are not the whole vocabulary's
    check.raises(
        "shard-sized class weights",
        "whole vocabulary's class weights",
        lambda: vocab_parallel_cross_entropy(shard, target, weight=on(torch.ones(shard.shape[1]))),
    )
    # linear: in_features that differ between ranks
    features = 7 if rank == 0 else 8
    check.raises(
        "mismatched in_features",
        "same in_features",
        lambda: vocab_parallel_linear_cross_entropy(
            on(torch.randn(6, features)), on(torch.randn(bounds[rank + 1] - bounds[rank], features)), target
        ),
    )
    # probabilities on one rank, class indices on the others
    mixed = on(torch.rand(shard.shape, generator=generator)) if rank == 0 else target
    check.raises(
        "mixed target kinds", "the same kind of target", lambda: vocab_parallel_cross_entropy(shard, mixed)
    )
    # the same range of targets but not the same targets: two rows swapped on the last rank
    swapped = target.clone()
    if rank == world - 1:
        swapped[[0, 1]] = swapped[[1, 0]] if swapped[0] != swapped[1] else swapped[[0, 1]] + 1
    check.raises(
        "different targets",
        "the same class-index targets on every rank",
        lambda: vocab_parallel_cross_entropy(shard, swapped),
    )
    # an argument error on one rank only: that rank raises its own error, every other rank a ValueError
    # naming it, after the one collective they all reach (no rank waits in the next one)
    last = world - 1
    reduction = "avg" if rank == last else "mean"
    check.raises(
        "one rank's bad reduction",
        "reduction: expected 'mean', 'sum' or 'none', got 'avg'"
        if rank == last
        else f"another rank's arguments failed a check (rank {last}: reduction: expected",
        lambda: vocab_parallel_cross_entropy(shard, target, reduction=reduction),
    )
    flags = on(torch.ones(6, dtype=torch.bool)) if rank == 0 else target
    check.raises(
        "one rank's bool target",
        "target: expected integer class indices" if rank == 0 else "rank 0: target: expected integer",
        lambda: vocab_parallel_cross_entropy(shard, flags),
        TypeError if rank == 0 else ValueError,
    )
    w_shard = on(torch.randn(bounds[rank + 1] - bounds[rank], 4))
    bias = on(torch.randn(w_shard.shape[0] + (1 if rank == 0 else 0)))
    check.raises(
        "one rank's bias of the wrong shape",
        "linear_bias: expected shape" if rank == 0 else "rank 0: linear_bias: expected shape",
        lambda: vocab_parallel_linear_cross_entropy(on(torch.randn(6, 4)), w_shard, target, linear_bias=bias),
    )
    # the group still works after the errors (every rank raised, none is left waiting)
    loss = vocab_parallel_cross_entropy(shard, target)
    check.close("after errors: loss", loss, softxent.cross_entropy(logits, target), 2e-5, 1e-6)


def run(rank: int, world: int, init_file: str, seed: int, impls: list[str], backend: str = "gloo") -> None:
    """One rank's checks: Gloo on CPU tensors, or NCCL with rank r on GPU r."""
    global DEVICE
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    check = Checker(rank)
    try:
        for impl in impls:
            # the torch backend on every case, the Triton kernels (interpreted on a CPU: slow) on a few
            check_logits_cases(check, rank, world, seed, impl, full=impl == "torch")
            check_linear_cases(check, rank, world, seed, impl, full=impl == "torch")
            check_probability_cases(check, rank, world, seed, impl, full=impl == "torch")
        check_errors(check, rank, world, seed)
    finally:
        dist.destroy_process_group()
    if check.failures:
        raise AssertionError(
            f"{len(check.failures)} mismatches (seed {seed}):\n" + "\n".join(check.failures[:30])
        )
    # Every check has passed and the group is destroyed. Leave without the interpreter's teardown: with
    # Gloo on a CPU one rank in a few aborts there ("terminate called without an active exception", a
    # C++ thread still joinable in a static destructor) after its work is done, failing a correct run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
