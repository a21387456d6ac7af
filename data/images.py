"""Reading one image file as 8-bit sRGB, whatever its mode, orientation or colour profile, or saying why it cannot be used."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Pillow's own default limit (about 89.5 megapixels). Above it we refuse a file before decoding a pixel.
# Pillow itself refuses anything above twice its PIL.Image.MAX_IMAGE_PIXELS, whatever limit is asked for here.
DEFAULT_MAX_PIXELS = 89_478_485

_EXIF_ORIENTATION = 0x0112
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


class BadImage(ValueError):
    """A file that cannot be used as a training image. The message says why, in words a user can act on."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed so that multi-GB checkpoints never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) after the cheap checks; the caller must close the image."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BadImage(f"cannot read the file: {err.strerror or err}") from err
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise BadImage(f"refused as a possible decompression bomb: {err}") from err
    except Exception as err:  # Pillow raises many types for non-images and broken headers
        if isinstance(err, MemoryError):
            raise
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from err
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise BadImage(f"refused as a possible decompression bomb: {width}x{height} = {width * height} pixels, "
                       f"more than the limit of {max_pixels} (raise max_pixels if the image is genuine)")
    if width == 0 or height == 0:
        image.close()
        raise BadImage(f"image has no pixels ({width}x{height})")
    return image


def _turned(image: Image.Image) -> bool:
    """Whether the EXIF orientation includes a quarter turn (orientations 5-8), which swaps width and height."""
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # a broken EXIF block only costs us the orientation, as in load_rgb
        return False


def image_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as the image will be seen, i.e. after EXIF orientation, from the header alone."""
    with _open(Path(path), max_pixels) as image:
        width, height = image.size
        return (height, width) if _turned(image) else (width, height)


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
             min_size: tuple[int, int] | None = None) -> Image.Image:
    """The fully decoded image as mode "RGB": EXIF orientation applied, colour profile converted to sRGB,
    16-bit and float data scaled to 8 bits, transparency composited over white. Raises BadImage.

    min_size (width, height, upright): the size the caller will shrink to. A JPEG is then decoded at 1/2, 1/4
    or 1/8 scale when that still covers it, several times faster on phone photos."""
    path = Path(path)
    with _open(path, max_pixels) as image:
        if min_size is not None and image.format == "JPEG":
            width, height = min_size
            image.draft(image.mode, (height, width) if _turned(image) else (width, height))
        try:
            image.load()  # decode now, so that truncated or corrupt data fails here and not later
        except Exception as err:
            if isinstance(err, MemoryError):
                raise
            raise BadImage(f"corrupt or truncated image data ({type(err).__name__}: {err})") from err
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:  # unreadable EXIF: keep the pixels as stored rather than lose the image
            upright = image.copy()
    try:
        return to_rgb(upright)
    except Exception as err:
        if isinstance(err, MemoryError):
            raise
        raise BadImage(f"cannot convert mode {upright.mode!r} to RGB ({type(err).__name__}: {err})") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB" in sRGB. See load_rgb."""
    mode = image.mode
    if mode.startswith("I"):
        # 16-bit PNG/TIFF grayscale ("I;16*", or "I" in older Pillow): a plain convert() would clip at 255.
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if np.nanmax(values, initial=0.0) <= 1.0:  # float images are usually [0, 1]; otherwise assume 0..255
            values = values * 255.0
        image = Image.fromarray(np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8), "L")
    elif mode in ("RGBa", "La"):  # premultiplied alpha
        image = image.convert(mode.upper())
    elif mode == "P" or "transparency" in image.info:
        # A palette (or tRNS chunk) may mark a colour as transparent: turn that into a real alpha channel.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    image = _to_srgb(image)
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_srgb(image: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (Display P3 phone photos, Adobe RGB, print CMYK) so colours match sRGB.
    Images without a profile, or with one littlecms cannot read, are taken as sRGB already."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    colour = image.convert("RGB") if alpha is not None else image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(colour, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image
    if converted is None:
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def has_alpha(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """The image carries transparency (an alpha channel or a transparent palette colour); reads the header only."""
    with _open(Path(path), max_pixels) as image:
        return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def load_mask(path: str | os.PathLike, alpha: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A loss mask as mode "L", upright (EXIF orientation applied): a mask file's grey levels (white = full weight),
    or with alpha=True the image's own alpha channel (opaque = full weight). Raises BadImage."""
    with _open(Path(path), max_pixels) as image:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except Exception as err:
            if isinstance(err, MemoryError):
                raise
            raise BadImage(f"unreadable mask ({type(err).__name__}: {err})") from err
    if alpha:
        if upright.mode not in ("RGBA", "LA"):
            upright = upright.convert("RGBA")
        return upright.getchannel("A")
    return upright.convert("L")
