"""What names a run on wandb and which data it saw: shared by live logging and wandb-sync.

A sweep point's `run.name` is `<sweep>/<overrides>` (llama_train.sweep), so on
wandb its name is the overrides that make it different (`optim.lr=0.001`) and
its group the sweep; a plain run keeps its name. The data's fingerprint goes
into the wandb config beside the training config and the parameter counts, so
runs can be compared only on the same data, stored or online.
"""

from __future__ import annotations

from gssm_data import BLOCK_SIZE, fingerprint
from llama_train.core.data import DataSpec


def command_line_name(run_name: str, overrides: list[str]) -> str | None:
    """`run.name` and the overrides that change the run (`demo optim.lr=1e-3`), None if none.

    Where the run is (run.*) and how it is logged (logging.*) do not name it.
    """
    meaningful = [o for o in overrides if not o.startswith(("run.", "logging."))]
    return " ".join([run_name, *meaningful]) if meaningful else None


def data_fingerprint(spec: DataSpec) -> str:
    """The store's fingerprint, or for online data the one a store of that process would have."""
    if spec.store is not None:
        return spec.store.manifest.fingerprint
    return fingerprint(spec.graph, spec.seed, spec.seq_len, BLOCK_SIZE)
