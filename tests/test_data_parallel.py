"""Data-parallel training (softxent.distributed._data_parallel, the estimators, ``softxent train --nproc``
and torchrun): two and three Gloo processes on this machine fit the same models as one process with the
same global batch, within float rounding.

Spawning costs seconds per process (each imports torch and scikit-learn), so each group size is started
once and runs every case of data_parallel_worker.py (the cases and the group-only checks); the tests
compare its results with the same cases fitted here, in one process. Data are fresh every run (the seed is
printed on failure).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import make_classification

import data_parallel_worker
from data_parallel_worker import CASES, State
from helpers import fresh_seed
from softxent.cli import main
from softxent.distributed._data_parallel import (
    ReplicaGroup,
    all_reduce_sum,
    launch,
    rank_and_world_size,
    run_on_rank_zero,
    shard_bounds,
    sum_gradients,
    torchrun_environment,
)
from softxent.estimators import SoftmaxClassifier, load_model

# Relative tolerance (of the largest magnitude) between a data-parallel and a one-process fit: the sums
# over a batch are grouped differently (per rank, then across ranks), so they round differently. Measured
# worst: 6e-16 in float64, 1.3e-7 in float32, over 6 to 12 epochs.
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
TORCHRUN_ENV = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
}


@pytest.fixture(scope="module")
def seed() -> int:
    seed = fresh_seed(31)
    print(f"data seed: {seed}")  # shown by pytest when a test fails; SOFTXENT_TEST_SEED replays it
    return seed


@pytest.fixture(scope="module")
def one_process(seed: int) -> dict[str, State]:
    """Every case fitted in this process (torch.distributed not initialized)."""
    assert rank_and_world_size() == (0, 1)
    return data_parallel_worker.run_cases(seed)


@pytest.fixture(scope="module")
def launched(seed: int) -> Callable[[int], list[dict[str, Any]]]:
    """world size -> the ranks' findings (data_parallel_worker.rank_checks), each group started once."""
    cache: dict[int, list[dict[str, Any]]] = {}

    def run(world_size: int) -> list[dict[str, Any]]:
        if world_size not in cache:
            cache[world_size] = launch(data_parallel_worker.rank_checks, world_size, (seed,))
        return cache[world_size]

    return run


def assert_same_fit(got: State, expected: State, what: str, exact: bool = False) -> None:
    """Same epochs, steps and classes; parameters, loss curve and validation scores equal within the
    dtype's RTOL of their largest magnitude (bit for bit with ``exact``)."""
    for name in ("n_iter_", "t_"):
        assert got[name] == expected[name], f"{what}: {name} {got[name]} != {expected[name]}"
    assert np.array_equal(got["classes_"], expected["classes_"]), f"{what}: classes_"
    assert (got["validation_scores_"] is None) == (expected["validation_scores_"] is None), what
    arrays = ["coef_", "intercept_", "loss_curve_", "validation_scores_"]
    pairs = [(name, got[name], expected[name]) for name in arrays if expected[name] is not None]
    for name in ("hidden_coefs_", "hidden_intercepts_"):
        assert len(got[name]) == len(expected[name]), f"{what}: {name}"
        pairs += [
            (f"{name}[{k}]", g, e) for k, (g, e) in enumerate(zip(got[name], expected[name], strict=True))
        ]
    rtol = RTOL[np.asarray(expected["coef_"]).dtype]
    for name, g, e in pairs:
        g, e = np.asarray(g, dtype=np.float64), np.asarray(e, dtype=np.float64)
        assert g.shape == e.shape, f"{what}: {name} shape {g.shape} != {e.shape}"
        if exact:
            assert np.array_equal(g, e), f"{what}: {name} differs between ranks"
            continue
        scale = max(float(np.abs(e).max(initial=0.0)), 1e-12)
        diff = np.abs(g - e)
        worst = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else ()
        assert diff.max(initial=0.0) <= rtol * scale, (
            f"{what}: {name} max diff {diff.max():.3g} > {rtol:g} x {scale:.3g} "
            f"(at {worst}: {g[worst]!r} vs {e[worst]!r})"
        )


# --- two and three Gloo processes against one --------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_data_parallel_fit_equals_one_process(
    case: str, world_size: int, launched: Callable, one_process: dict[str, State]
) -> None:
    ranks = launched(world_size)
    assert [found["rank"] for found in ranks] == list(range(world_size))
    assert all(found["world_size"] == world_size for found in ranks)
    assert_same_fit(ranks[0]["states"][case], one_process[case], f"{case}, {world_size} ranks")
    for found in ranks[1:]:
        assert_same_fit(
            found["states"][case], ranks[0]["states"][case], f"{case}, rank {found['rank']}", True
        )


@pytest.mark.parametrize("world_size", [2, 3])
def test_group_checks(world_size: int, launched: Callable) -> None:
    ranks = launched(world_size)
    for found in ranks:
        rank = found["rank"]
        # random_state=None: one seed (rank 0's) for every rank
        assert_same_fit(found["unseeded"], ranks[0]["unseeded"], f"unseeded, rank {rank}", exact=True)
        assert found["mismatch"] is not None, f"rank {rank}: data that differ between ranks were accepted"
        assert "expected the same on all" in found["mismatch"]
        assert "n_samples" in found["mismatch"]
        assert found["callback_epochs"] == 2, f"rank {rank} ran {found['callback_epochs']} epochs"
        assert found["shared"] == {"from": 0}
        assert found["unshared"] == ("rank 0 only" if rank == 0 else None)
        expected = "OSError: disk full" if rank == 0 else "RankZeroError: rank 0 failed: OSError: disk full"
        assert found["failure"] == expected
        total = sum(range(world_size))
        assert found["sum"] == [[float(total)] * 3, 10.0 * total]


def test_explicit_process_group(launched: Callable, one_process: dict[str, State]) -> None:
    """Ranks 0 and 1 of three fit together on a two-rank group; rank 2 alone on a group of one."""
    for found in launched(3):
        assert_same_fit(found["subgroup"], one_process["softmax_weighted"], f"subgroup, rank {found['rank']}")


# --- the helpers in one process -------------------------------------------------------------------------


def test_shard_bounds_partition_every_range() -> None:
    rng = np.random.default_rng()
    for _ in range(200):
        start = int(rng.integers(0, 50))
        stop = start + int(rng.integers(0, 40))
        world_size = int(rng.integers(1, 9))
        shares = [shard_bounds(start, stop, rank, world_size) for rank in range(world_size)]
        assert shares[0][0] == start, shares
        assert shares[-1][1] == stop, shares
        assert all(a[1] == b[0] for a, b in itertools.pairwise(shares)), shares
        sizes = [hi - lo for lo, hi in shares]
        assert min(sizes) >= 0, shares
        assert max(sizes) - min(sizes) <= 1, shares
    with pytest.raises(ValueError, match=r"rank: expected 0 <= rank < world_size=2, got 2"):
        shard_bounds(0, 5, 2, 2)
    with pytest.raises(ValueError, match=r"stop: expected stop >= start=5, got 4"):
        shard_bounds(5, 4, 0, 2)


def test_helpers_without_a_process_group() -> None:
    assert rank_and_world_size() == (0, 1)
    tensors = [torch.randn(2, 3, dtype=torch.float64), torch.randn((), dtype=torch.float64)]
    sums = all_reduce_sum(tensors)
    assert all(torch.equal(s, t) and s.shape == t.shape for s, t in zip(sums, tensors, strict=True))
    with pytest.raises(ValueError, match=r"tensors: expected one dtype and one device"):
        all_reduce_sum([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    weight = torch.randn(3, 2, requires_grad=True)
    (weight.square().sum()).backward()
    grad = weight.grad.clone()
    (loss,) = sum_gradients([weight], torch.tensor(5.0))
    assert torch.equal(weight.grad, grad)
    assert float(loss) == 5.0
    assert run_on_rank_zero(divmod, 7, 2) == (3, 1)
    replicas = ReplicaGroup.resolve(None, torch.device("cpu"))
    assert (replicas.size, replicas.share(3, 10), replicas.broadcast_int(7), replicas.any(True)) == (
        1,
        (3, 10),
        7,
        True,
    )


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"nproc: expected an int >= 1, got 0"):
        launch(print, 0)
    with pytest.raises(TypeError, match=r"nproc: expected an int >= 1, got True"):
        launch(print, True)
    with pytest.raises(ValueError, match=r"backend: expected 'gloo' or 'nccl', got 'mpi'"):
        launch(print, 2, backend="mpi")
    with pytest.raises(ValueError, match=r"group: expected None or a group of an initialized"):
        rank_and_world_size(object())
    X, y = np.random.default_rng().normal(size=(20, 3)), np.arange(20) % 2
    with pytest.raises(ValueError, match=r"process_group: expected None or a group of an initialized"):
        SoftmaxClassifier().fit(X, y, process_group=object())


def test_torchrun_environment() -> None:
    assert torchrun_environment({}) is None
    environment = torchrun_environment(TORCHRUN_ENV)
    assert (environment.rank, environment.world_size, environment.local_rank) == (1, 2, 1)
    assert (environment.master_addr, environment.master_port) == ("node0", 29500)
    with pytest.raises(ValueError, match=r"got no MASTER_ADDR, MASTER_PORT, LOCAL_RANK"):
        torchrun_environment({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"RANK: expected an integer, got 'one'"):
        torchrun_environment({**TORCHRUN_ENV, "RANK": "one"})
    with pytest.raises(ValueError, match=r"0 <= RANK < WORLD_SIZE, got RANK=2 WORLD_SIZE=2"):
        torchrun_environment({**TORCHRUN_ENV, "RANK": "2"})
    with pytest.raises(ValueError, match=r"0 < MASTER_PORT < 65536, got LOCAL_RANK=1 MASTER_PORT=70000"):
        torchrun_environment({**TORCHRUN_ENV, "MASTER_PORT": "70000"})


# --- the command line ------------------------------------------------------------------------------------

CLI_OPTIONS = ["--target", "label", "--epochs", "4", "--batch-size", "16", "--hidden", "6"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a CSV of 151 rows, the --out directory of a one-process `softxent train` on it)."""
    root = tmp_path_factory.mktemp("cli")
    X, y = make_classification(
        n_samples=151,
        n_features=5,
        n_informative=3,
        n_redundant=0,
        n_classes=3,
        class_sep=2.0,
        random_state=3,
    )
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(5)])
    frame["label"] = np.array(["ant", "bee", "cat"])[y]
    data = root / "train.csv"
    frame.to_csv(data, index=False)
    assert main(["train", str(data), *CLI_OPTIONS, "--out", str(root / "one")]) == 0
    return data, root / "one"


def assert_same_model(got: Path, expected: Path, processes: int) -> None:
    model, metadata = load_model(got / "model.safetensors")
    reference, reference_metadata = load_model(expected / "model.safetensors")
    assert metadata["processes"] == processes
    assert reference_metadata["processes"] == 1
    assert {k: v for k, v in metadata["options"].items() if k != "checkpoint_every"} == {
        k: v for k, v in reference_metadata["options"].items() if k != "checkpoint_every"
    }
    for name in ("coef_", "intercept_", "loss_curve_"):
        a, b = np.asarray(getattr(model, name)), np.asarray(getattr(reference, name))
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), name
    for a, b in zip(model.hidden_coefs_, reference.hidden_coefs_, strict=True):
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), "hidden_coefs_"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in expected.iterdir())


def test_cli_nproc_2_equals_one_process(
    cli_run: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data, one = cli_run
    capfd.readouterr()
    out = tmp_path / "two"
    argv = ["train", str(data), *CLI_OPTIONS, "--out", str(out), "--nproc", "2", "--checkpoint-every", "2"]
    assert main(argv) == 0
    stdout, stderr = capfd.readouterr()
    assert_same_model(out, one, processes=2)  # the checkpoint written at epochs 2 and 4 is gone
    assert stdout.count("training SoftmaxClassifier") == 1, stdout  # rank 0 alone prints
    assert "data-parallel on 2 processes" in stdout
    assert stdout.count("held-out split") == 1
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == [out]


def test_cli_under_torchrun_equals_one_process(cli_run: tuple[Path, Path], tmp_path: Path) -> None:
    """torchrun with the rendezvous flags of a multi-machine run (one node here, the store on a free port)."""
    data, one = cli_run
    out = tmp_path / "torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", "softxent-test"]
    command = [
        *torchrun,
        *rendezvous,
        "-m",
        "softxent.cli",
        "train",
        str(data),
        *CLI_OPTIONS,
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("training SoftmaxClassifier") == 1, result.stdout
    assert_same_model(out, one, processes=2)


def test_cli_nproc_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cases = [
        ({}, ["--nproc", "0"], "softxent: error: --nproc: expected an integer >= 1, got 0"),
        (TORCHRUN_ENV, ["--nproc", "2"], "softxent: error: --nproc: expected 1 under torchrun (RANK=1"),
        ({"WORLD_SIZE": "2"}, [], "softxent: error: torchrun environment: expected RANK, WORLD_SIZE"),
    ]
    for environ, options, message in cases:
        with monkeypatch.context() as patch:
            for name, value in environ.items():
                patch.setenv(name, value)
            assert main(["train", "--epochs", "1", "--out", str(out), *options]) == 2
        _, stderr = capsys.readouterr()
        assert stderr.startswith(message), stderr
        assert stderr.count("\n") == 1, stderr
    assert not out.exists()


# --- on a GPU machine -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"needs 2 CUDA devices (NCCL runs one GPU per rank); found {torch.cuda.device_count()}",
)
def test_nccl_one_gpu_per_rank_equals_one_process(seed: int) -> None:
    expected = data_parallel_worker.run_cases(seed, "cuda")
    ranks = launch(data_parallel_worker.rank_checks, 2, (seed, "cuda"), backend="nccl")
    for case in CASES:
        assert_same_fit(ranks[0]["states"][case], expected[case], f"{case}, NCCL")
        assert_same_fit(ranks[1]["states"][case], ranks[0]["states"][case], f"{case}, rank 1", exact=True)
    assert ranks[1]["failure"] == "RankZeroError: rank 0 failed: OSError: disk full"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Gloo ranks sharing one GPU)")
def test_gloo_ranks_sharing_one_gpu_equal_one_process(seed: int) -> None:
    expected = data_parallel_worker.run_cases(seed, "cuda")
    ranks = launch(data_parallel_worker.rank_checks, 2, (seed, "cuda"), backend="gloo")
    for case in CASES:
        assert_same_fit(ranks[0]["states"][case], expected[case], f"{case}, Gloo on CUDA")
        assert_same_fit(ranks[1]["states"][case], ranks[0]["states"][case], f"{case}, rank 1", exact=True)
