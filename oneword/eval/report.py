"""Tables and plots of evaluation rows: ``results.json``, ``results.md``, ``quality_vs_steps.png``
and ``recon_edit_plane.png`` (the paper's reconstruction-editability figure)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from oneword.eval.protocol import Scores
from oneword.fileio import atomic_path, atomic_write_text

REFERENCES = ("initializer word", "real images")
#: (reconstruction metric, editability metric, label) pairs drawn when measured.
PAIRS = (
    ("recon_clip", "edit_clip", "CLIP"),
    ("recon_oracle", "edit_oracle", "oracle"),
    ("recon_oracle", "attr_edit_oracle", "oracle, attribute edits"),
)


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Mean of every score over concepts, per (method, steps); rows in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["steps"]), []).append(row)
    out = []
    for (method, steps), members in groups.items():
        summary = {
            "method": method,
            "steps": steps,
            "concepts": len(members),
            "seconds": sum(r.get("seconds") or 0.0 for r in members) / len(members),
        }
        for name in Scores.names():
            vals = [r[name] for r in members if r.get(name) is not None]
            summary[name] = sum(vals) / len(vals) if vals else None
        out.append(summary)
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown_table(summary: Sequence[dict]) -> str:
    """A Markdown table with only the score columns that were measured."""
    cols = [n for n in Scores.names() if any(r.get(n) is not None for r in summary)]
    head = ["method", "steps", *cols, "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        steps = "–" if r["steps"] is None else str(r["steps"])
        cells = [r["method"], steps, *(_fmt(r.get(c)) for c in cols), f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_quality_vs_steps(summary: Sequence[dict], path: Path) -> Path | None:
    """One panel per measured score, a line per method, references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [n for n in Scores.names() if any(r.get(n) is not None for r in summary)]
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in summary if r["steps"] is not None))
    for ax, col in zip(axes[0], cols):
        for m in methods:
            pts = sorted(
                (r["steps"], r[col])
                for r in summary
                if r["method"] == m and r["steps"] is not None and r.get(col) is not None
            )
            if pts:
                xs = [max(x, 1) for x, _ in pts]  # log axis: budget 0 drawn at 1
                ax.plot(xs, [y for _, y in pts], marker="o", label=m)
        for ref, style in zip(REFERENCES, (":", "--")):
            vals = [r[col] for r in summary if r["method"] == ref and r.get(col) is not None]
            if vals:
                ax.axhline(vals[0], color="gray", linestyle=style, label=ref)
        ax.set_xscale("log")
        ax.set_xlabel("optimization steps (0 drawn at 1)")
        ax.set_title(col)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_plane(
    summary: Sequence[dict], path: Path, pairs: Sequence[tuple[str, str, str]] = PAIRS
) -> Path | None:
    """Reconstruction (x) against editability (y), a curve per method labelled with its steps: a
    panel per measured ``(reconstruction metric, editability metric, label)`` of ``pairs``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in pairs if any(r.get(p[0]) is not None and r.get(p[1]) is not None for r in summary)]
    if not pairs:
        return None
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.2), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in summary))
    for ax, (rx, ry, label) in zip(axes[0], pairs):
        for m in methods:
            pts = sorted(
                ((r["steps"] if r["steps"] is not None else -1), r[rx], r[ry])
                for r in summary
                if r["method"] == m and r.get(rx) is not None and r.get(ry) is not None
            )
            if not pts:
                continue
            ax.plot(
                [p[1] for p in pts],
                [p[2] for p in pts],
                marker="o" if pts[0][0] >= 0 else "*",
                markersize=6 if pts[0][0] >= 0 else 12,
                label=m,
            )
            for steps, x, y in pts:
                if steps >= 0:
                    ax.annotate(str(steps), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel(f"reconstruction ({rx})")
        ax.set_ylabel(f"editability ({ry})")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def row_at(summary: Sequence[dict], method: str, steps: int) -> dict | None:
    """The summary row of ``method`` at ``steps``, if measured."""
    return next((r for r in summary if r["method"] == method and r["steps"] == steps), None)


def steps_to_match(
    summary: Sequence[dict], method: str, reference: dict, metrics: Sequence[str]
) -> dict | None:
    """The first (fewest-steps) row of ``method`` scoring at least ``reference`` on every metric."""
    rows = sorted(
        (r for r in summary if r["method"] == method and r["steps"] is not None), key=lambda r: r["steps"]
    )
    for r in rows:
        if all(
            r.get(m) is not None and reference.get(m) is not None and r[m] >= reference[m] for m in metrics
        ):
            return r
    return None


def paired_gap(
    rows: Sequence[dict],
    a: tuple[str, int],
    b: tuple[str, int],
    metric: str,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> dict | None:
    """Mean over concepts of ``a``'s score minus ``b``'s (each a ``(method, steps)``), with a
    percentile bootstrap interval that resamples concepts (paired: both scores of a concept move
    together, so what varies is which concepts were drawn and their samples). None when no concept
    has both scores. ``{"gap", "lo", "hi", "concepts"}``."""

    def by_concept(method: str, steps: int) -> dict[str, float]:
        return {
            r["concept"]: r[metric]
            for r in rows
            if r["method"] == method and r["steps"] == steps and r.get(metric) is not None
        }

    left, right = by_concept(*a), by_concept(*b)
    names = [c for c in left if c in right]
    if not names:
        return None
    diffs = torch.tensor([left[c] - right[c] for c in names], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(names), (resamples, len(names)), generator=gen)
    means = diffs[picks].mean(1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"gap": float(diffs.mean()), "lo": lo, "hi": hi, "concepts": len(names)}


def format_gap(gap: dict, metric: str) -> str:
    """``recon_oracle -0.013 [-0.035, +0.008]`` (the bootstrap interval in brackets)."""
    return f"{metric} {gap['gap']:+.3f} [{gap['lo']:+.3f}, {gap['hi']:+.3f}]"


#: The metrics the project's goals are judged on (identity is reported, not a goal).
GOAL_METRICS = ("recon_oracle", "edit_oracle", "recon_clip", "edit_clip")


def goal_pairs(
    rows: Sequence[dict], method: str, compare_at: int
) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """The two goals as ``(a, b)`` pairs for :func:`goal_gaps`: ``method`` alone against scratch at
    ``compare_at`` steps, and ``method`` at its largest budget against scratch at its largest. Scratch
    at 0 steps is the initializer word, no goal: without a larger scratch budget the second pair is
    left out (as the first is, by :func:`goal_gaps`, when ``compare_at`` was not measured)."""

    def top(m: str) -> int:
        return max((r["steps"] for r in rows if r["method"] == m and r["steps"] is not None), default=0)

    pairs = [((method, 0), ("scratch", compare_at))]
    if top("scratch") > 0:
        pairs.append(((method, top(method)), ("scratch", top("scratch"))))
    return pairs


def select_pairs(rows: Sequence[dict]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """Each ``<method> + select`` row set (the word kept by a round trip, see
    :data:`oneword.eval.curves.SELECT_SUFFIX`) against ``<method>`` at the same budget, i.e. against
    always keeping the refined word."""
    from oneword.eval.curves import SELECT_SUFFIX

    have = {(r["method"], r["steps"]) for r in rows}
    pairs = []
    for method, steps in dict.fromkeys((r["method"], r["steps"]) for r in rows):
        base = method.removesuffix(SELECT_SUFFIX)
        if base != method and (base, steps) in have:
            pairs.append(((method, steps), (base, steps)))
    return pairs


def goal_gaps(
    rows: Sequence[dict], pairs: Sequence[tuple[tuple[str, int], tuple[str, int]]], metrics: Sequence[str]
) -> list[str]:
    """One line per ``(a, b)`` pair: ``a``'s gap to ``b`` on every metric, with bootstrap intervals.
    An interval that straddles 0 means the concepts measured cannot tell the two apart."""
    lines = []
    for a, b in pairs:
        gaps = [(m, paired_gap(rows, a, b, m)) for m in metrics]
        shown = [format_gap(g, m) for m, g in gaps if g is not None]
        if shown:
            n = next(g["concepts"] for _, g in gaps if g is not None)
            lines.append(
                f"{a[0]} @ {a[1]} minus {b[0]} @ {b[1]} ({n} concepts, 95% interval): " + ", ".join(shown)
            )
    return lines


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(
    rows: Sequence[dict],
    out: Path,
    settings: dict | None = None,
    provenance: dict | None = None,
    pairs: Sequence[tuple[str, str, str]] = PAIRS,
    curve: bool = True,
) -> dict[str, Path]:
    """Write the JSON (provenance, settings, summary, rows), the Markdown table, the plane plot (the
    panels of ``pairs``) and, with ``curve``, quality against steps into ``out``. ``provenance``
    defaults to :func:`oneword.provenance.provenance` without inputs."""
    from oneword.provenance import provenance as made_by

    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    doc = {
        "provenance": provenance if provenance is not None else made_by(),
        "settings": settings or {},
        "summary": summary,
        "rows": [{k: _clean(v) for k, v in r.items()} for r in rows],
    }
    files = {
        "json": atomic_write_text(out / "results.json", json.dumps(doc, indent=1) + "\n"),
        "markdown": atomic_write_text(out / "results.md", markdown_table(summary)),
    }
    plots = [("plane", lambda: plot_plane(summary, out / "recon_edit_plane.png", pairs))]
    if curve:
        plots.append(("curve", lambda: plot_quality_vs_steps(summary, out / "quality_vs_steps.png")))
    for key, plot in plots:
        path = plot()
        if path is not None:
            files[key] = path
    return files
