"""`tunewheel learn run` fails in seconds, before training anything, when the cycle could not finish.

Wrong key, no key, a key that is not an admin key, no gateway, a broken held-out file: each is one
line naming the fix, and leaves no cycle, no snapshot and no adapter behind (nothing curated or
trained first). How long it takes is not checked here: no timings in tests. The
gateway here is the real app with API keys, in front of a stand-in engine (no model needed).
`eval` gets the same checks for its key and its model name.
"""

from __future__ import annotations

import json

import pytest
from sqlmodel import Session, select

from feedback.db import make_db
from learn.cycle import LearnerCycle
from serve.engine_child import free_port
from serve.settings import hash_key
from tests.cli.commands import invoke
from tests.cli.test_failures import HELDOUT
from tests.fixtures.gateway import start_gateway

USER, ADMIN = "user-key", "admin-key"


@pytest.fixture(scope="module")
def keyed_gateway(fake_engine_url, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("gw"), fake_engine_url,
                       serve={"api_keys": [hash_key(USER)], "admin_keys": [hash_key(ADMIN)]})
    yield gw
    gw.stop()


@pytest.fixture
def learner(tmp_path):
    """Environment for `learn run` on a fresh data dir with a stand-in model and a valid held-out file."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps(HELDOUT) + "\n")
    return tmp_path, {"TUNEWHEEL_DATA_DIR": str(tmp_path / "data"), "TUNEWHEEL_ENGINE__MODEL": str(model),
                      "TUNEWHEEL_LEARN__HELDOUT_FILE": str(heldout), "TUNEWHEEL_API_KEY": ""}


def learn_run(tmp_path, env, *args: str) -> str:
    """Run `learn run`, check it failed as the pre-flight fails, and return its error line."""
    result = invoke("learn", "run", *args, env=env)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    data = tmp_path / "data"
    assert not (data / "adapters").exists() and not (data / "datasets").exists(), "nothing may be curated or trained"
    if (data / "tunewheel.db").exists():
        with Session(make_db(f"sqlite:///{data / 'tunewheel.db'}")) as s:
            assert s.exec(select(LearnerCycle)).all() == [], "no cycle may have started"
    return result.output.strip()


def test_wrong_key_fails_before_training(keyed_gateway, learner):
    tmp, env = learner
    line = learn_run(tmp, {**env, "TUNEWHEEL_API_KEY": "not-the-key"}, "--url", keyed_gateway.url)
    assert "refused the API key" in line and "TUNEWHEEL_API_KEY" in line and "--api-key" in line


def test_no_key_names_the_variable(keyed_gateway, learner):
    tmp, env = learner
    line = learn_run(tmp, env, "--url", keyed_gateway.url)
    assert "needs an API key" in line and "TUNEWHEEL_API_KEY" in line


def test_a_user_key_is_not_enough_for_the_learner(keyed_gateway, learner):
    tmp, env = learner
    line = learn_run(tmp, env, "--url", keyed_gateway.url, "--api-key", USER)
    assert "not an admin key" in line and "serve.admin_keys" in line


def test_no_gateway_fails_before_training(learner):
    tmp, env = learner
    line = learn_run(tmp, {**env, "TUNEWHEEL_API_KEY": ADMIN}, "--url", f"http://127.0.0.1:{free_port()}")
    assert "cannot reach the gateway" in line and "tunewheel serve" in line


def test_broken_heldout_file_fails_before_training(keyed_gateway, learner):
    tmp, env = learner
    broken = tmp / "broken.jsonl"
    broken.write_text(json.dumps(HELDOUT) + "\n" + '{"id": "s2", "source": "x", "story": "y", "turns": []}\n')
    env = {**env, "TUNEWHEEL_LEARN__HELDOUT_FILE": str(broken), "TUNEWHEEL_API_KEY": ADMIN}
    line = learn_run(tmp, env, "--url", keyed_gateway.url)
    assert f"learn.heldout_file {broken} does not parse" in line and f"{broken}:2" in line and "'turns'" in line


def test_eval_checks_key_and_model_before_scoring(keyed_gateway, learner):
    tmp, env = learner
    data = str(tmp / "heldout.jsonl")
    wrong = invoke("eval", "--model", "chat", "--data", data, "--url", keyed_gateway.url, "--api-key", "nope", env=env)
    assert wrong.exit_code == 1 and "refused the API key" in wrong.output
    unknown = invoke("eval", "--model", "pirate", "--data", data, "--url", keyed_gateway.url, "--api-key", USER, env=env)
    assert unknown.exit_code == 1 and "serves no model named 'pirate'" in unknown.output and "chat" in unknown.output
