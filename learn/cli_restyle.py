"""`tunewheel restyle ...`: the restyler's corpus, dataset, training and gate.

    tunewheel restyle synth --out corpus.jsonl --n 80          # a pirate-style corpus to try it on
    tunewheel restyle build --style pirate --texts corpus.jsonl  # de-style through the served model
    tunewheel restyle train --style pirate                       # train, score (chrF), gate, promote

`build` and `train` talk to a running gateway (`tunewheel serve`, default the configured
one, or `--url`): build de-styles each chunk through its base model, train scores the base
model and the candidate restyler on the held-out pairs through it. Both first run the
pre-flight (learn/preflight.py: base model there, gateway reachable, key accepted, engine
ready) and fail in one line, before chunking or training anything.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from feedback.cli_common import ApiKeyOption, ConfigOption, fail, load

app = typer.Typer(help="The restyler: style corpus -> (neutral -> styled) pairs -> restyler adapter.", no_args_is_help=True)


def _preflight(settings, url: str, api_key: str | None, model: str | None = None) -> None:
    """Base model and gateway (reachable, key accepted, engine ready, `model` served), in seconds."""
    from learn import preflight

    try:
        preflight.base_model(settings.base_model_path())
        check = preflight.Preflight(url, api_key)
        names = check.gateway()
        if model is not None:
            check.serves(names, model)
    except preflight.PreflightError as exc:
        fail(str(exc))


@app.command("synth")
def synth(ctx: typer.Context, out: Annotated[Path, typer.Option(help="JSONL with a `text` field per line.")],
          n: Annotated[int, typer.Option(help="Number of texts.")] = 80, seed: int = 0,
          config: ConfigOption = None) -> None:
    """Write a small corpus in the 'pirate' house style (deterministic for a seed)."""
    from learn.restyle import synth_corpus

    load(ctx, config)  # nothing here depends on it, but a bad --config fails as in every command
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for text in synth_corpus(n, seed):
            fh.write(json.dumps({"text": text}) + "\n")
    typer.echo(f"wrote {n} texts to {out}")


@app.command("build")
def build(ctx: typer.Context, style: Annotated[str, typer.Option(help="Style name (lowercase letters, digits, _).")],
          texts: Annotated[Path, typer.Option(help="Folder of .txt/.md files or JSONL with a `text` field.")],
          out_dir: Annotated[Optional[Path], typer.Option(help="Default: <data dir>/datasets/restyle/<style>.")] = None,
          url: Annotated[Optional[str], typer.Option(help="Gateway URL (default: the configured one).")] = None,
          model: Annotated[str, typer.Option(help="Served model that de-styles.")] = "base",
          max_chunk_tokens: int = 200, concurrency: int = 8,
          with_params: Annotated[bool, typer.Option("--with-params", help="Ask the model for each chunk's tone and mood and put them in its system prompt (then send them as `style_params` when chatting).")] = False,
          api_key: ApiKeyOption = None, config: ConfigOption = None) -> None:
    """Chunk the texts, de-style each chunk, write (neutral -> original) and reverse pairs."""
    settings = load(ctx, config)
    target = url or settings.gateway_url
    _preflight(settings, target, api_key, model)
    from transformers import AutoTokenizer  # after the pre-flight, which takes seconds

    from learn.restyle import RestyleDataError, chunk_text, extract_params, neutralise, read_texts, write_pairs
    tokenizer = AutoTokenizer.from_pretrained(settings.base_model_path())
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    try:
        sources = list(read_texts(texts))
    except RestyleDataError as exc:
        fail(str(exc))
    chunks = [c for _, text in sources for c in chunk_text(text, count_tokens=count, max_tokens=max_chunk_tokens)]
    if not chunks:
        fail(f"{texts} holds no text to chunk")
    started = time.perf_counter()
    params = asyncio.run(extract_params(chunks, url=target, model=model, concurrency=concurrency)) if with_params else None
    neutral = asyncio.run(neutralise(chunks, url=target, model=model,
                                     prompt=settings.restyle.neutralise_prompt, concurrency=concurrency, api_key=api_key))
    report = write_pairs(out_dir or settings.datasets_dir / "restyle" / style, style, chunks, neutral,
                         system_prompt=settings.restyle.system_prompt, neutralise_prompt=settings.restyle.neutralise_prompt,
                         params=params)
    report.texts = len(sources)
    typer.echo(f"{len(sources)} texts -> {report.chunks} chunks -> {report.pairs_train} train / "
               f"{report.pairs_heldout} held-out pairs ({report.dropped_empty} empty de-stylings dropped) "
               f"in {time.perf_counter() - started:.1f}s")
    for name, path in report.files.items():
        typer.echo(f"  {name}: {path}")


@app.command("train")
def train(ctx: typer.Context, style: Annotated[str, typer.Option(help="Style whose pairs `restyle build` wrote.")],
          data_dir: Annotated[Optional[Path], typer.Option(help="Default: <data dir>/datasets/restyle/<style>.")] = None,
          url: Annotated[Optional[str], typer.Option(help="Gateway URL for scoring (default: the configured one).")] = None,
          max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps.")] = None,
          epochs: Annotated[Optional[int], typer.Option(help="Override learn.train.epochs.")] = None,
          learning_rate: Annotated[Optional[float], typer.Option(help="Override learn.train.learning_rate.")] = None,
          min_chrf_gain: float = 1.0, max_content_drop: float = 0.1, api_key: ApiKeyOption = None,
          config: ConfigOption = None) -> None:
    """Train a restyler on the pairs, score it against the base model (chrF), gate, promote."""
    from pydantic import ValidationError

    from feedback.db import make_db
    from learn.registry import Registry
    from learn.restyle_train import train_restyler
    from learn.train import TrainConfig

    settings = load(ctx, config)
    data = data_dir or settings.datasets_dir / "restyle" / style
    _preflight(settings, url or settings.gateway_url, api_key)
    overrides = {k: v for k, v in (("max_steps", max_steps), ("epochs", epochs), ("learning_rate", learning_rate)) if v is not None}
    try:
        train_config = TrainConfig.model_validate({**settings.learn.train.model_dump(), **overrides})
    except ValidationError as exc:
        fail("; ".join(e["msg"] for e in exc.errors()), 2)
    registry = Registry(make_db(settings.store_url))
    outcome = train_restyler(train_config, registry, style=style, data_dir=data, base_model=settings.base_model_path(),
                             dirs=settings.learn_dirs, gateway_url=url or settings.gateway_url,
                             min_chrf_gain=min_chrf_gain, max_content_drop=max_content_drop)
    typer.echo(outcome.describe())
    if outcome.error:
        raise typer.Exit(1)
