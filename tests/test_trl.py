"""softxent inside TRL: softxent.integrations.trl.enable() routes TRL's own fused LM head
(trl.trainer.utils.add_fused_lm_head, what its SFT, DPO, KTO, GRPO and RLOO trainers install) and its
distillation loss through softxent's ops. Each test runs TRL's code as a trainer does, with TRL's kernels
and then with softxent's, and compares every output and gradient; nothing of softxent is replaced."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from trl.trainer import distillation_trainer  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402

import softxent.integrations.trl as sx_trl  # noqa: E402

VOCAB = 211


def _llama(seed: int, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **config,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).float()


@pytest.fixture
def restored():
    """Every test starts from TRL's own kernels and leaves TRL as it found it."""
    sx_trl.disable()
    yield
    sx_trl.disable()


def _fused_step(model, input_ids, labels, outputs):
    model.zero_grad()
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    loss = out.loss - 0.01 * (out.entropy * out.label_mask).sum() / out.label_mask.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.usefixtures("restored")
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_lm_head_matches_trl_kernel(softcap, rng):
    """TRL's fused forward (its masking, compaction and loss) with every optional output, a temperature,
    a softcap and prompt/padding positions (-100): the loss, the five per-token outputs and every
    parameter's gradient equal what TRL's own kernel gives."""
    model = _llama(0, final_logit_softcapping=softcap) if softcap else _llama(0)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=outputs)
    model.train()
    input_ids = torch.randint(3, VOCAB, (3, 17), generator=rng)
    labels = input_ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, 12:] = -100  # padding
    theirs, their_grads = _fused_step(model, input_ids, labels, outputs)
    sx_trl.enable()
    assert trl_utils._ChunkedLogProbFunction is sx_trl.LogProbFunction
    ours, our_grads = _fused_step(model, input_ids, labels, outputs)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    for name in outputs:
        mine, expected = getattr(ours, name), getattr(theirs, name)
        assert mine.shape == expected.shape, name
        if name == "is_top1":
            assert torch.equal(mine, expected)
        else:
            torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5, msg=name)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.usefixtures("restored")
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_loss_matches_trl_kernel(beta, rng):
    """TRL's DistillationTrainer loss function on a student and a teacher of another width: the loss, the
    entropy it logs and the student's gradients equal TRL's."""
    torch.manual_seed(1)
    student_h = torch.randn(2, 9, 16, generator=rng, requires_grad=True)
    student_w = (torch.randn(VOCAB, 16, generator=rng) / 4).requires_grad_()
    teacher_h, teacher_w = torch.randn(2, 9, 24, generator=rng), torch.randn(VOCAB, 24, generator=rng) / 5
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0

    def run():
        student_h.grad = student_w.grad = None
        loss, entropy, count = distillation_trainer._chunked_divergence_loss(
            student_h, teacher_h, student_w, teacher_w, mask, beta, temperature=0.8, teacher_logit_scale=1.3
        )
        loss.backward()
        return loss.detach(), entropy.detach(), count, student_h.grad.clone(), student_w.grad.clone()

    theirs = run()
    sx_trl.enable()
    ours = run()
    for name, mine, expected in zip(("loss", "entropy", "count", "dh", "dW"), ours, theirs, strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("logit_scale", [1.0, 0.5])
def test_label_smoothed_head_matches_the_logits_loss(logit_scale, rng):
    """With an SFT trainer's label smoothing registered for a head (enable(trainer) does it), "log_probs" is
    the negated label-smoothed cross-entropy per token, bias and logit scale included, with its gradients;
    the entropy is the plain one."""
    hidden = torch.randn(13, 24, generator=rng, dtype=torch.float64).requires_grad_()
    weight = torch.randn(37, 24, generator=rng, dtype=torch.float64).requires_grad_()
    bias = torch.randn(37, generator=rng, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 37, (13,), generator=rng)
    sx_trl._smooth_labels(weight, 0.1)
    try:
        log_probs, entropy, *_ = sx_trl.LogProbFunction.apply(
            hidden, weight, bias, targets, 1.0, 4096, None, logit_scale, ("log_probs", "entropy")
        )
    finally:
        sx_trl._smooth_labels(weight, 0.0)
    logits = logit_scale * (hidden @ weight.T + bias)
    expected = -torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(log_probs, expected)
    probs = logits.softmax(-1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1))
    ours = torch.autograd.grad(log_probs.sum(), [hidden, weight, bias])
    theirs = torch.autograd.grad(expected.sum(), [hidden, weight, bias])
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference)


@pytest.mark.usefixtures("restored")
def test_enable_is_reversible_and_checks_the_version(monkeypatch):
    own = trl_utils._ChunkedLogProbFunction, distillation_trainer.ChunkedDivergenceFunction
    sx_trl.enable()
    sx_trl.enable()  # twice: still one saved original
    assert sx_trl.enabled()
    sx_trl.disable()
    assert not sx_trl.enabled()
    assert (trl_utils._ChunkedLogProbFunction, distillation_trainer.ChunkedDivergenceFunction) == own
    # the version check reads trl.__version__: a release whose private hooks are unknown is refused
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match=r"trl: expected one of the versions 1\.16\.x .*got 1\.17\.0"):
        sx_trl.enable()
    assert not sx_trl.enabled()


def _word_tokenizer():
    """Token ids written as words ("17 5 203"): a tokenizer for TRL's text datasets without a download."""
    tokenizers = pytest.importorskip("tokenizers")
    words = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({str(t): t for t in range(VOCAB)}, unk_token="0")
    )
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="0", eos_token="2")


def _logged(trainer) -> list[dict[str, float]]:
    """The numbers a trainer logged each step (its wall-clock step_time left out)."""
    return [
        {key: value for key, value in entry.items() if isinstance(value, float) and key != "step_time"}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]


def _assert_same_logs(ours, theirs, differences: Callable[[dict[str, float]], float] | None = None) -> None:
    """Every logged number within 1e-4 relative. ``differences`` gives, for a step's log, the magnitude of
    the terms that numbers like DPO's rewards β·(log p_policy − log p_ref) are differences of: those keys
    (``rewards/``) are held to 1e-4 of it, since a difference of nearly equal sums keeps only their
    absolute error."""
    assert len(ours) == len(theirs) >= 2
    for step, (mine, expected) in enumerate(zip(ours, theirs, strict=True)):
        assert mine.keys() == expected.keys()
        for key, value in expected.items():
            slack = 1e-4 * differences(expected) if differences and key.startswith("rewards/") else 1e-7
            assert mine[key] == pytest.approx(value, rel=1e-4, abs=slack), f"step {step + 1}: {key}"


@pytest.mark.usefixtures("restored")
def test_dpo_trainer_logs_trl_numbers(rng, tmp_path):
    """Two real DPOTrainer steps (policy and reference model through the fused head, float32): every
    number it logs (loss, grad_norm, rewards, log-probs, entropy, ...) equals TRL's own kernel's."""
    datasets = pytest.importorskip("datasets")

    def words(n: int) -> str:
        return " ".join(str(int(t)) for t in torch.randint(3, VOCAB, (n,), generator=rng))

    rows = [{"prompt": words(5), "chosen": words(4), "rejected": words(6)} for _ in range(8)]
    tokenizer = _word_tokenizer()

    def train(patched: bool) -> list[dict[str, float]]:
        model = _llama(2)
        args = trl.DPOConfig(
            output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, logging_steps=1,
            per_device_train_batch_size=4, save_strategy="no", bf16=False, learning_rate=1e-3, seed=3,
        )  # fmt: skip
        trainer = trl.DPOTrainer(
            model=model, ref_model=copy.deepcopy(model), args=args,
            train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
        )  # fmt: skip
        if patched:
            sx_trl.enable()
        trainer.train()
        sx_trl.disable()
        return _logged(trainer)

    theirs = train(False)
    beta = next(f.default for f in dataclasses.fields(trl.DPOConfig) if f.name == "beta")
    _assert_same_logs(
        train(True), theirs, lambda log: beta * max(abs(log["logps/chosen"]), abs(log["logps/rejected"]))
    )


@pytest.mark.usefixtures("restored")
def test_grpo_trainer_logs_trl_numbers(rng, tmp_path):
    """Two real GRPOTrainer steps in float32 with a reference model (beta > 0), two iterations a
    generation batch and a high-entropy token mask (top_entropy_quantile): every number it logs (loss,
    grad_norm, kl, entropy, rewards, clip ratios, ...) equals TRL's own kernel's. Sampling draws the same
    completions in both runs: softxent's ops draw no random numbers."""
    datasets = pytest.importorskip("datasets")

    def words(n: int) -> str:
        return " ".join(str(int(t)) for t in torch.randint(3, VOCAB, (n,), generator=rng))

    rows = [{"prompt": words(5)} for _ in range(8)]
    path = tmp_path / "policy"  # GRPO loads its reference model from the policy's path
    _llama(2).save_pretrained(path)

    def reward(completions, **_):
        return [0.01 * len(completion) + 0.1 * completion.count("7") for completion in completions]

    def train(patched: bool) -> list[dict[str, float]]:
        args = trl.GRPOConfig(
            output_dir=str(tmp_path / "out"), max_steps=2, report_to=[], use_cpu=True, logging_steps=1,
            per_device_train_batch_size=4, num_generations=4, max_completion_length=8, save_strategy="no",
            bf16=False, learning_rate=1e-3, seed=3, beta=0.04, num_iterations=2, top_entropy_quantile=0.5,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=str(path), reward_funcs=reward, args=args, train_dataset=datasets.Dataset.from_list(rows),
            processing_class=_word_tokenizer(),
        )  # fmt: skip
        if patched:
            sx_trl.enable()
        trainer.train()
        sx_trl.disable()
        return _logged(trainer)

    theirs = train(False)
    _assert_same_logs(train(True), theirs)


def test_trl_benchmark_smoke_run(tmp_path):
    """benchmarks/bench_trl.py end to end at a tiny shape: for every step (log-probs, GRPO, DPO,
    distillation) every variant computes the same loss."""
    output = tmp_path / "bench_trl.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trl.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--repeats", "1", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {(row["step"], row["variant"]): row for row in json.loads(output.read_text())["rows"]}
    steps = ("logprobs", "grpo", "dpo", "distill")
    assert rows.keys() == {(step, variant) for step in steps for variant in ("logits", "trl", "softxent")}
    for (step, _), row in rows.items():
        expected = rows[(step, "logits")]["loss"]
        assert abs(row["loss"] - expected) <= 1e-5 * abs(expected), (step, row)
