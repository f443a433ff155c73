"""Pure tensor arithmetic of BSQ's sign-magnitude bit planes (spec §1, §3).

Conventions (spec §0): planes live in the *last* dimension, MSB first; N counts magnitude bits; the place
value of plane b is e_b = 2^(N-1-b) / (2^N - 1), so an N-bit layer holds s * {-(2^N-1), ..., 2^N-1} / (2^N-1).
Integers are computed in float64/int64 so the binary expansion is exact (spec P21).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bsq.quant.ste import levels

__all__ = [
    "Planes",
    "place_values",
    "int_to_planes",
    "planes_to_unit",
    "unit_to_levels",
    "dequantize",
    "float_to_planes",
    "requantize",
    "prune",
    "ones_percent",
]


class Planes(NamedTuple):
    """One quantized tensor in bit form: positive and negative planes (..., N), scale s and precision N."""

    pos: torch.Tensor
    neg: torch.Tensor
    scale: torch.Tensor
    nbits: int


def place_values(nbits: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """e = (2^(N-1), ..., 2, 1) / (2^N - 1); empty for N = 0."""
    if nbits == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    powers = 2.0 ** torch.arange(nbits - 1, -1, -1, dtype=torch.float64, device=device)
    return (powers / levels(nbits)).to(dtype)


def int_to_planes(magnitude: torch.Tensor, nbits: int, dtype=torch.float32) -> torch.Tensor:
    """Binary expansion, MSB first, of non-negative integers < 2^N into an (..., N) tensor of 0/1."""
    shifts = torch.arange(nbits - 1, -1, -1, device=magnitude.device)
    return ((magnitude.long().unsqueeze(-1) >> shifts) & 1).to(dtype)


def planes_to_unit(pos: torch.Tensor, neg: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Normalised weight u = sum_b (p_b - n_b) e_b (unclipped; |u| <= 1 for binary planes), summed in the
    authors' order (elementwise product, then sum over the planes)."""
    return ((pos - neg) * e).sum(-1)


@torch.no_grad()
def unit_to_levels(u: torch.Tensor, nbits: int) -> torch.Tensor:
    """Signed integer levels the forward pass uses: sign(u_c) round(|u_c| (2^N-1)), u_c = clip(u, -1, 1)."""
    u_c = u.clamp(-1.0, 1.0)
    return (torch.sign(u_c) * torch.round(u_c.abs() * levels(nbits))).long()


def dequantize(int_levels: torch.Tensor, nbits: int, scale: torch.Tensor) -> torch.Tensor:
    """W = s * (I / (2^N - 1)); N = 0 gives zeros.

    The single place where integers become weights: the bit-plane forward, `to_float` and the integer export
    all call it, which is why they agree bit for bit.
    """
    if nbits == 0:
        return torch.zeros_like(int_levels, dtype=scale.dtype)
    return scale * (int_levels.to(scale.dtype) / levels(nbits))


@torch.no_grad()
def float_to_planes(weight: torch.Tensor, nbits: int) -> Planes:
    """Spec §1.3 (`ini2bit`): per-tensor scale s = max|W|, I± = round((2^N-1) max(±W, 0) / s), MSB first.

    N = 0 is stored as one all-zero plane (the official "0-bit" representation, spec §5.3).
    """
    if nbits < 0:
        raise ValueError(f"nbits must be >= 0, got {nbits}")
    # Rounding happens in the weight's own dtype, as the official code does (so 2.5/7 in float32 gives 2,
    # spec App. B.1); only the binary expansion needs exact integers, done in int64.
    w = weight.detach()
    s = w.abs().max() if w.numel() else torch.zeros((), dtype=w.dtype, device=w.device)
    if nbits == 0 or s == 0:
        n = max(nbits, 1)
        zeros = torch.zeros(*weight.shape, n, dtype=weight.dtype, device=weight.device)
        return Planes(zeros, zeros.clone(), s, n)
    k = levels(nbits)
    i_pos = torch.round(k * w.clamp(min=0) / s)
    i_neg = torch.round(k * (-w).clamp(min=0) / s)
    return Planes(
        int_to_planes(i_pos, nbits, weight.dtype),
        int_to_planes(i_neg, nbits, weight.dtype),
        s,
        nbits,
    )


@torch.no_grad()
def requantize(planes: Planes, maxbit: int = 8, grow: bool = True) -> Planes:
    """Spec §3.1 (`quant`): collapse relaxed planes onto the grid; +1 bit on overflow below `maxbit`.

    `grow=False` is the paper-era code (the commit before precision increase, `bsq.overflow: saturate`): overflow
    saturates at every N, as at N >= maxbit.

    I± = round(max(±u, 0)(2^N-1)) with u unclipped. At N >= maxbit overflow saturates; otherwise a magnitude
    above 2^N-1 adds one plane and rescales s by (2^N'-1)/(2^(N'-1)-1), so overflowing weights keep their
    unclipped value (the function changes, spec P8).
    """
    pos, neg, scale, nbits = planes
    u = planes_to_unit(pos.double(), neg.double(), place_values(nbits, torch.float64, pos.device))
    k = levels(nbits)
    i_pos = torch.round(u.clamp(min=0) * k)
    i_neg = torch.round((-u).clamp(min=0) * k)
    if nbits >= maxbit or not grow:
        i_pos, i_neg = i_pos.clamp(max=k), i_neg.clamp(max=k)
    elif max(i_pos.max().item(), i_neg.max().item()) > k:
        nbits += 1
        scale = scale * levels(nbits) / levels(nbits - 1)
        # bits in [0, 2] bound I by 2(2^N-1) <= 2^(N+1)-1; clamp only guards unprojected inputs.
        i_pos, i_neg = i_pos.clamp(max=levels(nbits)), i_neg.clamp(max=levels(nbits))
    return Planes(int_to_planes(i_pos, nbits, pos.dtype), int_to_planes(i_neg, nbits, pos.dtype), scale, nbits)


def ones_percent(pos: torch.Tensor, neg: torch.Tensor) -> list[float]:
    """z_b = 100 * share of entries whose bit b is set (p_b - n_b != 0), MSB first (spec §3.2, §6.4)."""
    nonzero = (pos - neg) != 0
    return (100.0 * nonzero.reshape(-1, pos.shape[-1]).double().mean(0)).tolist()


@torch.no_grad()
def prune(planes: Planes, threshold: float = 0.0, fold_msb: bool = True, shares: str = "recompute") -> Planes:
    """Spec §3.2 (`pruning`): drop sparse MSB and LSB planes, correcting the scale; N never goes below 1.

    `threshold` is in percent of the tensor's entries. MSB pass: an empty plane is dropped (exact); a plane set
    on fewer than `threshold` % of entries is folded into the lower planes with saturation when `fold_msb`
    (lossy). LSB pass: a plane set on <= `threshold` % is dropped and s doubles. Finally
    s <- s (2^N-1)/(2^N0-1). With threshold 0 only all-zero planes go and the weights are unchanged.

    `shares` (MSB pass, `bsq.prune_shares`): "recompute" tests each plane's share after the folds above it (a
    fold sets bits in the lower planes); "once" takes every share from the tensor as given, as the authors' code
    does. They differ only when a fold happens (threshold > 0).
    """
    if shares not in ("recompute", "once"):
        raise ValueError(f"shares must be 'recompute' or 'once', got {shares!r}")
    pos, neg, scale, nbits = planes
    n0 = nbits
    original = ones_percent(pos, neg)
    while nbits > 1:
        z = original[n0 - nbits] if shares == "once" else ones_percent(pos[..., :1], neg[..., :1])[0]
        if z == 0:
            pass
        elif fold_msb and z < threshold:
            pos = torch.cat([pos[..., :1], (pos[..., 1:] + pos[..., :1]).clamp(max=1)], dim=-1)
            neg = torch.cat([neg[..., :1], (neg[..., 1:] + neg[..., :1]).clamp(max=1)], dim=-1)
        else:
            break
        pos, neg, nbits = pos[..., 1:], neg[..., 1:], nbits - 1
    while nbits > 1:
        z = ones_percent(pos[..., -1:], neg[..., -1:])[0]
        if z > threshold:
            break
        pos, neg, nbits, scale = pos[..., :-1], neg[..., :-1], nbits - 1, scale * 2
    scale = scale * levels(nbits) / levels(n0)
    return Planes(pos.contiguous(), neg.contiguous(), scale, nbits)
