"""CPU benchmark of the LLM ops beyond the SFT loss, forward + backward, float32, N×D×V = 4096×1024×32000,
each case in a fresh process (its peak RSS its own), ratios to ``softxent.linear_cross_entropy`` (the SFT
loss, speed mode) measured in the same run:

  ce            softxent.linear_cross_entropy, forward + backward (the reference row)
  logprobs:*    per-token log ŷ_y and entropy, both with gradients (L = Σ a·log ŷ_y + Σ b·H, random a, b:
                an RL loss with an entropy bonus)
  frozen:*      the same with the head frozen (LoRA), the gradient through log ŷ_y only, dX only
  fkl:*, jsd:*  distillation, forward KL and JSD (β = 0.5) with a "mean" reduction, teacher D_t = D
Providers:
  eager         the logits formed (F.linear, log_softmax; torch's own ops)
  trl           TRL's ChunkedLogProbFunction / ChunkedDivergenceFunction (trl/kernels, torch tiles on a CPU)
  softxent      softxent.linear_log_probs / softxent.linear_distillation_loss
The floor printed beside them: the arithmetic's matmuls (vocabulary-sized, 2·N·D·V FLOPs each) at the rate
of one (N, D)×(D, V) matmul measured in the same run: ce 3, logprobs 4, frozen 2, fkl/jsd 4.

    python benchmarks/bench_llm.py --repeats 2      # the table, about 6 minutes on 2 cores
    python benchmarks/bench_llm.py --smoke          # tiny shapes, seconds (the tests run this)
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPE = (4096, 1024, 32000)
SMOKE_SHAPE = (64, 32, 500)
FAMILIES = {
    "logprobs": ("eager", "trl", "softxent"),
    "frozen": ("eager", "trl", "softxent"),
    "fkl": ("eager", "trl", "softxent"),
    "jsd": ("eager", "trl", "softxent"),
}
MATMULS = {"ce": 3, "logprobs": 4, "frozen": 2, "fkl": 4, "jsd": 4}


def _status_mib(field: str) -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} field (this benchmark needs Linux)")
    return int(match.group(1)) / 1024.0


def _time(step: Callable[[], None], repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _eager_log_probs(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    log_p = logits.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1), entropy


def _eager_divergence(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    log_ps, log_pt = student.log_softmax(-1), teacher.log_softmax(-1)
    if beta == 0.0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    log_m = torch.logaddexp(log_pt + torch.tensor(beta).log(), log_ps + torch.tensor(1 - beta).log())
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


def make_step(family: str, provider: str, shape: tuple[int, int, int], with_params: bool = False):
    """The case's forward + backward as a function (and, ``with_params``, the tensors it fills .grad of)."""
    import softxent

    n, d, v = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator).requires_grad_()
    w = (torch.randn(v, d, generator=generator) / d**0.5).requires_grad_(family != "frozen")
    target = torch.randint(0, v, (n,), generator=generator)
    a, b = torch.randn(n, generator=generator), torch.randn(n, generator=generator) * 0.01
    teacher_x = torch.randn(n, d, generator=generator)
    teacher_w = torch.randn(v, d, generator=generator) / d**0.5
    beta = 0.0 if family == "fkl" else 0.5
    params = [x] if family == "frozen" else [x, w]

    def clear() -> None:
        for p in params:
            p.grad = None

    def loss() -> Tensor:
        if family == "ce":
            return softxent.linear_cross_entropy(x, w, target)
        if family in ("logprobs", "frozen"):
            if provider == "eager":
                log_probs, entropy = _eager_log_probs(F.linear(x, w), target)
            elif provider == "trl":
                from trl.kernels.chunked_logprob import ChunkedLogProbFunction

                outputs = ("entropy",) if family == "logprobs" else ()
                log_probs, entropy, *_ = ChunkedLogProbFunction.apply(
                    x, w, None, target, 1.0, 32768, None, 1.0, outputs
                )
            else:
                out = softxent.linear_log_probs(x, w, target)
                log_probs, entropy = out.log_probs, out.entropy
            total = (a * log_probs).sum()
            return total + (b * entropy).sum() if family == "logprobs" else total
        if provider == "eager":
            return _eager_divergence(F.linear(x, w), F.linear(teacher_x, teacher_w), beta)
        if provider == "trl":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            divergence, _ = ChunkedDivergenceFunction.apply(x, w, None, teacher_x, teacher_w, None, beta)
            return divergence.mean()
        kind = "forward_kl" if family == "fkl" else "jsd"
        return softxent.linear_distillation_loss(x, w, teacher_x, teacher_w, divergence=kind, beta=beta)

    def step() -> None:
        clear()
        loss().backward()

    return (step, params) if with_params else step


def run_case(case: str, repeats: int, shape: tuple[int, int, int]) -> dict[str, float | str]:
    family, _, provider = case.partition(":")
    if family == "floor":
        n, d, v = shape
        x, w, out = torch.randn(n, d), torch.randn(v, d), torch.empty(n, v)
        seconds = _time(lambda: torch.mm(x, w.t(), out=out), repeats)
        return {"case": case, "seconds": seconds, "peak_mib": 0.0}
    step = make_step(family, provider, shape)
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_mib("VmRSS")
    seconds = _time(step, repeats)
    return {"case": case, "seconds": seconds, "peak_mib": _status_mib("VmHWM") - baseline}


def _fresh(case: str, repeats: int, smoke: bool) -> dict[str, float | str]:
    command = [sys.executable, __file__, "--case", case, "--repeats", str(repeats)]
    completed = subprocess.run(
        command + (["--smoke"] if smoke else []), check=True, capture_output=True, text=True
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def table(repeats: int, smoke: bool) -> list[str]:
    matmul = float(_fresh("floor", repeats, smoke)["seconds"])
    ce = _fresh("ce:softxent", repeats, smoke)
    ce_seconds = float(ce["seconds"])
    lines = [
        "| case | provider | median s | × linear_cross_entropy | × floor | peak MiB above inputs "
        "| × eager peak |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| ce | softxent | {ce_seconds:.3f} | 1.00 | {ce_seconds / (3 * matmul):.2f} "
        f"| {float(ce['peak_mib']):.0f} | |",
    ]
    for family, providers in FAMILIES.items():
        results = {provider: _fresh(f"{family}:{provider}", repeats, smoke) for provider in providers}
        eager_peak = max(float(results["eager"]["peak_mib"]), 1e-9)
        floor = MATMULS[family] * matmul
        for provider in providers:
            seconds, peak = float(results[provider]["seconds"]), float(results[provider]["peak_mib"])
            lines.append(
                f"| {family} | {provider} | {seconds:.3f} | {seconds / ce_seconds:.2f} "
                f"| {seconds / floor:.2f} | {peak:.0f} | {peak / eager_peak:.2f} |"
            )
    lines.append(f"| floor | one (N, D)×(D, V) matmul | {matmul:.3f} | | | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", help="run one case (family:provider) in this process and print JSON")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per case after a warm-up (default 2)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks that every case runs")
    args = parser.parse_args()
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats, shape)))
        return
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, N×D×V = {'×'.join(map(str, shape))}, float32, median of {args.repeats}"
    )
    print("\n".join(table(args.repeats, args.smoke)))


if __name__ == "__main__":
    main()
