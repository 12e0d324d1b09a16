"""The Arrow schemas of the tables the pipeline publishes (DESIGN.md, "Tables")."""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "query", "gallery", "val")
DOMAINS = ("shop", "consumer")

CATALOG = pa.schema(
    [
        ("image_id", pa.string()),
        ("item_id", pa.string()),
        ("split", pa.string()),
        ("domain", pa.string()),
        ("category", pa.string()),
        ("bbox", pa.list_(pa.int32(), 4)),
        ("image", pa.binary()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_path", pa.string()),
    ]
)

REJECTS = pa.schema([("source_path", pa.string()), ("reason", pa.string())])

# The catalog columns that identify an image and travel into the features table.
IDENTITY_COLUMNS = ("image_id", "item_id", "split", "domain", "category", "sha256")


def features_schema(global_dim: int, token_dims: list[int], token_dtype: pa.DataType = pa.float32()) -> pa.Schema:
    """Features table: identity columns, model_id, `global` [D], `tokens_<l>` [M*d] per layer."""
    fields = [(name, pa.string()) for name in IDENTITY_COLUMNS]
    fields.append(("model_id", pa.string()))
    fields.append(("global", pa.list_(pa.float32(), global_dim)))
    fields += [(f"tokens_{layer}", pa.list_(token_dtype, size)) for layer, size in enumerate(token_dims)]
    fields.append(("embedded_at", pa.timestamp("us", tz="UTC")))
    return pa.schema(fields)


RANKINGS = pa.schema(
    [
        ("query_id", pa.string()),
        ("rank", pa.int32()),
        ("gallery_id", pa.string()),
        ("score_global", pa.float32()),
        ("score_token", pa.float32()),
        ("score", pa.float32()),
        ("is_match", pa.bool_()),
        # |P|: gallery images of the query's item, so mAP needs nothing but this table.
        ("query_positives", pa.int32()),
    ]
)

# Beside the rankings: every gallery image of each query's item with its full-gallery ranks
# (1 + the gallery images before it), so metrics over the whole gallery need no more rows.
POSITIVES = pa.schema(
    [
        ("query_id", pa.string()),
        ("gallery_id", pa.string()),
        ("rank_global", pa.int64()),
        ("rank_reranked", pa.int64()),
    ]
)
