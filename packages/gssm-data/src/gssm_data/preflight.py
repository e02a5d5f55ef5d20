"""Checks that run before any work: a bad request fails in one line, having allocated nothing.

A store is cheap to describe and expensive to write, so every limit that
would otherwise be found late (a MemoryError while sampling, a full disk
after hours, an entropy pass that cannot run once the blocks are written, a
NaN that turns into an empty search) is checked here first, from the numbers
alone:

- :func:`finite`: a float option is a real number (``nan`` and ``inf`` parse
  as floats, so typer lets them through);
- :func:`check_generatable`: the graph is one whose store can be finished,
  including its exact entropy;
- :func:`check_sizes` and :func:`check_memory`: the sequence length, the
  number of blocks and the memory the writers need are within what the format
  and this machine allow (the disk is checked by ``generate`` from a small
  compressed sample, which these bounds keep cheap);
- :func:`check_script_value`: a string that goes into a generated shell
  script cannot start a new line or hide a command.
"""

from __future__ import annotations

import math
import re

from gssm_data.common.resources import available_memory_bytes
from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec
from gssm_data.sampler import state_dtype

# The exact forward algorithm's limits (gssm_data.entropy); a graph beyond them
# could be sampled but its store never finalised.
MAX_LATENT_NODES = 25
MAX_JOINT_STATES = 1 << 26
# Tokens per sequence: the manifest stores one entropy figure per position, and
# training contexts of these datasets are a few thousand tokens.
MAX_SEQ_LEN = 1 << 20
# Blocks of a store: the writer keeps a few words of bookkeeping per block;
# 2^22 blocks of 4096 sequences is 1.7e10 sequences, far beyond one store.
MAX_BLOCKS = 1 << 22
# Share of the available memory a request may plan to use.
_MEMORY_SHARE = 0.8

# C0 controls, DEL and C1 controls, plus the Unicode line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def finite(value: float, option: str) -> float:
    """`value` when it is a finite number, else one line naming `option`."""
    if not math.isfinite(value):
        raise GssmDataError(f"{option} {value}: give a finite number")
    return value


def check_script_value(option: str, value: str) -> str:
    """Refuse a value with a control character (newline, CR, NUL, tab, ...).

    Quoting protects a value inside one shell line, but an sbatch script is read
    line by line by Slurm too (``#SBATCH`` directives), and a newline inside a
    quoted directive ends it and starts a shell command. No legitimate
    partition, account, path or job name contains a control character.
    """
    found = _CONTROL.search(value)
    if found:
        raise GssmDataError(
            f"{option} {value!r} contains the control character {found.group()!r} "
            f"(at position {found.start()}); remove it"
        )
    return value


def check_generatable(graph: GraphSpec) -> None:
    """Refuse a graph whose store could be sampled but never finished.

    Finishing a store measures its exact entropy with the forward algorithm
    over the joint latent space, which needs latent nodes that do not read the
    observed one (the sampler could draw them, but the forward algorithm sums
    over latent states given the tokens), at most 25 latent nodes and at most
    2^26 joint states.
    """
    observed = graph.observed.name
    readers = [node.name for node in graph.nodes if observed in node.parents]
    if readers:
        raise GssmDataError(
            f"the observed node {observed!r} is a parent of {', '.join(readers)}: its store's "
            "exact entropy cannot be computed (latent nodes must not depend on the observed "
            "one); make those nodes children of latent nodes only"
        )
    if len(graph.latents) > MAX_LATENT_NODES:
        raise GssmDataError(
            f"the graph has {len(graph.latents)} latent nodes; a store's exact entropy supports "
            f"at most {MAX_LATENT_NODES}"
        )
    if graph.joint_latent_states > MAX_JOINT_STATES:
        raise GssmDataError(
            f"the joint latent space has {graph.joint_latent_states:,} states; a store's exact "
            f"entropy supports at most {MAX_JOINT_STATES:,}: use fewer latent states"
        )


def block_memory_bytes(graph: GraphSpec, seq_len: int, block_size: int) -> int:
    """Peak bytes one writer needs for one block (sampler state, tokens, copies).

    The sampler holds every node's state as int64 for the whole block, then the
    tokens (and latents) in their stored dtype, twice (padded and transposed).
    """
    cells = seq_len * block_size
    token_bytes = state_dtype(graph.vocab_size).itemsize
    latent_bytes = sum(state_dtype(node.states).itemsize for node in graph.latents)
    return cells * (8 * len(graph.nodes) + 2 * (token_bytes + latent_bytes))


def check_sizes(*, n_train: int, n_test: int, seq_len: int, block_size: int) -> None:
    """Refuse sizes the format cannot hold (sequence length, number of blocks)."""
    if seq_len > MAX_SEQ_LEN:
        raise GssmDataError(f"--seq-len {seq_len:,} is more than the limit of {MAX_SEQ_LEN:,}")
    blocks = -(-n_train // block_size) + -(-n_test // block_size)
    if blocks > MAX_BLOCKS:
        raise GssmDataError(
            f"--n {n_train:,} and --n-test {n_test:,} make {blocks:,} blocks of {block_size:,} "
            f"sequences, more than the limit of {MAX_BLOCKS:,}; split the data over several stores"
        )


def check_memory(
    graph: GraphSpec,
    *,
    seq_len: int,
    block_size: int,
    workers: int,
    memory_bytes: int | None = None,
) -> None:
    """Refuse a run whose writers would not fit in this machine's memory.

    `memory_bytes` defaults to :func:`available_memory_bytes` (unknown: no check).
    """
    memory = memory_bytes if memory_bytes is not None else available_memory_bytes()
    if memory is None:
        return
    per_block = block_memory_bytes(graph, seq_len, block_size)
    needed = per_block * max(workers, 1)
    limit = int(memory * _MEMORY_SHARE)
    if needed > limit:
        raise GssmDataError(
            f"writing needs about {_size(needed)} of memory ({max(workers, 1)} writer(s) x "
            f"{_size(per_block)} per block of {block_size:,} x {seq_len:,} tokens), more than "
            f"the {_size(limit)} available; use a shorter --seq-len or fewer --workers"
        )


def _size(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 1e3:.1f} kB"
