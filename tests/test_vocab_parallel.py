"""softxent.distributed's vocabulary-parallel losses: two and three Gloo processes on this machine, each
against the single-device op on the gathered tensors (see vocab_parallel_worker.py for the cases)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import softxent
import vocab_parallel_worker
from helpers import fresh_seed
from softxent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

IMPLS = ["torch", *(["triton"] if importlib.util.find_spec("triton") else [])]


@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_device(world: int, tmp_path) -> None:
    """Loss, logits gradient, dX, each weight and bias shard's gradient, for every loss feature and
    reduction, uneven and empty shards, extreme logits, several chunks, both backends (Triton in the
    interpreter), and the collective errors."""
    seed = fresh_seed(31)
    print(f"seed: {seed}")  # shown by pytest when the test fails; SOFTXENT_TEST_SEED replays it
    # the Triton interpreter is slow: the three-process run covers the torch backend, the two-process both
    impls = IMPLS if world == 2 else ["torch"]
    mp.spawn(
        vocab_parallel_worker.run,
        args=(world, str(tmp_path / "rendezvous"), seed, impls),
        nprocs=world,
        join=True,
    )


def test_needs_an_initialized_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(ValueError, match=r"group: expected an initialized torch\.distributed process group"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="group: expected an initialized"):
        vocab_parallel_linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]))


@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("single_process_group")
def test_argument_errors() -> None:
    """Local argument errors (raised before any collective) name the argument, expected vs got."""
    with pytest.raises(
        ValueError, match=r"target: expected probabilities of this rank's classes, shape \(2, 3\)"
    ):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.rand(2, 4))
    with pytest.raises(TypeError, match=r"target: expected integer class indices \(int64, int32 or uint8\)"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"target: expected class indices of shape \(2,\)"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match=r"linear_weight: expected shape \(C_r, 3\)"):
        vocab_parallel_linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 5), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"linear_weight: expected torch\.float32"):
        vocab_parallel_linear_cross_entropy(
            torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1])
        )
    with pytest.raises(ValueError, match=r"linear_bias: expected shape \(4,\)"):
        vocab_parallel_linear_cross_entropy(
            torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), linear_bias=torch.randn(5)
        )
    with pytest.raises(TypeError, match=r"group: expected a torch\.distributed ProcessGroup"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), group="world")
    with pytest.raises(
        ValueError,
        match=r"weight: expected the class weights, a 1-D tensor of shape \(C,\) .* got shape \(4, 3\) "
        r"\(the linear head's weight is linear_weight\)",
    ):  # the linear weight passed as the class weights, by the name of softxent.linear_cross_entropy's
        vocab_parallel_linear_cross_entropy(
            torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), weight=torch.randn(4, 3)
        )
    with pytest.raises(
        ValueError, match=r"ignore_index: expected None when target holds class probabilities"
    ):
        vocab_parallel_linear_cross_entropy(
            torch.randn(2, 3), torch.randn(4, 3), torch.rand(2, 4), ignore_index=-100
        )


@pytest.mark.usefixtures("single_process_group")
def test_the_linear_loss_takes_linear_cross_entropys_arguments() -> None:
    """Drop-in for softxent.linear_cross_entropy: the same argument names and defaults (ignore_index None:
    -100 for class indices), the same result on one rank."""
    import inspect

    import softxent

    mine = inspect.signature(vocab_parallel_linear_cross_entropy).parameters
    single = inspect.signature(softxent.linear_cross_entropy).parameters
    for name, parameter in mine.items():
        if name != "group":
            assert name in single, name
            assert parameter.default == single[name].default, name
    x, w, b = torch.randn(7, 5), torch.randn(11, 5), torch.randn(11)
    target = torch.tensor([0, 3, -100, 10, 2, -100, 7])
    torch.testing.assert_close(
        vocab_parallel_linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.2),
        softxent.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.2),
    )


@pytest.mark.usefixtures("single_process_group")
def test_one_rank_is_the_single_device_op() -> None:
    logits = torch.randn(9, 31, requires_grad=True)
    target = torch.randint(0, 31, (9,))
    loss = vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1)
    expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)
    soft = torch.softmax(torch.randn(9, 31), 1).requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, soft, label_smoothing=0.1)
    expected = torch.nn.functional.cross_entropy(logits, soft, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    for mine, torchs in zip(
        torch.autograd.grad(loss, [logits, soft]), torch.autograd.grad(expected, [logits, soft]), strict=True
    ):
        torch.testing.assert_close(mine, torchs)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL runs one GPU per rank)")
def test_matches_single_device_on_gpus_with_nccl(tmp_path) -> None:
    """The same checks with NCCL, rank r on GPU r, the Triton kernels compiled for the GPU."""
    seed = fresh_seed(31)
    print(f"seed: {seed}")  # shown by pytest when the test fails; SOFTXENT_TEST_SEED replays it
    mp.spawn(
        vocab_parallel_worker.run,
        args=(2, str(tmp_path / "rendezvous"), seed, IMPLS, "nccl"),
        nprocs=2,
        join=True,
    )


@pytest.mark.usefixtures("single_process_group")
def test_no_second_derivatives_and_the_error_says_why() -> None:
    """A differentiable backward (create_graph=True) would need the other ranks' logits: a RuntimeError
    saying so, not a silently wrong gradient; the first-order backward is unaffected."""
    logits = torch.randn(3, 5, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([0, 4, 2]))
    with pytest.raises(RuntimeError, match=r"vocabulary-parallel losses have no differentiable backward"):
        torch.autograd.grad(loss, logits, create_graph=True)
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    loss = vocab_parallel_linear_cross_entropy(x, w, torch.tensor([0, 4, 2]))
    with pytest.raises(RuntimeError, match=r"vocabulary-parallel losses have no differentiable backward"):
        torch.autograd.grad(loss, (x, w), create_graph=True)
    (grad,) = torch.autograd.grad(vocab_parallel_cross_entropy(logits, torch.tensor([0, 4, 2])), logits)
    expected = torch.autograd.grad(softxent.cross_entropy(logits, torch.tensor([0, 4, 2])), logits)[0]
    torch.testing.assert_close(grad, expected)
