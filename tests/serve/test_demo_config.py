"""The config `make demo` writes (serve/demo.py), loaded as `tunewheel serve` loads it: what the
users' demo and the seeded one train with.

    pytest tests/serve/test_demo_config.py
"""

from serve.demo import arguments, write_config
from serve.settings import load_settings


def settings_for(tmp_path, *argv):
    args = arguments(list(argv))
    files = {"heldout": tmp_path / "heldout_B.json"}
    return load_settings(write_config(tmp_path, tmp_path / "model", files, 8000, args))


def test_the_users_demo_holds_none_of_their_conversations_out_and_caps_its_steps(tmp_path):
    learn = settings_for(tmp_path).learn
    assert learn.heldout_file and learn.heldout_fraction == 0.0  # the operator's file is the gate
    assert learn.seed_files == [] and learn.policy.stages == ["sft"]
    assert (learn.train.max_steps, learn.train.learning_rate) == (30, 6e-4)


def test_the_seeded_demo_trains_uncapped_at_the_usual_rate_and_max_steps_can_be_lifted(tmp_path):
    seeded = arguments(["--seeded"])
    assert (seeded.max_steps, seeded.users, seeded.cycles) == (0, 6, 1)
    assert settings_for(tmp_path, "--max-steps", "0").learn.train.max_steps in (None, 0)
    assert settings_for(tmp_path, "--max-steps", "12").learn.train.max_steps == 12
