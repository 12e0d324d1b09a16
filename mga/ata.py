"""Attention-based Token Alignment (paper Sec. 2.2)."""

from __future__ import annotations

import torch
import torch.nn as nn

from mga.similarity import token_similarity


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, or with `cross` attention over a context.

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

    def forward(self, query: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.norm_query(query)
        keys = normed if self.norm_context is None else self.norm_context(context)
        attended = self.attention(normed, keys, keys, need_weights=False)[0]
        query = query + (attended if self.gain_attention is None else self.gain_attention * attended)
        refined = self.mlp(self.norm_mlp(query))
        return query + (refined if self.gain_mlp is None else self.gain_mlp * refined)


class AttentionTokenAlignment(nn.Module):
    """ATA: align the token sets of image pairs, then score them with eqs. (4)-(6).

    Stage 1: the coarsest layer's tokens of both images, concatenated, go through one
    transformer block, so each image's tokens attend the other's. Stage 2: the result is
    the query of one block per finer layer (coarse to fine), whose keys and values are
    that layer's tokens of the same image (`stage2_keys="same"`) or of both ("pair").
    No segment embedding marks which image a token came from, so the score is symmetric.
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

    def attend(self, tokens_a: list[torch.Tensor], tokens_b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Attended tokens of aligned pairs. tokens_*: per layer [P, M, d], finest first."""
        count = tokens_a[-1].shape[1]
        joint = self.pair_block(torch.cat([tokens_a[-1], tokens_b[-1]], dim=1))  # stage 1
        # Both images go through each stage-2 block as one batch.
        attended = torch.cat([joint[:, :count], joint[:, count:]], dim=0)
        pairs = tokens_a[-1].shape[0]
        for block, finer_a, finer_b in zip(self.detail_blocks, reversed(tokens_a[:-1]), reversed(tokens_b[:-1])):
            if self.stage2_keys == "same":
                context = torch.cat([finer_a, finer_b], dim=0)
            else:
                both = torch.cat([finer_a, finer_b], dim=1)
                context = torch.cat([both, both], dim=0)
            attended = block(attended, context)
        return attended[:pairs], attended[pairs:]

    def forward(self, tokens_a: list[torch.Tensor], tokens_b: list[torch.Tensor]) -> torch.Tensor:
        """S_token of aligned pairs, [P]."""
        attended_a, attended_b = self.attend(tokens_a, tokens_b)
        return token_similarity(attended_a, attended_b, self.temperature, self.token_reduce)
