"""Loading users' reference images robustly, and turning them into square training crops.

Every image is decoded to an 8-bit RGB :class:`PIL.Image.Image` whatever it was on disk: EXIF
orientation applied, the first frame of an animation, 16-bit and float grayscale rescaled (not
clipped), CMYK through its ICC profile when it has one, and transparency composited over white.
A file that cannot be used raises :class:`~oneword.errors.ImageError` with a one-line message
naming it; no Pillow exception escapes. Sizes are checked from the header before any pixel data
is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from oneword.errors import ImageError, InputError

logger = logging.getLogger(__name__)


def _decodable(feature: str) -> bool:
    from PIL import features

    try:
        return bool(features.check(feature))
    except Exception:  # noqa: BLE001 - an older Pillow that does not know the feature
        return False


IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    | ({".avif"} if _decodable("avif") else set())
)
"""File suffixes (lower case) that :func:`list_images` picks up (AVIF where this Pillow decodes it)."""
_CONVERT_FIRST = {
    ".heic": "HEIC",
    ".heif": "HEIF",
    ".avif": "AVIF",
    ".jxl": "JPEG XL",
    ".raw": "raw",
    ".cr2": "raw",
    ".cr3": "raw",
    ".nef": "raw",
    ".arw": "raw",
    ".dng": "raw",
    ".orf": "raw",
    ".psd": "Photoshop",
    ".svg": "SVG",
}
"""Photo formats a user may drop into a concept folder that are not read here (named in a warning)."""

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Images with more pixels than this are refused (decompression-bomb guard); see ``--max-pixels``."""

_MAX_LISTED = 20  # bad files named one by one in load_folder's message; the rest are counted
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


@dataclass(frozen=True)
class LoadedImage:
    """A reference image: where it came from, its RGB pixels, and the SHA-256 of the file's bytes."""

    path: Path
    image: Image.Image
    sha256: str


class _Unusable(Exception):
    """Internal: why a file cannot be used (``reason``) and what to do about it (``advice``)."""

    def __init__(self, reason: str, advice: str, kind: str = "bad") -> None:
        super().__init__(reason)
        self.reason = reason
        self.advice = advice
        self.kind = kind


def _one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so that a message stays on one line."""
    return " ".join(str(text).split())


def _too_large(pixels: int | None, max_pixels: int, size: str = "") -> _Unusable:
    """The problem of an image over the pixel cap (ours, or Pillow's own bomb limit)."""
    if pixels is not None and pixels <= max_pixels:  # only Pillow's hard limit was hit
        return _Unusable(
            f"{size}{pixels} pixels, over Pillow's decompression-bomb limit", "downscale it", "too_large"
        )
    shown = f"{size}{pixels} pixels" if pixels is not None else "too many pixels"
    return _Unusable(
        f"{shown}, over the --max-pixels cap of {max_pixels}",
        "downscale it, or raise --max-pixels if you trust the file",
        "too_large",
    )


def _classify(err: BaseException, max_pixels: int) -> _Unusable:
    """Turn an exception raised while decoding into a short reason and advice."""
    detail = _one_line(str(err))
    if isinstance(err, Image.DecompressionBombError):
        found = re.search(r"\((\d+) pixels\)", detail)
        return _too_large(int(found.group(1)) if found else None, max_pixels)
    if isinstance(err, UnidentifiedImageError):
        return _Unusable("not an image", "remove it, or convert it to PNG or JPEG", "not_image")
    if isinstance(err, MemoryError):
        return _Unusable("not enough memory to decode it", "downscale it", "too_large")
    if isinstance(err, (OSError, EOFError)) and "truncat" in detail.lower():
        return _Unusable("truncated file", "re-download or re-export it, or remove it")
    if isinstance(err, EOFError):
        return _Unusable("truncated file", "re-download or re-export it, or remove it")
    detail = detail[:120] or type(err).__name__
    return _Unusable(f"corrupt image data: {detail}", "re-export it, or remove it")


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale -> 8-bit ``L``, rescaled rather than clipped.

    16-bit data maps 0..65535 to 0..255. ``I`` data in 0..65535 is treated as 16-bit, other
    ranges are stretched min..max. ``F`` data in [0, 1] is scaled by 255, data in [0, 255] kept,
    data in [0, 65535] treated as 16-bit, and anything else stretched min..max.
    """
    arr = np.asarray(image).astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(arr.min()) if arr.size else 0.0
    hi = float(arr.max()) if arr.size else 0.0
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and lo >= 0 and hi <= 65535):
        arr = arr / 257.0
    elif image.mode == "F" and lo >= 0 and hi <= 1.0:
        arr = arr * 255.0
    elif image.mode == "F" and lo >= 0 and hi <= 255.0:
        pass
    elif image.mode == "F" and lo >= 0 and hi <= 65535.0:
        arr = arr / 257.0
    else:
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK -> RGB through the embedded ICC profile when Pillow has ImageCms, else a plain convert."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                return out
        except Exception as err:  # noqa: BLE001 - a bad or unsupported profile: fall back
            logger.debug("ICC conversion of a CMYK image failed (%s); converting plainly", err)
    return image.convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha and palette transparency are composited over white."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _scale_to_uint8(image).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(image, transform)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """Decode file bytes to a loaded RGB image, or raise :class:`_Unusable` saying why not."""
    if not data:
        raise _Unusable("empty file", "copy it again, or remove it")
    with warnings.catch_warnings():
        # Our own cap (checked from the header below) decides; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = opened = Image.open(io.BytesIO(data))
            width, height = image.size
        except Exception as err:  # no Pillow exception may escape
            raise _classify(err, max_pixels) from err
        if width * height > max_pixels:
            raise _too_large(width * height, max_pixels, f"{width}x{height} = ")
        if width < 1 or height < 1:
            raise _Unusable(f"empty image ({width}x{height} pixels)", "re-export it, or remove it")
        try:
            frames = int(getattr(image, "n_frames", 1) or 1)
            if frames > 1:
                # Camera MPO files carry a preview/depth image as frame 2: nothing to warn about.
                level = logging.DEBUG if image.format == "MPO" else logging.WARNING
                logger.log(
                    level,
                    "%s has %d frames (animated or multi-page); using the first one",
                    name,
                    frames,
                )
                image.seek(0)
            image.load()
        except Exception as err:
            raise _classify(err, max_pixels) from err
        try:
            image = ImageOps.exif_transpose(image) or image
        except Exception as err:  # noqa: BLE001 - broken EXIF: keep the stored orientation
            logger.warning(
                "%s: cannot apply its EXIF orientation (%s); using it as stored",
                name,
                _one_line(str(err)),
            )
        try:
            rgb = _to_rgb(image)
            rgb.load()
        except Exception as err:
            if isinstance(err, (ValueError, ImportError)):
                raise _Unusable(
                    f"unsupported colour mode {image.mode}", "convert it to an RGB PNG or JPEG"
                ) from err
            raise _classify(err, max_pixels) from err
    if rgb.mode != "RGB":  # defensive: every branch of _to_rgb ends in RGB
        raise _Unusable(f"unsupported colour mode {image.mode}", "convert it to an RGB PNG or JPEG")
    return rgb.copy() if rgb is opened else rgb  # a plain image, not tied to the file's buffer


def _read(path: Path) -> bytes:
    """The file's bytes; a missing, folder or unreadable path raises :class:`InputError`."""
    if not path.exists():
        raise InputError(_one_line(f"image file {path} does not exist; check the path"))
    if path.is_dir():
        raise InputError(_one_line(f"{path} is a folder, not an image file; pass an image file"))
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(
            _one_line(f"cannot read image file {path} ({err.strerror or err}); check its permissions")
        ) from err


def _check_max_pixels(max_pixels: int) -> None:
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels}")


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``path`` as a fully decoded 8-bit RGB image.

    Raises :class:`InputError` when the file is missing or unreadable and :class:`ImageError`
    when it is not a usable image: not an image, corrupt, truncated, or with more than
    ``max_pixels`` pixels (checked from the header, before decoding).
    """
    _check_max_pixels(max_pixels)
    path = Path(path)
    data = _read(path)
    try:
        return _decode(data, max_pixels, str(path))
    except _Unusable as bad:
        raise ImageError(_one_line(f"cannot use image {path}: {bad.reason}; {bad.advice}")) from bad


def decode_image(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`load_image` for bytes already in memory (e.g. from a shard); ``name`` labels errors."""
    _check_max_pixels(max_pixels)
    try:
        return _decode(data, max_pixels, name)
    except _Unusable as bad:
        error = ImageError(_one_line(f"cannot use image {name}: {bad.reason}; {bad.advice}"))
        error.kind = bad.kind
        raise error from bad


def _listed(names: list[str]) -> str:
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (by suffix, case-insensitive), sorted by name.

    Hidden files (``.DS_Store``, macOS ``._name.png`` forks) and subfolders are skipped. A missing
    path, a path that is not a folder, or a folder without images raises :class:`InputError`.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(_one_line(f"image folder {folder} does not exist; check the path"))
    if not folder.is_dir():
        raise InputError(_one_line(f"{folder} is not a folder; pass the folder that holds the images"))
    try:
        entries = list(folder.iterdir())
    except OSError as err:
        raise InputError(
            _one_line(f"cannot list image folder {folder} ({err.strerror or err}); check its permissions")
        ) from err
    images = sorted(
        (
            p
            for p in entries
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ),
        key=lambda p: p.name,
    )
    # A run with fewer images than the user meant says so: photos in formats Pillow cannot read
    # here, and subfolders. Other files (captions, concept.json) are sidecars, skipped quietly.
    visible = [p for p in entries if not p.name.startswith(".")]
    unreadable = sorted(
        p.name
        for p in visible
        if p.suffix.lower() in _CONVERT_FIRST and p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
    )
    subfolders = sorted(p.name + "/" for p in visible if p.is_dir())
    if images and (unreadable or subfolders):
        parts = []
        if unreadable:
            formats = " and ".join(sorted({_CONVERT_FIRST[Path(n).suffix.lower()] for n in unreadable}))
            parts.append(
                f"photos it cannot read ({_listed(unreadable)}; convert {formats} files to PNG or JPEG)"
            )
        if subfolders:
            parts.append(f"subfolders, which are not searched ({_listed(subfolders)})")
        logger.warning("%s: skipped %s", folder, " and ".join(parts))
    if not images:
        accepted = " ".join(sorted(IMAGE_SUFFIXES))
        subfolders = " (subfolders are not searched)" if any(p.is_dir() for p in entries) else ""
        raise InputError(
            _one_line(
                f"no images in {folder}{subfolders}; add image files with one of the suffixes {accepted}"
            )
        )
    return images


def _load_paths(paths: list[Path], max_pixels: int) -> tuple[list[LoadedImage], list[tuple[Path, _Unusable]]]:
    loaded: list[LoadedImage] = []
    bad: list[tuple[Path, _Unusable]] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as err:
            bad.append((path, _Unusable(f"unreadable: {err.strerror or err}", "check permissions")))
            continue
        try:
            image = _decode(data, max_pixels, str(path))
        except _Unusable as problem:
            bad.append((path, problem))
            continue
        loaded.append(LoadedImage(path=path, image=image, sha256=hashlib.sha256(data).hexdigest()))
    return loaded, bad


def load_blobs(
    blobs: list[tuple[str, bytes]], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[LoadedImage], list[str]]:
    """:func:`load_files` for images already in memory (``(name, bytes)``, e.g. a shard's members);
    each loaded image's ``path`` is its name."""
    _check_max_pixels(max_pixels)
    loaded, bad = [], []
    for name, data in blobs:
        try:
            image = _decode(data, max_pixels, name)
        except _Unusable as problem:
            bad.append(f"{name} ({problem.reason})")
            continue
        loaded.append(LoadedImage(path=Path(name), image=image, sha256=hashlib.sha256(data).hexdigest()))
    return loaded, bad


def load_files(
    paths: list[Path], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[LoadedImage], list[str]]:
    """Load the image files ``paths`` as far as they can be used: the loaded images and, for each
    file that cannot be (missing, unreadable, truncated, too large, not an image), one line naming
    it and why. For callers that go on without the bad files (``ti batch``)."""
    _check_max_pixels(max_pixels)
    loaded, bad = _load_paths(list(paths), max_pixels)
    return loaded, [f"{p.name} ({problem.reason})" for p, problem in bad]


def load_folder(folder: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[LoadedImage]:
    """Load every image of :func:`list_images` ``(folder)``, with the SHA-256 of each file.

    All files are tried; if any cannot be used, one :class:`ImageError` names every bad file and
    its problem, so that the user can fix them all at once.
    """
    _check_max_pixels(max_pixels)
    paths = list_images(folder)
    loaded, bad = _load_paths(paths, max_pixels)
    if bad:
        listed = ", ".join(f"{p.name} ({problem.reason})" for p, problem in bad[:_MAX_LISTED])
        if len(bad) > _MAX_LISTED:
            listed += f" and {len(bad) - _MAX_LISTED} more"
        hint = "remove or fix them"
        if any("--max-pixels" in problem.reason for _, problem in bad):
            hint += " (downscale oversized ones or raise --max-pixels)"
        raise ImageError(
            _one_line(f"{len(bad)} of {len(paths)} images in {Path(folder)} cannot be used: {listed}; {hint}")
        )
    seen: dict[str, Path] = {}
    for item in loaded:
        if item.sha256 in seen:
            logger.warning(
                "%s is an exact copy of %s; it will count twice",
                item.path.name,
                seen[item.sha256].name,
            )
        seen.setdefault(item.sha256, item.path)
    return loaded


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image as a float32 ``[3, H, W]`` tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    rgb = image if image.mode == "RGB" else _to_rgb(image)
    arr = np.array(rgb, dtype=np.uint8)  # a writable copy, HWC
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div_(127.5).sub_(1.0)


def resize_and_crop(
    image: Image.Image,
    size: int,
    *,
    center: bool = True,
    rng: random.Random | None = None,
    scale: tuple[float, float] = (1.0, 1.0),
) -> Image.Image:
    """A ``size`` x ``size`` RGB crop of ``image``, resampled once (LANCZOS down, BICUBIC up).

    The square taken from ``image`` has side ``s * shorter side`` with ``s`` drawn uniformly from
    ``scale`` (``(1.0, 1.0)``: the whole shorter side, i.e. resize the shorter side to ``size`` and
    crop), placed at the centre when ``center`` else at a uniformly random position. Random
    draws come from ``rng`` (an unseeded generator when ``None``), so the output is
    deterministic given ``rng``'s state.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    if image.mode != "RGB":
        image = _to_rgb(image)
    if rng is None and (not center or lo < hi):
        rng = random.Random()
    width, height = image.size
    frac = rng.uniform(lo, hi) if lo < hi and rng is not None else lo
    side = max(1.0, frac * min(width, height))
    if center or rng is None:
        x0, y0 = (width - side) / 2.0, (height - side) / 2.0
    else:
        x0, y0 = rng.uniform(0.0, width - side), rng.uniform(0.0, height - side)
    resample = Image.Resampling.LANCZOS if side >= size else Image.Resampling.BICUBIC
    return image.resize((size, size), resample=resample, box=(x0, y0, x0 + side, y0 + side))
