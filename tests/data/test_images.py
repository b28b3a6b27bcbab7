"""oneword.data.images: robust loading of users' images, folder listing, tensors and crops."""

from __future__ import annotations

import hashlib
import logging
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oneword.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    LoadedImage,
    image_to_tensor,
    list_images,
    load_folder,
    load_image,
    resize_and_crop,
)
from oneword.errors import ImageError, InputError


def _noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _check_message(err: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for name in names:
        assert name in msg, msg
    return msg


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width`` x ``height`` (8-bit RGB) with no real pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------- load_image: good inputs


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    src = _noise()
    out = load_image(_save(src, tmp_path / "a.png"))
    assert out.mode == "RGB" and out.size == src.size
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 257 * 128, 65535, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (4, 4, 3)
    assert out.max() == 255 and out.min() == 0
    assert out[0, 1, 0] == 128  # mid-grey stays mid-grey


def test_float_grayscale_in_unit_range(tmp_path: Path) -> None:
    arr = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    path = _save(Image.fromarray(arr, "F"), tmp_path / "float.tif")
    out = np.asarray(load_image(path))
    assert out.min() == 0 and out.max() == 255


def test_big_endian_16_bit_via_tensor() -> None:
    arr = np.full((2, 2), 65535, dtype=">u2")
    img = Image.fromarray(arr)
    assert img.mode == "I;16B"
    assert torch.allclose(image_to_tensor(img), torch.ones(3, 2, 2))


def test_cmyk_plain_and_with_broken_icc_profile(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    for name, kwargs in (("plain.jpg", {}), ("badicc.jpg", {"icc_profile": b"not a profile"})):
        out = load_image(_save(cmyk, tmp_path / name, quality=95, **kwargs))
        r, g, b = out.getpixel((8, 8))
        assert out.mode == "RGB" and r > 200 and g < 60 and b < 60, (name, (r, g, b))


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # 0: black (transparent), 1: red
    img.paste(1, (0, 0, 4, 8))
    out = load_image(_save(img, tmp_path / "pal.png", transparency=0))
    assert out.getpixel((6, 4)) == (255, 255, 255)
    assert out.getpixel((1, 4)) == (255, 0, 0)


def test_rgba_and_la_composited_over_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128), (0, 0, 255, 255)])
    out = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert all(126 <= c <= 129 for c in out.getpixel((2, 0)))
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    out = load_image(_save(la, tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)


def test_one_bit_and_grayscale(tmp_path: Path) -> None:
    one = Image.new("1", (5, 3), 1)
    out = load_image(_save(one, tmp_path / "one.bmp"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (5, 3), 77)
    assert load_image(_save(grey, tmp_path / "grey.png")).getpixel((2, 2)) == (77, 77, 77)


def test_animated_gif_uses_first_frame(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with caplog.at_level(logging.WARNING, logger="oneword.data.images"):
        out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (255, 0, 0)
    assert "anim.gif" in caplog.text and "first one" in caplog.text


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees clockwise to display
    out = load_image(_save(img, tmp_path / "rot.jpg", exif=exif, quality=95))
    assert out.size == (20, 40)
    r, _, b = out.getpixel((10, 5))  # the left strip is now at the top
    assert r > 200 and b < 60


# ---------------------------------------------------------------- load_image: bad inputs


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "nope.png")
    assert not isinstance(err.value, ImageError)
    _check_message(err, "nope.png")


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_files_raise(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = _truncate(_save(_noise((96, 96)), tmp_path / f"cut{suffix}", format=fmt))
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert "truncated" in _check_message(err, f"cut{suffix}")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt.png"
    path.write_text("hello\nthis is not an image\n")
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert "not an image" in _check_message(err, "notes.txt.png")


def test_empty_and_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "empty.png")
    _check_message(err, "empty.png")
    data = bytearray(_save(_noise(), tmp_path / "bad.png").read_bytes())
    data[60:90] = b"\xff" * 30  # break the first IDAT chunk (CRC and data)
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "bad.png")
    _check_message(err, "bad.png")


def test_pixel_cap_checked_before_decoding(tmp_path: Path) -> None:
    path = _save(_noise((64, 64)), tmp_path / "big.png")
    with pytest.raises(ImageError) as err:
        load_image(path, max_pixels=1000)
    msg = _check_message(err, "big.png", "64x64", "4096", "1000", "--max-pixels")
    assert "cap" in msg
    assert load_image(path, max_pixels=4096).size == (64, 64)


def test_header_only_bomb(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageError) as err:
        load_image(path)
    _check_message(err, "bomb.png", "10000000000", str(DEFAULT_MAX_PIXELS), "--max-pixels")
    path = _png_header_only(tmp_path / "bomb2.png", 5000, 5000)  # under Pillow's own limits
    with pytest.raises(ImageError) as err:
        load_image(path, max_pixels=1_000_000)
    _check_message(err, "bomb2.png", "5000x5000")


# ---------------------------------------------------------------- list_images


def test_list_images_filters_and_sorts(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.webp", ".hidden.png", "._a.jpg", ".DS_Store", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]
    assert ".tiff" in IMAGE_SUFFIXES and ".gif" in IMAGE_SUFFIXES


def test_list_images_says_what_it_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A folder with photos the loader does not take ran with fewer images and no word."""
    for name in ("a.png", "b.jfif", "c.JPE", "d.heic", "notes.txt", ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "more").mkdir()
    with caplog.at_level("WARNING"):
        assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.jfif", "c.JPE"]
    assert "photos it cannot read (d.heic; convert HEIC files" in caplog.text
    assert "subfolders, which are not searched (more/)" in caplog.text
    assert "notes.txt" not in caplog.text and ".DS_Store" not in caplog.text  # sidecars: quiet
    caplog.clear()
    (tmp_path / "d.heic").unlink()
    (tmp_path / "more").rmdir()
    with caplog.at_level("WARNING"):
        list_images(tmp_path)
    assert caplog.text == ""  # no photo left behind, nothing said


def test_list_images_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        list_images(tmp_path / "missing")
    _check_message(err, "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(InputError) as err:
        list_images(tmp_path / "file.png")
    _check_message(err, "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(InputError) as err:
        list_images(empty)
    _check_message(err, "empty", ".png", ".jpg", ".webp")


# ---------------------------------------------------------------- load_folder


def test_load_folder_ok(tmp_path: Path) -> None:
    for i in range(3):
        _save(_noise(seed=i), tmp_path / f"img_{i}.png")
    loaded = load_folder(tmp_path)
    assert [item.path.name for item in loaded] == ["img_0.png", "img_1.png", "img_2.png"]
    for item in loaded:
        assert isinstance(item, LoadedImage) and item.image.mode == "RGB"
        assert item.sha256 == hashlib.sha256(item.path.read_bytes()).hexdigest()


def test_load_folder_names_every_bad_file(tmp_path: Path) -> None:
    for i in range(3):
        _save(_noise(seed=i), tmp_path / f"ok_{i}.png")
    _truncate(_save(_noise((96, 96)), tmp_path / "a.png"))
    (tmp_path / "b.txt.png").write_text("not an image")
    with pytest.raises(ImageError) as err:
        load_folder(tmp_path)
    msg = _check_message(err, "2 of 5", "a.png (truncated file)", "b.txt.png (not an image)")
    assert "ok_0.png" not in msg


def test_load_folder_max_pixels(tmp_path: Path) -> None:
    _save(_noise((64, 64)), tmp_path / "big.png")
    _save(_noise((8, 8)), tmp_path / "small.png")
    with pytest.raises(ImageError) as err:
        load_folder(tmp_path, max_pixels=1000)
    _check_message(err, "1 of 2", "big.png", "--max-pixels")
    assert len(load_folder(tmp_path, max_pixels=4096)) == 2


# ---------------------------------------------------------------- tensors and crops


def test_image_to_tensor_range() -> None:
    img = Image.new("RGB", (3, 2), (0, 0, 0))
    img.putpixel((2, 1), (255, 255, 255))
    t = image_to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert torch.all(t[:, 1, 2] == 1.0) and torch.all(t[:, 0, 0] == -1.0)
    noisy = image_to_tensor(_noise())
    assert noisy.min() >= -1.0 and noisy.max() <= 1.0


@pytest.mark.parametrize("wh", [(80, 40), (40, 80), (50, 50), (10, 12)])
def test_resize_and_crop_size(wh: tuple[int, int]) -> None:
    img = _noise(wh)
    assert resize_and_crop(img, 32).size == (32, 32)
    view = resize_and_crop(img, 24, center=False, rng=random.Random(1), scale=(0.5, 1.0))
    assert view.size == (24, 24) and view.mode == "RGB"


def test_resize_and_crop_center_keeps_middle() -> None:
    img = Image.new("RGB", (90, 30), (255, 0, 0))
    img.paste((0, 0, 255), (30, 0, 60, 30))  # blue middle third
    out = np.asarray(resize_and_crop(img, 16))
    assert (out[..., 2] > 200).all() and (out[..., 0] < 60).all()


def test_resize_and_crop_deterministic() -> None:
    img = _noise((120, 80))

    def views(seed: int) -> list[bytes]:
        rng = random.Random(seed)
        return [resize_and_crop(img, 32, center=False, rng=rng, scale=(0.6, 1.0)).tobytes() for _ in range(4)]

    assert views(7) == views(7)
    assert views(7) != views(8)
    assert len(set(views(7))) > 1
    with pytest.raises(ValueError):
        resize_and_crop(img, 32, scale=(0.0, 1.0))
