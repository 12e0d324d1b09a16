"""Token reads of a search: by byte ranges (pipelines.token_ranges) against decoding row groups, side by side.

One features table written twice with the same rows (bench.search_scale's writer: the paper's
sizes, float16 tokens, random unit vectors, `--row-group-rows` rows a row group): once in the
layout `mga embed` writes (token columns uncompressed, one page a column chunk: read by byte
ranges), once with zstd token columns (what a search must decode row group by row group). The
same `mga search` (CLI defaults: exact, depth 100, rerank 50) runs on each as a fresh process;
the bench prints both walls, the bytes each token scan read against the token columns' size,
and checks that both rankings are the same rows. Target (issue 30): at 1M gallery and 1,000
queries the ranged token scan reads <= 10% of the token columns.

Usage: python -m bench.token_reads [--gallery 1000000] [--queries 1000] [--row-group-rows 4096] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time

import pyarrow.compute as pc

from bench.common import machine, write_random_artifact
from bench.search_scale import PAPER, measure, write_features
from pipelines.model_store import load_model
from pipelines.storage import resolve
from pipelines.tables import open_table, read_table


def summary_line(summary: str, name: str) -> str:
    """The value of line `name` in the search's printed summary."""
    match = re.search(rf"{name}\s+(.*)", summary)
    return match.group(1).strip() if match else f"(no {name} line)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--row-group-rows", type=int, default=4096, help="rows a row group (mga embed writes one a batch)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mga-token-reads-")
    model_uri = f"{workdir}/model"
    write_random_artifact(model_uri, PAPER, 224)
    model_id = load_model(model_uri)[1]
    results = {}
    for layout, ranged in (("byte ranges", True), ("decoded row groups", False)):
        features = f"{workdir}/features-{'ranged' if ranged else 'zstd'}"
        started = time.time()
        write_features(features, model_uri, model_id, args.gallery, queries=args.queries, row_group_rows=args.row_group_rows, ranged=ranged)
        print(f"wrote {args.gallery} gallery + {args.queries} queries ({layout}) in {time.time() - started:.0f} s", flush=True)
        out = f"{workdir}/rankings-{'ranged' if ranged else 'zstd'}"
        figures = measure([sys.executable, "-m", "pipelines.search", "--features", features, "--out", out])
        info = open_table(resolve(out)).info
        results[layout] = (figures, info, out)
        print(f"search ({layout}): {figures['wall']:.1f} s; scans {summary_line(figures['summary'], 'scans')}; "
              f"token reads {summary_line(figures['summary'], 'token reads')}", flush=True)
    order = [("query_id", "ascending"), ("rank", "ascending")]
    ranked = [read_table(open_table(resolve(out)), ["query_id", "rank", "gallery_id", "score"]).sort_by(order) for _, _, out in results.values()]
    same_ids = ranked[0].column("gallery_id").equals(ranked[1].column("gallery_id"))
    score_gap = pc.max(pc.abs(pc.subtract(ranked[0].column("score"), ranked[1].column("score")))).as_py()
    print(f"\n{machine()}\ngallery {args.gallery:,}, queries {args.queries:,}, {args.row_group_rows} rows a row group; same rankings: {same_ids} "
          f"(largest score difference {score_gap:.2e})\n")
    print("| token columns | search wall s | token bytes read | of the token columns | peak PSS, process tree |")
    print("|---|---|---|---|---|")
    for layout, (figures, info, _) in results.items():
        read, total = info["token_bytes_read"], info["token_bytes"]
        print(f"| {layout} | {figures['wall']:.1f} | {read / 2**30:.2f} GiB | {100 * read / max(total, 1):.1f}% of {total / 2**30:.2f} GiB "
              f"| {figures['pss'] / 2**30:.2f} GiB |")
    ranged_wall, decoded_wall = (results[layout][0]["wall"] for layout in ("byte ranges", "decoded row groups"))
    print(f"\nwall ratio, byte ranges / decoded row groups: {ranged_wall / decoded_wall:.2f}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
