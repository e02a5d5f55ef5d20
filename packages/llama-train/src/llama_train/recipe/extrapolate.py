"""Length extrapolation: a trained model on sequences longer than it was trained on.

`llama-train eval RUN --data LONG --rope-scaling METHODS` reads a store of
longer sequences drawn from the run's own process (`gssm-data extend`), and
for each rotary scaling method (`core.rope`) rebuilds the model with a
rotary table as long as the store's sequences, loads the trained weights
(the tables are not weights) and measures the loss at every position. The
store knows the exact entropy at every position, so the result is the excess
loss by position: how far the model is from the best possible prediction,
before and after the training length. The exact entropy is computed once and
shared by every method (`evaluate.EvalSet`).

The store must come from the run's process (same graph, seed and conditional
tables): anything else would measure a change of distribution, not of length.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gssm_data import BLOCK_SIZE, GssmDataError, Manifest, Store, fingerprint, open_store
from llama_train.core.data import DataSpec, resolve_data
from llama_train.core.distributed import RankInfo, resolve_amp, resolve_device
from llama_train.core.evaluate import LN2, EvalSet, evaluate
from llama_train.core.model import Llama, ModelConfig
from llama_train.core.rope import ROPE_METHODS, RopeScaling, rotary_frequencies
from llama_train.errors import LlamaTrainError
from llama_train.recipe.loading import read_checkpoint_weights
from llama_train.recipe.train_config import read_run_config

PLOT_FILE = "extrapolation.png"


def parse_methods(text: str) -> list[str]:
    """`yarn`, `none,linear,yarn` or `all` -> method names, in the order given, no repeats."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(ROPE_METHODS)
    unknown = [name for name in names if name not in ROPE_METHODS]
    if unknown or not names:
        raise LlamaTrainError(
            f"--rope-scaling {text!r}: choose from {', '.join(ROPE_METHODS)} "
            "(a comma-separated list), or all"
        )
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class MethodCurve:
    """One scaling method's loss at every predicted position 1 .. L-1 (nats)."""

    method: str
    factor: float
    attention_factor: float
    loss: float
    loss_per_position: list[float]


@dataclass(frozen=True)
class ExtrapolationResult:
    """Every method's loss curve next to the exact entropy of the same long sequences."""

    run_dir: str
    step: int
    data: str
    train_seq_len: int  # the model's trained context (tokens, start token included)
    seq_len: int  # the long store's
    n_sequences: int
    entropy_method: str
    entropy: float
    entropy_per_position: list[float]
    curves: list[MethodCurve]

    @property
    def trained_positions(self) -> int:
        """Predicted positions seen in training: 1 .. train_seq_len - 1."""
        return self.train_seq_len - 1

    def excess_per_position(self, curve: MethodCurve) -> np.ndarray:
        return np.asarray(curve.loss_per_position) - np.asarray(self.entropy_per_position)

    def ranges(self) -> list[tuple[int, int]]:
        """Positions in runs of the trained length: (1, T-1), (T, 2(T-1)), ... up to L-1."""
        width, last = self.trained_positions, self.seq_len - 1
        return [(first, min(first + width - 1, last)) for first in range(1, last + 1, width)]

    def excess_by_range(self, curve: MethodCurve) -> list[float]:
        """Mean excess (nats) over the positions of each of `ranges()`."""
        excess = self.excess_per_position(curve)
        return [float(excess[first - 1 : last].mean()) for first, last in self.ranges()]

    def to_dict(self) -> dict[str, Any]:
        """Everything, plus excess curves and range means in nats and bits (for --json)."""
        data = asdict(self)
        data["ranges"] = self.ranges()
        for curve, entry in zip(self.curves, data["curves"], strict=True):
            excess = self.excess_per_position(curve)
            by_range = self.excess_by_range(curve)
            entry |= {
                "excess": float(excess.mean()),
                "excess_bits": float(excess.mean()) / LN2,
                "excess_per_position": excess.tolist(),
                "excess_by_range": by_range,
                "excess_by_range_bits": [value / LN2 for value in by_range],
            }
        return data


# --- inputs ---------------------------------------------------------------------


def _open_long_store(path: Path) -> Store:
    try:
        return open_store(path)
    except GssmDataError as error:
        raise LlamaTrainError(str(error)) from None


def _run_fingerprint(run: DataSpec) -> str:
    if run.store is not None:
        return run.store.manifest.fingerprint
    return fingerprint(run.graph, run.seed, run.seq_len, BLOCK_SIZE)


def _run_data(config: Any, run_dir: Path, data: Path) -> DataSpec:
    """What the run trained on (its store, or its online graph and seed)."""
    try:
        return resolve_data(config.data)
    except LlamaTrainError as error:
        raise LlamaTrainError(
            f"cannot check that {data} comes from the process {run_dir} learned: {error}"
        ) from None


def check_lineage(long: Store, run: DataSpec, run_dir: Path) -> None:
    """Refuse, in one line, a store that was not drawn from the process the run learned.

    Same vocabulary, graph, seed and (when the run trained on a store) the
    very conditional tables; a store made by `gssm-data extend` from the run's
    store passes, and so does one `gssm-data generate` made at a longer
    seq_len with the run's graph and seed.
    """
    m: Manifest = long.manifest
    origin = (
        f"extended from fingerprint {m.parent.fingerprint}"
        if m.parent is not None
        else f"fingerprint {m.fingerprint}"
    )
    remedy = (
        f"make one with `gssm-data extend {run.store.path} --seq-len L`"
        if run.store is not None
        else "generate one with the run's graph and seed at a longer --seq-len"
    )
    expected = f"{run_dir} trained on fingerprint {_run_fingerprint(run)}"
    if m.vocab_size != run.vocab_size:
        raise LlamaTrainError(
            f"{long.path} has vocab_size {m.vocab_size} but {run_dir} trained on "
            f"{run.vocab_size} tokens: not the run's process ({origin}; {expected}); {remedy}"
        )
    skip = {"description"}
    same_graph = m.graph.model_dump(exclude=skip) == run.graph.model_dump(exclude=skip)
    same_tables = same_graph and m.seed == run.seed
    if same_tables and run.store is not None:
        same_tables = all(
            np.array_equal(long.conditional(name), table)
            for name, table in run.store.conditionals().items()
        )
    if not same_tables:
        what = "graph" if not same_graph else "seed" if m.seed != run.seed else "tables"
        raise LlamaTrainError(
            f"{long.path} was not drawn from the process {run_dir} learned (other {what}; "
            f"{origin}; {expected}); {remedy}"
        )


def _load_weights(run_dir: Path, checkpoint: int | None) -> tuple[int, ModelConfig, dict]:
    """Step, architecture and weights of a checkpoint (the latest by default).

    Read from the checkpoint's safetensors weights: nothing is unpickled.
    """
    weights = read_checkpoint_weights(run_dir, checkpoint)
    return weights.step, weights.model_config, weights.state


def check_context(run_dir: str | Path, data: str | Path) -> None:
    """Before a plain evaluation: a store longer than the model's context needs --rope-scaling."""
    context = read_run_config(run_dir).model.max_seq_len
    seq_len = _open_long_store(Path(data)).manifest.seq_len
    if context is not None and seq_len > context:
        raise LlamaTrainError(
            f"{data} has sequences of {seq_len} tokens, longer than the model's context "
            f"({context}): add --rope-scaling {'|'.join(ROPE_METHODS)} (or all) to evaluate "
            "beyond the training length"
        )


# --- the evaluation -----------------------------------------------------------------


def extrapolate_run(
    run_dir: str | Path,
    data: str | Path,
    methods: list[str],
    *,
    factor: float | None = None,
    checkpoint: int | None = None,
    split: str = "test",
    max_sequences: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> ExtrapolationResult:
    """Evaluate a run's checkpoint on a longer store once per rotary scaling method.

    `factor` defaults to the ratio of predicted positions, (L - 1) / (T - 1)
    (8 for 1025 against 129), and is 1 for `none`; the original length of every
    method is the model's trained context T. `log` receives a line as each
    method finishes (minutes each on a CPU for long sequences).
    """
    say = log or (lambda message: None)
    run_dir, data = Path(run_dir), Path(data)
    config = read_run_config(run_dir)
    step, trained, weights = _load_weights(run_dir, checkpoint)
    long = _open_long_store(data)
    check_lineage(long, _run_data(config, run_dir, data), run_dir)
    assert trained.max_seq_len is not None  # a trained model's config is complete
    seq_len = long.manifest.seq_len
    if factor is None:
        factor = max(1.0, (seq_len - 1) / (trained.max_seq_len - 1))
    if not (math.isfinite(factor) and factor >= 1):
        raise LlamaTrainError(f"--factor must be a finite number >= 1, got {factor}")
    spec = DataSpec(
        source="zarr",
        vocab_size=long.manifest.vocab_size,
        seq_len=seq_len,
        graph=long.graph,
        seed=long.manifest.seed,
        store=long,
    )
    eval_set = EvalSet(spec, split=split, max_sequences=max_sequences)
    torch_device = resolve_device(config.train.model_copy(update={"device": device}), RankInfo())
    amp = resolve_amp(config.train.amp, torch_device)
    batch = batch_size or config.eval.batch_size or config.data.batch_size
    curves, entropy, entropy_method = [], None, ""
    say(
        f"evaluating step {step} on {eval_set.n_sequences} sequences of {seq_len} tokens "
        f"(trained on {trained.max_seq_len}) with {len(methods)} rotary scaling(s)"
    )
    for index, method in enumerate(methods, start=1):
        started = time.perf_counter()
        scaling = RopeScaling(
            method=method,
            factor=1.0 if method == "none" else factor,
            original_max_seq_len=trained.max_seq_len,
        )
        model = _scaled_model(trained, weights, scaling, max(seq_len, trained.max_seq_len))
        result = evaluate(
            model.to(torch_device),
            eval_set,
            step=step,
            batch_size=batch,
            device=torch_device,
            amp_dtype=amp,
        )
        attention = scaling.apply(
            rotary_frequencies(trained.head_dim, trained.rope_theta), trained.max_seq_len
        ).attention_factor
        curves.append(
            MethodCurve(method, scaling.factor, attention, result.loss, result.loss_per_position)
        )
        entropy, entropy_method = result.entropy_per_position, result.entropy_method
        say(
            f"[{index}/{len(methods)}] {method} x{scaling.factor:g}: loss {result.loss:.4f}, "
            f"excess {result.excess:.4f} nats ({time.perf_counter() - started:.0f} s)"
        )
    assert entropy is not None
    return ExtrapolationResult(
        run_dir=str(run_dir),
        step=step,
        data=str(data),
        train_seq_len=trained.max_seq_len,
        seq_len=seq_len,
        n_sequences=eval_set.n_sequences,
        entropy_method=entropy_method,
        entropy=float(np.mean(entropy)),
        entropy_per_position=list(entropy),
        curves=curves,
    )


def _scaled_model(
    trained: ModelConfig, weights: dict, scaling: RopeScaling, max_seq_len: int
) -> Llama:
    """The trained model with a rotary table of `max_seq_len` positions, scaled as asked."""
    raw = trained.model_dump() | {"max_seq_len": max_seq_len, "rope_scaling": scaling}
    model = Llama(ModelConfig.model_validate(raw))
    model.load_state_dict(weights)
    return model


# --- the picture ----------------------------------------------------------------------


def smoothing_window(result: ExtrapolationResult) -> int:
    """Positions averaged per plotted point: 1/16 of the trained length (at least 1)."""
    return max(1, result.trained_positions // 16)


def plot_extrapolation(result: ExtrapolationResult, out: str | Path) -> Path:
    """Excess loss by position, one curve per method, the training length marked; a PNG.

    Each curve is a moving average over `smoothing_window` positions (single
    positions average only n_sequences tokens each); nats on the left axis,
    bits on the right.
    """
    from llama_train.scaling.plots import pyplot

    plt = pyplot()
    window = smoothing_window(result)
    kernel = np.ones(window) / window
    figure, axis = plt.subplots(figsize=(9, 4.8))
    for curve in result.curves:
        excess = np.convolve(result.excess_per_position(curve), kernel, mode="valid")
        positions = np.arange(len(excess)) + (window + 1) / 2  # centre of each window
        label = curve.method if curve.method == "none" else f"{curve.method} (x{curve.factor:g})"
        axis.plot(positions, excess, label=label, linewidth=1.2)
    axis.axvline(result.trained_positions, color="black", linestyle="--", linewidth=1)
    axis.annotate(
        f"training length ({result.trained_positions})",
        (result.trained_positions, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, -12),
        textcoords="offset points",
        fontsize="small",
    )
    axis.axhline(0.0, color="grey", linewidth=0.8, label="_exact entropy")  # the floor
    axis.set_ylim(bottom=min(0.0, axis.get_ylim()[0]))
    axis.set_xlim(1, result.seq_len - 1)
    axis.set_xlabel("position t (predicting x_t from x_<t)")
    axis.set_ylabel("excess loss (model - exact entropy), nats")
    bits = axis.secondary_yaxis("right", functions=(lambda n: n / LN2, lambda b: b * LN2))
    bits.set_ylabel("bits")
    axis.set_title(
        f"{Path(result.run_dir).name} (step {result.step}): excess over the exact entropy, "
        f"{result.n_sequences} sequences, mean of {window} positions",
        fontsize="medium",
    )
    axis.legend(fontsize="small", title="rope scaling", title_fontsize="small")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target
