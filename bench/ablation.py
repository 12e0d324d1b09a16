"""Accuracy ablation: the paper's Table 2 on the synthetic catalog, same budget for each model.

  baseline          identity loss only                     (loss.triplet_weight=0, alpha=1)
  + triplet (global) identity + triplet on S_global          (alpha=1)
  + multi-granular  identity + triplet on alpha*S_g+(1-a)*S_t (alpha=0.5), reranked with ATA

Each model is trained once on the train groups and evaluated on held-out groups twice:
Consumer-to-Shop-like (consumer queries, shop gallery) and In-Shop-like (shop queries,
shop gallery); both catalogs come from the same seed, so their train splits are identical.
Usage: python bench/ablation.py [--epochs 20] [--groups 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

from bench.common import machine
from mga.synthetic import SynthSpec
from pipelines import embed, evaluate, search, synth, train
from pipelines.config import load_config
from pipelines.runtime import init_ray

MODELS = {
    "baseline (identity)": ["loss.triplet_weight=0", "model.alpha=1.0"],
    "+ triplet on global (alpha=1)": ["model.alpha=1.0"],
    "+ multi-granular triplet (MGA)": [],
}
SPLITS = {"consumer->shop": "consumer", "shop->shop": "shop"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra training overrides for every model")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-ablation-")
    init_ray()
    base = SynthSpec(seed=args.seed, groups=args.groups, items_per_group=4, train_views=6, gallery_views=2, query_views=2)
    for name, domain in SPLITS.items():
        synth.run(f"{workdir}/catalog-{domain}", dataclasses.replace(base, query_domain=domain))
    rows = []
    for label, overrides in MODELS.items():
        tag = str(len(rows))
        config = load_config(
            "tiny",
            [f"optim.epochs={args.epochs}", f"run.seed={args.seed}", *overrides, *args.overrides],
            extra={"data": {"catalog": f"{workdir}/catalog-consumer"}, "run": {"output": f"{workdir}/model{tag}", "storage_path": f"{workdir}/runs", "name": f"ablation{tag}"}},
        )
        train.run(config)
        for split, domain in SPLITS.items():
            prefix = f"{workdir}/{tag}-{domain}"
            embed.run(f"{workdir}/model{tag}", f"{workdir}/catalog-{domain}", f"{prefix}-features")
            search.run(f"{prefix}-features", f"{prefix}-rankings", rerank_top=50)
            metrics = evaluate.run(f"{prefix}-rankings", f"{prefix}-report")
            rows.append((label, split, metrics))
    print(f"\nmachine: {machine()}")
    print(f"synthetic catalog: seed {args.seed}, {args.groups} groups x 4 items (half held out); budget {args.epochs} epochs of the tiny config each")
    print("| model | split | R@1 | R@10 | mAP | R@1 global-only | mAP global-only |")
    print("|---|---|---|---|---|---|---|")
    for label, split, metrics in rows:
        final, global_only = metrics["reranked"], metrics["global"]
        print(f"| {label} | {split} | {final['R@1']:.3f} | {final['R@10']:.3f} | {final['mAP']:.3f} | {global_only['R@1']:.3f} | {global_only['mAP']:.3f} |")


if __name__ == "__main__":
    main()
