"""`tunewheel learn run` (one learner cycle now) and `tunewheel learn schedule` (the scheduler loop).

    tunewheel learn run [--config FILE] [--url http://127.0.0.1:8000]
    tunewheel learn schedule [--config FILE]

`learn run` curates, trains, scores champion and candidate through the gateway, gates, and
promotes or rejects; it prints the cycle report and exits 0 when the cycle promoted,
rejected or skipped (too little data, another cycle running) and 1 when it failed. The
gateway at `--url` (default: the configured one) must be running: evaluation goes through
it to the real engine, and it picks a promotion up from the registry within seconds.
A gateway with API keys needs one in TUNEWHEEL_API_KEY. `learn schedule` serves no metrics
of its own (learn.metrics_port is ignored): the gateway's /metrics reads the cycles from the store.
"""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from feedback.cli_common import ConfigOption, fail, load

app = typer.Typer(help="The learner: one cycle now, or the schedule.", no_args_is_help=True)


@app.command("run")
def run(
    ctx: typer.Context,
    config: ConfigOption = None,
    url: Annotated[Optional[str], typer.Option("--url", help="Gateway URL for evaluation (default: the configured gateway).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of text.")] = False,
) -> None:
    """Run one full learner cycle now and print its report."""
    from learn.cycle import cycle_runner

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load(ctx, config)
    cycle = cycle_runner(settings, gateway_url=url)("cli")
    typer.echo(cycle.model_dump_json(indent=2) if json_out else cycle.text())
    if cycle.outcome == "failed":
        raise typer.Exit(1)


@app.command("schedule")
def schedule(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Run the learner's scheduler (learn.schedule) in the foreground until Ctrl-C."""
    from feedback.db import make_db
    from learn.cycle import cycle_runner
    from learn.scheduler import Learner, build_scheduler, run_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load(ctx, config)
    learner = Learner(cycle_runner(settings), db=make_db(settings.store_url), schedule=settings.learn.schedule)
    try:
        run_forever(build_scheduler(settings.learn.schedule, learner, blocking=True))
    except ValueError as exc:
        fail(str(exc), 2)
