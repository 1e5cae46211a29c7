"""Compile every Triton kernel configuration softxent launches for a real GPU, on a machine without one.

Run as a script (``python tests/triton_aot_worker.py OUT.json [--arch 90]``) with ``TRITON_INTERPRET`` unset,
so that ``@triton.jit`` makes compilable kernels. A stand-in driver reports a CUDA target (sm_90, an
H100/H200, by default) and the launchers' :func:`~softxent.ops.triton.launches.launch` is replaced by
``kernel.warmup``: each call of the ops below specializes and compiles its kernels exactly as the first launch
on that GPU would (the JIT's own argument specialization, Triton's passes, ptxas), and launches nothing.
The ops run on CPU tensors under the simulated H200 policy, so the launch shapes are the H200's; what
they compute is garbage and is not read.

The JSON written lists one record per compiled kernel: its name, constexprs, warps, registers per thread,
spill stores and loads, and shared memory, read from ptxas's report. tests/test_triton_aot.py runs this and
checks it; it catches what the interpreter cannot: code that Triton's GPU compiler refuses or that spills.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from softxent.ops import policy
from softxent.ops.triton import bce, cross_entropy, log_probs, slices


class StandInDriver:
    """Just enough of a Triton driver for ``JITFunction.warmup``: a target, a device, a stream."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


COMPILED: list[Any] = []


def compile_only(kernel, grid: tuple[int, ...], *args: object, **meta: object) -> None:
    COMPILED.append((kernel, meta, kernel.warmup(*args, grid=grid, **meta)))


@contextlib.contextmanager
def aot(arch: int) -> Iterator[None]:
    """Within the block, launches compile for sm_``arch`` and do not run (the stand-in driver stays
    active afterwards: there is no real one to go back to)."""
    modules = (cross_entropy, bce, slices, log_probs)
    launchers = [module.launch for module in modules]
    driver.set_active(StandInDriver(GPUTarget("cuda", arch, 32)))
    for module in modules:
        module.launch = compile_only
    try:
        # the ops refuse CPU tensors for impl="triton" outside the interpreter; the kernels are made already
        os.environ["TRITON_INTERPRET"] = "1"
        with policy.simulated(policy.H200):
            yield
    finally:
        os.environ.pop("TRITON_INTERPRET")
        for module, launcher in zip(modules, launchers, strict=True):
            module.launch = launcher


def softmax_cases() -> Iterator[tuple[str, int, int, dict[str, Any]]]:
    """(dtype, rows, classes, feature kwargs): every row path (registers, streaming, split) with each
    feature alone, all together, forward-only and in place."""
    features = [
        {},
        {"weight": True},
        {"label_smoothing": 0.1},
        {"z_loss": 1e-4},
        {"softcap": 30.0},
        {"probabilities": True},
        {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0},
        {"probabilities": True, "weight": True, "label_smoothing": 0.1, "softcap": 30.0},
    ]
    # 517 classes: whole rows in registers; 40000: two streaming passes; 8 rows of 128256: split
    for (rows, classes), options in itertools.product([(300, 517), (300, 40000), (8, 128256)], features):
        yield "bfloat16", rows, classes, options
    for rows, classes in [(300, 517), (300, 40000), (8, 128256)]:
        for dtype in ("float32", "float16"):
            yield dtype, rows, classes, {}
        yield "bfloat16", rows, classes, {"forward_only": True}
        yield "bfloat16", rows, classes, {"inplace": True}
        yield "bfloat16", rows, classes, {"probabilities": True, "target_grad": True}


def run_softmax(dtype: str, rows: int, classes: int, options: dict[str, Any]) -> None:
    import softxent

    dt = getattr(torch, dtype)
    logits = torch.randn(rows, classes).to(dt)
    if options.get("probabilities"):
        target = torch.softmax(torch.randn(rows, classes), 1).to(dt)
        target.requires_grad_(options.get("target_grad", False))
    else:
        target = torch.randint(0, classes, (rows,))
    kwargs = dict(
        weight=torch.rand(classes) if options.get("weight") else None,
        label_smoothing=options.get("label_smoothing", 0.0),
        z_loss=options.get("z_loss", 0.0),
        softcap=options.get("softcap"),
        impl="triton",
    )
    if options.get("inplace"):
        computed = logits.requires_grad_() * 1.0  # inplace_backward refuses a leaf that requires grad
        softxent.cross_entropy(computed, target, inplace_backward=True, **kwargs).backward()
    elif options.get("forward_only"):
        softxent.cross_entropy(logits, target, **kwargs)
    else:
        softxent.cross_entropy(logits.requires_grad_(), target, **kwargs).backward()


def run_bce() -> None:
    import softxent

    for dtype, reduction, weighted in itertools.product(
        ("float32", "bfloat16"), ("none", "mean", "sum"), (False, True)
    ):
        logits = torch.randn(300, 211).to(getattr(torch, dtype)).requires_grad_()
        target = torch.rand(300, 211).to(logits.dtype)
        extra = dict(weight=torch.rand(211), pos_weight=torch.rand(211) + 0.5) if weighted else {}
        loss = softxent.binary_cross_entropy_with_logits(
            logits, target, reduction=reduction, impl="triton", **extra
        )
        loss.sum().backward()


def run_lean() -> None:
    import softxent

    for dtype, smoothing in itertools.product(("float32", "bfloat16"), (0.0, 0.1)):
        dt = getattr(torch, dtype)
        x = torch.randn(64, 32).to(dt).requires_grad_()
        w = torch.randn(3000, 32).to(dt).requires_grad_()
        target = torch.randint(0, 3000, (64,))
        softxent.linear_cross_entropy(
            x, w, target, memory="lean", chunk_size=1024, label_smoothing=smoothing, impl="triton"
        ).backward()


def run_llm() -> None:
    """The per-token statistics and distillation kernels: rows in registers (517 classes) and streaming
    (40000), each transform, each incoming-gradient combination, a frozen head, every divergence."""
    import softxent

    for dtype, classes, softcap in itertools.product(("float32", "bfloat16"), (517, 40000), (None, 30.0)):
        dt = getattr(torch, dtype)
        logits = torch.randn(300, classes).to(dt).requires_grad_()
        target = torch.randint(0, classes, (300,))
        for which in ("both", "log_probs", "entropy"):
            out = softxent.log_probs(logits, target, temperature=0.9, softcap=softcap, impl="triton")
            total = out.log_probs.sum() if which != "entropy" else 0.0
            total = total + (out.entropy.sum() if which != "log_probs" else 0.0)
            total.backward()
        x = torch.randn(300, 32).to(dt).requires_grad_()
        frozen = torch.randn(classes, 32).to(dt)
        softxent.linear_log_probs(
            x, frozen, target, softcap=softcap, impl="triton"
        ).log_probs.sum().backward()
        teacher = torch.randn(300, classes).to(dt)
        for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)):
            softxent.distillation_loss(
                logits, teacher, divergence=divergence, beta=beta, teacher_softcap=softcap, impl="triton"
            ).backward()
            softxent.distillation_loss(
                logits.detach(), teacher, divergence=divergence, beta=beta, impl="triton"
            )


def resources(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """Registers, stack (spills) and shared memory of the one function in ``cubin`` (cuobjdump's
    ``-res-usage``: "REG:40 STACK:0 SHARED:0 LOCAL:0 ...")."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run(
            [cuobjdump, "-res-usage", handle.name], capture_output=True, text=True, check=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", report))
    return {key.lower(): int(value) for key, value in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset (the interpreter compiles nothing)")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with aot(args.arch):
        for case in softmax_cases():
            run_softmax(*case)
        run_bce()
        run_lean()
        run_llm()
    records = {}
    for kernel, meta, compiled in COMPILED:
        constexprs = {k: v for k, v in meta.items() if k != "num_warps"}
        key = json.dumps([kernel.fn.__name__, compiled.hash], sort_keys=True)
        if key not in records:
            records[key] = {
                "kernel": kernel.fn.__name__,
                "constexprs": constexprs,
                "num_warps": meta.get("num_warps", 4),
                "arch": args.arch,
                **resources(compiled.asm["cubin"], cuobjdump),
            }
    with open(args.out, "w") as handle:
        json.dump({"triton": triton.__version__, "kernels": list(records.values())}, handle, indent=1)
    print(f"{len(records)} kernel configurations compiled for sm_{args.arch}", file=sys.stderr)


if __name__ == "__main__":
    main()
