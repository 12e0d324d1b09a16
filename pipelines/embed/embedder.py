"""The model actor of `mga embed`: a Ray Data actor that embeds preprocessed pixels into feature
rows (`feature_rows`, which `mga query` calls in its own process for its photos)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from mga.model import MGAModel
from pipelines.model_store import ModelSource
from pipelines.resources import actor_device
from pipelines.schemas import IDENTITY_COLUMNS, features_schema, vector_column

if TYPE_CHECKING:  # the actors unpickle it from its own module; `mga query` needs no torchvision
    from pipelines.embed.device_decoding import ActorDecoding


def model_schema(model: MGAModel, token_dtype: str) -> pa.Schema:
    """The features table's schema for `model`'s features with tokens in `token_dtype`."""
    config = model.config
    return features_schema(config.global_dim, [config.num_tokens * config.token_dim] * len(config.layers), token_dtype)


def feature_rows(model: MGAModel, model_id: str, schema: pa.Schema, batch: dict[str, np.ndarray | torch.Tensor]) -> pa.Table:
    """Features-table rows (`schema`) of a batch: its identity columns and `pixels` (uint8
    [B, 3, H, W], preprocessed; an array, or a tensor already on the model's device) through
    `model`, on the model's device (bf16 on a GPU)."""
    if len(batch["pixels"]) == 0:  # every image of the batch was rejected
        return schema.empty_table()
    device = next(model.parameters()).device
    pixels = batch["pixels"]
    pixels = (pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))).to(device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        embedding = model.embed(pixels)
    rows = len(pixels)
    # Identity columns are strings or null; a column that is null in a whole batch (the item of
    # unlabelled photos) reaches the actor from Ray Data as NaN floats: anything not a string is null.
    columns: dict[str, Any] = {
        name: pa.array([value if isinstance(value, str) else None for value in batch[name].tolist()], pa.string()) for name in IDENTITY_COLUMNS
    }
    columns["model_id"] = pa.array([model_id] * rows, pa.string())
    columns["global"] = vector_column(embedding.global_feature.float().cpu().numpy(), schema.field("global").type)
    for layer, tokens in enumerate(embedding.tokens):
        name = f"tokens_{layer}"
        columns[name] = vector_column(tokens.float().cpu().numpy(), schema.field(name).type)
    columns["embedded_at"] = pa.array([datetime.now(timezone.utc)] * rows, pa.timestamp("us", tz="UTC"))
    return pa.table(columns, schema=schema)


class Embedder:
    """Actor: the model, loaded once from storage (so Ray can restart the actor on any node).

    Its batches are preprocessed pixels from the decoding tasks, or, with `decoding`, catalog
    rows it decodes itself on its device (pipelines.embed.device_decoding)."""

    def __init__(self, model: ModelSource, token_dtype: str, use_gpu: bool = True, decoding: ActorDecoding | None = None) -> None:
        loaded, _ = model.load()
        self.model_id = model.model_id
        self.device = actor_device(use_gpu)
        self.model = loaded.to(self.device).eval()
        self.schema = model_schema(loaded, token_dtype)
        self.decoding = decoding

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table) -> pa.Table:
        if self.decoding is not None:
            batch = self.decoding.decode(batch, self.device)
        return feature_rows(self.model, self.model_id, self.schema, batch)
