"""softxent's main job until the command line lands: softmax regression on scikit-learn's digits.

Trains z = W·x + b with softxent.linear_cross_entropy and plain minibatch SGD, whose update is exactly the
derivation: ∂L/∂W = (ŷ − y)·xᵀ and ∂L/∂b = ŷ − y (averaged over the batch). Prints the loss going down, a
check of the fused gradient ŷ − y against the formula and against central finite differences, and the test
accuracy (the script fails if it is below 0.95).

    python examples/digits_sgd.py [--epochs 30] [--lr 0.1] [--batch-size 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import softxent

REQUIRED_ACCURACY = 0.95


def gradient_check(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Max |fused − (ŷ − y)/N| and max |fused − finite differences| for ∂L/∂z on a batch, in float64."""
    logits = (x.double() @ w.double().T + b.double()).requires_grad_()
    softxent.cross_entropy(logits, y).backward()
    fused = logits.grad
    formula = (torch.softmax(logits.detach(), 1) - torch.nn.functional.one_hot(y, logits.shape[1])) / len(y)
    step = 1e-6
    numeric = torch.zeros_like(fused)
    flat = logits.detach().clone()
    for index in np.ndindex(*flat.shape):
        plus, minus = flat.clone(), flat.clone()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (softxent.cross_entropy(plus, y) - softxent.cross_entropy(minus, y)) / (2 * step)
    return float((fused - formula).abs().max()), float((fused - numeric).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set (default 30)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the shuffling and W (default 0)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        print("error: --epochs and --batch-size must be >= 1 and --lr > 0", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=args.seed
    )
    scaler = StandardScaler().fit(x_train)
    x_train = torch.tensor(scaler.transform(x_train), dtype=torch.float32)
    x_test = torch.tensor(scaler.transform(x_test), dtype=torch.float32)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
    num_classes, num_features = 10, x_train.shape[1]
    w = torch.zeros(num_classes, num_features, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    print(
        f"digits: {len(x_train)} train / {len(x_test)} test samples, {num_features} features, "
        f"{num_classes} classes; softxent {softxent.__version__}, torch {torch.__version__}"
    )

    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train))
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            loss = softxent.linear_cross_entropy(x_train[batch], w, y_train[batch], linear_bias=b)
            loss.backward()  # the fused op already holds (ŷ − y)·xᵀ and ŷ − y: backward only scales them
            with torch.no_grad():
                w -= args.lr * w.grad
                b -= args.lr * b.grad
            w.grad = None
            b.grad = None
            total += loss.item() * len(batch)
        if epoch == 1 or epoch % 5 == 0 or epoch == args.epochs:
            with torch.no_grad():
                test_loss = softxent.linear_cross_entropy(x_test, w, y_test, linear_bias=b).item()
            print(f"epoch {epoch:3d}  train loss {total / len(x_train):.4f}  test loss {test_loss:.4f}")

    formula_error, numeric_error = gradient_check(x_test[:8], w.detach(), b.detach(), y_test[:8])
    print(
        f"gradient check on 8 test samples (float64): fused vs (ŷ − y)/N max |Δ| = {formula_error:.2e}, "
        f"fused vs central finite differences max |Δ| = {numeric_error:.2e}"
    )
    with torch.no_grad():
        accuracy = float(((x_test @ w.T + b).argmax(1) == y_test).float().mean())
    print(f"test accuracy {accuracy:.4f} (required >= {REQUIRED_ACCURACY})")
    if formula_error > 1e-12 or numeric_error > 1e-7:
        print("error: the fused gradient does not match ŷ − y", file=sys.stderr)
        return 1
    if accuracy < REQUIRED_ACCURACY:
        print(f"error: test accuracy {accuracy:.4f} is below {REQUIRED_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
