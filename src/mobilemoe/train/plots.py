"""Pictures of a run: loss curves of every stage and expert-load heat maps, as PNG."""

from __future__ import annotations

import json
from pathlib import Path

from mobilemoe.errors import MobileMoEError


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """Stage name -> metric records, in the order the recipe ran them."""
    run_dir = Path(run_dir)
    stages = {}
    summary = run_dir / "summary.json"
    order = list(json.loads(summary.read_text())["stages"]) if summary.exists() else []
    files = sorted(run_dir.glob("*/metrics.jsonl"), key=lambda f: (order.index(f.parent.name)
                                                                   if f.parent.name in order else len(order)))
    for file in files:
        stages[file.parent.name] = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if not stages:
        raise MobileMoEError(f"{run_dir} has no */metrics.jsonl: is it a run directory written by `mobilemoe train`?")
    return stages


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, label: str | None = None) -> list[Path]:
    """Loss curves (train and held-out, all stages on one token axis) and one expert-load heat map per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    stages = read_metrics(run_dir)  # before creating anything: a wrong path leaves no directory behind
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for stage, records in stages.items():
        tokens = [offset + r["tokens"] for r in records]
        line, = ax.plot(tokens, [r["loss"] for r in records], label=f"{stage} train", alpha=0.8)
        val = [(offset + r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax.plot(*zip(*val, strict=True), "o--", color=line.get_color(), label=f"{stage} held-out")
        offset = tokens[-1] if tokens else offset
        ax.axvline(offset, color="grey", lw=0.5)
    ax.set(xlabel="tokens (cumulative over stages)", ylabel="loss (nats/token)", title=f"{label or run_dir.name}: loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    for stage, records in stages.items():
        loads = [r for r in records if "expert_load" in r]
        if not loads:
            continue
        last = loads[-1]["expert_load"]  # [layers, experts], fraction of assignments
        fig, ax = plt.subplots(figsize=(8, 0.6 + 0.5 * len(last)))
        n_experts = len(last[0])
        image = ax.imshow(last, aspect="auto", cmap="viridis", vmin=0, vmax=max(max(row) for row in last))
        ax.set(xlabel="expert", ylabel="layer", title=f"{stage}: expert load at step {loads[-1]['step']} "
               f"(uniform = {1 / n_experts:.3f}; max violation {loads[-1]['max_violation']:.2f})")
        fig.colorbar(image, ax=ax, label="fraction of token assignments")
        fig.tight_layout()
        written.append(out / f"expert_load_{stage}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_compare(run_dirs: list[str | Path], path: str | Path, smooth: int = 10) -> Path:
    """Loss curves of several runs on one axis (every stage, cumulative tokens), e.g. MoEs and the dense control
    trained by the same recipe: train loss per step (faint) and its mean over the last `smooth` steps of the
    stage (solid: over hundreds of steps the batch-to-batch swings hide a gap between runs that the mean shows),
    held-out loss as dots, stage boundaries as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    boundaries = {}
    for run_dir in map(Path, run_dirs):
        offset, colour = 0, None
        for i, (stage, records) in enumerate(read_metrics(run_dir).items()):
            tokens = [offset + r["tokens"] for r in records]
            loss = [r["loss"] for r in records]
            line, = ax.plot(tokens, loss, alpha=0.2, linewidth=0.8, color=colour)
            colour = line.get_color()
            window = [loss[max(0, j + 1 - smooth):j + 1] for j in range(len(loss))]
            ax.plot(tokens, [sum(w) / len(w) for w in window], color=colour, linewidth=1.8,
                    label=run_dir.name if i == 0 else None)
            val = [(offset + r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
            if val:
                ax.plot(*zip(*val, strict=True), "o", color=colour, markersize=7, markeredgecolor="black")
            offset = tokens[-1] if tokens else offset
            boundaries.setdefault(stage, offset)
    for stage, end in boundaries.items():
        ax.axvline(end, color="grey", linestyle=":", linewidth=1)
        ax.annotate(stage, (end, 1), xycoords=("data", "axes fraction"), ha="right", va="top", fontsize=8,
                    color="grey")
    ax.set(xlabel="tokens (cumulative over stages)", ylabel="loss (nats/token)",
           title=f"train loss (faint: per step; solid: mean of the last {smooth} steps) and held-out loss (dots)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
