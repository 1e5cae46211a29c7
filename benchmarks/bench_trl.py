"""TRL's fused LM head step, with TRL's own kernel and with softxent's (softxent.integrations.trl), beside the
full-logits recipe: one forward + backward of a Llama-shaped model whose loss takes per-token log-probs and
entropy, L = −mean(log p(y)) − 0.01·mean(H), over the labelled positions (the prompt, a quarter of each
row, is -100), as GRPO's and SFT's fused paths compute them (``trl.trainer.utils.add_fused_lm_head``,
``model(..., fused_lm_head=True)``).

Variants: ``logits`` (the model's own forward: (B, S, V) logits, then log_softmax), ``trl`` (TRL's
``ChunkedLogProbFunction``: Triton on a GPU, torch tiles on a CPU), ``softxent`` (the same TRL forward after
``softxent.integrations.trl.enable()``). Each runs in a fresh process; per variant the median step time
after a warm-up and the peak memory above the step's start (peak RSS on a CPU, max_memory_allocated on a
GPU), and the loss's relative difference from the ``logits`` step.

    python benchmarks/bench_trl.py                    # CPU: V=32000, H=256, 2 layers, batch 4 × 512, fp32
    python benchmarks/bench_trl.py --device cuda      # GPU: Llama-3 head (V=128256, H=2048), bf16, 4 × 2048
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


def _rss_mib(field: str) -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} field (this benchmark needs Linux on a CPU)")
    return int(match.group(1)) / 1024.0


def run(variant: str, shape: dict[str, int], device: str, repeats: int) -> dict[str, object]:
    """One variant's median step seconds, peak MiB above the step's start, and loss."""
    import transformers
    from trl.trainer.utils import add_fused_lm_head

    import softxent.integrations.trl as sx_trl

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=max(1, shape["hidden_size"] // 64),
        num_key_value_heads=max(1, shape["hidden_size"] // 256),
        max_position_embeddings=shape["seq"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    ids = torch.randint(3, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device)
    labels = ids.clone()
    labels[:, : shape["seq"] // 4] = -100
    if variant != "logits":
        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    if variant == "softxent":
        sx_trl.enable()

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if variant == "logits":
            logits = model(input_ids=ids).logits[:, :-1].float()
            log_p = logits.log_softmax(-1)
            target = labels[:, 1:]
            mask = target != -100
            picked = log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            loss = -(picked * mask).sum() / mask.sum() - 0.01 * (entropy * mask).sum() / mask.sum()
        else:
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            mask = out.label_mask
            loss = out.loss - 0.01 * (out.entropy * mask).sum() / mask.sum()
        loss.backward()
        return float(loss)

    loss = step()  # warm-up
    model.zero_grad(set_to_none=True)
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
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_mib("VmHWM") - base
    return {"variant": variant, "seconds": statistics.median(times), "peak_mib": peak, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process, print JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after a warm-up (default 3)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    shape = SMOKE if args.smoke else GPU if args.device == "cuda" else CPU
    if args.variant:
        print(json.dumps(run(args.variant, shape, args.device, args.repeats)))
        return
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--device", args.device]
        command += ["--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = {row["variant"]: row for row in rows}
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {args.device}, shape {shape}, median of {args.repeats}"
    )
    print("| variant | median s | × trl | peak MiB above the step's start | × trl peak | loss rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        diff = abs(row["loss"] - base["logits"]["loss"]) / abs(base["logits"]["loss"])
        peak_ratio = row["peak_mib"] / max(base["trl"]["peak_mib"], 1e-9)
        print(
            f"| {row['variant']} | {row['seconds']:.3f} | {row['seconds'] / base['trl']['seconds']:.2f} "
            f"| {row['peak_mib']:.0f} | {peak_ratio:.2f} | {diff:.1e} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
