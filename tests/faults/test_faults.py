"""The fault suite: 16 clients chat through a real gateway process on the real vLLM engine,
with the turn log on real SQLite and on real PostgreSQL, while (a) the engine is SIGKILLed,
(b) the database is away for 60 s (SQLite: BEGIN EXCLUSIVE from another connection; Postgres:
its server stopped), (c) the gateway is SIGKILLed and restarted.

    PYTHONPATH=$PWD flock /tmp/tunewheel-engine.lock pytest -m engine tests/faults -s

The faults overlap inside the outage (bench/faults.py `overlapping`): the engine dies and comes
back while the database is away, then the gateway is SIGKILLed while its answered turns exist
only in its spool, and restarted at once (on Postgres it can only start once the server is
back). Afterwards every answer a client got whole (a 200 JSON body, a stream's `[DONE]`) is in
the turn log exactly once, /health answered every probe within 1 s while the gateway process
was up, and the only 5xx were 503s with Retry-After while the engine was down. The engine is
one of the module's own, under the same supervisor `tunewheel serve` runs (bench/fault_scenario.py).
bench/faults.py runs the same pieces spread over 10 minutes.
"""

from __future__ import annotations

import json

import pytest

from bench.fault_scenario import PostgresServer, SqliteOutage, SupervisedEngine
from bench.faults import Stage, overlapping, report
from serve.engine_child import free_port
from tests.fixtures.engine import engine_settings
from tests.fixtures.postgres import _pg_bindir

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def fault_engine(model_dir):
    """An engine of this module's own: the suite SIGKILLs it."""
    with SupervisedEngine(engine_settings(port=free_port())) as engine:
        yield engine


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_no_answer_is_lost_when_engine_database_and_gateway_fail(store, fault_engine, tmp_path):
    workdir = tmp_path / "gateway"
    if store == "postgres":
        if _pg_bindir() is None:
            pytest.skip("no PostgreSQL binaries (/usr/lib/postgresql/*/bin); CI has them")
        pg = PostgresServer().__enter__()
        store_url, outage = pg.url, pg
    else:
        store_url = f"sqlite:///{workdir}/data/tunewheel.db"
        outage = SqliteOutage(f"{workdir}/data/tunewheel.db")
    try:
        with Stage(workdir, engine=fault_engine, store_url=store_url, outage=outage, port=free_port()) as stage:
            overlapping(stage)
            run = stage.finish()
    finally:
        if store == "postgres":
            pg.__exit__(None, None, None)
    result = report(run, store=store)
    print(json.dumps(result, indent=2))
    assert result["problems"] == []
    assert result["turns_lost"] == 0 and result["answered"] >= 80
    assert [f["fault"] for f in result["faults"]] == ["engine SIGKILL", "database away", "gateway SIGKILL"]
    assert all(f["recovery_s"] is not None for f in result["faults"])
    assert result["faults"][1]["for_s"] >= 60 and result["spool_peak_bytes"] > 0
