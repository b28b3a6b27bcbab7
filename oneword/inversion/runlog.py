"""The loss log of a run: a CSV that survives resumes, and its plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from oneword.fileio import atomic_path, atomic_write_text

HEADER = ["step", "loss", "lr", "elapsed_s"]


class LossLog:
    """Appends one row per step to ``path``; on resume, rows after ``keep_until`` are dropped so
    that the file describes exactly the steps the resumed state has taken."""

    def __init__(self, path: Path, keep_until: int = 0, flush_every: int = 20) -> None:
        self.path = path
        rows: list[list[str]] = []
        if keep_until > 0 and path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in list(csv.reader(fh))[1:] if r and int(r[0]) <= keep_until]
        lines = [",".join(HEADER)] + [",".join(r) for r in rows]
        atomic_write_text(path, "\n".join(lines) + "\n")
        self._fh = open(path, "a", newline="")  # noqa: SIM115  (kept open for the run; see close())
        self._writer = csv.writer(self._fh)
        self._pending = 0
        self.flush_every = flush_every
        self.smoothed = float(rows[-1][1]) if rows else math.nan

    def append(self, step: int, loss: float, lr: float, elapsed: float) -> None:
        self._writer.writerow([step, f"{loss:.6f}", f"{lr:.6g}", f"{elapsed:.2f}"])
        self.smoothed = loss if math.isnan(self.smoothed) else 0.95 * self.smoothed + 0.05 * loss
        self._pending += 1
        if self._pending >= self.flush_every:
            self._fh.flush()
            self._pending = 0

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def read_losses(path: Path) -> tuple[list[int], list[float]]:
    with open(path, newline="") as fh:
        rows = [r for r in list(csv.reader(fh))[1:] if r]
    return [int(r[0]) for r in rows], [float(r[1]) for r in rows]


def plot_losses(csv_path: Path, png_path: Path) -> Path | None:
    """Raw per-step loss (faint) and its running mean; nothing is written for an empty log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = read_losses(csv_path)
    if not steps:
        return None
    window = max(1, len(losses) // 50)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, alpha=0.3, lw=0.8, label="loss")
    ax.plot(steps, smooth, lw=1.6, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png_path
