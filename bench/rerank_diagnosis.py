"""Why the ATA rerank does or does not pay: S_token's knobs swept at search time (issue 12).

For a trained model and its features table, the global top 50 of every query is rescored
with S_token under each eq. (5) temperature tau and eq. (6) reduction (mean/max), and ranked
by S_token alone and by the fused S at several alphas. The knobs are parameter-free, so no
retraining is needed; the model's trained alpha, tau and reduction are one cell of the grid.
A rerank can only pay where S_token ranks the head about as well as S_global on its own
and errs elsewhere. It also prints how alike the M tokens of one image are, before and after
ATA's transformer blocks. No Ray: the features are read with pyarrow and held in memory, so it
is for evaluation-sized tables (thousands of queries and gallery images), not a catalog.
Usage: python -m bench.rerank_diagnosis MODEL_URI FEATURES_URI [--top 50]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pyarrow.compute as pc
import torch

from mga.model import Embedding, MGAModel
from mga.tie_keys import tie_keys
from mga.shortlist import exact_top_k
from mga.similarity import fuse_similarity, within_image_token_cosine
from pipelines.model_store import load_model
from pipelines.schemas import column_matrix, token_columns
from pipelines.storage import resolve
from pipelines.tables import open_table, read_table

TEMPERATURES = (1.0, 10.0, 50.0)
REDUCTIONS = ("mean", "max")
ALPHAS = (0.25, 0.5, 0.75, 0.9)


def split_embedding(table, info: dict, split: str) -> tuple[Embedding, np.ndarray, list[str]]:
    rows = table.filter(pc.field("split") == split)
    shape = (info["num_tokens"], info["token_dim"])
    tokens = [torch.from_numpy(column_matrix(rows, name, shape)) for name in token_columns(info)]
    embedding = Embedding(torch.from_numpy(column_matrix(rows, "global")), tokens)
    return embedding, np.array(rows.column("item_id").to_pylist()), rows.column("image_id").to_pylist()


def head_token_scores(model: MGAModel, queries: Embedding, gallery: Embedding, head: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """S_token of each query with its head candidates, [Q, N]."""
    scores = []
    with torch.no_grad():
        for start in range(0, len(queries), batch):
            rows = torch.arange(start, min(start + batch, len(queries)))
            scores.append(model.score_candidates(queries.index(rows), gallery.index(head[rows].reshape(-1))).token_score)
    return torch.cat(scores)


def token_collapse(model: MGAModel, queries: Embedding, gallery: Embedding, pairs: int = 200) -> str:
    """Within-image token cosine of each layer's FGA tokens and of ATA's attended tokens."""
    generator = torch.Generator().manual_seed(0)
    first = queries.index(torch.randint(0, len(queries), (pairs,), generator=generator))
    second = gallery.index(torch.randint(0, len(gallery), (pairs,), generator=generator))
    with torch.no_grad():
        attended, _ = model.alignment.attend(first.tokens, second.tokens)
    layers = ", ".join(f"layer {layer} {within_image_token_cosine(tokens).mean().item():.3f}" for layer, tokens in zip(model.config.layers, first.tokens))
    return f"within-image token cosine: FGA {layers}; ATA attended {within_image_token_cosine(attended).mean().item():.3f}"


def first_is_match(is_match: np.ndarray, score: torch.Tensor) -> float:
    """R@1 of the head reordered by `score` (ties keep the global order)."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices.numpy()
    return float(np.take_along_axis(is_match, order, 1)[:, 0].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("features")
    parser.add_argument("--top", type=int, default=50)
    args = parser.parse_args()
    model, _, _ = load_model(args.model)
    model.eval()
    snapshot = open_table(resolve(args.features))
    table = read_table(snapshot)
    queries, query_items, _ = split_embedding(table, snapshot.info, "query")
    gallery, gallery_items, gallery_ids = split_embedding(table, snapshot.info, "gallery")
    shortlist = exact_top_k(queries.global_feature, gallery.global_feature, torch.from_numpy(tie_keys(gallery_ids)), args.top)
    is_match = gallery_items[shortlist.rows.numpy()] == query_items[:, None]
    global_score = shortlist.scores
    print(f"{args.features}: {len(query_items)} queries x {len(gallery_ids)} gallery; trained alpha {model.config.alpha}, "
          f"tau {model.config.temperature}, reduce {model.config.token_reduce}")
    print(f"global R@1 {is_match[:, 0].mean():.3f}, R@5 {is_match[:, :5].any(1).mean():.3f}, R@10 {is_match[:, :10].any(1).mean():.3f}")
    print(token_collapse(model, queries, gallery))
    print("| tau | reduce | S_token alone R@1 | S_token spread / S_global spread | " + " | ".join(f"alpha {a} R@1" for a in ALPHAS) + " |")
    print("|---|---|---|---|" + "---|" * len(ALPHAS))
    for temperature, reduce in itertools.product(TEMPERATURES, REDUCTIONS):
        model.alignment.temperature, model.alignment.token_reduce = temperature, reduce
        token_score = head_token_scores(model, queries, gallery, shortlist.rows)
        spread = token_score.std(1).mean().item() / global_score.std(1).mean().item()
        fused = [first_is_match(is_match, fuse_similarity(global_score, token_score, alpha)) for alpha in ALPHAS]
        print(f"| {temperature:g} | {reduce} | {first_is_match(is_match, token_score):.3f} | {spread:.2f} | " + " | ".join(f"{value:.3f}" for value in fused) + " |")


if __name__ == "__main__":
    main()
