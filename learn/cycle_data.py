"""What a learner cycle trains on, as `[learn.policy]` says, and whether its held-out set may promote.

    trusted, why = heldout_trust(learn.heldout_file, snapshot.manifest)
    data = cycle_data(policy, snapshot.path, lineage=[earlier snapshot folders], out=run_folder / "data", seed=0)
    data.files     # {"train_file": ..., "preference_file": ..., "pair_file": ...}: the trainer's arguments
    data.counts    # examples by source: {"sft": {"rated": 40, "corrected": 12, "replay": 10}, "kto": {"up": 40, "down": 90},
                   #                      "dpo": {"pairs": 12}}

`start = "base"`: a fresh LoRA trains on the snapshot's files as they are (the snapshot holds the
whole log, curated). `start = "champion"`: the champion already learnt the rows of the snapshots
its lineage was trained on, so the cycle keeps only rows that are new since then, in every file,
and adds `replay_share` of the SFT set drawn (seeded) from those earlier rows, marked
`"source": "replay"`, so that continuing does not forget. No new row at all: nothing to learn
(`NothingNew`). The snapshot's files are never changed; a cycle that filters writes its own copies.

Promotion needs a held-out set the operator controls: `learn.heldout_file`, or a log-derived set
the snapshot's manifest marks trusted (`"heldout": {"trusted": true, "why": ...}`, curated from
keys the operator trusts). Anything else is a set any caller could shape, by choosing which
conversations land in it or what their answers say.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FILES = {"train_file": "train.jsonl", "preference_file": "preferences.jsonl", "pair_file": "preference_pairs.jsonl"}


class NothingNew(Exception):
    """Continuing the champion, but the snapshot holds no row its lineage has not learnt already."""


@dataclass
class CycleData:
    files: dict[str, Path | None]
    """The trainer's data arguments (train_file, preference_file, pair_file); None: the snapshot has no such file."""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Examples by source, per stage's file."""
    start: str = "base"
    """base, or champion:<version> when training continues that adapter."""


def heldout_trust(heldout_file: str | None, manifest: dict) -> tuple[bool, str]:
    """(operator-controlled?, why): `learn.heldout_file`, or what the snapshot's manifest says of its held-out split."""
    if heldout_file:
        return True, f"learn.heldout_file {heldout_file}, set by the operator"
    said = manifest.get("heldout") or {}
    if said.get("trusted"):
        return True, said.get("why") or "the snapshot marks its held-out conversations trusted"
    return False, said.get("why") or "it is split from the turn log, which any caller can shape"


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def content_key(row: dict) -> str:
    """A row's identity without its meta: the same example from two snapshots is the same key."""
    return json.dumps({k: v for k, v in row.items() if k != "meta"}, sort_keys=True, ensure_ascii=False)


def count(files: dict[str, Path | None]) -> dict[str, dict[str, int]]:
    """Examples by source in each file: SFT by meta.source, KTO by rating, DPO pairs."""
    sft = read_rows(files["train_file"]) if files.get("train_file") else []
    kto = read_rows(files["preference_file"]) if files.get("preference_file") else []
    pairs = read_rows(files["pair_file"]) if files.get("pair_file") else []
    return {"sft": dict(Counter((r.get("meta") or {}).get("source") or "seed" for r in sft)),
            "kto": {"up": sum(1 for r in kto if r.get("label")), "down": sum(1 for r in kto if not r.get("label"))},
            "dpo": {"pairs": len(pairs)}}


def replay_rows(earlier: list[dict], n_new: int, share: float, seed: int) -> list[dict]:
    """`share` of the final SFT set (new + replay) drawn from `earlier`, marked as replay."""
    want = min(len(earlier), round(share / (1 - share) * n_new)) if share else 0
    picked = random.Random(seed).sample(earlier, want)
    return [{**r, "meta": {**(r.get("meta") or {}), "source": "replay"}} for r in picked]


def cycle_data(policy, snapshot: Path, *, lineage: list[Path], out: Path, seed: int = 0, champion: str | None = None) -> CycleData:
    """The training files of this cycle (see the module docstring)."""
    snapshot = Path(snapshot)
    files = {arg: (snapshot / name if (snapshot / name).is_file() else None) for arg, name in FILES.items()}
    if policy.start == "base" or champion is None:
        return CycleData(files=files, counts=count(files))
    learnt: dict[str, dict[str, dict]] = {arg: {} for arg in FILES}
    for folder in lineage:
        for arg, name in FILES.items():
            learnt[arg].update((content_key(r), r) for r in read_rows(Path(folder) / name))
    fresh = {arg: [r for r in read_rows(path) if content_key(r) not in learnt[arg]] if path else [] for arg, path in files.items()}
    if not any(fresh.values()):
        raise NothingNew(f"snapshot {snapshot.name} holds nothing that {champion}'s lineage has not been trained on")
    replay = replay_rows(list(learnt["train_file"].values()), len(fresh["train_file"]), policy.replay_share, seed)
    fresh["train_file"] = fresh["train_file"] + replay
    written = {arg: write_rows(Path(out) / FILES[arg], rows) if files[arg] or rows else None for arg, rows in fresh.items()}
    return CycleData(files=written, counts=count(written), start=f"champion:{champion}")
