"""Fine-Granular Aggregator (paper Sec. 2.1, eqs. 1-2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def aggregate_tokens(
    grid: torch.Tensor,
    centers: torch.Tensor,
    center_bias: torch.Tensor,
    residual_centers: torch.Tensor,
) -> torch.Tensor:
    """Eqs. (1)-(2): soft-assign grid features to centres and aggregate residuals.

    grid [B, N, d]; centers c and residual_centers c* [M, d]; center_bias b [M].
    gamma_ij = softmax_j(x_i c_j^T + b_j)                      (eq. 1)
    t_j      = l2norm(sum_i gamma_ij (x_i - c*_j))             (eq. 2)
    Returns tokens [B, M, d].
    """
    assignment = torch.softmax(grid @ centers.t() + center_bias, dim=-1)  # [B, N, M]
    weighted_sum = assignment.transpose(1, 2) @ grid  # sum_i gamma_ij x_i, [B, M, d]
    mass = assignment.sum(dim=1).unsqueeze(-1)  # sum_i gamma_ij, [B, M, 1]
    return F.normalize(weighted_sum - mass * residual_centers, dim=-1)


class FineGranularAggregator(nn.Module):
    """One layer's FGA: project grid features to the common width d, then eqs. (1)-(2)."""

    def __init__(self, in_channels: int, token_dim: int, num_tokens: int) -> None:
        super().__init__()
        # Layers differ in channels; a projection brings them to one token width.
        self.project = nn.Linear(in_channels, token_dim)
        self.centers = nn.Parameter(torch.randn(num_tokens, token_dim) * token_dim**-0.5)
        self.center_bias = nn.Parameter(torch.zeros(num_tokens))
        self.residual_centers = nn.Parameter(torch.randn(num_tokens, token_dim) * token_dim**-0.5)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """feature_map [B, C, H, W] -> tokens [B, M, d]."""
        grid = self.project(feature_map.flatten(2).transpose(1, 2))  # grid features x_i
        return aggregate_tokens(grid, self.centers, self.center_bias, self.residual_centers)
