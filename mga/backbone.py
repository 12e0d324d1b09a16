"""Image encoder (paper Sec. 2.1): timm EfficientNet grid features and the global feature."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mga.errors import InputError
from mga.pretrained import efficientnet_pytorch_to_timm, is_efficientnet_pytorch, load_strict, read_state_dict


class Backbone(nn.Module):
    """Grid features of the chosen stages and the global feature X^g of the last stage.

    Takes uint8 images [B, 3, H, W] (0-255) and normalises them with the backbone's own
    mean and std, so callers ship compact uint8 batches. X^g is the average-pooled final
    stage projected to D; it is returned before L2 normalisation (the identity loss's fc
    reads it, the similarity normalises it).
    """

    def __init__(self, name: str, layers: tuple[int, ...], global_dim: int, hub: bool = False, weights_file: str | Path | None = None) -> None:
        """`hub`: timm's ImageNet weights from the Hugging Face hub; `weights_file`: a local
        state dict (timm or EfficientNet-PyTorch names), loaded strictly; neither: random init."""
        super().__init__()
        import timm  # here: timm and torchvision take ~1.7 s to import, which readers of artifacts and search drivers never need

        self.body = timm.create_model(name, features_only=True, out_indices=layers, pretrained=hub and not weights_file)
        if weights_file:
            self.load_weights(weights_file)
        stages = len(self.body.feature_info.info)
        if layers[-1] != stages - 1:
            raise InputError(f"layers: the last entry must be the final stage {stages - 1} of {name} (it gives the global feature), got {list(layers)}")
        self.channels: list[int] = self.body.feature_info.channels()
        self.global_proj = nn.Linear(self.channels[-1], global_dim)
        config = self.body.pretrained_cfg
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1) * 255.0, persistent=False)

    def load_weights(self, path: str | Path) -> None:
        """Every tensor of the feature extractor from `path`; its classification head is ignored."""
        state = read_state_dict(path)
        if is_efficientnet_pytorch(state):
            blocks = getattr(self.body, "blocks", None)
            if blocks is None:
                raise InputError(f"{path}: EfficientNet-PyTorch weights need an EfficientNet backbone")
            state = efficientnet_pytorch_to_timm(state, [len(stage) for stage in blocks])
        load_strict(self.body, state, str(path))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """uint8 images -> (global feature [B, D] before normalisation, grid feature maps per layer)."""
        pixels = (images.to(self.mean.dtype) - self.mean) / self.std
        feature_maps = self.body(pixels.contiguous(memory_format=torch.channels_last) if images.is_cuda else pixels)
        pooled = feature_maps[-1].mean(dim=(2, 3))
        return self.global_proj(pooled), feature_maps
