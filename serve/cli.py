"""The `tunewheel` command: mounts the commands each package owns, and loads their settings.

    tunewheel serve [--with-learner]        gateway + engine               serve/cli_serve.py
    tunewheel model prepare                 the embedded SmolLM2            serve/cli_model.py
    tunewheel data export|check|curate|import-coqa|synth-coqa               feedback/cli.py
    tunewheel learn run|schedule                                            learn/cli.py
    tunewheel eval --model NAME --data FILE                                 learn/cli_eval.py
    tunewheel adapters list|promote|rollback                                learn/cli_eval.py
    tunewheel restyle synth|build|train                                     learn/cli_restyle.py
    tunewheel config show|table             every key, value and source     serve/cli_config.py
    tunewheel keys new|hash                 API keys for the config         serve/cli_config.py

Every command takes `--config FILE` (feedback/cli_common.py: one option, one loader, one way to
fail); this app hands them `load_settings`, the composed settings of serve/settings.py. Its root
group (`TunewheelGroup`) shows every flag in --help as it is typed and turns any failure into one
`error:` line (TUNEWHEEL_DEBUG=1 for the traceback). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import typer

from feedback import cli as data_cli
from feedback.cli_common import TunewheelGroup
from learn import cli as learn_cli
from learn import cli_eval, cli_restyle
from serve import cli_config, cli_model, cli_serve
from serve.settings import load_settings

app = typer.Typer(help="tunewheel: a chatbot serving stack that learns from its own conversations.", no_args_is_help=True,
                  cls=TunewheelGroup)


@app.callback()
def main(ctx: typer.Context) -> None:
    """tunewheel: a chatbot serving stack that learns from its own conversations."""
    ctx.obj = load_settings


app.command("serve")(cli_serve.serve)
app.add_typer(cli_model.app, name="model")
app.add_typer(data_cli.app, name="data")
app.add_typer(learn_cli.app, name="learn")
app.command("eval")(cli_eval.eval_command)
app.add_typer(cli_eval.adapters_app, name="adapters")
app.add_typer(cli_restyle.app, name="restyle")
app.add_typer(cli_config.config_app, name="config")
app.add_typer(cli_config.keys_app, name="keys")

if __name__ == "__main__":
    app()
