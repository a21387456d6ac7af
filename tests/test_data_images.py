"""data.images and data.buckets: every odd image format becomes sRGB RGB, bad files fail with BadImage, and the
bucket / resize / crop geometry holds its promises (grid, area, no upscaling, determinism)."""
from __future__ import annotations

import io
import math
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from data import BadImage, Geometry, bucket_sizes, image_size, load_rgb, nearest_bucket, own_bucket, parse_resolution, place
from data.buckets import apply, side_limits
from data.images import to_rgb


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png16(array: np.ndarray, color_type: int, size: tuple[int, int] | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): color_type 0 gray, 2 RGB, 6 RGBA.
    `size` overrides the (width, height) the header claims."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    width, height = size or (width, height)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Conversion to RGB


def test_rgba_is_composited_over_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((1, 1), (255, 0, 0, 255))
    image.putpixel((2, 2), (0, 0, 0, 128))
    image.save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white, not the hidden red
    assert out.getpixel((1, 1)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 2)))  # half-transparent black over white


def test_palette_with_and_without_transparency(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((3, 3), 1)
    image.save(tmp_path / "t.png", transparency=0)
    image.save(tmp_path / "o.gif")
    transparent, opaque = load_rgb(tmp_path / "t.png"), load_rgb(tmp_path / "o.gif")
    assert transparent.getpixel((0, 0)) == (255, 255, 255) and transparent.getpixel((3, 3)) == (0, 0, 255)
    assert opaque.getpixel((0, 0)) == (0, 255, 0) and opaque.getpixel((3, 3)) == (0, 0, 255)


def test_cmyk_jpeg(tmp_path):
    Image.new("RGB", (16, 16), (200, 40, 90)).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_rgb(tmp_path / "c.jpg")
    assert out.mode == "RGB"
    assert all(abs(a - b) <= 6 for a, b in zip(out.getpixel((8, 8)), (200, 40, 90)))


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    (tmp_path / "g.png").write_bytes(png16(values, 0))
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "g.png"))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16_bit_rgb_and_rgba(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint16)
    rgb[..., 0], rgb[..., 1] = 65535, 32768
    (tmp_path / "rgb.png").write_bytes(png16(rgb, 2))
    assert load_rgb(tmp_path / "rgb.png").getpixel((0, 0)) == (255, 128, 0)
    rgba = np.zeros((2, 3, 4), np.uint16)
    rgba[..., 0] = 65535  # red, fully transparent
    (tmp_path / "rgba.png").write_bytes(png16(rgba, 6))
    assert load_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "I", "F", "RGBa", "YCbCr"])
def test_other_modes_become_rgb(tmp_path, mode):
    image = Image.new("RGBA", (6, 4), (120, 120, 120, 255)).convert(mode if mode not in ("I", "F") else "RGBA")
    if mode == "I":  # 16-bit data held in a 32-bit mode, as some TIFF and older PNG readers give it
        image = Image.fromarray(np.full((4, 6), 120 * 257, np.int32), "I")
    if mode == "F":
        image = Image.fromarray(np.full((4, 6), 120 / 255, np.float32), "F")
    if mode in ("I", "F"):  # TIFF keeps these modes on disk
        image.save(tmp_path / "x.tif")
        out = load_rgb(tmp_path / "x.tif")
    else:
        out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (6, 4)
    if mode != "1":
        assert all(abs(c - 120) <= 1 for c in out.getpixel((2, 2)))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / f"o.{fmt.lower()}"
    stored.save(path, fmt, exif=exif, quality=100) if fmt != "PNG" else stored.save(path, fmt, exif=exif)
    assert image_size(path) == (20, 40)
    out = load_rgb(path)
    assert out.size == (20, 40)
    red = out.getpixel((17, 2))  # after a clockwise turn the top-left corner is at the top right
    assert red[0] > 200 and red[2] < 60, red


def test_icc_profile_is_honoured(tmp_path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (4, 4), (10, 200, 30)).save(tmp_path / "p.png", icc_profile=srgb)
    assert all(abs(a - b) <= 2 for a, b in zip(load_rgb(tmp_path / "p.png").getpixel((1, 1)), (10, 200, 30)))
    (tmp_path / "junk.png").write_bytes(b"")  # and a broken profile is ignored, not fatal
    Image.new("RGB", (4, 4), (10, 200, 30)).save(tmp_path / "j.png", icc_profile=b"not a profile")
    assert load_rgb(tmp_path / "j.png").getpixel((1, 1)) == (10, 200, 30)


# ---------------------------------------------------------------------------------------------------------------
# Bad files


def test_bad_files_raise_bad_image(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"this is not a jpeg")
    buf = io.BytesIO()
    noise(64, 64).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    noise(64, 64).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="empty file"):
        load_rgb(tmp_path / "empty.png")
    with pytest.raises(BadImage, match="not a readable image"):
        load_rgb(tmp_path / "text.jpg")
    with pytest.raises(BadImage, match="missing.png|cannot read"):
        load_rgb(tmp_path / "missing.png")
    for name in ("cut.png", "cut.jpg"):
        assert image_size(tmp_path / name) == (64, 64)  # the header is intact ...
        with pytest.raises(BadImage, match="corrupt or truncated"):  # ... the pixel data is not
            load_rgb(tmp_path / name)


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    noise(200, 100).save(tmp_path / "big.png")
    with pytest.raises(BadImage, match="decompression bomb.*200x100"):
        load_rgb(tmp_path / "big.png", max_pixels=10_000)
    with pytest.raises(BadImage, match="decompression bomb"):
        image_size(tmp_path / "big.png", max_pixels=10_000)
    # A header claiming 100000 x 100000 pixels with (almost) no data: refused without allocating anything.
    (tmp_path / "bomb.png").write_bytes(png16(np.zeros((1, 1), np.uint16), 0, size=(100_000, 100_000)))
    with pytest.raises(BadImage, match="decompression bomb"):
        load_rgb(tmp_path / "bomb.png")


# ---------------------------------------------------------------------------------------------------------------
# Buckets and crops


def test_parse_resolution():
    assert parse_resolution(512) == (512, 512)
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("512,768") == (512, 768) == parse_resolution("512x768") == parse_resolution((512, 768))
    for bad in ("abc", "0", "1,2,3", -5):
        with pytest.raises(ValueError, match="resolution"):
            parse_resolution(bad)


def test_bucket_sizes_sd_512():
    buckets = bucket_sizes((512, 512), step=64)
    assert (512, 512) in buckets and (576, 448) in buckets and (448, 576) in buckets
    assert side_limits((512, 512), 64) == (256, 1024)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
        # one side is as long as the grid allows for the other (unless capped by max_side)
        assert w * (h + 64) > 512 * 512 or (w + 64) * h > 512 * 512 or 1024 in (w, h)
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert {(h, w) for w, h in buckets} == set(buckets)  # symmetric


def test_bucket_sizes_tiny_step_and_limits():
    buckets = bucket_sizes((16, 16), step=4)
    assert all(w % 4 == 0 and h % 4 == 0 and w * h <= 256 for w, h in buckets)
    assert bucket_sizes((512, 512), 64, min_side=384, max_side=768) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    with pytest.raises(ValueError, match="multiples of the step"):
        bucket_sizes((512, 512), 64, min_side=300)


def test_nearest_bucket_by_log_aspect():
    buckets = bucket_sizes((512, 512), 64)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert nearest_bucket((800, 600), buckets) == (576, 448)
    assert nearest_bucket((600, 800), buckets) == (448, 576)
    assert nearest_bucket((5000, 100), buckets) == max(buckets, key=lambda b: b[0] / b[1])
    # 2:1 and 1:2 are mirror images, so they land in mirrored buckets
    w, h = nearest_bucket((2000, 1000), buckets)
    assert nearest_bucket((1000, 2000), buckets) == (h, w)


def test_own_bucket_never_upscales():
    assert own_bucket((300, 200), (512, 512), 64) == (256, 192)  # small: its own size, floored to the grid
    big = own_bucket((4000, 3000), (512, 512), 64)
    assert big[0] * big[1] <= 512 * 512 and big[0] % 64 == 0 and big[1] % 64 == 0
    assert abs(big[0] / big[1] - 4 / 3) < 0.2
    assert own_bucket((50, 400), (512, 512), 64) is None  # a side under one step
    geometry = Geometry(resolution=512, bucket=True, no_upscale=True)
    for size in [(300, 200), (4000, 3000), (513, 1025), (640, 640)]:
        p = geometry.plan(size, key="x")
        assert p.resized[0] <= size[0] and p.resized[1] <= size[1], (size, p)


@pytest.mark.parametrize("size", [(100, 100), (300, 200), (200, 300), (1000, 90), (64, 64), (513, 511)])
def test_place_covers_the_bucket_and_keeps_aspect(size):
    bucket = (64, 48)
    p = place(size, bucket, "center")
    rw, rh = p.resized
    assert rw >= 64 and rh >= 48 and (rw == 64 or rh == 48)  # just covers
    assert abs(rw / rh - size[0] / size[1]) <= 2 / min(rw, rh) * max(1, size[0] / size[1])
    top, left = p.crop
    assert (top, left) == ((rh - 48) // 2, (rw - 64) // 2)
    image = apply(noise(*size), p)
    assert image.size == bucket


def test_random_crop_is_seeded_and_in_range():
    geometry = Geometry(resolution=(64, 64), crop="random", seed=3)
    plans = [geometry.plan((300, 64), key=f"img{i}") for i in range(30)]
    assert all(0 <= p.crop[1] <= p.resized[0] - 64 and p.crop[0] == 0 for p in plans)
    assert len({p.crop for p in plans}) > 5  # it does move
    assert plans == [geometry.plan((300, 64), key=f"img{i}") for i in range(30)]  # the same every run
    other = Geometry(resolution=(64, 64), crop="random", seed=4)
    assert [other.plan((300, 64), key=f"img{i}") for i in range(30)] != plans
    rng = random.Random(0)
    assert place((300, 64), (64, 64), "random", rng).crop[1] in range(0, 237)


def test_geometry_validation():
    with pytest.raises(ValueError, match="no_upscale needs bucketing"):
        Geometry(no_upscale=True)
    assert Geometry(resolution=500).to_json()["step"] is None  # the step only matters to buckets (the model checks 500)
    with pytest.raises(ValueError, match="crop must be"):
        Geometry(crop="top")
    assert Geometry(resolution=20, step=4).buckets() == [(20, 20)]
    g = Geometry(resolution=512, bucket=True)
    assert g.to_json()["min_side"] == 256 and g.to_json() == Geometry(resolution="512", bucket=True, min_side=256).to_json()
    assert math.isclose(sum(1 for _ in g.buckets()), len(bucket_sizes((512, 512))))


def test_transparency_chunks_of_gray_and_rgb_images(tmp_path):
    gray = Image.new("L", (4, 4), 0)
    gray.putpixel((1, 1), 100)
    gray.save(tmp_path / "l.png", transparency=0)
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    rgb.putpixel((1, 1), (100, 0, 0))
    rgb.save(tmp_path / "rgb.png", transparency=(1, 2, 3))
    for name, kept in (("l.png", (100, 100, 100)), ("rgb.png", (100, 0, 0))):
        out = load_rgb(tmp_path / name)
        assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == kept


def test_jpeg_draft_decoding_keeps_the_crop(tmp_path):
    """With min_size a big JPEG is decoded at reduced scale; the crop must look the same, rotation included."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    small.resize((800, 600), Image.Resampling.BILINEAR).save(tmp_path / "big.jpg", quality=95, exif=exif)
    geometry = Geometry(resolution=64, bucket=True, step=16)
    plan = geometry.plan(image_size(tmp_path / "big.jpg"), key="k")
    assert image_size(tmp_path / "big.jpg") == (600, 800) and plan.resized[0] < 150
    full = np.asarray(apply(load_rgb(tmp_path / "big.jpg"), plan), dtype=np.float64)
    fast_image = load_rgb(tmp_path / "big.jpg", min_size=plan.resized)
    assert fast_image.size[0] < 600 and fast_image.size[0] >= plan.resized[0] and fast_image.size[1] >= plan.resized[1]
    fast = np.asarray(apply(fast_image, plan), dtype=np.float64)
    assert fast.shape == full.shape and np.abs(fast - full).mean() < 2.0
