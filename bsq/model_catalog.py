"""The models the suite builds: name, family and default input size, without their builders.

Torch-free on purpose: config validation (and the workflow's parse) checks `model.arch` without importing torch;
`bsq.models` registers one builder for every name listed here."""

from __future__ import annotations

from dataclasses import dataclass

from bsq.errors import BSQError

__all__ = ["ModelSpec", "MODELS", "list_models", "model_spec"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "cifar" (32x32 inputs) or "imagenet"
    input_size: tuple[int, int, int]  # default (C, H, W) of the data the model is meant for


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        *(ModelSpec(f"resnet{depth}", "cifar", (3, 32, 32)) for depth in (8, 20, 32, 56)),
        ModelSpec("resnet18", "imagenet", (3, 224, 224)),
        ModelSpec("resnet50", "imagenet", (3, 224, 224)),
        ModelSpec("mobilenet_v2", "imagenet", (3, 224, 224)),
        ModelSpec("inception_v3", "imagenet", (3, 299, 299)),
    )
}


def list_models() -> list[str]:
    return sorted(MODELS)


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise BSQError(f"unknown model {name!r}; available models: {', '.join(list_models())}") from None
