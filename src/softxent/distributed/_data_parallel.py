r"""Data-parallel training on torch.distributed: the helpers behind the estimators' and ``softxent train``'s
multi-process fits.

Every rank holds the whole training set and the same parameters θ. Each global minibatch B (the same rows
on every rank: the shuffling is seeded identically) is cut into P contiguous shares B_0, ..., B_{P−1} whose
sizes differ by at most one (a share may be empty when |B| < P). Rank r computes the gradient of its
share's weighted loss sum, divided by the whole batch's size,

.. math::
    g_r = \frac{1}{|B|\,\bar s} ∇_θ \sum_{i ∈ B_r} s_i ℓ_i(θ), \qquad
    \sum_r g_r = \frac{1}{|B|\,\bar s} ∇_θ \sum_{i ∈ B} s_i ℓ_i(θ),

and one all-reduce (sum) of the flattened gradients, with the loss sums riding along, gives every rank the
one-process gradient of B. All ranks then take the same SGD step, so the parameters stay identical across
ranks and equal, within float rounding (the sums are grouped differently), to a one-process fit with the
same global batch size. This is DistributedDataParallel's gradient all-reduce, done on a dict of
parameters and a functional SGD step instead of an ``nn.Module``.

Here: :func:`rank_and_world_size`, :func:`shard_bounds`, :func:`all_reduce_sum` (one flattened all-reduce
of a list of tensors), :func:`sum_gradients`, :func:`run_on_rank_zero` (write files on rank 0 while the
others wait; a failure there reaches every rank), :func:`torchrun_environment` /
:func:`init_from_torchrun` (join the group torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and :func:`launch` (N local processes in one group, torch.multiprocessing spawn).
:class:`ReplicaGroup` is the estimators' view of one fit's ranks.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

# The public names (re-exported by softxent.distributed); the rest serve the estimators and the command line.
__all__ = ["RankZeroError", "init_from_torchrun", "launch", "run_on_rank_zero"]

T = TypeVar("T")

# The variables torchrun sets for every worker (env:// initialization reads the first four).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
LOCALHOST = "127.0.0.1"


class RankZeroError(RuntimeError):
    """Raised on ranks 1, ..., P−1 when the function :func:`run_on_rank_zero` ran on rank 0 raised (rank 0
    raises the original exception)."""


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_group(group: object, name: str = "group") -> dist.ProcessGroup | None:
    """``group`` itself, checked: None, or a ProcessGroup of an initialized torch.distributed."""
    if group is None:
        return None
    if not _initialized():
        raise ValueError(
            f"{name}: expected None or a group of an initialized torch.distributed (call "
            "torch.distributed.init_process_group first), got a group while none is initialized"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{name}: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    return group


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size); ``group=None`` is the default group, and
    (0, 1) when torch.distributed is not initialized.

    >>> rank_and_world_size()
    (0, 1)
    """
    group = _check_group(group)
    if not _initialized():
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"group: expected a group this process (global rank {dist.get_rank()}) belongs to, got one "
            "without it"
        )
    return rank, dist.get_world_size(group)


def shard_bounds(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of the rows [start, stop) cut into ``world_size`` shares.

    The first (stop − start) mod P shares get one row more (``numpy.array_split``'s rule), so shares
    differ by at most one row and may be empty when there are fewer rows than ranks.

    >>> [shard_bounds(10, 21, rank, 3) for rank in range(3)]
    [(10, 14), (14, 18), (18, 21)]
    >>> [shard_bounds(0, 1, rank, 3) for rank in range(3)]
    [(0, 1), (1, 1), (1, 1)]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    if stop < start:
        raise ValueError(f"stop: expected stop >= start={start}, got {stop}")
    base, extra = divmod(stop - start, world_size)
    lo = start + rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def all_reduce_sum(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Σ over the ranks of each tensor, with one all-reduce of their concatenation.

    Args:
        tensors: tensors of any shapes, all of one dtype and on one device (CUDA for NCCL).
        group: the process group; None is the default group.

    Returns:
        New tensors (views of one flat buffer), the sums, shaped as the inputs; the inputs are unchanged.
        Without torch.distributed initialized (or in a group of one), copies of the inputs.

    >>> all_reduce_sum([torch.ones(2), torch.tensor(3.0)])
    [tensor([1., 1.]), tensor(3.)]
    """
    tensors = list(tensors)
    if not tensors:
        return []
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"tensors: expected one dtype and one device, got dtypes {sorted(map(str, dtypes))} and "
            f"devices {sorted(map(str, devices))}"
        )
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    if rank_and_world_size(group)[1] > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    sums = flat.split([t.numel() for t in tensors])
    return [total.view(t.shape) for total, t in zip(sums, tensors, strict=True)]


def sum_gradients(
    parameters: Iterable[Tensor], *extra: Tensor, group: dist.ProcessGroup | None = None
) -> list[Tensor]:
    """Replace every parameter's ``.grad`` by its sum over the ranks (a missing grad counts as zeros) and
    return the sums of ``extra`` (e.g. loss sums), all in one all-reduce.

    With each rank's gradient taken of its share's loss sum divided by the global batch size, the sum is
    the gradient of the global batch's mean loss: the same as DistributedDataParallel's averaging when
    every rank holds |B|/P rows, and still right when the shares are uneven.
    """
    parameters = list(parameters)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
    sums = all_reduce_sum([*grads, *extra], group=group)
    for p, total in zip(parameters, sums, strict=False):
        p.grad = total
    return sums[len(parameters) :]


def _broadcast_from_rank_zero(objects: list[Any], group: dist.ProcessGroup | None) -> None:
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(objects, src=src, group=group)


def run_on_rank_zero(
    fn: Callable[..., T],
    /,
    *args: Any,
    group: dist.ProcessGroup | None = None,
    share_result: bool = False,
    **kwargs: Any,
) -> T | None:
    """Call ``fn(*args, **kwargs)`` on rank 0 of ``group`` only (writing files, reading a checkpoint) while
    the other ranks wait for it; a collective: every rank of the group must call it.

    One broadcast from rank 0 ends the wait and tells every rank whether ``fn`` succeeded: if it raised,
    rank 0 re-raises that exception and the other ranks raise :class:`RankZeroError` with its message, so
    no rank is left waiting in a later collective.

    Args:
        fn: the function; its result must be picklable when ``share_result``.
        group: the process group; None is the default one. Without torch.distributed initialized (or in a
            group of one) ``fn`` simply runs.
        share_result: give every rank ``fn``'s result (else the other ranks get None).

    Returns:
        ``fn``'s result on rank 0 (and on every rank with ``share_result``), else None.

    >>> run_on_rank_zero(max, 3, 4)
    4
    """
    rank, world_size = rank_and_world_size(group)
    if world_size == 1:
        return fn(*args, **kwargs)
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as error:
            _broadcast_from_rank_zero([(f"{type(error).__name__}: {error}", None)], group)
            raise
        outcome = [(None, result if share_result else None)]
        _broadcast_from_rank_zero(outcome, group)
        return result
    _broadcast_from_rank_zero(outcome, group)
    failure, result = outcome[0]
    if failure is not None:
        raise RankZeroError(f"rank 0 failed: {failure}")
    return result


@dataclasses.dataclass(frozen=True)
class ReplicaGroup:
    """The ranks of one data-parallel fit, each holding a replica of the model.

    ``group`` is None for a one-process fit (``size`` 1), where every method is the identity.
    ``device`` holds the small tensors of the agreement collectives: the training device for NCCL, the
    CPU otherwise.
    """

    group: dist.ProcessGroup | None
    rank: int
    size: int
    device: torch.device

    @classmethod
    def resolve(cls, process_group: object, device: torch.device) -> ReplicaGroup:
        """The ranks a fit trains on: ``process_group``, or with None the default group when
        torch.distributed is initialized, else this process alone.

        Raises ValueError for a group on the NCCL backend with a non-CUDA training device.
        """
        group = _check_group(process_group, "process_group")
        if group is None and not _initialized():
            return cls(None, 0, 1, torch.device("cpu"))
        group = dist.group.WORLD if group is None else group
        rank, size = rank_and_world_size(group)
        if size == 1:
            return cls(None, 0, 1, torch.device("cpu"))
        backend = dist.get_backend(group)
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(
                f"device: a data-parallel fit on an NCCL process group trains on CUDA, got device "
                f"{str(device)!r}; pass device='cuda' or use a Gloo group for CPU training"
            )
        return cls(group, rank, size, device if backend == "nccl" else torch.device("cpu"))

    def share(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of the rows [start, stop) (:func:`shard_bounds`)."""
        return shard_bounds(start, stop, self.rank, self.size)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a seed drawn from ``random_state=None`` differs per rank)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)
        return int(tensor.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one."""
        if self.size == 1:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return bool(tensor.item())

    def check_same(self, values: Mapping[str, int], what: str) -> None:
        """Raise ValueError on every rank unless every rank passed the same ``values`` (one all-reduce of
        the values and their negations under MAX gives each value's maximum and minimum)."""
        if self.size == 1:
            return
        mine = torch.tensor(list(values.values()), dtype=torch.int64, device=self.device)
        extremes = torch.cat([mine, -mine])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.group)
        highest, lowest = extremes[: len(values)].tolist(), (-extremes[len(values) :]).tolist()
        differ = [name for name, hi, lo in zip(values, highest, lowest, strict=True) if hi != lo]
        if differ:
            raise ValueError(
                f"{what}: expected the same on all {self.size} ranks of the data-parallel fit (each rank "
                f"passes the whole data and trains on its share of every minibatch), got ranks that "
                f"differ in {', '.join(differ)}"
            )


@dataclasses.dataclass(frozen=True)
class TorchrunEnvironment:
    """Where torchrun (or another launcher that sets the same variables) put this process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def torchrun_environment(environ: Mapping[str, str] | None = None) -> TorchrunEnvironment | None:
    """The torchrun variables of ``environ`` (default ``os.environ``); None when neither RANK nor
    WORLD_SIZE is set. Raises ValueError when some are set and others missing or malformed.

    >>> torchrun_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
    ...                       "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    TorchrunEnvironment(rank=1, world_size=2, local_rank=1, master_addr='node0', master_port=29500)
    """
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if not env.get(name)]
    if missing:
        raise ValueError(
            f"torchrun environment: expected {', '.join(TORCHRUN_VARIABLES)} to be set (RANK or "
            f"WORLD_SIZE is), got no {', '.join(missing)}"
        )
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            numbers[name] = int(env[name])
        except ValueError:
            raise ValueError(
                f"torchrun environment: {name}: expected an integer, got {env[name]!r}"
            ) from None
    if numbers["WORLD_SIZE"] < 1 or not 0 <= numbers["RANK"] < numbers["WORLD_SIZE"]:
        raise ValueError(
            f"torchrun environment: expected WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE, got "
            f"RANK={numbers['RANK']} WORLD_SIZE={numbers['WORLD_SIZE']}"
        )
    if numbers["LOCAL_RANK"] < 0 or not 0 < numbers["MASTER_PORT"] < 65536:
        raise ValueError(
            f"torchrun environment: expected LOCAL_RANK >= 0 and 0 < MASTER_PORT < 65536, got "
            f"LOCAL_RANK={numbers['LOCAL_RANK']} MASTER_PORT={numbers['MASTER_PORT']}"
        )
    return TorchrunEnvironment(
        rank=numbers["RANK"],
        world_size=numbers["WORLD_SIZE"],
        local_rank=numbers["LOCAL_RANK"],
        master_addr=env["MASTER_ADDR"],
        master_port=numbers["MASTER_PORT"],
    )


def default_backend(device: torch.device | str) -> str:
    """The backend for training on ``device``: "nccl" for CUDA where torch has NCCL, else "gloo".

    >>> default_backend("cpu")
    'gloo'
    """
    return "nccl" if torch.device(device).type == "cuda" and dist.is_nccl_available() else "gloo"


def init_from_torchrun(backend: str | None = None) -> bool:
    """Join the process group that torchrun's variables describe (``init_process_group`` with env://;
    with NCCL, on GPU LOCAL_RANK first). Multi-machine rendezvous (``--nnodes``, ``--rdzv-endpoint``)
    is torchrun's business: it sets the variables read here.

    Args:
        backend: "gloo", "nccl", ...; None: NCCL when CUDA is available, else Gloo.

    Returns:
        True when this call initialized the group (the caller destroys it); False when there is nothing
        to join (no torchrun variables, WORLD_SIZE 1) or a group is already initialized.
    """
    environment = torchrun_environment()
    if environment is None or environment.world_size == 1 or _initialized():
        return False
    if not dist.is_available():
        raise ValueError("torchrun environment: set, but this torch build has no torch.distributed")
    backend = backend or default_backend("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(environment.local_rank)
    dist.init_process_group(backend, rank=environment.rank, world_size=environment.world_size)
    return True


def _launched(
    rank: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    nproc: int,
    backend: str,
    port: int,
    results: str,
) -> None:
    """The body of one process started by :func:`launch`: join the group, run ``fn``, leave its result."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    elif "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    store = dist.TCPStore(LOCALHOST, port, is_master=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=nproc)
    try:
        result = fn(*args)
    finally:
        dist.destroy_process_group()
    path = Path(results) / f"{rank}.pickle"
    path.write_bytes(pickle.dumps(result))


def launch(fn: Callable[..., T], nproc: int, args: Sequence[Any] = (), *, backend: str = "gloo") -> list[T]:
    """Run ``fn(*args)`` in ``nproc`` new local processes that form one process group, and return the
    results by rank.

    The processes are started with torch.multiprocessing's "spawn" and rendezvous through a TCPStore that
    this process hosts on a free port. With NCCL, rank r runs on GPU r; with Gloo, each process gets
    cpu_count/nproc threads unless OMP_NUM_THREADS is set. An exception in any process is raised here
    (torch's ProcessRaisedException, with the traceback) after the others are stopped.

    Args:
        fn: a module-level (picklable) function; its result must be picklable.
        nproc: the number of processes, >= 1.
        args: ``fn``'s arguments (pickled to each process).
        backend: "gloo" (CPU) or "nccl" (one GPU per process).

    Returns:
        ``[fn's result on rank 0, ..., on rank nproc − 1]``.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int):
        raise TypeError(f"nproc: expected an int >= 1, got {nproc!r}")
    if nproc < 1:
        raise ValueError(f"nproc: expected an int >= 1, got {nproc}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if not dist.is_available():
        raise ValueError("backend: this torch build has no torch.distributed")
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(
            f"nproc: NCCL runs one process per GPU, expected nproc <= {torch.cuda.device_count()} "
            f"(the CUDA devices here), got {nproc}"
        )
    store = dist.TCPStore(LOCALHOST, 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="softxent-launch-") as results:
        mp.start_processes(
            _launched,
            args=(fn, tuple(args), nproc, backend, store.port, results),
            nprocs=nproc,
            start_method="spawn",
        )
        return [pickle.loads((Path(results) / f"{rank}.pickle").read_bytes()) for rank in range(nproc)]
