"""The `failed` state: a candidate whose cycle broke before the gate judged it.

A failed version keeps its error, is never promoted or served, and `adapters list` shows it as
failed (not rejected, which means the gate said no).
"""

from __future__ import annotations

import pytest

from feedback.db import make_db
from learn.registry import STATES, Registry, RegistryError
from serve.routing import SERVABLE_STATES


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(make_db(f"sqlite:///{tmp_path}/registry.db"))


def candidate(reg: Registry, tmp_path) -> str:
    name = reg.new_version_name("chat")
    (tmp_path / name).mkdir()
    reg.register(name, kind="chat", path=tmp_path / name)
    return name


def test_a_failed_candidate_keeps_its_error_and_is_never_promoted(reg, tmp_path):
    name = candidate(reg, tmp_path)
    reg.fail(name, "EvalError: http://127.0.0.1:8000 refused the key with 401", metrics={"train": {"steps": 3}})
    version = reg.get(name)
    assert version.state == "failed" and "401" in version.error and version.metrics == {"train": {"steps": 3}}
    with pytest.raises(RegistryError, match="was failed .*401.*train a new candidate"):
        reg.promote(name)
    with pytest.raises(RegistryError, match="only candidates"):
        reg.reject(name)
    assert reg.prod() is None


def test_failed_is_a_state_and_never_servable():
    assert "failed" in STATES and "failed" not in SERVABLE_STATES
