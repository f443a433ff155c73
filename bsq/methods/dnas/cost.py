"""DNAS / EdMIPS' expected cost and the complexity term (methods-next.md "DNAS and EdMIPS").

The cost model is FracBits' (`bsq.quant.frac_cost.CostModel`, shared with FracBits and HAWQ-V3: size in MB or
BitOPs in G under the suite's BitOPs policies, bsq.cost; fixed first / last layers at their fixed bits, float layers
as the policy counts them)
with a mixed layer's bits replaced by their expectation under pi = softmax(theta / T):

    E[Size]   = sum_l [P_l sum_c pi_lc c + 32 bias_l] / 8e6
    E[BitOPs] = 1e-9 sum_l MACs_l (sum_c pi_lc^w c) (sum_a pi_la^a a)      (independent choices: E[w a] = E[w] E[a])

EdMIPS' complexity_loss is the BitOPs form (mixresnet.py: size_product * E[a] * E[w], over its quantized layers)
divided by the first quantized layer's size_product: `complexity: edmips` = lam E[C] / C_unit, C_unit the first
searched layer's cost at 1 bit (1 x 1 bits for BitOPs), so its --cd values carry over. `complexity: target` =
lam |E[C] / C_t - 1| (two-sided, as FracBits' normalised term): matched runs land at the BSQ run's cost.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bsq.methods.dnas.supernet import MixedLayer
from bsq.quant.frac import FracLayer
from bsq.quant.frac_cost import CostModel

__all__ = ["ExpectedCost", "complexity_term", "scheme_cost"]


def _expected(layer: MixedLayer, kind: str) -> torch.Tensor:
    cands = layer.w_cands if kind == "w" else layer.a_cands
    pi = layer.probs(kind)
    return (pi * torch.tensor(cands, dtype=pi.dtype, device=pi.device)).sum()


class ExpectedCost(CostModel):
    """E[cost] of a super-network (differentiable in theta); the plain cost of any other FracBits model. With
    `choices` set ({layer: (w, a)}), the cost of that discrete scheme (the derivation's repair)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.names = {id(e.module): e.name for e in self.entries}
        self.choices: Mapping[str, tuple[int, int | None]] | None = None

    def _bits(self, layer: FracLayer, offset: float | None):
        if isinstance(layer, MixedLayer) and self.choices is not None and self.names.get(id(layer)) in self.choices:
            w, a = self.choices[self.names[id(layer)]]
            return torch.tensor(float(w)), a
        if not isinstance(layer, MixedLayer) or not layer.mixing or offset is not None:
            return super()._bits(layer, offset)
        w = _expected(layer, "w") if len(layer.w_cands) > 1 else super()._bits(layer, None)[0]
        a = _expected(layer, "a") if len(layer.a_cands) > 1 else super()._bits(layer, None)[1]
        return w, a

    def unit_cost(self) -> float:
        """EdMIPS' normaliser: the first searched layer's cost at 1-bit weights (and 1-bit inputs for BitOPs)."""
        first = next((e for e in self.entries if isinstance(e.module, MixedLayer) and e.module.mixing), None)
        if first is None:
            return 1.0
        return first.params / 8e6 if self.kind == "size" else 1e-9 * first.macs

    def scheme_cost(self, choices: Mapping[str, tuple[int, int | None]]) -> float:
        """The cost of a discrete scheme {layer: (w_bits, a_bits)} of this super-network's mixed layers."""
        self.choices = choices
        try:
            with torch.no_grad():
                return float(self())
        finally:
            self.choices = None


def scheme_cost(cost: ExpectedCost, choices: Mapping[str, tuple[int, int | None]]) -> float:
    return cost.scheme_cost(choices)


def complexity_term(expected: torch.Tensor, kind: str, lam: float, target: float | None, unit: float) -> torch.Tensor:
    """lam |E[C] / C_t - 1| (`target`) or lam E[C] / C_unit (`edmips`)."""
    if kind == "target":
        return lam * (expected / target - 1).abs()
    return lam * expected / unit
