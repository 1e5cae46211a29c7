"""Training steps through TRL's fused LM head, with TRL's own kernels and with softxent's
(softxent.integrations.trl), beside the full-logits recipe, on a Llama-shaped model:

- ``logprobs``: one forward + backward whose loss takes per-token log-probs and entropy,
  L = −mean(log p(y)) − 0.01·mean(H), as SFT's and GRPO's fused paths compute them
  (``trl.trainer.utils.add_fused_lm_head``, ``model(..., fused_lm_head=True)``);
- ``grpo``: GRPO's clipped loss, the policy's log-probs and entropy (with gradients) and a reference
  model's log-probs r (no gradient, standing for the rollout's too), with ρ = exp(log p − r):
  L = −mean(min(ρ·A, clip(ρ, 0.8, 1.2)·A) − β·(exp(r − log p) − (r − log p) − 1));
- ``dpo``: DPO's sigmoid loss over chosen and rejected rows (half the batch each), policy with gradients
  and reference without, on the summed completion log-probs;
- ``distill``: DistillationTrainer's generalized JSD (β = 0.5) between a student (with gradients) and a
  teacher (without), TRL's ``_chunked_divergence_loss`` on the two backbones' hidden states.

A quarter of each row (the prompt) is -100. Variants: ``logits`` (the full (B, S, V) logits, then the
same loss in torch), ``trl`` (TRL's ``ChunkedLogProbFunction`` / ``ChunkedDivergenceFunction``: Triton on a
GPU, torch tiles on a CPU), ``softxent`` (the same TRL code after ``softxent.integrations.trl.enable()``).
Each (step, variant) runs in a fresh process: the median step time after a warm-up, the peak memory above
the step's start (peak RSS on a CPU, max_memory_allocated on a GPU) and the loss's relative difference from
the ``logits`` variant's.

    python benchmarks/bench_trl.py                    # CPU: V=32000, H=256, 2 layers, batch 4 × 512, fp32
    python benchmarks/bench_trl.py --device cuda      # GPU: Llama-3 head (V=128256, H=2048), bf16, 4 × 2048
    python benchmarks/bench_trl.py --steps grpo,dpo   # a subset of the steps
    python benchmarks/bench_trl.py --smoke            # tiny, seconds (the tests run it)
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
from pathlib import Path

import torch

CPU = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2, batch=4, seq=512)
GPU = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, batch=4, seq=2048
)
SMOKE = dict(vocab_size=1031, hidden_size=32, intermediate_size=64, num_hidden_layers=1, batch=2, seq=32)
VARIANTS = ("logits", "trl", "softxent")
STEPS = ("logprobs", "grpo", "dpo", "distill")
GRPO_BETA, DPO_BETA, JSD_BETA = 0.04, 0.1, 0.5


def _rss_mib(field: str) -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} field (this benchmark needs Linux on a CPU)")
    return int(match.group(1)) / 1024.0


def _model(shape: dict[str, int], device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=max(1, shape["hidden_size"] // 64),
        num_key_value_heads=max(1, shape["hidden_size"] // 256),
        max_position_embeddings=shape["seq"],
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def _per_token(model: torch.nn.Module, variant: str, ids: torch.Tensor, labels: torch.Tensor):
    """(log p(y_t), entropy, mask), each (B, S − 1): from the full logits, or TRL's fused forward."""
    if variant == "logits":
        log_p = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
        target = labels[:, 1:]
        picked = log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        mask = target != -100
        return picked * mask, entropy * mask, mask
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    return out.log_probs, out.entropy, out.label_mask


def _jsd_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m), m = β·p_t + (1 − β)·p_s (TRL's GKD), in torch."""
    log_s, log_t = student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1)
    log_m = torch.logsumexp(torch.stack([log_t + torch.log(torch.tensor(beta)), log_s + torch.log(
        torch.tensor(1 - beta))]), dim=0)  # fmt: skip
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def _make_step(step: str, variant: str, shape: dict[str, int], device: str, dtype: torch.dtype):
    """The step's closure (forward + backward, returns the loss) and the models whose gradients it fills."""
    from trl.trainer import distillation_trainer
    from trl.trainer.utils import add_fused_lm_head

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=generator).to(
        device
    )
    labels = ids.clone()
    labels[:, : shape["seq"] // 4] = -100
    policy = _model(shape, device, dtype, 0)
    other = None if step == "logprobs" else _model(shape, device, dtype, 1).eval()  # reference / teacher
    if variant != "logits" and step != "distill":
        add_fused_lm_head(policy, outputs=("log_probs", "entropy"))
        if other is not None:
            add_fused_lm_head(other)
    advantages = torch.randn(shape["batch"], 1, generator=generator).to(device)

    def run() -> torch.Tensor:
        if step == "distill":
            hidden = policy.model(input_ids=ids).last_hidden_state[:, :-1]
            with torch.no_grad():
                teacher = other.model(input_ids=ids).last_hidden_state[:, :-1]
            mask = labels[:, 1:] != -100
            if variant == "logits":
                per_row = _jsd_logits(policy.lm_head(hidden), other.lm_head(teacher), JSD_BETA)
                return (per_row * mask).sum() / mask.sum()
            loss, _, _ = distillation_trainer._chunked_divergence_loss(
                hidden, teacher, policy.lm_head.weight, other.lm_head.weight, mask, JSD_BETA
            )
            return loss
        log_p, entropy, mask = _per_token(policy, variant, ids, labels)
        count = mask.sum()
        if step == "logprobs":
            return -log_p.sum() / count - 0.01 * entropy.sum() / count
        with torch.no_grad():
            ref, _, _ = _per_token(other, variant, ids, labels)
        if step == "grpo":  # a second iteration's step: the rollout's log-probs (here the reference's) differ
            ratio = torch.exp(log_p - ref)
            clipped = torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
            delta = ref - log_p
            per_token = -clipped + GRPO_BETA * (torch.exp(delta) - delta - 1)
            return (per_token * mask).sum() / count
        sums, ref_sums = log_p.sum(-1), ref.sum(-1)  # dpo: the first half of the rows chosen
        half = shape["batch"] // 2
        margin = (sums[:half] - ref_sums[:half]) - (sums[half:] - ref_sums[half:])
        return -torch.nn.functional.logsigmoid(DPO_BETA * margin).mean()

    def train_step() -> float:
        policy.zero_grad(set_to_none=True)
        loss = run()
        loss.backward()
        return float(loss.detach())

    return train_step, policy


def run(step: str, variant: str, shape: dict[str, int], device: str, repeats: int) -> dict[str, object]:
    """One (step, variant)'s median step seconds, peak MiB above the step's start, and loss."""
    import softxent.integrations.trl as sx_trl

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    train_step, policy = _make_step(step, variant, shape, device, dtype)
    if variant == "softxent":
        sx_trl.enable()
    loss = train_step()  # warm-up
    policy.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_mib("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_mib("VmHWM") - base
    return {
        "step": step, "variant": variant, "seconds": statistics.median(times), "peak_mib": peak, "loss": loss,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process, print JSON")
    parser.add_argument("--step", choices=STEPS, default="logprobs", help="with --variant: the step")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {STEPS}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after a warm-up (default 3)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    import softxent.integrations.trl as sx_trl

    shape = SMOKE if args.smoke else GPU if args.device == "cuda" else CPU
    if args.variant:
        print(json.dumps(run(args.step, args.variant, shape, args.device, args.repeats)))
        return
    steps = [name.strip() for name in args.steps.split(",") if name.strip()]
    unknown = [name for name in steps if name not in STEPS]
    if unknown:
        parser.error(f"--steps: expected a subset of {STEPS}, got {unknown}")
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {args.device}, shape {shape}, median of {args.repeats}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    print("| step | variant | median s | × trl | peak MiB above step start | × trl peak | loss rel. diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for step in steps:
        done_rows = {}
        for variant in VARIANTS:
            if args.smoke:  # in this process: seconds, not a minute of imports (memory is not the point)
                try:
                    done_rows[variant] = run(step, variant, shape, args.device, args.repeats)
                finally:
                    sx_trl.disable()
                continue
            command = [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--step",
                step,
                "--device",
                args.device,
            ]
            command += ["--repeats", str(args.repeats)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{step} / {variant} failed:\n{done.stderr[-3000:]}")
            done_rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])  # fmt: skip
        base = done_rows["logits"]["loss"]
        for variant, row in done_rows.items():
            diff = abs(row["loss"] - base) / max(abs(base), 1e-30)
            trl_row = done_rows["trl"]
            print(
                f"| {step} | {variant} | {row['seconds']:.3f} | {row['seconds'] / trl_row['seconds']:.2f} "
                f"| {row['peak_mib']:.0f} | {row['peak_mib'] / max(trl_row['peak_mib'], 1e-9):.2f} "
                f"| {diff:.1e} |",
                flush=True,
            )
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
