"""Memory: the embed job's peak memory at N and at 4N catalog images. Target: <= 1.2x.

Each run is a fresh process (its own local Ray); memory is the peak, sampled every 0.2 s,
of the proportional set size (PSS: shared object-store pages counted once) summed over
the whole process tree: driver, raylet, GCS, workers and actors.
Usage: python bench/embed_memory.py [--groups 24]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time


from bench.common import machine, tree_pss, tiny_model_config, write_random_artifact
from pipelines.synthetic import SynthSpec
from pipelines import synth
from pipelines.runtime import init_ray


def peak_memory_of(command: list[str]) -> tuple[int, float]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    started = time.time()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_pss(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    stop.set()
    sampler.join()
    if code:
        raise RuntimeError(f"{command} exited with {code}")
    return peak, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=24, help="groups of the N-image catalog (4N uses 4x)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-memory-")
    config, image_size = tiny_model_config()
    write_random_artifact(f"{workdir}/model", config, image_size)
    init_ray()
    results = []
    for scale in (1, 4):
        spec = SynthSpec(groups=args.groups * scale, items_per_group=4, train_views=6, gallery_views=2, query_views=2)
        synth.run(f"{workdir}/catalog{scale}", spec)
        command = [sys.executable, "-m", "pipelines.embed", "--model", f"{workdir}/model", "--catalog", f"{workdir}/catalog{scale}", "--out", f"{workdir}/features{scale}"]
        peak, seconds = peak_memory_of(command)
        images = args.groups * scale * 4 * 10
        results.append((images, peak, seconds))
    print(f"\nmachine: {machine()}")
    print("| images | peak PSS (process tree) | wall s |")
    print("|---|---|---|")
    for images, peak, seconds in results:
        print(f"| {images} | {peak / 2**20:.0f} MiB | {seconds:.0f} |")
    print(f"| ratio 4N / N (target <= 1.2) | {results[1][1] / results[0][1]:.2f} | |")


if __name__ == "__main__":
    main()
