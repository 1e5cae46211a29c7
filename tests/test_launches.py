"""What a call costs, pinned: kernel launches per call on a GPU's policy (counted in Triton's interpreter,
with the policy of an H200 simulated), the launch shapes each row width gets, and the CPU's cache-sized
blocks. Each Triton path (rows in registers, two streaming passes, rows split over programs) is also checked
against the torch backend on every loss feature."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import softxent
from softxent.ops import policy
from softxent.ops.spec import SoftmaxLoss

launches = pytest.importorskip("softxent.ops.triton.launches", reason="the triton package is not installed")
triton_ce = pytest.importorskip(
    "softxent.ops.triton.cross_entropy", reason="the triton package is not installed"
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# a GPU of 4 multiprocessors: wide rows need only 8 of them to fill it, so the interpreter can run both
# sides of the split decision at small shapes
SMALL_GPU = policy.Hardware("cuda", "small test GPU", 4, 8 * 2**20)


def _logits(rng, rows, columns, dtype=torch.float32):
    logits = (torch.randn(rows, columns, generator=rng) * 3).to(DEVICE, dtype).requires_grad_()
    target = torch.randint(0, columns, (rows,), generator=rng).to(DEVICE)
    return logits, target


@pytest.mark.parametrize("rows", [1, 37, 300, 1000])
def test_cross_entropy_is_one_launch_whatever_the_rows(rows, rng):
    """On the GPU's policy a call is one kernel launch at every N (the CPU policy once cut 2^20-logit
    blocks: 1024 launches at 8192×128256)."""
    logits, target = _logits(rng, rows, 517)
    with policy.simulated(policy.H200), launches.recorded() as records:
        loss = softxent.cross_entropy(logits, target, label_smoothing=0.1, impl="triton")
        loss.backward()
    assert [record.kernel for record in records] == ["_softmax_xent_rows_kernel"]
    expected = torch.nn.functional.cross_entropy(logits.detach().float(), target, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_binary_cross_entropy_is_one_launch_and_keeps_no_elementwise_loss(rng):
    logits = torch.randn(300, 211, generator=rng).to(DEVICE).requires_grad_()
    target = torch.rand(300, 211, generator=rng).to(DEVICE)
    for reduction in ("mean", "sum", "none"):
        with policy.simulated(policy.H200), launches.recorded() as records:
            loss = softxent.binary_cross_entropy_with_logits(
                logits, target, reduction=reduction, impl="triton"
            )
        assert [record.kernel for record in records] == ["_sigmoid_bce_kernel"], reduction
        assert records[0].meta["ROW_SUMS"] == (reduction != "none")
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction=reduction)
        torch.testing.assert_close(loss, expected)


def test_linear_head_is_one_launch_a_chunk(rng):
    x = torch.randn(100, 16, generator=rng).to(DEVICE).requires_grad_()
    w = torch.randn(300, 16, generator=rng).to(DEVICE).requires_grad_()
    target = torch.randint(0, 300, (100,), generator=rng).to(DEVICE)
    with policy.simulated(policy.H200), launches.recorded() as records:
        softxent.linear_cross_entropy(x, w, target, chunk_size=32, impl="triton").backward()
    assert [record.kernel for record in records] == ["_softmax_xent_rows_kernel"] * 4  # ⌈100 / 32⌉ chunks
    with policy.simulated(policy.H200), launches.recorded() as records:
        softxent.linear_cross_entropy(x, w, target, memory="lean", chunk_size=128, impl="triton").backward()
    # three slices of 128, 128 and 44 classes: statistics, then the gradient pass
    assert [record.kernel for record in records] == ["_slice_stats_kernel"] * 3 + ["_slice_grad_kernel"] * 3


def test_the_cpu_policy_keeps_cache_sized_blocks():
    cpu = policy.policy(policy.Hardware("cpu", "CPU", 2, 32 * 2**20), "torch")
    assert cpu.block_elements == policy.CPU_BLOCK_ELEMENTS
    assert len(cpu.row_blocks(8192, 128256)) == 8192 // (policy.CPU_BLOCK_ELEMENTS // 128256)
    gpu_torch = policy.policy(policy.H200, "torch")
    assert len(gpu_torch.row_blocks(8192, 128256)) == 64  # 130 rows (16M logits) a block
    triton = policy.policy(policy.H200, "triton")
    assert triton.row_blocks(8192, 128256) == [(0, 8192)]
    assert triton.row_blocks(0, 128256) == []
    assert triton.grad_in_input_dtype
    assert not cpu.grad_in_input_dtype
    assert triton.chunk_rows(128256, 2) == 2048  # 512 MiB of bf16 logits
    assert cpu.chunk_rows(128256, 4) == policy.MIN_CHUNK_ROWS


def test_side_stream_splits_the_chunk_between_two_slots():
    """With side_stream the two slots together hold the default chunk's bytes: half the rows each, the same
    speed-mode memory; one chunk needs no second slot. overridden() changes the policy within its block
    only, and names what it accepts."""
    triton = policy.policy(policy.H200, "triton")
    overlapped = dataclasses.replace(triton, side_stream=True)
    assert overlapped.chunk_rows(128256, 2) == triton.chunk_rows(128256, 2) // 2 == 1024
    big = (8192, 4096, 128256, torch.bfloat16)
    assert overlapped.speed_mode_bytes(*big) == triton.speed_mode_bytes(*big)
    one_chunk = (512, 4096, 128256, torch.bfloat16)
    assert overlapped.speed_mode_bytes(*one_chunk) == triton.speed_mode_bytes(*one_chunk)
    device = torch.device("cpu")
    with policy.simulated(policy.H200), policy.overridden(side_stream=True, chunk_bytes=2**28):
        inside = policy.for_device(device, "triton")
    assert inside.side_stream
    assert inside.chunk_bytes == 2**28
    with policy.simulated(policy.H200):
        assert policy.for_device(device, "triton") == triton
    # weight-sized chunks: where dW is summed (features given), a chunk holds at least the bf16 weight's
    # bytes: 4096 rows at 128256×4096 (1 GiB), 2304 at 256000×2304; none where dW is not wanted
    assert triton.weight_sized_chunks
    assert triton.chunk_rows(128256, 2, 4096) == 4096
    assert triton.chunk_rows(256000, 2, 2304) == 2304
    assert triton.chunk_rows(128256, 2, 64) == triton.chunk_rows(128256, 2) == 2048  # a small weight
    # float32 inputs: dW is the float32 sum itself, with no bf16 copy to make room
    assert triton.chunk_rows(128256, 4, 4096) == triton.chunk_rows(128256, 4) == 1024
    assert overlapped.chunk_rows(128256, 2, 4096) == 2048  # two slots of half
    assert not policy.policy(policy.H200, "torch").weight_sized_chunks
    # dX-sized slices (lean): where dX is summed (features given) over bf16 slices, a slice holds at least
    # x's bytes: 4096 classes at 32768×4096 (256 MiB) instead of 1024 (64 MiB); no change where x is
    # smaller than the 64 MiB slice, for float32 inputs (dX is the float32 sum itself) or without dX
    bf16 = torch.bfloat16
    assert triton.dx_sized_slices
    assert triton.slice_columns(32768, bf16, 4096) == 4096
    assert triton.slice_columns(32768, bf16) == 1024
    assert triton.slice_columns(8192, bf16, 2304) == triton.slice_columns(8192, bf16) == 4096
    assert triton.slice_columns(32768, torch.float32, 4096) == triton.slice_columns(32768, torch.float32)
    assert not policy.policy(policy.H200, "torch").dx_sized_slices
    expected = r"fields: expected some of .*got \['chunk_size'\]"
    with pytest.raises(ValueError, match=expected), policy.overridden(chunk_size=1):
        pass


@pytest.mark.parametrize(
    ("rows", "columns", "expected"),
    [
        # narrow rows: tiles of whole rows, 16 logits a thread
        (65536, 10, policy.RowLaunch(16, 256, 8, 1, True)),
        (65536, 1000, policy.RowLaunch(1024, 4, 8, 1, True)),
        (65536, 16384, policy.RowLaunch(16384, 1, 32, 1, True)),
        # wide rows: two streaming passes, one program a row when they fill the GPU
        (65536, 32000, policy.RowLaunch(8192, 1, 16, 1, False)),
        (8192, 128256, policy.RowLaunch(8192, 1, 16, 1, False)),
        (512, 256000, policy.RowLaunch(8192, 1, 16, 1, False)),
        # too few wide rows for 2 × 132 programs: several programs a row
        (64, 256000, policy.RowLaunch(8192, 1, 16, 5, False)),
        (1, 128256, policy.RowLaunch(8192, 1, 16, 3, False)),
        (8, 4_000_000, policy.RowLaunch(8192, 1, 16, 33, False)),
    ],
)
def test_row_launch_shapes_on_an_h200(rows, columns, expected):
    assert policy.row_launch(rows, columns, policy.H200) == expected


def _torch_vs_triton(logits, target, spec, scale, target_grad):
    results = []
    for block in (triton_ce.softmax_xent_block, softxent.ops.torch_blocks.softmax_xent_block):
        grad = torch.empty_like(logits)
        tgrad = torch.empty_like(target) if target_grad else None
        loss, lse = block(logits, target, spec, grad_scale=scale, grad_out=grad, target_grad_out=tgrad)
        results.append((loss, lse, grad, tgrad))
    return results


FEATURES = list(
    itertools.product(
        [False, True],  # probabilities
        [False, True],  # class weights
        [0.0, 0.15],  # label smoothing
        [0.0, 1e-3],  # z_loss
        [None, 7.0],  # softcap
    )
)
# (rows, columns) that take each path on SMALL_GPU: two streaming passes (enough rows to fill it), and rows
# split over 2 programs (too few rows; 6 blocks of 8192 columns each, the last one partial)
PATHS = {"streaming": (9, 2 * policy.STREAM_BLOCK + 37), "split": (2, 11 * policy.STREAM_BLOCK + 5)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("probabilities", "weighted", "smoothing", "z_loss", "softcap"), FEATURES)
def test_wide_row_paths_equal_the_torch_block(path, probabilities, weighted, smoothing, z_loss, softcap, rng):
    rows, columns = PATHS[path]
    shape = policy.row_launch(rows, columns, SMALL_GPU)
    assert not shape.single_pass
    assert (shape.splits > 1) == (path == "split")
    logits = (torch.randn(rows, columns, generator=rng) * 3).to(DEVICE)
    logits[:, 5::97] = float("-inf")  # masked classes
    if probabilities:
        target = torch.softmax(torch.randn(rows, columns, generator=rng), dim=1).to(DEVICE)
    else:
        target = torch.randint(0, columns, (rows,), generator=rng)
        target = torch.where(target % 97 == 5, target + 1, target)
        target[0] = -100
        target[-1] = columns - 3  # the last block, read first by the gradient pass
        target = target.to(DEVICE)
    weight = (torch.rand(columns, generator=rng) + 0.1).to(DEVICE) if weighted else None
    spec = SoftmaxLoss(weight, -100, smoothing, z_loss, softcap)
    scale = (torch.rand(rows, generator=rng) + 0.5).to(DEVICE)
    with policy.simulated(SMALL_GPU), launches.recorded() as records:
        ours, theirs = _torch_vs_triton(logits, target, spec, scale, probabilities)
    assert len(records) == (2 if path == "split" else 1)
    for name, mine, expected in zip(("loss", "lse", "grad", "target grad"), ours, theirs, strict=True):
        if mine is not None:
            torch.testing.assert_close(mine, expected, atol=1e-6, rtol=2e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("path", list(PATHS))
def test_wide_row_paths_in_place_and_forward_only(path, rng):
    """The gradient may overwrite the logits (the true logit is read before any store), and without a
    gradient the passes only read."""
    rows, columns = PATHS[path]
    logits = (torch.randn(rows, columns, generator=rng) * 3).to(DEVICE)
    target = torch.randint(0, columns, (rows,), generator=rng).to(DEVICE)
    spec = SoftmaxLoss(None, -100, 0.1, 0.0, None)
    expected_grad = torch.empty_like(logits)
    expected_loss, _ = softxent.ops.torch_blocks.softmax_xent_block(
        logits, target, spec, grad_scale=0.5, grad_out=expected_grad
    )
    with policy.simulated(SMALL_GPU):
        forward_loss, _ = triton_ce.softmax_xent_block(logits, target, spec)
        in_place = logits.clone()
        loss, _ = triton_ce.softmax_xent_block(in_place, target, spec, grad_scale=0.5, grad_out=in_place)
    torch.testing.assert_close(forward_loss, expected_loss)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(in_place, expected_grad, atol=1e-7, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: host synchronizations are a GPU's concern")
@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_no_host_synchronization_on_the_gpu(memory, rng):
    """torch raises on any synchronizing call under sync debug mode "error": the Triton path makes none,
    forward or backward (reductions, denominators, all-ignored batches and the kernels' scales stay on the
    device)."""
    logits, target = _logits(rng, 300, 40000, torch.bfloat16)
    x = torch.randn(300, 64, generator=rng).to(DEVICE, torch.bfloat16).requires_grad_()
    w = torch.randn(5000, 64, generator=rng).to(DEVICE, torch.bfloat16).requires_grad_()
    labels = target % 5000
    probabilities = torch.rand(300, 211, generator=rng).to(DEVICE)
    bce_logits = torch.randn(300, 211, generator=rng).to(DEVICE).requires_grad_()

    def step() -> None:
        softxent.cross_entropy(logits, target, label_smoothing=0.1).backward()
        softxent.binary_cross_entropy_with_logits(bce_logits, probabilities).backward()
        softxent.linear_cross_entropy(x, w, labels, memory=memory).backward()

    step()  # the first call probes cuBLAS once per device and dtype (policy.addmm_accumulates_in_float32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: run-to-run determinism is a property of the GPU")
@pytest.mark.parametrize(("rows", "columns"), [(20011, 1000), (4099, 32003), (8, 300007)])
def test_every_path_is_deterministic_on_the_gpu(rows, columns, rng):
    """Rows in registers, two streaming passes, rows split over programs (8 rows of 300007 classes on any
    GPU of more than 4 multiprocessors): bit-identical loss and gradient run to run."""
    logits, target = _logits(rng, rows, columns, torch.bfloat16)
    runs = []
    for _ in range(3):
        logits.grad = None
        loss = softxent.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)
        loss.backward()
        runs.append((loss.detach().clone(), logits.grad.clone()))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        assert torch.equal(grad, runs[0][1])
