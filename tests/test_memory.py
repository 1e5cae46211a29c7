"""Memory claims of the CPU backend, measured as peak RSS in a fresh process (Linux /proc)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import json, re, sys
from pathlib import Path
import torch, softxent

def mib(field):
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

case = sys.argv[1]
torch.manual_seed(0)
if case == "logits":
    x = torch.randn(2048, 16384).requires_grad_()
    y = torch.randint(0, 16384, (2048,))
    run = lambda: softxent.cross_entropy(x, y).backward()
elif case == "linear":
    x = torch.randn(2048, 256).requires_grad_()
    w = torch.randn(16384, 256).requires_grad_()
    y = torch.randint(0, 16384, (2048,))
    run = lambda: softxent.linear_cross_entropy(x, w, y, chunk_size=256).backward()
elif case.startswith("log_probs_"):  # per-token log-probs and entropy, chunks of 256 rows or slices of 2048
    x = torch.randn(2048, 256).requires_grad_()
    w = torch.randn(16384, 256).requires_grad_()
    y = torch.randint(0, 16384, (2048,))
    a, b = torch.randn(2048), torch.randn(2048)
    memory = case[len("log_probs_"):]
    chunk = 256 if memory == "speed" else 2048

    def run():
        out = softxent.linear_log_probs(x, w, y, chunk_size=chunk, memory=memory)
        ((out.log_probs * a).sum() + (out.entropy * b).sum()).backward()
else:  # the multi-label head, "speed" (chunks of 256 rows) or "lean" (slices of 2048 classes)
    x = torch.randn(2048, 256).requires_grad_()
    w = torch.randn(16384, 256).requires_grad_()
    y = torch.rand(2048, 16384)  # the dense target: an input, 128 MiB
    chunk = 256 if case == "bce_speed" else 2048
    run = lambda: softxent.linear_binary_cross_entropy(x, w, y, chunk_size=chunk, memory=case[4:]).backward()
run()
x.grad = None
if case != "logits":
    w.grad = None
Path("/proc/self/clear_refs").write_text("5")
base = mib("VmRSS")
run()
print(json.dumps({"peak_above_inputs_mib": mib("VmHWM") - base}))
"""


def _peak(case: str) -> float:
    result = subprocess.run([sys.executable, "-c", PROBE, case], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_above_inputs_mib"]


pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS"
)


def test_cross_entropy_holds_one_logits_sized_buffer():
    logits_mib = 2048 * 16384 * 4 / 2**20  # 128 MiB: the gradient itself
    peak = _peak("logits")
    assert logits_mib <= peak <= logits_mib + 40, f"peak {peak:.0f} MiB above the inputs"


def test_linear_cross_entropy_never_materializes_the_logits():
    logits_mib = 2048 * 16384 * 4 / 2**20  # 128 MiB if the (N, C) logits existed
    grads_mib = (16384 * 256 + 2048 * 256) * 4 / 2**20  # dW + dX: 18 MiB
    chunk_mib = 256 * 16384 * 4 / 2**20  # one chunk of logits: 16 MiB
    peak = _peak("linear")
    assert peak <= grads_mib + chunk_mib + 30, f"peak {peak:.0f} MiB above the inputs"
    assert peak < logits_mib / 2


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_linear_binary_cross_entropy_never_materializes_the_logits(memory):
    """Neither mode holds an (N, C) buffer: not the logits, nor the elementwise loss for "mean"."""
    logits_mib = 2048 * 16384 * 4 / 2**20  # 128 MiB if the (N, C) logits (or losses) existed
    grads_mib = (16384 * 256 + 2048 * 256) * 4 / 2**20  # dW + dX: 18 MiB
    chunk_mib = 256 * 16384 * 4 / 2**20  # one chunk (256 rows) or slice (2048 classes) of logits: 16 MiB
    peak = _peak(f"bce_{memory}")
    # measured 56-64 MiB: the gradients, one chunk and the elementwise temporaries of 4 MiB row blocks
    assert peak <= grads_mib + chunk_mib + 45, f"peak {peak:.0f} MiB above the inputs"
    assert peak < 0.75 * logits_mib


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_linear_log_probs_never_materialize_the_logits(memory):
    """Per-token log-probs and entropy with both gradients: one chunk of rows or one vocabulary slice of
    logits (16 MiB) and its temporaries, never the (N, V) logits."""
    logits_mib = 2048 * 16384 * 4 / 2**20  # 128 MiB if the (N, V) logits existed
    grads_mib = (16384 * 256 + 2048 * 256) * 4 / 2**20  # dW + dX: 18 MiB
    chunk_mib = 256 * 16384 * 4 / 2**20  # one chunk (256 rows) or slice (2048 classes) of logits: 16 MiB
    peak = _peak(f"log_probs_{memory}")
    assert peak <= grads_mib + 4 * chunk_mib + 20, f"peak {peak:.0f} MiB above the inputs"
    assert peak < 0.75 * logits_mib
