"""`llama-train export`: a run's model as a Hugging Face folder or a plain state dict.

Importing this module registers the command on the `llama-train` app (cli/__init__.py does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llama_train.cli.app import app, console, user_errors


@app.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (run.dir of a training run).")],
    out: Annotated[
        Path,
        typer.Option(
            help="Folder to write; a non-empty folder is replaced only if it is a previous export."
        ),
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf: a transformers LlamaForCausalLM folder (config.json + model.safetensors); "
            "state-dict: our own parameter names in model.safetensors, the architecture in "
            "its header (llama_train.core.weights.read_weights reads it back).",
        ),
    ] = "hf",
    checkpoint: Annotated[
        int | None, typer.Option(help="Step of the checkpoint to export; default the latest.")
    ] = None,
) -> None:
    """Export a checkpoint's model weights (safetensors; nothing in the run is unpickled).

    The hf folder loads with transformers'
    LlamaForCausalLM.from_pretrained(DIR) and gives the same logits as the run's
    model (fused projections split, rotary channel pairs reordered for HF's
    rotate_half).
    """
    from llama_train.recipe.export import export_run

    with user_errors():
        exported = export_run(run_dir, out, format=format, checkpoint=checkpoint)  # type: ignore[arg-type]
    console.print(
        f"wrote {exported.out} ({exported.format}, step {exported.step}, "
        f"{exported.parameters:,} parameters): {', '.join(exported.files)}",
        highlight=False,
        soft_wrap=True,
    )
