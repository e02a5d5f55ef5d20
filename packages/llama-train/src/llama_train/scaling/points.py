"""The table of a study: one row per finished (regime, model, data, seed) point.

Each point of a study trains once per learning rate; the row keeps the learning rate
whose final checkpoint has the lowest loss on the held-out validation slice (the end
of the train split, see :mod:`llama_train.launch.study`) and reports that run's test
loss. Columns (losses in nats per predicted token, ``*_bits`` in bits):

regime, model, N (the parameter count the fits use: total by default, see
:data:`PARAMETER_COUNTS`), N_total (embeddings and head included), N_non_embedding
(the input embedding left out, the head kept), N_count (which of the two N is),
D (unique training tokens; a cooldown branch's: the tokens it read), lr (the best
tried), lr_opt (the optimum interpolated in log lr: :func:`interpolate_optimum`),
lr_edge (low or high when the best is the sweep's smallest or largest lr: widen it),
seeds and loss_seed_std (the spread of the test loss over the seeds of the same
regime, model and data size),
n_train, tokens (seen), epochs, flops_6nd, flops_attention, flops, lr, seed, steps,
val_loss, loss (final test loss), entropy (exact, same test sequences), excess
(loss - entropy), loss_bits, entropy_bits, excess_bits, lr_tried, run_dir, group (the
run group a bootstrap resamples together: a cooldown branch's trunk, named by the point's
``trunk`` (or an explicit ``group``); otherwise the point itself).

Reads JSON files only (study.json, summary.json, validation.json): no torch.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llama_train.errors import LlamaTrainError
from llama_train.rundir import atomic_write, read_validation, sound_summary

LN2 = math.log(2.0)
# What N counts: total parameters by default (the Chinchilla count; Pearce & Song 2024 and
# Porian et al. 2024 show that the non-embedding count biases small-scale exponents).
PARAMETER_COUNTS = ("total", "non-embedding")
COLUMNS = (
    "regime",
    "model",
    "N",
    "N_total",
    "N_non_embedding",
    "N_count",
    "D",
    "n_train",
    "tokens",
    "epochs",
    "flops_6nd",
    "flops_attention",
    "flops",
    "lr",
    "lr_opt",
    "lr_edge",
    "seed",
    "seeds",
    "loss_seed_std",
    "steps",
    "val_loss",
    "loss",
    "entropy",
    "excess",
    "loss_bits",
    "entropy_bits",
    "excess_bits",
    "lr_tried",
    "run_dir",
    "group",
)

# Bounds on a table a fit reads: a scaling-law table has one row per run (hundreds, a
# few thousand with cooldown branches and seeds). Beyond these the file is not such a
# table, and reading it whole would cost unbounded memory (/dev/zero, a log file).
MAX_TABLE_BYTES = 16 * 1024 * 1024
MAX_TABLE_ROWS = 5000


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def point_rows(
    directory: str | Path, record: dict[str, Any], *, parameters: str = "total"
) -> list[dict[str, Any]]:
    """Every finished run of a study (one per learning rate), with its validation loss.

    `parameters` chooses what the N column counts (:data:`PARAMETER_COUNTS`).
    """
    _check_count(parameters)
    directory = Path(directory)
    rows = []
    for point in record["points"]:
        run_dir = directory / point["name"]
        summary = sound_summary(run_dir)
        if summary is None or summary.step != point["steps"]:
            continue
        loss, entropy = summary.test_loss, summary.test_entropy
        if entropy is None or not all(_is_number(value) for value in (loss, entropy)):
            continue  # a damaged summary: not a result (study collect names the point)
        validation = read_validation(run_dir)
        total = summary.parameters_total
        # A cooldown branch read a part of its trunk's prefix once: D is what it read.
        unique, epochs = summary.unique_tokens, summary.epochs
        if point.get("trunk") and summary.unique_tokens_seen:
            unique = summary.unique_tokens_seen
            epochs = (summary.tokens_seen or unique) / unique
        non_embedding = summary.parameters_non_embedding
        rows.append(
            {
                "regime": point["regime"],
                "model": point["model"],
                "N": total if parameters == "total" else non_embedding,
                "N_total": total,
                "N_non_embedding": non_embedding,
                "N_count": parameters,
                "D": unique,
                "n_train": point["n_train"],
                "tokens": summary.tokens_seen,
                "epochs": epochs,
                "flops_6nd": summary.flops_6nd,
                "flops_attention": summary.flops_attention,
                "flops": summary.flops,
                "lr": point["lr"],
                "seed": point["seed"],
                "steps": point["steps"],
                "val_loss": None if validation is None else validation.loss,
                "loss": loss,
                "entropy": entropy,
                "excess": loss - entropy,
                "loss_bits": loss / LN2,
                "entropy_bits": entropy / LN2,
                "excess_bits": (loss - entropy) / LN2,
                "run_dir": str(run_dir),
                "group": point.get("group") or point.get("trunk") or point["name"],
            }
        )
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def select_best_lr(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (regime, model, n_train, seed): the lr with the lowest validation loss.

    A group whose runs lack a validation loss is left out (validate them first:
    ``llama-train study collect`` does). Order: regime, model, n_train, seed as
    first met in the study. Each row also gets lr_opt and lr_edge
    (:func:`interpolate_optimum`), then seeds and loss_seed_std (:func:`add_seed_noise`).
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["regime"], row["model"], row["n_train"], row["seed"])
        groups.setdefault(key, []).append(row)
    best = []
    for runs in groups.values():
        scored = [run for run in runs if isinstance(run["val_loss"], int | float)]
        if not scored:
            continue
        winner = min(scored, key=lambda run: (run["val_loss"], run["lr"]))
        lr_opt, edge = interpolate_optimum([(run["lr"], run["val_loss"]) for run in scored])
        best.append({**winner, "lr_tried": len(runs), "lr_opt": lr_opt, "lr_edge": edge})
    return add_seed_noise(best)


def interpolate_optimum(sweep: list[tuple[float, float]]) -> tuple[float, str]:
    """The lr of lowest loss from (lr, validation loss) pairs, interpolated in log lr.

    The parabola through the best lr and its two neighbours (in log lr) has its
    vertex between those neighbours: that is the optimum. A best lr at either end
    of a sweep of two or more cannot be interpolated: it is returned as it is with
    the edge it sits on ("low" or "high"), a sign that the true optimum lies
    outside the sweep (widen it). One lr alone is no sweep: no edge.
    """
    points = sorted(sweep)
    index = min(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    best = points[index][0]
    if len(points) < 2:
        return best, ""
    if index == 0:
        return best, "low"
    if index == len(points) - 1:
        return best, "high"
    (x0, y0), (x1, y1), (x2, y2) = [
        (math.log(lr), loss) for lr, loss in points[index - 1 : index + 2]
    ]
    # Newton form: y = y0 + slope01 (x - x0) + curvature (x - x0)(x - x1).
    slope01, slope12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    curvature = (slope12 - slope01) / (x2 - x0)
    if curvature <= 0:  # flat: every point of the three is as good
        return best, ""
    vertex = (x0 + x1) / 2 - slope01 / (2 * curvature)
    return math.exp(min(max(vertex, x0), x2)), ""


def add_seed_noise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with `seeds` and `loss_seed_std`: the sample standard deviation of the
    test loss over the seeds of its (regime, model, n_train) point (None with one seed)."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    for row in rows:
        groups.setdefault((row["regime"], row["model"], row["n_train"]), []).append(row["loss"])
    result = []
    for row in rows:
        losses = groups[(row["regime"], row["model"], row["n_train"])]
        std = None
        if len(losses) > 1:
            mean = math.fsum(losses) / len(losses)
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in losses) / (len(losses) - 1))
        result.append({**row, "seeds": len(losses), "loss_seed_std": std})
    return result


def _check_count(parameters: str) -> None:
    if parameters not in PARAMETER_COUNTS:
        raise LlamaTrainError(
            f"unknown parameter count {parameters!r}: choose {' or '.join(PARAMETER_COUNTS)}"
        )


def collect(
    directory: str | Path, *, every_lr: bool = False, parameters: str = "total"
) -> list[dict[str, Any]]:
    """The study's table (best lr per point, or every run with `every_lr`); N counts
    `parameters` (total by default, or non-embedding)."""
    directory = Path(directory)
    record = _read(directory / "study.json")
    if record is None or not isinstance(record.get("points"), list):
        raise LlamaTrainError(
            f"{directory} is not a study directory (no readable study.json); "
            "give the directory `llama-train study run` printed"
        )
    rows = point_rows(directory, record, parameters=parameters)
    if every_lr:
        return [{**row, "lr_tried": 1, "lr_opt": row["lr"], "lr_edge": ""} for row in rows]
    return select_best_lr(rows)


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format(row.get(key)) for key in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, text.getvalue())  # never a half-written table (a full disk)


def _format(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def read_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV's header and rows (strings); unreadable, empty or oversized files are one-line
    errors.

    Only a regular file of at most MAX_TABLE_BYTES with at most MAX_TABLE_ROWS rows is
    read (a directory, a FIFO or a device is refused before it is opened, so nothing
    blocks or grows). Larger tables are refused rather than subsampled: a fit on a
    silent subsample would report intervals of a table nobody chose.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise LlamaTrainError(f"table not found: {path}") from None
    except OSError as error:
        raise LlamaTrainError(f"cannot read {path}: {error.strerror or error}") from None
    if stat.S_ISDIR(info.st_mode):
        raise LlamaTrainError(f"{path} is a directory: give the CSV file (e.g. points.csv)")
    if not stat.S_ISREG(info.st_mode):
        raise LlamaTrainError(f"{path} is not a regular file (a FIFO or a device): give a CSV file")
    if info.st_size > MAX_TABLE_BYTES:
        raise LlamaTrainError(
            f"{path} is {info.st_size / 2**20:.1f} MiB; a table of runs is at most "
            f"{MAX_TABLE_BYTES // 2**20} MiB: is it the right file?"
        )
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            text = handle.read(MAX_TABLE_BYTES + 1)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = list(reader.fieldnames or [])
        rows = list(itertools.islice(reader, MAX_TABLE_ROWS + 1))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LlamaTrainError(f"cannot read {path} as CSV: {error}") from None
    if len(text) > MAX_TABLE_BYTES:
        raise LlamaTrainError(f"{path} grew past {MAX_TABLE_BYTES // 2**20} MiB while it was read")
    if not header:
        raise LlamaTrainError(f"{path} is empty (no header line)")
    if not rows:
        raise LlamaTrainError(f"{path} has a header but no rows")
    if len(rows) > MAX_TABLE_ROWS:
        raise LlamaTrainError(
            f"{path} has more than {MAX_TABLE_ROWS} rows: a fit takes one row per run "
            "(average repeated evaluations first, or fit one regime with --regime)"
        )
    return header, rows


def numeric_column(
    rows: list[dict[str, str]],
    header: list[str],
    name: str,
    path: Path,
    *,
    empty: float | None = None,
) -> list[float]:
    """A column as finite floats; a missing column or a bad cell names the row.

    `empty` (NaN, say) is what an empty cell reads as; left None, an empty cell is an error.
    """
    if name not in header:
        raise LlamaTrainError(
            f"{path} has no column {name!r}; columns: {', '.join(header)} "
            "(map others with --n-col, --d-col, --loss-col, --entropy-col)"
        )
    values = []
    for line, row in enumerate(rows, start=2):
        text = (row.get(name) or "").strip()
        if not text and empty is not None:
            values.append(empty)
            continue
        try:
            value = float(text)
        except ValueError:
            raise LlamaTrainError(f"{path} line {line}: {name}={text!r} is not a number") from None
        if not math.isfinite(value):
            raise LlamaTrainError(f"{path} line {line}: {name}={text} is not finite")
        values.append(value)
    return values
