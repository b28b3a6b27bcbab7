"""Checking a word request's photos before anything is stored: count, bytes, pixels, decoding."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image

from oneword.data.images import decode_image
from oneword.errors import ImageError
from oneword.serve.config import ServeSettings


class Rejected(Exception):
    """A request the service refuses: an HTTP status and one sentence saying why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Upload:
    name: str
    data: bytes
    sha256: str
    image: Image.Image


_STATUS = {"too_large": 413, "not_image": 415, "bad": 422}


def check_uploads(files: list[tuple[str, bytes]], settings: ServeSettings) -> list[Upload]:
    """Every file decoded and within the limits, or :class:`Rejected` naming the first bad one:
    413 (too many bytes or pixels), 415 (not an image), 422 (too few or many files, corrupt or
    truncated data)."""
    if not settings.min_files <= len(files) <= settings.max_files:
        raise Rejected(
            422,
            f"send {settings.min_files} to {settings.max_files} photos of the concept as 'images' "
            f"(3-5 work best); got {len(files)}",
        )
    out = []
    for name, data in files:
        if len(data) > settings.max_file_bytes:
            raise Rejected(
                413, f"{name} is {len(data)} bytes, over the limit of {settings.max_file_bytes}; downscale it"
            )
        try:
            image = decode_image(data, name, max_pixels=settings.max_pixels)
        except ImageError as err:
            if err.kind == "too_large":  # its advice names the command line's option
                raise Rejected(
                    413, f"cannot use image {name}: more than {settings.max_pixels} pixels; downscale it"
                ) from None
            raise Rejected(_STATUS.get(err.kind, 422), str(err)) from None
        out.append(Upload(name, data, hashlib.sha256(data).hexdigest(), image))
    return out
