"""Check each chunk read for training or evaluation against the store's recorded CRC-32.

A store records the CRC-32 of every block (``<split>/block_crc32``: the tokens'
bytes, continued over each latent array's). A chunk damaged after the store was
published (a disk error, a bad copy, a file overwritten) would otherwise either
train silently on wrong tokens, when it still decodes, or stop the run with a
codec traceback, when it does not. The training stream reads whole chunks,
each one block, so checking costs one CRC over bytes already in memory (about
a millisecond per 1 MB chunk), plus reading the block's latents when the store
has them. A process checks each chunk the first time it reads it and
remembers the blocks that passed, so later epochs cost nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gssm_data import GssmDataError, Store, block_checksum, block_rows, open_store
from llama_train.errors import LlamaTrainError


def check_manifest(store: Store) -> None:
    """The manifest's vocabulary and sequence length against what the store holds.

    The model is built from the manifest (embedding rows, positions), so a manifest
    edited after the store was written would fail deep inside the model, with a
    traceback (an index out of range, a shape mismatch). The vocabulary must be the
    graph's observed node's and every split's tokens must have the recorded shape;
    the token values are checked against the vocabulary as each block is read.
    """
    manifest = store.manifest
    damaged = f"the store is damaged or was edited: check it with `gssm-data verify {store.path}`"
    if manifest.vocab_size != manifest.graph.vocab_size:
        raise LlamaTrainError(
            f"the manifest of {store.path} says vocab_size {manifest.vocab_size} but its graph's "
            f"observed node has {manifest.graph.vocab_size} states; {damaged}"
        )
    for split, info in manifest.splits.items():
        try:
            shape = tuple(store.tokens(split).shape)
        except GssmDataError as error:
            raise LlamaTrainError(str(error)) from None
        if shape != (info.n, manifest.seq_len):
            raise LlamaTrainError(
                f"the manifest of {store.path} says its {split} split holds {info.n} sequences of "
                f"{manifest.seq_len} tokens but its tokens array is {shape[0]} x "
                f"{'x'.join(str(size) for size in shape[1:])}; {damaged}"
            )


class ChunkChecker:
    """Reads blocks of one split of a store, checked against their recorded CRC-32.

    Holds only the store's path and plain numbers, so it pickles cheaply into
    DataLoader workers; each process opens the store itself on first use.
    """

    def __init__(self, path: Path, split: str) -> None:
        self.path = Path(path)
        self.split = split
        self._store: Store | None = None
        self._checksums: np.ndarray | None = None
        self._passed: set[int] = set()

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "split": self.split}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["path"], state["split"])  # type: ignore[misc, arg-type]

    def _open(self) -> tuple[Store, np.ndarray]:
        if self._store is None or self._checksums is None:
            try:
                store = open_store(self.path)
            except GssmDataError as error:
                raise LlamaTrainError(str(error)) from None
            checksums = store.block_checksums(self.split)
            if checksums is None:
                raise LlamaTrainError(
                    f"the store {self.path} has no {self.split}/block_crc32: it was not "
                    "finalised; regenerate it"
                )
            check_manifest(store)
            self._store, self._checksums = store, checksums
        return self._store, self._checksums

    def block(self, block: int) -> np.ndarray:
        """The tokens of `block`, raising a one-line LlamaTrainError if damaged."""
        store, checksums = self._open()
        where = f"{self.split} block {block} of {self.path}"
        if block >= len(checksums):
            raise LlamaTrainError(f"{where} has no recorded checksum: the store is damaged")
        checked = block in self._passed
        try:
            if checked:  # tokens only: the latents were read once, for the checksum
                array = store.tokens(self.split)
                start, stop = block_rows(array.shape[0], store.manifest.block_size, block)
                return np.asarray(array[start:stop])
            tokens, latents = store.read_block(self.split, block)
        except Exception as error:  # a damaged chunk fails in the codec, with any error type
            reason = str(error).splitlines()[0] if str(error) else ""
            raise LlamaTrainError(
                f"{where} is unreadable ({type(error).__name__}{': ' + reason if reason else ''}); "
                f"the store is damaged: check it with `gssm-data verify {self.path}`"
            ) from None
        recorded = int(checksums[block])
        read = block_checksum(tokens, latents)
        if read != recorded:
            raise LlamaTrainError(
                f"{where} fails its checksum (recorded {recorded:#010x}, read {read:#010x}): "
                f"the store is damaged: check it with `gssm-data verify {self.path}`"
            )
        vocab_size = store.manifest.vocab_size
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise LlamaTrainError(
                f"{where} holds token {int(tokens.max())}, outside the vocabulary of "
                f"{vocab_size} in its manifest: the store is damaged: check it with "
                f"`gssm-data verify {self.path}`"
            )
        self._passed.add(block)
        return tokens

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the split, every block they touch checked (as :meth:`block`)."""
        store, _ = self._open()
        block_size = store.manifest.block_size
        parts = []
        for block in range(start // block_size, (max(stop, start + 1) - 1) // block_size + 1):
            first = block * block_size
            parts.append(self.block(block)[max(start - first, 0) : stop - first])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
