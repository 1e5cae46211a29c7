"""The torch.func benchmark runs end to end in its --smoke mode and prints a row per case with both
providers' times, so it cannot rot unnoticed (no timing is asserted: performance lives in benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_transforms.py"


def test_smoke_run_prints_every_case():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert len(rows) == 5, result.stdout
    for row in rows:
        mine, theirs, ratio = (float(cell) for cell in row.strip("|").split("|")[1:])
        assert mine > 0, row
        assert theirs > 0, row
        # The times are printed to 0.001 ms and the ratio from the unrounded times: allow for the rounding.
        low, high = (mine - 5e-4) / (theirs + 5e-4), (mine + 5e-4) / (theirs - 5e-4)
        assert low - 0.005 <= ratio <= high + 0.005, row
