"""The MGA network: backbone, one FGA per layer, and the ATA head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mga.ata import AttentionTokenAlignment
from mga.backbone import Backbone
from mga.config import ModelConfig
from mga.fga import FineGranularAggregator
from mga.similarity import fuse_similarity, global_similarity


@dataclass
class Embedding:
    """What an image is stored as: X^g (L2-normalised, [B, D]) and tokens per layer ([B, M, d], finest first)."""

    global_feature: torch.Tensor
    tokens: list[torch.Tensor]

    def __len__(self) -> int:
        return self.global_feature.shape[0]

    def index(self, rows: torch.Tensor) -> "Embedding":
        return Embedding(self.global_feature[rows], [layer[rows] for layer in self.tokens])


@dataclass
class PairScores:
    """S_global, S_token and the fused S of aligned pairs, each [P] (or [B, N])."""

    global_score: torch.Tensor
    token_score: torch.Tensor
    score: torch.Tensor


def token_alignment(config: ModelConfig) -> AttentionTokenAlignment:
    """The ATA head of a model of `config`: all of the model a rerank runs (S_token, eqs. 4-6)."""
    return AttentionTokenAlignment(
        num_layers=len(config.layers),
        token_dim=config.token_dim,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        temperature=config.temperature,
        token_reduce=config.token_reduce,
        stage2_keys=config.stage2_keys,
        layer_scale=config.ata_layer_scale,
    )


class MGAModel(nn.Module):
    def __init__(self, config: ModelConfig, hub: bool = False, weights_file: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone, config.layers, config.global_dim, hub, weights_file)
        self.aggregators = nn.ModuleList(
            FineGranularAggregator(channels, config.token_dim, config.num_tokens) for channels in self.backbone.channels
        )
        self.alignment = token_alignment(config)

    def forward(self, images: torch.Tensor) -> tuple[Embedding, torch.Tensor]:
        """uint8 images [B, 3, H, W] -> (embedding, global feature before normalisation)."""
        global_raw, feature_maps = self.backbone(images)
        tokens = [aggregate(feature_map) for aggregate, feature_map in zip(self.aggregators, feature_maps)]
        return Embedding(F.normalize(global_raw, dim=-1), tokens), global_raw

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> Embedding:
        return self(images)[0]

    def score_pairs(self, first: Embedding, second: Embedding) -> PairScores:
        """Scores of aligned pairs (first[p], second[p]); the ATA head runs once over all pairs."""
        global_score = global_similarity(first.global_feature, second.global_feature)
        if self.config.alpha == 1.0:
            token_score = torch.zeros_like(global_score)
        else:
            token_score = self.align_tokens(first.tokens, second.tokens)
        return PairScores(global_score, token_score, fuse_similarity(global_score, token_score, self.config.alpha))

    def align_tokens(self, first: list[torch.Tensor], second: list[torch.Tensor]) -> torch.Tensor:
        """S_token (ATA, eqs. 4-6) of aligned pairs of token sets, one [P, M, d] per layer -> [P]."""
        return self.alignment([t.float() for t in first], [t.float() for t in second])

    def score_candidates(self, queries: Embedding, candidates: Embedding) -> PairScores:
        """Each of B queries against its own N candidates: candidates hold B*N rows, query-major.

        Returns scores shaped [B, N], computed as one batch of B*N pairs.
        """
        count = len(queries)
        per_query = len(candidates) // count
        if per_query * count != len(candidates):
            raise ValueError(f"{len(candidates)} candidates do not divide into {count} queries")
        expanded = queries.index(torch.arange(count, device=queries.global_feature.device).repeat_interleave(per_query))
        scores = self.score_pairs(expanded, candidates)
        return PairScores(*(s.view(count, per_query) for s in (scores.global_score, scores.token_score, scores.score)))

    def similarity_matrix(self, embedding: Embedding) -> torch.Tensor:
        """Fused S of every pair in a batch, [B, B]. S is symmetric, so ATA runs on i < j only."""
        count = len(embedding)
        global_matrix = embedding.global_feature @ embedding.global_feature.t()
        if self.config.alpha == 1.0:
            return global_matrix
        first, second = torch.triu_indices(count, count, offset=1, device=global_matrix.device)
        upper = self.alignment([t[first] for t in embedding.tokens], [t[second] for t in embedding.tokens])
        token_matrix = torch.zeros_like(global_matrix)
        token_matrix = token_matrix.index_put((first, second), upper).index_put((second, first), upper)
        # The diagonal (an image with itself) is never a positive or negative in mining.
        return fuse_similarity(global_matrix, token_matrix, self.config.alpha)
