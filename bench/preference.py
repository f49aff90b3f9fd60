"""Preference training on one snapshot of the demo's users: which stages help, and TRL's trainers against the recipe.

    python bench/preference.py                 # a round of demo users on the base model -> snapshot -> every variant
    python bench/preference.py --users 30 --epochs 2
    python bench/preference.py --snapshot .tunewheel/demo/datasets/snapshots/snap-...   # reuse a demo's snapshot

One run, one machine: `tunewheel serve` (engine + gateway) on a fresh data dir; the base model's
held-out EM/F1 (the demo's operator set, 8 variant-B stories); unless --snapshot is given, one round
of the demo's simulated users (serve/demo_users.py: every answer rated by F1 against the gold, the
gold written as a correction on one thumbs-down in three) curated into a snapshot. Then, on that
snapshot, the same LoRA and optimizer settings for every variant:
  sft            the recipe's SFT stage (up-rated answers and corrections)
  sft -> kto     then the recipe's KTO stage (thumbs up/down, plus both sides of each pair)
  kto            the recipe's KTO stage alone, from the base model
  sft -> dpo     then the recipe's DPO stage (a correction over the answer it corrects)
  kto (TRL)      TRL's KTOTrainer from the base model, same rows and class weights
  sft -> dpo (TRL)  TRL's DPOTrainer from the recipe's SFT adapter (TRL's own copy of it is the reference)
The second stage of a two-stage variant starts from the `sft` variant's adapter (start_adapter), as
a two-stage cycle does, so SFT is trained once. Each adapter is registered as a candidate and scored
through the gateway (`chat@<version>`), as the learner's gate scores. Prints the table (held-out EM,
F1, its change over the base, training tokens/s and seconds of the stage(s) trained) and writes
bench/results/preference.json. The machine is shared: timings are noisy, ratios within one run less so.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learn.train import TrainConfig, train_in_child  # noqa: E402
from learn.train_data import split_validation  # noqa: E402
from learn.train_pref import class_weights, kto_rows, read_preferences  # noqa: E402

RESULTS = REPO / "bench" / "results" / "preference.json"


def serve(work: Path, args):
    """(server process, gateway url, settings) of `tunewheel serve` on a fresh data dir, with the demo's held-out set."""
    from feedback.synth import synth_coqa
    from serve.demo import start_server
    from serve.engine_child import free_port
    from serve.model import prepare_model
    from serve.settings import load_settings

    model = prepare_model(load_settings())
    heldout, users = work / "heldout_B.json", work / "users_A.json"
    heldout.write_text(json.dumps(synth_coqa(stories=args.heldout_stories, seed=1, variant="B")))
    users.write_text(json.dumps(synth_coqa(stories=max(args.users, 1), seed=2, variant="A")))
    config = work / "tunewheel.toml"
    config.write_text(f'data_dir = "{work / "data"}"\n[serve]\nport = {free_port()}\n[engine]\nmodel = "{model}"\n'
                      f'[learn]\nheldout_file = "{heldout}"\n[learn.train]\nrank = {args.rank}\nmax_length = {args.max_length}\n')
    proc, url = start_server(config, work / "serve.log")
    return proc, url, load_settings(config), users


def make_snapshot(settings, url: str, users: Path, args) -> Path:
    """One round of the demo's users on the base model, curated as a learner cycle curates."""
    from feedback.db import make_db
    from learn.cycle import _snapshot
    from serve.demo_users import users_round

    r = users_round(url, users, correct_every=3)
    print(f"users: {r['users']} users, {r['up']}/{r['total']} thumbs up, {r['corrections']} corrections", flush=True)
    time.sleep(2)  # the gateway's turn writer flushes in the background
    return _snapshot(settings.learn, make_db(settings.store_url), settings.learn_dirs, settings.base_model_path()).path


def recipe(config: TrainConfig, settings, snapshot: Path, stages: list[str], out: Path, start: Path | None = None) -> dict:
    files = {"train_file": snapshot / "train.jsonl", "preference_file": snapshot / "preferences.jsonl", "pair_file": snapshot / "preference_pairs.jsonl"}
    result = train_in_child(config, base_model=settings.base_model_path(), out_dir=out, stages=stages, start_adapter=start,
                            **{k: v for k, v in files.items() if v.is_file()})
    m = result.metrics
    ran = [s for s in stages if s in m["stages"]]
    return {"adapter": out, "ran": ran, "skipped": m["skipped_stages"], "tokens": sum(m["stages"][s]["tokens"] for s in ran),
            "seconds": sum(m["stages"][s]["train_seconds"] + m["stages"][s]["reference_s"] for s in ran),
            "stages": {s: {k: m["stages"][s][k] for k in ("steps", "tokens_per_s", "train_seconds", "reference_s", "val_loss", "examples")}
                       for s in ran}}


def trl_run(kind: str, config: TrainConfig, settings, snapshot: Path, out: Path, start: Path | None) -> dict:
    """TRL's KTOTrainer (from the base) or DPOTrainer (from `start`), the recipe's rows, settings and thread policy."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from learn.cores import CoreShare

    cores = CoreShare(config.threads)  # the recipe's thread policy: the cores nobody else uses
    torch.set_num_threads(cores.current)
    base = settings.base_model_path()
    from feedback.check import load_token_counter

    limits = dict(max_tokens=config.max_length, count_tokens=load_token_counter(base))
    pairs = read_preferences(snapshot / "preference_pairs.jsonl", kind="dpo", **limits)
    if kind == "kto":
        rows = kto_rows(read_preferences(snapshot / "preferences.jsonl", kind="kto", **limits), pairs)
    else:
        rows = pairs
    rows = split_validation(rows, config.val_fraction, config.seed)[0]  # the recipe's training split
    random.Random(config.seed).shuffle(rows)  # KTOTrainer reads in order (its KL pairs are neighbours)
    data = Dataset.from_list([{k: v for k, v in r.items() if k != "meta"} for r in rows])
    common = dict(output_dir=str(out.with_suffix(".trl")), per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
                  lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio, num_train_epochs=config.epochs, max_length=config.max_length,
                  beta=config.beta, max_grad_norm=1.0, seed=config.seed, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                  logging_steps=10, gradient_checkpointing=False, max_steps=config.max_steps or -1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_config = None
    if kind == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        up = sum(r["label"] for r in rows)
        w = class_weights(up, len(rows) - up)
        args = Config(**common, desirable_weight=w[0], undesirable_weight=w[1])
        peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target_modules,
                                 bias="none", task_type="CAUSAL_LM")
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        args = Config(**common)
        model = PeftModel.from_pretrained(model, str(start), is_trainable=True)  # TRL copies it as the "ref" adapter
    clock: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_step_begin(self, *a, **k):
            cores.apply()

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

    started = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(base),
                      peft_config=peft_config, callbacks=[Clock()])
    setup = time.perf_counter() - started
    trainer.train()
    trainer.model.save_pretrained(str(out), selected_adapters=["default"])
    seconds = clock["end"] - clock["start"]
    tokens = trainer._total_train_tokens
    return {"adapter": out, "ran": [kind], "skipped": {}, "tokens": tokens, "seconds": seconds, "setup_s": setup,
            "stages": {kind: {"steps": trainer.state.global_step, "tokens_per_s": tokens / seconds, "train_seconds": seconds}}}


def score(settings, url: str, adapter: Path | None, registry) -> dict:
    """Held-out EM/F1 of an adapter (registered as a candidate, served as chat@<version>) or of the base model."""
    from learn.evaluate import evaluate

    model = "base"
    if adapter is not None:
        name = registry.new_version_name("chat")
        registry.register(name, kind="chat", path=adapter)
        model = f"chat@{name}"
    report = evaluate(settings.learn.heldout_file, model=model, url=url, max_tokens=settings.learn.eval_max_tokens,
                      concurrency=settings.learn.eval_concurrency, timeout=settings.serve.request_timeout_s, progress=False)
    return {"em": report.em, "f1": report.f1, "n_turns": report.n_turns, "model": model}


def variants(config: TrainConfig, settings, snapshot: Path, work: Path):
    """(name, stages, run) of every variant, in an order where each one's start exists when it runs."""
    sft = work / "sft"
    yield "sft", "sft", lambda: recipe(config, settings, snapshot, ["sft"], sft)
    yield "sft -> kto", "kto", lambda: recipe(config, settings, snapshot, ["kto"], work / "sft-kto", start=sft)
    yield "kto", "kto", lambda: recipe(config, settings, snapshot, ["kto"], work / "kto")
    yield "sft -> dpo", "dpo", lambda: recipe(config, settings, snapshot, ["dpo"], work / "sft-dpo", start=sft)
    yield "kto (TRL)", "kto", lambda: trl_run("kto", config, settings, snapshot, work / "kto-trl", None)
    yield "sft -> dpo (TRL)", "dpo", lambda: trl_run("dpo", config, settings, snapshot, work / "sft-dpo-trl", sft)


def report_lines(base: dict, rows: list[dict], snapshot: Path) -> list[str]:
    manifest = json.loads((snapshot / "manifest.json").read_text())
    counts = {name: sum(1 for line in open(snapshot / name) if line.strip()) if (snapshot / name).is_file() else 0
              for name in ("train.jsonl", "preferences.jsonl", "preference_pairs.jsonl")}
    lines = [f"snapshot {manifest['version']}: {counts['train.jsonl']} SFT examples, {counts['preferences.jsonl']} rated answers, "
             f"{counts['preference_pairs.jsonl']} pairs",
             f"{'variant':<18}{'EM':>7}{'F1':>7}{'dF1':>8}{'tokens/s':>10}{'train s':>9}  stage(s) trained",
             f"{'base model':<18}{base['em']:7.3f}{base['f1']:7.3f}{'':>8}{'':>10}{'':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<18}  failed: {r['error']}")
            continue
        tps = r["tokens"] / r["seconds"] if r["seconds"] else 0.0
        skipped = "; skipped " + ", ".join(f"{k} ({v})" for k, v in r["skipped"].items()) if r["skipped"] else ""
        lines.append(f"{r['name']:<18}{r['em']:7.3f}{r['f1']:7.3f}{r['f1'] - base['f1']:+8.3f}{tps:10.0f}{r['seconds']:9.0f}  "
                     f"{'+'.join(r['ran']) or '-'}{skipped}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, help="a learner snapshot folder to train on (default: make one from a users round)")
    parser.add_argument("--users", type=int, default=20, help="simulated users in the round that makes the snapshot")
    parser.add_argument("--heldout-stories", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--only", nargs="+", help="run only these variants (names as in the table)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = TrainConfig(rank=args.rank, alpha=2 * args.rank, learning_rate=args.learning_rate, batch_size=4, max_length=args.max_length,
                         epochs=args.epochs, max_steps=args.max_steps, beta=args.beta)
    from learn.registry import Registry
    from serve.demo import stop_server

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-preference-") as tmp:
        work = Path(tmp)
        proc, url, settings, users = serve(work, args)
        try:
            from feedback.db import make_db

            registry = Registry(make_db(settings.store_url))
            base = score(settings, url, None, registry)
            print(f"base model: EM {base['em']:.3f} F1 {base['f1']:.3f}", flush=True)
            snapshot = args.snapshot or make_snapshot(settings, url, users, args)
            rows = []
            for name, stage, run in variants(config, settings, snapshot, work):
                if args.only and name not in args.only:
                    continue
                try:
                    row = {"name": name, **run()}
                    if not row["ran"]:
                        raise RuntimeError(f"nothing trained: {row['skipped']}")
                    row.update(score(settings, url, row["adapter"], registry))
                except Exception as exc:  # a failed variant is a row of the table, not the end of the bench
                    row = {"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
                rows.append(row)
                print("\n".join(report_lines(base, rows, snapshot)[-1:]), flush=True)
            lines = report_lines(base, rows, snapshot)
        finally:
            stop_server(proc)
    result = {"base": base, "variants": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows],
              "snapshot": str(snapshot), "settings": {**config.model_dump(), "users": args.users}, "minutes": (time.monotonic() - started) / 60}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\n{result['minutes']:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
