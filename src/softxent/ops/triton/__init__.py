"""Triton GPU kernels (``impl="triton"``; chosen by ``impl="auto"`` for CUDA tensors). One file per kernel
family (:mod:`.cross_entropy`, :mod:`.bce`, :mod:`.slices`), their shared math in :mod:`.rowmath`; each
keeps the contract of its torch counterpart in :mod:`softxent.ops.torch_blocks`, so the same drivers run
it. Launch shapes come from :mod:`softxent.ops.policy`; every launch goes through :mod:`.launches`. Without a
GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
