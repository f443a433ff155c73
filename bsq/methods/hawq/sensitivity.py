"""HAWQ-V3's sensitivity Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2 (methods-next.md "HAWQ-V3"; the
authors' ILP.ipynb: `Hutchinson_trace * delta_weights_<b>bit_square`, traces already divided by the parameter count).

Q_b, switch `hawq.quantizer`:
- "dorefa" (default, ours): the quantizer the finetune trains with (bsq.quant.frac.dorefa_weight at integer bits), so
  Omega measures the error of the model that is trained. DoReFa quantizes tanh(W) / m, m = max|tanh(W)|, to levels
  in [-1, 1] and lets BN absorb the scale; the error is taken in the weight's units, m * Q_b - tanh(W): the rounding
  error of the quantizer, without the tanh reparametrisation (which the finetune trains through, at every b alike).
- "hawq": HAWQ's symmetric per-output-channel uniform quantizer (Zhen-Dong/HAWQ quant_utils.py
  symmetric_linear_quantization_params / SymmetricQuantFunction): n = 2^(b-1) - 1, s_c = max|W_c| / n,
  Q_b(W) = clamp(round(W / s_c), -n - 1, n) s_c. Needs b >= 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from bsq.errors import BSQError
from bsq.quant.frac import dorefa_weight

__all__ = ["quantization_error", "sensitivity", "sensitivities"]


def _dorefa_error(w: torch.Tensor, bits: int) -> torch.Tensor:
    t = torch.tanh(w)
    m = t.abs().max()
    q = dorefa_weight(w, torch.tensor(float(bits), dtype=w.dtype), bits, bits, hard=True)
    return m * q - t


def _hawq_error(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits < 2:
        raise BSQError(f"hawq.quantizer: hawq (symmetric, 2^(b-1) - 1 levels a side) needs bits >= 2, got {bits}")
    n = 2 ** (bits - 1) - 1
    rows = w.reshape(w.shape[0], -1)
    scale = (rows.abs().amax(dim=1).clamp_min(1e-8) / n).reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / scale), -n - 1, n) * scale - w


@torch.no_grad()
def quantization_error(w: torch.Tensor, bits: int, quantizer: str = "dorefa") -> float:
    """||Q_b(W) - W||^2 (see the module for both quantizers), in float64."""
    w = w.detach().double()
    if quantizer == "dorefa":
        error = _dorefa_error(w, bits)
    elif quantizer == "hawq":
        error = _hawq_error(w, bits)
    else:
        raise BSQError(f"hawq.quantizer must be dorefa or hawq, got {quantizer!r}")
    return float((error**2).sum())


def sensitivity(per_param_trace: float, w: torch.Tensor, bits: int, quantizer: str = "dorefa") -> float:
    """Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2."""
    return per_param_trace * quantization_error(w, bits, quantizer)


def sensitivities(
    per_param: Mapping[str, float], weights: Mapping[str, torch.Tensor], candidates: Sequence[int], quantizer: str
) -> dict[str, dict[int, float]]:
    """{layer: {b: Omega_l(b)}} for every layer and candidate."""
    return {name: {b: sensitivity(per_param[name], w, b, quantizer) for b in candidates} for name, w in weights.items()}
