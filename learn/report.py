"""The run report of one training run: `report.json` and `loss.png` in a folder.

    from learn.report import write_report
    write_report(folder, report)     # report: the dict `learn.train` builds

`report.json` holds the config, step and epoch counts, train loss per optimizer step,
validation loss per epoch, token counts, tokens/s, padding fraction, duration and device.
`loss.png` plots the train loss per step and the validation loss at the end of each epoch, one
panel per stage (sft, kto, dpo) of the run.
The plot uses matplotlib's Agg backend, so it works on a machine without a display.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_JSON = "report.json"
LOSS_PNG = "loss.png"


def write_report(folder: str | Path, report: dict) -> Path:
    """Write report.json and loss.png into `folder` (created if needed); return the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT_JSON
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot_losses(report, folder / LOSS_PNG)
    return path


def plot_losses(report: dict, png: Path) -> None:
    """Train loss per optimizer step (line) and validation loss at the end of each epoch (markers), one
    panel per stage: SFT's loss is per token, KTO's and DPO's per answer, on scales of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = report.get("train_loss_per_step", [])
    epochs = report.get("epochs_log", [])
    stages = report.get("stages") or {"sft": {"first_step": 0, "steps": len(train)}}
    fig, axes = plt.subplots(1, len(stages), figsize=(7 * len(stages) ** 0.5 + 1, 4), dpi=100, squeeze=False)
    config = report.get("config", {})
    for ax, (name, stage) in zip(axes[0], stages.items()):
        first, steps = stage.get("first_step", 0), stage.get("steps", len(train))
        ax.plot(range(first + 1, first + steps + 1), train[first: first + steps], label="train loss (per step)", color="tab:blue", linewidth=1)
        val = [(e["step"], e["val_loss"]) for e in epochs if e.get("val_loss") is not None and e.get("stage", "sft") == name]
        if val:
            at, losses = zip(*val)
            ax.plot(at, losses, "o--", label="validation loss (per epoch)", color="tab:orange")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean per scored token)" if name == "sft" else f"{name.upper()} loss (mean per answer)")
        ax.set_title(f"{name}: {Path(str(config.get('base_model', ''))).name}  r={config.get('rank')}  lr={config.get('learning_rate')}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
