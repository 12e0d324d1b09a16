"""Training objective (paper Sec. 2.3): identity loss + multi-granular triplet loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mga.config import LossConfig
from mga.model import MGAModel


def batch_hard_triplet_loss(similarity: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """[margin - S(a, p) + S(a, n)]_+ with the hardest positive and negative of each anchor.

    similarity: [B, B] (higher is more alike); labels: [B]. Anchors without a positive or a
    negative in the batch are left out. In a P x K batch every anchor has both.
    """
    same_item = labels.unsqueeze(0) == labels.unsqueeze(1)
    not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positives = same_item & not_self
    negatives = ~same_item
    hardest_positive = similarity.masked_fill(~positives, float("inf")).min(dim=1).values
    hardest_negative = similarity.masked_fill(~negatives, float("-inf")).max(dim=1).values
    valid = positives.any(dim=1) & negatives.any(dim=1)
    if not valid.any():
        return similarity.sum() * 0.0
    return F.relu(margin - hardest_positive[valid] + hardest_negative[valid]).mean()


@dataclass
class LossParts:
    total: torch.Tensor
    identity: torch.Tensor
    triplet: torch.Tensor


class MGAObjective(nn.Module):
    """The model with its training-only identity classifier, as one module for DDP.

    alpha = 1 gives the paper's "normal triplet loss" ablation (S = S_global);
    triplet_weight = 0 gives its baseline (identity loss only).
    """

    def __init__(self, model: MGAModel, num_classes: int, loss: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.classifier = nn.Linear(model.config.global_dim, num_classes) if loss.identity_weight > 0 else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossParts:
        embedding, global_raw = self.model(images)
        zero = global_raw.sum() * 0.0
        identity = zero
        if self.classifier is not None:
            identity = F.cross_entropy(self.classifier(global_raw), labels, label_smoothing=self.loss.label_smoothing)
        triplet = zero
        if self.loss.triplet_weight > 0:
            triplet = batch_hard_triplet_loss(self.model.similarity_matrix(embedding), labels, self.loss.margin)
        total = self.loss.identity_weight * identity + self.loss.triplet_weight * triplet
        return LossParts(total, identity.detach(), triplet.detach())

    def unused_parameters_possible(self) -> bool:
        """True when some parameters get no gradient (tokens unused): DDP must be told."""
        return self.model.config.alpha == 1.0 or self.loss.triplet_weight == 0
