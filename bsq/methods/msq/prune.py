"""MSQ's pruning step (methods-next.md MSQ, our reading): which layers drop how many LSBs, the Hessian sensitivity
that decides it, and the cost budget that stops it.

- A layer is a candidate when its share of non-zero LSB residuals is <= `msq.threshold` (secondary) and it is above
  `msq.min_bits`.
- Sensitivity: the Hutchinson trace of the layer's Hessian block per parameter (`bsq.quant.hessian`), recomputed at
  each pruning step; candidates below the mean over all quantized layers drop `msq.multi_lsb` LSBs, the others 1
  (secondary; `msq.hessian: false` = always 1).
- With a target, candidates drop in order of their share (sparsest first) and pruning stops as soon as the cost
  reaches the target; at the last pruning step `msq.force` keeps dropping one LSB of the sparsest residual until it
  does (ours), else the run reports budget_met false.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bsq.errors import BSQError
from bsq.methods.msq.config import MSQConfig, matched_cost
from bsq.methods.msq.layers import MSQLayer, msq_layers
from bsq.metrics import FLOAT_BITS, model_bitops_g, summary
from bsq.quant.hessian import hutchinson_traces

__all__ = ["lsb_drops", "sensitivities", "Budget", "PruneStep", "prune_step", "force_budget"]


def lsb_drops(
    shares: Mapping[str, float],
    bits: Mapping[str, int],
    sensitivity: Mapping[str, float] | None,
    threshold: float,
    multi_lsb: int,
    min_bits: int,
) -> dict[str, int]:
    """{layer: LSBs to drop} for the candidates (share <= threshold, above min_bits), sparsest first. With
    sensitivities, a candidate below their mean over every layer given drops `multi_lsb`, the others 1; never
    below `min_bits`."""
    mean = sum(sensitivity.values()) / len(sensitivity) if sensitivity else None
    out = {}
    for name in sorted(shares, key=lambda n: (shares[n], n)):
        if shares[name] > threshold or bits[name] <= min_bits:
            continue
        want = multi_lsb if mean is not None and sensitivity[name] < mean else 1
        out[name] = min(want, bits[name] - min_bits)
    return out


def sensitivities(
    model: nn.Module, batches: Iterable[Any], device: torch.device, samples: int, seed: int
) -> dict[str, float]:
    """Tr(H_l) / n_l of the CE loss for every regularised MSQ layer's weight, BN in eval mode (as HAWQ-V3)."""
    params = {name: layer.weight for name, layer in msq_layers(model) if layer.regularized}
    was_training = model.training
    model.eval()
    try:

        def loss_of(batch) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x.to(device)), y.to(device))

        traces = hutchinson_traces(
            loss_of, batches, params, max_samples=samples, min_samples=min(4, samples), seed=seed
        )
    finally:
        model.train(was_training)
    return {name: trace.per_param for name, trace in traces.items()}


class Budget:
    """The cost the pruning is steered by (size in MB or BitOPs in G, the suite's accountant) and its target.
    A compression target becomes the size of the same average bits over this model's counted tensors."""

    def __init__(self, model: nn.Module, match: str, target: float, shape: tuple[int, ...]) -> None:
        self.kind, self.match, self.shape = matched_cost(match), match, shape
        counted = summary(model)["quantized_params"]
        self.target = FLOAT_BITS * counted / target / 8e6 if match == "compression" else float(target)
        self.requested = float(target)

    def cost(self, model: nn.Module) -> float:
        return float(summary(model)["size_mb"] if self.kind == "size" else model_bitops_g(model, self.shape))

    def reached(self, model: nn.Module) -> bool:
        return self.cost(model) <= self.target * (1 + 1e-9)

    @property
    def unit(self) -> str:
        return "MB" if self.kind == "size" else "GBitOPs"


def budget_from_record(record: Mapping[str, Any], match: str) -> float:
    """A BSQ run's measured cost (its metrics.json) in the unit of `match`."""
    key = {"compression": "compression", "size": "size_mb", "bitops": "bitops_g"}[match]
    value = record.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < float(value) < float("inf")
    if not ok:
        raise BSQError(
            f"the budget file's {key} must be a finite number > 0, got {value!r}; give the metrics.json of a "
            "finished BSQ prune or evaluate run"
        )
    return float(value)


@dataclass
class PruneStep:
    """What one pruning step did: {layer: LSBs dropped}, and whether the budget stopped it."""

    drops: dict[str, int]
    sensitivity: dict[str, float] | None
    reached: bool


def _drop(layer: MSQLayer, count: int) -> None:
    layer.set_bits_(layer.nbits - count)


def prune_step(
    model: nn.Module,
    cfg: MSQConfig,
    budget: Budget | None,
    sensitivity_of: Callable[[], dict[str, float]] | None,
) -> PruneStep:
    """One pruning step of the schedule (see the module). `sensitivity_of` runs only if a layer is a candidate."""
    layers = {name: layer for name, layer in msq_layers(model) if layer.regularized}
    if budget is not None and budget.reached(model):
        return PruneStep({}, None, True)
    shares = {name: layer.nonzero_share() for name, layer in layers.items()}
    bits = {name: layer.nbits for name, layer in layers.items()}
    planned = lsb_drops(shares, bits, None, cfg.threshold, cfg.multi_lsb, cfg.min_bits)
    sensitivity = sensitivity_of() if planned and cfg.hessian and sensitivity_of is not None else None
    if sensitivity is not None:
        planned = lsb_drops(shares, bits, sensitivity, cfg.threshold, cfg.multi_lsb, cfg.min_bits)
    done: dict[str, int] = {}
    for name, count in planned.items():  # sparsest first
        _drop(layers[name], count)
        done[name] = count
        if budget is not None and budget.reached(model):
            return PruneStep(done, sensitivity, True)
    return PruneStep(done, sensitivity, budget is not None and budget.reached(model))


def force_budget(model: nn.Module, cfg: MSQConfig, budget: Budget) -> dict[str, int]:
    """Drop one LSB at a time from the layer with the sparsest residual (above min_bits) until the target is
    reached or no layer can go lower (ours, `msq.force`); the last drop is the one landing closest under the target,
    so a big layer's LSB does not overshoot it when a smaller one reaches it. Returns {layer: LSBs dropped}."""
    layers = {name: layer for name, layer in msq_layers(model) if layer.regularized}
    done: dict[str, int] = {}
    while not budget.reached(model):
        open_layers = [n for n, layer in layers.items() if layer.nbits > cfg.min_bits]
        if not open_layers:
            break
        name = _closest_final_drop(model, layers, open_layers, budget)
        if name is None:
            name = min(open_layers, key=lambda n: (layers[n].nonzero_share(), n))
        _drop(layers[name], 1)
        done[name] = done.get(name, 0) + 1
    return done


def _closest_final_drop(
    model: nn.Module, layers: Mapping[str, MSQLayer], open_layers: list[str], budget: Budget
) -> str | None:
    """The layer whose 1-LSB drop reaches the target with the highest cost left (the least overshoot), or None if
    no single drop reaches it."""
    best: tuple[float, str] | None = None
    for name in open_layers:
        layers[name].set_bits_(layers[name].nbits - 1)
        cost = budget.cost(model)
        layers[name].set_bits_(layers[name].nbits + 1)
        if cost <= budget.target * (1 + 1e-9) and (best is None or cost > best[0]):
            best = (cost, name)
    return None if best is None else best[1]


def first_batches(loader: Iterable[Any], count: int) -> list[Any]:
    return list(islice(iter(loader), count))
