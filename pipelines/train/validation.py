"""Validation during `mga train`: held-out queries and gallery chosen once, R@K / mAP measured on rank 0.

With `run.validate_every = N > 0`, rank 0 measures R@1 and mAP on held-out items every N
epochs and after the last: the catalog's `val` split when it has one, else its
query/gallery splits (the held-out test items: choosing a checkpoint on them is
optimistic, and the epoch line says which one it used). It samples at most
`run.validation_queries` queries and `run.validation_gallery` gallery images (every
positive of those queries, then seeded distractors), ranks the gallery by the global
feature, reranks the top `run.validation_rerank_top` by the fused score S
(`MGAModel.score_candidates`), and computes `mga.metrics.RetrievalMetrics` on both
orderings: `val_R@1`, `val_mAP` (reranked) and `val_global_R@1`, `val_global_mAP`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from mga.metrics import RetrievalMetrics
from mga.model import Embedding, MGAModel
from mga.retrieval import retrieve
from mga.tie_keys import tie_keys
from mga.transforms import preprocess
from pipelines.catalog import open_catalog
from pipelines.tables import read_table


def select_validation(catalog: str, max_queries: int, max_gallery: int, seed: int) -> dict[str, Any] | None:
    """Held-out queries and gallery for validation (ids only, no images), or None if there are none.

    The catalog's `val` split when present: its consumer images query its shop images; if it
    has only consumer images (Consumer-to-Shop prepared with `--val-as gallery`), they query
    the gallery split; if it has only one domain, the first image of each item queries the
    item's other images (one-image items stay as distractors). Without a `val` split, the query/gallery splits (test items).
    Queries without a gallery positive are dropped; at most `max_queries` are sampled
    (seeded), and the gallery holds every positive of those plus seeded distractors up to
    `max_gallery` images.
    """
    snapshot = open_catalog(catalog)
    held_out = ["val", "query", "gallery"]
    table = read_table(snapshot, ["image_id", "item_id", "split", "domain"], pc.field("split").isin(held_out), ("split", held_out))
    rows = sorted(table.to_pylist(), key=lambda row: row["image_id"])
    val = [row for row in rows if row["split"] == "val"]
    if val:
        consumer = [row for row in val if row["domain"] == "consumer"]
        shop = [row for row in val if row["domain"] != "consumer"]
        if consumer and shop:
            queries, gallery, source = consumer, shop, "val split: consumer queries, shop gallery"
        elif consumer:
            queries, gallery = consumer, [row for row in rows if row["split"] == "gallery"]
            source = "val split consumer queries against the gallery split"
        else:
            per_item = Counter(row["item_id"] for row in val)
            first: dict[str, dict] = {}
            for row in val:
                if per_item[row["item_id"]] > 1:  # an item with one image stays a distractor
                    first.setdefault(row["item_id"], row)
            query_ids = {row["image_id"] for row in first.values()}
            queries = list(first.values())
            gallery = [row for row in val if row["image_id"] not in query_ids]
            source = "val split: each item's first image queries its others"
    else:
        queries = [row for row in rows if row["split"] == "query"]
        gallery = [row for row in rows if row["split"] == "gallery"]
        source = "query/gallery splits: held-out test items, no val split (selection on them is optimistic)"
    in_gallery = Counter(row["item_id"] for row in gallery)
    queries = [row for row in queries if in_gallery[row["item_id"]]]
    if not queries:
        return None
    rng = np.random.default_rng([seed, 7])
    if len(queries) > max_queries:
        queries = [queries[i] for i in sorted(rng.choice(len(queries), size=max_queries, replace=False))]
    query_items = {row["item_id"] for row in queries}
    positives = [row for row in gallery if row["item_id"] in query_items]
    others = [row for row in gallery if row["item_id"] not in query_items]
    room = min(max(max_gallery - len(positives), 0), len(others))
    distractors = [others[i] for i in sorted(rng.choice(len(others), size=room, replace=False))] if room else []
    gallery = sorted(positives + distractors, key=lambda row: row["image_id"])
    return {
        "source": source,
        "catalog_version": snapshot.version,
        "queries": [[row["image_id"], row["item_id"]] for row in queries],
        "gallery": [[row["image_id"], row["item_id"]] for row in gallery],
    }


class Validator:
    """R@K / mAP of the current model on the validation selection (runs on rank 0).

    The selected rows' encoded images are read once (a filtered scan of the catalog) and
    kept; they are decoded again at each validation, which keeps memory at the size of
    the JPEGs rather than of decoded pixels.
    """

    def __init__(self, catalog: str, selection: dict[str, Any], image_size: int, max_pixels: int) -> None:
        self.catalog, self.selection = catalog, selection
        self.image_size, self.max_pixels = image_size, max_pixels
        self._images: dict[str, tuple[bytes, Any]] | None = None
        codes: dict[str, int] = {}
        self.query_items = np.array([codes.setdefault(item, len(codes)) for _, item in selection["queries"]])
        self.gallery_items = np.array([codes.setdefault(item, len(codes)) for _, item in selection["gallery"]])

    def _load(self) -> dict[str, tuple[bytes, Any]]:
        if self._images is None:
            rows = self.selection["queries"] + self.selection["gallery"]
            ids = [image_id for image_id, _ in rows]
            # Only the files and row groups holding these items' rows are read (Snapshot.paths, row-group stats).
            snapshot = open_catalog(self.catalog, self.selection.get("catalog_version"))
            table = read_table(snapshot, ["image_id", "image", "bbox"], pc.field("image_id").isin(ids), ("split", ["val", "query", "gallery"]), ("item_id", [item for _, item in rows]), ("image_id", ids))
            self._images = dict(zip(table.column("image_id").to_pylist(), zip(table.column("image").to_pylist(), table.column("bbox").to_pylist())))
            missing = set(ids) - set(self._images)
            if missing:
                raise ValueError(f"{self.catalog}: {len(missing)} validation images vanished from the catalog, e.g. {sorted(missing)[0]}")
        return self._images

    def _embed(self, model: MGAModel, ids: list[str], device: torch.device, autocast, batch_size: int) -> Embedding:
        images = self._load()
        globals_, tokens = [], []
        for start in range(0, len(ids), batch_size):
            pixels = np.stack([preprocess(*images[image_id], self.image_size, None, self.max_pixels) for image_id in ids[start:start + batch_size]])
            with autocast:
                embedding = model.embed(torch.from_numpy(pixels).to(device))
            globals_.append(embedding.global_feature.float())
            tokens.append([layer.float() for layer in embedding.tokens])
        return Embedding(torch.cat(globals_), [torch.cat(layer) for layer in zip(*tokens)])

    @torch.no_grad()
    def __call__(self, model: MGAModel, device: torch.device, autocast, batch_size: int, rerank_top: int, query_block: int = 32) -> dict[str, float]:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            gallery = self._embed(model, [image_id for image_id, _ in self.selection["gallery"]], device, autocast, batch_size)
            queries = self._embed(model, [image_id for image_id, _ in self.selection["queries"]], device, autocast, batch_size)
            keys = torch.from_numpy(tie_keys(image_id for image_id, _ in self.selection["gallery"])).to(device)

            def token_scores(query_rows: torch.Tensor, gallery_rows: torch.Tensor) -> torch.Tensor:
                parts = []
                for start in range(0, len(query_rows), query_block):
                    block, candidates = query_rows[start:start + query_block], gallery_rows[start:start + query_block]
                    with autocast:
                        parts.append(model.score_candidates(queries.index(block), gallery.index(candidates.reshape(-1))).token_score.float())
                return torch.cat(parts)

            # The same rank-then-rerank step as `mga search` (mga.retrieval), over the whole gallery.
            ranking = retrieve(queries.global_feature, gallery.global_feature, keys, len(gallery), rerank_top, model.config.alpha, token_scores)
            items = self.query_items[:, None]
            positives = (self.gallery_items[None, :] == items).sum(axis=1)
            global_metrics, reranked_metrics = RetrievalMetrics(), RetrievalMetrics()
            global_metrics.update(self.gallery_items[ranking.global_rows.cpu().numpy()] == items, positives)
            reranked_metrics.update(self.gallery_items[ranking.rows.cpu().numpy()] == items, positives)
        finally:
            model.train(was_training)
        plain, reranked_result = global_metrics.result(), reranked_metrics.result()
        return {
            "val_R@1": reranked_result["R@1"],
            "val_R@10": reranked_result["R@10"],
            "val_mAP": reranked_result["mAP"],
            "val_global_R@1": plain["R@1"],
            "val_global_R@10": plain["R@10"],
            "val_global_mAP": plain["mAP"],
            "val_queries": reranked_result["queries"],
            "val_gallery": len(gallery),
            "val_s": time.perf_counter() - started,
        }
