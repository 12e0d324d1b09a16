"""Decoding, bounding-box crop, resize and training augmentation of catalog images.

Everything returns uint8 [3, H, W] arrays: compact to ship between processes; the model
normalises on its side.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mga.errors import InputError

# PIL's own decompression-bomb threshold, made explicit so it is a checked limit, not a warning.
DEFAULT_MAX_PIXELS = 89_478_485
PAD_FILL = (124, 116, 104)  # ImageNet mean: padding reads as "no signal" after normalisation


class ImageDecodeError(InputError):
    """An image that cannot be used, with the reason."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB image, EXIF orientation applied.

    Grayscale, CMYK, palette, 16-bit and alpha images are converted (alpha over white);
    empty, truncated, non-image and oversized inputs raise ImageDecodeError.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
            image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"decompression bomb: {error}") from error
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"cannot decode: {error}") from error
    if image.width < 1 or image.height < 1:
        raise ImageDecodeError(f"degenerate size {image.width}x{image.height}")
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def crop_window(width: int, height: int, bbox: tuple[int, int, int, int] | list[int] | None, margin: float = 0.05) -> tuple[int, int, int, int] | None:
    """The garment's box widened by `margin` of its size, clipped to the image; None where there
    is no box or it leaves less than 2 pixels a side (the box is then ignored)."""
    if bbox is None:
        return None
    x1, y1, x2, y2 = (int(v) for v in bbox)
    pad_x, pad_y = int((x2 - x1) * margin), int((y2 - y1) * margin)
    x1, y1 = max(0, x1 - pad_x), max(0, y1 - pad_y)
    x2, y2 = min(width, x2 + pad_x), min(height, y2 + pad_y)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return x1, y1, x2, y2


def crop_to_box(image: Image.Image, bbox: tuple[int, int, int, int] | list[int] | None, margin: float = 0.05) -> Image.Image:
    """Crop to the garment's box widened by `margin` of its size; a box outside the image is ignored."""
    window = crop_window(image.width, image.height, bbox, margin)
    return image if window is None else image.crop(window)


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Training augmentation: random crop of 70-100% of each side, flip, brightness and contrast."""
    scale_w, scale_h = rng.uniform(0.7, 1.0, size=2)
    width, height = max(1, int(image.width * scale_w)), max(1, int(image.height * scale_h))
    left = int(rng.integers(0, image.width - width + 1))
    top = int(rng.integers(0, image.height - height + 1))
    image = image.crop((left, top, left + width, top + height))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.75, 1.25)))
    return ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.75, 1.25)))


def letterbox_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) an image is resized to within a `size` square, aspect kept, rounded
    as PIL's `ImageOps.contain` rounds (a side may round to 0)."""
    if width > height:
        return size, round(height / width * size)
    if width < height:
        return round(width / height * size), size
    return size, size


def to_tensor_layout(image: Image.Image, size: int) -> np.ndarray:
    """Letterbox to a `size` square (aspect kept: silhouettes matter) -> uint8 [3, size, size]."""
    squared = ImageOps.pad(image, (size, size), method=Image.Resampling.BILINEAR, color=PAD_FILL)
    return np.ascontiguousarray(np.asarray(squared, dtype=np.uint8).transpose(2, 0, 1))


def preprocess(
    data: bytes,
    bbox: list[int] | None,
    size: int,
    rng: np.random.Generator | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Encoded image -> uint8 [3, size, size]: decode, crop to bbox, augment when `rng` is given."""
    image = crop_to_box(decode_image(data, max_pixels), bbox)
    if rng is not None:
        image = augment(image, rng)
    return to_tensor_layout(image, size)
