"""The training stream through real Ray Data over a real Delta catalog: whole items in every
P x K batch, wherever their rows are stored; seeded epochs; undecodable images counted."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pipelines import synth
from pipelines.schemas import CATALOG
from pipelines.storage import resolve, write_parquet
from pipelines.stream import EpochBatches, StreamSettings, batch_stream, index_catalog
from pipelines.synthetic import SynthSpec
from pipelines.tables import TableWriter, open_table, read_table

# 8 train items of 3 views (K = 4 draws one view twice).
SPEC = SynthSpec(seed=11, groups=4, items_per_group=4, test_fraction=0.5, train_views=3, gallery_views=1, query_views=1, image_size=48)
P, K, SIZE = 2, 4, 32


@pytest.fixture(scope="module")
def scattered_catalog(ray_local, tmp_path_factory) -> dict:
    """The synthetic catalog's train rows rewritten item-sorted into 3 files of 2-row row
    groups, cut mid-item, so most items span row groups and some span files; one image's
    bytes are corrupt."""
    root = tmp_path_factory.mktemp("stream")
    synth.run(str(root / "source"), SPEC)
    rows = read_table(open_table(resolve(str(root / "source")))).filter(pa.compute.equal(pa.compute.field("split"), "train"))
    rows = rows.sort_by([("item_id", "ascending"), ("image_id", "ascending")])
    images = rows.column("image").to_pylist()
    images[4] = b"not a jpeg"
    rows = rows.set_column(rows.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    uri = str(root / "catalog")
    with TableWriter(resolve(uri)) as writer:
        for number, (start, stop) in enumerate([(0, 7), (7, 16), (16, rows.num_rows)]):
            write_parquet(writer.file(f"part-{number}.parquet"), rows.slice(start, stop - start).cast(CATALOG), row_group_size=2)
        writer.commit(CATALOG, {"table": "catalog"})
    return {"uri": uri, "items": sorted(set(rows.column("item_id").to_pylist()))}


def epochs_of(catalog, settings: StreamSettings, epochs: range, rank: int = 0, world: int = 1) -> dict[int, list[dict]]:
    """Each epoch's batch rows of one rank, read through the stream."""
    stream = EpochBatches(batch_stream(catalog["ref"], settings, epochs, rank, world))
    return {epoch: list(stream.epoch(epoch)) for epoch in epochs}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_batches_hold_whole_items_however_rows_are_stored(scattered_catalog):
    import ray

    catalog = index_catalog(scattered_catalog["uri"])
    assert catalog.items == scattered_catalog["items"] and len(catalog.pieces) > 6
    spanning = [i for i in range(len(catalog.items)) if len(np.unique(catalog.index.piece[catalog.index.item == i])) > 1]
    assert len(spanning) >= 4  # the old stream grouped items inside blocks: these became two groups
    settings = StreamSettings(P, K, SIZE, True, 10**7, window_rows=6, groups_per_batch=0, seed=7)
    scattered = {"ref": ray.put(catalog)}
    epochs = epochs_of(scattered, settings, range(2))
    orders = []
    for rows in epochs.values():
        seen = Counter()
        for row in rows:
            labels = row["labels"][0].reshape(P, K)
            assert (labels == labels[:, :1]).all() and len(set(labels[:, 0])) == P  # P whole items of K images
            assert row["images"][0].shape == (P * K, 3, SIZE, SIZE) and row["images"][0].dtype == np.uint8
            seen.update(labels[:, 0].tolist())
        assert max(seen.values()) == 1 and len(rows) == len(catalog.items) // P  # each item once an epoch
        orders.append([row["labels"][0].tolist() for row in rows])
    assert orders[0] != orders[1]  # a new order every epoch
    # The corrupt image's item has 3 rows for K = 4, so each epoch draws it at least once:
    # replaced by another of its item's images, and counted.
    for rows in epochs.values():
        assert sum(int(row["undecodable"][0]) for row in rows) >= 1
    # Resuming at epoch 1 replays epoch 1's batches (same items, same rows, same pixels).
    again = epochs_of(scattered, settings, range(1, 2))[1]
    assert [row["labels"][0].tolist() for row in again] == orders[1]
    assert all(np.array_equal(a["images"][0], b["images"][0]) for a, b in zip(again, epochs[1]))
    # Two ranks: equal shares of one plan, disjoint items, the remainder counted.
    shares = [epochs_of(scattered, settings, range(1), rank, 2)[0] for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(catalog.items) // P // 2
    assert not set(np.concatenate([r["labels"][0] for r in shares[0]])) & set(np.concatenate([r["labels"][0] for r in shares[1]]))
    assert int(shares[0][0]["unassigned_batches"][0]) == len(catalog.items) // P % 2
