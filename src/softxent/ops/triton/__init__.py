"""Triton GPU kernels (``impl="triton"``; chosen by ``impl="auto"`` for CUDA tensors). One file per kernel
family; each kernel keeps the contract of its torch counterpart in ``softxent.ops.cpu`` so that the same
drivers run it. Without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
