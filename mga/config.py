"""Typed, validated model and loss configuration.

Unknown keys and wrong values are errors that name the key (pydantic, extra="forbid").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelConfig(StrictModel):
    """The network. Defaults are the paper's where it gives one, and a stated choice where not."""

    backbone: str = "tf_efficientnetv2_s"
    # Backbone stages (timm `features_only` indices) that give grid features, finest first.
    # The last stage always gives the global feature (Sec. 2.1); it must be listed last.
    layers: tuple[int, ...] = (2, 3, 4)
    global_dim: int = Field(512, gt=0, description="D, width of the global feature")
    token_dim: int = Field(128, gt=0, description="d, common token width all layers are projected to")
    num_tokens: int = Field(8, gt=0, description="M, FGA cluster centres (tokens) per layer")
    # ATA transformer blocks.
    heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(2.0, gt=0)
    # tau of eq. (5); similarities are cosines in [-1, 1], so tau sets the softmax sharpness.
    temperature: float = Field(10.0, gt=0)
    # Eq. (6) takes the max over tokens, the text beside it the average. Default "mean":
    # the text describes the method twice, and the mean gives every token a gradient.
    token_reduce: Literal["mean", "max"] = "mean"
    # Stage 2 of ATA: the coarse queries attend the finer tokens of their own image
    # ("same", default: the text's "coarse tokens attend fined tokens for more detailed
    # information" of each image) or of both images of the pair ("pair").
    stage2_keys: Literal["same", "pair"] = "same"
    # LayerScale gain of ATA's transformer branches at init (0: off, plain pre-norm blocks).
    # The paper does not say how its blocks are built; without it the attended tokens of an
    # image collapse into one vector (mga.ata.TransformerBlock; bench/RESULTS.md measures it).
    # Artifacts written before this setting existed load as 0 (mga.artifact).
    ata_layer_scale: float = Field(1e-3, ge=0.0)
    # S = alpha * S_global + (1 - alpha) * S_token (Sec. 2.3), used in training and search.
    alpha: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("layers")
    @classmethod
    def _layers_ascending(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        if not layers:
            raise ValueError("layers: at least one backbone stage is needed")
        if list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"layers: must be distinct, non-negative and ascending (finest first), got {list(layers)}")
        return layers

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.token_dim % self.heads:
            raise ValueError(f"token_dim ({self.token_dim}) must be divisible by heads ({self.heads})")
        return self


class LossConfig(StrictModel):
    """Sec. 2.3: identity loss + multi-granular triplet loss [margin - S(a,p) + S(a,n)]_+."""

    identity_weight: float = Field(1.0, ge=0)
    triplet_weight: float = Field(1.0, ge=0)
    margin: float = Field(0.3, gt=0, description="Delta of the triplet loss")
    label_smoothing: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _some_loss(self) -> "LossConfig":
        if self.identity_weight == 0 and self.triplet_weight == 0:
            raise ValueError("identity_weight and triplet_weight are both 0: nothing to train")
        return self
