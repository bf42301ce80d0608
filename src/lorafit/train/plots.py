"""loss.png: training and validation loss against optimizer steps, with the learning rate on a second axis."""
from __future__ import annotations

from pathlib import Path

from lorafit.train.log import read_metrics


def plot_loss(run_dir: Path, out: Path | None = None) -> Path | None:
    """Draw metrics.jsonl of `run_dir` into loss.png (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt


    recs = read_metrics(run_dir)
    train = [(r["step"], r["loss"], r.get("lr")) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if not train and not val:
        return None
    out = Path(out or Path(run_dir) / "loss.png")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot([s for s, _, _ in train], [v for _, v, _ in train], lw=1, color="tab:blue", label="train loss")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if train and any(lr is not None for _, _, lr in train):
        ax2 = ax.twinx()
        ax2.plot([s for s, _, _ in train], [lr for _, _, lr in train], lw=1, ls="--", color="tab:gray", label="lr")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        l2, lb2 = ax2.get_legend_handles_labels()
        lines, labels = lines + l2, labels + lb2
    ax.legend(lines, labels, loc="upper right")
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
