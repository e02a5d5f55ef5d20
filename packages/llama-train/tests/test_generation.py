"""Batched KV-cache decoding: equal to each prompt alone and to recomputing the prefix;
the attention kernels agree; sampling is reproducible per row."""

from __future__ import annotations

import pytest
import torch

from llama_train.core.attention import flex_unavailable_reason
from llama_train.core.decoding import (
    generate_batch,
    generate_recompute,
    row_uniforms,
    sample_with_uniforms,
)
from llama_train.core.model import Llama, ModelConfig
from llama_train.errors import LlamaTrainError

VOCAB = 17
LENGTHS = (1, 6, 3, 11, 6)


def tiny(**overrides: object) -> ModelConfig:
    fields: dict[str, object] = {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": VOCAB,
        "max_seq_len": 32,
        "ffn_multiple_of": 16,
    }
    return ModelConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def model() -> Llama:
    """float64, so rounding never flips a greedy choice or a sampled token."""
    return Llama(tiny(), seed=1).double()


def prompts(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.cat(
            [
                torch.zeros(1, dtype=torch.long),
                torch.randint(0, VOCAB, (n - 1,), generator=generator),
            ]
        )
        for n in lengths
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_a_batch_of_prompts_of_different_lengths_decodes_as_each_prompt_alone(model, temperature):
    batch = prompts()
    together = generate_batch(
        model,
        batch,
        12,
        temperature=temperature,
        top_k=None if temperature != 0.7 else 5,
        seed=4,
        keep_logits=True,
    )
    for row, prompt in enumerate(batch):
        alone = generate_batch(
            model,
            [prompt],
            12,
            temperature=temperature,
            top_k=None if temperature != 0.7 else 5,
            seed=4,
            row_ids=[row],
            keep_logits=True,
        )
        assert torch.equal(alone.new_tokens[0], together.new_tokens[row])
        torch.testing.assert_close(alone.logits[0], together.logits[row], rtol=0, atol=1e-10)
        torch.testing.assert_close(alone.model_nll[0], together.model_nll[row], rtol=0, atol=1e-10)


def test_float32_batched_logits_match_alone_to_float_tolerance():
    model = Llama(tiny(), seed=2)
    batch = prompts(seed=1)
    together = generate_batch(model, batch, 6, temperature=0, keep_logits=True)
    for row, prompt in enumerate(batch):
        alone = generate_batch(model, [prompt], 6, temperature=0, keep_logits=True)
        torch.testing.assert_close(alone.logits[0], together.logits[row], rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_decoding_equals_recomputing_the_whole_prefix(model, temperature):
    batch = torch.stack(prompts(lengths=(4, 4, 4), seed=3))
    cached = generate_batch(model, list(batch), 15, temperature=temperature, seed=9)
    recomputed = generate_recompute(model, batch, 15, temperature=temperature, seed=9)
    assert torch.equal(cached.new_tokens, recomputed)


def test_every_step_s_logits_equal_a_full_forward_of_the_row_alone(model):
    batch = prompts()
    decoded = generate_batch(model, batch, 8, temperature=1.0, seed=2, keep_logits=True)
    for row, prompt in enumerate(batch):
        sequence = torch.cat([prompt, decoded.new_tokens[row]])
        with torch.no_grad():
            full = model(sequence[None, :-1]).logits[0, prompt.numel() - 1 :]  # (8, V)
        torch.testing.assert_close(decoded.logits[row], full, rtol=0, atol=1e-10)
        log_q = torch.log_softmax(full, dim=-1).gather(1, decoded.new_tokens[row][:, None])[:, 0]
        torch.testing.assert_close(decoded.model_nll[row], -log_q, rtol=0, atol=1e-10)


def test_the_same_seed_gives_the_same_samples_and_another_seed_does_not(model):
    batch = prompts()
    first = generate_batch(model, batch, 10, seed=5).new_tokens
    assert torch.equal(first, generate_batch(model, batch, 10, seed=5).new_tokens)
    assert not torch.equal(first, generate_batch(model, batch, 10, seed=6).new_tokens)


def test_inverse_cdf_sampling_follows_the_softmax_law():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, 4)
    uniforms = torch.from_numpy(row_uniforms(0, [0], 20000)[0])
    tokens = sample_with_uniforms(logits, uniforms, temperature=1.0)
    counts = torch.bincount(tokens, minlength=4).double() / 20000
    expected = torch.softmax(logits[0].double(), dim=-1)
    torch.testing.assert_close(counts, expected, rtol=0, atol=0.015)
    top2 = sample_with_uniforms(logits, uniforms, temperature=1.0, top_k=2)
    assert set(top2.tolist()) == {1, 2}
    assert torch.equal(sample_with_uniforms(logits[:2], uniforms[:2], 0.0), torch.tensor([2, 2]))


@pytest.mark.parametrize(
    ("lengths", "new", "temperature", "message"),
    [
        (
            (30,),
            4,
            1.0,
            r"prompt of 30 tokens \+ 4 new tokens needs 33 positions; .*max_seq_len=32",
        ),
        ((3,), 4, float("nan"), "temperature must be a finite number >= 0"),
        ((3,), 4, float("inf"), "temperature must be a finite number >= 0"),
        ((3,), 0, 1.0, "max_new_tokens must be >= 1"),
    ],
)
def test_impossible_requests_are_one_line_errors(model, lengths, new, temperature, message):
    with pytest.raises(LlamaTrainError, match=message):
        generate_batch(model, prompts(lengths), new, temperature=temperature)


def test_a_sample_may_end_one_token_past_the_context(model):
    """The last new token is never fed back: 30 + 3 tokens need 32 positions."""
    assert generate_batch(model, prompts((30,)), 3).new_tokens.shape == (1, 3)


needs_flex = pytest.mark.skipif(
    flex_unavailable_reason() is not None, reason=str(flex_unavailable_reason())
)


def _flex_matches_sdpa(device: str) -> None:
    sdpa = Llama(tiny(attention="sdpa"), seed=3).to(device).eval()
    flex = Llama(tiny(attention="flex"), seed=3).to(device).eval()
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    with torch.no_grad():
        torch.testing.assert_close(flex(tokens).logits, sdpa(tokens).logits, rtol=0, atol=1e-5)
    batch = [p.to(device) for p in prompts()]
    a = generate_batch(sdpa, batch, 5, temperature=0, keep_logits=True)
    b = generate_batch(flex, batch, 5, temperature=0, keep_logits=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)


@needs_flex
def test_flex_gives_the_logits_of_sdpa_causal_and_padded():
    """On CPU flex runs uncompiled (24 positions: a length compiled CPU flex got wrong)."""
    _flex_matches_sdpa("cpu")


@needs_flex
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex runs on CUDA only")
def test_compiled_flex_on_cuda_gives_the_logits_of_sdpa_causal_and_padded():
    _flex_matches_sdpa("cuda")


@needs_flex
def test_flex_training_on_cpu_is_one_clear_error():
    model = Llama(tiny(attention="flex"), seed=0)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(LlamaTrainError, match="FlexAttention has no backward pass on CPU"):
        model(tokens, tokens)
    auto = Llama(tiny(attention="auto"), seed=0)
    _, loss, _ = auto(tokens, tokens)
    loss.backward()  # auto falls back to SDPA where flex cannot run


def test_a_run_may_resume_with_another_attention_kernel_but_not_another_model(tmp_path):
    from llama_train.recipe.train import check_resumable
    from llama_train.recipe.train_config import resolve_config, write_config
    from llama_train.rundir import load_yaml

    base = ["data.preset=debug", "data.source=online", "data.seq_len=9", f"run.dir={tmp_path}"]
    write_config(resolve_config(None, base))
    stored = load_yaml(tmp_path / "config.yaml")
    flex = resolve_config(None, [*base, "model.attention=flex"])
    assert check_resumable(flex, stored) == ["model.attention: auto -> flex"]
    wider = resolve_config(None, [*base, "model.dim=512"])
    with pytest.raises(LlamaTrainError, match="holds checkpoints of another model"):
        check_resumable(wider, stored)
