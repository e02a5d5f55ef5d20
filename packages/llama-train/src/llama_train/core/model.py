"""A Llama-style decoder-only transformer, in one file that reads top to bottom.

References:
1) Llama (Touvron et al., 2023) and Meta's reference `llama/model.py`: pre-norm blocks
   with RMSNorm, rotary position embeddings, SwiGLU feed-forward, no biases, and
   grouped-query attention (Ainslie et al., 2023) when `n_kv_heads < n_heads`.
2) nanoGPT's `model.py` (Karpathy): the shape of this file, one `forward` used for
   training, evaluation and sampling, initialisation scaled on residual projections.
3) RoFormer (Su et al., 2021): rotary embeddings with frequencies theta^(-2i/d).

Shapes in comments: B batch, T time (positions in this call), S cached positions,
D model dim, H query heads, K key/value heads, hd head dim, F feed-forward hidden dim,
V vocabulary.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from llama_train.core.attention import AttentionPlan, attend, plan_attention
from llama_train.core.rope import RopeScaling, rotary_frequencies
from llama_train.errors import LlamaTrainError


class ModelConfig(BaseModel):
    """Architecture of a `Llama`; the `model` section of a training config.

    `vocab_size` and `max_seq_len` may be left out (None): the training config fills
    them from the data store's manifest, which is the one source of both numbers.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dim: Annotated[int, Field(gt=0, description="width of the residual stream")] = 256
    n_layers: Annotated[int, Field(gt=0, description="number of transformer blocks")] = 4
    n_heads: Annotated[int, Field(gt=0, description="query heads per attention layer")] = 4
    n_kv_heads: Annotated[
        int | None,
        Field(
            gt=0,
            description="key/value heads; None = n_heads (multi-head attention), fewer = "
            "grouped-query attention (must divide n_heads)",
        ),
    ] = None
    vocab_size: Annotated[
        int | None, Field(gt=0, description="token vocabulary; None = from the data manifest")
    ] = None
    max_seq_len: Annotated[
        int | None,
        Field(gt=0, description="longest sequence (rotary table size); None = from the data"),
    ] = None
    ffn_hidden_dim: Annotated[
        int | None,
        Field(gt=0, description="SwiGLU hidden width; None = Llama rule from ffn_multiplier"),
    ] = None
    ffn_multiplier: Annotated[
        float, Field(gt=0, description="scales the Llama width 8/3 * dim (ffn_dim_multiplier)")
    ] = 1.0
    # Llama rounds the hidden width up to a multiple of 256; 64 keeps matrix shapes
    # friendly to tensor cores without inflating the tiny models of this project.
    ffn_multiple_of: Annotated[
        int, Field(gt=0, description="round the derived hidden width up to this multiple")
    ] = 64
    tie_embeddings: Annotated[
        bool, Field(description="share the token embedding with the output projection")
    ] = False
    rope_theta: Annotated[float, Field(gt=0, description="rotary base frequency")] = 10000.0
    rope_scaling: Annotated[
        RopeScaling,
        Field(description="rescaled rotary frequencies (linear, ntk, yarn, llama3); default none"),
    ] = RopeScaling()
    norm_eps: Annotated[float, Field(gt=0, description="RMSNorm epsilon")] = 1e-5
    init_std: Annotated[
        float, Field(gt=0, description="std of the normal initialisation of weights")
    ] = 0.02
    # Llama pretraining uses no dropout; kept for small-data experiments.
    dropout: Annotated[
        float, Field(ge=0, lt=1, description="attention and residual dropout (training only)")
    ] = 0.0
    attention: Annotated[
        Literal["auto", "sdpa", "flex"],
        Field(
            description="attention kernel: sdpa (scaled_dot_product_attention), flex "
            "(FlexAttention, forward-only on CPU), auto = the faster one measured by make bench"
        ),
    ] = "auto"

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                "every head gets dim / n_heads channels"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"head dimension dim / n_heads = {self.dim // self.n_heads} is odd: rotary "
                "embeddings rotate pairs of channels, pick dim and n_heads so it is even"
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}: "
                "grouped-query attention shares each key/value head among "
                "n_heads / n_kv_heads query heads"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (`n_kv_heads`, or `n_heads` when unset)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: explicit, or Llama's int(8/3 * dim * multiplier) rounded up.

        8/3 keeps the three SwiGLU matrices at the parameter count of a 4 * dim
        two-matrix MLP (Shazeer, 2020).
        """
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(self.ffn_multiplier * int(2 * 4 * self.dim / 3))
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)


class ModelOutput(NamedTuple):
    """What `Llama.forward` returns; a tuple, so `logits, loss, _ = model(x, y)` works."""

    logits: Tensor  # (B, T, V)
    loss: Tensor | None  # () mean cross-entropy over target positions, or None
    hidden: list[Tensor] | None  # n_layers + 2 tensors (B, T, D), see `Llama.forward`


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32.

    The float32 upcast keeps the mean of squares exact under bf16 autocast; the
    result goes back to the input's dtype.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (..., D) normed over its last axis in float32, back in x's dtype, times weight.

    weight broadcasts against x: (D,) for one model, (M, 1, 1, D) for a stack of M
    (`core.stack`), which shares this exact arithmetic.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def rotary_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, each (max_seq_len, head_dim / 2) float32.

    Pair i of a head rotates by position * theta^(-2i / head_dim), or by the
    frequency `scaling` makes of it (`core.rope`); every pair of the head rotates.
    A scaling's attention factor (YaRN) multiplies both tables, hence queries and
    keys. Angles are computed in float64 so long positions stay exact.
    """
    inv_freq = rotary_frequencies(head_dim, theta)  # (hd/2,)
    inv_freq, attention = (scaling or RopeScaling()).apply(inv_freq, max_seq_len)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return (attention * angles.cos()).float(), (attention * angles.sin()).float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, T, heads, hd) by the angles of cos/sin
    (T, hd/2), or (B, T, hd/2) when every row has its own positions (left-padded batches).

    Interleaved pairs as in Meta's reference: (x_2i, x_2i+1) becomes (x_2i cos - x_2i+1
    sin, x_2i sin + x_2i+1 cos). Eager, as complex numbers times e^{i angle}: one complex
    multiply is 2-4x faster (forward + backward, CPU) than the same rotation written with
    real slices. Under torch.compile, with real slices (:func:`rotate_pairs`): inductor
    generates no code for complex operators and would run that multiply as an opaque
    eager call between its fused kernels. On CPU the two agree bit for bit when the
    head dimension is a multiple of 16 (the complex kernel's vectorised loop), and to
    within 5e-7 otherwise, where its scalar tail rounds differently (`test_model.py`).
    Done in float32 and returned in x's dtype, so SDPA sees matching dtypes under
    autocast. The tables stay real buffers: `model.to(bf16)` would drop the imaginary
    part of a complex one.
    """
    if torch.compiler.is_compiling():
        return rotate_pairs(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, heads, hd/2)
    rotation = torch.complex(cos.float(), sin.float()).unsqueeze(-2)  # ([B,] T, 1, hd/2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`apply_rotary` in real arithmetic, each product and sum rounded as the CPU's
    vectorised complex multiply rounds them: real ac - bd, imaginary ad + bc."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, hd/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # (B, T, heads, hd/2) each
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # ([B,] T, 1, hd/2)
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, K, S, hd) -> (B, K * n_rep, S, hd): key/value head k serves query heads
    k * n_rep .. (k + 1) * n_rep - 1."""
    if n_rep == 1:
        return x
    B, K, S, hd = x.shape
    return x[:, :, None].expand(B, K, n_rep, S, hd).reshape(B, K * n_rep, S, hd)


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Each layer's buffers (B, K, max_len, hd) are allocated once, on its first
    write, with the dtype and device of its keys (bf16 under autocast). `length`
    slots are filled; `Llama.forward` advances it after all layers ran.

    `pad` (B,) makes a batch of prompts of different lengths: row b holds pad[b]
    filler slots first (left padding), so its token in slot s sits at position
    s - pad[b], and no real token attends to a filler slot (`core.attention`).
    """

    def __init__(self, n_layers: int, max_len: int, pad: Tensor | None = None) -> None:
        self.max_len = max_len
        self.length = 0
        self.pad = pad if pad is not None and bool(pad.any()) else None
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, K, T, hd) at positions length..length+T-1 of `layer`;
        return all keys and values so far, each (B, K, length + T, hd)."""
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:
            B, K, _, hd = k.shape
            keys = self.keys[layer] = k.new_zeros(B, K, self.max_len, hd)
            values = self.values[layer] = v.new_zeros(B, K, self.max_len, hd)
        end = self.length + k.size(2)
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def positions(self, T: int, device: torch.device) -> Tensor:
        """Positions of the next T slots: (T,), or (B, T) with padding (filler slots at 0)."""
        slots = self.length + torch.arange(T, device=device)
        if self.pad is None:
            return slots
        return (slots[None, :] - self.pad.to(device)[:, None]).clamp(min=0)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, through SDPA."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index of this layer's slot in a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.head_dim,
        )
        self.qkv = nn.Linear(
            config.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False
        )
        self.out = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        plan: AttentionPlan | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, K * hd, K * hd], dim=-1)
        q = apply_rotary(q.view(B, T, H, hd), cos, sin).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rotary(k.view(B, T, K, hd), cos, sin).transpose(1, 2)  # (B, K, T, hd)
        v = v.view(B, T, K, hd).transpose(1, 2)  # (B, K, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, hd), S = cached + T
        k, v = repeat_kv(k, H // K), repeat_kv(v, H // K)  # (B, H, S, hd)
        if plan is None:  # a block called on its own: plain causal attention
            plan = AttentionPlan("sdpa", 0, T, None, None)
        y = attend(q, k, v, plan, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, D)
        return self.resid_dropout(self.out(y))


class SwiGLU(nn.Module):
    """Feed-forward down(silu(gate(x)) * up(x)); gate and up share one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.dim, 2 * config.hidden_dim, bias=False)
        self.down = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.dropout(self.down(F.silu(gate) * up))  # (B, T, D)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        plan: AttentionPlan | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, plan)  # (B, T, D)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, D)


def sample_next_token(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row of logits (B, V) -> (B, 1); temperature 0 is greedy.

    top_k keeps the k most likely tokens (ties with the k-th are kept too).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.size(-1):
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator)


class Llama(nn.Module):
    """Token embedding, `n_layers` blocks, final RMSNorm, output projection.

    Initialisation (`init_weights`) depends only on `seed`: every weight matrix and
    the embedding ~ normal(0, init_std), except the projections that write into the
    residual stream (attention `out`, MLP `down`) ~ normal(0, init_std / sqrt(2 *
    n_layers)), so the stream's variance stays O(1) with depth (GPT-2, nanoGPT);
    RMSNorm gains are 1. Building a model leaves the caller's CPU RNG untouched.
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        if config.vocab_size is None or config.max_seq_len is None:
            raise LlamaTrainError(
                "model.vocab_size and model.max_seq_len are unset: set them, or let the "
                "training config fill them from the data manifest"
            )
        self.config = config
        # Default nn.Linear init draws from the global RNG; fork it so that building
        # a model does not shift the caller's random stream (weights come from `seed`).
        with torch.random.fork_rng(devices=[]):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rotary_tables(
            config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling
        )
        # Non-persistent: derived from the config, so not part of checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise all parameters as the class docstring says, drawing from generator."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():  # a tied matrix appears once
            if param.ndim == 1:  # RMSNorm gains: the only vectors (no biases)
                nn.init.ones_(param)
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(param, 0.0, residual_std, generator=generator)
            else:
                nn.init.normal_(param, 0.0, std, generator=generator)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once).

        exclude_embeddings drops the input token embedding, a table lookup with no
        compute (Kaplan et al.'s non-embedding count). The output projection always
        counts: it is a matmul per token, so a tied matrix stays in (as in nanoGPT).
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        *,
        return_hidden: bool = False,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """Logits for tokens (B, T); loss when targets (B, T) are given; hidden when asked.

        loss: mean cross-entropy over all target positions (entries equal to -100 are
        ignored, as in `F.cross_entropy`); the trainer passes tokens = batch[:, :-1],
        targets = batch[:, 1:].
        hidden (return_hidden=True): n_layers + 2 residual streams (B, T, D): the token
        embeddings, the output of each block, and the final normed stream the output
        projection reads.
        cache: decode incrementally; tokens sit at positions cache.length.. and the
        cache advances by T (see `generate`).
        """
        T = tokens.size(1)
        start = 0 if cache is None else cache.length
        if start + T > self.rope_cos.size(0):
            raise LlamaTrainError(
                f"sequence of {start + T} tokens is longer than model.max_seq_len="
                f"{self.rope_cos.size(0)}"
            )
        if cache is not None and start + T > cache.max_len:
            raise LlamaTrainError(
                f"KV cache holds {cache.max_len} positions, {start + T} needed: build it "
                "with max_len = prompt length + new tokens"
            )
        pad = None if cache is None else cache.pad
        if pad is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        else:  # left-padded rows: positions (B, T), tables (B, T, hd/2)
            positions = cache.positions(T, tokens.device)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        plan = plan_attention(
            self.config.attention,
            start=start,
            queries=T,
            pad=pad,
            device=tokens.device,
            needs_grad=torch.is_grad_enabled() and self.tok_embeddings.weight.requires_grad,
            dropout=self.training and self.config.dropout > 0,
        )
        x = self.tok_embeddings(tokens)  # (B, T, D)
        hidden = [x] if return_hidden else None
        for block in self.layers:
            x = block(x, cos, sin, cache, plan)  # (B, T, D)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)  # (B, T, D)
        if hidden is not None:
            hidden.append(x)
        logits = self.output(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        if cache is not None:
            cache.length += T
        return ModelOutput(logits, loss, hidden)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue prompt (B, T0) by max_new_tokens tokens -> (B, T0 + max_new_tokens).

        The prompt is prefilled in one pass, then each new token costs one position
        thanks to a KV cache. temperature 0 is greedy; top_k restricts sampling to the
        k most likely tokens; generator (on the model's device) makes draws
        reproducible. Runs in eval mode (no dropout) and restores the previous mode.
        """
        self._check_generate_args(prompt, max_new_tokens, temperature, top_k)
        was_training = self.training
        self.eval()
        try:
            cache = KVCache(self.config.n_layers, prompt.size(1) + max_new_tokens)
            logits = self(prompt, cache=cache).logits[:, -1]  # (B, V)
            pieces = [prompt]
            for i in range(max_new_tokens):
                token = sample_next_token(logits, temperature, top_k, generator)  # (B, 1)
                pieces.append(token)
                if i + 1 < max_new_tokens:
                    logits = self(token, cache=cache).logits[:, -1]
        finally:
            self.train(was_training)
        return torch.cat(pieces, dim=1)

    def _check_generate_args(
        self, prompt: Tensor, max_new_tokens: int, temperature: float, top_k: int | None
    ) -> None:
        if prompt.ndim != 2 or prompt.size(1) == 0:
            raise LlamaTrainError(
                f"prompt must be a (batch, length >= 1) tensor of tokens, got shape "
                f"{tuple(prompt.shape)}"
            )
        if max_new_tokens < 0:
            raise LlamaTrainError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if prompt.size(1) + max_new_tokens > self.rope_cos.size(0):
            raise LlamaTrainError(
                f"prompt length {prompt.size(1)} + max_new_tokens {max_new_tokens} exceeds "
                f"model.max_seq_len={self.rope_cos.size(0)}"
            )
        if temperature < 0:
            raise LlamaTrainError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise LlamaTrainError(f"top_k must be >= 1 or None, got {top_k}")
