"""Tables of losses next to the exact entropy, in nats and bits per token."""

from __future__ import annotations

from rich.table import Table

from llama_train.rundir import RunSummary


def figures_table(title: str, rows: list[tuple[str, str, str]], caption: str = "") -> Table:
    """A table of (name, nats, bits) rows."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("")
    table.add_column("nats/token", justify="right")
    table.add_column("bits/token", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def figures_row(name: str, nats: float) -> tuple[str, str, str]:
    """A figure in nats and bits per token."""
    from llama_train.core.evaluate import LN2  # here: keeps `llama-train --help` free of torch

    return name, f"{nats:.4f}", f"{nats / LN2:.4f}"


def entropy_label(method: str) -> str:
    """Row name of the floor: exact, or a known-kernel lower bound for `transition` graphs."""
    return "exact entropy" if method.startswith("exact") else "known-kernel entropy (bound)"


def summary_table(summary: RunSummary) -> Table:
    """The end-of-run table: test loss, exact entropy, excess loss and the data's baselines."""
    from llama_train.core.evaluate import LN2

    method = summary.entropy_method or "unknown"
    rows = [figures_row("test loss", summary.test_loss)]
    if summary.test_entropy is not None and summary.excess_loss is not None:
        rows.append(figures_row(entropy_label(method), summary.test_entropy))
        rows.append(figures_row("excess loss", summary.excess_loss))
    baselines = summary.baselines or {}
    for key, label in (
        ("unigram_bits", "unigram baseline"),
        ("zstd_bits", "zstd baseline"),
        ("gzip_bits", "gzip baseline"),
    ):
        if key in baselines:
            rows.append(figures_row(label, baselines[key] * LN2))
    return figures_table(
        f"step {summary.step}, {summary.eval_sequences} {summary.eval_split} sequences",
        rows,
        caption=f"entropy: {method}",
    )
