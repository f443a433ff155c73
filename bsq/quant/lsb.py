"""MSQ's round-clamp quantizer on float weights and its least-significant-bit residual (methods-next.md, MSQ).

MSQ (ICCV 2025, arXiv 2507.22349) has no public code: this is our reading, each choice labelled.
With a per-tensor scale s = max|w| (ours, as BSQ's initial scale) and the normalised magnitude w~ = |w| / s in [0, 1]:

    q_n   = clamp(round(G_n w~), 0, 2^n - 1)                 the n-bit magnitude code
    h_n   = clamp(round(G_n w~ / 2), 0, 2^(n-1) - 1)         the code one bit lower, on the same grid
    r     = q_n - 2 h_n  in {-1, 0, 1}                       the LSB residual (q_n through an STE, h_n detached)
    W     = sign(w) s q_n / G_n                               the forward weight (identity STE to w)

G_n = 2^n ("nested", the secondary reading: the (n-1)-bit grid is the even codes of the n-bit grid, so a layer
whose residual is all zero loses its LSB exactly) or 2^n - 1 ("bsq": BSQ's grid; the drop then re-rounds).
L1 on r pulls each weight to the nearest point of the coarser grid: d|r|/dw = sign(r) G_n sign(w) / s.

W is computed as s' (sign(w) q_n / k_n) with k_n = 2^n - 1 and s' = s k_n / G_n: the float operations of BSQ's
bit-plane forward (`bsq.quant.ste.planes_to_weight_ste`), so a BitConv2d / BitLinear holding the planes of q_n and
the scale s' computes exactly the same weights (the export of an MSQ model to BSQ's bit form).
"""

from __future__ import annotations

from enum import StrEnum

import torch

from bsq.quant.ste import levels

__all__ = ["Levels", "grid", "msq_scale", "export_scale", "codes", "lsb_residual", "quantize_weight", "nonzero_share"]


class Levels(StrEnum):
    """How many steps the n-bit grid has over [0, s]: `msq.levels`."""

    NESTED = "nested"  # 2^n (secondary: the (n-1)-bit grid nests in the n-bit grid)
    BSQ = "bsq"  # 2^n - 1 (BSQ's grid; the coarser grid does not nest)


def grid(nbits: int, kind: Levels | str) -> float:
    """G_n: the steps of the n-bit grid over [0, s]."""
    return float(1 << nbits) if Levels(kind) == Levels.NESTED else float(levels(nbits))


@torch.no_grad()
def msq_scale(w: torch.Tensor) -> torch.Tensor:
    """s = max|w| of the current float weights, detached (ours: no learned scale, none is trained); a tiny floor
    keeps an all-zero tensor finite (it then quantizes to 0)."""
    return w.detach().abs().amax().clamp_min(torch.finfo(w.dtype).tiny)


@torch.no_grad()
def export_scale(s: torch.Tensor, nbits: int, kind: Levels | str) -> torch.Tensor:
    """s' = s k_n / G_n, BSQ's scale of the same weights (W = s' I / (2^n - 1)); s itself for `bsq` levels."""
    return s * (levels(nbits) / grid(nbits, kind))


@torch.no_grad()
def codes(w: torch.Tensor, s: torch.Tensor, nbits: int, kind: Levels | str) -> torch.Tensor:
    """q_n = clamp(round(G_n |w| / s), 0, 2^n - 1), without the sign (float tensor of integers)."""
    return torch.round(w.abs() / s * grid(nbits, kind)).clamp_(0, levels(nbits))


class _Codes(torch.autograd.Function):
    """q_n(w~) with the identity STE of the rounding and the clamp, in code units: dq_n / dw~ = G_n."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, g: float, top: float) -> torch.Tensor:  # type: ignore[override]
        ctx.g = g
        return torch.round(u * g).clamp(0, top)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.g, None, None


def lsb_residual(w: torch.Tensor, nbits: int, kind: Levels | str, s: torch.Tensor | None = None) -> torch.Tensor:
    """r = q_n - 2 h_n in {-1, 0, 1} with gradient sign(w) G_n / s through q_n (h_n and s detached). For n = 1 the
    coarser grid is {0}, so L1 on r pulls weights to zero (the layer's last bit)."""
    if nbits < 1:
        raise ValueError(f"the LSB residual needs nbits >= 1, got {nbits}")
    s = msq_scale(w) if s is None else s
    g = grid(nbits, kind)
    u = w.abs() / s  # d u / d w = sign(w) / s
    q = _Codes.apply(u, g, float(levels(nbits)))
    with torch.no_grad():
        half = torch.round(u * (g / 2)).clamp_(0, levels(nbits - 1))
    return q - 2 * half


class _QuantizeWeight(torch.autograd.Function):
    """W = s' (sign(w) q_n / k_n), identity backward to w (BSQ's STE, spec P7: through the clamp too)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, nbits: int, kind: str) -> torch.Tensor:  # type: ignore[override]
        k = float(levels(nbits))
        q = torch.sign(w) * codes(w, s, nbits, kind) / k  # the float ops of planes_to_weight_ste
        return export_scale(s, nbits, kind) * q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None, None


def quantize_weight(w: torch.Tensor, nbits: int, kind: Levels | str, s: torch.Tensor | None = None) -> torch.Tensor:
    """The forward weight of an n-bit MSQ layer (n = 0: zeros)."""
    if nbits == 0:
        return torch.zeros_like(w)
    s = msq_scale(w) if s is None else s
    return _QuantizeWeight.apply(w, s, nbits, str(Levels(kind)))


@torch.no_grad()
def nonzero_share(w: torch.Tensor, nbits: int, kind: Levels | str) -> float:
    """Share of entries whose LSB residual is non-zero: the layer may drop its LSB once it is <= the threshold."""
    if nbits < 1 or w.numel() == 0:
        return 0.0
    return float((lsb_residual(w.detach(), nbits, kind) != 0).double().mean())
