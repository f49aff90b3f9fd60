"""Every command's --help shows its flags as they are typed, and every command takes --config.

typer's rich help writes an on/off flag as `--json <bool>` (and `--json true` then fails) and a
positional as `{file}`; tunewheel's root group (feedback/cli_common.py) shows `--json` and `FILE`.
"""

from __future__ import annotations

import pytest

from tests.cli.commands import invoke, leaves

COMMANDS = sorted(leaves())


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_shows_every_flag_as_typed(path):
    command = leaves()[path]
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "<bool>" not in text, text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage
    for param in command.params:
        if param.param_type_name == "argument":
            assert param.name.upper() in usage, f"{usage!r} should name {param.name.upper()}"
        else:
            for opt in param.opts:
                assert opt in text, f"{' '.join(path)} --help does not show {opt}"
    assert "--config" in text


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_takes_config(path):
    assert any("--config" in p.opts for p in leaves()[path].params)


def test_a_flag_is_typed_alone_and_a_value_after_it_is_refused(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    ok = invoke("data", "check", str(good), "--json", "--max-tokens", "0", env={"TUNEWHEEL_DATA_DIR": str(tmp_path)})
    assert ok.exit_code == 0 and '"ok": true' in ok.output.lower(), ok.output
    refused = invoke("data", "check", str(good), "--json", "true", "--max-tokens", "0")
    assert refused.exit_code == 2 and "unexpected extra argument" in refused.output.lower()


def test_the_api_key_option_names_its_environment_variable():
    for path in (("learn", "run"), ("eval",), ("restyle", "build"), ("restyle", "train")):
        text = invoke(*path, "--help").output
        assert "--api-key" in text and "TUNEWHEEL_API_KEY" in text, path
