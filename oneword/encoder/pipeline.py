"""The encode pipeline: predict concepts' words in one pass, refine them, keep the better word.

:func:`encode_concepts` is the library behind ``ti encode`` / ``ti-encode``. For each concept it
writes a run folder (through :class:`~oneword.inversion.runfolder.RunFolder`, laid out as
``ti invert``'s, plus ``preview.png``, ``report.md`` and ``encode.json``) and returns a typed
:class:`ConceptResult`: the prediction, the words inside and at the end of the refinement keyed by
step count, which one was kept, and the timings. After a refinement the prediction (or a word from
inside the refinement) is kept instead of the refined word when the encoder's round trip
(:mod:`oneword.encoder.select`) finds it closer to the references. An interrupted refinement
(Ctrl-C) keeps its word, skips the round trip and the remaining concepts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from oneword.encoder.model import ConceptEncoder, predict_embeddings
from oneword.errors import InputError
from oneword.fileio import atomic_write_text, sha256_file
from oneword.inversion.config import InversionConfig
from oneword.inversion.embedding_io import Embedding
from oneword.inversion.runfolder import RunFolder, safe_file_stem, word_metadata
from oneword.models import FrozenLDM

logger = logging.getLogger(__name__)

# Refinement starts near the answer, so it runs at a fifth of scratch inversion's rate: on held-out
# toy concepts 0.885 of the attributes after 200 steps at base_lr 1e-3 against 0.87 at 5e-3
# (docs/experiments). An L2 pull toward the prediction and a larger batch at the same effective rate
# did not help, so both stay as scratch's.
REFINE_DEFAULTS: dict[str, float] = {"base_lr": 1e-3}

# The round trip judges the refinement by default: on 36 held-out toy concepts it kept 0.938 of the
# oracle's attributes against 0.928 always refining (+0.010 [-0.004, +0.024]; docs/experiments).
DEFAULT_SELECT = 8

SHIPPED = Path(__file__).resolve().parents[1] / "toy" / "weights" / "encoder.safetensors"


def encoder_path(name: str | None) -> Path:
    """``--encoder``/``--from-encoder`` values: None or ``toy`` is the shipped toy encoder."""
    return SHIPPED if name in (None, "toy") else Path(name)


def encoder_identity(path: str | Path) -> dict[str, str]:
    """How a word's header names its encoder: the file's name and SHA-256, never its absolute
    path (people share these files, and a path says where someone keeps theirs)."""
    path = Path(path)
    return {"oneword.encoder": path.name, "oneword.encoder_sha256": sha256_file(path)}


def select_samples(refine: int, select: int | None) -> int:
    """The round trip's sample count: ``select`` as given, else :data:`DEFAULT_SELECT` when there
    is a refinement to judge (none without one)."""
    if not refine:
        return 0
    return DEFAULT_SELECT if select is None else select


@dataclass
class EncodeSettings:
    """What happens after the prediction."""

    refine: int = 0
    """Textual-inversion steps from the prediction (0: the prediction is the word)."""
    select: int = 0
    """Round-trip samples per candidate word after a refinement (0: always keep the refined word)."""
    select_among: list[int] = field(default_factory=list)
    """Steps inside the refinement whose words are also candidates of the round trip."""
    preview_steps: int = 25
    """Sampling steps of ``preview.png`` (0: none)."""
    sample_batch: int = 4
    """Images per pipeline call in the round trip and the preview."""
    progress: bool = True
    """Progress bars."""

    def __post_init__(self) -> None:
        if self.refine < 0 or self.select < 0 or self.preview_steps < 0:
            raise ValueError("refine, select and preview_steps must be 0 or more")
        if self.sample_batch < 1:
            raise ValueError("sample_batch must be at least 1")
        if self.select and not self.refine:
            raise ValueError("the round trip (select) chooses among a refinement's words: give refine")
        if any(not 0 <= b <= self.refine for b in self.select_among):
            raise ValueError(f"select_among takes step counts from 0 to refine ({self.refine})")


@dataclass
class ConceptResult:
    """One concept's outcome."""

    name: str
    token: str
    folder: Path
    words: dict[int, list[torch.Tensor]]
    """Words by step count: 0 is the prediction, ``refine`` the refined word, others from inside it."""
    kept_steps: int
    """The step count of the word the folder's files hold."""
    encode_s: float
    """This concept's share of the batched prediction, in seconds."""
    refine_s: float = 0.0
    final_loss: float | None = None
    interrupted: bool = False
    choice: object | None = None
    """The round trip's :class:`~oneword.encoder.select.Choice`, when it ran."""
    init_choice: object | None = None
    """How the initializer word was chosen (:class:`~oneword.encoder.autoinit.InitChoice`)."""
    files: list[Path] = field(default_factory=list)

    @property
    def prediction(self) -> list[torch.Tensor]:
        return self.words[0]

    @property
    def kept(self) -> list[torch.Tensor]:
        return self.words[self.kept_steps]


def concept_folder(out_root: str | Path, token: str) -> RunFolder:
    """The run folder of ``token``'s concept under ``out_root``."""
    return RunFolder(Path(out_root) / safe_file_stem(token))


def encode_concepts(
    encoder: ConceptEncoder,
    model: FrozenLDM,
    concepts: Sequence,
    cfgs: Sequence[InversionConfig],
    out_root: str | Path,
    settings: EncodeSettings,
    encoder_meta: dict[str, str],
    model_name: str | None = None,
    init_choices: Sequence | None = None,
) -> list[ConceptResult]:
    """Predict every concept's word in one batched pass, then per concept refine, choose and write
    its run folder (each locked while written). ``concepts`` are
    :class:`~oneword.data.concepts.ConceptRef`; ``cfgs`` one refinement setting per concept (its
    token and initializer word); ``init_choices`` how each initializer was chosen
    (:class:`~oneword.encoder.autoinit.InitChoice`, recorded in the word's header and report).
    Stops after an interrupted refinement: the last result says so."""
    encoder.to(model.device)
    encoder.space.to(model.device)
    t0 = time.perf_counter()
    predicted = predict_embeddings(
        encoder, model, [[im.image for im in c.images] for c in concepts], [c.init for c in concepts]
    )
    encode_s = (time.perf_counter() - t0) / max(1, len(concepts))
    logger.info("encoded %d concept(s) in %.2fs", len(concepts), encode_s * len(concepts))
    results = []
    choices = list(init_choices) if init_choices is not None else [None] * len(concepts)
    for concept, cfg, vectors, choice in zip(concepts, cfgs, predicted, choices):
        meta = {**encoder_meta, **(choice.metadata() if choice is not None else {})}
        with concept_folder(out_root, cfg.token) as folder:
            result = _encode_one(
                encoder,
                model,
                concept,
                cfg,
                vectors,
                folder,
                settings,
                meta,
                encode_s,
                model_name or model.source,
            )
        result.init_choice = choice
        results.append(result)
        if result.interrupted:
            break
    return results


def _encode_one(
    encoder,
    model: FrozenLDM,
    concept,
    cfg: InversionConfig,
    vectors: list[torch.Tensor],
    folder: RunFolder,
    settings: EncodeSettings,
    encoder_meta: dict[str, str],
    encode_s: float,
    model_name: str,
) -> ConceptResult:
    from oneword.encoder.select import REFINED, candidate_name

    result = ConceptResult(concept.name, cfg.token, folder.path, {0: vectors}, 0, encode_s)
    hashes = [im.sha256 for im in concept.images]
    if settings.refine == 0:
        if folder.holds_files():
            raise InputError(f"{folder.path} already holds files; choose another --out")
        model.clear_placeholders()
        model.add_placeholder(cfg.token, vectors)  # the preview renders it
        meta = word_metadata(model, cfg.token, cfg.init, 0, hashes, {**encoder_meta, "oneword.refine": "0"})
        result.files = folder.write_word(Embedding(cfg.token, vectors, meta))
    else:
        from oneword.inversion.train import run_inversion

        among = sorted(set(settings.select_among) - {0, settings.refine})
        model.clear_placeholders()  # the last concept's token: each concept starts from the model as loaded
        t1 = time.perf_counter()
        res = run_inversion(
            model,
            concept.images,
            cfg,
            folder.path,
            init_vectors=vectors,
            progress=settings.progress,
            snapshot_steps=among,
            extra_metadata={**encoder_meta, "oneword.refine": str(settings.refine)},
        )
        result.refine_s, result.final_loss, result.files = time.perf_counter() - t1, res.final_loss, res.files
        result.words.update(res.snapshots)
        result.words[res.step] = res.embedding.vectors
        result.kept_steps = res.step
        if res.interrupted:
            result.interrupted = True
            result.files.append(_report(folder.path, concept, cfg, encoder_meta, model_name, result))
            return result
        if settings.select:
            choice = _select(encoder, model, cfg, concept, vectors, settings, res.snapshots)
            result.choice = choice
            if choice.kept != REFINED:  # the refined word stays in checkpoints/
                steps = {candidate_name(b, settings.refine): b for b in (0, *among)}[choice.kept]
                what = "the prediction" if steps == 0 else f"the word after {steps} steps"
                meta = word_metadata(
                    model,
                    cfg.token,
                    cfg.init,
                    steps,
                    hashes,
                    {**encoder_meta, "oneword.refine": f"{settings.refine} ({what} kept by --select)"},
                )
                saved = folder.write_word(Embedding(cfg.token, result.words[steps], meta))
                result.files = list(dict.fromkeys([*result.files, *saved]))
                result.kept_steps = steps
    if settings.preview_steps:
        result.files.append(
            render_preview(model, cfg.token, folder.path, settings.preview_steps, settings.sample_batch)
        )
    result.files.append(_report(folder.path, concept, cfg, encoder_meta, model_name, result))
    return result


def _select(encoder, model, cfg, concept, prediction, settings: EncodeSettings, snapshots):
    """Keep the prediction, the refined word on ``cfg.token`` or a word from ``snapshots`` (earlier
    steps), whichever the encoder's round trip finds closest to the references."""
    from oneword.encoder.select import REFINED, keep_prediction_or_refined, select_settings

    t0 = time.perf_counter()
    choice = keep_prediction_or_refined(
        encoder,
        model,
        cfg.token,
        concept.init,
        prediction,
        select_settings(settings.select, batch=settings.sample_batch),
        snapshots,
        settings.refine,
    )
    kept = "refined word" if choice.kept == REFINED else choice.kept
    logger.info(
        "%s: kept the %s (round-trip distances %s; %.1f s)",
        concept.name,
        kept,
        choice.describe_distances(),
        time.perf_counter() - t0,
    )
    return choice


def render_preview(model, token: str, out: Path, steps: int, batch: int = 4) -> Path:
    """``out/preview.png``: "a photo of <token>" and a second prompt, four seeds each."""
    from oneword.sampling import SampleSettings, render_grid

    second = (
        "a photo of {} on a teal background" if model.family == "toy" else "a painting of {} on the beach"
    )
    prompts = [p.format(token) for p in ("a photo of {}", second)]
    return render_grid(
        model,
        prompts,
        SampleSettings(steps=steps, seeds=[0, 1, 2, 3], batch=batch),
        out / "preview.png",
        {"token": token},
    )


def _describe_init(word: str, meta: dict[str, str]) -> str:
    if meta.get("oneword.init_how") != "auto":
        return word
    return (
        f"{word} (chosen by zero-shot: CLIP shortlist, diffusion rerank; it beat "
        f"{meta.get('oneword.init_runner_up')} in {float(meta['oneword.init_win_rate']):.0%} of draws)"
    )


def _report(
    out: Path, concept, cfg: InversionConfig, encoder_meta: dict[str, str], model: str, result: ConceptResult
) -> Path:
    refine = max(result.words)
    encoder = f"{encoder_meta.get('oneword.encoder')} (sha256 {encoder_meta.get('oneword.encoder_sha256', '?')[:12]})"
    rows = [
        ("concept", f"{concept.name} ({len(concept.images)} images)"),
        ("token", cfg.token),
        ("initializer", _describe_init(cfg.init, encoder_meta)),
        ("model", model),
        ("encoder", encoder),
        ("encoder time", f"{result.encode_s:.2f} s"),
        (
            "refinement",
            f"{refine} steps{' (interrupted)' if result.interrupted else ''}, {result.refine_s:.1f} s",
        ),
        ("final loss", "–" if result.final_loss is None else f"{result.final_loss:.4f}"),
    ]
    if result.choice is not None:
        rows += [
            ("kept", result.choice.kept),
            ("kept word's steps", str(result.kept_steps)),
            ("round-trip distances", result.choice.describe_distances()),
        ]
    text = "# ti-encode report\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    atomic_write_text(out / "encode.json", json.dumps(dict(rows), indent=1) + "\n")
    return atomic_write_text(out / "report.md", text + "\n![preview](preview.png)\n")
