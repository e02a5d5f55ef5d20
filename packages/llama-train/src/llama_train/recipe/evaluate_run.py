"""Evaluate a run directory: rebuild a saved model and measure it against the exact entropy.

`llama-train eval RUN_DIR` and :func:`evaluate_run`: the model comes from the
checkpoint's safetensors weights (:mod:`llama_train.recipe.loading`), the defaults
(split, sequences, batch size, precision) from the run's config, and the
measurement from :func:`llama_train.core.evaluate.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_train.core.data import DataConfig, DataSpec, resolve_data
from llama_train.core.distributed import RankInfo, resolve_amp, resolve_device
from llama_train.core.evaluate import EvalResult, EvalSet, evaluate
from llama_train.errors import LlamaTrainError
from llama_train.recipe.loading import build_model, read_checkpoint_weights
from llama_train.recipe.train_config import read_run_config


def evaluate_run(
    run_dir: str | Path,
    *,
    checkpoint: int | None = None,
    data: str | Path | None = None,
    split: str | None = None,
    max_sequences: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    first: int = 0,
) -> EvalResult:
    """Evaluate a saved checkpoint of a run (the latest by default), on its store or another.

    The model is rebuilt from the architecture stored with the checkpoint's
    safetensors weights (nothing is unpickled), so the run's config may have
    changed since. `data` names any compatible store:
    same vocabulary, and sequences no longer than the model's context.
    Defaults for split and max_sequences come from the run's eval section; `first`
    starts at that row of the split (a validation slice beyond the training prefix).
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    weights = read_checkpoint_weights(run_dir, checkpoint)  # safetensors: never unpickles
    step, model_config = weights.step, weights.model_config
    data_config = (
        config.data
        if data is None
        else DataConfig(path=Path(data), batch_size=config.data.batch_size)
    )
    spec = resolve_data(data_config)
    _check_compatible(model_config, spec, data_config)
    torch_device = resolve_device(config.train.model_copy(update={"device": device}), RankInfo())
    model = build_model(weights, torch_device)
    eval_set = EvalSet(
        spec,
        split=split or config.eval.split,
        max_sequences=max_sequences if max_sequences is not None else config.eval.max_sequences,
        first=first,
    )
    return evaluate(
        model,
        eval_set,
        step=step,
        batch_size=batch_size or config.eval.batch_size or config.data.batch_size,
        device=torch_device,
        amp_dtype=resolve_amp(config.train.amp, torch_device),
    )


def _check_compatible(model_config: Any, spec: DataSpec, data_config: Any) -> None:
    where = f"the store {data_config.path}" if data_config.path else "the data"
    if model_config.vocab_size != spec.vocab_size:
        raise LlamaTrainError(
            f"the model has vocab_size {model_config.vocab_size} but {where} has "
            f"{spec.vocab_size} tokens; evaluate on a store of the same vocabulary"
        )
    if spec.seq_len - 1 > model_config.max_seq_len:
        raise LlamaTrainError(
            f"{where} has sequences of {spec.seq_len} tokens but the model's context is "
            f"max_seq_len {model_config.max_seq_len}; evaluate on shorter sequences"
        )
