"""Attention-based Token Alignment (paper Sec. 2.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mga.similarity import token_similarity


@dataclass
class PreparedTokens:
    """ATA's part of a set of images that does not depend on the pair: the coarsest layer's
    tokens (stage 1's residual) and every projection of an image's own tokens — stage 1's
    queries, keys and values of its coarse tokens, and each stage-2 block's keys and values of
    its layer's tokens. A search computes it once per image however many pairs the image is in
    (a query is in `rerank` pairs); AttentionTokenAlignment.score does the rest per pair."""

    coarse: torch.Tensor  # [N, M, d]
    coarse_projected: torch.Tensor  # [N, M, 3d]: q, k, v
    context_projected: list[torch.Tensor]  # per stage-2 block, [N, M, 2d]: k, v

    def __len__(self) -> int:
        return self.coarse.shape[0]

    def __getitem__(self, rows: torch.Tensor | slice) -> PreparedTokens:
        return PreparedTokens(self.coarse[rows], self.coarse_projected[rows], [layer[rows] for layer in self.context_projected])

    def empty(self, count: int) -> PreparedTokens:
        """Room for `count` images of this one's shapes and dtypes, to fill by rows (`__setitem__`)."""
        return PreparedTokens(*(part.new_empty((count, *part.shape[1:])) for part in (self.coarse, self.coarse_projected)),
                              [layer.new_empty((count, *layer.shape[1:])) for layer in self.context_projected])

    def __setitem__(self, rows: torch.Tensor | slice, value: PreparedTokens) -> None:
        self.coarse[rows], self.coarse_projected[rows] = value.coarse, value.coarse_projected
        for layer, part in zip(self.context_projected, value.context_projected):
            layer[rows] = part


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, or with `cross` attention over a context.

    Its attention is split where ATA shares work between pairs: the projections of a token
    (`project`, `project_query`, `project_context`) depend on that token alone, `attend` takes them and does
    the rest (scaled dot-product attention over the heads, output projection, MLP). The
    weights are nn.MultiheadAttention's, so stored models load unchanged.

    `layer_scale` > 0 multiplies each branch by a learnable per-channel gain initialised to
    it (LayerScale, Touvron et al. 2021): the block starts near the identity. Without it,
    the branches' outputs (norm ~ sqrt(width) after LayerNorm) swamp the unit-norm FGA
    tokens of the residual stream, and since attention at init averages over all tokens,
    every token of an image comes out as about the same vector (bench/rerank_diagnosis.py
    measures it: within-image cosine 0.99), so eqs. (4)-(6) compare two single vectors.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, cross: bool = False, layer_scale: float = 0.0) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width) if cross else None
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.gain_attention = nn.Parameter(torch.full((width,), layer_scale)) if layer_scale > 0 else None
        self.gain_mlp = nn.Parameter(torch.full((width,), layer_scale)) if layer_scale > 0 else None

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The normalised tokens' queries, keys and values, [..., n, 3d]."""
        return self._projection(self.norm_query(tokens), 0, 3)

    def project_query(self, tokens: torch.Tensor) -> torch.Tensor:
        """The normalised tokens' queries, [..., n, d]."""
        return self._projection(self.norm_query(tokens), 0, 1)

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """A cross block's keys and values of its context tokens, [..., n, 2d]."""
        return self._projection(self.norm_context(context), 1, 3)

    def _projection(self, normed: torch.Tensor, first: int, last: int) -> torch.Tensor:
        width = normed.shape[-1]
        rows = slice(first * width, last * width)  # of in_proj's stacked q, k, v
        return F.linear(normed, self.attention.in_proj_weight[rows], self.attention.in_proj_bias[rows])

    def attend(self, residual: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The block's output for `residual` [B, n, d], given its projected queries [B, n, d] and
        the keys and values [B, m, d] it attends."""
        attended = F.scaled_dot_product_attention(*(self._split_heads(part) for part in (query, keys, values)))
        attended = self.attention.out_proj(attended.transpose(1, 2).flatten(2))
        residual = residual + (attended if self.gain_attention is None else self.gain_attention * attended)
        refined = self.mlp(self.norm_mlp(residual))
        return residual + (refined if self.gain_mlp is None else self.gain_mlp * refined)

    def _split_heads(self, projected: torch.Tensor) -> torch.Tensor:
        return projected.unflatten(-1, (self.attention.num_heads, -1)).transpose(1, 2)  # [B, heads, n, d / heads]


class AttentionTokenAlignment(nn.Module):
    """ATA: align the token sets of image pairs, then score them with eqs. (4)-(6).

    Stage 1: the coarsest layer's tokens of both images, concatenated, go through one
    transformer block, so each image's tokens attend the other's. Stage 2: the result is
    the query of one block per finer layer (coarse to fine), whose keys and values are
    that layer's tokens of the same image (`stage2_keys="same"`) or of both ("pair").
    No segment embedding marks which image a token came from, so the score is symmetric.

    `prepare` computes what each image brings to any pair, `score` / `align` the rest;
    `forward(a, b)` is `score(prepare(a), prepare(b))`.
    """

    def __init__(
        self,
        num_layers: int,
        token_dim: int,
        heads: int,
        mlp_ratio: float,
        temperature: float,
        token_reduce: str,
        stage2_keys: str,
        layer_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.pair_block = TransformerBlock(token_dim, heads, mlp_ratio, layer_scale=layer_scale)
        self.detail_blocks = nn.ModuleList(
            TransformerBlock(token_dim, heads, mlp_ratio, cross=True, layer_scale=layer_scale) for _ in range(num_layers - 1)
        )
        self.temperature = temperature
        self.token_reduce = token_reduce
        self.stage2_keys = stage2_keys

    def prepare(self, tokens: list[torch.Tensor]) -> PreparedTokens:
        """The pair-independent part of ATA for N images. tokens: per layer [N, M, d], finest first."""
        return PreparedTokens(
            tokens[-1],
            self.pair_block.project(tokens[-1]),
            [block.project_context(finer) for block, finer in zip(self.detail_blocks, reversed(tokens[:-1]))],
        )

    def align(self, first: PreparedTokens, second: PreparedTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Attended tokens [P, M, d] of the aligned pairs (first[p], second[p])."""
        count, pairs = first.coarse.shape[1], len(first)
        query, keys, values = torch.cat([first.coarse_projected, second.coarse_projected], dim=1).chunk(3, dim=-1)
        joint = self.pair_block.attend(torch.cat([first.coarse, second.coarse], dim=1), query, keys, values)  # stage 1
        # Both images go through each stage-2 block as one batch.
        attended = torch.cat([joint[:, :count], joint[:, count:]], dim=0)
        for block, context_a, context_b in zip(self.detail_blocks, first.context_projected, second.context_projected):
            if self.stage2_keys == "same":
                context = torch.cat([context_a, context_b], dim=0)
            else:
                both = torch.cat([context_a, context_b], dim=1)
                context = torch.cat([both, both], dim=0)
            keys, values = context.chunk(2, dim=-1)
            attended = block.attend(attended, block.project_query(attended), keys, values)
        return attended[:pairs], attended[pairs:]

    def score(self, first: PreparedTokens, second: PreparedTokens) -> torch.Tensor:
        """S_token (eqs. 4-6) of the aligned pairs (first[p], second[p]), [P]."""
        attended_a, attended_b = self.align(first, second)
        return token_similarity(attended_a, attended_b, self.temperature, self.token_reduce)

    def attend(self, tokens_a: list[torch.Tensor], tokens_b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Attended tokens of aligned pairs. tokens_*: per layer [P, M, d], finest first."""
        return self.align(self.prepare(tokens_a), self.prepare(tokens_b))

    def forward(self, tokens_a: list[torch.Tensor], tokens_b: list[torch.Tensor]) -> torch.Tensor:
        """S_token of aligned pairs, [P]."""
        return self.score(self.prepare(tokens_a), self.prepare(tokens_b))
