"""Distillation targets for the encoder: a short textual inversion of every training concept.

``ti data targets IN --out OUT`` reads each shard of ``IN``, inverts its concepts in groups with
:func:`~oneword.inversion.multi.invert_many` (one UNet pass per step for the whole group), and
writes the same samples with ``target.safetensors`` added to ``OUT/<same shard name>``. A shard
appears atomically when all its concepts are done, and shards already in ``OUT`` are skipped. Each
group of the shard in progress saves its state in ``OUT/.partial/`` every 50 steps (and when it
finishes), so an interrupted run resumes where it stopped, losing at most 50 steps; a shard's
partial files are removed once the shard is written (the folder stays: another process may be
writing its own shard's state into it).

With ``--from-encoder`` each inversion starts from a trained encoder's prediction for the concept's
images instead of from the initializer word: a round of self-distillation (expert iteration), whose
targets are the encoder's own words refined, so they lie on one smooth map from images to words
instead of wherever an inversion from the initializer happened to land.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from oneword.data.shards import expand_shards, read_shard, write_shard
from oneword.encoder.model import ConceptEncoder, check_fits, predict_embeddings
from oneword.errors import InputError
from oneword.fileio import atomic_write_text
from oneword.inversion.config import InversionConfig
from oneword.inversion.multi import invert_many
from oneword.models import FrozenLDM

logger = logging.getLogger(__name__)

PARTIAL = ".partial"  # the state of the groups of the shard in progress
SAVE_EVERY = 50


MANIFEST = "targets.json"


def _check_manifest(out: Path, settings: dict) -> None:
    """``OUT/targets.json`` records what made the targets; a rerun with other settings (another
    model, more steps) would skip every finished shard and report success, so it is refused."""
    path = out / MANIFEST
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
        if diff:
            raise InputError(
                f"{out} holds targets made with other settings ({'; '.join(diff)}): give another "
                "--out, or the same settings to finish it"
            )
    elif out.is_dir() and any(out.glob("*.tar")):
        logger.warning(
            "%s holds shards but no %s: cannot check they were made with these settings", out, MANIFEST
        )
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def add_targets(
    shards: str,
    out: str | Path,
    cfg: InversionConfig,
    model: FrozenLDM,
    group: int = 32,
    progress: bool = True,
    continue_targets: bool = False,
    encoder: ConceptEncoder | None = None,
) -> list[Path]:
    """Write ``out/<shard name>`` for every shard of ``shards``, each sample with a target embedding
    from ``cfg.steps`` steps of textual inversion on ``model`` (a frozen model without placeholders
    of its own). With ``continue_targets`` the inversion starts from each sample's existing target
    (``cfg.steps`` more steps) instead of from its initializer word; with ``encoder`` it starts
    from the encoder's prediction for the sample's images (all its stored views). Returns the shard
    paths, skipped ones included."""
    if group < 1:
        raise InputError("--group must be at least 1")
    if continue_targets and encoder is not None:
        raise InputError("--continue and --from-encoder both choose where the inversion starts: give one")
    if encoder is not None:
        check_fits(encoder, model)
        if encoder.cfg.num_vectors != cfg.num_vectors:
            raise InputError(
                f"the encoder predicts {encoder.cfg.num_vectors} vector(s) per word; "
                f"the targets have {cfg.num_vectors}"
            )
        encoder.to(model.device)
        encoder.space.to(model.device)
    out = Path(out)
    urls = expand_shards(shards)
    if any(Path(u).resolve().parent == out.resolve() for u in urls):
        raise InputError(f"{out} holds the input shards: give another --out")
    names = [Path(u).name for u in urls]
    if len(set(names)) < len(names):  # OUT/<name> would hold only the first; the others would be "skipped"
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(
            f"input shards from different folders share file names ({', '.join(twice[:3])}): "
            "their targets would overwrite each other; write the data sets with different "
            "`ti data shards --prefix` or run ti data targets once per folder"
        )
    _check_manifest(
        out,
        {
            "model": model.source,
            "widths": list(model.widths),
            "steps": cfg.steps,
            "base_lr": cfg.base_lr,
            "batch_size": cfg.batch_size,
            "template": cfg.template,
            "seed": cfg.seed,
            "num_vectors": cfg.num_vectors,
            "start": "continue" if continue_targets else "encoder" if encoder is not None else "init",
        },
    )
    paths = []
    for url in urls:
        path = out / Path(url).name
        paths.append(path)
        if path.is_file():
            logger.info("%s exists: skipped", path)
            _remove_partial(out, Path(url).stem)  # e.g. left by a run stopped right after writing the shard
            continue
        samples = read_shard(url)
        if continue_targets and any(s.target is None for s in samples):
            raise InputError(f"{url} has samples without a target: nothing to continue (drop --continue)")
        t0 = time.perf_counter()
        bar = tqdm(total=len(samples), desc=Path(url).name, unit="concept", disable=not progress)
        partial = [
            out / PARTIAL / f"{Path(url).stem}-{i:06d}.safetensors" for i in range(0, len(samples), group)
        ]
        for i, state in zip(range(0, len(samples), group), partial):
            chunk = samples[i : i + group]
            if encoder is not None:
                starts = predict_embeddings(
                    encoder, model, [s.images for s in chunk], [s.init for s in chunk]
                )
            else:
                starts = [s.target for s in chunk] if continue_targets else None
            vectors = invert_many(
                model,
                [s.images for s in chunk],
                [s.init for s in chunk],
                cfg,
                starts=starts,
                progress=progress,  # a step bar: one group can take most of an hour
                checkpoint=state,
                save_every=SAVE_EVERY,
            )
            for s, v in zip(chunk, vectors):
                s.target = v
            bar.update(len(chunk))
        bar.close()
        write_shard(samples, path)
        _remove_partial(out, Path(url).stem)
        logger.info(
            "%s: %d concepts x %d steps in %.0f s", path, len(samples), cfg.steps, time.perf_counter() - t0
        )
    return paths


def _remove_partial(out: Path, stem: str) -> None:
    """A written shard's group states (whatever ``--group`` made them) and any temporary file an
    interrupted write left of them."""
    folder = out / PARTIAL
    if folder.is_dir():
        for f in [*folder.glob(f"{stem}-*.safetensors"), *folder.glob(f".{stem}-*.safetensors.tmp-*")]:
            f.unlink(missing_ok=True)
