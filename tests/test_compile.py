"""Under torch.compile the losses are single custom ops (softxent._compile): whole graphs compile
(fullgraph=True), and losses and gradients equal the eager ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softxent
from helpers import assert_close, to_numpy
from softxent import _compile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own closure of one code object: start from an empty cache (no recompile
    limit across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(rng):
    x = torch.randn(37, 16, generator=rng, requires_grad=True)
    w = (torch.randn(203, 16, generator=rng) / 4).requires_grad_()
    b = torch.randn(203, generator=rng, requires_grad=True)
    target = torch.randint(0, 203, (37,), generator=rng)
    target[::5] = -100
    upstream = torch.rand(37, generator=rng)
    return x, w, b, target, upstream


CASES = {
    "cross_entropy": lambda x, w, b, t, u, impl, red: softxent.cross_entropy(
        torch.nn.functional.linear(x, w, b), t, reduction=red, label_smoothing=0.1, z_loss=1e-3, impl=impl
    ),
    "linear_cross_entropy": lambda x, w, b, t, u, impl, red: softxent.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=red, softcap=5.0, chunk_size=16, impl=impl
    ),
    "linear_cross_entropy_lean": lambda x, w, b, t, u, impl, red: softxent.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=red, memory="lean", chunk_size=64, impl=impl
    ),
    "binary_cross_entropy_with_logits": lambda x, w, b, t, u, impl, red: (
        softxent.binary_cross_entropy_with_logits(
            torch.nn.functional.linear(x, w, b), (t.unsqueeze(1) == torch.arange(203)).float(), reduction=red,
            impl=impl,
        )
    ),
    "linear_binary_cross_entropy": lambda x, w, b, t, u, impl, red: softxent.linear_binary_cross_entropy(
        x, w, (t.unsqueeze(1) == torch.arange(203)).float(), linear_bias=b, reduction=red, chunk_size=8,
        impl=impl,
    ),
    "linear_binary_cross_entropy_lean": lambda x, w, b, t, u, impl, red: softxent.linear_binary_cross_entropy(
        x, w, (t.unsqueeze(1) == torch.arange(203)).float(), linear_bias=b, reduction=red, chunk_size=64,
        memory="lean", impl=impl,
    ),
}  # fmt: skip


def _objective(case, reduction, impl):
    def objective(x, w, b, target, upstream):
        loss = CASES[case](x, w, b, target, upstream, impl, reduction)
        if reduction == "none":
            loss = loss if loss.dim() == 1 else loss.sum(1)
            return (loss * upstream).sum()
        return 3.0 * loss

    return objective


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_graph_equals_eager(case, reduction, impl, rng):
    x, w, b, target, upstream = _inputs(rng)
    objective = _objective(case, reduction, impl)
    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    expected = objective(x, w, b, target, upstream)
    expected_grads = torch.autograd.grad(expected, [x, w, b])
    got = compiled(x, w, b, target, upstream)
    got_grads = torch.autograd.grad(got, [x, w, b])
    assert_close(got, to_numpy(expected), 1e-6, "loss")
    for name, mine, theirs in zip(["dX", "dW", "db"], got_grads, expected_grads, strict=True):
        assert_close(mine, to_numpy(theirs), 1e-6, name)


UNBATCHED = {
    "cross_entropy": lambda x, w, b, t, red, impl: softxent.cross_entropy(
        torch.nn.functional.linear(x, w, b), t, reduction=red, z_loss=1e-3, impl=impl
    ),
    "cross_entropy_probabilities": lambda x, w, b, t, red, impl: softxent.cross_entropy(
        torch.nn.functional.linear(x, w, b), torch.softmax(b.detach(), 0), reduction=red, impl=impl
    ),
    "linear_cross_entropy": lambda x, w, b, t, red, impl: softxent.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=red, impl=impl
    ),
    "linear_cross_entropy_lean": lambda x, w, b, t, red, impl: softxent.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=red, memory="lean", chunk_size=64, impl=impl
    ),
    "linear_binary_cross_entropy": lambda x, w, b, t, red, impl: softxent.linear_binary_cross_entropy(
        x, w, (torch.arange(203) == t).float(), linear_bias=b, weight=torch.linspace(0.5, 1, 203),
        reduction=red, impl=impl,
    ),
}  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", sorted(UNBATCHED))
def test_compiled_unbatched_equals_eager(case, reduction, impl, rng):
    """A single (D,) or (C,) input: the custom op must keep it attached to the graph (it runs below
    autograd, where the public op's unbatching view would not be recorded)."""
    x, w, b, target, _ = _inputs(rng)
    x, target = x[0].detach().requires_grad_(), target[1]

    def objective(x, w, b, target):
        loss = UNBATCHED[case](x, w, b, target, reduction, impl)
        return (loss * torch.linspace(0.5, 2, loss.numel()).reshape(loss.shape)).sum()

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    expected = objective(x, w, b, target)
    got = compiled(x, w, b, target)
    assert_close(got, to_numpy(expected), 1e-6, "loss")
    got_grads, expected_grads = torch.autograd.grad(got, [x, w, b]), torch.autograd.grad(expected, [x, w, b])
    for name, mine, theirs in zip(["dX", "dW", "db"], got_grads, expected_grads, strict=True):
        assert mine.shape == theirs.shape, name
        assert_close(mine, to_numpy(theirs), 1e-6, name)


def test_inductor_compiles_the_linear_head(rng):
    x, w, b, target, upstream = _inputs(rng)
    objective = _objective("linear_cross_entropy", "mean", "torch")
    compiled = torch.compile(objective, fullgraph=True)
    got = compiled(x, w, b, target, upstream)
    expected = objective(x, w, b, target, upstream)
    assert_close(got, to_numpy(expected), 1e-6, "loss")
    for mine, theirs in zip(
        torch.autograd.grad(got, [x, w, b]), torch.autograd.grad(expected, [x, w, b]), strict=True
    ):
        assert_close(mine, to_numpy(theirs), 1e-6, "grad")


@pytest.mark.parametrize("shape", [(37, 203), (203,), (5, 203, 3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_return_lse_equals_eager(shape, reduction, impl, rng):
    """With return_lse the custom op also returns the (not differentiable) log-sum-exp, in one graph."""
    logits = (3 * torch.randn(shape, generator=rng)).requires_grad_()
    batch = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = torch.randint(0, 203, batch, generator=rng)

    def objective(logits, target):
        loss, lse = softxent.cross_entropy(
            logits, target, reduction=reduction, z_loss=1e-2, return_lse=True, impl=impl
        )
        return loss.sum(), lse

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    expected, expected_lse = objective(logits, target)
    got, got_lse = compiled(logits, target)
    assert not got_lse.requires_grad
    assert got_lse.shape == expected_lse.shape == batch
    assert_close(got_lse, to_numpy(expected_lse), 1e-6, "lse")
    assert_close(got, to_numpy(expected), 1e-6, "loss")
    mine, theirs = torch.autograd.grad(got, logits), torch.autograd.grad(expected, logits)
    assert_close(mine[0], to_numpy(theirs[0]), 1e-6, "dlogits")


def _options(**given) -> list[object]:
    """The custom ops' option arguments, in their order, with the defaults where not given."""
    return [given.get(name, _compile.DEFAULTS[name]) for name in _compile.OPTION_NAMES]


def test_custom_ops_pass_opcheck(rng):
    x, w, b, target, upstream = _inputs(rng)
    options = _options(reduction="sum", label_smoothing=0.1, impl="torch")
    args = (
        "linear_cross_entropy",
        x,
        w,
        b,
        target,
        None,
        None,
        None,
        [True, True, True, False, False],
        *options,
    )
    torch.library.opcheck(torch.ops.softxent.loss_lse_and_grads.default, args)
    lse_options = _options(reduction="mean", ignore_index=-100, return_lse=True, impl="torch")
    lse_args = ("cross_entropy", x @ w.T, target, *[None] * 5, [True, False, False], *lse_options)
    torch.library.opcheck(torch.ops.softxent.loss_lse_and_grads.default, lse_args)
    none_options = _options(reduction="none", ignore_index=-100, impl="torch")
    backward_args = ("cross_entropy", x @ w.T, target, *[None] * 5, [True, False, False])
    torch.library.opcheck(
        torch.ops.softxent.loss_backward.default,
        (*backward_args, *none_options, upstream),
        test_utils=("test_schema", "test_faketensor"),  # it is itself a backward: no gradient to check
    )


def test_llm_custom_ops_pass_opcheck(rng):
    """The per-token statistics' two custom ops and distillation through the loss ops."""
    x, w, b, target, _ = _inputs(rng)
    options = (0.8, 1.0, 3.0, -100, None, "speed", "torch")  # temperature, scale, softcap, ignore, ...
    torch.library.opcheck(
        torch.ops.softxent.token_stats.default, ("linear_log_probs", x, w, b, target, *options)
    )
    g, h = torch.randn(target.shape, generator=rng), torch.randn(target.shape, generator=rng)
    torch.library.opcheck(
        torch.ops.softxent.token_stats_backward.default,
        ("linear_log_probs", x, w, b, target, [True, True, True, False], *options, g, h),
        test_utils=("test_schema", "test_faketensor"),  # it is itself a backward: no gradient to check
    )
    teacher = torch.randn(x.shape, generator=rng)
    distill = _options(reduction="mean", ignore_index=-100, memory="auto", divergence="jsd", beta=0.3)
    torch.library.opcheck(
        torch.ops.softxent.loss_lse_and_grads.default,
        ("linear_distillation_loss", x, w, b, teacher, w.detach(), None, target,
         [True, True, True, False, False, False, False], *distill),
    )  # fmt: skip


def test_compiled_errors_are_the_eager_ones(rng):
    x, w, _, target, _ = _inputs(rng)
    compiled = torch.compile(lambda x, w, t: softxent.linear_cross_entropy(x, w, t), backend="aot_eager")
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 203\)"):
        compiled(x, w, torch.full_like(target, 500))


# the ops with the scalar arguments a schedule changes between steps (label smoothing, z-loss) and the
# ignore_index a data pipeline picks
SCALAR_CASES = {
    "cross_entropy": lambda x, w, b, t, a, impl: softxent.cross_entropy(
        torch.nn.functional.linear(x, w, b), t, ignore_index=a["ignore_index"],
        label_smoothing=a["label_smoothing"], z_loss=a["z_loss"], impl=impl,
    ),
    "linear_cross_entropy": lambda x, w, b, t, a, impl: softxent.linear_cross_entropy(
        x, w, t, linear_bias=b, ignore_index=a["ignore_index"], label_smoothing=a["label_smoothing"],
        z_loss=a["z_loss"], chunk_size=a["chunk_size"], impl=impl,
    ),
    "linear_cross_entropy_lean": lambda x, w, b, t, a, impl: softxent.linear_cross_entropy(
        x, w, t, linear_bias=b, ignore_index=a["ignore_index"], label_smoothing=a["label_smoothing"],
        z_loss=a["z_loss"], chunk_size=a["chunk_size"], memory="lean", impl=impl,
    ),
    "binary_cross_entropy_with_logits": lambda x, w, b, t, a, impl: (
        softxent.binary_cross_entropy_with_logits(
            torch.nn.functional.linear(x, w, b), (t.unsqueeze(1) == torch.arange(w.shape[0])).float(),
            impl=impl,
        )
    ),
    "linear_binary_cross_entropy": lambda x, w, b, t, a, impl: softxent.linear_binary_cross_entropy(
        x, w, (t.unsqueeze(1) == torch.arange(w.shape[0])).float(), linear_bias=b,
        chunk_size=a["chunk_size"], impl=impl,
    ),
    "linear_binary_cross_entropy_lean": lambda x, w, b, t, a, impl: softxent.linear_binary_cross_entropy(
        x, w, (t.unsqueeze(1) == torch.arange(w.shape[0])).float(), linear_bias=b,
        chunk_size=a["chunk_size"], memory="lean", impl=impl,
    ),
}  # fmt: skip

# (rows, arguments) of each call: new shapes and new scalar values, together and apart
CALLS = [
    (3, dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, chunk_size=2)),
    (5, dict(ignore_index=2, label_smoothing=0.1, z_loss=1e-3, chunk_size=2)),
    (9, dict(ignore_index=4, label_smoothing=0.2, z_loss=1e-2, chunk_size=3)),
    (9, dict(ignore_index=-1, label_smoothing=0.3, z_loss=0.0, chunk_size=3)),
]


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
@pytest.mark.parametrize("case", sorted(SCALAR_CASES))
def test_recompiles_for_new_shapes_and_scalar_arguments(case, dynamic, impl, rng):
    """``dynamic=True`` (every size and int symbolic from the start) and the default (marked dynamic once
    it changes): the op's options reach the custom op as typed arguments, never formatted at trace time,
    so a changed ignore_index (a SymInt), label_smoothing or z_loss compiles, and every call equals eager."""
    loss_fn = SCALAR_CASES[case]

    def objective(x, w, b, target, arguments):
        return 2.0 * loss_fn(x, w, b, target, arguments, impl)

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    w = (torch.randn(11, 6, generator=rng) / 2).requires_grad_()
    b = torch.randn(11, generator=rng, requires_grad=True)
    for rows, arguments in CALLS:
        x = torch.randn(rows, 6, generator=rng, requires_grad=True)
        target = torch.randint(0, 11, (rows,), generator=rng)
        target[0] = arguments["ignore_index"]
        if target[0] < 0 and "binary" in case:
            target[0] = 1
        expected = objective(x, w, b, target, arguments)
        got = compiled(x, w, b, target, arguments)
        what = f"{rows} rows, {arguments}"
        assert_close(got, to_numpy(expected), 1e-6, f"loss, {what}")
        mine = torch.autograd.grad(got, [x, w, b])
        theirs = torch.autograd.grad(expected, [x, w, b])
        for name, a, e in zip(["dX", "dW", "db"], mine, theirs, strict=True):
            assert_close(a, to_numpy(e), 1e-6, f"{name}, {what}")


def test_compiled_takes_torchs_spellings_of_arguments(rng):
    """A NumPy integer ignore_index and the deprecated "elementwise_mean" compile as they run eagerly."""
    logits = torch.randn(6, 5, generator=rng, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 1])
    for options in (dict(ignore_index=np.int64(1)), dict(reduction="elementwise_mean")):
        compiled = torch.compile(
            lambda z, t, o=options: softxent.cross_entropy(z, t, **o), backend="aot_eager", fullgraph=True
        )
        expected = torch.nn.functional.cross_entropy(logits, target, **options)
        assert_close(compiled(logits, target), to_numpy(expected), 1e-6, str(options))


def test_compiled_losses_are_not_views_under_dynamic_shapes(rng):
    """transformers' Trainer scales the loss in place (``loss *= ...``). After torch.compile recompiles for
    dynamic shapes, a custom op that returned a view made the compiled loss a view, and that in-place
    scaling raised "Output 0 of CompiledFunction is a view and is being modified inplace"."""
    weight = torch.randn(11, 4, generator=rng, requires_grad=True)

    def losses(x, y, n):
        linear = softxent.linear_cross_entropy(x.reshape(-1, 4), weight, y.reshape(-1), reduction="sum") / n
        per_token = softxent.linear_log_probs(x, weight, y)
        distill = softxent.linear_distillation_loss(x, weight, x.detach(), weight.detach(), reduction="none")
        return linear, per_token.log_probs.sum(), per_token.entropy, distill

    compiled = torch.compile(losses)
    for batch in (4, 3, 2, 5):  # the third call onwards runs the graph compiled with dynamic shapes
        x = torch.randn(batch, 5, 4, generator=rng, requires_grad=True)
        y = torch.randint(0, 11, (batch, 5), generator=rng)
        outputs = compiled(x, y, torch.tensor(3.0))
        for output in outputs:
            assert not output._is_view(), batch
        loss = outputs[0]
        loss *= 2.0  # as Trainer does
        (loss + outputs[1] + outputs[2].sum() + outputs[3].sum()).backward()
