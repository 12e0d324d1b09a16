"""Decoding in embed's model actors (`mga embed --decode actors`, the default where they have GPUs).

On a GPU the CPUs' JPEG decoding is what the model waits on (264 img/s end to end on an H200
in session 10, bench/RESULTS.md). Here the actor receives the encoded bytes and decodes its
batch's JPEGs on its own device in one call (nvjpeg on a GPU, libjpeg-turbo on a CPU), then
orients, crops and letterboxes them there (mga.device_transforms). Every other image goes
through the decoding tasks' CPU path (mga.transforms.preprocess) inside the actor: other
formats, CMYK JPEGs, a JPEG without its end marker (truncated: the CPU path rejects it with
its reason), one over the pixel limit, one the device decoder refuses. Rejects are staged as
the decoding tasks stage theirs.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from mga.device_transforms import apply_orientation, crop_tensor, letterbox_tensor
from pipelines.embed.decoding import cpu_pixels, identity_columns, stage_rejects

JPEG_END = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ActorDecoding:
    """What a model actor needs to decode its batches itself."""

    image_size: int
    max_pixels: int
    rejects_uri: str

    def decode(self, batch: pa.Table, device: torch.device) -> dict[str, np.ndarray | torch.Tensor]:
        """A batch of catalog rows (identity columns, `image`, `bbox`, `source_path`) -> the model
        actor's input: the kept rows' identity columns and `pixels` on `device`; the rest staged."""
        pixels, kept, rejected = device_pixels(
            batch.column("image").to_pylist(), batch.column("bbox").to_pylist(), self.image_size, self.max_pixels, device
        )
        stage_rejects(batch, rejected, self.rejects_uri)
        return {**identity_columns(batch, kept), "pixels": pixels}


def jpeg_orientation(data: bytes, max_pixels: int) -> int | None:
    """The EXIF orientation (1-8) of a complete RGB or grayscale JPEG within `max_pixels`, read
    from its header; None for any image the device path leaves to the CPU path."""
    if not data.endswith(JPEG_END):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.width * image.height > max_pixels:
                return None
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - whatever the header holds, the CPU path decides (and says why)
        return None
    return orientation if isinstance(orientation, int) else 1


def decode_jpegs(encoded: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [3, H, W] RGB on `device` for each JPEG; None for one the decoder refused (a batched
    GPU call fails as a whole, so after a failure each is decoded on its own)."""
    if not encoded:
        return []
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec's; they remain its nvjpeg path.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded: list[torch.Tensor | None] = []
            for tensor in tensors:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def device_pixels(
    images: list[bytes | None], bboxes: list[list[int] | None], size: int, max_pixels: int, device: torch.device
) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """uint8 [n, 3, size, size] on `device` for the rows that decode, those rows' numbers, and
    (row, reason) for the rows set aside."""
    orientations = {row: jpeg_orientation(data, max_pixels) if data else None for row, data in enumerate(images)}
    on_device = [row for row, orientation in orientations.items() if orientation is not None]
    pixels: dict[int, torch.Tensor] = {}
    for row, image in zip(on_device, decode_jpegs([images[row] for row in on_device], device)):
        if image is not None:
            pixels[row] = letterbox_tensor(crop_tensor(apply_orientation(image, orientations[row]), bboxes[row]), size)
    on_cpu, rejected = cpu_pixels(images, bboxes, [row for row in range(len(images)) if row not in pixels], size, max_pixels)
    pixels.update((row, torch.from_numpy(array).to(device)) for row, array in on_cpu.items())
    kept = sorted(pixels)
    stacked = torch.stack([pixels[row] for row in kept]) if kept else torch.zeros((0, 3, size, size), dtype=torch.uint8, device=device)
    return stacked, kept, rejected
