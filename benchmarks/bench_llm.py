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
  softxent-lean softxent.linear_log_probs(..., memory="lean"): vocabulary slices of all rows
The floor printed beside them: the arithmetic's matmuls (vocabulary-sized, 2·N·D·V FLOPs each) at the rate
of one (N, D)×(D, V) matmul measured in the same run: ce 3, logprobs 4, frozen 2, fkl/jsd 4.

    python benchmarks/bench_llm.py --repeats 2      # the table, about 6 minutes on 2 cores
    python benchmarks/bench_llm.py --smoke          # tiny shapes, seconds (the tests run this)

On a GPU (``--device cuda``): bfloat16, N×D×V = 8192×4096×128256, every case in one process (peak memory from
torch.cuda.max_memory_allocated above the inputs, the gradients included), CUDA-synchronized median times,
the floor from one bf16 (N, D)×(D, V) matmul measured in the same run. The providers there add Liger's
``LigerFusedLinearJSD`` to jsd (β = 0.5, where its convention and TRL's agree), and the distillation rows
give dW's error against float64 (relative Frobenius norm, on the first 1024 rows) beside eager bf16's.
TRL's kernels import transformers (and TRL's trainer utilities); a peer that does not import is skipped
with the reason. ``benchmarks/gpu_check.sh`` runs it (about 60 s on an H100).

    python benchmarks/bench_llm.py --device cuda --repeats 5 --json $OUT/llm.json
"""

from __future__ import annotations

import argparse
import json
import math
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
GPU_SHAPE = (8192, 4096, 128256)
SMOKE_SHAPE = (64, 32, 500)
ERROR_ROWS = 1024
FAMILIES = {
    "logprobs": ("eager", "trl", "softxent", "softxent-lean"),
    "frozen": ("eager", "trl", "softxent"),
    "fkl": ("eager", "trl", "softxent"),
    "jsd": ("eager", "trl", "softxent"),
}
GPU_FAMILIES = {**FAMILIES, "jsd": ("eager", "trl", "liger", "softxent")}
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
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


def make_step(
    family: str,
    provider: str,
    shape: tuple[int, int, int],
    with_params: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    rows: int | None = None,
    exact: bool = False,
):
    """The case's forward + backward as a function (and, ``with_params``, the tensors it fills .grad of), on
    ``device`` in ``dtype``; ``rows``: only the first rows of the inputs (the error check); ``exact``: the
    same values (rounded to ``dtype``) in float64."""
    import softxent

    n, d, v = shape
    generator = torch.Generator(device).manual_seed(0)

    def randn(*size: int, scale: float = 1.0) -> Tensor:
        values = (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)
        return values.double() if exact else values

    x = randn(n, d)[:rows].requires_grad_()
    w = randn(v, d, scale=d**-0.5).requires_grad_(family != "frozen")
    target = torch.randint(0, v, (n,), generator=generator, device=device)[:rows]
    a, b = randn(n)[:rows].float(), (randn(n) * 0.01)[:rows].float()
    teacher_x = randn(n, d)[:rows]
    teacher_w = randn(v, d, scale=d**-0.5)
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
                memory = "lean" if provider == "softxent-lean" else "auto"
                out = softxent.linear_log_probs(x, w, target, memory=memory)
                log_probs, entropy = out.log_probs, out.entropy
            total = (a * log_probs).sum()
            return total + (b * entropy).sum() if family == "logprobs" else total
        if provider == "eager":
            return _eager_divergence(F.linear(x, w), F.linear(teacher_x, teacher_w), beta)
        if provider == "trl":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            divergence, _ = ChunkedDivergenceFunction.apply(x, w, None, teacher_x, teacher_w, None, beta)
            return divergence.mean()
        if provider == "liger":
            from liger_kernel.transformers import LigerFusedLinearJSD

            return LigerFusedLinearJSD(jsd_beta=beta)(x, w, teacher_x, teacher_w)
        kind = "forward_kl" if family == "fkl" else "jsd"
        return softxent.linear_distillation_loss(x, w, teacher_x, teacher_w, divergence=kind, beta=beta)

    def step() -> None:
        clear()
        loss().backward()

    return (step, params) if with_params else step


def run_case(case: str, repeats: int, shape: tuple[int, int, int]) -> dict[str, float | str]:
    """One CPU case's median time and peak RSS above the process's start (run in a fresh process)."""
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


def _cuda_time(step: Callable[[], None], repeats: int) -> float:
    step()  # the warm-up compiles the kernels
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1000.0)
    return statistics.median(times)


def dw_error(
    family: str, provider: str, shape: tuple[int, int, int], device: str = "cuda", rows: int = ERROR_ROWS
) -> float:
    """‖dW − dW₆₄‖ / ‖dW₆₄‖ of the provider's bf16 step on the first ``rows`` rows, against the eager step in
    float64 on the same (bf16-rounded) inputs."""
    step, params = make_step(family, provider, shape, True, device, torch.bfloat16, rows)
    step()
    found = params[1].grad.double()
    exact_step, exact_params = make_step(
        family, "eager", shape, True, device, torch.bfloat16, rows, exact=True
    )
    exact_step()
    exact = exact_params[1].grad
    return float(torch.linalg.norm(found - exact) / torch.linalg.norm(exact))


def _gpu_case(family: str, provider: str, shape: tuple[int, int, int], repeats: int) -> dict[str, object]:
    """One GPU case: median seconds and peak MiB above the inputs (or the reason it did not run)."""
    result: dict[str, object] = {"case": f"{family}:{provider}"}
    try:
        step, params = make_step(family, provider, shape, True, "cuda", torch.bfloat16)
        result["seconds"] = _cuda_time(step, repeats)
        for p in params:
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del step, params
        if family in ("fkl", "jsd"):
            result["dw_error"] = dw_error(family, provider, shape)
    except torch.cuda.OutOfMemoryError:
        result["skipped"] = "OOM"
    except ImportError as error:
        result["skipped"] = f"{type(error).__name__}: {error}"
    torch.cuda.empty_cache()
    return result


def _cuda_matmul(shape: tuple[int, int, int], repeats: int) -> float:
    """Seconds of one bf16 (N, D)×(D, V) matmul (its buffers freed on return)."""
    n, d, v = shape
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
    return _cuda_time(lambda: torch.mm(x, w.t(), out=out), repeats)


def gpu_table(repeats: int, shape: tuple[int, int, int]) -> tuple[list[str], list[dict[str, object]]]:
    """The GPU table (markdown lines) and its rows as dicts."""
    matmul = _cuda_matmul(shape, repeats)
    ce = _gpu_case("ce", "softxent", shape, repeats)
    torch.cuda.empty_cache()
    rows: list[dict[str, object]] = [ce, {"case": "floor", "seconds": matmul}]
    ce_seconds = float(ce["seconds"])
    lines = [
        "| case | provider | median ms | × linear_cross_entropy | × floor | peak MiB above inputs "
        "| × eager peak | dW error | × eager dW error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| ce | softxent | {1e3 * ce_seconds:.2f} | 1.00 | {ce_seconds / (3 * matmul):.2f} "
        f"| {float(ce['peak_mib']):.0f} | | | |",
    ]
    skipped = []
    for family, providers in GPU_FAMILIES.items():
        results = {provider: _gpu_case(family, provider, shape, repeats) for provider in providers}
        rows.extend(results.values())
        eager = results["eager"]
        eager_peak = float(eager.get("peak_mib", float("nan")))
        eager_error = float(eager.get("dw_error", float("nan")))
        for provider, result in results.items():
            if "skipped" in result:
                lines.append(f"| {family} | {provider} | skipped | | | | | | |")
                skipped.append(f"- {family}:{provider}: {result['skipped']}")
                continue
            seconds, peak = float(result["seconds"]), float(result["peak_mib"])
            error = result.get("dw_error")
            error_cells = "| |" if error is None else f"| {error:.2e} | {error / eager_error:.2f} |"
            lines.append(
                f"| {family} | {provider} | {1e3 * seconds:.2f} | {seconds / ce_seconds:.2f} "
                f"| {seconds / (MATMULS[family] * matmul):.2f} | {peak:.0f} | {peak / eager_peak:.2f} "
                + error_cells
            )
    lines.append(f"| floor | one bf16 (N, D)×(D, V) matmul | {1e3 * matmul:.2f} | | | | | | |")
    return lines + skipped, rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", help="run one case (family:provider) in this process and print JSON")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per case after a warm-up (default 2)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks that every case runs")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU table (bf16, in-process)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here (with --device cuda)")
    args = parser.parse_args()
    if args.device == "cuda":
        shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
        import softxent

        print(
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, softxent {softxent.__version__}, "
            f"N×D×V = {'×'.join(map(str, shape))}, bfloat16, median of {args.repeats}"
        )
        lines, rows = gpu_table(args.repeats, shape)
        print("\n".join(lines))
        if args.json:
            args.json.write_text(json.dumps({"shape": shape, "rows": rows}, indent=1))
        return
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
