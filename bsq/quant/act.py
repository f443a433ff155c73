"""BSQ's activation quantizer (spec §4): ReLU6 + dynamic-range a-bit quantization, PACT clip at a <= 3.

- bits >= 4: ReLU6, then a-bit quantization on [0, batch max] (no quantization at bits >= 32);
- 1 <= bits <= 3: a learnable PACT clip (alpha initialised to 10) replaces ReLU6, same quantizer after it;
- bits == 0: PACT clip, no quantization (the official `act = 0`);
- bits is None: plain unbounded ReLU, unquantized (the HEAD stem, and full-precision training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bsq.quant.ste import quantize_activation_ste

__all__ = ["ActQuant", "NO_QUANT_BITS", "PACT_MAX_BITS"]

NO_QUANT_BITS = 32  # at or above this many bits the official code skips quantization (act = 32)
PACT_MAX_BITS = 3  # at or below this many bits the official code swaps ReLU6 for PACT


class ActQuant(nn.Module):
    """Activation function + quantizer in one module, named like the official `relu1`/`relu2` (spec §7.3)."""

    def __init__(self, bits: int | None = 4, pact_init: float = 10.0) -> None:
        super().__init__()
        if bits is not None and not 0 <= bits <= NO_QUANT_BITS:
            raise ValueError(f"activation bits must be in 0..{NO_QUANT_BITS} or None (plain ReLU), got {bits}")
        self.bits = bits
        self.pact = bits is not None and bits <= PACT_MAX_BITS
        if self.pact:
            self.alpha = nn.Parameter(torch.tensor(float(pact_init)))

    @property
    def quantizes(self) -> bool:
        return self.bits is not None and 0 < self.bits < NO_QUANT_BITS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return F.relu(x)
        if self.pact:
            # x passes gradient only inside [0, alpha); d/d alpha = sum of the gradient where x >= alpha.
            x = torch.where(x >= self.alpha, self.alpha, F.relu(x))
        else:
            x = F.relu6(x)
        return quantize_activation_ste(x, self.bits) if self.quantizes else x

    def extra_repr(self) -> str:
        kind = "relu" if self.bits is None else ("pact" if self.pact else "relu6")
        return f"bits={self.bits}, clip={kind}"
