"""The stores a study names, built when they are missing.

A study whose regimes are names in a scaling-data index can say which recipe writes
them (``stores: {recipe: datasets/scaling.yaml, scale: small}``). `study run` then
builds the stores its regimes need, and only those, through gssm-data's own
:func:`gssm_data.scaling.materialise` (the code behind ``gssm-data scaling
--regimes``), before it expands the grid: a fresh clone needs one command, and a
study of two regimes never waits for the other six. gssm-data says which stores it
builds and about how long that takes; finished stores are never rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gssm_data import GssmDataError
from llama_train.errors import LlamaTrainError

Log = Callable[[str], None]


def missing_regimes(names: list[str], index: Path) -> list[str]:
    """The named regimes the index does not list with a complete store."""
    from gssm_data import complete_stores

    built = complete_stores(index)
    return [name for name in names if name not in built]


def ensure_stores(study_path: str | Path, *, log: Log) -> list[str]:
    """Build the missing stores of the regimes a study names (its `stores` recipe);
    return the names built. A study without `stores` is left as it is."""
    from gssm_data import materialise
    from llama_train.launch.study import load_study

    study = load_study(study_path)
    if study.stores is None:
        return []
    names = [regime for regime in study.regimes if isinstance(regime, str)]
    missing = missing_regimes(names, study.stores.index)
    if not missing:
        return []
    log(f"{study_path}: the stores of {', '.join(missing)} are missing; building them")
    try:
        materialise(
            study.stores.recipe,
            scale=study.stores.scale,
            out_dir=study.stores.recipe.parent,
            log=log,
            regimes=missing,
        )
    except GssmDataError as error:
        raise LlamaTrainError(f"building the study's stores: {error}") from None
    return missing
