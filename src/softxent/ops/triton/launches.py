"""Every Triton launch of softxent goes through :func:`launch`, which can record it: tests pin how many
launches a call makes and with which shapes (in Triton's interpreter too), and the benchmark prints them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

_RECORDS: ContextVar[list[Launch] | None] = ContextVar("softxent_triton_launches", default=None)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel's name, its grid and its compile-time arguments (num_warps too)."""

    kernel: str
    grid: tuple[int, ...]
    meta: dict[str, object] = field(default_factory=dict)


def launch(kernel, grid: tuple[int, ...], *args: object, **meta: object) -> None:
    """``kernel[grid](*args, **meta)``, recorded when :func:`recorded` is active."""
    records = _RECORDS.get()
    if records is not None:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
        records.append(Launch(name, tuple(grid), dict(meta)))
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def recorded() -> Iterator[list[Launch]]:
    """Within the block, every launch is appended to the yielded list."""
    records: list[Launch] = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)
