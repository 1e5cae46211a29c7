"""The training rows on the device (:class:`Data`) and the numpy -> torch conversion they use."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

# An epoch's shuffled rows are gathered in segments of steps, one index_select each. On a GPU a segment is up
# to GPU_SEGMENT_ELEMENTS values of X (256 MiB of float32): few launches, at most one segment of extra
# memory. On a CPU the gathered rows should still be in cache when the step's matmuls read them: a segment
# is at most CPU_SEGMENT_BYTES, and at least one step (measured on the 2-core EPYC, 150k x 200 float32 rows,
# steps of 4096 rows: a step's gather and two matmuls took 0.92 ms with one step a segment, 0.98 ms with two
# (6.6 MB) and 1.2 ms with four; gathering a whole epoch at once was 20% slower an epoch than each step's).
GPU_SEGMENT_ELEMENTS = 2**26
CPU_SEGMENT_BYTES = 4 * 2**20

Batch = tuple[Tensor, Tensor, Tensor | None]


def to_tensor(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A numpy array as a tensor on ``device``, sharing memory where it can (copying a read-only buffer)."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    tensor = torch.from_numpy(array)
    return tensor.to(device=device, dtype=dtype or tensor.dtype)


@dataclasses.dataclass
class Data:
    """Training rows on the device: X dense (n, D) or scipy CSR; target (n,) int64 class indices or
    (n, K) floats; optional sample weights (n,)."""

    X: Tensor | sp.csr_matrix
    target: Tensor
    sample_weight: Tensor | None
    device: torch.device
    dtype: torch.dtype
    _buffer: Tensor | None = None

    @classmethod
    def on_device(
        cls,
        X: np.ndarray | sp.csr_matrix,
        target: np.ndarray,
        sample_weight: np.ndarray | None,
        device: torch.device,
    ) -> Data:
        """The rows of checked numpy data on ``device``, in X's float dtype (a sparse X stays on the host,
        its batches densified one at a time)."""
        dtype = torch.float32 if X.dtype == np.float32 else torch.float64
        tensor_X = X if sp.issparse(X) else to_tensor(X, device)
        tensor_target = to_tensor(target, device, torch.int64 if target.ndim == 1 else dtype)
        weight = None if sample_weight is None else to_tensor(sample_weight, device, dtype)
        return cls(tensor_X, tensor_target, weight, device, dtype)

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def batch(self, rows: np.ndarray | slice) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rows of X (dense, on the device), of the target and of the sample weights.

        Shuffled rows of a dense X are gathered into one reused buffer: a fresh tensor per step costs
        its page faults again every time (4× slower on CPU). The buffer is free again by the next
        step, since the step's backward has run by then.
        """
        if isinstance(rows, slice):
            X = self.X[rows] if isinstance(self.X, Tensor) else self._densify(self.X[rows])
            weight = None if self.sample_weight is None else self.sample_weight[rows]
            return X, self.target[rows], weight
        index = torch.from_numpy(rows).to(self.device)
        if isinstance(self.X, Tensor):
            if self._buffer is None or self._buffer.shape[0] < len(rows):
                self._buffer = self.X.new_empty(len(rows), self.X.shape[1])
            X = torch.index_select(self.X, 0, index, out=self._buffer[: len(rows)])
        else:
            X = self._densify(self.X[rows])
        weight = None if self.sample_weight is None else self.sample_weight.index_select(0, index)
        return X, self.target.index_select(0, index), weight

    def batches(self, order: np.ndarray | None, shares: Sequence[tuple[int, int]]) -> Iterator[Batch | None]:
        """Each step's rows: positions ``low:high`` of the epoch's ``order`` (None: as stored) for each
        ``(low, high)`` of ``shares``; None for an empty share.

        Stored order gives views (no copy). Shuffled dense rows are gathered a segment of steps at a
        time (CPU_SEGMENT_BYTES on a CPU, GPU_SEGMENT_ELEMENTS on a GPU) into one reused buffer, and the
        epoch's indices cross to the device once, so a CUDA epoch makes no host-to-device copy (and no
        synchronization) between its steps. A segment's buffer is reused only after its steps' backward
        passes have run. Sparse rows are densified a step at a time.
        """
        if order is None or not isinstance(self.X, Tensor):
            for low, high in shares:
                yield (
                    None
                    if high <= low
                    else self.batch(slice(low, high) if order is None else order[low:high])
                )
            return
        rows = np.concatenate([order[low:high] for low, high in shares]) if shares else order[:0]
        index = torch.from_numpy(rows).to(self.device)
        # the targets and weights of the whole epoch in one gather each (8 bytes a row; one gather a step
        # took 15-35 µs on the CPU)
        targets = self.target.index_select(0, index)
        weights = None if self.sample_weight is None else self.sample_weight.index_select(0, index)
        if self.device.type == "cuda":
            elements = GPU_SEGMENT_ELEMENTS
        else:
            elements = CPU_SEGMENT_BYTES // self.X.element_size()
        per_segment = max(1, elements // max(1, self.X.shape[1]))
        first, start = 0, 0
        while first < len(shares):
            last, size = first, 0
            while last < len(shares) and (last == first or size + _rows(shares[last]) <= per_segment):
                size += _rows(shares[last])
                last += 1
            segment = index[start : start + size]
            if self._buffer is None or self._buffer.shape[0] < size:
                self._buffer = self.X.new_empty(size, self.X.shape[1])
            X = torch.index_select(self.X, 0, segment, out=self._buffer[:size])
            target = targets[start : start + size]
            weight = None if weights is None else weights[start : start + size]
            if last == first + 1:  # a segment of one step (the CPU's usual case): no views to take
                yield (X, target, weight) if size else None
                first, start = last, start + size
                continue
            offset = 0
            for share in shares[first:last]:
                part = slice(offset, offset + _rows(share))
                yield (
                    None
                    if not _rows(share)
                    else (X[part], target[part], None if weight is None else weight[part])
                )
                offset += _rows(share)
            first, start = last, start + size

    def _densify(self, rows: sp.csr_matrix) -> Tensor:
        return torch.from_numpy(rows.toarray()).to(self.device, self.dtype)


def _rows(share: tuple[int, int]) -> int:
    return max(0, share[1] - share[0])
