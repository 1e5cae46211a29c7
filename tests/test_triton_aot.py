"""Every Triton kernel configuration softxent launches compiles for a real GPU, and none spills registers.

The interpreter runs the kernels' Python on NumPy, so it cannot see what Triton's GPU compiler would
refuse (a type the backend lacks, a loop-carried value it cannot lower) or what would spill registers.
tests/triton_aot_worker.py compiles each configuration the ops launch under the H200's policy for sm_90
(H100/H200) with Triton's own compiler and ptxas, without a GPU and without launching anything, and
reports each kernel's registers and local memory (cuobjdump's resource usage).
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="the triton package is not installed")

HERE = pathlib.Path(__file__).parent
KERNELS = HERE.parent / "src" / "softxent" / "ops" / "triton"
CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# 64K 32-bit registers per multiprocessor on sm_80 through sm_100
REGISTERS_PER_SM = 65536


def _kernel_names() -> set[str]:
    """The names of the @triton.jit functions that are launched (``*_kernel``) in the package's source."""
    names = set()
    for path in KERNELS.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                names.add(node.name)
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    if not CUOBJDUMP.exists():
        pytest.skip(f"this triton has no bundled cuobjdump ({CUOBJDUMP})")
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, str(HERE / "triton_aot_worker.py"), str(out), "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_launched_kernel_compiles_for_sm90(compiled):
    found = {record["kernel"] for record in compiled["kernels"]}
    assert found == _kernel_names(), "a kernel of the package was not compiled (add its op to the worker)"
    # each row path with each loss feature, forward and backward: dozens of distinct configurations
    assert len(compiled["kernels"]) >= 40


def test_no_kernel_spills_and_every_block_fits_a_multiprocessor(compiled):
    for record in compiled["kernels"]:
        where = f"{record['kernel']} {record['constexprs']} ({record['num_warps']} warps)"
        assert record["local"] == 0, f"{where} spills {record['local']} bytes a thread to local memory"
        threads = 32 * record["num_warps"]
        assert record["reg"] * threads <= REGISTERS_PER_SM, f"{where}: {record['reg']} registers a thread"


def _programs_per_multiprocessor(record: dict) -> int:
    """Programs of this kernel that fit one multiprocessor's registers (allocated 8 a thread at a time)."""
    registers = -(-record["reg"] // 8) * 8
    return REGISTERS_PER_SM // (registers * 32 * record["num_warps"])


def test_the_elementwise_kernel_leaves_room_for_two_programs(compiled):
    """BCE is memory-bound: one 8-warp program a multiprocessor (16 elements a thread took 150-211
    registers) leaves too few loads in flight; the policy's 8 a thread keeps two or more resident."""
    for record in compiled["kernels"]:
        if record["kernel"] == "_sigmoid_bce_kernel":
            assert _programs_per_multiprocessor(record) >= 2, record
