"""A Llama-style trainer for gssm-data stores, measured against their exact entropy.

The training API in a few names (the command line, `llama-train run`, is a thin
layer over them)::

    from llama_train import evaluate_run, load_model, resolve_config
    from llama_train.recipe.train import train  # (a submodule shares the name)

    config = resolve_config("packages/llama-train/configs/debug.yaml", ["optim.lr=1e-3"])
    summary = train(config)          # or resumes: the same call again continues the run
    result = evaluate_run(config.run.dir)   # test loss, exact entropy, excess loss
    model, run_config = load_model(config.run.dir)  # the trained model; never unpickles

Layers, each importing only those below it (docs/design.md, section Architecture):
`errors` and `rundir` (run-directory files, job state, atomic writes); `core/`
(`configuration`, `model`, `optim`, `data`, `distributed`, `checkpoint`,
`evaluate`, `metrics`, each owning its config section); the recipe (`config`,
`train`, `eval`, `plot`); `launch/` (`torchrun`, `slurm`, `sweep`, `status`);
`cli/`. Names are imported on first use, so `import llama_train` and
`llama-train --help` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TrainConfig": "llama_train.recipe.train_config",
    "resolve_config": "llama_train.recipe.train_config",
    "evaluate_run": "llama_train.recipe.evaluate_run",
    "EvalResult": "llama_train.core.evaluate",
    "LlamaTrainError": "llama_train.errors",
    "load_model": "llama_train.recipe.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llama_train' has no attribute {name!r}")
