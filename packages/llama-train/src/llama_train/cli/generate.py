"""`llama-train generate`: samples of a run, scored under the true generating process.

A thin command over :func:`llama_train.recipe.generate.generate_run`; importing this module
registers it on the `llama-train` app (`llama_train.cli` does).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from gssm_data.common.progress import progress_display, progress_mode
from llama_train.cli.app import app, console, err_console, user_errors
from llama_train.errors import LlamaTrainError

if TYPE_CHECKING:
    from llama_train.recipe.generate import GenerationResult

# Off a terminal, a progress line at most this often.


@app.command("generate")
def generate_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (run.dir of a training run).")],
    n: Annotated[
        int, typer.Option("--n", help="Samples to draw; sample i continues prompt i mod P.")
    ] = 16,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(help="New tokens per sample; default: up to the data's sequence length."),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="Prompt file: one prompt per line, token ids separated by spaces, each "
            "starting with the start token 0 ('#' lines skipped). Default: the prompt '0'."
        ),
    ] = None,
    from_test: Annotated[
        int | None,
        typer.Option(help="Prompts = the first K tokens of test sequences 0..n-1.", metavar="K"),
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="Softmax temperature; 0 = greedy, 1 = the model's own law.")
    ] = 1.0,
    top_k: Annotated[
        int | None, typer.Option(min=1, help="Sample among the k most likely tokens only.")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Sampling seed; sample i draws from its own stream (seed, i).")
    ] = 0,
    checkpoint: Annotated[
        int | None, typer.Option(help="Step of the checkpoint; default the latest.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Samples decoded together (does not change them).")
    ] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[
        Path | None,
        typer.Option(help="Write the samples here, one per line in the prompt-file format."),
    ] = None,
    show: Annotated[int, typer.Option(min=0, help="Samples listed in the table.")] = 8,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print everything (every sample) as JSON.")
    ] = False,
) -> None:
    """Sample from a run's model (KV cache, all prompts in one batch) and score the samples.

    Every sample is scored under the data's true process: its exact negative
    log-likelihood per generated token, -log p(x_t | x_<t), beside the data's exact
    entropy at the same positions, the model's own NLL of the sample and its NLL
    under the sampler's law (temperature and top-k applied). True NLL - sampler NLL
    estimates the per-token KL of the samples' distribution from the process. At
    temperature 1 a model that learned the process gives true NLL = entropy.
    """
    from llama_train.recipe.generate import generate_run, write_samples

    with user_errors():
        if device not in ("auto", "cpu", "cuda"):
            raise LlamaTrainError(f"--device {device!r}: choose auto, cpu or cuda")
        with _progress(n) as report:
            result = generate_run(
                run_dir,
                n=n,
                max_new_tokens=max_new_tokens,
                prompts_file=prompts,
                from_test=from_test,
                temperature=temperature,
                top_k=top_k,
                seed=seed,
                checkpoint=checkpoint,
                batch_size=batch_size,
                device=device,
                on_batch=report,
            )
        if out is not None:
            write_samples(result, out)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    console.print(summary_table(result))
    if show:
        console.print(samples_table(result, show))
    if out is not None:
        console.print(f"wrote {result.n} samples to {out}", highlight=False)


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int, int], None]]:
    """Samples generated: a bar on a terminal, a line every GSSM_PROGRESS_EVERY s in a log."""
    with progress_display(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        mode=progress_mode(),
        transient=True,
    ) as bar:
        task = bar.add_task("generate", total=total)
        yield lambda done, _total: bar.update(task, completed=done)


def _nats_bits(value: float | None) -> tuple[str, str]:
    from llama_train.core.evaluate import LN2

    if value is None:
        return "-", "-"
    return f"{value:.4f}", f"{value / LN2:.4f}"


def summary_table(result: GenerationResult) -> Table:
    """True NLL of the samples against the data's entropy, the model's and the sampler's
    NLL of them, and the KL of the sampler's law from the process."""
    figures = result.summary()
    top_k = "" if result.top_k is None else f", top-k {result.top_k}"
    table = Table(
        title=f"step {result.step}: {result.n} samples x {result.max_new_tokens} new tokens, "
        f"temperature {result.temperature:g}{top_k}, seed {result.seed}",
        title_justify="left",
        caption=f"prompts: {result.prompts}; entropy: {result.entropy_method}; per generated token",
        caption_justify="left",
    )
    table.add_column("")
    table.add_column("nats/token", justify="right")
    table.add_column("bits/token", justify="right")
    stderr = figures["true_nll_stderr"] or 0.0
    rows = [
        ("true NLL of the samples (under the GSSM)", figures["true_nll"]),
        ("  its standard error over samples", stderr),
        ("data's exact entropy, same positions", figures["data_entropy"]),
        ("true NLL - entropy", figures["true_minus_entropy"]),
        ("model NLL of the samples (temperature 1)", figures["model_nll"]),
        ("sampler NLL (temperature and top-k applied)", figures["sampler_nll"]),
        ("true NLL - sampler NLL: KL(sampler || process)", figures["sampler_kl"]),
        ("  its standard error over samples", figures["sampler_kl_stderr"]),
    ]
    for name, value in rows:
        table.add_row(name, *_nats_bits(value))
    return table


def samples_table(result: GenerationResult, show: int) -> Table:
    """The first `show` samples: their prompt, scores and tokens."""
    table = Table(title=f"first {min(show, result.n)} samples (nats/token)", title_justify="left")
    for name in ("#", "prompt", "true NLL", "model NLL", "entropy"):
        table.add_column(name, justify="right")
    table.add_column("generated tokens")
    for index, sample in enumerate(result.samples[:show]):
        new = sample.tokens[sample.prompt_length :]
        text = " ".join(map(str, new[:20])) + (" ..." if len(new) > 20 else "")
        entropy = "-" if sample.data_entropy is None else f"{sample.data_entropy:.3f}"
        table.add_row(
            str(index),
            f"{sample.prompt_length} tok",
            f"{sample.true_nll:.3f}",
            f"{sample.model_nll:.3f}",
            entropy,
            text,
        )
    return table
