"""`mga search` + `mga evaluate` against a brute-force full-gallery computation.

A features table of random clustered vectors (several files, exact duplicates for score
ties, items with more positives than the depth) and a random tiny model: the bounded
rankings must be the first `depth` rows of the brute-force ranking, and the metrics from
the positives table must equal R@K/mAP computed from the full queries x gallery ranking.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from mga.errors import InputError
from mga.global_scores import pair_scores
from mga.metrics import RetrievalMetrics
from mga.tie_keys import tie_keys
from pipelines import cli, evaluate, search
from pipelines.model_store import load_model
from pipelines.nodes import every_node_multiplies_bf16
from pipelines.resources import cpu_multiplies_bf16
from pipelines.schemas import POSITIVES, RANKINGS, features_schema
from pipelines.search.gallery_scan import GalleryRows, KeptGallery
from pipelines.search.ranking import token_piece_rows
from pipelines.storage import resolve, write_parquet
from pipelines.token_ranges import parquet_options
from pipelines.tables import TableWriter, companion, open_table, read_table
from tests.tiny import write_random_model

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

GALLERY, QUERIES, DEPTH, RERANK = 600, 24, 20, 6
CATEGORIES = ("dress", "skirt", "coat")  # one per data file: a filter on category skips files


def write_features(uri: str, model_id: str, seed: int = 0, ranged: bool = True) -> pa.Table:
    """Random features in three files; items of 1-40 images; ten gallery duplicates. Returns all rows.
    `ranged`: the token columns in the layout embed writes (read by byte ranges), else zstd like the other columns."""
    rng = np.random.default_rng(seed)
    count = GALLERY + QUERIES
    centres = rng.normal(size=(6, 32))
    vectors = centres[rng.integers(0, 6, count)] + 0.4 * rng.normal(size=(count, 32))
    vectors[GALLERY - 10:GALLERY] = vectors[:10]  # exact duplicates: ties in S_global
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    tokens = rng.normal(size=(count, 2, 4, 16)).astype(np.float32)
    # Item sizes: item-000 has 40 gallery images (positives far below the depth), the rest 1-5.
    items = np.concatenate([np.zeros(40, int), 1 + np.arange(GALLERY - 40) // 4])
    query_items = np.concatenate([[0, 0], rng.integers(1, items.max() + 1, QUERIES - 3), [10_000]])  # the last has no positive
    columns = {
        "image_id": [f"img-{i:05d}" for i in range(count)],
        "item_id": [f"item-{i:05d}" for i in np.concatenate([items, query_items])],
        "split": ["gallery"] * GALLERY + ["query"] * QUERIES,
        "domain": ["shop"] * count,
        "category": ["dress"] * count,
        "sha256": ["0" * 64] * count,
        "model_id": [model_id] * count,
        "global": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 32),
        "tokens_0": pa.FixedSizeListArray.from_arrays(pa.array(tokens[:, 0].reshape(-1)), 64),
        "tokens_1": pa.FixedSizeListArray.from_arrays(pa.array(tokens[:, 1].reshape(-1)), 64),
        "embedded_at": pa.array([0] * count, pa.timestamp("us", tz="UTC")),
    }
    table = pa.table(columns, schema=features_schema(32, [64, 64]))
    shuffled = table.take(pa.array(rng.permutation(count)))  # a query's positives spread over files
    shuffled = shuffled.set_column(shuffled.schema.get_field_index("category"), "category", pa.array(np.array(CATEGORIES).repeat(250)[:count]))
    with TableWriter(resolve(uri)) as writer:
        for part, start in enumerate(range(0, count, 250)):
            write_parquet(writer.file(f"part-{part}.parquet"), shuffled.slice(start, 250), **(parquet_options(table.schema) if ranged else {}))
        written = writer.commit(table.schema, {"table": "features", "model_id": model_id, "model": uri + "-model", "global_dim": 32,
                                               "num_tokens": 4, "token_dim": 16, "layers": [3, 4], "token_dtype": "float32"})
    assert written.files.num_rows == 3 and written.rows == count
    return shuffled


def rows(uri: str) -> pa.Table:
    """The current version of the table at `uri`."""
    return read_table(open_table(resolve(uri)))


def positives_of(uri: str) -> pa.Table:
    """The positives table the rankings at `uri` name in their commit metadata, at the version named."""
    pointer = open_table(resolve(uri)).info["positives"]
    assert pointer["table"] == companion(resolve(uri), "positives").uri
    return read_table(open_table(resolve(pointer["table"]), pointer["version"]))


def brute_force(table: pa.Table, model_uri: str) -> dict:
    """Full ranking per query (global order, head reranked by the model's ATA): rows and match matrix."""
    model, _, _ = load_model(model_uri)
    gallery = table.filter(pc.field("split") == "gallery")
    queries = table.filter(pc.field("split") == "query").sort_by("image_id")
    vectors = lambda t: torch.from_numpy(t.column("global").combine_chunks().flatten().to_numpy().reshape(-1, 32).copy())  # noqa: E731
    tokens = lambda t, rows: [torch.from_numpy(t.column(f"tokens_{l}").combine_chunks().flatten().to_numpy().reshape(-1, 4, 16)[rows].copy()) for l in (0, 1)]  # noqa: E731,E741
    gallery_ids = np.array(gallery.column("image_id").to_pylist())
    keys = tie_keys(gallery_ids)
    g, q = vectors(gallery), vectors(queries)
    gallery_items = np.array(gallery.column("item_id").to_pylist())
    query_items = np.array(queries.column("item_id").to_pylist())
    ranked, global_order = [], []
    for index in range(len(q)):
        scores = pair_scores(q[index].expand_as(g), g).numpy()
        order = np.lexsort((keys, -scores))
        head = order[:RERANK]
        with torch.inference_mode():
            token = model.align_tokens([t.expand(RERANK, -1, -1) for t in tokens(queries, [index])], tokens(gallery, head)).numpy()
        fused = model.config.alpha * scores[head] + (1 - model.config.alpha) * token
        ranked.append(np.concatenate([head[np.argsort(-fused, kind="stable")], order[RERANK:]]))
        global_order.append(order)
    return {
        "query_ids": queries.column("image_id").to_pylist(),
        "ranked_ids": gallery_ids[np.array(ranked)],
        "matches": {"reranked": gallery_items[np.array(ranked)] == query_items[:, None], "global": gallery_items[np.array(global_order)] == query_items[:, None]},
    }


@pytest.fixture(scope="module")
def searched(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model_uri = str(root / "features-model")
    model_id = write_random_model(model_uri)
    table = write_features(str(root / "features"), model_id)
    result = search.run(str(root / "features"), str(root / "rankings"), depth=DEPTH, rerank_top=RERANK, block_rows=128, query_chunk=12, rerank_precision="float32")
    return {"root": root, "model": model_uri, "result": result, "truth": brute_force(table, model_uri)}


def test_rankings_are_the_first_rows_of_the_full_ranking(searched):
    truth, result = searched["truth"], searched["result"]
    rankings = rows(str(searched["root"] / "rankings")).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    assert result["rows"] == rankings.num_rows == QUERIES * DEPTH and result["depth"] == DEPTH and result["gallery"] == GALLERY
    assert result["version"] == 0 and result["positives"]["version"] == 0 and result["positives_rows"] == positives_of(str(searched["root"] / "rankings")).num_rows
    ids = np.array(rankings.column("gallery_id").to_pylist()).reshape(QUERIES, DEPTH)
    assert np.array_equal(ids, truth["ranked_ids"][:, :DEPTH])
    scored = np.array(rankings.column("score_token").is_valid()).reshape(QUERIES, DEPTH)
    assert scored[:, :RERANK].all() and not scored[:, RERANK:].any()


def test_metrics_over_the_whole_gallery_equal_brute_force(searched, tmp_path):
    truth = searched["truth"]
    metrics = evaluate.run(str(searched["root"] / "rankings"), str(tmp_path / "report"), gallery_examples=2)
    assert metrics["depth"] == "gallery" and metrics["excluded_queries"] == 1 and metrics["queries"] == QUERIES - 1
    for ordering in ("global", "reranked"):
        full = truth["matches"][ordering]
        reference = RetrievalMetrics()
        reference.update(full, full.sum(1))
        expected = {name: value for name, value in reference.result().items() if name.startswith("R@") or name == "mAP"}
        assert metrics[ordering] == pytest.approx(expected), ordering
    # Some positives lie beyond the depth (item-000 has 40): the rankings alone could not give this mAP.
    positives = positives_of(str(searched["root"] / "rankings"))
    assert pc.max(positives.column("rank_global")).as_py() > DEPTH
    # An evaluation depth cuts: positives below it count as not retrieved.
    cut = evaluate.run(str(searched["root"] / "rankings"), str(tmp_path / "cut"), depth=5, gallery_examples=0)
    reference = RetrievalMetrics((1, 5))
    reference.update(truth["matches"]["reranked"][:, :5], truth["matches"]["reranked"].sum(1))
    assert cut["reranked"]["mAP"] == pytest.approx(reference.result()["mAP"]) and cut["depth"] == 5


def test_a_query_split_across_files_and_any_blocking_give_the_same_answer(searched, tmp_path):
    root = searched["root"]
    # Another blocking, chunking and pool: the same rankings and positives.
    again = search.run(str(root / "features"), str(tmp_path / "again"), depth=DEPTH, rerank_top=RERANK, block_rows=1000, query_chunk=100, workers=2,
                       rerank_precision="float32")
    # The same features with compressed token columns (read by decoding row groups, not by ranges).
    write_features(str(tmp_path / "compressed"), searched["result"]["model_id"], ranged=False)
    decoded = search.run(str(tmp_path / "compressed"), str(tmp_path / "decoded"), depth=DEPTH, rerank_top=RERANK, block_rows=128, query_chunk=12,
                         model=searched["model"], rerank_precision="float32")
    # Summed over the query chunks (each scans for its own candidates); decoding reads whole row groups each time.
    # (Rows of 256 bytes, most candidates within 4 KB of another: ranges save little here; bench/token_reads.py measures it at scale.)
    assert 0 < searched["result"]["token_bytes_read"] < 0.7 * decoded["token_bytes_read"]
    # Two chunks of queries: the gallery rows the scanners read for the first are kept for the
    # second (only a piece another actor took first is read again); one chunk keeps nothing.
    pieces = again["gallery_pieces_scanned"]
    assert again["gallery_pieces_read"] == pieces
    assert searched["result"]["gallery_pieces_scanned"] == 2 * pieces and pieces <= searched["result"]["gallery_pieces_read"] < 2 * pieces
    order = [("query_id", "ascending"), ("gallery_id", "ascending")]
    assert rows(str(root / "rankings")).sort_by(order).equals(rows(str(tmp_path / "decoded")).sort_by(order))
    for read in (rows, positives_of):
        first = read(str(root / "rankings")).sort_by(order)
        second = read(str(tmp_path / "again")).sort_by(order)
        assert first.equals(second), read.__name__
    assert again["rows"] == searched["result"]["rows"]
    # The same rows with every query's rows split over two files (by rank): the same metrics.
    table = resolve(str(root / "rankings"))
    ranked, info = rows(table.uri), open_table(table).info
    split = resolve(str(tmp_path / "split"))
    with TableWriter(companion(split, "positives")) as writer:
        write_parquet(writer.file("p.parquet"), positives_of(table.uri))
        positives = writer.commit(POSITIVES, {"table": "positives", "of": split.uri, "rows": info["positives_rows"]})
    with TableWriter(split) as writer:
        write_parquet(writer.file("top.parquet"), ranked.filter(pc.field("rank") <= 3))
        write_parquet(writer.file("rest.parquet"), ranked.filter(pc.field("rank") > 3))
        writer.commit(RANKINGS, {**info, "positives": {"table": positives.uri, "version": positives.version}})
    one = evaluate.run(table.uri, str(tmp_path / "one"), gallery_examples=0)
    two = evaluate.run(split.uri, str(tmp_path / "two"), gallery_examples=0)
    assert open_table(split).files.num_rows == 2
    assert one["global"] == two["global"] and one["reranked"] == two["reranked"]
    assert json.loads(resolve(str(tmp_path / "two")).join("metrics.json").read_bytes())["queries"] == QUERIES - 1


def test_a_bfloat16_rerank_keeps_the_shortlist_and_moves_s_token_by_little(searched, tmp_path):
    # bfloat16 is `auto`'s choice on CPUs with bfloat16 dot products; the float32 search is the reference.
    result = search.run(str(searched["root"] / "features"), str(tmp_path / "bf16"), depth=DEPTH, rerank_top=RERANK, block_rows=1000, query_chunk=100,
                        rerank_precision="bfloat16")
    assert result["search"]["rerank_precision"] == "bfloat16" and searched["result"]["search"]["rerank_precision"] == "float32"
    assert every_node_multiplies_bf16() == cpu_multiplies_bf16()  # what `auto` asks a cluster: here one node, this machine
    key = [("query_id", "ascending"), ("gallery_id", "ascending")]
    bf16, fp32 = (rows(uri).sort_by(key) for uri in (str(tmp_path / "bf16"), str(searched["root"] / "rankings")))
    for column in ("query_id", "gallery_id", "score_global"):
        assert bf16.column(column).equals(fp32.column(column)), column  # the same shortlist, to its depth
    token = np.array(bf16.column("score_token").to_pylist(), dtype=float), np.array(fp32.column("score_token").to_pylist(), dtype=float)
    assert np.array_equal(np.isnan(token[0]), np.isnan(token[1])) and 0 < np.nanmax(np.abs(token[0] - token[1])) < 0.01
    ranks = np.array(bf16.column("rank").to_pylist()), np.array(fp32.column("rank").to_pylist())
    assert np.array_equal(ranks[0][ranks[0] > RERANK], ranks[1][ranks[1] > RERANK])  # only the reranked head may reorder


def test_unlabelled_queries_from_another_table_against_a_filtered_gallery(searched, tmp_path):
    """A retailer's uploads: a queries table of its own (same model), a third of it unlabelled,
    against the gallery rows of two categories; every result as brute force finds it, the
    unlabelled queries ranked but never scored."""
    root = searched["root"]
    features = rows(str(root / "features"))
    queries = features.filter(pc.field("split") == "query").sort_by("image_id")
    unlabelled = set(queries.column("image_id").to_pylist()[::3])
    items = [None if image in unlabelled else item for image, item in zip(queries.column("image_id").to_pylist(), queries.column("item_id").to_pylist())]
    queries = queries.set_column(queries.schema.get_field_index("item_id"), "item_id", pa.array(items, pa.string()))
    info = open_table(resolve(str(root / "features"))).info
    uploads = resolve(str(tmp_path / "uploads"))
    with TableWriter(uploads) as writer:
        write_parquet(writer.file("part-0.parquet"), queries)
        writer.commit(queries.schema, info)

    where = "category IN ('dress', 'skirt') AND split = 'gallery'"
    result = search.run(str(root / "features"), str(tmp_path / "rankings"), depth=DEPTH, rerank_top=RERANK, block_rows=100, query_chunk=10,
                        queries=uploads.uri, gallery_where=where, rerank_precision="float32")
    gallery = features.filter((pc.field("split") == "gallery") & pc.field("category").isin(["dress", "skirt"]))
    truth = brute_force(pa.concat_tables([gallery, queries]), searched["model"])
    assert result["gallery"] == gallery.num_rows < GALLERY and result["queries"] == QUERIES and result["unlabelled_queries"] == len(unlabelled) == 8
    assert (result["queries_table"], result["queries_where"], result["gallery_where"]) == (uploads.uri, "split = 'query'", where)

    ranked = rows(str(tmp_path / "rankings")).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    assert np.array_equal(np.array(ranked.column("gallery_id").to_pylist()).reshape(QUERIES, DEPTH), truth["ranked_ids"][:, :DEPTH])
    item_of = dict(zip(features.column("image_id").to_pylist(), features.column("item_id").to_pylist()))
    assert ranked.column("gallery_item_id").to_pylist() == [item_of[g] for g in ranked.column("gallery_id").to_pylist()]
    is_unlabelled = np.array([query in unlabelled for query in ranked.column("query_id").to_pylist()])
    for column in ("query_item_id", "is_match", "query_positives"):
        assert np.array_equal(np.asarray(ranked.column(column).is_null()), is_unlabelled), column
    matches = truth["matches"]["reranked"][:, :DEPTH].reshape(-1)
    assert np.array_equal(np.array(ranked.column("is_match").to_pylist(), dtype=object)[~is_unlabelled], matches[~is_unlabelled])
    assert not set(positives_of(str(tmp_path / "rankings")).column("query_id").to_pylist()) & unlabelled

    # Metrics over the labelled queries only, the unlabelled counted.
    metrics = evaluate.run(str(tmp_path / "rankings"), str(tmp_path / "report"), gallery_examples=2)
    labelled = np.array([query not in unlabelled for query in truth["query_ids"]])
    assert metrics["unlabelled_queries"] == 8 and metrics["queries"] + metrics["excluded_queries"] == QUERIES - 8
    for ordering in ("global", "reranked"):
        full = truth["matches"][ordering][labelled]
        reference = RetrievalMetrics()
        reference.update(full, full.sum(1))
        assert metrics[ordering] == pytest.approx({k: v for k, v in reference.result().items() if k.startswith("R@") or k == "mAP"}), ordering


def test_wrong_queries_and_filters_are_refused_before_any_work(searched, tmp_path, capsys):
    root = searched["root"]
    queries = rows(str(root / "features")).filter(pc.field("split") == "query")
    other = resolve(str(tmp_path / "other-model"))
    with TableWriter(other) as writer:
        write_parquet(writer.file("part-0.parquet"), queries)
        writer.commit(queries.schema, {**open_table(resolve(str(root / "features"))).info, "model_id": "0123456789abcdef"})
    out = str(tmp_path / "rankings")
    with pytest.raises(InputError, match="embedded with model_id 0123456789abcdef, the gallery .* with .*: embed both with one model"):
        search.run(str(root / "features"), out, queries=other.uri)
    with pytest.raises(InputError, match="no row matches --queries-where \"split = 'query' AND domain = 'consumer'\""):
        search.run(str(root / "features"), out, queries_where="split = 'query' AND domain = 'consumer'")
    # As the command line tells them: one line, exit code 2, nothing written.
    with pytest.raises(SystemExit) as exit:
        cli.main(["search", "--features", str(root / "features"), "--out", out, "--gallery-where", "colour = 'red'"])
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "mga: error: --gallery-where \"colour = 'red'\": unknown column 'colour': a filter takes image_id, item_id, split, domain, category, sha256"
    ]
    assert not os.path.exists(out)


def test_queries_are_read_a_few_row_groups_ahead_of_the_chunk_not_the_whole_table(tmp_path):
    """The driver holds one chunk: a slow consumer of QuerySource.chunks must not find the rest of the
    table decoded behind it (Arrow's threaded scan read all of it ahead, whatever its readahead)."""
    import time

    from pipelines.filters import parse_filter
    from pipelines.search.queries import QuerySource

    count, width = 40_000, 512
    rng = np.random.default_rng(0)
    table = pa.table({
        "image_id": [f"q-{i:05d}" for i in range(count)], "item_id": pa.nulls(count, pa.string()), "split": ["query"] * count,
        "domain": ["shop"] * count, "category": ["dress"] * count, "sha256": ["0" * 64] * count, "model_id": ["m"] * count,
        "global": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(count * width, np.float32)), width),
        "tokens_0": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(count * 8, np.float32)), 8),
        "embedded_at": pa.array([0] * count, pa.timestamp("us", tz="UTC")),
    }, schema=features_schema(width, [8]))
    with TableWriter(resolve(str(tmp_path / "queries"))) as writer:
        write_parquet(writer.file("part-0.parquet"), table, row_group_size=64)  # as embed writes: one file, 64-row row groups
        snapshot = writer.commit(table.schema, {"table": "features", "model_id": "m", "model": "unused", "global_dim": width,
                                                "num_tokens": 2, "token_dim": 4, "layers": [4], "token_dtype": "float32"})
    source = QuerySource(snapshot, parse_filter("TRUE", "--queries-where"))
    decoded = count * width * 4  # the global column alone: 80 MB
    baseline, held, seen = pa.total_allocated_bytes(), 0, 0
    for chunk in source.chunks(1000, None):
        if not seen:
            time.sleep(1.0)  # a chunk being searched: time for a scan to run ahead
        held = max(held, pa.total_allocated_bytes() - baseline)
        seen += len(chunk)
    assert seen == count
    assert held < 0.5 * decoded, f"{held / 2**20:.0f} MiB decoded ahead of 1,000-query chunks of a {decoded / 2**20:.0f} MiB table"


def test_kept_gallery_rows_read_back_equal_within_the_budget_and_leave_no_file():
    """Between query chunks a scanner keeps the global features it read in a file of its own,
    unlinked from the start: the same values come back, the budget holds, and nothing is left
    on the node's disk when the process ends, however it ends."""
    rows = GalleryRows(pa.array(["a", "b", "c"]), pa.array(["i", None, "k"]), torch.tensor([1, 2, 3]), torch.randn(3, 4))
    kept = KeptGallery(budget=2 * rows.features.numel() * 4)  # two pieces of these rows
    for group in range(3):
        kept.add(("part-0.parquet", (group,)), rows)
    back = kept.get(("part-0.parquet", (1,)))
    assert torch.equal(back.features, rows.features) and back.features.numpy().flags.writeable
    assert back.ids.equals(rows.ids) and back.items.equals(rows.items) and torch.equal(back.keys, rows.keys)
    assert kept.get(("part-0.parquet", (2,))) is None and kept.get(("part-1.parquet", (0,))) is None  # over the budget; never read
    assert os.readlink(f"/proc/self/fd/{kept.file.fileno()}").endswith("(deleted)")
    # What stays in memory holds none of the features' storage.
    assert all(kept_rows.features.untyped_storage().nbytes() == 0 for kept_rows, _ in kept.pieces.values())


def test_token_scan_pieces_are_finer_than_the_shortlists_unless_their_pairs_are_sparse():
    """A quarter of a shortlist piece where pairs are dense (250k x 10^4 on a CPU: ~16k pairs a
    piece); enough rows for four full ATA calls where they are sparse, never past a shortlist
    piece (10^8 x 10^4 on GPUs: 4,096 pairs a call), never under a row group's 4,096 rows."""
    assert token_piece_rows(32500, 500_000, 260_000, 128) == 8125
    assert token_piece_rows(32500, 5_394, 260_000, 128) == -(-4 * 128 * 260_000 // 5_394)  # an incremental run's few pairs
    assert token_piece_rows(65536, 500_000, 10**8, 4096) == 65536
    assert token_piece_rows(4096, 10, 1_000, 128) == 4096
