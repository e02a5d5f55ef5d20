"""Graph-structured sequential models: deterministic datasets and their exact entropy.

The reading API the trainer uses::

    from gssm_data import open_store

    store = open_store("datasets/hmm-....zarr")
    store.manifest.vocab_size, store.manifest.seq_len
    tokens = store.tokens("train")[:1024]        # numpy (1024, seq_len) uint8
    table = store.conditional("X")               # p(x_t | parents), float64

Writing is `gssm_data.generate.generate(GenerateOptions(...))` or `gssm-data generate`.
"""

from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec, NodeSpec, load_graph, parse_graph
from gssm_data.kernels import draw_kernels
from gssm_data.manifest import Baselines, EntropyStats, Manifest, SplitInfo
from gssm_data.presets import load_preset, preset_names
from gssm_data.sampler import BLOCK_SIZE, STREAMS, BlockSampler, SampledBlock
from gssm_data.store import Store, open_store, verify_store

__all__ = [
    "BLOCK_SIZE",
    "STREAMS",
    "Baselines",
    "BlockSampler",
    "EntropyStats",
    "GraphSpec",
    "GssmDataError",
    "Manifest",
    "NodeSpec",
    "SampledBlock",
    "SplitInfo",
    "Store",
    "draw_kernels",
    "load_graph",
    "load_preset",
    "open_store",
    "parse_graph",
    "preset_names",
    "verify_store",
]
