"""Global and token-level similarity (paper eqs. 3-6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def global_similarity(query: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Eq. (3): cosine similarity of aligned global features, [P, D] x [P, D] -> [P]."""
    return (F.normalize(query, dim=-1) * F.normalize(candidate, dim=-1)).sum(-1)


def token_similarity(
    tokens_v: torch.Tensor,
    tokens_e: torch.Tensor,
    temperature: float,
    reduce: str = "mean",
) -> torch.Tensor:
    """Eqs. (4)-(6): token-level similarity of aligned pairs of token sets.

    tokens_v, tokens_e: [P, M, d]. Eq. (4) takes all token cosines s_ij; eq. (5) gives each
    token of one set its attended vector, a softmax(tau * s)-weighted sum of the other set's
    tokens; R is the cosine of a token with its attended vector. Eq. (6) combines
    R(t_i^v, a_i^e) + R(t_i^e, a_i^v) over i by `reduce`: "max" as the equation is written,
    "mean" as the text describes. The result lies in [-2, 2]. Returns [P].
    """
    if tokens_v.shape != tokens_e.shape:
        raise ValueError(f"token sets must have the same shape, got {tuple(tokens_v.shape)} and {tuple(tokens_e.shape)}")
    unit_v = F.normalize(tokens_v, dim=-1)
    unit_e = F.normalize(tokens_e, dim=-1)
    cosines = unit_v @ unit_e.transpose(1, 2)  # eq. (4), [P, M, M]
    attended_e = torch.softmax(temperature * cosines, dim=-1) @ tokens_e  # eq. (5): a_i^e
    attended_v = torch.softmax(temperature * cosines.transpose(1, 2), dim=-1) @ tokens_v  # a_i^v
    relevance = F.cosine_similarity(tokens_v, attended_e, dim=-1) + F.cosine_similarity(tokens_e, attended_v, dim=-1)
    if reduce == "max":
        return relevance.max(dim=-1).values
    if reduce == "mean":
        return relevance.mean(dim=-1)
    raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")


def within_image_token_cosine(tokens: torch.Tensor) -> torch.Tensor:
    """Mean cosine between the different tokens of each image, [B, M, d] -> [B].

    A diagnostic of eqs. (4)-(6)'s input: near 1, the M tokens are one vector, and the token
    alignment compares two single vectors whatever tau and the reduction are.
    """
    unit = F.normalize(tokens.float(), dim=-1)
    count = tokens.shape[1]
    return ((unit @ unit.transpose(1, 2)).sum((1, 2)) - count) / (count * count - count)


def fuse_similarity(global_score: torch.Tensor, token_score: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sec. 2.3: S = alpha * S_global + (1 - alpha) * S_token."""
    return alpha * global_score + (1.0 - alpha) * token_score


# Lowest value token_similarity can take: two cosines of -1.
TOKEN_SIMILARITY_MIN = -2.0
