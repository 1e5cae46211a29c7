"""Knowledge distillation on the fused head (the README's recipe): the forward KL divergence from a teacher's
distribution to the student's, with the student's logits never formed, equals the eager computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softxent


@pytest.mark.parametrize("memory", ["speed", "lean"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_forward_kl_equals_eager(memory, temperature, impl, rng):
    """KL(p ‖ q) = H(p, q) − H(p): the fused head computes the cross-entropy H(p, q) against probability
    targets; the teacher's entropy H(p) is a constant of the student. Temperature T: q = softmax(z / T),
    z / T = (x / T)·Wᵀ, and the loss is scaled by T² (Hinton et al., 2015)."""
    n, d, v = 37, 16, 211
    hidden = torch.randn(n, d, generator=rng, dtype=torch.float64, requires_grad=True)
    head = (torch.randn(v, d, generator=rng, dtype=torch.float64) * 0.5).requires_grad_()
    teacher_logits = torch.randn(n, v, generator=rng, dtype=torch.float64) * 2
    teacher = torch.softmax(teacher_logits / temperature, dim=-1)

    cross_entropy = softxent.linear_cross_entropy(
        hidden / temperature, head, teacher, memory=memory, chunk_size=64, impl=impl
    )
    teacher_entropy = -(teacher * torch.log_softmax(teacher_logits / temperature, dim=-1)).sum(-1).mean()
    fused = temperature**2 * (cross_entropy - teacher_entropy)

    student_log_probs = F.log_softmax(hidden @ head.T / temperature, dim=-1)
    eager = temperature**2 * F.kl_div(student_log_probs, teacher, reduction="batchmean")
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-12)
    for mine, theirs in zip(
        torch.autograd.grad(fused, (hidden, head)), torch.autograd.grad(eager, (hidden, head)), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)
