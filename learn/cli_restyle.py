"""`tunewheel restyle ...`: the restyler's corpus, dataset, training and gate.

    tunewheel restyle synth --style pirate --out corpus.jsonl --n 80   # a house-style corpus to try it on
    tunewheel restyle build --style pirate --texts corpus.jsonl        # de-style, check, pairs, classifier
    tunewheel restyle train --style pirate                             # train, score on chat answers, gate

`build` and `train` talk to a running gateway (`tunewheel serve`, default the configured
one, or `--url`): build asks the served model for general answers (the classifier's
out-of-style text) and to de-style each chunk; train scores the base model and the candidate
restyler on chat answers through it. Both first run the pre-flight (learn/preflight.py: base
model there, gateway reachable, key accepted, engine ready) and fail in one line, before
chunking or training anything; the key (`--api-key` or TUNEWHEEL_API_KEY) goes with every request.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from feedback.cli_common import ApiKeyOption, ConfigOption, fail, load

app = typer.Typer(help="The restyler: style corpus -> (neutral -> styled) pairs -> restyler adapter.", no_args_is_help=True)
StyleOption = Annotated[str, typer.Option(help="Style name: lowercase letters, digits and _ (a folder and registry key).")]


def style_name(style: str) -> str:
    """The style name, or exit 2 saying what a valid one looks like."""
    from learn.restyle import RestyleDataError, check_style_name

    try:
        return check_style_name(style)
    except RestyleDataError as exc:
        fail(str(exc), 2)


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
          style: Annotated[str, typer.Option(help="pirate ('Ahoy, matey! ... Arr!') or scribe "
                                                  "('Greetings, dear reader. ... Yours faithfully, the Scribe.').")] = "pirate",
          config: ConfigOption = None) -> None:
    """Write a small corpus in a synthetic house style (deterministic for a seed)."""
    from learn.restyle_synth import STYLES, synth_corpus

    load(ctx, config)  # nothing here depends on it, but a bad --config fails as in every command
    if style not in STYLES:
        fail(f"unknown synthetic style {style!r}; one of: {', '.join(STYLES)}", 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for text in synth_corpus(n, seed, style):
            fh.write(json.dumps({"text": text}) + "\n")
    typer.echo(f"wrote {n} {style} texts to {out}")


@app.command("build")
def build(ctx: typer.Context, style: StyleOption,
          texts: Annotated[Path, typer.Option(help="Folder of .txt/.md files or JSONL with a `text` field.")],
          out_dir: Annotated[Optional[Path], typer.Option(help="Default: <data dir>/datasets/restyle/<style>.")] = None,
          url: Annotated[Optional[str], typer.Option(help="Gateway URL (default: the configured one).")] = None,
          model: Annotated[str, typer.Option(help="Served model that de-styles (a stronger one de-styles better).")] = "base",
          markers_only: Annotated[bool, typer.Option("--markers-only", help="De-style by deleting the style's markers only, without the model.")] = False,
          max_chunk_tokens: Annotated[Optional[int], typer.Option(help="Default: what fits learn.train.max_length as a pair.")] = None,
          concurrency: int = 8, seed: int = 0,
          with_params: Annotated[bool, typer.Option("--with-params", help="Ask the model for each chunk's tone and mood and put them in its system prompt (then send them as `style_params` when chatting).")] = False,
          api_key: ApiKeyOption = None, config: ConfigOption = None) -> None:
    """Chunk the texts, de-style each chunk (checked, retried or dropped), write pairs and the style classifier."""
    style = style_name(style)
    settings = load(ctx, config)
    target = url or settings.gateway_url
    _preflight(settings, target, api_key, model)
    from transformers import AutoTokenizer  # after the pre-flight, which takes seconds

    from feedback.check import load_token_counter
    from learn.restyle import RestyleDataError, build_dataset, chunk_text, extract_params, read_texts
    from learn.restyle_destyle import ask_model
    from learn.restyle_gate import GENERAL_PROMPTS, served_answers
    from learn.restyle_request import token_cap

    max_length = settings.learn.train.max_length
    limit = max_chunk_tokens or (max_length - 48) // 2  # a pair holds the chunk twice, plus its template
    tokenizer = AutoTokenizer.from_pretrained(settings.base_model_path())
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    try:
        sources = list(read_texts(texts))
    except RestyleDataError as exc:
        fail(str(exc))
    rng = random.Random(seed)
    chunks = [c for _, text in sources for c in chunk_text(text, count_tokens=count, max_tokens=limit, rng=rng)]
    if not chunks:
        fail(f"{texts} holds no text to chunk")
    started, r = time.perf_counter(), settings.restyle

    async def destyle_model(batch: list[str]) -> list[str]:
        return await ask_model(batch, url=target, model=model, prompt=r.neutralise_prompt, concurrency=concurrency,
                               max_tokens=lambda t: token_cap(t, ratio=r.max_tokens_ratio, extra=16), api_key=api_key)

    async def run():
        general = await served_answers(target, GENERAL_PROMPTS, model=model, max_tokens=r.gate.answer_max_tokens,
                                       concurrency=concurrency, api_key=api_key)
        params = await extract_params(chunks, url=target, model=model, concurrency=concurrency,
                                      api_key=api_key) if with_params else None
        return await build_dataset(chunks, style=style, out_dir=out_dir or settings.datasets_dir / "restyle" / style,
                                   general=general, destyle_model=None if markers_only else destyle_model,
                                   system_prompt=r.system_prompt, neutralise_prompt=r.neutralise_prompt,
                                   count_pairs=load_token_counter(settings.base_model_path()), max_length=max_length,
                                   params=params, seed=seed)

    report = asyncio.run(run())
    report.texts = len(sources)
    _print_build(report, sorted(count(c) for c in chunks), time.perf_counter() - started)


def _print_build(report, sizes: list[int], seconds: float) -> None:
    """Write build.json beside the pairs and print what the build did."""
    report.chunk_tokens = {"min": sizes[0], "median": int(statistics.median(sizes)), "max": sizes[-1]}
    Path(report.files["train"]).parent.joinpath("build.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
    typer.echo(f"{report.texts} texts -> {report.chunks} chunks ({sizes[0]}-{sizes[-1]} tokens, median "
               f"{report.chunk_tokens['median']}) -> {report.pairs_train} train / {report.pairs_heldout} held-out pairs "
               f"in {seconds:.1f}s")
    typer.echo(f"  style markers: {report.markers or 'none found'}")
    typer.echo(f"  transfer pairs (general answers dressed in a chunk's markers, train only): {report.transfer_pairs}")
    typer.echo(f"  de-styled by the model: {report.destyled_by['model']}, by deleting markers: {report.destyled_by['markers']}")
    typer.echo(f"  model de-stylings retried, by rule: {report.retried or 'none'}")
    typer.echo(f"  removed, by rule: {report.removed or 'none'}")
    for name, path in report.files.items():
        typer.echo(f"  {name}: {path}")


@app.command("train")
def train(ctx: typer.Context, style: StyleOption,
          data_dir: Annotated[Optional[Path], typer.Option(help="Default: <data dir>/datasets/restyle/<style>.")] = None,
          url: Annotated[Optional[str], typer.Option(help="Gateway URL for scoring (default: the configured one).")] = None,
          max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps (default: from the data size).")] = None,
          learning_rate: Annotated[Optional[float], typer.Option(help="Override restyle.learning_rate.")] = None,
          min_style_gain: Annotated[Optional[float], typer.Option(help="Override restyle.gate.min_style_gain.")] = None,
          answers: Annotated[Optional[int], typer.Option(help="Override restyle.gate.answers.")] = None,
          api_key: ApiKeyOption = None, config: ConfigOption = None) -> None:
    """Train a restyler on the pairs, score it and the base model on chat answers, gate, promote."""
    from pydantic import ValidationError

    from feedback.db import make_db
    from learn.registry import Registry
    from learn.restyle_train import train_restyler
    from learn.train import TrainConfig

    style = style_name(style)
    settings = load(ctx, config)
    data = data_dir or settings.datasets_dir / "restyle" / style
    _preflight(settings, url or settings.gateway_url, api_key)
    gate = {k: v for k, v in (("min_style_gain", min_style_gain), ("answers", answers)) if v is not None}
    try:
        train_config = TrainConfig.model_validate({**settings.learn.train.model_dump(),
                                                   **({"max_steps": max_steps} if max_steps else {})})
        restyle = settings.restyle.model_validate({**settings.restyle.model_dump(),
                                                   **({"learning_rate": learning_rate} if learning_rate else {}),
                                                   "gate": {**settings.restyle.gate.model_dump(), **gate}})
    except ValidationError as exc:
        fail("; ".join(e["msg"] for e in exc.errors()), 2)
    db = make_db(settings.store_url)
    outcome = train_restyler(train_config, Registry(db), style=style, data_dir=data, base_model=settings.base_model_path(),
                             dirs=settings.learn_dirs, gateway_url=url or settings.gateway_url, restyle=restyle, db=db,
                             api_key=api_key)
    typer.echo(outcome.describe())
    if outcome.error:
        raise typer.Exit(1)
