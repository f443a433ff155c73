"""Model metrics with the paper's conventions (spec §6) plus size and BitOPs (fracbits.md §1.5).

- TP / TB count only *counted* quantized tensors (not BN, not FP shortcuts, not the per-layer scales);
  all-zero tensors cost 0 bits (spec P15). Compression = 32 TP / TB; average bits = TB / TP.
- BitOPs = 1e-9 sum_l MACs_l * w_bits_l * a_bits_l, the FracBits / HAWQ-V3 definition, over one trace of the model
  (`trace_layers`) counted under a named convention of `bsq.cost` (`fracbits` by default; `hawq-v3`, `as-run`): what
  the image, an activation the model leaves float (BSQ's plain-ReLU stem output) and float layers count.
- The same tables serve every method: each quantized layer reports its own costs through the `QuantizedLayer`
  protocol (`bsq.quant.accounting`), so BSQ counts magnitude bits (the sign free) and DoReFa 2^k levels (sign
  included, fracbits.md §1.11) without this module knowing either class.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from bsq.cost import DEFAULT_POLICY, BitopsPolicy, LayerTrace, counted_bits
from bsq.cost import bitops_g as cost_bitops_g
from bsq.quant import bits as B
from bsq.quant.accounting import FLOAT_BITS, QuantizedLayer, conv_macs, linear_macs, probe, quantized_layers
from bsq.quant.act import ActQuant
from bsq.quant.convert import bit_layers

__all__ = [
    "layer_table",
    "summary",
    "projected_bits",
    "layer_macs",
    "bitops_g",
    "size_mb",
    "model_bitops_g",
    "trace_layers",
    "traced_input_bits",
    "FLOAT_BITS",
]


_TABLE_COLUMNS = ["layer", "params", "nbits", "bits", "counted", "scale", "ones_pct", "a_bits"]


def layer_table(model: nn.Module, input_size: tuple[int, ...] | None = None) -> pd.DataFrame:
    """One row per quantized tensor: name, params, stored bits N, effective bits, counted, scale, % ones per plane,
    and `a_bits`, the layer's input bits as BitOPs counts them as run (`traced_input_bits`: its own input quantizer's
    or the ActQuant's before it, the image 8, a float activation 32) on its weight row, for every method."""
    return _cost_table(model, traced_input_bits(model, input_size))


def _cost_table(model: nn.Module, traced: dict[str, float]) -> pd.DataFrame:
    """The rows of `layer_table`, weight rows taking their input bits from `traced` (empty: the layer's own)."""
    rows = [
        {
            "layer": f"{name}{cost.suffix}",
            "params": cost.params,
            "nbits": cost.nbits,
            "bits": cost.bits,
            "counted": cost.counted,
            "scale": cost.scale,
            "ones_pct": cost.ones_pct,
            "a_bits": traced.get(name, cost.a_bits) if cost.suffix == "" else cost.a_bits,
        }
        for name, layer in quantized_layers(model)
        for cost in layer.tensor_costs()
    ]
    return pd.DataFrame(rows, columns=_TABLE_COLUMNS)


def _probe_size(model: nn.Module) -> tuple[int, ...] | None:
    """A small input the model accepts, for traces whose result does not depend on the resolution: (C, 32, 32)
    for a model that starts with a conv, (features,) for one that starts with a linear layer."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, QuantizedLayer))), None)
    if hasattr(first, "in_channels"):
        return (first.in_channels, 32, 32)
    return (first.in_features,) if hasattr(first, "in_features") else None


def traced_input_bits(model: nn.Module, input_size: tuple[int, ...] | None = None) -> dict[str, float]:
    """{layer: input bits} as run (the `as-run` policy of `bsq.cost`), from one probe forward of `input_size` (by
    default a small input inferred from the first layer; bits do not depend on the resolution). Empty when the
    model takes no such input."""
    shape = input_size or _probe_size(model)
    if shape is None:
        return {}
    try:
        traces = trace_layers(model, shape)
    except (RuntimeError, ValueError, TypeError):  # the inferred probe does not fit this model
        if input_size is not None:
            raise
        return {}
    return {name: wa[1] for name, wa in counted_bits(traces, "as-run").items() if wa is not None}


def summary(model: nn.Module) -> dict[str, float]:
    """TP, TB, average bits, compression (paper), quantized size and full model size in MB. (Called every search
    epoch: it needs no input bits, so it runs no probe forward.)"""
    table = _cost_table(model, {})
    counted = table[table["counted"]]
    tp = int(counted["params"].sum())
    tb = int(round(float((counted["params"] * counted["bits"]).sum())))
    uncounted_float = sum(p.numel() for n, p in model.named_parameters() if not _is_quantized_param(model, n)) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point()
    )
    uncounted_q = table[~table["counted"]]
    return {
        "quantized_params": tp,
        "total_bits": tb,
        "avg_bits": tb / tp if tp else float("nan"),
        "compression": FLOAT_BITS * tp / tb if tb else float("inf"),
        "size_mb": tb / 8e6,
        # everything a deployment stores: quantized tensors at their bits, other tensors (scales, BN, FP
        # shortcuts, PACT alphas, BN statistics) at 32 bits (spec P16 "full model size").
        "full_size_mb": (tb + int((uncounted_q["params"] * uncounted_q["bits"]).sum()) + FLOAT_BITS * uncounted_float)
        / 8e6,
    }


@torch.no_grad()
def projected_bits(model: nn.Module, maxbit: int = 8, grow: bool = True) -> dict[str, float]:
    """What a re-quantization now would give (spec §3.1-3.2, threshold 0), without touching the model.

    The search's relaxed bits are only meaningful after rounding, so this is how its per-epoch progress is
    logged: `bits/<tensor>` (0 for all-zero), `proj_avg_bits`, `proj_compression`, and `bit_sparsity`, the share of
    zero bits among the P x N bit positions of the counted tensors at their current precision.
    """
    out: dict[str, float] = {}
    params = bits_total = set_bits = positions = 0
    for name, layer in bit_layers(model):
        for what in layer.quantized_tensors():
            planes = B.requantize(layer.planes(what), maxbit, grow)
            nonzero = (planes.pos - planes.neg) != 0
            bits = B.prune(planes, 0.0).nbits if bool(nonzero.any()) else 0
            out[f"bits/{name if what == 'weight' else name + '.bias'}"] = bits
            if layer.counted:
                count = layer.num_params(what)
                params += count
                bits_total += count * bits
                set_bits += int(nonzero.sum())
                positions += count * planes.nbits
    out["proj_avg_bits"] = bits_total / params if params else float("nan")
    out["proj_compression"] = FLOAT_BITS * params / bits_total if bits_total else float("inf")
    out["bit_sparsity"] = 1.0 - set_bits / positions if positions else float("nan")
    return out


def _is_quantized_param(model: nn.Module, param_name: str) -> bool:
    module_name, _, leaf = param_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return isinstance(module, QuantizedLayer) and leaf in module.quantized_params()


def _mac_hooks(model: nn.Module, macs: dict[str, int]) -> list:
    """Forward hooks that record each conv / linear layer's MACs (float or quantized) into `macs`."""

    def count(mod, output) -> int:
        if isinstance(mod, QuantizedLayer):
            return mod.macs(output)
        return conv_macs(mod, output) if isinstance(mod, nn.Conv2d) else linear_macs(mod, output)

    return [
        m.register_forward_hook(lambda mod, inp, out, name=name: macs.__setitem__(name, count(mod, out)))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, QuantizedLayer))
    ]


def _example(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(1, *input_size, device=next(model.parameters()).device)


def layer_macs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """MACs of every conv / linear layer for one input of `input_size` (C, H, W)."""
    macs: dict[str, int] = {}
    probe(model, _example(model, input_size), _mac_hooks(model, macs))
    return macs


def bitops_g(macs: dict[str, int], w_bits: dict[str, float], a_bits: dict[str, float]) -> float:
    """1e-9 sum_l MACs_l w_l a_l over the layers in `macs` (missing bits count as 32-bit float)."""
    return 1e-9 * sum(m * w_bits.get(n, FLOAT_BITS) * a_bits.get(n, FLOAT_BITS) for n, m in macs.items())


def size_mb(params: dict[str, int], w_bits: dict[str, float], float_bias_entries: int = 0) -> float:
    """FracBits' model size: sum_l params_l bits_l / 8e6 + 4e-6 per 32-bit bias entry (fracbits.md §1.5)."""
    return sum(p * w_bits.get(n, FLOAT_BITS) for n, p in params.items()) / 8e6 + 4e-6 * float_bias_entries


def trace_layers(model: nn.Module, input_size: tuple[int, ...]) -> list[LayerTrace]:
    """Every conv / linear layer as one probe forward of an input of `input_size` (C, H, W) sees it, in execution
    order: MACs, weight bits (its own; 32 for a float layer), input bits (its own input quantizer's, else those of
    the `ActQuant` that produced its input, else None: a float activation or the image), whether its input is the
    network input and whether it runs last. `bsq.cost` counts these under a named policy."""
    # id -> (bits, tensor): holding the tensor keeps its id from being reused by a later tensor.
    produced: dict[int, tuple[int, torch.Tensor]] = {}
    seen: dict[str, tuple[float | None, bool, bool, bool]] = {}  # name -> (input bits, image, quantized, ActQuant)
    x = _example(model, input_size)
    hooks = []

    def act_hook(mod, inp, out):
        if mod.quantizes:
            produced[id(out)] = (mod.bits, out)

    def pre_hook(mod, inp, name):
        quantized = isinstance(mod, QuantizedLayer)
        own = mod.input_bits() if quantized else None
        bits = own if own is not None else produced.get(id(inp[0]), (None, None))[0]
        seen.pop(name, None)  # a layer run twice counts once, at its last position
        seen[name] = (None if bits is None else float(bits), inp[0] is x, quantized, own is None and bits is not None)

    for name, m in model.named_modules():
        if isinstance(m, ActQuant):
            hooks.append(m.register_forward_hook(act_hook))
        elif isinstance(m, (nn.Conv2d, nn.Linear, QuantizedLayer)):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: pre_hook(mod, inp, name)))
    macs: dict[str, int] = {}
    probe(model, x, hooks + _mac_hooks(model, macs))
    w_bits = {n: float(layer.weight_bits()) for n, layer in quantized_layers(model)}
    names = [n for n in seen if n in macs]
    return [
        LayerTrace(
            name=n,
            macs=macs[n],
            w_bits=w_bits.get(n, float(FLOAT_BITS)),
            a_bits=seen[n][0],
            quantized=seen[n][2],
            image_input=seen[n][1],
            last=n == names[-1],
            act_quant=seen[n][3],
        )
        for n in names
    ]


def model_bitops_g(model: nn.Module, input_size: tuple[int, ...], policy: str | BitopsPolicy = DEFAULT_POLICY) -> float:
    """BitOPs (G) of a model in any form under a named policy (`bsq.cost.POLICIES`; default `fracbits`): weight
    bits from its quantized layers (float layers 32), input bits traced from the quantizer that produced each
    layer's input (a FracBits / uniform-QAT layer quantizes its own), the image and the activations no quantizer
    produced counted as the policy says (`as-run`: image 8, float activations 32)."""
    return cost_bitops_g(trace_layers(model, input_size), policy)
