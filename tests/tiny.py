"""The tiny sizes every test shares: one synthetic catalog spec, one model shape, one train config."""

from __future__ import annotations

import json

from pipelines.synthetic import SynthSpec

# 12 items in 4 groups; 6 train items x 4 views, 6 test items x (2 gallery + 2 query): 48 images, 12 queries.
CATALOG_SPEC = SynthSpec(seed=3, groups=4, items_per_group=3, test_fraction=0.5, train_views=4, gallery_views=2, query_views=2, image_size=64)
QUERIES = 12
MODEL = dict(backbone="tf_efficientnetv2_b0", layers=(3, 4), global_dim=32, token_dim=16, num_tokens=4, heads=2)
# `--set` overrides of the tiny config: the model shape above, small batches, one CPU a worker.
TRAIN = [
    "data.image_size=64",
    "data.items_per_batch=3",
    "data.images_per_item=2",
    "scaling.cpus_per_worker=1",
    # The test catalog has 2 train groups of 3 items: too few for look-alike batches.
    "data.groups_per_batch=0",
    "model.layers=[3,4]",
    "model.global_dim=32",
    "model.token_dim=16",
    "model.num_tokens=4",
    "model.heads=2",
]


def write_random_model(uri: str, seed: int = 0, image_size: int = 64) -> str:
    """A randomly initialised tiny MGA network written as an artifact; returns its model_id."""
    import torch

    from mga.artifact import pack_artifact
    from mga.config import ModelConfig
    from mga.model import MGAModel
    from pipelines.model_store import write_artifact

    torch.manual_seed(seed)
    files = pack_artifact(MGAModel(ModelConfig(**MODEL)), {"image_size": image_size})
    write_artifact(uri, files)
    return json.loads(files["artifact.json"])["model_id"]
