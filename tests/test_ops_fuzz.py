"""A property-based fuzz of the ops' argument checks: whatever is passed, each op returns torch's result or
raises a ValueError / TypeError that names the argument ("name: expected ..., got ..."), never another
exception. The strategies mostly make well-formed calls with one thing wrong, so that the checks deep in
each op (shapes against each other, target ranges, dtypes, devices) are reached, not only the first."""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import softxent

FLOATS = [torch.float32, torch.float64, torch.bfloat16]
NAMED = re.compile(r"^[a-z_]+: ")  # a message that starts by naming the argument
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),  # more for a deeper search
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _tensor(draw, shape, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        scale = draw(st.sampled_from([1.0, 1e4]))
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    return torch.randint(-2, 7, shape, generator=generator, dtype=dtype)


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
junk = st.one_of(st.none(), st.floats(), st.integers(-3, 3), st.text(max_size=2), st.just([[1.0, 2.0]]))


def mostly(good, bad):
    """``bad`` about one time in ten (a middle value of a uniform draw: hypothesis favours the ends of a
    range), ``good`` otherwise: most calls have at most one thing wrong, so the checks deep in each op are
    reached."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 5 else good)


@st.composite
def logits_and_target(draw):
    """(input, target): (N, C[, d]) logits with class indices or probabilities, each part sometimes wrong."""
    n, c = draw(st.integers(0, 4)), draw(st.integers(0, 5))
    shape = draw(mostly(st.sampled_from([(n, c), (n, c, 2), (c,)]), shapes))
    input = _tensor(draw, shape, draw(mostly(st.sampled_from(FLOATS), st.just(torch.int64))))
    batch = (shape[0], *shape[2:]) if len(shape) >= 2 else ()
    classes = shape[1] if len(shape) >= 2 else shape[0] if shape else 1
    kind = draw(
        mostly(st.sampled_from(["indices", "probabilities"]), st.sampled_from(["other shape", "junk"]))
    )
    if kind == "indices":
        target = torch.randint(0, max(classes, 1), batch)
        target = target.to(draw(mostly(st.just(torch.int64), st.sampled_from([torch.int32, torch.bool]))))
        if target.numel() and draw(st.booleans()):
            target.view(-1)[0] = draw(mostly(st.just(-100), st.sampled_from([-1, classes, 10**6])))
    elif kind == "probabilities":
        class_dim = 1 if len(shape) >= 2 else -1
        target = torch.softmax(_tensor(draw, shape, torch.float64), class_dim).to(
            draw(st.sampled_from(FLOATS))
        )
    elif kind == "other shape":
        target = _tensor(draw, draw(shapes), draw(st.sampled_from([torch.int64, torch.float32])))
    else:
        target = draw(junk)
    return draw(mostly(st.just(input), junk)), target


def _outcome(call, reference=None) -> None:
    """Run ``call``: a ValueError/TypeError must name its argument; any other exception fails the test.
    Where both ``call`` and ``reference`` (torch, in float64) return, they agree (nan where torch's is)."""
    message = None
    try:
        ours = call()
    except (ValueError, TypeError) as error:
        message = str(error)
    if message is not None:
        event("refused")
        assert NAMED.match(message), f"the message does not name the argument: {message}"
        return
    event("computed")
    if reference is None:
        return
    try:
        theirs = reference()
    except Exception:  # torch refuses what softxent extends or checks later: nothing to compare
        return
    ours = ours[0] if isinstance(ours, tuple) else ours
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=2e-2, atol=2e-2, equal_nan=True)


def _double(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


@FUZZ
@given(
    data=logits_and_target(),
    weight=mostly(st.none(), st.one_of(st.integers(0, 6).map(lambda c: torch.rand(c) + 0.1), junk)),
    reduction=mostly(st.sampled_from(["mean", "sum", "none"]), st.sampled_from(["avg", None])),
    label_smoothing=mostly(st.sampled_from([0.0, 0.1, 1.0]), st.one_of(st.floats(), st.just("a"))),
    ignore_index=mostly(st.sampled_from([-100, 0, 3]), st.just(1.5)),
    z_loss=mostly(st.sampled_from([0.0, 0.01]), st.floats()),
    softcap=mostly(st.sampled_from([None, 5.0]), st.floats()),
    impl=mostly(st.sampled_from(["auto", "torch"]), st.just("cuda")),
    inplace_backward=mostly(st.sampled_from([False, True]), st.just(1)),
)
def test_cross_entropy_arguments(
    data, weight, reduction, label_smoothing, ignore_index, z_loss, softcap, impl, inplace_backward
):
    input, target = data
    kwargs = dict(
        weight=weight, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    # with no classes torch's label smoothing divides by C = 0 (nan, even for no rows); softxent's sums are
    # empty there (0), so such calls are only checked for their errors
    no_classes = (
        isinstance(input, torch.Tensor) and input.dim() and input.shape[1 if input.dim() > 1 else 0] == 0
    )
    comparable = z_loss == 0.0 and softcap is None and isinstance(input, torch.Tensor) and not no_classes
    _outcome(
        lambda: softxent.cross_entropy(
            input,
            target,
            z_loss=z_loss,
            softcap=softcap,
            impl=impl,
            inplace_backward=inplace_backward,
            **kwargs,
        ),
        (lambda: F.cross_entropy(_double(input), _double(target), **{**kwargs, "weight": _double(weight)}))
        if comparable
        else None,
    )


@FUZZ
@given(
    shape=shapes,
    target_shape=mostly(st.none(), shapes),
    dtype=mostly(st.sampled_from(FLOATS), st.just(torch.int64)),
    weight_shape=mostly(st.sampled_from([None, (1,), ()]), shapes),
    pos_weight_shape=mostly(st.none(), shapes),
    reduction=mostly(st.sampled_from(["mean", "sum", "none"]), st.just("avg")),
    seed=st.integers(0, 2**31 - 1),
)
def test_binary_cross_entropy_arguments(
    shape, target_shape, dtype, weight_shape, pos_weight_shape, reduction, seed
):
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(shape, generator=generator).to(dtype)
    target = torch.rand(shape if target_shape is None else target_shape, generator=generator)
    weight = None if weight_shape is None else torch.rand(weight_shape, generator=generator)
    pos_weight = None if pos_weight_shape is None else torch.rand(pos_weight_shape, generator=generator) * 3
    _outcome(
        lambda: softxent.binary_cross_entropy_with_logits(
            input, target, weight, reduction=reduction, pos_weight=pos_weight
        ),
        lambda: F.binary_cross_entropy_with_logits(
            input.double(),
            target.double(),
            _double(weight),
            reduction=reduction,
            pos_weight=_double(pos_weight),
        ),
    )


@FUZZ
@given(
    n=st.integers(0, 4),
    d=st.integers(0, 3),
    c=st.integers(0, 5),
    weight_shape=mostly(st.none(), shapes),
    bias_shape=mostly(st.sampled_from([None, "C"]), shapes),
    target_kind=mostly(st.sampled_from(["indices", "probabilities"]), st.just("junk")),
    dtypes=mostly(
        st.sampled_from(FLOATS).map(lambda t: (t, t)),
        st.tuples(st.sampled_from(FLOATS), st.just(torch.int64)),
    ),
    reduction=mostly(st.sampled_from(["mean", "sum", "none"]), st.just("avg")),
    memory=mostly(st.sampled_from(["speed", "lean", "auto"]), st.just("fast")),
    chunk_size=mostly(st.sampled_from([None, 1, 3]), st.sampled_from([-1, 0, 2.5])),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_heads_arguments(
    n, d, c, weight_shape, bias_shape, target_kind, dtypes, reduction, memory, chunk_size, seed
):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator).to(dtypes[0])
    w = torch.randn(weight_shape if weight_shape is not None else (c, d), generator=generator).to(dtypes[1])
    if bias_shape == "C":
        bias_shape = w.shape[:1]
    b = None if bias_shape is None else torch.randn(bias_shape, generator=generator).to(dtypes[0])
    if target_kind == "indices":
        target = torch.randint(-1, c + 1, (n,), generator=generator)
    elif target_kind == "probabilities":
        target = torch.rand(n, c, generator=generator)
    else:
        target = [0, 1]
    options = dict(linear_bias=b, reduction=reduction, memory=memory, chunk_size=chunk_size)
    _outcome(lambda: softxent.linear_cross_entropy(x, w, target, **options))
    _outcome(lambda: softxent.linear_binary_cross_entropy(x, w, target, **options))


def test_the_fuzz_acceptance_rule():
    """A named message passes, torch's unnamed kind does not."""
    assert NAMED.match("label_smoothing: expected a float in [0, 1], got nan")
    assert not NAMED.match("Expected input batch_size (8) to match target batch_size (4).")
