"""The distributed benchmark runs end to end in its --smoke mode (1 and 2 Gloo processes), and the bytes it
counts show the vocabulary-parallel loss communicating O(N) numbers, not the O(N·V) logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_distributed.py"
FLOAT32_BYTES = 4
# the all-gather of nine int64 per rank that checks status, shapes, targets (range, checksum) and their kind
SHAPE_CHECK_BYTES = 9 * 8
MAX_NUMBERS_PER_ROW = 8  # the logits op all-reduces 5 (a max, then Σexp, Σq·(z − m), Σq, z_y)


def _all_reduce_bytes(collectives: dict[str, dict[str, int]]) -> int:
    return sum(entry["bytes"] for name, entry in collectives.items() if name.startswith("all_reduce"))


def test_smoke_run_counts_o_n_communication(tmp_path: Path) -> None:
    output = tmp_path / "bench_distributed.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for heading in (
        "### linear head + cross-entropy",
        "### cross-entropy on logits",
        "### communication per step",
        "| vocab-parallel | 2 × 1 |",
        "| machine floor |",
    ):
        assert heading in result.stdout, result.stdout
    report = json.loads(output.read_text())
    n, d, v = report["config"]["shape"]

    rows = {(row["family"], row["provider"], row["procs"]): row for row in report["rows"]}
    expected = {("eager", 1), ("softxent", 1), ("vocab-parallel", 1), ("vocab-parallel", 2)}
    assert {(provider, procs) for _, provider, procs in rows} == expected, sorted(rows)
    for key, row in rows.items():
        assert row["seconds"] > 0, (key, row)
        if key[1] == "vocab-parallel":
            assert row["rank_floor_seconds"] > 0, (key, row)
            collectives = row["collectives"]
            assert collectives["all_gather"] == {"calls": 1, "bytes": SHAPE_CHECK_BYTES * key[2]}, (key, row)
            numbers_per_row = _all_reduce_bytes(collectives) / (n * FLOAT32_BYTES)
            if key[0] == "linear":
                numbers_per_row -= d  # dX, N·D float32: the size of the input x
            assert 0 < numbers_per_row <= MAX_NUMBERS_PER_ROW, (key, collectives)
            assert _all_reduce_bytes(collectives) < 0.05 * n * v * FLOAT32_BYTES, (key, collectives)
        else:
            assert row["collectives"] == {}, (key, row)

    # at P = 2, two N and two V: the logits op's all-reduced bytes are a fixed multiple of N, whatever V;
    # the linear head's, less dX, are at most that multiple (it skips the rows whose target is ignored)
    volume = report["volume"]
    assert len({entry["rows"] for entry in volume}) == 2, volume
    assert len({entry["classes"] for entry in volume}) == 2, volume
    multiples = set()
    for entry in volume:
        rows_bytes = entry["rows"] * FLOAT32_BYTES
        logits_bytes = _all_reduce_bytes(entry["logits"])
        assert logits_bytes % rows_bytes == 0, entry
        multiples.add(logits_bytes // rows_bytes)
        stats_bytes = _all_reduce_bytes(entry["linear"]) - entry["rows"] * entry["features"] * FLOAT32_BYTES
        assert 0 < stats_bytes <= logits_bytes, entry
        gathered_logits = entry["rows"] * entry["classes"] * FLOAT32_BYTES
        assert logits_bytes < 0.01 * gathered_logits, entry
    assert len(multiples) == 1, volume
    assert 0 < multiples.pop() <= MAX_NUMBERS_PER_ROW, volume
