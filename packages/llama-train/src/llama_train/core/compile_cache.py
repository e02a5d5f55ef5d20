"""torch.compile's on-disk cache in a directory of the user's choosing (`train.compile_cache`).

Compiling a model's training step costs tens of seconds on a CPU (docs/benchmarks.md),
and a study trains hundreds of runs of a few shapes. Inductor already keeps what it
compiles on disk (its FX graph cache and AOT autograd's cache of forward and backward,
both on by default in torch 2.13), under ``TORCHINDUCTOR_CACHE_DIR`` or else
``/tmp/torchinductor_<user>``; a process compiling a graph that is already there loads
it instead of generating and building C++ again. The key is the traced graph, the
input shapes and the torch version and settings, not the weights' values, so every
run of one model shape and batch (any lr, seed or schedule) shares one entry. Dynamo
still traces the model in every process (about a second); only code generation is
saved. Pointing the cache at a directory the runs share (`study run` uses
``<study dir>/compile-cache``) makes the compilation once per shape for the whole
study, on every node that sees the directory, where ``/tmp`` is one machine's. Entries
are written to a temporary file and renamed, so processes may share the directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from llama_train.errors import LlamaTrainError


@contextlib.contextmanager
def compile_cache(directory: Path | None) -> Iterator[None]:
    """Inductor and AOT autograd read and write their cache in `directory` for the
    block (None: torch's own choice, unchanged); the previous choice is restored."""
    if directory is None:
        yield
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LlamaTrainError(
            f"train.compile_cache: cannot create {directory}: {error.strerror or error}"
        ) from None
    try:  # torch >= 2.5: also drops inductor's memoised cache paths on entry and exit
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # older torch reads the variable when it first compiles
        temporary_cache_dir = _cache_dir_variable
    with temporary_cache_dir(str(directory.resolve())):
        yield


@contextlib.contextmanager
def _cache_dir_variable(directory: str) -> Iterator[None]:
    """``TORCHINDUCTOR_CACHE_DIR`` set for the block, the previous value restored."""
    original = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    try:
        yield
    finally:
        if original is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = original
