"""The fault suite's checks, on made-up runs: each broken promise is named, a clean run passes.

    pytest tests/faults/test_verify.py
"""

from __future__ import annotations

from bench.fault_scenario import Outcome, Run, metric
from bench.faults import report, verify


def clean_run() -> Run:
    run = Run(t0=0.0, engine_down=[[10.0, 20.0]], gateway_down=[[30.0, 35.0]], db_down=[[5.0, 65.0]])
    run.outcomes = [
        Outcome(0, False, 1.0, 2.0, 200, "chatcmpl-a"),
        Outcome(1, True, 12.0, 12.1, 503, retry_after="5"),               # engine down
        Outcome(2, True, 9.5, 10.2, 200, None, error="engine_error"),     # stream cut by the engine's death
        Outcome(3, False, 31.0, 31.0, None, error="ConnectError"),        # gateway down
        Outcome(4, True, 40.0, 41.0, 200, "chatcmpl-b"),
    ]
    run.logged_ids = {"chatcmpl-a", "chatcmpl-b"}
    # (29.99, 0.01): sent just before the SIGKILL, its connection died with the gateway
    run.probes = [(1.0, 0.01, 200), (29.99, 0.01, None), (32.0, 0.0, None), (50.0, 0.9, 200)]
    run.pending = [(64.0, 40.0), (66.0, 3.0)]
    return run


def test_a_clean_run_passes_and_reports_its_figures():
    run = clean_run()
    assert verify(run) == []
    r = report(run)
    assert (r["answered"], r["turns_logged"], r["turns_lost"], r["streams_broken_off"]) == (2, 2, 0, 1)
    assert [(f["fault"], f["recovery_s"]) for f in r["faults"]] == [
        ("engine SIGKILL", 31.0), ("database away", 1.0), ("gateway SIGKILL", 11.0)]


def test_every_broken_promise_is_named():
    run = clean_run()
    run.logged_ids.discard("chatcmpl-b")
    run.outcomes += [
        Outcome(5, False, 50.0, 50.1, 500),                       # a 500
        Outcome(6, False, 50.0, 50.1, 503),                       # a 503 without Retry-After
        Outcome(7, False, 52.0, 52.1, 503, retry_after="5"),      # a 503 while the engine was up
        Outcome(8, True, 53.0, 54.0, 200, None, error="ReadError"),  # broken off for no reason
    ]
    run.probes += [(55.0, 1.2, 200), (56.0, 1.0, None), (29.0, 0.5, None)]  # the last failed before the kill
    problems = verify(run)
    assert problems[0].startswith("1 of 2 answered turns are not in the log")
    assert any("a 500" in p for p in problems) and any("a 503 (Retry-After None)" in p for p in problems)
    assert any("503 at 52.0 s while the engine was up" in p for p in problems)
    assert any("broken off (ReadError) at 53.0 s" in p for p in problems)
    assert sum("/health at" in p for p in problems) == 3


def test_metric_reads_one_series_of_an_exposition():
    text = "# HELP x\ntunewheel_log_spool_bytes 1234.0\ntunewheel_log_spool_bytes_other 9\n"
    assert metric(text, "tunewheel_log_spool_bytes") == 1234.0
    assert metric(text, "tunewheel_log_pending_writes") == 0.0
