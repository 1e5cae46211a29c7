"""softxent on torch.distributed: the vocabulary-parallel loss and data-parallel training helpers.

:func:`vocab_parallel_cross_entropy` and :func:`vocab_parallel_linear_cross_entropy` split the classes
over the ranks of a process group (NCCL on GPUs, Gloo on CPUs); the estimators and ``softxent train``
train data-parallel on the same engine.
"""

from softxent.distributed._data_parallel import RankZeroError, init_from_torchrun, launch, run_on_rank_zero
from softxent.distributed._vocab_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

__all__ = [
    "RankZeroError",
    "init_from_torchrun",
    "launch",
    "run_on_rank_zero",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]
