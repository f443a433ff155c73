"""Model registry: `create_model(name, ...)`, `list_models()`, `model_info(name)` (the names, families and input
sizes live in the torch-free `bsq.model_catalog`; this module adds a builder to each).

Every model is built in float form with BSQ's activation quantizers in place; `quantize_model` then swaps its
conv/linear layers for bit-plane layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from bsq.model_catalog import list_models, model_spec
from bsq.models import cifar_resnet, imagenet

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "model_info"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # "cifar" (32x32 inputs) or "imagenet"
    input_size: tuple[int, int, int]  # default (C, H, W) of the data the model is meant for
    builder: Callable[..., nn.Module]


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Attach a builder to a model of the catalogue (bsq.model_catalog)."""
    spec = model_spec(name)  # a name missing from the catalogue fails here, at import

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[spec.name] = fn
        return fn

    return decorator


def model_info(name: str) -> ModelInfo:
    spec = model_spec(name)
    return ModelInfo(spec.name, spec.family, spec.input_size, _BUILDERS[spec.name])


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
    register_model(f"resnet{_depth}")(_cifar(_depth))


@register_model("resnet18")
def _resnet18(num_classes: int, act_bits, stem_act_bits) -> nn.Module:
    return imagenet.resnet(18, num_classes, act_bits, stem_act_bits)


@register_model("resnet50")
def _resnet50(num_classes: int, act_bits, stem_act_bits) -> nn.Module:
    return imagenet.resnet(50, num_classes, act_bits, stem_act_bits)


@register_model("mobilenet_v2")
def _mobilenet_v2(num_classes: int, act_bits, stem_act_bits) -> nn.Module:
    return imagenet.mobilenet_v2(num_classes, act_bits, stem_act_bits)


@register_model("inception_v3")
def _inception_v3(num_classes: int, act_bits, stem_act_bits, aux_logits: bool = False) -> nn.Module:
    return imagenet.inception_v3(num_classes, act_bits, stem_act_bits, aux_logits)
