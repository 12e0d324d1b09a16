"""`mga search --index ivf|hnsw|ivfpq`: an approximate faiss shortlist instead of the exact scan.

The exact scan (pipelines.search.gallery_scan) reads every gallery feature once per query chunk;
an approximate index is built once and answers each query from a fraction of the gallery.
It is built on the driver from a stream of the gallery's global features, so the driver
holds what the index needs and nothing more:

- `ivf`: IVF-Flat, sqrt(N) lists, nprobe lists/8: the vectors themselves (4 D bytes/image);
- `hnsw`: HNSW-Flat (M 32, efSearch 128): the vectors and a graph;
- `ivfpq`: IVF-PQ with 8-bit codes of up to 64 sub-vectors: 64 bytes/image at D = 512, for
  galleries of 10^7+ whose vectors do not fit a node. Its S_global is the PQ estimate.

plus the gallery ids and items (Arrow arrays) to name what it returns. faiss runs these on
the CPU: its GPU indexes cap k at 2048 and HNSW has no GPU version; the exact scan is the
GPU path. A positive's rank is its place in the returned list, or not ranked below it (a
miss counts as not retrieved), and the shortlist's recall@100 against the exact scan, on
up to 1,000 queries, is recorded in the rankings' commit metadata.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mga.shortlist import TopK, order_by_score
from pipelines.schemas import arrow_tie_keys, column_matrix
from pipelines.search import INDEX_KINDS
from pipelines.search.shortlist_merge import Shortlisted
from pipelines.search.queries import Gallery, QueryChunk

APPROXIMATE = tuple(kind for kind in INDEX_KINDS if kind != "exact")
TRAIN_ROWS = 100_000  # gallery vectors an IVF quantizer is trained on


def new_index(kind: str, dim: int, size: int):
    """An empty faiss index of `kind` for `size` vectors of width `dim` (IVF kinds still to train)."""
    import faiss

    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 80, 128
        return index
    lists = max(1, min(65536, int(np.sqrt(size))))
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    else:
        subvectors = max(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0)
        bits = 8 if size >= 256 * 39 else max(1, int(np.log2(max(2, size // 39))))
        index = faiss.IndexIVFPQ(quantizer, dim, lists, subvectors, bits, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = max(1, lists // 8)
    index.cp.seed = 0
    return index


def build_index(gallery: Gallery, kind: str):
    """(faiss index, gallery ids, gallery items), built from a stream of the gallery's rows."""
    if kind not in APPROXIMATE:
        raise ValueError(f"--index must be exact or one of {APPROXIMATE}, got {kind!r}")
    dataset = gallery.dataset()
    size = dataset.count_rows(filter=gallery.where.expression)
    index, ids, items, pending = None, [], [], []
    for batch in dataset.to_batches(columns=["image_id", "item_id", "global"], filter=gallery.where.expression):
        if batch.num_rows == 0:
            continue
        ids.append(batch.column("image_id"))
        items.append(batch.column("item_id"))
        vectors = np.ascontiguousarray(column_matrix(pa.Table.from_batches([batch]), "global"))
        if index is None:
            index = new_index(kind, vectors.shape[1], size)
        if not index.is_trained:  # IVF: gather a training sample first, then add it
            pending.append(vectors)
            if sum(len(v) for v in pending) < min(size, TRAIN_ROWS):
                continue
            vectors = np.concatenate(pending)
            pending = []
            index.train(vectors)
        index.add(vectors)
    return index, pa.concat_arrays(ids), pa.concat_arrays(items)


def approximate_shortlist(index, ids: pa.Array, items: pa.Array, chunk: QueryChunk, depth: int) -> Shortlisted:
    """The chunk's shortlist from the index, in global order (score, then tie key), and the
    positives' places in it (0 where the index did not return them)."""
    depth = min(depth, index.ntotal)
    scores, found = index.search(chunk.global_features, depth)
    found_rows = np.where(found >= 0, found, 0)
    keys = arrow_tie_keys(ids.take(pa.array(found_rows.reshape(-1)))).reshape(found.shape)
    scores = np.where(found >= 0, scores, np.finfo(np.float32).min).astype(np.float32)  # a short list: padding last
    top = TopK(torch.from_numpy(scores), torch.from_numpy(keys), torch.from_numpy(found_rows.astype(np.int64)))
    top = top.take(order_by_score(top.scores, top.keys))
    flat = pa.array(top.rows.reshape(-1).numpy())
    top.rows = torch.arange(len(flat)).reshape(top.rows.shape)
    listed_ids = ids.take(flat)
    # Where each positive sits in its query's list: join on (query, gallery id).
    count = top.rows.shape[0]
    listed = pa.table({"query": np.repeat(np.arange(count), depth), "gallery_id": listed_ids, "place": np.tile(np.arange(1, depth + 1), count)})
    positives = pa.table({"query": chunk.positives.query, "gallery_id": chunk.positives.gallery_id, "order": np.arange(len(chunk.positives.query))})
    placed = positives.join(listed, ["query", "gallery_id"], join_type="left outer").sort_by("order")
    rank_global = pc.fill_null(placed.column("place"), 0).to_numpy().astype(np.int64)
    return Shortlisted(top, listed_ids, items.take(flat), index.ntotal, rank_global)


def shortlist_recall(approximate: Shortlisted, exact: Shortlisted, k: int = 100) -> float:
    """Share of the exact top-k that the approximate shortlist also returns in its top k."""
    width = min(k, approximate.top.rows.shape[1], exact.top.rows.shape[1])

    def top_ids(shortlisted: Shortlisted) -> np.ndarray:
        rows = shortlisted.top.rows[:, :width].reshape(-1).numpy()
        return shortlisted.ids.take(pa.array(rows)).to_numpy(zero_copy_only=False).reshape(-1, width)

    found, truth = top_ids(approximate), top_ids(exact)
    return float(np.mean([len(set(f) & set(t)) / width for f, t in zip(found, truth)]))
