"""User-facing errors.

Every problem a user can fix (bad input, missing weights, a token name that clashes) raises a
subclass of :class:`OneWordError` whose message is one line saying what is wrong and what to do.
The CLI prints that line to stderr and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OneWordError(Exception):
    """Base class: an error the user can act on. ``str(err)`` is a complete one-line message."""


class InputError(OneWordError):
    """A user-supplied file or folder is missing, empty, unreadable or unsuitable."""


class ImageError(InputError):
    """An image file cannot be used (corrupt, truncated, not an image, too large, ...)."""

    kind: str = "bad"
    """``too_large`` (pixels or memory), ``not_image``, or ``bad`` (corrupt, truncated, odd)."""


class EmbeddingFileError(InputError):
    """An embedding file cannot be read, or does not fit the model it is used with."""


class TokenError(OneWordError):
    """A placeholder token name is invalid for the model's tokenizer."""


class ModelLoadError(OneWordError):
    """A model cannot be found or loaded (not cached, no network, unknown format)."""


class TrainingDivergedError(OneWordError):
    """The loss or the learned vectors became NaN/inf; the last good state was kept."""
