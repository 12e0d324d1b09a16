"""`mga demo`: synth -> train -> embed -> search -> evaluate on one machine (local Ray, CPU, minutes).

The model is trained on the synthetic catalog's train items and evaluated on held-out
items, so the numbers it prints are real (from ImageNet Lite0 weights installed with the
project: no downloads). The training and the evaluation are tracked in an MLflow local store
in the workdir (`mlflow.db`, no server); the summary prints the command that opens MLflow's UI on it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

from pipelines.synthetic import SynthSpec
from pipelines.command import module_main
from pipelines.config import load_config
from pipelines.console import print_summary
from pipelines.tracking import configured_uri, local_store, store_directory, ui_command

# Groups of 12 look-alike items: the pretrained backbone's zero-shot global R@1 on the
# held-out items is about 0.24 consumer->shop (0.61 shop->shop), so details must be learnt.
DEMO_SPEC = SynthSpec(seed=0, groups=20, items_per_group=12, test_fraction=0.5, train_views=6, gallery_views=2, query_views=2, image_size=128)


def run_name(config: str, overrides: list[str], seed: int) -> str:
    """`demo-seed0`, or `demo-seed0-model.alpha=1.0` with `--set model.alpha=1.0`: a run of its own per setup.

    `mga demo --set model.alpha=1.0` after `mga demo` then trains an alpha 1.0 model beside the
    first run (one run name for both would be refused: that run was trained with alpha 0.5),
    and `mga demo` again re-exports the first without training. `run.*` settings do not shape
    the model and stay out of the name.
    """
    shaping = ([Path(config).stem] if config != "tiny" else []) + [item.strip() for item in overrides if not item.strip().startswith("run.")]
    suffix = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", "-".join(shaping))
    if len(suffix) > 80:  # a readable head and a digest of the whole
        suffix = f"{suffix[:60]}-{hashlib.sha256(suffix.encode()).hexdigest()[:8]}"
    return f"demo-seed{seed}" + (f"-{suffix}" if suffix else "")


def run(workdir: str = "mga_demo", config: str = "tiny", overrides: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    # Here, not at the top: `mga demo --help` and a usage error must not wait for torch and Ray.
    from pipelines import embed, evaluate, search, synth, train

    started = time.time()
    paths = {name: os.path.abspath(os.path.join(workdir, name)) for name in ("catalog", "model", "runs", "features", "rankings", "report")}
    timings: dict[str, float] = {}

    def step(name: str, action):
        print(f"\n>>> mga demo: {name}", flush=True)
        begun = time.time()
        result = action()
        timings[name] = time.time() - begun
        return result

    spec = SynthSpec(**{**DEMO_SPEC.__dict__, "seed": seed})
    store = local_store(workdir)  # MLflow's local store (SQLite) in the workdir: no server
    train_config = load_config(
        config,
        overrides,
        extra={"data": {"catalog": paths["catalog"]},
               "run": {"output": paths["model"], "storage_path": paths["runs"], "name": run_name(config, overrides or [], seed), "seed": seed, "tracking_uri": store}},
    )
    store = configured_uri(train_config.run.tracking_uri)  # --set run.tracking_uri=... wins
    step("synth", lambda: synth.run(paths["catalog"], spec))
    step("train", lambda: train.run(train_config))
    step("embed", lambda: embed.run(paths["model"], paths["catalog"], paths["features"]))
    step("search", lambda: search.run(paths["features"], paths["rankings"]))
    metrics = step("evaluate", lambda: evaluate.run(paths["rankings"], paths["report"], tracking_uri=store))
    rows: dict[str, Any] = {name: os.path.abspath(path) for name, path in paths.items()}
    for ordering in ("global", "reranked"):
        values = metrics[ordering]
        rows[f"{ordering} R@1 / R@10 / mAP"] = f"{values['R@1']:.3f} / {values['R@10']:.3f} / {values['mAP']:.3f}"
    rows["queries"] = f"{metrics['queries']} (excluded {metrics['excluded_queries']})"
    rows["report"] = os.path.abspath(os.path.join(paths["report"], "report.html"))
    if store:
        rows["MLflow"] = store
        if store_directory(store) is not None:
            rows["MLflow UI"] = ui_command(store)
    rows["steps"] = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    rows["wall time"] = f"{time.time() - started:.0f} s"
    print_summary("mga demo", rows)
    return {"metrics": metrics, "paths": paths, "timings": timings}


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="mga_demo", help="where catalog, model, features, rankings and report go")
    parser.add_argument("--config", default="tiny", help="training config (default: the tiny CPU one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a training config value")
    parser.add_argument("--seed", type=int, default=0)


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    return run(args.workdir, args.config, args.overrides, args.seed)


def main(argv: list[str] | None = None) -> None:
    module_main(__name__, argv)


if __name__ == "__main__":
    main()
