"""Model artifacts: safetensors weights plus a JSON config, identified by a hash of both.

An artifact is a set of named files (bytes), so callers can keep it on any storage:

    model.safetensors   the weights (no pickle)
    config.json         {"model": ModelConfig, ...extra (image size, training summary)}
    artifact.json       {"model_id": ..., "files": [...]}, written last

model_id is the first 16 hex digits of sha256(weights || config); loading recomputes it
and refuses an artifact whose files do not match their recorded id.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mga.config import ModelConfig
from mga.errors import InputError
from mga.ata import AttentionTokenAlignment
from mga.model import MGAModel, token_alignment

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
INDEX = "artifact.json"


class ArtifactError(InputError):
    """An artifact that is incomplete, tampered with or inconsistent."""


def artifact_id(weights: bytes, config: bytes) -> str:
    return hashlib.sha256(weights + b"\0" + config).hexdigest()[:16]


def pack_artifact(model: MGAModel, extra: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The model as artifact files, `artifact.json` last in order."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    weights = save_safetensors(state)
    config = json.dumps({"model": model.config.model_dump(mode="json"), **(extra or {})}, indent=2, sort_keys=True).encode()
    index = json.dumps({"model_id": artifact_id(weights, config), "files": [WEIGHTS, CONFIG]}, indent=2).encode()
    return {WEIGHTS: weights, CONFIG: config, INDEX: index}


def verify_artifact(files: dict[str, bytes], where: str = "artifact") -> tuple[str, dict[str, Any]]:
    """(model_id, config dict) of artifact files whose hash matches their recorded id and whose
    weights are a safetensors file (its header parses: nothing is loaded, nothing unpickled),
    without building the model; `where` names it in errors."""
    missing = [name for name in (WEIGHTS, CONFIG, INDEX) if name not in files]
    if missing:
        raise ArtifactError(f"{where}: missing {', '.join(missing)}")
    recorded = json.loads(files[INDEX])["model_id"]
    actual = artifact_id(files[WEIGHTS], files[CONFIG])
    if recorded != actual:
        raise ArtifactError(f"{where}: model_id mismatch: {INDEX} says {recorded}, the files hash to {actual} (corrupted or modified)")
    weights = files[WEIGHTS]
    header_bytes = int.from_bytes(weights[:8], "little")
    if len(weights) < 8 or not isinstance(json.loads(weights[8:8 + header_bytes]), dict):  # raises on what is not safetensors
        raise ArtifactError(f"{where}: {WEIGHTS} is not a safetensors file")
    return actual, json.loads(files[CONFIG])


def unpack_artifact(files: dict[str, bytes], where: str = "artifact") -> tuple[MGAModel, str, dict[str, Any]]:
    """(model in eval mode, model_id, config dict) from artifact files; `where` names it in errors."""
    actual, config = verify_artifact(files, where)
    model = MGAModel(_model_config(config))
    _load_weights(model, load_safetensors(files[WEIGHTS]), where)
    return model, actual, config


def unpack_alignment(files: dict[str, bytes], where: str = "artifact") -> tuple[AttentionTokenAlignment, ModelConfig, str]:
    """(the model's ATA head in eval mode, its config, model_id) from artifact files: what a rerank
    needs, without building the backbone (at tf_efficientnetv2_s: timm's import and the build,
    ~2 s of CPU, and ~0.1 GB of weights)."""
    actual, config = verify_artifact(files, where)
    model_config = _model_config(config)
    alignment = token_alignment(model_config)
    prefix = "alignment."
    state = {name.removeprefix(prefix): tensor for name, tensor in load_safetensors(files[WEIGHTS]).items() if name.startswith(prefix)}
    _load_weights(alignment, state, where)
    return alignment, model_config, actual


def _model_config(config: dict[str, Any]) -> ModelConfig:
    # Artifacts from before `ata_layer_scale` existed were built with plain blocks (0).
    return ModelConfig(**{"ata_layer_scale": 0.0, **config["model"]})


def _load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `state` into `module` (eval mode), refusing weights that do not fit it."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ArtifactError(f"{where}: weights do not fit the config: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    module.eval()
