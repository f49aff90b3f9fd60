"""The config `make demo` writes (serve/demo.py), loaded as `tunewheel serve` loads it: what the
users' demo and the seeded one train with.

    pytest tests/serve/test_demo_config.py
"""

import json

from serve.demo import arguments, write_config, write_data
from serve.settings import load_settings


def settings_for(tmp_path, *argv):
    args = arguments(list(argv))
    files = {"heldout": tmp_path / "heldout_B.json"}
    return load_settings(write_config(tmp_path, tmp_path / "model", files, 8000, args))


def test_the_users_demo_holds_none_of_their_conversations_out_and_caps_its_steps(tmp_path):
    learn = settings_for(tmp_path).learn
    assert learn.heldout_file and learn.heldout_fraction == 0.0  # the operator's file is the gate
    assert learn.seed_files == [] and learn.policy.stages == ["sft"] and learn.policy.start == "champion"
    assert (learn.train.max_steps, learn.train.learning_rate) == (24, 6e-4)


def test_the_seeded_demo_trains_uncapped_at_the_usual_rate_and_max_steps_can_be_lifted(tmp_path):
    seeded = arguments(["--seeded"])
    assert (seeded.max_steps, seeded.users, seeded.cycles, seeded.start) == (0, 6, 1, "base")
    assert settings_for(tmp_path, "--max-steps", "0").learn.train.max_steps in (None, 0)
    assert settings_for(tmp_path, "--max-steps", "12").learn.train.max_steps == 12


def test_the_users_demo_sends_fewer_users_after_learning_the_seeded_one_the_same(tmp_path):
    files = write_data(tmp_path, arguments(["--users", "4", "--after-users", "2"]))
    assert [len(json.loads(files[f"users-{k}"].read_text())["data"]) for k in range(3)] == [4, 4, 2]
    (tmp_path / "seeded").mkdir()
    seeded = write_data(tmp_path / "seeded", arguments(["--seeded", "--train-stories", "3"]))
    assert seeded["users-0"].read_text() == seeded["users-1"].read_text()
