"""Sample from a trained run and score every sample under the true generating process.

A GSSM store knows the exact conditional p(x_t | x_<t) of any token sequence, so a
model's samples can be judged by the process itself: the true negative log-likelihood
per generated token, -log p(x_t | x_<t), next to the data's exact entropy at the same
positions. At temperature 1 a model q that learned the process draws samples whose
true NLL matches the entropy.

The samples come from the *sampler's* law q' (the model's softmax at the chosen
temperature, restricted to the top k tokens; a point mass for greedy decoding), so
each sample is also scored under q' itself: in expectation, true NLL - sampler NLL
= E_q'[log q'(x) - log p(x)] per generated token, the per-token KL(q' || p) of the
samples' distribution from the process. The model's own NLL at temperature 1 is
reported too; true NLL - model NLL is that KL only when q' = q (temperature 1, no
top-k), and is not printed as one.

Prompts come from a file (:func:`read_prompts`), from the first tokens of test
sequences, or are the bare start token 0. Sample i continues prompt i mod P, with its
own random stream (seed, i): the samples do not depend on `batch_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gssm_data import STREAMS, GssmDataError, draw_kernels, sequence_entropy
from gssm_data.common.yamlfile import read_bounded
from llama_train.core.data import DataSpec, online_sampler, resolve_data
from llama_train.core.decoding import generate_batch
from llama_train.core.distributed import RankInfo, resolve_device
from llama_train.core.evaluate import LN2, EvalSet
from llama_train.core.model import Llama
from llama_train.errors import LlamaTrainError
from llama_train.recipe.loading import build_model, read_checkpoint_weights
from llama_train.recipe.train_config import read_run_config
from llama_train.rundir import atomic_write

START_TOKEN = 0
# A prompt file is read whole; 16 MiB is millions of tokens.
MAX_PROMPT_BYTES = 16 << 20


@dataclass(frozen=True)
class Prompts:
    """The prompts of a request (1-D int64 arrays starting with 0) and where they came from."""

    rows: list[np.ndarray]
    source: str
    test_rows: bool = False  # row i is test sequence i (its transition kernels apply)


@dataclass(frozen=True)
class Sample:
    """One generated sequence and its scores, nats per generated token."""

    prompt_length: int
    tokens: list[int]  # prompt + generated tokens
    true_nll: float  # -log p under the true process, mean over generated tokens
    model_nll: float  # -log q under the model (temperature 1), mean over generated tokens
    sampler_nll: float  # -log q' under the law it was drawn from, mean over generated tokens
    data_entropy: float | None  # the data's exact entropy at the same positions


@dataclass(frozen=True)
class GenerationResult:
    """Samples of a run with their true and model NLL, and the summary figures."""

    run_dir: str
    step: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    seed: int
    prompts: str
    entropy_method: str
    samples: list[Sample] = field(repr=False)
    true_per_position: list[float] = field(repr=False)  # mean over samples, new token j

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def true_nll(self) -> float:
        return float(np.mean([s.true_nll for s in self.samples]))

    @property
    def true_nll_stderr(self) -> float:
        values = np.array([s.true_nll for s in self.samples])
        return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0

    @property
    def model_nll(self) -> float:
        return float(np.mean([s.model_nll for s in self.samples]))

    @property
    def sampler_nll(self) -> float:
        return float(np.mean([s.sampler_nll for s in self.samples]))

    @property
    def sampler_kl_stderr(self) -> float:
        """Standard error of the KL estimate, true NLL - sampler NLL, over samples."""
        values = np.array([s.true_nll - s.sampler_nll for s in self.samples])
        return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0

    @property
    def data_entropy(self) -> float | None:
        """Mean data entropy at the samples' positions; None if one lies beyond the data."""
        values = [s.data_entropy for s in self.samples]
        return None if any(v is None for v in values) else float(np.mean(values))

    def summary(self) -> dict[str, float | None]:
        """The figures of the table, nats per generated token (and bits)."""
        entropy = self.data_entropy
        figures: dict[str, float | None] = {
            "true_nll": self.true_nll,
            "true_nll_stderr": self.true_nll_stderr,
            "model_nll": self.model_nll,
            "sampler_nll": self.sampler_nll,
            "data_entropy": entropy,
            "true_minus_entropy": None if entropy is None else self.true_nll - entropy,
            "sampler_kl": self.true_nll - self.sampler_nll,
            "sampler_kl_stderr": self.sampler_kl_stderr,
        }
        bits = {f"{k}_bits": None if v is None else v / LN2 for k, v in figures.items()}
        return figures | bits

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = [asdict(s) for s in self.samples]
        return data | {"n": self.n, "summary": self.summary()}


# -- prompts ---------------------------------------------------------------------------


def read_prompts(path: Path, vocab_size: int) -> Prompts:
    """Prompts from a text file: one prompt per line, token ids separated by spaces.

    Every prompt starts with the fixed start token 0 (position 0 of every GSSM
    sequence); blank lines and lines starting with `#` are skipped. Every problem is
    a one-line error naming the line. The file must be a regular file of at most
    :data:`MAX_PROMPT_BYTES` (never a device or FIFO, which would be read without end).
    """
    try:
        data = read_bounded(
            path, label=f"prompt file {path}", max_bytes=MAX_PROMPT_BYTES, kind="prompt file"
        )
        lines = data.decode("utf-8").splitlines()
    except GssmDataError as error:
        raise LlamaTrainError(str(error)) from None
    except UnicodeDecodeError as error:
        raise LlamaTrainError(
            f"prompt file {path} is not UTF-8 text (invalid byte at offset {error.start})"
        ) from None
    rows = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path} line {number}"
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise LlamaTrainError(
                f"{where}: {text[:40]!r} is not a list of integer token ids separated by spaces"
            ) from None
        outside = next((token for token in ids if not 0 <= token < vocab_size), None)
        if outside is not None:  # before numpy, which cannot hold 10^23
            raise _outside_vocabulary(outside, vocab_size, where)
        rows.append(check_prompt(np.array(ids, dtype=np.int64), vocab_size, where))
    if not rows:
        raise LlamaTrainError(f"{path} holds no prompt (one prompt per line: token ids)")
    return Prompts(rows, f"file {path} ({len(rows)} prompts)")


def check_prompt(ids: np.ndarray, vocab_size: int, where: str) -> np.ndarray:
    """A prompt as a 1-D int64 array, or a one-line error saying what is wrong."""
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise _outside_vocabulary(int(bad[0]), vocab_size, where)
    if ids.size == 0 or ids[0] != START_TOKEN:
        raise LlamaTrainError(
            f"{where}: a prompt starts with the start token {START_TOKEN} (every GSSM "
            "sequence begins with it)"
        )
    return ids


def _outside_vocabulary(token: int, vocab_size: int, where: str) -> LlamaTrainError:
    shown = (
        str(token) if len(str(token)) <= 30 else f"{str(token)[:12]}... ({len(str(token))} digits)"
    )
    return LlamaTrainError(f"{where}: token {shown} is outside the vocabulary 0..{vocab_size - 1}")


def prompts_from_test(spec: DataSpec, n: int, length: int) -> Prompts:
    """The first `length` tokens of test sequences 0..n-1 (each sample continues one)."""
    if length < 1 or length > spec.seq_len:
        raise LlamaTrainError(
            f"--from-test {length}: prompts take 1..{spec.seq_len} tokens of a test sequence"
        )
    eval_set = EvalSet(spec, split="test", max_sequences=n)
    if eval_set.n_sequences < n:
        raise LlamaTrainError(
            f"--n {n} with --from-test: the test split has only {eval_set.n_sequences} sequences"
        )
    rows = next(eval_set.batches(n)).astype(np.int64)[:, :length]
    return Prompts(list(rows), f"first {length} tokens of test sequences 0..{n - 1}", True)


def start_prompts() -> Prompts:
    return Prompts([np.array([START_TOKEN], dtype=np.int64)], "the start token 0")


# -- the model of a run ----------------------------------------------------------------


def load_run_model(
    run_dir: Path, checkpoint: int | None, device: str
) -> tuple[Llama, int, DataSpec]:
    """The model of a run's checkpoint (the newest sound one by default) in eval mode,
    its step and the run's data; from safetensors weights (nothing is unpickled)."""
    config = read_run_config(run_dir)
    weights = read_checkpoint_weights(run_dir, checkpoint)
    torch_device = resolve_device(config.train.model_copy(update={"device": device}), RankInfo())
    return build_model(weights, torch_device), weights.step, resolve_data(config.data)


# -- scoring under the true process ----------------------------------------------------


def true_nll(spec: DataSpec, sequences: Sequence[np.ndarray], test_rows: bool) -> list[np.ndarray]:
    """-log p(x_t | x_<t) (len - 1,) of each sequence under the data's true process.

    Sequences of one length are scored together. A `transition` graph draws its
    kernels per sequence: only samples continuing test rows (test_rows) can be scored,
    each under its own row's kernels.
    """
    graph = spec.graph
    conditionals = spec.store.conditionals() if spec.store is not None else None
    if conditionals is None:
        conditionals = draw_kernels(graph, spec.seed)
    if graph.has_transition and not test_rows:
        raise LlamaTrainError(
            "this data's graph draws a new kernel per sequence (`transition`), so a free "
            "sample has no true likelihood; use --from-test K to continue test sequences"
        )
    kernels = _test_row_kernels(spec, len(sequences)) if graph.has_transition else None
    result: list[np.ndarray] = [np.empty(0)] * len(sequences)
    by_length: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_length.setdefault(len(sequence), []).append(index)
    for indices in by_length.values():
        tokens = np.stack([sequences[i] for i in indices])
        own = None if kernels is None else {k: t[indices] for k, t in kernels.items()}
        try:
            nats = sequence_entropy(graph, conditionals, tokens, transition_kernels=own)
        except GssmDataError as error:
            raise LlamaTrainError(f"scoring samples under the true process: {error}") from None
        for row, index in enumerate(indices):
            result[index] = nats[row]
    return result


def _test_row_kernels(spec: DataSpec, n: int) -> dict[str, np.ndarray]:
    """Transition kernels of test rows 0..n-1, as the sampler drew them."""
    sampler = spec.store.sampler() if spec.store is not None else online_sampler(spec)
    blocks = [
        sampler.transition_kernels(STREAMS["test"], block)
        for block in range(math.ceil(n / sampler.block_size))
    ]
    return {name: np.concatenate([b[name] for b in blocks])[:n] for name in blocks[0]}


# -- the recipe ------------------------------------------------------------------------


def generate_run(
    run_dir: str | Path,
    *,
    n: int = 16,
    max_new_tokens: int | None = None,
    prompts_file: Path | None = None,
    from_test: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    checkpoint: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Draw n samples from a run's model and score each under the true process.

    max_new_tokens None makes samples as long as the data's sequences (or the model's
    context + 1 if shorter) after the longest prompt. on_batch
    (samples done, n) reports progress after every batch of `batch_size` samples.
    """
    if n < 1:
        raise LlamaTrainError(f"--n must be >= 1, got {n}")
    if batch_size < 1:
        raise LlamaTrainError(f"--batch-size must be >= 1, got {batch_size}")
    if seed < 0:  # numpy's seed sequences take non-negative integers only
        raise LlamaTrainError(f"--seed must be >= 0, got {seed}")
    if prompts_file is not None and from_test is not None:
        raise LlamaTrainError("give --prompts FILE or --from-test K, not both")
    if not math.isfinite(temperature) or temperature < 0:
        raise LlamaTrainError(
            f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
    run_dir = Path(run_dir)
    model, step, spec = load_run_model(run_dir, checkpoint, device)
    vocab = model.config.vocab_size or spec.vocab_size
    if prompts_file is not None:
        prompts = read_prompts(prompts_file, vocab)
    elif from_test is not None:
        prompts = prompts_from_test(spec, n, from_test)
    else:
        prompts = start_prompts()
    rows = [prompts.rows[i % len(prompts.rows)] for i in range(n)]
    longest = max(len(r) for r in rows)
    if max_new_tokens is None:  # samples as long as the data's sequences, if the model allows
        max_new_tokens = min(model.rope_cos.size(0) + 1, spec.seq_len) - longest
        if max_new_tokens < 1:
            raise LlamaTrainError(
                f"a prompt of {longest} tokens leaves no room: sequences have {spec.seq_len} "
                f"tokens (model.max_seq_len={model.rope_cos.size(0)}); give --max-new-tokens"
            )
    device_ = model.rope_cos.device
    sequences: list[np.ndarray] = []
    model_nll: list[np.ndarray] = []
    sampler_nll: list[np.ndarray] = []
    for first in range(0, n, batch_size):
        ids = list(range(first, min(first + batch_size, n)))
        decoded = generate_batch(
            model,
            [torch.from_numpy(rows[i]).to(device_) for i in ids],
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            row_ids=ids,
        )
        new = decoded.new_tokens.cpu().numpy()
        sequences.extend(np.concatenate([rows[i], new[j]]) for j, i in enumerate(ids))
        model_nll.extend(decoded.model_nll.cpu().numpy())
        sampler_nll.extend(decoded.sampler_nll.cpu().numpy())
        if on_batch is not None:
            on_batch(ids[-1] + 1, n)
    true = true_nll(spec, sequences, prompts.test_rows)
    curve, method = EvalSet(spec, split="test").entropy_per_position()
    samples = []
    generated_true = []
    for i, sequence in enumerate(sequences):
        length = len(rows[i])
        new_true = true[i][length - 1 :]  # predictions of positions length .. end
        generated_true.append(new_true)
        stop = length - 1 + max_new_tokens
        entropy = float(curve[length - 1 : stop].mean()) if stop <= len(curve) else None
        samples.append(
            Sample(
                prompt_length=length,
                tokens=[int(t) for t in sequence],
                true_nll=float(new_true.mean()),
                model_nll=float(model_nll[i].mean()),
                sampler_nll=float(sampler_nll[i].mean()),
                data_entropy=entropy,
            )
        )
    return GenerationResult(
        run_dir=str(run_dir),
        step=step,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        prompts=prompts.source,
        entropy_method=method,
        samples=samples,
        true_per_position=np.mean(generated_true, axis=0).tolist(),
    )


def write_samples(result: GenerationResult, path: Path) -> None:
    """Samples as text, one sequence per line (prompt + new tokens): the prompt format."""
    lines = "".join(" ".join(map(str, s.tokens)) + "\n" for s in result.samples)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lines)
    except OSError as error:
        raise LlamaTrainError(f"cannot write samples to {path}: {error}") from None
