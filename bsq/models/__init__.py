"""Model registry: `create_model(name, ...)`, `list_models()`, `model_info(name)`.

Every model is built in float form with BSQ's activation quantizers in place; `quantize_model` then swaps its
conv/linear layers for bit-plane layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from bsq.errors import BSQError
from bsq.models import cifar_resnet, imagenet

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "model_info"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # "cifar" (32x32 inputs) or "imagenet"
    input_size: tuple[int, int, int]  # default (C, H, W) of the data the model is meant for
    builder: Callable[..., nn.Module]


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, family: str, input_size: tuple[int, int, int]):
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelInfo(name, family, input_size, fn)
        return fn

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BSQError(f"unknown model {name!r}; available models: {', '.join(list_models())}") from None


def create_model(
    name: str, num_classes: int = 10, act_bits: int | None = 4, stem_act_bits: int | None = None, **kwargs
) -> nn.Module:
    """Build a float-form model. act_bits=None gives a plain full-precision network (for pretraining)."""
    return model_info(name).builder(num_classes=num_classes, act_bits=act_bits, stem_act_bits=stem_act_bits, **kwargs)


def _cifar(depth: int):
    def build(num_classes: int, act_bits, stem_act_bits, in_channels: int = 3, width: int = 16) -> nn.Module:
        return cifar_resnet.CifarResNet(depth, num_classes, in_channels, width, act_bits, stem_act_bits)

    return build


for _depth in (8, 20, 32, 56):
    register_model(f"resnet{_depth}", "cifar", (3, 32, 32))(_cifar(_depth))


@register_model("resnet18", "imagenet", (3, 224, 224))
def _resnet18(num_classes: int, act_bits, stem_act_bits) -> nn.Module:
    return imagenet.resnet(18, num_classes, act_bits, stem_act_bits)


@register_model("resnet50", "imagenet", (3, 224, 224))
def _resnet50(num_classes: int, act_bits, stem_act_bits) -> nn.Module:
    return imagenet.resnet(50, num_classes, act_bits, stem_act_bits)


@register_model("mobilenet_v2", "imagenet", (3, 224, 224))
def _mobilenet_v2(num_classes: int, act_bits, stem_act_bits) -> nn.Module:
    return imagenet.mobilenet_v2(num_classes, act_bits, stem_act_bits)


@register_model("inception_v3", "imagenet", (3, 299, 299))
def _inception_v3(num_classes: int, act_bits, stem_act_bits, aux_logits: bool = False) -> nn.Module:
    return imagenet.inception_v3(num_classes, act_bits, stem_act_bits, aux_logits)
