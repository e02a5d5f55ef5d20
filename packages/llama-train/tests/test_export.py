"""`llama-train export`: HF logits equal ours, the state dict reads back, --out is protected."""

from __future__ import annotations

import errno
import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core.checkpoint import CheckpointManager, TorchPayload
from llama_train.core.model import Llama, ModelConfig
from llama_train.core.rope import ROPE_METHODS, RopeScaling
from llama_train.core.weights import WEIGHTS_FILE, read_weights, write_weights
from llama_train.recipe.export import export_run, hf_state_dict

transformers = pytest.importorskip("transformers")
runner = CliRunner()


def _run_dir(tmp_path: Path, config: ModelConfig, step: int = 5) -> tuple[Path, Llama]:
    """A run directory with one checkpoint holding a model with large, random weights.

    init_std 0.3 makes attention far from uniform, so a wrong rotary order or a
    swapped projection shows in the logits (at 0.02 it would hide below 1e-5).
    """
    model = Llama(config, seed=3).eval()
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep=None, payload=TorchPayload())
    write = partial(
        write_weights, state=model.state_dict(), model_config=config.model_dump(mode="json")
    )
    manager.save(step, {"trainer": {"step": step}}, extra_files={WEIGHTS_FILE: write})
    return tmp_path / "run", model


CONFIGS = {
    "gqa-untied": ModelConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=11, max_seq_len=24,
        rope_theta=500.0, init_std=0.3, norm_eps=1e-6,
    ),
    "mha-tied": ModelConfig(
        dim=24, n_layers=1, n_heads=2, vocab_size=7, max_seq_len=16, tie_embeddings=True,
        init_std=0.3, ffn_hidden_dim=40,
    ),
}  # fmt: skip


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_export_gives_our_logits(tmp_path, name):
    config = CONFIGS[name]
    run_dir, model = _run_dir(tmp_path, config)
    result = runner.invoke(
        app, ["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]
    )
    assert result.exit_code == 0, result.output
    assert "step 5" in result.output
    tokens = torch.randint(
        0, config.vocab_size, (3, config.max_seq_len), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours = model(tokens).logits
    theirs = _hf_logits(tmp_path / "hf", tokens)
    assert ours.abs().max() > 1.0  # logits far from zero: the comparison means something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_without_the_rotary_reorder_the_logits_differ(tmp_path, monkeypatch):
    # Guards the test above: the reorder is what makes HF agree.
    config = CONFIGS["gqa-untied"]
    run_dir, model = _run_dir(tmp_path, config)
    monkeypatch.setattr(
        "llama_train.recipe.export.rotary_to_rotate_half", lambda weight, heads: weight
    )
    export_run(run_dir, tmp_path / "hf", format="hf")
    tokens = torch.arange(config.max_seq_len)[None] % config.vocab_size
    with torch.no_grad():
        ours = model(tokens).logits
    assert (_hf_logits(tmp_path / "hf", tokens) - ours).abs().max() > 1e-3


def test_hf_names_cover_every_parameter_once():
    config = CONFIGS["gqa-untied"]
    state = Llama(config).state_dict()
    converted = hf_state_dict(state, config)
    total = sum(tensor.numel() for tensor in converted.values())
    assert total == sum(tensor.numel() for tensor in state.values())
    assert "model.layers.1.self_attn.k_proj.weight" in converted
    assert converted["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)


def test_state_dict_export_reads_back_into_an_equal_model(tmp_path):
    config = CONFIGS["mha-tied"]
    run_dir, model = _run_dir(tmp_path, config)
    exported = export_run(run_dir, tmp_path / "sd", format="state-dict")
    state, stored_config = read_weights(exported.out / WEIGHTS_FILE)
    again = Llama(ModelConfig.model_validate(stored_config))
    again.load_state_dict(state)
    tokens = torch.arange(10)[None] % config.vocab_size
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    marker = json.loads((exported.out / "export.json").read_text())
    assert marker["format"] == "state-dict" and marker["step"] == 5


def test_out_is_replaced_only_when_it_is_a_previous_export(tmp_path):
    run_dir, _ = _run_dir(tmp_path, CONFIGS["mha-tied"])
    out = tmp_path / "out"
    first = runner.invoke(app, ["export", str(run_dir), "--out", str(out)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(
        app, ["export", str(run_dir), "--out", str(out), "--format", "state-dict"]
    )
    assert again.exit_code == 0, again.output
    assert json.loads((out / "export.json").read_text())["format"] == "state-dict"
    assert not (out / "config.json").exists()  # the previous export was replaced whole
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["export", str(run_dir), "--out", str(precious)])
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1 and "not a previous export" in refused.output
    assert (precious / "notes.txt").read_text() == "mine" and len(list(precious.iterdir())) == 1


ROPE_SETTINGS = {
    "none": RopeScaling(),
    "linear": RopeScaling(method="linear", factor=4.0),
    "ntk": RopeScaling(method="ntk", factor=4.0),
    "yarn": RopeScaling(method="yarn", factor=4.0, original_max_seq_len=16),
    "yarn-betas": RopeScaling(
        method="yarn", factor=2.0, original_max_seq_len=24, beta_fast=4.0, beta_slow=0.5
    ),
    "llama3": RopeScaling(method="llama3", factor=4.0, original_max_seq_len=16),
    "llama3-factors": RopeScaling(
        method="llama3", factor=8.0, original_max_seq_len=8, low_freq_factor=0.5,
        high_freq_factor=2.0,
    ),
}  # fmt: skip


def test_every_rotary_method_has_an_export_setting():
    assert {s.method for s in ROPE_SETTINGS.values()} == set(ROPE_METHODS)


@pytest.mark.parametrize("name", sorted(ROPE_SETTINGS))
def test_hf_export_keeps_the_rotary_scaling(tmp_path, name):
    """transformers' own LlamaForCausalLM, read from the export, gives the run's logits.

    head_dim 16 and theta 10^4 put the ramps of yarn and llama3 across several
    channel pairs over the original lengths used, so a frequency computed by
    another rule shows in the logits.
    """
    scaling = ROPE_SETTINGS[name]
    config = ModelConfig(
        dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=11, max_seq_len=64,
        init_std=0.3, rope_scaling=scaling,
    )  # fmt: skip
    run_dir, model = _run_dir(tmp_path, config)
    exported = export_run(run_dir, tmp_path / "hf", format="hf")
    tokens = torch.randint(0, 11, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens).logits
        plain = Llama(config.model_copy(update={"rope_scaling": RopeScaling()})).eval()
        plain.load_state_dict(model.state_dict())
        unscaled = plain(tokens).logits
    if scaling.method != "none":  # the scaling changes the logits: the check means something
        assert (unscaled - ours).abs().max() > 1e-2
    torch.testing.assert_close(_hf_logits(exported.out, tokens), ours, rtol=0, atol=2e-5)


def test_a_checkpoint_whose_tensors_do_not_fit_its_architecture_is_refused(tmp_path):
    config = CONFIGS["gqa-untied"]
    state = Llama(config, seed=3).state_dict()
    state["layers.0.attn.qkv.weight"] = state["layers.0.attn.qkv.weight"][:40]
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep=None, payload=TorchPayload())
    write = partial(write_weights, state=state, model_config=config.model_dump(mode="json"))
    manager.save(5, {"trainer": {"step": 5}}, extra_files={WEIGHTS_FILE: write})
    for format in ("hf", "state-dict"):
        out = tmp_path / f"out-{format}"
        result = runner.invoke(
            app, ["export", str(tmp_path / "run"), "--out", str(out), "--format", format]
        )
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1, result.output
        assert "layers.0.attn.qkv.weight has shape [40, 32]" in result.output
        assert "needs [64, 32]" in result.output
        assert not out.exists() and not list(tmp_path.glob(".out-*"))


def test_export_into_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    run_dir, _ = _run_dir(tmp_path, CONFIGS["mha-tied"])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: refuse as the kernel would for anyone else
        real_mkdir = Path.mkdir

        def refuse(self, *args, **kwargs):
            if self.parent == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    try:
        result = runner.invoke(app, ["export", str(run_dir), "--out", str(locked / "hf")])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and "Permission denied" in result.output
    assert list(locked.iterdir()) == []
