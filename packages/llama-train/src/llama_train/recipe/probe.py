"""Probe a trained run's hidden states for the latent state, against the Bayes filter.

The data's exact filtered posterior p(z_t | x_<=t) (``gssm_data.posterior``)
is what an ideal next-token predictor must track: it is the best any probe of
any representation can recover. For every residual stream of the model (token
embeddings, each block's output, the final normed stream) and for all of them
concatenated, two linear probes (``llama_train.core.linear_probe``) are fitted on
test sequences of a store written ``--with-latents``:

- a classifier of the true latent state z_t: accuracy and cross-entropy;
- a regression onto the exact belief vector p(z_t | x_<=t): R^2 and KL.

The hidden state at position t has read x_0 .. x_t, exactly what the
posterior conditions on; position 0 (the fixed start) is left out. Each
figure is set against its ceiling and floors:

- the Bayes filter itself (argmax of the exact posterior vs the true state):
  no probe can beat its accuracy or cross-entropy on average;
- the position-only baseline (the majority state, state frequencies and mean
  belief at each position, learnt from the probe's training sequences);
- shuffled labels: the same probe fitted to the targets of *other* training
  sequences (same positions), scored on the true ones;
- the untrained model: the same probes on the step-0 weights (same seed).

Sequences, never tokens, are split: a quarter of the sequences are held out
for scoring and the penalty is chosen by cross-validation over folds of the
remaining sequences. Memory and time are bounded: by default the first
:data:`DEFAULT_SEQUENCES` test sequences at :data:`DEFAULT_POSITIONS` evenly
spaced positions, and never more positions than fit :data:`MAX_FEATURE_BYTES`
of hidden states.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gssm_data import Store, open_store, split_posterior
from gssm_data.common.humanize import format_duration
from gssm_data.common.resources import available_cpus, describe_threads, set_torch_threads
from llama_train.core import linear_probe
from llama_train.core.checkpoint import CheckpointManager
from llama_train.core.distributed import RankInfo, resolve_device
from llama_train.core.model import Llama, ModelConfig
from llama_train.errors import LlamaTrainError
from llama_train.recipe.train_config import TrainConfig, read_run_config
from llama_train.rundir import CHECKPOINT_DIR, atomic_write

DEFAULT_SEQUENCES = 256
# Positions per sequence (evenly spaced): neighbouring positions share most of their
# context, so more sequences at fewer positions give more independent evidence per fit.
DEFAULT_POSITIONS = 32
DEFAULT_FOLDS = 3
HELD_OUT_FRACTION = 0.25
# Bytes of hidden states kept (float32, every selected stream plus their concatenation).
MAX_FEATURE_BYTES = 1 << 30
# Sequences per forward pass when collecting hidden states.
FORWARD_BATCH = 32
PROBE_DIR = "probe"

Progress = Callable[[int, int, str], None]  # (done, total, what is being fitted)
Announce = Callable[[str], None]  # one start-up line: threads and the time it will take


@dataclass(frozen=True)
class ProbeOptions:
    checkpoint: int | None = None
    layers: str = "all"
    nodes: Sequence[str] | None = None
    data: Path | None = None
    split: str = "test"
    sequences: int = DEFAULT_SEQUENCES
    positions: int | None = DEFAULT_POSITIONS
    folds: int = DEFAULT_FOLDS
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # None: the run's train.threads, else as training chooses


def probe_file(run_dir: Path, step: int, suffix: str) -> Path:
    """Where the report (`.json`) and plot (`.png`) of the checkpoint at `step` go."""
    return run_dir / PROBE_DIR / f"step_{step:06d}{suffix}"


# --- options ---------------------------------------------------------------------------


def stream_names(n_layers: int) -> list[str]:
    """Names of the residual streams `Llama.forward(return_hidden=True)` returns."""
    return ["embedding", *(f"block {i}" for i in range(1, n_layers + 1)), "final norm"]


def parse_layers(text: str, n_layers: int) -> list[int]:
    """`all` or comma-separated stream indices 0 .. n_layers + 1 (0 = embeddings)."""
    last = n_layers + 1
    if text.strip() == "all":
        return list(range(last + 1))
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) > last:
            raise LlamaTrainError(
                f"--layers {text!r}: give `all` or indices 0 .. {last} (0 = token embeddings, "
                f"1 .. {n_layers} = block outputs, {last} = final norm)"
            )
        if int(part) not in chosen:
            chosen.append(int(part))
    return sorted(chosen)


# --- collecting hidden states and targets ----------------------------------------------


def select_positions(
    n_positions: int, n_sequences: int, width: int, wanted: int | None
) -> np.ndarray:
    """Positions of 1 .. n_positions-1, evenly spaced: `wanted` of them, or every one.

    Either way no more than fit :data:`MAX_FEATURE_BYTES` of float32 hidden states
    (`width` floats per position and sequence, kept twice: alone and concatenated).
    """
    every = np.arange(1, n_positions)
    per_position = n_sequences * width * 4 * 2
    count = min(len(every), max(1, MAX_FEATURE_BYTES // per_position), wanted or len(every))
    if count == len(every):
        return every
    return np.unique(np.linspace(1, n_positions - 1, count).round().astype(np.int64))


@torch.no_grad()
def hidden_states(
    model: torch.nn.Module,
    tokens: np.ndarray,
    streams: list[int],
    positions: np.ndarray,
    device: torch.device,
) -> list[np.ndarray]:
    """The selected residual streams at `positions`, (sequences * positions, D) each."""
    model.eval()
    parts: list[list[np.ndarray]] = [[] for _ in streams]
    index = torch.as_tensor(positions, device=device)
    for start in range(0, len(tokens), FORWARD_BATCH):
        batch = torch.as_tensor(tokens[start : start + FORWARD_BATCH], device=device).long()
        hidden = model(batch, return_hidden=True).hidden
        for slot, stream in enumerate(streams):
            picked = hidden[stream].float().index_select(1, index)
            parts[slot].append(picked.reshape(-1, picked.shape[-1]).cpu().numpy())
    return [np.concatenate(chunks) for chunks in parts]


# --- the probes ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRows:
    """The probed rows, (sequence, position) in sequence-major order, split by sequence.

    A quarter of the sequences (seeded) score the probes; every row of a sequence is on
    the same side, and the training sequences are dealt into cross-validation folds.
    """

    sequence: np.ndarray  # (rows,) index among the probed sequences
    position: np.ndarray  # (rows,) position t
    is_train: np.ndarray  # (rows,) bool: fits the probes (else: scores them)
    fold: np.ndarray  # (training rows,) CV fold of each training row
    donor: np.ndarray  # (training rows,) the row whose targets the shuffled control fits
    train_sequences: int
    test_sequences: int


def probe_rows(n_sequences: int, positions: np.ndarray, folds: int, seed: int) -> ProbeRows:
    """Split `n_sequences` x `positions` rows by sequence (see ProbeRows)."""
    if n_sequences < 2 * folds:
        raise LlamaTrainError(
            f"{n_sequences} sequences are too few to probe with {folds} folds; "
            f"use --sequences {4 * folds} or more"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_sequences)
    n_test = max(1, round(HELD_OUT_FRACTION * n_sequences))
    train = order[n_test:]
    fold_of = np.full(n_sequences, -1)
    fold_of[train] = np.arange(len(train)) % folds
    # Shuffled control: each training sequence takes the targets of another one.
    donor_of = np.arange(n_sequences)
    donor_of[train] = rng.permutation(train)
    width = len(positions)
    sequence = np.repeat(np.arange(n_sequences), width)
    is_train = fold_of[sequence] >= 0
    train_rows = np.flatnonzero(is_train)
    return ProbeRows(
        sequence=sequence,
        position=np.tile(positions, n_sequences),
        is_train=is_train,
        fold=fold_of[sequence[train_rows]],
        donor=donor_of[sequence[train_rows]] * width + train_rows % width,
        train_sequences=len(train),
        test_sequences=n_test,
    )


def _probe_pair(
    features: torch.Tensor,
    labels: torch.Tensor,
    beliefs: torch.Tensor,
    is_train: torch.Tensor,
    folds: np.ndarray,
    shuffled_rows: torch.Tensor | None,
) -> dict[str, Any]:
    """Both probes on one feature set: CV, refit on all training rows, scores on held-out."""
    n_states = beliefs.shape[1]
    one_hot = torch.nn.functional.one_hot(labels, n_states).to(features.dtype)
    train_x, test_x = features[is_train], features[~is_train]
    result: dict[str, Any] = {}
    penalty, _ = linear_probe.cross_validate(train_x, one_hot[is_train], folds)
    classifier = linear_probe.fit(train_x, one_hot[is_train], penalty)
    log_p = classifier.log_probs(test_x)
    result["accuracy"] = linear_probe.accuracy(log_p, labels[~is_train])
    result["cross_entropy"] = linear_probe.label_cross_entropy(log_p, labels[~is_train])
    result["classifier_penalty"] = penalty
    soft = beliefs.to(features.dtype)
    penalty_r, _ = linear_probe.cross_validate(train_x, soft[is_train], folds)
    regression = linear_probe.fit(train_x, soft[is_train], penalty_r)
    log_q = regression.log_probs(test_x)
    result["r2"] = linear_probe.r_squared(log_q.exp(), soft[~is_train])
    result["kl"] = linear_probe.kl_divergence(log_q, soft[~is_train])
    result["regression_penalty"] = penalty_r
    if shuffled_rows is not None:
        # Targets of other training sequences at the same positions; true targets to score.
        fake = linear_probe.fit(train_x, one_hot[shuffled_rows], penalty)
        result["shuffled_accuracy"] = linear_probe.accuracy(
            fake.log_probs(test_x), labels[~is_train]
        )
        fake_r = linear_probe.fit(train_x, soft[shuffled_rows], penalty_r)
        result["shuffled_r2"] = linear_probe.r_squared(
            fake_r.log_probs(test_x).exp(), soft[~is_train]
        )
    return result


@dataclass(frozen=True)
class FitSize:
    """One :func:`linear_probe.fit` call: rows fitted, features, states."""

    rows: int
    features: int
    states: int


def planned_fits(
    node_states: Sequence[int], set_widths: Sequence[int], rows: ProbeRows
) -> list[FitSize]:
    """Every fit :func:`probe_run` makes, as :func:`_probe_pair` makes them.

    Per node, feature set and model (trained, untrained), each of the two probes is
    cross-validated (a fit per fold and penalty, on the other folds' rows) and
    refitted on all training rows; the trained model's probes are fitted once more
    to shuffled targets.
    """
    n_train = len(rows.fold)
    fold_sizes = np.bincount(rows.fold)
    penalties = len(linear_probe.PENALTIES)
    fits = []
    for states in node_states:
        for width in set_widths:
            for shuffled in (True, False):  # trained, untrained
                one_probe = [n_train - int(size) for size in fold_sizes for _ in range(penalties)]
                one_probe += [n_train] * (2 if shuffled else 1)
                fits += [FitSize(n, width, states) for n in one_probe * 2]
    return fits


def estimate_seconds(fits: Sequence[FitSize], device: torch.device) -> float:
    """Seconds the fits take, about: each at its iteration cap (most are), with
    :data:`linear_probe.EVALUATIONS_PER_ITERATION` objective evaluations per
    iteration, timed here at the full training size of each (features, states)
    and scaled by the rows. A machine whose load changes meanwhile changes it."""
    n_train = max(fit.rows for fit in fits)
    per_row = {
        (fit.features, fit.states): linear_probe.evaluation_seconds(
            n_train, fit.features, fit.states, device
        )
        / n_train
        for fit in fits
        if fit.rows == n_train
    }
    evaluations = linear_probe.MAX_ITERATIONS * linear_probe.EVALUATIONS_PER_ITERATION
    return sum(evaluations * fit.rows * per_row[fit.features, fit.states] for fit in fits)


def _bayes(labels: np.ndarray, beliefs: np.ndarray) -> dict[str, float]:
    """The filter's own scores: argmax of the exact posterior, and -log posterior(true)."""
    picked = beliefs[np.arange(len(labels)), labels]
    return {
        "accuracy": float((beliefs.argmax(axis=1) == labels).mean()),
        "cross_entropy": float(-np.log(np.maximum(picked, linear_probe.MIN_PROBABILITY)).mean()),
    }


def _position_baseline(
    labels: np.ndarray, beliefs: np.ndarray, position: np.ndarray, is_train: np.ndarray
) -> dict[str, float]:
    """Majority state, add-one state frequencies and mean belief per position (training rows)."""
    n_states = beliefs.shape[1]
    test = ~is_train
    predicted_label = np.empty(len(labels), dtype=np.int64)
    frequencies = np.empty_like(beliefs)
    mean_belief = np.empty_like(beliefs)
    for t in np.unique(position):
        here = position == t
        counts = np.bincount(labels[here & is_train], minlength=n_states)
        predicted_label[here] = counts.argmax()
        frequencies[here] = (counts + 1) / (counts.sum() + n_states)
        mean_belief[here] = beliefs[here & is_train].mean(axis=0)
    log_f = torch.as_tensor(np.log(frequencies[test]))
    log_m = torch.as_tensor(np.log(np.maximum(mean_belief[test], linear_probe.MIN_PROBABILITY)))
    truth = torch.as_tensor(beliefs[test])
    return {
        "accuracy": float((predicted_label[test] == labels[test]).mean()),
        "cross_entropy": linear_probe.label_cross_entropy(log_f, torch.as_tensor(labels[test])),
        "r2": linear_probe.r_squared(torch.as_tensor(mean_belief[test]), truth),
        "kl": linear_probe.kl_divergence(log_m, truth),
    }


# --- the run-level entry point -------------------------------------------------------


def _load_models(
    run_dir: Path, options: ProbeOptions
) -> tuple[int, Llama, Llama, TrainConfig, torch.device]:
    """(step, trained model, untrained model of the same seed, run config, device)."""
    config = read_run_config(run_dir)
    manager = CheckpointManager(run_dir / CHECKPOINT_DIR, keep=None)
    if options.checkpoint is None:
        latest = manager.load_latest()
        if latest is None:
            raise LlamaTrainError(f"{run_dir} has no checkpoint yet; train it first")
        step, state = latest
    else:
        step, state = options.checkpoint, manager.load(options.checkpoint)
    model_config = ModelConfig.model_validate(state.get("model_config", config.model.model_dump()))
    device = resolve_device(config.train.model_copy(update={"device": options.device}), RankInfo())
    trained = Llama(model_config).to(device)
    trained.load_state_dict(state["model"])
    untrained = Llama(model_config, seed=config.run.seed).to(device)  # the run's step 0
    return step, trained, untrained, config, device


def _open_store(path: Path) -> Store:
    store = open_store(path)
    if not store.manifest.with_latents:
        raise LlamaTrainError(
            f"store {path} has no latents to probe for: write it again with the same "
            "options plus --with-latents (same seed, same tokens)"
        )
    return store


def probe_run(
    run_dir: str | Path,
    options: ProbeOptions | None = None,
    *,
    progress: Progress | None = None,
    announce: Announce | None = None,
) -> dict[str, Any]:
    """Probe a run's checkpoint; the report (a JSON-able dict) is also saved with its plot.

    See the module docstring for what is fitted and compared; the report has one entry
    per latent node with the Bayes filter, the position baseline and one row per stream.
    Torch threads follow training's policy (`options.threads`, else the run's
    `train.threads`, else the idle CPUs) for the call; `announce` gets one line
    with the threads and how long the fits will take, before they start.
    """
    options = options or ProbeOptions()
    run_dir = Path(run_dir)
    _check_options(options)
    config = read_run_config(run_dir)
    previous = torch.get_num_threads()
    threads = set_torch_threads(
        options.threads if options.threads is not None else config.train.threads
    )
    try:
        return _probe(run_dir, options, progress, announce, threads)
    finally:
        torch.set_num_threads(previous)


def _probe(
    run_dir: Path,
    options: ProbeOptions,
    progress: Progress | None,
    announce: Announce | None,
    threads: int,
) -> dict[str, Any]:
    step, trained, untrained, config, device = _load_models(run_dir, options)
    store_path = Path(options.data) if options.data is not None else config.data.path
    if store_path is None:
        raise LlamaTrainError(
            f"{run_dir} trained on online data: pass --data STORE (written --with-latents)"
        )
    store = _open_store(store_path)
    nodes = _check_nodes(store, options.nodes)
    n_layers = trained.config.n_layers
    streams = parse_layers(options.layers, n_layers)
    if store.manifest.vocab_size != trained.config.vocab_size:
        raise LlamaTrainError(
            f"the model has vocab_size {trained.config.vocab_size} but {store_path} has "
            f"{store.manifest.vocab_size} tokens; probe on a store of the same vocabulary"
        )
    if options.split not in store.manifest.splits:
        raise LlamaTrainError(f"store {store_path} has no split {options.split!r}")
    n_sequences = min(options.sequences, store.manifest.splits[options.split].n)
    context = min(store.manifest.seq_len, trained.config.max_seq_len)
    width = trained.config.dim * len(streams)
    positions = select_positions(context, n_sequences, width, options.positions)
    rows = probe_rows(n_sequences, positions, options.folds, options.seed)
    tokens = np.asarray(store.tokens(options.split)[:n_sequences])[:, :context]
    features = {
        "trained": hidden_states(trained, tokens, streams, positions, device),
        "untrained": hidden_states(untrained, tokens, streams, positions, device),
    }
    names = stream_names(n_layers)
    # (name, stream index or -1 for the concatenation, slots of `streams` it reads)
    sets = [(names[s], s, [slot]) for slot, s in enumerate(streams)]
    if len(streams) > 1:
        label = "all layers" if len(streams) == n_layers + 2 else "selected layers"
        sets.append((f"{label} (concatenated)", -1, list(range(len(streams)))))
    if announce is not None:
        fits = planned_fits(
            [store.graph.node(name).states for name in nodes],
            [trained.config.dim * len(slots) for _, _, slots in sets],
            rows,
        )
        seconds = estimate_seconds(fits, device)
        announce(
            f"probing {len(sets)} feature sets x {len(nodes)} nodes x 2 models ({len(fits)} "
            f"fits) on {device} with {describe_threads(threads)}: about "
            f"{format_duration(seconds)} at the current load (up to {linear_probe.MAX_ITERATIONS} "
            "L-BFGS iterations per fit)"
        )
    counter = _Counter(len(nodes) * len(sets) * 2, progress)
    report_nodes = {}
    for name in nodes:
        labels, beliefs = _targets(store, options.split, name, n_sequences, positions, device)
        report_nodes[name] = {
            "states": store.graph.node(name).states,
            "bayes": _bayes(labels[~rows.is_train], beliefs[~rows.is_train]),
            "position_baseline": _position_baseline(labels, beliefs, rows.position, rows.is_train),
            "layers": [
                _probe_set(
                    name, set_name, index, slots, features, labels, beliefs, rows, counter, device
                )
                for set_name, index, slots in sets
            ],
        }
    counter.finish()
    report = {
        "run_dir": str(run_dir),
        "step": step,
        "store": str(store_path),
        "split": options.split,
        "sequences": n_sequences,
        "train_sequences": rows.train_sequences,
        "test_sequences": rows.test_sequences,
        "positions": len(positions),
        "position_list": positions.tolist(),
        "folds": options.folds,
        "penalties": list(linear_probe.PENALTIES),
        "seed": options.seed,
        "nodes": report_nodes,
    }
    json_path = probe_file(run_dir, step, ".json")
    _write_json(json_path, report)
    report["plot"] = str(plot_probe(report, probe_file(run_dir, step, ".png")))
    report["report"] = str(json_path)
    return report


def _check_options(options: ProbeOptions) -> None:
    if options.sequences < 1:
        raise LlamaTrainError(f"--sequences must be at least 1, got {options.sequences}")
    if options.positions is not None and options.positions < 1:
        raise LlamaTrainError(
            f"--positions must be positive (0 in the command: every position), got "
            f"{options.positions}"
        )
    if options.folds < 2:
        raise LlamaTrainError(f"--folds must be at least 2, got {options.folds}")
    if options.threads is not None and not 1 <= options.threads <= available_cpus():
        raise LlamaTrainError(
            f"--threads must be 1..{available_cpus()} (the CPUs this process may use), "
            f"got {options.threads}"
        )


def _check_nodes(store: Store, wanted: Sequence[str] | None) -> list[str]:
    latent_names = [node.name for node in store.graph.latents]
    nodes = list(wanted or latent_names)
    unknown = [name for name in nodes if name not in latent_names]
    if unknown:
        raise LlamaTrainError(
            f"--node {unknown[0]!r} is not a latent node of {store.path}; latent nodes: "
            f"{', '.join(latent_names)}"
        )
    return nodes


def _targets(
    store: Store,
    split: str,
    node: str,
    n_sequences: int,
    positions: np.ndarray,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """True states (rows,) and exact beliefs (rows, states) of one node at the probed rows."""
    states = np.asarray(store.latents(split, node)[:n_sequences])[:, positions]
    posterior = split_posterior(store, split, 0, n_sequences, nodes=[node], device=str(device))
    beliefs = posterior.marginals[node][:, positions]
    return states.reshape(-1).astype(np.int64), beliefs.reshape(states.size, -1)


class _Counter:
    """Reports (done, total, what) to the progress callback, one probe set at a time."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def start(self, what: str) -> None:
        if self.progress:
            self.progress(self.done, self.total, what)
        self.done += 1

    def finish(self) -> None:
        if self.progress:
            self.progress(self.total, self.total, "done")


def _probe_set(
    node: str,
    set_name: str,
    index: int,
    slots: list[int],
    features: dict[str, list[np.ndarray]],
    labels: np.ndarray,
    beliefs: np.ndarray,
    rows: ProbeRows,
    counter: _Counter,
    device: torch.device,
) -> dict[str, Any]:
    """Both probes on one feature set, of the trained and of the untrained model."""
    entry: dict[str, Any] = {"layer": set_name, "index": index}
    for kind in ("trained", "untrained"):
        counter.start(f"{node}: {set_name}, {kind}")
        x = torch.as_tensor(np.concatenate([features[kind][slot] for slot in slots], axis=1))
        entry[kind] = _probe_pair(
            x.to(device),
            torch.as_tensor(labels, device=device),
            torch.as_tensor(beliefs, device=device, dtype=torch.float32),
            torch.as_tensor(rows.is_train, device=device),
            rows.fold,
            torch.as_tensor(rows.donor, device=device) if kind == "trained" else None,
        )
    return entry


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(strict_json(report), indent=1))


# --- the plot ----------------------------------------------------------------------------


def plot_probe(report: dict[str, Any], out: Path) -> Path:
    """Accuracy and R^2 by layer for every probed node, with the Bayes ceiling and floors."""
    from llama_train.scaling.plots import pyplot

    plt = pyplot()
    nodes = report["nodes"]
    figure, axes = plt.subplots(
        len(nodes), 2, figsize=(11, 3.6 * len(nodes)), squeeze=False, sharex=True
    )
    for row, (name, node) in enumerate(nodes.items()):
        layers = node["layers"]
        xs = range(len(layers))
        labels = [layer["layer"].replace(" (concatenated)", "\n(concat)") for layer in layers]
        for column, (metric, shuffled, title) in enumerate(
            (("accuracy", "shuffled_accuracy", "accuracy"), ("r2", "shuffled_r2", "R²"))
        ):
            axis = axes[row][column]
            axis.plot(xs, [entry["trained"][metric] for entry in layers], "o-", label="trained")
            axis.plot(
                xs, [entry["untrained"][metric] for entry in layers], "s--", label="untrained"
            )
            axis.plot(
                xs,
                [entry["trained"][shuffled] for entry in layers],
                "x:",
                color="grey",
                label="shuffled labels",
            )
            ceiling = node["bayes"]["accuracy"] if metric == "accuracy" else 1.0
            axis.axhline(
                ceiling, color="black", linestyle="--", label=f"Bayes filter {ceiling:.3f}"
            )
            floor = node["position_baseline"][metric]
            axis.axhline(floor, color="tab:red", linestyle=":", label=f"position only {floor:.3f}")
            axis.set_title(f"{name} ({node['states']} states): {title} of the linear probe")
            axis.set_xticks(list(xs), labels, fontsize="small")
            axis.grid(alpha=0.3)
            if metric == "r2":
                axis.set_ylim(min(0.0, *(entry["untrained"][metric] for entry in layers)), 1.05)
            axis.legend(fontsize="x-small")
    figure.suptitle(
        f"{Path(report['run_dir']).name}, step {report['step']}: probes on "
        f"{report['test_sequences']} held-out of {report['sequences']} {report['split']} "
        f"sequences x {report['positions']} positions",
        fontsize="medium",
    )
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, image.getvalue())
    return out


def strict_json(value: Any) -> Any:
    """JSON has no NaN: an undefined metric (a target without variance) becomes null."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
