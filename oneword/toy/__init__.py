"""The toy world: procedurally drawn objects with discrete attributes (shape, fill colour, pattern,
outline colour) on coloured backgrounds, and captions that name only some of those attributes.

It makes textual inversion measurable on a CPU: every concept is known exactly, so whether a learned
word captured (or leaked) an attribute can be checked. See :mod:`oneword.toy.render` and
:mod:`oneword.toy.captions`.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def weights_dir() -> Path:
    """The shipped toy diffusion pipeline (a diffusers folder inside the package)."""
    from oneword.errors import ModelLoadError

    folder = WEIGHTS / "ldm"
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"the toy model is not in this installation ({folder} is missing); build it with "
            "`ti toy train` or use --model tiny-sd1 for a miniature random model"
        )
    return folder


def preset_folder(name: str) -> Path:
    """The ``toy`` preset of :func:`oneword.models.load_model` (an entry point in pyproject.toml)."""
    return weights_dir()
