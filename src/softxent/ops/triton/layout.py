"""Host-side helpers shared by the kernels' launchers: 2-D row views with unit column stride."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _row_count(t: Tensor, columns: int) -> int:
    """R of (..., C) as (R, C): the product of the leading dimensions (also when C is 0)."""
    return math.prod(t.shape[:-1]) if t.dim() else t.numel() // max(columns, 1)


def rows(t: Tensor, columns: int) -> Tensor:
    """(..., C) as (R, C) with unit column stride (a view where possible, else a contiguous copy)."""
    flat = t.reshape(_row_count(t, columns), columns)
    return flat if flat.stride(-1) == 1 or columns <= 1 else flat.contiguous()


def out_rows(out: Tensor, columns: int) -> Tensor:
    """An (R, C) unit-column-stride view of ``out`` for a kernel to write, or a new buffer when there is
    none (then :func:`copy_back` fills ``out`` from it)."""
    count = _row_count(out, columns)
    try:
        flat = out.view(count, columns)
    except RuntimeError:
        return torch.empty(count, columns, dtype=out.dtype, device=out.device)
    if flat.stride(-1) != 1 and columns > 1:
        return torch.empty_like(flat, memory_format=torch.contiguous_format)
    return flat


def copy_back(out: Tensor | None, written: Tensor | None) -> None:
    """Copy a kernel's output into ``out`` unless it was written in place (a view of ``out``)."""
    if out is None or written is None:
        return
    try:
        in_place = out.view(written.shape).data_ptr() == written.data_ptr()
    except RuntimeError:
        in_place = False
    if not in_place:
        out.copy_(written.view(out.shape))
