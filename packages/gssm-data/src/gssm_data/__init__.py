"""Graph-structured sequential models: deterministic datasets and their exact entropy.

The reading API the trainer uses::

    from gssm_data import open_store

    store = open_store("datasets/hmm-....zarr")
    store.manifest.vocab_size, store.manifest.seq_len
    tokens = store.tokens("train")[:1024]        # numpy (1024, seq_len) uint8
    table = store.conditional("X")               # p(x_t | parents), float64

Writing is `gssm_data.generate.generate(GenerateOptions(...))` or `gssm-data generate`.

This module is the package's public face: the names below are what other packages
(llama-train) may use, and :mod:`gssm_data.common` holds the utilities both command lines
share (count parsing, bounded YAML files, progress, resources). Everything else is internal
and may change between versions.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Names are imported on first use, so `import gssm_data` (and with it both command
# lines' `--help`, and every module that only needs the errors) does not load numpy
# and zarr.
_EXPORTS = {
    "BLOCK_SIZE": "gssm_data.sampler",
    "Baselines": "gssm_data.manifest",
    "BlockSampler": "gssm_data.sampler",
    "EntropyStats": "gssm_data.manifest",
    "GraphSpec": "gssm_data.graph",
    "GssmDataError": "gssm_data.errors",
    "Manifest": "gssm_data.manifest",
    "NodeSpec": "gssm_data.graph",
    "STREAMS": "gssm_data.sampler",
    "SampledBlock": "gssm_data.sampler",
    "SplitInfo": "gssm_data.manifest",
    "Store": "gssm_data.store",
    "block_checksum": "gssm_data.store",
    "block_rows": "gssm_data.store",
    "complete_stores": "gssm_data.scaling",
    "draw_kernels": "gssm_data.kernels",
    "fingerprint": "gssm_data.manifest",
    "iter_split_entropy": "gssm_data.entropy",
    "load_graph": "gssm_data.graph",
    "load_preset": "gssm_data.presets",
    "materialise": "gssm_data.scaling",
    "open_store": "gssm_data.store",
    "parse_graph": "gssm_data.graph",
    "preset_names": "gssm_data.presets",
    "sequence_entropy": "gssm_data.entropy",
    "split_posterior": "gssm_data.posterior",
    "verify_store": "gssm_data.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gssm_data' has no attribute {name!r}")
