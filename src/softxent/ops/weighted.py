r"""The linear heads' loss and gradients in closed form, with a weight per row: the estimators' step.

An estimator's SGD step (and each chunk of an L-BFGS evaluation) needs Σ_i s_i·ℓ_i over a batch and its
gradient, s_i the row's sample weight. For the softmax head (:func:`linear_cross_entropy_with_grads`),
with class-index targets y_i, class weights w and label smoothing ε, q_i = (1 − ε)·w_{y_i}·onehot(y_i) +
(ε/C)·w is the probability target that torch's smoothed, weighted cross-entropy amounts to (for
probability targets t_i, q_i = w ⊙ ((1 − ε)·t_i + ε/C)), and with log ŷ = log_softmax(z):

.. math::
    L = \sum_i s_i\,ℓ_i = -\sum_i s_i \sum_c q_{ic} \log ŷ_{ic}, \qquad
    G_i = \frac{∂L}{∂z_i} = s_i\,\bigl((\textstyle\sum_c q_{ic})\,ŷ_i - q_i\bigr), \qquad
    \frac{∂L}{∂W} = G^\top X,\quad \frac{∂L}{∂b} = G^\top 1,\quad \frac{∂L}{∂X} = G\,W.

For the sigmoid head (:func:`linear_binary_cross_entropy_with_grads`, one binary cross-entropy per label
with positive weights p), G_ij = s_i·((1 + (p_j − 1)·y_ij)·σ(z_ij) − p_j·y_ij), σ(z) − y without weights,
and the same three matmuls.

At an estimator's sizes (a batch of 4096 rows, tens of classes) the logits of a whole batch fit in cache,
and the fused linear heads' chunked drivers and autograd cost more than the logits they save: about 60
small torch calls a step. Here the gradient is written down instead of traced: about 20 torch calls a
softmax step, on any device, with no host synchronization (measured on the 2-core CPU, 150k × 200 float32
rows, 20 classes: an SGD epoch of 37 steps 0.048 s, since 0.043 s, against 0.064–0.080 s through the fused
head; benchmarks/RESULTS.md, issue 16).
"""

from __future__ import annotations

import torch
from torch import Tensor

# A block of rows holds at most this many logits (C·rows): 64 MiB of float32. An estimator's SGD batch of
# 4096 rows is one block up to 4096 classes.
BLOCK_ELEMENTS = 2**24


def linear_cross_entropy_with_grads(
    x: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    row_weight: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    grad_scale: float = 1.0,
    need_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """L = Σ_i s_i·ℓ_i and g·∂L/∂W, g·∂L/∂b, g·∂L/∂x (module docstring), without autograd.

    x ``(N, D)``, linear_weight ``(C, D)``, linear_bias ``(C,)`` or None, target ``(N,)`` int64 class
    indices in [0, C) (no ignore_index) or ``(N, C)`` probabilities t (then q_i = w ⊙ ((1 − ε)·t_i + ε/C)),
    row_weight ``(N,)`` (s_i >= 0; None: all 1), class_weight ``(C,)`` (w; None: all 1), all in x's dtype
    (float32 or float64) and on its device; g = ``grad_scale``. Returns
    (L as a 0-d tensor, dW ``(C, D)``, db ``(C,)`` or None without a bias, dx ``(N, D)`` or None unless
    ``need_dx``), the same as::

        L = (F.cross_entropy(x @ W.T + b, target, weight=w, label_smoothing=ε, reduction="none") * s).sum()
        dW, db, dx = torch.autograd.grad(g * L, (W, b, x))

    A block of rows' logits is held transposed, zᵀ = W·Xᵀ + b of shape (C, rows): the reductions over C
    then run along the long axis (on the CPU, torch's softmax of a (4096, 20) block over its 20 classes
    took 70 µs, over the first axis of its (20, 4096) transpose 46 µs). Per block: the matmuls of the
    fused head (4·N·D·C FLOPs, 6·N·D·C with dx), one log_softmax (max, Σ exp and log in one pass), one exp
    for ŷ, a gather and a scatter_add_ at the true classes, sums, and a few vector operations for the
    weights; the loss is read off log ŷ, finite where ŷ_y underflows. Without class or row weights (and
    without dx) g scales the (C, D) product rather than the (C, rows) block. A block is every row unless
    C·N exceeds BLOCK_ELEMENTS. Arguments are not checked: callers pass validated tensors.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x, W, y = torch.randn(6, 3), torch.randn(4, 3), torch.tensor([0, 3, 1, 1, 2, 0])
        >>> loss, dW, db, dx = linear_cross_entropy_with_grads(x, W, None, y, need_dx=True)
        >>> torch.allclose(loss, F.cross_entropy(x @ W.T, y, reduction="sum"))
        True
    """
    num_classes, n_rows = linear_weight.shape[0], x.shape[0]
    rows = max(1, min(n_rows, BLOCK_ELEMENTS // max(1, num_classes)))
    eps = float(label_smoothing)
    probabilities = target.is_floating_point()
    # class indices: Σ_c q_ic = (1 − ε)·w_{y_i} + ε·mean(w) (1 without class weights), and (ε/C)·w as a
    # (C, 1) column
    smooth_mass, smooth = 0.0, None
    if eps and not probabilities:
        smooth_mass = eps if class_weight is None else eps * class_weight.mean()
        smooth = (eps / num_classes) * (
            torch.ones(num_classes, 1, dtype=x.dtype, device=x.device)
            if class_weight is None
            else class_weight.unsqueeze(1)
        )
    # Class indices with neither class nor row weights: G = g·(ŷ − (1 − ε)·onehot(y) − ε/C), so g is applied
    # to the (C, D) product instead of the (C, rows) block
    plain = not probabilities and class_weight is None and row_weight is None and not need_dx
    whole = rows == n_rows  # one block: the arguments themselves, no views to make
    loss, grad_x = None, torch.empty_like(x) if need_dx else None
    grad_weight = grad_bias = None
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        x_block = x if whole else x[start:stop]
        y = None if probabilities else (target if whole else target[start:stop]).unsqueeze(0)
        logits = torch.mm(linear_weight, x_block.t())  # zᵀ, (C, rows)
        if linear_bias is not None:
            logits.add_(linear_bias.unsqueeze(1))
        # log ŷ = z − lse in one pass (max, Σ exp, log): finite where ŷ underflows (logits of 1e4). On the
        # CPU over the logits in place: a fresh (C, rows) block is written through cold cache lines (in an
        # SGD step, 70 µs against 94 µs at 20 x 4096); torch's CPU kernel gives the same bits in place
        # (test_weighted pins it at every layout). CUDA's caching allocator gives no cold block, and its
        # kernels' order is not ours to rely on.
        log_probs = torch.log_softmax(logits, 0, out=logits if logits.device.type == "cpu" else None)
        del logits
        s = None if row_weight is None else row_weight[start:stop]
        # −ℓ_i = Σ_c q_ic·log ŷ_ic; for class indices (1 − ε)·w_{y_i}·log ŷ_{i,y_i} + Σ_c (ε/C)·w_c·log ŷ_ic
        if probabilities:
            # a copy, always: .contiguous() of a one-row block's transpose would be the caller's target
            q = target[start:stop].t().clone(memory_format=torch.contiguous_format)
            if eps:
                q.mul_(1.0 - eps).add_(eps / num_classes)
            if class_weight is not None:
                q.mul_(class_weight.unsqueeze(1))
            mass, neg_loss = q.sum(0), (q * log_probs).sum(0)
        else:
            picked = log_probs.gather(0, y)[0]  # log ŷ_y
            # (1 − ε)·w_y: a number or (rows,)
            hard = (1.0 - eps) if class_weight is None else (1.0 - eps) * class_weight[y[0]]
            mass = hard + smooth_mass
            neg_loss = picked if isinstance(hard, float) and hard == 1.0 else picked * hard
            if smooth is not None:
                neg_loss = neg_loss + (smooth * log_probs).sum(0)
        block_loss = -(neg_loss.sum() if s is None else neg_loss @ s)
        loss = block_loss if loss is None else loss + block_loss

        # G = g·s_i·((Σ_c q_ic)·ŷ − q_i); in the plain case G/g = ŷ − (1 − ε)·onehot − ε/C
        probs = log_probs.exp_()
        after = grad_scale if plain else 1.0  # the factor the products still need
        scale = 1.0 if plain else (grad_scale if s is None else s * grad_scale)  # a number or (rows,)
        if not plain:
            probs.mul_(mass * scale)
        if probabilities:
            probs.sub_(q.mul_(scale))
        else:
            if smooth is not None:
                probs.sub_(smooth * scale)
            # − g·s_i·(1 − ε)·w_{y_i} at each row's true class, by scatter_add_ (deterministic on CUDA
            # too under torch.use_deterministic_algorithms, as torch documents)
            true_class = -hard * scale
            if not isinstance(true_class, Tensor):
                true_class = torch.full((1, stop - start), true_class, dtype=x.dtype, device=x.device)
            else:
                true_class = true_class.unsqueeze(0)
            probs.scatter_add_(0, y, true_class)
        # ∂L/∂W = after·(block)·X: alpha pays the g owed in the plain case; beta = 0: W only lends a shape
        if grad_weight is None:
            grad_weight = torch.addmm(linear_weight, probs, x_block, beta=0.0, alpha=after)
            grad_bias = None if linear_bias is None else probs.sum(1)
            if grad_bias is not None and after != 1.0:
                grad_bias.mul_(after)
        else:
            grad_weight.addmm_(probs, x_block, alpha=after)
            if grad_bias is not None:
                grad_bias.add_(probs.sum(1), alpha=after)
        if grad_x is not None:
            torch.mm(probs.t(), linear_weight, out=grad_x[start:stop])
    if loss is None:  # no rows
        loss = x.new_zeros(())
        grad_weight = torch.zeros_like(linear_weight)
        grad_bias = None if linear_bias is None else torch.zeros_like(linear_bias)
    return loss, grad_weight, grad_bias, grad_x


def linear_binary_cross_entropy_with_grads(
    x: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    row_weight: Tensor | None = None,
    *,
    pos_weight: Tensor | None = None,
    grad_scale: float = 1.0,
    need_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """L = Σ_i s_i·Σ_j ℓ_ij and g·∂L/∂W, g·∂L/∂b, g·∂L/∂x for a sigmoid head (module docstring), without
    autograd.

    x ``(N, D)``, linear_weight ``(K, D)``, linear_bias ``(K,)`` or None, target ``(N, K)`` in [0, 1],
    row_weight ``(N,)`` (s_i >= 0; None: all 1), pos_weight ``(K,)`` (p; None: all 1), all in x's dtype
    and on its device; g = ``grad_scale``. Returns (L as a 0-d tensor, dW ``(K, D)``, db ``(K,)`` or None
    without a bias, dx ``(N, D)`` or None unless ``need_dx``), the same as::

        L = F.binary_cross_entropy_with_logits(x @ W.T + b, target, weight=s[:, None], pos_weight=p,
                                               reduction="sum")
        dW, db, dx = torch.autograd.grad(g * L, (W, b, x))

    Per block of rows: the logits' addmm, the elementwise loss and gradient in about a dozen torch calls
    (three transcendental passes: exp, log1p, sigmoid) with G written over the logits, and the matmuls for
    dW (and dx). A block is every row unless K·N exceeds BLOCK_ELEMENTS. Arguments are not checked:
    callers pass validated tensors.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x, W, y = torch.randn(6, 3), torch.randn(4, 3), torch.randint(0, 2, (6, 4)).float()
        >>> loss, dW, db, dx = linear_binary_cross_entropy_with_grads(x, W, None, y)
        >>> torch.allclose(loss, F.binary_cross_entropy_with_logits(x @ W.T, y, reduction="sum"))
        True
    """
    num_outputs, n_rows = linear_weight.shape[0], x.shape[0]
    rows = max(1, min(n_rows, BLOCK_ELEMENTS // max(1, num_outputs)))
    loss = x.new_zeros(())
    grad_weight = torch.zeros_like(linear_weight)
    grad_bias = None if linear_bias is None else torch.zeros_like(linear_bias)
    grad_x = torch.empty_like(x) if need_dx else None
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        x_block = x[start:stop]
        if linear_bias is not None:
            logits = torch.addmm(linear_bias, x_block, linear_weight.t())  # (rows, K)
        else:
            logits = torch.mm(x_block, linear_weight.t())
        s = None if row_weight is None else row_weight[start:stop]
        loss += _sigmoid_block(logits, target[start:stop], s, pos_weight, grad_scale)
        grad_weight.addmm_(logits.t(), x_block)  # the logits now hold G
        if grad_bias is not None:
            grad_bias += logits.sum(0)
        if grad_x is not None:
            torch.mm(logits, linear_weight, out=grad_x[start:stop])
    return loss, grad_weight, grad_bias, grad_x


def _sigmoid_block(
    logits: Tensor, target: Tensor, row_weight: Tensor | None, pos_weight: Tensor | None, grad_scale: float
) -> Tensor:
    """Σ_i s_i·Σ_j ℓ_ij of a (rows, K) block, writing G = g·s_i·(L_ij·σ(z_ij) − p_j·y_ij) over ``logits``.

    With L = 1 + (p − 1)·y and softplus(−z) = log1p(e^{−|z|}) + max(−z, 0) (e^{−|z|} <= 1: no overflow),
    ℓ = L·softplus(−z) + (1 − y)·z = L·log1p(e^{−|z|}) + [L·max(−z, 0) + (1 − y)·z]. The bracket, which
    is max(z, 0) − y·z without pos_weight, is formed first: for a 0/1 target in the tail where it
    vanishes its two terms are equal floats and cancel exactly, so log1p(e^{−|z|}) keeps all its digits
    (softxent.reference folds it the same way).
    """
    z, y = logits, target
    log1p_exp = z.abs().neg_().exp_().log1p_()  # log1p(e^{−|z|})
    if pos_weight is None:
        loss = log1p_exp.add_(z.clamp_min(0.0).sub_(y * z))
    else:
        log_weight = (pos_weight - 1.0) * y + 1.0  # L
        linear = z.neg().clamp_min_(0.0).mul_(log_weight).add_((1.0 - y) * z)
        loss = log1p_exp.mul_(log_weight).add_(linear)
    total = loss.sum() if row_weight is None else loss.sum(1) @ row_weight
    grad = z.sigmoid_()  # the logits are not needed again
    if pos_weight is None:
        grad.sub_(y)
    else:
        grad.mul_(log_weight).sub_(pos_weight * y)
    grad.mul_(grad_scale if row_weight is None else (row_weight * grad_scale).unsqueeze(1))
    return total
