"""BSQ's bit-level group Lasso with memory-aware reweighting (spec §2, the paper's Eq. 5).

R = sum_l P_l N_l BGL_l, BGL_l = sum_b sqrt(eps + sum_entries p_{l,b}^2 + n_{l,b}^2), and the training loss adds
alpha * R / TP, TP = quantized parameters counted in the compression rate (spec §2.2). Each quantized bias
(the official fc bias) is its own reweighted term. Paper-era shortcut convs are regularized but not in TP.
"""

from __future__ import annotations

import torch
from torch import nn

from bsq.quant.convert import bit_layers

__all__ = [
    "group_norms",
    "bit_penalty",
    "official_penalty_sum",
    "add_penalty_grad_",
    "total_quantized_params",
    "EPS",
    "KINDS",
]

EPS = 1e-8  # inside the square root, as the official `L1reg`
KINDS = ("group_lasso", "l1")


def group_norms(pos: torch.Tensor, neg: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """One norm per bit position over both planes: sqrt(eps + sum p_b^2 + n_b^2), shape (N,)."""
    sq = pos.square().flatten(0, -2).sum(0) + neg.square().flatten(0, -2).sum(0)
    return torch.sqrt(eps + sq)


def total_quantized_params(model: nn.Module) -> int:
    """TP: entries of every counted quantized tensor (weights and quantized biases)."""
    return sum(
        layer.num_params(what) for _, layer in bit_layers(model) if layer.counted for what in layer.quantized_tensors()
    )


def _terms(model: nn.Module):
    """(planes, weight P_l N_l or 1) for every regularized tensor, checking there is at least one."""
    terms = []
    for _, layer in bit_layers(model):
        if layer.form != "bits" or not layer.regularized:
            continue
        for what in layer.quantized_tensors():
            planes = layer.planes(what)
            terms.append((planes, layer.num_params(what) * planes.nbits))
    tp = total_quantized_params(model)
    if not terms or tp == 0:
        raise ValueError("the model has no bit-form layers to regularize; convert it with quantize_model first")
    return terms, tp


def bit_penalty(model: nn.Module, kind: str = "group_lasso", reweight: bool = True, eps: float = EPS) -> torch.Tensor:
    """R / TP for the model's bit layers (multiply by alpha in the loss).

    `kind="group_lasso"` is BSQ; `kind="l1"` replaces each group norm by the plain L1 norm of the plane
    (the element-wise sparsity baseline). `reweight=False` drops the P_l N_l factor (unweighted ablation; R is
    then still divided by TP so alpha keeps a comparable scale).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown regularizer {kind!r}; choose one of {KINDS}")
    terms, tp = _terms(model)
    total = 0.0
    for (pos, neg, _, _), weight in terms:
        term = group_norms(pos, neg, eps).sum() if kind == "group_lasso" else pos.abs().sum() + neg.abs().sum()
        total = total + (term * weight if reweight else term)
    return total / tp


def official_penalty_sum(model: nn.Module, eps: float = EPS) -> torch.Tensor:
    """R (not yet divided by TP) built from the same autograd ops as the authors' `L1reg` (cat, square, sum, sqrt,
    sum, x P_l N_l, accumulated layer by layer), for `bsq trace`: its backward rounds exactly as theirs, which the
    step-by-step reference trajectories need. Same value and gradient as bit_penalty * TP up to float rounding."""
    terms, _ = _terms(model)
    total: torch.Tensor | float = 0.0
    for (pos, neg, _, _), weight in terms:
        both = torch.cat((pos, neg), 0)
        total = total + torch.sum(torch.sqrt(eps + torch.sum(both**2, tuple(range(pos.dim() - 1))))) * weight
    return total  # type: ignore[return-value]


@torch.no_grad()
def add_penalty_grad_(
    model: nn.Module, alpha: float, kind: str = "group_lasso", reweight: bool = True, eps: float = EPS
) -> torch.Tensor:
    """Add alpha * d(R/TP)/d(planes) to the planes' `.grad` in place and return R/TP (detached).

    Same value and gradient as backpropagating `alpha * bit_penalty(model)`, in one fused pass per tensor:
    d/dp = alpha w_l p / ||group_b|| (group Lasso) or alpha w_l sign(p) (L1), w_l = P_l N_l / TP. Call it
    between `loss.backward()` and `optimizer.step()`; it removes most of the regulariser's step-time cost.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown regularizer {kind!r}; choose one of {KINDS}")
    terms, tp = _terms(model)
    total = torch.zeros((), device=terms[0][0].pos.device)
    for (pos, neg, _, _), weight in terms:
        w = (weight if reweight else 1) / tp
        if kind == "group_lasso":
            # The same sums of squares as bit_penalty: torch.linalg.vector_norm over many dims is off by up to
            # 3e-5 (relative) in float32 on CPU for relaxed planes, enough to leave the authors' trajectory.
            norms = group_norms(pos, neg, eps)
            total += w * norms.sum()
            coef = (alpha * w) / norms
            for t in (pos, neg):
                if t.grad is None:
                    t.grad = t * coef
                else:
                    t.grad.addcmul_(t, coef)
        else:
            total += w * (pos.abs().sum() + neg.abs().sum())
            for t in (pos, neg):
                if t.grad is None:
                    t.grad = alpha * w * torch.sign(t)
                else:
                    t.grad.add_(torch.sign(t), alpha=alpha * w)
    return total
