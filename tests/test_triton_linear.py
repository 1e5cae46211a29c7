"""The linear heads' Triton path (G kept in the input dtype over each chunk's logits, input-dtype matmuls,
dW accumulated over chunks in the input dtype) on DEVICE: a CUDA GPU when present, else the interpreter."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softxent
from helpers import assert_close, assert_no_worse, logit_rounding_slack, to_numpy
from softxent import reference
from softxent.ops import chunks, policy

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(n, d, c, rng, dtype):
    x = torch.randn(n, d, generator=rng, dtype=torch.float64)
    w = torch.randn(c, d, generator=rng, dtype=torch.float64) * (3.0 / d**0.5)
    b = torch.randn(c, generator=rng, dtype=torch.float64)
    x, w, b = (t.to(DEVICE, dtype).requires_grad_() for t in (x, w, b))
    target = torch.randint(0, c, (n,), generator=rng)
    target[::5] = -100
    return x, w, b, target.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory", ["speed", "lean"])
@pytest.mark.parametrize("several", [True, False], ids=["several_chunks", "one_chunk"])
def test_linear_cross_entropy_no_worse_than_eager(dtype, memory, several, rng):
    x, w, b, target = _problem(67, 72, 517, rng, dtype)
    # five chunks of rows, or five vocabulary slices; or the default: one chunk (dW written in the input
    # dtype by a single matmul), one slice
    chunk = (16 if memory == "speed" else 128) if several else None
    ours = softxent.linear_cross_entropy(
        x, w, target, linear_bias=b, label_smoothing=0.1, chunk_size=chunk, memory=memory, impl="triton"
    )
    eager = F.cross_entropy(F.linear(x, w, b).float(), target, label_smoothing=0.1)
    loss, *expected = reference.linear_cross_entropy(
        to_numpy(x), to_numpy(w), target.cpu().numpy(), to_numpy(b), label_smoothing=0.1
    )
    assert_no_worse(ours, eager, np.asarray(loss), _loss_slack(x, w, b, target, dtype, loss), "loss")
    mine = torch.autograd.grad(ours, [x, w, b])
    theirs = torch.autograd.grad(eager, [x, w, b])
    for name, g, e, ref in zip(["dX", "dW", "db"], mine, theirs, expected, strict=True):
        assert g.dtype == dtype
        size = float(np.abs(ref).max())
        assert_no_worse(g.double() / size, e.double() / size, ref / size, 2e-3, name)


def _loss_slack(x, w, b, target, dtype, loss, label_smoothing=0.1):
    """1e-6, plus on a GPU 5σ of one independent rounding of the logits to ``dtype`` (cuBLAS picks other
    kernels, rounding otherwise, for a chunk's or a slice's GEMM than for eager's whole-head GEMM)."""
    if DEVICE != "cuda" or dtype == torch.float32:
        return 1e-6
    logits = to_numpy(x) @ to_numpy(w).T + to_numpy(b)
    grad_logits = reference.cross_entropy_grad(logits, target.cpu().numpy(), label_smoothing=label_smoothing)
    return 1e-6 + logit_rounding_slack(logits, grad_logits, dtype, float(loss))


@pytest.mark.parametrize(
    ("shape", "chunk", "slice_columns"),
    [
        ((37, 65, 1031), 9, 300),
        # 4099 rows: in the interpreter one program a row, about a minute for both modes
        pytest.param((4099, 64, 3001), 1000, 700, marks=pytest.mark.slow),
    ],
    ids=["37x65x1031", "4099x64x3001"],
)
def test_odd_shapes_in_several_chunks(shape, chunk, slice_columns, rng):
    """The speed mode in chunks of rows (the last one partial) and the lean mode in vocabulary slices (the
    last one partial), bf16, against eager and the float64 reference."""
    n, d, c = shape
    x, w, b, target = _problem(n, d, c, rng, torch.bfloat16)
    eager = F.cross_entropy(F.linear(x, w, b).float(), target)
    theirs = torch.autograd.grad(eager, [x, w, b])
    loss, *expected = reference.linear_cross_entropy(
        to_numpy(x), to_numpy(w), target.cpu().numpy(), to_numpy(b)
    )
    slack = _loss_slack(x, w, b, target, torch.bfloat16, loss, label_smoothing=0.0)
    for memory, size in (("speed", chunk), ("lean", slice_columns)):
        ours = softxent.linear_cross_entropy(
            x, w, target, linear_bias=b, chunk_size=size, memory=memory, impl="triton"
        )
        assert_no_worse(ours, eager, np.asarray(loss), slack, f"{memory} loss")
        mine = torch.autograd.grad(ours, [x, w, b])
        for name, g, e, ref in zip(["dX", "dW", "db"], mine, theirs, expected, strict=True):
            scale = float(np.abs(ref).max())
            assert_no_worse(g.double() / scale, e.double() / scale, ref / scale, 2e-3, f"{memory} {name}")


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_linear_binary_cross_entropy_low_precision(memory, rng):
    x, w, b, _ = _problem(67, 40, 211, rng, torch.bfloat16)
    target = torch.rand(67, 211, generator=rng).to(DEVICE)
    # five chunks of rows, or five vocabulary slices
    ours = softxent.linear_binary_cross_entropy(
        x, w, target, linear_bias=b, chunk_size=16 if memory == "speed" else 48, memory=memory, impl="triton"
    )
    eager = F.binary_cross_entropy_with_logits(F.linear(x, w, b).float(), target)
    logits = to_numpy(x) @ to_numpy(w).T + to_numpy(b)
    expected = reference.sigmoid_binary_cross_entropy(logits, target.cpu().numpy())
    assert_no_worse(ours, eager, np.asarray(expected), 1e-6, "loss")
    grad_logits = reference.sigmoid_binary_cross_entropy_grad(logits, target.cpu().numpy())
    refs = [grad_logits @ to_numpy(w), grad_logits.T @ to_numpy(x), grad_logits.sum(0)]
    mine = torch.autograd.grad(ours, [x, w, b])
    theirs = torch.autograd.grad(eager, [x, w, b])
    for name, g, e, ref in zip(["dX", "dW", "db"], mine, theirs, refs, strict=True):
        size = float(np.abs(ref).max())
        assert_no_worse(g.double() / size, e.double() / size, ref / size, 2e-3, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run-to-run determinism)")
@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_linear_cross_entropy_is_bit_identical_run_to_run(memory, rng):
    x, w, b, target = _problem(4099, 512, 32003, rng, torch.bfloat16)
    runs = []
    for _ in range(3):
        loss = softxent.linear_cross_entropy(x, w, target, linear_bias=b, memory=memory, impl="triton")
        runs.append((loss, *torch.autograd.grad(loss, [x, w, b])))
    for other in runs[1:]:
        for first, again in zip(runs[0], other, strict=True):
            assert torch.equal(first, again)
    assert_close(runs[0][0], to_numpy(F.cross_entropy(F.linear(x, w, b).float(), target)), 2e-2, "loss")


class _LateStream(chunks.SideStream):
    """A stand-in side stream on the CPU that runs its work in order (a stream is a queue) but as late as
    SideStream's protocol allows: when a slot is claimed again (that slot's work and what was queued before
    it), or at join. Reading the wrong slot, or a missing claim or join, then reads a G that the next chunks
    overwrote, as an unsynchronized GPU stream could."""

    def __init__(self, device):
        super().__init__(device)
        self.queue = []
        self.submitted = []

    def submit(self, slot, work, keep=()):
        assert slot not in [queued for queued, _ in self.queue], "a slot was reused before it was claimed"
        self.queue.append((slot, work))
        self.submitted.append(slot)

    def claim(self, slot):
        while slot in [queued for queued, _ in self.queue]:
            self.queue.pop(0)[1]()

    def join(self):
        while self.queue:
            self.queue.pop(0)[1]()


@pytest.mark.parametrize("memory", ["speed", "lean"])
@pytest.mark.parametrize("impl", ["triton", "torch"])  # G in bf16 over the logits; G in a float32 buffer
@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_sums_on_a_second_stream_give_the_same_bits(head, impl, memory, rng, monkeypatch):
    """Policy.side_stream: the chunks (speed) or vocabulary slices (lean) alternate between two slots and the
    float32 sum (dW, or dX) accumulates on a side stream. The kernels and their order of accumulation are
    the default's, so every output equals the default schedule's bit for bit, over several chunks or slices
    with a partial last one. On a CPU the side stream is _LateStream (every accumulation as late as
    allowed); on a GPU, a real CUDA stream."""
    x, w, b, target = _problem(83, 40, 211, rng, torch.bfloat16)
    if head == "sigmoid":
        target = torch.rand(83, 211, generator=rng).to(DEVICE)
    loss_fn = softxent.linear_cross_entropy if head == "softmax" else softxent.linear_binary_cross_entropy
    size = 16 if memory == "speed" else 48  # rows a chunk, or classes a slice

    def run():
        loss = loss_fn(x, w, target, linear_bias=b, chunk_size=size, memory=memory, impl=impl)
        return (loss, *torch.autograd.grad(loss, [x, w, b]))

    default = run()
    streams = []
    if DEVICE == "cpu":

        def late(device):
            streams.append(_LateStream(device))
            return streams[-1]

        monkeypatch.setattr(chunks, "SideStream", late)
    with policy.overridden(side_stream=True):
        overlapped = run()
    if DEVICE == "cpu":
        # one pass with gradients; one accumulation a chunk of 16 rows (softmax drops the rows whose target
        # is ignored) or a slice of 48 classes
        if memory == "lean":
            blocks = -(-211 // 48)
        else:
            blocks = -(-(83 if head == "sigmoid" else int((target != -100).sum())) // 16)
        assert [stream.submitted for stream in streams] == [[0, 1, 0, 1, 0, 1][:blocks]]
    for name, first, second in zip(["loss", "dX", "dW", "db"], default, overlapped, strict=True):
        assert torch.equal(first, second), name
