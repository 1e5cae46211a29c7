"""GPU benchmark: softxent's Triton kernels against their peers in one run, bf16 inputs.

Linear head: x (N, D) and W (V, D) in bfloat16, both requiring grad; y (N,) int64 with ~5% set to -100:
  eager          F.cross_entropy((x @ W.T).float(), y)
  compile        torch.compile(eager, dynamic=False)
  liger          liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss()(W, x, y)   (weight first)
  cce            cut_cross_entropy.linear_cross_entropy(x, W, y)   (its default filter_eps="high")
  softxent       softxent.linear_cross_entropy(x, W, y)
  softxent-lean  softxent.linear_cross_entropy(x, W, y, memory="lean")
Multi-label linear head (sigmoid BCE): x (N, D), W (V, D) as above, targets (N, V) bf16 0/1:
  eager          F.binary_cross_entropy_with_logits((x @ W.T).float(), target.float())
  compile        torch.compile(eager, dynamic=False)
  softxent       softxent.linear_binary_cross_entropy(x, W, target)
  softxent-lean  softxent.linear_binary_cross_entropy(x, W, target, memory="lean")
Cross-entropy on given logits (N, V) in bfloat16, requiring grad:
  eager          F.cross_entropy(logits.float(), y)
  compile        torch.compile(eager, dynamic=False)
  liger          liger_kernel.transformers.LigerCrossEntropyLoss()(logits, y)   (writes dlogits in place)
  softxent       softxent.cross_entropy(logits, y)
  softxent-inplace  softxent.cross_entropy(logits, y, inplace_backward=True)
Sigmoid binary cross-entropy on given logits (N, C) in bfloat16, requiring grad; targets (N, C) bf16 0/1:
  eager          F.binary_cross_entropy_with_logits(logits.float(), target.float())
  compile        torch.compile(eager, dynamic=False)
  softxent       softxent.binary_cross_entropy_with_logits(logits, target)

Columns, per shape and method:
  fwd+bwd ms   median time of loss + backward (CUDA events; gradients set to None before each run)
  fwd ms       median time of the loss alone under torch.no_grad, on inputs that do not require grad
  × floor      time over the physical floor measured in this run: linear head, 3 × one (N, D)×(D, V) bf16
               matmul (forward alone: 1 ×); cross-entropy, reading the bf16 logits once and writing the bf16
               gradient once at the measured device-to-device copy bandwidth (forward alone: the read); binary
               cross-entropy, reading logits and targets and writing the gradient (forward: the reads)
  peak GiB     torch.cuda.max_memory_allocated during one forward+backward, above the inputs and their
               gradients (a gradient that aliases its input, as Liger's cross-entropy does, counts once)
  rel err      ‖a − ref‖ / ‖ref‖ of the loss and each gradient; reference: the same loss in float32 (TF32
               off) on x.float(), W.float() for the linear head, torch's F.cross_entropy in float64 on the
               logits, both in row chunks (float64 throughout at smoke sizes)
A method that runs out of memory shows "OOM" and the run goes on; a peer that cannot run here is skipped
with the reason printed under the table. Under each table: softxent's kernel launches per call, and the
issues' targets, each marked pass or miss: GPU part 1, the losses on logits at most 1.15× their floors
(forward+backward and forward alone), in place no slower; GPU part 2, both linear heads in speed mode at
most 1.05× the matmul floor with at most a float32 (V, D) buffer + 0.25 GiB beyond inputs and gradients,
in lean mode at most 1.40× with at most a float32 (N, D) buffer + 0.1 GiB, gradients within 5% of eager's
error.

`--breakdown` (instead of the tables) times the speed-mode head's parts on one chunk (logits matmul, row
kernel, dX, dW as one bf16 matmul and accumulated in float32), the whole head under its policy and at
chunk sizes of 128 MiB to 2 GiB, and the lean head with dX-sized and 64 MiB slices, each with its float32
sum on the main stream and on a second one, beside the floor and the memory target.

`--quick` fits the whole comparison in a few minutes (one warm-up, a 40 ms budget a measurement, torch.compile
timed forward+backward only, so compiled once a shape). `--sweep` times softxent's cross-entropy on the
cross-entropy shapes with other launch shapes of its row kernel (columns a block, warps, the widest row
held in registers: softxent.ops.policy's constants), for choosing them on a new GPU.

On the GPU machine (no internet): the peers' wheels are fetched here, into .whl/ (listed in
.git/info/exclude), with

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1

(both are pure-Python py3-none-any wheels), carried along, and there installed and run with

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site:src
    python3 benchmarks/bench_gpu.py --json $OUT/bench_gpu.json

About 5–8 minutes on an H100, most of it torch.compile (two compilations a shape) and Triton's first
compilations; the largest shape of each family runs last. Where a command may take 10 minutes at most and
that is too tight, `--quick`, or `--only linear`, `--only ce` and `--only bce` (each with its own --json).
`benchmarks/gpu_check.sh` runs the GPU tests, `--quick`, `--sweep` and `--breakdown` in one time-boxed call.

End to end on a CPU at tiny shapes (peers that need CUDA are skipped, with the reason):

    python benchmarks/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import softxent
from softxent.ops import policy
from softxent.ops.triton import launches

IGNORE_INDEX = -100
IGNORED_FRACTION = 0.05
LOGIT_STD = 3.0  # x ~ N(0, 1), W ~ N(0, (LOGIT_STD/√D)²): logits with the spread of a trained LM head
DTYPE = torch.bfloat16

LINEAR_SHAPES = ((8192, 4096, 128256), (8192, 2304, 256000), (32768, 4096, 128256))
LINEAR_BCE_SHAPES = ((8192, 4096, 32768), (8192, 4096, 128256))  # dense (N, V) targets: 0.5G, 2G
# 0.13G, 1.1G, 2.1G, 4.2G logits: largest last; 512 rows are too few for one program a row on a large GPU
CE_SHAPES = ((512, 256000), (8192, 128256), (65536, 32000), (16384, 256000))
BCE_SHAPES = ((8192, 32000), (32768, 16384))  # multi-label heads: 0.26G and 0.54G logits
SMOKE_LINEAR_SHAPES = ((64, 32, 1000), (37, 65, 1031))
SMOKE_LINEAR_BCE_SHAPES = ((64, 32, 1000), (37, 65, 1031))
SMOKE_CE_SHAPES = ((64, 1000), (37, 1031))
SMOKE_BCE_SHAPES = ((64, 1000), (37, 1031))
FAMILIES = {
    "linear": "linear head + cross-entropy",
    "linear-bce": "multi-label linear head + sigmoid binary cross-entropy",
    "ce": "cross-entropy on logits",
    "bce": "binary cross-entropy on logits",
}
# inputs of each family that require grad (the first ones)
DIFFERENTIABLE = {"linear": 2, "linear-bce": 2, "ce": 1, "bce": 1}
HEADS = ("linear", "linear-bce")
POSITIVE_FRACTION = 0.05  # of the binary cross-entropy's targets
TARGET_RATIO = 1.15  # GPU part 1: softxent's losses on logits at most 1.15× their floors
# GPU part 2: the linear heads' (time over the matmul floor, memory beyond a float32 buffer in GiB, the
# buffer: dW's (V, D) for speed, dX's (N, D) for lean), and their gradients' error over eager's
HEAD_TARGETS = {"softxent": (1.05, 0.25, "VD"), "softxent-lean": (1.40, 0.1, "ND")}
ERROR_RATIO = 1.05
# --sweep: launch shapes of the softmax row kernel to try (columns a streaming block, its warps) and the
# widest row held in registers (its block and warps)
SWEEP_STREAM = ((4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32), (32768, 32))
SWEEP_IN_REGISTERS = ((16384, 32), (32768, 32))

# --breakdown: chunk sizes (bytes of bf16 logits; with dW on a second stream, of its two slots together)
# at which the speed-mode head is timed, with and without the second stream
BREAKDOWN_CHUNK_BYTES = (1 << 27, 1 << 28, 1 << 29, 1 << 30, 1 << 31)
SMOKE_BREAKDOWN_CHUNK_BYTES = (1 << 20, 1 << 22)

MIN_REPEATS, MAX_REPEATS = 3, 25
CHUNK_ELEMENTS = 1 << 26  # logits per chunk of the references and the error sums (256 MiB in float32)
SMALL_ELEMENTS = 1 << 24  # N·V at or below which the linear-head reference runs in float64

InputMaker = Callable[[], tuple[Tensor, ...]]
LossFn = Callable[..., Tensor]
ErrorCheck = Callable[[Tensor, list[Tensor]], dict[str, float]]


class Skipped(Exception):
    """A method that cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------- inputs


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _targets(n: int, num_classes: int, device: torch.device, seed: int) -> Tensor:
    """Class indices (N,), about IGNORED_FRACTION of them set to IGNORE_INDEX."""
    generator = _generator(device, seed)
    target = torch.randint(0, num_classes, (n,), device=device, generator=generator)
    ignored = torch.rand(n, device=device, generator=generator) < IGNORED_FRACTION
    return target.masked_fill_(ignored, IGNORE_INDEX)


def linear_inputs(shape: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """x: (N, D), W: (V, D) in bf16 (logits std ≈ LOGIT_STD) and y: (N,); the same values on every call."""
    n, d, v = shape
    generator = _generator(device, 0)
    x = torch.randn(n, d, device=device, dtype=DTYPE, generator=generator)
    weight = torch.randn(v, d, device=device, dtype=DTYPE, generator=generator).mul_(LOGIT_STD / d**0.5)
    return x, weight, _targets(n, v, device, 1)


def linear_bce_inputs(shape: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """x: (N, D), W: (V, D) as :func:`linear_inputs` makes them, and targets (N, V) in bf16, 1 with
    probability POSITIVE_FRACTION, else 0; the same values on every call."""
    n, _, v = shape
    x, weight, _ = linear_inputs(shape, device)
    positive = torch.rand(n, v, device=device, generator=_generator(device, 2)) < POSITIVE_FRACTION
    return x, weight, positive.to(DTYPE)


def ce_inputs(shape: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """logits: (N, V) in bf16 with std LOGIT_STD, and y: (N,); the same values on every call."""
    n, v = shape
    logits = torch.randn(n, v, device=device, dtype=DTYPE, generator=_generator(device, 0)).mul_(LOGIT_STD)
    return logits, _targets(n, v, device, 1)


def bce_inputs(shape: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """logits: (N, C) in bf16 with std LOGIT_STD, and targets (N, C) in bf16, 1 with probability
    POSITIVE_FRACTION, else 0; the same values on every call."""
    n, c = shape
    logits = torch.randn(n, c, device=device, dtype=DTYPE, generator=_generator(device, 0)).mul_(LOGIT_STD)
    positive = torch.rand(n, c, device=device, generator=_generator(device, 1)) < POSITIVE_FRACTION
    return logits, positive.to(DTYPE)


# --------------------------------------------------------------------------------------------- methods


def _eager_linear(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy((x @ weight.T).float(), target)


def _eager_linear_bce(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits((x @ weight.T).float(), target.float())


def _eager_ce(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), target)


def _eager_bce(logits: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


class _Computed(torch.autograd.Function):
    """The benchmark's leaf logits as a graph's output, as a model's lm_head gives them (inplace_backward
    refuses a leaf that requires grad): the same storage, the gradient passed through untouched, so that
    the leaf's .grad takes over the buffer the gradient was written into."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:  # type: ignore[override]
        return logits.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def _softxent_inplace(logits: Tensor, target: Tensor) -> Tensor:
    return softxent.cross_entropy(_Computed.apply(logits), target, inplace_backward=True)


def _compiled(fn: LossFn) -> LossFn:
    """torch.compile of fn; a compiler failure skips the method rather than ending the run."""
    compiled = torch.compile(fn, dynamic=False)

    def call(*args: Tensor) -> Tensor:
        try:
            return compiled(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:
            raise Skipped(f"torch.compile failed here: {_describe(error)}") from error

    return call


def _peer(module: str, name: str, device: torch.device) -> object:
    """A peer's loss, or Skipped when its package is missing or the device is not CUDA (Triton kernels)."""
    try:
        loss = getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise Skipped(f"{module} is not importable ({error})") from None
    if device.type != "cuda":
        raise Skipped(f"{module}.{name} needs CUDA (Triton kernels); the device is {device.type}")
    return loss


def _softxent_lean(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    try:
        return softxent.linear_cross_entropy(x, weight, target, memory="lean")
    except TypeError as error:
        if "'memory'" in str(error):
            raise Skipped("memory= not available") from None
        raise


def _liger_linear(device: torch.device) -> LossFn:
    liger = _peer("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss", device)()
    return lambda x, weight, target: liger(weight, x, target)  # Liger takes the weight first


# Each family's eager loss (also what torch.compile compiles), and its other methods: a method's loss from
# the device (a peer that cannot run there raises Skipped). Linear heads are called as fn(x, W, target),
# losses on logits as fn(logits, target).
EAGER = {"linear": _eager_linear, "linear-bce": _eager_linear_bce, "ce": _eager_ce, "bce": _eager_bce}
OTHER_METHODS: dict[str, dict[str, Callable[[torch.device], LossFn]]] = {
    "linear": {
        "liger": _liger_linear,
        "cce": partial(_peer, "cut_cross_entropy", "linear_cross_entropy"),
        "softxent": lambda device: softxent.linear_cross_entropy,
        "softxent-lean": lambda device: _softxent_lean,
    },
    "linear-bce": {
        "softxent": lambda device: softxent.linear_binary_cross_entropy,
        "softxent-lean": lambda device: partial(softxent.linear_binary_cross_entropy, memory="lean"),
    },
    "ce": {
        "liger": lambda device: _peer("liger_kernel.transformers", "LigerCrossEntropyLoss", device)(),
        "softxent": lambda device: softxent.cross_entropy,
        "softxent-inplace": lambda device: _softxent_inplace,
    },
    "bce": {"softxent": lambda device: softxent.binary_cross_entropy_with_logits},
}


# every family's methods, in the order of its table
METHODS = {family: ("eager", "compile", *others) for family, others in OTHER_METHODS.items()}


def loss_fn(family: str, method: str, device: torch.device) -> LossFn:
    """The loss of ``method`` in ``family`` on ``device``."""
    if method == "eager":
        return EAGER[family]
    if method == "compile":
        return _compiled(EAGER[family])
    if method not in OTHER_METHODS[family]:
        raise ValueError(f"method: expected one of {METHODS[family]} for {family}, got {method!r}")
    return OTHER_METHODS[family][method](device)


# ---------------------------------------------------------------------------------- timing and memory


def _once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU (host syncs inside fn count), perf_counter on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, budget_ms: float, warmups: int) -> float:
    """Median of MIN_REPEATS..MAX_REPEATS timed calls (about budget_ms in all) after `warmups` calls."""
    for _ in range(warmups):
        fn()
    times = [_once_ms(fn, device)]
    repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(budget_ms / max(times[0], 1e-3))))
    times += [_once_ms(fn, device) for _ in range(repeats - 1)]
    return statistics.median(times)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _aliases(tensor: Tensor, others: Sequence[Tensor]) -> bool:
    pointer = tensor.untyped_storage().data_ptr()
    return any(pointer == other.untyped_storage().data_ptr() for other in others)


# ------------------------------------------------------------------------------------------ references


class _Distance:
    """Accumulates ‖a − b‖² and ‖b‖² in float64 over chunks; b may live on another device."""

    def __init__(self) -> None:
        self.diff_sq = 0.0
        self.ref_sq = 0.0

    def add(self, value: Tensor, reference: Tensor) -> None:
        value = value.double()
        reference = reference.to(value.device, torch.float64)
        self.diff_sq += float((value - reference).square().sum())
        self.ref_sq += float(reference.square().sum())

    def relative(self) -> float:
        return math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else math.nan


def _relative_error(value: Tensor, reference: Tensor) -> float:
    """‖value − reference‖ / ‖reference‖, in chunks of CHUNK_ELEMENTS."""
    value, reference = value.reshape(-1), reference.reshape(-1)
    distance = _Distance()
    for start in range(0, value.numel(), CHUNK_ELEMENTS):
        distance.add(value[start : start + CHUNK_ELEMENTS], reference[start : start + CHUNK_ELEMENTS])
    return distance.relative()


def _row_chunks(n: int, num_classes: int) -> Iterator[slice]:
    rows = max(1, CHUNK_ELEMENTS // num_classes)
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _reference_chunk(logits: Tensor, target: Tensor, count: int) -> tuple[float, Tensor]:
    """torch's cross-entropy summed over a chunk of rows, and the chunk's ∂L/∂z of the mean over `count`
    counted rows: (softmax(z) − onehot(y)) / count, zero on ignored rows."""
    logits = logits.detach().requires_grad_()
    with torch.enable_grad():
        loss_sum = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
        (grad,) = torch.autograd.grad(loss_sum, logits)
    return float(loss_sum), grad.div_(count)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def linear_reference(family: str, shape: tuple[int, int, int], device: torch.device) -> dict[str, Tensor]:
    """Loss, dX and dW of the mean loss of x.float() @ W.float().T (softmax cross-entropy for "linear",
    sigmoid binary cross-entropy for "linear-bce"), chunked over rows, in float32 with TF32 off (float64 at
    small N·V), returned on the CPU so the methods have the device to themselves.

    Per chunk of rows: z = x W^T, G = ∂L/∂z from torch's loss, dX = G W, dW += G^T x.
    """
    x, weight, target = (linear_inputs if family == "linear" else linear_bce_inputs)(shape, device)
    dtype = torch.float64 if shape[0] * shape[2] <= SMALL_ELEMENTS else torch.float32
    x, weight = x.to(dtype), weight.to(dtype)
    count = int((target != IGNORE_INDEX).sum()) if family == "linear" else target.numel()
    loss_sum = 0.0
    grad_x, grad_weight = torch.empty_like(x), torch.zeros_like(weight)
    with torch.no_grad(), _no_tf32():
        for rows in _row_chunks(shape[0], shape[2]):
            logits = x[rows] @ weight.T
            if family == "linear":
                part, grad = _reference_chunk(logits, target[rows], count)
            else:
                part, grad = _reference_bce_chunk(logits, target[rows].to(dtype), count)
            loss_sum += part
            torch.mm(grad, weight, out=grad_x[rows])
            grad_weight.addmm_(grad.T, x[rows])
            del grad, logits
    return {
        "loss": torch.tensor(loss_sum / count, dtype=torch.float64),
        "dX": grad_x.cpu(),
        "dW": grad_weight.cpu(),
    }


def _reference_bce_chunk(logits: Tensor, target: Tensor, count: int) -> tuple[float, Tensor]:
    """torch's binary cross-entropy summed over a chunk of rows, and the chunk's ∂L/∂z of the mean over
    ``count`` elements: (σ(z) − y) / count."""
    logits = logits.detach().requires_grad_()
    with torch.enable_grad():
        loss_sum = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss_sum, logits)
    return float(loss_sum), grad.div_(count)


def linear_check(reference: dict[str, Tensor]) -> ErrorCheck:
    """Relative errors of a linear-head method's loss, dX and dW against `reference`."""

    def check(loss: Tensor, grads: list[Tensor]) -> dict[str, float]:
        grad_x, grad_weight = grads
        return {
            "loss": _relative_error(loss.cpu(), reference["loss"]),
            "dX": _relative_error(grad_x, reference["dX"]),
            "dW": _relative_error(grad_weight, reference["dW"]),
        }

    return check


def ce_check(shape: tuple[int, int], device: torch.device) -> ErrorCheck:
    """Relative errors of a cross-entropy method's loss and dlogits against torch's cross-entropy in float64
    on the same logits (made again from the seed: Liger overwrites its input), chunk by chunk."""

    def check(loss: Tensor, grads: list[Tensor]) -> dict[str, float]:
        (grad_logits,) = grads
        logits, target = ce_inputs(shape, device)
        count = int((target != IGNORE_INDEX).sum())
        loss_sum, distance = 0.0, _Distance()
        with torch.no_grad():
            for rows in _row_chunks(*shape):
                part, grad = _reference_chunk(logits[rows].double(), target[rows], count)
                loss_sum += part
                distance.add(grad_logits[rows], grad)
        return {
            "loss": _relative_error(loss.cpu(), torch.tensor(loss_sum / count, dtype=torch.float64)),
            "dlogits": distance.relative(),
        }

    return check


def bce_check(shape: tuple[int, int], device: torch.device) -> ErrorCheck:
    """Relative errors of a binary cross-entropy method's loss and dlogits against torch's in float64 on
    the same logits and targets, chunk by chunk."""

    def check(loss: Tensor, grads: list[Tensor]) -> dict[str, float]:
        (grad_logits,) = grads
        logits, target = bce_inputs(shape, device)
        count = logits.numel()
        loss_sum, distance = 0.0, _Distance()
        for rows in _row_chunks(*shape):
            chunk = logits[rows].double().requires_grad_()
            with torch.enable_grad():
                part = F.binary_cross_entropy_with_logits(chunk, target[rows].double(), reduction="sum")
                (grad,) = torch.autograd.grad(part, chunk)
            loss_sum += float(part)
            distance.add(grad_logits[rows], grad.div_(count))
        return {
            "loss": _relative_error(loss.cpu(), torch.tensor(loss_sum / count, dtype=torch.float64)),
            "dlogits": distance.relative(),
        }

    return check


# -------------------------------------------------------------------------------------------- running


def _forward_ms(
    loss_fn: LossFn, make_inputs: InputMaker, device: torch.device, budget_ms: float, warmups: int
) -> float:
    inputs = make_inputs()
    with torch.no_grad():
        return median_ms(lambda: loss_fn(*inputs), device, budget_ms, warmups)


def _train(
    loss_fn: LossFn,
    make_inputs: InputMaker,
    check: ErrorCheck,
    device: torch.device,
    budget_ms: float,
    warmups: int,
    differentiable: int,
) -> dict[str, object]:
    """Warm-up, then one forward+backward for peak memory, errors and the Triton launches it made, then the
    timed runs. The first ``differentiable`` inputs require grad."""
    inputs = make_inputs()
    leaves = [tensor.requires_grad_() for tensor in inputs[:differentiable]]

    def step() -> Tensor:
        for leaf in leaves:
            leaf.grad = None
        loss = loss_fn(*inputs)
        loss.backward()
        return loss

    for _ in range(warmups):
        step()
    for leaf in leaves:
        leaf.grad = None
    with torch.no_grad():  # the warm-up may have changed them: Liger writes dlogits over the logits
        for tensor, fresh in zip(inputs, make_inputs(), strict=True):
            tensor.copy_(fresh)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device) if on_cuda else 0
    with launches.recorded() as records:
        loss = step().detach()
    grads = [leaf.grad for leaf in leaves]
    aliased = [_aliases(grad, inputs) for grad in grads]
    peak_gib = None
    if on_cuda:
        torch.cuda.synchronize(device)
        grad_bytes = sum(grad.nbytes for grad, alias in zip(grads, aliased, strict=True) if not alias)
        peak_gib = (torch.cuda.max_memory_allocated(device) - baseline - grad_bytes) / 2**30
    errors = check(loss, grads)
    del loss, grads
    return {
        "ms": median_ms(step, device, budget_ms, warmups=0),
        "peak_gib": peak_gib,
        "errors": errors,
        "note": "the gradient is written into the input in place" if any(aliased) else "",
        "launches": [_describe_launch(record) for record in records],
    }


def _describe_launch(record: launches.Launch) -> str:
    shape = ", ".join(f"{name}={value}" for name, value in record.meta.items() if name in LAUNCH_KEYS)
    return f"{record.kernel} grid {'×'.join(map(str, record.grid))} ({shape})"


LAUNCH_KEYS = ("ROWS", "BLOCK", "SINGLE_PASS", "BLOCK_ROWS", "BLOCK_COLUMNS", "num_warps")


def run_method(
    method: str,
    make_loss_fn: Callable[[str, torch.device], LossFn],
    make_inputs: InputMaker,
    check: ErrorCheck,
    device: torch.device,
    budget_ms: float,
    warmups: int,
    *,
    differentiable: int,
    quick: bool = False,
) -> dict[str, object]:
    """One method at one shape: forward-only time, then forward+backward time, peak memory and errors.
    An OOM or error in one phase is recorded in `failures` and the other phase still runs. With ``quick``,
    torch.compile is timed forward+backward only (one compilation)."""
    row: dict[str, object] = {
        "method": method,
        "status": "ok",
        "reason": "",
        "ms": None,
        "forward_ms": None,
        "peak_gib": None,
        "errors": {},
        "failures": {},
        "note": "",
        "launches": [],
    }
    phases = ("forward+backward",) if quick and method == "compile" else ("forward", "forward+backward")
    try:
        loss_fn = make_loss_fn(method, device)
        for phase in phases:
            try:
                if phase == "forward":
                    row["forward_ms"] = _forward_ms(loss_fn, make_inputs, device, budget_ms, warmups)
                else:
                    row.update(
                        _train(loss_fn, make_inputs, check, device, budget_ms, warmups, differentiable)
                    )
            except Skipped:
                raise
            except Exception as error:
                row["failures"][phase] = "OOM" if _is_oom(error) else _describe(error)
                row["status"] = "failed"
                if not _is_oom(error):
                    print(traceback.format_exc(limit=-8), file=sys.stderr, flush=True)
            _free(device)
    except Skipped as skip:
        row.update(status="skipped", reason=str(skip), ms=None, forward_ms=None, peak_gib=None, errors={})
    _free(device)
    return row


def _shape_name(shape: Sequence[int]) -> str:
    return "×".join(str(size) for size in shape)


def _progress(family: str, shape: Sequence[int], row: dict[str, object], started: float) -> None:
    if row["status"] == "skipped":
        detail = f"skipped: {row['reason']}"
    else:
        errors = ", ".join(f"{name} {value:.1e}" for name, value in row["errors"].items())
        detail = (
            f"fwd+bwd {_ms(row['ms'])} ms, fwd {_ms(row['forward_ms'])} ms, "
            f"peak {_gib(row['peak_gib'])} GiB, rel err {errors or '-'}"
        )
        for phase, failure in row["failures"].items():
            detail += f"; {phase} {failure}"
    print(f"[{time.perf_counter() - started:6.1f} s] {family} {_shape_name(shape)} {row['method']}: {detail}")


def bench_linear(
    family: str,
    shapes: Sequence[tuple[int, int, int]],
    methods: Sequence[str],
    device: torch.device,
    budget_ms: float,
    warmups: int,
    started: float,
    quick: bool = False,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Rows (one per shape and method) and floors (one per shape) of a linear head: "linear" (softmax
    cross-entropy) or "linear-bce" (multi-label sigmoid binary cross-entropy)."""
    make_loss_fn = partial(loss_fn, family)
    make_inputs_of = {"linear": linear_inputs, "linear-bce": linear_bce_inputs}[family]
    rows, floors = [], []
    for shape in shapes:
        n, d, v = shape
        x, weight, _ = linear_inputs(shape, device)
        logits = torch.empty(n, v, device=device, dtype=DTYPE)
        matmul_ms = median_ms(partial(torch.mm, x, weight.T, out=logits), device, budget_ms, warmups)
        del x, weight, logits
        _free(device)
        floors.append(
            {
                "family": family,
                "shape": list(shape),
                "ms": 3 * matmul_ms,
                "forward_ms": matmul_ms,
                "detail": f"3 matmuls at {2 * n * d * v / matmul_ms / 1e9:.3g} TFLOP/s",
            }
        )
        reference = linear_reference(family, shape, device)
        _free(device)
        make_inputs = partial(make_inputs_of, shape, device)
        check = linear_check(reference)
        for method in methods:
            row = run_method(
                method, make_loss_fn, make_inputs, check, device, budget_ms, warmups,
                differentiable=DIFFERENTIABLE[family], quick=quick,
            )  # fmt: skip
            rows.append({"family": family, "shape": list(shape), **row})
            _progress(family, shape, row, started)
        del reference
        _free(device)
    return rows, floors


def bench_logits(
    family: str,
    shapes: Sequence[tuple[int, int]],
    methods: Sequence[str],
    device: torch.device,
    copy_gbps: float,
    budget_ms: float,
    warmups: int,
    started: float,
    quick: bool = False,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Rows (one per shape and method) and floors (one per shape) of a loss on given bf16 logits: "ce"
    (cross-entropy; floor: read the logits, write the gradient) or "bce" (binary cross-entropy; floor: read
    logits and targets, write the gradient)."""
    make_loss_fn = partial(loss_fn, family)
    make_inputs_of, make_check = {"ce": (ce_inputs, ce_check), "bce": (bce_inputs, bce_check)}[family]
    rows, floors = [], []
    itemsize = torch.empty((), dtype=DTYPE).element_size()
    for shape in shapes:
        n, v = shape
        logits_bytes = n * v * itemsize
        read_bytes = logits_bytes * (2 if family == "bce" else 1)  # bce reads the (N, C) targets too
        floors.append(
            {
                "family": family,
                "shape": list(shape),
                "ms": (read_bytes + logits_bytes) / copy_gbps / 1e6,  # read, then write the gradient
                "forward_ms": read_bytes / copy_gbps / 1e6,  # the reads alone
                "detail": f"{(read_bytes + logits_bytes) / 2**30:.3g} GiB at {copy_gbps:.3g} GB/s",
            }
        )
        make_inputs = partial(make_inputs_of, shape, device)
        check = make_check(shape, device)
        for method in methods:
            row = run_method(
                method, make_loss_fn, make_inputs, check, device, budget_ms, warmups,
                differentiable=DIFFERENTIABLE[family], quick=quick,
            )  # fmt: skip
            rows.append({"family": family, "shape": list(shape), **row})
            _progress(family, shape, row, started)
    return rows, floors


@contextlib.contextmanager
def _row_launch_constants(**values: int) -> Iterator[None]:
    """softxent.ops.policy's launch constants set to ``values`` within the block."""
    saved = {name: getattr(policy, name) for name in values}
    for name, value in values.items():
        setattr(policy, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(policy, name, value)


def sweep(
    shapes: Sequence[tuple[int, int]], device: torch.device, copy_gbps: float, budget_ms: float, warmups: int
) -> list[dict[str, object]]:
    """softxent's cross-entropy forward+backward at each shape under each launch shape of SWEEP_STREAM
    (rows wider than ROW_IN_REGISTERS) and SWEEP_IN_REGISTERS (rows up to it), beside the policy's own."""
    candidates: list[tuple[str, dict[str, int]]] = [("policy", {})]
    candidates += [
        (f"stream {block}/{warps}w", dict(STREAM_BLOCK=block, STREAM_WARPS=warps, ROW_IN_REGISTERS=0))
        for block, warps in SWEEP_STREAM
    ]
    candidates += [(f"registers {block}", dict(ROW_IN_REGISTERS=block)) for block, _ in SWEEP_IN_REGISTERS]
    results = []
    itemsize = torch.empty((), dtype=DTYPE).element_size()
    for shape in shapes:
        floor_ms = 2 * shape[0] * shape[1] * itemsize / copy_gbps / 1e6
        step = _cross_entropy_step(*ce_inputs(shape, device))
        for name, constants in candidates:
            if name.startswith("registers") and constants["ROW_IN_REGISTERS"] < shape[1]:
                continue
            with _row_launch_constants(**constants):
                try:
                    ms = median_ms(step, device, budget_ms, warmups)
                    launch = policy.row_launch(*shape, policy.hardware(device))
                except Exception as error:  # a launch shape the GPU cannot compile
                    results.append({"shape": list(shape), "launch": name, "error": _describe(error)})
                    continue
            results.append(
                {
                    "shape": list(shape),
                    "launch": name,
                    "ms": ms,
                    "floor_ms": floor_ms,
                    "shape_used": str(launch),
                }
            )
            print(f"sweep {_shape_name(shape)} {name}: {ms:.3f} ms, {ms / floor_ms:.2f}× floor", flush=True)
        del step
        _free(device)
    return results


def _cross_entropy_step(logits: Tensor, target: Tensor) -> Callable[[], None]:
    """softxent.cross_entropy's forward+backward on ``logits``, the gradient set to None first."""
    logits.requires_grad_()

    def step() -> None:
        logits.grad = None
        softxent.cross_entropy(logits, target).backward()

    return step


def sweep_table(results: list[dict[str, object]]) -> list[str]:
    lines = [
        "### launch-shape sweep: softxent.cross_entropy forward+backward, bf16",
        "",
        "| N×V | launch | ms | × floor |",
        "|---|---|---:|---:|",
    ]
    for result in results:
        shape = _shape_name(result["shape"])
        if "error" in result:
            lines.append(f"| {shape} | {result['launch']} | error: {result['error']} | |")
        else:
            ratio = result["ms"] / result["floor_ms"]
            lines.append(f"| {shape} | {result['launch']} | {_ms(result['ms'])} | {ratio:.2f} |")
    return [*lines, ""]


def measure_machine(device: torch.device, smoke: bool, budget_ms: float, warmups: int) -> dict[str, float]:
    """bf16 matmul TFLOP/s (M = N = K) and device-to-device copy GB/s (bytes read + written)."""
    size = 256 if smoke else 8192
    a = torch.randn(size, size, device=device, dtype=DTYPE)
    b = torch.randn(size, size, device=device, dtype=DTYPE)
    out = torch.empty(size, size, device=device, dtype=DTYPE)
    matmul_ms = median_ms(partial(torch.mm, a, b, out=out), device, budget_ms, warmups)
    del a, b, out
    numel = (1 << 22) if smoke else (1 << 29)  # 8 MiB or 1 GiB of bf16
    source = torch.randn(numel, device=device, dtype=DTYPE)
    destination = torch.empty_like(source)
    copy_ms = median_ms(partial(destination.copy_, source), device, budget_ms, warmups)
    copy_bytes = 2 * source.nbytes
    del source, destination
    _free(device)
    return {
        "matmul_size": size,
        "matmul_tflops": 2 * size**3 / matmul_ms / 1e9,
        "copy_bytes": copy_bytes,
        "copy_gbps": copy_bytes / copy_ms / 1e6,
    }


# ------------------------------------------------------------------------------------------- breakdown


def breakdown(
    shapes: Sequence[tuple[int, int, int]],
    device: torch.device,
    machine: dict[str, float],
    budget_ms: float,
    warmups: int,
    chunk_sizes: Sequence[int] = BREAKDOWN_CHUNK_BYTES,
) -> list[dict[str, object]]:
    """Where the speed-mode head's time goes, and its levers (issue 13), at each linear shape.

    Parts of one chunk of the policy's rows R, each timed alone: the logits matmul (R, D)·(D, V), the row
    kernel (loss and G over the logits, in place), dX = G·W, dW = Gᵀ·X as one bf16 matmul, and dW
    accumulated into a float32 (V, D) buffer (what several chunks need); each beside its floor (a matmul at
    the measured rate; the row kernel's read + write at the copy rate; the accumulation's V·D·8 bytes
    beside its matmul). Then the whole head, forward+backward, under its policy and at each of
    ``chunk_sizes`` (not weight-sized: :attr:`softxent.ops.policy.Policy.weight_sized_chunks`) with dW on the
    main stream and on a second one (:attr:`softxent.ops.policy.Policy.side_stream`); and the lean head under
    its policy and with 64 MiB slices (not dX-sized: ``Policy.dx_sized_slices``), with dX on the main
    stream and on a second one; each beside the 3-matmul floor, with its peak memory beyond inputs and
    gradients.
    """
    from softxent.ops import backends, chunks
    from softxent.ops.spec import SoftmaxLoss

    tflops, gbps = machine["matmul_tflops"], machine["copy_gbps"]
    results: list[dict[str, object]] = []
    for shape in shapes:
        n, d, v = shape
        x, weight, target = linear_inputs(shape, device)
        logits = torch.empty(n, v, device=device, dtype=DTYPE)
        floor_ms = 3 * median_ms(partial(torch.mm, x, weight.T, out=logits), device, budget_ms, warmups)
        del logits
        backend = backends.select("auto", device)
        rows = min(n, backend.policy.chunk_rows(v, x.element_size(), d))
        x_chunk, target_chunk = x[:rows], target[:rows]
        logits = torch.empty(rows, v, device=device, dtype=DTYPE)
        grad = logits if backend.policy.grad_in_input_dtype else torch.empty(rows, v, device=device)
        grad_low = grad if grad.dtype == DTYPE else grad.to(DTYPE)
        grad_x = torch.empty(rows, d, device=device, dtype=DTYPE)
        grad_w = torch.empty(v, d, device=device, dtype=DTYPE)
        accumulator = torch.zeros(v, d, device=device)
        spec = SoftmaxLoss(None, IGNORE_INDEX, 0.0, 0.0, None)
        scale = torch.tensor(1.0 / n, device=device)
        matmul_floor = 2 * rows * d * v / tflops / 1e9
        parts = (
            ("logits matmul", partial(torch.mm, x_chunk, weight.T, out=logits), matmul_floor),
            (
                "row kernel (loss and G)",
                partial(backend.softmax_block, logits, target_chunk, spec, grad_scale=scale, grad_out=grad),
                2 * rows * v * x.element_size() / gbps / 1e6,
            ),
            ("dX matmul", partial(torch.mm, grad_low, weight, out=grad_x), matmul_floor),
            ("dW matmul, bf16 out", partial(torch.mm, grad_low.t(), x_chunk, out=grad_w), matmul_floor),
            (
                "dW into float32",
                partial(chunks.accumulate_matmul, accumulator, grad.t(), x_chunk),
                matmul_floor,
            ),
        )
        chunk_count = -(-n // rows)
        for part, fn, part_floor in parts:
            ms = median_ms(fn, device, budget_ms, warmups)
            results.append(
                {"shape": list(shape), "kind": "part", "name": part, "rows": rows, "chunks": chunk_count,
                 "ms": ms, "floor_ms": part_floor, "head_floor_ms": floor_ms}
            )  # fmt: skip
            print(f"breakdown {_shape_name(shape)} {part} ({rows} rows): {ms:.3f} ms", flush=True)
        results.append(
            {"shape": list(shape), "kind": "accumulator bytes", "name": "V·D·8 bytes at the copy rate",
             "rows": rows, "chunks": chunk_count, "ms": 8 * v * d / gbps / 1e6, "floor_ms": None,
             "head_floor_ms": floor_ms}
        )  # fmt: skip
        del x_chunk, target_chunk, logits, grad, grad_low, grad_x, grad_w, accumulator
        _free(device)
        make_inputs = partial(linear_inputs, shape, device)
        choices: list[tuple[str, str, dict[str, object]]] = [("speed", "policy", {})]
        for size in chunk_sizes:
            fields = {"chunk_bytes": size, "weight_sized_chunks": False}
            choices.append(("speed", _bytes_name(size), fields))
        choices += [("lean", "policy", {}), ("lean", "64 MiB slices", {"dx_sized_slices": False})]
        for memory, name, fields in choices:
            for stream in (False, True):
                with policy.overridden(**fields, side_stream=stream):
                    chosen = policy.for_device(device, backend.name)
                    if memory == "speed":
                        size = min(n, chosen.chunk_rows(v, x.element_size(), d))
                        count = -(-n // size)
                    else:
                        size = min(v, chosen.slice_columns(n, x.dtype, d))
                        count = -(-v // size)
                    if stream and count == 1:
                        continue  # one chunk or slice: nothing to overlap
                    try:
                        row = _train(
                            partial(softxent.linear_cross_entropy, memory=memory), make_inputs,
                            lambda loss, grads: {}, device, budget_ms, warmups, DIFFERENTIABLE["linear"],
                        )  # fmt: skip
                        failure = None
                    except Exception as error:
                        row, failure = {"ms": None, "peak_gib": None}, _describe(error)
                _free(device)
                results.append(
                    {"shape": list(shape), "kind": "head", "memory": memory, "name": name,
                     "side_stream": stream, "size": size, "count": count,
                     "ms": row["ms"], "peak_gib": row["peak_gib"], "failure": failure,
                     "floor_ms": floor_ms, "head_floor_ms": floor_ms}
                )  # fmt: skip
                print(
                    f"breakdown {_shape_name(shape)} {memory} head, {name} ({size} × {count}), "
                    f"side stream {stream}: {_ms(row['ms'])} ms {failure or ''}",
                    flush=True,
                )
        del x, weight, target
        _free(device)
    return results


def _bytes_name(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


def breakdown_tables(results: list[dict[str, object]]) -> list[str]:
    """The parts' table (per chunk, and times the chunks beside the head's floor) and the head's table (per
    chunk size and stream choice, with the memory target's allowance)."""
    lines = [
        "### speed-mode breakdown: one chunk's parts, bf16",
        "",
        "| N×D×V | part (R rows, chunks) | ms a chunk | × its floor | all chunks / the head's floor |",
        "|---|---|---:|---:|---:|",
    ]
    for result in results:
        if result["kind"] == "head":
            continue
        share = result["ms"] * result["chunks"] / result["head_floor_ms"]
        own = "-" if result["floor_ms"] is None else f"{result['ms'] / result['floor_ms']:.2f}"
        lines.append(
            f"| {_shape_name(result['shape'])} | {result['name']} ({result['rows']}, {result['chunks']}) | "
            f"{result['ms']:.3f} | {own} | {share:.3f} |"
        )
    lines += [
        "",
        "### the head by chunk (speed) and slice (lean) size, sums on a second stream or not: fwd+bwd, bf16",
        "",
        "| N×D×V | mode | cut (rows or classes × count) | side stream | ms | × floor | peak GiB | allowed |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        if result["kind"] != "head":
            continue
        n, d, v = result["shape"]
        memory = result["memory"]
        _, extra_gib, buffer = HEAD_TARGETS["softxent" if memory == "speed" else "softxent-lean"]
        allowed = (v * d if buffer == "VD" else n * d) * 4 / 2**30 + extra_gib
        ms = result["failure"] or _ms(result["ms"])
        lines.append(
            f"| {_shape_name(result['shape'])} | {memory} | {result['name']} ({result['size']} × "
            f"{result['count']}) | {'yes' if result['side_stream'] else 'no'} | {ms} | "
            f"{_ratio(result['ms'], result['floor_ms'])} | {_gib(result['peak_gib'])} | {allowed:.2f} |"
        )
    return [*lines, ""]


# ------------------------------------------------------------------------------------------- reporting


def _ms(value: object) -> str:
    return "-" if value is None else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _gib(value: object) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _ratio(value: object, floor: float) -> str:
    return "-" if value is None else f"{value / floor:.2f}"


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device, measured: dict[str, float]) -> dict[str, object]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "softxent": softxent.__version__,
        "liger-kernel": _package_version("liger-kernel"),
        "cut-cross-entropy": _package_version("cut-cross-entropy"),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join(["python3", *sys.argv]),
        **measured,
    }


def header(info: dict[str, object]) -> list[str]:
    return [
        "## GPU: softxent's Triton kernels against their peers",
        "",
        f"- Device: {info['device']}; measured bf16 matmul ({info['matmul_size']}³) "
        f"{info['matmul_tflops']:.3g} TFLOP/s, device copy {info['copy_gbps']:.3g} GB/s "
        f"(bytes read + written, {info['copy_bytes'] / 2**30:.3g} GiB a copy).",
        f"- Software: Python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
        f"softxent {info['softxent']}, liger-kernel {info['liger-kernel']}, "
        f"cut-cross-entropy {info['cut-cross-entropy']}.",
        f"- Date: {info['date']}. Command: `{info['command']}`.",
        "",
    ]


def _failed_cell(failure: str | None, value: str) -> str:
    return value if failure is None else "OOM" if failure == "OOM" else "error"


def table(family: str, rows: list[dict[str, object]], floors: list[dict[str, object]]) -> list[str]:
    """A Markdown table of one family: a floor row and one row per method for each shape, then notes."""
    error_names = ("loss", "dX", "dW") if family in HEADS else ("loss", "dlogits")
    columns = [
        "N×D×V" if family in HEADS else "N×V",
        "method",
        "fwd+bwd ms",
        "× floor",
        "fwd ms",
        "fwd × floor",
        "peak GiB",
        *(f"rel err {name}" for name in error_names),
    ]
    lines = [f"### {FAMILIES[family]}, bf16", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "---|" * 2 + "---:|" * (len(columns) - 2))
    blanks = [""] * len(error_names)
    notes: dict[str, str] = {}
    for floor in floors:
        shape = _shape_name(floor["shape"])
        cells = [shape, f"floor ({floor['detail']})", _ms(floor["ms"]), "1.00", _ms(floor["forward_ms"])]
        table_rows = [[*cells, "1.00", "", *blanks]]
        for row in (row for row in rows if row["shape"] == floor["shape"]):
            method = row["method"]
            if row["status"] == "skipped":
                notes[method] = f"skipped: {row['reason']}"
                table_rows.append([shape, method, "skipped", "", "", "", "", *blanks])
                continue
            train_failure = row["failures"].get("forward+backward")
            forward_failure = row["failures"].get("forward")
            table_rows.append(
                [
                    shape,
                    method,
                    _failed_cell(train_failure, _ms(row["ms"])),
                    _ratio(row["ms"], floor["ms"]),
                    _failed_cell(forward_failure, _ms(row["forward_ms"])),
                    _ratio(row["forward_ms"], floor["forward_ms"]),
                    _failed_cell(train_failure, _gib(row["peak_gib"])),
                    *(f"{row['errors'][name]:.1e}" if name in row["errors"] else "-" for name in error_names),
                ]
            )
            for phase, failure in row["failures"].items():
                if failure != "OOM":
                    notes[f"{method} at {shape}"] = f"{phase} failed: {failure}"
            if row["note"]:
                notes[method] = row["note"]
            if row.get("launches") and method.startswith("softxent"):
                notes[f"{method} launches at {shape}"] = "; ".join(row["launches"])
        lines += ["| " + " | ".join(cells) + " |" for cells in table_rows]
    lines.append("")
    if notes:
        lines += [*(f"- {method}: {note}" for method, note in notes.items()), ""]
    return lines


def target_lines(rows: list[dict[str, object]], floors: list[dict[str, object]]) -> list[str]:
    """The GPU issues' targets as pass/miss lines. Part 1: softxent's cross-entropy and binary
    cross-entropy on logits at most TARGET_RATIO× their floors (forward+backward and forward alone), the
    in-place gradient no slower than a new buffer (within 2%, the spread of repeated timings). Part 2:
    HEAD_TARGETS for each linear head and memory mode (time, peak memory beyond inputs and gradients, and
    the gradients' error within ERROR_RATIO of eager's)."""
    found = {(row["family"], tuple(row["shape"]), row["method"]): row for row in rows}
    lines = []
    for floor in floors:
        family, shape = floor["family"], tuple(floor["shape"])
        name = f"{family} {_shape_name(shape)}"
        if family in HEADS:
            lines += _head_target_lines(found, family, shape, floor)
            continue
        ours = found.get((family, shape, "softxent"))
        if ours is None or ours["ms"] is None:
            continue
        for phase, key in (("forward+backward", "ms"), ("forward", "forward_ms")):
            if ours[key] is None:
                continue
            ratio = ours[key] / floor[key]
            verdict = "pass" if ratio <= TARGET_RATIO else "miss"
            lines.append(
                f"- target {name} softxent {phase}: {ratio:.2f}× floor (≤ {TARGET_RATIO}): {verdict}"
            )
        inplace = found.get((family, shape, "softxent-inplace"))
        if inplace is not None and inplace["ms"] is not None:
            ratio = inplace["ms"] / ours["ms"]
            verdict = "pass" if ratio <= 1.02 else "miss"
            lines.append(
                f"- target {name} inplace_backward: {ratio:.2f}× the new-buffer time (≤ 1.02): {verdict}"
            )
    return [*lines, ""] if lines else []


def _head_target_lines(found, family: str, shape: tuple[int, ...], floor: dict[str, object]) -> list[str]:
    n, d, v = shape
    eager = found.get((family, shape, "eager"))
    lines = []
    for method, (max_ratio, max_extra_gib, buffer) in HEAD_TARGETS.items():
        ours = found.get((family, shape, method))
        if ours is None or ours["ms"] is None:
            continue
        ratio = ours["ms"] / floor["ms"]
        buffer_gib = (v * d if buffer == "VD" else n * d) * 4 / 2**30
        verdicts = [f"{ratio:.2f}× floor (≤ {max_ratio}): {'pass' if ratio <= max_ratio else 'miss'}"]
        if ours["peak_gib"] is not None:
            allowed = buffer_gib + max_extra_gib
            fits = ours["peak_gib"] <= allowed
            verdicts.append(
                f"peak {ours['peak_gib']:.2f} GiB (≤ {allowed:.2f}): {'pass' if fits else 'miss'}"
            )
        if eager is not None and eager["errors"]:
            worst = max(
                ours["errors"][g] / eager["errors"][g] for g in ("dX", "dW") if eager["errors"][g] > 0
            )
            verdict = "pass" if worst <= ERROR_RATIO else "miss"
            verdicts.append(f"gradient error {worst:.2f}× eager's (≤ {ERROR_RATIO}): {verdict}")
        lines.append(f"- target {family} {_shape_name(shape)} {method}: " + "; ".join(verdicts))
    return lines


def _parse_shapes(text: str, size: int) -> tuple[tuple[int, ...], ...]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().replace("×", "x").split("x")
        if len(parts) != size or not all(part.isdigit() and int(part) > 0 for part in parts):
            expected = "NxDxV" if size == 3 else "NxV"
            raise argparse.ArgumentTypeError(f"expected shapes {expected}[,{expected}...], got {item!r}")
        shapes.append(tuple(int(part) for part in parts))
    return tuple(shapes)


def _parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(name.strip() for name in text.split(",") if name.strip())
    known = dict.fromkeys(method for methods in METHODS.values() for method in methods)
    unknown = [name for name in methods if name not in known]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(known)}, got {text!r}")
    return methods


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on a CPU (for CI)")
    parser.add_argument("--only", choices=tuple(FAMILIES), help="run one family only")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one warm-up, a 40 ms budget a measurement, torch.compile compiled once a shape",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also time softxent's cross-entropy under other launch shapes"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="instead of the tables: the speed-mode linear head's parts, and the head at several chunk sizes "
        "with and without dW on a second stream (issue 13's levers), at the linear shapes",
    )
    parser.add_argument("--methods", type=_parse_methods, help="comma-separated methods to run (default all)")
    parser.add_argument(
        "--linear-shapes", type=partial(_parse_shapes, size=3), help="e.g. 8192x4096x128256,4096x2048x32000"
    )
    parser.add_argument("--ce-shapes", type=partial(_parse_shapes, size=2), help="e.g. 8192x128256")
    parser.add_argument("--bce-shapes", type=partial(_parse_shapes, size=2), help="e.g. 8192x32000")
    parser.add_argument("--device", help="torch device (default: cuda where available, else cpu)")
    parser.add_argument(
        "--budget-ms",
        type=float,
        help=f"time to spend on the timed runs of each measurement ({MIN_REPEATS} to {MAX_REPEATS} runs; "
        "default 300, quick 40, smoke 20)",
    )
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        parser.error(f"the full benchmark needs a CUDA device, got {device}; --smoke runs it on a CPU")
    default_budget = 20.0 if args.smoke else 40.0 if args.quick else 300.0
    budget_ms = args.budget_ms if args.budget_ms is not None else default_budget
    warmups = 1 if args.smoke or args.quick else 2
    shapes = {
        "linear": args.linear_shapes or (SMOKE_LINEAR_SHAPES if args.smoke else LINEAR_SHAPES),
        "linear-bce": args.linear_shapes or (SMOKE_LINEAR_BCE_SHAPES if args.smoke else LINEAR_BCE_SHAPES),
        "ce": args.ce_shapes or (SMOKE_CE_SHAPES if args.smoke else CE_SHAPES),
        "bce": args.bce_shapes or (SMOKE_BCE_SHAPES if args.smoke else BCE_SHAPES),
    }
    selected = args.methods or tuple(method for methods in METHODS.values() for method in methods)

    started = time.perf_counter()
    info = machine_info(device, measure_machine(device, args.smoke, budget_ms, warmups))
    print("\n".join(header(info)), flush=True)
    if args.breakdown:
        sizes = SMOKE_BREAKDOWN_CHUNK_BYTES if args.smoke else BREAKDOWN_CHUNK_BYTES
        results = breakdown(shapes["linear"], device, info, budget_ms, warmups, sizes)
        lines = ["", *header(info), *breakdown_tables(results)]
        print("\n".join([*lines, f"Total time: {time.perf_counter() - started:.0f} s."]), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "breakdown": results}, indent=2) + "\n")
        return
    rows: list[dict[str, object]] = []
    floors: list[dict[str, object]] = []
    for family in ("linear", "linear-bce"):
        if args.only not in (None, family):
            continue
        methods = [name for name in METHODS[family] if name in selected]
        family_rows, family_floors = bench_linear(
            family, shapes[family], methods, device, budget_ms, warmups, started, args.quick
        )
        rows += family_rows
        floors += family_floors
    for family in ("ce", "bce"):
        if args.only not in (None, family):
            continue
        methods = [name for name in METHODS[family] if name in selected]
        family_rows, family_floors = bench_logits(
            family,
            shapes[family],
            methods,
            device,
            info["copy_gbps"],
            budget_ms,
            warmups,
            started,
            args.quick,
        )
        rows += family_rows
        floors += family_floors
    swept = sweep(shapes["ce"], device, info["copy_gbps"], budget_ms, warmups) if args.sweep else []

    lines = ["", *header(info)]
    for family in FAMILIES:
        family_floors = [floor for floor in floors if floor["family"] == family]
        if family_floors:
            lines += table(family, [row for row in rows if row["family"] == family], family_floors)
    lines += target_lines(rows, floors)
    if swept:
        lines += sweep_table(swept)
    lines.append(f"Total time: {time.perf_counter() - started:.0f} s.")
    print("\n".join(lines), flush=True)
    if args.json:
        report = {"machine": info, "floors": floors, "rows": rows, "sweep": swept}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
