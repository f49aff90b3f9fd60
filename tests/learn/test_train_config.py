"""`TrainConfig`, the `[learn.train]` section: the keys users write, checks before anything loads, the flags.

    pytest tests/learn/test_train_config.py

Seconds, no model: a config file's [learn.train] keys (every one of today's, plus val_fraction
and device) load into the one TrainConfig the trainer gets; a bad value fails when the config
loads, naming the key; the run's paths are checked before the trainer loads anything; every
field is a `python -m learn.train` flag; `learn.metrics_port` still loads and only warns.
"""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

import learn.settings
from feedback.cli_common import ConfigError
from learn.train import TrainConfig, TrainError, argument_parser
from learn.train_config import check_paths
from serve.settings import load_settings

TODAYS_KEYS = """
[learn.train]
target_modules = ["q_proj", "v_proj"]
rank = 4
alpha = 8
dropout = 0.1
learning_rate = 1e-3
lr_scheduler = "linear"
warmup_ratio = 0.1
epochs = 2
batch_size = 2
grad_accum = 2
max_length = 256
seed = 3
train_on_inputs = "true"
qlora = false
early_stopping_patience = 2
min_examples = 4
max_steps = 7
threads = 1
val_fraction = 0.2
device = "cpu"
precision = "bf16"
beta = 0.2
processes = 2
fsdp = true
allocator = "system"
"""


def test_every_learn_train_key_of_a_config_file_reaches_the_trainer(tmp_path):
    config = tmp_path / "tunewheel.toml"
    config.write_text(TODAYS_KEYS)
    train = load_settings(config).learn.train
    assert isinstance(train, TrainConfig)
    assert train.model_dump() == {
        "target_modules": ["q_proj", "v_proj"], "rank": 4, "alpha": 8, "dropout": 0.1, "learning_rate": 1e-3,
        "lr_scheduler": "linear", "warmup_ratio": 0.1, "epochs": 2, "batch_size": 2, "grad_accum": 2, "max_length": 256,
        "seed": 3, "train_on_inputs": "true", "qlora": False, "early_stopping_patience": 2, "min_examples": 4,
        "max_steps": 7, "threads": 1, "val_fraction": 0.2, "device": "cpu", "precision": "bf16", "beta": 0.2, "processes": 2, "fsdp": True,
        "allocator": "system",
    }


def test_environment_and_toml_booleans_work_too(tmp_path, monkeypatch):
    config = tmp_path / "tunewheel.toml"
    config.write_text("[learn.train]\ntrain_on_inputs = false\n")
    monkeypatch.setenv("TUNEWHEEL_LEARN__TRAIN__RANK", "8")
    train = load_settings(config).learn.train
    assert train.train_on_inputs == "false" and train.rank == 8


@pytest.mark.parametrize("line, problem", [
    ("rank = 0", "rank and alpha must be >= 1"),
    ('lr_scheduler = "sawtooth"', "lr_scheduler"),
    ("qlora = true\ndevice = \"cpu\"", "qlora needs CUDA"),
    ("max_length = 8", "max_length must be >= 16"),
    ("val_fraction = 0.7", "val_fraction must be in"),
])
def test_a_bad_value_fails_when_the_config_loads(tmp_path, line, problem):
    config = tmp_path / "tunewheel.toml"
    config.write_text(f"[learn.train]\n{line}\n")
    with pytest.raises(ConfigError, match=f"learn.train.*{problem}"):
        load_settings(config)


def test_config_errors_name_the_problem():
    with pytest.raises(ValidationError, match="rank and alpha"):
        TrainConfig(rank=0)
    with pytest.raises(ValidationError, match="qlora needs CUDA"):
        TrainConfig(qlora=True, device="cpu")
    with pytest.raises(ValidationError, match="target_modules is empty"):
        TrainConfig(target_modules=[])


def test_paths_are_checked_before_anything_loads(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text("")
    ok = dict(base_model=str(model), train_file=data, out_dir=tmp_path / "out")
    check_paths(**ok)
    check_paths(**{**ok, "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"})  # a hub id is not a path
    with pytest.raises(TrainError, match="train_file .* does not exist"):
        check_paths(**{**ok, "train_file": tmp_path / "missing.jsonl"})
    with pytest.raises(TrainError, match="val_file .* does not exist"):
        check_paths(**ok, val_file=tmp_path / "missing.jsonl")
    with pytest.raises(TrainError, match="not a model folder"):
        check_paths(**{**ok, "base_model": str(tmp_path)})
    (tmp_path / "taken").mkdir()
    with pytest.raises(TrainError, match="never overwritten"):
        check_paths(**{**ok, "out_dir": tmp_path / "taken"})


def test_every_config_field_is_a_flag_of_python_m_learn_train():
    argv = ["--base", "B", "--train", "F", "--out", "D", "--val", "V", "--rank", "4", "--learning-rate", "0.001",
            "--target-modules", "q_proj", "v_proj", "--qlora", "--train-on-inputs", "true", "--max-steps", "3",
            "--val-fraction", "0.2", "--device", "cuda", "--lr-scheduler", "linear"]
    args = argument_parser().parse_args(argv)
    assert (args.base_model, args.train_file, args.out_dir, args.val_file) == ("B", "F", "D", "V")
    given = {n: getattr(args, n) for n in TrainConfig.model_fields if getattr(args, n) is not None}
    assert TrainConfig(**given).model_dump(include=set(given)) == {
        "rank": 4, "learning_rate": 0.001, "target_modules": ["q_proj", "v_proj"], "qlora": True,
        "train_on_inputs": "true", "max_steps": 3, "val_fraction": 0.2, "device": "cuda", "lr_scheduler": "linear"}
    assert set(TrainConfig.model_fields) <= set(vars(args))
    assert all(field.description for field in TrainConfig.model_fields.values())  # documented once, shown in --help


def test_metrics_port_still_loads_and_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(learn.settings, "_warned_metrics_port", False)
    config = tmp_path / "tunewheel.toml"
    config.write_text("[learn]\nmetrics_port = 9464\n")
    with caplog.at_level(logging.WARNING, logger="tunewheel.learn"):
        load_settings(config)
        load_settings(config)
        load_settings(None)
    warnings = [r.getMessage() for r in caplog.records if "metrics_port" in r.getMessage()]
    assert warnings == ["learn.metrics_port is deprecated and ignored: the learner's metrics are on the gateway's /metrics"]


def test_min_examples_counts_before_the_validation_split():
    """8 examples with min_examples 8 train (7 + 1 held for validation), as the data check allows."""
    from learn.train_stages import check_cut
    config = TrainConfig(min_examples=8)
    check_cut(config, "sft", [{}] * 7, [{}])
    for train_set, val_set in (([{}] * 6, [{}]), ([{}] * 8, []), ([], [{}] * 8)):
        with pytest.raises(TrainError, match=r"sft: after cutting to max_length=384 only .* \(min_examples = 8\): raise max_length"):
            check_cut(config, "sft", train_set, val_set)
