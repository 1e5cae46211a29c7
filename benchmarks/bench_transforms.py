"""softxent under torch.func against torch's own losses, in the same run: per-sample gradients
(``vmap(grad(...))``, how Opacus-style DP training and influence functions use a loss), a Jacobian
(``jacrev``) and one forward+backward of a tiny batch (the per-call overhead of the autograd Function).

    python benchmarks/bench_transforms.py            # the table, about 30 s on 2 cores
    python benchmarks/bench_transforms.py --smoke    # tiny shapes, a few seconds (the tests run this)

Each row is the median of repeated calls (after a warm-up) and the ratio softxent / torch; there is no
physical floor here: these are CPU-bound dispatch costs, not bandwidth or FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

import softxent


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cases(smoke: bool) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, softxent's call, torch's call) for each measured case."""
    generator = torch.Generator().manual_seed(0)
    batch, classes = (16, 50) if smoke else (256, 1000)
    logits = torch.randn(batch, classes, generator=generator)
    target = torch.randint(0, classes, (batch,), generator=generator)
    labels = torch.rand(batch, classes, generator=generator)
    rows, features, vocab = (8, 16, 50) if smoke else (64, 256, 1000)
    hidden = torch.randn(rows, features, generator=generator)
    head = torch.randn(vocab, features, generator=generator) / features**0.5
    tokens = torch.randint(0, vocab, (rows,), generator=generator)
    tiny = torch.randn(8, 100, generator=generator, requires_grad=True)
    tiny_target = torch.randint(0, 100, (8,), generator=generator)

    def per_sample(loss):
        return lambda: vmap(grad(lambda z, y: loss(z[None], y[None])))(logits, target)

    def per_sample_bce(loss):
        return lambda: vmap(grad(lambda z, y: loss(z[None], y[None])))(logits, labels)

    def per_sample_head(loss):
        def one(w, x, y):
            return loss(x[None], w, y[None])

        return lambda: vmap(grad(one), in_dims=(None, 0, 0))(head, hidden, tokens)

    def jacobian(loss):
        return lambda: jacrev(lambda z: loss(z, target[:32], reduction="none"))(logits[:32])

    def step(loss):
        def run():
            tiny.grad = None
            loss(tiny, tiny_target).backward()

        return run

    return [
        (f"vmap(grad) cross_entropy, {batch} samples x {classes}", per_sample(softxent.cross_entropy),
         per_sample(F.cross_entropy)),
        (f"vmap(grad) binary_cross_entropy_with_logits, {batch} x {classes}",
         per_sample_bce(softxent.binary_cross_entropy_with_logits),
         per_sample_bce(F.binary_cross_entropy_with_logits)),
        (f"vmap(grad) linear_cross_entropy dW, {rows} x {features} x {vocab}",
         per_sample_head(softxent.linear_cross_entropy),
         per_sample_head(lambda x, w, y: F.cross_entropy(x @ w.T, y))),
        (f"jacrev cross_entropy none, 32 x {classes}", jacobian(softxent.cross_entropy),
         jacobian(F.cross_entropy)),
        ("forward+backward cross_entropy, 8 x 100", step(softxent.cross_entropy), step(F.cross_entropy)),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few repeats")
    args = parser.parse_args()
    repeats = 3 if args.smoke else 30
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| case | softxent ms | torch ms | softxent / torch |")
    print("|---|---:|---:|---:|")
    for name, ours, theirs in cases(args.smoke):
        mine, reference = median_ms(ours, repeats), median_ms(theirs, repeats)
        print(f"| {name} | {mine:.3f} | {reference:.3f} | {mine / reference:.2f} |", flush=True)


if __name__ == "__main__":
    main()
