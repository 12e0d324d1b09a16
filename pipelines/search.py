"""`mga search`: faiss shortlist on global features, ATA rerank of the top candidates, rankings table.

The gallery (global features and tokens) is read once by the driver and put in the Ray
object store; the faiss index is built once and shipped serialized. Query blocks stream
through an actor pool: each actor maps the gallery from the object store (zero-copy),
shortlists its queries and reranks the top N with the model's ATA head, scoring all of a
chunk's query-candidate pairs as one batch. Every rerank call has the same shape (the
last chunk is padded), so a query's ranking does not depend on how queries were batched
or how many workers ran.

The rankings are published atomically (pipelines.storage): a search that fails or is
killed leaves the previous rankings as readers saw them; re-running it gives the same rows.
`--index ivf|hnsw` shortlists approximately; the recall@100 of the shortlist against exact
search (on up to 1000 queries) is measured and recorded in the manifest and the summary.
`--use-gpu` and `--gpus-per-actor` work as for `mga embed` (`yes` scales a GPU group up
from zero on an autoscaling cluster); faiss moves the index to the GPUs an actor sees.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from mga.artifact import unpack_artifact
from mga.model import Embedding
from mga.similarity import TOKEN_SIMILARITY_MIN, fuse_similarity
from pipelines.catalog import table_dataset
from pipelines.console import print_summary
from pipelines.embed import actor_gpus, add_gpu_arguments, default_actors, execute, load_artifact
from pipelines.model_store import read_artifact_files
from pipelines.runtime import init_ray
from pipelines.schemas import RANKINGS
from pipelines.storage import discard_snapshot, list_files, new_snapshot, publish, read_manifest, read_table, resolve

INDEX_KINDS = ("exact", "ivf", "hnsw")


def column_matrix(table: pa.Table, name: str, rows_shape: tuple[int, ...] = ()) -> np.ndarray:
    """A fixed_size_list column as a float32 array [rows, *rows_shape or width]."""
    column = table.column(name).combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    width = column.type.list_size
    return flat.reshape(len(column), *(rows_shape or (width,)))


def token_columns(manifest: dict[str, Any]) -> list[str]:
    return [f"tokens_{layer}" for layer in range(len(manifest["layers"]))]


def build_index(vectors: np.ndarray, kind: str, seed: int = 0) -> faiss.Index:
    """Inner-product index on L2-normalised vectors: exact (flat), IVF or HNSW."""
    dim = vectors.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        lists = max(1, min(4096, int(np.sqrt(len(vectors)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)
        index.nprobe = max(1, lists // 8)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"--index must be one of {INDEX_KINDS}, got {kind!r}")
    index.add(vectors)
    return index


def shortlist_recall(index: faiss.Index, gallery: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Recall@k of an approximate index against exact search on the same queries."""
    exact = faiss.IndexFlatIP(gallery.shape[1])
    exact.add(gallery)
    truth = exact.search(queries, k)[1]
    found = index.search(queries, k)[1]
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


class Searcher:
    """Actor: shortlist and rerank blocks of queries against the shared gallery."""

    def __init__(self, gallery: list, index: list, artifact: list, depth: int, rerank_top: int, rerank_chunk: int, threads: int, token_names: list[str], use_gpu: bool = True) -> None:
        self.gallery = ray.get(gallery[0])
        self.index = faiss.deserialize_index(ray.get(index[0]))
        if use_gpu and faiss.get_num_gpus() > 0:
            self.index = faiss.index_cpu_to_all_gpus(self.index)
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model, self.model_id, _ = unpack_artifact(ray.get(artifact[0]))
        self.model = model.to(self.device).eval()
        self.alpha = model.config.alpha
        self.depth, self.rerank_top, self.rerank_chunk = depth, rerank_top, rerank_chunk
        self.token_names = token_names
        self.positives = Counter(self.gallery["items"])
        self.token_shape = (model.config.num_tokens, model.config.token_dim)

    def _embedding(self, global_feature: np.ndarray, tokens: list[np.ndarray]) -> Embedding:
        to_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)  # noqa: E731
        return Embedding(to_tensor(global_feature), [to_tensor(layer) for layer in tokens])

    def token_scores(self, query_global: np.ndarray, query_tokens: list[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """S_token of each query with its first `rerank_top` candidates, [B, N], in fixed-shape chunks."""
        count, top = candidates.shape
        scores = np.empty((count, top), np.float32)
        for start in range(0, count, self.rerank_chunk):
            rows = np.arange(start, start + self.rerank_chunk).clip(max=count - 1)  # pad by repeating the last query
            cand = candidates[rows].reshape(-1)
            queries = self._embedding(query_global[rows], [layer[rows] for layer in query_tokens])
            gallery = self._embedding(self.gallery["global"][cand], [layer[cand] for layer in self.gallery["tokens"]])
            with torch.inference_mode():
                result = self.model.score_candidates(queries, gallery).token_score.float().cpu().numpy()
            valid = min(self.rerank_chunk, count - start)
            scores[start:start + valid] = result[:valid]
        return scores

    def __call__(self, batch: pa.Table) -> pa.Table:
        query_global = column_matrix(batch, "global")
        query_tokens = [column_matrix(batch, name, self.token_shape) for name in self.token_names]
        depth = min(self.depth, len(self.gallery["ids"]))
        _, shortlist = self.index.search(np.ascontiguousarray(query_global), depth)
        found = shortlist >= 0  # approximate indexes may return fewer than `depth`
        shortlist = np.where(found, shortlist, 0)
        # Exact scores, recomputed per pair, and a fixed tie order (gallery position): stable across batchings.
        global_scores = np.einsum("bd,bkd->bk", query_global, self.gallery["global"][shortlist])
        order = np.lexsort((shortlist, -global_scores), axis=-1)
        shortlist, global_scores, found = (np.take_along_axis(a, order, axis=-1) for a in (shortlist, global_scores, found))
        top = min(self.rerank_top, depth)
        token = self.token_scores(query_global, query_tokens, shortlist[:, :top]) if top else np.zeros((len(batch), 0), np.float32)
        query_ids, query_items = batch.column("image_id").to_pylist(), batch.column("item_id").to_pylist()
        columns: dict[str, list] = {name: [] for name in RANKINGS.names}
        for row, (query_id, query_item) in enumerate(zip(query_ids, query_items)):
            kept = found[row]
            head = np.arange(top)[kept[:top]]
            fused_head = fuse_similarity(torch.from_numpy(global_scores[row, head]), torch.from_numpy(token[row, head]), self.alpha).numpy()
            head = head[np.lexsort((head, -fused_head))]  # rerank; ties keep the global order
            tail = np.arange(top, depth)[kept[top:]]
            positions = np.concatenate([head, tail])
            gallery_rows = shortlist[row, positions]
            g = global_scores[row, positions]
            token_row = np.concatenate([token[row, head], np.full(len(tail), np.nan, np.float32)])
            # Beyond the reranked depth the fused score takes S_token at its minimum: a lower bound
            # of what reranking could give, so the tail keeps its global order below the head.
            fused = np.where(np.isnan(token_row), self.alpha * g + (1 - self.alpha) * TOKEN_SIMILARITY_MIN, self.alpha * g + (1 - self.alpha) * token_row)
            count = len(positions)
            columns["query_id"] += [query_id] * count
            columns["rank"] += list(range(1, count + 1))
            columns["gallery_id"] += [self.gallery["ids"][i] for i in gallery_rows]
            columns["score_global"] += g.tolist()
            columns["score_token"] += [None if np.isnan(v) else float(v) for v in token_row]
            columns["score"] += fused.tolist()
            columns["is_match"] += [self.gallery["items"][i] == query_item for i in gallery_rows]
            columns["query_positives"] += [self.positives.get(query_item, 0)] * count
        return pa.table(columns, schema=RANKINGS)


def load_gallery(features, manifest: dict[str, Any]) -> dict[str, Any]:
    names = token_columns(manifest)
    table = read_table(features, columns=["image_id", "item_id", "global", *names], filter=pc.field("split") == "gallery")
    if table.num_rows == 0:
        raise ValueError(f"{features.uri}: no rows with split=gallery to search")
    shape = (manifest["num_tokens"], manifest["token_dim"])
    return {
        "ids": table.column("image_id").to_pylist(),
        "items": table.column("item_id").to_pylist(),
        "global": np.ascontiguousarray(column_matrix(table, "global")),
        "tokens": [np.ascontiguousarray(column_matrix(table, name, shape)) for name in names],
    }


def run(
    features: str,
    out: str,
    depth: int | None = None,
    rerank_top: int = 50,
    index: str = "exact",
    workers: int | None = None,
    query_batch: int = 64,
    rerank_chunk: int = 8,
    model: str | None = None,
    use_gpu: str = "auto",
    gpus_per_actor: float = 1.0,
) -> dict[str, Any]:
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be positive, got {workers}")
    actor_gpus(use_gpu, 0, gpus_per_actor)  # validate before anything runs
    for name, value in (("--rerank-top", rerank_top), ("--query-batch", query_batch), ("--rerank-chunk", rerank_chunk)):
        if value < 0 or (value == 0 and name != "--rerank-top"):
            raise ValueError(f"{name} must be {'non-negative' if name == '--rerank-top' else 'positive'}, got {value}")
    if depth is not None and depth < 1:
        raise ValueError(f"--depth must be positive, got {depth}")
    if index not in INDEX_KINDS:
        raise ValueError(f"--index must be one of {INDEX_KINDS}, got {index!r}")
    started = time.time()
    features_location = resolve(features)
    manifest = read_manifest(features_location)
    model_uri = model or manifest["model"]
    files = read_artifact_files(model_uri)
    _, model_id, model_config = load_artifact(files, resolve(model_uri).uri)
    if model_id != manifest["model_id"]:
        raise ValueError(f"{features_location.uri} was embedded with model_id {manifest['model_id']}, but {model_uri} is {model_id}: re-embed or pass the matching --model")
    gallery = load_gallery(features_location, manifest)
    gallery_size = len(gallery["ids"])
    depth = min(depth or gallery_size, gallery_size)

    init_ray()
    faiss_index = build_index(gallery["global"], index)
    recall = None
    queries_table = read_table(features_location, columns=["global"], filter=pc.field("split") == "query")
    if queries_table.num_rows == 0:
        raise ValueError(f"{features_location.uri}: no rows with split=query to search for")
    if index != "exact":
        sample = column_matrix(queries_table.slice(0, 1000), "global")
        recall = shortlist_recall(faiss_index, gallery["global"], sample, min(100, gallery_size))
    gpus_up = int(ray.cluster_resources().get("GPU", 0))
    gpus = actor_gpus(use_gpu, gpus_up, gpus_per_actor)
    workers = workers or default_actors(gpus, gpus_up)
    threads = max(1, (os.cpu_count() or 1) // workers)
    table = resolve(out)
    snapshot = new_snapshot(table)
    try:
        _search(features_location, manifest, snapshot, gallery, faiss_index, files, depth, rerank_top, workers, threads, gpus, query_batch, rerank_chunk)
        rows = sum(pq.read_metadata(path, filesystem=snapshot.fs).num_rows for path in list_files(snapshot, ".parquet"))
        # Every query once, `depth` rows each (fewer where an approximate index finds fewer).
        if rows > queries_table.num_rows * depth or (index == "exact" and rows != queries_table.num_rows * depth):
            raise RuntimeError(f"search: {rows} rankings rows for {queries_table.num_rows} queries at depth {depth}: not published")
        result = publish(
            table,
            snapshot,
            {
                "table": "rankings",
                "features": features_location.uri,
                "catalog": manifest.get("catalog"),
                "model_id": model_id,
                "alpha": model_config["model"]["alpha"],
                "depth": depth,
                "rerank_top": min(rerank_top, depth),
                "index": index,
                "shortlist_recall_at_100": recall,
                "queries": queries_table.num_rows,
                "gallery": gallery_size,
                "rows": rows,
            },
        )
    except BaseException:
        discard_snapshot(snapshot)
        raise
    print_summary(
        "mga search",
        {
            "read": f"{features_location.uri} ({queries_table.num_rows} queries, {gallery_size} gallery images, model_id {model_id})",
            "shortlist": f"faiss {index}" + (f", recall@100 vs exact {recall:.3f}" if recall is not None else "") + f", depth {depth}",
            "rerank": f"top {min(rerank_top, depth)} per query by ATA (alpha {model_config['model']['alpha']})",
            "wrote": f"{table.uri} (snapshot {result['snapshot']}, {rows} rows)",
            "workers": f"{workers} x " + (f"{gpus:g} GPU" if gpus else "CPU") + f" (--use-gpu {use_gpu}, {gpus_up} GPUs up at start)",
            "wall time": f"{time.time() - started:.1f} s",
        },
    )
    return result


def _search(features_location, manifest, snapshot, gallery, faiss_index, files, depth, rerank_top, workers, threads, gpus, query_batch, rerank_chunk) -> None:
    """Stream the query rows through the Searcher pool into `snapshot` (not yet published)."""

    def job() -> None:
        dataset = table_dataset(features_location, ["image_id", "item_id", "global", *token_columns(manifest)], ("split", ["query"]))
        dataset = dataset.map_batches(
            Searcher,
            fn_constructor_kwargs=dict(
                gallery=[ray.put(gallery)],
                index=[ray.put(faiss.serialize_index(faiss_index))],
                artifact=[ray.put(files)],
                depth=depth,
                rerank_top=rerank_top,
                rerank_chunk=rerank_chunk,
                threads=threads,
                token_names=token_columns(manifest),
                use_gpu=gpus > 0,
            ),
            batch_size=query_batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=gpus,
            num_cpus=1,
        )
        dataset.write_parquet(snapshot.path, filesystem=snapshot.fs)

    execute(job, features_location.uri, snapshot.uri)


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, help="features table URI written by `mga embed`")
    parser.add_argument("--out", required=True, help="rankings table URI to publish")
    parser.add_argument("--depth", type=int, default=None, help="ranked gallery images per query (default: the whole gallery)")
    parser.add_argument("--rerank-top", type=int, default=50, help="candidates per query reranked by ATA")
    parser.add_argument("--index", default="exact", choices=INDEX_KINDS, help="faiss shortlist index")
    parser.add_argument("--workers", type=int, default=None, help="search actors (default: one per GPU, else 1)")
    parser.add_argument("--query-batch", type=int, default=64)
    parser.add_argument("--rerank-chunk", type=int, default=8, help="queries whose candidates are scored in one ATA batch")
    parser.add_argument("--model", default=None, help="model artifact (default: the one the features were embedded with)")
    add_gpu_arguments(parser, "search")


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(
        args.features, args.out, args.depth, args.rerank_top, args.index, args.workers, args.query_batch, args.rerank_chunk, args.model,
        use_gpu=args.use_gpu, gpus_per_actor=args.gpus_per_actor,
    )


def main(argv: list[str] | None = None) -> None:
    from pipelines.cli import module_main

    module_main(__name__, argv)


if __name__ == "__main__":
    main()
