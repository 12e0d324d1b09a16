"""The model actor of `mga embed`: a Ray Data actor that embeds preprocessed pixels into feature rows."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from mga.artifact import unpack_artifact
from pipelines.resources import actor_device
from pipelines.schemas import IDENTITY_COLUMNS, features_schema, vector_column


class Embedder:
    """Actor: the model, loaded once from the artifact bytes in the object store."""

    def __init__(self, artifact: list, token_dtype: str, use_gpu: bool = True) -> None:
        model, self.model_id, _ = unpack_artifact(ray.get(artifact[0]))
        self.device = actor_device(use_gpu)
        self.model = model.to(self.device).eval()
        config = model.config
        self.token_dtype = token_dtype
        self.schema = features_schema(config.global_dim, [config.num_tokens * config.token_dim] * len(config.layers), token_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if len(batch["pixels"]) == 0:  # every image of the batch was rejected
            return self.schema.empty_table()
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            embedding = self.model.embed(pixels)
        rows = len(pixels)
        columns: dict[str, Any] = {name: pa.array(batch[name].tolist(), pa.string()) for name in IDENTITY_COLUMNS}
        columns["model_id"] = pa.array([self.model_id] * rows, pa.string())
        columns["global"] = vector_column(embedding.global_feature.float().cpu().numpy(), self.schema.field("global").type)
        for layer, tokens in enumerate(embedding.tokens):
            name = f"tokens_{layer}"
            columns[name] = vector_column(tokens.float().cpu().numpy(), self.schema.field(name).type)
        columns["embedded_at"] = pa.array([datetime.now(timezone.utc)] * rows, pa.timestamp("us", tz="UTC"))
        return pa.table(columns, schema=self.schema)
