"""The config keys: the README's table is the code's, every key is documented, `config show`
names each value's source, and `keys` makes what serve.api_keys holds.

After adding a key to a settings class: `make readme-config` (or `tunewheel config table
--write README.md`) regenerates the table, and this test passes again.
"""

from __future__ import annotations

import json
from pathlib import Path

from serve.config_doc import keys, readme_table, table
from serve.gateway.auth import Auth
from serve.settings import hash_key, load_settings
from tests.cli.commands import invoke

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_table_is_the_code():
    assert readme_table(README.read_text()) == table(), (
        "README.md's config table is out of date: run `make readme-config` (tunewheel config table --write README.md)")


def test_every_key_has_a_description():
    assert [k.path for k in keys() if not k.description] == []


def test_the_table_names_every_section_key():
    paths = {k.path for k in keys()}
    assert {"data_dir", "serve.api_keys", "engine.model", "store.url", "learn.heldout_file", "learn.train.max_steps",
            "learn.train.min_examples", "learn.gate.min_f1_gain", "learn.schedule.cron", "restyle.fallback",
            "serve.aliases.<name>.style"} <= paths
    assert "upper bound" in next(k.description for k in keys() if k.path == "learn.train.max_steps")


def test_config_show_names_the_source_of_each_value(tmp_path):
    config = tmp_path / "tunewheel.toml"
    config.write_text('[serve]\nport = 8100\n[learn.train]\nrank = 8\n[store]\nurl = "postgresql+psycopg://tw:secret@db/tw"\n')
    result = invoke("config", "show", "--config", str(config), "--json",
                    env={"TUNEWHEEL_LEARN__TRAIN__RANK": "4", "TUNEWHEEL_ENGINE__URL": "http://gpu:8000"})
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(result.stdout)}
    assert rows["serve.port"] == {"key": "serve.port", "value": 8100, "source": f"file {config}"}
    assert rows["learn.train.rank"]["value"] == 4 and rows["learn.train.rank"]["source"] == "env TUNEWHEEL_LEARN__TRAIN__RANK"
    assert rows["engine.url"]["source"] == "env TUNEWHEEL_ENGINE__URL"
    assert rows["serve.host"] == {"key": "serve.host", "value": "127.0.0.1", "source": "default"}
    assert rows["serve.aliases.chat.adapter"]["source"] == "default"
    assert "secret" not in result.stdout and rows["store.url"]["value"] == "postgresql+psycopg://tw:***@db/tw"
    text = invoke("config", "show", "--config", str(config)).stdout
    assert any(line.startswith("serve.port = 8100") and line.endswith(f"# file {config}") for line in text.splitlines())


def test_keys_new_and_hash_make_what_the_gateway_accepts(tmp_path):
    made = invoke("keys", "new")
    assert made.exit_code == 0, made.output
    lines = dict(line.split(":", 1) for line in made.stdout.splitlines())
    key, digest = lines["key"].strip(), lines["hash"].strip()
    assert invoke("keys", "hash", key).stdout.strip() == digest == hash_key(key)
    assert invoke("keys", "hash", "-", input=key + "\n").stdout.strip() == digest
    settings = load_settings(None, data_dir=tmp_path, serve={"api_keys": [digest]})  # the validator takes it
    assert Auth.from_settings(settings).identify(f"Bearer {key}").key_hash == digest
