"""Accuracy ablation: the paper's Table 2 on the demo's synthetic catalog, several seeds.

  zero-shot           the pretrained backbone, untrained (global feature only)
  baseline            identity loss only                       (loss.triplet_weight=0, alpha=1)
  + triplet (global)  identity + triplet on S_global            (alpha=1)
  + multi-granular    identity + triplet on alpha*S_g+(1-a)*S_t (the tiny config's alpha),
                      ranked by its global feature, and reranked with ATA

Each model is trained with the tiny config (what `mga demo` trains) on the train groups of
a seed's catalog and evaluated on its held-out groups twice: Consumer-to-Shop-like
(consumer queries, shop gallery) and In-Shop-like (shop queries, same shop gallery); both
catalogs come from the same seed, so their train splits are identical. Everything runs
through the real pipeline (Ray Train, embed, search, evaluate).
Usage: python -m bench.ablation [--seeds 0 1 2] [--set KEY=VALUE ...] [--models baseline triplet mga]
`--set` reaches every model, but each model's own settings win: `--set model.alpha=0.75`
trains MGA at alpha 0.75 while the global-only models stay at alpha 1. `--models mga` trains
only MGA (the zero-shot row, which checks that a seed's catalog is the one of earlier runs,
always runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile

from bench.common import git_revision, machine, write_random_artifact
from pipelines import demo, embed, evaluate, search, synth, train
from pipelines.config import load_config
from pipelines.runtime import init_ray
from pipelines.train.weights import backbone_weights_file

MODELS = {
    "baseline (identity)": ["loss.triplet_weight=0", "model.alpha=1.0"],
    "+ triplet on global (alpha=1)": ["model.alpha=1.0"],
    "+ multi-granular triplet (MGA)": [],
}
MODEL_NAMES = dict(zip(("baseline", "triplet", "mga"), MODELS))
ZERO_SHOT = "zero-shot pretrained (untrained)"
SPLITS = {"consumer->shop": "consumer", "shop->shop": "shop"}


def evaluate_model(workdir: str, tag: str, model_uri: str) -> dict[str, dict]:
    results = {}
    for split, domain in SPLITS.items():
        prefix = f"{workdir}/{tag}-{domain}"
        embed.run(model_uri, f"{workdir}/catalog-{domain}", f"{prefix}-features")
        search.run(f"{prefix}-features", f"{prefix}-rankings")
        results[split] = evaluate.run(f"{prefix}-rankings", f"{prefix}-report")
    return results


def spread(values: list[float]) -> str:
    """mean ± half the range (min..max) over seeds."""
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else f"{mean:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra training overrides for every model (a model's own settings win)")
    parser.add_argument("--models", nargs="+", choices=list(MODEL_NAMES), default=list(MODEL_NAMES), help="which models to train")
    args = parser.parse_args()
    chosen = [MODEL_NAMES[name] for name in args.models]
    workdir = tempfile.mkdtemp(prefix="bench-ablation-")
    init_ray()
    # rows[(label, split, ordering)][metric] -> one value per seed
    rows: dict[tuple[str, str, str], dict[str, list[float]]] = {}

    def record(label: str, results: dict[str, dict], orderings: tuple[str, ...]) -> None:
        for split, metrics in results.items():
            for ordering in orderings:
                entry = rows.setdefault((label, split, ordering), {"R@1": [], "R@10": [], "mAP": []})
                for metric in entry:
                    entry[metric].append(metrics[ordering][metric])

    for seed in args.seeds:
        seed_dir = f"{workdir}/seed{seed}"
        base = dataclasses.replace(demo.DEMO_SPEC, seed=seed)
        for domain in SPLITS.values():
            synth.run(f"{seed_dir}/catalog-{domain}", dataclasses.replace(base, query_domain=domain))
        config = load_config("tiny", [f"run.seed={seed}", *args.overrides], extra={"data": {"catalog": f"{seed_dir}/catalog-consumer"}})
        # The untrained model: pretrained backbone, random projection and heads, global only.
        zero_shot = config.model.model_copy(update={"alpha": 1.0})
        write_random_artifact(f"{seed_dir}/zero-shot", zero_shot, config.data.image_size, seed, backbone_weights_file(config))
        record(ZERO_SHOT, evaluate_model(seed_dir, "zero-shot", f"{seed_dir}/zero-shot"), ("global",))
        for number, (label, overrides) in enumerate(MODELS.items()):
            if label not in chosen:
                continue
            config = load_config(
                "tiny",
                [f"run.seed={seed}", *args.overrides, *overrides],
                extra={"data": {"catalog": f"{seed_dir}/catalog-consumer"}, "run": {"output": f"{seed_dir}/model{number}", "storage_path": f"{seed_dir}/runs", "name": f"ablation{number}"}},
            )
            train.run(config)
            reranks = config.model.alpha < 1.0
            record(label, evaluate_model(seed_dir, f"model{number}", f"{seed_dir}/model{number}"), ("global", "reranked") if reranks else ("global",))
        print(f"\nafter seed {seed} (models under {seed_dir}):")  # a stopped run still leaves numbers
        print_table(rows)

    print(f"\nmachine: {machine()}; revision {git_revision()}")
    print(f"catalog: the demo's ({demo.DEMO_SPEC}), seeds {args.seeds}; tiny config{' + ' + ' '.join(args.overrides) if args.overrides else ''}")
    print_table(rows)
    print_gain(rows)


def print_table(rows: dict[tuple[str, str, str], dict[str, list[float]]]) -> None:
    print("mean ± half the min..max range over the seeds")
    print("| model | ranking | split | R@1 | R@10 | mAP |")
    print("|---|---|---|---|---|---|")
    for (label, split, ordering), metrics in rows.items():
        ranking = "ATA rerank of the global top 50" if ordering == "reranked" else "global"
        print(f"| {label} | {ranking} | {split} | {spread(metrics['R@1'])} | {spread(metrics['R@10'])} | {spread(metrics['mAP'])} |", flush=True)


def print_gain(rows: dict[tuple[str, str, str], dict[str, list[float]]]) -> None:
    """Issue 12's goal: MGA reranked minus the best global-only model (by mean R@1), seed by seed."""
    mga = list(MODELS)[-1]
    for split in SPLITS:
        global_only = {label: rows[(label, split, "global")]["R@1"] for label in [ZERO_SHOT, *list(MODELS)[:-1]] if (label, split, "global") in rows}
        reranked = rows.get((mga, split, "reranked"), {}).get("R@1", [])
        if not global_only or not reranked:
            continue
        best = max(global_only, key=lambda label: statistics.fmean(global_only[label]))
        gains = [mine - theirs for mine, theirs in zip(reranked, global_only[best])]
        print(f"{split}: MGA reranked - {best} R@1 per seed {[round(g, 3) for g in gains]}: {spread(gains)}; spread excludes 0: {min(gains) > 0}")
        own = [mine - theirs for mine, theirs in zip(reranked, rows[(mga, split, "global")]["R@1"])]
        print(f"{split}: MGA reranked - MGA's own global ranking, R@1 per seed {[round(g, 3) for g in own]}: {spread(own)}")


if __name__ == "__main__":
    main()
