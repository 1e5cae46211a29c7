"""Loss modules mirroring ``torch.nn``: ``__init__`` stores and checks the configuration, ``forward`` is one
call to :mod:`softxent.functional`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from softxent import _validate as check
from softxent import functional as F

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss``, computed by :func:`softxent.cross_entropy`.

    Extras (keyword-only): ``z_loss``, ``softcap``, ``inplace_backward`` (the gradient is written over the
    logits; see :func:`softxent.cross_entropy`), ``impl``. ``weight`` is a buffer, as in torch.

    Example:
        >>> import torch, softxent
        >>> criterion = softxent.nn.CrossEntropyLoss(label_smoothing=0.1)
        >>> criterion(torch.randn(3, 5), torch.tensor([0, 4, 2])).shape
        torch.Size([])
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if weight is not None:
            check.check_float_tensor("weight", weight)
        self.register_buffer("weight", weight)
        self.ignore_index = check.check_ignore_index(ignore_index)
        self.reduction = check.check_reduction_legacy(size_average, reduce, reduction)
        self.label_smoothing = check.check_label_smoothing(label_smoothing)
        self.z_loss = check.check_z_loss(z_loss)
        self.softcap = check.check_softcap(softcap)
        self.inplace_backward = check.check_bool("inplace_backward", inplace_backward)
        self.impl = check.check_impl(impl)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"inplace_backward={self.inplace_backward}"
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """Drop-in for torch 2.13's ``torch.nn.LinearCrossEntropyLoss``: a linear layer and the cross-entropy of
    its logits, computed by :func:`softxent.linear_cross_entropy` without materializing them.

    As in torch, ``self.linear`` is a ``torch.nn.Linear(in_features, C·d1·…·dk, bias=bias)`` whose weight is
    reshaped to ``(C, d1, ..., dk, in_features)`` in forward.

    Example:
        >>> import torch, softxent
        >>> head = softxent.nn.LinearCrossEntropyLoss(8, 100, bias=True)
        >>> head(torch.randn(4, 8), torch.tensor([1, 50, 99, -100])).shape
        torch.Size([])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: object | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        memory: str = "speed",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if weight is not None:
            check.check_class_weight(weight, num_classes, weight.device)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.reduction = check.check_reduction(reduction)
        self.ignore_index = None if ignore_index is None else check.check_ignore_index(ignore_index)
        self.label_smoothing = check.check_label_smoothing(label_smoothing)
        self.options = options
        self.z_loss = check.check_z_loss(z_loss)
        self.softcap = check.check_softcap(softcap)
        self.chunk_size = check.check_chunk_size(chunk_size)
        self.memory = check.check_memory(memory)
        if self.memory == "lean" and self.out_features:
            raise ValueError(
                f"memory: 'lean' takes no K-dimensional loss, got out_features={self.out_features}"
            )
        self.impl = check.check_impl(impl)
        self.linear = torch.nn.Linear(
            in_features,
            math.prod(self.out_features, start=num_classes),
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        linear_weight = self.linear.weight.reshape(
            self.num_classes, *self.out_features, self.linear.in_features
        )
        linear_bias = None
        if self.linear.bias is not None:
            linear_bias = self.linear.bias.reshape(self.num_classes, *self.out_features)
        return F.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            memory=self.memory,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, memory={self.memory!r}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}"
        )


class BCEWithLogitsLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.BCEWithLogitsLoss``, computed by
    :func:`softxent.binary_cross_entropy_with_logits`.

    Example:
        >>> import torch, softxent
        >>> criterion = softxent.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0]))
        >>> criterion(torch.randn(4, 2), torch.ones(4, 2)).shape
        torch.Size([])
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
        *,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("weight", weight), ("pos_weight", pos_weight)):
            if value is not None:
                check.check_float_tensor(name, value)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = check.check_reduction_legacy(size_average, reduce, reduction)
        self.impl = check.check_impl(impl)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight, impl=self.impl
        )
