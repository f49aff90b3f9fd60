"""Fixtures of the feedback tests: a fresh, migrated SQLite store per test."""

from __future__ import annotations

import pytest

from feedback.db import make_db


@pytest.fixture
def db(tmp_path):
    engine = make_db(f"sqlite:///{tmp_path}/sub/dir/tunewheel.db")
    yield engine
    engine.dispose()
