"""One training step of a Hugging Face causal LM, unpatched and patched by softxent, eager and compiled.

A Llama-shaped model (a few layers of a 1B-class model with a 128256-token vocabulary: the loss's logits
dominate the step's memory) in bfloat16, batch × sequence tokens with labels; per variant the median time of
a forward+backward step (after warm-up; torch.compile compiles in the warm-up), the peak memory above the
model, its gradients and the batch (torch.cuda.max_memory_allocated), and the loss's relative difference
from the unpatched eager step's.

    python3 benchmarks/bench_hf.py                 # on a GPU
    python3 benchmarks/bench_hf.py --smoke         # tiny, on a CPU (the test suite runs it)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from softxent.integrations import transformers as sx

FULL = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, batch=4, seq=2048,
)  # fmt: skip
SMOKE = dict(
    vocab_size=1031, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, batch=2, seq=16,
)  # fmt: skip
VARIANTS = ("unpatched", "softxent", "unpatched compiled", "softxent compiled")


def _model(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        **{key: value for key, value in shape.items() if key not in ("batch", "seq")},
        max_position_embeddings=shape["seq"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def _step_ms(step, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _training_step(model: torch.nn.Module, forward, ids: torch.Tensor):
    """A forward+backward of ``forward`` (the model or its compiled form) on ``ids`` as input and labels."""

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=False)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    return step


def run(variant: str, shape: dict[str, int], device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    model = _model(shape, device, dtype)
    if variant.startswith("softxent"):
        sx.apply(model)
    forward = torch.compile(model) if variant.endswith("compiled") else model
    generator = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(
        3, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device, generator=generator
    )

    step = _training_step(model, forward, ids)
    loss = step()  # warm-up: allocates the gradients, compiles
    step()
    peak_gib = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak_gib = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    result = {
        "variant": variant,
        "ms": _step_ms(step, device, repeats),
        "peak_gib": peak_gib,
        "loss": float(loss),
    }
    del model, forward, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}"
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("the benchmark needs a CUDA device; --smoke runs a tiny model on the CPU")
    shape = SMOKE if args.smoke else FULL
    dtype = torch.float32 if args.smoke else torch.bfloat16
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: expected a subset of {VARIANTS}, got {unknown}")
    rows = [run(variant, shape, device, dtype, 2 if args.smoke else 5) for variant in variants]
    reference = next((row["loss"] for row in rows if row["variant"] == "unpatched"), rows[0]["loss"])
    tokens = shape["batch"] * shape["seq"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"## One Llama training step ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
        f"vocab {shape['vocab_size']}, {tokens} tokens, {dtype}), {name}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}\n"
    )
    print("| variant | step ms | peak GiB above model and batch | loss rel. diff |")
    print("|---|---:|---:|---:|")
    for row in rows:
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        diff = abs(row["loss"] - reference) / abs(reference)
        print(f"| {row['variant']} | {row['ms']:.1f} | {peak} | {diff:.1e} |")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "device": name, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
