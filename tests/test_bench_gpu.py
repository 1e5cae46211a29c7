"""The GPU benchmark runs end to end in its --smoke mode on a CPU, and softxent's numbers in it are right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
BF16_TOLERANCE = 1e-2  # bf16 rounds to 2^-9 relative: its gradients sit near 4e-3 of an exact reference


def test_smoke_run_reports_softxent_close_to_the_reference(tmp_path: Path) -> None:
    output = tmp_path / "bench_gpu.json"
    # Everything but torch.compile, which takes ~30 s a shape on a CPU; one thread, as timings do not matter
    # here and OpenMP threads spinning beside other work slow a 2-core machine down many times over.
    methods = "eager,liger,cce,softxent,softxent-lean,softxent-inplace"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(SCRIPT), "--smoke", "--sweep", "--device", "cpu", "--methods", methods]
    result = subprocess.run(
        [*command, "--json", str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    rows = {(row["family"], tuple(row["shape"]), row["method"]): row for row in report["rows"]}
    families = ("linear", "linear-bce", "ce", "bce")
    shapes = {family: {shape for f, shape, _ in rows if f == family} for family in families}
    assert all(len(family_shapes) == 2 for family_shapes in shapes.values()), shapes
    expected_errors = {
        "linear": ("loss", "dX", "dW"),
        "linear-bce": ("loss", "dX", "dW"),
        "ce": ("loss", "dlogits"),
        "bce": ("loss", "dlogits"),
    }
    softxent_methods = {
        "linear": ["softxent", "softxent-lean"],
        "linear-bce": ["softxent", "softxent-lean"],
        "ce": ["softxent", "softxent-inplace"],
        "bce": ["softxent"],
    }
    for family, family_shapes in shapes.items():
        for shape in family_shapes:
            eager = rows[family, shape, "eager"]
            assert eager["status"] == "ok", eager
            assert eager["ms"] > 0, eager
            for method in softxent_methods[family]:
                row = rows[family, shape, method]
                if method == "softxent-lean" and row["status"] == "skipped":
                    assert row["reason"] == "memory= not available", row
                    continue
                assert row["status"] == "ok", row
                assert set(row["errors"]) == set(expected_errors[family]), row
                worst = {name: value for name, value in row["errors"].items() if not value < BF16_TOLERANCE}
                assert not worst, f"{family} {shape} {method}: relative errors over {BF16_TOLERANCE}: {worst}"
            peers = {"linear": ("liger", "cce"), "linear-bce": (), "ce": ("liger",), "bce": ()}[family]
            for peer in peers:
                assert rows[family, shape, peer]["status"] == "skipped", rows[family, shape, peer]
    assert "| eager |" in result.stdout
    assert "- target ce 37×1031 softxent forward+backward:" in result.stdout
    assert "- target linear-bce 37×65×1031 softxent-lean: " in result.stdout
    assert "- target ce 37×1031 inplace_backward:" in result.stdout
    assert len(report["sweep"]) == 2 * 9, report["sweep"]  # the policy, 6 streaming shapes, 2 in registers
    assert "### launch-shape sweep" in result.stdout


def test_breakdown_times_the_parts_and_the_head_per_chunk_and_slice_size(tmp_path: Path) -> None:
    """--breakdown (issue 13's levers) end to end on a CPU: 600 rows under the policy (one chunk), in chunks
    of 1 MiB (262 rows of float32 G, 3 chunks; with the second stream 256, the fewest allowed, 3 chunks) and
    of 4 MiB (one chunk; with the second stream two slots of 524 rows, 2 chunks)."""
    output = tmp_path / "breakdown.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(SCRIPT), "--smoke", "--breakdown", "--linear-shapes", "600x32x1000"]
    command += ["--device", "cpu", "--json", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())["breakdown"]
    parts = [(entry["name"], entry["rows"], entry["chunks"]) for entry in report if entry["kind"] == "part"]
    assert [name for name, _, _ in parts] == [
        "logits matmul", "row kernel (loss and G)", "dX matmul", "dW matmul, bf16 out", "dW into float32"
    ]  # fmt: skip
    assert {(rows, chunks) for _, rows, chunks in parts} == {(600, 1)}  # the default policy: one chunk
    heads = [
        (entry["memory"], entry["name"], entry["side_stream"], entry["size"], entry["count"])
        for entry in report
        if entry["kind"] == "head"
    ]
    assert heads == [
        ("speed", "policy", False, 600, 1),
        ("speed", "1 MiB", False, 262, 3),
        ("speed", "1 MiB", True, 256, 3),
        ("speed", "4 MiB", False, 600, 1),
        ("speed", "4 MiB", True, 524, 2),
        ("lean", "policy", False, 1000, 1),  # 64 MiB slices: every class in one
        ("lean", "64 MiB slices", False, 1000, 1),
    ]
    for entry in report:
        assert entry.get("failure") is None, entry
        assert entry["ms"] > 0, entry
    assert "### the head by chunk (speed) and slice (lean) size, sums on a second stream" in result.stdout
    assert "| eager |" not in result.stdout  # the breakdown alone
