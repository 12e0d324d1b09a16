"""The driver's side of the shortlist scan (pipelines.search.gallery_scan): the blocks' entries as
the actors send them, and their fold into each query's exact top-`depth`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mga.errors import InputError
from mga.shortlist import TopK, at_or_before, kth_of, merge_top_k


def owned_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A tensor of its own: arrays from the object store are read-only views."""
    return torch.from_numpy(np.array(array)).to(device)


@dataclass
class Shortlisted:
    """A query chunk's shortlist in global order: `top` (exact S_global, tie keys, rows as flat
    indices into `ids`/`items`), the gallery's size, and each positive's global rank over the
    whole gallery (0 where the shortlist cannot tell: below an approximate index's list)."""

    top: TopK
    ids: pa.Array
    items: pa.Array
    gallery_rows: int
    rank_global: np.ndarray


def block_entries(found: TopK, ids: pa.Array, items: pa.Array) -> dict[str, Any]:
    """A block's top lists as the driver takes them: its entries before the floor (the finite
    ones), each as query, score, tie key, image id and item, in list order; no padding."""
    query, column = torch.isfinite(found.scores).nonzero(as_tuple=True)
    take = pa.array(found.rows[query, column].cpu().numpy())
    return {"query": query.cpu().numpy(), "scores": found.scores[query, column].cpu().numpy(), "keys": found.keys[query, column].cpu().numpy(),
            "ids": ids.take(take), "items": items.take(take)}


class ShortlistMerge:
    """Driver side of the shortlist scan: folds block results into the chunk's exact top-`depth`.

    An actor sends the entries before its floor: the k-th of what it has scanned, or the k-th of
    the list merged here as it stood when the piece was sent (`floor`), whichever is higher. At
    10^8 gallery images on 16 actors that is ~2,600 entries a query (~11,000 with the actors'
    own floors alone; bench/shortlist_merge.py), most of them after the k-th of the list by the
    time they arrive: those are dropped (a compare: they cannot enter it). The others wait, as
    (query, entry) pairs, until they add up to half the list's size, and are folded in together:
    a fold sorts the whole list with them (0.1 s at 10^4 queries x depth 100, however few they
    are), and the top-k of a union is the same whatever the grouping. Memory stays O(queries x depth)."""

    def __init__(self, num_queries: int, depth: int, num_positives: int) -> None:
        self.num_queries, self.depth = num_queries, depth
        empty = torch.zeros(num_queries, 0)
        self.shortlist = TopK(empty, empty.long(), empty.long())
        self.ids = pa.array([], pa.string())
        self.items = pa.array([], pa.string())
        self.counts = np.zeros(num_positives, dtype=np.int64)
        self.gallery_rows = 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, pa.Array, pa.Array]] = []  # query, score, key, id, item
        self.pending_entries = 0

    def add(self, block: dict[str, Any]) -> None:
        """Take in one block's result (GalleryScanner.shortlist)."""
        self.gallery_rows += int(block["rows"])
        self.counts += block["counts"]
        if not block["rows"]:
            return
        cpu = torch.device("cpu")
        query, scores, keys = (owned_tensor(block[name], cpu) for name in ("query", "scores", "keys"))
        ids, items = block["ids"], block["items"]
        floor = kth_of(self.shortlist, self.depth)
        if floor is not None:
            kept = at_or_before(scores[:, None], keys[:, None], floor[0][query], floor[1][query])[:, 0]
            if not bool(kept.all()):
                index = kept.nonzero().squeeze(1)
                query, scores, keys = query[index], scores[index], keys[index]
                ids, items = ids.take(pa.array(index.numpy())), items.take(pa.array(index.numpy()))
        if not len(query):
            return
        self.pending.append((query, scores, keys, ids, items))
        self.pending_entries += len(query)
        if 2 * self.pending_entries >= self.num_queries * self.depth:
            self._fold()

    def floor(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The merged list's k-th entry a query (score, tie key), for the actors; None until it has k columns."""
        floor = kth_of(self.shortlist, self.depth)
        return None if floor is None else (floor[0].numpy(), floor[1].numpy())

    def _fold(self) -> None:
        if not self.pending:
            return
        query, scores, keys = (torch.cat([part[index] for part in self.pending]) for index in range(3))
        # The entries as a [Q, w] list (w: the most any query has), each query's in arrival order, -inf padding after.
        by_query = torch.sort(query, stable=True).indices
        query = query[by_query]
        per_query = torch.bincount(query, minlength=self.num_queries)
        column = torch.arange(len(query)) - (torch.cumsum(per_query, 0) - per_query)[query]
        width = int(per_query.max())
        found = TopK(torch.full((self.num_queries, width), float("-inf")), torch.full((self.num_queries, width), torch.iinfo(torch.int64).max),
                     torch.zeros((self.num_queries, width), dtype=torch.int64))
        found.scores[query, column], found.keys[query, column] = scores[by_query], keys[by_query]
        found.rows[query, column] = len(self.ids) + by_query
        ids = pa.concat_arrays([self.ids, *(part[3] for part in self.pending)])
        items = pa.concat_arrays([self.items, *(part[4] for part in self.pending)])
        merged = merge_top_k(self.shortlist, found, self.depth)
        # Keep only the ids and items of what survived.
        take = pa.array(merged.rows.reshape(-1).numpy())
        self.ids, self.items = ids.take(take), items.take(take)
        merged.rows = torch.arange(len(self.ids)).reshape(merged.rows.shape)
        self.shortlist, self.pending, self.pending_entries = merged, [], 0

    def result(self, gallery_uri: str, allow_empty: bool = False) -> Shortlisted:
        """The merged shortlist; with `allow_empty`, no rows give empty lists (else an error)."""
        self._fold()
        if not self.gallery_rows and not allow_empty:
            raise InputError(f"{gallery_uri}: no gallery rows to search")
        return Shortlisted(self.shortlist, self.ids, self.items, self.gallery_rows, self.counts + 1)

