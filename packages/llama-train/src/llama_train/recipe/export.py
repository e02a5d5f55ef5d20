"""Export a run's model: a Hugging Face `LlamaForCausalLM` folder, or a plain state dict.

Both formats are safetensors plus JSON, read from the checkpoint's own
safetensors weights (:mod:`llama_train.recipe.loading`), so exporting a run directory
someone else wrote never unpickles anything.

Hugging Face's Llama differs from ours in three ways, all undone here:

- our attention has one fused ``qkv`` projection and our MLP one ``gate_up``;
  HF has ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``;
- our rotary embedding rotates interleaved channel pairs (2i, 2i+1) of each
  head, as Meta's reference does; HF's ``rotate_half`` pairs channel i with
  i + head_dim/2. Both give pair i the frequency theta^(-2i/head_dim), so
  permuting the rows of q and k within each head (even channels first, then odd)
  makes HF compute the same rotation. Attention scores are dot products of q
  and k, which a common permutation of their channels leaves unchanged, so the
  logits agree exactly (up to float rounding);
- parameter names (``tok_embeddings`` -> ``model.embed_tokens``, ...).

A run trained with ``model.rope_scaling`` exports the rotary scaling as
Hugging Face spells it (:func:`hf_rope_parameters`), each method one that
transformers computes with the same formula as :mod:`llama_train.core.rope`
(linear, llama3 and yarn by name, NTK-aware as the plain rotary with its new
base), so the exported model gives the run's logits at every position.

`--out` is written as a hidden sibling folder and renamed into place. An
existing `--out` is replaced only when it is empty or a previous export
(it holds ``export.json``); anything else is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from llama_train.core.model import ModelConfig
from llama_train.core.weights import WEIGHTS_FILE, give_usual_permissions, write_weights
from llama_train.errors import LlamaTrainError
from llama_train.recipe.loading import StoredWeights, check_weights_fit, read_checkpoint_weights
from llama_train.scaling.compute import parameter_count

ExportFormat = Literal["hf", "state-dict"]
FORMATS: tuple[ExportFormat, ...] = ("hf", "state-dict")
MARKER_FILE = "export.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Exported:
    """What `export_run` wrote."""

    out: Path
    format: ExportFormat
    step: int
    parameters: int
    files: list[str]


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    format: ExportFormat,
    checkpoint: int | None = None,
) -> Exported:
    """Write the model of a run's checkpoint (default the newest sound one) to `out`."""
    if format not in FORMATS:
        raise LlamaTrainError(f"--format {format!r}: choose {' or '.join(FORMATS)}")
    out = Path(out)
    _check_out(out)
    weights = read_checkpoint_weights(run_dir, checkpoint)
    check_weights_fit(weights)
    if format == "hf":
        hf_rope_parameters(weights.model_config)  # refused before anything is written
    temporary = out.with_name(f".{out.name}.export-tmp")
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        if format == "hf":
            _write_hf(temporary, weights)
        else:
            write_weights(
                temporary / WEIGHTS_FILE,
                weights.state,
                weights.model_config.model_dump(mode="json"),
            )
        files = sorted(path.name for path in temporary.iterdir())
        marker = {
            "format": format,
            "run_dir": str(Path(run_dir).resolve()),
            "step": weights.step,
            "files": files,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (temporary / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")
        _replace(temporary, out)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise LlamaTrainError(f"cannot write {out}: {error.strerror or error}") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    parameters = parameter_count(weights.model_config)
    return Exported(out, format, weights.step, parameters, [*files, MARKER_FILE])


def _check_out(out: Path) -> None:
    """Refuse an `out` that is a file, or a non-empty folder that is not a previous export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LlamaTrainError(f"--out {out} is a file; name a folder for the export")
    try:
        holds_files = any(out.iterdir())
    except OSError as error:
        raise LlamaTrainError(f"cannot read --out {out}: {error.strerror or error}") from None
    if holds_files and not (out / MARKER_FILE).is_file():
        raise LlamaTrainError(
            f"--out {out} is a non-empty folder that is not a previous export (no "
            f"{MARKER_FILE}); name a new or empty folder"
        )


def _replace(temporary: Path, out: Path) -> None:
    """Move the finished export into place; a previous export is removed only afterwards."""
    if out.exists():
        old = out.with_name(f".{out.name}.export-old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(temporary, out)
        shutil.rmtree(old)
    else:
        os.rename(temporary, out)


# ---------------------------------------------------------------------------
# Hugging Face


def rotary_to_rotate_half(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection reordered from interleaved pairs to HF's halves.

    Within each head, output channel 2i goes to i and 2i+1 to i + head_dim/2.
    """
    rows, columns = weight.shape
    head_dim = rows // heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight.view(heads, head_dim, columns)[:, order, :].reshape(rows, columns)


def hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names and layouts as `LlamaForCausalLM` expects them."""
    H, K, hd = config.n_heads, config.kv_heads, config.head_dim
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for layer in range(config.n_layers):
        ours, theirs = f"layers.{layer}.", f"model.layers.{layer}."
        q, k, v = state[ours + "attn.qkv.weight"].split([H * hd, K * hd, K * hd], dim=0)
        gate, up = state[ours + "mlp.gate_up.weight"].chunk(2, dim=0)
        out |= {
            theirs + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            theirs + "self_attn.q_proj.weight": rotary_to_rotate_half(q, H),
            theirs + "self_attn.k_proj.weight": rotary_to_rotate_half(k, K),
            theirs + "self_attn.v_proj.weight": v,
            theirs + "self_attn.o_proj.weight": state[ours + "attn.out.weight"],
            theirs + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
            theirs + "mlp.gate_proj.weight": gate,
            theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
        }
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def hf_config(config: ModelConfig) -> dict[str, object]:
    """config.json of the equivalent `LlamaForCausalLM`.

    The rotary base and scaling are given both as `rope_theta` and `rope_scaling`
    (transformers 4) and as `rope_parameters` (transformers 5). Token 0 is every
    sequence's start state, hence the BOS id; the data has no end-of-sequence token.
    """
    assert config.vocab_size is not None and config.max_seq_len is not None
    rope = hf_rope_parameters(config)
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "rope_scaling": None if rope["rope_type"] == "default" else scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "bos_token_id": 0,
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def hf_rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` with which transformers computes the run's rotary frequencies.

    Every method of :mod:`llama_train.core.rope` has an exact counterpart:
    linear, llama3 and yarn (with the reference's ramp in the pair index) by
    name; NTK-aware scaling is the plain rotary with base theta * s^(D/(D-2)),
    which is how that method is defined (HF's ``dynamic`` instead changes the
    base with the sequence length, so it is not used).
    """
    assert config.max_seq_len is not None
    scaling = config.rope_scaling
    theta = config.rope_theta
    original = scaling.original_max_seq_len or config.max_seq_len
    if scaling.method == "none" or scaling.factor == 1:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling.method == "ntk":
        D = config.head_dim
        new_theta = theta * scaling.factor ** (D / (D - 2)) if D > 2 else theta
        return {"rope_type": "default", "rope_theta": new_theta}
    common = {"rope_type": scaling.method, "rope_theta": theta, "factor": scaling.factor}
    if scaling.method == "linear":
        return common
    if scaling.method == "llama3":
        return common | {
            "original_max_position_embeddings": original,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
        }
    if scaling.method == "yarn":
        return common | {
            "original_max_position_embeddings": original,
            "beta_fast": scaling.beta_fast,
            "beta_slow": scaling.beta_slow,
        }
    raise LlamaTrainError(
        f"model.rope_scaling.method {scaling.method!r} has no Hugging Face equivalent "
        "that computes the same frequencies; export --format state-dict instead"
    )


def _write_hf(folder: Path, weights: StoredWeights) -> None:
    tensors = hf_state_dict(weights.state, weights.model_config)
    save_file(tensors, str(folder / HF_WEIGHTS_FILE), metadata={"format": "pt"})
    give_usual_permissions(folder / HF_WEIGHTS_FILE)
    text = json.dumps(hf_config(weights.model_config), indent=2) + "\n"
    (folder / HF_CONFIG_FILE).write_text(text)
