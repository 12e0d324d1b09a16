"""The training stream, read through real Ray Data: every batch is P distinct items x K images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelines.synthetic import SynthSpec
from pipelines import synth
from pipelines.catalog import open_catalog, train_item_ids
from pipelines.stream import pk_stream, train_stream

# Items of 3 train views with K = 4: every item needs images drawn with replacement.
SPEC = SynthSpec(seed=11, groups=6, items_per_group=3, test_fraction=0.34, train_views=3, gallery_views=1, query_views=1, image_size=64)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_training_stream_gives_p_items_of_k_images(ray_local, tmp_path):
    catalog = str(tmp_path / "catalog")
    synth.run(catalog, SPEC, images_per_shard=7)  # several shards, so several blocks feed the stream
    snapshot = open_catalog(catalog)
    assert snapshot.version == 0 and snapshot.files.num_rows > 1  # one commit of several files
    items = set(train_item_ids(catalog))
    P, K, size = 3, 4, 48
    stream = train_stream(catalog, images_per_item=K, image_size=size, augment=True, max_pixels=10**7)
    seen: Counter[str] = Counter()
    batches = list(pk_stream(stream, P, K, shuffle_buffer_items=4, rng=np.random.default_rng(0)))
    assert len(batches) == len(items) // P
    for item_ids, images in batches:
        assert len(item_ids) == P == len(set(item_ids)) and set(item_ids) <= items
        assert images.shape == (P * K, 3, size, size) and images.dtype == np.uint8
        seen.update(item_ids)
    # One pass over the stream is one epoch: each item at most once (an item split across
    # blocks would take a slot in two batches; items here fit in one block).
    assert max(seen.values()) == 1
