"""Distributed benchmark (issue 6): the vocabulary-parallel loss in 1, 2 and 4 Gloo processes on this
machine, beside the single-process softxent and eager torch measured in the same run, and the bytes it
communicates per step.

Inputs, built the same on every process from a fixed seed: x (N, D) float32 requiring grad, W (V, D),
y (N,) int64 with ~5% set to ignore_index -100; N×D×V = 2048×512×64000. Rank r of P keeps W's rows
[V·r/P, V·(r+1)/P) (and, for the logits op, the same columns of the logits z = x·Wᵀ, precomputed).
Forward + backward of:
  linear head
    eager           F.cross_entropy(x @ W.T, y)                               1 process, all cores
    softxent        softxent.linear_cross_entropy(x, W, y)                    1 process, all cores
    vocab-parallel  vocab_parallel_linear_cross_entropy(x, W_r, y)            P processes, cores/P threads
  cross-entropy on the logits z (requiring grad)
    eager           F.cross_entropy(z, y)
    softxent        softxent.cross_entropy(z, y)
    vocab-parallel  vocab_parallel_cross_entropy(z[:, V·r/P : V·(r+1)/P], y)

Each provider runs in fresh processes (torch.multiprocessing spawn; the P ranks meet through a file://
rendezvous in a temporary directory), with torch.set_num_threads(max(1, cores // P)): at P = 4 on a 2-core
machine the 4 single-thread processes oversubscribe the cores 2×, and the output says so. Time is the
median over --repeats steps, after one warm-up step, of the step's time; with P processes every rank waits
at a barrier before each step and a step takes as long as its slowest rank.

Floors, measured in the same run (the time of a warm operation, median over the same steps):
  machine floor  linear head: 6·N·D·V FLOPs at the rate of one (N, D)×(D, V) matmul with all cores
                 (3 × its time); logits: reading z once and writing its gradient once at the bandwidth of
                 one N×V copy_. Measured by the P = 1 processes (one process with all cores): no number of
                 processes on this machine can beat it, as they share the same cores.
  rank floor     the same for one rank's share, 6·N·D·V/P FLOPs (3 × its (N, D)×(D, V/P) matmul) and one
                 N×(V/P) copy, with all P ranks running theirs at the same time and their own thread
                 counts; the slowest rank's time. It is what P ranks that never communicated could reach on
                 this machine: on P devices of their own it would be the machine floor / P, here it stays
                 near the machine floor (the cores are shared), and it prices what the ranks' smaller,
                 fewer-thread matmuls and the oversubscription at P = 4 cost, apart from softxent's work.

Memory: each process's peak RSS (VmHWM, reset once its inputs are made) above its RSS at that point, so
gradients and temporaries count and the inputs do not; for P processes the largest rank's and the sum
over the ranks (which share this machine's memory; on P devices each would have its own). Large tensors
are returned to the system when freed, so the ops measured one after the other in a process do not hide
each other's allocations.

Noise: the last two columns give, for each provider's launch, the share of the machine's core-seconds
that other processes ran (/proc/stat's busy time less this benchmark's own CPU time) and that the host
stole from this VM. On a shared 2-core VM, more than a few percent makes that row's times too slow.

Communication: in each rank, torch.distributed's all_reduce, all_gather, all_gather_into_tensor, broadcast
and reduce_scatter_tensor are wrapped to count, per step and by collective, the calls, the bytes of the
collective's result on a rank (numel × element size: the all-reduced buffer, the gathered tensors) and
the seconds inside them (waiting for slower ranks included). They are printed beside N·V·4 bytes, what
gathering the float32 logits would cost. The logits op all-reduces five numbers a row (a max, then one sum
of Σexp, Σq·(z − m), Σq and z_y): 20·N bytes, O(N). The linear head does the same a chunk of rows at a
time, for the rows whose target is not ignored (it drops the others before the matmul), and adds the
all-reduce of dX, N·D float32: O(N·D), the size of x itself, independent of V. Both run one all-gather of
nine int64 per rank that checks each rank's status, shapes and targets (range and checksum) across the
ranks (72·P bytes; 56·P before the status and checksum joined it, 48·P before the targets' kind, as in
the earlier RESULTS.md entries). These are the results'
sizes on a rank; a ring all-reduce of B bytes moves 2·(P − 1)/P·B bytes in and out of each rank.
A volume-only run (P = 2, D = 16, no timing) repeats the count at N ∈ {1024, 2048} × V ∈ {64000, 128000}
to show that the bytes follow N and not V.

    python benchmarks/bench_distributed.py                # everything: Markdown tables, ~4 minutes on 2 cores
    python benchmarks/bench_distributed.py --repeats 3 --json results.json
    python benchmarks/bench_distributed.py --smoke        # tiny sizes, P ∈ {1, 2}: seconds
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

import softxent
from bench_cpu import _reset_peak_rss, _status_mib
from softxent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

SHAPE = (2048, 512, 64000)  # N, D, V
PROCS = (1, 2, 4)
VOLUME_PROCS = 2
VOLUME_FEATURES = 16
VOLUME_ROWS = (1024, 2048)
VOLUME_CLASSES = (64000, 128000)
SMOKE_SHAPE = (128, 16, 1000)
SMOKE_PROCS = (1, 2)
SMOKE_VOLUME_FEATURES = 8
SMOKE_VOLUME_ROWS = (64, 128)
SMOKE_VOLUME_CLASSES = (1000, 2000)
IGNORE_INDEX = -100
IGNORED_FRACTION = 0.05
SEED = 0
FAMILIES = ("linear", "logits")
PEERS = ("eager", "softxent")
PARALLEL = "vocab-parallel"
# The collectives counted, each with the argument that holds its result on a rank (all_gather: the list).
COLLECTIVE_RESULTS = {
    "all_reduce": "tensor",
    "all_gather": "tensor_list",
    "all_gather_into_tensor": "output_tensor",
    "broadcast": "tensor",
    "reduce_scatter_tensor": "output",
}


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _nbytes(value: Tensor | list[Tensor]) -> int:
    tensors = value if isinstance(value, list | tuple) else [value]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class CollectiveCounter:
    """Wraps torch.distributed's collectives in this process to count, since the last :meth:`reset`, the
    calls, the bytes of each result on this rank and the seconds inside, by collective (all_reduce also by
    its reduce op). Modules call ``dist.all_reduce`` through the torch.distributed module at call time, so
    replacing the module's attributes reaches them."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, float]] = []
        for name, result_argument in COLLECTIVE_RESULTS.items():
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._counted(name, result_argument, original))

    def _counted(self, name: str, result_argument: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            key = name
            if name == "all_reduce":
                op = bound.arguments["op"]
                key = f"all_reduce {getattr(op, 'name', str(op)).lower()}"
            start = time.perf_counter()
            result = original(*args, **kwargs)
            seconds = time.perf_counter() - start
            self.records.append((key, _nbytes(bound.arguments[result_argument]), seconds))
            return result

        return counted

    def reset(self) -> None:
        self.records.clear()

    def seconds(self) -> float:
        return sum(seconds for _, _, seconds in self.records)

    def summary(self) -> dict[str, dict[str, int]]:
        """{collective: {"calls": n, "bytes": total}} since the last reset."""
        totals: dict[str, dict[str, int]] = {}
        for key, nbytes, _ in self.records:
            entry = totals.setdefault(key, {"calls": 0, "bytes": 0})
            entry["calls"] += 1
            entry["bytes"] += nbytes
        return totals


@dataclass(frozen=True)
class Plan:
    """What one launch of processes measures: a provider at a size in ``procs`` processes."""

    provider: str  # "eager" or "softxent" (one process, no process group) or PARALLEL
    procs: int
    threads: int
    rows: int
    features: int
    classes: int
    repeats: int
    volume_shapes: tuple[tuple[int, int], ...] = ()  # (N, V) pairs for the volume-only runs
    volume_features: int = VOLUME_FEATURES


def _inputs(rows: int, features: int, classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, D), W (V, D) scaled so that the logits are ~N(0, 1), y (N,) with ~5% ignored."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(rows, features, generator=generator)
    weight = torch.randn(classes, features, generator=generator) / features**0.5
    target = torch.randint(0, classes, (rows,), generator=generator)
    target[torch.rand(rows, generator=generator) < IGNORED_FRACTION] = IGNORE_INDEX
    return x, weight, target


def _shard(classes: int, rank: int, procs: int) -> slice:
    return slice(classes * rank // procs, classes * (rank + 1) // procs)


def _loss_fns(provider: str) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """(linear head loss(x, W, y), logits loss(z, y)) of a provider."""
    if provider == "eager":
        return (lambda x, weight, target: F.cross_entropy(x @ weight.T, target)), F.cross_entropy
    if provider == "softxent":
        return softxent.linear_cross_entropy, softxent.cross_entropy
    if provider == PARALLEL:
        return vocab_parallel_linear_cross_entropy, vocab_parallel_cross_entropy
    raise ValueError(f"provider: expected one of {(*PEERS, PARALLEL)}, got {provider!r}")


def _run_steps(step: Callable[[], None], repeats: int, counter: CollectiveCounter | None) -> dict[str, Any]:
    """One warm-up step, then ``repeats`` timed ones, each after a barrier when in a process group.

    Returns every timed step's seconds and seconds inside collectives, the collectives of the last step,
    and the peak RSS above the RSS at the start, in MiB.
    """
    _reset_peak_rss()
    baseline = _status_mib("VmRSS")
    seconds, collective_seconds = [], []
    for index in range(repeats + 1):
        if dist.is_initialized():
            dist.barrier()
        if counter is not None:
            counter.reset()
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if index:
            seconds.append(elapsed)
            collective_seconds.append(0.0 if counter is None else counter.seconds())
    return {
        "seconds": seconds,
        "collective_seconds": collective_seconds,
        "peak_mib": _status_mib("VmHWM") - baseline,
        "collectives": {} if counter is None else counter.summary(),
    }


def _once(step: Callable[[], None], counter: CollectiveCounter) -> dict[str, dict[str, int]]:
    counter.reset()
    step()
    return counter.summary()


def _backward_step(
    loss_fn: Callable[..., Tensor], leaves: tuple[Tensor, ...], *args: Tensor
) -> Callable[[], None]:
    """A step that clears the leaves' gradients and runs loss_fn(*args).backward()."""

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        loss_fn(*args).backward()

    return step


def _timed(rank: int, plan: Plan, counter: CollectiveCounter) -> dict[str, Any]:
    """The floors (in a process group) and the two ops, timed, at the plan's size."""
    linear_loss, logits_loss = _loss_fns(plan.provider)
    x, weight, target = _inputs(plan.rows, plan.features, plan.classes)
    if plan.provider == PARALLEL:
        weight = weight[_shard(plan.classes, rank, plan.procs)].clone()
    logits = torch.empty(plan.rows, weight.shape[0])
    result: dict[str, Any] = {}

    def matmul() -> None:
        torch.mm(x, weight.t(), out=logits)  # also the logits op's input

    if plan.provider == PARALLEL:
        destination = torch.empty_like(logits)
        result["matmul"] = _run_steps(matmul, plan.repeats, None)
        result["copy"] = _run_steps(lambda: destination.copy_(logits), plan.repeats, None)
        del destination  # returned to the system before the ops' peak RSS is measured
    else:
        matmul()
    x.requires_grad_()
    weight.requires_grad_()
    result["linear"] = _run_steps(
        _backward_step(linear_loss, (x, weight), x, weight, target), plan.repeats, counter
    )
    x.grad = weight.grad = None
    logits.requires_grad_()
    result["logits"] = _run_steps(
        _backward_step(logits_loss, (logits,), logits, target), plan.repeats, counter
    )
    return result


def _volume(rank: int, plan: Plan, counter: CollectiveCounter, rows: int, classes: int) -> dict[str, Any]:
    """The collectives of one step of each op at N = rows, V = classes, D = plan.volume_features."""
    linear_loss, logits_loss = _loss_fns(plan.provider)
    x, weight, target = _inputs(rows, plan.volume_features, classes)
    weight = weight[_shard(classes, rank, plan.procs)].clone().requires_grad_()
    logits = (x @ weight.detach().T).requires_grad_()
    x.requires_grad_()
    return {
        "rows": rows,
        "features": plan.volume_features,
        "classes": classes,
        "linear": _once(_backward_step(linear_loss, (x, weight), x, weight, target), counter),
        "logits": _once(_backward_step(logits_loss, (logits,), logits, target), counter),
    }


def _worker(rank: int, plan: Plan, workdir: str) -> None:
    """The body of one spawned process: join the group (vocab-parallel), measure, leave the result."""
    torch.set_num_threads(plan.threads)
    if plan.provider == PARALLEL:
        dist.init_process_group(
            "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=plan.procs
        )
    counter = CollectiveCounter()  # counts nothing in a peer's process, which runs no collectives
    try:
        result = _timed(rank, plan, counter)
        result["volume"] = [
            _volume(rank, plan, counter, rows, classes) for rows, classes in plan.volume_shapes
        ]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(workdir, f"{rank}.json").write_text(json.dumps(result))


def _machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds every process on this machine has run, and those the host stole from this VM, since
    boot (/proc/stat's first line: user, nice, system, idle, iowait, irq, softirq, steal, ...)."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hertz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    return (user + nice + system + irq + softirq) / hertz, steal / hertz


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _launch(plan: Plan) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Runs ``plan`` in ``plan.procs`` fresh processes and returns their results by rank, and how busy the
    machine was with other work meanwhile: the share of its cores' time that other processes ran and that
    the host stole (a shared VM's noise, which slows these timings)."""
    busy, stolen = _machine_cpu_seconds()
    own = _own_cpu_seconds()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="softxent-bench-distributed-") as workdir:
        mp.start_processes(_worker, args=(plan, workdir), nprocs=plan.procs, start_method="spawn")
        ranks = [json.loads(Path(workdir, f"{rank}.json").read_text()) for rank in range(plan.procs)]
    available = (time.perf_counter() - start) * _cores()
    busy_after, stolen_after = _machine_cpu_seconds()
    others = busy_after - busy - (_own_cpu_seconds() - own)
    return ranks, {
        "others_cpu_share": max(0.0, others) / available,
        "steal_share": (stolen_after - stolen) / available,
    }


def _slowest_rank_median(ranks: list[dict[str, Any]], key: str, field: str = "seconds") -> float:
    """Median over the steps of the slowest rank's time in each step."""
    return statistics.median(max(step) for step in zip(*(rank[key][field] for rank in ranks), strict=True))


def _same_on_every_rank(ranks: list[dict[str, Any]], what: Callable[[dict[str, Any]], Any]) -> Any:
    values = [what(rank) for rank in ranks]
    if any(value != values[0] for value in values):
        raise RuntimeError(f"expected the same collectives on every rank, got {values}")
    return values[0]


def _summarize(plan: Plan, ranks: list[dict[str, Any]], noise: dict[str, float]) -> list[dict[str, Any]]:
    """The timing rows of one launch (one per family) with its floors, as the JSON holds them."""
    rows = []
    for family, floor_key in zip(FAMILIES, ("matmul", "copy"), strict=True):
        peaks = [rank[family]["peak_mib"] for rank in ranks]
        row: dict[str, Any] = {
            "family": family,
            "provider": plan.provider,
            "procs": plan.procs,
            "threads": plan.threads,
            "seconds": _slowest_rank_median(ranks, family),
            "collective_seconds": _slowest_rank_median(ranks, family, "collective_seconds"),
            "peak_mib_per_rank": max(peaks),
            "peak_mib_total": sum(peaks),
            "collectives": _same_on_every_rank(
                ranks, lambda rank, family=family: rank[family]["collectives"]
            ),
            **noise,
        }
        if plan.provider == PARALLEL:
            # the linear floor is 3 matmuls; the logits floor one copy (read z, write the gradient)
            row["rank_floor_seconds"] = (3.0 if family == "linear" else 1.0) * _slowest_rank_median(
                ranks, floor_key
            )
        rows.append(row)
    return rows


def _ratio(value: float, reference: float) -> str:
    """value / reference to two decimals; blank where the reference is not positive (a peak too small to
    measure, at --smoke sizes)."""
    return f"{value / reference:.2f}" if reference > 0 else ""


def _bytes(value: float) -> str:
    return f"{value:,.0f}"


def _collectives_cell(collectives: dict[str, dict[str, int]]) -> str:
    return "; ".join(
        f"{name}: {entry['calls']} × → {_bytes(entry['bytes'])} B"
        for name, entry in sorted(collectives.items())
    )


def _total_bytes(collectives: dict[str, dict[str, int]]) -> int:
    return sum(entry["bytes"] for entry in collectives.values())


def _layout(procs: int, threads: int, cores: int) -> str:
    text = f"{procs} × {threads}"
    if procs * threads > cores:
        text += f" (oversubscribed {procs * threads / cores:g}×)"
    return text


def _timing_table(family: str, rows: list[dict[str, Any]], machine_floor: float, cores: int) -> list[str]:
    by_provider = {(row["provider"], row["procs"]): row for row in rows if row["family"] == family}
    eager, single = by_provider["eager", 1], by_provider["softxent", 1]
    lines = [
        "| provider | processes × threads | median s | × softxent | × eager | × machine floor | rank floor s "
        "| × rank floor | in collectives s | peak MiB / rank | Σ ranks MiB | × eager peak | others' CPU "
        "| stolen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["family"] != family:
            continue
        seconds, peak = row["seconds"], row["peak_mib_per_rank"]
        rank_floor = row.get("rank_floor_seconds")
        floor_cells = "| | |" if rank_floor is None else f"| {rank_floor:.3f} | {seconds / rank_floor:.2f} |"
        collectives = f"{row['collective_seconds']:.3f}" if row["provider"] == PARALLEL else ""
        lines.append(
            f"| {row['provider']} | {_layout(row['procs'], row['threads'], cores)} | {seconds:.3f} "
            f"| {seconds / single['seconds']:.2f} | {seconds / eager['seconds']:.2f} "
            f"| {seconds / machine_floor:.2f} {floor_cells} {collectives} | {peak:.0f} "
            f"| {row['peak_mib_total']:.0f} | {_ratio(peak, eager['peak_mib_per_rank'])} "
            f"| {row['others_cpu_share']:.0%} | {row['steal_share']:.0%} |"
        )
    lines.append(
        f"| machine floor | 1 × {cores} | {machine_floor:.3f} | {machine_floor / single['seconds']:.2f} "
        f"| {machine_floor / eager['seconds']:.2f} | 1.00 | | | | | | | | |"
    )
    return lines


def _volume_row(op: str, rows: int, classes: int, collectives: dict[str, dict[str, int]], lead: str) -> str:
    total = _total_bytes(collectives)
    gathered = rows * classes * 4
    return (
        f"| {lead} | {_collectives_cell(collectives)} | {_bytes(total)} | {total / (rows * 4):.2f} "
        f"| {_bytes(gathered)} | {total / gathered:.2e} |"
    )


def _communication_table(rows: list[dict[str, Any]], shape: tuple[int, int, int]) -> list[str]:
    n, _, v = shape
    lines = [
        "| op | P | collectives per step: calls → bytes | bytes / step | ÷ (N·4) | N·V·4 (gathered logits) "
        "| ÷ N·V·4 |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["provider"] == PARALLEL:
            op = "linear head" if row["family"] == "linear" else "logits"
            lines.append(_volume_row(op, n, v, row["collectives"], f"{op} | {row['procs']}"))
    return lines


def _volume_table(volume: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| op | N | V | collectives per step: calls → bytes | bytes / step | ÷ (N·4) "
        "| N·V·4 (gathered logits) | ÷ N·V·4 |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for family, op in zip(FAMILIES, ("linear head", "logits"), strict=True):
        for entry in volume:
            lead = f"{op} | {entry['rows']} | {entry['classes']}"
            lines.append(_volume_row(op, entry["rows"], entry["classes"], entry[family], lead))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, help="timed steps after a warm-up (default 5; --smoke 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and P ∈ {1, 2}: runs in seconds")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else 2 if args.smoke else 5
    if repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {repeats}")
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    procs_list = SMOKE_PROCS if args.smoke else PROCS
    volume_features = SMOKE_VOLUME_FEATURES if args.smoke else VOLUME_FEATURES
    volume_shapes = tuple(
        (rows, classes)
        for rows in (SMOKE_VOLUME_ROWS if args.smoke else VOLUME_ROWS)
        for classes in (SMOKE_VOLUME_CLASSES if args.smoke else VOLUME_CLASSES)
    )
    cores = _cores()
    n, d, v = shape
    info = {
        "cpu": _cpu_model(),
        "cores": cores,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "softxent": softxent.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_average_at_start": os.getloadavg(),
    }
    layouts = ", ".join(_layout(procs, max(1, cores // procs), cores) for procs in procs_list)
    print(
        f"softxent distributed benchmark: {info['cpu']}, {cores} cores, torch {info['torch']} (Gloo), "
        f"softxent {info['softxent']}, {info['date']}, load average {info['load_average_at_start'][0]:.2f} "
        f"at start\nN={n} D={d} V={v} float32, forward+backward, median of {repeats} steps after a warm-up; "
        f"processes × threads: {layouts}\n",
        flush=True,
    )
    started = time.perf_counter()
    plans = [Plan(provider, 1, cores, n, d, v, repeats) for provider in PEERS]
    plans += [
        Plan(
            PARALLEL,
            procs,
            max(1, cores // procs),
            n,
            d,
            v,
            repeats,
            volume_shapes=volume_shapes if procs == VOLUME_PROCS else (),
            volume_features=volume_features,
        )
        for procs in procs_list
    ]
    rows: list[dict[str, Any]] = []
    volume: list[dict[str, Any]] = []
    for plan in plans:
        ranks, noise = _launch(plan)
        rows += _summarize(plan, ranks, noise)
        volume += _same_on_every_rank(ranks, lambda rank: rank["volume"])
        print(f"  {plan.provider} × {plan.procs}: done at {time.perf_counter() - started:.0f} s", flush=True)
    floors = {
        row["family"]: row["rank_floor_seconds"]
        for row in rows
        if row["provider"] == PARALLEL and row["procs"] == 1
    }
    lines = [
        "",
        f"### linear head + cross-entropy, forward+backward, float32, N={n} D={d} V={v}",
        "",
        *_timing_table("linear", rows, floors["linear"], cores),
        "",
        f"### cross-entropy on logits, forward+backward, float32, N={n} V={v}",
        "",
        *_timing_table("logits", rows, floors["logits"], cores),
        "",
        f"### communication per step (bytes of each collective's result on a rank), N={n} D={d} V={v}",
        "",
        *_communication_table(rows, shape),
        "",
        f"### communication per step, P={VOLUME_PROCS}, D={volume_features}: bytes follow N, not V",
        "",
        *_volume_table(volume),
        "",
        f"Total time: {time.perf_counter() - started:.0f} s.",
    ]
    print("\n".join(lines), flush=True)
    if args.json:
        report = {
            "machine": info,
            "config": {
                "shape": shape,
                "repeats": repeats,
                "procs": procs_list,
                "plans": [asdict(plan) for plan in plans],
            },
            "floors": floors,
            "rows": rows,
            "volume": [{**entry, "procs": VOLUME_PROCS} for entry in volume],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
