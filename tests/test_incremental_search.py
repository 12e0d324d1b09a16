"""`mga search --incremental` equals a full search from scratch after every kind of change.

One features table (test_search's: clustered random vectors, items of up to 40 images, exact
duplicates) goes through a chain of versions written as `mga embed --incremental` writes them
(new and changed rows in new files, the files that held a changed or deleted row rewritten
without it). After each version the incremental update of the previous rankings must equal
a full search of the same version: the same rows, ranks and ids, scores to float tolerance,
the same positives with the same full-gallery ranks.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines import search
from pipelines.schemas import RANKINGS
from pipelines.storage import resolve, write_parquet
from pipelines.tables import TableWriter, open_table, read_table
from tests.test_changes import copies_without
from tests.test_search import DEPTH, GALLERY, RERANK, write_features
from tests.tiny import write_random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def change(uri: str, drop: list[str], rows: pa.Table | None = None) -> int:
    """A new version of the features table at `uri`: the rows `drop` deleted (their files
    rewritten without them, their lineage recorded) and `rows` written to a new file (new ids,
    or changed rows of dropped ids), as `mga embed --incremental` commits them. Returns the version."""
    table = resolve(uri)
    with TableWriter(table) as writer:
        stored = read_table(writer.base, ["image_id", "__filename"])
        holding = stored.filter(pc.is_in(stored.column("image_id"), value_set=pa.array(drop, pa.string()))).column("__filename")
        remove = pc.unique(holding).to_pylist()
        copies = copies_without(writer, remove, drop)
        if rows is not None:
            write_parquet(writer.file("new.parquet"), rows)
        schema = pq.read_schema(writer.base.files.column("path")[0].as_py(), filesystem=table.fs)
        return writer.commit(schema, writer.base.info, remove=remove, copies=copies).version


def moved(rows: pa.Table, rng: np.random.Generator, ids: list[str] | None = None, prefix: str | None = None) -> pa.Table:
    """`rows` with new global features (a changed image: new sha256, a later embedded_at), or
    as new images `prefix`-N of the same items."""
    count = rows.num_rows
    vectors = rng.normal(size=(count, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    rows = rows.set_column(rows.schema.get_field_index("global"), "global", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 32))
    rows = rows.set_column(rows.schema.get_field_index("sha256"), "sha256", pa.array(["1" * 64] * count))
    rows = rows.set_column(rows.schema.get_field_index("embedded_at"), "embedded_at", pa.array([1] * count, pa.timestamp("us", tz="UTC")))
    if prefix is not None:
        rows = rows.set_column(0, "image_id", pa.array([f"{prefix}-{i:04d}" for i in range(count)]))
    return rows


def sorted_rows(uri: str, companion: str | None = None) -> pa.Table:
    info = open_table(resolve(uri)).info
    table = open_table(resolve(info[companion]["table"]), info[companion]["version"]) if companion else open_table(resolve(uri))
    keys = [("query_id", "ascending"), ("rank", "ascending")] if companion is None else [("query_id", "ascending"), ("gallery_id", "ascending")]
    return read_table(table).sort_by(keys)


def assert_same_search(incremental: str, full: str) -> None:
    first, second = sorted_rows(incremental), sorted_rows(full)
    assert first.num_rows == second.num_rows
    for name in ("query_id", "rank", "gallery_id", "gallery_item_id", "query_item_id", "is_match", "query_positives"):
        assert first.column(name).equals(second.column(name)), name
    for name in ("score_global", "score_token", "score"):
        a, b = (pc.fill_null(table.column(name), -9.0).to_numpy() for table in (first, second))
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    first, second = sorted_rows(incremental, "positives"), sorted_rows(full, "positives")
    for name in ("query_id", "gallery_id", "rank_global", "rank_reranked", "score_global"):
        assert first.column(name).equals(second.column(name)), name


@pytest.fixture(scope="module")
def chain(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    model_id = write_random_model(str(root / "features-model"))
    table = write_features(str(root / "features"), model_id)
    settings = {"depth": DEPTH, "rerank_top": RERANK, "block_rows": 128, "query_chunk": 10}
    first = search.run(str(root / "features"), str(root / "rankings"), **settings)
    return {"root": root, "table": table, "settings": settings, "first": first, "rng": np.random.default_rng(7)}


def step(chain, name: str) -> dict:
    """The incremental update of the chain's rankings, checked against a full search."""
    root, settings = chain["root"], chain["settings"]
    result = search.run(str(root / "features"), str(root / "rankings"), incremental=True, **settings)
    search.run(str(root / "features"), str(root / f"full-{name}"), **settings)
    assert_same_search(str(root / "rankings"), str(root / f"full-{name}"))
    return result


def gallery_rows(chain) -> pa.Table:
    table = read_table(open_table(resolve(str(chain["root"] / "features"))))
    return table.filter(pc.field("split") == "gallery").sort_by("image_id")


def test_new_gallery_rows(chain):
    rows = gallery_rows(chain)
    change(str(chain["root"] / "features"), [], moved(rows.slice(0, 30), chain["rng"], prefix="new"))
    result = step(chain, "new")
    assert result["incremental"]["gallery_added"] == 30 and result["incremental"]["gallery_removed"] == 0
    assert result["gallery"] == GALLERY + 30


def test_changed_gallery_rows(chain):
    rows = gallery_rows(chain).slice(100, 20)
    change(str(chain["root"] / "features"), rows.column("image_id").to_pylist(), moved(rows, chain["rng"]))
    result = step(chain, "changed")
    assert result["incremental"]["gallery_added"] == 20 and result["incremental"]["gallery_removed"] == 20
    # Three chunks of standing queries scan the added and the removed rows; the scanners keep
    # those rows after the first chunk (12 pieces scanned, 4 read; 12 read before they were kept).
    assert result["incremental"]["searched in full"] == 0 and result["gallery_pieces_read"] < result["gallery_pieces_scanned"], result


def test_deleted_gallery_rows_cutting_into_the_stored_depth(chain):
    root = chain["root"]
    rankings = read_table(open_table(resolve(str(root / "rankings"))))
    query = rankings.column("query_id")[0].as_py()
    # Most of one query's list (it cannot be completed: searched in full) and a few heads' members.
    top = rankings.filter((pc.field("query_id") == query) & (pc.field("rank") <= 15)).column("gallery_id").to_pylist()
    heads = rankings.filter(pc.field("rank") == 2).column("gallery_id").to_pylist()[:5]
    # Another query's first 4: more than the rows below its head with a stored S_token, fewer than its reserve.
    other = rankings.column("query_id")[DEPTH].as_py()
    head = rankings.filter((pc.field("query_id") == other) & (pc.field("rank") <= 4)).column("gallery_id").to_pylist()
    drop = sorted(set(top + heads + head))
    change(str(root / "features"), drop)
    result = step(chain, "deleted")
    counts = result["incremental"]
    assert counts["gallery_removed"] == len(drop) and counts["no longer complete"] >= 1 and counts["token scores computed"] >= 2


def test_new_changed_and_deleted_queries(chain):
    root = chain["root"]
    table = read_table(open_table(resolve(str(root / "features"))))
    queries = table.filter(pc.field("split") == "query").sort_by("image_id")
    changed, deleted = queries.slice(0, 2), queries.slice(2, 2)
    new = moved(queries.slice(4, 3), chain["rng"], prefix="newq")
    drop = changed.column("image_id").to_pylist() + deleted.column("image_id").to_pylist()
    change(str(root / "features"), drop, pa.concat_tables([moved(changed, chain["rng"]), new]))
    result = step(chain, "queries")
    counts = result["incremental"]
    assert counts["queries_added"] == 5 and counts["queries_removed"] == 4 and counts["gallery_added"] == counts["gallery_removed"] == 0
    assert result["queries"] == chain["first"]["queries"] + 1


def test_all_at_once_then_nothing(chain, capsys):
    root = chain["root"]
    table = read_table(open_table(resolve(str(root / "features"))))
    gallery = table.filter(pc.field("split") == "gallery").sort_by("image_id")
    queries = table.filter(pc.field("split") == "query").sort_by("image_id")
    changed, deleted = gallery.slice(200, 10), gallery.slice(300, 10)
    drop = changed.column("image_id").to_pylist() + deleted.column("image_id").to_pylist() + queries.slice(0, 1).column("image_id").to_pylist()
    added = [moved(changed, chain["rng"]), moved(gallery.slice(400, 10), chain["rng"], prefix="more"), moved(queries.slice(1, 2), chain["rng"], prefix="moreq")]
    change(str(root / "features"), drop, pa.concat_tables(added))
    before = open_table(resolve(str(root / "rankings"))).version
    result = step(chain, "all")
    assert result["version"] == before + 1
    counts = result["incremental"]
    assert (counts["gallery_added"], counts["gallery_removed"], counts["queries_added"], counts["queries_removed"]) == (20, 20, 2, 1)
    # Nothing changed since: nothing is committed.
    again = search.run(str(root / "features"), str(root / "rankings"), incremental=True, **chain["settings"])
    assert again["committed"] is False and open_table(resolve(str(root / "rankings"))).version == before + 1
    # A new version whose change is outside both selections (a training image): nothing to commit either.
    training = moved(gallery.slice(500, 1), chain["rng"], prefix="train")
    change(str(root / "features"), [], training.set_column(training.schema.get_field_index("split"), "split", pa.array(["train"])))
    again = search.run(str(root / "features"), str(root / "rankings"), incremental=True, **chain["settings"])
    assert again["committed"] is False and open_table(resolve(str(root / "rankings"))).version == before + 1
    # Another precision of ATA than the rankings were made with: a full search, which says why;
    # `auto` then keeps the precision the rankings have, whatever this machine's CPU does.
    other = {"bfloat16": "float32", "float32": "bfloat16"}[again["search"]["rerank_precision"]]
    change(str(root / "features"), [], moved(gallery.slice(501, 1), chain["rng"], prefix="precision"))
    redone = search.run(str(root / "features"), str(root / "rankings"), incremental=True, rerank_precision=other, **chain["settings"])
    assert redone["incremental"] is None and redone["search"]["rerank_precision"] == other
    assert f"a full search: rerank_precision was {again['search']['rerank_precision']!r}" in capsys.readouterr().out
    change(str(root / "features"), [], moved(gallery.slice(502, 1), chain["rng"], prefix="precision"))
    kept = search.run(str(root / "features"), str(root / "rankings"), incremental=True, **chain["settings"])
    assert kept["incremental"]["gallery_added"] == 1 and kept["search"]["rerank_precision"] == other


def _first_chunk_written(rankings: str, job: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the job has written a chunk of its rankings (it has read the table it updates);
    a killed job's files stay behind (never committed), so only new run directories count."""
    deadline = time.time() + timeout
    before = set(glob.glob(os.path.join(rankings, "run-*")))
    while not {os.path.dirname(path) for path in glob.glob(os.path.join(rankings, "run-*", "rankings-*.parquet"))} - before:
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.05)


def test_a_killed_run_leaves_the_rankings_and_a_racing_commit_wins(chain, ray_local):
    """Killed mid-run: the rankings stay at their version, a re-run completes them; racing
    another commit to the same rankings: the later commit fails in one line, nothing of it is seen."""
    root = chain["root"]
    rankings = str(root / "slow")
    search.run(str(root / "features"), rankings, **chain["settings"])
    gallery = gallery_rows(chain)
    change(str(root / "features"), gallery.slice(10, 5).column("image_id").to_pylist(), moved(gallery.slice(20, 5), chain["rng"], prefix="late"))
    before = open_table(resolve(rankings))
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONPATH=REPO)
    # One query a chunk: an update of many chunks, slow enough to be caught mid-run (the chunk
    # size is no setting of the search: the update of a search chunked otherwise).
    command = [sys.executable, "-m", "pipelines.search", "--features", str(root / "features"), "--out", rankings, "--incremental",
               "--depth", str(DEPTH), "--rerank-top", str(RERANK), "--block-rows", "128", "--query-chunk", "1", "--cpus-per-actor", "0.5"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    _first_chunk_written(rankings, job)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    assert open_table(resolve(rankings)).version == before.version
    # Again, and another job commits to the rankings while it runs: it fails, naming the conflict.
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    _first_chunk_written(rankings, job)
    with TableWriter(resolve(rankings)) as writer:
        write_parquet(writer.file("other.parquet"), RANKINGS.empty_table())
        writer.commit(RANKINGS, before.info, remove=[])
    _, stderr = job.communicate(timeout=300)
    assert job.returncode != 0 and stderr.strip().splitlines()[-1].startswith("mga: error: "), stderr
    assert "another job committed version" in stderr.strip().splitlines()[-1]
    assert open_table(resolve(rankings)).version == before.version + 1
    # The re-run completes the update: the same as a full search.
    search.run(str(root / "features"), rankings, incremental=True, **chain["settings"])
    search.run(str(root / "features"), str(root / "full-slow"), **chain["settings"])
    assert_same_search(rankings, str(root / "full-slow"))
