"""CSQ's budget-aware regulariser and its target from a BSQ run's measured cost (methods-next.md CSQ; lawsonX/CSQ
main_cifar.py, Eq. 4 of the paper):

    R1   = share of gates with m >= 0.5 (over the counted layers and their bit positions)
    loss = CE + lambda (R1 - target / N) sum_l w_l sum_b |m_{l,b}|

The coefficient is a number (no gradient through R1): above the budget it pushes every soft gate down (prunes
bits), below it pushes them up (grows bits). `csq.share: gates` is the authors' (w_l = 1, R1 unweighted);
`params` weights each layer's gates by its weight count P_l (R1 = sum_l P_l open_l / sum_l P_l N, and w_l =
P_l / mean P in the L1 term, so lambda keeps its scale), so N R1 is the size-weighted average bits the suite's
accountant reports.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bsq.cost import FLOAT_BITS
from bsq.errors import BSQError
from bsq.methods.csq.layers import CSQLayer, csq_layers

__all__ = ["gate_weights", "gate_share", "budget_penalty", "target_from_budget", "open_gates"]


def _counted(model: nn.Module) -> list[tuple[str, CSQLayer]]:
    return [(name, layer) for name, layer in csq_layers(model) if layer.counted]


def gate_weights(model: nn.Module, share: str) -> list[float]:
    """w_l per counted layer: 1 ("gates") or P_l / mean P ("params")."""
    layers = _counted(model)
    if share == "gates":
        return [1.0] * len(layers)
    sizes = [math.prod(layer.weight_shape) for _, layer in layers]
    mean = sum(sizes) / max(len(sizes), 1)
    return [size / mean for size in sizes]


def open_gates(layer: CSQLayer) -> int:
    """Gates counted open: m >= 0.5 (soft) or s > 0 (hard), as get_ratio_one reads the current mask."""
    with torch.no_grad():
        return int((layer.mask() >= 0.5).sum().item())


def gate_share(model: nn.Module, share: str) -> float:
    """R1 under `share` weighting; N R1 is CSQ's own average bit count (`csq_avg_bits`). One host sync per call
    (it runs every step), not one per layer."""
    layers, weights = _counted(model), gate_weights(model, share)
    total = sum(w * layer.nbits for w, (_, layer) in zip(weights, layers, strict=True))
    if total == 0:
        raise BSQError("the model has no counted CSQ layers: nothing to regularise")
    with torch.no_grad():
        opened = torch.stack([w * (layer.mask() >= 0.5).sum() for w, (_, layer) in zip(weights, layers, strict=True)])
    return opened.sum().item() / total


def budget_penalty(model: nn.Module, lmbda: float, target: float, share: str) -> tuple[torch.Tensor, float]:
    """(lambda (R1 - target / N) sum_l w_l sum_b m_lb, R1): the term whose gradient pulls the gates to the budget."""
    layers, weights = _counted(model), gate_weights(model, share)
    r1 = gate_share(model, share)
    nbits = layers[0][1].nbits
    l1 = sum(w * layer.mask().abs().sum() for w, (_, layer) in zip(weights, layers, strict=True))
    return lmbda * (r1 - target / nbits) * l1, r1


def target_from_budget(budget: dict[str, Any], match: str, model: nn.Module) -> float:
    """The average gated weight bits that give a BSQ run's measured cost under the suite's accountant: its
    average bits a = 32 / compression (`compression`), `avg_bits`, or size * 8e6 / counted entries (`size`),
    over weights P and the fc bias B, which stays at N bits: target = (a (P + B) - B N) / P."""
    layers = _counted(model)
    weights = sum(math.prod(layer.weight_shape) for _, layer in layers)
    biases = sum(layer.weight_shape[0] for _, layer in layers if layer.has_bias)
    nbits = layers[0][1].nbits
    if match == "compression":
        bits = FLOAT_BITS / _number(budget, "compression")
    elif match == "avg_bits":
        bits = _number(budget, "avg_bits")
    elif match == "size":
        bits = _number(budget, "size_mb") * 8e6 / (weights + biases)
    else:
        raise BSQError(f"csq.match must be compression, size or avg_bits, got {match!r}")
    target = (bits * (weights + biases) - biases * nbits) / weights
    if not 0 < target <= nbits:
        raise BSQError(
            f"the budget ({match}) asks for {target:.4g} average weight bits, outside what CSQ's gates reach "
            f"(0, csq.nbits = {nbits}]: raise csq.nbits or match another BSQ run"
        )
    return target


def _number(budget: dict[str, Any], key: str) -> float:
    value = budget.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise BSQError(
            f"the budget's {key} must be a number > 0, got {value!r}; give the metrics.json of a finished BSQ prune "
            "or evaluate run"
        )
    return float(value)
