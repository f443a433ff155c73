"""Model-level conversions: swap float layers for bit layers, export schemes and integers, re-quantize.

A *scheme* is a flat `{name: bits}` dict: the module name for a layer's weight, `<module>.bias` for a quantized
bias (e.g. `{"conv1": 8, ..., "fc": 3, "fc.bias": 5}`). Bits are BSQ magnitude bits; 0 means all-zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bsq.errors import BSQError
from bsq.quant.layers import BitConv2d, BitLayer, BitLinear

__all__ = [
    "QuantPolicy",
    "bit_layers",
    "quantize_model",
    "to_float_model",
    "export_scheme",
    "export_integer",
    "requantize_model",
    "clamp_bits_",
    "clamp_search_",
    "clamp_finetune_",
    "set_form_",
    "MAX_BITS",
]

from bsq.quant.limits import MAX_BITS  # noqa: E402  (re-exported: the arithmetic's precision cap)


@dataclass(frozen=True)
class QuantPolicy:
    """Which float layers become bit layers and how they count (spec §4.3, P4).

    Defaults follow the official HEAD code: first and last layers quantized, 1x1 shortcut convs (`downsample`)
    kept in float. `quantize_shortcuts=True` gives the paper-era code: quantized and regularized, yet (as there)
    never counted in the compression rate.
    """

    nbits: int = 8
    quantize_first: bool = True
    quantize_last: bool = True
    quantize_bias: bool = True
    quantize_shortcuts: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bits("nbits", self.nbits)


def check_bits(name: str, bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 0 <= bits <= MAX_BITS:
        raise BSQError(f"{name}: bits must be an integer in 0..{MAX_BITS}, got {bits!r}")


def is_shortcut(name: str) -> bool:
    """Shortcut 1x1 convs are named `...downsample.0` in both bearpaw and torchvision ResNets."""
    return "downsample" in name.split(".")


def bit_layers(model: nn.Module) -> Iterator[tuple[str, BitLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, BitLayer):
            yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def float_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The plain `nn.Conv2d` / `nn.Linear` layers a quantizer may swap (exact types: quantized twins excluded)."""
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def quantize_model(
    model: nn.Module,
    policy: QuantPolicy | None = None,
    scheme: dict[str, int] | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Swap float `Conv2d`/`Linear` layers for bit layers in place, at `policy.nbits` or a per-layer `scheme`.

    With a scheme, its keys must name exactly layers the policy quantizes (biases as `<layer>.bias`), so a
    scheme from another architecture fails loudly instead of being applied partially.
    """
    policy = policy or QuantPolicy()
    candidates = float_layers(model)
    if not candidates:
        raise BSQError("the model has no nn.Conv2d / nn.Linear layers to quantize")
    first, last = candidates[0][0], candidates[-1][0]
    chosen = []
    for name, module in candidates:
        if name in policy.exclude or (filter_fn is not None and not filter_fn(name, module)):
            continue
        if (name == first and not policy.quantize_first) or (name == last and not policy.quantize_last):
            continue
        if is_shortcut(name) and not policy.quantize_shortcuts:
            continue
        chosen.append((name, module))
    # Every check runs before the first swap, so a rejected call leaves the model untouched.
    if scheme is not None:
        _check_scheme(scheme, chosen, policy)
    with_bias = [name for name, module in chosen if module.bias is not None]
    if with_bias and not policy.quantize_bias:
        raise BSQError(f"{with_bias[0]} has a bias; quantize_bias=False is not supported (the bias would be lost)")
    for name, module in chosen:
        nbits = policy.nbits if scheme is None else scheme[name]
        bias_nbits = None if module.bias is None else (nbits if scheme is None else scheme.get(f"{name}.bias", nbits))
        factory = BitConv2d if isinstance(module, nn.Conv2d) else BitLinear
        layer = factory.from_float(module, nbits, bias_nbits)
        if is_shortcut(name):
            layer.counted = False  # paper-era shortcuts: quantized and regularized, never counted (spec §4.4)
        set_submodule(model, name, layer)
    return model


def _check_scheme(scheme: dict[str, int], chosen: list[tuple[str, nn.Module]], policy: QuantPolicy) -> None:
    valid = {name for name, _ in chosen}
    valid |= {f"{name}.bias" for name, m in chosen if m.bias is not None and policy.quantize_bias}
    unknown = sorted(set(scheme) - valid)
    missing = sorted({name for name, _ in chosen} - set(scheme))
    if unknown or missing:
        raise BSQError(
            f"the scheme does not match this model: unknown layers {unknown[:5]}, missing layers {missing[:5]}. "
            f"Valid names are: {sorted(valid)[:8]}... Use a scheme.json written for the same architecture "
            "and quantization policy (quantize_first/last/shortcuts)."
        )
    for name, bits in scheme.items():
        check_bits(f"scheme[{name!r}]", bits)


def to_float_model(model: nn.Module) -> nn.Module:
    """Replace every bit layer by a float layer holding exactly its quantized values (in place)."""
    for name, layer in list(bit_layers(model)):
        set_submodule(model, name, layer.to_float())
    return model


def export_scheme(model: nn.Module) -> dict[str, int]:
    """Effective per-layer bits (0 for all-zero tensors, spec P15), weights and quantized biases."""
    scheme: dict[str, int] = {}
    for name, layer in bit_layers(model):
        scheme[name] = layer.effective_bits("weight")
        if layer.has_bias:
            scheme[f"{name}.bias"] = layer.effective_bits("bias")
    return scheme


@dataclass
class IntegerTensor:
    """Deployable form of one quantized tensor: W = scale * values / (2^bits - 1)."""

    values: torch.Tensor  # int64, signed
    bits: int
    scale: float

    def dequantize(self) -> torch.Tensor:
        from bsq.quant.bits import dequantize

        return dequantize(self.values, self.bits, torch.tensor(self.scale, dtype=torch.float32))


def export_integer(model: nn.Module) -> dict[str, IntegerTensor]:
    """Signed integer weights + one scale per layer, keyed like a scheme (`<layer>` and `<layer>.bias`)."""
    out: dict[str, IntegerTensor] = {}
    for name, layer in bit_layers(model):
        for what in layer.quantized_tensors():
            key = name if what == "weight" else f"{name}.bias"
            scale = getattr(layer, layer._names(what)[2])
            out[key] = IntegerTensor(layer.integer_levels(what).cpu(), layer.precision(what), float(scale.detach()))
    return out


def requantize_model(
    model: nn.Module, maxbit: int = 8, threshold: float = 0.0, grow: bool = True, shares: str = "recompute"
) -> dict[str, int]:
    """Spec §3.0-3.3 on every bit layer: re-binarise (+1 bit on overflow, capped at maxbit, unless `grow` is
    off), then drop sparse MSB/LSB planes; returns the new scheme. Rebuild the optimizer afterwards."""
    check_bits("maxbit", maxbit)
    for _, layer in bit_layers(model):
        layer.requantize_(maxbit, threshold, grow=grow, shares=shares)
    return export_scheme(model)


def clamp_bits_(model: nn.Module) -> None:
    """Projection after each optimizer step, on the quantized tensors only (spec P2 recommendation)."""
    for _, layer in bit_layers(model):
        layer.clamp_()


# Clamp scopes (bsq.presets): search "planes" | "official-bin" | "none"; finetune "latent" | "official".
SEARCH_CLAMPS = ("planes", "official-bin", "none")
FINETUNE_CLAMPS = ("latent", "official")


@torch.no_grad()
def _clamp_named_(model: nn.Module, keep, low: float, high: float) -> None:
    for name, param in model.named_parameters():
        if keep(name):
            param.clamp_(low, high)


def clamp_search_(model: nn.Module, scope: str = "planes") -> None:
    """Projection after each search step. "planes": the bit tensors only, to [0, 2] (spec P2); "official-bin":
    the authors' --bin path, every parameter whose name has neither `scale` nor `bn` to [0, 2] (the shortcut
    1x1 convs, the shortcut BN `downsample.1.*` and any PACT alpha too); "none": the authors' float-start path."""
    if scope == "planes":
        clamp_bits_(model)
    elif scope == "official-bin":
        _clamp_named_(model, lambda n: "scale" not in n and "bn" not in n, 0.0, 2.0)
    elif scope != "none":
        raise BSQError(f"unknown search clamp scope {scope!r}; use one of {', '.join(SEARCH_CLAMPS)}")


def clamp_finetune_(model: nn.Module, scope: str = "latent") -> None:
    """Projection after each finetune step. "latent": the quantized latent weights to [-1, 1] (spec §5.2);
    "official": the authors', every parameter whose name has `weight` but not `bn` (float shortcut convs and the
    shortcut BN's gamma included) to [-1, 1]."""
    if scope == "latent":
        clamp_bits_(model)
    elif scope == "official":
        _clamp_named_(model, lambda n: "weight" in n and "bn" not in n, -1.0, 1.0)
    else:
        raise BSQError(f"unknown finetune clamp scope {scope!r}; use one of {', '.join(FINETUNE_CLAMPS)}")


def set_form_(model: nn.Module, form: str) -> None:
    """Move every bit layer to "bits" (search) or "latent" (finetune) form."""
    for _, layer in bit_layers(model):
        if form == "latent":
            layer.to_latent_()
        elif form == "bits":
            layer.to_bits_()
        else:
            raise BSQError(f"unknown form {form!r}; use 'bits' or 'latent'")
