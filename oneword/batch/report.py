"""What ``ti batch`` shows of a run: each word's ``preview.png``, ``OUT/report.md`` with a contact
sheet, and ``ti batch status OUT``. Everything here reads the ledger and the run folders; nothing
here decides what to run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from oneword.batch.ledger import Ledger
from oneword.errors import InputError
from oneword.fileio import atomic_write_text
from oneword.inversion.runfolder import RunFolder

logger = logging.getLogger("oneword")

PREVIEW = "preview.png"
REPORT = "report.md"
SHEET = "contact_sheet.png"


def write_previews(model, ledger: Ledger, steps: int, out: Path, progress: bool = False, stop=None) -> None:
    """``preview.png`` of every done concept that has none yet (after the optimization: the
    word is added to the model's tokenizer only here, when no group is running)."""
    words = [out / r.output for r in ledger.rows("done") if r.output]
    words = [w for w in words if not (w.parent / PREVIEW).is_file()]
    render_previews(model, words, steps, progress, stop)


def render_previews(model, words: Sequence[Path], steps: int, progress: bool = False, stop=None) -> None:
    """``preview.png`` beside each of the word files ``words`` (no group may be running)."""
    from tqdm.auto import tqdm

    from oneword.encoder.pipeline import render_preview
    from oneword.inversion.embedding_io import load_embedding

    for word in tqdm(words, desc="previews", unit="word", disable=not progress, dynamic_ncols=True):
        if stop is not None and stop.requested:
            break
        emb = load_embedding(word)
        model.clear_placeholders()
        model.add_placeholder(emb.token, emb.vectors)
        render_preview(model, emb.token, Path(word).parent, steps)
    model.clear_placeholders()


def write_report(out: str | Path, ledger: Ledger, sheet_limit: int = 64) -> Path:
    """``OUT/report.md``: counts, a contact sheet of the previews (``contact_sheet.png``), and a
    row per concept (state, initializer, steps, loss, time, its files or its error)."""
    from PIL import Image

    from oneword.imagegrid import image_grid, save_png

    out = Path(out)
    rows, counts, settings = ledger.rows(), ledger.counts(), ledger.settings()
    previews = [(r.id, (out / r.output).parent / PREVIEW) for r in rows if r.state == "done" and r.output]
    previews = [(cid, p) for cid, p in previews if p.is_file()][:sheet_limit]
    lines = [
        f"# Batch report: {out.name}",
        "",
        f"{settings.get('method')} with {settings.get('steps')} steps on {settings.get('model')}; "
        + ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "running", "pending")),
        "",
    ]
    if previews:
        thumbs = []
        for _, path in previews:
            with Image.open(path) as im:
                thumbs.append(im.convert("RGB").resize((256, round(256 * im.height / im.width))))
        size = thumbs[0].size
        thumbs = [t if t.size == size else t.resize(size) for t in thumbs]
        save_png(
            image_grid(thumbs, cols=min(4, len(thumbs)), labels=[cid for cid, _ in previews]), out / SHEET
        )
        more = f" (the first {sheet_limit})" if len(previews) == sheet_limit else ""
        lines += [f"![previews{more}]({SHEET})", ""]
    lines += [
        "| concept | state | initializer | steps | loss | seconds | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        init = f"{r.init} ({r.init_how})" if r.init else ""
        word = f" [word]({r.output})" if r.output else ""
        note = (r.error or r.warning or "").replace("|", "/")
        loss = "" if r.loss is None else f"{r.loss:.4f}"
        secs = "" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append(f"| {r.id}{word} | {r.state} | {init} | {r.steps or ''} | {loss} | {secs} | {note} |")
    return atomic_write_text(out / REPORT, "\n".join(lines) + "\n")


def status(out: str | Path, failures: int = 10) -> str:
    """``ti batch status OUT``: counts, throughput, ETA and the latest failures."""
    with Ledger.read(out) as ledger:
        counts, rows = ledger.counts(), ledger.rows()
        settings = ledger.settings()
    total = sum(counts.values())
    lines = [
        f"{out}: {total} concepts ({settings.get('method')}, {settings.get('steps')} steps, model "
        f"{settings.get('model')})",
        "  " + ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "running", "pending")),
    ]
    try:
        RunFolder(out).check_free()
        if counts["running"]:
            lines.append(
                f"  {counts['running']} were being worked on when their run stopped: rerun the same "
                "command to continue them"
            )
    except InputError as err:  # a process holds OUT: it is at work now
        lines.append(f"  at work now: {err}".split("; wait")[0])
    ended = sorted(
        (r for r in rows if r.state in ("done", "failed") and r.finished), key=lambda r: r.finished
    )
    recent = ended[-50:]  # the recent pace, not the time between runs
    if len(recent) >= 2 and recent[-1].finished > recent[0].finished:
        per_hour = (len(recent) - 1) / (recent[-1].finished - recent[0].finished) * 3600
        left = counts["pending"] + counts["running"]
        eta = f"; about {_duration(left / per_hour * 3600)} left at that pace" if left else ""
        lines.append(f"  {per_hour:.0f} concepts per hour over the last {len(recent)} finished{eta}")
    done = [r.seconds for r in rows if r.state == "done" and r.seconds]
    if done:
        lines.append(
            f"  {sum(done) / len(done):.1f} s per concept in its slot (median loss "
            f"{_median([r.loss for r in rows if r.loss is not None])})"
        )
    failed = [r for r in ended if r.state == "failed"]
    for r in failed[-failures:]:
        lines.append(f"  failed {r.id}: {r.error}")
    if failed:
        lines.append("  rerun the same command with --retry-failed to try the failed ones again")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _median(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[len(values) // 2]:.4f}"
