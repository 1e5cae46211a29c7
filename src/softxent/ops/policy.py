"""How work is cut, per device and backend: the one place that knows a CPU cache, a GPU's multiprocessor
count or its L2, and the launch shapes of the Triton kernels.

A :class:`Policy` tells the drivers (:mod:`softxent.ops.rows`, :mod:`softxent.ops.chunks`,
:mod:`softxent.ops.slices`) how many rows go into one block of the row kernels, how many rows into one chunk
of a linear head, how many classes into one vocabulary slice, and whether a chunk's gradient is kept in the
input dtype. The ``*_launch`` functions give the Triton kernels their launch shapes (columns per block, rows
per program, warps, programs per row) from the :class:`Hardware` they run on.

Why it matters: the row drivers once cut every call into blocks of 2^20 logits, sized for a 2-core CPU's
cache, on every backend; on an H200 that was 1024 launches of an 8-program grid at a vocabulary of 128256
(130× the memory floor). Here the CPU keeps its cache-sized blocks and the Triton backend takes all rows in
one launch.

:func:`simulated` stands in another machine's hardware (tests pin the GPU's launch counts and shapes in
Triton's interpreter on a CPU; the benchmark can try other launch shapes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Hardware:
    """What the policy needs to know of a device: its kind ("cpu" or "cuda"), its processors (streaming
    multiprocessors of a GPU, cores of a CPU) and its last-level cache shared by them (a GPU's L2)."""

    kind: str
    name: str
    processors: int
    cache_bytes: int


# An NVIDIA H200 as this project measured one (PyTorch reported 132 multiprocessors and 60 MB of L2): the
# GPU the launch shapes were designed for; tests simulate it in Triton's interpreter.
H200 = Hardware("cuda", "NVIDIA H200", 132, 60 * 2**20)

_SIMULATED: ContextVar[Hardware | None] = ContextVar("softxent_simulated_hardware", default=None)


@functools.cache
def _cuda_hardware(index: int) -> Hardware:
    properties = torch.cuda.get_device_properties(index)
    cache_bytes = getattr(properties, "L2_cache_size", 0) or H200.cache_bytes
    return Hardware("cuda", properties.name, properties.multi_processor_count, cache_bytes)


@functools.cache
def _cpu_hardware() -> Hardware:
    return Hardware("cpu", "CPU", os.cpu_count() or 1, 32 * 2**20)


def hardware(device: torch.device) -> Hardware:
    """The hardware of ``device`` (its properties read once), or the one :func:`simulated` stands in."""
    simulated_hardware = _SIMULATED.get()
    if simulated_hardware is not None:
        return simulated_hardware
    if device.type == "cuda":
        return _cuda_hardware(device.index if device.index is not None else torch.cuda.current_device())
    return _cpu_hardware()


@contextlib.contextmanager
def simulated(stand_in: Hardware) -> Iterator[None]:
    """Within the block, every policy and launch shape is chosen as on ``stand_in`` (the kernels still run
    where their tensors are: on a CPU, in Triton's interpreter)."""
    token = _SIMULATED.set(stand_in)
    try:
        yield
    finally:
        _SIMULATED.reset(token)


# ----------------------------------------------------------------------------------------------------------
# The drivers' policy
# ----------------------------------------------------------------------------------------------------------

# CPU: logits per block of the torch row functions, about 4 MiB of float32, so that a block and its
# temporaries stay in the shared L3 cache while the functions make their handful of passes over it
# (measured best on a 2-core EPYC).
CPU_BLOCK_ELEMENTS = 1 << 20
# The torch functions on a GPU: the block bounds their float32 temporaries (a few of 64 MiB each); there is
# no cache to fit, and each block costs a dozen launches.
GPU_TORCH_BLOCK_ELEMENTS = 1 << 24
# Logits per chunk of the linear heads where the gradient is kept in float32 (64 MiB): large enough that the
# three matmuls per chunk run at the machine's matmul rate (dW's update has the chunk's rows as its inner
# dimension).
CHUNK_ELEMENTS = 1 << 24
# The Triton path (G in the input dtype): chunks of up to 512 MiB of logits, so that dW accumulates over few
# chunks and its update runs at the matmul rate (to be tuned on a GPU: issue 13).
TRITON_CHUNK_BYTES = 1 << 29
MIN_CHUNK_ROWS = 256
# Logits per vocabulary slice of the lean heads, in bytes of the slice buffer: 64 MiB, small next to the
# gradients while its matmuls (inner dimensions D, S and N) stay large.
SLICE_BYTES = 1 << 26
MIN_SLICE_COLUMNS = 128


@dataclass(frozen=True)
class Policy:
    """How the drivers cut the work on one device with one backend.

    block_elements: logits per block of the row drivers (None: all rows in one block, one launch).
    grad_in_input_dtype: the linear heads write G in the input dtype over a chunk's logits and run
        input-dtype matmuls (the Triton path) instead of keeping G in the compute dtype.
    chunk_bytes: bytes of logits per chunk of the speed-mode linear heads (with ``side_stream``, of its two
        chunk buffers together).
    side_stream: on a GPU, the float32 sums run on a second CUDA stream: the speed-mode heads' dW = Σ Gᵀ·X,
        so that chunk k's accumulation (a GEMM whose float32 (V, D) accumulator is read and written, V·D·8
        bytes a chunk) overlaps chunk k+1's logits matmul and row kernel, and the lean heads' dX = Σ G_v·W_v
        (N·D·8 bytes a slice) beside the next slice's work. The chunks' or slices' logits alternate between
        two buffers of half the bytes each (an explicit ``chunk_size`` is each buffer's size). Off by
        default until a GPU measures it (issue 13's lever; ``bench_gpu.py --breakdown`` times both).
    weight_sized_chunks: where dW is summed over chunks in float32 for bf16/fp16 inputs, a chunk takes at
        least the bytes of the (V, D) weight in the input dtype. dW's input-dtype copy takes that much at the
        end of the pass anyway (beside the float32 sum), so the peak does not grow, while the float32 sum,
        read and written once a chunk (V·D·8 bytes), is updated over fewer chunks: 2 instead of 4 at
        8192×4096×128256.
    dx_sized_slices: the lean heads' counterpart. Where dX is summed over vocabulary slices in float32 for
        low-precision inputs, a slice takes at least the bytes of the (N, D) input: dX's input-dtype copy
        takes that much at the end, beside the float32 sum (N·D·8 bytes read and written a slice), which is
        then updated over fewer slices: 32 instead of 126 at 32768×4096×128256.
    """

    hardware: Hardware
    backend: str
    block_elements: int | None
    grad_in_input_dtype: bool
    chunk_bytes: int
    side_stream: bool = False
    weight_sized_chunks: bool = False
    dx_sized_slices: bool = False

    def row_blocks(self, rows: int, per_row: int) -> list[tuple[int, int]]:
        """(start, stop) of each block of rows, ``per_row`` logits a row."""
        if self.block_elements is None:
            return [(0, rows)] if rows else []
        step = max(1, self.block_elements // max(per_row, 1))
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]

    def chunk_rows(self, columns: int, element_size: int, features: int | None = None) -> int:
        """Rows per chunk of a linear head with ``columns`` logits a row: ``chunk_bytes`` of logits (of
        ``element_size`` bytes where the gradient is kept in the input dtype, else of float32), at least
        MIN_CHUNK_ROWS rows (in multiples of them on the Triton path); with ``side_stream`` half as many, as
        two chunks are in flight. ``features``: D where dW is wanted (None: it is not), for
        ``weight_sized_chunks``."""
        columns = max(columns, 1)
        chunk_bytes = self.chunk_bytes
        # float32 dW is itself the sum (no input-dtype copy at the end to make room): no weight-sized chunk
        if self.weight_sized_chunks and features and self.grad_in_input_dtype and element_size < 4:
            chunk_bytes = max(chunk_bytes, columns * features * element_size)
        chunk_bytes //= self.chunk_buffers
        if not self.grad_in_input_dtype:
            return max(MIN_CHUNK_ROWS, chunk_bytes // (4 * columns))
        rows = chunk_bytes // (columns * element_size)
        return max(MIN_CHUNK_ROWS, rows // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)

    @property
    def chunk_buffers(self) -> int:
        """Chunks (or slices) of logits a head holds at once: two where its float32 sum runs on a second
        stream."""
        return 2 if self.side_stream else 1

    def slice_columns(self, rows: int, dtype: torch.dtype, features: int | None = None) -> int:
        """Classes per vocabulary slice over ``rows`` rows: SLICE_BYTES of logits (and of their float32 copy
        where the gradient is kept in the compute dtype), in multiples of MIN_SLICE_COLUMNS. ``features``: D
        where dX is wanted (None: it is not), for ``dx_sized_slices``; with ``side_stream`` the bytes are
        split between two slots there."""
        element_bytes = torch.finfo(dtype).bits // 8
        low_precision = dtype not in (torch.float32, torch.float64)
        slice_bytes = SLICE_BYTES
        if self.dx_sized_slices and features and low_precision and self.grad_in_input_dtype:
            slice_bytes = max(slice_bytes, rows * features * element_bytes)
        if features:
            slice_bytes //= self.chunk_buffers  # two slots where dX accumulates on a second stream
        if not self.grad_in_input_dtype and low_precision:
            element_bytes += 4
        columns = slice_bytes // max(rows * element_bytes, 1)
        return max(MIN_SLICE_COLUMNS, columns // MIN_SLICE_COLUMNS * MIN_SLICE_COLUMNS)

    def speed_mode_bytes(self, rows: int, features: int, columns: int, dtype: torch.dtype) -> int:
        """Memory ``memory="speed"`` takes beyond inputs and gradients for an (rows, features) input and
        ``columns`` logits a row: one chunk of logits (and of G in float32 where the gradient is kept in the
        compute dtype), and dW's float32 buffer where the gradients are low precision and it is summed over
        chunks (on the Triton path with a single chunk dW is written in the input dtype)."""
        element_size = torch.finfo(dtype).bits // 8
        chunk = min(rows, self.chunk_rows(columns, element_size, features))
        low_precision = dtype not in (torch.float32, torch.float64)
        logits = chunk * columns * element_size
        if low_precision and not self.grad_in_input_dtype:
            logits += chunk * columns * 4
        if chunk < rows:
            logits *= self.chunk_buffers
        summed = low_precision and (chunk < rows or not self.grad_in_input_dtype)
        return logits + (columns * features * 4 if summed else 0)

    def linear_memory(self, rows: int, features: int, columns: int, dtype: torch.dtype, device) -> str:
        """What ``memory="auto"`` runs: "speed" when its extra memory (:meth:`speed_mode_bytes`) fits in
        AUTO_FRACTION of the memory the device has left (:func:`available_bytes`), else "lean", whose extra
        memory does not grow with the classes. Always "speed" on a CPU."""
        available = available_bytes(device)
        if available is None:
            return "speed"
        fits = self.speed_mode_bytes(rows, features, columns, dtype) <= AUTO_FRACTION * available
        return "speed" if fits else "lean"


# memory="auto" runs the speed mode where its extra memory takes at most this share of what is left
AUTO_FRACTION = 0.8


def available_bytes(device: torch.device) -> int | None:
    """Bytes of device memory a call can still take: the driver's free memory plus what torch's caching
    allocator holds unused; None on a CPU, where the linear heads' chunk (64 MiB) is not the constraint."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@functools.cache
def policy(stand: Hardware, backend: str) -> Policy:
    """The policy of ``backend`` on ``stand``.

    torch ops on a CPU: cache-sized blocks (CPU_BLOCK_ELEMENTS), G in float32. torch ops on a GPU: blocks
    that bound their temporaries (GPU_TORCH_BLOCK_ELEMENTS). Triton (a GPU, or its interpreter): all rows in
    one launch (the kernels hold their temporaries in registers), G in the input dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        return Policy(
            stand, backend, None, True, TRITON_CHUNK_BYTES, weight_sized_chunks=True, dx_sized_slices=True
        )
    block = CPU_BLOCK_ELEMENTS if stand.kind == "cpu" else GPU_TORCH_BLOCK_ELEMENTS
    return Policy(stand, backend, block, False, 4 * CHUNK_ELEMENTS)


_OVERRIDES: ContextVar[dict[str, object] | None] = ContextVar("softxent_policy_overrides", default=None)


@contextlib.contextmanager
def overridden(**fields: object) -> Iterator[None]:
    """Within the block, every policy has ``fields`` (e.g. ``chunk_bytes=2**28, side_stream=True``) in place
    of its own: how the benchmark tries the levers it has no default for yet, and how tests run them."""
    allowed = set(Policy.__dataclass_fields__) - {"hardware", "backend"}
    if not set(fields) <= allowed:
        raise ValueError(f"fields: expected some of {sorted(allowed)}, got {sorted(fields)}")
    token = _OVERRIDES.set({**(_OVERRIDES.get() or {}), **fields})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def for_device(device: torch.device, backend: str) -> Policy:
    """The policy of ``backend`` for tensors on ``device`` (with :func:`overridden`'s fields, if any)."""
    chosen = policy(hardware(device), backend)
    fields = _OVERRIDES.get()
    return dataclasses.replace(chosen, **fields) if fields else chosen


@functools.cache
def _addmm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(64, 48, generator=generator, device=device).to(dtype)
    b = torch.randn(48, 80, generator=generator, device=device).to(dtype)
    acc = torch.randn(64, 80, generator=generator, device=device)
    expected = acc + a.float() @ b.float()
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.allclose(acc, expected, rtol=1e-3, atol=1e-3))


def addmm_accumulates_in_float32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` accumulates low-precision products
    into a float32 ``acc`` in place on this device (cuBLAS does, with float32 C and beta = 1; torch's CPU
    kernels do not). Checked once per device and dtype on a small problem against the float32 product."""
    return device.type == "cuda" and _addmm_out_dtype_works(device, dtype)


# ----------------------------------------------------------------------------------------------------------
# Launch shapes of the Triton kernels
# ----------------------------------------------------------------------------------------------------------

# The softmax row kernel. A row of at most ROW_IN_REGISTERS columns is read once into registers (one read,
# one write: the memory floor); wider rows stream through blocks of STREAM_BLOCK columns twice: statistics,
# then the gradient in reverse block order, so the second read finds the blocks read last still in L2.
ROW_IN_REGISTERS = 16384
STREAM_BLOCK = 8192
STREAM_WARPS = 16
# Narrow rows share a program: tiles of about TILE_ELEMENTS logits, 16 a thread (two 16-byte bf16 loads).
TILE_ELEMENTS = 4096
ELEMENTS_PER_THREAD = 16
# The sigmoid BCE kernel keeps about a dozen values live per element (logit, target, weights, scale, exp,
# log1p terms): 16 a thread took 150-211 registers on sm_90 (tests/triton_aot_worker.py), one 8-warp
# program a multiprocessor (8 of 64 warps). 8 a thread (still one 16-byte bf16 load) about halves that.
SIGMOID_ELEMENTS_PER_THREAD = 8
# Enough programs to fill the GPU: rows fewer than PROGRAMS_PER_PROCESSOR × processors are cut into
# several programs a row (at least MIN_SPLIT_COLUMNS columns each, at most MAX_SPLITS), which combine their
# partial statistics in a second launch.
PROGRAMS_PER_PROCESSOR = 2
MIN_SPLIT_COLUMNS = 4 * STREAM_BLOCK
MAX_SPLITS = 64


@dataclass(frozen=True)
class RowLaunch:
    """The launch shape of a row kernel over (rows, columns).

    block: columns a program loads at once (a power of two); rows_per_program: rows a program handles
    (a power of two); num_warps: warps a program; splits: programs a row (1: one program holds the row;
    more: a statistics launch, then a combining gradient launch); single_pass: the row fits in one block,
    so it is read once.
    """

    block: int
    rows_per_program: int
    num_warps: int
    splits: int
    single_pass: bool


def _next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def _warps(elements: int, cap: int = 32, per_thread: int = ELEMENTS_PER_THREAD) -> int:
    return max(1, min(cap, elements // (32 * per_thread)))


def row_launch(rows: int, columns: int, stand: Hardware) -> RowLaunch:
    """The softmax row kernel's launch shape for (rows, columns) logits on ``stand``."""
    if columns <= ROW_IN_REGISTERS:
        block = _next_power_of_2(max(columns, 1))
        rows_per_program = max(1, min(TILE_ELEMENTS // block, _next_power_of_2(max(rows, 1))))
        return RowLaunch(block, rows_per_program, _warps(block * rows_per_program), 1, True)
    wanted = PROGRAMS_PER_PROCESSOR * stand.processors
    splits = 1
    if rows < wanted:
        splits = max(1, min(MAX_SPLITS, -(-wanted // max(rows, 1)), columns // MIN_SPLIT_COLUMNS))
    return RowLaunch(STREAM_BLOCK, 1, STREAM_WARPS, splits, False)


@dataclass(frozen=True)
class TileLaunch:
    """The launch shape of an elementwise kernel: tiles of block_rows × block_columns, num_warps a tile."""

    block_rows: int
    block_columns: int
    num_warps: int


def tile_launch(rows: int, columns: int, per_thread: int = ELEMENTS_PER_THREAD) -> TileLaunch:
    """Tiles of up to 8 warps × ``per_thread`` elements a thread (TILE_ELEMENTS at 16), whole rows where
    they are narrow."""
    elements = 8 * 32 * per_thread
    block_columns = min(_next_power_of_2(max(columns, 1)), elements)
    block_rows = max(1, min(elements // block_columns, _next_power_of_2(max(rows, 1))))
    return TileLaunch(block_rows, block_columns, _warps(block_rows * block_columns, 8, per_thread))


def split_bounds(columns: int, splits: int, block: int) -> int:
    """Columns of each of ``splits`` programs of a row (a multiple of ``block``; the last takes the rest)."""
    per_split = -(-columns // splits)
    return -(-per_split // block) * block
