"""Image encoder (paper Sec. 2.1): timm EfficientNetV2 grid features and the global feature."""

from __future__ import annotations

import timm
import torch
import torch.nn as nn


class Backbone(nn.Module):
    """Grid features of the chosen stages and the global feature X^g of the last stage.

    Takes uint8 images [B, 3, H, W] (0-255) and normalises them with the backbone's own
    mean and std, so callers ship compact uint8 batches. X^g is the average-pooled final
    stage projected to D; it is returned before L2 normalisation (the identity loss's fc
    reads it, the similarity normalises it).
    """

    def __init__(self, name: str, layers: tuple[int, ...], global_dim: int, pretrained: bool = False, weights_file: str | None = None) -> None:
        super().__init__()
        overlay = {"file": weights_file} if weights_file else None
        self.body = timm.create_model(
            name,
            features_only=True,
            out_indices=layers,
            pretrained=pretrained or bool(weights_file),
            pretrained_cfg_overlay=overlay,
        )
        stages = len(self.body.feature_info.info)
        if layers[-1] != stages - 1:
            raise ValueError(f"layers: the last entry must be the final stage {stages - 1} of {name} (it gives the global feature), got {list(layers)}")
        self.channels: list[int] = self.body.feature_info.channels()
        self.global_proj = nn.Linear(self.channels[-1], global_dim)
        config = self.body.pretrained_cfg
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """uint8 images -> (global feature [B, D] before normalisation, grid feature maps per layer)."""
        pixels = (images.to(self.mean.dtype) - self.mean) / self.std
        feature_maps = self.body(pixels.contiguous(memory_format=torch.channels_last) if images.is_cuda else pixels)
        pooled = feature_maps[-1].mean(dim=(2, 3))
        return self.global_proj(pooled), feature_maps
