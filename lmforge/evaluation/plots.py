"""Loss curves as pictures. matplotlib only, no torch: the flow's own process draws the challenger
against the champion without importing the model's stack (seconds of start-up on a small machine)."""

from __future__ import annotations

from pathlib import Path

from lmforge.runs.contracts import read_curve, read_train_log, write_curves


def plot_loss_curve(log_path: Path, eval_dir: Path) -> None:
    """The train and val loss against step: the JSON series for `dvc plots`, and a PNG for people."""
    write_curves(eval_dir, read_train_log(log_path))
    plot_curves({"": read_curve(eval_dir)}, eval_dir / "loss_curve.png", "lmforge training loss")


def plot_curves(curves: dict[str, list[dict]], png: Path, title: str) -> None:
    """Train and val loss against step, one pair of lines per named curve, on one set of axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, points in curves.items():
        prefix = f"{name}: " if name else ""
        (line,) = ax.plot(
            [p["step"] for p in points], [p["train_loss"] for p in points], label=f"{prefix}train loss",
            linewidth=1, alpha=0.8,
        )  # fmt: skip
        val = [p for p in points if "val_loss" in p]
        style = {"color": line.get_color()} if name else {}
        ax.plot([p["step"] for p in val], [p["val_loss"] for p in val], "o-", label=f"{prefix}val loss",
                linewidth=2, **style)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
