"""Training overhead: Ray Train steps/s with one worker divided by a plain single-process
PyTorch loop's steps/s on the same model, batch and thread count. Target: >= 0.85.

The Ray figure is the last epoch of a real `mga train` run (streamed P x K batches decoded
by Ray Data beside the worker); the plain loop repeats one batch of decoded images, so it
is the ceiling a training step can reach. Both figures come from the same run.
Usage: python bench/train_overhead.py [--groups 64] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from bench.common import machine, timed
from mga.model import MGAModel
from mga.objective import MGAObjective
from pipelines.synthetic import SynthSpec
from pipelines import synth, train
from pipelines.stream import index_catalog
from pipelines.config import load_config
from pipelines.runtime import init_ray


def plain_loop_rate(config, num_classes: int, steps: int) -> float:
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    torch.manual_seed(0)
    objective = MGAObjective(MGAModel(config.model), num_classes, config.loss)
    optimizer = torch.optim.Adam(objective.parameters(), lr=config.optim.lr)
    batch = config.data.items_per_batch * config.data.images_per_item
    size = config.data.image_size
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.arange(config.data.items_per_batch).repeat_interleave(config.data.images_per_item)

    def step() -> None:
        parts = objective(pixels, labels)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()

    step()  # warm-up
    with timed() as elapsed:
        for _ in range(steps):
            step()
    return steps / elapsed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-train-")
    init_ray()
    synth.run(f"{workdir}/catalog", SynthSpec(groups=args.groups, items_per_group=4, train_views=8, gallery_views=1, query_views=1))
    config = load_config(
        "tiny",
        [f"optim.epochs={args.epochs}", "scaling.num_workers=1"],
        extra={"data": {"catalog": f"{workdir}/catalog"}, "run": {"output": f"{workdir}/model", "storage_path": f"{workdir}/runs", "name": "bench"}},
    )
    result = train.run(config)
    metrics = result["metrics"]
    ray_rate = metrics["steps"] / metrics["epoch_s"]
    compute_rate = metrics["steps"] / max(metrics["epoch_s"] - metrics["data_wait_s"], 1e-9)
    plain_rate = plain_loop_rate(config, num_classes=len(index_catalog(config.data.catalog).items), steps=max(5, int(metrics["steps"])))
    print(f"\nmachine: {machine()}")
    print(f"model: {config.model.backbone} {config.data.image_size}px, batch {config.data.items_per_batch}x{config.data.images_per_item}, "
          f"{int(config.scaling.cpus_per_worker)} threads; last of {args.epochs} epochs, {int(metrics['steps'])} steps")
    print("| measure | steps/s |")
    print("|---|---|")
    print(f"| Ray Train, 1 worker, streamed data | {ray_rate:.3f} |")
    print(f"| Ray Train, time not waiting for data | {compute_rate:.3f} |")
    print(f"| plain PyTorch loop | {plain_rate:.3f} |")
    print(f"| ratio (target >= 0.85) | {ray_rate / plain_rate:.2f} |")
    print(f"| ratio without data waits | {compute_rate / plain_rate:.2f} |")


if __name__ == "__main__":
    main()
