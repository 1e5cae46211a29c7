"""CPU benchmark: softxent against its peers in one run, forward + backward, float32.

Cases (each in a fresh process, so its peak RSS is its own):
  linear head, N×D×C = 4096×1024×32000:
    eager      F.linear then F.cross_entropy (materializes the (N, C) logits)
    chunked    torch's F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())
    softxent   softxent.linear_cross_entropy
    softxent-lean  softxent.linear_cross_entropy(..., memory="lean")
  cross-entropy on logits, N×C = 8192×32000:
    eager      F.cross_entropy
    softxent   softxent.cross_entropy
  multi-label linear head (sigmoid BCE), N×D×C = 4096×1024×16000, dense (N, C) targets:
    eager      F.linear then F.binary_cross_entropy_with_logits
    softxent   softxent.linear_binary_cross_entropy
    softxent-lean  softxent.linear_binary_cross_entropy(..., memory="lean")

Printed beside them, the physical floors measured on this machine in the same run:
  linear heads: 6·N·D·C FLOPs at the rate of one (N, D)×(D, C) matmul (3 × its time);
  cross-entropy: reading the logits once and writing the gradient once at the measured copy bandwidth.

Time is the median of --repeats runs after one warm-up; memory is the process's peak RSS (VmHWM, reset once
the inputs are made) above its RSS at that point, so it counts logits, gradients (the .grad buffers too) and
temporaries, but not the inputs.

    python benchmarks/bench_cpu.py                 # everything, prints a Markdown table
    python benchmarks/bench_cpu.py --case linear:softxent --repeats 3
    python benchmarks/bench_cpu.py --families sigmoid --repeats 3   # one table
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

LINEAR_SHAPE = (4096, 1024, 32000)
LOGITS_SHAPE = (8192, 32000)
LINEAR_CASES = ("eager", "chunked", "softxent", "softxent-lean", "floor")
LOGITS_CASES = ("eager", "softxent", "floor")
SIGMOID_SHAPE = (4096, 1024, 16000)
SIGMOID_CASES = ("eager", "softxent", "softxent-lean", "floor")


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in MiB."""
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} field (this benchmark needs Linux)")
    return int(match.group(1)) / 1024.0


def _reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS, so temporaries made while building the inputs do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def _time(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up: first-touch page faults, thread pools, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _head_step(provider: str, sigmoid: bool = False) -> tuple[Callable[[], None], float | None]:
    """A linear head's step: softmax cross-entropy with class targets (LINEAR_SHAPE), or with ``sigmoid``
    the multi-label BCE with dense (N, C) targets, a few labels a row (SIGMOID_SHAPE)."""
    import softxent

    n, d, c = SIGMOID_SHAPE if sigmoid else LINEAR_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator).requires_grad_()
    w = (torch.randn(c, d, generator=generator) / d**0.5).requires_grad_()
    if sigmoid:
        target = (torch.rand(n, c, generator=generator) < 0.01).float()
        eager_loss, fused_loss = F.binary_cross_entropy_with_logits, softxent.linear_binary_cross_entropy
    else:
        target = torch.randint(0, c, (n,), generator=generator)
        eager_loss, fused_loss = F.cross_entropy, softxent.linear_cross_entropy

    def clear() -> None:
        x.grad = None
        w.grad = None

    if provider == "eager":

        def step() -> None:
            clear()
            eager_loss(F.linear(x, w), target).backward()
    elif provider == "chunked" and not sigmoid:
        options = torch.nn.LinearCrossEntropyOptions()

        def step() -> None:
            clear()
            F.linear_cross_entropy(x, w, target, options=options).backward()
    elif provider in ("softxent", "softxent-lean"):
        memory = "lean" if provider == "softxent-lean" else "speed"

        def step() -> None:
            clear()
            fused_loss(x, w, target, memory=memory).backward()
    elif provider == "floor":
        out = torch.empty(n, c)
        xd, wd = x.detach(), w.detach()

        def step() -> None:
            torch.mm(xd, wd.t(), out=out)

        return step, 3.0  # 6·N·D·C FLOPs = three matmuls of this size
    else:
        cases = SIGMOID_CASES if sigmoid else LINEAR_CASES
        raise ValueError(f"provider: expected one of {cases}, got {provider!r}")
    return step, None


def _logits_step(provider: str) -> tuple[Callable[[], None], float | None]:
    import softxent

    n, c = LOGITS_SHAPE
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, c, generator=generator) * 2).requires_grad_()
    target = torch.randint(0, c, (n,), generator=generator)
    if provider == "eager":

        def step() -> None:
            logits.grad = None
            F.cross_entropy(logits, target).backward()
    elif provider == "softxent":

        def step() -> None:
            logits.grad = None
            softxent.cross_entropy(logits, target).backward()
    elif provider == "floor":
        source, destination = logits.detach(), torch.empty(n, c)

        def step() -> None:
            destination.copy_(source)  # reads N·C and writes N·C: exactly the floor's traffic

        return step, 1.0
    else:
        raise ValueError(f"provider: expected one of {LOGITS_CASES}, got {provider!r}")
    return step, None


def run_case(case: str, repeats: int) -> dict[str, float | str]:
    """Runs one case in this process and returns its median time and peak memory above the inputs."""
    family, provider = case.split(":")
    make = {"linear": _head_step, "logits": _logits_step, "sigmoid": partial(_head_step, sigmoid=True)}[
        family
    ]
    step, floor_factor = make(provider)
    _reset_peak_rss()
    baseline = _status_mib("VmRSS")
    seconds = _time(step, repeats)
    result: dict[str, float | str] = {
        "case": case,
        "seconds": seconds,
        "peak_mib": _status_mib("VmHWM") - baseline,
    }
    if floor_factor is not None:
        result["seconds"] = seconds * floor_factor
    return result


def _in_fresh_process(case: str, repeats: int) -> dict[str, float | str]:
    completed = subprocess.run(
        [sys.executable, __file__, "--case", case, "--repeats", str(repeats)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _table(title: str, family: str, cases: tuple[str, ...], repeats: int) -> list[str]:
    results = {name: _in_fresh_process(f"{family}:{name}", repeats) for name in cases}
    floor = float(results["floor"]["seconds"])
    eager = results["eager"]
    lines = [
        f"### {title}",
        "",
        "| provider | median s | × floor | × eager time | peak MiB above inputs | × eager peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in cases:
        if name == "floor":
            continue
        row = results[name]
        seconds, peak = float(row["seconds"]), float(row["peak_mib"])
        lines.append(
            f"| {name} | {seconds:.3f} | {seconds / floor:.2f} | {seconds / float(eager['seconds']):.2f} "
            f"| {peak:.0f} | {peak / float(eager['peak_mib']):.2f} |"
        )
    lines.append(f"| floor | {floor:.3f} | 1.00 | {floor / float(eager['seconds']):.2f} | | |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", help="run one case (family:provider) in this process and print JSON")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per case, after a warm-up (default 5)"
    )
    parser.add_argument(
        "--families",
        default="linear,logits,sigmoid",
        help="comma-separated tables to run: linear, logits, sigmoid (default: all)",
    )
    args = parser.parse_args()
    families = args.families.split(",")
    unknown = sorted(set(families) - {"linear", "logits", "sigmoid"})
    if unknown:
        parser.error(f"--families: expected names among linear, logits, sigmoid, got {unknown}")
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats)))
        return
    print(
        f"softxent CPU benchmark: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n"
    )
    lines = []
    if "linear" in families:
        n, d, c = LINEAR_SHAPE
        lines += _table(
            f"linear head + cross-entropy, forward+backward, float32, N={n} D={d} C={c} "
            "(floor: 6·N·D·C FLOPs at the measured matmul rate)",
            "linear",
            LINEAR_CASES,
            args.repeats,
        )
    if "logits" in families:
        n, c = LOGITS_SHAPE
        lines += _table(
            f"cross-entropy on logits, forward+backward, float32, N={n} C={c} "
            "(floor: read logits + write gradient at the measured copy bandwidth)",
            "logits",
            LOGITS_CASES,
            args.repeats,
        )
    if "sigmoid" in families:
        n, d, c = SIGMOID_SHAPE
        lines += _table(
            f"multi-label linear head (sigmoid BCE), forward+backward, float32, N={n} D={d} C={c} "
            "(floor: 6·N·D·C FLOPs at the measured matmul rate)",
            "sigmoid",
            SIGMOID_CASES,
            args.repeats,
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
