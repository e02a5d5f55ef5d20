"""Claims about the Llama model: shapes, causality, loss, rotary, GQA, KV cache, init."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from llama_train.core.model import (
    KVCache,
    Llama,
    ModelConfig,
    apply_rotary,
    rotary_tables,
    rotate_pairs,
    sample_next_token,
)
from llama_train.errors import LlamaTrainError

VOCAB = 17


def tiny(**overrides: object) -> ModelConfig:
    """A model small enough that every test runs in milliseconds."""
    fields: dict[str, object] = {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "vocab_size": VOCAB,
        "max_seq_len": 32,
        "ffn_multiple_of": 16,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def expected_parameters(cfg: ModelConfig) -> int:
    """Parameter count written out from the architecture, independent of the module tree."""
    hd, kv = cfg.head_dim, cfg.kv_heads
    attention = cfg.dim * (cfg.n_heads + 2 * kv) * hd + cfg.n_heads * hd * cfg.dim
    mlp = 3 * cfg.dim * cfg.hidden_dim
    per_layer = attention + mlp + 2 * cfg.dim  # two RMSNorm gains
    embedding = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return cfg.n_layers * per_layer + cfg.dim + embedding + head


# --- configuration -------------------------------------------------------------------------


def test_config_rejects_dim_not_divisible_by_heads() -> None:
    with pytest.raises(ValidationError, match="dim=30 is not divisible by n_heads=4"):
        tiny(dim=30)


def test_config_rejects_odd_head_dimension() -> None:
    with pytest.raises(ValidationError, match="head dimension dim / n_heads = 5 is odd"):
        tiny(dim=20, n_heads=4)


def test_config_rejects_kv_heads_that_do_not_divide_heads() -> None:
    with pytest.raises(ValidationError, match="n_kv_heads=3 must divide n_heads=4"):
        tiny(n_kv_heads=3)
    with pytest.raises(ValidationError, match="n_kv_heads=8 must divide n_heads=4"):
        tiny(n_kv_heads=8)


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="n_layer"):
        tiny(n_layer=3)


def test_hidden_dim_follows_the_llama_rule() -> None:
    # int(8/3 * 256) = 682, rounded up to a multiple of 64 -> 704.
    assert ModelConfig(dim=256, n_heads=4).hidden_dim == 704
    # Multiplier scales the 8/3 width before rounding: int(1.5 * 682) = 1023 -> 1024.
    assert ModelConfig(dim=256, n_heads=4, ffn_multiplier=1.5).hidden_dim == 1024
    assert ModelConfig(dim=256, n_heads=4, ffn_hidden_dim=100).hidden_dim == 100


def test_model_needs_vocab_and_context_filled_in() -> None:
    with pytest.raises(LlamaTrainError, match=r"vocab_size and model\.max_seq_len are unset"):
        Llama(ModelConfig(dim=32, n_heads=4))


# --- forward -------------------------------------------------------------------------------


def test_forward_gives_logits_of_shape_batch_time_vocab() -> None:
    out = Llama(tiny())(tokens(3, 11))
    assert out.logits.shape == (3, 11, VOCAB)
    assert out.loss is None and out.hidden is None


def test_changing_a_future_token_never_changes_earlier_logits() -> None:
    model = Llama(tiny(n_kv_heads=2))
    x = tokens(2, 16)
    changed = x.clone()
    changed[:, 9] = (changed[:, 9] + 1) % VOCAB
    a, b = model(x).logits, model(changed).logits
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_loss_is_mean_cross_entropy_over_all_target_positions() -> None:
    model = Llama(tiny())
    batch = tokens(3, 13)
    out = model(batch[:, :-1], batch[:, 1:])
    log_probs = out.logits.double().log_softmax(-1)  # (B, T, V)
    picked = log_probs.gather(-1, batch[:, 1:, None]).squeeze(-1)  # (B, T)
    assert out.loss is not None
    assert out.loss.item() == pytest.approx(-picked.mean().item(), abs=1e-6)


def test_hidden_states_are_embeddings_every_block_and_the_final_norm() -> None:
    cfg = tiny(n_layers=3)
    model = Llama(cfg)
    x = tokens(2, 7)
    out = model(x, return_hidden=True)
    assert out.hidden is not None
    assert len(out.hidden) == cfg.n_layers + 2
    assert all(h.shape == (2, 7, cfg.dim) for h in out.hidden)
    assert torch.equal(out.hidden[0], model.tok_embeddings(x))
    assert torch.equal(out.hidden[-1], model.norm(out.hidden[-2]))
    assert torch.equal(model.output(out.hidden[-1]), out.logits)
    assert torch.equal(model(x).logits, out.logits)


def test_sequences_longer_than_max_seq_len_are_refused() -> None:
    with pytest.raises(LlamaTrainError, match=r"longer than model\.max_seq_len=32"):
        Llama(tiny())(tokens(1, 33))


def test_dropout_is_active_in_training_and_off_in_eval() -> None:
    model = Llama(tiny(dropout=0.5))
    x = tokens(2, 8)
    torch.manual_seed(0)
    a, b = model(x).logits, model(x).logits
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


def test_bf16_autocast_runs_forward_and_backward_on_cpu() -> None:
    model = Llama(tiny(n_kv_heads=2))
    batch = tokens(2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch[:, :-1], batch[:, 1:])
    assert out.logits.dtype == torch.bfloat16
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_compiles_as_one_graph_with_the_same_loss() -> None:
    # aot_eager traces forward and backward like inductor but skips code generation, so
    # this checks compile-friendliness (fullgraph: no graph break) in about a second.
    model = Llama(tiny(n_kv_heads=2))
    batch = tokens(2, 9)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(batch[:, :-1], batch[:, 1:], return_hidden=True)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(model(batch[:, :-1], batch[:, 1:]).loss.item())
    assert len(out.hidden) == 4


# --- parameters and initialisation ----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_heads": 2}, {"tie_embeddings": True}, {"ffn_hidden_dim": 40, "n_kv_heads": 1}],
)
def test_parameter_count_matches_the_architecture_formula(overrides: dict) -> None:
    cfg = tiny(**overrides)
    model = Llama(cfg)
    assert model.num_parameters() == expected_parameters(cfg)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    embedding = 0 if cfg.tie_embeddings else VOCAB * cfg.dim
    assert model.num_parameters(exclude_embeddings=True) == expected_parameters(cfg) - embedding


def test_tied_embeddings_share_storage_with_the_output_projection() -> None:
    model = Llama(tiny(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    with torch.no_grad():
        model.tok_embeddings.weight[3, 0] = 42.0
    assert model.output.weight[3, 0].item() == 42.0


def test_same_seed_gives_identical_weights_and_another_seed_does_not() -> None:
    a, b, c = Llama(tiny(), seed=1), Llama(tiny(), seed=1), Llama(tiny(), seed=2)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name


def test_building_a_model_leaves_the_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Llama(tiny())
    assert torch.equal(torch.rand(3), expected)


def test_initialisation_scales_residual_projections_by_depth() -> None:
    cfg = tiny(dim=64, n_layers=4, init_std=0.05, ffn_hidden_dim=256)
    model = Llama(cfg)
    block = model.layers[0]
    residual = 0.05 / math.sqrt(2 * cfg.n_layers)
    assert block.attn.out.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.mlp.down.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert torch.equal(block.attn_norm.weight, torch.ones(cfg.dim))


def test_rotary_tables_are_not_saved_in_checkpoints() -> None:
    keys = Llama(tiny()).state_dict().keys()
    assert not any("rope" in key for key in keys)


# --- rotary embeddings ---------------------------------------------------------------------


def reference_rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's Llama rotary: consecutive channel pairs as complex numbers times e^{i m f}.

    x is (B, T, heads, hd) as in the reference code.
    """
    hd, T = x.shape[-1], x.shape[1]
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].double() / hd))
    freqs_cis = torch.polar(
        torch.ones(T, hd // 2, dtype=torch.float64),
        torch.outer(torch.arange(T, dtype=torch.float64), freqs),
    )  # (T, hd/2) complex
    x_complex = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    rotated = x_complex * freqs_cis[None, :, None, :]
    return torch.view_as_real(rotated).flatten(3).float()


def test_rotary_matches_the_complex_number_reference() -> None:
    x = torch.randn(2, 12, 3, 16, generator=torch.Generator().manual_seed(0))  # (B, T, H, hd)
    cos, sin = rotary_tables(16, 12, theta=500.0)
    ours = apply_rotary(x, cos, sin)
    torch.testing.assert_close(ours, reference_rotary(x, theta=500.0), atol=1e-5, rtol=1e-5)


def test_rotary_rotates_every_channel_pair() -> None:
    _, sin = rotary_tables(64, 4, theta=10000.0)
    assert bool((sin[1] != 0).all())  # the slowest pair rotates too, at 10000^(-62/64)
    assert sin[1, -1].item() == pytest.approx(math.sin(10000.0 ** (-62 / 64)))


def test_rotary_attention_scores_depend_only_on_relative_position() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16, generator=gen), torch.randn(1, 1, 1, 16, generator=gen)
    cos, sin = rotary_tables(16, 40, theta=10000.0)

    def score(m: int, n: int) -> float:
        rq = apply_rotary(q, cos[m : m + 1], sin[m : m + 1])
        rk = apply_rotary(k, cos[n : n + 1], sin[n : n + 1])
        return (rq * rk).sum().item()

    assert score(7, 3) == pytest.approx(score(30, 26), abs=1e-5)


def _rotated_with_gradient(rotate, x, cos, sin, grad):  # type: ignore[no-untyped-def]
    x = x.clone().requires_grad_()
    y = rotate(x, cos, sin)
    y.backward(grad)
    return y.detach(), x.grad


@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_real_rotation_equals_the_complex_multiply_bit_for_bit(head_dim: int) -> None:
    """What compiled training computes equals what eager training computes (forward and
    backward), so a compiled run differs from an eager one only by inductor's fusions."""
    gen = torch.Generator().manual_seed(head_dim)
    x = torch.randn(4, 33, 3, head_dim, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    cos, sin = rotary_tables(head_dim, 33, theta=10000.0)
    complex_out, complex_grad = _rotated_with_gradient(apply_rotary, x, cos, sin, grad)
    real_out, real_grad = _rotated_with_gradient(rotate_pairs, x, cos, sin, grad)
    assert torch.equal(real_out, complex_out)
    assert torch.equal(real_grad, complex_grad)


def test_real_rotation_is_within_rounding_of_the_complex_multiply_for_other_head_dims() -> None:
    gen = torch.Generator().manual_seed(0)
    for head_dim in (2, 8, 24):
        x = torch.randn(3, 9, 2, head_dim, generator=gen)
        grad = torch.randn(x.shape, generator=gen)
        cos, sin = rotary_tables(head_dim, 9, theta=500.0)
        expected = _rotated_with_gradient(apply_rotary, x, cos, sin, grad)
        got = _rotated_with_gradient(rotate_pairs, x, cos, sin, grad)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_compiled_model_has_no_complex_operator() -> None:
    """Inductor generates no code for complex operators; the compiled graph must hold none
    (forward or backward), or the rotation would run as an eager call inside it."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _inputs: object) -> object:
        graphs.append(gm)  # forward, then backward
        return make_boxed_func(gm.forward)

    model = Llama(tiny(n_kv_heads=2))
    batch = tokens(2, 9)
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    compiled(batch[:, :-1], batch[:, 1:]).loss.backward()
    assert len(graphs) == 2
    ops = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert any("bmm" in op or "mm" in op for op in ops)  # the graph is the model's
    assert not [op for op in ops if "complex" in op], sorted(ops)


# --- grouped-query attention ---------------------------------------------------------------


def test_gqa_with_as_many_kv_heads_as_heads_is_multi_head_attention() -> None:
    x = tokens(2, 10)
    mha = Llama(tiny(n_kv_heads=None), seed=3)
    gqa = Llama(tiny(n_kv_heads=4), seed=3)
    assert torch.equal(mha(x).logits, gqa(x).logits)


def test_gqa_equals_multi_head_attention_with_repeated_key_value_heads() -> None:
    """A GQA model equals an MHA model whose key/value heads copy each group's shared head."""
    cfg = tiny(n_kv_heads=2)
    gqa = Llama(cfg, seed=4)
    mha = Llama(tiny(), seed=5)
    H, K, hd, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.dim
    state = gqa.state_dict()
    for name, weight in list(state.items()):
        if name.endswith("attn.qkv.weight"):
            q, k, v = weight.split([H * hd, K * hd, K * hd])
            k_full = k.view(K, 1, hd, D).expand(K, H // K, hd, D).reshape(H * hd, D)
            v_full = v.view(K, 1, hd, D).expand(K, H // K, hd, D).reshape(H * hd, D)
            state[name] = torch.cat([q, k_full, v_full])
    mha.load_state_dict(state)
    x = tokens(2, 12)
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-6, rtol=1e-6)


# --- KV-cache decoding and generation -------------------------------------------------------


@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1, 1, 1, 1], [1] * 12, [3, 4, 2, 3]])
def test_cached_decoding_equals_the_full_forward(chunks: list[int]) -> None:
    cfg = tiny(n_kv_heads=2, n_layers=3)
    model = Llama(cfg).eval()
    x = tokens(2, sum(chunks))
    full = model(x).logits
    cache = KVCache(cfg.n_layers, max_len=sum(chunks))
    start = 0
    for size in chunks:
        step = model(x[:, start : start + size], cache=cache).logits
        torch.testing.assert_close(step, full[:, start : start + size], atol=1e-5, rtol=1e-5)
        start += size
    assert cache.length == sum(chunks)
    with pytest.raises(LlamaTrainError, match="KV cache holds"):
        model(x[:, :1], cache=cache)


def test_greedy_generation_equals_recomputing_the_full_forward_each_step() -> None:
    model = Llama(tiny(n_kv_heads=2))
    prompt = tokens(3, 4)
    generated = model.generate(prompt, 10, temperature=0.0)
    naive = prompt
    for _ in range(10):
        logits = model(naive).logits[:, -1]
        naive = torch.cat([naive, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, naive)
    assert generated.shape == (3, 14)


def test_sampled_generation_is_reproducible_with_a_generator() -> None:
    model = Llama(tiny())
    prompt = tokens(2, 3)
    a = model.generate(prompt, 8, top_k=5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 8, top_k=5, generator=torch.Generator().manual_seed(7))
    naive, gen = prompt, torch.Generator().manual_seed(7)
    for _ in range(8):
        token = sample_next_token(model(naive).logits[:, -1], 1.0, 5, gen)
        naive = torch.cat([naive, token], dim=1)
    assert torch.equal(a, b)
    assert torch.equal(a, naive)
    assert torch.equal(a[:, :3], prompt)


def test_top_k_samples_only_among_the_k_most_likely_tokens() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)).expand(4000, -1)
    gen = torch.Generator().manual_seed(1)
    drawn = set(sample_next_token(logits, 2.0, top_k=3, generator=gen).flatten().tolist())
    assert drawn == set(logits[0].topk(3).indices.tolist())
    greedy = sample_next_token(logits[:2], 1.0, top_k=1, generator=gen)
    assert torch.equal(greedy, logits[:2].argmax(-1, keepdim=True))


def test_generate_restores_training_mode_and_checks_its_arguments() -> None:
    model = Llama(tiny())
    model.generate(tokens(1, 3), 2)
    assert model.training
    with pytest.raises(LlamaTrainError, match=r"exceeds model\.max_seq_len=32"):
        model.generate(tokens(1, 30), 3)
    with pytest.raises(LlamaTrainError, match="temperature must be >= 0"):
        model.generate(tokens(1, 3), 2, temperature=-1.0)
    with pytest.raises(LlamaTrainError, match="top_k must be >= 1"):
        model.generate(tokens(1, 3), 2, top_k=0)
    assert torch.equal(model.generate(tokens(1, 3), 0), tokens(1, 3))


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager_loss_and_gradients() -> None:
    # Real code generation (about 40 s on 2 CPU cores), hence slow.
    model = Llama(tiny(n_kv_heads=2))
    batch = tokens(2, 9)
    eager = model(batch[:, :-1], batch[:, 1:]).loss
    eager.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(batch[:, :-1], batch[:, 1:]).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    for param, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "shape",
    [
        {"dim": 32, "n_layers": 2, "n_heads": 4},  # multi-head, untied
        {"dim": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2},  # grouped-query
        {"dim": 48, "n_layers": 1, "n_heads": 3, "n_kv_heads": 1, "tie_embeddings": True},
        {"dim": 24, "n_layers": 2, "n_heads": 2, "ffn_hidden_dim": 40, "tie_embeddings": True},
        {"dim": 64, "n_layers": 1, "n_heads": 8, "ffn_multiplier": 1.5},
    ],
)
def test_closed_form_parameter_count_is_the_models_count(shape: dict) -> None:
    """Memory estimates, exports and study shapes use the closed form: it must count what
    the model holds, with and without the input embedding, tied or not."""
    from llama_train.scaling.compute import parameter_count

    config = ModelConfig(vocab_size=13, max_seq_len=8, **shape)
    model = Llama(config)
    assert parameter_count(config) == model.num_parameters()
    assert parameter_count(config, exclude_embeddings=True) == model.num_parameters(
        exclude_embeddings=True
    )
    left_to_data = config.model_copy(update={"vocab_size": None})
    assert parameter_count(left_to_data, vocab_size=13) == model.num_parameters()
