"""Each command's common failures: one `error:` line that says what to fix, no traceback.

The table runs every command against what goes wrong in a first hour: no gateway, the store
database down, a missing or broken file, the model not prepared, a port in use, a bad value.
None of these needs an engine: the model is a folder with a config.json (all the pre-flight
looks at), the dead gateway and database are free loopback ports where nothing listens.
"""

from __future__ import annotations

import json
import socket

import pytest

from serve.engine_child import free_port
from tests.cli.commands import invoke

HELDOUT = {"id": "s1", "source": "synth", "story": "Ann has a red kite.",
           "turns": [{"question": "What does Ann have?", "answers": ["a red kite"]}]}


@pytest.fixture
def home(tmp_path):
    """A fresh data dir, a stand-in model folder, a valid held-out file, and a gateway address where nothing listens."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "heldout.jsonl").write_text(json.dumps(HELDOUT) + "\n")
    (tmp_path / "not-json.json").write_text('{"data": [oops\n')
    (tmp_path / "a-file").write_text("")
    return tmp_path, {"TUNEWHEEL_DATA_DIR": str(tmp_path / "data"), "TUNEWHEEL_ENGINE__MODEL": str(model),
                      "TUNEWHEEL_SERVE__PORT": str(free_port()), "TUNEWHEEL_ENGINE__PORT": str(free_port()),
                      "TUNEWHEEL_API_KEY": ""}


STORE_DOWN = {"TUNEWHEEL_STORE__URL": "postgresql+psycopg://tunewheel@127.0.0.1:{dead}/tunewheel"}
NO_MODEL = {"TUNEWHEEL_ENGINE__MODEL": "{tmp}/no-such-model"}

# (command line, environment overrides, what the one error line says)
CASES = {
    "data export, store down": ("data export --out {tmp}/x.jsonl --max-tokens 0", STORE_DOWN, "store database cannot be used"),
    "data curate, store down": ("data curate --max-tokens 0", STORE_DOWN, "check store.url"),
    "adapters list, store down": ("adapters list", STORE_DOWN, "store database cannot be used"),
    "data export, unwritable --out": ("data export --out {tmp}/a-file/x.jsonl --max-tokens 0", {}, "a-file"),
    "data export, model missing": ("data export --out {tmp}/x.jsonl", NO_MODEL, "tunewheel model prepare"),
    "data check, missing file": ("data check {tmp}/nope.jsonl", {}, "does not exist"),
    "data import-coqa, not JSON": ("data import-coqa {tmp}/not-json.json", {}, "not valid JSON"),
    "data synth-coqa, bad variant": ("data synth-coqa --stories 1 --variant Z", {}, "variant must be one of A, B"),
    "model prepare, engine.model not a model": ("model prepare", NO_MODEL, "is not a model folder"),
    "learn run, model missing": ("learn run", NO_MODEL, "tunewheel model prepare"),
    "learn run, no gateway": ("learn run", {}, "start it with `tunewheel serve`"),
    "eval, missing data": ("eval --model chat --data {tmp}/nope.jsonl", {}, "no such file"),
    "eval, no gateway": ("eval --model chat --data {tmp}/heldout.jsonl", {}, "cannot reach the gateway"),
    "adapters promote, unknown version": ("adapters promote chat-v0099", {}, "no adapter version named chat-v0099"),
    "adapters rollback, nothing promoted": ("adapters rollback", {}, "nothing to roll back"),
    "restyle build, no gateway": ("restyle build --style pirate --texts {tmp}/heldout.jsonl", {}, "cannot reach the gateway"),
    "restyle build, model missing": ("restyle build --style pirate --texts {tmp}/heldout.jsonl", NO_MODEL, "tunewheel model prepare"),
    "restyle train, no gateway": ("restyle train --style pirate", {}, "cannot reach the gateway"),
    "serve, open gateway on a public address": ("serve --host 0.0.0.0", {}, "refusing to bind 0.0.0.0"),
    "serve, model missing": ("serve", NO_MODEL, "the engine did not start: model directory"),
    "serve, port in use": ("serve --port {busy}", {"TUNEWHEEL_ENGINE__URL": "http://127.0.0.1:{dead}"}, "cannot listen"),
    "learn schedule, no schedule": ("learn schedule", {}, "no learner schedule configured"),
    "keys hash, empty key": ("keys hash -", {}, "the key is empty"),
    "config table, no such file": ("config table --write {tmp}/nope.md", {}, "does not exist"),
    "config show, bad value in the environment": ("config show", {"TUNEWHEEL_SERVE__PORT": "eighty"}, "serve.port"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_common_failure_is_one_line_that_says_what_to_fix(case, home):
    tmp, env = home
    line, extra, says = CASES[case]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {"tmp": str(tmp), "dead": str(free_port()), "busy": str(busy.getsockname()[1])}
        env = {**env, **{k: v.format(**fill) for k, v in extra.items()}}
        result = invoke(*line.format(**fill).split(), env=env, input="")
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, result.output
    assert errors[0] == result.stderr.strip().splitlines()[-1], "the error is the last thing printed"
    assert says in errors[0], errors[0]
