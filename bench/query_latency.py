"""`mga query` from a cold process: wall time for 1 photo and for 100 photos against a 100k-image gallery.

Goal (issue 26): <= 10 s for 1 photo, <= 30 s for 100, on 2 cores, no Ray cluster. The gallery
is a features table with the paper's sizes (bench.search_scale's writer: D 512, 3 layers x M 8 x
d 128, float16 tokens, random unit vectors; files of 50,000 rows in row groups of 64 rows, as
`mga embed` writes one per batch, or `--row-group-rows`) and a random-init artifact of the paper's config
(EfficientNetV2-S at 224 px: the embedding of the photos is real work) or, with `--tiny`, the
demo's (Lite0 at 128 px, its token sizes). Photos are JPEGs of 640 x 480 drawn with noise and
shapes, so decoding costs what a phone photo's would. Each count runs `--repeats` times as a
fresh `python -m pipelines.query` process; the median is reported, with the time the same
process spends importing (`python -c "import pipelines.query; ..."` of the same modules).

Usage: python -m bench.query_latency [--gallery 100000] [--counts 1,100] [--repeats 3] [--row-group-rows 64] [--tiny] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from bench.common import machine, tiny_model_config, write_random_artifact
from bench.search_scale import PAPER, write_features

IMPORTS = "import pipelines.query, pipelines.embed.embedder, pipelines.search.ranking, pipelines.search.approximate, mga.model"


def photo(rng: np.random.Generator) -> bytes:
    """A 640 x 480 JPEG: noise under a few filled shapes."""
    image = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, 560), rng.integers(0, 400)
        draw.rectangle((x, y, x + rng.integers(20, 80), y + rng.integers(20, 80)), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with {done.returncode}: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--counts", default="1,100", help="comma-separated numbers of photos")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row-group-rows", type=int, default=64, help="rows a Parquet row group of the gallery holds (0: one per file)")
    parser.add_argument("--tiny", action="store_true", help="the demo's model (Lite0, 128 px) instead of the paper's")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-query-latency-")
    config, size = tiny_model_config() if args.tiny else (PAPER, 224)
    model_uri = f"{workdir}/model"
    write_random_artifact(model_uri, config, size)
    from pipelines.model_store import read_artifact_files

    model_id = json.loads(read_artifact_files(model_uri)["artifact.json"])["model_id"]
    features = f"{workdir}/features"
    write_features(features, model_uri, model_id, args.gallery, queries=0, config=config, row_group_rows=args.row_group_rows or None)
    rng = np.random.default_rng(0)
    counts = [int(count) for count in args.counts.split(",")]
    paths = []
    for number in range(max(counts)):
        path = f"{workdir}/photo-{number:04d}.jpg"
        with open(path, "wb") as handle:
            handle.write(photo(rng))
        paths.append(path)
    imports = statistics.median(timed([sys.executable, "-c", IMPORTS]) for _ in range(args.repeats))
    rows = []
    for count in counts:
        command = [sys.executable, "-m", "pipelines.query", *paths[:count], "--features", features, "--top", "10"]
        walls = [timed(command) for _ in range(args.repeats)]
        rows.append((count, statistics.median(walls), walls))
        print(f"{count} photos: {walls}", flush=True)
    print(f"\nmachine: {machine()}")
    print(f"gallery {args.gallery:,} images in row groups of {args.row_group_rows or 'a file'} rows, model {config.backbone} at {size} px (D {config.global_dim}, "
          f"{len(config.layers)} layers x M {config.num_tokens} x d {config.token_dim}, float16 tokens); imports alone {imports:.1f} s")
    print("| photos | wall s, median of %d cold processes | runs |" % args.repeats)
    print("|---|---|---|")
    for count, median, walls in rows:
        print(f"| {count} | {median:.1f} | {', '.join(f'{w:.1f}' for w in walls)} |")


if __name__ == "__main__":
    main()
