"""Multi-Granular Alignment (MGA) for fashion image retrieval, as a plain PyTorch library.

The modules follow the paper (Zhu et al., "Fashion Image Retrieval with Multi-Granular
Alignment"): `backbone` (Sec. 2.1 image encoder), `fga` (Fine-Granular Aggregator,
eqs. 1-2), `similarity` (eqs. 3-6), `ata` (Attention-based Token Alignment), `model`
(the whole network), `objective` (identity + multi-granular triplet loss, Sec. 2.3),
`metrics` (R@K, mAP), `transforms` (decoding and augmentation), `artifact` (weights
and config without pickles), `sampling` (P x K batches).
"""

from mga.config import LossConfig, ModelConfig
from mga.model import Embedding, MGAModel

__all__ = ["Embedding", "LossConfig", "MGAModel", "ModelConfig"]
