"""Multi-Granular Alignment (MGA) for fashion image retrieval, as a plain PyTorch library.

The modules follow the paper (Zhu et al., "Fashion Image Retrieval with Multi-Granular
Alignment"): `backbone` (Sec. 2.1 image encoder), `fga` (Fine-Granular Aggregator,
eqs. 1-2), `similarity` (eqs. 3-6), `ata` (Attention-based Token Alignment), `model`
(the whole network), `objective` (identity + multi-granular triplet loss, Sec. 2.3),
`global_scores` (eq. 3 exactly, and the fast matmul's error bound), `shortlist` (the exact
blocked top-k and every positive's full-gallery rank), `retrieval` (rank, then rerank: the
one step training validation and search share), `metrics` (R@K, mAP), `transforms`
(decoding and augmentation), `artifact` (weights and config without pickles), `sampling`
(P x K batches).
"""

from typing import Any

__all__ = ["Embedding", "LossConfig", "MGAModel", "ModelConfig"]


def __getattr__(name: str) -> Any:
    # Lazy: `import mga.metrics` must not pay for importing torch.
    if name in ("LossConfig", "ModelConfig"):
        from mga import config

        return getattr(config, name)
    if name in ("Embedding", "MGAModel"):
        from mga import model

        return getattr(model, name)
    raise AttributeError(f"module 'mga' has no attribute {name!r}")
