"""`bsq trace`: K BSQ search steps from a float checkpoint, reported step by step in the format of the authors'
reference trajectories (shared spec `official_trajectories.json`), so an install can be checked against them.

The procedure is the reference's: the float model converted to `quant.nbits` planes and `pruning(0)`; SGD with
momentum and weight decay on every parameter (`optim`, the search recipe: 0.9, 1e-4); batch i = training rows
[B i, B (i+1)) in file order, unaugmented; train mode; loss = CE + alpha R / TP, one backward, one step, then the
preset's clamp (`bsq.clamp`). R is built from the authors' autograd ops (`official_penalty_sum`), so that the
gradients round as theirs. `ce` and `reg_over_tp` are recorded before each step. After the last step one
re-quantization + pruning(0), as at a re-quantization boundary, then per layer N, s and the ones of each plane.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bsq.config import StageConfig
from bsq.data import train_set_in_file_order
from bsq.engine import make_optimizer
from bsq.errors import BSQError
from bsq.metrics import summary
from bsq.quant.convert import bit_layers, clamp_search_, quantize_model, requantize_model
from bsq.regularizers import official_penalty_sum, total_quantized_params

__all__ = ["build_traced_model", "run_trace"]


def build_traced_model(cfg: StageConfig, checkpoint: str | Path) -> nn.Module:
    """The float checkpoint (the authors' `model_best.pth.tar` or a plain state dict) in bit form after
    `pruning(0)`, as the authors' search script right after loading (spec §3.0)."""
    from bsq.official import official_model

    model = official_model(cfg.model_args(), checkpoint, who="bsq trace")
    quantize_model(model, cfg.quant.policy())
    for _, layer in bit_layers(model):
        layer.prune_(0.0)
    return model


def _layer_record(layer) -> dict[str, Any]:
    pos, neg, scale, nbits = layer.planes("weight")
    flat = (pos.detach().reshape(-1, nbits), neg.detach().reshape(-1, nbits))
    return {
        "nbits": int(nbits),
        "scale": float(scale.detach()),
        "pos_ones": [int(v) for v in (flat[0] == 1).sum(0)],
        "neg_ones": [int(v) for v in (flat[1] == 1).sum(0)],
    }


def run_trace(cfg: StageConfig, checkpoint: str | Path, steps: int, alpha: float, lr: float) -> dict[str, Any]:
    """Run `steps` search steps and return the reference-format record (see the module docstring)."""
    if steps < 1:
        raise BSQError(f"--steps must be >= 1, got {steps}")
    torch.manual_seed(cfg.seed)
    model = build_traced_model(cfg, checkpoint)
    data = train_set_in_file_order(cfg.data)
    batch = cfg.data.batch_size
    if steps * batch > len(data):
        raise BSQError(f"{steps} steps of {batch} images need {steps * batch} training images; there are {len(data)}")
    tp = float(total_quantized_params(model))
    optimizer = make_optimizer(model, cfg.optim, lr=lr)
    model.train()
    trajectory = []
    for i in range(steps):
        x, y = data.__getitems__([(j, None) for j in range(batch * i, batch * (i + 1))])
        optimizer.zero_grad(set_to_none=True)
        ce = F.cross_entropy(model(x), y)
        reg = official_penalty_sum(model) / tp  # R / TP before the step, by the authors' autograd ops
        (ce + alpha * reg).backward()
        optimizer.step()
        clamp_search_(model, cfg.bsq.clamp)
        trajectory.append({"step": i, "ce": round(ce.item(), 6), "reg_over_tp": round(reg.item(), 6)})
    requantize_model(model, cfg.quant.maxbit, 0.0, grow=cfg.bsq.grows)
    totals = summary(model)
    return {
        "steps": steps,
        "decay": alpha,
        "lr": lr,
        "clamp": cfg.bsq.clamp,
        "preset": cfg.preset,
        "TP": float(tp),
        "TB": int(totals["total_bits"]),
        "compression": round(totals["compression"], 4),
        "trajectory": trajectory,
        "layers": {name: _layer_record(layer) for name, layer in bit_layers(model) if layer.counted},
    }
