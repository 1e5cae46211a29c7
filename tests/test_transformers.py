"""softxent.integrations.transformers: patched causal LMs give the unpatched model's loss and gradients.

Tiny randomly initialized models (no downloads) of every supported family; each test computes the loss
and every parameter's gradient with the unpatched forward (logits, then transformers' ForCausalLMLoss),
patches the same model and computes them again with softxent's fused head: eager and compiled, in
training (fused, no logits) and evaluation (the logits, as unpatched), under Trainer, and with PEFT LoRA.
"""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_close, to_numpy

transformers = pytest.importorskip("transformers")

from softxent.integrations import transformers as sx  # noqa: E402

VOCAB = 317  # odd, not a multiple of any chunk or block size
BATCH, SEQ = 3, 11
TOL = 2e-5  # float32: |patched − unpatched| <= TOL·(1 + |unpatched|); measured differences are below 1e-6

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_MOE = dict(output_router_logits=True, router_aux_loss_coef=0.05)  # the auxiliary loss joins the loss
_MROPE = dict(rope_type="default", mrope_section=[2, 2, 2])

CONFIGS: dict[str, Callable[[], object]] = {
    "cohere": lambda: transformers.CohereConfig(**_DECODER, logit_scale=0.5),
    "falcon_h1": lambda: transformers.FalconH1Config(
        **_DECODER,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_d_conv=4,
        lm_head_multiplier=0.37,  # the forward multiplies the logits by it
    ),
    "gemma": lambda: transformers.GemmaConfig(**_DECODER),
    "gemma2": lambda: transformers.Gemma2Config(**_DECODER, final_logit_softcapping=3.0),
    "gemma3": lambda: transformers.Gemma3Config(
        text_config=_DECODER,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_DECODER, final_logit_softcapping=2.5),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "granite": lambda: transformers.GraniteConfig(**_DECODER, logits_scaling=4.0),
    "llama": lambda: transformers.LlamaConfig(**_DECODER),
    "mistral": lambda: transformers.MistralConfig(**_DECODER),
    "mixtral": lambda: transformers.MixtralConfig(
        **_DECODER, num_local_experts=4, num_experts_per_tok=2, **_MOE
    ),
    "olmo2": lambda: transformers.Olmo2Config(**_DECODER),
    "opt": lambda: transformers.OPTConfig(  # the forward makes the logits .contiguous()
        vocab_size=VOCAB,
        hidden_size=48,
        ffn_dim=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "phi3": lambda: transformers.Phi3Config(**_DECODER),
    "qwen2": lambda: transformers.Qwen2Config(**_DECODER),
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLConfig(
        text_config=dict(**_DECODER, rope_parameters=_MROPE),
        vision_config=dict(depth=1, hidden_size=32, out_hidden_size=48, num_heads=2, intermediate_size=40),
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=40,
        shared_expert_intermediate_size=40,
        **_MOE,
    ),
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        text_config=dict(**_DECODER, rope_parameters=_MROPE),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2),
    ),
    "qwen3": lambda: transformers.Qwen3Config(**_DECODER),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, **_MOE
    ),
}
MULTIMODAL = ("gemma3", "qwen2_5_vl", "qwen2_vl")  # *ForConditionalGeneration: text-only batches here
MULTIMODAL_CLASSES = (
    transformers.Gemma3ForConditionalGeneration,
    transformers.Qwen2_5_VLForConditionalGeneration,
    transformers.Qwen2VLForConditionalGeneration,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread (hand-offs between threads cost more than these matmuls, and on a
    busy 2-core machine they stall backward for seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(model_type: str, rng: torch.Generator) -> torch.nn.Module:
    """A tiny randomly initialized causal LM (seeded from ``rng``) in training mode, without dropout."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    auto = (
        transformers.AutoModelForImageTextToText
        if model_type in MULTIMODAL
        else transformers.AutoModelForCausalLM
    )
    return auto.from_config(CONFIGS[model_type]()).train()


def make_batch(rng: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids, an attention mask with right padding (row 1) and left padding (row 2), and labels that are
    the ids with -100 at the padding and at a few random positions."""
    input_ids = torch.randint(3, VOCAB - 3, (BATCH, SEQ), generator=rng)  # no image tokens (the last 3)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -4:] = 0
    attention_mask[2, :3] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[torch.rand(BATCH, SEQ, generator=rng) < 0.2] = -100
    labels[0, 5] = input_ids[0, 5]  # at least one counted position in row 0 whatever the draw
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(
    model: torch.nn.Module, forward: Callable[..., object] | None = None, **inputs: object
) -> tuple[object, dict[str, torch.Tensor]]:
    """The output of ``forward`` (default: the model) for ``inputs`` and every parameter's gradient of its
    loss."""
    model.zero_grad(set_to_none=True)
    output = (model if forward is None else forward)(**inputs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def assert_same_loss_and_grads(
    model: torch.nn.Module, tol: float = TOL, **inputs: object
) -> tuple[float, float]:
    """Unpatched, then patched with ``apply``: equal loss and gradients; ``logits`` is None when patched.
    Returns the largest differences (loss, gradients)."""
    expected, expected_grads = loss_and_grads(model, **inputs)
    head_outputs: list[torch.Size] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_outputs.append(output.shape)
    )
    sx.apply(model)
    try:
        patched, grads = loss_and_grads(model, **inputs)
    finally:
        sx.revert(model)
        hook.remove()
    assert len(head_outputs) == 1
    assert head_outputs[0][-2] == 0  # lm_head formed no logits (those of an empty sequence)
    assert patched.logits is None
    assert expected.logits is not None
    assert_close(patched.loss, to_numpy(expected.loss), tol, "loss")
    assert grads.keys() == expected_grads.keys()
    if not isinstance(model, MULTIMODAL_CLASSES):  # text-only batches leave the vision tower without one
        assert len(grads) == sum(1 for _ in model.parameters())  # every parameter gets a gradient
    for name, grad in grads.items():
        assert_close(grad, to_numpy(expected_grads[name]), tol, f"grad of {name}")
    grad_diff = max((grads[name] - expected_grads[name]).abs().max().item() for name in grads)
    return (patched.loss - expected.loss).abs().item(), grad_diff


def test_every_supported_family_is_tested() -> None:
    assert set(CONFIGS) == set(sx.SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("normalizer", ["mean", "num_items_in_batch", "int_num_items", "shift_labels"])
def test_loss_and_grads_match_unpatched(model_type: str, normalizer: str, rng: torch.Generator) -> None:
    model = make_model(model_type, rng)
    batch = make_batch(rng)
    counted = int((batch["labels"][:, 1:] != -100).sum())
    if normalizer == "num_items_in_batch":
        # Trainer's gradient accumulation: the count over all micro-batches of the step (here 2.5x this one's)
        batch["num_items_in_batch"] = torch.tensor(counted * 5 // 2)
    elif normalizer == "int_num_items":
        batch["num_items_in_batch"] = counted + 7
    elif normalizer == "shift_labels":
        # Already shifted labels (context parallelism passes them): each row's last position counts too.
        batch["shift_labels"] = torch.randint(0, VOCAB, (BATCH, SEQ), generator=rng).masked_fill(
            batch["attention_mask"] == 0, -100
        )
    loss_diff, grad_diff = assert_same_loss_and_grads(model, **batch)
    print(f"{model_type} {normalizer}: max |Δloss| {loss_diff:.2e}, max |Δgrad| {grad_diff:.2e}")


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_backends_and_memory_modes(memory: str, impl: str, rng: torch.Generator) -> None:
    model = make_model("gemma2", rng)  # with its final-logit softcap
    batch = make_batch(rng)
    expected, expected_grads = loss_and_grads(model, **batch)
    # Several chunks: 16 rows each (speed) or vocabulary slices of 128 classes (lean).
    sx.apply(model, impl=impl, memory=memory, chunk_size={"speed": 16, "lean": 128}[memory])
    patched, grads = loss_and_grads(model, **batch)
    assert_close(patched.loss, to_numpy(expected.loss), TOL, "loss")
    for name, grad in grads.items():
        assert_close(grad, to_numpy(expected_grads[name]), TOL, f"grad of {name}")


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_no_labels_returns_the_logits_and_generates_the_same(model_type: str, rng: torch.Generator) -> None:
    model = make_model(model_type, rng).eval()
    batch = make_batch(rng)
    del batch["labels"]
    with torch.no_grad():
        expected = model(**batch).logits
        prompt = batch["input_ids"][:1, :4]
        expected_tokens = model.generate(prompt, max_new_tokens=4, do_sample=False)
        sx.apply(model)
        logits = model(**batch).logits
        tokens = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert logits.shape == (BATCH, SEQ, VOCAB)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=0)


def test_logits_to_keep(rng: torch.Generator) -> None:
    """With ``logits_to_keep=k`` the loss covers the last k positions, whose labels are (batch, k)."""
    model = make_model("qwen3", rng)
    batch = make_batch(rng)
    batch["labels"] = batch["labels"][:, -6:]
    assert_same_loss_and_grads(model, logits_to_keep=6, **batch)


def test_return_dict_false_gives_a_tuple_led_by_the_loss(rng: torch.Generator) -> None:
    model = make_model("mistral", rng)
    batch = make_batch(rng)
    expected = model(**batch, use_cache=False, return_dict=False)
    sx.apply(model)
    output = model(**batch, use_cache=False, return_dict=False)
    assert isinstance(output, tuple)
    assert len(output) == 1  # the logits are left out, as to_tuple() leaves out every None
    assert_close(output[0], to_numpy(expected[0]), TOL, "loss")


def test_autocast_bfloat16_matches_within_bfloat16_rounding(rng: torch.Generator) -> None:
    model = make_model("llama", rng)
    batch = make_batch(rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**batch).loss
        sx.apply(model)
        loss = model(**batch).loss
    loss.backward()
    assert loss.dtype == torch.float32
    assert model.lm_head.weight.grad is not None
    assert_close(loss, to_numpy(expected), 2e-2, "loss under bfloat16 autocast")


def test_patch_causal_lm_patches_the_class_until_removed(rng: torch.Generator) -> None:
    original = transformers.LlamaForCausalLM.forward
    model = make_model("llama", rng)  # made before the patch: patched too
    batch = make_batch(rng)
    with sx.patch_causal_lm(transformers.LlamaForCausalLM, memory="lean") as patch:
        assert transformers.LlamaForCausalLM.forward is not original
        assert "labels" in inspect.signature(model.forward).parameters  # what Trainer inspects
        patched, grads = loss_and_grads(model, **batch)
    assert transformers.LlamaForCausalLM.forward is original
    patch.remove()  # a second removal is a no-op
    expected, expected_grads = loss_and_grads(model, **batch)
    assert patched.logits is None
    assert expected.logits is not None
    assert_close(patched.loss, to_numpy(expected.loss), TOL, "loss")
    for name, grad in grads.items():
        assert_close(grad, to_numpy(expected_grads[name]), TOL, f"grad of {name}")


def _training_data(rng: torch.Generator, rows: int) -> list[dict[str, torch.Tensor]]:
    """Rows of random lengths (right padding, labels -100 there) drawn from a few repeated sequences, so a
    few steps of training lower the loss."""
    motifs = torch.randint(3, VOCAB, (4, SEQ), generator=rng)
    data = []
    for i in range(rows):
        length = int(torch.randint(5, SEQ + 1, (1,), generator=rng))
        input_ids = motifs[i % 4].clone()
        attention_mask = (torch.arange(SEQ) < length).long()
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        data.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return data


@pytest.mark.parametrize(
    ("compiled", "label_smoothing"),
    [(False, 0.0), pytest.param(True, 0.0, marks=pytest.mark.slow), (False, 0.1)],
    ids=["eager", "compiled", "label_smoothing"],
)
def test_trainer_run_matches_unpatched(
    compiled: bool, label_smoothing: float, rng: torch.Generator, tmp_path: Path
) -> None:
    """A short Trainer run with gradient accumulation (so num_items_in_batch reaches the loss), patched by
    ``enable(trainer)``: it logs the unpatched run's losses, ends with its weights, evaluates to the same loss
    and predicts the same logits (evaluation runs unfused, so compute_metrics gets them), and its loss goes
    down; with ``torch_compile=True`` too (the fused loss is softxent's custom op in the compiled graph),
    and with ``label_smoothing_factor`` (Trainer's LabelSmoother on the full logits, unpatched; the fused
    loss with label smoothing, patched)."""
    data = _training_data(rng, rows=16)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))

    def train(patched: bool) -> tuple[list[float], dict[str, torch.Tensor], np.ndarray]:
        model = make_model("qwen2", torch.Generator().manual_seed(seed))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / ("patched" if patched else "unpatched")),
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=4,
            optim="sgd",  # Adam would magnify rounding in near-zero gradients
            learning_rate=0.5,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            torch_compile=compiled,
            label_smoothing_factor=label_smoothing,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        if patched:
            assert sx.enable(trainer) is trainer
            assert trainer.label_smoother is None  # the model computes the smoothed loss, fused
        assert trainer.model_accepts_loss_kwargs  # the patched forward keeps the signature Trainer inspects
        trainer.train()
        # a training-mode forward with labels: the fused loss, without logits, where patched
        batch = {key: torch.stack([row[key] for row in data[:2]]) for key in data[0]}
        model.train()
        assert (model(**batch).logits is None) == patched
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        losses.append(trainer.evaluate(data[:8])["eval_loss"])
        predictions = trainer.predict(data[:8]).predictions
        return losses, {name: p.detach().clone() for name, p in model.named_parameters()}, predictions

    # the run itself as a user runs it: nothing of softxent is wrapped or replaced (a counting wrapper once
    # changed what torch.compile traced and hid the crash every compiled user hit)
    expected_losses, expected_weights, expected_predictions = train(patched=False)
    losses, weights, predictions = train(patched=True)
    assert len(losses) == 5
    assert_close(torch.tensor(losses), to_numpy(torch.tensor(expected_losses)), 1e-4, "logged losses")
    assert losses[3] < losses[0]
    for name, weight in weights.items():
        assert_close(weight, to_numpy(expected_weights[name]), 1e-4, f"trained {name}")
    assert predictions.shape == (8, SEQ, VOCAB)
    assert_close(predictions, expected_predictions.astype(np.float64), 1e-4, "predicted logits")


class _Contiguous(transformers.LlamaForCausalLM):
    """A head output converted before the loss (``.float()``): refused, naming the statement."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden_states).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


class _ShiftedLogits(transformers.LlamaForCausalLM):
    """A forward that adds to the logits before the loss: the fused loss cannot be proven equal."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden_states)
        logits = logits + 1.0
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_patched_model_copies_and_pickles_patched(how: str, rng: torch.Generator, tmp_path: Path) -> None:
    """copy.deepcopy (TRL's reference models) and torch.save of the whole model (pickle) keep the patch:
    the copy's loss forms no logits and equals the original's, and revert works on it."""
    model = make_model("llama", rng)
    batch = make_batch(rng)
    sx.apply(model)
    expected, expected_grads = loss_and_grads(model, **batch)
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        copied = torch.load(tmp_path / "model.pt", weights_only=False)
    head_outputs: list[torch.Size] = []
    copied.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_outputs.append(output.shape)
    )
    got, grads = loss_and_grads(copied, **batch)
    assert head_outputs == [head_outputs[0]]
    assert head_outputs[0][-2] == 0
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0)
    sx.revert(copied)
    assert copied(**batch).logits is not None


def test_errors_name_the_argument(rng: torch.Generator) -> None:
    with pytest.raises(
        TypeError, match=r"model: expected a transformers PreTrainedModel causal LM .* got Linear"
    ):
        sx.apply(torch.nn.Linear(3, 4))
    shifted = _ShiftedLogits(transformers.LlamaConfig(**_DECODER))
    with pytest.raises(
        ValueError,
        match=r"model: cannot prove that the fused loss equals _ShiftedLogits's: between self.lm_head and "
        r"self.loss_function it does `logits = logits \+ 1.0`",
    ):
        sx.apply(shifted)
    with pytest.raises(TypeError, match=r"model_class: expected a subclass of .* got 'LlamaForCausalLM'"):
        sx.patch_causal_lm("LlamaForCausalLM")
    with pytest.raises(
        TypeError, match=r"model_class: expected a forward\(\.\.\., labels=None, .* got LlamaModel"
    ):
        sx.patch_causal_lm(transformers.LlamaModel)

    class NoKwargs(transformers.LlamaForCausalLM):
        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> object:
            return super().forward(input_ids=input_ids, labels=labels)

    with pytest.raises(
        TypeError, match=r"model_class: expected a forward\(\.\.\., labels=None, \.\.\., \*\*kwargs\)"
    ):
        sx.patch_causal_lm(NoKwargs)
    model = make_model("llama", rng)
    with pytest.raises(ValueError, match=r"memory: expected one of \('speed', 'lean', 'auto'\), got 'fast'"):
        sx.apply(model, memory="fast")
    with pytest.raises(ValueError, match=r"label_smoothing: expected a float in \[0, 1\], got 1.5"):
        sx.apply(model, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"z_loss: expected a finite float >= 0, got -0.1"):
        sx.apply(model, z_loss=-0.1)
    opt_like = _Contiguous(transformers.LlamaConfig(**_DECODER))
    with pytest.raises(ValueError, match=r"it does `logits = self.lm_head\(hidden_states\).float\(\)`"):
        sx.apply(opt_like)
    with pytest.raises(ValueError, match=r"impl: expected one of .* got 'cuda'"):
        sx.apply(model, impl="cuda")
    with pytest.raises(ValueError, match=r"fuse: expected one of \('training', 'always'\), got 'eval'"):
        sx.apply(model, fuse="eval")
    with pytest.raises(ValueError, match=r"chunk_size: expected None or a positive int, got 0"):
        sx.patch_causal_lm(transformers.LlamaForCausalLM, chunk_size=0)
    with pytest.raises(ValueError, match=r"model: expected a model patched by apply\(\), got an unpatched"):
        sx.revert(model)
    sx.apply(model)
    # a loss_function set after the patch wins: it gets the real logits (the fused loss steps aside)
    model.loss_function = lambda logits, labels, **kwargs: logits.sum()
    output = model(**make_batch(rng))
    assert output.logits.shape == (BATCH, SEQ, VOCAB)
    assert_close(output.loss, to_numpy(output.logits.sum()), 1e-6, "the custom loss")
    custom = make_model("llama", rng)
    custom.loss_function = lambda logits, labels, **kwargs: logits.sum()
    with pytest.raises(ValueError, match=r"model.loss_function: softxent computes .* ForCausalLMLoss"):
        sx.apply(custom)


def test_importing_softxent_does_not_import_transformers() -> None:
    code = (
        "import sys, softxent, softxent.integrations.transformers; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_compiled_fullgraph_matches_unpatched(model_type: str, rng: torch.Generator) -> None:
    """``torch.compile(model, fullgraph=True)`` of the patched model: one graph (the fused loss is softxent's
    custom op, the head's capture and the loss function trace through), and the unpatched eager model's loss
    and gradients. The aot_eager backend traces as inductor does (dynamo, then AOT autograd) without its
    code generation, which takes ~10 s a model on a CPU; test_trainer_run_matches_unpatched[compiled] runs
    inductor."""
    torch._dynamo.reset()
    model = make_model(model_type, rng)
    batch = make_batch(rng)
    batch["num_items_in_batch"] = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) + 3)
    expected, expected_grads = loss_and_grads(model, **batch)
    sx.apply(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    try:
        patched, grads = loss_and_grads(model, compiled, **batch)
    finally:
        sx.revert(model)
    assert patched.logits is None
    assert_close(patched.loss, to_numpy(expected.loss), TOL, "loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, to_numpy(expected_grads[name]), TOL, f"grad of {name}")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "granite"])  # plain, softcapped, scaled
def test_loss_options_match_the_logits_loss(model_type: str, rng: torch.Generator) -> None:
    """apply(label_smoothing=ε, z_loss=λ): the fused training loss and every gradient equal
    F.cross_entropy(label_smoothing=ε) + λ·mean(lse²) on the model's own (softcapped, scaled) logits, and the
    unfused evaluation loss is the same number."""
    model = make_model(model_type, rng)
    batch = make_batch(rng)
    epsilon, lam = 0.1, 1e-3

    def reference(**inputs: torch.Tensor) -> object:
        out = model(**{key: value for key, value in inputs.items() if key != "labels"})
        logits = out.logits.float().reshape(-1, VOCAB)
        target = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[..., 1:].reshape(-1)
        counted = target != -100
        loss = torch.nn.functional.cross_entropy(logits, target, label_smoothing=epsilon)
        loss = loss + lam * (torch.logsumexp(logits[counted], dim=-1) ** 2).mean()
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=out.logits)

    expected, expected_grads = loss_and_grads(model, reference, **batch)
    sx.apply(model, label_smoothing=epsilon, z_loss=lam)
    patched, grads = loss_and_grads(model, **batch)
    assert patched.logits is None
    assert_close(patched.loss, to_numpy(expected.loss), TOL, "loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, to_numpy(expected_grads[name]), TOL, f"grad of {name}")
    with torch.no_grad():
        evaluated = model.eval()(**batch)
    assert evaluated.logits is not None
    assert_close(evaluated.loss, to_numpy(expected.loss), TOL, "evaluation loss")


def test_evaluation_keeps_the_logits_unless_fuse_always(rng: torch.Generator) -> None:
    """With labels, only a training step (train mode, gradients on) is fused: evaluation and no_grad return
    the logits and the unpatched loss, so compute_metrics and predict work; ``fuse="always"`` fuses them."""
    model = make_model("granite", rng)  # with its logit scaling
    batch = make_batch(rng)
    with torch.no_grad():
        expected = model.eval()(**batch)
        sx.apply(model)
        evaluated = model(**batch)
        no_grad_in_training = model.train()(**batch)
        sx.apply(model, fuse="always")
        fused = model.eval()(**batch)
    for output in (evaluated, no_grad_in_training):
        torch.testing.assert_close(output.logits, expected.logits, rtol=0, atol=0)
        torch.testing.assert_close(output.loss, expected.loss, rtol=0, atol=0)
    assert fused.logits is None
    assert_close(fused.loss, to_numpy(expected.loss), TOL, "loss fused in evaluation")


def _peft(model: torch.nn.Module, **lora: object) -> torch.nn.Module:
    """A PEFT LoRA model of ``model`` with random adapter weights (B = 0 at peft's default initialization
    would leave A's gradient 0 and the comparison empty)."""
    peft_module = pytest.importorskip("peft")
    config = peft_module.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    return peft_module.get_peft_model(model, config)


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["attention", "attention_and_lm_head"]
)
def test_peft_lora_matches_unpatched(targets: list[str], rng: torch.Generator) -> None:
    """``apply(peft_model)`` patches its base model; a LoRA lm_head is fused through its merged weight
    W + s·B·A. The loss and every adapter's gradient equal the unpatched PEFT model's."""
    model = _peft(make_model("llama", rng), target_modules=targets, lora_dropout=0.0)
    batch = make_batch(rng)
    expected, expected_grads = loss_and_grads(model, **batch)
    assert sx.apply(model) is model
    patched, grads = loss_and_grads(model, **batch)
    assert patched.logits is None
    assert_close(patched.loss, to_numpy(expected.loss), TOL, "loss")
    assert grads.keys() == expected_grads.keys()
    assert any("lm_head.lora_A" in name for name in grads) == ("lm_head" in targets)
    for name, grad in grads.items():
        assert_close(grad, to_numpy(expected_grads[name]), TOL, f"grad of {name}")
    sx.revert(model)
    assert type(model.get_base_model().lm_head).__name__ == "Linear"  # peft's LoRA Linear again


def test_peft_lora_head_that_the_merged_weight_cannot_reproduce_is_refused(rng: torch.Generator) -> None:
    """Refused at apply(), in evaluation mode too (from_pretrained returns an eval-mode model); a head
    replaced after apply() (an adapter added to it) is refused at the first fused step, naming the fix."""
    batch = make_batch(rng)
    for lora, message in (
        (dict(lora_dropout=0.1), r"the LoRA adapter 'default' on lm_head has lora_dropout=0.1"),
        (dict(use_dora=True), r"the LoRA adapter 'default' on lm_head uses DoRA"),
    ):
        model = _peft(make_model("llama", rng), target_modules=["lm_head"], **lora)
        with pytest.raises(ValueError, match=message):
            sx.apply(model.eval())
        assert not hasattr(model.get_base_model().lm_head, "_softxent_state")  # nothing was patched
    peft_module = pytest.importorskip("peft")
    model = _peft(make_model("llama", rng), target_modules=["q_proj"], lora_dropout=0.0)
    sx.apply(model)
    model.add_adapter("late", peft_module.LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1))
    model.set_adapter("late")
    with pytest.raises(ValueError, match=r"model: lm_head was replaced after softxent patched the model"):
        model.train()(**batch)
    with pytest.raises(ValueError, match=r"the LoRA adapter 'late' on lm_head has lora_dropout=0.1"):
        sx.apply(model)
    with torch.no_grad():  # evaluation runs unfused: it works there
        assert model.eval()(**batch).logits is not None


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["plain", "label_smoothing"])
def test_trl_sft_trainer_runs_on_softxent_with_trl_numbers(
    label_smoothing: float, rng: torch.Generator, tmp_path: Path
) -> None:
    """TRL's SFTTrainer computes its loss through its own fused LM head (``fused_lm_head=True``), and
    with label smoothing from the full logits; enable(trainer) routes both through softxent's fused head,
    and so does apply(model) before the trainer is built (TRL's head bypasses the model's own loss). Two
    real training steps log the loss, gradient norm and entropy TRL logs; loss options are refused."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    import softxent.integrations.trl as sx_trl

    rows = [{"input_ids": row["input_ids"].tolist()} for row in _training_data(rng, 8)]
    vocabulary = {str(token): token for token in range(VOCAB)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="0")),
        pad_token="0",
        eos_token="2",
    )
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))

    def train(how: str) -> dict[str, list[float]]:
        sx_trl.disable()
        torch.manual_seed(seed)
        args = trl.SFTConfig(
            output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, logging_steps=1,
            per_device_train_batch_size=4, seed=seed, save_strategy="no", bf16=False,  # float32 numbers
            label_smoothing_factor=label_smoothing,
        )  # fmt: skip
        model = make_model("qwen2", torch.Generator().manual_seed(seed))
        if how == "apply":
            sx.apply(model)
            assert sx_trl.enabled()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates label_smoothing_factor in SFT
            trainer = trl.SFTTrainer(
                model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
            )  # fmt: skip
        if how == "enable":
            with pytest.raises(ValueError, match=r"options: TRL's SFTTrainer .* expected no loss options"):
                sx.enable(trainer, label_smoothing=0.1)
            assert sx.enable(trainer) is trainer
            assert sx_trl.enabled()
            assert trainer.label_smoother is None  # the smoothed loss is the fused head's now
        try:
            trainer.train()
        finally:
            sx_trl.disable()
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        return {key: [entry[key] for entry in logged] for key in ("loss", "grad_norm", "entropy")}

    theirs = train("theirs")
    for how in ("enable", "apply") if label_smoothing == 0.0 else ("enable",):
        ours = train(how)
        assert len(ours["loss"]) == len(theirs["loss"]) == 2
        for key, values in ours.items():  # every number the trainer logs per step
            np.testing.assert_allclose(values, theirs[key], rtol=1e-4, err_msg=f"{how}: {key}")


def test_hf_benchmark_smoke_run(tmp_path: Path) -> None:
    """benchmarks/bench_hf.py end to end on a tiny model (eager variants; the compiled ones take ~20 s on
    a CPU and are the GPU run's): the patched step's loss is the unpatched one's."""
    output = tmp_path / "bench_hf.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hf.py"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--variants", "unpatched,softxent", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads(output.read_text())["rows"]}
    assert abs(rows["softxent"]["loss"] - rows["unpatched"]["loss"]) <= 1e-5 * abs(rows["unpatched"]["loss"])
    assert "| softxent |" in result.stdout
