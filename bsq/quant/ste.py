"""Straight-through estimators used by BSQ (spec §1.4, §1.5, §4.1).

Each is an `autograd.Function` whose backward is the identity map from the quantized value to its input: BSQ
passes gradients through rounding *and* through the [-1, 1] clip unchanged (spec P7), so saturated bit planes
keep receiving gradient.
"""

from __future__ import annotations

import torch

__all__ = ["levels", "quantize_levels_ste", "planes_to_weight_ste", "quantize_activation_ste"]


def levels(nbits: int) -> int:
    """Positive magnitude steps, 2^N - 1 (N counts magnitude bits; the sign is free, spec §1.2)."""
    return (1 << nbits) - 1


class _QuantizeLevels(torch.autograd.Function):
    """I = sign(u_c) round(|u_c| k), u_c = clip(u, -1, 1), k = 2^N - 1; backward dI/du = k.

    Returning integer levels (not I / k) lets the bit-plane forward and the integer-export forward share the
    same float operations after this point, so they agree bit for bit (see `bits.dequantize`).
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: float) -> torch.Tensor:  # type: ignore[override]
        ctx.k = k
        u_c = u.clamp(-1.0, 1.0)
        return torch.sign(u_c) * torch.round(u_c.abs() * k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.k, None


def quantize_levels_ste(u: torch.Tensor, nbits: int) -> torch.Tensor:
    """Integer levels of the normalised weight u at N magnitude bits; with the later / k, dQ/du = 1."""
    return _QuantizeLevels.apply(u, float(levels(nbits)))


class _PlanesToWeight(torch.autograd.Function):
    """W = s * Q_N(clip(sum_b (p_b - n_b) e_b)) in one node (spec §1.4), with the spec's gradients (§1.5):
    dL/dp_b = s e_b G, dL/dn_b = -dL/dp_b, dL/ds = sum G q.

    Mathematically the same as composing `planes_to_unit` and `quantize_levels_ste`; fusing saves the
    autograd intermediates, which is most of BSQ's step-time overhead over a float model.
    """

    @staticmethod
    def forward(ctx, pos, neg, e, scale, k: float):  # type: ignore[override]
        with torch.autocast(pos.device.type, enabled=False):  # `@` would run in bf16 under autocast: keep float32
            # sum((p - n) * e) as the authors' `bit_STE` input: a matmul sums in another order, and on relaxed planes
            # the last-bit difference flips roundings that the step-by-step trajectory checks see
            u_c = ((pos - neg) * e).sum(-1).clamp_(-1.0, 1.0)
            q = torch.sign(u_c) * torch.round(u_c.abs() * k) / k  # same float ops as bits.dequantize
        ctx.save_for_backward(e, scale, q)
        return scale * q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        e, scale, q = ctx.saved_tensors
        grad_pos = (grad * scale).unsqueeze(-1) * e
        return grad_pos, -grad_pos, None, (grad * q).sum(), None


def planes_to_weight_ste(pos, neg, e, scale, nbits: int) -> torch.Tensor:
    """Quantized weight from bit planes with BSQ's straight-through gradients (fused)."""
    return _PlanesToWeight.apply(pos, neg, e, scale, float(levels(nbits)))


class _QuantizeActivation(torch.autograd.Function):
    """S round(|x| k / S) / k sign(x) with S = max|x| over the whole tensor (per batch, spec §4.1, P6)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float) -> torch.Tensor:  # type: ignore[override]
        x = x.float()  # under bf16 autocast the input may be bf16: round in float32, as without autocast
        # clamp_min instead of an `if S == 0` branch: no host sync on GPU, and an all-zero x still maps to 0.
        s = x.detach().abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
        # S * (round(|x| k / S) / k) * sign(x): the authors' order of operations, so that the float32 rounding of
        # every activation is theirs too (the step-by-step trajectory checks depend on it, official_trajectories)
        return s * (torch.round(x.abs() * k / s) / k) * torch.sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def quantize_activation_ste(x: torch.Tensor, nbits: int) -> torch.Tensor:
    """a-bit dynamic-range quantization of x (BSQ's activation quantizer), identity backward."""
    return _QuantizeActivation.apply(x, float(levels(nbits)))
