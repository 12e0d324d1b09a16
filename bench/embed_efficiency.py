"""Embedding efficiency: the embed job's images/s divided by the bare model forward's images/s
on the same model, resolution, batch and device, measured in the same run. Target: >= 0.9.

The job's figure is end to end (read the catalog's Delta table, decode, crop, resize, model,
write Parquet, commit the features' Delta version); Ray itself is started before the clock.
The bare forward runs the same model on uint8 tensors already in memory with the same
thread count as one embed actor.
Usage: python bench/embed_efficiency.py [--groups 64] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from bench.common import machine, tiny_model_config, timed, write_random_artifact
from pipelines.synthetic import SynthSpec
from pipelines import embed, synth
from pipelines.runtime import init_ray


def bare_forward_rate(model: torch.nn.Module, image_size: int, batch: int, images: int, threads: int) -> float:
    torch.set_num_threads(threads)
    pixels = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    with torch.inference_mode():
        model.embed(pixels)  # warm-up
        with timed() as elapsed:
            for _ in range(max(1, images // batch)):
                model.embed(pixels)
    return max(1, images // batch) * batch / elapsed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=64, help="synthetic groups (4 items, 10 images each)")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-embed-")
    config, image_size = tiny_model_config()
    model = write_random_artifact(f"{workdir}/model", config, image_size)
    init_ray()
    synth.run(f"{workdir}/catalog", SynthSpec(groups=args.groups, items_per_group=4, train_views=6, gallery_views=2, query_views=2))
    embed.run(f"{workdir}/model", f"{workdir}/catalog", f"{workdir}/warm")  # first run pays Ray's worker start-up
    with timed() as job_time:
        info = embed.run(f"{workdir}/model", f"{workdir}/catalog", f"{workdir}/features", batch_size=args.batch)
    rows = info["embedded"]  # this run's images (info["rows"] counts the table's rows after the commit)
    job_rate = rows / job_time[0]
    threads = max(1, (os.cpu_count() or 1))  # one actor on a CPU machine gets every core
    bare_rate = bare_forward_rate(model, image_size, args.batch, rows, threads)
    print(f"\nmachine: {machine()}")
    print(f"model: {config.backbone} at {image_size}px, batch {args.batch}, {rows} images, {threads} threads")
    print("| measure | images/s |")
    print("|---|---|")
    print(f"| embed job, end to end | {job_rate:.1f} |")
    print(f"| bare model forward | {bare_rate:.1f} |")
    print(f"| ratio (target >= 0.9) | {job_rate / bare_rate:.2f} |")


if __name__ == "__main__":
    main()
