"""mga.transforms' orientation, crop and letterbox on decoded uint8 tensors, on any device.

Embed's model actors use these when they decode JPEGs themselves (on a GPU, with nvjpeg), so
that the CPUs do not have to keep a GPU fed: the steps and their arithmetic follow the PIL
path (`decode_image` -> `crop_to_box` -> `to_tensor_layout`) step by step, and
tests/test_device_transforms.py measures how close the two paths' pixels are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mga.transforms import PAD_FILL, crop_window, letterbox_size


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] as PIL's `ImageOps.exif_transpose` turns it for an EXIF Orientation tag (1-8)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


def crop_tensor(image: torch.Tensor, bbox: tuple[int, int, int, int] | list[int] | None, margin: float = 0.05) -> torch.Tensor:
    """`mga.transforms.crop_to_box` on a [C, H, W] tensor (a view: no copy)."""
    window = crop_window(image.shape[-1], image.shape[-2], bbox, margin)
    if window is None:
        return image
    x1, y1, x2, y2 = window
    return image[..., y1:y2, x1:x2]


def letterbox_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """`mga.transforms.to_tensor_layout` on a uint8 [3, H, W] tensor: the aspect kept, bilinear
    (antialiased when shrinking, as PIL's resize is), centred on a PAD_FILL square."""
    height, width = image.shape[-2:]
    new_width, new_height = letterbox_size(width, height, size)
    canvas = torch.tensor(PAD_FILL, dtype=torch.uint8, device=image.device).view(3, 1, 1).expand(3, size, size).clone()
    if new_width == 0 or new_height == 0:  # a sliver PIL scales to nothing: the padding alone
        return canvas
    if (new_height, new_width) == (height, width):
        resized = image
    else:
        resized = F.interpolate(image[None].float(), size=(new_height, new_width), mode="bilinear", antialias=True, align_corners=False)[0]
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    left, top = round((size - new_width) * 0.5), round((size - new_height) * 0.5)
    canvas[:, top:top + new_height, left:left + new_width] = resized
    return canvas
