"""`tunewheel learn run` (one learner cycle now) and `tunewheel learn schedule` (the scheduler loop).

    tunewheel learn run [--config FILE] [--url http://127.0.0.1:8000] [--api-key KEY]
    tunewheel learn schedule [--config FILE]

`learn run` curates, trains, scores champion and candidate through the gateway, gates, and
promotes or rejects; it prints the cycle report and exits 0 when the cycle promoted,
rejected or skipped (too little data, another cycle running) and 1 when it failed. The
gateway at `--url` (default: the configured one) must be running: evaluation goes through
it to the real engine, and it picks a promotion up from the registry within seconds.
A gateway with API keys needs one in TUNEWHEEL_API_KEY (or --api-key): an admin key, since the
cycle scores the unpromoted candidate as `chat@<version>`.

Before anything long, a pre-flight (learn/preflight.py) checks in seconds that the base model
is there, `learn.heldout_file` parses, the gateway answers, takes the key and has its engine
ready; a failed check is one line naming the fix, exit 1, and nothing is trained.
`learn schedule` makes the same checks when it starts (the gateway's only as a warning: it may
come up later) and serves no metrics of its own (learn.metrics_port is ignored): the
gateway's /metrics reads the cycles from the store.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Optional

import typer

from feedback.cli_common import ApiKeyOption, ConfigOption, fail, load, setup_logging

app = typer.Typer(help="The learner: one cycle now, or the schedule.", no_args_is_help=True)
log = logging.getLogger("tunewheel.learn")


def preflight_cycle(settings, *, gateway_url: str, api_key: str | None, gateway_required: bool = True) -> None:
    """The learner's pre-flight: base model, held-out file, then the gateway (admin key, engine ready)."""
    from learn import preflight

    try:
        preflight.base_model(settings.base_model_path())
        preflight.heldout(settings.learn.heldout_file)
    except preflight.PreflightError as exc:
        fail(str(exc))
    try:
        preflight.Preflight(gateway_url, api_key).gateway(admin=True)
    except preflight.PreflightError as exc:
        if gateway_required:
            fail(str(exc))
        log.warning("%s (each cycle fails until it is fixed)", exc)


@app.command("run")
def run(
    ctx: typer.Context,
    config: ConfigOption = None,
    url: Annotated[Optional[str], typer.Option("--url", help="Gateway URL for evaluation (default: the configured gateway).")] = None,
    api_key: ApiKeyOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of text.")] = False,
) -> None:
    """Run one full learner cycle now and print its report (pre-flight checks first)."""
    setup_logging(logging.WARNING)
    settings = load(ctx, config)
    target = url or settings.gateway_url
    preflight_cycle(settings, gateway_url=target, api_key=api_key)
    from learn.cycle import cycle_runner  # after the pre-flight: it fails in seconds, before heavy imports

    cycle = cycle_runner(settings, gateway_url=target, api_key=api_key, progress=sys.stderr.isatty())("cli")
    typer.echo(cycle.model_dump_json(indent=2) if json_out else cycle.text())
    if cycle.outcome == "failed":
        raise typer.Exit(1)


@app.command("schedule")
def schedule(ctx: typer.Context, config: ConfigOption = None, api_key: ApiKeyOption = None) -> None:
    """Run the learner's scheduler (learn.schedule) in the foreground until Ctrl-C."""
    from feedback.db import make_db
    from learn.cycle import cycle_runner
    from learn.scheduler import Learner, build_scheduler, run_forever

    setup_logging(logging.INFO)
    settings = load(ctx, config)
    preflight_cycle(settings, gateway_url=settings.gateway_url, api_key=api_key, gateway_required=False)
    from learn.live import live_trials

    learner = Learner(cycle_runner(settings, api_key=api_key), db=make_db(settings.store_url), schedule=settings.learn.schedule,
                      live=live_trials(settings))
    try:
        run_forever(build_scheduler(settings.learn.schedule, learner, blocking=True))
    except ValueError as exc:
        fail(str(exc), 2)
