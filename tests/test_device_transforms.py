"""The model actors' own decoding (mga.device_transforms, pipelines.embed.device_decoding)
against the decoding tasks' PIL path, on real JPEGs, on the CPU (the same code runs on a GPU,
where torchvision decodes with nvjpeg; bench/RESULTS.md has the figures from one)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mga.device_transforms import apply_orientation, crop_tensor, letterbox_tensor
from mga.transforms import crop_to_box, letterbox_size, preprocess, to_tensor_layout
from pipelines.embed.device_decoding import decode_jpegs, device_pixels, jpeg_orientation
from tests.bad_images import CORPUS, encode

CPU = torch.device("cpu")
TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients, stripes and noise: edges and smooth areas for the resize to get wrong."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) % 37 * 7], -1)
    noise = np.random.default_rng(seed).normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy())


def jpeg(image: Image.Image, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=90, exif=exif)


def test_letterbox_sizes_are_pils():
    for width in range(1, 70):
        for height in (1, 2, 3, 7, 31, 59, 64, 100, 1000):
            assert letterbox_size(width, height, 32) == ImageOps.contain(Image.new("RGB", (width, height)), (32, 32)).size, (width, height)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_the_pixels_as_pil_does(orientation):
    image = photo(37, 23)
    want = image.transpose(TRANSPOSES[orientation]) if orientation in TRANSPOSES else image
    assert torch.equal(apply_orientation(as_tensor(image), orientation), as_tensor(want))


def test_crop_and_letterbox_within_one_level_of_pil():
    for width, height, size, bbox in [(640, 480, 224, None), (300, 900, 224, [20, 30, 250, 700]), (100, 80, 224, None),
                                      (224, 224, 224, None), (1000, 1500, 128, [0, 0, 999, 1499]), (50, 1, 64, None), (80, 60, 64, [70, 50, 90, 90])]:
        image = photo(width, height)
        device = letterbox_tensor(crop_tensor(as_tensor(image), bbox), size).numpy().astype(int)
        reference = to_tensor_layout(crop_to_box(image, bbox), size).astype(int)
        difference = np.abs(device - reference)
        # Resampling arithmetic differs (torch's float vs PIL's fixed point): at most one level, rarely.
        assert difference.max() <= 1 and difference.mean() < 0.2, (width, height, difference.max(), difference.mean())


def test_device_pixels_equal_the_cpu_paths_on_real_files():
    images = [jpeg(photo(640, 480, 1), 6), jpeg(photo(300, 900, 2), 3), jpeg(photo(120, 90, 3).convert("L")), jpeg(photo(1000, 700, 4), 8)]
    boxes = [[10, 20, 300, 200], None, [5, 5, 60, 60], None]
    names = [name for name in CORPUS]
    images += [CORPUS[name][0] for name in names]
    boxes += [None] * len(names)
    images.append(None)  # a null image cell
    boxes.append(None)

    pixels, kept, rejected = device_pixels(images, boxes, 64, 50_000_000, CPU)

    reasons = {}
    for row, (data, bbox) in enumerate(zip(images, boxes)):
        try:
            reference = preprocess(data or b"", bbox, 64, None, 50_000_000)
        except Exception as error:  # noqa: BLE001 - the CPU path's reason is what the device path must give
            reasons[row] = str(error)
            continue
        got = pixels[kept.index(row)].numpy().astype(int)
        assert np.abs(got - reference.astype(int)).max() <= 1, row
    assert dict(rejected) == reasons and sorted(kept + list(reasons)) == list(range(len(images)))
    # What each side decoded: the complete RGB and grayscale JPEGs on the device, the rest on the CPU path.
    on_device = [row for row, data in enumerate(images) if data and jpeg_orientation(data, 50_000_000) is not None]
    assert on_device == [0, 1, 2, 3, 4 + names.index("exif-rotated.jpg"), 4 + names.index("corrupt-exif.jpg"), 4 + names.index("grayscale.jpg")]
    assert jpeg_orientation(CORPUS["cmyk.jpg"][0], 50_000_000) is None and jpeg_orientation(CORPUS["truncated.jpg"][0], 50_000_000) is None
    assert jpeg_orientation(images[0], 640 * 480 - 1) is None  # over the limit: the CPU path rejects it, with its reason


def test_a_jpeg_the_decoder_refuses_is_left_to_the_cpu_path():
    good = jpeg(photo(40, 30))
    # An intact header over scan data of noise: the header check passes it, the decoder refuses it.
    broken = good[:300] + np.random.default_rng(0).integers(0, 255, 300, dtype=np.uint8).tobytes() + b"\xff\xd9"
    assert jpeg_orientation(broken, 10**6) == 1
    decoded = decode_jpegs([good, broken, good], CPU)  # the batched call fails as a whole: then one by one
    assert decoded[1] is None and torch.equal(decoded[0], decoded[2]) and decoded[0].shape == (3, 30, 40)
    with pytest.raises(Exception, match="cannot decode") as cpu_path:
        preprocess(broken, None, 32)
    pixels, kept, rejected = device_pixels([good, broken], [None, None], 32, 10**6, CPU)
    assert kept == [0] and rejected == [(1, str(cpu_path.value))] and pixels.shape == (1, 3, 32, 32)
